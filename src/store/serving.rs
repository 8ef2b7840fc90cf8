//! What serving and the trainer read and write: a user's newest events,
//! catalogue changes, popularity, training runs, impressions and clicks.

use std::collections::HashMap;

use futures::stream::{BoxStream, StreamExt, TryStreamExt};
use sqlx::Row;

use super::stats::{count_clicks, count_impressions, hour_first};
use super::{Db, IdKind, Result, Store};
use crate::domain::{EventRow, Impression, ItemFlags, OnlineStats, TrainingOutcome, TrainingRun, UserEvent};

/// The unit separator: it ends each item id in `impressions.items`. Ids are
/// printable, so none contains it.
pub const ITEM_SEPARATOR: char = '\u{1f}';

/// A row of `trainings`: id, started, finished, outcome, reason, version,
/// replica, metrics.
type TrainingRow = (
    String,
    i64,
    Option<i64>,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
);
/// One event as churn prediction reads it: user (as stored), type code,
/// value, time, session (as stored).
pub type ChurnRow = (String, i16, Option<f64>, i64, Option<String>);

/// A row of `SELECT item_id, kind, value, ts, session_id, seq FROM events`.
pub(super) type UserEventRow = (String, i16, Option<f64>, i64, Option<String>, i64);

impl Store {
    /// The user's newest `limit` events, newest first (ties: later arrival
    /// first).
    pub async fn user_events(&self, user_id: &str, limit: i64) -> Result<Vec<UserEvent>> {
        const SELECT: &str = "SELECT item_id, kind, value, ts, session_id, seq FROM events
             WHERE user_id = $1 ORDER BY ts DESC, seq DESC LIMIT $2";
        let rows = on_pool!(self, pool => {
            sqlx::query_as::<_, UserEventRow>(SELECT)
                .bind(self.ids.seal(IdKind::User, user_id))
                .bind(limit)
                .fetch_all(pool)
                .await?
        });
        self.open_user_events(rows)
    }

    /// A user's events as read from `events` (item_id, kind, value, ts,
    /// session_id, seq), their session ids opened.
    pub(super) fn open_user_events(&self, rows: Vec<UserEventRow>) -> Result<Vec<UserEvent>> {
        rows.into_iter()
            .map(|(item_id, kind, value, ts, session_id, seq)| {
                Ok(UserEvent {
                    item_id,
                    kind,
                    value,
                    ts,
                    session_id: self.ids.open_opt(IdKind::Session, session_id)?,
                    seq,
                })
            })
            .collect()
    }

    /// Up to `limit` users with events from `since_ms` on, the most recently
    /// active first (by their newest event's timestamp). Reads the events
    /// of that window only.
    pub async fn recently_active_users(&self, limit: i64, since_ms: i64) -> Result<Vec<String>> {
        const SELECT: &str =
            "SELECT user_id FROM events WHERE ts >= $2 GROUP BY user_id ORDER BY MAX(ts) DESC, user_id LIMIT $1";
        let users = on_pool!(self, pool => sqlx::query_scalar::<_, String>(SELECT)
            .bind(limit)
            .bind(since_ms)
            .fetch_all(pool)
            .await?);
        self.open_users(users)
    }

    /// The shop's ids of stored user ids.
    fn open_users(&self, stored: Vec<String>) -> Result<Vec<String>> {
        Ok(stored
            .into_iter()
            .map(|u| self.ids.open(IdKind::User, u))
            .collect::<Result<_, _>>()?)
    }

    /// Items written at or after `since_ms` (catalogue writes and items first
    /// named by events), oldest change first; with `flagged_only`, only those
    /// unavailable, deleted, in a category or with a title, price or
    /// attributes (what a first load needs).
    pub async fn catalogue_changes(&self, since_ms: i64, flagged_only: bool) -> Result<Vec<ItemFlags>> {
        const SELECT: &str = "SELECT item_id, categories, available, deleted, updated_at, title, price, attributes
             FROM items
             WHERE updated_at >= $1 AND (NOT $2 OR deleted OR NOT available OR categories <> '[]'
               OR title IS NOT NULL OR price IS NOT NULL OR attributes <> '{}')
             ORDER BY updated_at";
        let rows = on_pool!(self, pool => {
            sqlx::query(SELECT).bind(since_ms).bind(flagged_only).fetch_all(pool).await?.into_iter().map(|row| ItemFlags {
                item_id: row.get("item_id"),
                categories: serde_json::from_str(row.get::<&str, _>("categories")).unwrap_or_default(),
                available: row.get("available"),
                deleted: row.get("deleted"),
                updated_at: row.get("updated_at"),
                title: row.get("title"),
                price: row.get("price"),
                attributes: serde_json::from_str(row.get::<&str, _>("attributes")).unwrap_or_default(),
            }).collect::<Vec<_>>()
        });
        Ok(rows)
    }

