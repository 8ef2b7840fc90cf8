//! Writing events, and retiring old ones.
//!
//! Idempotency is per user. On PostgreSQL the events table is partitioned
//! by month of the events' timestamps (a partition is made for any month an
//! event arrives for, imported history included): the same `event_id` from
//! the same user with the same timestamp is stored once, at any age, and an
//! event sent without a timestamp (stamped with the server's clock, so a
//! retry carries another) is recognised by its id for 24 hours through
//! `recent_event_ids`. On SQLite one unique key on (user, event id) holds
//! at any age. Retention drops whole partitions on PostgreSQL and deletes
//! rows in small batches on SQLite.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use sqlx::{PgPool, Postgres, Transaction};

use super::stats::{count_clicks, sqlite_recommendation_upsert, BatchCounts, Claims};
use super::{Db, IdKind, Result, Store};
use crate::domain::NewEvent;

/// How long the id of an event sent without a timestamp is remembered.
pub const RECENT_IDS_MS: i64 = 24 * 3600 * 1000;
/// Rows deleted per statement by SQLite's retention.
const SQLITE_DELETE_BATCH: i64 = 5_000;

/// The month partitions this process has made sure of, per database.
static PARTITIONS: Mutex<Option<HashMap<String, HashSet<i64>>>> = Mutex::new(None);

/// What one retention pass retired.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retention {
    /// Partitions dropped (PostgreSQL).
    pub partitions: u64,
    /// Rows deleted (SQLite), or `recent_event_ids` forgotten.
    pub rows: u64,
}

/// The first millisecond of the month (UTC) that `ts` falls in.
fn month_start(ts: i64) -> i64 {
    use chrono::{Datelike, TimeZone, Utc};
    let Some(at) = Utc.timestamp_millis_opt(ts).single() else {
        return ts;
    };
    Utc.with_ymd_and_hms(at.year(), at.month(), 1, 0, 0, 0)
        .single()
        .map_or(ts, |m| m.timestamp_millis())
}

fn database(pool: &PgPool) -> String {
    let options = pool.connect_options();
    format!(
        "{}:{}/{}",
        options.get_host(),
        options.get_port(),
        options.get_database().unwrap_or("")
    )
}

/// Makes the month partitions `events` need (unless this process did
/// already; `fresh` asks again, after an insert found one missing).
async fn ensure_partitions(pool: &PgPool, events: &[&NewEvent], fresh: bool) -> Result<()> {
    let db = database(pool);
    let mut months: Vec<i64> = events.iter().map(|e| month_start(e.ts)).collect();
    months.sort_unstable();
    months.dedup();
    {
        let mut known = PARTITIONS.lock().unwrap_or_else(|e| e.into_inner());
        let known = known.get_or_insert_with(HashMap::new);
        if fresh {
            known.remove(&db);
        }
        if let Some(made) = known.get(&db) {
            months.retain(|m| !made.contains(m));
        }
    }
    if months.is_empty() {
        return Ok(());
    }
    sqlx::query("SELECT recd_event_partition(m) FROM UNNEST($1::int8[]) AS m")
        .bind(&months)
        .execute(pool)
        .await?;
    let mut known = PARTITIONS.lock().unwrap_or_else(|e| e.into_inner());
    known
        .get_or_insert_with(HashMap::new)
        .entry(db)
        .or_default()
        .extend(months);
    Ok(())
}

/// A batch without its repeats: the first of events that are the same
/// event (same user and id, and same timestamp when the sender gave one).
fn without_repeats(events: &[NewEvent]) -> Vec<&NewEvent> {
    let mut seen = HashSet::new();
    events
        .iter()
        .filter(|e| match &e.event_id {
            None => true,
            Some(id) => seen.insert((e.user_id.as_str(), id.as_str(), e.timestamped.then_some(e.ts))),
        })
        .collect()
}

