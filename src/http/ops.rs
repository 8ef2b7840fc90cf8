//! Health, readiness and Prometheus metrics: no key needed.

use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use super::error::ApiError;
use super::AppState;

pub(super) fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
}

async fn healthz() -> impl IntoResponse {
    Json(json!({"status": "ok"}))
}

/// Ready while the store answers within a second.
async fn readyz(State(state): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    match tokio::time::timeout(Duration::from_secs(1), state.store.ping()).await {
        Ok(Ok(())) => Ok((
            StatusCode::OK,
            Json(json!({"status": "ready", "store": state.store.kind()})),
        )),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(ApiError::Unavailable),
    }
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let pool = state.store.pool_stats();
    metrics::gauge!("recd_store_pool_connections").set(f64::from(pool.size));
    metrics::gauge!("recd_store_pool_idle").set(pool.idle as f64);
    metrics::gauge!("recd_store_pool_max").set(f64::from(pool.max));
    if let Some(model) = state.serving.model() {
        let trained = chrono::DateTime::parse_from_rfc3339(&model.meta.trained_at)
            .map(|t| t.timestamp_millis())
            .unwrap_or(0);
        metrics::gauge!("recd_snapshot_age_seconds").set((crate::clock::now_ms() - trained) as f64 / 1000.0);
        metrics::gauge!("recd_snapshot_info", "version" => model.meta.version.clone()).set(1.0);
    }
    // Click-through per version, as the store counts it (every replica the same).
    if let Ok(Ok(stats)) = tokio::time::timeout(Duration::from_secs(1), state.store.online_stats()).await {
        for s in stats {
            let version = s.model_version.unwrap_or_else(|| "none".to_owned());
            metrics::gauge!("recd_online_impressions", "version" => version.clone()).set(s.impressions as f64);
            metrics::gauge!("recd_online_clicks", "version" => version.clone()).set(s.clicks as f64);
            let ctr = if s.impressions > 0 {
                s.clicks as f64 / s.impressions as f64
            } else {
                0.0
            };
            metrics::gauge!("recd_online_ctr", "version" => version).set(ctr);
        }
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        state.metrics.render(),
    )
}
