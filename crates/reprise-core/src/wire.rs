//! Wire bytes: how one entry of a stream becomes the bytes a client reads,
//! with its id. The last step before the network: the relay's producer
//! (and a log filled from the store) encodes every event here once, and all
//! readers send those same bytes.
//!
//! ```text
//! SSE event      id: <stream>.<epoch>.<seq>\n<fields>\n     (fields end in \n: a blank line closes the event)
//! NDJSON line    <line>\n                                   (no id: NDJSON has nowhere to carry one)
//! signal         an event (SSE, in the stream's dialect) or an {"error": ...} line (NDJSON)
//! ```
//!
//! The payload the store keeps is the part between the id line and the
//! final newline (see [`Span::fields`]): fields as `sse::encode_fields`
//! writes them, or the NDJSON line as sent. Ids are spelled by
//! [`crate::ids`]; the signals' JSON bodies by [`crate::outcome`] and
//! [`crate::dialect`].
//!
//! Pure and allocation-free per event: frames are appended to a buffer
//! the caller owns (one per upstream read on the producer's path), and the
//! payload is written in place by the caller (see
//! [`WireEncoder::event_with`]), never copied.

use std::fmt;
use std::ops::Range;

use bytes::{BufMut, Bytes, BytesMut};

use crate::dialect::{signal_event, Dialect};
use crate::format::Format;
use crate::ids::{Cursor, Epoch, EventId, IdPrefix, Seq, StreamId};
use crate::outcome::{signal_line, Signal};

/// Where one event's frame sits in the buffer it was encoded into:
/// `buf[start..end]` is its wire frame and `buf[fields]` the payload the
/// store keeps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Span {
    pub start: usize,
    pub fields: Range<usize>,
    pub end: usize,
}

/// Encodes the frames of one stream (one incarnation: the epoch is part of
/// every id). Cheap to copy: the constant part of the ids is encoded once,
/// here, so that each event costs only its seq's digits.
#[derive(Clone, Copy, Debug)]
pub struct WireEncoder {
    stream: StreamId,
    epoch: Epoch,
    /// `<stream>.<epoch>.`, the part of every event id that never changes.
    prefix: IdPrefix,
    format: Format,
}

impl WireEncoder {
    pub fn new(stream: StreamId, epoch: Epoch, format: Format) -> WireEncoder {
        WireEncoder {
            stream,
            epoch,
            prefix: IdPrefix::new(stream, epoch),
            format,
        }
    }

    pub fn format(&self) -> Format {
        self.format
    }

    /// Appends the frame of event `seq` with payload `payload` to `out`.
    #[inline]
    pub fn event(&self, seq: Seq, payload: &[u8], out: &mut BytesMut) -> Span {
        let start = out.len();
        self.put_id_line(seq, out);
        let fields = out.len();
        out.put_slice(payload);
        self.close(start, fields, out)
    }

    /// Appends the frame of event `seq` to `out`, its payload written in
    /// place by `payload` (so that it is never copied). `payload` returns
    /// false when it had no event to write, or an error; either way `out`
    /// is left as it was and no frame is appended.
    #[inline]
    pub fn event_with<E>(
        &self,
        seq: Seq,
        out: &mut BytesMut,
        payload: impl FnOnce(&mut BytesMut) -> Result<bool, E>,
    ) -> Result<Option<Span>, E> {
        let start = out.len();
        self.put_id_line(seq, out);
        let fields = out.len();
        match payload(out) {
            Ok(true) => Ok(Some(self.close(start, fields, out))),
            other => {
                out.truncate(start);
                other.map(|_| None)
            }
        }
    }

    /// SSE: `id: <id>\n`; NDJSON: nothing.
    #[inline]
    fn put_id_line(&self, seq: Seq, out: &mut BytesMut) {
        if self.format == Format::Sse {
            out.put_slice(b"id: ");
            self.prefix.put(seq, out);
            out.put_u8(b'\n');
        }
    }

