//! Server-Sent Events framing: the incremental parser that turns upstream
//! bytes into events, and the encoder that writes them back out.
//!
//! Sits at both ends of the relay's data path: the upstream body is pushed
//! into a [`Parser`] chunk by chunk, and every stored event is written back to
//! readers with [`encode_fields`] ([`crate::wire`] adds the `id:` line and
//! the blank line that terminates the event).
//!
//! The parser follows the HTML Living Standard, "Interpreting an event
//! stream" (§9.2.6), on raw bytes: nothing is decoded, so bytes that are not
//! UTF-8 pass through untouched. Two deliberate differences, both because
//! Reprise forwards events instead of consuming them:
//!
//! - `id` fields are ignored: Reprise gives every event its own id.
//! - a block with a valid `retry` but no `data` still yields an [`Event`]
//!   (with `data: None`), so the reconnection time reaches the readers.
//! - a valid `retry` in a block that is never dispatched (the body ends, or
//!   fails, inside it) is kept: [`Parser::take_retry`] hands it out. A
//!   browser sets its reconnection time as soon as it reads the line, dispatch
//!   or not, so the relay forwards it as a `retry`-only event.
//!
//! Lines that lie within one pushed chunk are sliced out of it without
//! copying; only a line that straddles chunks is copied into a small buffer,
//! which [`Limits::max_line`] bounds.

use std::collections::VecDeque;
use std::fmt::Write as _;

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// The UTF-8 byte order mark, skipped once at the very start of a stream.
const BOM: &[u8; 3] = b"\xEF\xBB\xBF";

/// One dispatched event, as the HTML standard's EventSource parser would see it.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Event {
    /// The `event:` field's last value, if the block had one (may be empty).
    pub event: Option<Bytes>,
    /// The data buffer without its final LF; `None` when the block had no `data` field.
    pub data: Option<Bytes>,
    /// The last valid `retry:` value (all ASCII digits) in the block.
    pub retry: Option<u64>,
}

/// Limits that keep the parser's memory bounded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Longest line (bytes, line terminator excluded).
    pub max_line: usize,
    /// Largest event: bytes of the data buffer (each `data` value plus one LF,
    /// as the standard builds it) and of the event type together.
    pub max_event: usize,
}

impl Default for Limits {
    /// 1 MiB lines, 4 MiB events: far above any LLM token chunk, small enough
    /// that a broken upstream cannot exhaust memory.
    fn default() -> Self {
        Limits {
            max_line: 1 << 20,
            max_event: 4 << 20,
        }
    }
}

/// Input the parser refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("line longer than {limit} bytes")]
    LineTooLong { limit: usize },
    #[error("event larger than {limit} bytes")]
    EventTooLarge { limit: usize },
}

/// The data buffer of the event being assembled.
///
/// Most events carry a single `data` line: that line is kept as a zero-copy
/// slice of the input and only copied once a second line arrives.
#[derive(Debug, Default)]
enum DataBuf {
    #[default]
    Empty,
    One(Bytes),
    /// Values joined by LF (the standard's trailing LF is never appended).
    Many(BytesMut),
}

/// Incremental parser: [`push`](Parser::push) chunks, then call
/// [`next_event`](Parser::next_event) until it returns `Ok(None)`.
///
/// Events, errors and [`finish`](Parser::finish)'s answer do not depend on
/// how the input was split into chunks.
#[derive(Debug)]
pub struct Parser {
    limits: Limits,
    /// Pushed chunks not scanned yet (the front one may be partly consumed).
    queue: VecDeque<Bytes>,
    /// Start of a line whose end has not arrived yet (straddles chunks).
    line: BytesMut,
    /// BOM bytes matched so far at the start of the stream.
    bom_matched: usize,
    /// Set once the stream's first bytes were checked for a BOM.
    bom_done: bool,
    /// The previous line ended with CR: an LF right after it belongs to it.
    after_cr: bool,
    /// Set on the first error; the parser then keeps returning it.
    failed: Option<ParseError>,
    // The event being assembled.
    data: DataBuf,
    /// Size of the data buffer as the standard builds it (values + LFs).
    data_len: usize,
    event_type: Option<Bytes>,
    retry: Option<u64>,
}

impl Parser {
    pub fn new(limits: Limits) -> Self {
        Parser {
            limits,
            queue: VecDeque::new(),
            line: BytesMut::new(),
            bom_matched: 0,
            bom_done: false,
            after_cr: false,
            failed: None,
            data: DataBuf::Empty,
            data_len: 0,
            event_type: None,
            retry: None,
        }
    }

    /// The limits this parser enforces.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Feed the next chunk of the body.
    pub fn push(&mut self, chunk: Bytes) {
        if !chunk.is_empty() {
            self.queue.push_back(chunk);
        }
    }

    /// Bytes of an incomplete line the parser has copied and holds; never
    /// more than [`Limits::max_line`]. Pushed chunks waiting to be scanned
    /// are not counted: [`next_event`](Parser::next_event) drains them. Nor
    /// is the start of a possible BOM (at most two bytes, kept as a count).
    pub fn buffered_len(&self) -> usize {
        self.line.len()
    }

