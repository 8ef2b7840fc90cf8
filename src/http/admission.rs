//! Admission: at most `max_concurrent_requests` API requests run at once. A
//! request beyond them waits in a bounded queue (`max_queued_requests`) for
//! up to `queue_timeout`, and only then is answered 503 with Retry-After; a
//! full queue answers 503 at once. Under a flood the service keeps doing
//! useful work at its capacity (a turn frees, the next waiting request
//! takes it) instead of spending itself on refusals, and memory stays
//! bounded by the queue.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::sync::Semaphore;

use super::error::ApiError;

#[derive(Clone)]
pub(super) struct Admission(Arc<Inner>);

struct Inner {
    turns: Semaphore,
    waiting: AtomicUsize,
    max_waiting: usize,
    wait: Duration,
}

impl Admission {
    pub(super) fn new(max_running: usize, max_waiting: usize, wait: Duration) -> Self {
        metrics::gauge!("recd_requests_queue_capacity").set(max_waiting as f64);
        metrics::gauge!("recd_requests_running_capacity").set(max_running as f64);
        Admission(Arc::new(Inner {
            turns: Semaphore::new(max_running),
            waiting: AtomicUsize::new(0),
            max_waiting,
            wait,
        }))
    }
}

fn shed(reason: &'static str) -> Response {
    metrics::counter!("recd_requests_shed_total", "reason" => reason).increment(1);
    ApiError::Overloaded.into_response()
}

/// Counts itself in a gauge while it lives, also when the request is
/// dropped midway (a timeout, a client gone).
struct Counted(metrics::Gauge);

impl Counted {
    fn new(gauge: metrics::Gauge) -> Self {
        gauge.increment(1.0);
        Counted(gauge)
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// A place in the queue, given back however the wait ends.
struct Place<'a>(&'a Inner);

impl Drop for Place<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::AcqRel);
    }
}

pub(super) async fn admit(State(admission): State<Admission>, request: Request, next: Next) -> Response {
    let inner = &*admission.0;
    let turn = match inner.turns.try_acquire() {
        Ok(turn) => turn,
        Err(_) => {
            let place = Place(inner);
            if inner.waiting.fetch_add(1, Ordering::AcqRel) >= inner.max_waiting {
                return shed("queue_full");
            }
            let queued = Counted::new(metrics::gauge!("recd_requests_queued"));
            let started = Instant::now();
            let turn = tokio::time::timeout(inner.wait, inner.turns.acquire()).await;
            metrics::histogram!("recd_requests_queue_wait_seconds").record(started.elapsed().as_secs_f64());
            drop((queued, place));
            match turn {
                Ok(Ok(turn)) => turn,
                _ => return shed("queue_timeout"),
            }
        }
    };
    let _running = Counted::new(metrics::gauge!("recd_requests_running"));
    let response = next.run(request).await;
    drop(turn);
    response
}