impl Store {
    /// Stores events (and the items they name that `item_ids` lists) in
    /// one transaction; returns how many were new.
    pub(super) async fn write_events(&self, events: &[NewEvent], item_ids: &[&str], now_ms: i64) -> Result<u64> {
        let sealed: Vec<NewEvent>;
        let events = if self.ids.encrypted() {
            sealed = events
                .iter()
                .map(|e| NewEvent {
                    user_id: self.ids.seal(IdKind::User, &e.user_id),
                    session_id: self.ids.seal_opt(IdKind::Session, e.session_id.as_deref()),
                    ..e.clone()
                })
                .collect();
            &sealed[..]
        } else {
            events
        };
        match &self.db {
            Db::Postgres(pool) => {
                let batch = without_repeats(events);
                let cutoffs = self.stats_keep().cutoffs(now_ms);
                ensure_partitions(pool, &batch, false).await?;
                match write_postgres(pool, &batch, item_ids, now_ms, cutoffs, &self.claims).await {
                    // A partition dropped by retention (here or on another
                    // replica) after this process made sure of it.
                    Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("23514") => {
                        ensure_partitions(pool, &batch, true).await?;
                        Ok(write_postgres(pool, &batch, item_ids, now_ms, cutoffs, &self.claims).await?)
                    }
                    result => Ok(result?),
                }
            }
            Db::Sqlite(sqlite) => {
                let mut tx = sqlite.write.begin().await?;
                // One multi-row statement per chunk: SQLite allows 32766
                // parameters, 9 a row. The rows stored (not the duplicates)
                // come back to be counted for the dashboard.
                let cutoffs = self.stats_keep().cutoffs(now_ms);
                let mut counts = BatchCounts::default();
                let mut clicks: Vec<(String, String, i64)> = Vec::new();
                let mut inserted = 0;
                for chunk in events.chunks(1000) {
                    let mut insert = sqlx::QueryBuilder::new(
                        "INSERT INTO events (event_id, user_id, item_id, kind, value, ts, session_id, recommendation_id, received_at) ",
                    );
                    insert.push_values(chunk, |mut row, e| {
                        row.push_bind(e.event_id.as_deref())
                            .push_bind(&e.user_id)
                            .push_bind(&e.item_id)
                            .push_bind(e.kind.code())
                            .push_bind(e.value)
                            .push_bind(e.ts)
                            .push_bind(e.session_id.as_deref())
                            .push_bind(e.recommendation_id.as_deref())
                            .push_bind(now_ms);
                    });
                    insert.push(
                        " ON CONFLICT (user_id, event_id) DO NOTHING RETURNING item_id, kind, ts, recommendation_id",
                    );
                    let stored: Vec<(String, i16, i64, Option<String>)> =
                        insert.build_query_as().fetch_all(&mut *tx).await?;
                    inserted += stored.len() as u64;
                    for (item_id, kind, ts, recommendation_id) in stored {
                        counts.add(kind, ts, &item_id, cutoffs);
                        if let Some(recommendation_id) = recommendation_id {
                            clicks.push((recommendation_id, item_id, ts));
                        }
                    }
                }
                counts.write_sqlite(&mut tx).await?;
                if !clicks.is_empty() {
                    count_sqlite_clicks(&mut tx, &clicks, cutoffs.0).await?;
                }
                for ids in item_ids.chunks(1000) {
                    let mut insert = sqlx::QueryBuilder::new("INSERT INTO items (item_id, updated_at) ");
                    insert.push_values(ids, |mut row, id| {
                        row.push_bind(*id).push_bind(now_ms);
                    });
                    insert.push(" ON CONFLICT (item_id) DO NOTHING");
                    insert.build().execute(&mut *tx).await?;
                }
                tx.commit().await?;
                Ok(inserted)
            }
        }
    }

