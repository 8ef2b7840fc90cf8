//! The segment lists: every shopper's measures aggregated per user (in
//! batches of users, never all events at once), and the table of segments
//! the background job writes and `GET /v1/segments` reads.
//!
//! User ids are kept as the events table keeps them (sealed with `id_key`
//! when set); they are opened on the way out.

use sqlx::QueryBuilder;

use super::{Db, IdKind, Result, Store};
use crate::domain::EventType;
use crate::profile::Measures;

/// Per user of the next batch (the first `$2` users by stored id after
/// `$1`), over all their events, the numbers `crate::profile::score` takes:
/// first and last event, sessions (one per distinct `session_id`; events
/// without one start a new session when more than `$4` ms passed since the
/// user's previous such event), the median of the gaps between sessions (a
/// session's start minus the latest end of the user's earlier sessions, by
/// start then end, at least 0) and the purchase spend (`$3` is the purchase
/// type code), the events in all and per type code (0 to 6), the mean gap
/// and the gap before the latest session (by start, then end: of sessions
/// alike in both, the smallest gap, which is the one `crate::profile`
/// orders last). The same rules as `crate::profile::sessions` and the shop
/// statistics' query.
const USER_MEASURES: &str = concat!(
    "
WITH batch AS (
    SELECT DISTINCT user_id FROM events WHERE user_id > $1 ORDER BY user_id LIMIT $2
),
ev AS (
    SELECT e.user_id, e.ts, e.seq, e.session_id, e.kind, e.value
    FROM events e JOIN batch b ON b.user_id = e.user_id
),
",
    session_gaps_sql!("ev", "", "$4"),
    "median_gaps AS (
    SELECT user_id, CAST(AVG(gap) AS DOUBLE PRECISION) AS gap
    FROM ranked_gaps WHERE pos = (cnt + 1) / 2 OR pos = (cnt + 2) / 2
    GROUP BY user_id
),
latest_gaps AS (
    SELECT user_id, gap,
           RANK() OVER (PARTITION BY user_id ORDER BY start_ts DESC, end_ts DESC) AS latest
    FROM gaps
),
gap_stats AS (
    SELECT user_id, CAST(AVG(gap) AS DOUBLE PRECISION) AS mean_gap,
           MIN(CASE WHEN latest = 1 THEN gap END) AS last_gap
    FROM latest_gaps GROUP BY user_id
),
session_counts AS (
    SELECT user_id, COUNT(*) AS sessions FROM sessions GROUP BY user_id
),
per_user AS (
    SELECT user_id, MIN(ts) AS first_ts, MAX(ts) AS last_ts,
           CAST(SUM(CASE WHEN kind = $3 THEN COALESCE(value, 0) ELSE 0 END) AS DOUBLE PRECISION) AS spend,
           COUNT(*) AS events,
           SUM(CASE WHEN kind = 0 THEN 1 ELSE 0 END) AS k0, SUM(CASE WHEN kind = 1 THEN 1 ELSE 0 END) AS k1,
           SUM(CASE WHEN kind = 2 THEN 1 ELSE 0 END) AS k2, SUM(CASE WHEN kind = 3 THEN 1 ELSE 0 END) AS k3,
           SUM(CASE WHEN kind = 4 THEN 1 ELSE 0 END) AS k4, SUM(CASE WHEN kind = 5 THEN 1 ELSE 0 END) AS k5,
           SUM(CASE WHEN kind = 6 THEN 1 ELSE 0 END) AS k6
    FROM ev GROUP BY user_id
)
SELECT p.user_id, p.first_ts, p.last_ts, s.sessions, g.gap, p.spend, p.events,
       CAST(p.k0 AS BIGINT), CAST(p.k1 AS BIGINT), CAST(p.k2 AS BIGINT), CAST(p.k3 AS BIGINT),
       CAST(p.k4 AS BIGINT), CAST(p.k5 AS BIGINT), CAST(p.k6 AS BIGINT),
       t.mean_gap, CAST(t.last_gap AS DOUBLE PRECISION)
FROM per_user p
JOIN session_counts s ON s.user_id = p.user_id
LEFT JOIN median_gaps g ON g.user_id = p.user_id
LEFT JOIN gap_stats t ON t.user_id = p.user_id
ORDER BY p.user_id"
);

/// One user's computed segment, as the job writes it (`user_id` as stored).
#[derive(Debug, Clone)]
pub struct SegmentRow {
    pub user_id: String,
    pub segment: &'static str,
    pub churn_risk: f64,
    pub last_seen_ms: i64,
    pub recency: u8,
    pub frequency: u8,
    pub monetary: u8,
}

/// A member of a segment as the lists serve it: the shop's own id, and the
/// key to continue after it (the id as stored).
#[derive(Debug, Clone)]
pub struct SegmentMember {
    pub user_id: String,
    pub churn_risk: f64,
    pub last_seen_ms: i64,
    pub key: String,
}

/// A row of `USER_MEASURES`.
type MeasuresRow = (
    String,
    i64,
    i64,
    i64,
    Option<f64>,
    Option<f64>,
    i64,
    i64,
    i64,
    i64,
    i64,
    i64,
    i64,
    i64,
    Option<f64>,
    Option<f64>,
);

