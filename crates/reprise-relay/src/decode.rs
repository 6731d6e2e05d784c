//! Content decoding of a recorded upstream body: sits between the upstream
//! body and the recorder's framer (upstream → **decode** → framer → log),
//! for upstreams that compress an event stream although Reprise asked for
//! `Accept-Encoding: identity`.
//!
//! Push-style and synchronous: the producer hands in each upstream chunk and
//! frames what comes out. Whatever was decoded before a corrupt byte is
//! handed out with the error, so a stream that breaks mid-way keeps every
//! event received before the break. Each call decodes a bounded slice of
//! input, so a small corrupt or hostile chunk cannot expand into an
//! unbounded buffer at once.

use std::io::Write as _;

use bytes::Bytes;
use flate2::{Crc, Decompress, FlushDecompress, Status};
use http::{header, HeaderMap};

/// Most compressed bytes decoded per step: deflate expands at most ~1032:1,
/// so a step yields at most a few MiB however hostile the input.
pub const STEP: usize = 4 << 10;

/// Most bytes one step may decode to. Deflate stays far below it; Brotli
/// can expand a few KiB into gigabytes, so its output is capped and a step
/// that would exceed this fails the stream (`upstream_protocol`) instead of
/// filling memory. No real event stream compresses 2,000:1.
pub const MAX_STEP_OUTPUT: usize = 8 << 20;

/// The Brotli decoder's sink: a buffer that refuses to grow past
/// [`MAX_STEP_OUTPUT`] between two drains.
#[derive(Default)]
struct Capped(Vec<u8>);

impl std::io::Write for Capped {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.0.len() + buf.len() > MAX_STEP_OUTPUT {
            return Err(std::io::Error::other(format!(
                "a {STEP}-byte step of the body decodes to more than {MAX_STEP_OUTPUT} bytes"
            )));
        }
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A content coding Reprise decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Coding {
    /// `gzip` (or `x-gzip`), one or more members.
    Gzip,
    /// `deflate`: zlib-wrapped as HTTP says, or raw deflate as some servers
    /// send it (browsers accept both; the first bytes tell them apart).
    Deflate,
    /// `br`.
    Brotli,
}

impl Coding {
    /// The coding of a response: `Ok(None)` for none (or `identity`),
    /// `Err` with the header's value for a coding Reprise does not decode
    /// (several codings, or an unknown one): such a response is passed
    /// through unrecorded.
    pub fn of(headers: &HeaderMap) -> Result<Option<Coding>, String> {
        let mut codings = Vec::new();
        for value in headers.get_all(header::CONTENT_ENCODING) {
            let Ok(value) = value.to_str() else {
                return Err(String::from_utf8_lossy(value.as_bytes()).into_owned());
            };
            codings.extend(
                value
                    .split(',')
                    .map(str::trim)
                    .filter(|c| !c.is_empty() && !c.eq_ignore_ascii_case("identity"))
                    .map(str::to_ascii_lowercase),
            );
        }
        match codings.as_slice() {
            [] => Ok(None),
            [one] => match one.as_str() {
                "gzip" | "x-gzip" => Ok(Some(Coding::Gzip)),
                "deflate" => Ok(Some(Coding::Deflate)),
                "br" => Ok(Some(Coding::Brotli)),
                _ => Err(one.clone()),
            },
            _ => Err(codings.join(", ")),
        }
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            Coding::Gzip => "gzip",
            Coding::Deflate => "deflate",
            Coding::Brotli => "br",
        }
    }
}

/// A body that does not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {coding} body: {message}")]
pub struct DecodeError {
    pub coding: &'static str,
    pub message: String,
}

/// Decodes one body, chunk by chunk.
pub struct Decoder {
    coding: Coding,
    state: State,
}

