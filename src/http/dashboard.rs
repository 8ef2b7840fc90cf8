//! The dashboard: a web UI at `/dashboard` whose assets are compiled into the
//! binary (no network beyond recd itself), and `GET /v1/key`, which tells
//! the page what its key may do. Every figure the pages show comes from the
//! JSON API under `/v1/`; the pages are in `assets/dashboard/`.

use axum::extract::Extension;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::Access;
use super::AppState;

/// The pages may load scripts, styles and data from recd only. Chart.js
/// sets styles on its canvases, hence `'unsafe-inline'` for styles alone.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
                   img-src 'self' data: blob:; connect-src 'self'; base-uri 'none'; form-action 'self'; \
                   frame-ancestors 'none'";

/// The assets: path under `/dashboard/`, content type, bytes.
const ASSETS: &[(&str, &str, &[u8])] = &[
    (
        "",
        "text/html; charset=utf-8",
        include_bytes!("../../assets/dashboard/index.html"),
    ),
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../assets/dashboard/app.js"),
    ),
    (
        "app.css",
        "text/css; charset=utf-8",
        include_bytes!("../../assets/dashboard/app.css"),
    ),
    (
        "vendor/chart.umd.min.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../assets/dashboard/vendor/chart.umd.min.js"),
    ),
    (
        "vendor/chart.js-LICENSE.md",
        "text/plain; charset=utf-8",
        include_bytes!("../../assets/dashboard/vendor/chart.js-LICENSE.md"),
    ),
];

/// The pages and their assets: no key needed to load them (they hold no
/// data); the data they show is fetched with the key.
pub(super) fn pages() -> Router<AppState> {
    let mut router = Router::new().route("/dashboard", get(|| async { Redirect::permanent("/dashboard/") }));
    for (path, content_type, bytes) in ASSETS {
        let (content_type, bytes): (&'static str, &'static [u8]) = (content_type, bytes);
        router = router.route(
            &format!("/dashboard/{path}"),
            get(move || async move { asset(content_type, bytes) }),
        );
    }
    router
}

fn asset(content_type: &'static str, bytes: &'static [u8]) -> Response {
    let mut response = bytes.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    // A new binary may bring new pages: the browser asks again each time.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

pub(super) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(key))
}

#[derive(Serialize, ToSchema)]
struct KeyInfo {
    /// What the presented key may do: `read`, `write` or `admin`; `admin`
    /// when no keys are configured; `null` when no key was presented.
    #[schema(value_type = Option<String>, pattern = "^(read|write|admin)$")]
    scope: Option<&'static str>,
    /// Whether this server asks for keys at all.
    keys_required: bool,
}

/// What the caller's key may do.
///
/// Any valid key may ask, whatever its scope, and so may a caller with no
/// key, who learns whether one is needed. An unknown key is 401.
#[utoipa::path(
    get,
    path = "/v1/key",
    tag = "ops",
    responses((status = 200, description = "The key's scope", body = KeyInfo))
)]
async fn key(Extension(access): Extension<Access>) -> Json<KeyInfo> {
    Json(match access {
        Access::Open => KeyInfo {
            scope: Some("admin"),
            keys_required: false,
        },
        Access::Key(scope) => KeyInfo {
            scope: Some(scope.name()),
            keys_required: true,
        },
        Access::Anonymous => KeyInfo {
            scope: None,
            keys_required: true,
        },
    })
}
