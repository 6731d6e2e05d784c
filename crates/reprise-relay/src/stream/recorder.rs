//! Recording: the producer that reads an upstream SSE body into a
//! [`LiveStream`], and the writer that copies the log into the store.
//!
//! Both run as tasks of their own, detached from the client's connection:
//! a client that hangs up stops only its reader, never the recording (the
//! generation is paid for). The writer batches: it waits
//! `streams.store_linger` after new events before an append (not when the
//! stream ends), and while one append is in flight new events accumulate in
//! the log and go in the next one. The producer appends each upstream burst
//! to the log at once (see [`Batch`] and `body::Coalesce`).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use reprise_core::ndjson::LineSplitter;
use reprise_core::sse::{encode_fields, Limits, Parser};
use reprise_core::{Dialect, FailReason, Format, Outcome, Seq, StreamId};
use reprise_store::{Entry, EntryBody, KeyRef, Store, StoreError, StreamMeta};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::decode::{Coding, Decoder, STEP};
use crate::metrics::{EndLabels, GaugeGuard, RouteLabels};
use crate::retry::Backoff;
use crate::state::Relay;
use crate::stream::live::{LiveStream, Span};

/// Most entries written to the store in one append.
const MAX_BATCH: usize = 512;
/// How long the response waits for the store before a stream starts anyway.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(1);

/// Stores the stream's metadata and key binding before the response starts,
/// so that a client resuming on another instance right after its first event
/// finds the stream. One attempt: if the store is unavailable the stream
/// still starts, and the writer retries in the background. While the store
/// is known to be down (see `health`) there is no attempt at all: the
/// response starts at once and the writer stores everything once it is back.
pub async fn register(relay: &Relay, meta: &StreamMeta, key: Option<&KeyRef>) -> Registered {
    if relay.store_health.is_known_down() {
        relay.metrics.skipped("register");
        tracing::debug!(stream.id = %meta.id, "store known unreachable; registering the stream later");
        return Registered {
            meta_stored: false,
            key_bound: key.is_none(),
        };
    }
    let meta_stored = match tokio::time::timeout(REGISTER_TIMEOUT, relay.store.create(meta)).await {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            tracing::warn!(stream.id = %meta.id, cause = %e, "storing stream metadata failed; will retry");
            false
        }
        Err(_) => {
            tracing::warn!(stream.id = %meta.id, "storing stream metadata timed out; will retry");
            false
        }
    };
    let key_bound = match key {
        Some(k) if meta_stored => matches!(
            tokio::time::timeout(REGISTER_TIMEOUT, relay.store.bind_key(k, meta.id)).await,
            Ok(Ok(()))
        ),
        Some(_) => false,
        None => true,
    };
    Registered {
        meta_stored,
        key_bound,
    }
}

/// What [`register`] managed to store.
#[derive(Clone, Copy, Debug)]
pub struct Registered {
    meta_stored: bool,
    key_bound: bool,
}

/// Starts recording `body` into `live` (already registered in the hub).
/// `coding`: the content coding to decode the body from, if the upstream
/// compressed it.
pub fn spawn(
    relay: &Arc<Relay>,
    live: Arc<LiveStream>,
    body: Incoming,
    coding: Option<Coding>,
    meta: StreamMeta,
    key: Option<KeyRef>,
    registered: Registered,
) {
    let span = tracing::info_span!("stream", stream.id = %live.id, route = %meta.route);
    let producer = produce(
        relay.clone(),
        live.clone(),
        body,
        coding.map(Decoder::new),
        meta.route.clone(),
    );
    relay.producers.spawn(producer.instrument(span.clone()));
    let busy = Busy::new(relay);
    relay
        .tasks
        .spawn(keep_lease(relay.clone(), live.clone()).instrument(span.clone()));
    let writer = write(relay.clone(), live, meta, key, registered, busy);
    relay.tasks.spawn(writer.instrument(span));
}

/// Turns upstream bytes into entry payloads, per format.
enum Framer {
    /// SSE events, re-encoded as their fields (no id, no blank line).
    /// `trailing_retry`: the `retry` of the block the body ended inside,
    /// kept by [`Framer::finish`] for [`Framer::take_retry`].
    Sse {
        parser: Parser,
        trailing_retry: Option<u64>,
    },
    /// NDJSON lines, as sent.
    Ndjson(LineSplitter),
}