    /// Size of the event being assembled, as [`Limits::max_event`] counts it;
    /// never more than that limit.
    pub fn event_len(&self) -> usize {
        self.data_len + self.event_type_len()
    }

    fn event_type_len(&self) -> usize {
        self.event_type.as_ref().map_or(0, Bytes::len)
    }

    /// Bytes pushed but not scanned yet.
    pub fn queued_len(&self) -> usize {
        self.queue.iter().map(Bytes::len).sum()
    }

    /// The next complete event from the bytes pushed so far.
    ///
    /// After an error the parser stays failed and returns the same error.
    pub fn next_event(&mut self) -> Result<Option<Event>, ParseError> {
        if let Some(err) = &self.failed {
            return Err(err.clone());
        }
        match self.scan() {
            Ok(event) => Ok(event),
            Err(err) => {
                // Drop everything held: the caller stops at the first error.
                // Except a `retry` read before it: a browser has applied it
                // already (see `take_retry`).
                let (limits, retry) = (self.limits, self.retry);
                *self = Parser::new(limits);
                self.failed = Some(err.clone());
                self.retry = retry;
                Err(err)
            }
        }
    }

    /// The last valid `retry` of the block being assembled, which no event
    /// will carry if the input stops here; taken, so that
    /// [`finish`](Parser::finish) does not count it as discarded.
    ///
    /// For a caller whose input ends (or fails) before the block's blank
    /// line: a browser sets the reconnection time as soon as it reads a
    /// `retry` line, whether or not the block is ever dispatched. Call
    /// [`next_event`](Parser::next_event) until it returns `Ok(None)` (or an
    /// error) first: a `retry` in a chunk not scanned yet is not seen.
    pub fn take_retry(&mut self) -> Option<u64> {
        self.retry.take()
    }

    /// End of input: returns true if an incomplete event was discarded.
    ///
    /// As the standard says, a line without terminator and fields without a
    /// blank line after them are dropped (a `retry` among them included:
    /// [`take_retry`](Parser::take_retry) first to keep it). Call [`next_event`](Parser::next_event)
    /// until it returns `Ok(None)` first: chunks not scanned yet count as
    /// discarded too. The parser is then reset, ready for a new stream.
    pub fn finish(&mut self) -> bool {
        let partial_bom = !self.bom_done && self.bom_matched > 0;
        let discarded = partial_bom
            || self.buffered_len() > 0
            || self.queued_len() > 0
            || self.event_len() > 0
            || self.retry.is_some()
            || self.event_type.is_some();
        *self = Parser::new(self.limits);
        discarded
    }

    /// Consume queued input up to and including the next dispatched event.
    fn scan(&mut self) -> Result<Option<Event>, ParseError> {
        while let Some(line) = self.next_line()? {
            if let Some(event) = self.process_line(line)? {
                return Ok(Some(event));
            }
        }
        Ok(None)
    }

    /// The next complete line (terminator removed), or `None` when the queued
    /// input ends in the middle of one (kept in `self.line`).
    fn next_line(&mut self) -> Result<Option<Bytes>, ParseError> {
        let max_line = self.limits.max_line;
        loop {
            let Some(chunk) = self.queue.front_mut() else {
                return Ok(None);
            };
            if chunk.is_empty() {
                self.queue.pop_front();
                continue;
            }
            if !self.bom_done {
                // Match the BOM byte by byte: it may be split across chunks.
                if chunk[0] == BOM[self.bom_matched] {
                    chunk.advance(1);
                    self.bom_matched += 1;
                    self.bom_done = self.bom_matched == BOM.len();
                    continue;
                }
                // Not a BOM after all: the bytes matched so far start the first line.
                self.bom_done = true;
                self.line.extend_from_slice(&BOM[..self.bom_matched]);
                if self.line.len() > max_line {
                    return Err(ParseError::LineTooLong { limit: max_line });
                }
            }
            if self.after_cr {
                self.after_cr = false;
                if chunk[0] == b'\n' {
                    chunk.advance(1);
                    continue;
                }
            }
            // Search no further than the limit allows, so an endless line
            // costs neither memory nor a scan of the whole chunk.
            let room = max_line.saturating_sub(self.line.len());
            let window = chunk.len().min(room.saturating_add(1));
            match memchr::memchr2(b'\n', b'\r', &chunk[..window]) {
                Some(end) => {
                    self.after_cr = chunk[end] == b'\r';
                    let line = if self.line.is_empty() {
                        chunk.split_to(end)
                    } else {
                        self.line.extend_from_slice(&chunk[..end]);
                        chunk.advance(end);
                        self.line.split().freeze()
                    };
                    chunk.advance(1);
                    return Ok(Some(line));
                }
                None if chunk.len() > room => {
                    return Err(ParseError::LineTooLong { limit: max_line });
                }
                None => {
                    self.line.extend_from_slice(chunk);
                    self.queue.pop_front();
                }
            }
        }
    }

