//! A shopper's profile, computed from their events: counts by type, sessions,
//! favourite categories, recent items, purchases, ratings against the
//! shop's, RFM scores, churn risk and a segment.
//!
//! Everything here is a pure function over a slice of events, so each number
//! can be checked by hand. The store supplies the events, the categories of
//! their items and the shop-wide figures the scores are relative to
//! ([`ShopStats`], one aggregate query over all users); `GET
//! /v1/users/{user_id}/profile` fetches those and calls [`build_profile`].
//! docs/api.md ("Profiles") says how every number is computed; keep
//! the two in step.
//!
//! Time is measured back from `as_of`, the newest event in the store, not the
//! wall clock, so an imported history reads as if it were live.

use std::collections::{HashMap, HashSet};

use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};
use utoipa::openapi::schema::{AdditionalProperties, ObjectBuilder, Schema, SchemaFormat, Type};
use utoipa::openapi::{KnownFormat, RefOr};
use utoipa::{PartialSchema, ToSchema};

pub use crate::churn::ChurnMethod;
use crate::churn::ChurnModel;
use crate::clock::format_timestamp;
use crate::domain::{EventType, RfmCuts, ShopStats, UserEvent};
use crate::ratings::{user_ratings, UserRatings};

/// Events without a `session_id` more than this far apart are in different
/// sessions.
pub const SESSION_GAP_MS: i64 = 30 * 60 * 1000;
/// A usual gap is never taken as shorter than a session gap: two sessions
/// closer than that are one visit as far as absence goes.
pub const MIN_USUAL_GAP_MS: f64 = SESSION_GAP_MS as f64;
/// The usual gap when neither the user nor anyone in the shop has come back
/// yet.
pub const DEFAULT_USUAL_GAP_MS: f64 = 7.0 * DAY_MS;
/// Milliseconds in a day.
pub const DAY_MS: f64 = 86_400_000.0;
/// How many favourite categories a profile lists.
pub const FAVOURITE_CATEGORIES: usize = 5;
/// How many recent items a profile lists.
pub const RECENT_ITEMS: usize = 10;
/// A user first seen less than this many days before `as_of` is `new`
/// (unless already at risk or lost).
pub const NEW_USER_DAYS: f64 = 30.0;
/// Churn risk from which a user is `at_risk` (away twice their usual gap).
pub const AT_RISK: f64 = 0.5;
/// Churn risk from which a user is `lost` (away four times their usual gap).
pub const LOST: f64 = 0.75;

/// One visit: the time of its first and of its last event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Session {
    pub start: i64,
    pub end: i64,
}

/// The profile as `GET /v1/users/{user_id}/profile` serves it.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct Profile {
    pub user_id: String,
    /// The newest event in the store: "now" for every duration below.
    pub as_of: String,
    pub events: EventCounts,
    pub first_seen: String,
    pub last_seen: String,
    pub sessions: usize,
    pub favourite_categories: Vec<CategoryWeight>,
    pub recent_items: Vec<RecentItem>,
    pub purchases: Purchases,
    /// The user's mean rating against the shop's.
    pub ratings: UserRatings,
    pub rfm: Rfm,
    pub churn: Churn,
    pub segment: Segment,
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct EventCounts {
    pub total: u64,
    pub by_type: TypeCounts,
}

/// Events per type, indexed by `EventType::code`. Serialised as an object
/// with every type, in code order, 0 when none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TypeCounts(pub [u64; 7]);

impl TypeCounts {
    pub fn get(&self, kind: EventType) -> u64 {
        self.0[kind as usize]
    }
}

impl Serialize for TypeCounts {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(EventType::ALL.len()))?;
        for kind in EventType::ALL {
            map.serialize_entry(kind.name(), &self.get(kind))?;
        }
        map.end()
    }
}

/// The schema says what `Serialize` writes: every type, each a count.
impl PartialSchema for TypeCounts {
    fn schema() -> RefOr<Schema> {
        let count = || {
            ObjectBuilder::new()
                .schema_type(Type::Integer)
                .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int64)))
                .minimum(Some(0))
        };
        EventType::ALL
            .into_iter()
            .fold(
                ObjectBuilder::new().additional_properties(Some(AdditionalProperties::FreeForm(false))),
                |object, kind| object.property(kind.name(), count()).required(kind.name()),
            )
            .into()
    }
}

