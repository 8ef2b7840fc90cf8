//! The load: a scenario's `recd serve` loaded phase by phase, each phase
//! from `--connections` keep-alive connections issuing requests back to back
//! (a closed loop), and what they measured.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use clap::ValueEnum;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use rand::{Rng, SeedableRng};

use crate::data::Prepared;
use crate::report::{print_phase, print_states, user_states, Row};
use crate::server::{wait_for_index, wait_healthy, Server};
use crate::system::{cpu_seconds, mb, rss_kb, thousands, warn_if_compiling};
use crate::Args;

#[derive(Clone, Copy, PartialEq, Eq, Debug, ValueEnum)]
pub enum Route {
    Healthz,
    /// Recommendations; a user asked for again with no new event gets the
    /// ranking made last time.
    Recs,
    /// Recommendations, each asking what was not asked before
    /// (`exclude_items` names an item id that exists nowhere), so every
    /// answer is a ranking made for it.
    Fresh,
}

impl Route {
    pub fn is_recs(self) -> bool {
        matches!(self, Route::Recs | Route::Fresh)
    }

    pub fn label(self) -> &'static str {
        match self {
            Route::Healthz => "GET /healthz",
            Route::Recs => "GET /v1/users/{id}/recommendations",
            Route::Fresh => "GET /v1/users/{id}/recommendations, no ranking repeated",
        }
    }
}

/// One scenario: its server started, waited for, loaded phase by phase and
/// stopped; a row for each phase.
pub async fn bench_scenario(args: &Args, recd: &Path, prepared: &Prepared) -> anyhow::Result<Vec<Row>> {
    println!(
        "\n## {}: {} items, {} users, {} events",
        prepared.name,
        thousands(prepared.items as f64),
        thousands(prepared.users.len() as f64),
        thousands(prepared.events as f64)
    );
    let mut server = Server::start(recd, &prepared.db, &args.server_env)?;
    let addr = server.addr;
    wait_healthy(&mut server, Duration::from_secs(args.startup_timeout)).await?;
    let (rss, hwm) = rss_kb(server.pid())?;
    println!(
        "recd serve (pid {}) answered after {:.1} s; RSS {} (peak {}) before load",
        server.pid(),
        server.started.elapsed().as_secs_f64(),
        mb(rss),
        mb(hwm)
    );
    wait_for_index(&mut server, Duration::from_secs(args.index_timeout)).await?;
    if args.phases.iter().any(|r| r.is_recs()) {
        sample_recommendation(addr, &prepared.users[0], args.n).await;
    }

    let mut rows = Vec::new();
    for &route in &args.phases {
        warn_if_compiling();
        let server_cpu = cpu_seconds(server.pid())?;
        let own_cpu = cpu_seconds(std::process::id())?;
        let states_before = user_states(addr).await?;
        let began = Instant::now();
        let stats = run_phase(addr, route, prepared.users.clone(), args).await?;
        let wall = began.elapsed().as_secs_f64();
        let server_cores = (cpu_seconds(server.pid())? - server_cpu) / wall;
        let own_cores = (cpu_seconds(std::process::id())? - own_cpu) / wall;
        server.ensure_running(" during the load")?;
        let (rss, hwm) = rss_kb(server.pid())?;
        print_phase(&prepared.name, route, &stats, server_cores, own_cores, rss, hwm);
        if route.is_recs() {
            print_states(&states_before, &user_states(addr).await?);
        }
        rows.push(Row {
            scenario: prepared.name.clone(),
            route,
            stats,
            rss_kb: rss,
            hwm_kb: hwm,
        });
    }
    server.print_log_warnings();
    server.stop()?;
    Ok(rows)
}

