//! How a stream ended, and the in-band signals readers receive.
//!
//! The terminal entry of every stream is an [`Outcome`]. Readers of a stream
//! that did not complete normally receive one final SSE event named
//! `reprise-error` before the connection closes (see [`signal_data`]; the
//! frame around it is written by [`crate::wire`]). Its
//! `data` is JSON shaped like the Vercel AI SDK's `error` UI-message part, so
//! an AI SDK client shows it as an error, while an `EventSource` client only
//! sees it when it listens for `reprise-error`: it never mixes with upstream
//! `message` events. That is the `reprise` dialect; a route's `signals`
//! setting may pick the client API's own error shape instead (see
//! [`crate::dialect`]).

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::ids::StreamId;

/// The SSE event name of every in-band signal Reprise itself emits.
pub const SIGNAL_EVENT: &str = "reprise-error";

/// Why a stream failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailReason {
    /// The upstream connection broke before the body ended (reset, truncated chunking).
    UpstreamReset,
    /// The upstream stopped sending for longer than the idle timeout, or the
    /// stream exceeded its maximum duration.
    UpstreamTimeout,
    /// The upstream sent something that is not a valid event stream within
    /// Reprise's limits (a line or event over the size limit).
    UpstreamProtocol,
    /// The stream exceeded its configured maximum number of events or bytes.
    StreamTooLarge,
    /// Reprise shut down before the upstream finished.
    Interrupted,
    /// The instance recording the stream stopped renewing its lease.
    ProducerLost,
}

impl FailReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            FailReason::UpstreamReset => "upstream_reset",
            FailReason::UpstreamTimeout => "upstream_timeout",
            FailReason::UpstreamProtocol => "upstream_protocol",
            FailReason::StreamTooLarge => "stream_too_large",
            FailReason::Interrupted => "interrupted",
            FailReason::ProducerLost => "producer_lost",
        }
    }
}

impl fmt::Display for FailReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The terminal entry of a stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Outcome {
    Completed,
    Failed { reason: FailReason, message: String },
    Cancelled,
}

impl Outcome {
    pub fn is_completed(&self) -> bool {
        matches!(self, Outcome::Completed)
    }

    /// The signal readers get for this outcome, or `None` for a normal end.
    pub fn signal(&self) -> Option<Signal<'_>> {
        match self {
            Outcome::Completed => None,
            Outcome::Failed { reason, message } => Some(Signal {
                code: reason.as_str(),
                message,
            }),
            Outcome::Cancelled => Some(Signal {
                code: "cancelled",
                message: "the stream was cancelled",
            }),
        }
    }

    /// Short label for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::Failed { .. } => "failed",
            Outcome::Cancelled => "cancelled",
        }
    }
}

/// An in-band signal: a machine-readable code and a human-readable message.
#[derive(Clone, Copy, Debug)]
pub struct Signal<'a> {
    pub code: &'a str,
    pub message: &'a str,
}

impl Signal<'static> {
    /// The reader's `Last-Event-ID` names a stream or position that is no
    /// longer stored (expired, deleted, or lost with the store's data).
    pub const HISTORY_LOST: Signal<'static> = Signal {
        code: "history_lost",
        message: "the requested stream history is no longer available",
    };
}

#[derive(Serialize)]
struct SignalBody<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(rename = "errorText")]
    error_text: String,
    reprise: SignalDetail<'a>,
}

#[derive(Serialize)]
struct SignalDetail<'a> {
    code: &'a str,
    stream_id: String,
}

/// The `data` of a signal's SSE event in the `reprise` dialect (named
/// [`SIGNAL_EVENT`]), one line of JSON:
///
/// ```text
/// {"type":"error","errorText":"reprise: <message>","reprise":{"code":"<code>","stream_id":"<id>"}}
/// ```
pub fn signal_data(signal: Signal<'_>, stream: StreamId) -> String {
    let body = SignalBody {
        kind: "error",
        error_text: format!("reprise: {}", signal.message),
        reprise: SignalDetail {
            code: signal.code,
            stream_id: stream.to_string(),
        },
    };
    // serde_json never emits raw newlines in compact form, so this is one data line.
    serde_json::to_string(&body).unwrap_or_else(|_| "{}".to_string())
}

/// The NDJSON form of a signal: one line of JSON (without its line end,
/// see [`crate::wire`]) shaped like Ollama's errors,
/// `{"error":"reprise: <message> (<code>)","reprise":{"code":"<code>","stream_id":"<id>"}}`.
/// Ollama's clients raise with the `error` text alone, hence the code in it.
pub fn signal_line(signal: Signal<'_>, stream: StreamId) -> String {
    let body = serde_json::json!({
        "error": format!("reprise: {} ({})", signal.message, signal.code),
        "reprise": { "code": signal.code, "stream_id": stream.to_string() },
    });
    // Compact: no raw newline, so this stays one line.
    body.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcome_json_round_trips() {
        for o in [
            Outcome::Completed,
            Outcome::Cancelled,
            Outcome::Failed {
                reason: FailReason::UpstreamReset,
                message: "connection reset".into(),
            },
        ] {
            let s = serde_json::to_string(&o).unwrap();
            assert_eq!(serde_json::from_str::<Outcome>(&s).unwrap(), o);
        }
    }

    #[test]
    fn signal_frame_is_one_event_with_json_data() {
        let stream = StreamId::random();
        let o = Outcome::Failed {
            reason: FailReason::UpstreamTimeout,
            message: "line one\nline two\r".into(),
        };
        let f = crate::wire::sse_signal(crate::Dialect::Reprise, o.signal().unwrap(), stream, &"X");
        let lines: Vec<&str> = f.split('\n').collect();
        assert_eq!(lines.len(), 5, "{f:?}");
        assert_eq!(lines[0], "id: X");
        assert_eq!(lines[1], "event: reprise-error");
        let v: serde_json::Value =
            serde_json::from_str(lines[2].strip_prefix("data: ").unwrap()).unwrap();
        assert_eq!(v["type"], "error");
        assert_eq!(v["reprise"]["code"], "upstream_timeout");
        assert_eq!(v["reprise"]["stream_id"], stream.to_string());
        assert!(!f.contains('\r'));
    }
}