enum State {
    /// Gzip: header bytes gathered so far (a header may straddle chunks).
    GzipHeader(Vec<u8>),
    /// Gzip: deflate data of the current member, and its running CRC.
    GzipBody(Box<Decompress>, Crc),
    /// Gzip: trailer bytes (CRC32, ISIZE) gathered so far.
    GzipTrailer(Vec<u8>, Crc),
    /// Deflate: not enough bytes yet to tell zlib from raw deflate.
    DeflateSniff(Vec<u8>),
    /// Zlib or raw deflate.
    Inflate(Box<Decompress>),
    Brotli(Box<brotli_decompressor::DecompressorWriter<Capped>>),
    /// The compressed stream ended; only trailing gzip members may follow.
    Done,
    Failed,
}

impl Decoder {
    pub fn new(coding: Coding) -> Decoder {
        let state = match coding {
            Coding::Gzip => State::GzipHeader(Vec::new()),
            Coding::Deflate => State::DeflateSniff(Vec::new()),
            Coding::Brotli => State::Brotli(Box::new(
                brotli_decompressor::DecompressorWriter::new(Capped::default(), STEP),
            )),
        };
        Decoder { coding, state }
    }

    /// Decodes `input` (at most [`STEP`] bytes at a time is advised) and
    /// returns what it yields. On corrupt input, the error carries the bytes
    /// decoded before the corrupt part, and the decoder stays failed.
    pub fn push(&mut self, input: &[u8]) -> Result<Bytes, (Bytes, DecodeError)> {
        let mut out = Vec::new();
        match self.run(input, &mut out) {
            Ok(()) => Ok(Bytes::from(out)),
            Err(message) => {
                self.state = State::Failed;
                Err((Bytes::from(out), self.error(message)))
            }
        }
    }

    /// End of the body: the last decoded bytes, or an error if the
    /// compressed stream is incomplete (the body was cut short).
    pub fn finish(&mut self) -> Result<Bytes, (Bytes, DecodeError)> {
        let mut out = Vec::new();
        let complete = match &mut self.state {
            State::Done => Ok(()),
            // An empty body is an empty stream.
            State::GzipHeader(h) | State::DeflateSniff(h) if h.is_empty() => Ok(()),
            State::Brotli(writer) => {
                let closed = writer.close().map_err(|e| e.to_string());
                out.append(&mut writer.get_mut().0);
                closed
            }
            State::Failed => Err("decoding failed earlier".into()),
            _ => Err("the body ended before the compressed stream did".into()),
        };
        match complete {
            Ok(()) => {
                self.state = State::Done;
                Ok(Bytes::from(out))
            }
            Err(message) => {
                self.state = State::Failed;
                Err((Bytes::from(out), self.error(message)))
            }
        }
    }

    pub fn coding(&self) -> Coding {
        self.coding
    }

    fn error(&self, message: String) -> DecodeError {
        DecodeError {
            coding: self.coding.as_str(),
            message,
        }
    }

