//! Serving: recommendations that follow a user's newest events with no
//! retrain, filters and cold start, the retrainer's gate, snapshots that
//! survive a restart and swap under load, click-through counting, erasure.

use std::collections::HashSet;
use std::time::Duration;

use recd::config::Settings;
use recd::demo::{generate, DemoSize};
use serde_json::{json, Value};

use crate::helpers::{spawn_app_with, start, test_settings, Db, TestApp};

/// A training that takes seconds, and replicas that look often.
pub fn fast(settings: &mut Settings) {
    settings.train.dim = 16;
    settings.train.hidden = 16;
    settings.train.max_epochs = 4;
    settings.train.patience = 2;
    settings.train.validation_cases = 300;
    settings.train.neighbours = 20;
    settings.snapshot_poll = Duration::from_millis(200);
    settings.gate_min_cases = 10;
}

/// A small generated shop (items in categories, users who walk them in
/// order), sent through the API.
pub async fn seed_shop(app: &TestApp, users: usize) -> recd::demo::DemoShop {
    let shop = generate(
        DemoSize {
            items: 60,
            users,
            sessions: 3,
            seed: 11,
        },
        chrono::Utc::now().timestamp_millis() - 60_000,
    );
    send_shop(app, &shop).await;
    shop
}

/// Sends a generated shop's items and events through the API, and brings
/// the background figures up to date.
pub async fn send_shop(app: &TestApp, shop: &recd::demo::DemoShop) {
    let items: Vec<Value> = shop
        .items
        .iter()
        .map(|i| json!({"item_id": i.item_id, "title": i.title, "categories": i.categories, "price": i.price, "available": i.available}))
        .collect();
    assert_eq!(app.post("/v1/items", &json!({"items": items})).await.status(), 200);
    let events: Vec<Value> = shop
        .events
        .iter()
        .map(|e| {
            json!({"event_id": e.event_id, "user_id": e.user_id, "item_id": e.item_id, "type": e.kind.name(),
                   "value": e.value, "session_id": e.session_id,
                   "timestamp": recd::clock::format_timestamp(e.ts)})
        })
        .collect();
    for chunk in events.chunks(1000) {
        let reply: Value = app
            .post("/v1/events", &json!({"events": chunk}))
            .await
            .json()
            .await
            .unwrap();
        assert!(reply["rejected"].as_array().unwrap().is_empty(), "{reply}");
    }
    app.refresh_figures().await;
}

/// Starts a training and waits for its end; returns `GET /v1/model`.
pub async fn train_now(app: &TestApp) -> Value {
    let before = model(app).await["history"].as_array().map_or(0, Vec::len);
    let reply = app.post("/v1/model/train", &json!({})).await;
    assert_eq!(reply.status(), 202);
    assert_eq!(reply.json::<Value>().await.unwrap(), json!({"status": "started"}));
    wait_training(app, before).await
}

