//! The codec: key names, metadata hashes and stream entries (packs, single
//! events, gaps, the end) to and from Redis values. No I/O.

use std::collections::HashMap;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use fred::prelude::*;
use reprise_core::{Dialect, Epoch, Outcome, Seq, StreamId};

use super::error::corrupt;
use crate::{Entry, EntryBody, StoreError, StreamMeta};

pub(super) fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX).max(1)
}

pub(super) fn b64(s: &str) -> String {
    URL_SAFE_NO_PAD.encode(s.as_bytes())
}

pub(super) struct StreamKeys {
    pub(super) meta: String,
    pub(super) entries: String,
    pub(super) channel: String,
    /// Durable Streams writer state (`checked_append`, `sliding_expiry`).
    pub(super) writers: String,
}

pub(super) fn stream_keys(prefix: &str, stream: StreamId) -> StreamKeys {
    StreamKeys {
        meta: format!("{prefix}{{{stream}}}:m"),
        entries: format!("{prefix}{{{stream}}}:e"),
        channel: format!("{prefix}{{{stream}}}:n"),
        writers: format!("{prefix}{{{stream}}}:w"),
    }
}

/// The stream a notification channel name belongs to.
pub(super) fn channel_stream(prefix: &str, channel: &str) -> Option<StreamId> {
    channel
        .strip_prefix(prefix)?
        .strip_prefix('{')?
        .strip_suffix("}:n")?
        .parse()
        .ok()
}

pub(super) fn parse_meta(
    stream: StreamId,
    mut h: HashMap<String, String>,
) -> Result<StreamMeta, StoreError> {
    let mut take = |field: &str| {
        h.remove(field)
            .ok_or_else(|| corrupt(format!("stream {stream}: metadata lacks `{field}`")))
    };
    let id: StreamId = take("id")?.parse().map_err(corrupt)?;
    let epoch = Epoch(take("epoch")?.parse().map_err(corrupt)?);
    let created_ms: u64 = take("created_ms")?.parse().map_err(corrupt)?;
    let route = take("route")?;
    let format = take("format")?;
    let headers: Vec<(String, String)> =
        serde_json::from_str(&take("headers")?).map_err(corrupt)?;
    let end: Option<(Seq, Outcome)> = match h.remove("end") {
        Some(s) => Some(serde_json::from_str(&s).map_err(corrupt)?),
        None => None,
    };
    let lost_history = match h.remove("gaps") {
        Some(n) => n.parse::<u64>().map_err(corrupt)? > 0,
        None => false,
    };
    let lease_owner = h.remove("lease_owner");
    let lease_until_ms = match h.remove("lease_until_ms") {
        Some(ms) => Some(ms.parse::<u64>().map_err(corrupt)?),
        None => None,
    };
    let cancel_requested = h.remove("cancel").is_some();
    let caller = h.remove("caller");
    // A dialect this version does not know (written by a newer one) reads
    // as the default rather than making the stream unreadable.
    let signals = h.remove("signals").and_then(|d| d.parse::<Dialect>().ok());
    Ok(StreamMeta {
        id,
        epoch,
        created_ms,
        route,
        headers,
        format,
        end,
        lost_history,
        lease_owner,
        lease_until_ms,
        cancel_requested,
        caller,
        signals,
    })
}

/// Most events in one packed Redis stream entry.
pub const PACK_MAX: usize = 128;
/// Entries the first `XRANGE` of a read asks for.
pub(super) const FIRST_READ_COUNT: usize = 8;

/// The id of a stream's terminal entry: the largest a Redis stream entry
/// can have, so that any later `XADD` (a stale writer's) fails. Its field
/// `f` holds `[seq, outcome]`.
pub(super) const TERMINAL_ID: &str = "18446744073709551615-18446744073709551615";

/// One Redis stream entry as `XADD` writes it: id, field, value.
pub(super) struct Record {
    pub(super) id: String,
    pub(super) field: &'static str,
    pub(super) value: Value,
}

/// The Redis stream entries of a valid batch: a run of events becomes one
/// pack (up to [`PACK_MAX`] events) under the seq of its last event, a
/// single event an `e` entry; a gap is stored under its last seq, the end
/// under [`TERMINAL_ID`].
pub(super) fn records(entries: &[Entry]) -> Result<Vec<Record>, StoreError> {
    let mut out = Vec::with_capacity(entries.len().div_ceil(PACK_MAX));
    let mut rest = entries;
    while let Some(e) = rest.first() {
        let run = rest
            .iter()
            .take(PACK_MAX)
            .take_while(|e| matches!(e.body, EntryBody::Event(_)))
            .count();
        let (id, field, value): (String, &'static str, Value) = match &e.body {
            EntryBody::Event(b) if run == 1 => (entry_id(e.seq), "e", Value::Bytes(b.clone())),
            EntryBody::Event(_) => (
                entry_id(rest[run - 1].seq),
                "p",
                Value::Bytes(pack(&rest[..run])),
            ),
            EntryBody::End(o) => (TERMINAL_ID.to_string(), "f", end_record(e.seq, o)?.into()),
            EntryBody::Gap { upto } => (entry_id(*upto), "g", e.seq.0.to_string().into()),
        };
        out.push(Record { id, field, value });
        rest = &rest[run.max(1)..];
    }
    Ok(out)
}

