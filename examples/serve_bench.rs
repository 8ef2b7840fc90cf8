//! Serving load driver: how many recommendations per second a release `recd`
//! answers, at what latency, in how much memory, next to what the same
//! process answers on `GET /healthz` in the same run.
//!
//! Two scenarios, each with its own `recd serve` child process on a copy of
//! a cached SQLite store:
//!
//! - `beauty`: the events of `../shared/data/amazon-beauty` (22k users, 12k
//!   items) imported with `recd import` and a model trained with `recd train`
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
//!     export CARGO_TARGET_DIR=/work/main/target   # or leave unset
//!     cargo build --release
//!     cargo run --release --example serve_bench -- [--scenario beauty|synthetic|both] [--seconds 10]
//!
//! The prepared stores are cached under `$CARGO_TARGET_DIR/serve-bench`
//! (or `target/serve-bench`); `--fresh` rebuilds them. Run it on an otherwise
//! idle machine: the server and the load generator share its cores, and a
//! compile beside them makes the figures meaningless (the driver warns when
//! it sees `rustc` running).

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use clap::{Parser, ValueEnum};
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rand::{Rng, SeedableRng};
use recd::ingest::{EventType, NewEvent};
use recd::model::data::Step;
use recd::model::knn::Neighbours;
use recd::model::snapshot::{Weights, KINDS};
use recd::model::{ModelSnapshot, SnapshotMeta};
use recd::store::{Item, Store, StoreOptions};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Gives item i (1-based) the vector of category (i - 1) % `categories`
/// (drawn at 3x an item's own scale) plus its own, as in a model trained
/// with category embeddings.
fn cluster(weights: &mut Weights, categories: usize, rng: &mut impl Rng) {
    let dim = weights.dim;
    let centres = random_weights(categories, dim, 1, rng).item_emb;
    for (i, row) in weights.item_emb.chunks_mut(dim).enumerate().skip(1) {
        let centre = &centres[(1 + (i - 1) % categories) * dim..][..dim];
        for (x, c) in row.iter_mut().zip(centre) {
            *x += 3.0 * c;
        }
    }
}

/// Makes the network's query a running average of the shopper's recent
/// item embeddings, so that it points toward the categories they browse:
/// the cell keeps about three quarters of its memory per event and takes
/// in the new item's embedding (the cell-input weights are the identity),
/// the output gate is open, and the projection is the identity. A trained
/// network's query leans the same way (its next items are near the ones
/// before), which a random network's does not. Needs `dim == hidden`.
fn read_history(weights: &mut Weights) {
    let (d, h) = (weights.dim, weights.hidden);
    assert_eq!(d, h, "the identity maps need dim == hidden");
    weights.kind_emb.fill(0.0);
    weights.w_hh.fill(0.0);
    weights.w_ih.fill(0.0);
    weights.proj.fill(0.0);
    weights.proj_b.fill(0.0);
    // Gates in the order input, forget, cell, output.
    let bias = [-1.0, 1.0, 0.0, 4.0];
    for (gate, b) in bias.iter().enumerate() {
        weights.b[gate * h..(gate + 1) * h].fill(*b);
    }
    for k in 0..h {
        weights.w_ih[(2 * h + k) * d + k] = 2.0;
        weights.proj[k * h + k] = 1.0;
    }
}

