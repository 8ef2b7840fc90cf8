//! The dashboard's figures (read): `GET /v1/stats/events` and
//! `GET /v1/stats/recommendations` (series over the last hour, day or
//! week), `GET /v1/stats/overview`, `GET /v1/replicas` and
//! `GET /v1/items/{item_id}/activity`.
//!
//! The series read the per-minute and per-day counts the store keeps as
//! events and answers are recorded (`crate::store` `stats`), a few hundred
//! rows per request; the overview is counted in the background
//! (`crate::app`); nothing here scans the events. Series are
//! column-oriented: `t` holds the buckets' starts (ms since the epoch),
//! oldest first, and every other array has one number per bucket.

use std::collections::{BTreeMap, HashMap};

use axum::extract::{Path, Query, State};
use axum::Json;
use serde::Serialize;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::{ApiError, Problem};
use super::{ApiResult, AppState};
use crate::app::dashboard_healthy;
use crate::clock::{format_timestamp, now_ms};
use crate::domain::EventType;
use crate::store::{floor_to, DAY_MS};

/// Days of item activity unless `days` says otherwise, and the most.
pub const DEFAULT_DAYS: i64 = 30;
pub const MAX_DAYS: i64 = 365;

pub(super) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(event_stats))
        .routes(routes!(recommendation_stats))
        .routes(routes!(overview))
        .routes(routes!(replicas))
        .routes(routes!(item_activity))
}

type Params = HashMap<String, String>;

/// A series' span: its buckets' width and number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Range {
    Hour,
    Day,
    Week,
}

impl Range {
    fn parse(params: &Params) -> Result<Range, ApiError> {
        match params.get("range").map(String::as_str) {
            None | Some("hour") => Ok(Range::Hour),
            Some("day") => Ok(Range::Day),
            Some("week") => Ok(Range::Week),
            Some(_) => Err(ApiError::field("range", "must be hour, day or week")),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Range::Hour => "hour",
            Range::Day => "day",
            Range::Week => "week",
        }
    }

    /// (bucket width in seconds, buckets)
    fn shape(self) -> (i64, usize) {
        match self {
            Range::Hour => (60, 60),
            Range::Day => (900, 96),
            Range::Week => (3600, 168),
        }
    }

    /// The buckets' starts, ending with the one that holds the current
    /// minute (buckets start at multiples of their width since the epoch).
    fn buckets(self, now_ms: i64) -> Buckets {
        let (step_seconds, n) = self.shape();
        let step_ms = step_seconds * 1000;
        let last = floor_to(now_ms, step_ms);
        let first = last - (n as i64 - 1) * step_ms;
        Buckets {
            step_seconds,
            step_ms,
            t: (0..n as i64).map(|i| first + i * step_ms).collect(),
        }
    }
}

struct Buckets {
    step_seconds: i64,
    step_ms: i64,
    t: Vec<i64>,
}

impl Buckets {
    fn start_ms(&self) -> i64 {
        self.t[0]
    }

    fn to_ms(&self) -> i64 {
        self.t[self.t.len() - 1] + self.step_ms
    }

    /// The array index of a bucket number the store gave, if in range.
    fn index(&self, bucket: i64) -> Option<usize> {
        usize::try_from(bucket).ok().filter(|&i| i < self.t.len())
    }
}

/// The `range` query parameter.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
struct RangeQuery {
    /// `hour` (60 one-minute buckets), `day` (96 of 15 minutes) or `week`
    /// (168 of an hour), ending with the current minute.
    #[param(default = "hour")]
    range: Option<String>,
}

/// Counts per event type, one number per bucket.
#[derive(Serialize, ToSchema, Default)]
struct KindCounts {
    view: Vec<i64>,
    click: Vec<i64>,
    like: Vec<i64>,
    add_to_cart: Vec<i64>,
    remove_from_cart: Vec<i64>,
    purchase: Vec<i64>,
    rating: Vec<i64>,
}

