// The recd dashboard: one page per hash route, each drawn from the JSON API
// under /v1/ (see docs/api.md). No framework; Chart.js draws the charts.
"use strict";

const KEY_STORAGE = "recd.key";
const KINDS = ["view", "click", "like", "add_to_cart", "remove_from_cart", "purchase", "rating"];
const PALETTE = ["#2f6fdf", "#e8710a", "#1e8e3e", "#d93025", "#9334e6", "#12a4af", "#f9ab00",
  "#c5221f", "#5f6368", "#185abc", "#b06000", "#0d652d", "#a142f4", "#007b83", "#e52592", "#3c4043"];

const ui = {
  scope: null,        // "read" | "write" | "admin", once known
  keysRequired: true,
  charts: [],         // Chart instances of the page on screen
  render: 0,          // counts route()s: a page drawn by an earlier one is stale
};

// ---------------------------------------------------------------- the API

class ApiError extends Error {
  constructor(status, problem) {
    super((problem && (problem.detail || problem.title)) || `HTTP ${status}`);
    this.status = status;
    this.problem = problem;
  }
}

function storedKey() {
  return sessionStorage.getItem(KEY_STORAGE);
}

async function api(path, options = {}) {
  const headers = Object.assign({ Accept: "application/json" }, options.headers || {});
  const key = storedKey();
  if (key) headers.Authorization = `Bearer ${key}`;
  const method = options.method || "GET";
  let response = await fetch(path, { method, headers });
  // A busy server answers 503 (overloaded, timeout) or 429 with Retry-After:
  // a read is asked again after it, up to twice, before the page shows it.
  for (let retry = 0; retry < 2 && method === "GET" && [429, 503].includes(response.status); retry += 1) {
    const after = Number(response.headers.get("retry-after")) || 1;
    await new Promise((resolve) => setTimeout(resolve, Math.min(after, 5) * 1000));
    response = await fetch(path, { method, headers });
  }
  if (response.status === 401 && !options.allow401) {
    sessionStorage.removeItem(KEY_STORAGE);
    showSignIn("The key was refused; sign in again.");
    throw new ApiError(401, null);
  }
  const type = response.headers.get("content-type") || "";
  const body = type.includes("json") ? await response.json() : await response.text();
  if (!response.ok && !(options.accept || []).includes(response.status)) {
    throw new ApiError(response.status, typeof body === "object" ? body : null);
  }
  return options.withStatus ? { status: response.status, body } : body;
}

const enc = encodeURIComponent;
const isAdmin = () => ui.scope === "admin";

// ---------------------------------------------------------------- helpers

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") node.className = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name === "text") node.textContent = value;
    else node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function fmtInt(n) {
  return n === null || n === undefined ? "–" : Math.round(n).toLocaleString("en-US");
}

function fmtNum(n, digits = 4) {
  return n === null || n === undefined ? "–" : Number(n).toFixed(digits);
}

function fmtBytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function fmtTime(ms, step) {
  const d = new Date(ms);
  const iso = d.toISOString();
  if (step >= 86400) return iso.slice(0, 10);
  if (step >= 3600) return `${iso.slice(5, 10)} ${iso.slice(11, 16)}`;
  return iso.slice(11, 16);
}

function fmtDate(value) {
  if (!value) return "–";
  return new Date(value).toISOString().replace("T", " ").slice(0, 19);
}

function seconds(a, b) {
  if (!a || !b) return "–";
  return `${((new Date(b) - new Date(a)) / 1000).toFixed(1)} s`;
}

function showError(error) {
  const box = document.getElementById("error");
  if (!error) { box.hidden = true; box.textContent = ""; return; }
  if (error.status === 401) return;
  box.hidden = false;
  box.textContent = error.status ? `${error.status}: ${error.message}` : String(error.message || error);
}

function tile(label, value, id) {
  return el("div", { class: "tile", id }, el("div", { class: "label" }, label), el("div", { class: "value" }, value));
}

