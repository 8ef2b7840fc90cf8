//! Users: erasure (admin).

use axum::extract::{Path, State};
use axum::routing::delete;
use axum::{Json, Router};
use serde_json::{json, Value};

use super::{ApiResult, AppState};

pub(super) fn router() -> Router<AppState> {
    Router::new().route("/v1/users/{user_id}", delete(erase))
}

/// Erases every event of the user. The event ids go with them, so an event
/// sent later with one of those ids is stored as new.
async fn erase(State(state): State<AppState>, Path(user_id): Path<String>) -> ApiResult<Json<Value>> {
    let deleted = state.store.delete_user(&user_id).await?;
    state.serving.forget_user(&user_id);
    tracing::info!(deleted_events = deleted, "user erased");
    Ok(Json(json!({"deleted_events": deleted})))
}
