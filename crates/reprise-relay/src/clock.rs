//! The wall clock, in the milliseconds the store's leases and metadata use.
//! A leaf: imports nothing of the crate.

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