    /// Ends the frame whose payload started at `fields`: SSE fields each end
    /// in a newline, so this one is the blank line that dispatches the
    /// event; on NDJSON it ends the line.
    #[inline]
    fn close(&self, start: usize, fields: usize, out: &mut BytesMut) -> Span {
        let fields = fields..out.len();
        out.put_u8(b'\n');
        Span {
            start,
            fields,
            end: out.len(),
        }
    }

    /// The id of event `seq` of this stream.
    pub fn event_id(&self, seq: Seq) -> EventId {
        EventId {
            stream: self.stream,
            epoch: self.epoch,
            seq,
        }
    }

    /// The complete frame of a signal (a failure, a cancel, lost history).
    /// SSE: one event in the dialect `dialect()` returns (asked only for
    /// SSE), whose id is `at`: the position a reconnecting client sends
    /// back. NDJSON: Ollama's `{"error": ...}` line whatever the dialect,
    /// since its clients raise on that and would break on any other line.
    pub fn signal(
        &self,
        dialect: impl FnOnce() -> Dialect,
        signal: Signal<'_>,
        at: Cursor,
    ) -> Bytes {
        match self.format {
            Format::Sse => Bytes::from(sse_signal(dialect(), signal, self.stream, &at)),
            Format::Ndjson => {
                let mut line = signal_line(signal, self.stream);
                line.push('\n');
                Bytes::from(line)
            }
        }
    }
}

