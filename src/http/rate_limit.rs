//! Rate limits: a token bucket (GCRA, from `governor`) per caller for each
//! scope's routes, off unless `[rate_limit]` sets a rate. The caller is the
//! API key that authenticated the request; with no keys configured it is
//! the client's address: the peer's, or, only when the peer is one of
//! `trusted_proxies`, the nearest untrusted address in X-Forwarded-For.
//! Over the limit: 429 with Retry-After; every limited answer carries
//! RateLimit-Limit, RateLimit-Remaining and RateLimit-Reset.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::Clock;
use governor::middleware::StateInformationMiddleware;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use ipnet::IpNet;

use super::error::ApiError;
use crate::config::{RateLimits, Scope};

/// Who a request counts against.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) enum Caller {
    /// The configured API key at this position.
    Key(usize),
    Address(IpAddr),
}

type Limiter = DefaultKeyedRateLimiter<Caller, StateInformationMiddleware>;

struct Bucket {
    limiter: Limiter,
    quota: Quota,
    scope: &'static str,
}

#[derive(Clone)]
pub(super) struct RateLimit(Arc<Inner>);

struct Inner {
    read: Option<Bucket>,
    write: Option<Bucket>,
    admin: Option<Bucket>,
    trusted_proxies: Vec<IpNet>,
    checks: AtomicU64,
}

/// Forgotten callers are dropped from the buckets every this many checks.
const SWEEP_EVERY: u64 = 4096;

impl RateLimit {
    pub(super) fn new(limits: &RateLimits, trusted_proxies: &[IpNet]) -> Self {
        let bucket = |scope: Scope, name: &'static str| {
            let (rate, burst) = limits.of(scope)?;
            let quota = Quota::with_period(Duration::from_secs_f64(1.0 / rate))?
                .allow_burst(NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN));
            Some(Bucket {
                limiter: RateLimiter::keyed(quota).with_middleware::<StateInformationMiddleware>(),
                quota,
                scope: name,
            })
        };
        RateLimit(Arc::new(Inner {
            read: bucket(Scope::Read, "read"),
            write: bucket(Scope::Write, "write"),
            admin: bucket(Scope::Admin, "admin"),
            trusted_proxies: trusted_proxies.to_vec(),
            checks: AtomicU64::new(0),
        }))
    }

    pub(super) fn is_off(&self) -> bool {
        self.0.read.is_none() && self.0.write.is_none() && self.0.admin.is_none()
    }

    fn bucket(&self, scope: Scope) -> Option<&Bucket> {
        match scope {
            Scope::Read => self.0.read.as_ref(),
            Scope::Write => self.0.write.as_ref(),
            Scope::Admin => self.0.admin.as_ref(),
        }
    }

    fn sweep(&self) {
        for bucket in [&self.0.read, &self.0.write, &self.0.admin].into_iter().flatten() {
            bucket.limiter.retain_recent();
            bucket.limiter.shrink_to_fit();
            metrics::gauge!("recd_rate_limit_callers", "scope" => bucket.scope).set(bucket.limiter.len() as f64);
        }
    }

    /// The client's address: the peer, unless the peer is a trusted proxy;
    /// then the nearest address in X-Forwarded-For that is not one.
    fn client_address(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let trusted = |ip: &IpAddr| self.0.trusted_proxies.iter().any(|net| net.contains(ip));
        if !trusted(&peer) {
            return peer;
        }
        let forwarded = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|hop| hop.trim().parse::<IpAddr>().ok())
            .collect::<Vec<_>>();
        forwarded.into_iter().rev().find(|ip| !trusted(ip)).unwrap_or(peer)
    }
}

fn seconds_up(duration: Duration) -> u64 {
    duration.as_secs() + u64::from(duration.subsec_nanos() > 0)
}

fn set_headers(headers: &mut HeaderMap, quota: &Quota, remaining: u32) {
    let limit = quota.burst_size().get();
    // Until the bucket is full again.
    let reset = quota.replenish_interval() * (limit - remaining.min(limit));
    headers.insert("ratelimit-limit", HeaderValue::from(limit));
    headers.insert("ratelimit-remaining", HeaderValue::from(remaining));
    headers.insert("ratelimit-reset", HeaderValue::from(seconds_up(reset)));
}

/// Runs after the API-key check, which leaves the [`Caller`] of a keyed
/// request in its extensions.
pub(super) async fn limit(State(limits): State<RateLimit>, request: Request, next: Next) -> Response {
    let (scope, _) = super::auth::needed_scope(request.method(), request.uri().path());
    let Some(bucket) = limits.bucket(scope) else {
        return next.run(request).await;
    };
    if limits.0.checks.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
        limits.sweep();
    }
    let caller = match request.extensions().get::<Caller>() {
        Some(caller) => caller.clone(),
        None => {
            let peer = request
                .extensions()
                .get::<ConnectInfo<SocketAddr>>()
                .map_or(IpAddr::from([127, 0, 0, 1]), |c| c.0.ip());
            Caller::Address(limits.client_address(peer, request.headers()))
        }
    };
    match bucket.limiter.check_key(&caller) {
        Ok(state) => {
            let mut response = next.run(request).await;
            set_headers(response.headers_mut(), &bucket.quota, state.remaining_burst_capacity());
            response
        }
        Err(not_until) => {
            metrics::counter!("recd_rate_limited_total", "scope" => bucket.scope).increment(1);
            let wait = not_until.wait_time_from(bucket.limiter.clock().now());
            let mut response = ApiError::TooManyRequests {
                retry_after: seconds_up(wait).max(1),
            }
            .into_response();
            set_headers(response.headers_mut(), &bucket.quota, 0);
            response
        }
    }
}
