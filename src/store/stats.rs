//! The dashboard's figures: events per minute and kind, per item and day,
//! recommendation answers and clicks per minute and model version, the
//! replicas' heartbeats, and the counts of the store's overview.
//!
//! The per-minute and per-day counts are kept as the events and answers are
//! recorded, in the same statement or transaction that stores them (so an
//! acknowledged event is counted once, a refused duplicate never), and read
//! a few hundred rows at a time: no request scans the events. None of these
//! tables holds a user id.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use sqlx::Sqlite;

use super::{Db, Result, Store, ITEM_SEPARATOR};
use crate::domain::Impression;

pub const MINUTE_MS: i64 = 60_000;
pub const HOUR_MS: i64 = 3_600_000;
pub const DAY_MS: i64 = 86_400_000;

/// How far back ingest counts events (older minutes and days would only be
/// deleted by the next pruning): set from the settings when the app opens.
#[derive(Debug)]
pub struct StatsKeep {
    minutes_ms: AtomicI64,
    days_ms: AtomicI64,
}

impl Default for StatsKeep {
    fn default() -> Self {
        StatsKeep {
            minutes_ms: AtomicI64::new(8 * DAY_MS),
            days_ms: AtomicI64::new(400 * DAY_MS),
        }
    }
}

impl StatsKeep {
    /// The first minute and the first day (ms) that ingest still counts at
    /// `now_ms`.
    pub(super) fn cutoffs(&self, now_ms: i64) -> (i64, i64) {
        let minutes = self.minutes_ms.load(Ordering::Relaxed);
        let days = self.days_ms.load(Ordering::Relaxed);
        (
            floor_to(now_ms.saturating_sub(minutes), MINUTE_MS),
            floor_to(now_ms.saturating_sub(days), DAY_MS),
        )
    }
}

/// `ms` rounded down to a multiple of `step`.
pub fn floor_to(ms: i64, step: i64) -> i64 {
    ms.div_euclid(step) * step
}

/// One replica's heartbeat as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Heartbeat {
    pub id: String,
    pub started_at_ms: i64,
    pub heartbeat_at_ms: i64,
    pub version: Option<String>,
    pub trainer: bool,
    pub training: bool,
}

/// What the store holds, for the overview (counted in the background).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreCounts {
    pub events: i64,
    pub users: i64,
    pub items: i64,
    pub bytes: i64,
}

/// Up to this many events (by PostgreSQL's estimate) the overview counts
/// events and users exactly; past it, events are PostgreSQL's estimate and
/// users those placed by the last segments computation.
const EXACT_COUNTS_BELOW: i64 = 1_000_000;

/// The advisory locks a replica folds pending item counts, and pending
/// minutes, under.
const FOLD_KEY: i64 = 0x7265_6364_0003;
const FOLD_MINUTES_KEY: i64 = 0x7265_6364_0004;

/// Takes the fold lock `key` for the transaction if no other replica
/// holds it; false when one does (that replica folds this round).
async fn fold_lock(tx: &mut sqlx::Transaction<'_, sqlx::Postgres>, key: i64) -> Result<bool> {
    let ours = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
        .bind(key)
        .fetch_one(&mut **tx)
        .await?;
    Ok(ours)
}

/// What one ingest batch adds: events per (minute, kind) and per (item,
/// day, kind).
#[derive(Debug, Default)]
pub(super) struct BatchCounts {
    minutes: BTreeMap<(i64, i16), i64>,
    days: BTreeMap<(String, i64, i16), i64>,
}

impl Store {
    /// Ingest counts events back to `minutes` (per minute) and `days` (per
    /// item and day) before now; older events are stored but not counted.
    pub fn keep_stats(&self, minutes: std::time::Duration, days: std::time::Duration) {
        let ms = |d: std::time::Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        self.stats_keep.minutes_ms.store(ms(minutes), Ordering::Relaxed);
        self.stats_keep.days_ms.store(ms(days), Ordering::Relaxed);
    }

    pub(super) fn stats_keep(&self) -> &Arc<StatsKeep> {
        &self.stats_keep
    }

