//! The wire formats people put Reprise in front of, end to end: realistic
//! transcripts of OpenAI chat completions, Anthropic Messages (with and
//! without a mid-stream `error` event), the Vercel AI SDK UI message stream
//! and Ollama's NDJSON, served by the scriptable upstream.
//!
//! Each transcript is read directly from the upstream and through Reprise
//! with an SSE parser independent of Reprise's; the two readings must agree
//! event for event (type, data, retry; Reprise replaces ids). Each stream is
//! then resumed mid-flight and from every position, and every event must
//! arrive exactly once. Every scenario runs against both stores.

use bytes::Bytes;
use reprise_tests::on_both_stores;
use reprise_tests::relay::{chat_config, Backend, TestRelay};
use reprise_tests::{
    open_sse, read_raw, RawResponse, Reply, SseClient, SseEvent, SseResponse, Upstream,
};
use serde_json::{json, Value};

on_both_stores!(
    openai_chat_completions,
    anthropic_messages,
    anthropic_error_event_is_forwarded_as_upstream_event,
    ai_sdk_ui_message_stream,
    ollama_ndjson,
);

/// Network segments split the wire anywhere (inside a line, a field name, a
/// UTF-8 sequence): the full transcripts are served in chunks of this size.
const SEGMENT: usize = 61;

/// One upstream's answer to one request, as it goes over the wire.
#[derive(Clone)]
struct Transcript {
    /// Path the client posts to (the route `/` or `/api/chat` forwards it as is).
    path: &'static str,
    /// The request body the client sends.
    request: Value,
    /// Response headers set by the upstream (on top of the fixture's SSE defaults).
    headers: Vec<(&'static str, &'static str)>,
    /// The wire text of each event, blank line included, in order.
    events: Vec<String>,
    /// The AI SDK resume URL of this request's chat, if the route has one.
    resume_template: Option<String>,
}

impl Transcript {
    fn wire(&self) -> Bytes {
        Bytes::from(self.events.concat())
    }

    fn with_headers(&self, mut reply: Reply) -> Reply {
        for (name, value) in &self.headers {
            reply = reply.header(name, value);
        }
        reply
    }

    /// The whole transcript, in [`SEGMENT`]-byte chunks.
    fn segmented_reply(&self) -> Reply {
        self.with_headers(Reply::sse(segments(&self.wire(), SEGMENT)))
    }
}

fn segments(wire: &Bytes, size: usize) -> Vec<Bytes> {
    (0..wire.len())
        .step_by(size)
        .map(|at| wire.slice(at..(at + size).min(wire.len())))
        .collect()
}

/// `data: <json>` as one SSE event.
fn data_event(data: &Value) -> String {
    format!("data: {data}\n\n")
}

/// `event: <name>` with `data: <json>`, as Anthropic sends them.
fn named_event(name: &str, data: &Value) -> String {
    format!("event: {name}\ndata: {data}\n\n")
}

/// (event type, data, retry in ms): what an EventSource sees of an event.
type Seen = (String, String, Option<u128>);

fn seen(events: &[SseEvent]) -> Vec<Seen> {
    events
        .iter()
        .map(|e| {
            (
                e.event.clone(),
                e.data.clone(),
                e.retry.map(|r| r.as_millis()),
            )
        })
        .collect()
}

fn ids(events: &[SseEvent]) -> Vec<&str> {
    events.iter().map(|e| e.id.as_str()).collect()
}