#[derive(Parser)]
#[command(about = "Load a release recd with recommendation and health requests")]
struct Args {
    /// Which scenarios to run.
    #[arg(long, value_enum, default_value_t = Which::Both)]
    scenario: Which,
    /// Measured seconds per phase.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Unmeasured seconds of load before each phase.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Concurrent keep-alive connections.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Phases in order: `healthz`, `recs`, `fresh` (recommendations with no
    /// ranking repeated).
    #[arg(long, value_delimiter = ',', default_value = "healthz,recs,fresh,healthz")]
    phases: Vec<Route>,
    /// Recommendations asked for per request.
    #[arg(long, default_value_t = 10)]
    n: usize,
    /// Items in the synthetic catalogue.
    #[arg(long, default_value_t = 1_000_000)]
    items: usize,
    /// Users (with `--events-per-user` events each) in the synthetic store.
    #[arg(long, default_value_t = 20_000)]
    synthetic_users: usize,
    #[arg(long, default_value_t = 20)]
    events_per_user: usize,
    /// How the synthetic catalogue's item embeddings are laid out.
    #[arg(long, value_enum, default_value_t = Layout::Aligned)]
    weights: Layout,
    /// Categories of the synthetic catalogue (`aligned` and `clustered`).
    #[arg(long, default_value_t = 5_000)]
    categories: usize,
    /// The release binary [default: $CARGO_TARGET_DIR/release/recd].
    #[arg(long)]
    recd: Option<PathBuf>,
    /// The evaluation data folder [default: ../shared/data beside the repo].
    #[arg(long)]
    data: Option<PathBuf>,
    /// Where prepared stores are kept between runs [default: $CARGO_TARGET_DIR/serve-bench].
    #[arg(long)]
    cache: Option<PathBuf>,
    /// Rebuild the prepared stores (import, training, synthetic catalogue).
    #[arg(long)]
    fresh: bool,
    /// Worker threads of the load generator's runtime.
    #[arg(long, default_value_t = 2)]
    client_threads: usize,
    /// Seconds to wait for `recd serve` to load its snapshot and answer.
    #[arg(long, default_value_t = 600)]
    startup_timeout: u64,
    /// Settings for the `recd serve` under test, as environment variables
    /// (`--server-env RECD_ANN__EF_SEARCH=100`; repeatable). The driver
    /// passes no other `RECD_*` variable of its own environment on.
    #[arg(long, value_name = "KEY=VALUE")]
    server_env: Vec<String>,
    /// Seconds to wait for the nearest-neighbour index of a large catalogue.
    #[arg(long, default_value_t = 1800)]
    index_timeout: u64,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, ValueEnum)]
enum Layout {
    /// Clustered items and a network whose query follows the categories
    /// the shopper browsed, as a trained network's does.
    Aligned,
    /// Clustered items and a random network: queries unrelated to the
    /// items.
    Clustered,
    /// Every embedding and every view drawn independently.
    Random,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Which {
    Beauty,
    Synthetic,
    Both,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, ValueEnum)]
enum Route {
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
    fn is_recs(self) -> bool {
        matches!(self, Route::Recs | Route::Fresh)
    }

    fn label(self) -> &'static str {
        match self {
            Route::Healthz => "GET /healthz",
            Route::Recs => "GET /v1/users/{id}/recommendations",
            Route::Fresh => "GET /v1/users/{id}/recommendations, no ranking repeated",
        }
    }
}

/// A store ready to serve, and who is in it.
struct Prepared {
    name: String,
    /// The cached SQLite file; each run serves a copy of it.
    db: PathBuf,
    users: Arc<Vec<String>>,
    items: usize,
    events: usize,
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
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| repo.join("target"), PathBuf::from);
    let recd = args.recd.clone().unwrap_or_else(|| target.join("release/recd"));
    ensure!(
        recd.is_file(),
        "no recd binary at {}: run `cargo build --release` first (or give --recd PATH)",
        recd.display()
    );
    warn_if_stale(&recd, &repo);
    let data = args.data.clone().unwrap_or_else(|| repo.join("../shared/data"));
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
    if matches!(args.scenario, Which::Beauty | Which::Both) {
        let prepared = prepare_beauty(&args, &recd, &data, &cache)?;
        rows.extend(bench_scenario(&args, &recd, &prepared).await?);
    }
    if matches!(args.scenario, Which::Synthetic | Which::Both) {
        let prepared = prepare_synthetic(&args, &cache).await?;
        rows.extend(bench_scenario(&args, &recd, &prepared).await?);
    }
    print_summary(&rows);
    Ok(())
}

// ---------------------------------------------------------------------------
// Preparation