    fn run(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
        while !input.is_empty() {
            match &mut self.state {
                State::GzipHeader(header) => {
                    // Gather up to the header's end; what follows is deflate data.
                    let before = header.len();
                    header.extend_from_slice(input);
                    match gzip_header_len(header)? {
                        Some(len) => {
                            input = &input[len - before..];
                            self.state =
                                State::GzipBody(Box::new(Decompress::new(false)), Crc::new());
                        }
                        None => return Ok(()),
                    }
                }
                State::GzipBody(inflate, crc) => {
                    let start = out.len();
                    let (consumed, end) = inflate_into(inflate, input, out);
                    crc.update(&out[start..]);
                    input = &input[consumed..];
                    if end? {
                        let crc = std::mem::replace(crc, Crc::new());
                        self.state = State::GzipTrailer(Vec::with_capacity(8), crc);
                    }
                }
                State::GzipTrailer(trailer, crc) => {
                    let take = (8 - trailer.len()).min(input.len());
                    trailer.extend_from_slice(&input[..take]);
                    input = &input[take..];
                    if trailer.len() == 8 {
                        let sum =
                            u32::from_le_bytes([trailer[0], trailer[1], trailer[2], trailer[3]]);
                        let size =
                            u32::from_le_bytes([trailer[4], trailer[5], trailer[6], trailer[7]]);
                        if sum != crc.sum() || size != crc.amount() {
                            return Err("gzip checksum mismatch".into());
                        }
                        // Another member may follow (concatenated gzip),
                        // or zero padding: `Done` tells them apart.
                        self.state = State::Done;
                    }
                }
                State::DeflateSniff(first) => {
                    let take = (2 - first.len()).min(input.len());
                    first.extend_from_slice(&input[..take]);
                    input = &input[take..];
                    if first.len() == 2 {
                        // A zlib header: CM = 8, and the two bytes a multiple of 31.
                        let zlib = first[0] & 0x0F == 8
                            && (u16::from(first[0]) << 8 | u16::from(first[1])) % 31 == 0;
                        let first = std::mem::take(first);
                        self.state = State::Inflate(Box::new(Decompress::new(zlib)));
                        self.run(&first, out)?;
                    }
                }
                State::Inflate(inflate) => {
                    let (consumed, end) = inflate_into(inflate, input, out);
                    input = &input[consumed..];
                    if end? {
                        self.state = State::Done;
                    }
                }
                State::Brotli(writer) => {
                    let written = writer.write_all(input).map_err(|e| e.to_string());
                    // Decoded bytes are in the buffer even if writing failed.
                    out.append(&mut writer.get_mut().0);
                    written?;
                    return Ok(());
                }
                State::Done => {
                    // After a complete gzip member only another member may
                    // follow (restart the header parser), or zero padding,
                    // which some servers append and gzip(1) ignores.
                    if self.coding == Coding::Gzip {
                        let zeros = input.iter().take_while(|b| **b == 0).count();
                        input = &input[zeros..];
                        if input.is_empty() {
                            return Ok(());
                        }
                        self.state = State::GzipHeader(Vec::new());
                        continue;
                    }
                    return Err("data after the end of the compressed stream".into());
                }
                State::Failed => return Err("decoding failed earlier".into()),
            }
        }
        Ok(())
    }
}

/// Inflates as much of `input` as it can into `out`: (bytes of `input`
/// consumed, whether the deflate stream ended or an error). What was
/// decoded before an error is in `out` either way.
fn inflate_into(
    inflate: &mut Decompress,
    input: &[u8],
    out: &mut Vec<u8>,
) -> (usize, Result<bool, String>) {
    let mut consumed = 0;
    loop {
        out.reserve(STEP.max(input.len() - consumed));
        let before_in = inflate.total_in();
        let before_out = out.len();
        let status = inflate.decompress_vec(&input[consumed..], out, FlushDecompress::None);
        consumed += (inflate.total_in() - before_in) as usize;
        match status {
            Err(e) => return (consumed, Err(e.to_string())),
            Ok(Status::StreamEnd) => return (consumed, Ok(true)),
            // No progress possible: everything consumed and no output room
            // missing, or waiting for more input.
            Ok(_) if consumed == input.len() && out.len() < out.capacity() => {
                return (consumed, Ok(false))
            }
            Ok(_) if inflate.total_in() == before_in && out.len() == before_out => {
                return (consumed, Ok(false))
            }
            Ok(_) => {}
        }
    }
}

