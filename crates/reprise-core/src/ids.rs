//! Identifiers: which stream, which incarnation of it, which position in it.
//!
//! Every event Reprise forwards carries an `id:` line spelled here (and
//! written into its frame by [`crate::wire`]). The id is
//! self-describing so that any instance can resume from a `Last-Event-ID`
//! alone, without a lookup table:
//!
//! ```text
//! <stream id>.<epoch>.<seq>        e.g. 3q2-7wEAAAAAAAAAAAAAAA.1f3a9c07.0000000042
//! <stream id>.end                  sent with a final signal: "nothing more will come"
//! ```
//!
//! - the **stream id** is 128 random bits in URL-safe base64 (22 characters);
//! - the **epoch** (8 hex digits) is chosen when the stream is created and kept
//!   in its metadata: a stream whose data was lost and re-created gets another
//!   epoch, so an old id is detected instead of silently pointing elsewhere;
//! - the **seq** (decimal, zero-padded to 10 digits) numbers the entries of the
//!   stream from 1. Zero-padding keeps ids of one stream lexicographically
//!   ordered as well as numerically.
//!
//! Parsing is strict (charset and length), so nothing that reaches a Redis key
//! name or a header can carry CR, LF, NUL or other surprises.

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

/// Length of a stream id in its text form.
pub const STREAM_ID_LEN: usize = 22;
/// Digits of the zero-padded seq in an event id.
const SEQ_WIDTH: usize = 10;

/// Why an id was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("stream id must be {STREAM_ID_LEN} URL-safe base64 characters")]
    StreamId,
    #[error("event id must look like <stream id>.<epoch>.<seq>")]
    EventId,
    #[error("start index must be a non-negative integer")]
    StartIndex,
}

/// A stream's identity: 128 random bits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamId([u8; 16]);

impl StreamId {
    /// A fresh id from the operating system's CSPRNG (via `rand`'s thread RNG).
    pub fn random() -> Self {
        StreamId(rand::random())
    }

    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = [0u8; STREAM_ID_LEN];
        // 16 bytes always encode to exactly 22 characters without padding.
        let n = URL_SAFE_NO_PAD
            .encode_slice(self.0, &mut buf)
            .map_err(|_| fmt::Error)?;
        f.write_str(std::str::from_utf8(&buf[..n]).map_err(|_| fmt::Error)?)
    }
}

impl fmt::Debug for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StreamId({self})")
    }
}

impl FromStr for StreamId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        if s.len() != STREAM_ID_LEN
            || !s
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(IdError::StreamId);
        }
        let mut out = [0u8; 16];
        let n = URL_SAFE_NO_PAD
            .decode_slice(s, &mut out)
            .map_err(|_| IdError::StreamId)?;
        if n != 16 {
            return Err(IdError::StreamId);
        }
        let id = StreamId(out);
        // Reject non-canonical encodings (trailing bits set) so that one
        // stream has exactly one spelling, and therefore one Redis key.
        if id.to_string() != s {
            return Err(IdError::StreamId);
        }
        Ok(id)
    }
}

impl serde::Serialize for StreamId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for StreamId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Which incarnation of a stream an id belongs to.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct Epoch(pub u32);

impl Epoch {
    pub fn random() -> Self {
        // Never zero, so that a zeroed field is never mistaken for a real epoch.
        Epoch(rand::random::<u32>().max(1))
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:08x}", self.0)
    }
}

impl FromStr for Epoch {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        if s.len() != 8 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(IdError::EventId);
        }
        u32::from_str_radix(s, 16)
            .map(Epoch)
            .map_err(|_| IdError::EventId)
    }
}

/// Position of an entry in a stream. The first entry is 1; 0 means "before
/// the first entry".
#[derive(
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Debug,
    Default,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(transparent)]
pub struct Seq(pub u64);

impl Seq {
    pub const ZERO: Seq = Seq(0);

    pub fn next(self) -> Seq {
        Seq(self.0 + 1)
    }
}

impl fmt::Display for Seq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The `id:` Reprise assigns to one event.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct EventId {
    pub stream: StreamId,
    pub epoch: Epoch,
    pub seq: Seq,
}

impl EventId {
    /// Appends the id's text to `out`, without `fmt` machinery: this runs
    /// once per event on the hot path (see `benches/ids.rs`).
    pub fn put(&self, out: &mut impl bytes::BufMut) {
        IdPrefix::new(self.stream, self.epoch).put(self.seq, out);
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = [0u8; EVENT_ID_MAX_LEN];
        let n = IdPrefix::new(self.stream, self.epoch).write(self.seq, &mut buf);
        f.write_str(std::str::from_utf8(&buf[..n]).map_err(|_| fmt::Error)?)
    }
}

