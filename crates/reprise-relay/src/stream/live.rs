//! The in-memory log of one stream on this instance: the meeting point of a
//! stream's producer (or its loader from the store) and all its readers.
//!
//! ```text
//! upstream ─▶ recorder ─▶ LiveStream ─┬─▶ reader (the client that asked)
//!                                      ├─▶ reader (a resuming client)
//!                                      └─▶ writer ─▶ store
//! ```
//!
//! Frames are kept in seq order as ready-to-send wire bytes (`id:` line
//! included), so every reader sends the same `Bytes` without re-encoding.
//! Readers keep only a position: a slow reader costs no memory and never
//! delays the producer or other readers. The log is bounded by the
//! per-stream limits the recorder enforces.
//!
//! While the store is unreachable, the frames the writer has not stored yet
//! are the buffer. If that buffer outgrows its budget, the unstored frames
//! are dropped and replaced by one **gap** frame: readers that reach it get
//! the `history_lost` signal and end, and the writer stores the gap so that
//! readers elsewhere learn the same.
//!
//! Frames the store holds may be released to keep all logs under
//! `limits.max_log_bytes` (see `budget`): the log then starts later, and a
//! reader behind its start reads the released frames from the store
//! ([`Collected::released`], [`LiveStream::from_store`]).

use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use bytes::{BufMut, Bytes, BytesMut};
use reprise_core::outcome::Signal;
use reprise_core::wire::{Span, WireEncoder};
use reprise_core::{Cursor, Dialect, Epoch, Format, Outcome, Seq, StreamId};
use reprise_store::{Entry, EntryBody};
use tokio::sync::watch;

use crate::stream::budget::{LogBudget, Release};

/// One entry, ready to send.
#[derive(Clone, Debug)]
pub struct Frame {
    pub seq: Seq,
    /// The complete SSE frame: `id: …\n`, fields, blank line. Empty for a
    /// normal end (nothing is sent; the connection just closes).
    pub wire: Bytes,
    pub kind: FrameKind,
}

#[derive(Clone, Debug)]
pub enum FrameKind {
    /// `fields` is the byte range of `wire` that the store keeps.
    Event {
        fields: Range<usize>,
    },
    /// Entries `seq..=upto` were lost; `wire` is the `history_lost` signal.
    Gap {
        upto: Seq,
    },
    End(Outcome),
}

impl Frame {
    /// The store's view of this frame.
    pub fn to_entry(&self) -> Entry {
        let body = match &self.kind {
            FrameKind::Event { fields } => EntryBody::Event(self.wire.slice(fields.clone())),
            FrameKind::Gap { upto } => EntryBody::Gap { upto: *upto },
            FrameKind::End(outcome) => EntryBody::End(outcome.clone()),
        };
        Entry {
            seq: self.seq,
            body,
        }
    }

    /// The last seq this frame covers.
    fn covers_to(&self) -> Seq {
        match self.kind {
            FrameKind::Gap { upto } => upto,
            _ => self.seq,
        }
    }

    /// Ends a reader that reaches it.
    fn is_final(&self) -> bool {
        matches!(self.kind, FrameKind::End(_) | FrameKind::Gap { .. })
    }

    fn payload_len(&self) -> usize {
        match &self.kind {
            FrameKind::Event { fields } => fields.len(),
            _ => 0,
        }
    }
}

/// What a reader got from one call to [`LiveStream::collect_after`].
pub struct Collected {
    /// Wire bytes of the frames after the position (possibly several joined).
    pub chunk: Option<Bytes>,
    /// The new position.
    pub last: Seq,
    /// A terminal or gap frame was included: the reader is done.
    pub ended: bool,
    /// Frames sent in `chunk` (a normal end sends nothing and is not counted).
    pub frames: usize,
    /// The frames after the position were released from memory (they are
    /// in the store): nothing was collected; read them with
    /// [`LiveStream::from_store`].
    pub released: bool,
}

/// The log. See the module docs.
pub struct LiveStream {
    pub id: StreamId,
    pub epoch: Epoch,
    /// Writes this stream's frames, ids included (`<id>.<epoch>.` encoded
    /// once: each frame adds only its seq).
    wire: WireEncoder,
    /// Headers replayed to resuming readers.
    pub headers: Vec<(String, String)>,
    /// Wire framing of the frames.
    pub format: Format,
    state: Mutex<LogState>,
    /// Seq of the last frame; readers and the writer wait on it.
    last_tx: watch::Sender<u64>,
    /// Woken once the log ends (the terminal frame is in).
    ended_notify: tokio::sync::Notify,
    /// Readers currently attached (loaders stop when none are left).
    readers: AtomicUsize,
    /// Relay-wide count of unstored payload bytes, shared by all logs.
    unstored_total: Arc<AtomicUsize>,
    /// Cancels the producer, for streams produced on this instance.
    pub cancel: tokio_util::sync::CancellationToken,
    /// True for a stream produced on this instance (false: loaded from the store).
    pub local: bool,
    /// The route and caller that started the stream, once known.
    pub owner: std::sync::OnceLock<Owner>,
    /// The dialect of this stream's SSE signals, once decided (see the
    /// module docs); set at most once.
    signals: std::sync::OnceLock<Dialect>,
    /// The instance-wide bound on held frames (see `budget`).
    budget: Arc<LogBudget>,
    /// This log, to queue itself in the budget.
    me: Weak<LiveStream>,
}

