//! Abuse load driver: whether a release `recd serve` holds against the
//! clients issue 15 names, measured against a child process (each scenario
//! with its own `recd serve` on a fresh copy of one prepared SQLite store):
//!
//! - `slow` (item 4): `--slow-connections` (5,000) connections opened in
//!   waves (`--wave` per 100 ms), half idle (they send nothing) and half
//!   trickling a request head (one header line a second, never the blank
//!   line that ends it), against a server with `header_read_timeout`
//!   `--header-timeout` (5 s). Meanwhile 16 keep-alive connections load
//!   `GET /healthz` and `GET /v1/users/{id}/recommendations?n=10` at a fixed
//!   rate (latency from each request's scheduled time, so a stall shows as
//!   latency rather than as fewer requests), first alone (the baseline),
//!   then beside the slow clients; a new connection asks `/healthz` every
//!   100 ms. Prints how many slow connections the server closed within the
//!   timeout plus `--margin`, later, or never (and whether the server holds
//!   a socket for those never closed: a client can be connected to a
//!   server that never saw it, after a listen-queue overflow), connect
//!   failures, the time until all were closed, the listen backlog and the
//!   kernel's overflow counters, and the normal requests' p50/p99 in both
//!   phases.
//! - `overload` (item 5): recommendations (each a new ranking) from 64
//!   keep-alive connections in a closed loop, then from 3,000 (opened in
//!   waves): goodput (2xx/s) and p99 of the 2xx answers, 503s and whether
//!   each had `Retry-After`, other statuses, transport errors, the server's
//!   RSS peak (sampled every 100 ms), its admission gauges and a new
//!   connection's `/healthz` during the flood; once the flood stops
//!   (its connections dropped), 64 connections again, their 2xx counted in
//!   250 ms windows: "recovery" is the time until the end of the first
//!   window at 90% or more of the first phase's rate. PASS/MISS: goodput
//!   at 3,000 at least 0.8 of goodput at 64; recovery within 5 s.
//! - `ingest` (item 6): a reader at a fixed rate (`GET /v1/popular` and
//!   recommendations, alternately) alone, then beside 1 collector, then
//!   beside 16 collectors, each collector posting 1,000-event batches
//!   (`POST /v1/events`, unique `event_id`s, new shoppers) back to back:
//!   events/s for 1 and 16 collectors, their ratio (PASS at 0.8 or more),
//!   every non-200 answer (PASS at none), and the reader's p99 in each
//!   phase.
//!
//! The store: a synthetic shop (`--items` items in categories, `--users`
//! shoppers with `--events-per-user` events each, written as CSV files),
//! imported with `recd import` and trained with `recd train` capped at
//! `--train-seconds`, cached under `$CARGO_TARGET_DIR/abuse-bench` (or
//! `target/abuse-bench`) until its inputs change; `--fresh` rebuilds it.
//!
//!     cargo build --release
//!     cargo run --release --example abuse_bench -- --scenario all
//!     cargo run --release --example abuse_bench -- --scenario slow --slow-connections 10000
//!
//! Every figure is measured in the run; the run ends with a Markdown table.
//! Run it on an otherwise idle machine: the server and the driver share
//! the cores (the driver warns when it sees `rustc` running).
//!
//! The modules: `data` prepares the store, `client` holds the HTTP client
//! side shared by the scenarios (requests, paced and closed-loop load,
//! latency figures, `/metrics`), `slow`, `overload` and `ingest` are the
//! scenarios, `tcp` reads what the kernel says about the connections,
//! `report` prints the closing table; `server` (the `recd`
//! children) and `system` (/proc, the machine) are serve_bench's.

