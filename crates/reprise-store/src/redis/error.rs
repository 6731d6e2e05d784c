//! How fred's errors and the library's refusals become [`StoreError`]s.

use fred::error::{Error as FredError, ErrorKind};
use reprise_core::StreamId;

use super::functions::CONFLICT_MARK;
use crate::StoreError;

/// Maps a fred error to the store's error kinds.
pub(super) fn map_err(e: FredError) -> StoreError {
    let details = e.details();
    match e.kind() {
        ErrorKind::Parse | ErrorKind::Protocol | ErrorKind::NotFound => {
            StoreError::Corrupt(e.to_string())
        }
        ErrorKind::Auth => StoreError::AuthFailed(e.to_string()),
        _ if details.starts_with("WRONGTYPE") => StoreError::Corrupt(e.to_string()),
        _ if details.starts_with("OOM") => StoreError::Full(e.to_string()),
        // IO, timeouts, cancellations while disconnected, cluster
        // reconfiguration, LOADING, and anything else the server refuses.
        _ => StoreError::Unavailable(e.to_string()),
    }
}

/// Maps a function's `REPRISE_CONFLICT …` refusal to [`StoreError::Conflict`],
/// anything else as [`map_err`] does.
pub(super) fn conflict_or(stream: StreamId, e: FredError) -> StoreError {
    let details = e.details();
    match details.find(CONFLICT_MARK) {
        Some(at) => StoreError::Conflict {
            stream,
            detail: details[at + CONFLICT_MARK.len()..].trim().to_string(),
        },
        None => map_err(e),
    }
}

pub(super) fn corrupt(what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(what.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_mapping() {
        let e = FredError::new(ErrorKind::IO, "connection reset");
        assert!(matches!(map_err(e), StoreError::Unavailable(_)));
        let e = FredError::new(ErrorKind::Timeout, "timed out");
        assert!(matches!(map_err(e), StoreError::Unavailable(_)));
        let e = FredError::new(ErrorKind::Parse, "bad frame");
        assert!(matches!(map_err(e), StoreError::Corrupt(_)));
        let e = FredError::new(ErrorKind::Unknown, "OOM command not allowed");
        assert!(matches!(map_err(e), StoreError::Full(_)));
    }
}
