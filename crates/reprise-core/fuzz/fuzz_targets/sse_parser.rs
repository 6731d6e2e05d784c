//! Fuzz target for the SSE parser that reads every upstream body.
//!
//! Input layout: `[cut_hi, cut_lo, step, limits, stream...]`. The stream is
//! parsed whole, cut in two at `cut`, and fed in chunks of `step % 32 + 1`
//! bytes; all three must give the same events, error, retry left in an
//! undispatched block (`take_retry()`) and `finish()` answer.
//! Along the way the parser must never panic nor hold more than its limits,
//! and every event must survive an encode/parse round trip.
#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use reprise_core::sse::{encode_fields, Event, Limits, ParseError, Parser};

#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    events: Vec<Event>,
    error: Option<ParseError>,
    /// `take_retry()` once the input is used up (or failed).
    trailing_retry: Option<u64>,
    /// `finish()`'s answer; not asked after an error.
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

/// Encoding a parsed event and parsing it again gives it back (an empty
/// event type is dropped by the encoder: it means "message" either way).
fn check_round_trip(event: &Event) {
    let mut encoded = BytesMut::new();
    encode_fields(event, &mut encoded);
    encoded.extend_from_slice(b"\n");
    let mut parser = Parser::new(Limits::default());
    parser.push(encoded.freeze());
    let expected = Event {
        event: event.event.clone().filter(|t| !t.is_empty()),
        ..event.clone()
    };
    assert_eq!(parser.next_event(), Ok(Some(expected)));
    assert_eq!(parser.next_event(), Ok(None));
    assert!(!parser.finish());
}

fuzz_target!(|input: &[u8]| {
    let Some((&[cut_hi, cut_lo, step, limits], stream)) = input.split_first_chunk::<4>() else {
        return;
    };
    // Odd: small limits, so that both errors are reachable with short inputs.
    let limits = if limits & 1 == 0 {
        Limits::default()
    } else {
        let max_line = usize::from(limits >> 1);
        Limits {
            max_line,
            max_event: max_line * 2,
        }
    };
    let cut = usize::from(u16::from_be_bytes([cut_hi, cut_lo])) % (stream.len() + 1);
    let step = usize::from(step % 32) + 1;

    let whole = run(limits, [stream]);
    let (head, tail) = stream.split_at(cut);
    assert_eq!(run(limits, [head, tail]), whole);
    assert_eq!(run(limits, stream.chunks(step)), whole);
    for event in &whole.events {
        check_round_trip(event);
    }
});