/// The beauty store: `recd import` then a time-capped `recd train`, cached
/// while the events file is the same.
fn prepare_beauty(args: &Args, recd: &Path, data: &Path, cache: &Path) -> anyhow::Result<Prepared> {
    let events = data.join("amazon-beauty/events.csv");
    ensure!(
        events.is_file(),
        "no {} (give --data DIR: the folder holding amazon-beauty/)",
        events.display()
    );
    let events = events.canonicalize()?;
    let dir = cache.join("beauty");
    let db = dir.join("bench.db");
    let key = format!(
        "events={} bytes={} train_seconds=60",
        events.display(),
        std::fs::metadata(&events)?.len()
    );
    let (users, items, count) = csv_users_items(&events)?;
    if args.fresh || !is_ready(&dir, &key) {
        println!(
            "\n## preparing beauty in {} (import, then training capped at 60 s)",
            dir.display()
        );
        reset_dir(&dir)?;
        let url = sqlite_url(&db);
        let started = Instant::now();
        let import = recd_command(recd, &url)
            .arg("import")
            .arg("--events")
            .arg(&events)
            .output()?;
        ensure!(import.status.success(), "recd import failed:\n{}", output_text(&import));
        print!("{}", String::from_utf8_lossy(&import.stdout));
        let train = recd_command(recd, &url)
            .arg("train")
            .env("RECD_TRAIN__MAX_TRAIN_SECONDS", "60")
            .output()?;
        ensure!(train.status.success(), "recd train failed:\n{}", output_text(&train));
        print!("{}", String::from_utf8_lossy(&train.stdout));
        println!("prepared in {:.0} s", started.elapsed().as_secs_f64());
        mark_ready(&dir, &key)?;
    } else {
        println!("\n## beauty: cached store {} (--fresh rebuilds it)", db.display());
    }
    Ok(Prepared {
        name: "amazon-beauty".to_owned(),
        db,
        users: Arc::new(users),
        items,
        events: count,
    })
}

/// Distinct users (in file order), distinct items and rows of an events CSV.
fn csv_users_items(path: &Path) -> anyhow::Result<(Vec<String>, usize, usize)> {
    let mut reader = csv::Reader::from_path(path).with_context(|| format!("cannot read {}", path.display()))?;
    let (mut users, mut seen, mut items, mut rows) = (Vec::new(), HashSet::new(), HashSet::new(), 0);
    for record in reader.records() {
        let record = record?;
        let (user, item) = (
            record.get(0).context("no user_id")?,
            record.get(1).context("no item_id")?,
        );
        if seen.insert(user.to_owned()) {
            users.push(user.to_owned());
        }
        items.insert(item.to_owned());
        rows += 1;
    }
    Ok((users, items.len(), rows))
}

