//! Ranking for the storefront: a user's next items from their newest events
//! run through the served snapshot, similar items, popular items, and the
//! filters every list passes (seen or purchased items, items asked to be left
//! out, a category, unavailable and deleted items).
//!
//! Everything here reads one immutable snapshot, so every answer comes from
//! exactly one model version; the snapshot is swapped whole by the trainer or
//! when another replica published one.

//!
//! The parts, one file each:
//!
//! - `rank`: the rankings themselves and the filters;
//! - `state`: the cache of users' recurrent states, and when a cached state
//!   still fits or can be advanced by new events;
//! - `index`: the approximate-nearest-neighbour index of a large
//!   catalogue, built on a thread of its own for each served model;
//! - `impressions`: answers counted per model version until they are
//!   flushed to the store;
//! - `catalogue`, `history`, `popular`: what ranking reads besides the
//!   model, kept in memory; `warm`: states made ahead of requests.

pub mod catalogue;
mod history;
mod impressions;
mod index;
mod popular;
mod rank;
mod state;
mod suggested;
mod warm;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwapOption;
use serde::Serialize;

pub use catalogue::{Catalogue, View};
pub use history::{Histories, FOLLOW_EVERY};
pub use impressions::Impressions;
pub use index::{IndexInfo, IndexKind, IndexState};
pub use popular::PopularCache;
pub use rank::{approximate_top_n, history_of, MIN_EMBEDDED_INTERACTIONS};
pub use suggested::{SuggestSettings, Suggestions};
pub use warm::{WarmInfo, WarmState};

use crate::model::ann::{AnnIndex, AnnSettings};
use crate::model::ModelSnapshot;
use index::{AnnState, ReadyIndex};
use state::{CachedState, STATE_CACHE_USERS};

/// Events of a user read per request: the newest `max_len` feed the model,
/// all of them say what the user has seen.
pub const HISTORY_LIMIT: i64 = 1000;

/// What `exclude` asks to leave out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exclude {
    Seen,
    Purchased,
    None,
}

impl Exclude {
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "seen" => Some(Exclude::Seen),
            "purchased" => Some(Exclude::Purchased),
            "none" => Some(Exclude::None),
            _ => None,
        }
    }
}

/// A request for a user's recommendations, validated.
#[derive(Debug, Clone)]
pub struct Request {
    pub n: usize,
    pub category: Option<String>,
    pub exclude: Exclude,
    pub exclude_items: Vec<String>,
    pub explain: bool,
}

/// What kind of reason an item has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ReasonKind {
    /// Among the co-occurrence neighbours of one of the user's items.
    SimilarTo,
    /// The network's reading of the user's sequence.
    Sequence,
    /// The cold-start list: popular items.
    Popular,
    /// The cold-start list narrowed to a category.
    Category,
}

/// Why an item is recommended.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Reason {
    pub kind: ReasonKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub item_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Scored {
    pub item_id: String,
    pub score: f32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
    /// The catalogue fields asked for with `fields=`; none unless asked.
    #[serde(flatten)]
    #[schema(value_type = catalogue::CatalogueFields)]
    pub fields: serde_json::Map<String, serde_json::Value>,
}

/// How a ranking was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// From the user's events, by the served model.
    Personalized,
    /// The cold-start list (no model, or none of the user's items known).
    Popular,
}

impl Strategy {
    pub fn name(self) -> &'static str {
        match self {
            Strategy::Personalized => "personalized",
            Strategy::Popular => "popular",
        }
    }
}

/// The ranking part of a recommendations response.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Ranked {
    pub model_version: Option<String>,
    pub strategy: Strategy,
    pub items: Vec<Scored>,
}

