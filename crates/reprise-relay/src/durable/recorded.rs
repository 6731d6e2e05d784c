//! Recorded streams read as Durable Streams (issue 16, item 2): a stream
//! Reprise recorded from an upstream (SSE or NDJSON) served as a JSON-mode
//! Durable Stream, one message per recorded event: its data as JSON when it
//! is valid JSON, else as a JSON string. The recording's end is the
//! stream's close. Offsets are [`offset`](super::offset)s of the events'
//! seqs. Reached through `GET /_reprise/streams/{id}` with `offset`, `live`
//! or `cursor`, and through the proxy's signed URLs ([`proxy`](super::proxy)).
//!
//! Reads come from the store, as for every Durable Stream: a stream
//! produced on another instance reads the same. A store gap (history lost)
//! cannot be told in this protocol: a read starting in one is `410 Gone`,
//! and a live SSE read reaching one ends there (its next read is `410`).

use std::borrow::Cow;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response, StatusCode};
use http_body_util::StreamBody;
use hyper::body::Frame;
use reprise_core::{Format, Seq, StreamId};
use reprise_store::{EntryBody, Store, StreamMeta};
use tokio::sync::mpsc;

use super::error::DsError;
use super::headers;
use super::offset::{self, Start};
use super::read::{answer, no_content, Chunk, PAGE};
use super::record::{self, Found, Settings};
use super::sse::{control_event, data_event};
use crate::body::{full, Body, BoxError};
use crate::state::Relay;
use crate::stream::live::Owner;
use crate::uri::query_param;

/// SSE frames buffered for a slow client before the reader waits.
const SSE_BUFFER: usize = 8;

/// Whether a query asks for a Durable Streams read (it names `offset`,
/// `live` or `cursor`).
pub fn wants(query: &str) -> bool {
    ["offset", "live", "cursor"]
        .iter()
        .any(|p| query_param(query, p).is_some())
}

/// A recorded stream, seen as a JSON-mode Durable Stream.
pub struct Recorded {
    found: Found,
    format: Format,
    pub owner: Owner,
}

/// The recorded stream `id`, if the store knows it.
pub async fn find(store: &dyn Store, id: StreamId) -> Result<Option<Recorded>, DsError> {
    let Some(meta) = store.meta(id).await? else {
        return Ok(None);
    };
    Ok(of_meta(meta))
}

fn of_meta(meta: StreamMeta) -> Option<Recorded> {
    let format = match meta.format.as_str() {
        "sse" => Format::Sse,
        "ndjson" => Format::Ndjson,
        _ => return None,
    };
    Some(Recorded {
        found: Found {
            id: meta.id,
            settings: Settings {
                content_type: "application/json".into(),
                ttl_secs: None,
                expires_at: None,
            },
            created_ms: meta.created_ms,
            closed_at: meta.end.map(|(seq, _)| seq),
        },
        format,
        owner: Owner {
            route: meta.route,
            caller: meta.caller,
        },
    })
}

/// `GET /_reprise/streams/{id}?offset=…`: the same rule as a resume by id
/// decides who may read (see `resume::may_read`); anyone else gets the
/// `404` of an unknown stream.
pub async fn handle(
    relay: &Arc<Relay>,
    id: StreamId,
    query: &str,
    req: &HeaderMap,
) -> Response<Body> {
    let result = async {
        let r = find(relay.store.as_ref(), id)
            .await?
            .ok_or(DsError::NotFound)?;
        if !crate::resume::may_read(relay, &r.owner, req) {
            return Err(DsError::NotFound);
        }
        get(relay, r, query, req).await
    }
    .await;
    let mut resp = result.unwrap_or_else(DsError::into_response);
    headers::security(resp.headers_mut());
    resp
}

