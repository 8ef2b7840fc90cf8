//! The HTTP API: one module per resource, each with its own `router()`, put
//! together by [`app`] with the layers every request passes through:
//!
//! 1. panics become 500 problems, and every request gets a span and metrics;
//! 2. error statuses made by the layers below (404 without a route, 405, 413,
//!    415, timeouts) are turned into `application/problem+json`;
//! 3. a timeout, and a bound on requests in flight that sheds load at once
//!    (503 + Retry-After) instead of queueing;
//! 4. a 1 MiB limit on the body as sent (Content-Length checked before a byte
//!    is read), then gzip inflation up to 5 MiB;
//! 5. the API-key check, by the scope each route needs.

mod auth;
pub mod error;
mod events;
mod items;
mod model;
mod ops;
mod profile;
mod recommend;
mod users;

use std::sync::Arc;
use std::time::Instant;

use axum::error_handling::HandleErrorLayer;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{BoxError, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use tower::limit::GlobalConcurrencyLimitLayer;
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::decompression::RequestDecompressionLayer;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

use crate::app::App;
use error::{problem, ApiError, PROBLEM_JSON};

/// A body as sent may be at most this large.
pub const MAX_BODY: usize = 1024 * 1024;
/// A gzip body may inflate to at most this.
pub const MAX_INFLATED_BODY: usize = 5 * 1024 * 1024;

/// What every handler can reach: the app, and what requests alone need.
/// One shared allocation, so the clone each request makes of it is one
/// reference count; it dereferences to the [`App`].
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

pub struct Shared {
    pub app: App,
    pub metrics: PrometheusHandle,
    keys: auth::Keys,
}

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

impl std::ops::Deref for Shared {
    type Target = App;

    fn deref(&self) -> &App {
        &self.app
    }
}

/// The whole API over `app` as a router, without a socket: the server binds
/// it, tests may call it directly.
pub fn router(app: App) -> Router {
    let state = AppState(Arc::new(Shared {
        keys: auth::Keys::new(&app.settings.api_keys),
        metrics: crate::telemetry::metrics_handle(),
        app,
    }));
    // One semaphore for the whole API (a plain concurrency limit would give
    // each route its own). Health and metrics stay outside it, so a busy
    // server still answers its probes.
    let shed = ServiceBuilder::new()
        .layer(HandleErrorLayer::new(|_: BoxError| async { ApiError::Overloaded }))
        .load_shed()
        .layer(GlobalConcurrencyLimitLayer::new(state.settings.max_concurrent_requests));
    let api = Router::new()
        .merge(events::router())
        .merge(items::router())
        .merge(profile::router())
        .merge(users::router())
        .merge(recommend::router())
        .merge(model::router())
        .route_layer(middleware::from_fn_with_state(state.clone(), auth::require_scope))
        .layer(shed);

    Router::new()
        .merge(api)
        .merge(ops::router())
        .route_layer(middleware::from_fn(remember_route))
        .layer(DefaultBodyLimit::max(MAX_INFLATED_BODY))
        .layer(RequestDecompressionLayer::new())
        .layer(RequestBodyLimitLayer::new(MAX_BODY))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            state.settings.request_timeout,
        ))
        .layer(middleware::from_fn(problems_for_bare_errors))
        .layer(middleware::from_fn(record_metrics))
        .layer(TraceLayer::new_for_http())
        .layer(CatchPanicLayer::custom(|_| {
            ApiError::Internal(anyhow::anyhow!("a handler panicked")).into_response()
        }))
        .with_state(state)
}

/// The route a request matched, passed outwards to the metrics layer.
#[derive(Clone)]
struct RouteName(String);

async fn remember_route(request: Request, next: Next) -> Response {
    let route = request.extensions().get::<MatchedPath>().map(|p| p.as_str().to_owned());
    let mut response = next.run(request).await;
    if let Some(route) = route {
        response.extensions_mut().insert(RouteName(route));
    }
    response
}

async fn record_metrics(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().to_string();
    let response = next.run(request).await;
    let route = response
        .extensions()
        .get::<RouteName>()
        .map_or_else(|| "unmatched".to_owned(), |r| r.0.clone());
    let labels = [
        ("method", method),
        ("route", route),
        ("status", response.status().as_u16().to_string()),
    ];
    metrics::counter!("recd_http_requests_total", &labels).increment(1);
    metrics::histogram!("recd_http_request_duration_seconds", &labels).record(started.elapsed().as_secs_f64());
    response
}

/// Error responses made by axum or tower-http come with a plain-text body;
/// the API promises problem+json for every error.
async fn problems_for_bare_errors(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    let is_problem = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(PROBLEM_JSON.as_bytes()));
    if !(status.is_client_error() || status.is_server_error()) || is_problem {
        return response;
    }
    let (slug, detail) = match status {
        StatusCode::NOT_FOUND => ("not-found", "no such resource".to_owned()),
        StatusCode::METHOD_NOT_ALLOWED => ("method-not-allowed", "this method is not allowed here".to_owned()),
        StatusCode::PAYLOAD_TOO_LARGE => (
            "too-large",
            format!("the request body is larger than {MAX_BODY} bytes ({MAX_INFLATED_BODY} once inflated)"),
        ),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => (
            "unsupported-media-type",
            "unsupported content encoding or type".to_owned(),
        ),
        StatusCode::SERVICE_UNAVAILABLE => ("timeout", "the request took too long; retry shortly".to_owned()),
        _ => ("error", status.canonical_reason().unwrap_or("error").to_owned()),
    };
    let mut fresh = problem(status, slug, status.canonical_reason().unwrap_or("Error"), detail, &[]);
    if status == StatusCode::SERVICE_UNAVAILABLE {
        fresh
            .headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from(1));
    }
    fresh
}

/// Reads a JSON body: 413 past the limit, 400 when it is not JSON.
pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::BadRequest(format!("the body is not valid JSON: {e}")))
}

pub(crate) type ApiResult<T> = Result<T, ApiError>;
