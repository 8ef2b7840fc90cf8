//! The HTTP API: one module per resource, each with its own `router()`, put
//! together by [`app`] with the layers every request passes through:
//!
//! 1. panics become 500 problems, and every request gets a span and metrics;
//! 2. error statuses made by the layers below (404 without a route, 405, 413,
//!    415, timeouts) are turned into `application/problem+json`;
//! 3. CORS for the origins configured (none by default);
//! 4. a timeout (503 for slow handlers);
//! 5. a 1 MiB limit on the body as sent (Content-Length checked before a byte
//!    is read), then gzip inflation up to 5 MiB;
//! 6. on the API's routes: the API-key check, by the scope each route needs;
//!    the rate limit per key ([`rate_limit`]); admission, a bound on requests
//!    in flight with a short bounded queue ([`admission`]); and the body read
//!    whole within `body_read_timeout` (408 otherwise).
//!
//! [`conn`] serves the connections (header read timeout, lingering close).
//!
//! Each module registers its routes with the handlers' OpenAPI descriptions
//! ([`openapi`]), so the document served at `/openapi.json` is made from the
//! same registration as the router.

mod admission;
mod auth;
pub mod conn;
mod dashboard;
pub mod error;
mod events;
mod items;
mod model;
mod openapi;
mod ops;
mod profile;
mod rate_limit;
mod recommend;
mod segments;
mod stats;
mod users;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, HttpBody};
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::decompression::RequestDecompressionLayer;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;
use utoipa_axum::router::OpenApiRouter;

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
    // One admission for the whole API (a plain concurrency limit would give
    // each route its own). Health and metrics stay outside it, so a busy
    // server still answers its probes.
    let settings = &state.settings;
    let admission = admission::Admission::new(
        settings.max_concurrent_requests,
        settings.max_queued_requests,
        settings.queue_timeout,
    );
    let rate_limit = rate_limit::RateLimit::new(&settings.rate_limit, &settings.trusted_proxies);
    let mut api = OpenApiRouter::new()
        .merge(events::router())
        .merge(items::router())
        .merge(profile::router())
        .merge(users::router())
        .merge(segments::router())
        .merge(recommend::router())
        .merge(model::router())
        .merge(dashboard::router())
        .merge(stats::router())
        .route_layer(middleware::from_fn_with_state(
            settings.body_read_timeout,
            read_body_within,
        ))
        .route_layer(middleware::from_fn_with_state(admission, admission::admit));
    if !rate_limit.is_off() {
        api = api.route_layer(middleware::from_fn_with_state(rate_limit, rate_limit::limit));
    }
    let api = api.route_layer(middleware::from_fn_with_state(state.clone(), auth::require_scope));

    let (routes, document) = OpenApiRouter::new().merge(api).merge(ops::router()).split_for_parts();
    let document = serde_json::to_vec(&openapi::document(document)).expect("the OpenAPI document serialises");

    let mut router = routes
        .merge(dashboard::pages())
        .layer(Extension(ops::Document(document.into())))
        .route_layer(middleware::from_fn(remember_route))
        .layer(DefaultBodyLimit::max(MAX_INFLATED_BODY))
        .layer(RequestDecompressionLayer::new())
        .layer(RequestBodyLimitLayer::new(MAX_BODY))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            settings.request_timeout,
        ));
    if let Some(cors) = cors(&settings.cors_origins) {
        router = router.layer(cors);
    }
    router
        .layer(middleware::from_fn(problems_for_bare_errors))
        .layer(middleware::from_fn(close_after_refusal))
        .layer(middleware::from_fn(record_metrics))
        // Failures are logged where they happen (an internal error at ERROR,
        // the store at WARN); a 503 or 429 under a flood is not one to log
        // per request, it is counted in recd_requests_shed_total.
        .layer(TraceLayer::new_for_http().on_failure(()))
        .layer(CatchPanicLayer::custom(|_| {
            ApiError::Internal(anyhow::anyhow!("a handler panicked")).into_response()
        }))
        .with_state(state)
}

/// Browsers on these origins may call the read endpoints with an API key;
/// `None` without origins (no CORS headers at all). `*` allows any origin.
fn cors(origins: &[String]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let allowed = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    Some(
        CorsLayer::new()
            .allow_origin(allowed)
            .allow_methods([Method::GET, Method::HEAD])
            .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE])
            .expose_headers([
                header::RETRY_AFTER,
                header::HeaderName::from_static("ratelimit-limit"),
                header::HeaderName::from_static("ratelimit-remaining"),
                header::HeaderName::from_static("ratelimit-reset"),
            ])
            .max_age(Duration::from_secs(600)),
    )
}

/// Reads the request's body whole before the handler runs, within
/// `limit`: a client that stalls mid-body gets 408 instead of holding a
/// turn until the request timeout. A body past the size limits is 413.
async fn read_body_within(State(limit): State<Duration>, request: Request, next: Next) -> Response {
    if request.body().size_hint().exact() == Some(0) {
        return next.run(request).await;
    }
    let (parts, body) = request.into_parts();
    match tokio::time::timeout(limit, axum::body::to_bytes(body, MAX_INFLATED_BODY)).await {
        Err(_) => {
            metrics::counter!("recd_http_body_timeouts_total").increment(1);
            ApiError::BodyTimeout(limit.as_millis()).into_response()
        }
        Ok(Err(e)) if too_large(&e) => ApiError::TooLarge(MAX_BODY).into_response(),
        Ok(Err(e)) => ApiError::BadRequest(format!("the body could not be read: {e}")).into_response(),
        Ok(Ok(bytes)) => next.run(Request::from_parts(parts, Body::from(bytes))).await,
    }
}

/// Whether a body error is one of the size limits (as sent or inflated).
fn too_large(e: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(error) = source {
        if error.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = error.source();
    }
    false
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

/// A request with a body that is refused may not have had its body read
/// (401, 413 by its length, 429, 503...): its connection cannot carry
/// another request, so the answer says `Connection: close` and the client
/// does not reuse it. (The connection then lingers to read the rest; see
/// [`conn`].)
async fn close_after_refusal(request: Request, next: Next) -> Response {
    let has_body = request.body().size_hint().exact() != Some(0);
    let mut response = next.run(request).await;
    let status = response.status();
    if has_body && (status.is_client_error() || status.is_server_error()) {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
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