/// A Durable Streams `GET` of `r` (catch-up, long-poll or SSE, from the
/// query's `offset`).
pub async fn get(
    relay: &Arc<Relay>,
    r: Recorded,
    query: &str,
    req: &HeaderMap,
) -> Result<Response<Body>, DsError> {
    let raw_offset = query_param(query, "offset");
    let live = query_param(query, "live");
    let cursor = query_param(query, "cursor");
    let start = match raw_offset.as_deref() {
        None => Start::Beginning,
        Some(o) => offset::parse(o)?,
    };
    let store = relay.store.as_ref();
    let from = match start {
        Start::Beginning => Seq::ZERO,
        Start::After(s) => s,
        Start::Now => record::tail(store, &r.found).await?,
    };
    let cursor = cursor.as_deref();
    match live.as_deref() {
        None => catch_up(relay, &r, from, false, cursor, req).await,
        Some(mode @ ("long-poll" | "sse")) => {
            if raw_offset.is_none() {
                return Err(DsError::BadRequest(format!("live={mode} needs an offset")));
            }
            if mode == "long-poll" {
                return catch_up(relay, &r, from, true, cursor, req).await;
            }
            Ok(sse(relay, r, from, cursor.map(str::to_string)))
        }
        Some(other) => Err(DsError::BadRequest(format!("unknown live mode {other:?}"))),
    }
}

/// `HEAD`: the tail offset and whether the recording has ended.
pub async fn head(relay: &Relay, r: &Recorded) -> Result<Response<Body>, DsError> {
    let last = record::tail(relay.store.as_ref(), &r.found).await?;
    let mut resp = Response::new(crate::body::empty());
    let h = resp.headers_mut();
    h.insert("content-type", HeaderValue::from_static("application/json"));
    headers::set(h, headers::NEXT_OFFSET, &offset::format(last));
    h.insert("cache-control", HeaderValue::from_static("no-store"));
    if r.found.closed() {
        h.insert(headers::CLOSED, HeaderValue::from_static("true"));
    }
    Ok(resp)
}

/// What one read of the store gave.
enum Read {
    Chunk(Chunk),
    /// The position is in a gap: what was there is lost.
    Gone,
}

/// The JSON message of a recorded event: its data (SSE) or line (NDJSON)
/// as is when it is valid JSON, else as a JSON string. `None` for an SSE
/// event without data.
pub fn message(format: Format, fields: &[u8]) -> Option<Bytes> {
    let data: Cow<[u8]> = match format {
        Format::Ndjson => Cow::Borrowed(fields),
        Format::Sse => Cow::Owned(sse_data(fields)?),
    };
    if serde_json::from_slice::<serde::de::IgnoredAny>(&data).is_ok() {
        return Some(Bytes::copy_from_slice(&data));
    }
    let text = String::from_utf8_lossy(&data);
    serde_json::to_vec(&text).ok().map(Bytes::from)
}

/// The data of stored SSE fields (`data:` lines joined with LF).
fn sse_data(fields: &[u8]) -> Option<Vec<u8>> {
    let mut data: Option<Vec<u8>> = None;
    for line in fields.split(|b| *b == b'\n') {
        let Some(rest) = line.strip_prefix(b"data:") else {
            continue;
        };
        let rest = rest.strip_prefix(b" ").unwrap_or(rest);
        match &mut data {
            Some(d) => {
                d.push(b'\n');
                d.extend_from_slice(rest);
            }
            None => data = Some(rest.to_vec()),
        }
    }
    data
}

/// Reads up to [`PAGE`] events after `after` as messages.
async fn chunk(store: &dyn Store, r: &Recorded, after: Seq) -> Result<Read, DsError> {
    let entries = store.read(r.found.id, after, PAGE).await?;
    let mut c = Chunk {
        messages: Vec::with_capacity(entries.len()),
        last: after,
        up_to_date: entries.len() < PAGE,
        closed: false,
    };
    for e in entries {
        let hole = e.seq != c.last.next() || matches!(e.body, EntryBody::Gap { .. });
        if hole {
            if c.last == after {
                return Ok(Read::Gone);
            }
            // Send what comes before; the next read starts in the hole.
            c.up_to_date = false;
            break;
        }
        match e.body {
            EntryBody::Event(fields) => {
                if let Some(m) = message(r.format, &fields) {
                    c.messages.push(m);
                }
                c.last = e.seq;
            }
            EntryBody::End(_) => {
                c.closed = true;
                c.up_to_date = true;
                break;
            }
            EntryBody::Gap { .. } => break,
        }
    }
    Ok(Read::Chunk(c))
}

