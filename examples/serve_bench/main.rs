//! Serving load driver: how many recommendations per second a release `recd`
//! answers, at what latency, in how much memory, next to what the same
//! process answers on `GET /healthz` in the same run.
//!
//! Two scenarios, each with its own `recd serve` child process on a copy of
//! a cached SQLite store:
//!
//! - `beauty`: the events of `amazon-beauty/events.csv` in the `--data`
//!   folder (22k users, 12k items; the scenario needs `--data DIR`)
//!   imported with `recd import` and a model trained with `recd train`
//!   (training capped at 60 s: a shorter training makes a less accurate model
//!   of the same shape, so serving costs the same);
//! - `synthetic`: a catalogue of `--items` (default 1,000,000) items with a
//!   seeded network of the served shape, 20,000 users with 20 events each,
//!   built here with the library. `--weights aligned` (the default) gives
//!   the items `--categories` categories: each item's embedding is its
//!   category's vector plus its own, as a model trained with categories
//!   learns, shoppers browse within a few categories, and the network's
//!   query is a running average of the shopper's recent items, so it points
//!   toward the categories they browse, as a trained network's does.
//!   `--weights clustered` has the same items with a random network, whose
//!   queries are unrelated to them; `--weights random` draws every item's
//!   embedding independently and every view at random. Those two are worst
//!   cases for a nearest-neighbour index.
//!
//! For each, 64 keep-alive connections (one tokio task each, requests back to
//! back, closed loop) load `GET /healthz`, then `GET
//! /v1/users/{id}/recommendations?n=10` for random known users, then the
//! same with a new `exclude_items` each time (an id that exists nowhere, so
//! the answer is the same but no request repeats an earlier question and
//! every answer is a ranking made for it), then `/healthz` again, each for
//! `--seconds` after a `--warmup`. The server is loaded only once its
//! nearest-neighbour index (large catalogues) is built and its recently
//! active users' states are warmed. Per phase:
//! requests/s, latency percentiles measured at the client, non-2xx answers
//! and transport errors (printed, never hidden), the share of personalized
//! answers, the CPU the server and the driver used, and the server's RSS
//! (`VmRSS`, and the peak `VmHWM`) from /proc, and for recommendations how
//! many rankings were made from a cached or warmed user state and how many
//! ran the network over the user's events. Ends with a Markdown table.
//!
//!     cargo build --release
//!     cargo run --release --example serve_bench -- --data DIR [--scenario beauty|synthetic|both] [--seconds 10]
//!     cargo run --release --example serve_bench -- --scenario synthetic [--items 100000]
//!
//! The prepared stores are cached under `$CARGO_TARGET_DIR/serve-bench`
//! (or `target/serve-bench`); `--fresh` rebuilds them. Run it on an otherwise
//! idle machine: the server and the load generator share its cores, and a
//! compile beside them makes the figures meaningless (the driver warns when
//! it sees `rustc` running).
//!
//! The modules: `data` prepares the scenarios' stores, `network` lays out
//! the synthetic catalogue's weights, `server` runs the `recd` child,
//! `load` drives a scenario's phases and `report` measures and prints them.

mod data;
mod load;
mod network;
mod report;
mod server;
mod system;

use std::path::PathBuf;

use anyhow::{ensure, Context};
use clap::{Parser, ValueEnum};

