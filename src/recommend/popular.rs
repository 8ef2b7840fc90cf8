//! Popular items per window, recency-weighted, computed by the store and
//! kept for a moment: a burst of cold-start requests costs one query.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::store::{Store, StoreError};

/// An event this many days older than the newest counts half.
pub const HALF_LIFE_DAYS: f64 = 7.0;
/// A list is recomputed after this long, or at once after an ingest here.
const FRESH_FOR: Duration = Duration::from_secs(2);

type List = Arc<Vec<(String, f64)>>;

#[derive(Debug, Default)]
pub struct PopularCache {
    /// Window in ms (0 = everything) -> (computed at, generation, list).
    lists: tokio::sync::Mutex<HashMap<i64, (Instant, u64, List)>>,
    generation: AtomicU64,
}

impl PopularCache {
    /// Events were stored: lists computed before are stale.
    pub fn invalidate(&self) {
        self.generation.fetch_add(1, Ordering::Relaxed);
    }

    /// Items by recency-weighted interactions within `window` of the newest
    /// event in the store, best first.
    pub async fn get(&self, store: &Store, window: Option<Duration>) -> Result<List, StoreError> {
        let key = window.map_or(0, |w| i64::try_from(w.as_millis()).unwrap_or(i64::MAX));
        // One computation at a time: concurrent callers wait for it.
        let mut lists = self.lists.lock().await;
        let generation = self.generation.load(Ordering::Relaxed);
        if let Some((at, seen, list)) = lists.get(&key) {
            if *seen == generation && at.elapsed() < FRESH_FOR {
                return Ok(list.clone());
            }
        }
        let list: List = match store.newest_event_ms().await? {
            None => Arc::default(),
            Some(newest) => {
                let since = if key == 0 { i64::MIN } else { newest.saturating_sub(key) };
                Arc::new(store.popular_items(since, newest, HALF_LIFE_DAYS).await?)
            }
        };
        lists.insert(key, (Instant::now(), generation, list.clone()));
        Ok(list)
    }
}