/// Who started a stream: its route path and caller identity (see `auth`).
#[derive(Clone, Debug)]
pub struct Owner {
    pub route: String,
    pub caller: Option<String>,
}

#[derive(Default)]
struct LogState {
    /// In seq order; seqs are consecutive except across a gap frame.
    frames: Vec<Frame>,
    /// The seq the next frame gets.
    next: u64,
    ended: bool,
    /// Payload bytes recorded in the stream (for the per-stream limit).
    recorded_bytes: usize,
    /// Frames up to this seq are in the store.
    stored_upto: Seq,
    /// Payload bytes of frames after `stored_upto`.
    unstored_bytes: usize,
    /// Wire bytes of `frames` (what the budget counts for this log).
    held_bytes: usize,
    /// Frames up to this seq were released (they are in the store only).
    released_upto: Seq,
    /// Queued in the budget as having stored frames to release.
    queued: bool,
}

impl LogState {
    /// Index of the first frame that covers a seq after `after`.
    fn index_after(&self, after: Seq) -> usize {
        self.frames.partition_point(|f| f.covers_to() <= after)
    }
}

impl LiveStream {
    /// A log filled from the store (a stream produced elsewhere), its
    /// frames counted in `budget`.
    pub fn new(
        id: StreamId,
        epoch: Epoch,
        headers: Vec<(String, String)>,
        format: Format,
        budget: Arc<LogBudget>,
    ) -> Arc<Self> {
        Self::build(
            id,
            epoch,
            headers,
            format,
            Arc::new(AtomicUsize::new(0)),
            budget,
            false,
        )
    }

    /// The log of a stream produced here, accounting its unstored bytes in
    /// a relay-wide counter and its frames in `budget`.
    pub fn with_budget(
        id: StreamId,
        epoch: Epoch,
        headers: Vec<(String, String)>,
        format: Format,
        unstored_total: Arc<AtomicUsize>,
        budget: Arc<LogBudget>,
    ) -> Arc<Self> {
        Self::build(id, epoch, headers, format, unstored_total, budget, true)
    }

    fn build(
        id: StreamId,
        epoch: Epoch,
        headers: Vec<(String, String)>,
        format: Format,
        unstored_total: Arc<AtomicUsize>,
        budget: Arc<LogBudget>,
        local: bool,
    ) -> Arc<Self> {
        Arc::new_cyclic(|me| LiveStream {
            id,
            epoch,
            wire: WireEncoder::new(id, epoch, format),
            headers,
            format,
            state: Mutex::new(LogState {
                next: 1,
                ..LogState::default()
            }),
            last_tx: watch::channel(0).0,
            ended_notify: tokio::sync::Notify::new(),
            readers: AtomicUsize::new(0),
            unstored_total,
            cancel: tokio_util::sync::CancellationToken::new(),
            local,
            owner: std::sync::OnceLock::new(),
            signals: std::sync::OnceLock::new(),
            budget,
            me: me.clone(),
        })
    }

    /// Decides the dialect of this stream's signals, unless it already is
    /// (decided, or fixed by a signal already written). Returns whether
    /// this call decided it.
    pub fn decide_signals(&self, dialect: Dialect) -> bool {
        self.signals.set(dialect).is_ok()
    }

    /// The dialect of this stream's signals, if decided yet.
    pub fn signals_decided(&self) -> Option<Dialect> {
        self.signals.get().copied()
    }

    /// The dialect a signal written now would have (without fixing it).
    pub fn signals(&self) -> Dialect {
        self.signals_decided().unwrap_or(Dialect::Reprise)
    }

