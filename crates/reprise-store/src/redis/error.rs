//! How fred's errors and the library's refusals become [`StoreError`]s.

use fred::error::{Error as FredError, ErrorKind};
use reprise_core::StreamId;

use super::functions::{CONFLICT_MARK, LOST_MARK};
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

/// What Redis answers an `XADD` whose id is not above the stream's top
/// entry: for Reprise, an append that does not follow what the store holds,
/// or one after the terminal entry (which has the largest possible id).
const XADD_NOT_ABOVE_TOP: &str = "equal or smaller than the target stream top item";

/// What Redis answers an `XADD` to a stream whose top entry has the largest
/// possible id: for Reprise, an append after the terminal entry.
const XADD_PAST_LAST_ID: &str = "exhausted the last possible ID";

/// Maps the refusals of an append — the library's `REPRISE_LOST …` and
/// `REPRISE_CONFLICT …`, and Redis's own `XADD` refusal of an id not above
/// the top entry (a write after the terminal entry's fence, or that does
/// not follow) — to [`StoreError::Lost`] and [`StoreError::Conflict`];
/// anything else as [`map_err`] does.
pub(super) fn append_refusal(stream: StreamId, e: FredError) -> StoreError {
    let details = e.details();
    if let Some(at) = details.find(LOST_MARK) {
        return StoreError::Lost {
            stream,
            detail: details[at + LOST_MARK.len()..].trim().to_string(),
        };
    }
    if details.contains(XADD_NOT_ABOVE_TOP) || details.contains(XADD_PAST_LAST_ID) {
        return StoreError::Conflict {
            stream,
            detail: "the stream has moved past this append (ended, or written by another writer)"
                .into(),
        };
    }
    conflict_or(stream, e)
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

    #[test]
    fn append_refusals() {
        let s = StreamId::random();
        let e = FredError::new(
            ErrorKind::Unknown,
            "ERR The ID specified in XADD is equal or smaller than the target stream top item",
        );
        assert!(matches!(append_refusal(s, e), StoreError::Conflict { .. }));
        let e = FredError::new(
            ErrorKind::Unknown,
            "ERR The stream has exhausted the last possible ID, unable to add more items",
        );
        assert!(matches!(append_refusal(s, e), StoreError::Conflict { .. }));
        let e = FredError::new(ErrorKind::Unknown, "REPRISE_LOST unknown or expired stream");
        assert!(matches!(append_refusal(s, e), StoreError::Lost { .. }));
        let e = FredError::new(ErrorKind::Unknown, "REPRISE_CONFLICT stream already ended");
        assert!(matches!(append_refusal(s, e), StoreError::Conflict { .. }));
        let e = FredError::new(ErrorKind::IO, "connection reset");
        assert!(matches!(append_refusal(s, e), StoreError::Unavailable(_)));
    }
}
