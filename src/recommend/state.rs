//! The cache of users' recurrent states. A state is valid for one model
//! version and one newest event; with it is kept the last ranking made from
//! it, so the same question again costs no scoring. After new events a
//! state is advanced one LSTM step per event when that gives exactly the
//! state of the newest window; else it is made anew.

use std::sync::Arc;

use super::rank::history_of;
use super::{Exclude, Request};
use crate::domain::UserEvent;
use crate::model::{ModelSnapshot, UserState};

/// Cached user states: a request by a user whose events did not change
/// since their last request costs one scoring pass, no LSTM steps; the same
/// request again costs no scoring.
pub(super) const STATE_CACHE_USERS: usize = 200_000;

/// A user's recurrent state, valid for one model version and one newest
/// event, and the last ranking made from it.
#[derive(Debug, Clone)]
pub(super) struct CachedState {
    version: Arc<str>,
    newest_seq: i64,
    events: usize,
    pub(super) state: Option<UserState>,
    pub(super) ranked: Option<(RankingKey, Vec<(u32, f32)>)>,
}

impl CachedState {
    /// The state `model` reaches after `events` (newest first), with no
    /// ranking yet.
    pub(super) fn new(model: &ModelSnapshot, events: &[UserEvent], state: Option<UserState>) -> Self {
        CachedState {
            version: Arc::from(model.meta.version.as_str()),
            newest_seq: newest_seq(events),
            events: events.len(),
            state,
            ranked: None,
        }
    }

    /// This state with the ranking made from it for `key`.
    pub(super) fn with_ranking(self, key: RankingKey, best: Vec<(u32, f32)>) -> Self {
        CachedState {
            ranked: Some((key, best)),
            ..self
        }
    }

    /// Whether this was made by `model` from exactly these events.
    pub(super) fn fits(&self, model: &ModelSnapshot, events: &[UserEvent]) -> bool {
        *self.version == *model.meta.version && self.newest_seq == newest_seq(events) && self.events == events.len()
    }

    /// This state advanced by the user's events that arrived after it, one
    /// LSTM step each, when that is exactly the state of the newest
    /// `max_len` known events: the events it was made from are all still
    /// there, every new one is newer than them, and the window has room
    /// for the new steps (else it slides, and the state is made anew).
    pub(super) fn advanced(&self, model: &ModelSnapshot, events: &[UserEvent], max_len: usize) -> Option<UserState> {
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
pub(super) struct RankingKey {
    n: usize,
    category: Option<String>,
    exclude: Exclude,
    exclude_items: Vec<String>,
    catalogue: u64,
}

impl RankingKey {
    pub(super) fn of(request: &Request, catalogue: u64) -> Self {
        RankingKey {
            n: request.n,
            category: request.category.clone(),
            exclude: request.exclude,
            exclude_items: request.exclude_items.clone(),
            catalogue,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::EventType;
    use crate::model::snapshot::testing::snapshot;
    use crate::recommend::testing::user_events;

    /// Events newest first, as the store gives them, from `(item, seq)`
    /// pairs in time order (`seq`: the arrival number).
    fn events(in_time_order: &[(u32, i64)]) -> Vec<UserEvent> {
        let views: Vec<_> = in_time_order
            .iter()
            .map(|&(item, seq)| (item, EventType::View, seq))
            .collect();
        user_events(&views)
    }

    /// The state made from scratch from the newest `max_len` events.
    fn fresh(model: &ModelSnapshot, events: &[UserEvent], max_len: usize) -> Option<UserState> {
        model.user_state(&history_of(model, events), max_len)
    }

    fn cached(model: &ModelSnapshot, events: &[UserEvent], max_len: usize) -> CachedState {
        CachedState::new(model, events, fresh(model, events, max_len))
    }

    #[test]
    fn a_state_fits_only_its_model_and_events() {
        let model = snapshot(20, true, &[], 1);
        let before = events(&[(1, 10), (2, 11)]);
        let state = cached(&model, &before, 10);
        assert!(state.fits(&model, &before));
        // A new event makes it stale.
        assert!(!state.fits(&model, &events(&[(1, 10), (2, 11), (3, 12)])));
        // So does losing one (the same newest event, fewer events).
        assert!(!state.fits(&model, &events(&[(2, 11)])));
        // And another model version.
        assert!(!state.fits(&snapshot(20, true, &[], 2), &before));
    }

    #[test]
    fn new_events_advance_a_state_to_the_fresh_one() {
        let model = snapshot(20, true, &[], 3);
        let state = cached(&model, &events(&[(1, 10), (2, 11)]), 10);
        let now = events(&[(1, 10), (2, 11), (5, 12), (7, 13)]);
        let advanced = state.advanced(&model, &now, 10).expect("advanced");
        assert_eq!(advanced.steps, 4);
        let made = fresh(&model, &now, 10).expect("a state");
        for (a, b) in advanced.h.iter().zip(&made.h).chain(advanced.c.iter().zip(&made.c)) {
            assert!((a - b).abs() < 1e-5, "{a} != {b}");
        }
        // Nothing new: the same state.
        let same = state.advanced(&model, &events(&[(1, 10), (2, 11)]), 10).expect("same");
        assert_eq!(Some(same), state.state);
    }

    #[test]
    fn a_state_is_made_anew_when_advancing_would_differ() {
        let model = snapshot(20, true, &[], 4);
        let state = cached(&model, &events(&[(1, 10), (2, 11)]), 3);
        // The window (3) is full after one more step: it would slide.
        assert!(state
            .advanced(&model, &events(&[(1, 10), (2, 11), (3, 12), (4, 13)]), 3)
            .is_none());
        assert!(state
            .advanced(&model, &events(&[(1, 10), (2, 11), (3, 12)]), 3)
            .is_some());
        // An event newer in time that arrived before the state's newest
        // (it became visible late): not a step after the state.
        assert!(state
            .advanced(&model, &events(&[(1, 10), (2, 11), (3, 9)]), 10)
            .is_none());
        // An event it was made from is gone (erased).
        assert!(state.advanced(&model, &events(&[(2, 11), (3, 12)]), 10).is_none());
        // Another model's state.
        assert!(state
            .advanced(&snapshot(20, true, &[], 5), &events(&[(1, 10), (2, 11), (3, 12)]), 10)
            .is_none());
        // A model without a network has no state to advance.
        let plain = snapshot(20, false, &[], 4);
        assert!(cached(&plain, &events(&[(1, 10)]), 10)
            .advanced(&plain, &events(&[(1, 10), (2, 11)]), 10)
            .is_none());
    }
}
