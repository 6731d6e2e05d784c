//! The producer: the first step of a recording, reading the upstream's
//! response body (decoded if compressed) into the stream's in-memory log,
//! where readers and the writer take it from. Splits the body into entries
//! (see `framer`), gives each its id and wire frame, decides an `auto`
//! stream's signal dialect from its first events, enforces the per-stream
//! limits and timeouts, and appends the terminal entry however the body
//! ends.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use reprise_core::sse::Limits;
use reprise_core::wire::{Span, WireEncoder};
use reprise_core::{Dialect, FailReason, Format, Outcome, Seq};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::decode::{Decoder, STEP};
use crate::metrics::{EndLabels, GaugeGuard, RouteLabels};
use crate::state::Relay;
use crate::stream::live::LiveStream;
use crate::stream::recorder::framer::Framer;
use crate::upstream::UpstreamBody;

/// The events of one upstream read, encoded as wire frames (`id:` line
/// included, by the stream's [`WireEncoder`]) into one buffer, so that a
/// read costs one allocation and one append to the log however many events
/// it held.
struct Batch {
    buf: BytesMut,
    spans: Vec<Span>,
    /// Seq of the first event of the batch.
    first: Seq,
    wire: WireEncoder,
}

/// Room reserved for a batch (an `id:` line is ~50 bytes).
const BATCH_RESERVE: usize = 4096;

impl Batch {
    fn new(live: &LiveStream) -> Batch {
        Batch {
            buf: BytesMut::new(),
            spans: Vec::new(),
            first: Seq::ZERO,
            wire: *live.wire(),
        }
    }

    fn start(&mut self, live: &LiveStream) {
        self.spans.clear();
        self.first = live.next_seq();
    }

    /// Encodes the framer's next event; returns its payload length.
    fn encode_next(&mut self, framer: &mut Framer) -> Result<Option<usize>, String> {
        if self.buf.capacity() - self.buf.len() < 256 {
            self.buf.reserve(BATCH_RESERVE);
        }
        let seq = Seq(self.first.0 + self.spans.len() as u64);
        // The framer writes the event's fields straight into the batch.
        let span = self
            .wire
            .event_with(seq, &mut self.buf, |out| framer.next_into(out))?;
        let Some(span) = span else { return Ok(None) };
        let len = span.fields.len();
        self.spans.push(span);
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
        let block = if self.buf.len() * 2 < self.buf.capacity() {
            // Mostly unused room (a chat token in a `BATCH_RESERVE` buffer):
            // the log keeps an exact copy and the buffer is freed, so that a
            // stream waiting for its next event holds only its frames.
            let block = Bytes::copy_from_slice(&self.buf);
            self.buf = BytesMut::new();
            block
        } else {
            // The frames keep this memory; the buffer goes on with what is left.
            self.buf.split().freeze()
        };
        let bytes: usize = self.spans.iter().map(|s| s.fields.len()).sum();
        let (_, unstored) = live.push_block(self.first, &block, &self.spans)?;
        Some((self.spans.len() as u64, bytes as u64, unstored))
    }
}

/// Reads the upstream body to its end and appends each entry to the log.
pub(super) async fn produce(
    relay: Arc<Relay>,
    live: Arc<LiveStream>,
    body: UpstreamBody,
    mut decoder: Option<Decoder>,
    route: String,
) {
    // A burst of upstream chunks becomes one batch: one append to the log,
    // one wake-up of its readers and writer (see `Coalesce`).
    let mut body = body.coalesced();
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
    let interrupt: CancellationToken = relay.shutdown.interrupt().child_token();

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
                    *events += 1;
                    *recorded += len;
                    if *events > max_events || *recorded > max_bytes {
                        batch.drop_last();
                        return Some(too_large());
                    }
                    // Before the event enters the log, so that the writer
                    // stores the dialect before the event (see `write`);
                    // after the limits, so that only a logged event decides.
                    detect.inspect(&live, batch.last_fields());
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
    // subject to the stream limits: it is a few bytes, once. Not after a
    // stop at a limit or a protocol error: the parser may then still hold
    // blocks past the last logged event, whose `retry` no reader saw come.
    let drained = !matches!(
        &outcome,
        Outcome::Failed {
            reason: FailReason::StreamTooLarge | FailReason::UpstreamProtocol,
            ..
        }
    );
    if let Some(fields) = framer.take_retry().filter(|_| drained) {
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
