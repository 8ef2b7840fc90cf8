//! The PostgreSQL side: a fresh database with recd's schema (`recd
//! migrate`), the shop bulk-loaded into it with `COPY`, and its size.
//!
//! The events table is partitioned by month: the partitions of the loaded
//! months are made first with recd's own `recd_event_partition`. Its
//! indexes are dropped for the load and made again after from their own
//! definitions (read from the catalogue before; checked to be the same
//! after), which is how a large table is best loaded; then `ANALYZE`.

use std::path::Path;
use std::time::Instant;

use anyhow::{ensure, Context};
use sqlx::postgres::PgConnection;
use sqlx::{Connection, Executor, Row};

use crate::server::{output_text, recd_command};
use crate::shop::{catalogue_rows, event_row, Sessions, ShopSize};

/// The URL of database `name` on the server of `url`.
pub fn with_database(url: &str, name: &str) -> anyhow::Result<String> {
    let (server, _) = url
        .rsplit_once('/')
        .with_context(|| format!("{url}: expected postgres://USER@HOST:PORT/DATABASE"))?;
    Ok(format!("{server}/{name}"))
}

pub fn database_name(url: &str) -> anyhow::Result<String> {
    let name = url.rsplit_once('/').map(|(_, db)| db).unwrap_or_default();
    let name = name.split('?').next().unwrap_or_default();
    ensure!(
        !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
        "{url}: the database name must be letters, digits and _"
    );
    Ok(name.to_owned())
}

/// Drops the database of `url` if it exists (its server's `postgres`
/// database is used for that).
pub async fn drop_database(url: &str) -> anyhow::Result<()> {
    let name = database_name(url)?;
    let mut admin = PgConnection::connect(&with_database(url, "postgres")?).await?;
    admin
        .execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
        .await?;
    admin.close().await?;
    Ok(())
}

/// A new empty database at `url` (dropped first if there), with recd's
/// schema made by `recd migrate`.
pub async fn fresh_database(recd: &Path, url: &str) -> anyhow::Result<()> {
    drop_database(url).await?;
    let name = database_name(url)?;
    let mut admin = PgConnection::connect(&with_database(url, "postgres")?).await?;
    admin.execute(format!("CREATE DATABASE {name}").as_str()).await?;
    admin.close().await?;
    let migrate = recd_command(recd, url).arg("migrate").output()?;
    ensure!(
        migrate.status.success(),
        "recd migrate failed:\n{}",
        output_text(&migrate)
    );
    Ok(())
}

/// What the load did.
pub struct Loaded {
    pub events: u64,
    pub users: u64,
    pub items: u64,
    pub partitions: usize,
    pub copy_seconds: f64,
    pub index_seconds: f64,
    pub analyze_seconds: f64,
    pub total_seconds: f64,
    pub bytes: i64,
    /// A sample of users with events.
    pub user_sample: Vec<String>,
}

impl Loaded {
    /// Events per second, indexes and ANALYZE included.
    pub fn rate(&self) -> f64 {
        self.events as f64 / self.total_seconds
    }
}

/// Month starts (ms, UTC) from the month of `from_ms` to that of `to_ms`.
fn months(from_ms: i64, to_ms: i64) -> Vec<i64> {
    use chrono::{Datelike, TimeZone, Utc};
    let at = |ms: i64| Utc.timestamp_millis_opt(ms).single().expect("a valid time");
    let (mut y, mut m) = (at(from_ms).year(), at(from_ms).month());
    let last = at(to_ms);
    let mut out = Vec::new();
    while (y, m) <= (last.year(), last.month()) {
        out.push(Utc.with_ymd_and_hms(y, m, 1, 0, 0, 0).unwrap().timestamp_millis());
        (y, m) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
    }
    out
}