/// OpenAI chat completions with `stream_options.include_usage`: chunks, a
/// final usage chunk with empty `choices`, then `[DONE]`.
fn openai_transcript() -> Transcript {
    let chunk = |choices: Value, usage: Value| {
        json!({
            "id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
            "object": "chat.completion.chunk",
            "created": 1741570283,
            "model": "gpt-4o-2024-08-06",
            "service_tier": "default",
            "system_fingerprint": "fp_eb9dce56a8",
            "choices": choices,
            "usage": usage,
        })
    };
    let delta = |delta: Value, finish: Value| json!([{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]);
    let mut events = vec![data_event(&chunk(
        delta(
            json!({"role": "assistant", "content": "", "refusal": null}),
            Value::Null,
        ),
        Value::Null,
    ))];
    for piece in ["Bon", "jour", " à", " vous", " 👋", "!"] {
        events.push(data_event(&chunk(
            delta(json!({"content": piece}), Value::Null),
            Value::Null,
        )));
    }
    events.push(data_event(&chunk(
        delta(json!({}), json!("stop")),
        Value::Null,
    )));
    events.push(data_event(&chunk(
        json!([]),
        json!({
            "prompt_tokens": 19,
            "completion_tokens": 7,
            "total_tokens": 26,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0
            }
        }),
    )));
    events.push("data: [DONE]\n\n".to_owned());
    Transcript {
        path: "/v1/chat/completions",
        request: json!({
            "model": "gpt-4o",
            "stream": true,
            "stream_options": {"include_usage": true},
            "messages": [{"role": "user", "content": "Say hello in French."}]
        }),
        headers: vec![
            ("content-type", "text/event-stream; charset=utf-8"),
            ("x-request-id", "req_7b0b5e8f3f2c4e1d9a6b"),
            ("openai-processing-ms", "181"),
        ],
        events,
        resume_template: None,
    }
}

/// Anthropic Messages: named events with pings anywhere, a text block and a
/// tool-use block streamed as partial JSON, no `[DONE]`. With `error`, the
/// stream stops after the first text deltas with the upstream's own
/// `event: error` (an overloaded API), and the upstream closes normally.
fn anthropic_transcript(error: bool) -> Transcript {
    let ping = || named_event("ping", &json!({"type": "ping"}));
    let text_delta = |text: &str| {
        named_event(
            "content_block_delta",
            &json!({"type": "content_block_delta", "index": 0,
                    "delta": {"type": "text_delta", "text": text}}),
        )
    };
    let mut events = vec![
        named_event(
            "message_start",
            &json!({"type": "message_start", "message": {
                "id": "msg_01XFDUDYJgAACzvnptvVoYEL", "type": "message", "role": "assistant",
                "content": [], "model": "claude-sonnet-4-5", "stop_reason": null,
                "stop_sequence": null, "usage": {"input_tokens": 472, "output_tokens": 2}}}),
        ),
        ping(),
        named_event(
            "content_block_start",
            &json!({"type": "content_block_start", "index": 0,
                    "content_block": {"type": "text", "text": ""}}),
        ),
        text_delta("Okay, let me"),
        ping(),
        text_delta(" check the weather — ☀️ or 🌧"),
    ];
    if error {
        events.push(named_event(
            "error",
            &json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
        ));
    } else {
        events.extend([
            named_event("content_block_stop", &json!({"type": "content_block_stop", "index": 0})),
            named_event(
                "content_block_start",
                &json!({"type": "content_block_start", "index": 1, "content_block": {
                    "type": "tool_use", "id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6",
                    "name": "get_weather", "input": {}}}),
            ),
            named_event(
                "content_block_delta",
                &json!({"type": "content_block_delta", "index": 1,
                        "delta": {"type": "input_json_delta", "partial_json": ""}}),
            ),
            named_event(
                "content_block_delta",
                &json!({"type": "content_block_delta", "index": 1,
                        "delta": {"type": "input_json_delta", "partial_json": "{\"location\": \"San Fra"}}),
            ),
            ping(),
            named_event(
                "content_block_delta",
                &json!({"type": "content_block_delta", "index": 1,
                        "delta": {"type": "input_json_delta", "partial_json": "ncisco, CA\"}"}}),
            ),
            named_event("content_block_stop", &json!({"type": "content_block_stop", "index": 1})),
            named_event(
                "message_delta",
                &json!({"type": "message_delta",
                        "delta": {"stop_reason": "tool_use", "stop_sequence": null},
                        "usage": {"output_tokens": 89}}),
            ),
            named_event("message_stop", &json!({"type": "message_stop"})),
        ]);
    }
    Transcript {
        path: "/v1/messages",
        request: json!({
            "model": "claude-sonnet-4-5",
            "max_tokens": 1024,
            "stream": true,
            "messages": [{"role": "user", "content": "What's the weather in San Francisco?"}]
        }),
        headers: vec![("request-id", "req_011CRcYxLD6Xk4wW3fQe4z7P")],
        events,
        resume_template: None,
    }
}

