//! How a stream's entries are framed on the wire.

use std::fmt;
use std::str::FromStr;

/// The framing of a recorded stream, chosen from the upstream's content type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Format {
    /// `text/event-stream`: one entry per dispatched event; Reprise adds `id:` lines.
    Sse,
    /// `application/x-ndjson` (Ollama): one entry per line, forwarded as is.
    Ndjson,
}

impl Format {
    pub fn as_str(&self) -> &'static str {
        match self {
            Format::Sse => "sse",
            Format::Ndjson => "ndjson",
        }
    }

    /// The recordable format of a response content type, if any.
    pub fn from_content_type(content_type: &str) -> Option<Format> {
        let mime = content_type.split(';').next().unwrap_or("").trim();
        if mime.eq_ignore_ascii_case("text/event-stream") {
            Some(Format::Sse)
        } else if mime.eq_ignore_ascii_case("application/x-ndjson")
            || mime.eq_ignore_ascii_case("application/ndjson")
            || mime.eq_ignore_ascii_case("application/jsonl")
        {
            Some(Format::Ndjson)
        } else {
            None
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "sse" => Ok(Format::Sse),
            "ndjson" => Ok(Format::Ndjson),
            other => Err(format!("unknown stream format {other:?}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_types() {
        assert_eq!(
            Format::from_content_type("text/event-stream; charset=utf-8"),
            Some(Format::Sse)
        );
        assert_eq!(
            Format::from_content_type("application/x-ndjson"),
            Some(Format::Ndjson)
        );
        assert_eq!(Format::from_content_type("application/json"), None);
        for f in [Format::Sse, Format::Ndjson] {
            assert_eq!(f.as_str().parse::<Format>().unwrap(), f);
        }
    }
}
