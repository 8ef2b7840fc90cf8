//! Profiles: `GET /v1/users/{user_id}/profile` (read).
//!
//! The handler fetches and `crate::profile` computes. Nothing of a user is
//! cached, so once erased a user's profile is 404 at once; only the
//! shop-wide quantiles (no single user's data) are kept: the app computes
//! them in the background, and a request never waits for them.

use std::collections::{HashMap, HashSet};

use axum::extract::{Path, State};
use axum::routing::get;
use axum::{Json, Router};

use super::error::ApiError;
use super::{ApiResult, AppState};
use crate::profile::{build_profile, Profile};

/// A profile reads at most the user's newest this many events.
pub const MAX_PROFILE_EVENTS: i64 = 10_000;

pub(super) fn router() -> Router<AppState> {
    Router::new().route("/v1/users/{user_id}/profile", get(profile))
}

/// The user's profile; 404 when the store holds no event of theirs.
async fn profile(State(state): State<AppState>, Path(user_id): Path<String>) -> ApiResult<Json<Profile>> {
    let store = &state.store;
    let events = store.user_events(&user_id, MAX_PROFILE_EVENTS).await?;
    let not_found = || ApiError::NotFound(format!("no events of user {user_id:?}"));
    if events.is_empty() {
        return Err(not_found());
    }
    let item_ids: Vec<&str> = events
        .iter()
        .map(|e| e.item_id.as_str())
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    // From the catalogue in memory: no store round trip.
    let categories: HashMap<String, Vec<String>> = {
        let catalogue = state.serving.catalogue.view();
        item_ids
            .iter()
            .map(|id| ((*id).to_owned(), catalogue.categories(id).to_vec()))
            .collect()
    };
    let shop = state.app.shop_stats();
    // The newest event as the app keeps it (read in the background, raised
    // by this process's ingest); the store is asked only before the first
    // read. Erased meanwhile, the store may be empty: the user's own events
    // then say how late it is.
    let as_of = match state.app.newest_event_ms() {
        Some(newest) => newest,
        None => store.newest_event_ms().await?.unwrap_or(i64::MIN),
    };
    let profile = build_profile(&user_id, &events, &categories, &shop, as_of).ok_or_else(not_found)?;
    Ok(Json(profile))
}
