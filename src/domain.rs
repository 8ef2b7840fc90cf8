//! The words every layer shares: an event, an item, an impression, a
//! training run, the shop-wide statistics. The store reads and writes them,
//! profiles and ranking compute on them, the model takes `EventRow`s; none
//! of those layers needs another to name them.

use serde::Serialize;
use serde_json::{Map, Value};

/// The event types, in the order of their stored number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EventType {
    View = 0,
    Click = 1,
    Like = 2,
    AddToCart = 3,
    RemoveFromCart = 4,
    Purchase = 5,
    Rating = 6,
}

impl EventType {
    pub const ALL: [EventType; 7] = [
        EventType::View,
        EventType::Click,
        EventType::Like,
        EventType::AddToCart,
        EventType::RemoveFromCart,
        EventType::Purchase,
        EventType::Rating,
    ];

    pub fn name(self) -> &'static str {
        match self {
            EventType::View => "view",
            EventType::Click => "click",
            EventType::Like => "like",
            EventType::AddToCart => "add_to_cart",
            EventType::RemoveFromCart => "remove_from_cart",
            EventType::Purchase => "purchase",
            EventType::Rating => "rating",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.name() == name)
    }

    pub fn from_code(code: i64) -> Option<Self> {
        usize::try_from(code).ok().and_then(|i| Self::ALL.get(i).copied())
    }

    pub fn code(self) -> i16 {
        self as i16
    }
}

/// A validated event, ready to be stored.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    pub event_id: Option<String>,
    pub user_id: String,
    pub item_id: String,
    pub kind: EventType,
    pub value: Option<f64>,
    /// Milliseconds since the epoch, UTC.
    pub ts: i64,
    /// Whether the sender gave `ts` (else it is the server's clock at
    /// arrival, and a retry carries another): retries of such events are
    /// recognised by `event_id` for 24 hours.
    pub timestamped: bool,
    pub session_id: Option<String>,
    pub recommendation_id: Option<String>,
}

/// One event as the model sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct EventRow {
    pub user_id: String,
    pub item_id: String,
    /// The event type's code (`EventType::code`).
    pub kind: u8,
    pub timestamp_ms: i64,
}

/// A catalogue item as stored and served.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Item {
    pub item_id: String,
    pub title: Option<String>,
    /// The first is the item's primary category.
    pub categories: Vec<String>,
    pub price: Option<f64>,
    /// Unavailable items are never recommended.
    pub available: bool,
    /// Any JSON object, stored and returned as given.
    #[schema(value_type = Object)]
    pub attributes: Map<String, Value>,
}

/// One of a user's events, as serving and profiles read them.
#[derive(Debug, Clone, PartialEq)]
pub struct UserEvent {
    pub item_id: String,
    /// `EventType::code`.
    pub kind: i16,
    pub value: Option<f64>,
    /// Milliseconds since the epoch.
    pub ts: i64,
    pub session_id: Option<String>,
    /// Arrival order in the store.
    pub seq: i64,
}

/// An item's state as the recommendation filters need it, and the fields
/// answers may carry (`fields=`).
#[derive(Debug, Clone, PartialEq)]
pub struct ItemFlags {
    pub item_id: String,
    pub categories: Vec<String>,
    pub available: bool,
    pub deleted: bool,
    pub updated_at: i64,
    pub title: Option<String>,
    pub price: Option<f64>,
    pub attributes: Map<String, Value>,
}

/// One training run as `GET /v1/model` shows it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TrainingRun {
    pub id: String,
    pub started_at: i64,
    pub finished_at: Option<i64>,
    pub outcome: TrainingOutcome,
    pub reason: Option<String>,
    pub version: Option<String>,
    pub replica: Option<String>,
    /// The candidate's held-out figures as stored: the JSON of
    /// `model::snapshot::ModelMetrics`; none when it failed before it was
    /// evaluated.
    pub metrics: Option<String>,
}

/// A recommendations response, counted as one impression of its version.
#[derive(Debug, Clone, PartialEq)]
pub struct Impression {
    pub recommendation_id: String,
    pub model_version: Option<String>,
    pub item_ids: Vec<String>,
    pub created_at: i64,
}

/// Impressions and clicks of one model version (`None`: no model yet).
#[derive(Debug, Clone, PartialEq)]
pub struct OnlineStats {
    pub model_version: Option<String>,
    pub impressions: i64,
    pub clicks: i64,
}

/// What became of a training run, as stored in `trainings.outcome`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TrainingOutcome {
    /// Still training (or its process died: the next leader marks it failed).
    Running,
    Published,
    Rejected,
    Failed,
}

impl TrainingOutcome {
    pub fn name(self) -> &'static str {
        match self {
            TrainingOutcome::Running => "running",
            TrainingOutcome::Published => "published",
            TrainingOutcome::Rejected => "rejected",
            TrainingOutcome::Failed => "failed",
        }
    }

    /// The stored name back; an unknown one (a newer version's) reads as
    /// failed rather than breaking the history.
    pub fn parse(name: &str) -> Self {
        match name {
            "running" => TrainingOutcome::Running,
            "published" => TrainingOutcome::Published,
            "rejected" => TrainingOutcome::Rejected,
            _ => TrainingOutcome::Failed,
        }
    }
}

/// What the shop's users look like as a whole; each profile is scored
/// against it. Holds quantiles, a median and a mean, no single user's data.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ShopStats {
    /// The RFM quintile cuts; `None` when the store has no events.
    pub rfm_cuts: Option<RfmCuts>,
    /// The median of the usual gaps (ms) of users with two sessions or more;
    /// `None` when nobody has come back yet.
    pub usual_gap_ms: Option<f64>,
    /// The mean of the shop's ratings (each user's newest of each item);
    /// `None` when there are none.
    pub rating_mean: Option<f64>,
}

/// The four cuts between the fifths of the shop's users, for each RFM
/// measure: `cuts[k - 1]` is the value at ascending rank ⌈k·n/5⌉ of the n
/// users (see [`quintile_cuts`]).
#[derive(Debug, Clone, PartialEq)]
pub struct RfmCuts {
    /// Time of each user's newest event (ms since the epoch).
    pub last_seen_ms: [i64; 4],
    /// Sessions per user.
    pub sessions: [i64; 4],
    /// Purchase spend per user.
    pub spend: [f64; 4],
}

/// Sums of ratings, from which means are made (see `crate::ratings`): all
/// of them, those of the last 30 days and those of the 30 days before.
/// Each user's newest rating of an item counts, once.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RatingTotals {
    pub count: i64,
    pub sum: f64,
    pub last_count: i64,
    pub last_sum: f64,
    pub previous_count: i64,
    pub previous_sum: f64,
}

impl RatingTotals {
    /// Adds another item's totals (a category's are its items' summed).
    pub fn add(&mut self, other: &RatingTotals) {
        self.count += other.count;
        self.sum += other.sum;
        self.last_count += other.last_count;
        self.last_sum += other.last_sum;
        self.previous_count += other.previous_count;
        self.previous_sum += other.previous_sum;
    }
}