    /// Apply one line to the event being assembled; a blank line dispatches it.
    fn process_line(&mut self, line: Bytes) -> Result<Option<Event>, ParseError> {
        if line.is_empty() {
            return Ok(self.dispatch());
        }
        let (name_end, value_start) = match memchr::memchr(b':', &line) {
            // A comment.
            Some(0) => return Ok(None),
            Some(colon) if line.get(colon + 1) == Some(&b' ') => (colon, colon + 2),
            Some(colon) => (colon, colon + 1),
            None => (line.len(), line.len()),
        };
        match &line[..name_end] {
            b"data" => {
                let value = line.slice(value_start..);
                // The standard appends value + LF to the buffer.
                let data_len = self.data_len + value.len() + 1;
                self.check_event_size(data_len, self.event_type_len())?;
                self.data_len = data_len;
                self.data = match std::mem::take(&mut self.data) {
                    DataBuf::Empty => DataBuf::One(value),
                    DataBuf::One(first) => {
                        let mut joined = BytesMut::with_capacity(first.len() + 1 + value.len());
                        joined.extend_from_slice(&first);
                        joined.put_u8(b'\n');
                        joined.extend_from_slice(&value);
                        DataBuf::Many(joined)
                    }
                    DataBuf::Many(mut joined) => {
                        joined.put_u8(b'\n');
                        joined.extend_from_slice(&value);
                        DataBuf::Many(joined)
                    }
                };
            }
            b"event" => {
                let value = line.slice(value_start..);
                self.check_event_size(self.data_len, value.len())?;
                self.event_type = Some(value);
            }
            b"retry" => {
                if let Some(retry) = parse_retry(&line[value_start..]) {
                    self.retry = Some(retry);
                }
            }
            // `id` included: Reprise replaces ids, so upstream ones are dropped.
            _ => {}
        }
        Ok(None)
    }

    /// Checked before a field is stored, so the event never outgrows the limit.
    fn check_event_size(&self, data_len: usize, event_type_len: usize) -> Result<(), ParseError> {
        if data_len + event_type_len > self.limits.max_event {
            return Err(ParseError::EventTooLarge {
                limit: self.limits.max_event,
            });
        }
        Ok(())
    }

    /// Blank line: hand out the assembled event (if it carries data or a
    /// retry) and reset the buffers.
    fn dispatch(&mut self) -> Option<Event> {
        let data = match std::mem::take(&mut self.data) {
            DataBuf::Empty => None,
            DataBuf::One(data) => Some(data),
            DataBuf::Many(data) => Some(data.freeze()),
        };
        self.data_len = 0;
        let event = self.event_type.take();
        let retry = self.retry.take();
        if data.is_none() && retry.is_none() {
            return None;
        }
        Some(Event { event, data, retry })
    }
}

/// A `retry` value: ASCII digits only, fitting in a u64; anything else
/// (including an empty value) is ignored.
fn parse_retry(value: &[u8]) -> Option<u64> {
    if value.is_empty() {
        return None;
    }
    value.iter().try_fold(0u64, |acc, &b| {
        if !b.is_ascii_digit() {
            return None;
        }
        acc.checked_mul(10)?.checked_add(u64::from(b - b'0'))
    })
}