impl KindCounts {
    fn zeros(n: usize) -> Self {
        let z = || vec![0; n];
        KindCounts {
            view: z(),
            click: z(),
            like: z(),
            add_to_cart: z(),
            remove_from_cart: z(),
            purchase: z(),
            rating: z(),
        }
    }

    fn series(&mut self, kind: EventType) -> &mut Vec<i64> {
        match kind {
            EventType::View => &mut self.view,
            EventType::Click => &mut self.click,
            EventType::Like => &mut self.like,
            EventType::AddToCart => &mut self.add_to_cart,
            EventType::RemoveFromCart => &mut self.remove_from_cart,
            EventType::Purchase => &mut self.purchase,
            EventType::Rating => &mut self.rating,
        }
    }
}

#[derive(Serialize, ToSchema)]
struct EventStats {
    /// `hour`, `day` or `week`.
    range: &'static str,
    /// Each bucket's width.
    step_seconds: i64,
    /// The buckets' starts (ms since the epoch), oldest first.
    t: Vec<i64>,
    /// Events per bucket by type, counted by each event's own timestamp.
    counts: KindCounts,
}

/// Events per type over the last hour, day or week.
///
/// Counted by each event's own `timestamp` (not its arrival) from the
/// per-minute counts kept at ingest; buckets without events are zeros.
#[utoipa::path(
    get,
    path = "/v1/stats/events",
    tag = "stats",
    params(RangeQuery),
    responses(
        (status = 200, description = "The series", body = EventStats),
        (status = 422, description = "`invalid-fields`: a bad `range`",
            body = Problem, content_type = "application/problem+json"),
    )
)]
async fn event_stats(State(state): State<AppState>, Query(params): Query<Params>) -> ApiResult<Json<EventStats>> {
    let range = Range::parse(&params)?;
    let buckets = range.buckets(now_ms());
    let rows = state
        .store
        .event_buckets(buckets.start_ms(), buckets.to_ms(), buckets.step_ms)
        .await?;
    let mut counts = KindCounts::zeros(buckets.t.len());
    for (bucket, kind, n) in rows {
        if let (Some(i), Some(kind)) = (buckets.index(bucket), EventType::from_code(kind.into())) {
            counts.series(kind)[i] += n;
        }
    }
    Ok(Json(EventStats {
        range: range.name(),
        step_seconds: buckets.step_seconds,
        t: buckets.t,
        counts,
    }))
}

/// One model version's answers and clicks per bucket.
#[derive(Serialize, ToSchema)]
struct VersionSeries {
    /// The model version that answered; `null` for answers before any
    /// model (popular items).
    version: Option<String>,
    /// Recommendations answers, by when they were made.
    impressions: Vec<i64>,
    /// Clicks on an item an answer showed (events carrying its
    /// `recommendation_id`), by the click's timestamp.
    clicks: Vec<i64>,
}

#[derive(Serialize, ToSchema)]
struct RecommendationStats {
    range: &'static str,
    step_seconds: i64,
    t: Vec<i64>,
    /// The versions with answers or clicks in the range (`null` first,
    /// then oldest version first).
    versions: Vec<VersionSeries>,
}

/// Recommendation answers and clicks per model version over the last hour,
/// day or week.
///
/// From per-minute counts kept as answers are recorded (each replica hands
/// its answers to the store about once a second) and clicks arrive.
#[utoipa::path(
    get,
    path = "/v1/stats/recommendations",
    tag = "stats",
    params(RangeQuery),
    responses(
        (status = 200, description = "The series", body = RecommendationStats),
        (status = 422, description = "`invalid-fields`: a bad `range`",
            body = Problem, content_type = "application/problem+json"),
    )
)]
async fn recommendation_stats(
    State(state): State<AppState>,
    Query(params): Query<Params>,
) -> ApiResult<Json<RecommendationStats>> {
    let range = Range::parse(&params)?;
    let buckets = range.buckets(now_ms());
    let rows = state
        .store
        .recommendation_buckets(buckets.start_ms(), buckets.to_ms(), buckets.step_ms)
        .await?;
    let n = buckets.t.len();
    // `None` sorts first, versions (timestamps) oldest first.
    let mut versions: BTreeMap<Option<String>, (Vec<i64>, Vec<i64>)> = BTreeMap::new();
    for (bucket, version, impressions, clicks) in rows {
        let Some(i) = buckets.index(bucket) else { continue };
        let (shown, clicked) = versions.entry(version).or_insert_with(|| (vec![0; n], vec![0; n]));
        shown[i] += impressions;
        clicked[i] += clicks;
    }
    Ok(Json(RecommendationStats {
        range: range.name(),
        step_seconds: buckets.step_seconds,
        t: buckets.t,
        versions: versions
            .into_iter()
            .map(|(version, (impressions, clicks))| VersionSeries {
                version,
                impressions,
                clicks,
            })
            .collect(),
    }))
}