impl Framer {
    fn new(format: Format, limits: Limits) -> Framer {
        match format {
            Format::Sse => Framer::Sse {
                parser: Parser::new(limits),
                trailing_retry: None,
            },
            Format::Ndjson => Framer::Ndjson(LineSplitter::new(limits.max_line)),
        }
    }

    fn push(&mut self, data: Bytes) {
        match self {
            Framer::Sse { parser, .. } => parser.push(data),
            Framer::Ndjson(lines) => lines.push(data),
        }
    }

    /// Appends the next entry payload to `out`; false if no complete entry
    /// is buffered, an error message for invalid input.
    fn next_into(&mut self, out: &mut BytesMut) -> Result<bool, String> {
        match self {
            Framer::Sse { parser, .. } => match parser.next_event() {
                Ok(Some(event)) => {
                    encode_fields(&event, out);
                    Ok(true)
                }
                Ok(None) => Ok(false),
                Err(e) => Err(format!("invalid upstream event stream: {e}")),
            },
            Framer::Ndjson(lines) => match lines.next_line() {
                Ok(Some(line)) => {
                    out.extend_from_slice(&line);
                    Ok(true)
                }
                Ok(None) => Ok(false),
                Err(e) => Err(format!("invalid upstream NDJSON stream: {e}")),
            },
        }
    }

    /// End of the body: a last NDJSON line without line end, if any.
    fn finish(&mut self) -> Option<Bytes> {
        match self {
            Framer::Sse {
                parser,
                trailing_retry,
            } => {
                *trailing_retry = parser.take_retry();
                if parser.finish() {
                    tracing::debug!(
                        "upstream ended inside an event; the incomplete event was discarded"
                    );
                }
                None
            }
            Framer::Ndjson(lines) => lines.finish(),
        }
    }

    /// The payload of a `retry`-only event for a `retry` field read in a
    /// block that will never be dispatched (the body ended or failed inside
    /// it), if any. A browser reading the upstream directly applies such a
    /// `retry` on reading its line; readers get it this way, as an event
    /// without data, which no EventSource dispatches.
    fn take_retry(&mut self) -> Option<BytesMut> {
        let Framer::Sse {
            parser,
            trailing_retry,
        } = self
        else {
            return None;
        };
        let retry = trailing_retry.take().or_else(|| parser.take_retry())?;
        let mut fields = BytesMut::new();
        let event = reprise_core::sse::Event {
            retry: Some(retry),
            ..Default::default()
        };
        encode_fields(&event, &mut fields);
        Some(fields)
    }
}

/// The events of one upstream read, encoded as wire frames (`id:` line
/// included) into one buffer, so that a read costs one allocation and one
/// append to the log however many events it held.
struct Batch {
    buf: BytesMut,
    spans: Vec<Span>,
    /// Seq of the first event of the batch.
    first: Seq,
    sse: bool,
    prefix: reprise_core::IdPrefix,
}

/// Room reserved for a batch (an `id:` line is ~50 bytes).
const BATCH_RESERVE: usize = 4096;

impl Batch {
    fn new(live: &LiveStream) -> Batch {
        Batch {
            buf: BytesMut::new(),
            spans: Vec::new(),
            first: Seq::ZERO,
            sse: live.format == Format::Sse,
            prefix: *live.id_prefix(),
        }
    }

    fn start(&mut self, live: &LiveStream) {
        self.spans.clear();
        self.first = live.next_seq();
    }

    /// Encodes the framer's next event; returns its payload length.
    fn encode_next(&mut self, framer: &mut Framer) -> Result<Option<usize>, String> {
        let start = self.buf.len();
        if self.buf.capacity() - start < 256 {
            self.buf.reserve(BATCH_RESERVE);
        }
        if self.sse {
            let seq = Seq(self.first.0 + self.spans.len() as u64);
            self.buf.extend_from_slice(b"id: ");
            self.prefix.put(seq, &mut self.buf);
            self.buf.extend_from_slice(b"\n");
        }
        let fields_start = self.buf.len();
        match framer.next_into(&mut self.buf) {
            Ok(true) => {}
            other => {
                self.buf.truncate(start);
                return other.map(|_| None);
            }
        }
        let fields = fields_start..self.buf.len();
        self.buf.extend_from_slice(b"\n");
        let len = fields.len();
        self.spans.push(Span {
            start,
            fields,
            end: self.buf.len(),
        });
        Ok(Some(len))
    }

