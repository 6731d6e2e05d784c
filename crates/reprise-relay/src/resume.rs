//! Resuming: deciding what a reconnecting client gets, from the store or
//! this instance's memory, never from the upstream.
//!
//! | situation                                        | answer |
//! |--------------------------------------------------|--------|
//! | position at or past the end, nothing left        | `204` |
//! | `<stream>.end` cursor                            | `204` |
//! | key resume of a finished stream or unbound key    | `204` |
//! | key resume with `startIndex` past a finished end  | `204` |
//! | unknown stream on `/_reprise/streams/{id}`        | `404` |
//! | unknown stream or other epoch via `Last-Event-ID` | `200` + `history_lost` signal |
//! | otherwise                                         | `200`, replay after the position, then live |
//!
//! A `history_lost` signal is written in the stream's dialect, or for an
//! unknown stream in the route's explicit `signals` setting (else `reprise`).

use std::sync::Arc;
use std::time::Duration;

use http::{header, HeaderMap, HeaderName, HeaderValue, Response, StatusCode};
use reprise_core::outcome::Signal;
use reprise_core::wire::sse_signal;
use reprise_core::{Cursor, Dialect, Epoch, Outcome, Seq, StreamId};
use reprise_store::StreamMeta;
use tokio::time::Instant;

use crate::auth::is_owner;
use crate::body::{empty, full, Body};
use crate::config::ResumeAuth;
use crate::error::RelayError;
use crate::state::Relay;
use crate::stream::live::{LiveStream, Owner, ReaderGuard};
use crate::stream::reader;

/// Response header carrying the stream id.
pub const STREAM_ID_HEADER: &str = "reprise-stream-id";

/// Response header of a key resume with `startIndex`: the index (from 0) of
/// the stream's last event when the answer started, `-1` if none (the AI
/// SDK's `WorkflowChatTransport` resolves a negative `startIndex` with it).
pub const TAIL_INDEX_HEADER: &str = "x-workflow-stream-tail-index";

/// How the client asked to resume (it changes the "unknown stream" answer).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// A route request carrying `Last-Event-ID` / `last_event_id`.
    LastEventId,
    /// `GET /_reprise/streams/{id}`.
    StreamsEndpoint,
    /// The route's `resume` template, by key: the whole stream, or `204`
    /// once it has finished (the AI SDK's `DefaultChatTransport`).
    Key,
    /// The route's `resume` template with `startIndex`: from that index,
    /// finished or not, with [`TAIL_INDEX_HEADER`].
    KeyIndex,
    /// A request whose `Idempotency-Key` names a stream already started: the
    /// whole stream, finished or not.
    Idempotent,
}

/// Where the replay starts.
#[derive(Clone, Copy, Debug)]
pub enum Position {
    /// After this event (must be of the stream's current epoch).
    Cursor(Cursor),
    /// After the first N entries.
    StartIndex(Seq),
    /// The last N events (from the start if there are fewer).
    FromTail(u64),
    /// From the first entry.
    Beginning,
}

/// What is known about a stream before attaching to it.
struct Known {
    owner: Option<Owner>,
    epoch: Epoch,
    end: Option<(Seq, Outcome)>,
    /// Set when this instance already holds the stream.
    held: Option<(Arc<LiveStream>, ReaderGuard)>,
    meta: Option<reprise_store::StreamMeta>,
    /// The dialect of the stream's signals as known now.
    signals: Dialect,
}

/// Answers a resume of `stream` from `pos`.
///
/// `headers` are the resuming request's, for routes with
/// `resume_auth = "same-caller"`. `signals` is the route's explicit dialect,
/// if any: the `history_lost` answer for an unknown stream uses it.
pub async fn resume(
    relay: &Arc<Relay>,
    stream: StreamId,
    pos: Position,
    via: Via,
    headers: &HeaderMap,
    signals: Option<Dialect>,
) -> Result<Response<Body>, RelayError> {
    let unknown_signals = signals.unwrap_or(Dialect::Reprise);
    let result = answer(relay, stream, pos, via, headers, unknown_signals).await;
    let outcome = match &result {
        Ok((_, outcome)) => *outcome,
        Err(RelayError::NotFound { .. }) => "not_found",
        Err(_) => "error",
    };
    let kind = match via {
        Via::LastEventId => "last_event_id",
        Via::StreamsEndpoint => "stream_id",
        Via::Key | Via::KeyIndex => "key",
        Via::Idempotent => "idempotent",
    };
    relay.metrics.resume(kind, outcome);
    result.map(|(resp, _)| resp)
}