/// Distinct shoppers with an event in each window.
#[derive(Serialize, ToSchema)]
struct ActiveUsers {
    hour: i64,
    day: i64,
    week: i64,
}

/// What the store holds.
#[derive(Serialize, ToSchema)]
struct StoreFigures {
    /// Events stored (on PostgreSQL past a million, the planner's estimate).
    events: i64,
    /// Shoppers with events (on PostgreSQL past a million events, those the
    /// last segments computation placed).
    users: i64,
    /// Items in the catalogue, deleted ones not counted.
    items: i64,
    /// The database's size on disk.
    bytes: i64,
}

#[derive(Serialize, ToSchema)]
struct OverviewBody {
    active_users: ActiveUsers,
    store: StoreFigures,
    /// Events with a timestamp in the last 60 minutes (the current one
    /// included), from the per-minute counts.
    events_last_hour: i64,
    /// When `active_users` and `store` were counted (every
    /// `overview_refresh`); `null` until the first count after start, when
    /// those are zeros.
    computed_at: Option<String>,
}

/// Active shoppers, what the store holds, events in the last hour.
///
/// Active shoppers and the store's counts are counted in the background
/// every `overview_refresh` and answered from memory.
#[utoipa::path(
    get,
    path = "/v1/stats/overview",
    tag = "stats",
    responses((status = 200, description = "The overview", body = OverviewBody))
)]
async fn overview(State(state): State<AppState>) -> ApiResult<Json<OverviewBody>> {
    let buckets = Range::Hour.buckets(now_ms());
    let events_last_hour = state
        .store
        .event_buckets(
            buckets.start_ms(),
            buckets.to_ms(),
            buckets.to_ms() - buckets.start_ms(),
        )
        .await?
        .into_iter()
        .map(|(_, _, n)| n)
        .sum();
    let counted = state.app.overview();
    let active = counted.map_or([0; 3], |o| o.active_users);
    let store = counted.map(|o| o.store).unwrap_or_default();
    Ok(Json(OverviewBody {
        active_users: ActiveUsers {
            hour: active[0],
            day: active[1],
            week: active[2],
        },
        store: StoreFigures {
            events: store.events,
            users: store.users,
            items: store.items,
            bytes: store.bytes,
        },
        events_last_hour,
        computed_at: counted.map(|o| format_timestamp(o.computed_at_ms)),
    }))
}

/// One replica, as its last heartbeat says.
#[derive(Serialize, ToSchema)]
struct ReplicaBody {
    /// Host, process id and a random suffix (as training runs name it).
    id: String,
    started_at: String,
    heartbeat_at: String,
    /// Seconds since its last heartbeat (by this replica's clock).
    age_seconds: f64,
    /// Whether its last heartbeat is at most three `heartbeat_interval`s
    /// old.
    healthy: bool,
    /// The model version it served then; `null` before any.
    version: Option<String>,
    /// Whether it schedules trainings (the leader).
    trainer: bool,
    /// Whether it was training.
    training: bool,
}

#[derive(Serialize, ToSchema)]
struct Replicas {
    /// In order of start; those silent for a day are removed.
    replicas: Vec<ReplicaBody>,
}

