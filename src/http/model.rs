//! `GET /v1/model`: the served snapshot, its online figures and the
//! trainings; `GET /v1/model/embeddings`: its items on a 2-D map;
//! `POST /v1/model/train` (admin): train now.

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
use crate::churn::ChurnFigures;
use crate::clock::format_timestamp;
use crate::domain::{OnlineStats, TrainingOutcome, TrainingRun};
use crate::model::snapshot::{ModelMetrics, SnapshotKind};
use crate::model::Metrics;
use crate::recommend::{IndexInfo, WarmInfo};
use crate::trainer::{Busy, TrainFrom};

pub(super) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(show))
        .routes(routes!(train))
        .routes(routes!(embeddings))
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
    /// Churn prediction as the served model's training measured it on a
    /// time split; `null` before a training that could (too little history).
    churn: Option<ChurnFigures>,
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
    /// The candidate's held-out figures and the baselines', on the
    /// training's own leave-one-out test, whether it was published or
    /// rejected; `null` while running and when it failed before it was
    /// evaluated.
    metrics: Option<HeldOut>,
}

impl From<&ModelMetrics> for HeldOut {
    fn from(m: &ModelMetrics) -> Self {
        HeldOut {
            model: (&m.model).into(),
            popular: (&m.popular).into(),
            item_knn: (&m.item_knn).into(),
        }
    }
}

impl From<&TrainingRun> for Training {
    fn from(run: &TrainingRun) -> Self {
        let metrics = run
            .metrics
            .as_deref()
            .and_then(|json| serde_json::from_str::<ModelMetrics>(json).ok());
        Training {
            started_at: format_timestamp(run.started_at),
            finished_at: run.finished_at.map(format_timestamp),
            outcome: run.outcome,
            reason: run.reason.clone(),
            version: run.version.clone(),
            replica: run.replica.clone(),
            metrics: metrics.as_ref().map(HeldOut::from),
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
        metrics: meta.map(|m| HeldOut::from(&m.metrics)),
        churn: meta.and_then(|m| m.churn.as_ref()).map(ChurnFigures::from),
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

/// Points on the map unless `limit` says otherwise.
const DEFAULT_POINTS: i64 = 2000;
/// The most points one answer may ask for.
const MAX_POINTS: i64 = 50_000;

/// The parameters of `GET /v1/model/embeddings`.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
struct EmbeddingsQuery {
    /// How many items: the most popular ones.
    #[param(minimum = 1, maximum = 50000, default = 2000)]
    limit: Option<u32>,
}

/// The served model's items on a 2-D map.
#[derive(Serialize, ToSchema)]
#[schema(example = json!({"version": "20261128153405372", "total": 360, "points": [
    {"item_id": "item-3", "x": 0.82, "y": -0.31, "category": "shoes", "title": "Trail shoe"}]}))]
struct Embeddings {
    /// The served model's version; `null` while no model with a network is
    /// served (none yet, or one trained on too little data for a network).
    version: Option<String>,
    /// Items on the whole map (the model's items), of which `points` holds
    /// the `limit` most popular; 0 when there is no map.
    total: usize,
    /// The most popular items first (by their interactions in the model's
    /// training data). Empty without a map: no network model, or one
    /// trained before maps were made (until the next training).
    points: Vec<Point>,
}

/// An item's place on the map.
#[derive(Serialize, ToSchema)]
struct Point {
    item_id: String,
    /// The first principal component of the item embeddings.
    x: f32,
    /// The second.
    y: f32,
    /// The item's first category, as the catalogue holds it now; `null`
    /// when it has none.
    category: Option<String>,
    /// The item's title now; `null` when it has none.
    title: Option<String>,
}

/// The `n` dense indexes of the most popular items, most popular first
/// (ties: the lower index first).
fn most_popular(popularity: &[f32], items: usize, n: usize) -> Vec<u32> {
    let count = |i: u32| popularity.get(i as usize).copied().unwrap_or(0.0);
    let order = |a: &u32, b: &u32| count(*b).total_cmp(&count(*a)).then(a.cmp(b));
    let mut indexes: Vec<u32> = (1..=items as u32).collect();
    if n < indexes.len() {
        indexes.select_nth_unstable_by(n, order);
        indexes.truncate(n);
    }
    indexes.sort_unstable_by(order);
    indexes
}

/// The served model's item embeddings on a 2-D map, for the dashboard.
///
/// Each item's coordinates on the first two principal components of the
/// model's item embeddings (PCA), computed when the model was trained and
/// stored with its snapshot; the `limit` most popular items, with their
/// first category and title from the catalogue now. The map holds no user
/// data. The axes' scale and sign mean nothing across versions.
#[utoipa::path(
    get,
    path = "/v1/model/embeddings",
    tag = "model",
    params(EmbeddingsQuery),
    responses(
        (status = 200, description = "The map (empty points without one)", body = Embeddings),
        (status = 422, description = "`invalid-fields`: `limit` is not a whole number from 1 to 50,000",
            body = Problem, content_type = "application/problem+json"),
    )
)]
async fn embeddings(
    State(state): State<AppState>,
    Query(params): Query<HashMap<String, String>>,
) -> ApiResult<Json<Embeddings>> {
    let limit = super::error::single_limit(&params, "limit", DEFAULT_POINTS, MAX_POINTS)?;
    let limit = usize::try_from(limit).unwrap_or(1);
    let model = state.serving.model().filter(|m| m.meta.kind == SnapshotKind::Network);
    let Some(model) = model else {
        return Ok(Json(Embeddings {
            version: None,
            total: 0,
            points: Vec::new(),
        }));
    };
    let version = Some(model.meta.version.clone());
    if model.projection.is_none() {
        return Ok(Json(Embeddings {
            version,
            total: 0,
            points: Vec::new(),
        }));
    }
    let catalogue = state.serving.catalogue.view();
    let points = most_popular(&model.popularity, model.items(), limit)
        .into_iter()
        .filter_map(|index| {
            let (x, y) = model.point(index).filter(|(x, y)| x.is_finite() && y.is_finite())?;
            let item_id = model.item_id(index);
            Some(Point {
                item_id: item_id.to_owned(),
                x,
                y,
                category: catalogue.categories(item_id).first().cloned(),
                title: catalogue.title(item_id).map(str::to_owned),
            })
        })
        .collect();
    Ok(Json(Embeddings {
        version,
        total: model.items(),
        points,
    }))
}

#[cfg(test)]
mod tests {
    use super::most_popular;

    #[test]
    fn the_most_popular_come_first_ties_by_index() {
        let popularity = [0.0, 3.0, 9.0, 3.0, 1.0, 9.0];
        assert_eq!(most_popular(&popularity, 5, 3), [2, 5, 1]);
        assert_eq!(most_popular(&popularity, 5, 5), [2, 5, 1, 3, 4]);
        assert_eq!(most_popular(&popularity, 5, 50), [2, 5, 1, 3, 4]);
        assert_eq!(most_popular(&popularity, 5, 1), [2]);
    }
}
