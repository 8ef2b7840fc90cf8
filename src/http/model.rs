//! `GET /v1/model`: the served snapshot, its online figures and the
//! trainings; `POST /v1/model/train` (admin): train now.

use std::collections::HashMap;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::{ApiError, Invalid, Problem};
use super::{ApiResult, AppState};
use crate::clock::format_timestamp;
use crate::domain::{OnlineStats, TrainingOutcome, TrainingRun};
use crate::model::snapshot::SnapshotKind;
use crate::model::Metrics;
use crate::recommend::{IndexInfo, WarmInfo};
use crate::trainer::{Busy, TrainFrom};

pub(super) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(show)).routes(routes!(train))
}

/// Trainings shown in `history`.
const HISTORY: i64 = 20;

/// The served model, its held-out figures, click-through per version and
/// the trainings. While no model is published, the fields down to `warm`
/// are `null`.
#[derive(Serialize, ToSchema)]
struct ModelView {
    /// The served snapshot's version: `YYYYMMDDhhmmssSSS` (UTC) of its training.
    version: Option<String>,
    /// When its training finished.
    trained_at: Option<String>,
    kind: Option<SnapshotKind>,
    /// Events the training read.
    events: Option<u64>,
    users: Option<u64>,
    items: Option<u64>,
    metrics: Option<HeldOut>,
    index: Option<IndexInfo>,
    warm: Option<WarmInfo>,
    /// Per model version, oldest first, over the last `impressions_retention`.
    online: Vec<Online>,
    /// The newest training on any replica.
    last_training: Option<Training>,
    /// The newest 20 trainings, newest first.
    history: Vec<Training>,
    replica: Replica,
}

/// Held-out HR@10 and NDCG@10 of the model and of two baselines, on the
/// training's own leave-one-out test.
#[derive(Serialize, ToSchema)]
struct HeldOut {
    model: Figures,
    popular: Figures,
    item_knn: Figures,
}

#[derive(Serialize, ToSchema)]
struct Figures {
    #[serde(rename = "hr@10")]
    hr: f64,
    #[serde(rename = "ndcg@10")]
    ndcg: f64,
}

impl From<&Metrics> for Figures {
    fn from(m: &Metrics) -> Self {
        Figures { hr: m.hr, ndcg: m.ndcg }
    }
}

/// Click-through of one model version.
#[derive(Serialize, ToSchema)]
struct Online {
    /// `null` for answers given before any model existed.
    version: Option<String>,
    impressions: i64,
    /// Events that carried an answer's `recommendation_id` and named one of its items.
    clicks: i64,
    /// clicks / impressions.
    ctr: f64,
}

#[derive(Serialize, ToSchema)]
struct Training {
    started_at: String,
    /// `null` while running.
    finished_at: Option<String>,
    outcome: TrainingOutcome,
    /// Why, in words.
    reason: Option<String>,
    /// The candidate's version, published or not.
    version: Option<String>,
    replica: Option<String>,
}

impl From<&TrainingRun> for Training {
    fn from(run: &TrainingRun) -> Self {
        Training {
            started_at: format_timestamp(run.started_at),
            finished_at: run.finished_at.map(format_timestamp),
            outcome: run.outcome,
            reason: run.reason.clone(),
            version: run.version.clone(),
            replica: run.replica.clone(),
        }
    }
}

/// This process.
#[derive(Serialize, ToSchema)]
struct Replica {
    /// Host, pid and a random suffix.
    id: String,
    /// Whether it schedules trainings.
    trainer: bool,
    /// Whether it is training now.
    training: bool,
}

fn online(stats: &[OnlineStats]) -> Vec<Online> {
    stats
        .iter()
        .map(|s| {
            let ctr = if s.impressions > 0 {
                s.clicks as f64 / s.impressions as f64
            } else {
                0.0
            };
            Online {
                version: s.model_version.clone(),
                impressions: s.impressions,
                clicks: s.clicks,
                ctr,
            }
        })
        .collect()
}

/// The served model, its held-out figures, click-through per version and
/// the trainings.
#[utoipa::path(
    get,
    path = "/v1/model",
    tag = "model",
    responses((status = 200, description = "The model and its trainings", body = ModelView))
)]
async fn show(State(state): State<AppState>) -> ApiResult<Json<ModelView>> {
    // This replica's impressions count at once, not a second later.
    state.app.flush_impressions().await;
    let runs = state.store.trainings(HISTORY).await?;
    let online = online(&state.store.online_stats().await?);
    let model = state.serving.model();
    let meta = model.as_ref().map(|m| &m.meta);
    Ok(Json(ModelView {
        version: meta.map(|m| m.version.clone()),
        trained_at: meta.map(|m| m.trained_at.clone()),
        kind: meta.map(|m| m.kind),
        events: meta.map(|m| m.events),
        users: meta.map(|m| m.users),
        items: meta.map(|m| m.items),
        metrics: meta.map(|m| HeldOut {
            model: (&m.metrics.model).into(),
            popular: (&m.metrics.popular).into(),
            item_knn: (&m.metrics.item_knn).into(),
        }),
        index: state.serving.index_info(),
        warm: state.serving.warm_info(),
        online,
        last_training: runs.first().map(Training::from),
        history: runs.iter().map(Training::from).collect(),
        replica: Replica {
            id: state.trainer.replica.clone(),
            trainer: state.trainer.is_leader(),
            training: state.trainer.is_running(),
        },
    }))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
struct TrainQuery {
    /// `served`: continue from the served model's weights, as a scheduled
    /// training does (from scratch when it cannot); `scratch`: from random
    /// weights.
    #[param(inline)]
    from: Option<TrainFromParam>,
}

#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
#[allow(dead_code)]
enum TrainFromParam {
    Served,
    Scratch,
}

#[derive(Serialize, ToSchema)]
struct Started {
    #[schema(value_type = String, pattern = "^started$")]
    status: &'static str,
}

/// Starts a training now, on this replica, whatever the schedule.
///
/// Follow it in `GET /v1/model` (`last_training`). It goes through the same
/// gate as a scheduled one: it may end `rejected`, and the served model then
/// stays.
#[utoipa::path(
    post,
    path = "/v1/model/train",
    tag = "model",
    params(TrainQuery),
    responses(
        (status = 202, description = "Started", body = Started),
        (status = 409, description = "`conflict`: a training is already running in this process, or (PostgreSQL) on another replica",
            body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`invalid-fields`: `from` is neither `served` nor `scratch`",
            body = Problem, content_type = "application/problem+json"),
    )
)]
async fn train(
    State(state): State<AppState>,
    Query(params): Query<HashMap<String, String>>,
) -> ApiResult<(StatusCode, Json<Started>)> {
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
        Ok(()) => Ok((StatusCode::ACCEPTED, Json(Started { status: "started" }))),
        Err(busy @ (Busy::Here | Busy::Elsewhere)) => Err(ApiError::Conflict(busy.to_string())),
    }
}