/// A synthetic store: `items` catalogue items, `synthetic_users` users with
/// `events_per_user` views each, and a seeded network snapshot of the served
/// shape (dim 64, hidden 64). Exact scoring costs the same whatever the
/// weights; a nearest-neighbour search does not, hence `--weights`.
async fn prepare_synthetic(args: &Args, cache: &Path) -> anyhow::Result<Prepared> {
    const SEED: u64 = 7;
    let (n, users, per_user) = (args.items, args.synthetic_users, args.events_per_user);
    ensure!(
        n > 0 && users > 0 && per_user > 0,
        "the synthetic store needs items, users and events"
    );
    let (layout, categories) = (args.weights, args.categories.clamp(1, n));
    let dir = cache.join(format!("synthetic-{n}-{layout:?}").to_lowercase());
    let db = dir.join("bench.db");
    let key = format!(
        "items={n} users={users} events_per_user={per_user} seed={SEED} dim=64 hidden=64 meta=2 catalogue=spaced \
         weights={layout:?} categories={categories}"
    );
    let user_ids: Vec<String> = (0..users).map(|u| format!("user{u:06}")).collect();
    if !args.fresh && is_ready(&dir, &key) {
        println!(
            "\n## synthetic {n} items: cached store {} (--fresh rebuilds it)",
            db.display()
        );
    } else {
        println!("\n## preparing synthetic {n} items in {}", dir.display());
        reset_dir(&dir)?;
        let started = Instant::now();
        let store = Store::open(&sqlite_url(&db), &StoreOptions::default()).await?;
        let item_ids: Vec<String> = (1..=n).map(|i| format!("item{i:07}")).collect();
        let now = chrono::Utc::now().timestamp_millis();

        // The whole catalogue, so that every snapshot item exists, written
        // as a shop's grows: in batches some time apart. (Stamped all at
        // once, every replica's catalogue refresh would read the whole
        // catalogue again every poll: it rereads the 10 s before the newest
        // change.)
        let batches = n.div_ceil(1000) as i64;
        for (k, chunk) in item_ids.chunks(1000).enumerate() {
            let stamp = now - (batches - k as i64) * 11_000;
            let items: Vec<Item> = chunk
                .iter()
                .map(|id| Item {
                    item_id: id.clone(),
                    title: None,
                    categories: Vec::new(),
                    price: None,
                    available: true,
                    attributes: serde_json::Map::new(),
                })
                .collect();
            store.put_items(&items, stamp).await?;
        }
        println!("  catalogue: {n} items ({:.0} s)", started.elapsed().as_secs_f64());

        // Views one minute apart over the last days, items skewed towards
        // the head of the catalogue as shop traffic is; with clustered
        // weights, item i is in category (i - 1) % categories and each
        // shopper browses within three categories.
        let mut rng = rand::rngs::StdRng::seed_from_u64(SEED);
        let per_category = n.div_ceil(categories);
        let skewed = |rng: &mut rand::rngs::StdRng, len: usize| {
            let r: f64 = rng.gen();
            ((r * r * r * len as f64) as usize).min(len - 1)
        };
        let base = now - (per_user as i64 + 1) * 60_000 - users as i64;
        let mut sequences: Vec<Vec<Step>> = Vec::with_capacity(users);
        let mut popularity = vec![0f32; n + 1];
        let mut newest = 0i64;
        let mut batch = Vec::with_capacity(10_000);
        for (u, user) in user_ids.iter().enumerate() {
            let mut seq = Vec::with_capacity(per_user);
            let browsed: Vec<usize> = (0..3).map(|_| skewed(&mut rng, categories)).collect();
            for j in 0..per_user {
                let index = match layout {
                    Layout::Random => skewed(&mut rng, n) + 1,
                    Layout::Aligned | Layout::Clustered => {
                        let c = browsed[rng.gen_range(0..browsed.len())];
                        (c + categories * skewed(&mut rng, per_category)).min(n - 1) + 1
                    }
                };
                let ts = base + j as i64 * 60_000 + u as i64;
                newest = newest.max(ts);
                popularity[index] += 1.0;
                seq.push(Step {
                    item: index as u32,
                    kind: 0,
                });
                batch.push(NewEvent {
                    event_id: None,
                    user_id: user.clone(),
                    item_id: item_ids[index - 1].clone(),
                    kind: EventType::View,
                    value: None,
                    ts,
                    session_id: None,
                    recommendation_id: None,
                });
            }
            sequences.push(seq);
            if batch.len() >= 10_000 {
                store.insert_events(&batch, now).await?;
                batch.clear();
            }
        }
        store.insert_events(&batch, now).await?;
        println!(
            "  events: {} ({:.0} s)",
            users * per_user,
            started.elapsed().as_secs_f64()
        );

        let neighbours = Neighbours::build(n, sequences.iter().map(Vec::as_slice), 100);
        let mut weights = random_weights(n, 64, 64, &mut rng);
        if layout != Layout::Random {
            cluster(&mut weights, categories, &mut rng);
        }
        if layout == Layout::Aligned {
            read_history(&mut weights);
        }
        let meta = SnapshotMeta {
            version: chrono::Utc::now().format("%Y%m%d%H%M%S%3f").to_string(),
            trained_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            cutoff_ms: newest,
            events: (users * per_user) as u64,
            users: users as u64,
            items: n as u64,
            metrics: serde_json::Value::Null,
            knn_weight: 0.0,
            kind: "network".to_owned(),
            last_seq: store.max_event_seq().await?,
        };
        let snapshot = ModelSnapshot::new(meta, item_ids, Some(weights), popularity, neighbours);
        let bytes = snapshot.to_bytes()?;
        let meta_json = serde_json::to_string(&snapshot.meta)?;
        let version = snapshot.meta.version.clone();
        drop(snapshot);
        store
            .save_snapshot(&version, chrono::Utc::now().timestamp_millis(), &meta_json, &bytes, 5)
            .await?;
        store.close().await;
        println!(
            "  snapshot {version}: {:.0} MB; prepared in {:.0} s",
            bytes.len() as f64 / 1e6,
            started.elapsed().as_secs_f64()
        );
        mark_ready(&dir, &key)?;
    }
    Ok(Prepared {
        name: format!("synthetic {}", thousands(n as f64)),
        db,
        users: Arc::new(user_ids),
        items: n,
        events: users * per_user,
    })
}

