//! Users' newest events, kept in memory so that a recommendations request
//! does not always read the store. An entry is dropped as soon as the user
//! has a new event: at once for events stored by this process, and within
//! `FOLLOW_EVERY` for events stored by any other (another replica, `recd
//! import`), which a background task finds by arrival number. Erasure drops
//! the user here too.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::domain::UserEvent;
use crate::store::{Store, StoreError};

/// How often the store is asked which users have new events.
pub const FOLLOW_EVERY: Duration = Duration::from_millis(250);
/// Arrival numbers are handed out before commit, so a transaction may
/// become visible after a later one: this many numbers before the newest
/// seen are looked at again.
const SLACK: i64 = 2_000;
/// Events kept over all users (an entry weighs its event count, at least 1).
pub const CAPACITY_EVENTS: u64 = 2_000_000;

#[derive(Clone)]
struct ByEvents;

impl quick_cache::Weighter<String, Arc<Vec<UserEvent>>> for ByEvents {
    fn weight(&self, _: &String, events: &Arc<Vec<UserEvent>>) -> u64 {
        events.len().max(1) as u64
    }
}

pub struct Histories {
    users: quick_cache::sync::Cache<String, Arc<Vec<UserEvent>>, ByEvents>,
    /// Bumped by every invalidation: a read that overlapped one is not
    /// cached, as it may predate the new event.
    epoch: AtomicU64,
    /// The newest arrival number followed, and rounds of looking again.
    followed: tokio::sync::Mutex<Option<(i64, u32)>>,
}

impl Default for Histories {
    fn default() -> Self {
        Histories {
            users: quick_cache::sync::Cache::with_weighter(100_000, CAPACITY_EVENTS, ByEvents),
            epoch: AtomicU64::new(0),
            followed: tokio::sync::Mutex::new(None),
        }
    }
}

impl Histories {
    /// The user's newest `limit` events, newest first.
    pub async fn get(&self, store: &Store, user_id: &str, limit: i64) -> Result<Arc<Vec<UserEvent>>, StoreError> {
        if let Some(events) = self.users.get(user_id) {
            return Ok(events);
        }
        let epoch = self.epoch.load(Ordering::SeqCst);
        let events = Arc::new(store.user_events(user_id, limit).await?);
        if self.epoch.load(Ordering::SeqCst) == epoch {
            self.users.insert(user_id.to_owned(), events.clone());
        }
        Ok(events)
    }

    /// The users have new events (or none any more).
    pub fn invalidate<'a>(&self, user_ids: impl IntoIterator<Item = &'a str>) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        for user in user_ids {
            self.users.remove(user);
        }
    }

    /// Drops the users with events that arrived since the last look. After
    /// new arrivals the last `SLACK` numbers are looked at again for a few
    /// rounds, for transactions that became visible late.
    pub async fn follow(&self, store: &Store) -> Result<(), StoreError> {
        let mut followed = self.followed.lock().await;
        let newest = store.max_event_seq().await?;
        let Some((seen, rescans)) = *followed else {
            // Nothing cached may predate the first look.
            self.invalidate(std::iter::empty());
            self.users.clear();
            *followed = Some((newest, 0));
            return Ok(());
        };
        if newest == seen && rescans == 0 {
            return Ok(());
        }
        let (users, _) = store.users_with_events_after(seen.min(newest) - SLACK).await?;
        self.invalidate(users.iter().map(String::as_str));
        let rescans = if newest > seen { RESCANS } else { rescans - 1 };
        *followed = Some((newest.max(seen), rescans));
        Ok(())
    }
}

/// Rounds of looking again after new arrivals.
const RESCANS: u32 = 4;