    fn lock(&self) -> MutexGuard<'_, LogState> {
        // A panic while holding this lock cannot leave the Vec half-written
        // (pushes are atomic), so a poisoned lock is still consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Append one event given its encoded fields (no id, no blank line).
    /// Returns its seq, or `None` if the stream already ended.
    pub fn push_event(&self, fields: &[u8]) -> Option<Seq> {
        let mut st = self.lock();
        if st.ended {
            return None;
        }
        let seq = Seq(st.next);
        let frame = self.event_frame(seq, fields);
        let held = frame.wire.len();
        self.push_locked(&mut st, frame, fields.len());
        // Published under the lock, so that `last_seq()` never lags a frame
        // someone already read.
        self.last_tx.send_replace(seq.0);
        drop(st);
        self.took(held);
        Some(seq)
    }

    /// The seq the next event gets (for a producer encoding frames ahead,
    /// see [`push_block`](Self::push_block)).
    pub fn next_seq(&self) -> Seq {
        Seq(self.lock().next)
    }

    /// The encoder of this stream's frames (for a producer encoding
    /// frames ahead, see [`push_block`](Self::push_block)).
    pub fn wire(&self) -> &WireEncoder {
        &self.wire
    }

    /// Appends the events of one upstream read at once: one lock and one
    /// wake-up of the readers and the writer for all of them. `block` holds
    /// their wire frames, encoded with ids for consecutive seqs from
    /// `first`, one [`Span`] each; every frame shares `block`'s memory.
    /// Returns the last seq and the payload bytes not stored yet, or `None`
    /// if the stream already ended.
    pub fn push_block(&self, first: Seq, block: &Bytes, spans: &[Span]) -> Option<(Seq, usize)> {
        let mut st = self.lock();
        if st.ended {
            return None;
        }
        let in_step = st.next == first.0;
        let mut added = 0;
        let mut held = 0;
        for span in spans {
            let seq = Seq(st.next);
            let fields = span.fields.clone();
            let frame = if in_step {
                Frame {
                    seq,
                    wire: block.slice(span.start..span.end),
                    kind: FrameKind::Event {
                        fields: fields.start - span.start..fields.end - span.start,
                    },
                }
            } else {
                // Only one producer appends, so this is not expected; the
                // ids must still be right.
                self.event_frame(seq, &block[fields.clone()])
            };
            st.next += 1;
            st.recorded_bytes += fields.len();
            st.unstored_bytes += fields.len();
            held += frame.wire.len();
            st.frames.push(frame);
            added += fields.len();
        }
        st.held_bytes += held;
        // One update of the relay-wide counter per batch.
        self.unstored_total.fetch_add(added, Ordering::Relaxed);
        let last = st.next - 1;
        self.last_tx.send_replace(last);
        let unstored = st.unstored_bytes;
        drop(st);
        self.took(held);
        Some((Seq(last), unstored))
    }

    fn push_locked(&self, st: &mut LogState, frame: Frame, len: usize) {
        st.next += 1;
        st.recorded_bytes += len;
        st.unstored_bytes += len;
        st.held_bytes += frame.wire.len();
        self.unstored_total.fetch_add(len, Ordering::Relaxed);
        st.frames.push(frame);
    }

    /// Counts `bytes` more held frames in the budget, and has the budget
    /// release stored frames if that puts it over. Called without the lock.
    fn took(&self, bytes: usize) {
        self.budget.add(bytes);
        if self.budget.is_over() {
            self.budget.enforce();
        }
    }

    /// Queues this log in the budget if it has stored frames to release and
    /// is not queued yet. Returns whether it must be queued (do it once the
    /// lock is dropped, with [`queue_in_budget`](Self::queue_in_budget)).
    fn mark_releasable(st: &mut LogState) -> bool {
        let releasable = st.frames.len() > 1 && st.index_after(st.stored_upto) > 0;
        if releasable && !st.queued {
            st.queued = true;
            return true;
        }
        false
    }

    fn queue_in_budget(&self) {
        let me: Weak<dyn Release> = self.me.clone();
        self.budget.queue(me);
        if self.budget.is_over() {
            self.budget.enforce();
        }
    }

    /// Append the terminal frame. Returns its seq, or `None` if already ended.
    pub fn finish(&self, outcome: Outcome) -> Option<Seq> {
        let mut st = self.lock();
        if st.ended {
            return None;
        }
        let seq = Seq(st.next);
        st.next += 1;
        let frame = self.end_frame(seq, outcome);
        let held = frame.wire.len();
        st.held_bytes += held;
        st.frames.push(frame);
        st.ended = true;
        self.last_tx.send_replace(seq.0);
        drop(st);
        self.ended_notify.notify_waiters();
        self.took(held);
        Some(seq)
    }

    /// One event's frame in a buffer of its own (see `reprise_core::wire`).
    fn event_frame(&self, seq: Seq, fields: &[u8]) -> Frame {
        let mut wire = BytesMut::with_capacity(fields.len() + 64);
        let span = self.wire.event(seq, fields, &mut wire);
        Frame {
            seq,
            wire: wire.freeze(),
            kind: FrameKind::Event {
                fields: span.fields,
            },
        }
    }