/// Shows one answer as it comes, so a changed shape is seen at once.
async fn sample_recommendation(addr: SocketAddr, user: &str, n: usize) {
    let url = format!("http://{addr}{}", recs_path(user, n));
    match reqwest::get(&url).await {
        Ok(reply) => {
            let status = reply.status();
            let body = reply.text().await.unwrap_or_default();
            let shown: String = body.chars().take(400).collect();
            let marker = if status.is_success() { "" } else { "!!! " };
            println!("{marker}sample: GET {} -> {status}: {shown}", recs_path(user, n));
        }
        Err(e) => println!("!!! sample: GET {url} failed: {e}"),
    }
}

/// What one phase measured, all connections together.
#[derive(Default)]
pub struct PhaseStats {
    /// Measured seconds.
    pub elapsed: f64,
    /// Requests started in the measured window and answered 2xx.
    pub ok: u64,
    /// Answers by non-2xx status.
    pub statuses: BTreeMap<u16, u64>,
    /// Requests that got no answer (connection refused, reset, ...).
    pub transport_errors: u64,
    /// Recommendation answers by their `strategy`.
    pub strategies: BTreeMap<String, u64>,
    /// Sampled recommendation answers whose JSON was not as documented.
    pub bad_shape: u64,
    /// The first few failures, verbatim.
    pub examples: Vec<String>,
    /// Latency of every measured request (2xx or not), microseconds, sorted.
    pub latencies_us: Vec<u32>,
}

impl PhaseStats {
    pub fn errors(&self) -> u64 {
        self.statuses.values().sum::<u64>() + self.transport_errors + self.bad_shape
    }

    /// 2xx answers per second: failures are counted apart, never as throughput.
    pub fn rate(&self) -> f64 {
        self.ok as f64 / self.elapsed
    }

    /// Nearest-rank percentile, milliseconds.
    pub fn percentile(&self, p: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return f64::NAN;
        }
        let rank = ((p / 100.0) * self.latencies_us.len() as f64).ceil() as usize;
        f64::from(self.latencies_us[rank.clamp(1, self.latencies_us.len()) - 1]) / 1000.0
    }

    fn merge(&mut self, other: PhaseStats) {
        self.ok += other.ok;
        for (k, v) in other.statuses {
            *self.statuses.entry(k).or_default() += v;
        }
        self.transport_errors += other.transport_errors;
        for (k, v) in other.strategies {
            *self.strategies.entry(k).or_default() += v;
        }
        self.bad_shape += other.bad_shape;
        for e in other.examples {
            if self.examples.len() < 5 {
                self.examples.push(e);
            }
        }
        self.latencies_us.extend(other.latencies_us);
    }
}

