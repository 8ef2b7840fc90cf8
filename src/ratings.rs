//! Shopper satisfaction: rating events summarised per item, per category
//! and per shopper. Pure computation over sums the store makes
//! ([`RatingTotals`]) or over a user's events, so every number can be
//! checked by hand; docs/api.md (`GET /v1/items/{item_id}/stats`) says how
//! each is computed. Keep the two in step.
//!
//! The rules, shared by every figure:
//!
//! - only `rating` events with a value count;
//! - a user who rated the same item more than once counts once, with their
//!   newest rating (latest timestamp, then latest arrival), placed in time
//!   by that rating's timestamp: a changed mind replaces the old opinion;
//! - time is measured back from `as_of`, the newest event in the store, not
//!   the wall clock: the last 30 days are the ratings with a timestamp after
//!   `as_of − 30 d` (later than `as_of` included), the previous 30 days
//!   those after `as_of − 60 d` and at or before `as_of − 30 d`.

use std::collections::HashMap;

use serde::Serialize;
use utoipa::ToSchema;

use crate::domain::{EventType, RatingTotals, UserEvent};

/// The length of each of the two windows the trend compares (ms).
pub const WINDOW_MS: i64 = 30 * 86_400_000;

/// Where the two windows start, for ratings as of `as_of_ms`: ratings with
/// `ts > last_from` are in the last 30 days, those with
/// `previous_from < ts <= last_from` in the 30 days before.
pub fn window_starts(as_of_ms: i64) -> (i64, i64) {
    let last_from = as_of_ms.saturating_sub(WINDOW_MS);
    (last_from, last_from.saturating_sub(WINDOW_MS))
}

/// Ratings summarised: how many, their mean, and the same for the last 30
/// days and the 30 days before, with the trend between the two.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct RatingSummary {
    /// Ratings counted (each user's newest of the item; see docs/api.md).
    pub count: i64,
    /// Their mean, 1 to 5, rounded to 4 decimals; `null` when none.
    pub mean: Option<f64>,
    /// Ratings of the 30 days up to `as_of`.
    pub last_30_days: WindowSummary,
    /// Ratings of the 30 days before those.
    pub previous_30_days: WindowSummary,
    /// `last_30_days.mean − previous_30_days.mean`, rounded to 4 decimals;
    /// `null` when either window has no rating.
    pub trend: Option<f64>,
}

/// The ratings of one 30-day window.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, ToSchema)]
pub struct WindowSummary {
    pub count: i64,
    /// `null` when the window has no rating.
    pub mean: Option<f64>,
}

/// The summary of `totals`.
pub fn summarise(totals: &RatingTotals) -> RatingSummary {
    let last = window(totals.last_count, totals.last_sum);
    let previous = window(totals.previous_count, totals.previous_sum);
    let trend = match (
        mean(totals.last_count, totals.last_sum),
        mean(totals.previous_count, totals.previous_sum),
    ) {
        (Some(l), Some(p)) => Some(round4(l - p)),
        _ => None,
    };
    RatingSummary {
        count: totals.count,
        mean: mean(totals.count, totals.sum).map(round4),
        last_30_days: last,
        previous_30_days: previous,
        trend,
    }
}

fn window(count: i64, sum: f64) -> WindowSummary {
    WindowSummary {
        count,
        mean: mean(count, sum).map(round4),
    }
}

/// The mean, unrounded; `None` without ratings.
fn mean(count: i64, sum: f64) -> Option<f64> {
    (count > 0).then(|| sum / count as f64)
}

/// Per-item totals summed per category: an item counts fully in each of
/// its (distinct) categories; items without categories count nowhere.
/// `categories` gives an item's categories.
pub fn by_category<'a>(
    items: impl IntoIterator<Item = (&'a str, RatingTotals)>,
    categories: impl Fn(&str) -> Vec<String>,
) -> HashMap<String, RatingTotals> {
    let mut out: HashMap<String, RatingTotals> = HashMap::new();
    for (item_id, totals) in items {
        let mut seen = categories(item_id);
        seen.sort_unstable();
        seen.dedup();
        for category in seen {
            out.entry(category).or_default().add(&totals);
        }
    }
    out
}

/// A shopper's ratings as their profile shows them.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct UserRatings {
    /// Items the user rated (their newest rating of each counts).
    pub count: u64,
    /// The mean of those ratings, rounded to 4 decimals; `null` when none.
    pub mean: Option<f64>,
    /// The shop's mean rating over `stats_window` by the same rule (each
    /// user's newest rating of each item), rounded to 4 decimals; `null`
    /// when the shop has none or its figures are not computed yet.
    pub shop_mean: Option<f64>,
}