    /// A signal's wire frame. On SSE, writing it fixes the dialect: a later
    /// decision can no longer change what readers of this log see. (NDJSON
    /// signals have one spelling, and leave the dialect undecided.)
    fn signal_wire(&self, sig: Signal<'_>, at: Cursor) -> Bytes {
        self.wire
            .signal(|| *self.signals.get_or_init(|| Dialect::Reprise), sig, at)
    }

    /// The terminal frame. A failure's signal carries the `<stream>.end`
    /// id, not its seq's: so a reader positioned at an event id at or past
    /// the end has not seen the signal (it saw events the store lost with
    /// their producer) and still gets it; one that saw it resumes with `.end`.
    fn end_frame(&self, seq: Seq, outcome: Outcome) -> Frame {
        let wire = match outcome.signal() {
            Some(sig) => self.signal_wire(sig, Cursor::End(self.id)),
            None => Bytes::new(),
        };
        Frame {
            seq,
            wire,
            kind: FrameKind::End(outcome),
        }
    }

    fn gap_frame(&self, seq: Seq, upto: Seq) -> Frame {
        let sig = Signal {
            code: Signal::HISTORY_LOST.code,
            message: "part of this stream could not be stored and is lost",
        };
        Frame {
            seq,
            wire: self.signal_wire(sig, Cursor::End(self.id)),
            kind: FrameKind::Gap { upto },
        }
    }

    /// Append entries read from the store (a loader following another
    /// instance's producer). Entries must continue the log without a hole;
    /// returns false (and appends nothing) if they do not.
    pub fn append_loaded(&self, entries: &[Entry]) -> bool {
        let mut st = self.lock();
        let mut next = st.next;
        for e in entries {
            if st.ended || e.seq.0 != next {
                return false;
            }
            next = match &e.body {
                EntryBody::Gap { upto } => upto.0 + 1,
                _ => e.seq.0 + 1,
            };
        }
        let mut held = 0;
        for e in entries {
            if st.ended {
                break;
            }
            let f = match &e.body {
                EntryBody::Event(fields) => {
                    st.recorded_bytes += fields.len();
                    self.event_frame(e.seq, fields)
                }
                EntryBody::Gap { upto } => self.gap_frame(e.seq, *upto),
                EntryBody::End(outcome) => {
                    st.ended = true;
                    self.end_frame(e.seq, outcome.clone())
                }
            };
            held += f.wire.len();
            st.frames.push(f);
        }
        st.held_bytes += held;
        st.next = next;
        // Loaded frames are in the store already.
        st.stored_upto = Seq(next - 1);
        self.last_tx.send_replace(next - 1);
        let ended = st.ended;
        let queue = Self::mark_releasable(&mut st);
        drop(st);
        if ended {
            self.ended_notify.notify_waiters();
        }
        self.budget.add(held);
        if queue {
            self.queue_in_budget();
        } else if self.budget.is_over() {
            self.budget.enforce();
        }
        true
    }

    /// Frames after `after`, joined into one chunk of at most about
    /// `max_bytes` (always at least one frame if any is available). A
    /// reader stops at the first terminal or gap frame.
    pub fn collect_after(&self, after: Seq, max_bytes: usize) -> Collected {
        let st = self.lock();
        if after < st.released_upto {
            return Collected {
                chunk: None,
                last: after,
                ended: false,
                frames: 0,
                released: true,
            };
        }
        let start = st.index_after(after);
        if start >= st.frames.len() {
            // Past a failure's end: the reader saw events this log (or the
            // store it was loaded from) does not hold; it still gets the
            // signal, never a silent end.
            if let Some(end) = st
                .frames
                .last()
                .filter(|f| f.is_final() && !f.wire.is_empty())
            {
                if st.ended {
                    return Collected {
                        chunk: Some(end.wire.clone()),
                        last: after,
                        ended: true,
                        frames: 1,
                        released: false,
                    };
                }
            }
            return Collected {
                chunk: None,
                last: after,
                ended: st.ended,
                frames: 0,
                released: false,
            };
        }
        let avail = &st.frames[start..];
        let mut n = 0;
        let mut size = 0;
        for f in avail {
            if n > 0 && size + f.wire.len() > max_bytes {
                break;
            }
            size += f.wire.len();
            n += 1;
            if f.is_final() {
                break;
            }
        }
        let taken = &avail[..n];
        let sent = taken.iter().filter(|f| !f.wire.is_empty()).count();
        let last = taken[n - 1].covers_to();
        let ended = taken[n - 1].is_final();
        let chunk = if n == 1 {
            taken[0].wire.clone()
        } else {
            let mut buf = BytesMut::with_capacity(size);
            for f in taken {
                buf.put_slice(&f.wire);
            }
            buf.freeze()
        };
        drop(st);
        Collected {
            chunk: (!chunk.is_empty()).then_some(chunk),
            last,
            ended,
            frames: sent,
            released: false,
        }
    }