    /// Retires events older than `before_ms`: on PostgreSQL every partition
    /// wholly before it is dropped (the events of a month go when all of
    /// them are older), on SQLite rows are deleted in small batches. Also
    /// forgets the ids of events sent without a timestamp once 24 hours old.
    pub async fn retire_events(&self, before_ms: Option<i64>, now_ms: i64) -> Result<Retention> {
        let mut retired = Retention::default();
        match &self.db {
            Db::Postgres(pool) => {
                retired.rows = sqlx::query("DELETE FROM recent_event_ids WHERE received_at < $1")
                    .bind(now_ms - RECENT_IDS_MS)
                    .execute(pool)
                    .await?
                    .rows_affected();
                let Some(before) = before_ms else {
                    return Ok(retired);
                };
                for (name, upper) in partitions(pool).await? {
                    if upper <= before {
                        // The name comes from the catalogue, quoted anyway.
                        sqlx::query(&format!("DROP TABLE IF EXISTS \"{}\"", name.replace('"', "")))
                            .execute(pool)
                            .await?;
                        retired.partitions += 1;
                    }
                }
            }
            Db::Sqlite(sqlite) => {
                let pool = &sqlite.write;
                let Some(before) = before_ms else {
                    return Ok(retired);
                };
                loop {
                    let n =
                        sqlx::query("DELETE FROM events WHERE seq IN (SELECT seq FROM events WHERE ts < $1 LIMIT $2)")
                            .bind(before)
                            .bind(SQLITE_DELETE_BATCH)
                            .execute(pool)
                            .await?
                            .rows_affected();
                    retired.rows += n;
                    if n < SQLITE_DELETE_BATCH as u64 {
                        break;
                    }
                    // Let writers in between batches.
                    tokio::task::yield_now().await;
                }
            }
        }
        Ok(retired)
    }

    /// The events table's partitions (PostgreSQL), each with the end of its
    /// range; empty on SQLite.
    pub async fn event_partitions(&self) -> Result<Vec<(String, i64)>> {
        match &self.db {
            Db::Postgres(pool) => partitions(pool).await,
            Db::Sqlite(_) => Ok(Vec::new()),
        }
    }
}

/// The partitions of `events` and the upper bound of each (ms).
async fn partitions(pool: &PgPool) -> Result<Vec<(String, i64)>> {
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT c.relname::text, pg_get_expr(c.relpartbound, c.oid)
         FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
         WHERE i.inhparent = to_regclass('events') ORDER BY c.relname",
    )
    .fetch_all(pool)
    .await?;
    // `FOR VALUES FROM ('…') TO ('…')`: the number after TO.
    Ok(rows
        .into_iter()
        .filter_map(|(name, bound)| {
            let upper = bound.rsplit_once("TO (")?.1;
            let upper: String = upper.chars().filter(|c| c.is_ascii_digit() || *c == '-').collect();
            Some((name, upper.parse().ok()?))
        })
        .collect())
}

