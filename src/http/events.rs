//! `POST /v1/events`: validate each event on its own, store the valid ones
//! in one transaction, answer only after the commit.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use serde::Serialize;
use serde_json::Value;

use super::error::{ApiError, Invalid};
use super::{now_ms, parse_json, ApiResult, AppState, MAX_INFLATED_BODY};
use crate::ingest::{validate_event, FieldError};

/// Most events in one batch.
pub const MAX_BATCH: usize = 1000;

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
    let mut doc: Value = parse_json(&body)?;
    let Some(Value::Array(raw)) = doc.get_mut("events").map(Value::take) else {
        return Err(ApiError::BadRequest(
            "the body must be an object with an \"events\" array".to_owned(),
        ));
    };
    if raw.is_empty() || raw.len() > MAX_BATCH {
        return Err(ApiError::invalid(vec![Invalid::new(
            "events",
            format!("must hold 1 to {MAX_BATCH} events, got {}", raw.len()),
        )]));
    }

    let now = now_ms();
    let mut valid = Vec::with_capacity(raw.len());
    let mut rejected = Vec::new();
    for (index, event) in raw.iter().enumerate() {
        match validate_event(event, now) {
            Ok(event) => valid.push(event),
            Err(errors) => rejected.push(Rejected { index, errors }),
        }
    }

    let accepted = state
        .store
        .insert_events_known(&valid, now, Some(&state.known_items))
        .await?;
    if accepted > 0 {
        state.serving.popular.invalidate();
    }
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