function card(title, ...body) {
  return el("section", { class: "card" }, el("h2", {}, title), ...body);
}

function chartBox(id, tall) {
  return el("div", { class: tall ? "chart tall" : "chart" }, el("canvas", { id }));
}

function table(headers, rows) {
  const head = el("tr", {}, headers.map((h) => el("th", { class: h.num ? "num" : null }, h.label || h)));
  const body = rows.map((cells) => el("tr", {}, cells.map((c, i) =>
    el("td", { class: headers[i] && headers[i].num ? "num" : null }, c))));
  return el("table", {}, el("thead", {}, head), el("tbody", {}, body));
}

// Draws a chart on the canvas `canvasId` of `root` (a page's own view):
// nothing when that view is no longer on screen (the page was routed away
// from, or drawn again, while it waited for the API); a chart already on
// the canvas is replaced.
function chart(root, canvasId, config) {
  const canvas = root.isConnected ? root.querySelector(`#${canvasId}`) : null;
  if (!canvas) return null;
  const old = Chart.getChart(canvas);
  if (old) {
    old.destroy();
    ui.charts = ui.charts.filter((c) => c !== old);
  }
  config.options = Object.assign({ responsive: true, maintainAspectRatio: false, animation: false }, config.options || {});
  const made = new Chart(canvas, config);
  ui.charts.push(made);
  return made;
}

function lineSeries(label, data, i, extra = {}) {
  return Object.assign({ label, data, borderColor: PALETTE[i % PALETTE.length],
    backgroundColor: PALETTE[i % PALETTE.length] + "55", pointRadius: 0, borderWidth: 1.5, tension: 0.2 }, extra);
}

function rangeSelect(current, onChange) {
  return el("select", { onchange: (e) => onChange(e.target.value), "aria-label": "range" },
    ["hour", "day", "week"].map((r) => el("option", { value: r, selected: r === current }, `last ${r}`)));
}

// ---------------------------------------------------------------- sign-in

function showSignIn(message) {
  document.getElementById("sign-in").hidden = false;
  document.getElementById("page").replaceChildren();
  document.getElementById("sign-in-error").textContent = message || "";
  document.getElementById("sign-out").hidden = true;
  document.getElementById("who").textContent = "";
}

async function signInSubmitted(event) {
  event.preventDefault();
  const key = document.getElementById("key").value.trim();
  if (!key) return;
  sessionStorage.setItem(KEY_STORAGE, key);
  document.getElementById("key").value = "";
  await boot();
}

function signOut() {
  sessionStorage.removeItem(KEY_STORAGE);
  ui.scope = null;
  showSignIn("Signed out.");
}

async function boot() {
  showError(null);
  let who;
  try {
    who = await api("/v1/key", { allow401: true, accept: [401] , withStatus: true });
  } catch (error) {
    showError(error);
    return;
  }
  if (who.status === 401 || (who.body.keys_required && !who.body.scope)) {
    sessionStorage.removeItem(KEY_STORAGE);
    showSignIn(who.status === 401 ? "That key is not one of this server's." : "");
    return;
  }
  ui.scope = who.body.scope;
  ui.keysRequired = who.body.keys_required;
  document.getElementById("sign-in").hidden = true;
  document.getElementById("sign-out").hidden = !ui.keysRequired;
  document.getElementById("who").textContent = ui.keysRequired ? `${ui.scope} key` : "no keys (loopback)";
  route();
}

// ---------------------------------------------------------------- routing

const PAGES = {
  overview: overviewPage,
  model: modelPage,
  shoppers: shoppersPage,
  items: itemsPage,
  segments: segmentsPage,
  embeddings: embeddingsPage,
};

