//! The reader's side of Durable Streams without SSE: `HEAD`, catch-up
//! reads and long-poll reads, over [`record`](super::record).

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Response, StatusCode};
use reprise_core::Seq;
use reprise_store::{EntryBody, Store};

use super::error::DsError;
use super::headers::{self, CLOSED, CURSOR, NEXT_OFFSET, UP_TO_DATE};
use super::offset::{self, Start};
use super::record::{self, Found};
use crate::body::{empty, full, Body};
use crate::state::Relay;

/// Messages per read (a catch-up answer holds at most this many).
pub const PAGE: usize = 1000;

/// Messages read after a position.
pub struct Chunk {
    pub messages: Vec<Bytes>,
    /// The seq of the last message read, or the start if none.
    pub last: Seq,
    /// Whether the read reached the stream's stored end.
    pub up_to_date: bool,
    /// Whether the read reached the `End` entry.
    pub closed: bool,
}

/// Reads up to [`PAGE`] messages after `after`.
pub async fn chunk(store: &dyn Store, f: &Found, after: Seq) -> Result<Chunk, DsError> {
    let entries = store.read(f.id, after, PAGE).await?;
    let full_page = entries.len() == PAGE;
    let mut c = Chunk {
        messages: Vec::with_capacity(entries.len()),
        last: after,
        up_to_date: !full_page,
        closed: false,
    };
    for e in entries {
        match e.body {
            EntryBody::Event(b) => {
                c.messages.push(b);
                c.last = e.seq;
            }
            EntryBody::End(_) => {
                c.closed = true;
                c.up_to_date = true;
            }
            // Durable Streams are never written with gaps.
            EntryBody::Gap { upto } => c.last = upto,
        }
    }
    Ok(c)
}

/// The body of `messages`: concatenated, or in JSON mode a JSON array.
pub fn body_of(json: bool, messages: &[Bytes]) -> Bytes {
    if !json {
        let mut b = BytesMut::new();
        for m in messages {
            b.extend_from_slice(m);
        }
        return b.freeze();
    }
    let mut b = BytesMut::from(&b"["[..]);
    for (i, m) in messages.iter().enumerate() {
        if i > 0 {
            b.extend_from_slice(b",");
        }
        b.extend_from_slice(m);
    }
    b.extend_from_slice(b"]");
    b.freeze()
}

/// Resolves a read's start to a seq.
pub async fn start_seq(store: &dyn Store, f: &Found, start: Start) -> Result<Seq, DsError> {
    match start {
        Start::Beginning => Ok(Seq::ZERO),
        Start::After(s) => Ok(s),
        Start::Now => record::tail(store, f).await,
    }
}

fn expiry_headers(h: &mut HeaderMap, f: &Found, now_ms: u64) {
    if let Some(t) = f.settings.ttl_secs {
        headers::set(h, "stream-ttl", &t.to_string());
    }
    if let Some(e) = &f.settings.expires_at {
        headers::set(h, "stream-expires-at", e);
    }
    let _ = now_ms;
}

/// `HEAD {path}/{name}`.
pub async fn head(relay: &Relay, name: &str) -> Result<Response<Body>, DsError> {
    let store = relay.store.as_ref();
    let now = crate::clock::now_ms();
    // HEAD does not extend a Stream-TTL (the protocol's reference server
    // does not either).
    let f = record::peek(store, name, now)
        .await?
        .ok_or(DsError::NotFound)?;
    let last = record::tail(store, &f).await?;
    let mut resp = Response::new(empty());
    let h = resp.headers_mut();
    headers::set(h, "content-type", &f.settings.content_type);
    headers::set(h, NEXT_OFFSET, &offset::format(last));
    h.insert("cache-control", HeaderValue::from_static("no-store"));
    if f.closed() {
        h.insert(CLOSED, HeaderValue::from_static("true"));
    }
    expiry_headers(h, &f, now);
    Ok(resp)
}

/// A `200` answer with `c`'s messages read from `from`.
pub(super) fn answer(
    f: &Found,
    from: Seq,
    c: &Chunk,
    cursor: &str,
    req: &HeaderMap,
) -> Response<Body> {
    let etag = format!(
        "\"{}:{}:{}{}\"",
        f.id,
        offset::format(from),
        offset::format(c.last),
        if c.closed { ":c" } else { "" }
    );
    let not_modified = req
        .get(http::header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag));
    let mut resp = if not_modified {
        let mut r = Response::new(empty());
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        r
    } else {
        Response::new(full(body_of(f.settings.is_json(), &c.messages)))
    };
    let h = resp.headers_mut();
    headers::set(h, "content-type", &f.settings.content_type);
    headers::set(h, NEXT_OFFSET, &offset::format(c.last));
    headers::set(h, CURSOR, cursor);
    headers::set(h, "etag", &etag);
    if c.up_to_date {
        h.insert(UP_TO_DATE, HeaderValue::from_static("true"));
    }
    if c.closed {
        h.insert(CLOSED, HeaderValue::from_static("true"));
    }
    // Data before the tail never changes; the tail does.
    let cache = if c.up_to_date && !c.closed {
        "no-store"
    } else {
        "public, max-age=60, stale-while-revalidate=300"
    };
    h.insert("cache-control", HeaderValue::from_static(cache));
    resp
}

/// `GET {path}/{name}?offset=…[&live=long-poll]`.
pub async fn get(
    relay: &Relay,
    f: &Found,
    start: Start,
    long_poll: bool,
    echoed_cursor: Option<&str>,
    req: &HeaderMap,
) -> Result<Response<Body>, DsError> {
    let store = relay.store.as_ref();
    let from = start_seq(store, f, start).await?;
    let cursor = headers::cursor(crate::clock::now_ms(), echoed_cursor);
    if !long_poll {
        let c = chunk(store, f, from).await?;
        return Ok(answer(f, from, &c, &cursor, req));
    }
    // Watch before reading, so that an append between the read and the
    // wait still wakes us.
    let mut watcher = store.watch(f.id).await?;
    let deadline = tokio::time::Instant::now() + relay.config.durable.long_poll_timeout;
    let poll = relay.config.streams.tail_poll_interval;
    loop {
        let c = chunk(store, f, from).await?;
        if !c.messages.is_empty() {
            return Ok(answer(f, from, &c, &cursor, req));
        }
        if c.closed {
            return Ok(no_content(from, &cursor, true));
        }
        tokio::select! {
            _ = watcher.changed() => {}
            _ = tokio::time::sleep(poll) => {}
            _ = tokio::time::sleep_until(deadline) => {
                return Ok(no_content(from, &cursor, false));
            }
            _ = relay.shutdown.stop_accepting().cancelled() => {
                return Ok(no_content(from, &cursor, false));
            }
        }
    }
}

pub(super) fn no_content(at: Seq, cursor: &str, closed: bool) -> Response<Body> {
    let mut resp = Response::new(empty());
    *resp.status_mut() = StatusCode::NO_CONTENT;
    let h = resp.headers_mut();
    headers::set(h, NEXT_OFFSET, &offset::format(at));
    headers::set(h, CURSOR, cursor);
    h.insert(UP_TO_DATE, HeaderValue::from_static("true"));
    h.insert("cache-control", HeaderValue::from_static("no-store"));
    if closed {
        h.insert(CLOSED, HeaderValue::from_static("true"));
    }
    resp
}