/// Waits until more than `before` trainings are recorded and none runs.
pub async fn wait_training(app: &TestApp, before: usize) -> Value {
    for _ in 0..1200 {
        let body = model(app).await;
        let runs = body["history"].as_array().map_or(0, Vec::len);
        if runs > before && body["last_training"]["outcome"] != "running" {
            return body;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the training did not end within 120 s");
}

pub async fn model(app: &TestApp) -> Value {
    let reply = app.get("/v1/model").await;
    assert_eq!(reply.status(), 200);
    reply.json().await.unwrap()
}

pub async fn recommend(app: &TestApp, user: &str, query: &str) -> Value {
    let reply = app.get(&format!("/v1/users/{user}/recommendations?{query}")).await;
    assert_eq!(reply.status(), 200, "{user}?{query}");
    reply.json().await.unwrap()
}

pub fn ids(reply: &Value) -> Vec<String> {
    reply["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["item_id"].as_str().unwrap().to_owned())
        .collect()
}

/// A counter's value on `/metrics` (0 when it was never counted). The
/// recorder is one per test process: tests running beside this one may add
/// to it, never take away.
pub async fn counter(app: &TestApp, series: &str) -> f64 {
    let text = app.get("/metrics").await.text().await.unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

async fn published(app: &TestApp) -> String {
    let body = train_now(app).await;
    assert_eq!(body["last_training"]["outcome"], "published", "{body}");
    let version = body["version"].as_str().expect("a version").to_owned();
    assert_eq!(body["last_training"]["version"], version.as_str());
    version
}

/// Stops `app` and starts another server on the same store, with the
/// test's default settings changed by `adjust`.
async fn restart_with(app: TestApp, adjust: impl FnOnce(&mut Settings)) -> TestApp {
    let url = app.database_url.clone();
    let dir = app.stop_keeping_files().await;
    let mut settings = test_settings(&url);
    adjust(&mut settings);
    start(settings, dir).await
}

async fn view(app: &TestApp, user: &str, item: &str) {
    let reply: Value = app
        .post(
            "/v1/events",
            &json!({"events": [{"user_id": user, "item_id": item, "type": "view"}]}),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(reply["accepted"], 1, "{reply}");
}

async fn a_new_event_changes_the_next_answer(app: TestApp) {
    let shop = seed_shop(&app, 300).await;
    let version = published(&app).await;
    let model = model(&app).await;
    assert!(model["metrics"]["model"]["ndcg@10"].is_number(), "{model}");

    let before = recommend(&app, "user-1", "n=10").await;
    assert_eq!(before["strategy"], "personalized");
    assert_eq!(before["model_version"], version.as_str());
    assert_eq!(before["user_id"], "user-1");
    assert!(before["recommendation_id"].as_str().is_some_and(|s| !s.is_empty()));
    let first = ids(&before);
    assert_eq!(first.len(), 10);
    let seen: HashSet<&str> = shop
        .events
        .iter()
        .filter(|e| e.user_id == "user-1")
        .map(|e| e.item_id.as_str())
        .collect();
    assert!(
        first.iter().all(|i| !seen.contains(i.as_str())),
        "seen items are excluded by default"
    );

    // A view of an item from a category the list does not show.
    let categories = |id: &str| -> Vec<String> {
        shop.items
            .iter()
            .find(|i| i.item_id == id)
            .map(|i| i.categories.clone())
            .unwrap_or_default()
    };
    let shown: HashSet<String> = first.iter().flat_map(|i| categories(i)).collect();
    let other = shop
        .items
        .iter()
        .find(|i| i.available && !seen.contains(i.item_id.as_str()) && !shown.contains(&i.categories[0]))
        .expect("an item of another category");
    view(&app, "user-1", &other.item_id).await;
    let after = recommend(&app, "user-1", "n=10").await;
    assert_eq!(after["model_version"], version.as_str(), "no retrain happened");
    let second = ids(&after);
    assert!(!second.contains(&other.item_id));
    let stripped: Vec<&String> = first.iter().filter(|i| **i != other.item_id).collect();
    assert_ne!(
        second.iter().collect::<Vec<_>>(),
        stripped,
        "the list is re-ranked by the new event, not only stripped of it"
    );
    assert!(
        second.iter().any(|i| categories(i).contains(&other.categories[0])),
        "the new event's category appears: {second:?}"
    );

    // A shopper who just arrived is personalized by their first known item.
    let cold = recommend(&app, "newcomer", "n=5").await;
    assert_eq!(cold["strategy"], "popular");
    view(&app, "newcomer", &other.item_id).await;
    let warm = recommend(&app, "newcomer", "n=5&explain=true").await;
    assert_eq!(warm["strategy"], "personalized");
    for item in warm["items"].as_array().unwrap() {
        let kind = item["reason"]["kind"].as_str().unwrap();
        assert!(kind == "sequence" || kind == "similar_to", "{item}");
        if kind == "similar_to" {
            assert_eq!(item["reason"]["item_id"], other.item_id.as_str());
        }
    }
}

async fn cold_start_and_filters_hold(app: TestApp) {
    // No events, no model: popular, empty, never an error.
    let empty = recommend(&app, "anyone", "").await;
    assert_eq!(empty["strategy"], "popular");
    assert_eq!(empty["model_version"], Value::Null);
    assert_eq!(empty["items"], json!([]));

    let shop = seed_shop(&app, 200).await;
    let popular: Value = app.get("/v1/popular?n=5").await.json().await.unwrap();
    let top = ids(&popular);
    assert_eq!(top.len(), 5);
    let unknown = recommend(&app, "stranger", "n=5&explain=true").await;
    assert_eq!(unknown["strategy"], "popular");
    assert_eq!(ids(&unknown), top, "an unknown user gets the popular items");
    assert_eq!(unknown["items"][0]["reason"]["kind"], "popular");

    // The most popular item made unavailable, the second deleted: gone.
    let mut item: Value = app.get(&format!("/v1/items/{}", top[0])).await.json().await.unwrap();
    item["available"] = json!(false);
    assert_eq!(app.put(&format!("/v1/items/{}", top[0]), &item).await.status(), 200);
    assert_eq!(app.delete(&format!("/v1/items/{}", top[1])).await.status(), 204);
    let popular: Value = app.get("/v1/popular?n=5").await.json().await.unwrap();
    let now = ids(&popular);
    assert!(!now.contains(&top[0]) && !now.contains(&top[1]), "{now:?}");
    assert_eq!(now[..3], top[2..5]);

    // By category, for strangers and known users, before and after training.
    let in_category = |list: &[String], category: &str| {
        list.iter().all(|id| {
            shop.items
                .iter()
                .any(|i| &i.item_id == id && i.categories.iter().any(|c| c == category))
        })
    };
    let shoes = recommend(&app, "stranger", "n=5&category=shoes&explain=true").await;
    assert!(!ids(&shoes).is_empty() && in_category(&ids(&shoes), "shoes"), "{shoes}");
    assert_eq!(shoes["items"][0]["reason"]["kind"], "category");
    let version = published(&app).await;
    for user in ["user-3", "user-4", "stranger"] {
        let reply = recommend(&app, user, "n=8&category=books").await;
        // What may be shown: books, available, not deleted, not seen.
        let allowed: HashSet<&str> = shop
            .items
            .iter()
            .filter(|i| i.categories.iter().any(|c| c == "books") && i.available && !top[..2].contains(&i.item_id))
            .filter(|i| !shop.events.iter().any(|e| e.user_id == user && e.item_id == i.item_id))
            .map(|i| i.item_id.as_str())
            .collect();
        let shown = ids(&reply);
        assert!(shown.iter().all(|i| allowed.contains(i.as_str())), "{user}: {reply}");
        assert_eq!(shown.len(), allowed.len().min(8), "{user}: {reply} of {allowed:?}");
    }

    // Exclusions: seen (default), purchased, none, and listed items.
    let user = "user-5";
    let events: Vec<_> = shop.events.iter().filter(|e| e.user_id == user).collect();
    let seen: HashSet<&str> = events.iter().map(|e| e.item_id.as_str()).collect();
    let purchased: HashSet<&str> = events
        .iter()
        .filter(|e| e.kind == recd::domain::EventType::Purchase)
        .map(|e| e.item_id.as_str())
        .collect();
    let all = recommend(&app, user, "n=50&exclude=none").await;
    assert_eq!(all["model_version"], version.as_str());
    assert!(
        ids(&all).iter().any(|i| seen.contains(i.as_str())),
        "exclude=none may show seen items"
    );
    let unseen = recommend(&app, user, "n=50").await;
    assert!(ids(&unseen).iter().all(|i| !seen.contains(i.as_str())));
    let unbought = recommend(&app, user, "n=50&exclude=purchased").await;
    assert!(ids(&unbought).iter().all(|i| !purchased.contains(i.as_str())));
    let listed = ids(&unseen)[..2].join(",");
    let without = recommend(&app, user, &format!("n=50&exclude_items={listed}")).await;
    for id in listed.split(',') {
        assert!(!ids(&without).iter().any(|i| i == id));
    }

    // Similar items: known item, unknown item, category.
    let similar: Value = app
        .get(&format!("/v1/items/{}/similar?n=5", top[2]))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(similar["model_version"], version.as_str());
    let like = ids(&similar);
    assert_eq!(like.len(), 5);
    assert!(!like.contains(&top[2]) && !like.contains(&top[0]) && !like.contains(&top[1]));
    crate::helpers::problem(app.get("/v1/items/no-such-item/similar").await, 404).await;

    // Bad parameters name their field.
    for (query, field) in [
        ("n=0", "n"),
        ("n=101", "n"),
        ("n=ten", "n"),
        ("exclude=everything", "exclude"),
        ("explain=maybe", "explain"),
    ] {
        let body = crate::helpers::problem(app.get(&format!("/v1/users/u/recommendations?{query}")).await, 422).await;
        assert_eq!(body["errors"][0]["field"], field, "{query}: {body}");
    }
    let body = crate::helpers::problem(app.get("/v1/popular?window=fortnight").await, 422).await;
    assert_eq!(body["errors"][0]["field"], "window");
}

async fn clicks_are_counted_per_version(app: TestApp) {
    seed_shop(&app, 200).await;
    let version = published(&app).await;
    let reply = recommend(&app, "user-2", "n=5").await;
    let rec = reply["recommendation_id"].as_str().unwrap().to_owned();
    let shown = ids(&reply);
    recommend(&app, "user-3", "n=5").await;
    // One event names a shown item (a click); one names another item (none).
    let events = json!({"events": [
        {"user_id": "user-2", "item_id": shown[1], "type": "click", "recommendation_id": rec},
        {"user_id": "user-2", "item_id": "item-59", "type": "view", "recommendation_id": rec},
    ]});
    assert_eq!(app.post("/v1/events", &events).await.status(), 200);
    let model = model(&app).await;
    let online = model["online"].as_array().unwrap();
    let mine = online
        .iter()
        .find(|o| o["version"] == version.as_str())
        .unwrap_or_else(|| panic!("{model}"));
    assert_eq!(mine["impressions"], 2, "{model}");
    assert_eq!(mine["clicks"], 1, "{model}");
    assert_eq!(mine["ctr"], 0.5);
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains(&format!("recd_online_clicks{{version=\"{version}\"}} 1")),
        "{metrics}"
    );
    // Past the retention window impressions go, and their clicks with them.
    let now = chrono::Utc::now().timestamp_millis();
    assert_eq!(app.store.forget_impressions(now - 3_600_000).await.unwrap(), 0);
    assert_eq!(app.store.forget_impressions(now + 1).await.unwrap(), 2);
    let after = self::model(&app).await;
    assert_eq!(after["online"], json!([]), "{after}");
}

async fn erasure_reaches_recommendations(app: TestApp) {
    seed_shop(&app, 200).await;
    published(&app).await;
    assert_eq!(recommend(&app, "user-7", "").await["strategy"], "personalized");
    assert_eq!(app.get("/v1/users/user-7/profile").await.status(), 200);
    let reply: Value = app.delete("/v1/users/user-7").await.json().await.unwrap();
    assert!(reply["deleted_events"].as_u64().unwrap() > 0);
    let after = recommend(&app, "user-7", "").await;
    assert_eq!(
        after["strategy"], "popular",
        "nothing of the user is left to personalize with"
    );
}

mod warming {
    //! After a model is served, the recently active users' states are made
    //! ahead of their requests; answers from them are those made from the
    //! events at request time.

    use super::*;

    /// Fast training, and histories longer than the model reads.
    fn short(s: &mut Settings) {
        fast(s);
        s.train.max_len = 4;
    }

    /// Waits until the users' states for `version` are warmed; returns the
    /// warming's figures.
    async fn warmed(app: &TestApp, version: &str) -> Value {
        let mut warm = Value::Null;
        for _ in 0..400 {
            warm = model(app).await["warm"].clone();
            if warm["state"] == "done" && warm["version"] == version {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(warm["state"], "done", "{warm}");
        assert_eq!(warm["version"], version, "{warm}");
        warm
    }

    async fn answers(app: &TestApp, version: &str) -> Vec<Value> {
        let mut out = Vec::new();
        for user in (0..40).map(|u| format!("user-{u}")) {
            for query in ["n=10", "n=5&exclude=none&explain=true"] {
                let reply = recommend(app, &user, query).await;
                assert_eq!(reply["model_version"], version, "{user}?{query}: {reply}");
                out.push(json!([user, query, reply["strategy"], reply["items"]]));
            }
        }
        out
    }

    async fn warmed_states_answer_as_fresh_ones(app: TestApp) {
        let shop = seed_shop(&app, 150).await;
        let version = published(&app).await;
        let warm = warmed(&app, &version).await;
        let users: HashSet<&str> = shop.events.iter().map(|e| e.user_id.as_str()).collect();
        assert_eq!(warm["users"], users.len(), "every user's items are known: {warm}");
        let warmed = answers(&app, &version).await;
        let personalized = warmed.iter().filter(|a| a[2] == "personalized").count();
        assert_eq!(personalized, warmed.len());

        // The same store and snapshot served without warming: every state
        // is made from the events at request time.
        let app = restart_with(app, |s| {
            short(s);
            s.warm_users = 0;
        })
        .await;
        assert_eq!(model(&app).await["warm"]["state"], "off");
        let fresh = answers(&app, &version).await;
        for (w, f) in warmed.iter().zip(&fresh) {
            assert_eq!(w, f, "from a warmed state, then from the events");
        }
    }

    crate::both_stores!(with super::short; warmed_states_answer_as_fresh_ones);

    /// A cached state advanced by a user's new events, one step each,
    /// answers as the state made from all the events does.
    async fn advanced_states_answer_as_fresh_ones(app: TestApp) {
        let shop = seed_shop(&app, 150).await;
        let version = published(&app).await;
        // The warming reads events and makes states in the background: done
        // first, so that it does not make states from the new events itself.
        warmed(&app, &version).await;
        let users: Vec<String> = (0..40).map(|u| format!("user-{u}")).collect();
        for user in &users {
            recommend(&app, user, "n=10").await;
        }
        let advanced_before = counter(&app, r#"recd_user_states_total{from="advanced"}"#).await;
        // One or two new views each, of items the user has not seen.
        for (u, user) in users.iter().enumerate() {
            let seen: HashSet<&str> = shop
                .events
                .iter()
                .filter(|e| e.user_id == *user)
                .map(|e| e.item_id.as_str())
                .collect();
            let unseen: Vec<&str> = shop
                .items
                .iter()
                .map(|i| i.item_id.as_str())
                .filter(|i| !seen.contains(i))
                .skip(u)
                .take(1 + u % 2)
                .collect();
            for item in unseen {
                view(&app, user, item).await;
            }
        }
        let advanced = answers(&app, &version).await;
        // Every one of the 40 states was advanced, not made anew.
        let advanced_after = counter(&app, r#"recd_user_states_total{from="advanced"}"#).await;
        assert!(
            advanced_after - advanced_before >= users.len() as f64,
            "states advanced: {advanced_before} -> {advanced_after}"
        );

        let app = restart_with(app, |s| {
            fast(s);
            s.warm_users = 0;
        })
        .await;
        let fresh = answers(&app, &version).await;
        for (a, f) in advanced.iter().zip(&fresh) {
            assert_eq!(
                a, f,
                "from a state advanced by the new events, then from all the events"
            );
        }
    }

    mod longer {
        crate::both_stores!(with crate::serving::fast; advanced_states_answer_as_fresh_ones);

        use super::advanced_states_answer_as_fresh_ones;
    }
}

/// A scheduled (or plain on-demand) training continues from the served
/// model: it publishes through the same gate, learns items new since, and
/// says where it started; `from=scratch` starts anew.
async fn a_continued_training_learns_new_items(app: TestApp) {
    seed_shop(&app, 200).await;
    let first = published(&app).await;
    let body = model(&app).await;
    assert!(
        body["last_training"]["reason"]
            .as_str()
            .unwrap()
            .starts_with("from scratch"),
        "{body}"
    );
    let items = body["items"].as_u64().unwrap();

    // 30 shoppers go on from the shop's items to two new ones.
    let mut events = Vec::new();
    for u in 0..30 {
        for (i, item) in ["item-1", "item-2", "new-1", "new-2"].iter().enumerate() {
            events.push(
                json!({"event_id": format!("n-{u}-{i}"), "user_id": format!("fresh-{u}"),
                               "item_id": item, "type": "view"}),
            );
        }
    }
    let reply = app.post("/v1/events", &json!({ "events": events })).await;
    assert_eq!(reply.status(), 200);
    let body = train_now(&app).await;
    assert_eq!(body["last_training"]["outcome"], "published", "{body}");
    let reason = body["last_training"]["reason"].as_str().unwrap();
    assert!(reason.starts_with(&format!("continued from {first}")), "{reason}");
    assert_eq!(body["items"].as_u64().unwrap(), items + 2, "the new items have rows");
    // A shopper who only saw a new item is placed by the model.
    view(&app, "newcomer", "new-1").await;
    let reply = recommend(&app, "newcomer", "n=5").await;
    assert_eq!(reply["strategy"], "personalized", "{reply}");
    assert_eq!(reply["model_version"], body["version"]);

    let bad = app.post("/v1/model/train?from=yesterday", &json!({})).await;
    let problem = crate::helpers::problem(bad, 422).await;
    assert!(problem.to_string().contains("from"), "{problem}");
    let before = model(&app).await["history"].as_array().map_or(0, Vec::len);
    let reply = app.post("/v1/model/train?from=scratch", &json!({})).await;
    assert_eq!(reply.status(), 202);
    let body = wait_training(&app, before).await;
    let reason = body["last_training"]["reason"].as_str().unwrap_or_default();
    assert!(reason.starts_with("from scratch"), "{body}");
}

/// During a rolling upgrade a newer recd may publish a snapshot of a newer
/// format: this build passes it over and keeps serving the model it reads,
/// also when it restarts, and serves the next snapshot of its own format.
async fn a_newer_snapshot_format_is_passed_over(app: TestApp) {
    use recd::model::snapshot::FORMAT_VERSION;
    use recd::model::ModelSnapshot;
    seed_shop(&app, 200).await;
    let version = published(&app).await;
    let (_, bytes) = app.store.latest_snapshot().await.unwrap().expect("a snapshot");
    let mut snapshot = ModelSnapshot::from_bytes(&bytes).unwrap();
    let store = app.store.clone();
    let save = |version: String, bytes: Vec<u8>, at: i64| {
        let store = store.clone();
        async move {
            let row = recd::store::SnapshotRow {
                version: &version,
                created_at_ms: at,
                meta: "{}",
                bytes: &bytes,
                index: None,
            };
            store.save_snapshot(&row, 5).await.unwrap();
        }
    };
    let later = recd::clock::now_ms() + 60_000;
    snapshot.meta.version = format!("{version}-newer");
    save(
        snapshot.meta.version.clone(),
        snapshot.to_bytes_as(FORMAT_VERSION + 1).unwrap(),
        later,
    )
    .await;
    app.app.load_latest().await.expect("a newer format is no error");
    assert_eq!(model(&app).await["version"], version.as_str());
    assert_eq!(recommend(&app, "user-3", "").await["model_version"], version.as_str());

    let app = restart_with(app, fast).await;
    assert_eq!(
        model(&app).await["version"],
        version.as_str(),
        "the newest readable one at start"
    );

    snapshot.meta.version = format!("{version}-same-format");
    save(snapshot.meta.version.clone(), snapshot.to_bytes().unwrap(), later + 1).await;
    app.app.load_latest().await.unwrap();
    assert_eq!(model(&app).await["version"], snapshot.meta.version.as_str());
}

/// The catalogue entry of each listed item, as `GET /v1/items/{id}` gives it.
async fn catalogue_entries(app: &TestApp, reply: &Value) -> Vec<Value> {
    let mut entries = Vec::new();
    for id in ids(reply) {
        let response = app.get(&format!("/v1/items/{id}")).await;
        assert_eq!(response.status(), 200, "{id}");
        entries.push(response.json().await.unwrap());
    }
    entries
}

/// `fields=` adds exactly the fields asked for to each item, as the
/// catalogue holds them now, on every list; without it, items carry none.
async fn answers_carry_catalogue_fields(app: TestApp) {
    seed_shop(&app, 60).await;
    let version = published(&app).await;
    let listed: Value = app.get("/v1/popular?n=3").await.json().await.unwrap();
    let first = ids(&listed)[0].clone();
    // One item with attributes and a new title: answers show the change at once.
    let mut item: Value = app.get(&format!("/v1/items/{first}")).await.json().await.unwrap();
    item["title"] = json!("Renamed");
    item["attributes"] = json!({"brand": "Acme", "size": 42});
    assert_eq!(app.put(&format!("/v1/items/{first}"), &item).await.status(), 200);

    let all = ["title", "price", "categories", "attributes"];
    let user = "user-0";
    let personal = recommend(&app, user, "n=5&fields=title,price,categories,attributes").await;
    assert_eq!(personal["strategy"], "personalized", "{personal}");
    assert_eq!(personal["model_version"], version.as_str());
    let similar: Value = app
        .get(&format!(
            "/v1/items/{first}/similar?n=5&fields=title,price,categories,attributes"
        ))
        .await
        .json()
        .await
        .unwrap();
    let popular: Value = app
        .get("/v1/popular?n=5&fields=attributes,title,categories,price")
        .await
        .json()
        .await
        .unwrap();
    assert!(ids(&popular).contains(&first), "{popular}");
    for reply in [&personal, &similar, &popular] {
        assert!(!ids(reply).is_empty(), "{reply}");
        let entries = catalogue_entries(&app, reply).await;
        for (got, entry) in reply["items"].as_array().unwrap().iter().zip(&entries) {
            for field in all {
                assert_eq!(got[field], entry[field], "{field} of {got}");
            }
        }
    }
    let shown = popular["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["item_id"] == first.as_str())
        .unwrap();
    assert_eq!(shown["title"], "Renamed");
    assert_eq!(shown["attributes"], json!({"brand": "Acme", "size": 42}));

    // Only what is asked for; nothing without `fields`.
    let some = recommend(&app, user, "n=5&fields=price").await;
    let bare = recommend(&app, user, "n=5").await;
    for (reply, wanted) in [(&some, &["price"][..]), (&bare, &[][..])] {
        for got in reply["items"].as_array().unwrap() {
            for field in all {
                assert_eq!(got.get(field).is_some(), wanted.contains(&field), "{field} in {got}");
            }
        }
    }

    // An unknown field is a 422 naming `fields`, on each of the three.
    for path in [
        format!("/v1/users/{user}/recommendations?fields=title,colour"),
        format!("/v1/items/{first}/similar?fields=colour"),
        "/v1/popular?fields=colour".to_owned(),
    ] {
        let body = crate::helpers::problem(app.get(&path).await, 422).await;
        assert_eq!(body["errors"][0]["field"], "fields", "{path}: {body}");
        assert!(
            body["errors"][0]["message"].as_str().unwrap().contains("colour"),
            "{body}"
        );
    }
}

crate::both_stores!(with crate::serving::fast;
    a_continued_training_learns_new_items,
    answers_carry_catalogue_fields,
    a_new_event_changes_the_next_answer,
    a_newer_snapshot_format_is_passed_over,
    cold_start_and_filters_hold,
    clicks_are_counted_per_version,
    erasure_reaches_recommendations,
);

mod lifecycle {
    //! A restart, a failed and a rejected training, a swap under load.

    use super::*;

    async fn restart_failure_rejection_and_swap(db: Db) {
        let Some(app) = spawn_app_with(db, fast).await else {
            return;
        };
        seed_shop(&app, 200).await;
        let v1 = published(&app).await;

        // A restart serves the stored snapshot at once; a training that
        // fails (an invalid setting) keeps it.
        let app = restart_with(app, |s| {
            fast(s);
            s.train.dim = 0;
        })
        .await;
        let served = model(&app).await;
        assert_eq!(served["version"], v1.as_str(), "served at once after a restart");
        assert_eq!(recommend(&app, "user-1", "").await["model_version"], v1.as_str());
        let failed = train_now(&app).await;
        assert_eq!(failed["last_training"]["outcome"], "failed", "{failed}");
        assert!(
            failed["last_training"]["reason"].as_str().unwrap().contains("dim"),
            "{failed}"
        );
        assert_eq!(failed["version"], v1.as_str());

        // A candidate that cannot pass the gate is rejected.
        let app = restart_with(app, |s| {
            fast(s);
            s.gate_margin = 1.0;
        })
        .await;
        let rejected = train_now(&app).await;
        assert_eq!(rejected["last_training"]["outcome"], "rejected", "{rejected}");
        // No events newer than v1's data: judged against the baselines.
        let reason = rejected["last_training"]["reason"].as_str().unwrap();
        assert!(
            reason.contains("most-popular") && reason.contains("item-kNN"),
            "{reason}"
        );
        assert_eq!(rejected["version"], v1.as_str());
        assert!(rejected["history"].as_array().unwrap().len() >= 3);

        // A swap while requests run: every answer names one version.
        let app = std::sync::Arc::new(
            restart_with(app, |s| {
                fast(s);
                s.gate_margin = -1.0;
            })
            .await,
        );
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut readers = Vec::new();
        for r in 0..4 {
            let (app, stop) = (app.clone(), stop.clone());
            readers.push(tokio::spawn(async move {
                let mut versions = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let reply = recommend(&app, &format!("user-{}", r * 13 % 200), "n=10").await;
                    versions.push(reply["model_version"].as_str().unwrap().to_owned());
                }
                versions
            }));
        }
        // Events newer than v1's data for 20 users: the candidate is judged
        // against the served model on them.
        for u in 0..20 {
            view(&app, &format!("user-{u}"), "item-7").await;
        }
        let before = model(&app).await["history"].as_array().unwrap().len();
        assert_eq!(app.post("/v1/model/train", &json!({})).await.status(), 202);
        // A training already running: 409.
        crate::helpers::problem(app.post("/v1/model/train", &json!({})).await, 409).await;
        let body = wait_training(&app, before).await;
        assert_eq!(body["last_training"]["outcome"], "published", "{body}");
        let reason = body["last_training"]["reason"].as_str().unwrap();
        assert!(
            reason.contains("served model") && reason.contains("20 users"),
            "{reason}"
        );
        let v2 = body["version"].as_str().unwrap().to_owned();
        assert_ne!(v1, v2);
        tokio::time::sleep(Duration::from_millis(300)).await;
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let mut seen = HashSet::new();
        for reader in readers {
            seen.extend(reader.await.unwrap());
        }
        assert!(seen.contains(&v2), "{seen:?}");
        assert!(seen.iter().all(|v| *v == v1 || *v == v2), "{seen:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite() {
        restart_failure_rejection_and_swap(Db::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() {
        restart_failure_rejection_and_swap(Db::Postgres).await;
    }
}

mod approximate {
    //! A catalogue past `ann.min_items` is ranked through the
    //! nearest-neighbour index: the answers are those of scoring every item
    //! (on a catalogue this small the candidates cover it), filters hold,
    //! and a filter that leaves too few candidates falls back to the scan.

    use super::*;

    const QUERIES: [&str; 6] = [
        "n=10",
        "n=5&exclude=none",
        "n=8&category=books",
        "n=50&category=books",
        "n=3&exclude_items=item-1,item-2,item-3",
        "n=10&exclude=purchased&explain=true",
    ];

    async fn answers(app: &TestApp, version: &str) -> Vec<Value> {
        let mut out = Vec::new();
        for user in (0..25).map(|u| format!("user-{u}")).chain(["stranger".to_owned()]) {
            for query in QUERIES {
                let reply = recommend(app, &user, query).await;
                assert_eq!(reply["model_version"], version, "{user}?{query}: {reply}");
                out.push(json!([user, query, reply["strategy"], reply["items"]]));
            }
        }
        out
    }

    /// `GET /v1/model`'s `index` once it is no longer building (30 s at
    /// most).
    async fn built_index(app: &TestApp) -> Value {
        let mut index = Value::Null;
        for _ in 0..600 {
            index = model(app).await["index"].clone();
            if index["state"] != "building" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        index
    }

    /// Fast training, and an index for any catalogue, with f16 vectors.
    pub(super) fn indexed(s: &mut Settings) {
        fast(s);
        s.ann.min_items = 1;
        s.ann.vectors = recd::model::ann::Vectors::F16;
    }

    async fn same_answers_as_scoring_every_item(app: TestApp) {
        seed_shop(&app, 200).await;
        let version = published(&app).await;
        let index = built_index(&app).await;
        assert_eq!(index["kind"], "approximate", "{index}");
        assert_eq!(index["state"], "ready", "{index}");
        assert!(index["build_seconds"].as_f64().is_some(), "{index}");
        assert_eq!(index["vectors"], "f16", "{index}");
        assert!(index["memory_bytes"].as_u64().is_some_and(|b| b > 0), "{index}");
        let approximate = answers(&app, &version).await;
        let personalized = approximate.iter().filter(|a| a[2] == "personalized").count();
        assert!(personalized >= 100, "{personalized} personalized answers");
        let books = approximate.iter().find(|a| a[1] == "n=50&category=books").unwrap();
        assert!(!books[3].as_array().unwrap().is_empty(), "{books}");

        let app = restart_with(app, |s| {
            fast(s);
            s.ann.min_items = 0;
        })
        .await;
        assert_eq!(model(&app).await["index"], json!({"kind": "exact"}));
        let exact = answers(&app, &version).await;
        for (a, e) in approximate.iter().zip(&exact) {
            assert_eq!(a, e, "through the index, then scoring every item");
        }
    }

    crate::both_stores!(with super::indexed; same_answers_as_scoring_every_item);

    /// The trainer builds the index with the model and stores it with the
    /// snapshot: it is ready as the model is published, and a restart
    /// loads it (the same index: the same build time, the same answers)
    /// instead of building its own.
    async fn the_trainers_index_is_stored_and_loaded(app: TestApp) {
        seed_shop(&app, 200).await;
        let version = published(&app).await;
        let index = model(&app).await["index"].clone();
        assert_eq!(index["state"], "ready", "ready with the model: {index}");
        let before = answers(&app, &version).await;
        let loads = counter(&app, "recd_ann_loads_total").await;

        let app = restart_with(app, indexed).await;
        let loaded = model(&app).await["index"].clone();
        assert_eq!(loaded, index, "the stored index, not a new build");
        assert!(counter(&app, "recd_ann_loads_total").await > loads);
        assert_eq!(answers(&app, &version).await, before);

        // Built otherwise than the settings now ask: built anew here.
        let app = restart_with(app, |s| {
            indexed(s);
            s.ann.vectors = recd::model::ann::Vectors::F32;
        })
        .await;
        let rebuilt = built_index(&app).await;
        assert_eq!(rebuilt["state"], "ready", "{rebuilt}");
        assert_eq!(rebuilt["vectors"], "f32", "{rebuilt}");
    }

    mod stored {
        crate::both_stores!(with crate::serving::approximate::indexed; the_trainers_index_is_stored_and_loaded);

        use super::the_trainers_index_is_stored_and_loaded;
    }

    /// Categories of `WIDE` items each, and one of `RARE` items.
    const CATEGORIES: usize = 8;
    const WIDE: usize = 250;
    const RARE: usize = 6;

    /// A catalogue of 2,006 items where 50 candidates are far fewer than
    /// the items: shoppers walk a category's items in order, so a trained
    /// model places them near each other.
    async fn seed_large(app: &TestApp) -> usize {
        let mut items = Vec::new();
        for c in 0..CATEGORIES {
            items.extend((0..WIDE).map(|i| (format!("c{c}-{i}"), format!("cat{c}"))));
        }
        items.extend((0..RARE).map(|i| (format!("rare-{i}"), "rare".to_owned())));
        for chunk in items.chunks(1000) {
            let body: Vec<Value> = chunk
                .iter()
                .map(|(id, category)| json!({"item_id": id, "categories": [category]}))
                .collect();
            assert_eq!(app.post("/v1/items", &json!({"items": body})).await.status(), 200);
        }
        let now = chrono::Utc::now().timestamp_millis() - 3_600_000;
        let mut events = Vec::new();
        let mut push = |user: String, item: &str, at: i64| {
            events.push(recd::domain::NewEvent {
                event_id: Some(format!("e{}", events.len())),
                user_id: user,
                item_id: item.to_owned(),
                kind: recd::domain::EventType::View,
                value: None,
                ts: now + at,
                timestamped: true,
                session_id: None,
                recommendation_id: None,
            });
        };
        for u in 0..1200usize {
            let (c, start) = (u % CATEGORIES, (u * 37) % WIDE);
            for step in 0..6 {
                let i = (start + step * 3) % WIDE;
                push(format!("user-{u}"), &format!("c{c}-{i}"), (u * 10 + step) as i64);
            }
        }
        // Every item is seen, the rare ones too.
        for (n, (id, _)) in items.iter().enumerate() {
            push(format!("walker-{}", n / 40), id, 20_000 + n as i64);
        }
        for chunk in events.chunks(1000) {
            app.store.insert_events(chunk, now).await.expect("events stored");
        }
        items.len()
    }

    /// Top-10 answers of the first 100 users, in the rare category too.
    async fn top_tens(app: &TestApp, version: &str, query: &str) -> Vec<Vec<String>> {
        let mut out = Vec::new();
        for u in 0..100 {
            let reply = recommend(app, &format!("user-{u}"), query).await;
            assert_eq!(reply["model_version"], version, "{reply}");
            assert_eq!(reply["strategy"], "personalized", "{reply}");
            out.push(ids(&reply));
        }
        out
    }

    /// Through the index on a catalogue far larger than the candidates:
    /// the top 10 mostly agree with scoring every item, and a category too
    /// narrow for the candidates falls back to the scan, with the same
    /// answer as the scan.
    async fn recall_and_fallback_on_a_large_catalogue(app: TestApp) {
        let items = seed_large(&app).await;
        let version = published(&app).await;
        let index = built_index(&app).await;
        assert_eq!(index["state"], "ready", "{index}");
        assert_eq!(model(&app).await["items"], items);
        let through_index = counter(&app, "recd_ann_rankings_total").await;
        let approximate = top_tens(&app, &version, "n=10").await;
        let through_index = counter(&app, "recd_ann_rankings_total").await - through_index;
        assert!(
            through_index >= 100.0,
            "{through_index} of 100 rankings through the index"
        );
        let fallbacks_before = counter(&app, "recd_ann_fallbacks_total").await;
        let rare_approximate = top_tens(&app, &version, "n=10&category=rare").await;
        let fallbacks_after = counter(&app, "recd_ann_fallbacks_total").await;
        assert!(
            fallbacks_after - fallbacks_before >= 100.0,
            "each narrow request falls back: {fallbacks_before} -> {fallbacks_after}"
        );
        assert!(
            rare_approximate.iter().all(|top| top.len() == RARE),
            "{rare_approximate:?}"
        );

        let app = restart_with(app, |s| {
            fast(s);
            s.ann.min_items = 0;
        })
        .await;
        let exact = top_tens(&app, &version, "n=10").await;
        let found: usize = approximate
            .iter()
            .zip(&exact)
            .map(|(a, e)| a.iter().filter(|id| e.contains(id)).count())
            .sum();
        let recall = found as f64 / (10 * exact.len()) as f64;
        eprintln!("recall@10 through the index: {recall:.3}");
        assert!(recall >= 0.8, "recall@10 {recall:.3} against scoring every item");
        assert_eq!(rare_approximate, top_tens(&app, &version, "n=10&category=rare").await);
    }

    /// An index for any catalogue, searched for 50 candidates.
    fn few_candidates(s: &mut Settings) {
        fast(s);
        s.ann.min_items = 1;
        s.ann.candidates = 50;
        s.ann.ef_search = 50;
    }

    mod large {
        crate::both_stores!(with crate::serving::approximate::few_candidates; recall_and_fallback_on_a_large_catalogue);

        use super::recall_and_fallback_on_a_large_catalogue;
    }
}
