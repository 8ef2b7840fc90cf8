//! Warming: once a model is served, the newest events of the most recently
//! active users are read and run through its recurrent network ahead of
//! their next request, which then skips the store read and the recurrent
//! steps and only ranks. A warmed state is a cached state like any other:
//! a new event of the user makes it stale, and erasure drops it.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use super::history::CAPACITY_EVENTS;
use super::state::CachedState;
use super::{history_of, Serving, HISTORY_LIMIT};
use crate::domain::UserEvent;
use crate::model::ModelSnapshot;
use crate::store::Store;

/// Users whose events are read before their states are made on a blocking
/// thread.
const CHUNK_USERS: usize = 256;

/// Where the newest warming is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum WarmState {
    Warming,
    Done,
    Failed,
    /// `warm_users` is 0, or the model has no network to warm.
    #[default]
    Off,
}

/// What became of the newest warming, for `GET /v1/model`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, utoipa::ToSchema)]
pub struct WarmInfo {
    pub state: WarmState,
    /// The model version warmed for.
    pub version: String,
    /// Users whose state is ready.
    pub users: usize,
    pub seconds: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Serving {
    /// What became of the newest warming, while a model is served.
    pub fn warm_info(&self) -> Option<WarmInfo> {
        self.model()?;
        Some(self.warm.lock().unwrap_or_else(|e| e.into_inner()).clone())
    }

    /// Makes the states of up to `users` of the most recently active users
    /// (among those with events from `since_ms` on) under `model`, stopping
    /// early when another model is served or the events read would crowd
    /// the history cache. Records the outcome for `warm_info` and returns it.
    pub async fn warm(
        self: &Arc<Self>,
        store: &Store,
        model: &Arc<ModelSnapshot>,
        users: usize,
        since_ms: i64,
    ) -> WarmInfo {
        let started = Instant::now();
        let mut info = WarmInfo {
            state: if users == 0 || model.weights.is_none() {
                WarmState::Off
            } else {
                WarmState::Warming
            },
            version: model.meta.version.clone(),
            ..WarmInfo::default()
        };
        self.set_warm_info(&info);
        if info.state == WarmState::Off {
            return info;
        }
        match self.warm_users(store, model, (users, since_ms), &mut info).await {
            Ok(()) => info.state = WarmState::Done,
            Err(e) => {
                info.state = WarmState::Failed;
                info.error = Some(format!("{e:#}"));
            }
        }
        info.seconds = started.elapsed().as_secs_f64();
        self.set_warm_info(&info);
        info
    }

    async fn warm_users(
        self: &Arc<Self>,
        store: &Store,
        model: &Arc<ModelSnapshot>,
        (users, since_ms): (usize, i64),
        info: &mut WarmInfo,
    ) -> anyhow::Result<()> {
        let ids = store.recently_active_users(users as i64, since_ms).await?;
        let mut events_read = 0u64;
        for chunk in ids.chunks(CHUNK_USERS) {
            if !self.serves(model) || events_read >= CAPACITY_EVENTS / 2 {
                break;
            }
            let erasures = self.erasures.load(Ordering::SeqCst);
            let mut batch = Vec::with_capacity(chunk.len());
            for user in chunk {
                let events = self.histories.get(store, user, HISTORY_LIMIT).await?;
                events_read += events.len() as u64;
                batch.push((user.clone(), events));
            }
            let (serving, model) = (self.clone(), model.clone());
            info.users += tokio::task::spawn_blocking(move || serving.warm_states(&model, batch, erasures)).await?;
            self.set_warm_info(info);
        }
        Ok(())
    }

    /// Runs `model` over each user's events unless a fitting state is
    /// cached; returns how many users have one now. `erasures` is the count
    /// of erasures before the events were read.
    fn warm_states(&self, model: &ModelSnapshot, batch: Vec<(String, Arc<Vec<UserEvent>>)>, erasures: u64) -> usize {
        let mut warmed = 0;
        for (user, events) in batch {
            if self.states.get(&user).is_some_and(|c| c.fits(model, &events)) {
                warmed += 1;
                continue;
            }
            let history = history_of(model, &events);
            if history.is_empty() {
                continue;
            }
            let state = model.user_state(&history, self.max_len);
            self.states
                .insert(user.clone(), CachedState::new(model, &events, state));
            // Erasure counts itself, then drops the state: after an erasure
            // since the events were read, the state may be of an erased
            // user, and is dropped again.
            if self.erasures.load(Ordering::SeqCst) == erasures {
                warmed += 1;
            } else {
                self.states.remove(&user);
            }
        }
        warmed
    }

    /// Whether `model` is the one served.
    fn serves(&self, model: &ModelSnapshot) -> bool {
        self.model
            .load()
            .as_ref()
            .is_some_and(|m| m.meta.version == model.meta.version)
    }

    fn set_warm_info(&self, info: &WarmInfo) {
        let mut current = self.warm.lock().unwrap_or_else(|e| e.into_inner());
        // A warming for an older model does not overwrite a newer one's.
        if info.version == current.version || self.model().is_some_and(|m| m.meta.version == info.version) {
            *current = info.clone();
        }
    }
}