impl ToSchema for TypeCounts {}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct CategoryWeight {
    pub category: String,
    pub weight: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct RecentItem {
    pub item_id: String,
    #[serde(rename = "type")]
    #[schema(value_type = EventType)]
    pub kind: &'static str,
    pub timestamp: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct Purchases {
    pub count: u64,
    pub spend: f64,
}

/// Scores from 1 (the shop's lowest fifth) to 5 (its highest), with the
/// measures they score.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct Rfm {
    pub recency: u8,
    pub frequency: u8,
    pub monetary: u8,
    pub recency_days: f64,
    pub frequency_sessions: usize,
    pub monetary_spend: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct Churn {
    pub risk: f64,
    pub days_since_last: f64,
    pub usual_gap_days: f64,
    pub usual_gap_source: GapSource,
    /// Where `risk` comes from: the classifier of the served model's
    /// training when it beat the formula on its holdout, else the formula.
    pub method: ChurnMethod,
}

/// Where a user's usual gap comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum GapSource {
    /// The median of the user's own gaps between sessions.
    User,
    /// One session only: the shop's median usual gap.
    Shop,
    /// Nobody in the shop has come back yet: [`DEFAULT_USUAL_GAP_MS`].
    Default,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Segment {
    Lost,
    AtRisk,
    New,
    Champion,
    Loyal,
    Occasional,
}

impl Segment {
    /// Every segment, in the order its rule is tried.
    pub const ALL: [Segment; 6] = [
        Segment::Lost,
        Segment::AtRisk,
        Segment::New,
        Segment::Champion,
        Segment::Loyal,
        Segment::Occasional,
    ];

    /// The snake_case name the API uses.
    pub fn name(self) -> &'static str {
        match self {
            Segment::Lost => "lost",
            Segment::AtRisk => "at_risk",
            Segment::New => "new",
            Segment::Champion => "champion",
            Segment::Loyal => "loyal",
            Segment::Occasional => "occasional",
        }
    }

    pub fn from_name(name: &str) -> Option<Segment> {
        Segment::ALL.into_iter().find(|s| s.name() == name)
    }

    /// The segment's rule, as [`segment`] applies it: the first that holds.
    pub fn rule(self) -> &'static str {
        match self {
            Segment::Lost => "churn risk >= 0.75",
            Segment::AtRisk => "not lost, churn risk >= 0.5",
            Segment::New => "none of the above, first seen less than 30 days before as_of",
            Segment::Champion => "none of the above, recency, frequency and monetary scores all >= 4",
            Segment::Loyal => "none of the above, frequency score >= 4",
            Segment::Occasional => "none of the above",
        }
    }
}

/// The profile of a user from their events (any order), or `None` when
/// there are none. `categories` maps item ids to their catalogue
/// categories; `as_of_ms` is the newest event in the store (a newer event of
/// the user's own moves it forward).
pub fn build_profile(
    user_id: &str,
    events: &[UserEvent],
    categories: &HashMap<String, Vec<String>>,
    shop: &ShopStats,
    as_of_ms: i64,
    churn: Option<&ChurnModel>,
) -> Option<Profile> {
    let first_ms = events.iter().map(|e| e.ts).min()?;
    let last_ms = events.iter().map(|e| e.ts).max()?;

    let by_type = count_by_type(events);
    let purchases = purchases(events);
    let sessions = sessions(events);
    let measures = measures_of(events, &sessions, &by_type, purchases.spend)?;
    let Scores {
        as_of_ms,
        rfm,
        risk,
        churn_method,
        usual_gap_ms,
        usual_gap_source,
        segment,
    } = score(&measures, shop, as_of_ms, churn);
    let since_last_ms = (as_of_ms - last_ms) as f64;

    Some(Profile {
        user_id: user_id.to_owned(),
        as_of: format_timestamp(as_of_ms),
        events: EventCounts {
            total: by_type.0.iter().sum(),
            by_type,
        },
        first_seen: format_timestamp(first_ms),
        last_seen: format_timestamp(last_ms),
        sessions: sessions.len(),
        favourite_categories: favourite_categories(events, categories, FAVOURITE_CATEGORIES),
        recent_items: recent_items(events, RECENT_ITEMS),
        purchases: Purchases {
            count: purchases.count,
            spend: round4(purchases.spend),
        },
        ratings: user_ratings(events, shop.rating_mean),
        rfm,
        churn: Churn {
            risk: round4(risk),
            days_since_last: round4(since_last_ms / DAY_MS),
            usual_gap_days: round4(usual_gap_ms / DAY_MS),
            usual_gap_source,
            method: churn_method,
        },
        segment,
    })
}

