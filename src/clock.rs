//! The server's clock and the one timestamp format of the API.

use chrono::{DateTime, Utc};

/// Milliseconds since the epoch, by the server's clock.
pub fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

/// Milliseconds since the epoch to RFC 3339 (UTC, millisecond precision).
pub fn format_timestamp(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}