/// The JSON `[seq, outcome]` of a terminal entry (also the metadata's `end`).
pub(super) fn end_record(seq: Seq, outcome: &Outcome) -> Result<String, StoreError> {
    serde_json::to_string(&(seq, outcome)).map_err(corrupt)
}

/// The Redis stream entry id of the entry ending at `seq`.
pub(super) fn entry_id(seq: Seq) -> String {
    let mut id = seq.0.to_string();
    id.push_str("-0");
    id
}

/// Packs consecutive events into one value: per event, its length as a
/// 4-byte big-endian integer, then its bytes.
pub(super) fn pack(events: &[Entry]) -> bytes::Bytes {
    let len: usize = events
        .iter()
        .map(|e| match &e.body {
            EntryBody::Event(b) => 4 + b.len(),
            _ => 0,
        })
        .sum();
    let mut out = bytes::BytesMut::with_capacity(len);
    for e in events {
        if let EntryBody::Event(b) = &e.body {
            // validate_batch bounds nothing per event; u32 is 4 GiB.
            out.extend_from_slice(&(b.len() as u32).to_be_bytes());
            out.extend_from_slice(b);
        }
    }
    out.freeze()
}

/// The events of a pack whose last event is `last`, without copying.
pub(super) fn unpack(
    last: Seq,
    value: bytes::Bytes,
    out: &mut Vec<Entry>,
) -> Result<(), StoreError> {
    let bad = || corrupt(format!("pack ending at {}: bad lengths", last.0));
    let mut spans = Vec::new();
    let mut at = 0usize;
    while at < value.len() {
        let head: [u8; 4] = value
            .get(at..at + 4)
            .and_then(|h| h.try_into().ok())
            .ok_or_else(bad)?;
        let len = u32::from_be_bytes(head) as usize;
        let end = (at + 4).checked_add(len).filter(|&e| e <= value.len());
        let end = end.ok_or_else(bad)?;
        spans.push(at + 4..end);
        at = end;
    }
    let n = spans.len() as u64;
    if n == 0 || n > last.0 {
        return Err(bad());
    }
    let first = last.0 - n + 1;
    out.extend(spans.into_iter().enumerate().map(|(i, span)| Entry {
        seq: Seq(first + i as u64),
        body: EntryBody::Event(value.slice(span)),
    }));
    Ok(())
}

