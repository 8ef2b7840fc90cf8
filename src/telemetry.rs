//! Logs (tracing, text or JSON on stderr) and the Prometheus recorder.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::{fmt, EnvFilter};

use crate::config::LogFormat;

/// Installs the log subscriber; later calls do nothing (tests start many apps).
pub fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn"));
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// The process-wide metrics recorder, installed on first use.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let latency = [
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ];
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &latency)
                .expect("the bucket list is not empty")
                .build_recorder();
            let handle = recorder.handle();
            // Fails only if another recorder is installed; ours then stays
            // unused, and /metrics shows an empty page rather than crashing.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            handle
        })
        .clone()
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!("recd_http_requests_total", "HTTP requests by method, route and status");
    describe_histogram!(
        "recd_http_request_duration_seconds",
        Unit::Seconds,
        "HTTP request latency by method, route and status"
    );
    describe_counter!("recd_events_accepted_total", "Events stored");
    describe_counter!("recd_events_duplicate_total", "Events whose event_id was stored before");
    describe_counter!("recd_events_rejected_total", "Events refused as invalid");
    describe_counter!("recd_store_errors_total", "Store calls that failed, by kind");
    describe_gauge!("recd_store_pool_connections", "Open store connections");
    describe_gauge!("recd_store_pool_idle", "Idle store connections");
    describe_gauge!("recd_store_pool_max", "Most store connections allowed");
}