/// Weights of the served shape drawn from N(0, 0.1), as a trained model's
/// are in scale; padding row 0 is zero.
fn random_weights(items: usize, dim: usize, hidden: usize, rng: &mut impl Rng) -> Weights {
    let mut normal = |len: usize| -> Vec<f32> {
        (0..len)
            .map(|_| {
                // Box-Muller.
                let (u1, u2): (f32, f32) = (rng.gen::<f32>().max(1e-7), rng.gen());
                0.1 * (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
            })
            .collect()
    };
    let mut item_emb = normal((items + 1) * dim);
    item_emb[..dim].fill(0.0);
    let mut item_bias = normal(items + 1);
    item_bias[0] = 0.0;
    Weights {
        dim,
        hidden,
        item_emb,
        kind_emb: normal(KINDS * dim),
        w_ih: normal(4 * hidden * dim),
        w_hh: normal(4 * hidden * hidden),
        b: normal(4 * hidden),
        proj: normal(dim * hidden),
        proj_b: normal(dim),
        item_bias,
    }
}

fn is_ready(dir: &Path, key: &str) -> bool {
    dir.join("bench.db").is_file() && std::fs::read_to_string(dir.join("ready")).is_ok_and(|k| k == key)
}

fn mark_ready(dir: &Path, key: &str) -> anyhow::Result<()> {
    Ok(std::fs::write(dir.join("ready"), key)?)
}

fn reset_dir(dir: &Path) -> anyhow::Result<()> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("cannot remove {}", dir.display()))?;
    }
    Ok(std::fs::create_dir_all(dir)?)
}

fn sqlite_url(db: &Path) -> String {
    format!("sqlite://{}", db.display())
}

/// `recd` with the bench's settings and none inherited from the caller.
fn recd_command(recd: &Path, url: &str) -> Command {
    let mut cmd = Command::new(recd);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("RECD_") {
            cmd.env_remove(key);
        }
    }
    cmd.env("RECD_DATABASE_URL", url)
        .env("RECD_TRAIN_INTERVAL", "0")
        .env("RECD_LOG_FORMAT", "text")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null());
    cmd
}