/// Stores a batch on PostgreSQL; once committed, hands its per-item counts
/// to `claims` when its pending row was claimed.
async fn write_postgres(
    pool: &PgPool,
    batch: &[&NewEvent],
    item_ids: &[&str],
    now_ms: i64,
    cutoffs: (i64, i64),
    claims: &Claims,
) -> std::result::Result<u64, sqlx::Error> {
    let claim = claims.has_room();
    let untimed: Vec<&NewEvent> = batch
        .iter()
        .copied()
        .filter(|e| e.event_id.is_some() && !e.timestamped)
        .collect();
    if untimed.is_empty() && item_ids.is_empty() {
        // One statement is its own transaction: no BEGIN and COMMIT round
        // trips.
        let (inserted, pending) = insert_events(pool, batch, now_ms, cutoffs, claim).await?;
        if let Some(id) = pending {
            claims.claim(id, batch, cutoffs.1);
        }
        return Ok(inserted);
    }
    let mut tx: Transaction<'_, Postgres> = pool.begin().await?;
    let mut batch = batch.to_vec();
    if !untimed.is_empty() {
        // Ids remembered for less than 24 hours are retries; older ones are
        // remembered anew.
        let remembered: Vec<(String, String)> = sqlx::query_as(
            "INSERT INTO recent_event_ids (user_id, event_id, received_at)
             SELECT u, e, $3 FROM UNNEST($1::text[], $2::text[]) AS t(u, e)
             ON CONFLICT (user_id, event_id) DO UPDATE SET received_at = EXCLUDED.received_at
               WHERE recent_event_ids.received_at < $4
             RETURNING user_id, event_id",
        )
        .bind(untimed.iter().map(|e| e.user_id.as_str()).collect::<Vec<_>>())
        .bind(untimed.iter().map(|e| e.event_id.as_deref()).collect::<Vec<_>>())
        .bind(now_ms)
        .bind(now_ms - RECENT_IDS_MS)
        .fetch_all(&mut *tx)
        .await?;
        let fresh: HashSet<(&str, &str)> = remembered.iter().map(|(u, e)| (u.as_str(), e.as_str())).collect();
        batch.retain(|e| match (&e.event_id, e.timestamped) {
            (Some(id), false) => fresh.contains(&(e.user_id.as_str(), id.as_str())),
            _ => true,
        });
    }
    let (inserted, pending) = insert_events(&mut *tx, &batch, now_ms, cutoffs, claim).await?;
    if !item_ids.is_empty() {
        sqlx::query(
            "INSERT INTO items (item_id, updated_at) SELECT id, $2 FROM UNNEST($1::text[]) AS id
             ON CONFLICT (item_id) DO NOTHING",
        )
        .bind(item_ids)
        .bind(now_ms)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    if let Some(id) = pending {
        claims.claim(id, &batch, cutoffs.1);
    }
    Ok(inserted)
}

/// Inserts the events and adds those stored to the dashboard's counts in
/// the same statement, as pending rows that lock nothing
/// (`Store::fold_minutes` and `Store::fold_item_days` fold them in): per
/// minute and kind, and per item, day and kind, one row each; clicks on
/// recommended items per minute and model version. Upserts
/// here would make every batch wait for the one before it to commit (they
/// share the current minute's rows), and hundreds of per-item upserts a
/// batch cost ingest a third of its speed. The clicks' part is only sent for
/// batches that carry recommendation ids. When every event sent (`$12`) was
/// stored, the per-item pending row holds no counts, only the range of the
/// batch's `seq` (no grouping or arrays for PostgreSQL to make, nothing
/// large to write); it is marked claimed and its id is returned: this
/// process adds the same counts up in memory (`stats::Claims`) and folds
/// the row by id, without reading it back. Should the process stop first,
/// another replica counts the row's events again from `events`.
macro_rules! insert_events_sql {
    ($clicks:literal) => {
        concat!(
            "WITH stored AS (
    INSERT INTO events (event_id, user_id, item_id, kind, value, ts, session_id, recommendation_id, received_at)
    SELECT e.*, $9 FROM UNNEST($1::text[], $2::text[], $3::text[], $4::int2[], $5::float8[], $6::int8[], $7::text[], $8::text[]) AS e
    ON CONFLICT (user_id, event_id, ts) DO NOTHING
    RETURNING seq, item_id, kind, ts, recommendation_id
), minutes AS (
    INSERT INTO event_minutes_pending (minutes, kinds, ns)
    SELECT array_agg(minute_ms), array_agg(kind), array_agg(n)
    FROM (SELECT ts - ts % 60000 AS minute_ms, kind, COUNT(*) AS n FROM stored WHERE ts >= $10 GROUP BY 1, 2) AS per_minute
    HAVING COUNT(*) > 0
), days AS (
    INSERT INTO item_days_pending (items, days, kinds, ns)
    SELECT array_agg(item_id), array_agg(day_ms), array_agg(kind), array_agg(n)
    FROM (SELECT item_id, ts - ts % 86400000 AS day_ms, kind, COUNT(*) AS n FROM stored
          WHERE ts >= $11 AND (SELECT COUNT(*) FROM stored) <> $12
          GROUP BY 1, 2, 3) AS per_item
    HAVING COUNT(*) > 0
), claimed AS (
    INSERT INTO item_days_pending (claimed_at, seq_min, seq_max)
    SELECT $9, MIN(seq), MAX(seq) FROM stored HAVING COUNT(*) = $12
    RETURNING id
)",
            $clicks,
            "
SELECT (SELECT COUNT(*) FROM stored), (SELECT id FROM claimed)"
        )
    };
}

