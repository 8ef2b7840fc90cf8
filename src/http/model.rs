//! `GET /v1/model`: the served snapshot, its online figures and the
//! trainings; `POST /v1/model/train` (admin): train now.

use std::collections::HashMap;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use super::error::{ApiError, Invalid};
use super::{ApiResult, AppState};
use crate::clock::format_timestamp;
use crate::domain::{OnlineStats, TrainingRun};
use crate::model::Metrics;
use crate::trainer::{Busy, TrainFrom};

pub(super) fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/model", get(show))
        .route("/v1/model/train", post(train))
}

/// Trainings shown in `history`.
const HISTORY: i64 = 20;

fn training_json(run: &TrainingRun) -> Value {
    json!({
        "started_at": format_timestamp(run.started_at),
        "finished_at": run.finished_at.map(format_timestamp),
        "outcome": run.outcome,
        "reason": run.reason,
        "version": run.version,
        "replica": run.replica,
    })
}

pub(super) fn online_json(stats: &[OnlineStats]) -> Vec<Value> {
    stats
        .iter()
        .map(|s| {
            let ctr = if s.impressions > 0 {
                s.clicks as f64 / s.impressions as f64
            } else {
                0.0
            };
            json!({"version": s.model_version, "impressions": s.impressions, "clicks": s.clicks, "ctr": ctr})
        })
        .collect()
}

async fn show(State(state): State<AppState>) -> ApiResult<Json<Value>> {
    // This replica's impressions count at once, not a second later.
    state.app.flush_impressions().await;
    let runs = state.store.trainings(HISTORY).await?;
    let online = state.store.online_stats().await?;
    let model = state.serving.model();
    let meta = model.as_ref().map(|m| &m.meta);
    let metric = |figures: &Metrics| json!({"hr@10": figures.hr, "ndcg@10": figures.ndcg});
    Ok(Json(json!({
        "version": meta.map(|m| m.version.clone()),
        "trained_at": meta.map(|m| m.trained_at.clone()),
        "kind": meta.map(|m| m.kind),
        "events": meta.map(|m| m.events),
        "users": meta.map(|m| m.users),
        "items": meta.map(|m| m.items),
        "metrics": meta.map(|m| json!({
            "model": metric(&m.metrics.model),
            "popular": metric(&m.metrics.popular),
            "item_knn": metric(&m.metrics.item_knn),
        })),
        "index": state.serving.index_info(),
        "warm": state.serving.warm_info(),
        "online": online_json(&online),
        "last_training": runs.first().map(training_json),
        "history": runs.iter().map(training_json).collect::<Vec<_>>(),
        "replica": {"id": state.trainer.replica, "trainer": state.trainer.is_leader(), "training": state.trainer.is_running()},
    })))
}

/// `from`: `scratch` trains from random weights; without it (or `served`)
/// the training continues from the served model when it can, as a
/// scheduled one does.
async fn train(
    State(state): State<AppState>,
    Query(params): Query<HashMap<String, String>>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let from = match params.get("from").map(String::as_str) {
        None | Some("served") => TrainFrom::Auto,
        Some("scratch") => TrainFrom::Scratch,
        Some(_) => {
            return Err(ApiError::invalid(vec![Invalid::new(
                "from",
                "must be scratch or served",
            )]));
        }
    };
    match crate::trainer::start_training(&state.app, from).await {
        Ok(()) => Ok((StatusCode::ACCEPTED, Json(json!({"status": "started"})))),
        Err(busy @ (Busy::Here | Busy::Elsewhere)) => Err(ApiError::Conflict(busy.to_string())),
    }
}
