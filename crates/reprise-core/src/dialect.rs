//! The dialect of a stream's in-band signals: how a failure (and
//! `history_lost`, `cancelled`, ...) is spelled on an SSE stream so that the
//! client's own SDK raises on it.
//!
//! SDK stream helpers ignore events they do not know: openai's `.stream()`
//! helper drops an `event: reprise-error` silently, anthropic's
//! `messages.stream()` ends quietly on it. What makes each raise is its
//! API's own error shape, so a signal is written in the stream's dialect:
//!
//! | dialect     | wire |
//! |-------------|------|
//! | `reprise`   | `event: reprise-error` + `{"type":"error","errorText":...,"reprise":{...}}` |
//! | `openai`    | unnamed event, `{"error":{"message","type":"reprise_error","code",...},"reprise":{...}}` |
//! | `anthropic` | `event: error` + `{"type":"error","error":{"type":"api_error","message"},"reprise":{...}}` |
//! | `ai-sdk`    | unnamed event, `{"type":"error","errorText":...,"reprise":{...}}` |
//!
//! Every dialect keeps Reprise's machine-readable code in a `reprise`
//! member (`{"code", "stream_id"}`). NDJSON streams have a single dialect,
//! Ollama's `{"error": ...}` line (see [`crate::outcome::signal_line`]).
//! This module gives a signal's event name and data; [`crate::wire`] writes
//! the frame around them, `id:` line included.
//!
//! With `signals = "auto"` the producer picks the dialect from what the
//! stream shows ([`Dialect::from_headers`], then [`Dialect::from_event`] on
//! its first events).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::ids::StreamId;
use crate::outcome::{signal_data, Signal, SIGNAL_EVENT};

/// How in-band signals are written on an SSE stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Dialect {
    /// `event: reprise-error` (what Reprise always wrote before dialects).
    Reprise,
    /// OpenAI's error object (chat completions and Responses streams).
    #[serde(rename = "openai")]
    OpenAi,
    /// Anthropic Messages' `event: error`.
    Anthropic,
    /// The Vercel AI SDK's `error` UI message part.
    AiSdk,
}

/// Event names only Anthropic's Messages API sends (`ping` is left out:
/// other servers use it too).
const ANTHROPIC_EVENTS: [&str; 6] = [
    "message_start",
    "message_delta",
    "message_stop",
    "content_block_start",
    "content_block_delta",
    "content_block_stop",
];

/// Response headers that mark an AI SDK stream (UI message stream v5+, data
/// stream v4).
const AI_SDK_HEADERS: [&str; 2] = ["x-vercel-ai-ui-message-stream", "x-vercel-ai-data-stream"];

impl Dialect {
    pub fn as_str(&self) -> &'static str {
        match self {
            Dialect::Reprise => "reprise",
            Dialect::OpenAi => "openai",
            Dialect::Anthropic => "anthropic",
            Dialect::AiSdk => "ai-sdk",
        }
    }

    /// The dialect the response headers show, if any (lower-case names).
    pub fn from_headers(headers: &[(String, String)]) -> Option<Dialect> {
        headers
            .iter()
            .any(|(name, _)| AI_SDK_HEADERS.contains(&name.as_str()))
            .then_some(Dialect::AiSdk)
    }

    /// The dialect one event shows, if any, given its encoded fields
    /// (`event: …\ndata: …\n`, as `sse::encode_fields` writes them):
    /// Anthropic's event names; OpenAI's `response.*` event names or chat
    /// completion chunk objects.
    pub fn from_event(fields: &[u8]) -> Option<Dialect> {
        let mut name: Option<&[u8]> = None;
        let mut data: Vec<u8> = Vec::new();
        for line in fields.split(|&b| b == b'\n') {
            let (field, value) = match line.iter().position(|&b| b == b':') {
                Some(i) => (&line[..i], &line[i + 1..]),
                None => (line, &b""[..]),
            };
            let value = value.strip_prefix(b" ").unwrap_or(value);
            match field {
                b"event" => name = Some(value),
                b"data" => {
                    if !data.is_empty() {
                        data.push(b'\n');
                    }
                    data.extend_from_slice(value);
                }
                _ => {}
            }
        }
        if let Some(name) = name {
            if ANTHROPIC_EVENTS.iter().any(|e| e.as_bytes() == name) {
                return Some(Dialect::Anthropic);
            }
            if name.starts_with(b"response.") {
                return Some(Dialect::OpenAi);
            }
        }
        // Only a JSON object can be a chunk; skip the parse for anything else.
        if data.first() != Some(&b'{') {
            return None;
        }
        let value: serde_json::Value = serde_json::from_slice(&data).ok()?;
        match value.get("object").and_then(|o| o.as_str()) {
            Some("chat.completion.chunk") | Some("text_completion") => Some(Dialect::OpenAi),
            _ => None,
        }
    }
}

