//! Admission: at most `max_concurrent_requests` API requests run at once. A
//! request beyond them waits in a bounded queue (`max_queued_requests`) for
//! up to `queue_timeout`, and only then is answered 503 with Retry-After; a
//! full queue answers 503 at once. Under a flood the service keeps doing
//! useful work at its capacity (a turn frees, the next waiting request
//! takes it) instead of spending itself on refusals, and memory stays
//! bounded by the queue.
//!
//! Requests also wait before admission: a ranking is processor work that
//! never waits on the store, so under a flood of them the runtime's threads
//! are always busy, and a request that has arrived waits in the runtime's
//! run queue before it is even read. A probe measures that wait every 10 ms
//! (`recd_runtime_lag_seconds`). Admission does not shed on it: against
//! clients that ask again at once, every way of refusing tried cost more
//! answers than it saved waiting (docs/benchmarks.md, "abuse_bench").

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
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
    /// The runtime's lag as last measured, in microseconds.
    lag_us: AtomicU64,
}

/// How often the lag probe measures.
const PROBE_EVERY: Duration = Duration::from_millis(10);

impl Admission {
    pub(super) fn new(max_running: usize, max_waiting: usize, wait: Duration) -> Self {
        metrics::gauge!("recd_requests_queue_capacity").set(max_waiting as f64);
        metrics::gauge!("recd_requests_running_capacity").set(max_running as f64);
        let inner = Arc::new(Inner {
            turns: Semaphore::new(max_running),
            waiting: AtomicUsize::new(0),
            max_waiting,
            wait,
            lag_us: AtomicU64::new(0),
        });
        // Built outside a runtime (a router made for a test), it has no probe.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            start_probe(runtime, Arc::downgrade(&inner));
        }
        Admission(inner)
    }
}

impl Inner {
    #[cfg(test)]
    fn lag(&self) -> Duration {
        Duration::from_micros(self.lag_us.load(Ordering::Relaxed))
    }

    fn set_lag(&self, lag: Duration) {
        self.lag_us.store(lag.as_micros() as u64, Ordering::Relaxed);
        metrics::gauge!("recd_runtime_lag_seconds").set(lag.as_secs_f64());
    }
}

/// Measures the runtime's lag every [`PROBE_EVERY`] while the admission
/// lives: from a thread of its own it hands the runtime a task and times
/// how long that task waits before a worker runs it. Such a task joins the
/// runtime's shared queue, behind the connections that became ready before
/// it and did not fit in a worker's own queue: it waits as long as a request
/// that arrives then.
fn start_probe(runtime: tokio::runtime::Handle, inner: Weak<Inner>) {
    let probe = move || loop {
        std::thread::sleep(PROBE_EVERY);
        let Some(alive) = inner.upgrade() else { return };
        drop(alive);
        let asked = Instant::now();
        let inner = inner.clone();
        let measured = runtime.spawn(async move {
            if let Some(inner) = inner.upgrade() {
                inner.set_lag(asked.elapsed());
            }
        });
        // One measurement at a time: a runtime that is slow to run the
        // task is slow to get the next one.
        if runtime.block_on(measured).is_err() {
            return;
        }
    };
    if let Err(e) = std::thread::Builder::new().name("recd-lag-probe".into()).spawn(probe) {
        tracing::warn!(error = %e, "the lag probe did not start: admission does not count the runtime's lag");
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The probe sees a runtime whose threads are held: its lag grows to
    /// about how long they were held, and falls back once they are free.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn the_probe_measures_how_long_ready_tasks_wait() {
        let admission = Admission::new(4, 4, Duration::from_millis(100));
        tokio::time::sleep(PROBE_EVERY * 3).await;
        assert!(admission.0.lag() < Duration::from_millis(50), "{:?}", admission.0.lag());
        // Holds the only worker thread: the probe's task waits for it.
        tokio::spawn(async { std::thread::sleep(Duration::from_millis(300)) })
            .await
            .unwrap();
        let mut seen = Duration::ZERO;
        for _ in 0..20 {
            seen = seen.max(admission.0.lag());
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert!(seen >= Duration::from_millis(200), "lag seen {seen:?}");
        tokio::time::sleep(PROBE_EVERY * 5).await;
        assert!(admission.0.lag() < Duration::from_millis(50), "{:?}", admission.0.lag());
    }
}
