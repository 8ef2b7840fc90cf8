//! Popular items per window, recency-weighted, computed by the store and
//! served from memory. A list is computed once when its window is first
//! asked for; after that the app's background task recomputes it when new
//! events arrived, and requests are answered from the list last computed:
//! a refresh never blocks a request.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::store::{Store, StoreError};

/// An event this many days older than the newest counts half.
pub const HALF_LIFE_DAYS: f64 = 7.0;
/// At most this many windows are kept (each `GET /v1/popular?window=` may
/// ask for another); past it the list of a new window is not kept.
const MAX_WINDOWS: usize = 32;

pub type List = Arc<Vec<(String, f64)>>;

/// A computed list and the newest arrival number it counts.
#[derive(Debug, Clone)]
struct Entry {
    list: List,
    through_seq: i64,
}

#[derive(Debug, Default)]
pub struct PopularCache {
    /// Window in ms (0 = everything) -> its list.
    lists: RwLock<HashMap<i64, Entry>>,
}

fn key(window: Option<Duration>) -> i64 {
    window.map_or(0, |w| i64::try_from(w.as_millis()).unwrap_or(i64::MAX))
}

impl PopularCache {
    /// Items by recency-weighted interactions within `window` of the newest
    /// event in the store, best first: the list last computed, or (the
    /// first time this window is asked for) computed now.
    pub async fn get(&self, store: &Store, window: Option<Duration>) -> Result<List, StoreError> {
        if let Some(entry) = self.lists.read().unwrap_or_else(|e| e.into_inner()).get(&key(window)) {
            return Ok(entry.list.clone());
        }
        self.refresh(store, window).await
    }

    /// Computes the list of `window` from the store and keeps it.
    pub async fn refresh(&self, store: &Store, window: Option<Duration>) -> Result<List, StoreError> {
        let key = key(window);
        let through_seq = store.max_event_seq().await?;
        let list: List = match store.newest_event_ms().await? {
            None => Arc::default(),
            Some(newest) => {
                let since = if key == 0 { i64::MIN } else { newest.saturating_sub(key) };
                Arc::new(store.popular_items(since, newest, HALF_LIFE_DAYS).await?)
            }
        };
        let mut lists = self.lists.write().unwrap_or_else(|e| e.into_inner());
        if lists.len() < MAX_WINDOWS || lists.contains_key(&key) {
            lists.insert(
                key,
                Entry {
                    list: list.clone(),
                    through_seq,
                },
            );
        }
        Ok(list)
    }

    /// The windows kept whose list counts fewer arrivals than `newest_seq`.
    pub fn stale(&self, newest_seq: i64) -> Vec<Option<Duration>> {
        self.lists
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(_, e)| e.through_seq < newest_seq)
            .map(|(&k, _)| (k > 0).then(|| Duration::from_millis(k as u64)))
            .collect()
    }

    /// Marks every list stale (after an erasure: the counts still include
    /// the erased user's events), so the next background refresh recomputes
    /// them all.
    pub fn mark_stale(&self) {
        for entry in self.lists.write().unwrap_or_else(|e| e.into_inner()).values_mut() {
            entry.through_seq = i64::MIN;
        }
    }
}
