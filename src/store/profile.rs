//! What profiles read besides a user's events: the categories of the items
//! they touched, and the shop-wide figures each profile is scored against.

use super::{Db, Result, Store};
use crate::domain::{EventType, RfmCuts, ShopStats};

/// Every user's sessions, gaps and RFM measures, reduced to the quintile
/// cuts and the median usual gap. The same rules as the profile's:
///
/// - `sessions`: one per distinct `session_id`; events without one start a
///   new session when more than $1 ms passed since the user's previous
///   such event;
/// - `gaps`: a session's start minus the latest end of the user's earlier
///   sessions (by start, then end), at least 0;
/// - `usual_gaps`: per user with a gap, the median gap, at least $2 ms;
/// - `ranked`: per user, the newest event, the session count and the spend
///   ($3 is the purchase type code), each ranked over all users;
/// - the result: for k = 1..4, the values at rank ⌈k·n/5⌉ (`(n·k + 4) / 5`
///   in integers), and on every row the median of the usual gaps.
///
/// Window functions and CTEs read the same in Postgres and SQLite.
const SHOP_STATS: &str = concat!(
    "\nWITH ",
    session_gaps_sql!("events", " AND ts >= $4", "$1"),
    "usual_gaps AS (
    SELECT CASE WHEN AVG(gap) < $2 THEN $2 ELSE AVG(gap) END AS usual
    FROM ranked_gaps WHERE pos = (cnt + 1) / 2 OR pos = (cnt + 2) / 2
    GROUP BY user_id
),
ranked_usual AS (
    SELECT usual, ROW_NUMBER() OVER (ORDER BY usual) AS pos, COUNT(*) OVER () AS cnt FROM usual_gaps
),
per_user AS (
    SELECT user_id, MAX(ts) AS last_ts,
           CAST(SUM(CASE WHEN kind = $3 THEN COALESCE(value, 0) ELSE 0 END) AS DOUBLE PRECISION) AS spend
    FROM events WHERE ts >= $4 GROUP BY user_id
),
session_counts AS (
    SELECT user_id, COUNT(*) AS sessions FROM sessions GROUP BY user_id
),
ranked AS (
    SELECT p.last_ts, s.sessions, p.spend,
           ROW_NUMBER() OVER (ORDER BY p.last_ts) AS r_rank,
           ROW_NUMBER() OVER (ORDER BY s.sessions) AS f_rank,
           ROW_NUMBER() OVER (ORDER BY p.spend) AS m_rank,
           COUNT(*) OVER () AS n
    FROM per_user p JOIN session_counts s ON s.user_id = p.user_id
),
fifths AS (
    SELECT 1 AS k UNION ALL SELECT 2 UNION ALL SELECT 3 UNION ALL SELECT 4
)
SELECT MAX(CASE WHEN r.r_rank = (r.n * f.k + 4) / 5 THEN r.last_ts END) AS last_ts,
       MAX(CASE WHEN r.f_rank = (r.n * f.k + 4) / 5 THEN r.sessions END) AS sessions,
       MAX(CASE WHEN r.m_rank = (r.n * f.k + 4) / 5 THEN r.spend END) AS spend,
       (SELECT AVG(usual) FROM ranked_usual WHERE pos = (cnt + 1) / 2 OR pos = (cnt + 2) / 2) AS usual_gap
FROM ranked r CROSS JOIN fifths f
GROUP BY f.k ORDER BY f.k"
);

impl Store {
    /// The shop-wide figures profiles are scored against: RFM quintile cuts
    /// over the users with events from `since_ms` on, and the median usual
    /// gap between their sessions, and the mean of their ratings. One pass
    /// over those events and one over their ratings: compute it in the
    /// background, never per request.
    ///
    /// `session_gap_ms`: events further apart than this (without session
    /// ids) are two sessions; `min_usual_gap_ms`: the least a user's usual
    /// gap can be. The profile's rules own both numbers.
    pub async fn shop_stats(&self, session_gap_ms: i64, min_usual_gap_ms: f64, since_ms: i64) -> Result<ShopStats> {
        let rows = on_pool!(self, pool => {
            sqlx::query_as::<_, (Option<i64>, Option<i64>, Option<f64>, Option<f64>)>(SHOP_STATS)
                .bind(session_gap_ms)
                .bind(min_usual_gap_ms)
                .bind(EventType::Purchase.code())
                .bind(since_ms)
                .fetch_all(pool)
                .await?
        });
        let usual_gap_ms = rows.first().and_then(|row| row.3);
        let cut = |k: usize| {
            rows.get(k)
                .and_then(|&(last, sessions, spend, _)| Some((last?, sessions?, spend?)))
        };
        let rfm_cuts = match [cut(0), cut(1), cut(2), cut(3)] {
            [Some(a), Some(b), Some(c), Some(d)] => Some(RfmCuts {
                last_seen_ms: [a.0, b.0, c.0, d.0],
                sessions: [a.1, b.1, c.1, d.1],
                spend: [a.2, b.2, c.2, d.2],
            }),
            _ => None,
        };
        let (_, rating_mean) = self.shop_ratings(since_ms).await?;
        Ok(ShopStats {
            rfm_cuts,
            usual_gap_ms,
            rating_mean,
        })
    }
}