/// The response and its outcome label for the metrics.
async fn answer(
    relay: &Arc<Relay>,
    stream: StreamId,
    pos: Position,
    via: Via,
    headers: &HeaderMap,
    unknown_signals: Dialect,
) -> Result<(Response<Body>, &'static str), RelayError> {
    if let Position::Cursor(Cursor::End(_)) = pos {
        return Ok((no_content(stream), NO_CONTENT));
    }
    let known = match relay.hub.attach(stream) {
        Some((live, guard)) => Known {
            owner: live.owner.get().cloned(),
            epoch: live.epoch,
            end: live.end(),
            signals: live.signals(),
            held: Some((live, guard)),
            meta: None,
        },
        // Concurrent resumes of one stream share the lookup.
        None => match meta_soon(relay, stream).await? {
            Some(meta) => Known {
                owner: Some(Owner {
                    route: meta.route.clone(),
                    caller: meta.caller.clone(),
                }),
                epoch: meta.epoch,
                end: meta.end.clone(),
                signals: meta.signals.unwrap_or(Dialect::Reprise),
                held: None,
                meta: Some(meta),
            },
            None => return unknown(stream, via, unknown_signals),
        },
    };
    // Routes with `resume_auth = "same-caller"`: another caller is told
    // exactly what an unknown stream gets.
    if let Some(owner) = &known.owner {
        if !may_read(relay, owner, headers) {
            return unknown(stream, via, unknown_signals);
        }
    }
    let after = match pos {
        Position::Cursor(Cursor::At(id)) => {
            if id.epoch != known.epoch {
                return Ok((history_lost(stream, known.signals), HISTORY_LOST));
            }
            id.seq
        }
        Position::Cursor(Cursor::End(_)) => return Ok((no_content(stream), NO_CONTENT)),
        Position::StartIndex(n) => n,
        Position::FromTail(_) | Position::Beginning => Seq::ZERO,
    };
    // The last event now, for `startIndex` (only then: it may read the store).
    let tail = match via {
        Via::KeyIndex => Some(last_event(relay, stream, &known).await?),
        _ => None,
    };
    let after = match (pos, tail) {
        (Position::FromTail(n), Some(last)) => Seq(last.0.saturating_sub(n)),
        _ => after,
    };
    if let Some((end_seq, outcome)) = &known.end {
        // A normal end sends nothing for its terminal entry; a failure sends its signal.
        let last_visible = if outcome.is_completed() {
            end_seq.0 - 1
        } else {
            end_seq.0
        };
        if via == Via::Key || (outcome.is_completed() && after.0 >= last_visible) {
            let mut resp = no_content(stream);
            add_tail_index(&mut resp, tail);
            return Ok((resp, NO_CONTENT));
        }
    }
    // At or past a failure's end (only an event id gets here: the signal's
    // own id is `.end`): the client saw events the store lost with their
    // producer. It gets the signal, read from just before the end.
    let after = match &known.end {
        Some((end_seq, outcome)) if !outcome.is_completed() && after >= *end_seq => {
            Seq(end_seq.0 - 1)
        }
        _ => after,
    };
    let (live, guard) = match (known.held, known.meta) {
        (Some(held), _) => held,
        (None, Some(meta)) => relay.hub.open(&meta, relay.loader_ctx()),
        (None, None) => return Err(RelayError::Internal("stream known without metadata".into())),
    };
    let mut resp = Response::new(reader::body(
        live.clone(),
        guard,
        after,
        reader::ReaderKind::Resume,
        relay.reader_ctx(),
    ));
    let h = resp.headers_mut();
    for (name, value) in &live.headers {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            h.insert(n, v);
        }
    }
    if !h.contains_key(header::CONTENT_TYPE) {
        let ct = match live.format {
            reprise_core::Format::Sse => "text/event-stream",
            reprise_core::Format::Ndjson => "application/x-ndjson",
        };
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
    }
    sse_headers(h, stream);
    add_tail_index(&mut resp, tail);
    Ok((resp, "ok"))
}

/// How long after a stream's response started (on another instance) its
/// metadata may still be missing from the store, beyond `streams.store_linger`:
/// the writer stores it with the first events, one round trip later.
const META_GRACE: Duration = Duration::from_millis(250);

/// Polling interval while waiting for a stream's metadata, between its
/// notifications.
const META_POLL: Duration = Duration::from_millis(25);