mod client;
mod data;
mod ingest;
mod overload;
mod report;
#[allow(dead_code)]
#[path = "../serve_bench/server.rs"]
mod server;
mod slow;
#[allow(dead_code)]
#[path = "../serve_bench/system.rs"]
mod system;
mod tcp;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use data::Prepared;
use report::Row;
use server::{wait_for_index, wait_healthy, Server};
use system::{machine, mb, rss_kb};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(about = "Load a release recd with slow clients, a flood, and collectors")]
pub struct Args {
    /// Which scenarios to run.
    #[arg(long, value_enum, default_value_t = Which::All)]
    pub scenario: Which,
    /// Measured seconds of each steady phase (the baselines, 64 and 3,000
    /// connections, each collector phase).
    #[arg(long, default_value_t = 8.0)]
    pub seconds: f64,
    /// Unmeasured seconds of load before each steady phase.
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f64,

    /// slow: connections that never finish a request head (half idle, half
    /// trickling).
    #[arg(long, default_value_t = 5000)]
    pub slow_connections: usize,
    /// slow and overload: connections opened per 100 ms (the listen backlog
    /// would overflow with thousands at once).
    #[arg(long, default_value_t = 500)]
    pub wave: usize,
    /// slow: the server's `header_read_timeout`, seconds.
    #[arg(long, default_value_t = 5.0)]
    pub header_timeout: f64,
    /// slow: a slow connection closed within the timeout plus this many
    /// seconds of its connect counts as closed in time.
    #[arg(long, default_value_t = 2.0)]
    pub margin: f64,
    /// slow: normal keep-alive connections beside the slow ones.
    #[arg(long, default_value_t = 16)]
    pub normal_connections: usize,
    /// slow: requests/s the normal connections send together (half
    /// `/healthz`, half recommendations).
    #[arg(long, default_value_t = 1000.0)]
    pub normal_rate: f64,

    /// overload: connections of the first phase and of the recovery load.
    #[arg(long, default_value_t = 64)]
    pub connections: usize,
    /// overload: connections of the flood.
    #[arg(long, default_value_t = 3000)]
    pub flood_connections: usize,
    /// overload: how long the recovery load runs after the flood, seconds.
    #[arg(long, default_value_t = 8.0)]
    pub recovery_seconds: f64,

    /// ingest: the collectors of the second collector phase (the first has 1).
    #[arg(long, default_value_t = 16)]
    pub collectors: usize,
    /// ingest: events per `POST /v1/events` (at most 1,000).
    #[arg(long, default_value_t = 1000)]
    pub batch: usize,
    /// ingest: requests/s of the reader (4 connections).
    #[arg(long, default_value_t = 200.0)]
    pub reader_rate: f64,

    /// Items of the synthetic shop.
    #[arg(long, default_value_t = 2000)]
    pub items: usize,
    /// Shoppers of the synthetic shop.
    #[arg(long, default_value_t = 5000)]
    pub users: usize,
    #[arg(long, default_value_t = 20)]
    pub events_per_user: usize,
    /// `recd train`'s time cap when the store is prepared, seconds.
    #[arg(long, default_value_t = 30)]
    pub train_seconds: u64,
    /// The release binary [default: $CARGO_TARGET_DIR/release/recd].
    #[arg(long)]
    pub recd: Option<PathBuf>,
    /// Where the prepared store is kept between runs [default: $CARGO_TARGET_DIR/abuse-bench].
    #[arg(long)]
    pub cache: Option<PathBuf>,
    /// Rebuild the prepared store.
    #[arg(long)]
    pub fresh: bool,
    /// Worker threads of the driver's runtime.
    #[arg(long, default_value_t = 2)]
    pub client_threads: usize,
    /// Settings for every `recd serve` under test, as environment variables
    /// (`--server-env RECD_MAX_CONCURRENT_REQUESTS=256`; repeatable), after
    /// the scenario's own (the slow scenario sets
    /// `RECD_HEADER_READ_TIMEOUT`). No `RECD_*` variable of the driver's
    /// own environment is passed on.
    #[arg(long, value_name = "KEY=VALUE")]
    pub server_env: Vec<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Which {
    Slow,
    Overload,
    Ingest,
    All,
}

impl Which {
    fn runs(self, scenario: Which) -> bool {
        self == Which::All || self == scenario
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.seconds > 0.0 && args.wave > 0 && args.connections > 0,
        "need --seconds, --wave and --connections above 0"
    );
    anyhow::ensure!((1..=1000).contains(&args.batch), "--batch must be 1 to 1,000");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.client_threads.max(1))
        .enable_all()
        .build()?;
    runtime.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    // Thousands of sockets: the soft limit (often 1,024) up to the hard one.
    let files = rlimit::increase_nofile_limit(u64::MAX)?;
    let (recd, target) = server::release_recd(args.recd.clone())?;
    let cache = args.cache.clone().unwrap_or_else(|| target.join("abuse-bench"));
    std::fs::create_dir_all(&cache)?;

