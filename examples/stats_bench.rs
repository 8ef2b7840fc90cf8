//! The dashboard endpoints' latency on a large PostgreSQL store (issue 17:
//! each within 50 ms on a store of 50 million events).
//!
//! A fresh database (`RECD_BENCH_POSTGRES_URL`, default
//! `postgres://postgres@127.0.0.1:5432/recd_stats_bench`, dropped first)
//! gets recd's schema, `EVENTS` events of `USERS` users on `ITEMS` items
//! spread evenly over the last `DAYS` days (written by SQL, in month
//! partitions), and the dashboard's counts of them as ingest keeps them
//! (per minute and kind for the last 8 days, and per hour through the
//! tables' triggers; per item and day; answers and clicks per minute for
//! three model versions), then ANALYZE. recd's API is
//! served in this process without its background tasks (so that nothing
//! else runs while it is timed); the overview is counted once (timed too),
//! and each endpoint is asked `REQUESTS` times in turn over one keep-alive
//! connection: p50, p99 and max in ms. The figures do not depend on the
//! events but on the minutes and days kept.
//!
//!     cargo run --release --example stats_bench -- [EVENTS] [DAYS] [USERS] [ITEMS] [REQUESTS]
//!
//! Defaults: 5,000,000 events over 7 days, 500,000 users, 20,000 items,
//! 200 requests per endpoint. The database is dropped at the end.
//!
//! With `RECD_BENCH_REUSE=1` it loads nothing and drops nothing: the
//! database at `RECD_BENCH_POSTGRES_URL` is measured as it is (for example
//! a store kept by `scale_bench --keep`), its counts made afresh from its
//! events; `RECD_BENCH_ITEM` names the item whose activity is asked for
//! (default `item-1`).

use std::time::Instant;

use recd::app::App;
use recd::config::Settings;
use recd::store::{Db, Store, StoreOptions};

const DAY_MS: i64 = 86_400_000;

fn arg(n: usize, default: i64) -> i64 {
    std::env::args().nth(n).and_then(|a| a.parse().ok()).unwrap_or(default)
}