/// The user's ratings, each item's newest only (latest timestamp, then
/// latest arrival), against the shop's mean.
pub fn user_ratings(events: &[UserEvent], shop_mean: Option<f64>) -> UserRatings {
    let mut newest: HashMap<&str, (i64, i64, f64)> = HashMap::new();
    for e in events {
        let (Some(EventType::Rating), Some(value)) = (EventType::from_code(i64::from(e.kind)), e.value) else {
            continue;
        };
        let entry = newest.entry(e.item_id.as_str()).or_insert((e.ts, e.seq, value));
        if (e.ts, e.seq) > (entry.0, entry.1) {
            *entry = (e.ts, e.seq, value);
        }
    }
    let count = newest.len() as u64;
    let sum: f64 = newest.values().map(|&(_, _, v)| v).sum();
    UserRatings {
        count,
        mean: mean(count as i64, sum).map(round4),
        shop_mean: shop_mean.map(round4),
    }
}

fn round4(x: f64) -> f64 {
    (x * 10_000.0).round() / 10_000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400_000;

    fn rating(item: &str, value: f64, ts: i64, seq: i64) -> UserEvent {
        UserEvent {
            item_id: item.to_owned(),
            kind: EventType::Rating.code(),
            value: Some(value),
            ts,
            session_id: None,
            seq,
        }
    }

    #[test]
    fn windows_are_thirty_days_back_from_as_of() {
        let (last, previous) = window_starts(100 * DAY);
        assert_eq!((last, previous), (70 * DAY, 40 * DAY));
    }

    #[test]
    fn a_summary_has_means_and_a_trend() {
        // 5 and 4 in the last 30 days, 2 and 3 before, and an old 1.
        let totals = RatingTotals {
            count: 5,
            sum: 15.0,
            last_count: 2,
            last_sum: 9.0,
            previous_count: 2,
            previous_sum: 5.0,
        };
        let summary = summarise(&totals);
        assert_eq!(summary.count, 5);
        assert_eq!(summary.mean, Some(3.0));
        assert_eq!(
            summary.last_30_days,
            WindowSummary {
                count: 2,
                mean: Some(4.5)
            }
        );
        assert_eq!(
            summary.previous_30_days,
            WindowSummary {
                count: 2,
                mean: Some(2.5)
            }
        );
        assert_eq!(summary.trend, Some(2.0));

        let only_recent = summarise(&RatingTotals {
            count: 1,
            sum: 4.0,
            last_count: 1,
            last_sum: 4.0,
            ..RatingTotals::default()
        });
        assert_eq!(only_recent.trend, None);
        assert_eq!(only_recent.previous_30_days.mean, None);
        let none = summarise(&RatingTotals::default());
        assert_eq!((none.count, none.mean, none.trend), (0, None, None));
        // Thirds are rounded to 4 decimals.
        let thirds = summarise(&RatingTotals {
            count: 3,
            sum: 13.0,
            ..RatingTotals::default()
        });
        assert_eq!(thirds.mean, Some(4.3333));
    }

    #[test]
    fn categories_sum_their_items_once_each() {
        let a = RatingTotals {
            count: 2,
            sum: 9.0,
            ..RatingTotals::default()
        };
        let b = RatingTotals {
            count: 1,
            sum: 1.0,
            ..RatingTotals::default()
        };
        let categories = |item: &str| -> Vec<String> {
            match item {
                "a" => vec!["shoes".into(), "sale".into(), "shoes".into()],
                "b" => vec!["shoes".into()],
                _ => vec![],
            }
        };
        let rolled = by_category([("a", a), ("b", b), ("c", a)], categories);
        assert_eq!(rolled.len(), 2);
        assert_eq!((rolled["shoes"].count, rolled["shoes"].sum), (3, 10.0));
        assert_eq!((rolled["sale"].count, rolled["sale"].sum), (2, 9.0));
    }

    #[test]
    fn a_user_counts_their_newest_rating_of_each_item() {
        let events = [
            rating("a", 1.0, 10, 1),
            rating("a", 5.0, 20, 2),
            // Same time, later arrival: this one is the newest.
            rating("b", 2.0, 30, 3),
            rating("b", 3.0, 30, 4),
            UserEvent {
                kind: EventType::View.code(),
                value: None,
                ..rating("c", 0.0, 40, 5)
            },
        ];
        let ratings = user_ratings(&events, Some(3.123_456));
        assert_eq!(ratings.count, 2);
        assert_eq!(ratings.mean, Some(4.0));
        assert_eq!(ratings.shop_mean, Some(3.1235));
        assert_eq!(
            user_ratings(&events[4..], None),
            UserRatings {
                count: 0,
                mean: None,
                shop_mean: None
            }
        );
    }
}
