//! Ranking for the storefront: a user's next items from their newest events
//! run through the served snapshot, similar items, popular items, and the
//! filters every list passes (seen or purchased items, items asked to be left
//! out, a category, unavailable and deleted items).
//!
//! Everything here reads one immutable snapshot, so every answer comes from
//! exactly one model version; the snapshot is swapped whole by the trainer or
//! when another replica published one.

mod catalogue;
mod history;
mod popular;
mod warm;

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwapOption;
use serde::Serialize;

pub use catalogue::Catalogue;
pub use history::{Histories, FOLLOW_EVERY};
pub use popular::PopularCache;
pub use warm::WarmInfo;

use crate::ingest::EventType;
use crate::model::ann::{AnnIndex, AnnSettings, Vectors};
use crate::model::{top_n, ModelSnapshot, Step, UserState};
use crate::store::{Impression, UserEvent};

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

/// Why an item is recommended.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Reason {
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub item_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Scored {
    pub item_id: String,
    pub score: f32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
}

/// The ranking part of a recommendations response.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Ranked {
    pub model_version: Option<String>,
    /// `personalized` or `popular`.
    pub strategy: &'static str,
    pub items: Vec<Scored>,
}

/// A user's recurrent state, valid for one model version and one newest
/// event, and the last ranking made from it.
#[derive(Debug, Clone)]
struct CachedState {
    version: Arc<str>,
    newest_seq: i64,
    events: usize,
    state: Option<UserState>,
    ranked: Option<(RankingKey, Vec<(u32, f32)>)>,
}

impl CachedState {
    /// The state `model` reaches after `events` (newest first), with no
    /// ranking yet.
    fn new(model: &ModelSnapshot, events: &[UserEvent], state: Option<UserState>) -> Self {
        CachedState {
            version: Arc::from(model.meta.version.as_str()),
            newest_seq: newest_seq(events),
            events: events.len(),
            state,
            ranked: None,
        }
    }

    /// Whether this was made by `model` from exactly these events.
    fn fits(&self, model: &ModelSnapshot, events: &[UserEvent]) -> bool {
        *self.version == *model.meta.version && self.newest_seq == newest_seq(events) && self.events == events.len()
    }

    /// This state advanced by the user's events that arrived after it, one
    /// LSTM step each, when that is exactly the state of the newest
    /// `max_len` known events: the events it was made from are all still
    /// there, every new one is newer than them, and the window has room
    /// for the new steps (else it slides, and the state is made anew).
    fn advanced(&self, model: &ModelSnapshot, events: &[UserEvent], max_len: usize) -> Option<UserState> {
        let (weights, state) = (model.weights.as_ref()?, self.state.as_ref()?);
        if *self.version != *model.meta.version {
            return None;
        }
        let newer = events.iter().position(|e| e.seq == self.newest_seq)?;
        if events.len() - newer != self.events || events[..newer].iter().any(|e| e.seq < self.newest_seq) {
            return None;
        }
        let steps = history_of(model, &events[..newer]);
        if !steps.is_empty() && state.steps as usize + steps.len() > max_len {
            return None;
        }
        let mut state = state.clone();
        for &step in &steps {
            weights.advance(&mut state, step);
        }
        Some(state)
    }
}

/// The arrival number of the newest of these events (newest first).
fn newest_seq(events: &[UserEvent]) -> i64 {
    events.first().map_or(0, |e| e.seq)
}

/// What besides the user's events and the model decides a ranking.
#[derive(Debug, Clone, PartialEq)]
struct RankingKey {
    n: usize,
    category: Option<String>,
    exclude: Exclude,
    exclude_items: Vec<String>,
    catalogue: u64,
}

impl RankingKey {
    fn of(request: &Request, catalogue: u64) -> Self {
        RankingKey {
            n: request.n,
            category: request.category.clone(),
            exclude: request.exclude,
            exclude_items: request.exclude_items.clone(),
            catalogue,
        }
    }
}

/// Cached user states: a request by a user whose events did not change
/// since their last request costs one scoring pass, no LSTM steps; the same
/// request again costs no scoring.
const STATE_CACHE_USERS: usize = 200_000;

