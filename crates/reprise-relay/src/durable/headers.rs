//! Response headers every Durable Streams answer shares: the browser
//! security and CORS headers, and `Stream-Cursor` (CDN collapsing). A leaf
//! of `durable`.

use http::{HeaderMap, HeaderValue};

/// Seconds per cursor interval (the protocol's default).
const CURSOR_INTERVAL_SECS: u64 = 20;

pub const NEXT_OFFSET: &str = "stream-next-offset";
pub const UP_TO_DATE: &str = "stream-up-to-date";
pub const CURSOR: &str = "stream-cursor";
pub const CLOSED: &str = "stream-closed";

/// Headers on every answer (errors included).
pub fn security(h: &mut HeaderMap) {
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        "cross-origin-resource-policy",
        HeaderValue::from_static("cross-origin"),
    );
    h.insert("access-control-allow-origin", HeaderValue::from_static("*"));
    h.insert(
        "access-control-expose-headers",
        HeaderValue::from_static(
            "Stream-Next-Offset, Stream-Cursor, Stream-Up-To-Date, Stream-Closed, \
             Stream-TTL, Stream-Expires-At, ETag, Location, Content-Type, Stream-Read-URL, \
             Producer-Epoch, Producer-Seq, Producer-Expected-Seq, Producer-Received-Seq",
        ),
    );
}

/// The CORS preflight answer's extra headers.
pub fn preflight(h: &mut HeaderMap) {
    h.insert(
        "access-control-allow-methods",
        HeaderValue::from_static("GET, HEAD, PUT, POST, DELETE, OPTIONS"),
    );
    h.insert(
        "access-control-allow-headers",
        HeaderValue::from_static(
            "Authorization, Content-Type, Stream-Closed, Stream-TTL, Stream-Expires-At, \
             Stream-Seq, Producer-Id, Producer-Epoch, Producer-Seq, If-None-Match",
        ),
    );
    h.insert("access-control-max-age", HeaderValue::from_static("86400"));
}

/// The cursor to answer: the current interval number, moved past the
/// client's echoed `cursor` so that a CDN never serves the same long-poll
/// answer twice to one client.
pub fn cursor(now_ms: u64, echoed: Option<&str>) -> String {
    let interval = now_ms / 1000 / CURSOR_INTERVAL_SECS;
    match echoed.and_then(|c| c.parse::<u64>().ok()) {
        Some(c) if c >= interval => (c + 1).to_string(),
        _ => interval.to_string(),
    }
}

pub fn set(h: &mut HeaderMap, name: &'static str, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        h.insert(name, v);
    }
}
