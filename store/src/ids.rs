//! Identifiers and the clock: ids are a kind prefix and a time-ordered UUID, times are
//! Unix milliseconds.

use std::time::{SystemTime, UNIX_EPOCH};

/// A new id such as `user-0190f1c2...`: the prefix says what it names, the UUIDv7 sorts
/// by creation time.
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::now_v7().simple())
}

/// Milliseconds since the Unix epoch, as stored in `*_at_ms` columns.
pub fn now_ms() -> i64 {
    let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    i64::try_from(since_epoch.as_millis()).unwrap_or(i64::MAX)
}