/// What the scores of a user are computed from: the same numbers whether
/// they come from the user's events ([`build_profile`]) or from the store's
/// per-user aggregate (the segment lists, `Store::user_measures`).
#[derive(Debug, Clone, PartialEq)]
pub struct Measures {
    /// The user's oldest and newest event (ms since the epoch).
    pub first_ms: i64,
    pub last_ms: i64,
    /// Sessions, by [`sessions`].
    pub sessions: i64,
    /// The median of the user's gaps between sessions ([`session_gaps`]);
    /// `None` with one session.
    pub median_gap_ms: Option<f64>,
    /// The sum of the user's purchase amounts.
    pub spend: f64,
    /// The user's events, in all and per type (indexed by `EventType::code`).
    pub events: i64,
    pub by_type: [i64; 7],
    /// The mean of the gaps between sessions, and the gap before the
    /// latest session (by start, then end); `None` with one session.
    pub mean_gap_ms: Option<f64>,
    pub last_gap_ms: Option<f64>,
}

/// A user's [`Measures`] from their events (any order); `None` without
/// events.
pub fn measures(events: &[UserEvent]) -> Option<Measures> {
    measures_of(
        events,
        &sessions(events),
        &count_by_type(events),
        purchases(events).spend,
    )
}

fn measures_of(events: &[UserEvent], sessions: &[Session], by_type: &TypeCounts, spend: f64) -> Option<Measures> {
    let first_ms = events.iter().map(|e| e.ts).min()?;
    let last_ms = events.iter().map(|e| e.ts).max()?;
    let gaps: Vec<f64> = session_gaps(sessions).iter().map(|&g| g as f64).collect();
    let mean_gap_ms = (!gaps.is_empty()).then(|| gaps.iter().sum::<f64>() / gaps.len() as f64);
    Some(Measures {
        first_ms,
        last_ms,
        sessions: i64::try_from(sessions.len()).unwrap_or(i64::MAX),
        median_gap_ms: median(&gaps),
        spend,
        events: by_type.0.iter().map(|&n| i64::try_from(n).unwrap_or(i64::MAX)).sum(),
        by_type: by_type.0.map(|n| i64::try_from(n).unwrap_or(i64::MAX)),
        mean_gap_ms,
        last_gap_ms: gaps.last().copied(),
    })
}

/// A user's RFM scores, churn risk and segment, from [`score`].
#[derive(Debug, Clone, PartialEq)]
pub struct Scores {
    /// "Now": the newest event in the store, or the user's own when newer.
    pub as_of_ms: i64,
    pub rfm: Rfm,
    /// Unrounded churn risk.
    pub risk: f64,
    /// Where `risk` comes from.
    pub churn_method: ChurnMethod,
    pub usual_gap_ms: f64,
    pub usual_gap_source: GapSource,
    pub segment: Segment,
}

/// The one code path from a user's [`Measures`] to their RFM scores, churn
/// risk and segment, against the shop's figures and at `as_of_ms` (the
/// newest event in the store): the profile and the segment lists both call
/// it, so they agree given the same figures, `as_of_ms` and `churn` (the
/// served model's churn classifier when it was chosen, see
/// `crate::churn::ChurnReport::serving_model`; without it the formula).
pub fn score(m: &Measures, shop: &ShopStats, as_of_ms: i64, churn: Option<&ChurnModel>) -> Scores {
    let as_of_ms = as_of_ms.max(m.last_ms);
    let since_last_ms = (as_of_ms - m.last_ms) as f64;
    let (usual_gap_ms, usual_gap_source) = usual_gap_from_median(m.median_gap_ms, shop.usual_gap_ms);
    let (risk, churn_method) = match churn {
        Some(model) => (
            model.risk(&crate::churn::features(m, shop.usual_gap_ms, as_of_ms)),
            ChurnMethod::Classifier,
        ),
        None => (churn_risk(since_last_ms, usual_gap_ms), ChurnMethod::Formula),
    };
    let cuts = shop.rfm_cuts.clone().unwrap_or(RfmCuts {
        // A store without users yet: the shop is this user alone.
        last_seen_ms: [m.last_ms; 4],
        sessions: [m.sessions; 4],
        spend: [m.spend; 4],
    });
    let rfm = Rfm {
        recency: quintile_score(m.last_ms, &cuts.last_seen_ms),
        frequency: quintile_score(m.sessions, &cuts.sessions),
        monetary: quintile_score(m.spend, &cuts.spend),
        recency_days: round4(since_last_ms / DAY_MS),
        frequency_sessions: usize::try_from(m.sessions).unwrap_or(0),
        monetary_spend: round4(m.spend),
    };
    let days_since_first = (as_of_ms - m.first_ms) as f64 / DAY_MS;
    let segment = segment(&rfm, risk, days_since_first);
    Scores {
        as_of_ms,
        rfm,
        risk,
        churn_method,
        usual_gap_ms,
        usual_gap_source,
        segment,
    }
}