    /// Every item's primary (first) category, deleted items too: what the
    /// model learns categories from.
    pub async fn primary_categories(&self) -> Result<HashMap<String, String>> {
        const SELECT: &str = "SELECT item_id, categories FROM items WHERE categories <> '[]'";
        let rows = on_pool!(self, pool => {
            sqlx::query_as::<_, (String, String)>(SELECT).fetch_all(pool).await?
        });
        Ok(rows
            .into_iter()
            .filter_map(|(item, categories)| {
                let first = serde_json::from_str::<Vec<String>>(&categories)
                    .ok()?
                    .into_iter()
                    .next()?;
                Some((item, first))
            })
            .collect())
    }

    /// The newest catalogue change (ms), if any item exists.
    pub async fn newest_item_change_ms(&self) -> Result<Option<i64>> {
        let ts = on_pool!(self, pool => sqlx::query_scalar::<_, Option<i64>>("SELECT MAX(updated_at) FROM items")
            .fetch_one(pool)
            .await?);
        Ok(ts)
    }

    /// The newest event timestamp in the store, if any.
    pub async fn newest_event_ms(&self) -> Result<Option<i64>> {
        let ts = on_pool!(self, pool => sqlx::query_scalar::<_, Option<i64>>("SELECT MAX(ts) FROM events")
            .fetch_one(pool)
            .await?);
        Ok(ts)
    }

    /// The highest arrival number in the store (0 when empty).
    pub async fn max_event_seq(&self) -> Result<i64> {
        let seq = on_pool!(self, pool => sqlx::query_scalar::<_, Option<i64>>("SELECT MAX(seq) FROM events")
            .fetch_one(pool)
            .await?);
        Ok(seq.unwrap_or(0))
    }

    /// The users with events that arrived after arrival number `seq`, and
    /// the newest arrival number among them (`seq` when there are none).
    pub async fn users_with_events_after(&self, seq: i64) -> Result<(Vec<String>, i64)> {
        const SELECT: &str = "SELECT user_id, MAX(seq) FROM events WHERE seq > $1 GROUP BY user_id";
        let rows = on_pool!(self, pool => sqlx::query_as::<_, (String, i64)>(SELECT)
            .bind(seq)
            .fetch_all(pool)
            .await?);
        let newest = rows.iter().map(|(_, s)| *s).max().unwrap_or(seq);
        Ok((
            self.open_users(rows.into_iter().map(|(user, _)| user).collect())?,
            newest,
        ))
    }

    /// How many events arrived after arrival number `seq`.
    pub async fn count_events_after(&self, seq: i64) -> Result<i64> {
        let n = on_pool!(self, pool => sqlx::query_scalar("SELECT COUNT(*) FROM events WHERE seq > $1")
            .bind(seq)
            .fetch_one(pool)
            .await?);
        Ok(n)
    }

    /// Every event that arrived up to `max_seq`, in time order (ties in
    /// arrival order), all at once: for small stores and tests; training
    /// streams its window with `training_window`.
    pub async fn training_events_upto(&self, max_seq: i64) -> Result<Vec<EventRow>> {
        self.training_window(max_seq, i64::MIN).try_collect().await
    }

