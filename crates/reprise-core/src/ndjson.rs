//! Newline-delimited JSON framing (Ollama's `application/x-ndjson`): the
//! line splitter that turns an upstream body into entries, one per line.
//!
//! Lines end with LF (a CR before it is dropped). Blank lines carry no value
//! and are skipped. A last line without LF at the end of the body is still a
//! line. Lines are not validated as JSON: they are forwarded as the upstream
//! sent them.

use std::collections::VecDeque;

use bytes::{Buf, Bytes, BytesMut};

/// A line over the limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line longer than {limit} bytes")]
pub struct LineTooLong {
    pub limit: usize,
}

/// Incremental line splitter with a bounded buffer.
#[derive(Debug)]
pub struct LineSplitter {
    max_line: usize,
    /// Chunks pushed but not yet scanned.
    queue: VecDeque<Bytes>,
    /// Start of a line that straddles chunks.
    partial: BytesMut,
    failed: bool,
}

impl LineSplitter {
    pub fn new(max_line: usize) -> Self {
        LineSplitter {
            max_line,
            queue: VecDeque::new(),
            partial: BytesMut::new(),
            failed: false,
        }
    }

    pub fn push(&mut self, chunk: Bytes) {
        if !chunk.is_empty() && !self.failed {
            self.queue.push_back(chunk);
        }
    }

    /// Bytes of an incomplete line held (never more than the limit).
    pub fn buffered_len(&self) -> usize {
        self.partial.len()
    }

    /// The next complete, non-blank line, without its line end.
    pub fn next_line(&mut self) -> Result<Option<Bytes>, LineTooLong> {
        if self.failed {
            return Err(LineTooLong {
                limit: self.max_line,
            });
        }
        while let Some(chunk) = self.queue.front_mut() {
            match memchr::memchr(b'\n', chunk) {
                Some(pos) => {
                    let head = chunk.split_to(pos);
                    chunk.advance(1);
                    if chunk.is_empty() {
                        self.queue.pop_front();
                    }
                    let line = if self.partial.is_empty() {
                        head
                    } else {
                        if self.partial.len() + head.len() > self.max_line {
                            return self.fail();
                        }
                        self.partial.extend_from_slice(&head);
                        self.partial.split().freeze()
                    };
                    if line.len() > self.max_line {
                        return self.fail();
                    }
                    if let Some(line) = clean(line) {
                        return Ok(Some(line));
                    }
                }
                None => {
                    if self.partial.len() + chunk.len() > self.max_line {
                        return self.fail();
                    }
                    self.partial.extend_from_slice(chunk);
                    self.queue.pop_front();
                }
            }
        }
        Ok(None)
    }

    /// End of input: the last line if it had no line end.
    pub fn finish(&mut self) -> Option<Bytes> {
        if self.failed {
            return None;
        }
        let rest = self.partial.split().freeze();
        clean(rest)
    }

    fn fail(&mut self) -> Result<Option<Bytes>, LineTooLong> {
        self.failed = true;
        self.queue.clear();
        self.partial = BytesMut::new();
        Err(LineTooLong {
            limit: self.max_line,
        })
    }
}

/// Drops a trailing CR; `None` for blank lines.
fn clean(mut line: Bytes) -> Option<Bytes> {
    if line.last() == Some(&b'\r') {
        line.truncate(line.len() - 1);
    }
    if line.iter().all(|b| b.is_ascii_whitespace()) {
        None
    } else {
        Some(line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn lines_of(chunks: &[&[u8]], max: usize) -> Result<Vec<Vec<u8>>, LineTooLong> {
        let mut s = LineSplitter::new(max);
        let mut out = Vec::new();
        for c in chunks {
            s.push(Bytes::copy_from_slice(c));
            while let Some(l) = s.next_line()? {
                out.push(l.to_vec());
            }
        }
        if let Some(l) = s.finish() {
            out.push(l.to_vec());
        }
        Ok(out)
    }

    #[test]
    fn splits_lines_across_chunks() {
        let got = lines_of(&[b"{\"a\":1}\n{\"b\"", b":2}\r\n\n  \n{\"c\":3}"], 100).unwrap();
        assert_eq!(
            got,
            vec![
                b"{\"a\":1}".to_vec(),
                b"{\"b\":2}".to_vec(),
                b"{\"c\":3}".to_vec()
            ]
        );
    }

    #[test]
    fn long_lines_fail_without_buffering_past_the_limit() {
        let mut s = LineSplitter::new(1000);
        for _ in 0..100 {
            s.push(Bytes::from(vec![b'x'; 64]));
            if s.next_line().is_err() {
                assert!(s.buffered_len() <= 1000);
                return;
            }
            assert!(s.buffered_len() <= 1000);
        }
        panic!("a 6400-byte line must exceed a 1000-byte limit");
    }

    proptest! {
        #[test]
        fn splitting_does_not_change_lines(input in proptest::collection::vec(prop_oneof![Just(b'\n'), Just(b'\r'), Just(b' '), Just(b'x')], 0..200), cuts in proptest::collection::vec(0usize..200, 0..10)) {
            let whole = lines_of(&[&input], 50);
            let mut points: Vec<usize> = cuts.into_iter().map(|c| c.min(input.len())).collect();
            points.sort();
            let mut chunks: Vec<&[u8]> = Vec::new();
            let mut prev = 0;
            for p in points {
                chunks.push(&input[prev..p]);
                prev = p;
            }
            chunks.push(&input[prev..]);
            prop_assert_eq!(whole, lines_of(&chunks, 50));
        }
    }
}