/// The Vercel AI SDK (v5) UI message stream: `data: <part>` events ending
/// with `data: [DONE]`, marked by `x-vercel-ai-ui-message-stream: v1`.
fn ai_sdk_transcript(chat_id: &str) -> Transcript {
    let mut parts = vec![
        json!({"type": "start", "messageId": "msg-kZ2vV4h0rGhQ"}),
        json!({"type": "start-step"}),
        json!({"type": "text-start", "id": "txt-0"}),
    ];
    for delta in ["Resumable", " streams", " survive", " a", " reload", " ✨"] {
        parts.push(json!({"type": "text-delta", "id": "txt-0", "delta": delta}));
    }
    parts.extend([
        json!({"type": "text-end", "id": "txt-0"}),
        json!({"type": "finish-step"}),
        json!({"type": "finish", "finishReason": "stop"}),
    ]);
    let mut events: Vec<String> = parts.iter().map(data_event).collect();
    events.push("data: [DONE]\n\n".to_owned());
    Transcript {
        path: "/api/chat",
        request: json!({
            "id": chat_id,
            "messages": [{"id": "u1", "role": "user", "parts": [{"type": "text", "text": "hi"}]}],
            "trigger": "submit-message"
        }),
        headers: vec![
            ("x-vercel-ai-ui-message-stream", "v1"),
            ("x-accel-buffering", "no"),
        ],
        events,
        resume_template: Some(format!("/api/chat/{chat_id}/stream")),
    }
}

/// The relay under test and, with Redis, a second instance on the same store
/// that never saw the streams: its resumes are read from Redis, not from the
/// producing instance's memory.
async fn relays(upstream: &Upstream, backend: &Backend) -> (TestRelay, Option<TestRelay>) {
    let config = chat_config(&upstream.url(), backend);
    let other = match backend {
        Backend::Redis(_) => Some(TestRelay::start(config.clone()).await),
        Backend::Memory => None,
    };
    (TestRelay::start(config).await, other)
}

/// Every start position `0..=len`, each paired with the base URL of the
/// relay that serves it (both instances in turn, when there are two).
///
/// Ascending, so the second instance reads position 0 to the stream's end
/// (from the store) before it is asked about position `len`: by then it
/// knows the stream ended and must answer `204`, with no race against the
/// first instance's store writer.
fn positions(len: usize, relay: &TestRelay, other: Option<&TestRelay>) -> Vec<(usize, String)> {
    let mut bases = vec![relay.url()];
    bases.extend(other.map(TestRelay::url));
    (0..=len)
        .flat_map(|n| bases.iter().map(move |base| (n, base.clone())))
        .collect()
}

/// Checks `t` through Reprise against a direct read, then resumes it
/// mid-stream and from every position. Returns the events read through
/// Reprise (with Reprise's ids) for transcript-specific checks.
async fn transparent_and_resumable(backend: &Backend, t: &Transcript) -> Vec<SseEvent> {
    let upstream = Upstream::start().await;
    let (relay, other) = relays(&upstream, backend).await;
    let client = SseClient::new();
    let base = relay.url();
    let served = t.clone();
    upstream.respond(move |_| served.segmented_reply());

    // The same events directly and through Reprise.
    let mut direct =
        open_sse(client.post_json(&format!("{}{}", upstream.url(), t.path), &t.request)).await;
    assert_eq!(direct.status(), 200);
    let direct_events = direct.collect_until_end().await;
    assert_eq!(
        direct_events.len(),
        t.events.len(),
        "the transcript parses as one event per entry"
    );
    let mut via = open_sse(client.post_json(&format!("{base}{}", t.path), &t.request)).await;
    assert_eq!(via.status(), 200);
    assert_eq!(via.header("content-type"), direct.header("content-type"));
    for (name, value) in &t.headers {
        assert_eq!(
            via.header(name),
            Some(*value),
            "upstream header {name} reaches the client"
        );
    }
    let stream_id = via
        .header("reprise-stream-id")
        .expect("reprise-stream-id")
        .to_owned();
    let via_events = via.collect_until_end().await;
    assert_eq!(seen(&via_events), seen(&direct_events));

    // Reprise's ids name the stream and increase strictly.
    let via_ids = ids(&via_events);
    assert!(
        via_ids
            .iter()
            .all(|id| id.starts_with(&format!("{stream_id}."))),
        "{via_ids:?}"
    );
    assert!(via_ids.windows(2).all(|w| w[0] < w[1]), "{via_ids:?}");

    // From every position, the rest of the stream exactly once, ids included;
    // after the last event, 204.
    for (n, reader) in positions(via_events.len(), &relay, other.as_ref()) {
        let url = format!("{reader}/_reprise/streams/{stream_id}?start_index={n}");
        let mut rest = client.open_get(&url).await;
        if n == via_events.len() {
            assert_eq!(rest.status(), 204, "start_index={n}");
            continue;
        }
        assert_eq!(rest.status(), 200, "start_index={n}");
        assert_eq!(rest.header("content-type"), direct.header("content-type"));
        assert_eq!(
            rest.collect_until_end().await,
            via_events[n..],
            "start_index={n}"
        );
    }
    let done = open_sse(
        client
            .get(&format!("{base}{}", t.path))
            .header("last-event-id", via_ids[via_ids.len() - 1]),
    )
    .await;
    assert_eq!(done.status(), 204, "resuming after the last event");

    resumed_mid_stream(&upstream, &relay, t, &seen(&direct_events)).await;
    assert_eq!(
        upstream.request_count(),
        3,
        "resumes must never reach the upstream"
    );
    relay.stop().await;
    if let Some(other) = other {
        other.stop().await;
    }
    via_events
}