fn gone() -> Response<Body> {
    let mut resp = Response::new(full("the stream's history at this offset was lost"));
    *resp.status_mut() = StatusCode::GONE;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// A catch-up read, or with `long_poll` one that waits for data.
async fn catch_up(
    relay: &Relay,
    r: &Recorded,
    from: Seq,
    long_poll: bool,
    echoed_cursor: Option<&str>,
    req: &HeaderMap,
) -> Result<Response<Body>, DsError> {
    let store = relay.store.as_ref();
    let cursor = headers::cursor(crate::clock::now_ms(), echoed_cursor);
    let f = &r.found;
    if !long_poll {
        return Ok(match chunk(store, r, from).await? {
            Read::Chunk(c) => answer(f, from, &c, &cursor, req),
            Read::Gone => gone(),
        });
    }
    // Watch before reading, so that an append between the read and the
    // wait still wakes us.
    let mut watcher = store.watch(f.id).await?;
    let deadline = tokio::time::Instant::now() + relay.config.durable.long_poll_timeout;
    let poll = relay.config.streams.tail_poll_interval;
    loop {
        let c = match chunk(store, r, from).await? {
            Read::Chunk(c) => c,
            Read::Gone => return Ok(gone()),
        };
        if c.last != from {
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

/// A live SSE read: `event: data` / `event: control` pairs until the
/// recording ends (`streamClosed`), the client leaves or the relay stops.
fn sse(relay: &Arc<Relay>, r: Recorded, from: Seq, echoed: Option<String>) -> Response<Body> {
    let (tx, mut rx) = mpsc::channel::<Bytes>(SSE_BUFFER);
    let relay2 = relay.clone();
    relay.shutdown.tasks().spawn(async move {
        if let Err(e) = feed(&relay2, &r, from, echoed, &tx).await {
            tracing::debug!(error = %e, "durable SSE read of a recorded stream ended");
        }
    });
    let stream = futures::stream::poll_fn(move |cx| {
        rx.poll_recv(cx)
            .map(|o| o.map(|b| Ok::<_, BoxError>(Frame::data(b))))
    });
    let mut resp = Response::new(http_body_util::BodyExt::boxed(StreamBody::new(stream)));
    let h = resp.headers_mut();
    h.insert(
        "content-type",
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert("cache-control", HeaderValue::from_static("no-cache"));
    resp
}

async fn feed(
    relay: &Relay,
    r: &Recorded,
    mut at: Seq,
    echoed: Option<String>,
    tx: &mpsc::Sender<Bytes>,
) -> Result<(), DsError> {
    let store = relay.store.as_ref();
    let f = &r.found;
    let mut watcher = store.watch(f.id).await?;
    let poll = relay.config.streams.tail_poll_interval;
    let mut cursor = headers::cursor(crate::clock::now_ms(), echoed.as_deref());
    let mut announced_up_to_date = false;
    loop {
        let c = match chunk(store, r, at).await? {
            Read::Chunk(c) => c,
            // The client's next read (from `at`) is told `410`.
            Read::Gone => return Ok(()),
        };
        let progressed = c.last != at;
        if !c.messages.is_empty() && tx.send(data_event(f, &c)).await.is_err() {
            return Ok(());
        }
        at = c.last;
        if progressed || c.closed || (c.up_to_date && !announced_up_to_date) {
            cursor = headers::cursor(crate::clock::now_ms(), Some(&cursor));
            let ctl = control_event(at, &cursor, c.up_to_date, c.closed);
            if tx.send(ctl).await.is_err() {
                return Ok(());
            }
            announced_up_to_date = c.up_to_date;
        }
        if c.closed {
            return Ok(());
        }
        if !c.up_to_date {
            continue;
        }
        tokio::select! {
            _ = watcher.changed() => {}
            _ = tokio::time::sleep(poll) => {}
            _ = tx.closed() => return Ok(()),
            _ = relay.shutdown.stop_accepting().cancelled() => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_json_or_json_strings() {
        let m = |f: Format, s: &str| message(f, s.as_bytes()).map(|b| b.to_vec());
        assert_eq!(
            m(Format::Sse, "event: x\ndata: {\"a\":1}\n").unwrap(),
            b"{\"a\":1}"
        );
        assert_eq!(m(Format::Sse, "data: [DONE]\n").unwrap(), b"\"[DONE]\"");
        assert_eq!(m(Format::Sse, "data: a\ndata: b\n").unwrap(), b"\"a\\nb\"");
        assert_eq!(m(Format::Sse, "data:7\n").unwrap(), b"7");
        assert_eq!(m(Format::Sse, "event: ping\n"), None);
        assert_eq!(
            m(Format::Ndjson, "{\"done\":true}").unwrap(),
            b"{\"done\":true}"
        );
    }
}
