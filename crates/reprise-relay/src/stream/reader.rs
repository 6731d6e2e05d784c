//! A reader: the response body that sends one client a stream's frames
//! from a position onwards, then follows it live until its end.
//!
//! The original client of a stream and every resuming client are readers of
//! the same kind; they differ only in their starting position.
//!
//! # Heartbeats
//!
//! After `streams.heartbeat` of silence an SSE reader gets one comment line,
//! `: keep-alive\n`, with no blank line after it. Frames are whole events,
//! so the comment always falls between two events, and a lone comment line
//! dispatches nothing in any SSE parser. A blank line would: openai-python's
//! decoder turns it into an empty event once it has seen an `id:` line
//! (Reprise always sends them) and fails on `json.loads("")`.
//!
//! NDJSON readers (Ollama) get no heartbeat at all: every line of such a
//! stream must be a JSON object (Ollama's clients fail on anything else), and
//! there is no comment syntax. TCP keep-alive, not application bytes, keeps
//! such a connection open through a long silence.
//!
//! # Behind the log's start
//!
//! A log may have released its oldest frames (they are in the store; see
//! `budget`). A reader positioned before them reads them from the store,
//! a page at a time, until it reaches what the log holds; while the store
//! does not answer it waits and tries again. A store that lost them gives
//! the reader `history_lost` (see `LiveStream::from_store`).

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::stream;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use reprise_core::{Format, Seq};
use reprise_store::Store;
use tokio::time::Sleep;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::body::{Body, BoxError};
use crate::metrics::{GaugeGuard, Metrics};
use crate::retry::Backoff;
use crate::stream::live::{Collected, LiveStream, ReaderGuard};

/// Most bytes joined into one write when a reader is catching up.
const MAX_WRITE: usize = 64 * 1024;

/// A lone SSE comment line: dispatches no event (see the module docs).
const HEARTBEAT: &[u8] = b": keep-alive\n";

/// Entries read from the store per call by a reader behind the log's start.
const STORE_PAGE: usize = 256;

/// What every reader shares: see [`body`].
#[derive(Clone)]
pub struct ReaderCtx {
    /// Where frames released from the log are read again.
    pub store: Arc<dyn Store>,
    pub metrics: Arc<Metrics>,
    /// Silence after which an SSE reader gets a heartbeat.
    pub heartbeat: Duration,
    /// Shutdown: closes readers early; clients can resume elsewhere.
    pub stop: CancellationToken,
}

/// Who is reading: the client whose request started the stream, or a
/// resuming client (counted as replay in the metrics).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReaderKind {
    Origin,
    Resume,
}

struct ReaderState {
    live: Arc<LiveStream>,
    _guard: ReaderGuard,
    _active: GaugeGuard,
    metrics: Arc<Metrics>,
    store: Arc<dyn Store>,
    kind: ReaderKind,
    /// When a resume started, until it first caught up with the live end.
    catching_up: Option<Instant>,
    pos: Seq,
    rx: tokio::sync::watch::Receiver<u64>,
    /// Silence after which a heartbeat goes out; `None` for NDJSON streams,
    /// which never get one.
    heartbeat: Option<Duration>,
    /// Fires at or after the heartbeat is due; moved forward lazily (only
    /// when it fires early), so sending a frame costs no timer update.
    heartbeat_timer: Pin<Box<Sleep>>,
    /// When the last chunk was sent.
    last_sent: tokio::time::Instant,
    /// Shutdown, as a token of this reader's own: waiting on it registers
    /// once, and touches no lock shared with other readers.
    stopped: Pin<Box<WaitForCancellationFutureOwned>>,
    done: bool,
}