    /// What a reader positioned after `after` sends, made from `entries`
    /// read from the store (the frames after `after` were released from this
    /// log, see [`Collected::released`]). Entries that do not continue from
    /// `after` mean the store lost part of the stream: the reader gets the
    /// `history_lost` signal and ends, never a silent hole.
    pub fn from_store(&self, after: Seq, entries: &[Entry]) -> Collected {
        let mut buf = BytesMut::new();
        let mut last = after;
        let mut frames = 0;
        let mut ended = false;
        for e in entries {
            let covers = e.last_seq();
            if covers <= last {
                // A failure's end behind the reader: it saw events the store
                // lost; it still gets the signal (see `end_frame`).
                if let EntryBody::End(outcome) = &e.body {
                    if !outcome.is_completed() {
                        let frame = self.end_frame(e.seq, outcome.clone());
                        buf.put_slice(&frame.wire);
                        frames += 1;
                        ended = true;
                        break;
                    }
                }
                continue;
            }
            let frame = if e.seq > last.next() {
                // A hole: what it held is gone from the store.
                ended = true;
                self.gap_frame(last.next(), Seq(e.seq.0 - 1))
            } else {
                match &e.body {
                    EntryBody::Event(fields) => self.event_frame(e.seq, fields),
                    EntryBody::Gap { upto } => self.gap_frame(e.seq, *upto),
                    EntryBody::End(outcome) => self.end_frame(e.seq, outcome.clone()),
                }
            };
            if !frame.wire.is_empty() {
                frames += 1;
            }
            buf.put_slice(&frame.wire);
            last = frame.covers_to();
            if frame.is_final() {
                ended = true;
            }
            if ended {
                break;
            }
        }
        if entries.is_empty() || last == after {
            // The store holds nothing after a position the log released:
            // lost too.
            let gap = self.gap_frame(after.next(), after.next());
            buf.put_slice(&gap.wire);
            frames += 1;
            ended = true;
        }
        let chunk = buf.freeze();
        Collected {
            chunk: (!chunk.is_empty()).then_some(chunk),
            last,
            ended,
            frames,
            released: false,
        }
    }

    /// Store entries after `after`, at most `max` of them (for the writer).
    /// A gap that began at or before `after` is clipped to start after it.
    /// Frames released from memory (see `budget`) come back as one gap: a
    /// writer rewriting a stream the store lost can no longer restore them.
    pub fn entries_after(&self, after: Seq, max: usize) -> Vec<Entry> {
        let st = self.lock();
        let released = (after < st.released_upto).then(|| Entry {
            seq: after.next(),
            body: EntryBody::Gap {
                upto: st.released_upto,
            },
        });
        let after = after.max(st.released_upto);
        let start = st.index_after(after);
        released
            .into_iter()
            .chain(st.frames[start..].iter().map(|f| {
                let mut e = f.to_entry();
                if e.seq <= after {
                    e.seq = after.next();
                }
                e
            }))
            .take(max)
            .collect()
    }

    /// The writer stored everything up to `seq`.
    pub fn mark_stored(&self, seq: Seq) {
        let mut st = self.lock();
        if seq <= st.stored_upto {
            return;
        }
        let from = st.index_after(st.stored_upto);
        let to = st.index_after(seq);
        let freed: usize = st.frames[from..to].iter().map(Frame::payload_len).sum();
        let freed = freed.min(st.unstored_bytes);
        st.unstored_bytes -= freed;
        st.stored_upto = seq;
        self.unstored_total.fetch_sub(freed, Ordering::Relaxed);
        let queue = Self::mark_releasable(&mut st);
        drop(st);
        if queue {
            self.queue_in_budget();
        }
    }

    /// Entries not yet in the store.
    pub fn unstored_entries(&self) -> usize {
        let st = self.lock();
        st.frames.len() - st.index_after(st.stored_upto)
    }

    /// Payload bytes not yet in the store.
    pub fn unstored_bytes(&self) -> usize {
        self.lock().unstored_bytes
    }