/// Loads the shop into the (migrated, empty) database at `url`: the
/// catalogue, then the events of `days` days before `end_ms`.
pub async fn bulk_load(url: &str, size: ShopSize, end_ms: i64, days: f64, now_ms: i64) -> anyhow::Result<Loaded> {
    let started = Instant::now();
    let mut conn = PgConnection::connect(url).await?;
    conn.execute("SET maintenance_work_mem = '512MB'; SET synchronous_commit = off")
        .await?;

    // The catalogue.
    let mut rows = Vec::with_capacity(size.items as usize * 64);
    catalogue_rows(&size, now_ms, &mut rows);
    let mut copy = conn
        .copy_in_raw(
            "COPY items (item_id, title, categories, price, available, attributes, deleted, updated_at) FROM STDIN",
        )
        .await?;
    copy.send(rows).await?;
    copy.finish().await?;

    // The month partitions of the loaded events and of the month after the
    // last (the bench's own events arrive now).
    let span_ms = (days * 86_400_000.0) as i64;
    let months = months(end_ms - span_ms - 86_400_000, now_ms + 31 * 86_400_000);
    sqlx::query("SELECT recd_event_partition(m) FROM UNNEST($1::int8[]) AS m")
        .bind(&months)
        .execute(&mut conn)
        .await?;

    // The events table's indexes, dropped for the load, made again after.
    let before = all_indexes(&mut conn).await?;
    let constraints: Vec<(String, String)> = sqlx::query_as(
        "SELECT conname::text, pg_get_constraintdef(oid) FROM pg_constraint
         WHERE conrelid = 'events'::regclass AND contype IN ('p', 'u') ORDER BY conname",
    )
    .fetch_all(&mut conn)
    .await?;
    for (name, _) in &constraints {
        conn.execute(format!("ALTER TABLE events DROP CONSTRAINT {name}").as_str())
            .await?;
    }
    let indexes = index_definitions(&mut conn).await?;
    for (name, _) in &indexes {
        conn.execute(format!("DROP INDEX {name}").as_str()).await?;
    }

    // The events, generated on a thread of their own while COPY sends them.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
    let generator = std::thread::spawn(move || {
        let mut seen = vec![false; size.users as usize];
        let (mut users, mut sample) = (0u64, Vec::new());
        let mut chunk = Vec::with_capacity(1 << 20);
        for (seq, event) in Sessions::new(size, end_ms, days, 0, 0).enumerate() {
            if !std::mem::replace(&mut seen[event.user as usize], true) {
                users += 1;
                if sample.len() < 200_000 {
                    sample.push(crate::shop::user_id(event.user));
                }
            }
            event_row(seq as u64 + 1, &event, now_ms, &mut chunk);
            if chunk.len() >= 1 << 20 && tx.blocking_send(std::mem::take(&mut chunk)).is_err() {
                break;
            }
        }
        let _ = tx.blocking_send(chunk);
        (users, sample)
    });
    let copy_started = Instant::now();
    let mut copy = conn
        .copy_in_raw(
            "COPY events (seq, event_id, user_id, item_id, kind, value, ts, session_id, recommendation_id, received_at) \
             FROM STDIN",
        )
        .await?;
    let mut sent = 0u64;
    let mut last_note = Instant::now();
    while let Some(chunk) = rx.recv().await {
        sent += chunk.iter().filter(|&&b| b == b'\n').count() as u64;
        copy.send(chunk).await?;
        if last_note.elapsed().as_secs() >= 30 {
            println!("  COPY: {sent} events in {:.0} s", copy_started.elapsed().as_secs_f64());
            last_note = Instant::now();
        }
    }
    let events = copy.finish().await?;
    let copy_seconds = copy_started.elapsed().as_secs_f64();
    let (users, user_sample) = generator
        .join()
        .map_err(|_| anyhow::anyhow!("the generator panicked"))?;
    ensure!(events == size.events, "COPY stored {events} events of {}", size.events);
    println!("  COPY: {events} events in {copy_seconds:.0} s; making the indexes");

    let index_started = Instant::now();
    for (name, definition) in &constraints {
        conn.execute(format!("ALTER TABLE events ADD CONSTRAINT {name} {definition}").as_str())
            .await?;
    }
    for (_, definition) in &indexes {
        // The definition of a partitioned table's index reads `ON ONLY`,
        // which would make it for the parent alone.
        conn.execute(definition.replace(" ON ONLY ", " ON ").as_str()).await?;
    }
    let after = all_indexes(&mut conn).await?;
    ensure!(
        before == after,
        "the events indexes differ after the load:\nbefore {before:?}\nafter {after:?}"
    );
    let index_seconds = index_started.elapsed().as_secs_f64();
    // Arrivals go on after the loaded ones.
    sqlx::query("SELECT setval('events_seq_seq', $1)")
        .bind(events as i64)
        .execute(&mut conn)
        .await?;

    let analyze_started = Instant::now();
    conn.execute("ANALYZE").await?;
    let analyze_seconds = analyze_started.elapsed().as_secs_f64();
    let bytes: i64 = sqlx::query("SELECT pg_database_size(current_database())")
        .fetch_one(&mut conn)
        .await?
        .get(0);
    let partitions: i64 = sqlx::query("SELECT count(*) FROM pg_inherits WHERE inhparent = 'events'::regclass")
        .fetch_one(&mut conn)
        .await?
        .get(0);
    conn.close().await?;
    Ok(Loaded {
        events,
        users,
        items: size.items,
        partitions: partitions as usize,
        copy_seconds,
        index_seconds,
        analyze_seconds,
        total_seconds: started.elapsed().as_secs_f64(),
        bytes,
        user_sample,
    })
}

/// Every index of the events table (constraints' included) with its
/// definition, by name.
async fn all_indexes(conn: &mut PgConnection) -> anyhow::Result<Vec<(String, String)>> {
    Ok(sqlx::query_as(
        "SELECT c.relname::text, pg_get_indexdef(i.indexrelid) FROM pg_index i
         JOIN pg_class c ON c.oid = i.indexrelid
         WHERE i.indrelid = 'events'::regclass ORDER BY 1",
    )
    .fetch_all(conn)
    .await?)
}

/// The events table's indexes that back no constraint, by name.
async fn index_definitions(conn: &mut PgConnection) -> anyhow::Result<Vec<(String, String)>> {
    Ok(sqlx::query_as(
        "SELECT c.relname::text, pg_get_indexdef(i.indexrelid) FROM pg_index i
         JOIN pg_class c ON c.oid = i.indexrelid
         WHERE i.indrelid = 'events'::regclass
           AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = i.indexrelid)
         ORDER BY 1",
    )
    .fetch_all(conn)
    .await?)
}