/// Events per type; events of an unknown type code are not counted.
pub fn count_by_type(events: &[UserEvent]) -> TypeCounts {
    let mut counts = TypeCounts::default();
    for kind in events.iter().filter_map(event_type) {
        counts.0[kind as usize] += 1;
    }
    counts
}

/// Purchase events and the sum of their amounts (a purchase without an
/// amount adds nothing to the spend).
pub fn purchases(events: &[UserEvent]) -> Purchases {
    let bought = events.iter().filter(|e| event_type(e) == Some(EventType::Purchase));
    let (count, spend) = bought.fold((0, 0.0), |(n, sum), e| (n + 1, sum + e.value.unwrap_or(0.0)));
    Purchases { count, spend }
}

/// The user's sessions, ordered by start (then end). Events with a
/// `session_id` form one session per distinct id; the other events, in time
/// order, start a new session wherever more than [`SESSION_GAP_MS`] passed
/// since the previous one of them.
pub fn sessions(events: &[UserEvent]) -> Vec<Session> {
    let mut by_id: HashMap<&str, Session> = HashMap::new();
    let mut loose: Vec<(i64, i64)> = Vec::new();
    for e in events {
        match e.session_id.as_deref() {
            Some(id) => {
                let session = by_id.entry(id).or_insert(Session { start: e.ts, end: e.ts });
                session.start = session.start.min(e.ts);
                session.end = session.end.max(e.ts);
            }
            None => loose.push((e.ts, e.seq)),
        }
    }
    loose.sort_unstable();

    let mut all: Vec<Session> = by_id.into_values().collect();
    let mut current: Option<Session> = None;
    for (ts, _) in loose {
        match current.as_mut() {
            Some(session) if ts - session.end <= SESSION_GAP_MS => session.end = ts,
            _ => all.extend(current.replace(Session { start: ts, end: ts })),
        }
    }
    all.extend(current);
    all.sort_unstable_by_key(|s| (s.start, s.end));
    all
}

/// The idle time (ms) before each session but the first: its start minus
/// the latest end among the sessions before it, 0 when they overlap.
/// `sessions` must be ordered as [`sessions`] orders them.
pub fn session_gaps(sessions: &[Session]) -> Vec<i64> {
    let mut gaps = Vec::with_capacity(sessions.len().saturating_sub(1));
    let mut latest_end: Option<i64> = None;
    for session in sessions {
        if let Some(end) = latest_end {
            gaps.push((session.start - end).max(0));
        }
        latest_end = Some(latest_end.map_or(session.end, |end| end.max(session.end)));
    }
    gaps
}

/// The middle value, or the mean of the two middle values; `None` when
/// empty.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    if n == 0 {
        return None;
    }
    Some((sorted[(n - 1) / 2] + sorted[n / 2]) / 2.0)
}

/// The user's usual gap between sessions (ms) and where it comes from: the
/// median of their own gaps; with one session only, the shop's median usual
/// gap; when nobody has come back yet, [`DEFAULT_USUAL_GAP_MS`]. Never less
/// than [`MIN_USUAL_GAP_MS`].
pub fn usual_gap_ms(gaps: &[i64], shop_usual_gap_ms: Option<f64>) -> (f64, GapSource) {
    let gaps: Vec<f64> = gaps.iter().map(|&g| g as f64).collect();
    usual_gap_from_median(median(&gaps), shop_usual_gap_ms)
}

/// [`usual_gap_ms`] from the median of the user's gaps (`None` without
/// gaps).
pub fn usual_gap_from_median(median_gap_ms: Option<f64>, shop_usual_gap_ms: Option<f64>) -> (f64, GapSource) {
    let (gap, source) = match (median_gap_ms, shop_usual_gap_ms) {
        (Some(own), _) => (own, GapSource::User),
        (None, Some(shop)) => (shop, GapSource::Shop),
        (None, None) => (DEFAULT_USUAL_GAP_MS, GapSource::Default),
    };
    (gap.max(MIN_USUAL_GAP_MS), source)
}