use data::{prepare_beauty, prepare_synthetic};
use load::{bench_scenario, Route};
use network::Layout;
use report::print_summary;
use system::machine;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(about = "Load a release recd with recommendation and health requests")]
pub struct Args {
    /// Which scenarios to run.
    #[arg(long, value_enum, default_value_t = Which::Both)]
    pub scenario: Which,
    /// Measured seconds per phase.
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// Unmeasured seconds of load before each phase.
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f64,
    /// Concurrent keep-alive connections.
    #[arg(long, default_value_t = 64)]
    pub connections: usize,
    /// Phases in order: `healthz`, `recs`, `fresh` (recommendations with no
    /// ranking repeated).
    #[arg(long, value_delimiter = ',', default_value = "healthz,recs,fresh,healthz")]
    pub phases: Vec<Route>,
    /// Recommendations asked for per request.
    #[arg(long, default_value_t = 10)]
    pub n: usize,
    /// Items in the synthetic catalogue.
    #[arg(long, default_value_t = 1_000_000)]
    pub items: usize,
    /// Users (with `--events-per-user` events each) in the synthetic store.
    #[arg(long, default_value_t = 20_000)]
    pub synthetic_users: usize,
    #[arg(long, default_value_t = 20)]
    pub events_per_user: usize,
    /// How the synthetic catalogue's item embeddings are laid out.
    #[arg(long, value_enum, default_value_t = Layout::Aligned)]
    pub weights: Layout,
    /// Categories of the synthetic catalogue (`aligned` and `clustered`).
    #[arg(long, default_value_t = 5_000)]
    pub categories: usize,
    /// The release binary [default: $CARGO_TARGET_DIR/release/recd].
    #[arg(long)]
    pub recd: Option<PathBuf>,
    /// The evaluation data folder, holding amazon-beauty/events.csv; the
    /// beauty scenario (and `both`) needs it.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Where prepared stores are kept between runs [default: $CARGO_TARGET_DIR/serve-bench].
    #[arg(long)]
    pub cache: Option<PathBuf>,
    /// Rebuild the prepared stores (import, training, synthetic catalogue).
    #[arg(long)]
    pub fresh: bool,
    /// Worker threads of the load generator's runtime.
    #[arg(long, default_value_t = 2)]
    pub client_threads: usize,
    /// Seconds to wait for `recd serve` to load its snapshot and answer.
    #[arg(long, default_value_t = 600)]
    pub startup_timeout: u64,
    /// Settings for the `recd serve` under test, as environment variables
    /// (`--server-env RECD_ANN__EF_SEARCH=100`; repeatable). The driver
    /// passes no other `RECD_*` variable of its own environment on.
    #[arg(long, value_name = "KEY=VALUE")]
    pub server_env: Vec<String>,
    /// Seconds to wait for the nearest-neighbour index of a large catalogue.
    #[arg(long, default_value_t = 1800)]
    pub index_timeout: u64,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Which {
    Beauty,
    Synthetic,
    Both,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(
        args.connections > 0 && args.seconds > 0.0,
        "need connections and seconds"
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.client_threads.max(1))
        .enable_all()
        .build()?;
    runtime.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    // The beauty scenario's events come from --data; the synthetic one needs none.
    let data = match args.scenario {
        Which::Synthetic => None,
        Which::Beauty | Which::Both => Some(args.data.clone().context(
            "the beauty scenario needs its data: pass --data DIR, the folder holding amazon-beauty/events.csv \
             (or run --scenario synthetic, which needs none)",
        )?),
    };
    let (recd, target) = server::release_recd(args.recd.clone())?;
    let cache = args.cache.clone().unwrap_or_else(|| target.join("serve-bench"));
    std::fs::create_dir_all(&cache)?;

    println!("# recd serving benchmark");
    println!("machine: {}", machine());
    println!("recd: {}", recd.display());
    println!(
        "load: {} keep-alive connections, closed loop, {} s per phase after {} s warm-up; phases {:?}; client runtime {} threads",
        args.connections, args.seconds, args.warmup, args.phases, args.client_threads
    );

    let mut rows = Vec::new();
    if let Some(data) = &data {
        let prepared = prepare_beauty(&args, &recd, data, &cache)?;
        rows.extend(bench_scenario(&args, &recd, &prepared).await?);
    }
    if matches!(args.scenario, Which::Synthetic | Which::Both) {
        let prepared = prepare_synthetic(&args, &cache).await?;
        rows.extend(bench_scenario(&args, &recd, &prepared).await?);
    }
    print_summary(&rows);
    Ok(())
}