    /// Drops the oldest unstored event frames, keeping the newest
    /// `keep_bytes` of payload for the readers at the head, and puts one gap
    /// frame in their place (the store could not keep up). Returns the lost
    /// range.
    pub fn declare_gap(&self, keep_bytes: usize) -> Option<(Seq, Seq)> {
        let mut st = self.lock();
        let from_idx = st.index_after(st.stored_upto);
        // The unstored run of events (and an earlier unstored gap, which is
        // merged into the new one).
        let mut run_end = from_idx;
        while run_end < st.frames.len()
            && matches!(
                st.frames[run_end].kind,
                FrameKind::Event { .. } | FrameKind::Gap { .. }
            )
        {
            run_end += 1;
        }
        // Keep the newest frames that fit in `keep_bytes`.
        let mut to_idx = run_end;
        let mut kept = 0;
        while to_idx > from_idx {
            let len = st.frames[to_idx - 1].payload_len();
            if kept + len > keep_bytes
                || matches!(st.frames[to_idx - 1].kind, FrameKind::Gap { .. })
            {
                break;
            }
            kept += len;
            to_idx -= 1;
        }
        let only_a_gap =
            to_idx == from_idx + 1 && matches!(st.frames[from_idx].kind, FrameKind::Gap { .. });
        if to_idx == from_idx || only_a_gap {
            return None;
        }
        let first = st.frames[from_idx].seq;
        let upto = st.frames[to_idx - 1].covers_to();
        let freed: usize = st.frames[from_idx..to_idx]
            .iter()
            .map(Frame::payload_len)
            .sum();
        let gap = self.gap_frame(first, upto);
        let dropped: usize = st.frames[from_idx..to_idx]
            .iter()
            .map(|f| f.wire.len())
            .sum();
        let gap_len = gap.wire.len();
        st.frames.splice(from_idx..to_idx, [gap]);
        st.held_bytes = st.held_bytes - dropped + gap_len;
        self.budget.sub(dropped);
        self.budget.add(gap_len);
        let freed = freed.min(st.unstored_bytes);
        st.unstored_bytes -= freed;
        self.unstored_total.fetch_sub(freed, Ordering::Relaxed);
        drop(st);
        // Wake readers so that those now behind the gap learn it.
        self.last_tx.send_modify(|_| {});
        Some((first, upto))
    }

    /// Seq of the last frame in the log.
    pub fn last_seq(&self) -> Seq {
        Seq(*self.last_tx.borrow())
    }

    /// The terminal outcome and its seq, once the log has ended.
    pub fn end(&self) -> Option<(Seq, Outcome)> {
        let st = self.lock();
        match st.frames.last() {
            Some(Frame {
                seq,
                kind: FrameKind::End(o),
                ..
            }) => Some((*seq, o.clone())),
            _ => None,
        }
    }

    pub fn is_ended(&self) -> bool {
        self.lock().ended
    }

    /// Resolves once the log has ended, without waking on every frame.
    pub async fn wait_ended(&self) {
        loop {
            let notified = self.ended_notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_ended() {
                return;
            }
            notified.await;
        }
    }

    /// Payload bytes recorded in the stream (for the per-stream limit).
    pub fn event_bytes(&self) -> usize {
        self.lock().recorded_bytes
    }

    /// Waits for frames after `seen`; use with the seq last observed.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.last_tx.subscribe()
    }

    /// Registers a reader for as long as the guard lives.
    pub fn attach(self: &Arc<Self>) -> ReaderGuard {
        self.readers.fetch_add(1, Ordering::SeqCst);
        ReaderGuard(self.clone())
    }

    pub fn reader_count(&self) -> usize {
        self.readers.load(Ordering::SeqCst)
    }
}

impl Release for LiveStream {
    fn release_stored(&self) -> usize {
        let mut st = self.lock();
        st.queued = false;
        // The last frame stays: it tells how the stream ended, or where the
        // head is.
        let n = st
            .index_after(st.stored_upto)
            .min(st.frames.len().saturating_sub(1));
        if n == 0 {
            return 0;
        }
        let freed: usize = st.frames[..n].iter().map(|f| f.wire.len()).sum();
        st.released_upto = st.frames[n - 1].covers_to();
        st.frames.drain(..n);
        st.held_bytes -= freed;
        drop(st);
        self.budget.sub(freed);
        freed
    }
}

impl Drop for LiveStream {
    fn drop(&mut self) {
        // Whatever was never stored no longer counts against the budget, and
        // the frames are no longer held.
        let st = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
        self.unstored_total
            .fetch_sub(st.unstored_bytes, Ordering::Relaxed);
        self.budget.sub(st.held_bytes);
    }
}

/// Counts a reader while alive.
pub struct ReaderGuard(Arc<LiveStream>);

