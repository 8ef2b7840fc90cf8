//! What the filters know of the catalogue, in memory: which items are
//! unavailable or deleted, and each item's categories. Refreshed from the
//! store's changes since the last look, so every replica sees every write
//! within a refresh period, and at once after its own writes.

use std::collections::HashMap;
use std::sync::RwLock;

use crate::domain::ItemFlags;
use crate::store::{Store, StoreError};

/// While the newest change seen is this recent (ms, by the wall clock),
/// changes are read again from this far before it, so that a write
/// committed late, or stamped by a replica whose clock lags a little, is not
/// missed. Older than that, only newer changes are read.
const OVERLAP_MS: i64 = 3_000;

#[derive(Debug, Clone, Default)]
struct Entry {
    blocked: bool,
    categories: Vec<String>,
}

/// Only items that are blocked or have categories take memory: an item
/// absent here is recommendable and in no category.
#[derive(Debug, Default)]
pub struct Catalogue {
    items: RwLock<HashMap<String, Entry>>,
    /// The newest change seen; one refresh at a time.
    since: tokio::sync::Mutex<Option<i64>>,
    /// Bumped whenever what the filters see changes.
    generation: std::sync::atomic::AtomicU64,
}

/// A read view for one request: one lock for every check.
pub struct View<'a>(std::sync::RwLockReadGuard<'a, HashMap<String, Entry>>);

impl View<'_> {
    /// Whether the item may be recommended, in `category` if one is given.
    pub fn allows(&self, item_id: &str, category: Option<&str>) -> bool {
        match self.0.get(item_id) {
            None => category.is_none(),
            Some(e) => !e.blocked && category.is_none_or(|c| e.categories.iter().any(|x| x == c)),
        }
    }

    pub fn categories(&self, item_id: &str) -> &[String] {
        self.0.get(item_id).map_or(&[], |e| e.categories.as_slice())
    }
}

impl Catalogue {
    /// Changes whenever an item's flags or categories change.
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn view(&self) -> View<'_> {
        View(self.items.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Reads the catalogue's changes since the last refresh.
    pub async fn refresh(&self, store: &Store) -> Result<(), StoreError> {
        let mut since = self.since.lock().await;
        let now = crate::clock::now_ms();
        let changes = match *since {
            None => {
                // The first load: only items the filters must know of, and
                // the newest change of all, to go on from.
                let newest = store.newest_item_change_ms().await?;
                let changes = store.catalogue_changes(i64::MIN, true).await?;
                *since = newest;
                changes
            }
            Some(s) if now - s <= OVERLAP_MS => store.catalogue_changes(s - OVERLAP_MS, false).await?,
            Some(s) => store.catalogue_changes(s + 1, false).await?,
        };
        if let Some(newest) = self.apply(changes) {
            *since = Some(since.map_or(newest, |s| s.max(newest)));
        }
        Ok(())
    }

    /// Takes in items' changes; returns the newest change time among them.
    pub fn apply(&self, changes: Vec<ItemFlags>) -> Option<i64> {
        let newest = changes.iter().map(|c| c.updated_at).max()?;
        let mut items = self.items.write().unwrap_or_else(|e| e.into_inner());
        let mut changed = false;
        for change in changes {
            let blocked = change.deleted || !change.available;
            if blocked || !change.categories.is_empty() {
                let entry = Entry {
                    blocked,
                    categories: change.categories,
                };
                let known = items.get(&change.item_id);
                if known.is_none_or(|e| e.blocked != entry.blocked || e.categories != entry.categories) {
                    items.insert(change.item_id, entry);
                    changed = true;
                }
            } else if items.remove(&change.item_id).is_some() {
                changed = true;
            }
        }
        if changed {
            self.generation.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        Some(newest)
    }
}