    /// Events per bucket and kind: each bucket of `step_ms` from `from_ms`
    /// up to `to_ms`, as (bucket index, kind code, count). Buckets of whole
    /// hours read the hourly counts.
    pub async fn event_buckets(&self, from_ms: i64, to_ms: i64, step_ms: i64) -> Result<Vec<(i64, i16, i64)>> {
        let table = Grain::of(from_ms, step_ms);
        let select = format!(
            "SELECT ({g}_ms - $1) / $3, kind, CAST(SUM(n) AS BIGINT) FROM event_{g}s
             WHERE {g}_ms >= $1 AND {g}_ms < $2 GROUP BY 1, 2",
            g = table.name()
        );
        let rows = on_pool!(self, pool => sqlx::query_as::<_, (i64, i16, i64)>(&select)
            .bind(from_ms)
            .bind(to_ms)
            .bind(step_ms)
            .fetch_all(pool)
            .await?);
        Ok(rows)
    }

    /// Recommendation answers and clicks per bucket and model version (`None`:
    /// before any model), as (bucket index, version, impressions, clicks).
    pub async fn recommendation_buckets(
        &self,
        from_ms: i64,
        to_ms: i64,
        step_ms: i64,
    ) -> Result<Vec<(i64, Option<String>, i64, i64)>> {
        let table = Grain::of(from_ms, step_ms);
        let select = format!(
            "SELECT ({g}_ms - $1) / $3, version, CAST(SUM(impressions) AS BIGINT),
             CAST(SUM(clicks) AS BIGINT) FROM recommendation_{g}s
             WHERE {g}_ms >= $1 AND {g}_ms < $2 GROUP BY 1, 2",
            g = table.name()
        );
        let rows = on_pool!(self, pool => sqlx::query_as::<_, (i64, String, i64, i64)>(&select)
            .bind(from_ms)
            .bind(to_ms)
            .bind(step_ms)
            .fetch_all(pool)
            .await?);
        Ok(rows
            .into_iter()
            .map(|(b, v, i, c)| (b, (!v.is_empty()).then_some(v), i, c))
            .collect())
    }

    /// An item's events per day from `from_day_ms` on, as (day, kind code,
    /// count).
    pub async fn item_activity(&self, item_id: &str, from_day_ms: i64) -> Result<Vec<(i64, i16, i64)>> {
        const SELECT: &str = "SELECT day_ms, kind, n FROM item_days WHERE item_id = $1 AND day_ms >= $2";
        let rows = on_pool!(self, pool => sqlx::query_as::<_, (i64, i16, i64)>(SELECT)
            .bind(item_id)
            .bind(from_day_ms)
            .fetch_all(pool)
            .await?);
        Ok(rows)
    }

    /// Folds the pending per-minute counts and clicks ingest left on
    /// PostgreSQL into `event_minutes` and `recommendation_minutes`,
    /// deleting them in the same transaction (SQLite's ingest adds to those
    /// tables directly: one writer, nothing to wait for). One replica folds
    /// at a time; the others skip the round. Returns the rows folded.
    pub async fn fold_minutes(&self) -> Result<u64> {
        let Db::Postgres(pool) = &self.db else {
            return Ok(0);
        };
        let mut tx = pool.begin().await?;
        if !fold_lock(&mut tx, FOLD_MINUTES_KEY).await? {
            return Ok(0);
        }
        let events: i64 = sqlx::query_scalar(
            "WITH moved AS (DELETE FROM event_minutes_pending RETURNING minutes, kinds, ns),
             folded AS (
                 INSERT INTO event_minutes (minute_ms, kind, n)
                 SELECT u.minute_ms, u.kind, SUM(u.n)
                 FROM moved, UNNEST(moved.minutes, moved.kinds, moved.ns) AS u(minute_ms, kind, n)
                 GROUP BY 1, 2 ORDER BY u.minute_ms - ((u.minute_ms % 3600000) + 3600000) % 3600000, 2, 1
                 ON CONFLICT (minute_ms, kind) DO UPDATE SET n = event_minutes.n + EXCLUDED.n
             )
             SELECT COUNT(*) FROM moved",
        )
        .fetch_one(&mut *tx)
        .await?;
        let clicks: i64 = sqlx::query_scalar(
            "WITH moved AS (DELETE FROM recommendation_minutes_pending RETURNING minute_ms, version, clicks),
             folded AS (
                 INSERT INTO recommendation_minutes (minute_ms, version, clicks)
                 SELECT minute_ms, version, SUM(clicks) FROM moved GROUP BY 1, 2
                 ORDER BY minute_ms - ((minute_ms % 3600000) + 3600000) % 3600000, 2, 1
                 ON CONFLICT (minute_ms, version) DO UPDATE SET clicks = recommendation_minutes.clicks + EXCLUDED.clicks
             )
             SELECT COUNT(*) FROM moved",
        )
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(u64::try_from(events + clicks).unwrap_or(0))
    }