/// Longest event id text: stream id, epoch, a 20-digit seq and two dots.
pub const EVENT_ID_MAX_LEN: usize = PREFIX_LEN + 20;
/// `<stream id>.<epoch>.`
const PREFIX_LEN: usize = STREAM_ID_LEN + 1 + 8 + 1;

/// The part of every event id of one stream that does not change
/// (`<stream id>.<epoch>.`), encoded once per stream so that each event
/// costs only its seq's digits.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct IdPrefix([u8; PREFIX_LEN]);

impl IdPrefix {
    pub fn new(stream: StreamId, epoch: Epoch) -> IdPrefix {
        let mut p = [0u8; PREFIX_LEN];
        // 16 bytes always encode to exactly 22 characters without padding.
        let _ = URL_SAFE_NO_PAD.encode_slice(stream.0, &mut p[..STREAM_ID_LEN]);
        p[STREAM_ID_LEN] = b'.';
        const HEX: &[u8; 16] = b"0123456789abcdef";
        for (i, d) in p[STREAM_ID_LEN + 1..STREAM_ID_LEN + 9]
            .iter_mut()
            .enumerate()
        {
            *d = HEX[((epoch.0 >> (28 - 4 * i)) & 0xf) as usize];
        }
        p[PREFIX_LEN - 1] = b'.';
        IdPrefix(p)
    }

    /// Writes the id of `seq` into `buf` and returns its length.
    pub fn write(&self, seq: Seq, buf: &mut [u8; EVENT_ID_MAX_LEN]) -> usize {
        buf[..PREFIX_LEN].copy_from_slice(&self.0);
        let mut digits = [b'0'; 20];
        let start = put_digits(seq.0, &mut digits);
        // Zero-padded to SEQ_WIDTH digits, more if the seq needs them.
        let start = start.min(digits.len() - SEQ_WIDTH);
        let n = digits.len() - start;
        buf[PREFIX_LEN..PREFIX_LEN + n].copy_from_slice(&digits[start..]);
        PREFIX_LEN + n
    }

    /// Appends the id of `seq` to `out`.
    pub fn put(&self, seq: Seq, out: &mut impl bytes::BufMut) {
        if seq.0 < 10_000_000_000 {
            // The usual case: exactly SEQ_WIDTH digits, a fixed-size copy.
            let mut buf = [b'0'; PREFIX_LEN + SEQ_WIDTH];
            buf[..PREFIX_LEN].copy_from_slice(&self.0);
            let mut digits = [b'0'; 20];
            put_digits(seq.0, &mut digits);
            buf[PREFIX_LEN..].copy_from_slice(&digits[20 - SEQ_WIDTH..]);
            out.put_slice(&buf);
        } else {
            let mut buf = [0u8; EVENT_ID_MAX_LEN];
            let n = self.write(seq, &mut buf);
            out.put_slice(&buf[..n]);
        }
    }
}

/// Writes `v` in decimal at the end of `digits` (two digits per division);
/// returns the index of its first digit (20 for zero, which writes nothing).
fn put_digits(mut v: u64, digits: &mut [u8; 20]) -> usize {
    const PAIRS: &[u8; 200] = b"0001020304050607080910111213141516171819\
        2021222324252627282930313233343536373839\
        4041424344454647484950515253545556575859\
        6061626364656667686970717273747576777879\
        8081828384858687888990919293949596979899";
    let mut i = digits.len();
    while v >= 100 {
        let pair = (v % 100) as usize * 2;
        v /= 100;
        i -= 2;
        digits[i..i + 2].copy_from_slice(&PAIRS[pair..pair + 2]);
    }
    if v >= 10 {
        let pair = v as usize * 2;
        i -= 2;
        digits[i..i + 2].copy_from_slice(&PAIRS[pair..pair + 2]);
    } else if v > 0 {
        i -= 1;
        digits[i] = b'0' + v as u8;
    }
    i
}

impl fmt::Debug for IdPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IdPrefix({})", String::from_utf8_lossy(&self.0))
    }
}

/// Where a resuming reader stands, as told by its `Last-Event-ID`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Cursor {
    /// The reader has every entry up to and including this one.
    At(EventId),
    /// The reader already received a final signal for this stream
    /// (`<stream id>.end`): it is answered `204` so that an EventSource stops
    /// reconnecting.
    End(StreamId),
}

impl Cursor {
    pub fn stream(&self) -> StreamId {
        match self {
            Cursor::At(id) => id.stream,
            Cursor::End(s) => *s,
        }
    }