    /// The events of a training window in time order (ties in arrival
    /// order): arrivals up to `max_seq` with a timestamp from `since_ms`. A
    /// stream, so the reader holds one row at a time. User ids come as
    /// stored (encrypted with `id_key` if set): training only groups by
    /// them, and nothing it makes holds them.
    pub fn training_window(&self, max_seq: i64, since_ms: i64) -> BoxStream<'_, Result<EventRow>> {
        const SELECT: &str =
            "SELECT user_id, item_id, kind, ts FROM events WHERE seq <= $1 AND ts >= $2 ORDER BY ts, seq";
        on_pool!(self, pool => sqlx::query_as::<_, (String, String, i16, i64)>(SELECT)
            .bind(max_seq)
            .bind(since_ms)
            .fetch(pool)
            .map(|row| {
                let (user_id, item_id, kind, timestamp_ms) = row?;
                Ok(EventRow {
                    user_id,
                    item_id,
                    kind: kind as u8,
                    timestamp_ms,
                })
            })
            .boxed())
    }

    /// What churn prediction reads of a training window: each event's
    /// user (as stored), type, value, time and session (as stored; only
    /// compared), arrivals up to `max_seq` from `since_ms`. A stream.
    pub fn churn_window(&self, max_seq: i64, since_ms: i64) -> BoxStream<'_, Result<ChurnRow>> {
        const SELECT: &str = "SELECT user_id, kind, value, ts, session_id FROM events WHERE seq <= $1 AND ts >= $2";
        on_pool!(self, pool => sqlx::query_as::<_, ChurnRow>(SELECT)
            .bind(max_seq)
            .bind(since_ms)
            .fetch(pool)
            .map(|row| row.map_err(super::StoreError::from))
            .boxed())
    }

    /// The newest timestamp among arrivals up to `max_seq`, and the
    /// timestamp of the `n`-th newest of them (0: the newest), if there are
    /// that many: where a window of the newest events starts.
    pub async fn newest_timestamps(&self, max_seq: i64, n: u64) -> Result<(Option<i64>, Option<i64>)> {
        let offset = i64::try_from(n).unwrap_or(i64::MAX);
        let (newest, nth) = on_pool!(self, pool => {
            let newest: Option<i64> = sqlx::query_scalar("SELECT MAX(ts) FROM events WHERE seq <= $1")
                .bind(max_seq)
                .fetch_one(pool)
                .await?;
            let nth: Option<i64> = sqlx::query_scalar(
                "SELECT ts FROM events WHERE seq <= $1 ORDER BY ts DESC, seq DESC LIMIT 1 OFFSET $2",
            )
            .bind(max_seq)
            .bind(offset)
            .fetch_optional(pool)
            .await?;
            (newest, nth)
        });
        Ok((newest, nth))
    }

    /// Interactions per item with a timestamp at or after `since_ms`, each
    /// weighted by recency: an event `age` days older than `newest_ms`
    /// counts 1 / (1 + age / half_life_days)... precisely
    /// `half_life_days / (half_life_days + age_days)`, so an event one
    /// half-life old counts half. Best first.
    pub async fn popular_items(
        &self,
        since_ms: i64,
        newest_ms: i64,
        half_life_days: f64,
    ) -> Result<Vec<(String, f64)>> {
        const SELECT: &str = "SELECT item_id, SUM($3 / ($3 + ($2 - ts) / 86400000.0)) AS score FROM events
             WHERE ts >= $1 GROUP BY item_id ORDER BY score DESC, item_id";
        let rows = on_pool!(self, pool => {
            sqlx::query_as::<_, (String, f64)>(SELECT)
                .bind(since_ms)
                .bind(newest_ms)
                .bind(half_life_days)
                .fetch_all(pool)
                .await?
        });
        Ok(rows)
    }

    /// Records that a training run started.
    pub async fn start_training(&self, id: &str, started_at: i64, replica: &str) -> Result<()> {
        on_writer!(self, pool => sqlx::query(
            "INSERT INTO trainings (id, started_at, outcome, replica) VALUES ($1, $2, 'running', $3)",
        )
        .bind(id)
        .bind(started_at)
        .bind(replica)
        .execute(pool)
        .await
        .map(drop)?);
        Ok(())
    }

    /// Records how a training run ended (with its held-out figures as
    /// JSON, when it got that far), and forgets all but the newest 100.
    pub async fn finish_training(
        &self,
        id: &str,
        finished_at: i64,
        outcome: TrainingOutcome,
        reason: Option<&str>,
        version: Option<&str>,
        metrics: Option<&str>,
    ) -> Result<()> {
        on_writer!(self, pool => {
            sqlx::query(
                "UPDATE trainings SET finished_at = $2, outcome = $3, reason = $4, version = $5, metrics = $6
                 WHERE id = $1",
            )
                .bind(id)
                .bind(finished_at)
                .bind(outcome.name())
                .bind(reason)
                .bind(version)
                .bind(metrics)
                .execute(pool)
                .await?;
            sqlx::query(
                "DELETE FROM trainings WHERE id NOT IN (SELECT id FROM trainings ORDER BY started_at DESC LIMIT 100)",
            )
            .execute(pool)
            .await?;
        });
        Ok(())
    }

    /// The newest `limit` training runs, newest first.
    pub async fn trainings(&self, limit: i64) -> Result<Vec<TrainingRun>> {
        let rows = on_pool!(self, pool => {
            sqlx::query_as::<_, TrainingRow>(
                "SELECT id, started_at, finished_at, outcome, reason, version, replica, metrics FROM trainings
                 ORDER BY started_at DESC, id DESC LIMIT $1",
            )
            .bind(limit)
            .fetch_all(pool)
            .await?
        });
        Ok(rows
            .into_iter()
            .map(
                |(id, started_at, finished_at, outcome, reason, version, replica, metrics)| TrainingRun {
                    id,
                    started_at,
                    finished_at,
                    outcome: TrainingOutcome::parse(&outcome),
                    reason,
                    version,
                    replica,
                    metrics,
                },
            )
            .collect())
    }

    /// Marks every run still `running` as failed: called only when no
    /// training can be running (by the process that just took the training
    /// lock, or at the start of the one process an SQLite file has).
    pub async fn abandon_trainings(&self, now_ms: i64) -> Result<()> {
        on_writer!(self, pool => sqlx::query(
            "UPDATE trainings SET outcome = 'failed', reason = 'the process stopped during training', finished_at = $1
             WHERE outcome = 'running'",
        )
        .bind(now_ms)
        .execute(pool)
        .await
        .map(drop)?);
        Ok(())
    }

    /// Stores impressions in one statement per 1000, and in the same
    /// transaction adds them to the dashboard's answers per minute and
    /// version, with the clicks on them stored before them (a click that
    /// arrived before its answer was handed over; later clicks are counted
    /// by ingest).
    pub async fn record_impressions(&self, impressions: &[Impression]) -> Result<()> {
        let joined = |i: &Impression| {
            let mut s = String::new();
            for id in &i.item_ids {
                s.push_str(id);
                s.push(ITEM_SEPARATOR);
            }
            s
        };
        let first_minute = self.stats_keep().cutoffs(crate::clock::now_ms()).0;
        let shown_counts: std::collections::BTreeMap<(i64, String), (i64, i64)> =
            count_impressions(impressions, first_minute)
                .into_iter()
                .map(|(key, n)| (key, (n, 0)))
                .collect();
        let shown: HashMap<String, (String, String)> = impressions
            .iter()
            .map(|i| {
                (
                    i.recommendation_id.clone(),
                    (i.model_version.clone().unwrap_or_default(), joined(i)),
                )
            })
            .collect();
        // A click is at most this much older than its answer's creation
        // (collectors' clocks may run ahead).
        let oldest_click = impressions.iter().map(|i| i.created_at).min().unwrap_or(0) - crate::ingest::MAX_FUTURE_MS;
        on_writer!(self, pool => {
            let mut tx = pool.begin().await?;
            let mut clicked: Vec<(String, String, i64)> = Vec::new();
            for chunk in impressions.chunks(1000) {
                let mut insert =
                    sqlx::QueryBuilder::new("INSERT INTO impressions (recommendation_id, model_version, items, created_at) ");
                insert.push_values(chunk, |mut row, i| {
                    row.push_bind(i.recommendation_id.clone())
                        .push_bind(i.model_version.clone())
                        .push_bind(shown[&i.recommendation_id].1.clone())
                        .push_bind(i.created_at);
                });
                insert.push(" ON CONFLICT (recommendation_id) DO NOTHING");
                insert.build().execute(&mut *tx).await?;
                let mut select =
                    sqlx::QueryBuilder::new("SELECT recommendation_id, item_id, ts FROM events WHERE ts >= ");
                select.push_bind(oldest_click).push(" AND recommendation_id IN (");
                let mut ids = select.separated(", ");
                for i in chunk {
                    ids.push_bind(i.recommendation_id.clone());
                }
                select.push(")");
                clicked.extend(select.build_query_as::<(String, String, i64)>().fetch_all(&mut *tx).await?);
            }
            let click_counts = count_clicks(
                clicked.iter().map(|(r, i, ts)| (r.as_str(), i.as_str(), *ts)),
                &shown,
                first_minute,
            );
            // One upsert in the order every writer locks the rows in.
            let mut counts = shown_counts.clone();
            for (key, n) in click_counts {
                counts.entry(key).or_insert((0, 0)).1 += n;
            }
            let mut counts: Vec<_> = counts.into_iter().collect();
            hour_first(&mut counts);
            for chunk in counts.chunks(1000) {
                let mut upsert =
                    sqlx::QueryBuilder::new("INSERT INTO recommendation_minutes (minute_ms, version, impressions, clicks) ");
                upsert.push_values(chunk, |mut row, ((minute, version), (shown, clicks))| {
                    row.push_bind(*minute).push_bind(version.clone()).push_bind(*shown).push_bind(*clicks);
                });
                upsert.push(
                    " ON CONFLICT (minute_ms, version) DO UPDATE SET impressions = recommendation_minutes.impressions \
                     + excluded.impressions, clicks = recommendation_minutes.clicks + excluded.clicks",
                );
                upsert.build().execute(&mut *tx).await?;
            }
            tx.commit().await?;
        });
        Ok(())
    }

    /// Forgets impressions made before `before_ms`; returns how many.
    pub async fn forget_impressions(&self, before_ms: i64) -> Result<u64> {
        let n = on_writer!(self, pool => sqlx::query("DELETE FROM impressions WHERE created_at < $1")
            .bind(before_ms)
            .execute(pool)
            .await?
            .rows_affected());
        Ok(n)
    }

    /// Impressions and clicks per model version, oldest version first. A
    /// click is an event that carries a stored recommendation id and names
    /// one of its items.
    pub async fn online_stats(&self) -> Result<Vec<OnlineStats>> {
        const IMPRESSIONS: &str = "SELECT model_version, COUNT(*), MIN(created_at) FROM impressions
             GROUP BY model_version ORDER BY MIN(created_at)";
        let clicks_sql = match &self.db {
            Db::Postgres(_) => {
                "SELECT i.model_version, COUNT(*) FROM events e JOIN impressions i ON i.recommendation_id = e.recommendation_id
                 WHERE e.recommendation_id IS NOT NULL AND strpos(chr(31) || i.items, chr(31) || e.item_id || chr(31)) > 0
                 GROUP BY i.model_version"
            }
            Db::Sqlite(_) => {
                "SELECT i.model_version, COUNT(*) FROM events e JOIN impressions i ON i.recommendation_id = e.recommendation_id
                 WHERE e.recommendation_id IS NOT NULL AND instr(char(31) || i.items, char(31) || e.item_id || char(31)) > 0
                 GROUP BY i.model_version"
            }
        };
        let (shown, clicked) = on_pool!(self, pool => (
            sqlx::query_as::<_, (Option<String>, i64, i64)>(IMPRESSIONS).fetch_all(pool).await?,
            sqlx::query_as::<_, (Option<String>, i64)>(clicks_sql).fetch_all(pool).await?,
        ));
        Ok(shown
            .into_iter()
            .map(|(model_version, impressions, _)| OnlineStats {
                clicks: clicked.iter().find(|(v, _)| *v == model_version).map_or(0, |(_, n)| *n),
                model_version,
                impressions,
            })
            .collect())
    }

    /// The stored snapshot of `version`.
    /// The index stored with a snapshot: its metadata and bytes.
    pub async fn snapshot_index(&self, version: &str) -> Result<Option<(String, Vec<u8>)>> {
        let v = on_pool!(self, pool => sqlx::query_as::<_, (String, Vec<u8>)>(
            "SELECT meta, bytes FROM snapshot_indexes WHERE version = $1",
        )
        .bind(version)
        .fetch_optional(pool)
        .await?);
        Ok(v)
    }

    pub async fn snapshot_bytes(&self, version: &str) -> Result<Option<Vec<u8>>> {
        let v = on_pool!(self, pool => sqlx::query_scalar::<_, Vec<u8>>("SELECT bytes FROM snapshots WHERE version = $1")
            .bind(version)
            .fetch_optional(pool)
            .await?);
        Ok(v)
    }
}