/// The user's id as stored and their measures.
fn measures_row(row: MeasuresRow) -> (String, Measures) {
    let (user_id, first_ms, last_ms, sessions, median_gap_ms, spend, events, k0, k1, k2, k3, k4, k5, k6, mean, last) =
        row;
    let measures = Measures {
        first_ms,
        last_ms,
        sessions,
        median_gap_ms,
        spend: spend.unwrap_or(0.0),
        events,
        by_type: [k0, k1, k2, k3, k4, k5, k6],
        mean_gap_ms: mean,
        last_gap_ms: last,
    };
    (user_id, measures)
}

impl Store {
    /// The measures of the next `limit` users (by stored id) after `after`
    /// (`""` for the first batch), each with their id as stored. Reads only
    /// those users' events.
    pub async fn user_measures(&self, after: &str, limit: i64, session_gap_ms: i64) -> Result<Vec<(String, Measures)>> {
        let rows = on_pool!(self, pool => {
            sqlx::query_as::<_, MeasuresRow>(USER_MEASURES)
                .bind(after)
                .bind(limit)
                .bind(EventType::Purchase.code())
                .bind(session_gap_ms)
                .fetch_all(pool)
                .await?
        });
        Ok(rows.into_iter().map(measures_row).collect())
    }

    /// Writes (or overwrites) the segments of `rows`, stamped `computed_at`.
    pub async fn write_segments(&self, rows: &[SegmentRow], computed_at: i64) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        const UPSERT: &str = " ON CONFLICT (user_id) DO UPDATE SET segment = excluded.segment, \
             churn_risk = excluded.churn_risk, last_seen = excluded.last_seen, recency = excluded.recency, \
             frequency = excluded.frequency, monetary = excluded.monetary, computed_at = excluded.computed_at";
        on_writer!(self, pool => {
            let mut insert = QueryBuilder::new(
                "INSERT INTO user_segments \
                 (user_id, segment, churn_risk, last_seen, recency, frequency, monetary, computed_at) ",
            );
            insert.push_values(rows, |mut b, row| {
                b.push_bind(&row.user_id)
                    .push_bind(row.segment)
                    .push_bind(row.churn_risk)
                    .push_bind(row.last_seen_ms)
                    .push_bind(i16::from(row.recency))
                    .push_bind(i16::from(row.frequency))
                    .push_bind(i16::from(row.monetary))
                    .push_bind(computed_at);
            });
            insert.push(UPSERT);
            insert.build().execute(pool).await?.rows_affected()
        });
        Ok(())
    }

    /// Ends a computation stamped `computed_at`: drops the rows it did not
    /// write (users whose events are gone) and those of users without
    /// events (erased while it ran). Returns how many went.
    pub async fn prune_segments(&self, computed_at: i64) -> Result<u64> {
        const DELETE: &str = "DELETE FROM user_segments WHERE computed_at < $1
             OR NOT EXISTS (SELECT 1 FROM events e WHERE e.user_id = user_segments.user_id)";
        let n = on_writer!(self, pool => sqlx::query(DELETE).bind(computed_at).execute(pool).await?.rows_affected());
        Ok(n)
    }

    /// Members per segment name (segments without members are absent).
    pub async fn segment_sizes(&self) -> Result<Vec<(String, i64)>> {
        const SELECT: &str = "SELECT segment, COUNT(*) FROM user_segments GROUP BY segment";
        let rows = on_pool!(self, pool => sqlx::query_as::<_, (String, i64)>(SELECT).fetch_all(pool).await?);
        Ok(rows)
    }

    /// How many shoppers have a churn risk in each tenth: bucket `k` holds
    /// risks in [k/10, (k+1)/10), the last one 1.0 as well.
    pub async fn churn_histogram(&self) -> Result<[i64; 10]> {
        const SELECT: &str = "SELECT CAST(LEAST(FLOOR(churn_risk * 10), 9) AS BIGINT) AS bucket, COUNT(*)
             FROM user_segments GROUP BY bucket";
        const SELECT_SQLITE: &str = "SELECT MIN(CAST(churn_risk * 10 AS INTEGER), 9) AS bucket, COUNT(*)
             FROM user_segments GROUP BY bucket";
        let rows = match &self.db {
            Db::Postgres(pool) => sqlx::query_as::<_, (i64, i64)>(SELECT).fetch_all(pool).await?,
            Db::Sqlite(sqlite) => {
                sqlx::query_as::<_, (i64, i64)>(SELECT_SQLITE)
                    .fetch_all(&sqlite.read)
                    .await?
            }
        };
        let mut buckets = [0; 10];
        for (bucket, users) in rows {
            buckets[bucket.clamp(0, 9) as usize] += users;
        }
        Ok(buckets)
    }

    /// Up to `limit` members of `segment` after the stored id `after`
    /// (`""` from the start), in stored-id order.
    pub async fn segment_members(&self, segment: &str, after: &str, limit: i64) -> Result<Vec<SegmentMember>> {
        const SELECT: &str = "SELECT user_id, churn_risk, last_seen FROM user_segments
             WHERE segment = $1 AND user_id > $2 ORDER BY user_id LIMIT $3";
        let rows = on_pool!(self, pool => {
            sqlx::query_as::<_, (String, f64, i64)>(SELECT)
                .bind(segment)
                .bind(after)
                .bind(limit)
                .fetch_all(pool)
                .await?
        });
        rows.into_iter()
            .map(|(key, churn_risk, last_seen_ms)| {
                Ok(SegmentMember {
                    user_id: self.ids.open(IdKind::User, key.clone())?,
                    churn_risk,
                    last_seen_ms,
                    key,
                })
            })
            .collect()
    }
}