/// The body of a reader positioned after `after`. `ctx.stop` closes it
/// early (shutdown); the client can then resume elsewhere.
pub fn body(
    live: Arc<LiveStream>,
    guard: ReaderGuard,
    after: Seq,
    kind: ReaderKind,
    ctx: ReaderCtx,
) -> Body {
    let ReaderCtx {
        store,
        metrics,
        heartbeat,
        stop,
    } = ctx;
    let rx = live.subscribe();
    let heartbeat = (live.format == Format::Sse).then_some(heartbeat);
    let state = ReaderState {
        live,
        _guard: guard,
        _active: GaugeGuard::new(&metrics.readers_active),
        metrics,
        store,
        kind,
        catching_up: (kind == ReaderKind::Resume).then(Instant::now),
        pos: after,
        rx,
        heartbeat,
        // Never polled without a heartbeat (the `select!` branch is off).
        heartbeat_timer: Box::pin(tokio::time::sleep(heartbeat.unwrap_or(Duration::MAX))),
        last_sent: tokio::time::Instant::now(),
        stopped: Box::pin(stop.child_token().cancelled_owned()),
        done: false,
    };
    let frames = stream::unfold(state, |mut st| async move {
        let chunk = next_chunk(&mut st).await?;
        Some((Ok::<_, BoxError>(Frame::data(chunk)), st))
    });
    StreamBody::new(frames).boxed()
}

async fn next_chunk(st: &mut ReaderState) -> Option<Bytes> {
    loop {
        if st.done {
            return None;
        }
        st.rx.borrow_and_update();
        let mut c = st.live.collect_after(st.pos, MAX_WRITE);
        if c.released {
            c = from_store(st).await?;
        }
        st.pos = c.last;
        st.done = c.ended;
        if let Some(chunk) = c.chunk {
            if st.kind == ReaderKind::Resume {
                st.metrics.events_replayed.inc_by(c.frames as u64);
                st.metrics.bytes_replayed.inc_by(chunk.len() as u64);
            }
            st.last_sent = tokio::time::Instant::now();
            return Some(chunk);
        }
        if st.done {
            return None;
        }
        if let Some(started) = st.catching_up.take() {
            // Caught up with a stream that is still live.
            st.metrics
                .replay_lag
                .observe(started.elapsed().as_secs_f64());
        }
        tokio::select! {
            biased;
            r = st.rx.changed() => {
                if r.is_err() {
                    return None;
                }
            }
            _ = st.heartbeat_timer.as_mut(), if st.heartbeat.is_some() => {
                let Some(every) = st.heartbeat else { continue };
                let now = tokio::time::Instant::now();
                let due = st.last_sent + every;
                if now >= due {
                    st.last_sent = now;
                    st.heartbeat_timer.as_mut().reset(now + every);
                    return Some(Bytes::from_static(HEARTBEAT));
                }
                // Something was sent since the timer was set: wait for the rest.
                st.heartbeat_timer.as_mut().reset(due);
            }
            _ = st.stopped.as_mut() => return None,
        }
    }
}

/// The frames after the reader's position, read from the store because the
/// log released them. Waits while the store does not answer; `None` if the
/// reader is stopped meanwhile.
async fn from_store(st: &mut ReaderState) -> Option<Collected> {
    let mut backoff = Backoff::up_to(Duration::from_secs(1));
    loop {
        // In a task of its own: the store's future is not `Sync`, which a
        // response body must be.
        let (store, id, pos) = (st.store.clone(), st.live.id, st.pos);
        let read = tokio::spawn(async move { store.read(id, pos, STORE_PAGE).await });
        let read = match read.await {
            Ok(r) => r,
            Err(e) => Err(reprise_store::StoreError::Unavailable(format!(
                "store read task failed: {e}"
            ))),
        };
        match read {
            Ok(entries) => {
                st.metrics.released_reads.inc();
                return Some(st.live.from_store(st.pos, &entries));
            }
            Err(e) => {
                tracing::debug!(stream.id = %st.live.id, cause = %e, "reading released frames from the store failed; retrying");
                tokio::select! {
                    _ = backoff.wait() => {}
                    _ = st.stopped.as_mut() => return None,
                }
            }
        }
    }
}