    /// The stored fields of the last encoded event.
    fn last_fields(&self) -> &[u8] {
        match self.spans.last() {
            Some(span) => &self.buf[span.fields.clone()],
            None => &[],
        }
    }

    /// Forgets the last encoded event (it broke a limit).
    fn drop_last(&mut self) {
        if let Some(span) = self.spans.pop() {
            self.buf.truncate(span.start);
        }
    }

    /// Appends the batch to the log: (events, payload bytes, unstored
    /// bytes of the stream), or `None` if it was empty or the log ended.
    fn push(&mut self, live: &LiveStream) -> Option<(u64, u64, usize)> {
        if self.spans.is_empty() {
            return None;
        }
        // The frames keep this memory; the buffer goes on with what is left.
        let block = self.buf.split().freeze();
        let bytes: usize = self.spans.iter().map(|s| s.fields.len()).sum();
        let (_, unstored) = live.push_block(self.first, &block, &self.spans)?;
        Some((self.spans.len() as u64, bytes as u64, unstored))
    }
}

/// Renews this instance's lease on a stream it records, every third of the
/// lease, until the stream ends; a renewal that reports a cancel request
/// (`DELETE` on another instance) cancels the producer.
async fn keep_lease(relay: Arc<Relay>, live: Arc<LiveStream>) {
    let lease = relay.config.streams.lease;
    // Not woken by every event: only by the end.
    let ended = live.wait_ended();
    tokio::pin!(ended);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(lease / 3) => {}
            _ = &mut ended => return,
            _ = relay.hard_stop.cancelled() => return,
        }
        let now = crate::clock::now_ms();
        match relay
            .store
            .renew_lease(
                live.id,
                &relay.instance,
                now,
                now + lease.as_millis() as u64,
            )
            .await
        {
            Ok(r) if r.cancel_requested => {
                tracing::info!("cancel requested through the store");
                live.cancel.cancel();
            }
            Ok(_) => {}
            // The store may have lost the stream (the writer re-creates it),
            // or be unreachable: keep producing, renew again later.
            Err(e) => tracing::debug!(cause = %e, "lease renewal failed"),
        }
    }
}