async fn run_phase(addr: SocketAddr, route: Route, users: Arc<Vec<String>>, args: &Args) -> anyhow::Result<PhaseStats> {
    let start = Instant::now() + Duration::from_secs_f64(args.warmup);
    let end = start + Duration::from_secs_f64(args.seconds);
    let tasks: Vec<_> = (0..args.connections)
        .map(|i| {
            let users = users.clone();
            let n = args.n;
            tokio::spawn(connection(addr, route, users, n, start, end, i as u64))
        })
        .collect();
    let mut stats = PhaseStats::default();
    for task in tasks {
        stats.merge(task.await?);
    }
    stats.elapsed = args.seconds;
    stats.latencies_us.sort_unstable();
    Ok(stats)
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

/// One keep-alive connection issuing requests back to back until `end`;
/// only requests started at or after `start` are counted.
async fn connection(
    addr: SocketAddr,
    route: Route,
    users: Arc<Vec<String>>,
    n: usize,
    start: Instant,
    end: Instant,
    seed: u64,
) -> PhaseStats {
    let mut stats = PhaseStats::default();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let host = addr.to_string();
    let mut sender: Option<Sender> = None;
    let mut sent = 0u64;
    let mut asked = 0u64;
    while Instant::now() < end {
        let mut conn = match sender.take() {
            Some(s) => s,
            None => match crate::server::connect(addr).await {
                Ok(s) => s,
                Err(e) => {
                    note_transport_error(&mut stats, Instant::now() >= start, format!("connect: {e}"));
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let user = &users[rng.gen_range(0..users.len())];
        let path = match route {
            Route::Healthz => "/healthz".to_owned(),
            Route::Recs => recs_path(user, n),
            Route::Fresh => format!("{}&exclude_items=nowhere-{seed}-{asked}", recs_path(user, n)),
        };
        asked += 1;
        let request = hyper::Request::get(path.as_str())
            .header(hyper::header::HOST, host.as_str())
            .body(Empty::<Bytes>::new())
            .expect("a valid request");
        let began = Instant::now();
        let counted = began >= start;
        let answer = async {
            conn.ready().await?;
            let reply = conn.send_request(request).await?;
            let status = reply.status().as_u16();
            let body = reply.into_body().collect().await?.to_bytes();
            anyhow::Ok((status, body))
        }
        .await;
        let latency = began.elapsed();
        match answer {
            Ok((status, body)) => {
                sender = Some(conn);
                if !counted {
                    continue;
                }
                sent += 1;
                stats
                    .latencies_us
                    .push(latency.as_micros().min(u128::from(u32::MAX)) as u32);
                if !(200..300).contains(&status) {
                    *stats.statuses.entry(status).or_default() += 1;
                    if stats.examples.len() < 5 {
                        let text = String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
                        stats.examples.push(format!("{path} -> {status}: {text}"));
                    }
                    continue;
                }
                stats.ok += 1;
                if route.is_recs() {
                    let strategy = strategy_of(&body).unwrap_or("(none)");
                    match stats.strategies.get_mut(strategy) {
                        Some(count) => *count += 1,
                        None => {
                            stats.strategies.insert(strategy.to_owned(), 1);
                        }
                    }
                    // The full shape on the first answer and every 500th.
                    if sent % 500 == 1 {
                        if let Err(e) = check_shape(&body, user, n) {
                            stats.bad_shape += 1;
                            if stats.examples.len() < 5 {
                                let text = String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
                                stats.examples.push(format!("{path}: {e}: {text}"));
                            }
                        }
                    }
                }
            }
            Err(e) => note_transport_error(&mut stats, counted, format!("{path}: {e}")),
        }
    }
    stats
}

fn note_transport_error(stats: &mut PhaseStats, counted: bool, what: String) {
    if counted {
        stats.transport_errors += 1;
        if stats.examples.len() < 5 {
            stats.examples.push(what);
        }
    }
}

fn recs_path(user: &str, n: usize) -> String {
    format!("/v1/users/{}/recommendations?n={n}", percent_encode(user))
}

/// Percent-encodes all but RFC 3986's unreserved characters.
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The `strategy` of a recommendations answer without parsing all of it.
fn strategy_of(body: &[u8]) -> Option<&str> {
    const KEY: &[u8] = b"\"strategy\":\"";
    let at = body.windows(KEY.len()).position(|w| w == KEY)? + KEY.len();
    let len = body[at..].iter().position(|&b| b == b'"')?;
    std::str::from_utf8(&body[at..at + len]).ok()
}

/// `{"user_id","recommendation_id","model_version","strategy","items":[{"item_id","score"}]}`.
fn check_shape(body: &[u8], user: &str, n: usize) -> anyhow::Result<()> {
    let doc: serde_json::Value = serde_json::from_slice(body).context("not JSON")?;
    ensure!(doc["user_id"] == user, "user_id is not the one asked for");
    ensure!(doc["recommendation_id"].is_string(), "no recommendation_id");
    ensure!(doc.get("model_version").is_some(), "no model_version");
    ensure!(doc["strategy"].is_string(), "no strategy");
    let items = doc["items"].as_array().context("no items array")?;
    ensure!(items.len() <= n, "{} items for n={n}", items.len());
    for item in items {
        ensure!(
            item["item_id"].is_string() && item["score"].is_number(),
            "an item without item_id and score"
        );
    }
    Ok(())
}