/// Loads the shop by SQL, a million events per statement.
async fn load(store: &Store, events: i64, days: i64, users: i64, items: i64) -> anyhow::Result<()> {
    let Db::Postgres(pool) = store.db() else {
        anyhow::bail!("the benchmark needs PostgreSQL")
    };
    let now = chrono::Utc::now().timestamp_millis();
    let span = days * DAY_MS;
    sqlx::query(
        "SELECT recd_event_partition(m) FROM generate_series($1::int8, $2::int8 + 2678400000, 2419200000) AS m",
    )
    .bind(now - span)
    .bind(now)
    .execute(pool)
    .await?;
    sqlx::query(
        "INSERT INTO items (item_id, title, updated_at) SELECT 'item-' || k, 'Item ' || k, 0
         FROM generate_series(0, $1 - 1) AS k",
    )
    .bind(items)
    .execute(pool)
    .await?;
    let chunk = 1_000_000;
    let mut from = 0;
    while from < events {
        let to = (from + chunk).min(events);
        let started = Instant::now();
        // Views mostly; items skewed towards low numbers; evenly in time.
        sqlx::query(
            "INSERT INTO events (event_id, user_id, item_id, kind, value, ts, session_id, recommendation_id, received_at)
             SELECT NULL, 'user-' || (g * 7919 % $3), 'item-' || floor(pow(random(), 2) * $4)::int,
                    CASE WHEN g % 10 < 7 THEN 0 ELSE g % 6 END, NULL,
                    $5 - $6 + (g * $6 / $7), NULL, NULL, $5
             FROM generate_series($1, $2 - 1) AS g",
        )
        .bind(from)
        .bind(to)
        .bind(users)
        .bind(items)
        .bind(now)
        .bind(span)
        .bind(events)
        .execute(pool)
        .await?;
        println!(
            "  events {from}..{to} loaded in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        from = to;
    }
    Ok(())
}

/// The counts ingest would have kept of the store's events (migration
/// 0009's backfill: minutes of the last 8 days, every item day), answers
/// and clicks per minute for three model versions, then ANALYZE.
async fn make_counts(store: &Store) -> anyhow::Result<()> {
    let Db::Postgres(pool) = store.db() else {
        anyhow::bail!("the benchmark needs PostgreSQL")
    };
    let now = chrono::Utc::now().timestamp_millis();
    let started = Instant::now();
    // What ingest keeps (migration 0009's backfill, the same counts).
    sqlx::query(
        "INSERT INTO event_minutes (minute_ms, kind, n)
         SELECT ts - ts % 60000, kind, COUNT(*) FROM events WHERE ts >= $1 GROUP BY 1, 2",
    )
    .bind(now - 8 * DAY_MS)
    .execute(pool)
    .await?;
    // The per-item counts as pending rows, a row per day, folded as the
    // background folds them.
    sqlx::query(
        "INSERT INTO item_days_pending (items, days, kinds, ns)
         SELECT array_agg(item_id), array_agg(day_ms), array_agg(kind), array_agg(n)
         FROM (SELECT item_id, ts - ts % 86400000 AS day_ms, kind, COUNT(*) AS n FROM events GROUP BY 1, 2, 3) AS c
         GROUP BY day_ms",
    )
    .execute(pool)
    .await?;
    store.fold_item_days(std::time::Duration::ZERO).await?;
    sqlx::query(
        "INSERT INTO recommendation_minutes (minute_ms, version, impressions, clicks)
         SELECT m, v, 100, 3 FROM generate_series($1::int8, $2::int8, 60000) AS m,
           (VALUES (''), ('20261201000000000'), ('20261202000000000')) AS versions(v)",
    )
    .bind((now - 8 * DAY_MS) / 60_000 * 60_000)
    .bind(now / 60_000 * 60_000)
    .execute(pool)
    .await?;
    sqlx::query("ANALYZE").execute(pool).await?;
    println!("  counts made and analysed in {:.1} s", started.elapsed().as_secs_f64());
    for table in [
        "event_minutes",
        "event_hours",
        "item_blocks",
        "recommendation_minutes",
        "recommendation_hours",
    ] {
        let n: i64 = sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {table}"))
            .fetch_one(pool)
            .await?;
        println!("  {table}: {n} rows");
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let events = arg(1, 5_000_000);
    let days = arg(2, 7);
    let users = arg(3, 500_000);
    let items = arg(4, 20_000);
    let requests = arg(5, 200) as usize;
    let url = std::env::var("RECD_BENCH_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/recd_stats_bench".to_owned());
    let reuse = std::env::var("RECD_BENCH_REUSE").is_ok_and(|v| v == "1");
    let item = std::env::var("RECD_BENCH_ITEM").unwrap_or_else(|_| "item-1".to_owned());
    if reuse {
        println!("stats_bench: the store at {url} as it is");
    } else {
        println!("stats_bench: {events} events over {days} days, {users} users, {items} items");
    }

    let (base, name) = url.rsplit_once('/').expect("a database URL");
    let admin = Store::open(&format!("{base}/postgres"), &StoreOptions::default()).await?;
    if let (Db::Postgres(pool), false) = (admin.db(), reuse) {
        sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
            .execute(pool)
            .await?;
    }
    let store = Store::open(&url, &StoreOptions::default()).await?;
    if reuse {
        let Db::Postgres(pool) = store.db() else {
            anyhow::bail!("the benchmark needs PostgreSQL")
        };
        let (events, first, last): (i64, Option<i64>, Option<i64>) =
            sqlx::query_as("SELECT COUNT(*), MIN(ts), MAX(ts) FROM events")
                .fetch_one(pool)
                .await?;
        println!(
            "the store's {events} events, from {} to {}",
            first.map(recd::clock::format_timestamp).unwrap_or_default(),
            last.map(recd::clock::format_timestamp).unwrap_or_default()
        );
        for table in ["event_minutes", "item_blocks", "recommendation_minutes"] {
            sqlx::query(&format!("TRUNCATE {table}")).execute(pool).await?;
        }
        sqlx::query("TRUNCATE event_hours, recommendation_hours")
            .execute(pool)
            .await?;
    } else {
        let started = Instant::now();
        load(&store, events, days, users, items).await?;
        println!("events loaded in {:.0} s", started.elapsed().as_secs_f64());
    }
    make_counts(&store).await?;

    let mut settings = Settings::with_database(&url)?;
    settings.train_interval = None;
    let app = App::open(store.clone(), settings).await?;
    let started = Instant::now();
    let overview = app.refresh_overview().await?;
    println!(
        "overview counted (background) in {:.2} s: {:?}",
        started.elapsed().as_secs_f64(),
        overview
    );
    app.heartbeat().await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let router = recd::http::router(app.clone());
    let server = tokio::spawn(async move { axum::serve(listener, router).await });

    let client = reqwest::Client::new();
    println!("\n| endpoint | p50 ms | p99 ms | max ms |\n| --- | ---: | ---: | ---: |");
    let paths = [
        "/v1/stats/events?range=hour",
        "/v1/stats/events?range=day",
        "/v1/stats/events?range=week",
        "/v1/stats/recommendations?range=hour",
        "/v1/stats/recommendations?range=day",
        "/v1/stats/recommendations?range=week",
        "/v1/stats/overview",
        "/v1/replicas",
        &format!("/v1/items/{item}/activity?days=30"),
        &format!("/v1/items/{item}/activity?days=365"),
    ]
    .map(|p| p.to_string());
    for path in &paths {
        let mut ms = Vec::with_capacity(requests);
        for _ in 0..requests {
            let started = Instant::now();
            let reply = client.get(format!("{base}{path}")).send().await?;
            anyhow::ensure!(reply.status() == 200, "{path}: {}", reply.status());
            reply.bytes().await?;
            ms.push(started.elapsed().as_secs_f64() * 1000.0);
        }
        ms.sort_by(f64::total_cmp);
        let at = |q: f64| ms[((ms.len() as f64 * q) as usize).min(ms.len() - 1)];
        println!(
            "| `{path}` | {:.2} | {:.2} | {:.2} |",
            at(0.5),
            at(0.99),
            ms[ms.len() - 1]
        );
    }
    server.abort();
    store.close().await;
    if let (Db::Postgres(pool), false) = (admin.db(), reuse) {
        sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
            .execute(pool)
            .await?;
    }
    Ok(())
}