/// The replicas serving this store and their health.
///
/// Every replica writes a heartbeat row in the store every
/// `heartbeat_interval` (10 s); rows a day old are removed.
#[utoipa::path(
    get,
    path = "/v1/replicas",
    tag = "stats",
    responses((status = 200, description = "The replicas", body = Replicas))
)]
async fn replicas(State(state): State<AppState>) -> ApiResult<Json<Replicas>> {
    let now = now_ms();
    let interval = state.settings.heartbeat_interval;
    let replicas = state
        .store
        .replicas()
        .await?
        .into_iter()
        .map(|r| {
            let age_ms = (now - r.heartbeat_at_ms).max(0);
            ReplicaBody {
                id: r.id,
                started_at: format_timestamp(r.started_at_ms),
                heartbeat_at: format_timestamp(r.heartbeat_at_ms),
                age_seconds: age_ms as f64 / 1000.0,
                healthy: dashboard_healthy(age_ms, interval),
                version: r.version,
                trainer: r.trainer,
                training: r.training,
            }
        })
        .collect();
    Ok(Json(Replicas { replicas }))
}

/// The `days` query parameter.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
struct DaysQuery {
    /// Days, ending with today (UTC).
    #[param(minimum = 1, maximum = 365, default = 30)]
    days: Option<u32>,
}

#[derive(Serialize, ToSchema)]
struct ItemActivity {
    item_id: String,
    /// 86400: one bucket a day.
    step_seconds: i64,
    /// The days' starts (midnight UTC, ms since the epoch), oldest first.
    t: Vec<i64>,
    /// The item's events per day by type, by each event's own timestamp.
    counts: KindCounts,
}

fn parse_days(params: &Params) -> Result<i64, ApiError> {
    match params.get("days") {
        None => Ok(DEFAULT_DAYS),
        Some(text) => match text.parse::<i64>() {
            Ok(n) if (1..=MAX_DAYS).contains(&n) => Ok(n),
            _ => Err(ApiError::field(
                "days",
                format!("must be an integer from 1 to {MAX_DAYS}"),
            )),
        },
    }
}

/// An item's events per day.
///
/// From the per-item, per-day counts kept at ingest; days without events
/// are zeros.
#[utoipa::path(
    get,
    path = "/v1/items/{item_id}/activity",
    tag = "stats",
    params(("item_id" = String, Path, description = "The item"), DaysQuery),
    responses(
        (status = 200, description = "The item's activity", body = ItemActivity),
        (status = 404, description = "`not-found`: no such item (or deleted)",
            body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`invalid-fields`: a bad `days`",
            body = Problem, content_type = "application/problem+json"),
    )
)]
async fn item_activity(
    State(state): State<AppState>,
    Path(item_id): Path<String>,
    Query(params): Query<Params>,
) -> ApiResult<Json<ItemActivity>> {
    let days = parse_days(&params)?;
    if state.store.get_item(&item_id).await?.is_none() {
        return Err(ApiError::NotFound(format!("no item {item_id:?}")));
    }
    let today = floor_to(now_ms(), DAY_MS);
    let first = today - (days - 1) * DAY_MS;
    let t: Vec<i64> = (0..days).map(|i| first + i * DAY_MS).collect();
    let mut counts = KindCounts::zeros(t.len());
    for (day, kind, n) in state.store.item_activity(&item_id, first).await? {
        let i = (day - first) / DAY_MS;
        if let (Ok(i), Some(kind)) = (usize::try_from(i), EventType::from_code(kind.into())) {
            if i < t.len() {
                counts.series(kind)[i] += n;
            }
        }
    }
    Ok(Json(ItemActivity {
        item_id,
        step_seconds: DAY_MS / 1000,
        t,
        counts,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MINUTE_MS;

    #[test]
    fn buckets_end_with_the_current_minute() {
        let now = 1_700_000_123_456;
        for range in [Range::Hour, Range::Day, Range::Week] {
            let b = range.buckets(now);
            let (step, n) = range.shape();
            assert_eq!(b.t.len(), n);
            assert!(b.t[n - 1] <= floor_to(now, MINUTE_MS) && floor_to(now, MINUTE_MS) < b.to_ms());
            assert!(b.t.windows(2).all(|w| w[1] - w[0] == step * 1000));
        }
    }
}