/// Churn risk in 0..1 after `since_last_ms` without activity, for a user
/// whose usual gap is `usual_gap_ms`: 1 − 2^(−since / (2 × usual gap)).
/// 0 right after an event, 0.5 after twice the usual gap, 0.75 after four
/// times, approaching 1.
pub fn churn_risk(since_last_ms: f64, usual_gap_ms: f64) -> f64 {
    let usual = usual_gap_ms.max(MIN_USUAL_GAP_MS);
    let since = since_last_ms.max(0.0);
    let risk = 1.0 - (-std::f64::consts::LN_2 * since / (2.0 * usual)).exp();
    if risk.is_finite() {
        risk.clamp(0.0, 1.0)
    } else {
        1.0
    }
}

/// The four cuts between fifths of `values`: the value at ascending rank
/// ⌈k·n/5⌉ for k = 1..4 (the store's aggregate query computes the same over
/// all users); `None` when empty.
pub fn quintile_cuts<T: Copy + PartialOrd>(values: &[T]) -> Option<[T; 4]> {
    let mut sorted = values.to_vec();
    sorted.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let n = sorted.len();
    if n == 0 {
        return None;
    }
    Some([1, 2, 3, 4].map(|k| sorted[(n * k).div_ceil(5) - 1]))
}

/// 1 plus how many of the four cuts `value` is above: 5 for a value above
/// the shop's 80 % cut, 1 for one at or below its 20 % cut (so no purchase
/// at all is always 1).
pub fn quintile_score<T: PartialOrd>(value: T, cuts: &[T; 4]) -> u8 {
    1 + cuts.iter().map(|cut| u8::from(value > *cut)).sum::<u8>()
}

/// How much an event says the user likes its item: view and click 1, like
/// 2, add_to_cart 3, purchase 5, remove_from_cart 0; a rating counts its
/// value minus 2 (a rating of 2 or less counts 0).
pub fn interest_weight(kind: EventType, value: Option<f64>) -> f64 {
    match kind {
        EventType::View | EventType::Click => 1.0,
        EventType::Like => 2.0,
        EventType::AddToCart => 3.0,
        EventType::RemoveFromCart => 0.0,
        EventType::Purchase => 5.0,
        EventType::Rating => value.map_or(0.0, |v| (v - 2.0).max(0.0)),
    }
}

/// The user's top `n` categories: each one's weight is the share of the
/// user's interest weight (all events, [`interest_weight`]) that went to
/// items in that category. An item in several categories counts fully for
/// each, so the weights need not add up to 1. Best first, ties by name.
pub fn favourite_categories(
    events: &[UserEvent],
    categories: &HashMap<String, Vec<String>>,
    n: usize,
) -> Vec<CategoryWeight> {
    let mut total = 0.0;
    let mut per_category: HashMap<&str, f64> = HashMap::new();
    for e in events {
        let Some(kind) = event_type(e) else { continue };
        let weight = interest_weight(kind, e.value);
        if weight <= 0.0 {
            continue;
        }
        total += weight;
        let item_categories = categories.get(&e.item_id).map_or(&[][..], Vec::as_slice);
        let distinct: HashSet<&str> = item_categories.iter().map(String::as_str).collect();
        for category in distinct {
            *per_category.entry(category).or_default() += weight;
        }
    }
    if total <= 0.0 {
        return Vec::new();
    }
    let mut ranked: Vec<(&str, f64)> = per_category.into_iter().collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(b.0)));
    ranked
        .into_iter()
        .take(n)
        .map(|(category, weight)| CategoryWeight {
            category: category.to_owned(),
            weight: round4(weight / total),
        })
        .collect()
}

/// The `n` items the user touched last, newest first, each with its newest
/// event's type and time.
pub fn recent_items(events: &[UserEvent], n: usize) -> Vec<RecentItem> {
    let mut newest_first: Vec<&UserEvent> = events.iter().collect();
    newest_first.sort_unstable_by_key(|e| std::cmp::Reverse((e.ts, e.seq)));
    let mut seen = HashSet::new();
    let mut items = Vec::new();
    for e in newest_first {
        if items.len() == n {
            break;
        }
        let Some(kind) = event_type(e) else { continue };
        if seen.insert(e.item_id.as_str()) {
            items.push(RecentItem {
                item_id: e.item_id.clone(),
                kind: kind.name(),
                timestamp: format_timestamp(e.ts),
            });
        }
    }
    items
}

