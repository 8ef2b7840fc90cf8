//! One error type for every handler, and the one table that turns each kind
//! into a status and an RFC 9457 problem. 5xx details go to the log, never to
//! the client.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::ingest::FieldError;
use crate::store::StoreError;

pub const PROBLEM_JSON: &str = "application/problem+json";

/// A field error, with the index of the array element it belongs to.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Invalid {
    /// The position in the request's array (`items`) of the element the
    /// error belongs to; absent when it belongs to the request as a whole.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
    pub field: String,
    pub message: String,
}

impl Invalid {
    pub fn new(field: &str, message: impl Into<String>) -> Self {
        Invalid {
            index: None,
            field: field.to_owned(),
            message: message.into(),
        }
    }

    pub fn at(index: usize, e: FieldError) -> Self {
        Invalid {
            index: Some(index),
            field: e.field,
            message: e.message,
        }
    }
}

impl From<FieldError> for Invalid {
    fn from(e: FieldError) -> Self {
        Invalid::new(&e.field, e.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("a valid API key is required")]
    Unauthorized,
    #[error("this API key may not {0}")]
    Forbidden(&'static str),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("the request body is larger than {0} bytes")]
    TooLarge(usize),
    #[error("{detail}")]
    Invalid { detail: String, errors: Vec<Invalid> },
    #[error("the server is busy; retry shortly")]
    Overloaded,
    #[error("this API key (or client) sent too many requests; retry in {retry_after} s")]
    TooManyRequests { retry_after: u64 },
    #[error("the request body did not arrive within {0} ms")]
    BodyTimeout(u128),
    #[error("the store is unavailable; retry shortly")]
    Unavailable,
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

impl ApiError {
    /// 422 naming one field.
    pub fn field(field: &str, message: impl Into<String>) -> Self {
        let message = message.into();
        ApiError::Invalid {
            detail: format!("{field}: {message}"),
            errors: vec![Invalid::new(field, message)],
        }
    }

    pub fn invalid(errors: Vec<Invalid>) -> Self {
        let detail = match errors.as_slice() {
            [one] => format!("{}: {}", one.field, one.message),
            _ => format!("{} fields are invalid", errors.len()),
        };
        ApiError::Invalid { detail, errors }
    }

    /// The table: status, problem type slug, title, and Retry-After.
    fn parts(&self) -> (StatusCode, &'static str, &'static str, Option<u64>) {
        match self {
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "malformed-request", "Malformed request", None),
            ApiError::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized", "Unauthorized", None),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden", "Forbidden", None),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not-found", "Not found", None),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "conflict", "Conflict", None),
            ApiError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "too-large", "Payload too large", None),
            ApiError::Invalid { .. } => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid-fields",
                "Invalid fields",
                None,
            ),
            ApiError::Overloaded => (StatusCode::SERVICE_UNAVAILABLE, "overloaded", "Overloaded", Some(1)),
            ApiError::TooManyRequests { retry_after } => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate-limited",
                "Too many requests",
                Some(*retry_after),
            ),
            ApiError::BodyTimeout(_) => (StatusCode::REQUEST_TIMEOUT, "body-timeout", "Request timeout", None),
            ApiError::Unavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "store-unavailable",
                "Store unavailable",
                Some(2),
            ),
            ApiError::Internal(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "Internal server error",
                None,
            ),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        let kind = match &e {
            StoreError::Unavailable(_) => "unavailable",
            _ => "other",
        };
        metrics::counter!("recd_store_errors_total", "kind" => kind).increment(1);
        match e {
            StoreError::Unavailable(e) => {
                tracing::warn!(error = %e, "store unavailable");
                ApiError::Unavailable
            }
            other => ApiError::Internal(other.into()),
        }
    }
}

/// An RFC 9457 problem, the body of every error
/// (`application/problem+json`). Branch on `status` and `type`; `title` and
/// `detail` are for people.
#[derive(Serialize, ToSchema)]
#[schema(example = json!({"type": "urn:recd:problem:invalid-fields", "title": "Invalid fields", "status": 422,
    "detail": "n: must be a whole number from 1 to 100",
    "errors": [{"field": "n", "message": "must be a whole number from 1 to 100"}]}))]
pub(crate) struct Problem<'a> {
    /// `urn:recd:problem:` and one of `malformed-request`, `unauthorized`,
    /// `forbidden`, `not-found`, `method-not-allowed`, `conflict`,
    /// `too-large`, `unsupported-media-type`, `invalid-fields`, `internal`,
    /// `overloaded`, `store-unavailable`, `timeout`.
    #[serde(rename = "type")]
    #[schema(pattern = "^urn:recd:problem:[a-z-]+$")]
    kind: String,
    #[schema(value_type = String)]
    title: &'a str,
    /// The HTTP status, as in the response line.
    #[schema(minimum = 400, maximum = 599)]
    status: u16,
    detail: String,
    /// Only on 422: each invalid parameter or field.
    #[serde(skip_serializing_if = "<[Invalid]>::is_empty")]
    #[schema(value_type = Option<Vec<Invalid>>)]
    errors: &'a [Invalid],
}

/// A problem+json response, also used for statuses that come from the
/// middleware (404 without a route, 405, 408, 413, 415).
pub fn problem(status: StatusCode, slug: &str, title: &str, detail: String, errors: &[Invalid]) -> Response {
    let body = Problem {
        kind: format!("urn:recd:problem:{slug}"),
        title,
        status: status.as_u16(),
        detail,
        errors,
    };
    let json = serde_json::to_vec(&body).unwrap_or_default();
    (
        status,
        [(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON))],
        json,
    )
        .into_response()
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, slug, title, retry_after) = self.parts();
        let detail = match &self {
            ApiError::Internal(e) => {
                tracing::error!(error = ?e, "internal error");
                "internal error; see the server log".to_owned()
            }
            other => other.to_string(),
        };
        let errors = match &self {
            ApiError::Invalid { errors, .. } => errors.as_slice(),
            _ => &[],
        };
        let mut response = problem(status, slug, title, detail, errors);
        if let Some(secs) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

/// The whole-number query parameter `name`, from 1 to `max`; `default` when
/// absent. A bad value is recorded in `errors` (naming it) and `default`
/// stands in, so every other parameter is still checked.
pub(crate) fn page_limit(
    params: &std::collections::HashMap<String, String>,
    name: &'static str,
    default: i64,
    max: i64,
    errors: &mut Vec<Invalid>,
) -> i64 {
    let Some(text) = params.get(name) else { return default };
    text.parse::<i64>()
        .ok()
        .filter(|n| (1..=max).contains(n))
        .unwrap_or_else(|| {
            errors.push(Invalid::new(name, format!("must be a whole number from 1 to {max}")));
            default
        })
}

/// [`page_limit`] where nothing else is checked: a bad value is the
/// answer's 422 at once.
pub(crate) fn single_limit(
    params: &std::collections::HashMap<String, String>,
    name: &'static str,
    default: i64,
    max: i64,
) -> Result<i64, ApiError> {
    let mut errors = Vec::new();
    let limit = page_limit(params, name, default, max, &mut errors);
    if errors.is_empty() {
        Ok(limit)
    } else {
        Err(ApiError::invalid(errors))
    }
}