fn output_text(output: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

// ---------------------------------------------------------------------------
// One scenario: a server, its phases

/// The server child; killed when dropped, so an error never leaves it running.
struct Server {
    child: Child,
    log: PathBuf,
}

impl Server {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// SIGTERM, then up to 15 s for a graceful stop.
    fn stop(mut self) -> anyhow::Result<()> {
        let _ = Command::new("kill").args(["-TERM", &self.pid().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                if !status.success() {
                    println!(
                        "!!! recd serve exited with {status}; its log ends:\n{}",
                        self.log_tail()
                    );
                }
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        println!("!!! recd serve did not stop within 15 s of SIGTERM; killing it");
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One measured phase of one scenario.
struct Row {
    scenario: String,
    route: Route,
    stats: PhaseStats,
    rss_kb: u64,
    hwm_kb: u64,
}

async fn bench_scenario(args: &Args, recd: &Path, prepared: &Prepared) -> anyhow::Result<Vec<Row>> {
    println!(
        "\n## {}: {} items, {} users, {} events",
        prepared.name,
        thousands(prepared.items as f64),
        thousands(prepared.users.len() as f64),
        thousands(prepared.events as f64)
    );
    // Each run serves a fresh copy: impressions written by one run do not
    // pile up in the cache.
    let run_dir = tempfile::tempdir()?;
    let db = run_dir.path().join("bench.db");
    std::fs::copy(&prepared.db, &db).with_context(|| format!("cannot copy {}", prepared.db.display()))?;
    for suffix in ["-wal", "-shm"] {
        let side = PathBuf::from(format!("{}{suffix}", prepared.db.display()));
        if side.exists() {
            std::fs::copy(&side, format!("{}{suffix}", db.display()))?;
        }
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let log = run_dir.path().join("recd.log");
    let log_file = std::fs::File::create(&log)?;
    let started = Instant::now();
    let mut command = recd_command(recd, &sqlite_url(&db));
    for setting in &args.server_env {
        let (key, value) = setting
            .split_once('=')
            .with_context(|| format!("--server-env {setting:?}: expected KEY=VALUE"))?;
        command.env(key, value);
    }
    let child = command
        .arg("serve")
        .env("RECD_LISTEN", addr.to_string())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .spawn()
        .context("cannot start recd serve")?;
    let mut server = Server { child, log };
    wait_healthy(&mut server, addr, Duration::from_secs(args.startup_timeout)).await?;
    let (rss, hwm) = rss_kb(server.pid())?;
    println!(
        "recd serve (pid {}) answered after {:.1} s; RSS {} (peak {}) before load",
        server.pid(),
        started.elapsed().as_secs_f64(),
        mb(rss),
        mb(hwm)
    );
    wait_for_index(&mut server, addr, Duration::from_secs(args.index_timeout)).await?;
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
        if let Some(status) = server.child.try_wait()? {
            bail!(
                "recd serve exited ({status}) during the load; its log ends:\n{}",
                server.log_tail()
            );
        }
        let (rss, hwm) = rss_kb(server.pid())?;
        print_phase(&prepared.name, route, &stats, server_cores, own_cores, rss, hwm);
        if route.is_recs() {
            let after = user_states(addr).await?;
            let made: Vec<u64> = after.iter().zip(&states_before).map(|(a, b)| a - b).collect();
            let total = made.iter().sum::<u64>().max(1) as f64;
            let parts: Vec<String> = STATE_SOURCES
                .iter()
                .zip(&made)
                .map(|(from, n)| format!("{} {from} ({:.1}%)", thousands(*n as f64), 100.0 * *n as f64 / total))
                .collect();
            println!(
                "    rankings made (warm-up included), by where the user's state came from: {}; the other answers repeated a ranking",
                parts.join(", ")
            );
        }
        rows.push(Row {
            scenario: prepared.name.clone(),
            route,
            stats,
            rss_kb: rss,
            hwm_kb: hwm,
        });
    }
    let log = std::fs::read_to_string(&server.log).unwrap_or_default();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .take(10)
        .collect();
    if !warnings.is_empty() {
        println!("!!! recd serve logged warnings or errors (first {}):", warnings.len());
        for line in warnings {
            println!("    {line}");
        }
    }
    server.stop()?;
    Ok(rows)
}

/// Polls `/healthz` until it answers 200; fails if the child exits first.
async fn wait_healthy(server: &mut Server, addr: SocketAddr, timeout: Duration) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let url = format!("http://{addr}/healthz");
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = server.child.try_wait()? {
            bail!(
                "recd serve exited ({status}) before answering; its log ends:\n{}",
                server.log_tail()
            );
        }
        if let Ok(reply) = client.get(&url).timeout(Duration::from_secs(2)).send().await {
            if reply.status().is_success() {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!(
                "recd serve did not answer /healthz within {timeout:?}; its log ends:\n{}",
                server.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits while the served model's nearest-neighbour index is building
/// (large catalogues) and while the recently active users' states are made:
/// the load measures the service as it runs afterwards.
async fn wait_for_index(server: &mut Server, addr: SocketAddr, timeout: Duration) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let url = format!("http://{addr}/v1/model");
    let started = Instant::now();
    loop {
        if let Some(status) = server.child.try_wait()? {
            bail!("recd serve exited ({status}); its log ends:\n{}", server.log_tail());
        }
        let body: serde_json::Value = client.get(&url).send().await?.json().await?;
        let (index, warm) = (&body["index"], &body["warm"]);
        if index["state"] != "building" && warm["state"] != "warming" {
            println!(
                "ranking: {}; user states: {} (waited {:.0} s)",
                serde_json::to_string(index)?,
                serde_json::to_string(warm)?,
                started.elapsed().as_secs_f64()
            );
            return Ok(());
        }
        if started.elapsed() > timeout {
            bail!("the index was still building or the states warming after {timeout:?}: {body}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Where a ranking's user state came from, as `recd_user_states_total`
/// labels it: cached (or warmed), a cached one advanced by new events, or
/// made from the user's events.
const STATE_SOURCES: [&str; 3] = ["cache", "advanced", "events"];

/// The server's `recd_user_states_total` for each of `STATE_SOURCES`.
async fn user_states(addr: SocketAddr) -> anyhow::Result<Vec<u64>> {
    let text = reqwest::get(format!("http://{addr}/metrics")).await?.text().await?;
    let count = |from: &str| {
        let prefix = format!("recd_user_states_total{{from=\"{from}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map_or(0, |v| v as u64)
    };
    Ok(STATE_SOURCES.iter().map(|from| count(from)).collect())
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

// ---------------------------------------------------------------------------
// Load

/// What one phase measured, all connections together.
#[derive(Default)]
struct PhaseStats {
    /// Measured seconds.
    elapsed: f64,
    /// Requests started in the measured window and answered 2xx.
    ok: u64,
    /// Answers by non-2xx status.
    statuses: BTreeMap<u16, u64>,
    /// Requests that got no answer (connection refused, reset, ...).
    transport_errors: u64,
    /// Recommendation answers by their `strategy`.
    strategies: BTreeMap<String, u64>,
    /// Sampled recommendation answers whose JSON was not as documented.
    bad_shape: u64,
    /// The first few failures, verbatim.
    examples: Vec<String>,
    /// Latency of every measured request (2xx or not), microseconds, sorted.
    latencies_us: Vec<u32>,
}

impl PhaseStats {
    fn errors(&self) -> u64 {
        self.statuses.values().sum::<u64>() + self.transport_errors + self.bad_shape
    }

    /// 2xx answers per second: failures are counted apart, never as throughput.
    fn rate(&self) -> f64 {
        self.ok as f64 / self.elapsed
    }

    /// Nearest-rank percentile, milliseconds.
    fn percentile(&self, p: f64) -> f64 {
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

async fn connect(addr: SocketAddr) -> anyhow::Result<Sender> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

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
            None => match connect(addr).await {
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

// ---------------------------------------------------------------------------
// Reports

fn print_phase(scenario: &str, route: Route, s: &PhaseStats, server_cores: f64, own_cores: f64, rss: u64, hwm: u64) {
    println!(
        "\n[{scenario}] {}: {} req/s (2xx) over {:.0} s; latency p50 {:.2} ms, p90 {:.2}, p99 {:.2}, max {:.2}",
        route.label(),
        thousands(s.rate()),
        s.elapsed,
        s.percentile(50.0),
        s.percentile(90.0),
        s.percentile(99.0),
        s.percentile(100.0)
    );
    println!(
        "    CPU: server {server_cores:.2} cores, load generator {own_cores:.2} cores; server RSS {} (peak {})",
        mb(rss),
        mb(hwm)
    );
    if route.is_recs() && s.ok > 0 {
        let personalized = s.strategies.get("personalized").copied().unwrap_or(0);
        let by: Vec<String> = s.strategies.iter().map(|(k, v)| format!("{k} {v}")).collect();
        println!(
            "    strategy: {:.1}% personalized ({})",
            100.0 * personalized as f64 / s.ok as f64,
            by.join(", ")
        );
    }
    if s.errors() > 0 {
        let by: Vec<String> = s.statuses.iter().map(|(k, v)| format!("{v} x {k}")).collect();
        println!(
            "    !!! {} ERRORS: non-2xx [{}], transport {}, bad JSON shape {} (sampled)",
            s.errors(),
            by.join(", "),
            s.transport_errors,
            s.bad_shape
        );
        for e in &s.examples {
            println!("    !!! {e}");
        }
    } else {
        println!("    errors: none");
    }
}

fn print_summary(rows: &[Row]) {
    println!("\n## Summary\n");
    println!("| scenario | route | req/s | p50 ms | p90 ms | p99 ms | max ms | errors | RSS MB (peak) |");
    println!("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for r in rows {
        let s = &r.stats;
        println!(
            "| {} | {} | {} | {:.2} | {:.2} | {:.2} | {:.1} | {} | {:.0} ({:.0}) |",
            r.scenario,
            match r.route {
                Route::Healthz => "`/healthz`",
                Route::Recs => "`/v1/users/{id}/recommendations?n=10`",
                Route::Fresh => "`/v1/users/{id}/recommendations?n=10&exclude_items=(new)`",
            },
            thousands(s.rate()),
            s.percentile(50.0),
            s.percentile(90.0),
            s.percentile(99.0),
            s.percentile(100.0),
            s.errors(),
            r.rss_kb as f64 / 1024.0,
            r.hwm_kb as f64 / 1024.0
        );
    }
    println!();
    let mut scenarios: Vec<&str> = rows.iter().map(|r| r.scenario.as_str()).collect();
    scenarios.dedup();
    for scenario in scenarios {
        let Some(health) = rows
            .iter()
            .find(|r| r.scenario == scenario && r.route == Route::Healthz)
        else {
            continue;
        };
        for recs in rows.iter().filter(|r| r.scenario == scenario && r.route.is_recs()) {
            let ratio = recs.stats.rate() / health.stats.rate();
            let p99 = recs.stats.percentile(99.0);
            let p99_target = if scenario.starts_with("synthetic") { 20.0 } else { 10.0 };
            let clean = recs.stats.errors() == 0;
            let verdict = |met: bool| match (met, clean) {
                (true, true) => "met",
                (true, false) => "NOT met: there were errors",
                (false, _) => "NOT met",
            };
            println!(
                "{scenario}, {}: at {:.1}% of the /healthz rate (target >= 20%: {}); p99 {p99:.2} ms (target < {p99_target} ms: {}); {} errors",
                match recs.route {
                    Route::Fresh => "recommendations with no ranking repeated",
                    _ => "recommendations",
                },
                100.0 * ratio,
                verdict(ratio >= 0.2),
                verdict(p99 < p99_target),
                recs.stats.errors()
            );
        }
    }
    println!(
        "\nLatency is measured at the client over a closed loop of keep-alive connections, so at saturation it is mostly \
         queueing (Little's law: connections / rate). The beauty model's training was capped at 60 s, which makes it \
         less accurate but not cheaper to serve: its shape (dim 64, hidden 64) is the default's."
    );
}

// ---------------------------------------------------------------------------
// /proc and the machine

/// `VmRSS` and `VmHWM` of a process, kB.
fn rss_kb(pid: u32) -> anyhow::Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> anyhow::Result<u64> {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .with_context(|| format!("no {name} in /proc/{pid}/status"))?;
        Ok(line.split_whitespace().nth(1).context("no value")?.parse()?)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// User + system CPU seconds of a process (at Linux's usual 100 ticks/s).
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name may hold spaces; the fields after it do not.
    let rest = &stat[stat.rfind(')').context("odd /proc stat")? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    Ok(ticks as f64 / 100.0)
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    format!("{cpus} cores available ({model}), shared by the server and the load generator")
}

/// A compile beside the load takes the cores the figures are about.
fn warn_if_compiling() {
    let busy = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| std::fs::read_to_string(entry.path().join("comm")).ok())
        .filter(|comm| comm.trim() == "rustc")
        .count();
    if busy > 0 {
        println!("!!! {busy} rustc process(es) running: the figures of this phase are not meaningful");
    }
}

/// A binary older than the sources measures old code.
fn warn_if_stale(recd: &Path, repo: &Path) {
    fn newest(dir: &Path) -> Option<std::time::SystemTime> {
        std::fs::read_dir(dir)
            .ok()?
            .flatten()
            .filter_map(|e| {
                let meta = e.metadata().ok()?;
                if meta.is_dir() {
                    newest(&e.path())
                } else {
                    meta.modified().ok()
                }
            })
            .max()
    }
    let built = std::fs::metadata(recd).and_then(|m| m.modified()).ok();
    let sources = [repo.join("src"), repo.join("migrations"), repo.join("Cargo.toml")]
        .iter()
        .filter_map(|p| {
            if p.is_dir() {
                newest(p)
            } else {
                std::fs::metadata(p).and_then(|m| m.modified()).ok()
            }
        })
        .max();
    if let (Some(built), Some(sources)) = (built, sources) {
        if sources > built {
            println!(
                "!!! {} is older than the sources in {}: run `cargo build --release` first",
                recd.display(),
                repo.display()
            );
        }
    }
}

fn mb(kb: u64) -> String {
    format!("{:.0} MB", kb as f64 / 1024.0)
}

/// 12345.6 -> "12,346".
fn thousands(x: f64) -> String {
    let digits = format!("{:.0}", x);
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 && c != '-' {
            out.push(',');
        }
        out.push(c);
    }
    out
}
