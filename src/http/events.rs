//! `POST /v1/events`: validate each event on its own, store the valid ones
//! in one transaction, answer only after the commit.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::{ApiError, Invalid, Problem};
use super::openapi::Id;
use super::{ApiResult, AppState, MAX_INFLATED_BODY};
use crate::clock::now_ms;
use crate::domain::EventType;
pub use crate::ingest::MAX_BATCH;
use crate::ingest::{parse_batch, BatchError, FieldError};

pub(super) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(ingest))
}

/// A batch of events. The handler reads the body itself (`crate::ingest`),
/// so that each event is validated on its own and one bad event does not
/// refuse the batch; these types only describe it.
#[derive(ToSchema)]
#[allow(dead_code)]
pub(super) struct EventBatch {
    #[schema(min_items = 1, max_items = 1000)]
    events: Vec<EventIn>,
}

/// One event. Fields recd does not know are ignored; `null` means absent.
#[derive(ToSchema)]
#[allow(dead_code)]
#[schema(example = json!({"event_id": "e-1", "user_id": "user-1", "item_id": "item-3", "type": "view", "session_id": "s-9"}))]
pub(super) struct EventIn {
    /// The collector's id: a resend by the same user with the same id stores nothing.
    #[schema(value_type = Option<Id>)]
    event_id: Option<String>,
    #[schema(value_type = Id)]
    user_id: String,
    /// An item not in the catalogue yet is created with no attributes.
    #[schema(value_type = Id)]
    item_id: String,
    #[schema(rename = "type")]
    kind: EventType,
    /// `rating`: required, 1 to 5. `purchase`: the amount paid, not
    /// negative. Other types: any number, stored and otherwise unused.
    value: Option<f64>,
    /// RFC 3339 with an offset, at most 5 minutes ahead of the server's
    /// clock; default: the time the server received the event.
    #[schema(format = DateTime)]
    timestamp: Option<String>,
    /// Groups events into one visit.
    #[schema(value_type = Option<Id>)]
    session_id: Option<String>,
    /// The `recommendation_id` of the answer that showed this item: counts a click.
    #[schema(value_type = Option<Id>)]
    recommendation_id: Option<String>,
}

/// An event of the batch that was refused, by its position.
#[derive(Debug, Serialize, ToSchema)]
struct Rejected {
    index: usize,
    errors: Vec<FieldError>,
}

/// `accepted + duplicates + rejected.length` is the batch size.
#[derive(Debug, Serialize, ToSchema)]
struct IngestReply {
    /// Events stored now.
    accepted: u64,
    /// Valid events whose user and `event_id` were stored before (or
    /// earlier in the batch).
    duplicates: u64,
    rejected: Vec<Rejected>,
}

/// Turns a body that could not be read into 413 (too large) or 400.
pub(super) fn read_body(body: Result<Bytes, BytesRejection>) -> ApiResult<Bytes> {
    body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::TooLarge(MAX_INFLATED_BODY)
        } else {
            ApiError::BadRequest(format!("the body could not be read: {rejection}"))
        }
    })
}

/// Stores what shoppers did.
///
/// Each event is validated on its own: the valid events of a batch are
/// stored in one transaction, answered after the commit, even when others in
/// it are invalid. A gzip body is accepted with `Content-Encoding: gzip`.
#[utoipa::path(
    post,
    path = "/v1/events",
    tag = "events",
    request_body = EventBatch,
    responses(
        (status = 200, description = "The batch was read (even if every event was rejected)", body = IngestReply),
        (status = 400, description = "`malformed-request`: the body is not JSON, or not an object with an `events` array; nothing stored",
            body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`invalid-fields`: `events` is empty or has more than 1,000 entries; nothing stored",
            body = Problem, content_type = "application/problem+json"),
    )
)]
async fn ingest(State(state): State<AppState>, body: Result<Bytes, BytesRejection>) -> ApiResult<Json<IngestReply>> {
    let body = read_body(body)?;
    let now = now_ms();
    let batch = parse_batch(&body, now).map_err(|e| match e {
        BatchError::Malformed(why) => ApiError::BadRequest(why),
        count @ BatchError::Count(_) => ApiError::invalid(vec![Invalid::new("events", count.to_string())]),
    })?;
    let valid = batch.valid;
    let rejected: Vec<Rejected> = batch
        .rejected
        .into_iter()
        .map(|(index, errors)| Rejected { index, errors })
        .collect();

    let accepted = state
        .store
        .insert_events_known(&valid, now, Some(&state.known_items))
        .await?;
    state.app.saw_events(valid.iter().map(|e| e.ts).max());
    // Their next recommendations read the new events.
    state
        .serving
        .histories
        .invalidate(valid.iter().map(|e| e.user_id.as_str()));
    let duplicates = valid.len() as u64 - accepted;
    metrics::counter!("recd_events_accepted_total").increment(accepted);
    metrics::counter!("recd_events_duplicate_total").increment(duplicates);
    metrics::counter!("recd_events_rejected_total").increment(rejected.len() as u64);
    Ok(Json(IngestReply {
        accepted,
        duplicates,
        rejected,
    }))
}