/// Decodes one `XRANGE` item, `[id, [field, value]]`, into `out` (a pack
/// gives several entries). The id is the last seq the item covers; for a
/// gap (field `g`) the value is its first seq.
pub(super) fn parse_entry(item: Value, out: &mut Vec<Entry>) -> Result<(), StoreError> {
    let Value::Array(mut parts) = item else {
        return Err(corrupt("stream entry is not an array"));
    };
    if parts.len() != 2 {
        return Err(corrupt("stream entry is not [id, fields]"));
    }
    let fields = parts.pop().unwrap_or(Value::Null);
    let id = parts
        .pop()
        .and_then(|v| v.into_string())
        .ok_or_else(|| corrupt("stream entry id"))?;
    let mut fields = match fields {
        Value::Array(f) if f.len() == 2 => f.into_iter(),
        _ => return Err(corrupt(format!("entry {id}: expected one field"))),
    };
    let name = fields
        .next()
        .and_then(|v| v.into_string())
        .unwrap_or_default();
    let value = fields
        .next()
        .and_then(|v| v.into_bytes())
        .ok_or_else(|| corrupt(format!("entry {id}: value")))?;
    if id == TERMINAL_ID && name == "f" {
        // The terminal entry carries its own seq.
        let (seq, outcome): (Seq, Outcome) = serde_json::from_slice(&value).map_err(corrupt)?;
        if seq.0 == 0 {
            return Err(corrupt(format!("terminal entry at seq {}", seq.0)));
        }
        out.push(Entry {
            seq,
            body: EntryBody::End(outcome),
        });
        return Ok(());
    }
    let last = id
        .strip_suffix("-0")
        .and_then(|s| s.parse::<u64>().ok())
        .map(Seq)
        .ok_or_else(|| corrupt(format!("stream entry id {id:?} is not <seq>-0")))?;
    let entry = match name.as_str() {
        "p" => return unpack(last, value, out),
        "e" => Entry {
            seq: last,
            body: EntryBody::Event(value),
        },
        // A terminal entry of library version 5 and before.
        "x" => Entry {
            seq: last,
            body: EntryBody::End(serde_json::from_slice(&value).map_err(corrupt)?),
        },
        "g" => {
            let first = std::str::from_utf8(&value)
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
                .filter(|&first| first >= 1 && first <= last.0)
                .ok_or_else(|| corrupt(format!("gap entry {id}: first seq {value:?}")))?;
            Entry {
                seq: Seq(first),
                body: EntryBody::Gap { upto: last },
            }
        }
        other => return Err(corrupt(format!("entry {id}: unknown field {other:?}"))),
    };
    out.push(entry);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn channel_names_round_trip() {
        let s = StreamId::random();
        let k = stream_keys("reprise:", s);
        assert_eq!(k.meta, format!("reprise:{{{s}}}:m"));
        assert_eq!(channel_stream("reprise:", &k.channel), Some(s));
        assert_eq!(channel_stream("other:", &k.channel), None);
        assert_eq!(channel_stream("reprise:", &k.meta), None);
    }

    #[test]
    fn binding_parts_cannot_collide() {
        // ':' separates route from key and never occurs in base64url.
        assert_ne!(
            format!("{}:{}", b64("a:b"), b64("c")),
            format!("{}:{}", b64("a"), b64("b:c"))
        );
        assert!(!b64("\r\n\0{}").contains([':', '{', '}']));
    }

    fn parse_one(item: Value) -> Result<Entry, StoreError> {
        let mut out = Vec::new();
        parse_entry(item, &mut out)?;
        assert_eq!(out.len(), 1);
        Ok(out.remove(0))
    }

    #[test]
    fn packs_round_trip_and_reject_bad_lengths() {
        let events: Vec<Entry> = (5..=9)
            .map(|s| Entry {
                seq: Seq(s),
                body: EntryBody::Event(Bytes::from(vec![b'x'; s as usize * 3])),
            })
            .collect();
        let packed = pack(&events);
        let item = Value::Array(vec![
            "9-0".into(),
            Value::Array(vec!["p".into(), Value::Bytes(packed.clone())]),
        ]);
        let mut out = Vec::new();
        parse_entry(item, &mut out).unwrap();
        assert_eq!(out, events);
        // Truncated, or more events than seqs before the id.
        for (id, value) in [
            ("9-0", packed.slice(..packed.len() - 1)),
            ("3-0", packed.clone()),
            ("9-0", Bytes::new()),
            ("9-0", Bytes::from_static(b"\0\0")),
        ] {
            let item = Value::Array(vec![
                id.into(),
                Value::Array(vec!["p".into(), Value::Bytes(value)]),
            ]);
            assert!(matches!(
                parse_entry(item, &mut Vec::new()),
                Err(StoreError::Corrupt(_))
            ));
        }
    }

    #[test]
    fn entry_parsing_rejects_foreign_records() {
        let good = Value::Array(vec![
            "7-0".into(),
            Value::Array(vec![
                "e".into(),
                Value::Bytes(Bytes::from_static(b"\0\xff")),
            ]),
        ]);
        let e = parse_one(good).unwrap();
        assert_eq!(e.seq, Seq(7));
        assert_eq!(e.body, EntryBody::Event(Bytes::from_static(b"\0\xff")));
        // A gap is stored under its last seq, with its first seq as value.
        let gap = Value::Array(vec![
            "9-0".into(),
            Value::Array(vec!["g".into(), "4".into()]),
        ]);
        let e = parse_one(gap).unwrap();
        assert_eq!(e.seq, Seq(4));
        assert_eq!(e.body, EntryBody::Gap { upto: Seq(9) });
        assert_eq!(e.last_seq(), Seq(9));
        // The terminal entry sits at the largest id and names its seq.
        let terminal = Value::Array(vec![
            TERMINAL_ID.into(),
            Value::Array(vec!["f".into(), r#"[12,{"status":"completed"}]"#.into()]),
        ]);
        let e = parse_one(terminal).unwrap();
        assert_eq!(e.seq, Seq(12));
        assert_eq!(e.body, EntryBody::End(Outcome::Completed));
        for bad in [
            Value::Array(vec![
                "7-1".into(),
                Value::Array(vec!["e".into(), "x".into()]),
            ]),
            Value::Array(vec![
                "7-0".into(),
                Value::Array(vec!["z".into(), "x".into()]),
            ]),
            Value::Array(vec![
                "7-0".into(),
                Value::Array(vec!["x".into(), "not json".into()]),
            ]),
            // Gaps that end before they start, start at 0, or are not numbers.
            Value::Array(vec![
                "7-0".into(),
                Value::Array(vec!["g".into(), "8".into()]),
            ]),
            Value::Array(vec![
                "7-0".into(),
                Value::Array(vec!["g".into(), "0".into()]),
            ]),
            Value::Array(vec![
                "7-0".into(),
                Value::Array(vec!["g".into(), "x".into()]),
            ]),
            Value::Array(vec!["7-0".into()]),
            "nope".into(),
        ] {
            assert!(matches!(parse_one(bad), Err(StoreError::Corrupt(_))));
        }
    }
}