    /// Folds the pending per-item counts ingest left into `item_days`,
    /// deleting them in the same transaction; returns the batches folded.
    /// On PostgreSQL one replica folds at a time (an advisory lock; the
    /// others skip the round).
    pub async fn fold_item_days(&self) -> Result<u64> {
        match &self.db {
            Db::Postgres(pool) => {
                let mut tx = pool.begin().await?;
                if !fold_lock(&mut tx, FOLD_KEY).await? {
                    return Ok(0);
                }
                let folded: i64 = sqlx::query_scalar(
                    "WITH moved AS (DELETE FROM item_days_pending RETURNING items, days, kinds, ns),
                     folded AS (
                         INSERT INTO item_days (item_id, day_ms, kind, n)
                         SELECT u.item_id, u.day_ms, u.kind, SUM(u.n)
                         FROM moved, UNNEST(moved.items, moved.days, moved.kinds, moved.ns) AS u(item_id, day_ms, kind, n)
                         GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
                         ON CONFLICT (item_id, day_ms, kind) DO UPDATE SET n = item_days.n + EXCLUDED.n
                     )
                     SELECT COUNT(*) FROM moved",
                )
                .fetch_one(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok(u64::try_from(folded).unwrap_or(0))
            }
            Db::Sqlite(sqlite) => {
                // The one writer: nothing is added between the two
                // statements.
                let mut tx = sqlite.write.begin().await?;
                sqlx::query(
                    "INSERT INTO item_days (item_id, day_ms, kind, n)
                     SELECT json_extract(c.value, '$[0]'), json_extract(c.value, '$[1]'),
                            json_extract(c.value, '$[2]'), SUM(json_extract(c.value, '$[3]'))
                     FROM item_days_pending AS p, json_each(p.counts) AS c WHERE true
                     GROUP BY 1, 2, 3
                     ON CONFLICT (item_id, day_ms, kind) DO UPDATE SET n = item_days.n + excluded.n",
                )
                .execute(&mut *tx)
                .await?;
                let folded = sqlx::query("DELETE FROM item_days_pending")
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                tx.commit().await?;
                Ok(folded)
            }
        }
    }

    /// Deletes minutes before `minutes_before_ms` (and the hours before
    /// the one it falls in) and item days before `days_before_ms`; returns
    /// each table with the rows deleted from it.
    pub async fn prune_stats(&self, minutes_before_ms: i64, days_before_ms: i64) -> Result<Vec<(&'static str, u64)>> {
        let hours_before_ms = floor_to(minutes_before_ms, HOUR_MS);
        let tables = [
            ("event_minutes", "minute_ms", minutes_before_ms),
            ("recommendation_minutes", "minute_ms", minutes_before_ms),
            ("event_hours", "hour_ms", hours_before_ms),
            ("recommendation_hours", "hour_ms", hours_before_ms),
            ("item_days", "day_ms", days_before_ms),
        ];
        let deleted = on_writer!(self, pool => {
            let mut deleted = Vec::with_capacity(tables.len());
            for (table, column, before) in tables {
                let n = sqlx::query(&format!("DELETE FROM {table} WHERE {column} < $1"))
                    .bind(before)
                    .execute(pool)
                    .await?
                    .rows_affected();
                deleted.push((table, n));
            }
            deleted
        });
        Ok(deleted)
    }

    /// Writes this replica's heartbeat, and removes those older than
    /// `forget_before_ms`.
    pub async fn heartbeat(&self, beat: &Heartbeat, forget_before_ms: i64) -> Result<()> {
        on_writer!(self, pool => {
            sqlx::query(
                "INSERT INTO replicas (id, started_at, heartbeat_at, version, trainer, training)
                 VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at, version = excluded.version,
                   trainer = excluded.trainer, training = excluded.training",
            )
            .bind(&beat.id)
            .bind(beat.started_at_ms)
            .bind(beat.heartbeat_at_ms)
            .bind(beat.version.as_deref())
            .bind(beat.trainer)
            .bind(beat.training)
            .execute(pool)
            .await?;
            sqlx::query("DELETE FROM replicas WHERE heartbeat_at < $1")
                .bind(forget_before_ms)
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    /// Every replica's last heartbeat, in order of start.
    pub async fn replicas(&self) -> Result<Vec<Heartbeat>> {
        const SELECT: &str = "SELECT id, started_at, heartbeat_at, version, trainer, training FROM replicas
             ORDER BY started_at, id";
        let rows = on_pool!(self, pool => sqlx::query_as::<_, (String, i64, i64, Option<String>, bool, bool)>(SELECT)
            .fetch_all(pool)
            .await?);
        Ok(rows
            .into_iter()
            .map(
                |(id, started_at_ms, heartbeat_at_ms, version, trainer, training)| Heartbeat {
                    id,
                    started_at_ms,
                    heartbeat_at_ms,
                    version,
                    trainer,
                    training,
                },
            )
            .collect())
    }

    /// Distinct shoppers with an event from each of `since_ms` on (one pass
    /// over the events from the earliest): for the background overview.
    pub async fn active_users(&self, since_ms: [i64; 3]) -> Result<[i64; 3]> {
        const SELECT: &str = "SELECT COUNT(DISTINCT CASE WHEN ts >= $1 THEN user_id END),
             COUNT(DISTINCT CASE WHEN ts >= $2 THEN user_id END),
             COUNT(DISTINCT CASE WHEN ts >= $3 THEN user_id END)
             FROM events WHERE ts >= $4";
        let earliest = since_ms.iter().copied().min().unwrap_or(i64::MIN);
        let (a, b, c) = on_pool!(self, pool => sqlx::query_as::<_, (i64, i64, i64)>(SELECT)
            .bind(since_ms[0])
            .bind(since_ms[1])
            .bind(since_ms[2])
            .bind(earliest)
            .fetch_one(pool)
            .await?);
        Ok([a, b, c])
    }

    /// Events, shoppers, items (not deleted) and bytes the store holds. On
    /// PostgreSQL past a million events, `events` is the planner's estimate
    /// and `users` those the last segments computation placed.
    pub async fn store_counts(&self) -> Result<StoreCounts> {
        let items: i64 = on_pool!(self, pool => sqlx::query_scalar("SELECT COUNT(*) FROM items WHERE NOT deleted")
            .fetch_one(pool)
            .await?);
        match &self.db {
            Db::Postgres(pool) => {
                let estimate: i64 = sqlx::query_scalar(
                    "SELECT CAST(COALESCE(SUM(GREATEST(c.reltuples, 0)), 0) AS BIGINT)
                     FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                     WHERE i.inhparent = to_regclass('events')",
                )
                .fetch_one(pool)
                .await?;
                let (events, users) = if estimate < EXACT_COUNTS_BELOW {
                    sqlx::query_as::<_, (i64, i64)>("SELECT COUNT(*), COUNT(DISTINCT user_id) FROM events")
                        .fetch_one(pool)
                        .await?
                } else {
                    let users: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM user_segments")
                        .fetch_one(pool)
                        .await?;
                    (estimate, users)
                };
                let bytes: i64 = sqlx::query_scalar("SELECT pg_database_size(current_database())")
                    .fetch_one(pool)
                    .await?;
                Ok(StoreCounts {
                    events,
                    users,
                    items,
                    bytes,
                })
            }
            Db::Sqlite(sqlite) => {
                let pool = &sqlite.read;
                let events: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM events")
                    .fetch_one(pool)
                    .await?;
                let users: i64 = if events < EXACT_COUNTS_BELOW {
                    sqlx::query_scalar("SELECT COUNT(DISTINCT user_id) FROM events")
                        .fetch_one(pool)
                        .await?
                } else {
                    sqlx::query_scalar("SELECT COUNT(*) FROM user_segments")
                        .fetch_one(pool)
                        .await?
                };
                let bytes: i64 =
                    sqlx::query_scalar("SELECT page_count * page_size FROM pragma_page_count(), pragma_page_size()")
                        .fetch_one(pool)
                        .await?;
                Ok(StoreCounts {
                    events,
                    users,
                    items,
                    bytes,
                })
            }
        }
    }
}

/// Which counts a series reads: per minute, or per hour when its buckets
/// are whole hours from the start of one. Its name names the tables
/// (`event_{name}s`) and their time column (`{name}_ms`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Grain {
    Minute,
    Hour,
}

impl Grain {
    fn of(from_ms: i64, step_ms: i64) -> Grain {
        if step_ms % HOUR_MS == 0 && from_ms % HOUR_MS == 0 {
            Grain::Hour
        } else {
            Grain::Minute
        }
    }

    fn name(self) -> &'static str {
        match self {
            Grain::Minute => "minute",
            Grain::Hour => "hour",
        }
    }
}

/// The key order every writer of `recommendation_minutes` upserts in (by
/// hour, then version, then minute), so that the minute rows and the hour
/// rows their trigger adds to are locked in one order by all of them.
pub(super) fn hour_first<V: Ord, N>(counts: &mut [((i64, V), N)]) {
    counts.sort_by(|((m1, v1), _), ((m2, v2), _)| {
        (floor_to(*m1, HOUR_MS), v1, m1).cmp(&(floor_to(*m2, HOUR_MS), v2, m2))
    });
}

impl BatchCounts {
    /// Counts stored events given as (kind, ts, item id).
    pub(super) fn add(&mut self, kind: i16, ts: i64, item_id: &str, (first_minute, first_day): (i64, i64)) {
        let minute = floor_to(ts, MINUTE_MS);
        if minute >= first_minute {
            *self.minutes.entry((minute, kind)).or_default() += 1;
        }
        let day = floor_to(ts, DAY_MS);
        if day >= first_day {
            *self.days.entry((item_id.to_owned(), day, kind)).or_default() += 1;
        }
    }

    /// Adds the per-minute counts to their table (one statement per 1000
    /// rows), and the per-item ones as one pending row (folded in by
    /// `Store::fold_item_days`).
    pub(super) async fn write_sqlite(&self, tx: &mut sqlx::Transaction<'_, Sqlite>) -> Result<()> {
        let minutes: Vec<_> = self.minutes.iter().collect();
        for chunk in minutes.chunks(1000) {
            let mut upsert = sqlx::QueryBuilder::<Sqlite>::new("INSERT INTO event_minutes (minute_ms, kind, n) ");
            upsert.push_values(chunk, |mut row, ((minute, kind), n)| {
                row.push_bind(*minute).push_bind(*kind).push_bind(**n);
            });
            upsert.push(" ON CONFLICT (minute_ms, kind) DO UPDATE SET n = event_minutes.n + excluded.n");
            upsert.build().execute(&mut **tx).await?;
        }
        if !self.days.is_empty() {
            let days: Vec<(&str, i64, i16, i64)> = self
                .days
                .iter()
                .map(|((item, day, kind), n)| (item.as_str(), *day, *kind, *n))
                .collect();
            sqlx::query("INSERT INTO item_days_pending (counts) VALUES ($1)")
                .bind(serde_json::to_string(&days).unwrap_or_default())
                .execute(&mut **tx)
                .await?;
        }
        Ok(())
    }
}

/// Whether an impression's items (as stored) include `item_id`.
fn shows(items: &str, item_id: &str) -> bool {
    items.split(ITEM_SEPARATOR).any(|i| i == item_id)
}

/// Clicks per (minute, version) among `clicks` (recommendation id, item id,
/// ts) on `shown` (recommendation id → version or '', items as stored),
/// counting only minutes from `first_minute` on.
pub(super) fn count_clicks<'a>(
    clicks: impl IntoIterator<Item = (&'a str, &'a str, i64)>,
    shown: &HashMap<String, (String, String)>,
    first_minute: i64,
) -> BTreeMap<(i64, String), i64> {
    let mut counts = BTreeMap::new();
    for (recommendation, item, ts) in clicks {
        let Some((version, items)) = shown.get(recommendation) else {
            continue;
        };
        let minute = floor_to(ts, MINUTE_MS);
        if minute >= first_minute && shows(items, item) {
            *counts.entry((minute, version.clone())).or_insert(0) += 1;
        }
    }
    counts
}

/// Impressions per (minute, version) of `impressions`.
pub(super) fn count_impressions(impressions: &[Impression], first_minute: i64) -> BTreeMap<(i64, String), i64> {
    let mut counts = BTreeMap::new();
    for i in impressions {
        let minute = floor_to(i.created_at, MINUTE_MS);
        if minute >= first_minute {
            *counts
                .entry((minute, i.model_version.clone().unwrap_or_default()))
                .or_insert(0) += 1;
        }
    }
    counts
}

/// The upsert that adds `column` (impressions or clicks) per (minute,
/// version) on SQLite.
pub(super) fn sqlite_recommendation_upsert<'a>(
    counts: &'a [(&'a (i64, String), &'a i64)],
    column: &'static str,
) -> sqlx::QueryBuilder<'a, Sqlite> {
    let mut upsert = sqlx::QueryBuilder::<Sqlite>::new(format!(
        "INSERT INTO recommendation_minutes (minute_ms, version, {column}) "
    ));
    upsert.push_values(counts, |mut row, ((minute, version), n)| {
        row.push_bind(*minute).push_bind(version.as_str()).push_bind(**n);
    });
    upsert.push(format!(
        " ON CONFLICT (minute_ms, version) DO UPDATE SET {column} = recommendation_minutes.{column} + excluded.{column}"
    ));
    upsert
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writers_lock_by_hour_then_version_then_minute() {
        let h = HOUR_MS;
        let mut keys = vec![
            ((h + MINUTE_MS, "b"), (1, 0)),
            ((h + 2 * MINUTE_MS, "a"), (1, 0)),
            ((MINUTE_MS, "b"), (1, 0)),
            ((h, "b"), (1, 0)),
        ];
        hour_first(&mut keys);
        let order: Vec<_> = keys.iter().map(|(k, _)| *k).collect();
        assert_eq!(
            order,
            [
                (MINUTE_MS, "b"),
                (h + 2 * MINUTE_MS, "a"),
                (h, "b"),
                (h + MINUTE_MS, "b")
            ]
        );
        assert_eq!(Grain::of(3 * h, h), Grain::Hour);
        assert_eq!(Grain::of(3 * h + MINUTE_MS, h), Grain::Minute);
        assert_eq!(Grain::of(3 * h, 15 * MINUTE_MS), Grain::Minute);
    }

    #[test]
    fn floors_round_down_also_before_1970() {
        assert_eq!(floor_to(125_000, MINUTE_MS), 120_000);
        assert_eq!(floor_to(-1, MINUTE_MS), -MINUTE_MS);
        assert_eq!(floor_to(DAY_MS, DAY_MS), DAY_MS);
    }

    #[test]
    fn clicks_count_only_on_items_shown() {
        let shown: HashMap<String, (String, String)> = [(
            "r1".to_owned(),
            ("v1".to_owned(), format!("a{ITEM_SEPARATOR}b{ITEM_SEPARATOR}")),
        )]
        .into();
        let counts = count_clicks(
            [
                ("r1", "a", 61_000),
                ("r1", "c", 61_000),
                ("r2", "a", 61_000),
                ("r1", "b", 1_000),
            ],
            &shown,
            0,
        );
        assert_eq!(
            counts,
            [((0, "v1".to_owned()), 1), ((60_000, "v1".to_owned()), 1)].into()
        );
    }
}
