//! Server-Sent Events framing: the incremental parser that turns upstream
//! bytes into events, and the encoder that writes them back out.
//!
//! STUB: being written (API fixed, implementation pending).

use bytes::{Bytes, BytesMut};

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
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Longest line (bytes, line terminator excluded).
    pub max_line: usize,
    /// Largest event (bytes of data, event type and retry together).
    pub max_event: usize,
}

/// Input the parser refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("line longer than {limit} bytes")]
    LineTooLong { limit: usize },
    #[error("event larger than {limit} bytes")]
    EventTooLarge { limit: usize },
}

/// Incremental parser.
#[derive(Debug)]
pub struct Parser {
    _limits: Limits,
}

impl Parser {
    pub fn new(limits: Limits) -> Self {
        Parser { _limits: limits }
    }

    /// Feed the next chunk of the body.
    pub fn push(&mut self, _chunk: Bytes) {
        todo!()
    }

    /// The next complete event from the bytes pushed so far.
    pub fn next_event(&mut self) -> Result<Option<Event>, ParseError> {
        todo!()
    }

    /// End of input: returns true if an incomplete event was discarded.
    pub fn finish(&mut self) -> bool {
        todo!()
    }
}

/// Append the fields of `event` (no `id:` line, no blank terminator line).
pub fn encode_fields(_event: &Event, _out: &mut BytesMut) {
    todo!()
}