/// Reads the upstream body to its end and appends each entry to the log.
async fn produce(
    relay: Arc<Relay>,
    live: Arc<LiveStream>,
    body: Incoming,
    mut decoder: Option<Decoder>,
    route: String,
) {
    // A burst of upstream chunks becomes one batch: one append to the log,
    // one wake-up of its readers and writer (see `Coalesce`).
    let mut body = crate::body::Coalesce::new(body);
    let cfg = &relay.config;
    let metrics = relay.metrics.clone();
    metrics
        .streams_started
        .get_or_create(&RouteLabels {
            route: route.clone(),
        })
        .inc();
    let _active = GaugeGuard::new(&metrics.streams_active);
    let limits = Limits {
        max_line: cfg.limits.max_line.as_u64() as usize,
        max_event: cfg.limits.max_event.as_u64() as usize,
    };
    let max_events = cfg.limits.max_stream_events;
    let max_bytes = cfg.limits.max_stream_bytes.as_u64() as usize;
    let max_unstored_stream = cfg.limits.max_unstored_stream_bytes.as_u64() as usize;
    let max_unstored = cfg.limits.max_unstored_bytes.as_u64() as usize;
    let unstored_total = relay.unstored_total.clone();
    let idle = cfg.timeouts.idle;
    let deadline = Instant::now() + cfg.timeouts.max_stream_duration;
    // This stream's own token: waiting on it touches no lock shared with
    // other streams.
    let interrupt: CancellationToken = relay.interrupt.child_token();

    let mut framer = Framer::new(live.format, limits);
    let mut batch = Batch::new(&live);
    // `signals = "auto"` with nothing shown by the headers: the first events
    // decide the dialect (see `reprise_core::dialect`).
    let mut detect = DialectDetector::new(&live);
    let mut events: u64 = 0;
    let mut recorded: usize = 0;
    // After a batch: give up on the oldest unstored part if the store has
    // not kept up for too long, rather than grow without bound. The newest
    // half of the budget stays for the readers at the head.
    let check_budget = |unstored: usize| {
        if unstored > max_unstored_stream || unstored_total.load(Ordering::Relaxed) > max_unstored {
            if let Some((from, upto)) = live.declare_gap(max_unstored_stream / 2) {
                metrics.entries_lost.inc_by(upto.0 - from.0 + 1);
                tracing::error!(from = from.0, upto = upto.0, "store unavailable past the memory budget: entries dropped, the stream has lost history");
            }
        }
    };
    let too_large = || {
        failed(
            FailReason::StreamTooLarge,
            format!("stream exceeded limits.max_stream_events ({max_events}) or limits.max_stream_bytes ({max_bytes})"),
        )
    };
    // Frames every complete entry the framer holds into the batch,
    // enforcing the per-stream limits entry by entry; the outcome that ends
    // the stream if one broke.
    let frame_all = |framer: &mut Framer,
                     batch: &mut Batch,
                     detect: &mut DialectDetector,
                     events: &mut u64,
                     recorded: &mut usize|
     -> Option<Outcome> {
        loop {
            match batch.encode_next(framer) {
                Ok(Some(len)) => {
                    // Before the event enters the log, so that the writer
                    // stores the dialect before the event (see `write`).
                    detect.inspect(&live, batch.last_fields());
                    *events += 1;
                    *recorded += len;
                    if *events > max_events || *recorded > max_bytes {
                        batch.drop_last();
                        return Some(too_large());
                    }
                }
                Ok(None) => return None,
                Err(message) => return Some(failed(FailReason::UpstreamProtocol, message)),
            }
        }
    };
    let push_batch = |batch: &mut Batch| {
        if let Some((n, bytes, unstored)) = batch.push(&live) {
            metrics.events_recorded.inc_by(n);
            metrics.bytes_recorded.inc_by(bytes);
            check_budget(unstored);
        }
    };
    tracing::debug!(format = %live.format, coding = decoder.as_ref().map(|d| d.coding().as_str()), "recording started");
    // Made once, not per read: a read costs no timer or waiter registration.
    // The idle timer is moved forward lazily, only when it fires early.
    let max_duration = tokio::time::sleep_until(deadline);
    let idle_timer = tokio::time::sleep(idle);
    let interrupted = interrupt.cancelled();
    let cancelled = live.cancel.cancelled();
    tokio::pin!(max_duration, idle_timer, interrupted, cancelled);
    let mut last_read = Instant::now();
    let outcome = 'read: loop {
        let frame = tokio::select! {
            f = body.frame() => Ok(f),
            _ = &mut idle_timer => Err(()),
            _ = &mut max_duration => break failed(
                FailReason::UpstreamTimeout,
                format!("stream exceeded the maximum duration of {}", humantime(cfg.timeouts.max_stream_duration)),
            ),
            _ = &mut interrupted => break failed(FailReason::Interrupted, "Reprise shut down before the upstream finished".into()),
            _ = &mut cancelled => break Outcome::Cancelled,
        };
        let data = match frame {
            Err(()) => {
                if Instant::now() < last_read + idle {
                    idle_timer.as_mut().reset(last_read + idle);
                    continue;
                }
                break failed(
                    FailReason::UpstreamTimeout,
                    format!("upstream sent nothing for {}", humantime(idle)),
                );
            }
            Ok(f) => f,
        };
        last_read = Instant::now();
        let data = match data {
            None => {
                // The end of a compressed body: its last bytes, or the
                // proof that it was cut short.
                if let Some(decoder) = &mut decoder {
                    let (tail, broken) = match decoder.finish() {
                        Ok(tail) => (tail, None),
                        Err((tail, e)) => (tail, Some(e)),
                    };
                    framer.push(tail);
                    batch.start(&live);
                    if let Some(stop) = frame_all(
                        &mut framer,
                        &mut batch,
                        &mut detect,
                        &mut events,
                        &mut recorded,
                    ) {
                        push_batch(&mut batch);
                        break stop;
                    }
                    push_batch(&mut batch);
                    if let Some(e) = broken {
                        break failed(FailReason::UpstreamProtocol, e.to_string());
                    }
                }
                if let Some(last) = framer.finish() {
                    events += 1;
                    recorded += last.len();
                    if events > max_events || recorded > max_bytes {
                        break too_large();
                    }
                    live.push_event(&last);
                    metrics.events_recorded.inc();
                    metrics.bytes_recorded.inc_by(last.len() as u64);
                }
                break Outcome::Completed;
            }
            Some(Err(e)) => {
                break failed(
                    FailReason::UpstreamReset,
                    format!("upstream body failed: {e}"),
                )
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(d) => d,
                Err(_) => continue, // trailers
            },
        };
        // Every complete event of this read, encoded into one block and
        // appended at once (one lock, one wake-up), enforcing the
        // per-stream limits event by event.
        batch.start(&live);
        let stop = match &mut decoder {
            None => {
                framer.push(data);
                frame_all(
                    &mut framer,
                    &mut batch,
                    &mut detect,
                    &mut events,
                    &mut recorded,
                )
            }
            // A compressed read is decoded a bounded step at a time, each
            // step framed (under the stream limits) before the next, so the
            // decoded bytes held at once are one step's expansion, however
            // much the whole read expands to.
            Some(decoder) => {
                let mut data = data;
                loop {
                    let step = data.split_to(data.len().min(STEP));
                    let (decoded, broken) = match decoder.push(&step) {
                        Ok(decoded) => (decoded, None),
                        Err((decoded, e)) => (decoded, Some(e)),
                    };
                    // What decoded before a corrupt byte is kept.
                    framer.push(decoded);
                    let stop = frame_all(
                        &mut framer,
                        &mut batch,
                        &mut detect,
                        &mut events,
                        &mut recorded,
                    );
                    if stop.is_some() {
                        break stop;
                    }
                    if let Some(e) = broken {
                        break Some(failed(FailReason::UpstreamProtocol, e.to_string()));
                    }
                    if data.is_empty() {
                        break None;
                    }
                }
            }
        };
        push_batch(&mut batch);
        if let Some(o) = stop {
            break 'read o;
        }
    };
    // Dropping the body here closes the upstream connection on failures.
    drop(body);
    // Whatever ended the read, a `retry` the upstream sent in the last,
    // unfinished block still reaches the readers, before the end. Not
    // subject to the stream limits: it is a few bytes, once.
    if let Some(fields) = framer.take_retry() {
        if live.push_event(&fields).is_some() {
            metrics.events_recorded.inc();
            metrics.bytes_recorded.inc_by(fields.len() as u64);
        }
    }
    let entries = live.last_seq().0;
    match &outcome {
        Outcome::Completed => tracing::info!(entries, "stream completed"),
        other => tracing::warn!(entries, outcome = ?other, "stream failed"),
    }
    metrics
        .streams_ended
        .get_or_create(&EndLabels {
            route,
            outcome: outcome.label().to_string(),
            reason: outcome
                .signal()
                .map(|s| s.code.to_string())
                .unwrap_or_default(),
        })
        .inc();
    live.finish(outcome);
}