/// One with the user, id and timestamp of a stored event is skipped.
/// Returns how many were stored, and the id of the batch's pending per-item
/// row when it is claimed (`claim`: whether to ask for that).
async fn insert_events<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    batch: &[&NewEvent],
    now_ms: i64,
    (first_minute, first_day): (i64, i64),
    claim: bool,
) -> std::result::Result<(u64, Option<i64>), sqlx::Error> {
    const PLAIN: &str = insert_events_sql!("");
    const WITH_CLICKS: &str = insert_events_sql!(
        ", clicks AS (
    INSERT INTO recommendation_minutes_pending (minute_ms, version, clicks)
    SELECT s.ts - s.ts % 60000, COALESCE(i.model_version, ''), COUNT(*)
    FROM stored s JOIN impressions i ON i.recommendation_id = s.recommendation_id
    WHERE s.recommendation_id IS NOT NULL AND s.ts >= $10
      AND strpos(chr(31) || i.items, chr(31) || s.item_id || chr(31)) > 0
    GROUP BY 1, 2
)"
    );
    let sql = if batch.iter().any(|e| e.recommendation_id.is_some()) {
        WITH_CLICKS
    } else {
        PLAIN
    };
    let (stored, pending): (i64, Option<i64>) = sqlx::query_as(sql)
        .bind(batch.iter().map(|e| e.event_id.as_deref()).collect::<Vec<_>>())
        .bind(batch.iter().map(|e| e.user_id.as_str()).collect::<Vec<_>>())
        .bind(batch.iter().map(|e| e.item_id.as_str()).collect::<Vec<_>>())
        .bind(batch.iter().map(|e| e.kind.code()).collect::<Vec<_>>())
        .bind(batch.iter().map(|e| e.value).collect::<Vec<_>>())
        .bind(batch.iter().map(|e| e.ts).collect::<Vec<_>>())
        .bind(batch.iter().map(|e| e.session_id.as_deref()).collect::<Vec<_>>())
        .bind(batch.iter().map(|e| e.recommendation_id.as_deref()).collect::<Vec<_>>())
        .bind(now_ms)
        .bind(first_minute)
        .bind(first_day)
        .bind(if claim { batch.len() as i64 } else { -1 })
        .fetch_one(executor)
        .await?;
    Ok((u64::try_from(stored).unwrap_or(0), pending))
}

/// Counts the clicks among events just stored (recommendation id, item id,
/// ts) on SQLite: those on an item the stored recommendation showed.
async fn count_sqlite_clicks(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    clicks: &[(String, String, i64)],
    first_minute: i64,
) -> std::result::Result<(), sqlx::Error> {
    for chunk in clicks.chunks(1000) {
        let mut select = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
            "SELECT recommendation_id, COALESCE(model_version, ''), items FROM impressions WHERE recommendation_id IN (",
        );
        let mut ids = select.separated(", ");
        for (recommendation_id, _, _) in chunk {
            ids.push_bind(recommendation_id.as_str());
        }
        select.push(")");
        let shown: HashMap<String, (String, String)> = select
            .build_query_as::<(String, String, String)>()
            .fetch_all(&mut **tx)
            .await?
            .into_iter()
            .map(|(id, version, items)| (id, (version, items)))
            .collect();
        let counts = count_clicks(
            chunk.iter().map(|(r, i, ts)| (r.as_str(), i.as_str(), *ts)),
            &shown,
            first_minute,
        );
        if !counts.is_empty() {
            let counts: Vec<_> = counts.iter().collect();
            sqlite_recommendation_upsert(&counts, "clicks")
                .build()
                .execute(&mut **tx)
                .await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn months_start_at_midnight_utc_on_the_first() {
        let at = chrono::DateTime::parse_from_rfc3339("2025-03-17T13:45:00Z").unwrap();
        let start = chrono::DateTime::parse_from_rfc3339("2025-03-01T00:00:00Z").unwrap();
        assert_eq!(month_start(at.timestamp_millis()), start.timestamp_millis());
        assert_eq!(month_start(start.timestamp_millis()), start.timestamp_millis());
        let before = chrono::DateTime::parse_from_rfc3339("1969-12-31T23:59:59Z").unwrap();
        let december = chrono::DateTime::parse_from_rfc3339("1969-12-01T00:00:00Z").unwrap();
        assert_eq!(month_start(before.timestamp_millis()), december.timestamp_millis());
    }
}