/// The served model and what ranking needs besides it.
pub struct Serving {
    model: ArcSwapOption<ModelSnapshot>,
    pub catalogue: Catalogue,
    pub popular: PopularCache,
    /// Users' newest events.
    pub histories: Histories,
    states: quick_cache::sync::Cache<String, CachedState>,
    /// Answers counted since the last flush to the store.
    pub impressions: Impressions,
    /// The newest this many events of a user feed the model.
    max_len: usize,
    ann_settings: AnnSettings,
    /// The served model's approximate-nearest-neighbour index, once built.
    ann: Arc<ArcSwapOption<ReadyIndex>>,
    /// What became of the newest index build.
    ann_state: Arc<Mutex<AnnState>>,
    /// What became of the newest warming of user states.
    warm: Mutex<WarmInfo>,
    /// Users forgotten so far (erasure).
    erasures: AtomicU64,
    /// Whether and how the category filters use suggested categories.
    suggest_settings: SuggestSettings,
    /// The newest suggested categories (`suggestions()`).
    suggestions: Mutex<Option<Arc<Suggestions>>>,
}

impl Serving {
    pub fn new(max_len: usize, ann_settings: AnnSettings) -> Self {
        Serving {
            ann_settings,
            ann: Arc::default(),
            ann_state: Arc::default(),
            max_len: max_len.max(1),
            model: ArcSwapOption::empty(),
            catalogue: Catalogue::default(),
            popular: PopularCache::default(),
            histories: Histories::default(),
            states: quick_cache::sync::Cache::new(STATE_CACHE_USERS),
            impressions: Impressions::default(),
            warm: Mutex::default(),
            erasures: AtomicU64::new(0),
            suggest_settings: SuggestSettings::default(),
            suggestions: Mutex::default(),
        }
    }
}

impl Serving {
    /// With suggested categories used by the category filters as set.
    pub fn with_suggestions(mut self, settings: SuggestSettings) -> Self {
        self.suggest_settings = settings;
        self
    }

    /// The snapshot being served, if any.
    pub fn model(&self) -> Option<Arc<ModelSnapshot>> {
        self.model.load_full()
    }

    pub fn version(&self) -> Option<String> {
        self.model.load().as_ref().map(|m| m.meta.version.clone())
    }

    /// Serves `snapshot` from now on; requests in flight finish on the one
    /// they loaded. A catalogue of `ann.min_items` or more is ranked through
    /// `index` (built by the trainer, stored with the snapshot); without
    /// one, an index is built on a thread of its own, and until it is
    /// ready every item is scored.
    pub fn publish(&self, snapshot: ModelSnapshot, index: Option<AnnIndex>) {
        let version = snapshot.meta.version.clone();
        let snapshot = Arc::new(snapshot);
        match index {
            Some(index) if self.ann_settings.applies_to(snapshot.items()) => self.use_index(&snapshot, index),
            _ => self.index_in_background(snapshot.clone()),
        }
        self.model.store(Some(snapshot.clone()));
        metrics::gauge!("recd_model_items").set(snapshot.items() as f64);
        tracing::info!(version, "serving model");
    }

    /// How many erasures this process has applied (figures made before one
    /// may count the erased user).
    pub fn erasures(&self) -> u64 {
        self.erasures.load(Ordering::SeqCst)
    }

    /// Forgets what is cached of a user (erasure).
    pub fn forget_user(&self, user_id: &str) {
        self.erasures.fetch_add(1, Ordering::SeqCst);
        self.histories.invalidate([user_id]);
        self.states.remove(user_id);
        self.popular.mark_stale();
    }
}

/// What the unit tests of ranking build on.
#[cfg(test)]
pub(crate) mod testing {
    use crate::domain::{EventType, UserEvent};

    /// A user's events newest first, as the store gives them, from
    /// `(item, type, arrival number)` in time order; item `k` is `ik`.
    pub(crate) fn user_events(in_time_order: &[(u32, EventType, i64)]) -> Vec<UserEvent> {
        in_time_order
            .iter()
            .enumerate()
            .rev()
            .map(|(at, &(item, kind, seq))| UserEvent {
                item_id: format!("i{item}"),
                kind: kind.code(),
                value: None,
                ts: at as i64 * 1000,
                session_id: None,
                seq,
            })
            .collect()
    }
}
