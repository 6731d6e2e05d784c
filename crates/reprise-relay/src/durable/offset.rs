//! Durable Streams offsets: opaque to clients, here the seq of the last
//! message before the position, zero-padded to 16 digits so that offsets
//! sort as text the way they sort as numbers. A leaf of `durable`.

use reprise_core::Seq;

use super::error::DsError;

/// Where a read starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// `-1`, or no offset: the stream's beginning.
    Beginning,
    /// `now`: the tail at the time of the request.
    Now,
    /// After the message with this seq (`Seq::ZERO`: the beginning).
    After(Seq),
}

/// The offset of the position after `seq`.
pub fn format(seq: Seq) -> String {
    format!("{:016}", seq.0)
}

/// Parses an `offset` query value.
pub fn parse(raw: &str) -> Result<Start, DsError> {
    match raw {
        "-1" => Ok(Start::Beginning),
        "now" => Ok(Start::Now),
        s if s.len() == 16 && s.bytes().all(|b| b.is_ascii_digit()) => s
            .parse::<u64>()
            .map(|n| Start::After(Seq(n)))
            .map_err(|_| DsError::BadRequest(format!("malformed offset {raw:?}"))),
        _ => Err(DsError::BadRequest(format!("malformed offset {raw:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_sort_as_text_like_seqs() {
        let a = format(Seq(9));
        let b = format(Seq(10));
        assert!(a < b);
        assert_eq!(parse(&b).unwrap(), Start::After(Seq(10)));
        assert_eq!(parse("-1").unwrap(), Start::Beginning);
        assert_eq!(parse("now").unwrap(), Start::Now);
        assert!(parse("12").is_err());
        assert!(parse("abc").is_err());
    }
}