/// A live stream read in three pieces by three connections: the first
/// drops mid-stream, the second resumes from the store after more events
/// arrived, the third resumes and follows the stream live to its end.
/// Together they read `expected` exactly once. With a resume template, a
/// reader joining by key mid-stream reads the whole stream once.
async fn resumed_mid_stream(
    upstream: &Upstream,
    relay: &TestRelay,
    t: &Transcript,
    expected: &[Seen],
) {
    let client = SseClient::new();
    let base = relay.url();
    let (reply, ctl) = Reply::controlled();
    upstream.respond_once(t.with_headers(reply));
    let (a, b) = (t.events.len() / 3, 2 * t.events.len() / 3);

    let mut first = open_sse(client.post_json(&format!("{base}{}", t.path), &t.request)).await;
    assert_eq!(first.status(), 200);
    let content_type = first.header("content-type").map(str::to_owned);
    for event in &t.events[..a] {
        ctl.send(event.clone()).await;
    }
    let mut got = first.next_events(a).await;
    let mut by_key: Option<SseResponse> = None;
    if let Some(template) = &t.resume_template {
        let reader = client.open_get(&format!("{base}{template}")).await;
        assert_eq!(reader.status(), 200, "the resume template mid-stream");
        assert_eq!(reader.header("content-type"), content_type.as_deref());
        for (name, value) in &t.headers {
            if name.starts_with("x-vercel-ai-") {
                assert_eq!(
                    reader.header(name),
                    Some(*value),
                    "{name} on the key resume"
                );
            }
        }
        by_key = Some(reader);
    }
    first.disconnect();

    for event in &t.events[a..b] {
        ctl.send(event.clone()).await;
    }
    let last_id = got.last().map(|e| e.id.clone()).expect("a first event");
    let mut second = open_sse(
        client
            .get(&format!("{base}{}", t.path))
            .header("last-event-id", &last_id),
    )
    .await;
    assert_eq!(second.status(), 200);
    assert_eq!(second.header("content-type"), content_type.as_deref());
    got.extend(second.next_events(b - a).await);
    second.disconnect();

    let last_id = got.last().map(|e| e.id.clone()).expect("events");
    let mut third = open_sse(
        client
            .get(&format!("{base}{}", t.path))
            .header("last-event-id", &last_id),
    )
    .await;
    assert_eq!(third.status(), 200);
    for event in &t.events[b..] {
        ctl.send(event.clone()).await;
    }
    ctl.finish();
    got.extend(third.collect_until_end().await);
    assert_eq!(
        seen(&got),
        expected,
        "three connections read every event exactly once"
    );
    let got_ids = ids(&got);
    assert!(got_ids.windows(2).all(|w| w[0] < w[1]), "{got_ids:?}");

    if let (Some(mut reader), Some(template)) = (by_key, &t.resume_template) {
        let all = reader.collect_until_end().await;
        assert_eq!(all, got, "the key resume reads the whole stream once");
        // The AI SDK convention: a finished stream is not resumed by key.
        let after = client.open_get(&format!("{base}{template}")).await;
        assert_eq!(after.status(), 204);
    }
}