    /// Parse a `Last-Event-ID` value. Any value that is not exactly one of
    /// Reprise's forms is an error, so a caller can tell "not ours" from "ours".
    pub fn parse(s: &str) -> Result<Cursor, IdError> {
        let mut parts = s.split('.');
        let stream = parts.next().ok_or(IdError::EventId)?;
        let second = parts.next().ok_or(IdError::EventId)?;
        let third = parts.next();
        if parts.next().is_some() {
            return Err(IdError::EventId);
        }
        let stream: StreamId = stream.parse().map_err(|_| IdError::EventId)?;
        match third {
            None if second == "end" => Ok(Cursor::End(stream)),
            None => Err(IdError::EventId),
            Some(seq) => {
                let epoch: Epoch = second.parse()?;
                if seq.is_empty() || seq.len() > 20 || !seq.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(IdError::EventId);
                }
                let seq: u64 = seq.parse().map_err(|_| IdError::EventId)?;
                Ok(Cursor::At(EventId {
                    stream,
                    epoch,
                    seq: Seq(seq),
                }))
            }
        }
    }
}

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Cursor::At(id) => id.fmt(f),
            Cursor::End(s) => write!(f, "{s}.end"),
        }
    }
}

/// Parse a `start_index=N` query value: the number of entries already received.
pub fn parse_start_index(s: &str) -> Result<Seq, IdError> {
    if s.is_empty() || s.len() > 20 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(IdError::StartIndex);
    }
    s.parse().map(Seq).map_err(|_| IdError::StartIndex)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_id_round_trips_and_is_url_safe() {
        for _ in 0..1000 {
            let id = StreamId::random();
            let s = id.to_string();
            assert_eq!(s.len(), STREAM_ID_LEN);
            assert!(s
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
            assert_eq!(s.parse::<StreamId>().unwrap(), id);
        }
    }

    #[test]
    fn stream_id_rejects_bad_input() {
        for bad in [
            "",
            "short",
            "AAAAAAAAAAAAAAAAAAAAA\n",
            "AAAAAAAAAAAAAAAAAAAA/+",
            "AAAAAAAAAAAAAAAAAAAAAAA",
        ] {
            assert!(bad.parse::<StreamId>().is_err(), "{bad:?}");
        }
        // Non-canonical: the last character carries bits beyond the 128.
        assert!("AAAAAAAAAAAAAAAAAAAAAB".parse::<StreamId>().is_err());
        assert!("AAAAAAAAAAAAAAAAAAAAAA".parse::<StreamId>().is_ok());
    }

    #[test]
    fn event_id_round_trips_and_orders() {
        let stream = StreamId::random();
        let epoch = Epoch::random();
        let mut prev = String::new();
        for seq in [1u64, 2, 9, 10, 99, 100, 999, 1000, 123_456_789] {
            let id = EventId {
                stream,
                epoch,
                seq: Seq(seq),
            };
            let s = id.to_string();
            assert_eq!(Cursor::parse(&s).unwrap(), Cursor::At(id));
            assert!(s > prev, "{s} should sort after {prev}");
            prev = s;
        }
        let end = Cursor::End(stream);
        assert_eq!(Cursor::parse(&end.to_string()).unwrap(), end);
    }

    #[test]
    fn fast_encoding_matches_the_format_spelling() {
        for _ in 0..100 {
            let stream = StreamId::random();
            let epoch = Epoch::random();
            for seq in [0u64, 1, 42, 9_999_999_999, 10_000_000_000, u64::MAX] {
                let id = EventId {
                    stream,
                    epoch,
                    seq: Seq(seq),
                };
                let slow = format!("{}.{:08x}.{:010}", stream, epoch.0, seq);
                assert_eq!(id.to_string(), slow);
                let mut out = Vec::new();
                id.put(&mut out);
                assert_eq!(out, slow.as_bytes());
            }
        }
    }

    #[test]
    fn cursor_rejects_foreign_and_malformed_ids() {
        let s = StreamId::random();
        for bad in [
            "42".to_string(),
            "chatcmpl-123".to_string(),
            format!("{s}"),
            format!("{s}.1f3a9c07"),
            format!("{s}.1f3a9c0.1"),
            format!("{s}.1f3a9c07."),
            format!("{s}.1f3a9c07.-1"),
            format!("{s}.1f3a9c07.1.2"),
            format!("{s}.1f3a9c07.1\r\n"),
            format!("{s}.1f3a9c07.99999999999999999999999"),
            format!("{s}.ends"),
        ] {
            assert!(Cursor::parse(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn start_index_parsing() {
        assert_eq!(parse_start_index("0").unwrap(), Seq(0));
        assert_eq!(parse_start_index("17").unwrap(), Seq(17));
        for bad in ["", "-1", "1.5", "abc", "99999999999999999999999", " 1"] {
            assert!(parse_start_index(bad).is_err(), "{bad:?}");
        }
    }
}
