//! Profiles: `GET /v1/users/{user_id}/profile` (read).
//!
//! The handler fetches and `crate::profile` computes. Nothing of a user is
//! cached, so once erased a user's profile is 404 at once; only the
//! shop-wide quantiles (no single user's data) are kept: the app computes
//! them in the background, and a request never waits for them.

use std::collections::{HashMap, HashSet};

use axum::extract::{Path, State};
use axum::Json;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::{ApiError, Problem};
use super::openapi::Id;
use super::{ApiResult, AppState};
use crate::profile::{build_profile, Profile};

/// A profile reads at most the user's newest this many events.
pub const MAX_PROFILE_EVENTS: i64 = 10_000;

pub(super) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(profile))
}

/// Who a shopper is, from their events.
///
/// Durations are measured back from `as_of`, the newest event in the store;
/// how each field is computed is in docs/api.md.
#[utoipa::path(
    get,
    path = "/v1/users/{user_id}/profile",
    tag = "users",
    params(("user_id" = Id, Path, description = "The shopper")),
    responses(
        (status = 200, description = "The profile", body = Profile),
        (status = 404, description = "`not-found`: the store holds no event of the user (never seen, or erased)",
            body = Problem, content_type = "application/problem+json"),
    )
)]
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
    let churn = state.app.churn_model();
    let profile = build_profile(&user_id, &events, &categories, &shop, as_of, churn.as_ref()).ok_or_else(not_found)?;
    Ok(Json(profile))
}
