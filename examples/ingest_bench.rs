//! Ingest load driver: POSTs batches of 500 events over HTTP with several
//! connections to a recd on SQLite and on Postgres, and, in the same run,
//! measures what Postgres alone does with the same rows: recd's set-based
//! insert into its own events table driven by `pgbench`, and a bare `COPY`
//! into an unindexed table. Prints events/s for each.
//!
//!     cargo run --release --example ingest_bench -- [EVENTS] [CONNECTIONS] [all|postgres|sqlite]
//!
//! Postgres: RECD_BENCH_POSTGRES_URL (default postgres://postgres@127.0.0.1:5432/recd_bench).
//! recd's own settings come from RECD_* variables as for `recd serve`
//! (e.g. RECD_OVERVIEW_REFRESH=1h), except the database and the listener.

use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use recd::app::App;
use recd::config::Settings;
use recd::store::{Db, Store, StoreOptions};
use serde_json::{json, Value};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const BATCH: usize = 500;

/// The events to post: the demo shop's (spread over its days, like an
/// import of history) or, with `RECD_BENCH_LIVE=1`, the same events stamped
/// within the last ten minutes, as collectors post a shop's live traffic.
fn bodies(events: usize, run: &str) -> Vec<String> {
    let live = std::env::var("RECD_BENCH_LIVE").is_ok_and(|v| v == "1");
    let now = chrono::Utc::now().timestamp_millis();
    let shop = recd::demo::generate(
        recd::demo::DemoSize {
            items: 5000,
            users: events / 15 + 1,
            sessions: 3,
            seed: 1,
        },
        chrono::Utc::now().timestamp_millis(),
    );
    let rows = shop.events.iter().cycle().take(events).enumerate().map(|(i, e)| {
        json!({"event_id": format!("{run}-{i}"), "user_id": e.user_id, "item_id": e.item_id,
               "type": e.kind, "value": e.value, "session_id": e.session_id,
               "timestamp": recd::clock::format_timestamp(if live { now - (i as i64 * 7919) % 600_000 } else { e.ts })})
    });
    // One batch at a time, so that only the bodies are held.
    let mut bodies = Vec::with_capacity(events.div_ceil(BATCH));
    let mut batch = Vec::with_capacity(BATCH);
    for row in rows {
        batch.push(row);
        if batch.len() == BATCH {
            bodies.push(json!({"events": batch}).to_string());
            batch.clear();
        }
    }
    if !batch.is_empty() {
        bodies.push(json!({"events": batch}).to_string());
    }
    bodies
}

/// Serves recd on `url` in this process and posts every body; events/s
/// (counting the time to fold what the dashboard's counts left pending).
async fn recd_ingest(url: &str, bodies: Arc<Vec<String>>, connections: usize) -> anyhow::Result<f64> {
    // recd's settings as `recd serve` takes them (RECD_* variables apply),
    // on the bench's store.
    let mut settings = Settings::load(None)?;
    settings.database_url = recd::config::DatabaseUrl(url.to_owned());
    settings.listen = "127.0.0.1:0".parse()?;
    settings.train_interval = None;
    settings.database_max_connections = connections as u32 + 2;
    let store = Store::open(url, &recd::server::store_options(&settings)).await?;
    let listener = tokio::net::TcpListener::bind(settings.listen).await?;
    let base = format!("http://{}/v1/events", listener.local_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let app = App::open(store, settings).await?;
    let server = tokio::spawn(recd::server::serve(listener, app.clone(), async {
        let _ = stopped.await;
    }));

    let started = Instant::now();
    let cpu_before = cpu_seconds();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let (bodies, next, base) = (bodies.clone(), next.clone(), base.clone());
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut events = 0u64;
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(body) = bodies.get(i) else { break };
                let reply: Value = client
                    .post(&base)
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
                    .await?
                    .json()
                    .await?;
                events += reply["accepted"].as_u64().unwrap_or(0);
            }
            anyhow::Ok(events)
        }));
    }
    let mut accepted = 0;
    for task in tasks {
        accepted += task.await??;
    }
    let mut seconds = started.elapsed().as_secs_f64();
    // What the background has not yet folded of the dashboard's counts
    // when the posting ends is folded now, and its time counted as ingest's.
    let folding = Instant::now();
    app.fold_minutes().await?;
    let minutes = folding.elapsed().as_secs_f64();
    app.fold_item_activity().await?;
    let folded = folding.elapsed().as_secs_f64();
    println!(
        "  posted in {seconds:.1} s, the counts still pending folded in {folded:.2} s ({minutes:.2} s per minute, {:.2} s per item and day)",
        folded - minutes
    );
    if let (Some((own0, pg0)), Some((own, pg))) = (cpu_before, cpu_seconds()) {
        let (own, pg) = (own - own0, pg - pg0);
        println!(
            "  CPU while posting and folding: recd and the load generator {own:.1} s, this machine's PostgreSQL {pg:.1} s, total {:.1} s",
            own + pg
        );
    }
    seconds += folded;
    let _ = stop.send(());
    server.await??;
    Ok(accepted as f64 / seconds)
}

/// The name and the user and system CPU seconds of `process`, with its
/// reaped children's (Linux).
fn process_cpu_seconds(process: &procfs::process::Process) -> Option<(String, f64)> {
    let stat = process.stat().ok()?;
    let children = u64::try_from(stat.cutime + stat.cstime).unwrap_or(0);
    let ticks = stat.utime + stat.stime + children;
    Some((stat.comm, ticks as f64 / procfs::ticks_per_second() as f64))
}

/// The CPU this process and the machine's PostgreSQL have used (Linux).
fn cpu_seconds() -> Option<(f64, f64)> {
    let own = process_cpu_seconds(&procfs::process::Process::myself().ok()?)?.1;
    Some((own, postgres_cpu_seconds()?))
}

