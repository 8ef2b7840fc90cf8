//! Recall and speed of the nearest-neighbour index against scoring every
//! item, on the newest snapshot of a SQLite store and its users' own events:
//! for a sample of users, the top 10 that serving gives through the index
//! (`recd::recommend::approximate_top_n`: candidates, exact rescoring with
//! co-occurrence, seen items left out) against the exact top 10.
//!
//!     cargo run --release --example ann_recall -- --database-url sqlite://data/recd.db [--ef 100,200,400] [--candidates 200] [--vectors f16]
//!
//! A store made by `recd import` + `recd train`, or one that `serve_bench`
//! prepared (`target/release/serve-bench/*/bench.db`).

use std::collections::HashSet;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use clap::Parser;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use recd::model::ann::{AnnIndex, AnnSettings, Vectors};
use recd::model::{top_n, ModelSnapshot, Step};
use recd::recommend::approximate_top_n;
use recd::store::{Store, StoreOptions};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
struct Args {
    /// A SQLite store with a snapshot and the events it learned from.
    #[arg(long)]
    database_url: String,
    /// Users sampled as queries.
    #[arg(long, default_value_t = 500)]
    queries: usize,
    /// Search breadths to measure.
    #[arg(long, value_delimiter = ',', default_value = "100,200,400,800")]
    ef: Vec<usize>,
    /// Candidates per answer.
    #[arg(long, default_value_t = 200)]
    candidates: usize,
    #[arg(long, default_value_t = 16)]
    connectivity: usize,
    #[arg(long, default_value_t = 100)]
    ef_construction: usize,
    /// The newest this many events of a user feed the model.
    #[arg(long, default_value_t = 50)]
    max_len: usize,
    /// Vectors in the index: f32 or f16.
    #[arg(long, default_value = "f32")]
    vectors: String,
    /// Rank by the network's scores alone (no co-occurrence), to see the
    /// index's own recall.
    #[arg(long)]
    network_only: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Runtime::new()?;
    let (mut model, histories) = runtime.block_on(load(&args))?;
    if args.network_only {
        model.meta.knn_weight = 0.0;
    }
    let weights = model
        .weights
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("the snapshot has no network"))?;
    println!(
        "snapshot {}: {} items, d = {}, co-occurrence weight {}; {} users as queries",
        model.meta.version,
        model.items(),
        weights.dim,
        model.meta.knn_weight,
        histories.len()
    );

    // The exact answers, and what they cost.
    let mut exact = Vec::with_capacity(histories.len());
    let mut exact_ms = Vec::with_capacity(histories.len());
    let mut scores = Vec::new();
    for (history, seen) in &histories {
        let started = Instant::now();
        let state = model.user_state(history, args.max_len);
        model.score_user(history, state.as_ref(), &mut scores);
        exact.push(top_n(&scores, 10, |i| seen.contains(&i)));
        exact_ms.push(started.elapsed().as_secs_f64() * 1e3);
    }

    let settings = AnnSettings {
        min_items: 1,
        candidates: args.candidates,
        connectivity: args.connectivity,
        ef_construction: args.ef_construction,
        ef_search: args.candidates,
        build_threads: 0,
        vectors: match args.vectors.as_str() {
            "f32" => Vectors::F32,
            "f16" => Vectors::F16,
            other => anyhow::bail!("--vectors: f32 or f16, not {other:?}"),
        },
    };
    let index = AnnIndex::build(weights, &settings, &AtomicBool::new(false))?
        .ok_or_else(|| anyhow::anyhow!("the build was cancelled"))?;
    println!(
        "index: {:.1} s to build ({} threads), {} MiB; connectivity {}, ef_construction {}, {} candidates, {} vectors",
        index.build_seconds,
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        index.memory_bytes() >> 20,
        args.connectivity,
        args.ef_construction,
        args.candidates,
        args.vectors
    );
    println!("\n| search | recall@10 | p50 ms | p99 ms |");
    println!("| --- | ---: | ---: | ---: |");
    println!(
        "| exact (every item) | 1.000 | {:.3} | {:.3} |",
        percentile(&mut exact_ms, 0.5),
        percentile(&mut exact_ms, 0.99)
    );
    for &ef in &args.ef {
        index.set_ef_search(ef.max(args.candidates));
        let (mut found, mut wanted) = (0usize, 0usize);
        let mut ms = Vec::with_capacity(histories.len());
        for ((history, seen), exact) in histories.iter().zip(&exact) {
            let started = Instant::now();
            let state = model.user_state(history, args.max_len).expect("a network");
            let approximate =
                approximate_top_n(&model, &index, history, &state, 10, |i| seen.contains(&i)).unwrap_or_default();
            ms.push(started.elapsed().as_secs_f64() * 1e3);
            let got: HashSet<u32> = approximate.iter().map(|(i, _)| *i).collect();
            wanted += exact.len();
            found += exact.iter().filter(|(i, _)| got.contains(i)).count();
        }
        println!(
            "| ef {} | {:.3} | {:.3} | {:.3} |",
            ef.max(args.candidates),
            found as f64 / wanted.max(1) as f64,
            percentile(&mut ms, 0.5),
            percentile(&mut ms, 0.99)
        );
    }
    Ok(())
}

/// The newest snapshot, and sampled users' histories (oldest first, as the
/// model reads them) with the items they have seen.
async fn load(args: &Args) -> anyhow::Result<(ModelSnapshot, Vec<(Vec<Step>, HashSet<u32>)>)> {
    anyhow::ensure!(args.database_url.starts_with("sqlite:"), "a SQLite store is needed");
    let store = Store::open(&args.database_url, &StoreOptions::default()).await?;
    let (_, bytes) = store
        .latest_snapshot()
        .await?
        .ok_or_else(|| anyhow::anyhow!("the store has no snapshot; run `recd train` first"))?;
    let model = ModelSnapshot::from_bytes(&bytes)?;
    let pool = sqlx::SqlitePool::connect(&args.database_url).await?;
    let mut users: Vec<String> = sqlx::query_scalar("SELECT DISTINCT user_id FROM events")
        .fetch_all(&pool)
        .await?;
    users.shuffle(&mut rand::rngs::StdRng::seed_from_u64(1));
    let mut histories = Vec::new();
    for user in users {
        if histories.len() == args.queries {
            break;
        }
        let events = store.user_events(&user, recd::recommend::HISTORY_LIMIT).await?;
        let history = recd::recommend::history_of(&model, &events);
        if history.is_empty() {
            continue;
        }
        let seen = history.iter().map(|s| s.item).collect();
        let newest = history[history.len().saturating_sub(args.max_len)..].to_vec();
        histories.push((newest, seen));
    }
    store.close().await;
    Ok((model, histories))
}

fn percentile(values: &mut [f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    values[((values.len() - 1) as f64 * p).round() as usize]
}
