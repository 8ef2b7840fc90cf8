//! `POST /v1/events`: validate each event on its own, store the valid ones
//! in one transaction, answer only after the commit.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use serde::Serialize;

use super::error::{ApiError, Invalid};
use super::{ApiResult, AppState, MAX_INFLATED_BODY};
use crate::clock::now_ms;
pub use crate::ingest::MAX_BATCH;
use crate::ingest::{parse_batch, BatchError, FieldError};

pub(super) fn router() -> Router<AppState> {
    Router::new().route("/v1/events", post(ingest))
}

#[derive(Debug, Serialize)]
struct Rejected {
    index: usize,
    errors: Vec<FieldError>,
}

#[derive(Debug, Serialize)]
struct IngestReply {
    accepted: u64,
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
