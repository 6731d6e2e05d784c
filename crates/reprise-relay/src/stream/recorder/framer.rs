//! The framer: inside the producer, right after the upstream body (and its
//! decoder): splits the bytes into entries, per format: SSE events
//! re-encoded as their fields, or NDJSON lines as sent.

use bytes::{Bytes, BytesMut};
use reprise_core::ndjson::LineSplitter;
use reprise_core::sse::{encode_fields, Limits, Parser};
use reprise_core::Format;

/// Turns upstream bytes into entry payloads, per format.
pub(super) enum Framer {
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
    pub(super) fn new(format: Format, limits: Limits) -> Framer {
        match format {
            Format::Sse => Framer::Sse {
                parser: Parser::new(limits),
                trailing_retry: None,
            },
            Format::Ndjson => Framer::Ndjson(LineSplitter::new(limits.max_line)),
        }
    }

    pub(super) fn push(&mut self, data: Bytes) {
        match self {
            Framer::Sse { parser, .. } => parser.push(data),
            Framer::Ndjson(lines) => lines.push(data),
        }
    }

    /// Appends the next entry payload to `out`; false if no complete entry
    /// is buffered, an error message for invalid input.
    pub(super) fn next_into(&mut self, out: &mut BytesMut) -> Result<bool, String> {
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
    pub(super) fn finish(&mut self) -> Option<Bytes> {
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
    pub(super) fn take_retry(&mut self) -> Option<BytesMut> {
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