/// The stream's metadata from the store. A stream started on another
/// instance a moment ago has none yet (its writer stores it with the first
/// events, up to `streams.store_linger` later): an unknown stream is looked
/// for again, on its notifications and every [`META_POLL`], for up to
/// `store_linger` + [`META_GRACE`] before it counts as unknown. Not with the
/// embedded store, which is this process's own (the hub holds every stream
/// it started).
async fn meta_soon(relay: &Relay, stream: StreamId) -> Result<Option<StreamMeta>, RelayError> {
    if let Some(meta) = relay.hub.meta(&*relay.store, stream).await? {
        return Ok(Some(meta));
    }
    if relay.store.kind() == "memory" {
        return Ok(None);
    }
    let deadline = Instant::now() + relay.config.streams.store_linger + META_GRACE;
    let mut watcher = relay.store.watch(stream).await.ok();
    loop {
        if let Some(meta) = relay.hub.meta(&*relay.store, stream).await? {
            return Ok(Some(meta));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(None);
        }
        let notified = async {
            match watcher.as_mut() {
                Some(w) => w.changed().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = notified => {}
            _ = tokio::time::sleep(left.min(META_POLL)) => {}
        }
    }
}

/// Whether the request with `headers` may read a stream started by
/// `owner`: anyone with its id, except on routes with
/// `resume_auth = "same-caller"`, where only the caller that started it.
pub fn may_read(relay: &Relay, owner: &Owner, headers: &HeaderMap) -> bool {
    let same_caller_only = relay
        .router
        .by_path(&owner.route)
        .is_some_and(|r| r.resume_auth == ResumeAuth::SameCaller);
    !same_caller_only || is_owner(&relay.auth, &relay.router, owner, headers)
}

/// The seq of the stream's last event (not its end) as known now: from
/// this instance's log, else from the store.
async fn last_event(relay: &Relay, stream: StreamId, known: &Known) -> Result<Seq, RelayError> {
    if let Some((end, _)) = &known.end {
        return Ok(Seq(end.0.saturating_sub(1)));
    }
    if let Some((live, _)) = &known.held {
        // Ended since `known` was taken: its last frame is the end.
        return Ok(match live.end() {
            Some((end, _)) => Seq(end.0.saturating_sub(1)),
            None => live.last_seq(),
        });
    }
    Ok(relay.store.last_seq(stream).await?)
}

/// [`TAIL_INDEX_HEADER`]: event seqs count from 1, indexes from 0.
fn add_tail_index(resp: &mut Response<Body>, last_event: Option<Seq>) {
    if let Some(last) = last_event {
        let index = last.0 as i64 - 1;
        if let Ok(v) = HeaderValue::from_str(&index.to_string()) {
            let h = resp.headers_mut();
            h.insert(HeaderName::from_static(TAIL_INDEX_HEADER), v);
            expose(h, TAIL_INDEX_HEADER);
        }
    }
}

/// The answer for a stream that does not exist (or is not the caller's).
fn unknown(
    stream: StreamId,
    via: Via,
    signals: Dialect,
) -> Result<(Response<Body>, &'static str), RelayError> {
    match via {
        Via::LastEventId => Ok((history_lost(stream, signals), HISTORY_LOST)),
        Via::StreamsEndpoint => Err(RelayError::NotFound {
            code: "stream_not_found",
            message: "no such stream (unknown, or expired after its retention)".into(),
        }),
        Via::Key | Via::KeyIndex | Via::Idempotent => Ok((no_content(stream), NO_CONTENT)),
    }
}

const NO_CONTENT: &str = "no_content";
const HISTORY_LOST: &str = "history_lost";

/// Headers every SSE response of Reprise carries. Where the upstream
/// allows cross-origin reads, `Reprise-Stream-Id` is exposed to scripts too.
pub fn sse_headers(h: &mut http::HeaderMap, stream: StreamId) {
    if let Ok(v) = HeaderValue::from_str(&stream.to_string()) {
        h.insert(HeaderName::from_static(STREAM_ID_HEADER), v);
    }
    expose(h, STREAM_ID_HEADER);
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        HeaderName::from_static("x-accel-buffering"),
        HeaderValue::from_static("no"),
    );
}

/// Where the upstream allows cross-origin reads, lets scripts read `name` too.
fn expose(h: &mut http::HeaderMap, name: &str) {
    if !h.contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN) {
        return;
    }
    let exposed = match h
        .get(header::ACCESS_CONTROL_EXPOSE_HEADERS)
        .and_then(|v| v.to_str().ok())
    {
        Some(prev) if !prev.to_ascii_lowercase().contains(name) => format!("{prev}, {name}"),
        Some(prev) => prev.to_string(),
        None => name.to_string(),
    };
    if let Ok(v) = HeaderValue::from_str(&exposed) {
        h.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, v);
    }
}

fn no_content(stream: StreamId) -> Response<Body> {
    let mut resp = Response::new(empty());
    *resp.status_mut() = StatusCode::NO_CONTENT;
    if let Ok(v) = HeaderValue::from_str(&stream.to_string()) {
        resp.headers_mut()
            .insert(HeaderName::from_static(STREAM_ID_HEADER), v);
    }
    resp
}

/// `200` with one signal event (code `history_lost`, in `signals`' dialect)
/// whose id is `<stream>.end`, so that a reconnecting EventSource then gets
/// `204`.
fn history_lost(stream: StreamId, signals: Dialect) -> Response<Body> {
    let frame = sse_signal(signals, Signal::HISTORY_LOST, stream, &Cursor::End(stream));
    let mut resp = Response::new(full(frame));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    sse_headers(h, stream);
    resp
}
