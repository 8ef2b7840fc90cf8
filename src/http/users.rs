//! Users: a shopper's events a page at a time (read), erasure (admin).

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::{ApiError, Invalid, Problem};
use super::openapi::Id;
use super::{ApiResult, AppState};
use crate::clock::format_timestamp;
use crate::domain::{EventType, UserEvent};

pub(super) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(erase)).routes(routes!(events))
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

/// Events per page unless `limit` says otherwise.
const DEFAULT_PAGE: i64 = 50;
/// The most events a page may ask for.
const MAX_PAGE: i64 = 500;

/// The parameters of `GET /v1/users/{user_id}/events`.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
struct EventsQuery {
    /// Events per page.
    #[param(minimum = 1, maximum = 500, default = 50)]
    limit: Option<u32>,
    /// `next_cursor` of the previous page; absent for the first.
    cursor: Option<String>,
}

/// A page of a shopper's events.
#[derive(Serialize, ToSchema)]
struct EventPage {
    user_id: String,
    /// Newest first (by timestamp; equal ones, the later arrival first).
    events: Vec<EventOut>,
    /// Pass as `cursor` for the next page; `null` on the last.
    next_cursor: Option<String>,
}

/// One event as stored.
#[derive(Serialize, ToSchema)]
struct EventOut {
    /// As `type` in `POST /v1/events`.
    #[serde(rename = "type")]
    kind: EventType,
    item_id: String,
    /// When it happened (the event's `timestamp`, or when it arrived if it
    /// had none), UTC with milliseconds.
    timestamp: String,
    /// The rating or the purchase's amount, when sent.
    value: Option<f64>,
    session_id: Option<String>,
}

impl EventOut {
    fn from(event: UserEvent) -> Option<EventOut> {
        Some(EventOut {
            kind: EventType::from_code(i64::from(event.kind))?,
            item_id: event.item_id,
            timestamp: format_timestamp(event.ts),
            value: event.value,
            session_id: event.session_id,
        })
    }
}

/// The cursor of the page after `last`: its timestamp and arrival number.
fn cursor_after(last: &UserEvent) -> String {
    format!("{}_{}", last.ts, last.seq)
}

fn parse_cursor(cursor: &str) -> Option<(i64, i64)> {
    let (ts, seq) = cursor.split_once('_')?;
    Some((ts.parse().ok()?, seq.parse().ok()?))
}

/// A shopper's events, newest first, a page at a time.
///
/// Each page's `next_cursor` continues after its last event, so paging
/// through lists every event once, also while new ones arrive (they are on
/// the first page of a new listing). The ids are the shop's own, also when
/// the store keeps them encrypted (`id_key`).
#[utoipa::path(
    get,
    path = "/v1/users/{user_id}/events",
    tag = "users",
    params(("user_id" = Id, Path, description = "The shopper"), EventsQuery),
    responses(
        (status = 200, description = "A page of events", body = EventPage),
        (status = 404, description = "`not-found`: the store holds no event of the user (never seen, or erased)",
            body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`invalid-fields`: a bad `limit` or `cursor`",
            body = Problem, content_type = "application/problem+json"),
    )
)]
async fn events(
    State(state): State<AppState>,
    Path(user_id): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> ApiResult<Json<EventPage>> {
    let mut errors = Vec::new();
    let limit = super::error::page_limit(&params, "limit", DEFAULT_PAGE, MAX_PAGE, &mut errors);
    let before = match params.get("cursor") {
        None => None,
        Some(cursor) => parse_cursor(cursor).or_else(|| {
            errors.push(Invalid::new("cursor", "not a cursor this API gave"));
            None
        }),
    };
    if !errors.is_empty() {
        return Err(ApiError::invalid(errors));
    }
    let store = &state.store;
    // One more than asked says whether a next page exists.
    let mut page = store.user_events_before(&user_id, before, limit + 1).await?;
    if page.is_empty() && (before.is_none() || store.user_events(&user_id, 1).await?.is_empty()) {
        return Err(ApiError::NotFound(format!("no events of user {user_id:?}")));
    }
    let size = usize::try_from(limit).unwrap_or(usize::MAX);
    let more = page.len() > size;
    page.truncate(size);
    let next_cursor = if more { page.last().map(cursor_after) } else { None };
    Ok(Json(EventPage {
        user_id,
        events: page.into_iter().filter_map(EventOut::from).collect(),
        next_cursor,
    }))
}

#[cfg(test)]
mod tests {
    use super::parse_cursor;

    #[test]
    fn cursors_read_back() {
        assert_eq!(parse_cursor("1700000000000_42"), Some((1_700_000_000_000, 42)));
        assert_eq!(parse_cursor("-5_3"), Some((-5, 3)));
        for bad in ["", "12", "a_1", "1_b", "1_2_3"] {
            assert_eq!(parse_cursor(bad), None, "{bad}");
        }
    }
}