/// The first rule that holds: `lost` (churn risk ≥ 0.75), `at_risk` (≥
/// 0.5), `new` (first seen less than 30 days before `as_of`), `champion`
/// (recency, frequency and monetary all ≥ 4), `loyal` (frequency ≥ 4),
/// else `occasional`.
pub fn segment(rfm: &Rfm, churn_risk: f64, days_since_first: f64) -> Segment {
    if churn_risk >= LOST {
        Segment::Lost
    } else if churn_risk >= AT_RISK {
        Segment::AtRisk
    } else if days_since_first < NEW_USER_DAYS {
        Segment::New
    } else if rfm.recency >= 4 && rfm.frequency >= 4 && rfm.monetary >= 4 {
        Segment::Champion
    } else if rfm.frequency >= 4 {
        Segment::Loyal
    } else {
        Segment::Occasional
    }
}

fn event_type(e: &UserEvent) -> Option<EventType> {
    EventType::from_code(e.kind.into())
}

/// Four decimals are plenty for shares, days and money, and keep the JSON
/// free of float noise such as 59.980000000000004.
fn round4(x: f64) -> f64 {
    (x * 10_000.0).round() / 10_000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: i64 = 60 * 1000;
    const DAY: i64 = 24 * 60 * MIN;

    /// An event of `kind` on `item` at `ts`, in arrival order `seq`.
    fn event(seq: i64, item: &str, kind: EventType, ts: i64) -> UserEvent {
        UserEvent {
            item_id: item.to_owned(),
            kind: kind.code(),
            value: None,
            ts,
            session_id: None,
            seq,
        }
    }

    fn in_session(session: &str, mut e: UserEvent) -> UserEvent {
        e.session_id = Some(session.to_owned());
        e
    }

    fn valued(value: f64, mut e: UserEvent) -> UserEvent {
        e.value = Some(value);
        e
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn sessions_by_id_span_their_events_and_may_overlap() {
        let events = [
            in_session("a", event(1, "i", EventType::View, 0)),
            in_session("b", event(2, "i", EventType::View, 5 * MIN)),
            in_session("a", event(3, "i", EventType::View, 10 * MIN)),
            // Hours later, still session b: one session, not two.
            in_session("b", event(4, "i", EventType::View, 120 * MIN)),
        ];
        let found = sessions(&events);
        assert_eq!(
            found,
            [
                Session {
                    start: 0,
                    end: 10 * MIN
                },
                Session {
                    start: 5 * MIN,
                    end: 120 * MIN
                }
            ]
        );
        // b starts before a ends: no idle time between them.
        assert_eq!(session_gaps(&found), [0]);
    }

    #[test]
    fn sessions_without_id_split_after_more_than_30_minutes() {
        // Given newest first, as the store returns them.
        let events = [
            event(5, "i", EventType::View, 180 * MIN),
            event(4, "i", EventType::View, 81 * MIN),
            event(3, "i", EventType::View, 50 * MIN),
            event(2, "i", EventType::View, 20 * MIN),
            event(1, "i", EventType::View, 0),
        ];
        // 20 → 50 is exactly 30 minutes: same session; 50 → 81 is 31: a new one.
        assert_eq!(
            sessions(&events),
            [
                Session {
                    start: 0,
                    end: 50 * MIN
                },
                Session {
                    start: 81 * MIN,
                    end: 81 * MIN
                },
                Session {
                    start: 180 * MIN,
                    end: 180 * MIN
                },
            ]
        );
        assert_eq!(session_gaps(&sessions(&events)), [31 * MIN, 99 * MIN]);
    }

    #[test]
    fn events_with_and_without_ids_make_separate_sessions() {
        let events = [
            event(1, "i", EventType::View, 0),
            in_session("s", event(2, "i", EventType::View, 10 * MIN)),
            event(3, "i", EventType::View, 20 * MIN),
            in_session("s", event(4, "i", EventType::View, DAY)),
            event(5, "i", EventType::View, 2 * DAY),
        ];
        // Session s spans a day; the id-less events at 0 and 20 min are one
        // session, the one two days later another.
        let found = sessions(&events);
        assert_eq!(
            found,
            [
                Session {
                    start: 0,
                    end: 20 * MIN
                },
                Session {
                    start: 10 * MIN,
                    end: DAY
                },
                Session {
                    start: 2 * DAY,
                    end: 2 * DAY
                },
            ]
        );
        assert_eq!(session_gaps(&found), [0, DAY]);
        assert!(sessions(&[]).is_empty());
        assert!(session_gaps(&[]).is_empty());
    }

    #[test]
    fn usual_gap_is_the_median_with_fallbacks_and_a_floor() {
        assert!(median(&[]).is_none());
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[10.0, 1.0, 3.0, 2.0]), Some(2.5));

        assert_eq!(
            usual_gap_ms(&[DAY, 3 * DAY, 2 * DAY], Some(9.0)),
            (2.0 * DAY as f64, GapSource::User)
        );
        assert_eq!(usual_gap_ms(&[10 * MIN], None), (MIN_USUAL_GAP_MS, GapSource::User));
        assert_eq!(
            usual_gap_ms(&[], Some(4.0 * DAY as f64)),
            (4.0 * DAY as f64, GapSource::Shop)
        );
        assert_eq!(usual_gap_ms(&[], None), (DEFAULT_USUAL_GAP_MS, GapSource::Default));
    }

    #[test]
    fn churn_risk_is_half_at_twice_the_usual_gap() {
        let day = DAY as f64;
        assert!(close(churn_risk(0.0, day), 0.0));
        assert!(close(churn_risk(day, day), 1.0 - 0.5_f64.sqrt()));
        assert!(close(churn_risk(2.0 * day, day), 0.5));
        assert!(close(churn_risk(4.0 * day, day), 0.75));
        assert!(close(churn_risk(6.0 * day, 3.0 * day), 0.5));
        assert!(churn_risk(1000.0 * day, day) <= 1.0);
        // Bad input gives a number in range, not NaN.
        assert!(close(churn_risk(-5.0, day), 0.0));
        assert!(close(churn_risk(2.0 * MIN_USUAL_GAP_MS, 0.0), 0.5));
        assert!(close(churn_risk(f64::INFINITY, day), 1.0));
    }

    #[test]
    fn rfm_scores_by_quintile_cuts() {
        let values: Vec<i64> = (1..=10).collect();
        let cuts = quintile_cuts(&values).unwrap();
        assert_eq!(cuts, [2, 4, 6, 8]);
        let scores: Vec<u8> = values.iter().map(|v| quintile_score(*v, &cuts)).collect();
        assert_eq!(scores, [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]);

        // Most users spend nothing: they all score 1, any spender 5.
        let spend = [0.0, 0.0, 0.0, 0.0, 10.0];
        let cuts = quintile_cuts(&spend).unwrap();
        assert_eq!(cuts, [0.0; 4]);
        assert_eq!(quintile_score(0.0, &cuts), 1);
        assert_eq!(quintile_score(0.01, &cuts), 5);

        // Three users: ranks ⌈3k/5⌉ = 1, 2, 2, 3.
        assert_eq!(quintile_cuts(&[30, 10, 20]), Some([10, 20, 20, 30]));
        assert_eq!(quintile_cuts::<i64>(&[]), None);
    }

    #[test]
    fn category_weights_are_shares_of_weighted_interest() {
        let categories: HashMap<String, Vec<String>> = [
            ("i1", vec!["shoes"]),
            ("i2", vec!["shoes", "sale", "shoes"]),
            ("i3", vec!["hats"]),
        ]
        .into_iter()
        .map(|(item, cats)| (item.to_owned(), cats.into_iter().map(str::to_owned).collect()))
        .collect();
        let events = [
            event(1, "i1", EventType::View, 0),                // 1: shoes
            event(2, "i2", EventType::Purchase, 1),            // 5: shoes, sale
            event(3, "i3", EventType::AddToCart, 2),           // 3: hats
            event(4, "i3", EventType::RemoveFromCart, 3),      // 0
            event(5, "i4", EventType::View, 4),                // 1: no category
            valued(4.0, event(6, "i3", EventType::Rating, 5)), // 2: hats
            valued(1.0, event(7, "i1", EventType::Rating, 6)), // 0
        ];
        // Total 12: shoes 6, hats 5, sale 5 (tied with hats: by name).
        let found = favourite_categories(&events, &categories, 5);
        let expected = [("shoes", 0.5), ("hats", 0.4167), ("sale", 0.4167)];
        assert_eq!(found.len(), expected.len());
        for (got, (category, weight)) in found.iter().zip(expected) {
            assert_eq!(got.category, category);
            assert!(close(got.weight, weight), "{got:?}");
        }
        assert_eq!(favourite_categories(&events, &categories, 1).len(), 1);
        assert!(favourite_categories(&events[3..4], &categories, 5).is_empty());
    }

    #[test]
    fn recent_items_are_distinct_and_newest_first() {
        let events = [
            event(1, "a", EventType::View, 10),
            event(2, "b", EventType::View, 20),
            event(3, "a", EventType::AddToCart, 30),
            event(4, "c", EventType::View, 30),
        ];
        let items = recent_items(&events, 10);
        let order: Vec<(&str, &str)> = items.iter().map(|i| (i.item_id.as_str(), i.kind)).collect();
        // Same timestamp: the later arrival is newer.
        assert_eq!(order, [("c", "view"), ("a", "add_to_cart"), ("b", "view")]);
        assert_eq!(recent_items(&events, 2).len(), 2);
    }

    #[test]
    fn segments_follow_the_rules_in_order() {
        let rfm = |r, f, m| Rfm {
            recency: r,
            frequency: f,
            monetary: m,
            recency_days: 0.0,
            frequency_sessions: 0,
            monetary_spend: 0.0,
        };
        assert_eq!(segment(&rfm(5, 5, 5), 0.8, 100.0), Segment::Lost);
        assert_eq!(segment(&rfm(5, 5, 5), 0.5, 100.0), Segment::AtRisk);
        assert_eq!(segment(&rfm(5, 1, 1), 0.1, 3.0), Segment::New);
        assert_eq!(segment(&rfm(4, 4, 4), 0.1, 100.0), Segment::Champion);
        assert_eq!(segment(&rfm(2, 4, 1), 0.1, 100.0), Segment::Loyal);
        assert_eq!(segment(&rfm(5, 3, 5), 0.1, 100.0), Segment::Occasional);
    }

    #[test]
    fn a_profile_puts_it_together() {
        let events = [
            event(1, "a", EventType::View, 0),
            valued(20.0, event(2, "a", EventType::Purchase, 10 * MIN)),
            event(3, "b", EventType::Click, DAY),
            valued(19.99, event(4, "b", EventType::Purchase, 3 * DAY)),
        ];
        let shop = ShopStats {
            rfm_cuts: Some(RfmCuts {
                last_seen_ms: [0, DAY, 2 * DAY, 3 * DAY],
                sessions: [1, 1, 2, 3],
                spend: [0.0, 0.0, 10.0, 30.0],
            }),
            usual_gap_ms: Some(DAY as f64),
            rating_mean: Some(3.5),
        };
        let profile = build_profile("u", &events, &HashMap::new(), &shop, 5 * DAY, None).unwrap();
        assert_eq!(profile.events.total, 4);
        assert_eq!(profile.events.by_type.get(EventType::Purchase), 2);
        assert_eq!(profile.sessions, 3);
        assert_eq!(profile.purchases, Purchases { count: 2, spend: 39.99 });
        // Gaps: 1 day − 10 min and 2 days; median ≈ 1.5 days.
        let usual = (DAY - 10 * MIN + 2 * DAY) as f64 / 2.0 / DAY as f64;
        assert!(close(profile.churn.usual_gap_days, round4(usual)));
        assert_eq!(profile.churn.usual_gap_source, GapSource::User);
        assert!(close(profile.churn.days_since_last, 2.0));
        assert!(close(
            profile.churn.risk,
            round4(churn_risk(2.0 * DAY as f64, usual * DAY as f64))
        ));
        // Last seen at the 80 % cut: 4, not 5; 3 sessions: 4 (above 2, not above 3); 39.99 above 30: 5.
        assert_eq!(
            (profile.rfm.recency, profile.rfm.frequency, profile.rfm.monetary),
            (4, 4, 5)
        );
        assert_eq!(profile.segment, Segment::New);
        assert_eq!(profile.as_of, "1970-01-06T00:00:00.000Z");
        assert_eq!(profile.recent_items[0].item_id, "b");
        assert_eq!(
            profile.ratings,
            UserRatings {
                count: 0,
                mean: None,
                shop_mean: Some(3.5)
            }
        );

        let json = serde_json::to_value(&profile).unwrap();
        let types: Vec<&str> = json["events"]["by_type"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(types.len(), 7);
        assert_eq!(json["events"]["by_type"]["rating"], 0);
        assert_eq!(json["segment"], "new");

        assert!(build_profile("u", &[], &HashMap::new(), &shop, 0, None).is_none());
    }
}