function route() {
  if (!ui.scope) return;
  const [name, ...rest] = (location.hash.replace(/^#/, "") || "overview").split("/");
  const page = PAGES[name] ? name : "overview";
  for (const link of document.querySelectorAll("#nav a")) {
    link.classList.toggle("active", link.dataset.page === page);
  }
  for (const made of ui.charts) made.destroy();
  ui.charts = [];
  showError(null);
  // Each drawing gets a view of its own: one still waiting for the API when
  // the page is drawn again (a sign-in, then the hash) fills a view that is
  // no longer shown, and neither its errors nor its end count.
  ui.render += 1;
  const render = ui.render;
  const current = () => ui.render === render;
  const view = el("div");
  const root = document.getElementById("page");
  root.replaceChildren(view);
  root.dataset.page = page;
  root.dataset.render = String(render);
  root.dataset.ready = "false";
  PAGES[page](view, decodeURIComponent(rest.join("/")))
    .catch((error) => { if (current()) showError(error); })
    .finally(() => { if (current()) root.dataset.ready = "true"; });
}

// ---------------------------------------------------------------- overview

async function overviewPage(root) {
  root.append(el("h1", {}, "Overview"));
  const [overview, model, replicas] = await Promise.all([
    api("/v1/stats/overview"), api("/v1/model"), api("/v1/replicas")]);
  const online = model.online || [];
  const newest = online[online.length - 1];
  root.append(el("div", { class: "grid" },
    tile("Active users, last hour", fmtInt(overview.active_users.hour)),
    tile("Active users, last day", fmtInt(overview.active_users.day)),
    tile("Active users, last week", fmtInt(overview.active_users.week)),
    el("div", { class: "tile" }, el("div", { class: "label" }, "Events, last hour"),
      el("div", { class: "value" }, fmtInt(overview.events_last_hour)), el("canvas", { id: "spark-events" })),
    tile("Events stored", fmtInt(overview.store.events)),
    tile("Shoppers", fmtInt(overview.store.users)),
    tile("Items", fmtInt(overview.store.items)),
    tile("Store size", fmtBytes(overview.store.bytes)),
    tile("Served model", model.version || "none"),
    tile("Click-through, newest version", newest ? fmtNum(newest.ctr, 4) : "–")));

  const eventsCard = card("Events by type", el("div", { class: "row" }), chartBox("chart-events"));
  const recsCard = card("Recommendations served and click-through, per model version",
    el("div", { class: "row" }), chartBox("chart-recs"));
  root.append(el("div", { class: "cards" }, eventsCard, recsCard));
  root.append(card("Replicas", table(
    ["replica", "healthy", "last heartbeat", { label: "age (s)", num: true }, "serves", "trainer", "training"],
    replicas.replicas.map((r) => [r.id, el("span", { class: r.healthy ? "good" : "bad" }, r.healthy ? "yes" : "no"),
      fmtDate(r.heartbeat_at), fmtNum(r.age_seconds, 1), r.version || "–", r.trainer ? "yes" : "no",
      r.training ? "yes" : "no"]))));

  const drawEvents = async (range) => {
    const stats = await api(`/v1/stats/events?range=${range}`);
    const labels = stats.t.map((t) => fmtTime(t, stats.step_seconds));
    chart(root, "chart-events", { type: "line", data: { labels,
      datasets: KINDS.map((kind, i) => lineSeries(kind, stats.counts[kind], i, { fill: true })) },
      options: { scales: { y: { stacked: true, beginAtZero: true, title: { display: true,
        text: `events per ${stats.step_seconds / 60} min` } } } } });
    return stats;
  };
  const drawRecs = async (range) => {
    const stats = await api(`/v1/stats/recommendations?range=${range}`);
    const labels = stats.t.map((t) => fmtTime(t, stats.step_seconds));
    const datasets = [];
    stats.versions.forEach((v, i) => {
      const name = v.version || "no model";
      datasets.push(lineSeries(`${name} served`, v.impressions, i, { yAxisID: "y" }));
      datasets.push(lineSeries(`${name} CTR`, v.impressions.map((n, j) => (n ? v.clicks[j] / n : null)), i,
        { yAxisID: "ctr", borderDash: [4, 3], spanGaps: true }));
    });
    chart(root, "chart-recs", { type: "line", data: { labels, datasets }, options: { scales: {
      y: { beginAtZero: true, title: { display: true, text: "answers" } },
      ctr: { position: "right", beginAtZero: true, grid: { drawOnChartArea: false },
        title: { display: true, text: "click-through" } } } } });
  };
  eventsCard.querySelector(".row").append(rangeSelect("hour", (r) => drawEvents(r).catch(showError)));
  recsCard.querySelector(".row").append(rangeSelect("day", (r) => drawRecs(r).catch(showError)));
  const hour = await drawEvents("hour");
  await drawRecs("day");
  const totals = hour.t.map((_, j) => KINDS.reduce((sum, kind) => sum + hour.counts[kind][j], 0));
  chart(root, "spark-events", { type: "line", data: { labels: hour.t, datasets: [lineSeries("events", totals, 0)] },
    options: { plugins: { legend: { display: false }, tooltip: { enabled: false } },
      scales: { x: { display: false }, y: { display: false, beginAtZero: true } } } });
}

// ---------------------------------------------------------------- model

async function modelPage(root) {
  root.append(el("h1", {}, "Model"));
  const model = await api("/v1/model");
  const index = model.index ? (model.index.kind === "exact" ? "exact" : `approximate, ${model.index.state}`) : "–";
  const warm = model.warm ? `${model.warm.state}${model.warm.users !== undefined ? `, ${fmtInt(model.warm.users)} users` : ""}` : "–";
  const result = el("span", { id: "train-result", class: "muted" });
  const train = el("button", { id: "train-now", class: "primary", type: "button", disabled: !isAdmin(),
    title: isAdmin() ? "Start a training on this replica" : "needs an admin key",
    onclick: async () => {
      train.disabled = true;
      try {
        const answer = await api("/v1/model/train", { method: "POST", accept: [409], withStatus: true });
        result.textContent = answer.status === 202 ? "202 started: follow it in the history below"
          : `${answer.status} ${answer.body.title || ""}: ${answer.body.detail || ""}`;
        result.dataset.status = String(answer.status);
      } catch (error) {
        showError(error);
      } finally {
        train.disabled = false;
      }
    } }, "Train now");
  root.append(el("div", { class: "cards" },
    card("Served model", el("dl", { class: "kv" },
      el("dt", {}, "version"), el("dd", { id: "model-version" }, model.version || "none yet"),
      el("dt", {}, "trained"), el("dd", {}, fmtDate(model.trained_at)),
      el("dt", {}, "kind"), el("dd", {}, model.kind || "–"),
      el("dt", {}, "learned from"), el("dd", {}, model.version
        ? `${fmtInt(model.events)} events, ${fmtInt(model.users)} shoppers, ${fmtInt(model.items)} items` : "–"),
      el("dt", {}, "held-out NDCG@10"), el("dd", {}, model.metrics ? fmtNum(model.metrics.model["ndcg@10"]) : "–"),
      el("dt", {}, "index"), el("dd", {}, index),
      el("dt", {}, "warming"), el("dd", {}, warm),
      el("dt", {}, "this replica"), el("dd", {}, `${model.replica.id}${model.replica.training ? " (training now)" : ""}`)),
      el("div", { class: "row", style: null }, train, result)),
    card("Held-out NDCG@10 per training", chartBox("chart-ndcg"))));
  const history = (model.history || []).slice().reverse();
  const measured = history.filter((h) => h.metrics);
  chart(root, "chart-ndcg", { type: "line", data: {
    labels: measured.map((h) => fmtDate(h.started_at).slice(5, 16)),
    datasets: [
      lineSeries("model", measured.map((h) => h.metrics.model["ndcg@10"]), 0, { pointRadius: 3 }),
      lineSeries("most popular", measured.map((h) => h.metrics.popular["ndcg@10"]), 1, { pointRadius: 3 }),
      lineSeries("item kNN", measured.map((h) => h.metrics.item_knn["ndcg@10"]), 2, { pointRadius: 3 })] },
    options: { scales: { y: { beginAtZero: true } } } });
  root.append(card("Trainings, newest first", table(
    ["started", { label: "duration", num: true }, "outcome", "reason", "version", "replica"],
    (model.history || []).map((h) => [fmtDate(h.started_at), seconds(h.started_at, h.finished_at),
      el("span", { class: h.outcome === "published" ? "good" : h.outcome === "failed" ? "bad" : null }, h.outcome),
      h.reason || "", h.version || "–", h.replica || "–"]))));
}

// ---------------------------------------------------------------- shoppers

async function shoppersPage(root, userId) {
  root.append(el("h1", {}, "Shoppers"));
  const input = el("input", { id: "user-id", placeholder: "user id", value: userId || "" });
  root.append(el("form", { class: "row", onsubmit: (e) => {
    e.preventDefault();
    location.hash = `#shoppers/${enc(input.value.trim())}`;
  } }, input, el("button", { type: "submit", class: "primary" }, "Look up")));
  if (!userId) {
    root.append(el("p", { class: "muted" }, "Type a shopper's id (the shop's own, e.g. user-1)."));
    return;
  }
  const profile = await api(`/v1/users/${enc(userId)}/profile`, { accept: [404], withStatus: true });
  if (profile.status === 404) {
    root.append(el("p", { id: "no-user" }, `No events of ${userId} are stored (never seen, or erased).`));
    return;
  }
  const p = profile.body;
  const [recs, events] = await Promise.all([
    api(`/v1/users/${enc(userId)}/recommendations?n=10&explain=true&fields=title,price,categories`),
    api(`/v1/users/${enc(userId)}/events?limit=500`)]);
  root.append(el("div", { class: "cards" },
    card(`Profile of ${p.user_id}`, el("dl", { class: "kv", id: "profile" },
      el("dt", {}, "segment"), el("dd", { id: "profile-segment" }, el("span", { class: "pill" }, p.segment)),
      el("dt", {}, "churn risk"), el("dd", { id: "profile-churn" },
        `${fmtNum(p.churn.risk)}${p.churn.method ? ` (${p.churn.method})` : ""}, ${fmtNum(p.churn.days_since_last, 1)} days since last, usual gap ${fmtNum(p.churn.usual_gap_days, 1)} days`),
      el("dt", {}, "RFM"), el("dd", {}, `R ${p.rfm.recency} · F ${p.rfm.frequency} · M ${p.rfm.monetary}`),
      el("dt", {}, "events"), el("dd", {}, `${fmtInt(p.events.total)} in ${fmtInt(p.sessions)} sessions`),
      el("dt", {}, "first / last seen"), el("dd", {}, `${fmtDate(p.first_seen)} / ${fmtDate(p.last_seen)}`),
      el("dt", {}, "purchases"), el("dd", {}, `${fmtInt(p.purchases.count)}, spend ${fmtNum(p.purchases.spend, 2)}`),
      el("dt", {}, "ratings"), el("dd", {}, p.ratings && p.ratings.count
        ? `${fmtNum(p.ratings.mean, 2)} over ${p.ratings.count} (shop ${fmtNum(p.ratings.shop_mean, 2)})` : "none"),
      el("dt", {}, "favourite categories"), el("dd", {},
        p.favourite_categories.map((c) => `${c.category} ${fmtNum(c.weight, 2)}`).join(", ") || "–"))),
    card("Events per day", chartBox("chart-timeline"))));

  root.append(card(`Recommendations now (${recs.strategy}, model ${recs.model_version || "none"})`,
    table(["#", "item", "title", "categories", { label: "price", num: true }, "reason", { label: "score", num: true }],
      recs.items.map((item, i) => [i + 1, el("a", { href: `#items/${enc(item.item_id)}` }, item.item_id),
        item.title || "–", (item.categories || []).join(", "), item.price === undefined || item.price === null ? "–" : fmtNum(item.price, 2),
        reasonText(item.reason), fmtNum(item.score, 3)]))));
  root.lastChild.querySelector("table").id = "recommendations";

  const byDay = new Map();
  for (const e of events.events) {
    const day = String(e.timestamp).slice(0, 10);
    if (!byDay.has(day)) byDay.set(day, Object.fromEntries(KINDS.map((k) => [k, 0])));
    byDay.get(day)[e.type] += 1;
  }
  const days = [...byDay.keys()].sort();
  chart(root, "chart-timeline", { type: "bar", data: { labels: days,
    datasets: KINDS.map((kind, i) => ({ label: kind, data: days.map((d) => byDay.get(d)[kind]),
      backgroundColor: PALETTE[i] })) },
    options: { scales: { x: { stacked: true }, y: { stacked: true, beginAtZero: true } } } });
  root.append(card("Newest events", table(["when", "type", "item", "value", "session"],
    events.events.slice(0, 50).map((e) => [fmtDate(e.timestamp), e.type,
      el("a", { href: `#items/${enc(e.item_id)}` }, e.item_id), e.value ?? "–", e.session_id ?? "–"]))));

  if (isAdmin()) {
    const status = el("span", { id: "erase-result" });
    const confirmRow = el("div", { class: "row", hidden: true },
      el("span", {}, `Erase every event and the profile of ${userId}? This cannot be undone.`),
      el("button", { id: "erase-confirm", class: "danger", type: "button", onclick: async () => {
        try {
          await api(`/v1/users/${enc(userId)}`, { method: "DELETE" });
          status.textContent = `${userId} was erased.`;
          confirmRow.hidden = true;
        } catch (error) {
          showError(error);
        }
      } }, "Yes, erase"),
      el("button", { type: "button", onclick: () => { confirmRow.hidden = true; } }, "Cancel"));
    root.append(card("Right to erasure", el("div", { class: "row" },
      el("button", { id: "erase", class: "danger", type: "button", onclick: () => { confirmRow.hidden = false; } },
        "Erase this shopper…"), status), confirmRow));
  }
}

function reasonText(reason) {
  if (!reason) return "–";
  if (reason.kind === "similar_to") return `similar to ${reason.item_id}`;
  return reason.kind;
}

// ---------------------------------------------------------------- items

async function itemsPage(root, itemId) {
  root.append(el("h1", {}, "Items"));
  const q = el("input", { id: "item-q", placeholder: "id or title" });
  const category = el("input", { id: "item-category", placeholder: "category" });
  const results = el("div", { id: "item-results" });
  let cursor = null;
  const search = async (more) => {
    const params = new URLSearchParams({ limit: "20" });
    if (q.value.trim()) params.set("q", q.value.trim());
    if (category.value.trim()) params.set("category", category.value.trim());
    if (more && cursor) params.set("cursor", cursor);
    const found = await api(`/v1/items?${params}`);
    cursor = found.next_cursor;
    const rows = found.items.map((item) => [el("a", { href: `#items/${enc(item.item_id)}` }, item.item_id),
      item.title || "–", (item.categories || []).join(", "), item.price ?? "–", item.available ? "yes" : "no"]);
    const tableNode = table(["item", "title", "categories", { label: "price", num: true }, "available"], rows);
    if (!more) results.replaceChildren(tableNode);
    else results.append(tableNode);
    if (cursor) results.append(el("button", { type: "button", onclick: (e) => { e.target.remove(); search(true).catch(showError); } }, "More"));
  };
  root.append(el("form", { class: "row", onsubmit: (e) => { e.preventDefault(); search(false).catch(showError); } },
    q, category, el("button", { type: "submit", class: "primary" }, "Search")));
  if (!itemId) {
    root.append(card("Catalogue", results));
    await search(false);
    return;
  }
  const item = await api(`/v1/items/${enc(itemId)}`, { accept: [404], withStatus: true });
  if (item.status === 404) {
    root.append(el("p", {}, `No item ${itemId}.`), card("Catalogue", results));
    await search(false);
    return;
  }
  const it = item.body;
  const [similar, activity, stats] = await Promise.all([
    api(`/v1/items/${enc(itemId)}/similar?n=10&fields=title,categories`),
    api(`/v1/items/${enc(itemId)}/activity?days=30`),
    api(`/v1/items/${enc(itemId)}/stats`)]);
  root.append(el("div", { class: "cards" },
    card(`Item ${it.item_id}`, el("dl", { class: "kv", id: "item" },
      el("dt", {}, "title"), el("dd", {}, it.title || "–"),
      el("dt", {}, "categories"), el("dd", {}, (it.categories || []).join(", ") || "–"),
      el("dt", {}, "suggested categories"), el("dd", {}, (it.suggested_categories || [])
        .map((s) => `${s.category} (${fmtNum(s.confidence, 2)})`).join(", ") || "–"),
      el("dt", {}, "price"), el("dd", {}, it.price ?? "–"),
      el("dt", {}, "available"), el("dd", {}, it.available ? "yes" : "no"),
      el("dt", {}, "ratings"), el("dd", {}, stats.ratings && stats.ratings.count
        ? `${fmtNum(stats.ratings.mean, 2)} over ${stats.ratings.count}` : "none"))),
    card("Interactions per day, last 30 days", chartBox("chart-activity"))));
  chart(root, "chart-activity", { type: "bar", data: { labels: activity.t.map((t) => fmtTime(t, activity.step_seconds)),
    datasets: KINDS.map((kind, i) => ({ label: kind, data: activity.counts[kind], backgroundColor: PALETTE[i] })) },
    options: { scales: { x: { stacked: true }, y: { stacked: true, beginAtZero: true } } } });
  root.append(card("Similar items", table(["item", "title", "categories", { label: "score", num: true }],
    similar.items.map((s) => [el("a", { href: `#items/${enc(s.item_id)}` }, s.item_id), s.title || "–",
      (s.categories || []).join(", "), fmtNum(s.score, 3)]))));
  root.lastChild.querySelector("table").id = "similar";
  root.append(card("Catalogue", results));
  await search(false);
}

// ---------------------------------------------------------------- segments

async function segmentsPage(root, name) {
  root.append(el("h1", {}, "Segments"));
  const segments = await api("/v1/segments");
  root.append(el("p", { class: "muted" }, `As of ${fmtDate(segments.as_of)}, computed ${fmtDate(segments.computed_at)}.`));
  root.append(el("div", { class: "cards" },
    card("Shoppers per segment", chartBox("chart-segments")),
    card("Churn risk of the shoppers", chartBox("chart-churn"))));
  chart(root, "chart-segments", { type: "bar", data: { labels: segments.segments.map((s) => s.name),
    datasets: [{ label: "shoppers", data: segments.segments.map((s) => s.size),
      backgroundColor: segments.segments.map((_, i) => PALETTE[i]) }] },
    options: { plugins: { legend: { display: false } }, scales: { y: { beginAtZero: true } } } });
  const histogram = segments.churn_risk_histogram || [];
  chart(root, "chart-churn", { type: "bar", data: {
    labels: histogram.map((b) => `${b.from.toFixed(1)}–${b.to.toFixed(1)}`),
    datasets: [{ label: "shoppers", data: histogram.map((b) => b.users), backgroundColor: PALETTE[3] }] },
    options: { plugins: { legend: { display: false } }, scales: { y: { beginAtZero: true },
      x: { title: { display: true, text: "churn risk" } } } } });
  root.append(card("Rules", table(["segment", { label: "shoppers", num: true }, { label: "share", num: true }, "rule"],
    segments.segments.map((s) => [isAdmin() ? el("a", { href: `#segments/${enc(s.name)}` }, s.name) : s.name,
      fmtInt(s.size), fmtNum(s.share, 4), s.rule]))));
  if (!isAdmin()) {
    root.append(el("p", { class: "muted" }, "An admin key also lists each segment's shoppers."));
    return;
  }
  const chosen = name || segments.segments.find((s) => s.size > 0)?.name || segments.segments[0].name;
  const list = el("div", { id: "segment-users" });
  let cursor = null;
  const more = async () => {
    const params = new URLSearchParams({ limit: "50" });
    if (cursor) params.set("cursor", cursor);
    const page = await api(`/v1/segments/${enc(chosen)}/users?${params}`);
    cursor = page.next_cursor;
    list.append(table(["shopper", { label: "churn risk", num: true }, "last seen"],
      page.users.map((u) => [el("a", { href: `#shoppers/${enc(u.user_id)}` }, u.user_id), fmtNum(u.churn_risk), fmtDate(u.last_seen)])));
    if (cursor) list.append(el("button", { type: "button", onclick: (e) => { e.target.remove(); more().catch(showError); } }, "More"));
  };
  const exportCsv = async () => {
    const headers = {};
    if (storedKey()) headers.Authorization = `Bearer ${storedKey()}`;
    const response = await fetch(`/v1/segments/${enc(chosen)}/users.csv`, { headers });
    if (!response.ok) throw new ApiError(response.status, null);
    const url = URL.createObjectURL(await response.blob());
    const link = el("a", { href: url, download: `segment-${chosen}.csv` });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  };
  root.append(card(`Shoppers in ${chosen}`, el("div", { class: "row" },
    el("button", { id: "export-csv", type: "button", onclick: () => exportCsv().catch(showError) }, "Export CSV")), list));
  await more();
}

// ---------------------------------------------------------------- embeddings

async function embeddingsPage(root) {
  root.append(el("h1", {}, "Item embeddings"));
  const map = await api("/v1/model/embeddings?limit=2000");
  if (!map.version || !map.points.length) {
    root.append(el("p", {}, "No network model is served yet: the map appears after the first training."));
    return;
  }
  root.append(el("p", { class: "muted" }, `The ${fmtInt(map.points.length)} most popular items of model ${map.version}, `
    + "its item embeddings projected to two dimensions (principal components) when it was trained. Items close "
    + "together are ones the model treats alike."));
  const byCategory = new Map();
  for (const p of map.points) {
    const key = p.category || "(none)";
    if (!byCategory.has(key)) byCategory.set(key, []);
    byCategory.get(key).push({ x: p.x, y: p.y, item: p });
  }
  const datasets = [...byCategory.entries()].sort((a, b) => b[1].length - a[1].length)
    .map(([category, data], i) => ({ label: category, data, backgroundColor: PALETTE[i % PALETTE.length],
      pointRadius: 3, pointHoverRadius: 6 }));
  root.append(card("Map, coloured by category", chartBox("chart-embeddings", true)));
  chart(root, "chart-embeddings", { type: "scatter", data: { datasets }, options: {
    plugins: { tooltip: { callbacks: { label: (ctx) => {
      const item = ctx.raw.item;
      return `${item.item_id}${item.title ? ` — ${item.title}` : ""} (${item.category || "no category"})`;
    } } } },
    onClick: (_, elements) => {
      if (!elements.length) return;
      const { datasetIndex, index } = elements[0];
      location.hash = `#items/${enc(datasets[datasetIndex].data[index].item.item_id)}`;
    } } });
}

// ---------------------------------------------------------------- start

window.addEventListener("hashchange", route);
document.getElementById("sign-in").addEventListener("submit", (e) => signInSubmitted(e).catch(showError));
document.getElementById("sign-out").addEventListener("click", signOut);
boot();