/// The served model and what ranking needs besides it.
pub struct Serving {
    model: ArcSwapOption<ModelSnapshot>,
    pub catalogue: Catalogue,
    pub popular: PopularCache,
    /// Users' newest events.
    pub histories: Histories,
    states: quick_cache::sync::Cache<String, CachedState>,
    impressions: Mutex<Vec<Impression>>,
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
}

/// An index and the model version it indexes.
struct ReadyIndex {
    version: String,
    index: AnnIndex,
}

/// The newest index build: its model version, `building`, `ready` or
/// `failed`, and its cancel flag (set when a newer model replaces it).
#[derive(Default)]
struct AnnState {
    version: String,
    state: &'static str,
    error: Option<String>,
    cancel: Arc<AtomicBool>,
}

/// How the served model ranks the catalogue, for `GET /v1/model`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct IndexInfo {
    /// `exact` (every item scored) or `approximate` (an HNSW index proposes
    /// candidates, scored exactly).
    pub kind: &'static str,
    /// For `approximate`: `building` (exact until it is ready), `ready` or
    /// `failed` (exact).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub build_seconds: Option<f64>,
    /// Bytes the ready index holds (graph and vectors).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<usize>,
    /// The number format of the ready index's vectors (`f32` or `f16`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vectors: Option<Vectors>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
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
            impressions: Mutex::new(Vec::new()),
            warm: Mutex::default(),
            erasures: AtomicU64::new(0),
        }
    }
}