async fn openai_chat_completions(backend: Backend) {
    let t = openai_transcript();
    let events = transparent_and_resumable(&backend, &t).await;
    assert!(events
        .iter()
        .all(|e| e.event == "message" && e.retry.is_none()));
    let text: String = events[..events.len() - 1]
        .iter()
        .filter_map(|e| {
            e.json()["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(text, "Bonjour à vous 👋!");
    let usage = events[events.len() - 2].json();
    assert_eq!(
        usage["choices"],
        json!([]),
        "the usage chunk has empty choices"
    );
    assert_eq!(usage["usage"]["total_tokens"], 26);
    assert_eq!(events[events.len() - 1].data, "[DONE]");
}

async fn anthropic_messages(backend: Backend) {
    let t = anthropic_transcript(false);
    let events = transparent_and_resumable(&backend, &t).await;
    let names: Vec<&str> = events.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(
        names,
        [
            "message_start",
            "ping",
            "content_block_start",
            "content_block_delta",
            "ping",
            "content_block_delta",
            "content_block_stop",
            "content_block_start",
            "content_block_delta",
            "content_block_delta",
            "ping",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop",
        ]
    );
    // Each event's data still says its own type, as Anthropic's SDKs check.
    for e in &events {
        assert_eq!(e.json()["type"], e.event.as_str());
    }
    let tool_input: String = events
        .iter()
        .filter_map(|e| {
            e.json()["delta"]["partial_json"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(
        serde_json::from_str::<Value>(&tool_input).expect("tool input JSON"),
        json!({"location": "San Francisco, CA"})
    );
}

/// An upstream `event: error` is the upstream's own event: forwarded and
/// recorded like any other, not a Reprise failure (no `reprise-error`), and
/// the stream completes when the upstream closes.
async fn anthropic_error_event_is_forwarded_as_upstream_event(backend: Backend) {
    let t = anthropic_transcript(true);
    let events = transparent_and_resumable(&backend, &t).await;
    let last = events.last().expect("events");
    assert_eq!(last.event, "error");
    assert_eq!(
        last.json(),
        json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    );
    assert!(
        events.iter().all(|e| e.event != "reprise-error"),
        "{events:?}"
    );
}

async fn ai_sdk_ui_message_stream(backend: Backend) {
    let t = ai_sdk_transcript("chat-formats-1");
    let events = transparent_and_resumable(&backend, &t).await;
    let types: Vec<String> = events[..events.len() - 1]
        .iter()
        .map(|e| e.json()["type"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(types.first().map(String::as_str), Some("start"));
    assert_eq!(types.last().map(String::as_str), Some("finish"));
    let text: String = events
        .iter()
        .filter(|e| e.data != "[DONE]")
        .filter_map(|e| e.json()["delta"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(text, "Resumable streams survive a reload ✨");
    assert_eq!(events.last().map(|e| e.data.as_str()), Some("[DONE]"));
    assert!(
        events.iter().all(|e| e.event == "message"),
        "no event names added"
    );
}

/// Ollama's `/api/chat`: one JSON object per line, the last `"done": true`.
fn ollama_lines() -> Vec<String> {
    let mut lines: Vec<String> = ["The", " sky", " is", " blue", " — 🌤", "."]
        .iter()
        .enumerate()
        .map(|(i, piece)| {
            json!({
                "model": "llama3.2",
                "created_at": format!("2025-03-10T10:31:{:02}.{:06}Z", 12 + i, 118_000 + 37 * i),
                "message": {"role": "assistant", "content": piece},
                "done": false
            })
            .to_string()
        })
        .collect();
    lines.push(
        json!({
            "model": "llama3.2",
            "created_at": "2025-03-10T10:31:18.604170Z",
            "message": {"role": "assistant", "content": ""},
            "done_reason": "stop",
            "done": true,
            "total_duration": 4883583458u64,
            "load_duration": 1334875,
            "prompt_eval_count": 26,
            "prompt_eval_duration": 342546000,
            "eval_count": 7,
            "eval_duration": 4535599000u64
        })
        .to_string(),
    );
    lines.into_iter().map(|line| line + "\n").collect()
}

/// NDJSON is forwarded line for line, and resumed by `start_index` in the
/// original format, never as SSE.
async fn ollama_ndjson(backend: Backend) {
    let upstream = Upstream::start().await;
    let (relay, other) = relays(&upstream, &backend).await;
    let client = SseClient::new();
    let base = relay.url();
    let lines = ollama_lines();
    let wire = Bytes::from(lines.concat());
    let ndjson = |reply: Reply| reply.header("content-type", "application/x-ndjson");
    let served = wire.clone();
    upstream.respond(move |_| ndjson(Reply::sse(segments(&served, SEGMENT))));
    let request = json!({
        "model": "llama3.2",
        "messages": [{"role": "user", "content": "Why is the sky blue?"}]
    });
    let post = |url: String| client.post_json(&url, &request);

    let (status, headers, direct) = read_raw(post(format!("{}/api/chat", upstream.url()))).await;
    assert_eq!(status, 200);
    assert_eq!(direct.bytes, wire);
    let via = RawResponse::open(post(format!("{base}/api/chat"))).await;
    assert_eq!(via.status(), 200);
    assert_eq!(via.header("content-type"), Some("application/x-ndjson"));
    assert_eq!(
        via.headers().get("content-type"),
        headers.get("content-type")
    );
    let stream_id = via
        .header("reprise-stream-id")
        .expect("reprise-stream-id")
        .to_owned();
    let via_body = via.read_to_end().await;
    assert_eq!(via_body.error, None);
    assert_eq!(
        via_body.bytes, wire,
        "NDJSON through Reprise is byte for byte the upstream's"
    );
    let last: Value = serde_json::from_str(lines[lines.len() - 1].trim_end()).expect("JSON line");
    assert_eq!(last["done"], true);

    for (n, reader) in positions(lines.len(), &relay, other.as_ref()) {
        let url = format!("{reader}/_reprise/streams/{stream_id}?start_index={n}");
        let (status, headers, rest) = read_raw(client.http().get(url)).await;
        if n == lines.len() {
            assert_eq!(status, 204, "start_index={n}");
            continue;
        }
        assert_eq!(status, 200, "start_index={n}");
        assert_eq!(
            headers.get("content-type").map(|v| v.as_bytes()),
            Some(&b"application/x-ndjson"[..])
        );
        assert_eq!(rest.text(), lines[n..].concat(), "start_index={n}");
    }

    // Mid-stream: a reader joining by start_index reads the rest as it comes.
    let (reply, ctl) = Reply::controlled();
    upstream.respond_once(ndjson(reply));
    let mut first = RawResponse::open(post(format!("{base}/api/chat"))).await;
    let stream_id = first
        .header("reprise-stream-id")
        .expect("reprise-stream-id")
        .to_owned();
    let k = 2;
    for line in &lines[..k] {
        ctl.send(line.clone()).await;
    }
    let head = first.read_until(lines[k - 1].as_bytes()).await;
    assert_eq!(head, lines[..k].concat().as_bytes());
    let url = format!("{base}/_reprise/streams/{stream_id}?start_index={k}");
    let mut resumed = RawResponse::open(client.http().get(url)).await;
    assert_eq!(resumed.status(), 200);
    assert_eq!(resumed.header("content-type"), Some("application/x-ndjson"));
    ctl.send(lines[k].clone()).await;
    assert_eq!(
        resumed.read_until(b"\n").await,
        lines[k].as_bytes(),
        "live after the replay"
    );
    for line in &lines[k + 1..] {
        ctl.send(line.clone()).await;
    }
    ctl.finish();
    let rest = resumed.read_to_end().await;
    assert_eq!(rest.error, None);
    assert_eq!(rest.text(), lines[k + 1..].concat());
    let first_rest = first.read_to_end().await;
    assert_eq!(first_rest.text(), lines[k..].concat());
    assert_eq!(
        upstream.request_count(),
        3,
        "resumes must never reach the upstream"
    );
    relay.stop().await;
    if let Some(other) = other {
        other.stop().await;
    }
}
