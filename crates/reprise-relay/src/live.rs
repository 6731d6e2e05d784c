//! The in-memory log of one stream on this instance: the meeting point of a
//! stream's producer (or its loader from the store) and all its readers.
//!
//! ```text
//! upstream ─▶ recorder ─▶ LiveStream ─┬─▶ reader (the client that asked)
//!                                      ├─▶ reader (a resuming client)
//!                                      └─▶ writer ─▶ store
//! ```
//!
//! Frames are kept in order, indexed by seq, as ready-to-send wire bytes
//! (`id:` line included), so every reader sends the same `Bytes` without
//! re-encoding. Readers keep only a position: a slow reader costs no memory
//! and never delays the producer or other readers. The log is bounded by the
//! per-stream limits the recorder enforces.

use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::{BufMut, Bytes, BytesMut};
use reprise_core::outcome::{signal_frame, signal_line};
use reprise_core::{Epoch, EventId, Format, Outcome, Seq, StreamId};
use reprise_store::{Entry, EntryBody};
use tokio::sync::watch;

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
    Event { fields: Range<usize> },
    End(Outcome),
}

impl Frame {
    /// The store's view of this frame.
    pub fn to_entry(&self) -> Entry {
        let body = match &self.kind {
            FrameKind::Event { fields } => EntryBody::Event(self.wire.slice(fields.clone())),
            FrameKind::End(outcome) => EntryBody::End(outcome.clone()),
        };
        Entry { seq: self.seq, body }
    }
}

/// What a reader got from one call to [`LiveStream::collect_after`].
pub struct Collected {
    /// Wire bytes of the frames after the position (possibly several joined).
    pub chunk: Option<Bytes>,
    /// The new position.
    pub last: Seq,
    /// The terminal frame was included: the reader is done.
    pub ended: bool,
    /// Frames sent in `chunk` (a normal end sends nothing and is not counted).
    pub frames: usize,
}

/// The log. See the module docs.
pub struct LiveStream {
    pub id: StreamId,
    pub epoch: Epoch,
    /// Headers replayed to resuming readers.
    pub headers: Vec<(String, String)>,
    /// Wire framing of the frames.
    pub format: Format,
    state: Mutex<LogState>,
    /// Seq of the last frame; readers and the writer wait on it.
    last_tx: watch::Sender<u64>,
    /// Readers currently attached (loaders stop when none are left).
    readers: AtomicUsize,
}

#[derive(Default)]
struct LogState {
    /// `frames[i].seq == i + 1`.
    frames: Vec<Frame>,
    ended: bool,
    event_bytes: usize,
}

impl LiveStream {
    pub fn new(id: StreamId, epoch: Epoch, headers: Vec<(String, String)>, format: Format) -> Arc<Self> {
        Arc::new(LiveStream {
            id,
            epoch,
            headers,
            format,
            state: Mutex::new(LogState::default()),
            last_tx: watch::channel(0).0,
            readers: AtomicUsize::new(0),
        })
    }

