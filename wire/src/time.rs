//! The wall clock that event lines, move reports and histories are stamped with.

use std::time::{SystemTime, UNIX_EPOCH};

/// Microseconds since the Unix epoch (0 before it: a clock that wrong is not worth a panic).
pub fn now_unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// Milliseconds since the Unix epoch.
pub fn now_unix_ms() -> u64 {
    now_unix_us() / 1000
}
