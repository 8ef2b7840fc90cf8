//! Bearer API keys with scopes. Keys are kept as SHA-256 digests and compared
//! in constant time, so neither a key's bytes nor its length leak through
//! timing.

use axum::extract::{Request, State};
use axum::http::{header, Method};
use axum::middleware::Next;
use axum::response::Response;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::error::ApiError;
use super::AppState;
use crate::config::{ApiKey, Scope};

pub(super) struct Keys(Vec<(Scope, [u8; 32])>);

impl Keys {
    pub(super) fn new(keys: &[ApiKey]) -> Self {
        Keys(keys.iter().map(|k| (k.scope, digest(&k.key))).collect())
    }

    /// The scope of the key, if it is one of ours, and the position of
    /// (the first) key that matched.
    fn scope_of(&self, presented: &str) -> Option<(Scope, usize)> {
        let presented = digest(presented);
        // Every key is compared, so the time does not say which matched.
        let mut found: Option<(Scope, usize)> = None;
        for (at, (scope, key)) in self.0.iter().enumerate() {
            if bool::from(key.ct_eq(&presented)) {
                found = Some(found.map_or((*scope, at), |(s, first)| (s.max(*scope), first)));
            }
        }
        found
    }
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// What each route needs: reads need `read`, except a segment's member
/// lists (they list shoppers), which need `admin` as erasing a user and
/// starting a training do; every other write needs `write`. The OpenAPI
/// document names the same scopes (`super::openapi`).
pub(super) fn needed_scope(method: &Method, path: &str) -> (Scope, &'static str) {
    if path.starts_with("/v1/segments/") {
        (Scope::Admin, "do admin operations")
    } else if *method == Method::GET || *method == Method::HEAD {
        (Scope::Read, "read")
    } else if path.starts_with("/v1/users/") || path.starts_with("/v1/model") {
        (Scope::Admin, "do admin operations")
    } else {
        (Scope::Write, "write")
    }
}

/// The route that tells a caller what its key may do: any key's holder may
/// ask, and so may a caller without one (to learn that a key is needed).
pub(super) const KEY_ROUTE: &str = "/v1/key";

/// Who is calling, as the key check found: passed to the handlers in the
/// request's extensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Access {
    /// No keys are configured: everything is allowed (loopback only).
    Open,
    /// A valid key of this scope.
    Key(Scope),
    /// No key presented, on the one route that allows it.
    Anonymous,
}

pub(super) async fn require_scope(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if state.keys.0.is_empty() {
        // No keys configured: `serve` only listens on loopback then.
        request.extensions_mut().insert(Access::Open);
        return Ok(next.run(request).await);
    }
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let is_key_route = request.uri().path() == KEY_ROUTE;
    let Some(presented) = presented else {
        if is_key_route {
            // Asking whether a key is needed needs none.
            request.extensions_mut().insert(Access::Anonymous);
            return Ok(next.run(request).await);
        }
        return Err(ApiError::Unauthorized);
    };
    let (scope, key) = state.keys.scope_of(presented).ok_or(ApiError::Unauthorized)?;
    let (needed, action) = needed_scope(request.method(), request.uri().path());
    if !is_key_route && !scope.allows(needed) {
        return Err(ApiError::Forbidden(action));
    }
    request.extensions_mut().insert(Access::Key(scope));
    // The rate limit counts the request against this key.
    request.extensions_mut().insert(super::rate_limit::Caller::Key(key));
    Ok(next.run(request).await)
}