/// Events looked at for a dialect before settling for `reprise`: an
/// upstream may open with events that show nothing (Azure OpenAI's content
/// filter results, say).
const DIALECT_EVENTS: u32 = 8;

/// Decides the dialect of an `auto` SSE stream from its first events.
struct DialectDetector {
    /// Events still to look at; 0 once decided (or not ours to decide).
    left: u32,
}

impl DialectDetector {
    fn new(live: &LiveStream) -> Self {
        let undecided = live.format == Format::Sse && live.signals_decided().is_none();
        DialectDetector {
            left: if undecided { DIALECT_EVENTS } else { 0 },
        }
    }

    fn inspect(&mut self, live: &LiveStream, fields: &[u8]) {
        if self.left == 0 {
            return;
        }
        self.left -= 1;
        let found = Dialect::from_event(fields);
        if let Some(dialect) = found.or((self.left == 0).then_some(Dialect::Reprise)) {
            self.left = 0;
            // False if a signal (a gap) already fixed it.
            if live.decide_signals(dialect) {
                tracing::debug!(signals = %dialect, "signal dialect decided");
            }
        }
    }
}

fn failed(reason: FailReason, message: String) -> Outcome {
    Outcome::Failed { reason, message }
}

fn humantime(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// Copies the log into the store: metadata, key binding, then entries in
/// batches until the terminal entry is stored.
async fn write(
    relay: Arc<Relay>,
    live: Arc<LiveStream>,
    meta: StreamMeta,
    key: Option<KeyRef>,
    registered: Registered,
    busy: Busy,
) {
    let store = relay.store.clone();
    // Its own token: waiting on it touches no lock shared with other streams.
    let stop = relay.hard_stop.child_token();
    let id = live.id;
    // Metadata written late (store down at the start, or lost) carries a
    // fresh lease, so other instances do not take it for abandoned.
    let lease = relay.config.streams.lease;
    let fresh = |m: &StreamMeta| StreamMeta {
        lease_until_ms: Some(crate::clock::now_ms() + lease.as_millis() as u64),
        signals: live.signals_decided().or(m.signals),
        ..m.clone()
    };
    // The dialect the stored metadata holds (`None` reads as `reprise`).
    let mut signals_stored = meta.signals;
    if !registered.meta_stored {
        let late = fresh(&meta);
        if retry(&stop, || store.create(&late)).await.is_err() {
            return;
        }
        signals_stored = late.signals;
    }
    if let (Some(key), false) = (&key, registered.key_bound) {
        if retry(&stop, || store.bind_key(key, id)).await.is_err() {
            return;
        }
    }
    let linger = relay.config.streams.store_linger;
    let mut persisted = Seq::ZERO;
    let mut rx = live.subscribe();
    loop {
        rx.borrow_and_update();
        let batch = live.entries_after(persisted, MAX_BATCH);
        let Some(last) = batch.last() else {
            tokio::select! {
                r = rx.changed() => if r.is_err() { return },
                _ = stop.cancelled() => return,
            }
            continue;
        };
        let (batch, last_seq, ended) = if linger.is_zero()
            || batch.len() >= MAX_BATCH
            || matches!(last.body, EntryBody::End(_))
        {
            let (last_seq, ended) = batch_end(last);
            (batch, last_seq, ended)
        } else {
            // Let more events join this append (fewer store round trips,
            // commands and wake-ups), unless the stream ends meanwhile.
            tokio::select! {
                _ = tokio::time::sleep(linger) => {}
                _ = live.wait_ended() => {}
                _ = stop.cancelled() => {}
            }
            let batch = live.entries_after(persisted, MAX_BATCH);
            let Some(last) = batch.last() else { continue };
            let (last_seq, ended) = batch_end(last);
            (batch, last_seq, ended)
        };
        // A dialect decided since the metadata was written goes into the
        // store before the entries after the event that decided it, so
        // that a loader reaching a signal finds it (see `hub`).
        if let Some(dialect) = live.signals_decided() {
            if dialect != signals_stored.unwrap_or(Dialect::Reprise) {
                if retry(&stop, || store.set_signals(id, dialect))
                    .await
                    .is_err()
                {
                    return;
                }
                signals_stored = Some(dialect);
            }
        }
        match retry_append(&stop, &*store, id, &batch).await {
            Appended::Ok => {
                persisted = last_seq;
                live.mark_stored(persisted);
            }
            Appended::Stop => return,
            Appended::Conflict => {
                let again = fresh(&meta);
                match recover(&stop, &*store, &again, key.as_ref()).await {
                    // The store lost the stream (a Redis restart without
                    // persistence, a flush): it was re-created; rewrite it all
                    // from the log, which still holds every entry.
                    Some(Recovered::Recreated) => {
                        tracing::warn!("the store lost this stream; rewriting it from memory");
                        signals_stored = again.signals;
                        persisted = Seq::ZERO;
                        continue;
                    }
                    // An earlier append was applied but its answer lost:
                    // continue after what the store has.
                    Some(Recovered::StoredUpTo(seq)) if seq >= persisted => {
                        persisted = seq;
                        live.mark_stored(persisted);
                        if live.end().is_some_and(|(end, _)| end <= seq) {
                            break;
                        }
                        continue;
                    }
                    _ => {
                        tracing::error!("append conflict the writer cannot resolve; the stream's record stays incomplete");
                        return;
                    }
                }
            }
        }
        if ended {
            break;
        }
    }
    tracing::debug!(entries = persisted.0, "stream stored");
    drop(busy);
    // Keep the finished log in memory a little, for reconnects right after the end.
    tokio::select! {
        _ = tokio::time::sleep(relay.config.streams.hot_linger) => {}
        _ = stop.cancelled() => {}
    }
    relay.hub.remove(&live);
}

/// The last seq a batch covers, and whether it ends the stream.
fn batch_end(last: &Entry) -> (Seq, bool) {
    (last.last_seq(), matches!(last.body, EntryBody::End(_)))
}

enum Appended {
    Ok,
    /// The batch does not follow what the store holds.
    Conflict,
    /// Permanent error, or shutting down.
    Stop,
}

/// Appends a batch, retrying while the store is unavailable.
async fn retry_append(
    stop: &CancellationToken,
    store: &dyn Store,
    id: StreamId,
    batch: &[Entry],
) -> Appended {
    let r = retry(stop, || async {
        match store.append(id, batch).await {
            Err(StoreError::Conflict { detail, .. }) => {
                tracing::debug!(detail, "append conflict");
                Ok(Appended::Conflict)
            }
            Ok(()) => Ok(Appended::Ok),
            Err(e) => Err(e),
        }
    })
    .await;
    r.unwrap_or(Appended::Stop)
}

enum Recovered {
    /// The stream was missing and has been created again (empty).
    Recreated,
    /// The store holds entries up to this seq.
    StoredUpTo(Seq),
}

/// After an append conflict: re-create a stream the store lost, or find
/// where the stored entries end.
async fn recover(
    stop: &CancellationToken,
    store: &dyn Store,
    meta: &StreamMeta,
    key: Option<&KeyRef>,
) -> Option<Recovered> {
    let found = retry(stop, || store.meta(meta.id)).await.ok()?;
    match found {
        None => {
            retry(stop, || store.create(meta)).await.ok()?;
            if let Some(k) = key {
                retry(stop, || store.bind_key(k, meta.id)).await.ok()?;
            }
            Some(Recovered::Recreated)
        }
        Some(stored) if stored.epoch != meta.epoch => None,
        Some(_) => {
            let mut last = Seq::ZERO;
            loop {
                let page = retry(stop, || store.read(meta.id, last, 1000)).await.ok()?;
                match page.last() {
                    Some(Entry {
                        body: EntryBody::Gap { upto },
                        ..
                    }) => last = *upto,
                    Some(e) => last = e.seq,
                    None => return Some(Recovered::StoredUpTo(last)),
                }
            }
        }
    }
}

/// Retries a store call while its error is retryable; gives up on a
/// permanent error or when `stop` fires.
async fn retry<T, F, Fut>(stop: &CancellationToken, mut call: F) -> Result<T, ()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    // Writers retry at least every second, so a store that comes back is
    // caught up with quickly.
    let mut backoff = Backoff::up_to(Duration::from_secs(1));
    loop {
        match call().await {
            Ok(v) => return Ok(v),
            Err(e) if e.is_retryable() => {
                tracing::warn!(cause = %e, "store call failed; retrying");
                tokio::select! {
                    _ = backoff.wait() => {}
                    _ = stop.cancelled() => return Err(()),
                }
            }
            Err(e) => {
                tracing::error!(cause = %e, "store call failed permanently; the stream's record is incomplete");
                return Err(());
            }
        }
    }
}

/// Counts a writer with entries still to store, for the shutdown sequence.
struct Busy(Arc<Relay>);

impl Busy {
    fn new(relay: &Arc<Relay>) -> Busy {
        relay.writers_busy.fetch_add(1, Ordering::SeqCst);
        Busy(relay.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.writers_busy.fetch_sub(1, Ordering::SeqCst);
    }
}