    println!("# recd abuse benchmark");
    println!("date: {}", chrono::Utc::now().format("%Y-%m-%d %H:%M UTC"));
    println!("machine: {}", machine());
    println!("recd: {}", recd.display());
    println!(
        "driver: open-file limit {files}, runtime {} threads",
        args.client_threads
    );
    let prepared = data::prepare(&args, &recd, &cache)?;

    let mut rows: Vec<Row> = Vec::new();
    if args.scenario.runs(Which::Slow) {
        rows.extend(slow::run(&args, &recd, &prepared).await?);
    }
    if args.scenario.runs(Which::Overload) {
        rows.extend(overload::run(&args, &recd, &prepared).await?);
    }
    if args.scenario.runs(Which::Ingest) {
        rows.extend(ingest::run(&args, &recd, &prepared).await?);
    }
    report::print_table(&rows);
    Ok(())
}

/// `recd serve` on a fresh copy of the prepared store with the scenario's
/// `settings` and then `--server-env`, answering and warmed.
pub async fn start_server(
    args: &Args,
    recd: &std::path::Path,
    prepared: &Prepared,
    settings: &[String],
) -> anyhow::Result<Server> {
    let all: Vec<String> = settings.iter().chain(&args.server_env).cloned().collect();
    let mut server = Server::start(recd, &prepared.db, &all)?;
    wait_healthy(&mut server, Duration::from_secs(120)).await?;
    wait_for_index(&mut server, Duration::from_secs(300)).await?;
    let (rss, hwm) = rss_kb(server.pid())?;
    println!(
        "recd serve (pid {}{}) ready after {:.1} s; RSS {} (peak {})",
        server.pid(),
        if all.is_empty() {
            String::new()
        } else {
            format!(", {}", all.join(" "))
        },
        server.started.elapsed().as_secs_f64(),
        mb(rss),
        mb(hwm)
    );
    Ok(server)
}

/// The warnings and errors in the server's log, counted by kind (their
/// text up to the first field, with sqlx's statement summary), printed, and
/// a row for the table.
pub fn log_findings(scenario: &'static str, server: &Server) -> Row {
    let text = server.log_text();
    let mut kinds: std::collections::BTreeMap<String, usize> = Default::default();
    for line in text.lines() {
        let Some(at) = line.find(" WARN ").or_else(|| line.find(" ERROR ")) else {
            continue;
        };
        let rest = line[at..].trim();
        let kind = rest.split(" db.statement=").next().unwrap_or(rest);
        let kind: String = kind.chars().take(140).collect();
        *kinds.entry(kind).or_default() += 1;
    }
    let total: usize = kinds.values().sum();
    println!("recd's log: {total} WARN or ERROR lines");
    for (kind, n) in &kinds {
        println!("    {n} x {kind}");
    }
    let value = if total == 0 {
        "none".to_owned()
    } else {
        kinds
            .iter()
            .map(|(kind, n)| format!("{n} x `{}`", kind.replace('|', "/")))
            .collect::<Vec<_>>()
            .join("; ")
    };
    Row::info(scenario, "recd's log: WARN and ERROR lines", value)
}
