//! SSE reads of Durable Streams (`live=sse`): each batch of messages as an
//! `event: data`, then an `event: control` with `streamNextOffset`,
//! `streamCursor`, and `upToDate` / `streamClosed`; live until the stream
//! closes, the client leaves or the relay shuts down.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use http::{HeaderValue, Response};
use http_body_util::StreamBody;
use hyper::body::Frame;
use reprise_core::Seq;
use tokio::sync::mpsc;

use super::error::DsError;
use super::headers;
use super::offset;
use super::read::{body_of, chunk, Chunk};
use super::record::{essence, Found};
use crate::body::{Body, BoxError};
use crate::state::Relay;

/// SSE frames buffered for a slow client before the reader waits.
const SSE_BUFFER: usize = 8;

/// Whether the stream's messages go as text (text or JSON streams); any
/// other content type is sent base64-encoded (`Stream-SSE-Data-Encoding`).
pub fn is_text(f: &Found) -> bool {
    let e = essence(&f.settings.content_type);
    e.starts_with("text/") || e == "application/json"
}

pub(super) fn data_event(f: &Found, c: &Chunk) -> Bytes {
    let payload = body_of(f.settings.is_json(), &c.messages);
    let payload = if is_text(f) {
        payload
    } else {
        use base64::Engine as _;
        Bytes::from(base64::engine::general_purpose::STANDARD.encode(&payload))
    };
    let mut out = BytesMut::from(&b"event: data\n"[..]);
    // Every line break (CRLF, CR or LF) starts a new `data:` line, so that a
    // payload cannot inject SSE fields or events.
    let mut rest: &[u8] = &payload;
    loop {
        let cut = rest.iter().position(|b| *b == b'\n' || *b == b'\r');
        let (line, next) = match cut {
            Some(i) => {
                let skip = if rest[i] == b'\r' && rest.get(i + 1) == Some(&b'\n') {
                    2
                } else {
                    1
                };
                (&rest[..i], Some(&rest[i + skip..]))
            }
            None => (rest, None),
        };
        out.extend_from_slice(b"data:");
        out.extend_from_slice(line);
        out.extend_from_slice(b"\n");
        match next {
            Some(n) => rest = n,
            None => break,
        }
    }
    out.extend_from_slice(b"\n");
    out.freeze()
}

pub(super) fn control_event(next: Seq, cursor: &str, up_to_date: bool, closed: bool) -> Bytes {
    let mut v = serde_json::json!({ "streamNextOffset": offset::format(next) });
    // A closed stream has no next request for a CDN to collapse.
    if !closed {
        v["streamCursor"] = cursor.into();
    }
    if up_to_date {
        v["upToDate"] = true.into();
    }
    if closed {
        v["streamClosed"] = true.into();
    }
    Bytes::from(format!("event: control\ndata:{v}\n\n"))
}

/// Starts the SSE answer; a task reads the store and feeds it.
pub fn open(
    relay: &Arc<Relay>,
    f: Found,
    from: Seq,
    echoed_cursor: Option<String>,
) -> Result<Response<Body>, DsError> {
    let text = is_text(&f);
    let (tx, mut rx) = mpsc::channel::<Bytes>(SSE_BUFFER);
    let relay2 = relay.clone();
    relay.shutdown.tasks().spawn(async move {
        if let Err(e) = feed(&relay2, &f, from, echoed_cursor, &tx).await {
            tracing::debug!(error = %e, "durable SSE read ended");
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
    if !text {
        h.insert(
            "stream-sse-data-encoding",
            HeaderValue::from_static("base64"),
        );
    }
    Ok(resp)
}

async fn feed(
    relay: &Relay,
    f: &Found,
    mut at: Seq,
    echoed: Option<String>,
    tx: &mpsc::Sender<Bytes>,
) -> Result<(), DsError> {
    let store = relay.store.as_ref();
    let mut watcher = store.watch(f.id).await?;
    let poll = relay.config.streams.tail_poll_interval;
    let mut cursor = headers::cursor(crate::clock::now_ms(), echoed.as_deref());
    let mut announced_up_to_date = false;
    loop {
        let c = chunk(store, f, at).await?;
        let progressed = !c.messages.is_empty();
        if progressed {
            if tx.send(data_event(f, &c)).await.is_err() {
                return Ok(());
            }
            at = c.last;
        }
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
