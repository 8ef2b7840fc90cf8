//! Health, readiness, Prometheus metrics, the OpenAPI document and the API
//! reference page: no key needed.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::header;
use axum::response::{Html, IntoResponse};
use axum::{Extension, Json};
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::ApiError;
use super::AppState;

pub(super) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(metrics))
        .routes(routes!(openapi))
        .routes(routes!(docs))
}

#[derive(Serialize, ToSchema)]
struct Health {
    #[schema(value_type = String, pattern = "^ok$")]
    status: &'static str,
}

#[derive(Serialize, ToSchema)]
struct Ready {
    #[schema(value_type = String, pattern = "^ready$")]
    status: &'static str,
    /// `sqlite` or `postgres`.
    #[schema(value_type = String, pattern = "^(sqlite|postgres)$")]
    store: &'static str,
}

/// Live while the process runs.
#[utoipa::path(get, path = "/healthz", tag = "ops", responses((status = 200, description = "Running", body = Health)))]
async fn healthz() -> Json<Health> {
    Json(Health { status: "ok" })
}

/// Ready while the store answers within a second.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "ops",
    responses(
        (status = 200, description = "The store answers", body = Ready),
        (status = 503, description = "`store-unavailable`: the store did not answer within 1 second (Retry-After 2)",
            body = super::error::Problem, content_type = "application/problem+json"),
    )
)]
async fn readyz(State(state): State<AppState>) -> Result<Json<Ready>, ApiError> {
    match tokio::time::timeout(Duration::from_secs(1), state.store.ping()).await {
        Ok(Ok(())) => Ok(Json(Ready {
            status: "ready",
            store: state.store.kind(),
        })),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(ApiError::Unavailable),
    }
}

/// Prometheus metrics, in the text format; every metric is listed in
/// docs/operations.md.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "ops",
    responses((status = 200, description = "Prometheus text format (version 0.0.4)", body = String, content_type = "text/plain"))
)]
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

/// The OpenAPI document, serialised once when the router is made.
#[derive(Clone)]
pub(super) struct Document(pub Bytes);

/// This document: the API in OpenAPI 3.1.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "ops",
    responses((status = 200, description = "The OpenAPI 3.1 document", body = Object))
)]
async fn openapi(Extension(document): Extension<Document>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], document.0)
}

/// The reference page: Redoc's standalone bundle, vendored in
/// `assets/redoc` and compiled in, so the page needs nothing from another
/// host (its fonts are the browser's own).
const DOCS_PAGE: &str = concat!(
    r#"<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>recd API reference</title>
<style>body { margin: 0; padding: 0; }</style>
</head>
<body>
<div id="redoc"></div>
<script>
"#,
    include_str!("../../assets/redoc/redoc.standalone.js"),
    r#"
</script>
<script>
Redoc.init("openapi.json", {
  theme: {
    typography: {
      fontFamily: "system-ui, -apple-system, 'Segoe UI', sans-serif",
      headings: { fontFamily: "system-ui, -apple-system, 'Segoe UI', sans-serif" },
      code: { fontFamily: "ui-monospace, 'SFMono-Regular', Menlo, Consolas, monospace" }
    }
  }
}, document.getElementById("redoc"));
</script>
</body>
</html>
"#
);

/// What the page may load: its own inline script and styles, the document
/// from this host, Redoc's search worker (a blob). The bundle's sidebar
/// shows a logo from Redocly's CDN; the browser refuses it, and Redoc then
/// leaves the image out.
const DOCS_POLICY: &str = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
     img-src 'self' data:; font-src 'self' data:; connect-src 'self'; worker-src blob:; \
     base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The API reference, made from `/openapi.json` in the browser; it works
/// offline.
#[utoipa::path(
    get,
    path = "/docs",
    tag = "ops",
    responses((status = 200, description = "The reference page", body = String, content_type = "text/html"))
)]
async fn docs() -> impl IntoResponse {
    ([(header::CONTENT_SECURITY_POLICY, DOCS_POLICY)], Html(DOCS_PAGE))
}
