//! Users: erasure (admin).

use axum::extract::{Path, State};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::openapi::Id;
use super::{ApiResult, AppState};

pub(super) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(erase))
}

#[derive(Serialize, ToSchema)]
struct Erased {
    /// The user's events deleted (0 when they had none).
    deleted_events: u64,
}

/// Erases a shopper (right to erasure).
///
/// Deletes every event of the user and drops what any replica caches of
/// them. The event ids go with them, so an event sent later with one of
/// those ids is stored as new.
#[utoipa::path(
    delete,
    path = "/v1/users/{user_id}",
    tag = "users",
    params(("user_id" = Id, Path, description = "The shopper")),
    responses((status = 200, description = "Erased, even when the user had no events", body = Erased))
)]
async fn erase(State(state): State<AppState>, Path(user_id): Path<String>) -> ApiResult<Json<Erased>> {
    let deleted = state.store.delete_user(&user_id).await?;
    state.serving.forget_user(&user_id);
    tracing::info!(deleted_events = deleted, "user erased");
    Ok(Json(Erased {
        deleted_events: deleted,
    }))
}