thread_local! {
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

impl Serving {
    /// The snapshot being served, if any.
    pub fn model(&self) -> Option<Arc<ModelSnapshot>> {
        self.model.load_full()
    }

    pub fn version(&self) -> Option<String> {
        self.model.load().as_ref().map(|m| m.meta.version.clone())
    }

    /// Serves `snapshot` from now on; requests in flight finish on the one
    /// they loaded. A catalogue of `ann.min_items` or more gets an index built on a
    /// thread of its own; until it is ready every item is scored.
    pub fn publish(&self, snapshot: ModelSnapshot) {
        let version = snapshot.meta.version.clone();
        let snapshot = Arc::new(snapshot);
        self.model.store(Some(snapshot.clone()));
        metrics::gauge!("recd_model_items").set(snapshot.items() as f64);
        tracing::info!(version, "serving model");
        self.index_in_background(snapshot);
    }

    fn index_in_background(&self, snapshot: Arc<ModelSnapshot>) {
        let mut state = self.ann_state.lock().unwrap_or_else(|e| e.into_inner());
        state.cancel.store(true, Ordering::Relaxed);
        let wanted = snapshot.weights.is_some() && self.ann_settings.applies_to(snapshot.items());
        metrics::gauge!("recd_ann_ready").set(0.0);
        if !wanted {
            *state = AnnState::default();
            self.ann.store(None);
            return;
        }
        let cancel = Arc::new(AtomicBool::new(false));
        *state = AnnState {
            version: snapshot.meta.version.clone(),
            state: "building",
            error: None,
            cancel: cancel.clone(),
        };
        drop(state);
        let (slot, status, settings) = (self.ann.clone(), self.ann_state.clone(), self.ann_settings);
        let spawned = std::thread::Builder::new().name("recd-ann".into()).spawn(move || {
            let version = snapshot.meta.version.clone();
            let Some(weights) = snapshot.weights.as_ref() else {
                return;
            };
            tracing::info!(
                version,
                items = snapshot.items(),
                "building the nearest-neighbour index"
            );
            let built = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                AnnIndex::build(weights, &settings, &cancel)
            }))
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the index build panicked")));
            let mut state = status.lock().unwrap_or_else(|e| e.into_inner());
            if state.version != version || cancel.load(Ordering::Relaxed) {
                return;
            }
            match built {
                Ok(Some(index)) => {
                    tracing::info!(
                        version,
                        seconds = index.build_seconds,
                        mib = index.memory_bytes() >> 20,
                        "nearest-neighbour index ready"
                    );
                    metrics::gauge!("recd_ann_build_seconds").set(index.build_seconds);
                    metrics::gauge!("recd_ann_ready").set(1.0);
                    state.state = "ready";
                    slot.store(Some(Arc::new(ReadyIndex { version, index })));
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(version, error = %e, "the nearest-neighbour index failed; scoring every item");
                    metrics::counter!("recd_ann_build_failures_total").increment(1);
                    state.state = "failed";
                    state.error = Some(format!("{e:#}"));
                }
            }
        });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the index build; scoring every item");
            let mut state = self.ann_state.lock().unwrap_or_else(|e| e.into_inner());
            state.state = "failed";
            state.error = Some(e.to_string());
        }
    }

    /// The index of `model`, when one is ready.
    fn index_of(&self, model: &ModelSnapshot) -> Option<Arc<ReadyIndex>> {
        self.ann.load_full().filter(|r| r.version == model.meta.version)
    }

    /// How the served model ranks the catalogue.
    pub fn index_info(&self) -> Option<IndexInfo> {
        let model = self.model()?;
        if model.weights.is_none() || !self.ann_settings.applies_to(model.items()) {
            return Some(IndexInfo {
                kind: "exact",
                ..IndexInfo::default()
            });
        }
        let ready = self.index_of(&model);
        let state = self.ann_state.lock().unwrap_or_else(|e| e.into_inner());
        let current = state.version == model.meta.version;
        Some(IndexInfo {
            kind: "approximate",
            state: Some(match (&ready, current) {
                (Some(_), _) => "ready",
                (None, true) => state.state,
                (None, false) => "building",
            }),
            build_seconds: ready.as_ref().map(|r| r.index.build_seconds),
            memory_bytes: ready.as_ref().map(|r| r.index.memory_bytes()),
            vectors: ready.as_ref().map(|r| r.index.vectors()),
            error: state.error.clone().filter(|_| current && ready.is_none()),
        })
    }

    /// Forgets what is cached of a user (erasure).
    pub fn forget_user(&self, user_id: &str) {
        self.erasures.fetch_add(1, Ordering::SeqCst);
        self.histories.invalidate([user_id]);
        self.states.remove(user_id);
    }

    /// Counts one impression; `take_impressions` hands them to the store.
    pub fn record_impression(&self, impression: Impression) {
        self.impressions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(impression);
    }

    pub fn take_impressions(&self) -> Vec<Impression> {
        std::mem::take(&mut *self.impressions.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Puts back impressions the store could not take.
    pub fn return_impressions(&self, mut impressions: Vec<Impression>) {
        let mut pending = self.impressions.lock().unwrap_or_else(|e| e.into_inner());
        impressions.append(&mut pending);
        *pending = impressions;
    }

    /// Whether this user gets the cold-start list: no model, or none of
    /// their items known to it.
    pub fn is_cold(model: Option<&ModelSnapshot>, events: &[UserEvent]) -> bool {
        model.is_none_or(|m| !events.iter().any(|e| m.item_index(&e.item_id).is_some()))
    }

    /// Ranks items for a user with these events (newest first) by `model`.
    /// Cold users (`is_cold`) get `popular`, filtered.
    pub fn recommend(
        &self,
        model: Option<&ModelSnapshot>,
        user_id: &str,
        events: &[UserEvent],
        request: &Request,
        popular: &[(String, f64)],
    ) -> Ranked {
        let Some(model) = model else {
            return self.popular_for(None, popular, request, events);
        };
        // The same user, events, model, catalogue and question as last time:
        // the same ranking, with no scoring.
        let key = RankingKey::of(request, self.catalogue.generation());
        let entry = self.states.get(user_id);
        let cached = entry.as_ref().filter(|c| c.fits(model, events));
        let repeated = cached
            .and_then(|c| c.ranked.as_ref().filter(|(k, _)| *k == key))
            .map(|(_, best)| best.clone());
        // A repeated ranking was made from a history the model could read,
        // so it needs the history again only to explain itself.
        let history = if repeated.is_some() && !request.explain {
            Vec::new()
        } else {
            history_of(model, events)
        };
        if repeated.is_none() && history.is_empty() {
            return self.popular_for(Some(model.meta.version.clone()), popular, request, events);
        }
        let history = &history[history.len().saturating_sub(self.max_len)..];
        let best = match repeated {
            Some(best) => best,
            None => {
                let advanced = || entry.as_ref()?.advanced(model, events, self.max_len);
                let (state, from) = match cached {
                    Some(c) => (c.state.clone(), "cache"),
                    None => match advanced() {
                        Some(state) => (Some(state), "advanced"),
                        None => (model.user_state(history, history.len()), "events"),
                    },
                };
                metrics::counter!("recd_user_states_total", "from" => from).increment(1);
                let excluded_index: HashSet<u32> = excluded_ids(events, request)
                    .into_iter()
                    .filter_map(|id| model.item_index(id))
                    .collect();
                let catalogue = self.catalogue.view();
                let skip = |i: u32| {
                    excluded_index.contains(&i) || !catalogue.allows(model.item_id(i), request.category.as_deref())
                };
                let approximate = match (self.index_of(model), state.as_ref()) {
                    (Some(ready), Some(state)) => {
                        let best = approximate_top_n(model, &ready.index, history, state, request.n, skip);
                        if best.is_none() {
                            metrics::counter!("recd_ann_fallbacks_total").increment(1);
                        }
                        best
                    }
                    _ => None,
                };
                let best = approximate.unwrap_or_else(|| {
                    let scan = || {
                        SCORES.with(|scores| {
                            let mut scores = scores.borrow_mut();
                            model.score_user(history, state.as_ref(), &mut scores);
                            top_n(&scores, request.n, skip)
                        })
                    };
                    // Scanning a large catalogue takes milliseconds: the
                    // runtime hands this worker's other tasks to another
                    // thread meanwhile.
                    if model.items() >= LONG_SCAN_ITEMS && on_multi_thread_runtime() {
                        tokio::task::block_in_place(scan)
                    } else {
                        scan()
                    }
                });
                self.states.insert(
                    user_id.to_owned(),
                    CachedState {
                        ranked: Some((key, best.clone())),
                        ..CachedState::new(model, events, state)
                    },
                );
                best
            }
        };
        let items = best
            .into_iter()
            .map(|(i, score)| Scored {
                item_id: model.item_id(i).to_owned(),
                score,
                reason: request.explain.then(|| reason_for(model, history, i)),
            })
            .collect();
        Ranked {
            model_version: Some(model.meta.version.clone()),
            strategy: "personalized",
            items,
        }
    }

    /// The cold-start list: popular items, narrowed by category.
    fn popular_for(
        &self,
        version: Option<String>,
        popular: &[(String, f64)],
        request: &Request,
        events: &[UserEvent],
    ) -> Ranked {
        let excluded = excluded_ids(events, request);
        let kind = if request.category.is_some() {
            "category"
        } else {
            "popular"
        };
        let catalogue = self.catalogue.view();
        let items = popular
            .iter()
            .filter(|(id, _)| !excluded.contains(id.as_str()) && catalogue.allows(id, request.category.as_deref()))
            .take(request.n)
            .map(|(id, score)| Scored {
                item_id: id.clone(),
                score: *score as f32,
                reason: request.explain.then_some(Reason { kind, item_id: None }),
            })
            .collect();
        Ranked {
            model_version: version,
            strategy: "popular",
            items,
        }
    }

    /// Items like `item_id`: by the learned embeddings plus co-occurrence,
    /// or by co-occurrence alone for an item seen fewer than
    /// `MIN_EMBEDDED_INTERACTIONS` times (its embedding learned little).
    /// `None` when the model does not know the item.
    pub fn similar(
        &self,
        model: &ModelSnapshot,
        item_id: &str,
        n: usize,
        category: Option<&str>,
    ) -> Option<Vec<Scored>> {
        let item = model.item_index(item_id)?;
        let learned = model.weights.is_some()
            && model.popularity.get(item as usize).copied().unwrap_or(0.0) >= MIN_EMBEDDED_INTERACTIONS;
        let catalogue = self.catalogue.view();
        let best = SCORES.with(|scores| {
            let mut scores = scores.borrow_mut();
            if learned {
                model.similar_scores(item, &mut scores);
            } else {
                scores.clear();
                scores.resize(model.items() + 1, f32::NEG_INFINITY);
                for (j, sim) in model.neighbours.of(item) {
                    scores[j as usize] = sim;
                }
                scores[item as usize] = f32::NEG_INFINITY;
            }
            top_n(&scores, n, |i| !catalogue.allows(model.item_id(i), category))
        });
        Some(
            best.into_iter()
                .map(|(i, score)| Scored {
                    item_id: model.item_id(i).to_owned(),
                    score,
                    reason: None,
                })
                .collect(),
        )
    }
}

/// A user's events (newest first) as the model reads them: oldest first,
/// items the model does not know left out.
pub fn history_of(model: &ModelSnapshot, events: &[UserEvent]) -> Vec<Step> {
    events
        .iter()
        .rev()
        .filter_map(|e| {
            model.item_index(&e.item_id).map(|item| Step {
                item,
                kind: e.kind as u8,
            })
        })
        .collect()
}

/// The N best items from the index's candidates and the history's
/// co-occurrence neighbours, each scored exactly as `score_user` would.
/// `None` when fewer than N of them pass `skip` (narrow filters): the
/// caller then scores every item.
pub fn approximate_top_n(
    model: &ModelSnapshot,
    index: &AnnIndex,
    history: &[Step],
    state: &UserState,
    n: usize,
    mut skip: impl FnMut(u32) -> bool,
) -> Option<Vec<(u32, f32)>> {
    let weights = model.weights.as_ref()?;
    let q = weights.query(state);
    let candidates = index
        .candidates(&q, index.candidates_for(n))
        .map_err(|e| tracing::warn!(error = %e, "index search failed; scoring every item"))
        .ok()?;
    let mut scored: HashMap<u32, f32> = candidates
        .into_iter()
        .filter(|&i| i != 0)
        .map(|i| (i, weights.score_one(&q, i)))
        .collect();
    if model.meta.knn_weight > 0.0 {
        model
            .neighbours
            .for_each_score(history, model.meta.knn_weight, |j, part| {
                *scored.entry(j).or_insert_with(|| weights.score_one(&q, j)) += part;
            });
    }
    let mut ranked: Vec<(u32, f32)> = scored.into_iter().filter(|&(_, s)| !s.is_nan()).collect();
    ranked.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    // Filters look items up by id in large maps: only as far down the
    // ranking as the answer needs.
    let best: Vec<(u32, f32)> = ranked.into_iter().filter(|&(i, _)| !skip(i)).take(n).collect();
    (best.len() >= n.min(model.items())).then_some(best)
}

/// From this many items, scoring every item (about 1 ms per 100,000) leaves
/// the async worker for the time it takes.
const LONG_SCAN_ITEMS: usize = 100_000;

fn on_multi_thread_runtime() -> bool {
    tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread)
}

