//! The rating figures of every category (`GET /v1/items/{item_id}/stats`'s
//! `categories`). A category's figures sum those of its items, which takes
//! a pass over every rating, so they are computed in the background every
//! `rating_stats_refresh` when something they depend on changed (new
//! events, the catalogue's categories, an erasure, a retention pass) and
//! served from memory: a refresh never blocks a request, the previous
//! figures serve until the new ones are ready.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwapOption;

use crate::clock::now_ms;
use crate::domain::RatingTotals;
use crate::ratings::{by_category, window_starts};
use crate::recommend::Serving;
use crate::store::Store;

/// Every category's rating sums, as of one moment.
#[derive(Debug, Default)]
pub struct CategoryRatings {
    /// The newest event in the store when they were computed, which their
    /// windows are measured back from; `None` when the store had none.
    pub as_of_ms: Option<i64>,
    /// Categories with at least one rated item (others have no ratings).
    pub by_category: HashMap<String, RatingTotals>,
}

/// What the figures were computed from: when it changes they are stale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Inputs {
    through_seq: i64,
    catalogue_generation: u64,
    erasures: u64,
}

struct Computed {
    ratings: Arc<CategoryRatings>,
    inputs: Inputs,
}

#[derive(Default)]
pub(super) struct RatingStatsCache {
    current: ArcSwapOption<Computed>,
    /// Set when events went without a new arrival (retention).
    stale: AtomicBool,
    /// One refresh at a time.
    running: tokio::sync::Mutex<()>,
}

impl RatingStatsCache {
    /// The figures last computed; `None` before the first computation.
    pub(super) fn get(&self) -> Option<Arc<CategoryRatings>> {
        self.current.load().as_ref().map(|c| Arc::clone(&c.ratings))
    }

    /// Marks the figures for the next refresh.
    pub(super) fn mark_stale(&self) {
        self.stale.store(true, Ordering::SeqCst);
    }

    /// Recomputes the figures when their inputs changed since the last
    /// computation (or always, with `force`); whether it did.
    pub(super) async fn refresh(&self, store: &Store, serving: &Serving, force: bool) -> anyhow::Result<bool> {
        let _one = self.running.lock().await;
        // Read before the ratings, so that a change meanwhile is seen by
        // the next refresh.
        let stale = self.stale.swap(false, Ordering::SeqCst);
        let inputs = Inputs {
            through_seq: store.max_event_seq().await?,
            catalogue_generation: serving.catalogue.generation(),
            erasures: serving.erasures(),
        };
        let known = self.current.load().as_ref().map(|c| c.inputs);
        if !force && !stale && known == Some(inputs) {
            return Ok(false);
        }
        let started = Instant::now();
        let computed = self.compute(store, serving).await;
        let ratings = match computed {
            Ok(ratings) => ratings,
            Err(e) => {
                if stale {
                    self.mark_stale();
                }
                return Err(e);
            }
        };
        let seconds = started.elapsed().as_secs_f64();
        metrics::histogram!("recd_rating_stats_refresh_seconds").record(seconds);
        metrics::gauge!("recd_rating_stats_computed_at_seconds").set(now_ms() as f64 / 1000.0);
        metrics::gauge!("recd_rating_stats_categories").set(ratings.by_category.len() as f64);
        tracing::debug!(
            seconds,
            categories = ratings.by_category.len(),
            "category ratings refreshed"
        );
        self.current.store(Some(Arc::new(Computed {
            ratings: Arc::new(ratings),
            inputs,
        })));
        Ok(true)
    }

    async fn compute(&self, store: &Store, serving: &Serving) -> anyhow::Result<CategoryRatings> {
        let Some(as_of_ms) = store.newest_event_ms().await? else {
            return Ok(CategoryRatings::default());
        };
        let (last_from, previous_from) = window_starts(as_of_ms);
        let items = store.ratings_by_item(last_from, previous_from).await?;
        let catalogue = serving.catalogue.view();
        let by_category = by_category(items.iter().map(|(id, t)| (id.as_str(), *t)), |id| {
            catalogue.categories(id).to_vec()
        });
        Ok(CategoryRatings {
            as_of_ms: Some(as_of_ms),
            by_category,
        })
    }
}