/// Append the fields of `event` (no `id:` line, no blank terminator line).
///
/// Parsing the output followed by a blank line gives back `event`, except
/// that an empty event type is not written: for EventSource an empty type
/// and no type both mean "message". The event type must not contain CR or
/// LF and the data must not contain CR (LF separates `data` lines); events
/// that came out of [`Parser`] never do.
pub fn encode_fields(event: &Event, out: &mut BytesMut) {
    let event_type = event.event.as_ref().filter(|t| !t.is_empty());
    // Reserve once: the fixed overhead per line is at most 8 bytes.
    let lines = event
        .data
        .as_ref()
        .map_or(0, |d| memchr::memchr_iter(b'\n', d).count() + 1);
    out.reserve(
        event_type.map_or(0, |t| t.len() + 8)
            + event.data.as_ref().map_or(0, Bytes::len)
            + lines * 7
            + event.retry.map_or(0, |_| 28),
    );
    if let Some(event_type) = event_type {
        out.extend_from_slice(b"event: ");
        out.extend_from_slice(event_type);
        out.put_u8(b'\n');
    }
    if let Some(data) = &event.data {
        for line in data.split(|&b| b == b'\n') {
            out.extend_from_slice(b"data: ");
            out.extend_from_slice(line);
            out.put_u8(b'\n');
        }
    }
    if let Some(retry) = event.retry {
        // Writing into a BytesMut cannot fail.
        let _ = writeln!(out, "retry: {retry}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Everything the parser produced for `chunks`: the events, the error
    /// that stopped it if any, the `retry` of a block left undispatched
    /// (`take_retry()`), and `finish()`'s answer (`None` after an error).
    #[derive(Debug, PartialEq, Eq)]
    struct Outcome {
        events: Vec<Event>,
        error: Option<ParseError>,
        trailing_retry: Option<u64>,
        discarded: Option<bool>,
    }

    fn run<'a>(limits: Limits, chunks: impl IntoIterator<Item = &'a [u8]>) -> Outcome {
        let mut parser = Parser::new(limits);
        let mut events = Vec::new();
        for chunk in chunks {
            parser.push(Bytes::copy_from_slice(chunk));
            loop {
                let next = parser.next_event();
                assert!(parser.buffered_len() <= limits.max_line);
                assert!(parser.event_len() <= limits.max_event);
                match next {
                    Ok(Some(event)) => events.push(event),
                    Ok(None) => break,
                    Err(error) => {
                        return Outcome {
                            events,
                            error: Some(error),
                            trailing_retry: parser.take_retry(),
                            discarded: None,
                        }
                    }
                }
            }
        }
        Outcome {
            events,
            error: None,
            trailing_retry: parser.take_retry(),
            discarded: Some(parser.finish()),
        }
    }

    fn parse(input: &[u8]) -> Vec<Event> {
        let outcome = run(Limits::default(), [input]);
        assert_eq!(outcome.error, None);
        outcome.events
    }

    fn data(d: &str) -> Event {
        Event {
            data: Some(Bytes::copy_from_slice(d.as_bytes())),
            ..Event::default()
        }
    }

    fn typed(t: &str, d: &str) -> Event {
        Event {
            event: Some(Bytes::copy_from_slice(t.as_bytes())),
            ..data(d)
        }
    }

    fn retry(r: u64) -> Event {
        Event {
            retry: Some(r),
            ..Event::default()
        }
    }

    #[test]
    fn line_endings() {
        let expected = vec![data("a"), data("b")];
        assert_eq!(parse(b"data: a\n\ndata: b\n\n"), expected);
        assert_eq!(parse(b"data: a\r\rdata: b\r\r"), expected);
        assert_eq!(parse(b"data: a\r\n\r\ndata: b\r\n\r\n"), expected);
        assert_eq!(parse(b"data: a\r\n\ndata: b\n\r\n"), expected);
        // CR LF is one terminator, LF CR is two.
        assert_eq!(parse(b"data: a\r\ndata: b\n\r"), vec![data("a\nb")]);
    }

    #[test]
    fn crlf_split_across_chunks() {
        let outcome = run(
            Limits::default(),
            [&b"data: a\r"[..], b"\ndata: b\r", b"\n\r", b"\n"],
        );
        assert_eq!(outcome.events, vec![data("a\nb")]);
        assert_eq!(outcome.discarded, Some(false));
    }

    #[test]
    fn cr_at_chunk_end_then_other_byte() {
        // The CR ends the line on its own; "data: b" is the next line.
        let outcome = run(Limits::default(), [&b"data: a\r"[..], b"data: b\r", b"\r"]);
        assert_eq!(outcome.events, vec![data("a\nb")]);
        // A lone CR at the end of a chunk dispatches without waiting.
        let mut parser = Parser::new(Limits::default());
        parser.push(Bytes::from_static(b"data: a\r\r"));
        assert_eq!(parser.next_event(), Ok(Some(data("a"))));
        assert!(!parser.finish());
    }

    #[test]
    fn empty_chunks_keep_pending_cr() {
        let outcome = run(
            Limits::default(),
            [&b"data: a\r"[..], b"", b"\n", b"", b"\n"],
        );
        assert_eq!(outcome.events, vec![data("a")]);
    }

    #[test]
    fn multi_line_data() {
        assert_eq!(
            parse(b"data: a\ndata: b\ndata:\ndata: c\n\n"),
            vec![data("a\nb\n\nc")]
        );
    }

    #[test]
    fn data_without_colon_and_empty_data() {
        assert_eq!(parse(b"data\n\n"), vec![data("")]);
        assert_eq!(parse(b"data:\n\n"), vec![data("")]);
        assert_eq!(parse(b"data: \n\n"), vec![data("")]);
        assert_eq!(parse(b"data\ndata\n\n"), vec![data("\n")]);
    }

    #[test]
    fn only_one_leading_space_removed() {
        assert_eq!(parse(b"data:a\n\n"), vec![data("a")]);
        assert_eq!(parse(b"data:  a \n\n"), vec![data(" a ")]);
        assert_eq!(parse(b"data:\ta\n\n"), vec![data("\ta")]);
        assert_eq!(parse(b"data: a: b\n\n"), vec![data("a: b")]);
    }

    #[test]
    fn comments_ignored() {
        assert_eq!(parse(b": keep-alive\n\n"), vec![]);
        assert_eq!(parse(b":\ndata: a\n: mid\ndata: b\n\n"), vec![data("a\nb")]);
    }

    #[test]
    fn field_names_are_exact() {
        assert_eq!(parse(b"Data: a\n data: b\ndata : c\ndatas: d\n\n"), vec![]);
        assert_eq!(parse(b"foo: bar\ndata: a\n\n"), vec![data("a")]);
    }

    #[test]
    fn bom_skipped_at_start() {
        assert_eq!(parse(b"\xEF\xBB\xBFdata: a\n\n"), vec![data("a")]);
        let split = run(
            Limits::default(),
            [&b"\xEF"[..], b"\xBB", b"\xBFdata: a\n\n"],
        );
        assert_eq!(split.events, vec![data("a")]);
        let split = run(Limits::default(), [&b"\xEF\xBB"[..], b"\xBFdata: a\n\n"]);
        assert_eq!(split.events, vec![data("a")]);
    }

    #[test]
    fn bom_only_once_and_only_at_start() {
        // A second BOM is part of the first line: the field name is no longer "data".
        assert_eq!(parse(b"\xEF\xBB\xBF\xEF\xBB\xBFdata: a\n\n"), vec![]);
        // A BOM in a value is kept.
        assert_eq!(parse(b"data: \xEF\xBB\xBFa\n\n"), vec![data("\u{FEFF}a")]);
        // After the first line, a line starting with a BOM is not "data".
        assert_eq!(parse(b"\n\xEF\xBB\xBFdata: a\n\n"), vec![]);
    }

    #[test]
    fn partial_bom_is_line_content() {
        // EF BB then 'd': not a BOM, and those bytes begin the first line.
        let outcome = run(
            Limits::default(),
            [&b"\xEF\xBB"[..], b"data: a\n\ndata: b\n\n"],
        );
        assert_eq!(outcome.events, vec![data("b")]);
        assert_eq!(parse(b"\xEFdata: a\n\n"), vec![]);
        // A partial BOM alone is a discarded incomplete line.
        let mut parser = Parser::new(Limits::default());
        parser.push(Bytes::from_static(b"\xEF\xBB"));
        assert_eq!(parser.next_event(), Ok(None));
        assert_eq!(parser.buffered_len(), 0, "a possible BOM is not buffered");
        assert!(parser.finish());
        // With limits too small for it, a partial BOM that turns out to be
        // line content fails like any other long line.
        let tiny = Limits {
            max_line: 1,
            max_event: 10,
        };
        let outcome = run(tiny, [&b"\xEF"[..], b"\xBB", b"\n"]);
        assert_eq!(outcome.error, Some(ParseError::LineTooLong { limit: 1 }));
        assert_eq!(
            run(tiny, [&b"\xEF\xBB\xBF"[..], b"\n"]).discarded,
            Some(false)
        );
    }

    #[test]
    fn event_names() {
        assert_eq!(
            parse(b"event: delta\ndata: a\n\n"),
            vec![typed("delta", "a")]
        );
        assert_eq!(
            parse(b"event: x\nevent: y\ndata: a\n\n"),
            vec![typed("y", "a")]
        );
        assert_eq!(parse(b"event\ndata: a\n\n"), vec![typed("", "a")]);
        // The event type does not leak into the next block.
        assert_eq!(
            parse(b"event: x\ndata: a\n\ndata: b\n\n"),
            vec![typed("x", "a"), data("b")]
        );
    }

    #[test]
    fn retry_valid() {
        assert_eq!(parse(b"retry: 3000\n\n"), vec![retry(3000)]);
        assert_eq!(parse(b"retry:0\n\n"), vec![retry(0)]);
        assert_eq!(parse(b"retry: 1\nretry: 2\n\n"), vec![retry(2)]);
        assert_eq!(
            parse(b"retry: 18446744073709551615\n\n"),
            vec![retry(u64::MAX)]
        );
        assert_eq!(
            parse(b"retry: 000000000000000000000000007\n\n"),
            vec![retry(7)]
        );
        let event = Event {
            retry: Some(5),
            ..typed("e", "a")
        };
        assert_eq!(parse(b"event: e\nretry: 5\ndata: a\n\n"), vec![event]);
    }

    #[test]
    fn retry_of_an_undispatched_block_is_kept() {
        // The body ends inside a block: a browser has applied the retry.
        let outcome = run(Limits::default(), [&b"data: a\n\nretry: 500\n"[..]]);
        assert_eq!(outcome.events, vec![data("a")]);
        assert_eq!(outcome.trailing_retry, Some(500));
        assert_eq!(outcome.discarded, Some(false), "nothing else was left");
        // ... with other fields that are lost.
        let outcome = run(Limits::default(), [&b"retry: 1\ndata: x\nretry: 2\n"[..]]);
        assert_eq!(outcome.events, vec![]);
        assert_eq!(outcome.trailing_retry, Some(2));
        assert_eq!(outcome.discarded, Some(true));
        // A line without its line end is not read yet; an invalid value
        // does not count.
        for input in [&b"retry: 500"[..], b"retry: x\n", b"data: a\n\n"] {
            assert_eq!(run(Limits::default(), [input]).trailing_retry, None);
        }
        // Read before a later line broke a limit: still there.
        let limits = Limits {
            max_line: 12,
            max_event: 100,
        };
        let outcome = run(limits, [&b"retry: 500\ndata: far too long\n\n"[..]]);
        assert_eq!(outcome.error, Some(ParseError::LineTooLong { limit: 12 }));
        assert_eq!(outcome.trailing_retry, Some(500));
        // Taken once; `finish` then no longer counts it.
        let mut parser = Parser::new(Limits::default());
        parser.push(Bytes::from_static(b"retry: 7\n"));
        assert_eq!(parser.next_event(), Ok(None));
        assert_eq!(parser.take_retry(), Some(7));
        assert_eq!(parser.take_retry(), None);
        assert!(!parser.finish());
    }

    #[test]
    fn retry_invalid_ignored() {
        for line in [
            &b"retry: 1.5"[..],
            b"retry: -1",
            b"retry: +1",
            b"retry:  1",
            b"retry: 1 ",
            b"retry: 1a",
            b"retry:",
            b"retry",
            b"retry: \xFF",
        ] {
            let mut input = line.to_vec();
            input.extend_from_slice(b"\n\n");
            assert_eq!(parse(&input), vec![], "{line:?}");
        }
        // An invalid value does not erase a valid one.
        assert_eq!(parse(b"retry: 10\nretry: x\n\n"), vec![retry(10)]);
    }

    #[test]
    fn retry_overflow_ignored() {
        assert_eq!(parse(b"retry: 18446744073709551616\n\n"), vec![]);
        assert_eq!(parse(b"retry: 99999999999999999999999\n\n"), vec![]);
        assert_eq!(
            parse(b"retry: 4\nretry: 99999999999999999999999\n\n"),
            vec![retry(4)]
        );
    }

    #[test]
    fn id_ignored() {
        assert_eq!(parse(b"id: 7\ndata: a\n\n"), vec![data("a")]);
        assert_eq!(parse(b"id: 7\n\n"), vec![]);
        assert_eq!(parse(b"id\n\nid: \0x\ndata: a\n\n"), vec![data("a")]);
        let mut parser = Parser::new(Limits::default());
        parser.push(Bytes::from_static(b"id: 1\n"));
        assert_eq!(parser.next_event(), Ok(None));
        assert!(!parser.finish(), "an id alone buffers nothing");
    }

    #[test]
    fn blocks_without_data_or_retry_yield_nothing() {
        assert_eq!(parse(b"event: x\n\n"), vec![]);
        assert_eq!(parse(b"event: x\nid: 1\n: c\nfoo\n\n"), vec![]);
        assert_eq!(parse(b"\n\n\n"), vec![]);
        // ... and reset the event type.
        assert_eq!(parse(b"event: x\n\ndata: a\n\n"), vec![data("a")]);
    }

    #[test]
    fn finish_discards_incomplete() {
        let cases: [(&[u8], bool); 9] = [
            (b"", false),
            (b"data: a\n\n", false),
            (b"data: a", true),
            (b"data: a\n", true),
            (b"event: x\n", true),
            // `run` took the retry first (`take_retry`): nothing else is left.
            (b"retry: 1\n", false),
            (b"retry: 1\nevent: x\n", true),
            (b": comment\n", false),
            (b"data: a\n\n:", true),
        ];
        for (input, discarded) in cases {
            let outcome = run(Limits::default(), [input]);
            assert_eq!(outcome.discarded, Some(discarded), "{input:?}");
        }
        let outcome = run(Limits::default(), [&b"data: a\n\ndata: b\n"[..]]);
        assert_eq!(outcome.events, vec![data("a")]);
    }

    #[test]
    fn finish_resets() {
        let mut parser = Parser::new(Limits::default());
        parser.push(Bytes::from_static(b"\xEF\xBB\xBFdata: a\ndata"));
        assert_eq!(parser.next_event(), Ok(None));
        assert!(parser.finish());
        parser.push(Bytes::from_static(b"\xEF\xBB\xBFdata: b\n\n"));
        assert_eq!(parser.next_event(), Ok(Some(data("b"))));
    }

    #[test]
    fn non_utf8_passes_through() {
        let events = parse(b"event: \xFF\xFE\ndata: \xC3\x28\x80\ndata:\xF0\n\n");
        assert_eq!(
            events,
            vec![Event {
                event: Some(Bytes::from_static(b"\xFF\xFE")),
                data: Some(Bytes::from_static(b"\xC3\x28\x80\n\xF0")),
                retry: None,
            }]
        );
        assert_eq!(parse(b"d\xE1ta: a\n\n"), vec![]);
    }

    #[test]
    fn single_line_data_is_not_copied() {
        let input = Bytes::from_static(b"data: hello\n\n");
        let mut parser = Parser::new(Limits::default());
        parser.push(input.clone());
        let event = parser.next_event().ok().flatten().unwrap_or_default();
        let data = event.data.unwrap_or_default();
        assert_eq!(data, "hello");
        assert_eq!(data.as_ptr(), input[6..].as_ptr());
    }

    #[test]
    fn line_limit() {
        let limits = Limits {
            max_line: 8,
            max_event: 100,
        };
        assert_eq!(run(limits, [&b"data: ab\n\n"[..]]).events, vec![data("ab")]);
        let long = run(limits, [&b"data: abc\n\n"[..]]);
        assert_eq!(long.error, Some(ParseError::LineTooLong { limit: 8 }));
        // Unterminated: detected before the terminator arrives.
        let mut parser = Parser::new(limits);
        parser.push(Bytes::from_static(b"data: ab"));
        assert_eq!(parser.next_event(), Ok(None));
        parser.push(Bytes::from_static(b"c"));
        assert_eq!(
            parser.next_event(),
            Err(ParseError::LineTooLong { limit: 8 })
        );
        // The parser stays failed.
        parser.push(Bytes::from_static(b"\n\ndata: a\n\n"));
        assert_eq!(
            parser.next_event(),
            Err(ParseError::LineTooLong { limit: 8 })
        );
        assert_eq!(parser.buffered_len(), 0);
    }

    #[test]
    fn huge_line_without_newline_is_bounded() {
        const MAX_LINE: usize = 1 << 20;
        const CHUNK: usize = 64 << 10;
        let limits = Limits {
            max_line: MAX_LINE,
            max_event: 4 * MAX_LINE,
        };
        let chunk = Bytes::from(vec![b'x'; CHUNK]);
        let mut parser = Parser::new(limits);
        let mut fed = 0;
        let mut error = None;
        while fed < 10 << 20 {
            parser.push(chunk.clone());
            fed += CHUNK;
            match parser.next_event() {
                Ok(event) => assert_eq!(event, None),
                Err(err) => {
                    error = Some(err);
                    break;
                }
            }
            assert!(parser.buffered_len() <= MAX_LINE);
            assert!(parser.line.capacity() <= 2 * MAX_LINE);
        }
        assert_eq!(error, Some(ParseError::LineTooLong { limit: MAX_LINE }));
        assert_eq!(
            fed,
            MAX_LINE + CHUNK,
            "fails with the first chunk past the limit"
        );

        // The same line in a single chunk fails without copying anything.
        let mut parser = Parser::new(limits);
        parser.push(Bytes::from(vec![b'x'; 10 << 20]));
        assert_eq!(
            parser.next_event(),
            Err(ParseError::LineTooLong { limit: MAX_LINE })
        );
        assert_eq!(parser.line.capacity(), 0);
    }

    #[test]
    fn event_limit() {
        let limits = Limits {
            max_line: 100,
            max_event: 10,
        };
        // data buffer "a\nb\n" (4) + event type "evt" (3).
        assert_eq!(
            run(limits, [&b"event: evt\ndata: a\ndata: b\n\n"[..]]).events,
            vec![typed("evt", "a\nb")]
        );
        // "a\nb\ncd\n" (7) + "evt" (3) fits exactly; one more byte does not.
        let fits = run(limits, [&b"event: evt\ndata: a\ndata: b\ndata: cd\n\n"[..]]);
        assert_eq!(fits.events, vec![typed("evt", "a\nb\ncd")]);
        let big = run(
            limits,
            [&b"event: evt\ndata: a\ndata: b\ndata: cde\n\n"[..]],
        );
        assert_eq!(big.error, Some(ParseError::EventTooLarge { limit: 10 }));
        let big = run(limits, [&b"data: abcdefghij\n\n"[..]]);
        assert_eq!(big.error, Some(ParseError::EventTooLarge { limit: 10 }));
        // The size is per event: it resets at each blank line.
        let many = b"data: abcd\ndata: e\n\n".repeat(10);
        assert_eq!(run(limits, [&many[..]]).events.len(), 10);
    }

    #[test]
    fn encode() {
        let mut out = BytesMut::new();
        encode_fields(&data("a\nb"), &mut out);
        assert_eq!(&out[..], b"data: a\ndata: b\n");

        let mut out = BytesMut::new();
        encode_fields(&data(""), &mut out);
        assert_eq!(&out[..], b"data: \n");

        let mut out = BytesMut::new();
        let event = Event {
            retry: Some(1500),
            ..typed("delta", " x\n")
        };
        encode_fields(&event, &mut out);
        assert_eq!(&out[..], b"event: delta\ndata:  x\ndata: \nretry: 1500\n");

        let mut out = BytesMut::new();
        encode_fields(&typed("", "a"), &mut out);
        assert_eq!(&out[..], b"data: a\n");

        let mut out = BytesMut::new();
        encode_fields(&Event::default(), &mut out);
        assert!(out.is_empty());
    }

    /// Input built from the pieces that matter to the grammar, plus any byte.
    fn sse_bytes() -> impl Strategy<Value = Vec<u8>> {
        let piece = prop_oneof![
            3 => Just(b"\n".to_vec()),
            2 => Just(b"\r".to_vec()),
            1 => Just(b"\r\n".to_vec()),
            2 => Just(b":".to_vec()),
            2 => Just(b" ".to_vec()),
            3 => Just(b"data".to_vec()),
            1 => Just(b"event".to_vec()),
            1 => Just(b"retry".to_vec()),
            1 => Just(b"id".to_vec()),
            1 => Just(BOM.to_vec()),
            1 => Just(BOM[..1].to_vec()),
            1 => Just(BOM[..2].to_vec()),
            2 => "[0-9]{1,25}".prop_map(String::into_bytes),
            2 => proptest::collection::vec(any::<u8>(), 1..8),
        ];
        proptest::collection::vec(piece, 0..60).prop_map(|pieces| pieces.concat())
    }

    fn limits() -> impl Strategy<Value = Limits> {
        prop_oneof![
            Just(Limits::default()),
            (0usize..40, 0usize..80).prop_map(|(max_line, max_event)| Limits {
                max_line,
                max_event
            }),
        ]
    }

    /// Cut `input` at the given points (sorted, deduplicated, in range).
    fn split<'a>(input: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
        cuts.sort_unstable();
        let mut chunks = Vec::new();
        let mut start = 0;
        for cut in cuts {
            chunks.push(&input[start..cut]);
            start = cut;
        }
        chunks.push(&input[start..]);
        chunks
    }

    fn event_strategy() -> impl Strategy<Value = Event> {
        let event_type = proptest::collection::vec(any::<u8>(), 0..12).prop_map(|t| {
            t.into_iter()
                .filter(|&b| b != b'\r' && b != b'\n')
                .collect::<Vec<_>>()
        });
        let data = proptest::collection::vec(
            prop_oneof![Just(b'\n'), Just(b' '), Just(b':'), any::<u8>()],
            0..40,
        )
        .prop_map(|d| d.into_iter().filter(|&b| b != b'\r').collect::<Vec<_>>());
        (
            proptest::option::of(event_type),
            proptest::option::of(data),
            proptest::option::of(any::<u64>()),
        )
            .prop_map(|(event, data, retry)| Event {
                event: event.map(Bytes::from),
                data: data.map(Bytes::from),
                retry,
            })
    }

    /// The standard's algorithm transcribed as plainly as possible, on a
    /// whole input without limits: the model the parser is checked against.
    /// Also returns the reconnection time set by a block that was never
    /// dispatched (the input ends inside it), if any.
    fn reference(input: &[u8]) -> (Vec<Event>, Option<u64>) {
        let input = input.strip_prefix(&BOM[..]).unwrap_or(input);
        // Split into terminated lines; an unterminated last line is dropped.
        let mut lines = Vec::new();
        let mut start = 0;
        let mut i = 0;
        while i < input.len() {
            match input[i] {
                b'\r' | b'\n' => {
                    lines.push(&input[start..i]);
                    if input[i] == b'\r' && input.get(i + 1) == Some(&b'\n') {
                        i += 1;
                    }
                    start = i + 1;
                }
                _ => {}
            }
            i += 1;
        }
        let (mut data, mut event_type, mut retry) = (Vec::new(), None, None);
        let mut has_data = false;
        let mut events = Vec::new();
        for line in lines {
            if line.is_empty() {
                if has_data {
                    data.pop();
                }
                if has_data || retry.is_some() {
                    events.push(Event {
                        event: event_type.take().map(Bytes::from),
                        data: has_data.then(|| Bytes::from(data.clone())),
                        retry: retry.take(),
                    });
                }
                data.clear();
                has_data = false;
                event_type = None;
                retry = None;
                continue;
            }
            if line[0] == b':' {
                continue;
            }
            let (name, mut value) = match line.iter().position(|&b| b == b':') {
                Some(colon) => (&line[..colon], &line[colon + 1..]),
                None => (line, &[][..]),
            };
            if value.first() == Some(&b' ') {
                value = &value[1..];
            }
            match name {
                b"data" => {
                    data.extend_from_slice(value);
                    data.push(b'\n');
                    has_data = true;
                }
                b"event" => event_type = Some(value.to_vec()),
                b"retry" => {
                    let digits = !value.is_empty() && value.iter().all(u8::is_ascii_digit);
                    if let Some(n) = digits
                        .then(|| std::str::from_utf8(value).ok()?.parse().ok())
                        .flatten()
                    {
                        retry = Some(n);
                    }
                }
                _ => {}
            }
        }
        (events, retry)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        #[test]
        fn chunking_does_not_matter(
            input in sse_bytes(),
            cuts in proptest::collection::vec(any::<usize>(), 0..20),
            limits in limits(),
        ) {
            let whole = run(limits, [&input[..]]);
            prop_assert_eq!(&run(limits, split(&input, &cuts)), &whole);
            prop_assert_eq!(&run(limits, input.chunks(1)), &whole);
        }

        #[test]
        fn matches_the_standard(input in sse_bytes()) {
            let outcome = run(Limits::default(), [&input[..]]);
            prop_assert_eq!(outcome.error, None);
            let (events, trailing_retry) = reference(&input);
            prop_assert_eq!(outcome.events, events);
            prop_assert_eq!(outcome.trailing_retry, trailing_retry);
        }

        #[test]
        fn encode_then_parse_round_trips(event in event_strategy()) {
            let mut out = BytesMut::new();
            encode_fields(&event, &mut out);
            out.put_u8(b'\n');
            let expected = if event.data.is_none() && event.retry.is_none() {
                vec![]
            } else {
                // An empty event type is not written (it means "message" either way).
                let event_type = event.event.clone().filter(|t| !t.is_empty());
                vec![Event { event: event_type, ..event.clone() }]
            };
            // The relay writes an `id:` line first; the parser must ignore it.
            let mut with_id = BytesMut::from(&b"id: x.1\n"[..]);
            with_id.extend_from_slice(&out);
            prop_assert_eq!(&run(Limits::default(), [&out[..]]).events, &expected);
            prop_assert_eq!(&run(Limits::default(), [&with_id[..]]).events, &expected);
        }
    }
}
