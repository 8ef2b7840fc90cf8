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
use crate::domain::{Impression, NewEvent};

pub const MINUTE_MS: i64 = 60_000;
pub const HOUR_MS: i64 = 3_600_000;
pub const DAY_MS: i64 = 86_400_000;

/// Days per row of `item_blocks`, and the span of one row.
pub const BLOCK_DAYS: usize = 32;
pub const BLOCK_MS: i64 = BLOCK_DAYS as i64 * DAY_MS;

/// Pending rows (ingest batches) one fold transaction takes at most.
const FOLD_ROWS: i64 = 1024;

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
    /// count), days without events left out.
    pub async fn item_activity(&self, item_id: &str, from_day_ms: i64) -> Result<Vec<(i64, i16, i64)>> {
        const SELECT: &str = "SELECT block_ms, kind, counts FROM item_blocks WHERE item_id = $1 AND block_ms >= $2";
        let rows = on_pool!(self, pool => sqlx::query_as::<_, (i64, i16, Vec<u8>)>(SELECT)
            .bind(item_id)
            .bind(floor_to(from_day_ms, BLOCK_MS))
            .fetch_all(pool)
            .await?);
        let mut days = Vec::new();
        for (block, kind, counts) in rows {
            for (d, n) in decode_block(&counts).into_iter().enumerate() {
                let day = block + d as i64 * DAY_MS;
                if n != 0 && day >= from_day_ms {
                    days.push((day, kind, n));
                }
            }
        }
        Ok(days)
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

    /// Folds the pending per-item counts ingest left into `item_blocks`,
    /// deleting the pending rows in the transaction that adds their counts.
    ///
    /// On PostgreSQL the batches this process stored whole were claimed
    /// (`Claims`): their counts are already added up in memory, and their
    /// rows are deleted by id. If any of those rows is gone (folded by
    /// another replica after `grace`, the time a claimed row is left to its
    /// replica), nothing of the claim is written and its rows that are left
    /// are folded as unclaimed ones. Then the rows nobody claims (or
    /// claimed longer than `grace` ago) are read back and folded,
    /// `FOLD_ROWS` a transaction (bounded memory whatever has piled up).
    /// Each (item, block, kind) touched is read and written once a
    /// transaction. Folds take an advisory lock; for unclaimed rows a
    /// replica that finds it taken skips the round.
    pub async fn fold_item_days(&self, grace: std::time::Duration) -> Result<Folded> {
        let mut folded = Folded::default();
        if let Db::Postgres(pool) = &self.db {
            fold_claimed(pool, &self.claims, &mut folded).await?;
        }
        let now = crate::clock::now_ms();
        let claimed_before = now - i64::try_from(grace.as_millis()).unwrap_or(i64::MAX);
        let (_, first_day) = self.stats_keep.cutoffs(now);
        loop {
            let rows = match &self.db {
                Db::Postgres(pool) => fold_item_days_postgres(pool, claimed_before, first_day).await?,
                Db::Sqlite(sqlite) => fold_item_days_sqlite(&sqlite.write).await?,
            };
            folded.unclaimed += rows;
            if rows < FOLD_ROWS as u64 {
                return Ok(folded);
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
            ("item_blocks", "block_ms", floor_to(days_before_ms, BLOCK_MS)),
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

/// An (item, block, kind) of `item_blocks`.
type BlockKey = (String, i64, i16);
/// A key with its block's daily counts.
type BlockRow = (BlockKey, [i64; BLOCK_DAYS]);
/// A row of `item_blocks` as stored.
type StoredBlock = (String, i64, i16, Vec<u8>);
/// A pending row on PostgreSQL: items, days, kinds and counts, or (for a
/// claimed batch) the range of its events' `seq` and the `xmin` of the
/// transaction that wrote them.
#[derive(sqlx::FromRow)]
struct PendingRow {
    items: Option<Vec<String>>,
    days: Option<Vec<i64>>,
    kinds: Option<Vec<i16>>,
    ns: Option<Vec<i64>>,
    seq_min: Option<i64>,
    seq_max: Option<i64>,
    xmin: i64,
}

/// Per-item counts being folded: per item, and per (block, kind) of it,
/// the block's daily counts. Items are the outer key so that counting an
/// event of an item already held allocates nothing.
#[derive(Debug, Default)]
struct Blocks {
    items: HashMap<String, HashMap<(i64, i16), [i64; BLOCK_DAYS]>>,
    keys: usize,
}

impl Blocks {
    fn add(&mut self, item_id: &str, day_ms: i64, kind: i16, n: i64) {
        let day = floor_to(day_ms, DAY_MS);
        let block = floor_to(day, BLOCK_MS);
        let index = usize::try_from((day - block) / DAY_MS).unwrap_or(0);
        let blocks = match self.items.get_mut(item_id) {
            Some(blocks) => blocks,
            None => self.items.entry(item_id.to_owned()).or_default(),
        };
        let counts = blocks.entry((block, kind)).or_insert_with(|| {
            self.keys += 1;
            [0; BLOCK_DAYS]
        });
        counts[index] += n;
    }

    /// The (item, block, kind) keys held.
    fn len(&self) -> usize {
        self.keys
    }

    /// The keys in the order every fold writes them, with their counts.
    fn sorted(self) -> Vec<BlockRow> {
        let mut rows = Vec::with_capacity(self.keys);
        for (item_id, blocks) in self.items {
            rows.extend(
                blocks
                    .into_iter()
                    .map(|((block, kind), counts)| ((item_id.clone(), block, kind), counts)),
            );
        }
        rows.sort_unstable_by(|(a, _), (b, _)| a.cmp(b));
        rows
    }
}

/// The first byte of a block stored sparse (see `encode_block`).
const SPARSE: u8 = 1;

/// A block's counts as stored: the byte `SPARSE`, then for each day with
/// a count, its index (one byte) and its count (LEB128). A block of
/// history names a day or two, so a row is a few bytes, not 32 counts
/// (`decode_block` still reads rows written whole, as 32 big-endian 8-byte
/// integers, whose first byte is 0).
fn encode_block(counts: &[i64; BLOCK_DAYS]) -> Vec<u8> {
    let mut bytes = vec![SPARSE];
    for (day, &n) in counts.iter().enumerate().filter(|(_, n)| **n != 0) {
        bytes.push(day as u8);
        let mut rest = n as u64;
        while rest >= 0x80 {
            bytes.push((rest as u8 & 0x7f) | 0x80);
            rest >>= 7;
        }
        bytes.push(rest as u8);
    }
    bytes
}

/// The counts of a stored block, sparse or whole (days missing count 0;
/// a malformed value counts what could be read of it).
fn decode_block(bytes: &[u8]) -> [i64; BLOCK_DAYS] {
    let mut counts = [0; BLOCK_DAYS];
    let Some((&SPARSE, mut rest)) = bytes.split_first() else {
        for (n, chunk) in counts.iter_mut().zip(bytes.chunks_exact(8)) {
            *n = i64::from_be_bytes(chunk.try_into().unwrap_or_default());
        }
        return counts;
    };
    while let Some((&day, tail)) = rest.split_first() {
        let (mut n, mut shift) = (0u64, 0);
        rest = tail;
        while let Some((&byte, tail)) = rest.split_first() {
            rest = tail;
            n |= u64::from(byte & 0x7f).checked_shl(shift).unwrap_or(0);
            shift += 7;
            if byte & 0x80 == 0 {
                break;
            }
        }
        if let Some(count) = counts.get_mut(usize::from(day)) {
            *count += n as i64;
        }
    }
    counts
}

/// Adds `stored` (the blocks as they are) into `rows`, by key.
fn merge_stored(rows: &mut [BlockRow], stored: Vec<StoredBlock>) {
    for (item_id, block, kind, bytes) in stored {
        let key = (item_id, block, kind);
        if let Ok(i) = rows.binary_search_by(|(k, _)| k.cmp(&key)) {
            for (n, old) in rows[i].1.iter_mut().zip(decode_block(&bytes)) {
                *n += old;
            }
        }
    }
}

/// What one fold of the per-item counts did: pending rows folded from
/// memory (claimed) and read back (unclaimed), and claimed rows whose
/// counts were dropped from memory (another replica had folded some).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Folded {
    pub claimed: u64,
    pub unclaimed: u64,
    pub dropped: u64,
}

/// Per (item, block, kind) counts this process holds in memory at most
/// before it stops claiming batches (until the next fold).
const CLAIMED_KEYS: usize = 100_000;

/// The per-item counts of the batches this process stored whole since its
/// last fold, with the ids of their pending rows (PostgreSQL).
#[derive(Debug, Default)]
pub(super) struct Claims(std::sync::Mutex<Claimed>);

#[derive(Debug, Default)]
struct Claimed {
    ids: Vec<i64>,
    blocks: Blocks,
}

impl Claims {
    fn lock(&self) -> std::sync::MutexGuard<'_, Claimed> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether to claim the next batch (the counts held are bounded).
    pub(super) fn has_room(&self) -> bool {
        self.lock().blocks.len() < CLAIMED_KEYS
    }

    /// Adds a committed batch, every event of which was stored, whose
    /// pending row `id` was claimed: its events from `first_day` on, per
    /// item, day and kind.
    pub(super) fn claim(&self, id: i64, batch: &[&NewEvent], first_day: i64) {
        let mut claimed = self.lock();
        claimed.ids.push(id);
        for e in batch.iter().filter(|e| e.ts >= first_day) {
            claimed.blocks.add(&e.item_id, e.ts, e.kind.code(), 1);
        }
    }

    fn take(&self) -> Claimed {
        std::mem::take(&mut *self.lock())
    }
}

/// Folds what `claims` holds: deletes its rows by id and writes its counts,
/// or, if any row is gone, writes nothing (see `Store::fold_item_days`).
async fn fold_claimed(pool: &sqlx::PgPool, claims: &Claims, folded: &mut Folded) -> Result<()> {
    let claimed = claims.take();
    if claimed.ids.is_empty() {
        return Ok(());
    }
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(FOLD_KEY)
        .execute(&mut *tx)
        .await?;
    let deleted = sqlx::query("DELETE FROM item_days_pending WHERE id = ANY($1)")
        .bind(&claimed.ids)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    if deleted != claimed.ids.len() as u64 {
        tx.rollback().await?;
        folded.dropped += claimed.ids.len() as u64;
        return Ok(());
    }
    write_blocks_postgres(&mut tx, claimed.blocks.sorted()).await?;
    tx.commit().await?;
    folded.claimed += deleted;
    Ok(())
}

/// One transaction of `Store::fold_item_days` on PostgreSQL for the rows
/// nobody claims, or claimed before `claimed_before` (ms). A claimed row's
/// events (from `first_day` on) are counted again from `events`.
async fn fold_item_days_postgres(pool: &sqlx::PgPool, claimed_before: i64, first_day: i64) -> Result<u64> {
    let mut tx = pool.begin().await?;
    if !fold_lock(&mut tx, FOLD_KEY).await? {
        return Ok(0);
    }
    let pending: Vec<PendingRow> = sqlx::query_as(
        "DELETE FROM item_days_pending
         WHERE ctid = ANY(ARRAY(SELECT ctid FROM item_days_pending
                                WHERE claimed_at IS NULL OR claimed_at < $2 LIMIT $1))
         RETURNING items, days, kinds, ns, seq_min, seq_max, xmin::text::int8 AS xmin",
    )
    .bind(FOLD_ROWS)
    .bind(claimed_before)
    .fetch_all(&mut *tx)
    .await?;
    let folded = pending.len() as u64;
    let mut blocks = Blocks::default();
    // The claimed rows' ranges of `seq` and transactions.
    let (mut lows, mut highs, mut xmins) = (Vec::new(), Vec::new(), Vec::new());
    for row in pending {
        if let (Some(low), Some(high)) = (row.seq_min, row.seq_max) {
            lows.push(low);
            highs.push(high);
            xmins.push(row.xmin);
        }
        let (items, days) = (row.items.unwrap_or_default(), row.days.unwrap_or_default());
        let (kinds, ns) = (row.kinds.unwrap_or_default(), row.ns.unwrap_or_default());
        for (((item_id, day), kind), n) in items.into_iter().zip(days).zip(kinds).zip(ns) {
            blocks.add(&item_id, day, kind, n);
        }
    }
    if !lows.is_empty() {
        // The events a batch's transaction wrote in its range of `seq`
        // (others' may fall in it too: the sequence is shared).
        let counted: Vec<(String, i64, i16, i64)> = sqlx::query_as(
            "SELECT e.item_id, e.ts - e.ts % 86400000, e.kind, COUNT(*)
             FROM UNNEST($1::int8[], $2::int8[], $3::int8[]) AS p(lo, hi, x)
             CROSS JOIN LATERAL (SELECT item_id, ts, kind FROM events
                                 WHERE seq BETWEEN p.lo AND p.hi AND xmin::text::int8 = p.x AND ts >= $4) AS e
             GROUP BY 1, 2, 3",
        )
        .bind(&lows)
        .bind(&highs)
        .bind(&xmins)
        .bind(first_day)
        .fetch_all(&mut *tx)
        .await?;
        for (item_id, day, kind, n) in counted {
            blocks.add(&item_id, day, kind, n);
        }
    }
    write_blocks_postgres(&mut tx, blocks.sorted()).await?;
    tx.commit().await?;
    Ok(folded)
}

/// Adds `rows` to `item_blocks` (PostgreSQL): reads the blocks stored for
/// their keys, adds, writes them whole; chunks of 10,000 keys.
async fn write_blocks_postgres(tx: &mut sqlx::Transaction<'_, sqlx::Postgres>, mut rows: Vec<BlockRow>) -> Result<()> {
    const CHUNK: usize = 10_000;
    for chunk in rows.chunks_mut(CHUNK) {
        let items: Vec<String> = chunk.iter().map(|((i, _, _), _)| i.clone()).collect();
        let blocks: Vec<i64> = chunk.iter().map(|((_, b, _), _)| *b).collect();
        let kinds: Vec<i16> = chunk.iter().map(|((_, _, k), _)| *k).collect();
        let stored: Vec<StoredBlock> = sqlx::query_as(
            "SELECT b.item_id, b.block_ms, b.kind, b.counts
             FROM UNNEST($1::text[], $2::int8[], $3::int2[]) AS k(item_id, block_ms, kind)
             JOIN item_blocks AS b USING (item_id, block_ms, kind)",
        )
        .bind(&items)
        .bind(&blocks)
        .bind(&kinds)
        .fetch_all(&mut **tx)
        .await?;
        merge_stored(chunk, stored);
        let counts: Vec<Vec<u8>> = chunk.iter().map(|(_, c)| encode_block(c)).collect();
        sqlx::query(
            "INSERT INTO item_blocks (item_id, block_ms, kind, counts)
             SELECT * FROM UNNEST($1::text[], $2::int8[], $3::int2[], $4::bytea[])
             ON CONFLICT (item_id, block_ms, kind) DO UPDATE SET counts = EXCLUDED.counts",
        )
        .bind(&items)
        .bind(&blocks)
        .bind(&kinds)
        .bind(&counts)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

/// One transaction of `Store::fold_item_days` on SQLite (the one writer:
/// nothing is added meanwhile).
async fn fold_item_days_sqlite(write: &sqlx::SqlitePool) -> Result<u64> {
    const CHUNK: usize = 500;
    let mut tx = write.begin().await?;
    let pending: Vec<String> = sqlx::query_scalar(
        "DELETE FROM item_days_pending WHERE rowid IN (SELECT rowid FROM item_days_pending LIMIT $1)
         RETURNING counts",
    )
    .bind(FOLD_ROWS)
    .fetch_all(&mut *tx)
    .await?;
    let folded = pending.len() as u64;
    let mut blocks = Blocks::default();
    for counts in pending {
        let counts: Vec<(String, i64, i16, i64)> = serde_json::from_str(&counts).unwrap_or_default();
        for (item_id, day, kind, n) in counts {
            blocks.add(&item_id, day, kind, n);
        }
    }
    let mut rows = blocks.sorted();
    for chunk in rows.chunks_mut(CHUNK) {
        // A join from the keys, so that each is looked up by the primary
        // key (`(…) IN (VALUES …)` would scan the table for every chunk).
        let mut select = sqlx::QueryBuilder::<Sqlite>::new("WITH k (item_id, block_ms, kind) AS (");
        select.push_values(chunk.iter(), |mut row, ((item_id, block, kind), _)| {
            row.push_bind(item_id.as_str()).push_bind(*block).push_bind(*kind);
        });
        select.push(
            ") SELECT b.item_id, b.block_ms, b.kind, b.counts FROM k
             JOIN item_blocks AS b ON b.item_id = k.item_id AND b.block_ms = k.block_ms AND b.kind = k.kind",
        );
        let stored: Vec<StoredBlock> = select.build_query_as().fetch_all(&mut *tx).await?;
        merge_stored(chunk, stored);
        let mut upsert =
            sqlx::QueryBuilder::<Sqlite>::new("INSERT INTO item_blocks (item_id, block_ms, kind, counts) ");
        upsert.push_values(chunk.iter(), |mut row, ((item_id, block, kind), counts)| {
            row.push_bind(item_id.as_str())
                .push_bind(*block)
                .push_bind(*kind)
                .push_bind(encode_block(counts));
        });
        upsert.push(" ON CONFLICT (item_id, block_ms, kind) DO UPDATE SET counts = excluded.counts");
        upsert.build().execute(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok(folded)
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
    fn days_go_to_their_block_and_back() {
        let mut blocks = Blocks::default();
        let last_of_first = BLOCK_MS - DAY_MS;
        blocks.add("a", last_of_first, 0, 2);
        blocks.add("a", BLOCK_MS, 0, 3);
        blocks.add("a", last_of_first, 0, 1);
        blocks.add("a", -DAY_MS, 5, 4);
        let rows = blocks.sorted();
        let keys: Vec<_> = rows.iter().map(|((i, b, k), _)| (i.as_str(), *b, *k)).collect();
        assert_eq!(keys, [("a", -BLOCK_MS, 5), ("a", 0, 0), ("a", BLOCK_MS, 0)]);
        assert_eq!(rows[0].1[BLOCK_DAYS - 1], 4);
        assert_eq!(rows[1].1[BLOCK_DAYS - 1], 3);
        assert_eq!(rows[2].1[0], 3);
        let mut rows = rows;
        let stored = vec![
            ("a".to_owned(), 0, 0, encode_block(&rows[1].1)),
            ("b".to_owned(), 0, 0, vec![0; 256]),
        ];
        merge_stored(&mut rows, stored);
        assert_eq!(rows[1].1[BLOCK_DAYS - 1], 6, "added to what was stored");
        assert_eq!(rows[1].1.iter().sum::<i64>(), 6);
        assert_eq!(decode_block(&encode_block(&rows[1].1)), rows[1].1);
        assert_eq!(
            encode_block(&rows[0].1),
            [SPARSE, BLOCK_DAYS as u8 - 1, 4],
            "only the days counted"
        );
        assert_eq!(encode_block(&[0; BLOCK_DAYS]), [SPARSE]);
    }

    #[test]
    fn blocks_read_back_as_written_sparse_or_whole() {
        let mut counts = [0i64; BLOCK_DAYS];
        counts[0] = 1;
        counts[7] = 127;
        counts[8] = 128;
        counts[30] = 300_000;
        counts[31] = i64::MAX;
        let sparse = encode_block(&counts);
        assert_eq!(&sparse[..5], [SPARSE, 0, 1, 7, 127]);
        assert_eq!(&sparse[5..8], [8, 0x80, 0x01], "128 takes two bytes");
        assert_eq!(decode_block(&sparse), counts);
        // Rows written by earlier versions: 32 big-endian 8-byte counts.
        let whole: Vec<u8> = counts.iter().flat_map(|n| n.to_be_bytes()).collect();
        assert_eq!(decode_block(&whole), counts);
        assert_eq!(decode_block(&[]), [0; BLOCK_DAYS]);
        let mut cut = sparse.clone();
        cut.truncate(sparse.len() - 1);
        assert_eq!(
            decode_block(&cut)[..31],
            counts[..31],
            "a cut value keeps the days before the cut"
        );
    }

    #[test]
    fn a_claimed_batch_is_counted_per_item_day_and_kind() {
        use crate::domain::EventType;
        let event = |item: &str, kind: EventType, ts: i64| NewEvent {
            event_id: None,
            user_id: "u".into(),
            item_id: item.into(),
            kind,
            value: None,
            ts,
            timestamped: true,
            session_id: None,
            recommendation_id: None,
        };
        let day = 20_000 * DAY_MS;
        let events = [
            event("é-1", EventType::View, day + 5),
            event("é-1", EventType::View, day + 7),
            event("b", EventType::Purchase, day + DAY_MS),
            event("old", EventType::View, day - 1),
        ];
        let batch: Vec<&NewEvent> = events.iter().collect();
        let claims = Claims::default();
        claims.claim(7, &batch, day);
        claims.claim(9, &batch[3..], day);
        let claimed = claims.take();
        assert_eq!(claimed.ids, [7, 9]);
        let mut expected = Blocks::default();
        expected.add("é-1", day, 0, 2);
        expected.add("b", day + DAY_MS, 5, 1);
        assert_eq!(claimed.blocks.sorted(), expected.sorted());
        assert!(claims.take().ids.is_empty(), "taken once");
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