    fn lock(&self) -> MutexGuard<'_, LogState> {
        // A panic while holding this lock cannot leave the Vec half-written
        // (pushes are atomic), so a poisoned lock is still consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn event_id(&self, seq: Seq) -> EventId {
        EventId {
            stream: self.id,
            epoch: self.epoch,
            seq,
        }
    }

    /// Append one event given its encoded fields (no id, no blank line).
    /// Returns its seq, or `None` if the stream already ended.
    pub fn push_event(&self, fields: &[u8]) -> Option<Seq> {
        let mut st = self.lock();
        if st.ended {
            return None;
        }
        let seq = Seq(st.frames.len() as u64 + 1);
        st.event_bytes += fields.len();
        st.frames.push(self.event_frame(seq, fields));
        drop(st);
        self.last_tx.send_replace(seq.0);
        Some(seq)
    }

    /// Append the terminal frame. Returns its seq, or `None` if already ended.
    pub fn finish(&self, outcome: Outcome) -> Option<Seq> {
        let mut st = self.lock();
        if st.ended {
            return None;
        }
        let seq = Seq(st.frames.len() as u64 + 1);
        st.frames.push(self.end_frame(seq, outcome));
        st.ended = true;
        drop(st);
        self.last_tx.send_replace(seq.0);
        Some(seq)
    }

    /// SSE: `id: <event id>\n<fields>\n`; NDJSON: `<line>\n`.
    fn event_frame(&self, seq: Seq, fields: &[u8]) -> Frame {
        let mut wire = BytesMut::with_capacity(fields.len() + 64);
        if self.format == Format::Sse {
            wire.put_slice(b"id: ");
            wire.put_slice(self.event_id(seq).to_string().as_bytes());
            wire.put_u8(b'\n');
        }
        let start = wire.len();
        wire.put_slice(fields);
        let end = wire.len();
        wire.put_u8(b'\n');
        Frame {
            seq,
            wire: wire.freeze(),
            kind: FrameKind::Event { fields: start..end },
        }
    }

    fn end_frame(&self, seq: Seq, outcome: Outcome) -> Frame {
        let wire = match (outcome.signal(), self.format) {
            (Some(sig), Format::Sse) => Bytes::from(signal_frame(sig, self.id, &self.event_id(seq))),
            (Some(sig), Format::Ndjson) => Bytes::from(signal_line(sig, self.id)),
            (None, _) => Bytes::new(),
        };
        Frame {
            seq,
            wire,
            kind: FrameKind::End(outcome),
        }
    }

    /// Append entries read from the store (a loader following another
    /// instance's producer). Entries must continue the log without a gap;
    /// returns false (and appends nothing) if they do not.
    pub fn append_loaded(&self, entries: &[Entry]) -> bool {
        let mut st = self.lock();
        let mut next = st.frames.len() as u64 + 1;
        if entries.iter().any(|e| {
            let ok = e.seq.0 == next;
            next += 1;
            !ok
        }) || st.ended
        {
            return false;
        }
        for e in entries {
            if st.ended {
                break;
            }
            match &e.body {
                EntryBody::Event(fields) => {
                    st.event_bytes += fields.len();
                    let f = self.event_frame(e.seq, fields);
                    st.frames.push(f);
                }
                EntryBody::End(outcome) => {
                    let f = self.end_frame(e.seq, outcome.clone());
                    st.frames.push(f);
                    st.ended = true;
                }
            }
        }
        let last = st.frames.len() as u64;
        drop(st);
        self.last_tx.send_replace(last);
        true
    }

    /// Frames after `after`, joined into one chunk of at most about
    /// `max_bytes` (always at least one frame if any is available).
    pub fn collect_after(&self, after: Seq, max_bytes: usize) -> Collected {
        let st = self.lock();
        let start = after.0 as usize;
        if start >= st.frames.len() {
            return Collected {
                chunk: None,
                last: after,
                ended: st.ended && start >= st.frames.len(),
                frames: 0,
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
        }
        let taken = &avail[..n];
        let sent = taken.iter().filter(|f| !f.wire.is_empty()).count();
        let last = taken[n - 1].seq;
        let ended = matches!(taken[n - 1].kind, FrameKind::End(_));
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
        }
    }

    /// Store entries after `after`, at most `max` of them (for the writer).
    pub fn entries_after(&self, after: Seq, max: usize) -> Vec<Entry> {
        let st = self.lock();
        let start = (after.0 as usize).min(st.frames.len());
        st.frames[start..]
            .iter()
            .take(max)
            .map(Frame::to_entry)
            .collect()
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

    /// Bytes of event payload held (for the per-stream limit).
    pub fn event_bytes(&self) -> usize {
        self.lock().event_bytes
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
        LiveStream::new(StreamId::random(), Epoch(7), vec![], Format::Sse)
    }

    #[test]
    fn frames_carry_ids_and_store_fields() {
        let l = live();
        assert_eq!(l.push_event(b"data: a\n"), Some(Seq(1)));
        assert_eq!(l.push_event(b"event: x\ndata: b\n"), Some(Seq(2)));
        let c = l.collect_after(Seq(0), 1 << 20);
        let text = String::from_utf8(c.chunk.unwrap().to_vec()).unwrap();
        let id1 = format!("{}.00000007.0000000001", l.id);
        assert!(text.starts_with(&format!("id: {id1}\ndata: a\n\nid: ")), "{text}");
        assert_eq!(c.last, Seq(2));
        assert!(!c.ended);
        let entries = l.entries_after(Seq(1), 10);
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].body, EntryBody::Event(Bytes::from_static(b"event: x\ndata: b\n")));
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
}