/// Below this many interactions in the training data an item's similar
/// items come from co-occurrence alone.
pub const MIN_EMBEDDED_INTERACTIONS: f32 = 5.0;

/// The item ids a request leaves out for this user.
fn excluded_ids<'a>(events: &'a [UserEvent], request: &'a Request) -> HashSet<&'a str> {
    let purchase = EventType::Purchase.code();
    let mut excluded: HashSet<&str> = match request.exclude {
        Exclude::Seen => events.iter().map(|e| e.item_id.as_str()).collect(),
        Exclude::Purchased => events
            .iter()
            .filter(|e| e.kind == purchase)
            .map(|e| e.item_id.as_str())
            .collect(),
        Exclude::None => HashSet::new(),
    };
    excluded.extend(request.exclude_items.iter().map(String::as_str));
    excluded
}

/// `similar_to` the newest of the user's items whose co-occurrence
/// neighbours include the item, else `sequence`.
fn reason_for(model: &ModelSnapshot, history: &[Step], item: u32) -> Reason {
    for step in history.iter().rev().take(20) {
        if model.neighbours.of(step.item).take(20).any(|(j, _)| j == item) {
            return Reason {
                kind: "similar_to",
                item_id: Some(model.item_id(step.item).to_owned()),
            };
        }
    }
    Reason {
        kind: "sequence",
        item_id: None,
    }
}