/// The length of a complete gzip header at the start of `h`, `None` if more
/// bytes are needed, an error if it is not a gzip header.
fn gzip_header_len(h: &[u8]) -> Result<Option<usize>, String> {
    /// FLG bits (RFC 1952).
    const FHCRC: u8 = 0x02;
    const FEXTRA: u8 = 0x04;
    const FNAME: u8 = 0x08;
    const FCOMMENT: u8 = 0x10;
    for (at, expected) in [(0, 0x1f), (1, 0x8b), (2, 8)] {
        match h.get(at) {
            Some(&b) if b != expected => return Err("not a gzip header".into()),
            None => return Ok(None),
            _ => {}
        }
    }
    let Some(&flags) = h.get(3) else {
        return Ok(None);
    };
    if flags & 0xE0 != 0 {
        return Err("reserved gzip header flags set".into());
    }
    let mut len = 10;
    if flags & FEXTRA != 0 {
        let (Some(&lo), Some(&hi)) = (h.get(len), h.get(len + 1)) else {
            return Ok(None);
        };
        len += 2 + usize::from(u16::from_le_bytes([lo, hi]));
    }
    for flag in [FNAME, FCOMMENT] {
        if flags & flag != 0 {
            // Zero-terminated; bounded so that a header cannot grow forever.
            match h
                .get(len..)
                .and_then(|rest| rest.iter().position(|&b| b == 0))
            {
                Some(end) => len += end + 1,
                None if h.len() > 1 << 16 => return Err("gzip header too long".into()),
                None => return Ok(None),
            }
        }
    }
    if flags & FHCRC != 0 {
        len += 2;
    }
    Ok((h.len() >= len).then_some(len))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Zero padding after the last gzip member (some servers append it;
    /// gzip(1) ignores it) ends the stream normally, at any chunking; other
    /// trailing bytes still fail.
    #[test]
    fn zero_padding_after_gzip_is_ignored() {
        let body = b"data: a\n\ndata: b\n\n";
        let mut padded = gzip(body);
        padded.extend_from_slice(&[0u8; 9]);
        for chunk in [1, 3, 4096] {
            let mut d = Decoder::new(Coding::Gzip);
            let mut out = Vec::new();
            for piece in padded.chunks(chunk) {
                out.extend_from_slice(&d.push(piece).expect("padding accepted"));
            }
            out.extend_from_slice(&d.finish().expect("complete stream"));
            assert_eq!(out, body, "chunk {chunk}");
        }
        let mut junk = gzip(body);
        junk.extend_from_slice(b"junk");
        let mut d = Decoder::new(Coding::Gzip);
        let failed = d.push(&junk).is_err() || d.finish().is_err();
        assert!(failed, "trailing junk must fail");
    }

    /// A Brotli bomb (a few KiB that expand to gigabytes) fails the stream
    /// once one step would decode past the cap, keeping memory bounded.
    #[test]
    fn a_brotli_bomb_fails_instead_of_filling_memory() {
        let mut br = Vec::new();
        {
            let mut w = brotli::CompressorWriter::new(&mut br, 4096, 5, 22);
            let zeros = vec![0u8; 1 << 20];
            for _ in 0..16 {
                std::io::Write::write_all(&mut w, &zeros).unwrap();
            }
        }
        assert!(br.len() < STEP * 16, "the bomb is small: {}", br.len());
        let mut d = Decoder::new(Coding::Brotli);
        let mut decoded = 0usize;
        let mut failed = false;
        for step in br.chunks(STEP) {
            match d.push(step) {
                Ok(out) => {
                    assert!(out.len() <= MAX_STEP_OUTPUT);
                    decoded += out.len();
                }
                Err((out, _)) => {
                    assert!(out.len() <= MAX_STEP_OUTPUT);
                    failed = true;
                    break;
                }
            }
        }
        assert!(
            failed,
            "16 MiB from {} bytes decoded without failing ({decoded})",
            br.len()
        );
    }
    use flate2::write::{DeflateEncoder, GzEncoder, ZlibEncoder};
    use flate2::{Compression, GzBuilder};

    fn text() -> Vec<u8> {
        (0..2000)
            .map(|i| format!("data: {{\"n\":{i},\"text\":\"token {i} é\"}}\n\n"))
            .collect::<String>()
            .into_bytes()
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = GzEncoder::new(Vec::new(), Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    /// Decodes `body` fed in `chunk`-byte pieces.
    fn decode(
        coding: Coding,
        body: &[u8],
        chunk: usize,
    ) -> Result<Vec<u8>, (Vec<u8>, DecodeError)> {
        let mut d = Decoder::new(coding);
        let mut out = Vec::new();
        for piece in body.chunks(chunk.max(1)) {
            match d.push(piece) {
                Ok(b) => out.extend_from_slice(&b),
                Err((b, e)) => {
                    out.extend_from_slice(&b);
                    return Err((out, e));
                }
            }
        }
        match d.finish() {
            Ok(b) => {
                out.extend_from_slice(&b);
                Ok(out)
            }
            Err((b, e)) => {
                out.extend_from_slice(&b);
                Err((out, e))
            }
        }
    }

    #[test]
    fn codings_from_headers() {
        let of = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_ENCODING, v.parse().unwrap());
            Coding::of(&h)
        };
        assert_eq!(Coding::of(&HeaderMap::new()), Ok(None));
        assert_eq!(of("identity"), Ok(None));
        assert_eq!(of("GZIP"), Ok(Some(Coding::Gzip)));
        assert_eq!(of("x-gzip"), Ok(Some(Coding::Gzip)));
        assert_eq!(of("deflate"), Ok(Some(Coding::Deflate)));
        assert_eq!(of(" br "), Ok(Some(Coding::Brotli)));
        assert_eq!(of("zstd"), Err("zstd".into()));
        assert_eq!(of("gzip, br"), Err("gzip, br".into()));
    }

    #[test]
    fn every_coding_and_chunking() {
        let text = text();
        let mut zlib = ZlibEncoder::new(Vec::new(), Compression::default());
        zlib.write_all(&text).unwrap();
        let mut raw = DeflateEncoder::new(Vec::new(), Compression::default());
        raw.write_all(&text).unwrap();
        let mut br = Vec::new();
        {
            let mut w = brotli::CompressorWriter::new(&mut br, 4096, 5, 22);
            w.write_all(&text).unwrap();
        }
        let mut named = GzBuilder::new()
            .filename("events.txt")
            .comment("a comment")
            .extra(vec![1, 2, 3])
            .write(Vec::new(), Compression::fast());
        named.write_all(&text).unwrap();
        let cases = [
            (Coding::Gzip, gzip(&text)),
            (Coding::Gzip, named.finish().unwrap()),
            (Coding::Deflate, zlib.finish().unwrap()),
            (Coding::Deflate, raw.finish().unwrap()),
            (Coding::Brotli, br),
        ];
        for (coding, body) in cases {
            for chunk in [1, 7, 100, STEP, body.len()] {
                assert_eq!(
                    decode(coding, &body, chunk).as_deref(),
                    Ok(&text[..]),
                    "{coding:?} {chunk}"
                );
            }
        }
        // Two gzip members are one body.
        let mut two = gzip(b"data: a\n\n");
        two.extend(gzip(b"data: b\n\n"));
        assert_eq!(
            decode(Coding::Gzip, &two, 5).unwrap(),
            b"data: a\n\ndata: b\n\n"
        );
        assert_eq!(decode(Coding::Gzip, b"", 5).unwrap(), b"");
    }

    #[test]
    fn corrupt_or_cut_bodies_fail_keeping_what_decoded() {
        let text = text();
        let body = gzip(&text);
        // Cut short: all but the end decodes, then the end is an error.
        let (partial, _) = decode(Coding::Gzip, &body[..body.len() / 2], 100).unwrap_err();
        assert!(text.starts_with(&partial) && partial.len() > text.len() / 4);
        // Garbage in the middle.
        let mut bad = body.clone();
        let mid = bad.len() / 2;
        bad[mid..mid + 64].fill(0xFF);
        let (partial, err) = decode(Coding::Gzip, &bad, bad.len()).unwrap_err();
        assert_eq!(err.coding, "gzip");
        // Garbage may decode to junk before it is detected, but everything
        // the intact part decoded to comes out, even from the same push.
        let mut intact = Decoder::new(Coding::Gzip);
        let before = intact.push(&bad[..mid]).unwrap();
        assert!(before.len() > text.len() / 4);
        assert!(partial.starts_with(&before));
        // A wrong checksum.
        let mut bad = body.clone();
        let at = bad.len() - 6;
        bad[at] ^= 1;
        assert!(decode(Coding::Gzip, &bad, 50).is_err());
        assert!(decode(Coding::Gzip, b"data: not gzip\n\n", 50).is_err());
        assert!(decode(Coding::Brotli, b"data: not brotli\n\n", 50).is_err());
        let mut br = Vec::new();
        {
            let mut w = brotli::CompressorWriter::new(&mut br, 4096, 5, 22);
            w.write_all(&text).unwrap();
        }
        let (partial, _) = decode(Coding::Brotli, &br[..br.len() / 2], 100).unwrap_err();
        assert!(text.starts_with(&partial));
    }
}