impl fmt::Display for Dialect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Dialect {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "reprise" => Ok(Dialect::Reprise),
            "openai" => Ok(Dialect::OpenAi),
            "anthropic" => Ok(Dialect::Anthropic),
            "ai-sdk" => Ok(Dialect::AiSdk),
            other => Err(format!("unknown signal dialect {other:?}")),
        }
    }
}

#[derive(Serialize)]
struct Detail<'a> {
    code: &'a str,
    stream_id: String,
}

/// A signal as one SSE event in `dialect`: its event name (`None`: an
/// unnamed event) and its `data`, one line of JSON. The `reprise` dialect
/// is [`signal_data`] in an event named [`SIGNAL_EVENT`]; the others say
/// the code in their message too, since that is what an SDK's exception
/// shows. The frame (`id:` line and all) is written by [`crate::wire`].
pub fn signal_event(
    dialect: Dialect,
    signal: Signal<'_>,
    stream: StreamId,
) -> (Option<&'static str>, String) {
    let detail = Detail {
        code: signal.code,
        stream_id: stream.to_string(),
    };
    let message = format!("reprise: {} ({})", signal.message, signal.code);
    // serde_json never emits raw newlines in compact form, so every body
    // below is one data line.
    let (event, body) = match dialect {
        Dialect::Reprise => return (Some(SIGNAL_EVENT), signal_data(signal, stream)),
        // openai-python and openai-node raise `APIError` on any unnamed
        // event whose data has an `error` member, for chat completions and
        // Responses streams alike; `code` and `type` become the exception's.
        Dialect::OpenAi => (
            None,
            serde_json::json!({
                "error": {
                    "message": message,
                    "type": "reprise_error",
                    "code": signal.code,
                    "param": null,
                },
                "reprise": detail,
            }),
        ),
        // Anthropic's SDKs raise on `event: error` whatever its data.
        Dialect::Anthropic => (
            Some("error"),
            serde_json::json!({
                "type": "error",
                "error": { "type": "api_error", "message": message },
                "reprise": detail,
            }),
        ),
        // The AI SDK parses every event's data as a UI message chunk; an
        // unknown `event:` name is not safe there, so the event is unnamed.
        Dialect::AiSdk => (
            None,
            serde_json::json!({
                "type": "error",
                "errorText": message,
                "reprise": detail,
            }),
        ),
    };
    (event, body.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcome::{FailReason, Outcome};
    use crate::wire::sse_signal;
    use serde_json::Value;

    /// (event name, data JSON) of a one-event frame; panics on anything else.
    fn parse(frame: &str) -> (Option<String>, Value) {
        assert!(frame.ends_with("\n\n"), "{frame:?}");
        let lines: Vec<&str> = frame.trim_end_matches('\n').split('\n').collect();
        assert!(lines[0].starts_with("id: "), "{frame:?}");
        let (event, data) = match lines.len() {
            2 => (None, lines[1]),
            3 => (
                Some(lines[1].strip_prefix("event: ").unwrap().to_string()),
                lines[2],
            ),
            _ => panic!("not one event: {frame:?}"),
        };
        let data = data.strip_prefix("data: ").unwrap();
        (event, serde_json::from_str(data).unwrap())
    }

    fn reset() -> Outcome {
        Outcome::Failed {
            reason: FailReason::UpstreamReset,
            message: "line one\nline two".into(),
        }
    }

    #[test]
    fn reprise_dialect_is_the_reprise_error_event() {
        let s = StreamId::random();
        let o = reset();
        let sig = o.signal().unwrap();
        assert_eq!(
            signal_event(Dialect::Reprise, sig, s),
            (Some("reprise-error"), signal_data(sig, s))
        );
        let (event, data) = parse(&sse_signal(Dialect::Reprise, sig, s, &"X"));
        assert_eq!(event.as_deref(), Some("reprise-error"));
        assert_eq!(data["reprise"]["code"], "upstream_reset");
    }

    #[test]
    fn openai_dialect_is_an_unnamed_error_object() {
        let s = StreamId::random();
        let o = reset();
        let (event, data) = parse(&sse_signal(Dialect::OpenAi, o.signal().unwrap(), s, &"X"));
        assert_eq!(event, None);
        let error = &data["error"];
        assert_eq!(error["type"], "reprise_error");
        assert_eq!(error["code"], "upstream_reset");
        let message = error["message"].as_str().unwrap();
        assert!(
            message.starts_with("reprise: line one\nline two"),
            "{message}"
        );
        assert!(message.ends_with("(upstream_reset)"), "{message}");
        assert_eq!(data["reprise"]["code"], "upstream_reset");
        assert_eq!(data["reprise"]["stream_id"], s.to_string());
    }

    #[test]
    fn anthropic_dialect_is_an_error_event() {
        let s = StreamId::random();
        let (event, data) = parse(&sse_signal(
            Dialect::Anthropic,
            Signal::HISTORY_LOST,
            s,
            &"X",
        ));
        assert_eq!(event.as_deref(), Some("error"));
        assert_eq!(data["type"], "error");
        assert_eq!(data["error"]["type"], "api_error");
        assert!(data["error"]["message"]
            .as_str()
            .unwrap()
            .contains("history_lost"));
        assert_eq!(data["reprise"]["code"], "history_lost");
    }

    #[test]
    fn ai_sdk_dialect_is_an_unnamed_error_part() {
        let s = StreamId::random();
        let (event, data) = parse(&sse_signal(
            Dialect::AiSdk,
            Outcome::Cancelled.signal().unwrap(),
            s,
            &"X",
        ));
        assert_eq!(event, None);
        assert_eq!(data["type"], "error");
        assert!(data["errorText"]
            .as_str()
            .unwrap()
            .starts_with("reprise: the stream was cancelled"));
        assert_eq!(data["reprise"]["code"], "cancelled");
    }

    #[test]
    fn names_round_trip() {
        for d in [
            Dialect::Reprise,
            Dialect::OpenAi,
            Dialect::Anthropic,
            Dialect::AiSdk,
        ] {
            assert_eq!(d.as_str().parse::<Dialect>().unwrap(), d);
            let json = serde_json::to_string(&d).unwrap();
            assert_eq!(json, format!("\"{d}\""));
            assert_eq!(serde_json::from_str::<Dialect>(&json).unwrap(), d);
        }
        assert!("auto".parse::<Dialect>().is_err());
    }

    #[test]
    fn detection_from_what_the_stream_shows() {
        let h = |n: &str| vec![(n.to_string(), "v1".to_string())];
        assert_eq!(
            Dialect::from_headers(&h("x-vercel-ai-ui-message-stream")),
            Some(Dialect::AiSdk)
        );
        assert_eq!(
            Dialect::from_headers(&h("x-vercel-ai-data-stream")),
            Some(Dialect::AiSdk)
        );
        assert_eq!(Dialect::from_headers(&h("content-type")), None);
        for (fields, want) in [
            (
                &b"event: message_start\ndata: {\"type\":\"message_start\"}\n"[..],
                Some(Dialect::Anthropic),
            ),
            (
                b"event: content_block_delta\ndata: {}\n",
                Some(Dialect::Anthropic),
            ),
            (
                b"event: response.created\ndata: {\"type\":\"response.created\"}\n",
                Some(Dialect::OpenAi),
            ),
            (
                b"data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[]}\n",
                Some(Dialect::OpenAi),
            ),
            // Azure's first chunk (content filter results) shows nothing.
            (b"data: {\"object\":\"\",\"choices\":[]}\n", None),
            (b"event: ping\ndata: {}\n", None),
            (b"data: [DONE]\n", None),
            (b"data: {\"type\":\"start\"}\n", None),
            (b"data: not json {\n", None),
        ] {
            assert_eq!(
                Dialect::from_event(fields),
                want,
                "{}",
                String::from_utf8_lossy(fields)
            );
        }
    }
}