/// The CPU the `postgres` processes on this machine have used, ended
/// backends included (the postmaster reaps them): a local PostgreSQL's
/// work, when it serves nothing else (Linux).
fn postgres_cpu_seconds() -> Option<f64> {
    let processes = procfs::process::all_processes().ok()?;
    Some(
        processes
            .flatten()
            .filter_map(|process| process_cpu_seconds(&process))
            .filter(|(comm, _)| comm == "postgres")
            .map(|(_, seconds)| seconds)
            .sum(),
    )
}

/// recd's own CPU per event outside the store: parse a body and validate
/// every event in it, on one core.
fn parse_and_validate(bodies: &[String]) -> f64 {
    let started = Instant::now();
    let now = chrono::Utc::now().timestamp_millis();
    let mut events = 0usize;
    for body in bodies {
        let batch = recd::ingest::parse_batch(body.as_bytes(), now).expect("bench bodies are batches");
        events += batch.valid.len();
    }
    events as f64 / started.elapsed().as_secs_f64()
}

/// pgbench runs recd's insert shape (500 rows set-based into the events
/// table with its unique event id and indexes) from `connections` clients.
fn pgbench_insert(url: &str, events: usize, connections: usize) -> anyhow::Result<f64> {
    let script = std::env::temp_dir().join("recd_pgbench.sql");
    std::fs::write(
        &script,
        "INSERT INTO events (event_id, user_id, item_id, kind, value, ts, session_id, recommendation_id, received_at)
         SELECT 'pgb-' || :client_id || '-' || g || '-' || md5(random()::text), 'u' || (random() * 20000)::int,
                'i' || (random() * 5000)::int, 0, NULL, (extract(epoch from now()) * 1000)::bigint, 's', NULL, 0
         FROM generate_series(1, 500) AS g ON CONFLICT DO NOTHING;\n",
    )?;
    let transactions = events / BATCH / connections;
    let output = Command::new("pgbench")
        .args(["-n", "-f"])
        .arg(&script)
        .args([
            "-c",
            &connections.to_string(),
            "-j",
            "2",
            "-t",
            &transactions.to_string(),
            url,
        ])
        .output()?;
    let text = String::from_utf8_lossy(&output.stdout);
    anyhow::ensure!(
        output.status.success(),
        "pgbench failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let tps: f64 = text
        .lines()
        .find(|l| l.starts_with("tps"))
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no tps in pgbench output:\n{text}"))?;
    Ok(tps * BATCH as f64)
}

/// A bare COPY of the same number of rows into an unindexed table.
async fn bare_copy(store: &Store, events: usize) -> anyhow::Result<f64> {
    let Db::Postgres(pool) = store.db() else {
        anyhow::bail!("COPY needs Postgres")
    };
    sqlx::query("DROP TABLE IF EXISTS bench_bare").execute(pool).await?;
    sqlx::query("CREATE UNLOGGED TABLE bench_bare (event_id text, user_id text, item_id text, kind int2, ts int8)")
        .execute(pool)
        .await?;
    let mut csv = String::with_capacity(events * 48);
    for i in 0..events {
        csv.push_str(&format!(
            "copy-{i},u{},i{},0,{}\n",
            i % 20000,
            i % 5000,
            1_700_000_000_000i64 + i as i64
        ));
    }
    let started = Instant::now();
    let mut conn = pool.acquire().await?;
    let mut copy = conn.copy_in_raw("COPY bench_bare FROM STDIN WITH (FORMAT csv)").await?;
    copy.send(csv.as_bytes()).await?;
    copy.finish().await?;
    Ok(events as f64 / started.elapsed().as_secs_f64())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let events: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(200_000);
    let connections: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(8);
    let pg = std::env::var("RECD_BENCH_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/recd_bench".to_owned());
    println!("ingest: {events} events in batches of {BATCH}, {connections} connections");

    // `postgres` or `sqlite` runs recd on that store alone (to compare two
    // builds of recd); the default runs everything.
    let only = args.get(3).map(String::as_str).unwrap_or("all");

    if only != "postgres" {
        let dir = tempfile::tempdir()?;
        let sqlite = format!("sqlite://{}", dir.path().join("bench.db").display());
        let rate = recd_ingest(&sqlite, Arc::new(bodies(events, "sqlite")), connections).await?;
        println!("recd on SQLite:               {rate:>10.0} events/s");
    }
    if only == "sqlite" {
        return Ok(());
    }

    // A fresh database each run, so the tables start equally empty.
    let admin = Store::open(&pg, &StoreOptions::default()).await?;
    if let Db::Postgres(pool) = admin.db() {
        sqlx::query("TRUNCATE events").execute(pool).await?;
    }
    let run = format!("pg{}", chrono::Utc::now().timestamp_millis());
    let pg_bodies = Arc::new(bodies(events, &run));
    if only == "all" {
        let rate = parse_and_validate(&pg_bodies);
        println!("recd parse + validate only:   {rate:>10.0} events/s (one core, no HTTP, no store)");
    }
    let rate = recd_ingest(&pg, pg_bodies, connections).await?;
    println!("recd on Postgres:             {rate:>10.0} events/s");
    if only == "postgres" {
        admin.close().await;
        return Ok(());
    }
    if let Db::Postgres(pool) = admin.db() {
        sqlx::query("TRUNCATE events").execute(pool).await?;
    }
    let rate = pgbench_insert(&pg, events, connections)?;
    println!("Postgres alone, same insert:  {rate:>10.0} rows/s (pgbench, {connections} clients)");
    let rate = bare_copy(&admin, events).await?;
    println!("Postgres alone, bare COPY:    {rate:>10.0} rows/s");
    admin.close().await;
    Ok(())
}
