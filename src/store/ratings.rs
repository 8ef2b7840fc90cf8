//! Rating sums for shopper satisfaction (`crate::ratings` makes the means):
//! one item's, read per request through the partial index of ratings
//! (`events_item_ratings`, migration 0007); every rated item's and the
//! shop's, read in the background.
//!
//! Each user's newest rating of an item counts, once (latest `ts`, then
//! latest `seq`): `ROW_NUMBER() ... = 1` per user and item. Window
//! functions read the same in PostgreSQL and SQLite; `kind = 6` is written
//! out (not bound) so that the planner can use the partial index.

use super::{Db, Result, Store};
use crate::domain::RatingTotals;

/// The sums over the `newest` ratings: $1 is where the last 30 days start
/// (`ts > $1`), $2 where the 30 days before start (`$2 < ts <= $1`).
macro_rules! sums {
    () => {
        "CAST(COUNT(*) AS BIGINT) AS count,
         CAST(COALESCE(SUM(value), 0.0) AS DOUBLE PRECISION) AS sum,
         CAST(COALESCE(SUM(CASE WHEN ts > $1 THEN 1 ELSE 0 END), 0) AS BIGINT) AS last_count,
         CAST(COALESCE(SUM(CASE WHEN ts > $1 THEN value ELSE 0.0 END), 0.0) AS DOUBLE PRECISION) AS last_sum,
         CAST(COALESCE(SUM(CASE WHEN ts > $2 AND ts <= $1 THEN 1 ELSE 0 END), 0) AS BIGINT) AS previous_count,
         CAST(COALESCE(SUM(CASE WHEN ts > $2 AND ts <= $1 THEN value ELSE 0.0 END), 0.0) AS DOUBLE PRECISION)
             AS previous_sum"
    };
}

/// One item's ratings ($3), each user's newest.
const ITEM_RATINGS: &str = concat!(
    "WITH newest AS (
        SELECT value, ts, ROW_NUMBER() OVER (PARTITION BY user_id ORDER BY ts DESC, seq DESC) AS pos
        FROM events WHERE item_id = $3 AND kind = 6 AND value IS NOT NULL
    )
    SELECT ",
    sums!(),
    " FROM newest WHERE pos = 1"
);

/// Every rated item's ratings, each user's newest of each (partitioned in
/// the index's order, so SQLite sorts only within each pair).
const ALL_RATINGS: &str = concat!(
    "WITH newest AS (
        SELECT item_id, value, ts,
               ROW_NUMBER() OVER (PARTITION BY item_id, user_id ORDER BY ts DESC, seq DESC) AS pos
        FROM events WHERE kind = 6 AND value IS NOT NULL
    )
    SELECT item_id, ",
    sums!(),
    " FROM newest WHERE pos = 1 GROUP BY item_id"
);

/// The shop's ratings from $1 on, each user's newest of each item: a
/// pair's newest rating is in the window whenever any of its ratings is, so
/// filtering first counts the same ratings.
const SHOP_RATINGS: &str = "WITH newest AS (
        SELECT value, ROW_NUMBER() OVER (PARTITION BY user_id, item_id ORDER BY ts DESC, seq DESC) AS pos
        FROM events WHERE kind = 6 AND value IS NOT NULL AND ts >= $1
    )
    SELECT CAST(COUNT(*) AS BIGINT), CAST(SUM(value) AS DOUBLE PRECISION) FROM newest WHERE pos = 1";

type Sums = (i64, f64, i64, f64, i64, f64);

fn totals((count, sum, last_count, last_sum, previous_count, previous_sum): Sums) -> RatingTotals {
    RatingTotals {
        count,
        sum,
        last_count,
        last_sum,
        previous_count,
        previous_sum,
    }
}

impl Store {
    /// The ratings of one item: all of them, those after `last_from` and
    /// those after `previous_from` up to `last_from` (each user's newest
    /// only). Reads only the item's ratings, through their index.
    pub async fn item_ratings(&self, item_id: &str, last_from: i64, previous_from: i64) -> Result<RatingTotals> {
        let row = on_pool!(self, pool => sqlx::query_as::<_, Sums>(ITEM_RATINGS)
            .bind(last_from)
            .bind(previous_from)
            .bind(item_id)
            .fetch_one(pool)
            .await?);
        Ok(totals(row))
    }

    /// As [`Store::item_ratings`], for every rated item at once: a pass over
    /// all ratings, for the background, never per request.
    pub async fn ratings_by_item(&self, last_from: i64, previous_from: i64) -> Result<Vec<(String, RatingTotals)>> {
        let rows = on_pool!(self, pool => sqlx::query_as::<_, (String, i64, f64, i64, f64, i64, f64)>(ALL_RATINGS)
            .bind(last_from)
            .bind(previous_from)
            .fetch_all(pool)
            .await?);
        Ok(rows
            .into_iter()
            .map(|(item, a, b, c, d, e, f)| (item, totals((a, b, c, d, e, f))))
            .collect())
    }

    /// The count and mean of the shop's ratings from `since_ms` on (each
    /// user's newest of each item); the mean is `None` without ratings. A
    /// pass over those ratings, for the background.
    pub async fn shop_ratings(&self, since_ms: i64) -> Result<(i64, Option<f64>)> {
        let (count, sum) = on_pool!(self, pool => sqlx::query_as::<_, (i64, Option<f64>)>(SHOP_RATINGS)
            .bind(since_ms)
            .fetch_one(pool)
            .await?);
        Ok((count, sum.filter(|_| count > 0).map(|s| s / count as f64)))
    }
}