impl Drop for ReaderGuard {
    fn drop(&mut self) {
        self.0.readers.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reprise_core::FailReason;

    fn live() -> Arc<LiveStream> {
        LiveStream::new(
            StreamId::random(),
            Epoch(7),
            vec![],
            Format::Sse,
            Arc::new(LogBudget::unbounded()),
        )
    }

    #[test]
    fn frames_carry_ids_and_store_fields() {
        let l = live();
        assert_eq!(l.push_event(b"data: a\n"), Some(Seq(1)));
        assert_eq!(l.push_event(b"event: x\ndata: b\n"), Some(Seq(2)));
        let c = l.collect_after(Seq(0), 1 << 20);
        let text = String::from_utf8(c.chunk.unwrap().to_vec()).unwrap();
        let id1 = format!("{}.00000007.0000000001", l.id);
        assert!(
            text.starts_with(&format!("id: {id1}\ndata: a\n\nid: ")),
            "{text}"
        );
        assert_eq!(c.last, Seq(2));
        assert!(!c.ended);
        let entries = l.entries_after(Seq(1), 10);
        assert_eq!(entries.len(), 1);
        assert_eq!(
            entries[0].body,
            EntryBody::Event(Bytes::from_static(b"event: x\ndata: b\n"))
        );
    }

    #[test]
    fn collect_respects_max_bytes_but_always_progresses() {
        let l = live();
        for _ in 0..10 {
            l.push_event(b"data: 0123456789\n");
        }
        let c = l.collect_after(Seq(0), 1);
        assert_eq!(c.last, Seq(1));
        let c = l.collect_after(Seq(1), 200);
        assert!(c.last > Seq(2) && c.last < Seq(10));
    }

    #[test]
    fn end_frames_signal_failures_only() {
        let l = live();
        l.push_event(b"data: a\n");
        assert_eq!(
            l.finish(Outcome::Failed {
                reason: FailReason::UpstreamReset,
                message: "reset".into()
            }),
            Some(Seq(2))
        );
        assert_eq!(l.push_event(b"data: late\n"), None);
        let c = l.collect_after(Seq(1), 1 << 20);
        assert!(c.ended);
        let text = String::from_utf8(c.chunk.unwrap().to_vec()).unwrap();
        assert!(text.contains("event: reprise-error\n"), "{text}");
        assert!(text.contains("upstream_reset"));

        let ok = live();
        ok.finish(Outcome::Completed);
        let c = ok.collect_after(Seq(0), 1 << 20);
        assert!(c.ended && c.chunk.is_none());
        assert!(ok.collect_after(Seq(1), 1).ended);
    }

    #[test]
    fn signals_use_the_decided_dialect_and_the_first_signal_fixes_it() {
        let l = live();
        assert!(l.decide_signals(Dialect::Anthropic));
        l.push_event(b"event: message_start\ndata: {}\n");
        l.finish(Outcome::Cancelled);
        let text =
            String::from_utf8(l.collect_after(Seq(1), 1 << 20).chunk.unwrap().to_vec()).unwrap();
        assert!(text.contains("\nevent: error\ndata: {"), "{text}");
        assert!(text.contains("\"type\":\"api_error\""), "{text}");
        assert!(text.contains("\"code\":\"cancelled\""), "{text}");

        // Undecided when the signal is written: reprise, for good.
        let l = live();
        l.finish(Outcome::Cancelled);
        assert!(!l.decide_signals(Dialect::OpenAi));
        assert_eq!(l.signals_decided(), Some(Dialect::Reprise));
        let text =
            String::from_utf8(l.collect_after(Seq(0), 1 << 20).chunk.unwrap().to_vec()).unwrap();
        assert!(text.contains("event: reprise-error\n"), "{text}");

        // NDJSON: Ollama's error line whatever the dialect.
        let l = LiveStream::new(
            StreamId::random(),
            Epoch(7),
            vec![],
            Format::Ndjson,
            Arc::new(LogBudget::unbounded()),
        );
        l.decide_signals(Dialect::OpenAi);
        l.finish(Outcome::Cancelled);
        let text =
            String::from_utf8(l.collect_after(Seq(0), 1 << 20).chunk.unwrap().to_vec()).unwrap();
        assert!(text.starts_with("{\"error\":\"reprise: "), "{text}");
    }

    #[test]
    fn a_gap_replaces_unstored_frames_and_ends_readers_that_reach_it() {
        let budget = Arc::new(AtomicUsize::new(0));
        let l = LiveStream::with_budget(
            StreamId::random(),
            Epoch(7),
            vec![],
            Format::Sse,
            budget.clone(),
            Arc::new(LogBudget::unbounded()),
        );
        for _ in 0..5 {
            l.push_event(b"data: 0123456789\n");
        }
        assert_eq!(budget.load(Ordering::Relaxed), 5 * 17);
        l.mark_stored(Seq(2));
        assert_eq!(l.unstored_bytes(), 3 * 17);
        assert_eq!(budget.load(Ordering::Relaxed), 3 * 17);
        assert_eq!(l.declare_gap(0), Some((Seq(3), Seq(5))));
        assert_eq!(budget.load(Ordering::Relaxed), 0);
        l.push_event(b"data: after\n");
        // A reader before the gap gets frames 1-2, then the signal, and ends.
        let c = l.collect_after(Seq(0), 1 << 20);
        let text = String::from_utf8(c.chunk.unwrap().to_vec()).unwrap();
        assert!(c.ended);
        assert!(text.contains("history_lost"), "{text}");
        assert!(text.contains(&format!("id: {}.end", l.id)), "{text}");
        // A reader inside the gap too; one past it continues.
        assert!(l.collect_after(Seq(3), 1 << 20).ended);
        let c = l.collect_after(Seq(5), 1 << 20);
        assert!(!c.ended);
        assert_eq!(c.last, Seq(6));
        // The writer stores the gap as one entry, clipped to what it stored.
        let entries = l.entries_after(Seq(2), 10);
        assert_eq!(entries[0].seq, Seq(3));
        assert_eq!(entries[0].body, EntryBody::Gap { upto: Seq(5) });
        assert_eq!(entries[1].seq, Seq(6));
        let entries = l.entries_after(Seq(4), 10);
        assert_eq!(entries[0].seq, Seq(5));
        drop(l);
        assert_eq!(budget.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn loaded_entries_must_be_contiguous() {
        let l = live();
        let e = |seq, b: &'static [u8]| Entry {
            seq: Seq(seq),
            body: EntryBody::Event(Bytes::from_static(b)),
        };
        assert!(!l.append_loaded(&[e(2, b"data: x\n")]));
        assert!(l.append_loaded(&[e(1, b"data: x\n"), e(2, b"data: y\n")]));
        assert!(!l.append_loaded(&[e(2, b"data: y\n")]));
        assert!(l.append_loaded(&[Entry {
            seq: Seq(3),
            body: EntryBody::End(Outcome::Completed)
        }]));
        assert_eq!(l.end(), Some((Seq(3), Outcome::Completed)));
    }

    #[test]
    fn stored_frames_are_released_past_the_budget_and_read_from_the_store() {
        let budget = Arc::new(LogBudget::new(100));
        let l = LiveStream::with_budget(
            StreamId::random(),
            Epoch(7),
            vec![],
            Format::Sse,
            Arc::new(AtomicUsize::new(0)),
            budget.clone(),
        );
        for _ in 0..4 {
            l.push_event(b"data: 0123456789\n");
        }
        let held = budget.held();
        assert!(held > 100, "{held}");
        // Nothing is stored yet: nothing can go.
        assert!(!l.collect_after(Seq(0), 1 << 20).released);
        l.mark_stored(Seq(3));
        // Over the budget: every stored frame goes; the unstored one stays.
        assert!(budget.held() < held);
        assert!(budget.released_total() > 0);
        let c = l.collect_after(Seq(0), 1 << 20);
        assert!(c.released && c.chunk.is_none());
        // A reader at or past the release point is served from memory.
        let c = l.collect_after(Seq(3), 1 << 20);
        assert!(!c.released);
        assert_eq!(c.last, Seq(4));
        // What the store gives back reads exactly like the log did.
        let e = |seq| Entry {
            seq: Seq(seq),
            body: EntryBody::Event(Bytes::from_static(b"data: 0123456789\n")),
        };
        let c = l.from_store(Seq(1), &[e(2), e(3)]);
        let text = String::from_utf8(c.chunk.unwrap().to_vec()).unwrap();
        assert_eq!(c.last, Seq(3));
        assert!(!c.ended);
        assert!(
            text.starts_with(&format!("id: {}.00000007.0000000002\n", l.id)),
            "{text}"
        );
        // A store that lost them: history_lost, never a silent hole.
        let c = l.from_store(Seq(1), &[e(3)]);
        assert!(c.ended);
        assert!(String::from_utf8(c.chunk.unwrap().to_vec())
            .unwrap()
            .contains("history_lost"));
        let c = l.from_store(Seq(1), &[]);
        assert!(c.ended);
        // A writer rewriting the stream gets the released part as a gap.
        let entries = l.entries_after(Seq(0), 10);
        assert_eq!(entries[0].seq, Seq(1));
        assert_eq!(entries[0].body, EntryBody::Gap { upto: Seq(3) });
        assert_eq!(entries[1].seq, Seq(4));
        drop(l);
        assert_eq!(budget.held(), 0);
    }
}