/// The complete SSE frame of a signal in `dialect`: one event, one `data:`
/// line (see [`signal_event`]), whose id is `id`: the position a
/// reconnecting client sends back, the terminal entry's event id or
/// `<stream>.end`, both answered `204`. For a signal outside any stream's
/// log too (a resume that finds no history).
pub fn sse_signal(
    dialect: Dialect,
    signal: Signal<'_>,
    stream: StreamId,
    id: &dyn fmt::Display,
) -> String {
    let (event, data) = signal_event(dialect, signal, stream);
    match event {
        Some(name) => format!("id: {id}\nevent: {name}\ndata: {data}\n\n"),
        None => format!("id: {id}\ndata: {data}\n\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcome::{FailReason, Outcome};

    fn stream() -> StreamId {
        "AAAAAAAAAAAAAAAAAAAAAA".parse().unwrap()
    }

    #[test]
    fn sse_event_is_id_line_fields_and_blank_line() {
        let enc = WireEncoder::new(stream(), Epoch(0x1f3a9c07), Format::Sse);
        let mut out = BytesMut::new();
        let span = enc.event(Seq(42), b"data: hi\n", &mut out);
        assert_eq!(
            &out[..],
            b"id: AAAAAAAAAAAAAAAAAAAAAA.1f3a9c07.0000000042\ndata: hi\n\n"
        );
        assert_eq!(&out[span.fields.clone()], b"data: hi\n");
        assert_eq!((span.start, span.end), (0, out.len()));
    }

    #[test]
    fn ndjson_event_is_the_line_and_a_newline() {
        let enc = WireEncoder::new(stream(), Epoch(7), Format::Ndjson);
        let mut out = BytesMut::new();
        let span = enc.event(Seq(1), br#"{"done":false}"#, &mut out);
        assert_eq!(&out[..], b"{\"done\":false}\n");
        assert_eq!(
            span,
            Span {
                start: 0,
                fields: 0..14,
                end: 15
            }
        );
    }

    #[test]
    fn events_share_one_buffer_and_spans_point_into_it() {
        let id = StreamId::random();
        let epoch = Epoch::random();
        let enc = WireEncoder::new(id, epoch, Format::Sse);
        let mut out = BytesMut::new();
        let payloads: [&[u8]; 3] = [b"data: a\n", b"event: x\ndata: b\n", b"data: \n"];
        let spans: Vec<Span> = payloads
            .iter()
            .enumerate()
            .map(|(i, p)| enc.event(Seq(i as u64 + 9), p, &mut out))
            .collect();
        assert_eq!(spans[0].start, 0);
        for (i, (span, payload)) in spans.iter().zip(payloads).enumerate() {
            let seq = Seq(i as u64 + 9);
            assert_eq!(&out[span.fields.clone()], payload);
            let frame = std::str::from_utf8(&out[span.start..span.end]).unwrap();
            let expected = format!("id: {}\n", enc.event_id(seq));
            assert_eq!(
                expected,
                format!("id: {id}.{:08x}.{:010}\n", epoch.0, seq.0)
            );
            assert_eq!(
                frame,
                format!("{expected}{}\n", std::str::from_utf8(payload).unwrap())
            );
            if let Some(next) = spans.get(i + 1) {
                assert_eq!(span.end, next.start, "frames are contiguous");
            }
        }
        assert_eq!(spans[2].end, out.len());
        // Each id reads back as the position it names.
        let first = &out[spans[0].start + 4..spans[0].fields.start - 1];
        assert_eq!(
            Cursor::parse(std::str::from_utf8(first).unwrap()).unwrap(),
            Cursor::At(enc.event_id(Seq(9)))
        );
    }

    #[test]
    fn event_with_writes_in_place_and_leaves_nothing_without_an_event() {
        let enc = WireEncoder::new(stream(), Epoch(7), Format::Sse);
        let mut out = BytesMut::from(&b"before"[..]);
        let span = enc
            .event_with(Seq(1), &mut out, |o| {
                o.put_slice(b"data: x\n");
                Ok::<_, ()>(true)
            })
            .unwrap()
            .unwrap();
        assert_eq!(span.start, 6);
        assert_eq!(&out[span.fields.clone()], b"data: x\n");
        assert_eq!(span.end, out.len());
        let len = out.len();
        // No event: whatever was written is taken back.
        let none = enc.event_with(Seq(2), &mut out, |o| {
            o.put_slice(b"partial");
            Ok::<_, ()>(false)
        });
        assert_eq!(none, Ok(None));
        assert_eq!(out.len(), len);
        let err = enc.event_with(Seq(2), &mut out, |o| {
            o.put_slice(b"partial");
            Err("bad")
        });
        assert_eq!(err, Err("bad"));
        assert_eq!(out.len(), len);
    }

    #[test]
    fn large_seqs_widen_the_id() {
        let enc = WireEncoder::new(stream(), Epoch(1), Format::Sse);
        let mut out = BytesMut::new();
        enc.event(Seq(12_345_678_901), b"data: x\n", &mut out);
        assert!(out.starts_with(b"id: AAAAAAAAAAAAAAAAAAAAAA.00000001.12345678901\n"));
    }

    #[test]
    fn signals_follow_the_format_and_the_dialect() {
        let s = stream();
        let o = Outcome::Failed {
            reason: FailReason::UpstreamReset,
            message: "reset".into(),
        };
        let sig = o.signal().unwrap();
        let sse = WireEncoder::new(s, Epoch(7), Format::Sse);
        let at = Cursor::At(sse.event_id(Seq(3)));
        let frame = sse.signal(|| Dialect::Anthropic, sig, at);
        assert_eq!(
            &frame[..],
            sse_signal(Dialect::Anthropic, sig, s, &at).as_bytes()
        );
        assert!(
            frame.starts_with(b"id: AAAAAAAAAAAAAAAAAAAAAA.00000007.0000000003\nevent: error\n")
        );
        let end = sse.signal(|| Dialect::Reprise, sig, Cursor::End(s));
        assert!(end.starts_with(b"id: AAAAAAAAAAAAAAAAAAAAAA.end\nevent: reprise-error\n"));
        // NDJSON: never asks for a dialect, and has no id.
        let nd = WireEncoder::new(s, Epoch(7), Format::Ndjson);
        let line = nd.signal(|| unreachable!(), sig, Cursor::End(s));
        assert_eq!(&line[..], format!("{}\n", signal_line(sig, s)).as_bytes());
        assert!(line.ends_with(b"\n") && !line.starts_with(b"id:"));
    }
}
