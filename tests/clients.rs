//! The official API clients through Reprise (client → **relay** → upstream):
//! `openai`, `anthropic` and `ollama` from PyPI (`tests/py/clients.py`) and
//! `openai` from npm (`tests/js/openai.mjs`), in front of mock upstreams that
//! speak each API's wire format — OpenAI chat completions SSE, OpenAI
//! Responses SSE, Anthropic Messages SSE, Ollama `/api/chat` NDJSON.
//!
//! - **Heartbeats no client can see**: each answer pauses for longer than
//!   `streams.heartbeat` (200 ms here) and then finishes; every client must
//!   get the whole answer, and a resume of the stream read with the same SDK
//!   must too.
//! - **Failures in the client's own dialect**: the upstream cuts the
//!   connection mid-answer. With `signals = "auto"` each SDK's streaming
//!   call — plain iteration and the stream helpers — must raise, after the
//!   same text, just as it raises on the broken upstream connection itself,
//!   with Reprise's code (`upstream_reset`) in the exception.

#[path = "py/python.rs"]
mod python;

#[path = "js/node.rs"]
mod node;

use std::time::Duration;

use bytes::Bytes;
use node::{node_script, NodeScript};
use python::{py_script, PyScript};
use reprise_relay::config::{Config, Signals};
use reprise_tests::redis::RedisServer;
use reprise_tests::relay::{config, Backend, TestRelay};
use reprise_tests::{with_timeout, Reply, StreamControl, Upstream};
use serde_json::{json, Value};

/// The answer every mock upstream gives, in pieces.
const WORDS: [&str; 6] = [
    "Reprise",
    " keeps",
    " every",
    " token",
    " of the",
    " answer ✓",
];
/// Pieces sent before the pause (or the cut).
const HEAD: usize = 2;

fn answer() -> String {
    WORDS.concat()
}

fn head_text() -> String {
    WORDS[..HEAD].concat()
}

/// The wire format a mock upstream speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Api {
    OpenAiChat,
    OpenAiResponses,
    Anthropic,
    Ollama,
}

fn sse(event: Option<&str>, data: &Value) -> Bytes {
    match event {
        Some(name) => Bytes::from(format!("event: {name}\ndata: {data}\n\n")),
        None => Bytes::from(format!("data: {data}\n\n")),
    }
}

fn chat_chunk(delta: Value, finish: Value) -> Bytes {
    sse(
        None,
        &json!({
            "id": "chatcmpl-r1", "object": "chat.completion.chunk", "created": 1_764_860_000,
            "model": "gpt-test", "system_fingerprint": null,
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
        }),
    )
}

fn response_object(status: &str, text: &str) -> Value {
    let output = if text.is_empty() {
        json!([])
    } else {
        json!([{
            "id": "msg_r1", "type": "message", "status": "completed", "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}],
        }])
    };
    json!({
        "id": "resp_r1", "object": "response", "created_at": 1_764_860_000, "status": status,
        "model": "gpt-test", "output": output, "parallel_tool_calls": true, "tool_choice": "auto",
        "tools": [], "top_p": 1.0, "temperature": 1.0, "error": null,
        "incomplete_details": null, "instructions": null, "metadata": {},
    })
}

fn ollama_line(content: &str, done: bool) -> Bytes {
    let mut v = json!({
        "model": "llama-test", "created_at": "2026-12-04T15:00:00Z",
        "message": {"role": "assistant", "content": content}, "done": done,
    });
    if done {
        v["done_reason"] = json!("stop");
        v["total_duration"] = json!(1_000_000);
        v["eval_count"] = json!(WORDS.len());
    }
    Bytes::from(format!("{v}\n"))
}

impl Api {
    /// The upstream body: what goes before the pause (or the cut), and the rest.
    fn wire(self) -> (Vec<Bytes>, Vec<Bytes>) {
        let mut head = Vec::new();
        let mut tail = Vec::new();
        match self {
            Api::OpenAiChat => {
                head.push(chat_chunk(
                    json!({"role": "assistant", "content": ""}),
                    Value::Null,
                ));
                for (i, w) in WORDS.iter().enumerate() {
                    let chunk = chat_chunk(json!({"content": w}), Value::Null);
                    (if i < HEAD { &mut head } else { &mut tail }).push(chunk);
                }
                tail.push(chat_chunk(json!({}), json!("stop")));
                tail.push(Bytes::from_static(b"data: [DONE]\n\n"));
            }
            Api::OpenAiResponses => {
                head.push(sse(
                    Some("response.created"),
                    &json!({"type": "response.created", "sequence_number": 0,
                            "response": response_object("in_progress", "")}),
                ));
                // The item and part the deltas go to (the `.stream()` helper
                // accumulates into them).
                head.push(sse(
                    Some("response.output_item.added"),
                    &json!({"type": "response.output_item.added", "sequence_number": 0,
                            "output_index": 0,
                            "item": {"id": "msg_r1", "type": "message", "status": "in_progress",
                                     "role": "assistant", "content": []}}),
                ));
                head.push(sse(
                    Some("response.content_part.added"),
                    &json!({"type": "response.content_part.added", "sequence_number": 0,
                            "item_id": "msg_r1", "output_index": 0, "content_index": 0,
                            "part": {"type": "output_text", "text": "", "annotations": []}}),
                ));
                for (i, w) in WORDS.iter().enumerate() {
                    let event = sse(
                        Some("response.output_text.delta"),
                        &json!({"type": "response.output_text.delta", "item_id": "msg_r1",
                                "output_index": 0, "content_index": 0, "delta": w,
                                "logprobs": [], "sequence_number": i + 1}),
                    );
                    (if i < HEAD { &mut head } else { &mut tail }).push(event);
                }
                tail.push(sse(
                    Some("response.completed"),
                    &json!({"type": "response.completed", "sequence_number": WORDS.len() + 1,
                            "response": response_object("completed", &answer())}),
                ));
            }
            Api::Anthropic => {
                head.push(sse(
                    Some("message_start"),
                    &json!({"type": "message_start", "message": {
                        "id": "msg_r1", "type": "message", "role": "assistant",
                        "model": "claude-test", "content": [], "stop_reason": null,
                        "stop_sequence": null,
                        "usage": {"input_tokens": 5, "output_tokens": 1}}}),
                ));
                head.push(sse(
                    Some("content_block_start"),
                    &json!({"type": "content_block_start", "index": 0,
                            "content_block": {"type": "text", "text": ""}}),
                ));
                head.push(sse(Some("ping"), &json!({"type": "ping"})));
                for (i, w) in WORDS.iter().enumerate() {
                    let event = sse(
                        Some("content_block_delta"),
                        &json!({"type": "content_block_delta", "index": 0,
                                "delta": {"type": "text_delta", "text": w}}),
                    );
                    (if i < HEAD { &mut head } else { &mut tail }).push(event);
                }
                tail.push(sse(
                    Some("content_block_stop"),
                    &json!({"type": "content_block_stop", "index": 0}),
                ));
                tail.push(sse(
                    Some("message_delta"),
                    &json!({"type": "message_delta",
                            "delta": {"stop_reason": "end_turn", "stop_sequence": null},
                            "usage": {"output_tokens": WORDS.len()}}),
                ));
                tail.push(sse(Some("message_stop"), &json!({"type": "message_stop"})));
            }
            Api::Ollama => {
                for (i, w) in WORDS.iter().enumerate() {
                    (if i < HEAD { &mut head } else { &mut tail }).push(ollama_line(w, false));
                }
                tail.push(ollama_line("", true));
            }
        }
        (head, tail)
    }

    /// A controlled reply with this API's content type.
    fn reply(self) -> (Reply, StreamControl) {
        let (reply, ctl) = Reply::controlled();
        let reply = match self {
            Api::Ollama => reply.header("content-type", "application/x-ndjson"),
            _ => reply,
        };
        (reply, ctl)
    }

    /// What the SDK is given as its base URL, for a server at `url`.
    fn base_url(self, url: &str) -> String {
        match self {
            Api::OpenAiChat | Api::OpenAiResponses => format!("{url}/v1"),
            Api::Anthropic | Api::Ollama => url.to_string(),
        }
    }

    /// The stop reason the SDK reports for the finished answer.
    fn finish(self) -> &'static str {
        match self {
            Api::OpenAiChat | Api::Ollama => "stop",
            Api::OpenAiResponses => "completed",
            Api::Anthropic => "end_turn",
        }
    }

    /// `clients.py` mode that reads `/_reprise/streams/{id}` with the SDK.
    fn resume_mode(self) -> &'static str {
        match self {
            Api::OpenAiChat => "resume-openai-chat",
            Api::OpenAiResponses => "resume-openai-responses",
            Api::Anthropic => "resume-anthropic",
            Api::Ollama => "resume-ollama",
        }
    }

    fn is_sse(self) -> bool {
        self != Api::Ollama
    }
}

/// A client script of either language.
enum Client {
    Py(PyScript),
    Node(NodeScript),
}

impl Client {
    fn py(mode: &str, url: &str) -> Client {
        Client::Py(py_script("clients.py", &[mode, url], &[]))
    }

    async fn report(&mut self) -> Value {
        match self {
            Client::Py(p) => p.report().await,
            Client::Node(n) => n.report().await,
        }
    }

    async fn finish(self) -> Vec<Value> {
        match self {
            Client::Py(p) => p.finish().await,
            Client::Node(n) => n.finish().await,
        }
    }

    /// Waits for the response head; returns the stream id it carried.
    async fn started(&mut self) -> Option<String> {
        let start = self.report().await;
        assert_eq!(start["kind"], "start", "{start}");
        start["stream_id"].as_str().map(String::from)
    }

    /// Waits for the first `HEAD` pieces of text.
    async fn read_head(&mut self) {
        for word in &WORDS[..HEAD] {
            let r = self.report().await;
            assert_eq!(r, json!({"kind": "text", "text": word}));
        }
    }

    /// The last report, once the script ended.
    async fn outcome(self) -> Value {
        let rest = self.finish().await;
        rest.last().cloned().expect("a final report")
    }
}

/// The test config: one recorded route `/`, heartbeats every 200 ms.
fn heartbeat_config(upstream: &Upstream, backend: &Backend) -> Config {
    let mut c = config(&upstream.url(), backend);
    c.streams.heartbeat = Duration::from_millis(200);
    c
}

/// Lets the stream stay silent for several heartbeat periods. For SSE, a
/// side reader of the same stream waits until it got two heartbeats (it
/// attached after the client's last event, so the client's are due no
/// later) and checks their form on the wire. NDJSON streams get no
/// heartbeat to wait for: the silence is a plain pause.
async fn silence(relay: &TestRelay, id: &str, api: Api) {
    if !api.is_sse() {
        tokio::time::sleep(Duration::from_secs(1)).await;
        return;
    }
    let url = format!("{}/_reprise/streams/{id}", relay.url());
    let client = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client");
    let mut resp = with_timeout("a side reader", client.get(&url).send())
        .await
        .expect("side reader");
    assert_eq!(resp.status(), 200);
    let mut seen = Vec::new();
    with_timeout("two heartbeats on the side reader", async {
        while count(&seen, b": keep-alive\n") < 2 {
            let chunk = resp.chunk().await.expect("side reader body");
            seen.extend_from_slice(&chunk.expect("the stream is still open"));
        }
    })
    .await;
    let text = String::from_utf8_lossy(&seen);
    // A lone comment line: a blank line after it would be an empty event.
    assert!(!text.contains(": keep-alive\n\n"), "{text:?}");
    assert!(!text.starts_with(": keep-alive\n\n"), "{text:?}");
}

fn count(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len()).filter(|w| *w == needle).count()
}

/// The client reads an answer with a long silence in it; then a resume of
/// the finished stream, read with the same SDK, gets it all again.
async fn reads_through_silence(api: Api, mut client: impl FnMut(&str) -> Client) {
    let upstream = Upstream::start().await;
    let (reply, ctl) = api.reply();
    upstream.respond_once(reply);
    let relay = TestRelay::start(heartbeat_config(&upstream, &Backend::Memory)).await;
    let mut sdk = client(&api.base_url(&relay.url()));
    let (head, tail) = api.wire();
    for chunk in head {
        ctl.send(chunk).await;
    }
    let id = sdk.started().await.expect("reprise-stream-id");
    sdk.read_head().await;
    silence(&relay, &id, api).await;
    for chunk in tail {
        ctl.send(chunk).await;
    }
    ctl.finish();
    assert_eq!(
        sdk.outcome().await,
        json!({"kind": "done", "text": answer(), "finish": api.finish()})
    );

    let url = format!("{}/_reprise/streams/{id}", relay.url());
    let resumed = Client::py(api.resume_mode(), &url).outcome().await;
    assert_eq!(
        resumed,
        json!({"kind": "done", "text": answer(), "finish": api.finish()}),
        "resumed with the SDK"
    );
    assert_eq!(
        upstream.request_count(),
        1,
        "resumes never reach the upstream"
    );
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_chat_completions_read_through_heartbeats_then_resume() {
    reads_through_silence(Api::OpenAiChat, |url| Client::py("openai-chat", url)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_responses_read_through_heartbeats_then_resume() {
    reads_through_silence(Api::OpenAiResponses, |url| {
        Client::py("openai-responses", url)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_messages_create_reads_through_heartbeats_then_resumes() {
    reads_through_silence(Api::Anthropic, |url| Client::py("anthropic-create", url)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_messages_stream_reads_through_heartbeats_then_resumes() {
    reads_through_silence(Api::Anthropic, |url| Client::py("anthropic-stream", url)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ollama_chat_reads_through_a_long_silence_then_resumes() {
    reads_through_silence(Api::Ollama, |url| Client::py("ollama-chat", url)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_npm_reads_through_heartbeats_then_resumes() {
    reads_through_silence(Api::OpenAiChat, |url| {
        Client::Node(node_script("openai.mjs", "openai", &[url], &[]))
    })
    .await;
}

/// Where and how the client fails when the upstream cuts the connection
/// after the head of the answer: its final report.
async fn cut_mid_answer(api: Api, client: Client, ctl: StreamControl) -> Value {
    let mut sdk = client;
    let (head, _) = api.wire();
    for chunk in head {
        ctl.send(chunk).await;
    }
    sdk.started().await;
    sdk.read_head().await;
    ctl.abort().await;
    sdk.outcome().await
}

/// The SDK raises through Reprise where it raises on the broken upstream
/// connection itself (after the same text), with an exception of type
/// `raised_as` whose message carries `upstream_reset`. Returns what it
/// raised through Reprise.
async fn raises_like_a_broken_connection(
    api: Api,
    client: impl Fn(&str) -> Client,
    raised_as: &str,
) -> Value {
    let upstream = Upstream::start().await;

    // Straight from the upstream: the reference.
    let (reply, ctl) = api.reply();
    upstream.respond_once(reply);
    let direct = cut_mid_answer(api, client(&api.base_url(&upstream.url())), ctl).await;
    assert_eq!(direct["kind"], "raised", "directly: {direct}");
    assert_eq!(direct["text"], head_text(), "directly: {direct}");

    // Through Reprise (`signals = "auto"`, the default).
    let (reply, ctl) = api.reply();
    upstream.respond_once(reply);
    let relay = TestRelay::start(heartbeat_config(&upstream, &Backend::Memory)).await;
    let through = cut_mid_answer(api, client(&api.base_url(&relay.url())), ctl).await;
    assert_eq!(through["kind"], "raised", "through Reprise: {through}");
    assert_eq!(
        through["text"], direct["text"],
        "through Reprise: {through}"
    );
    assert_eq!(through["type"], raised_as, "through Reprise: {through}");
    let message = through["message"].as_str().unwrap_or_default();
    assert!(message.contains("upstream_reset"), "{through}");
    eprintln!("{api:?}: directly {direct}; through Reprise {through}");
    relay.stop().await;
    through
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_chat_iteration_raises_on_a_broken_answer() {
    let raised = raises_like_a_broken_connection(
        Api::OpenAiChat,
        |url| Client::py("openai-chat", url),
        "APIError",
    )
    .await;
    assert_eq!(raised["code"], "upstream_reset", "{raised}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_chat_stream_helper_raises_on_a_broken_answer() {
    let raised = raises_like_a_broken_connection(
        Api::OpenAiChat,
        |url| Client::py("openai-chat-helper", url),
        "APIError",
    )
    .await;
    assert_eq!(raised["code"], "upstream_reset", "{raised}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_responses_iteration_raises_on_a_broken_answer() {
    let raised = raises_like_a_broken_connection(
        Api::OpenAiResponses,
        |url| Client::py("openai-responses", url),
        "APIError",
    )
    .await;
    assert_eq!(raised["code"], "upstream_reset", "{raised}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_responses_stream_helper_raises_on_a_broken_answer() {
    let raised = raises_like_a_broken_connection(
        Api::OpenAiResponses,
        |url| Client::py("openai-responses-helper", url),
        "APIError",
    )
    .await;
    assert_eq!(raised["code"], "upstream_reset", "{raised}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_responses_stream_helper_reads_through_heartbeats_then_resumes() {
    reads_through_silence(Api::OpenAiResponses, |url| {
        Client::py("openai-responses-helper", url)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_npm_iteration_raises_on_a_broken_answer() {
    let raised = raises_like_a_broken_connection(
        Api::OpenAiChat,
        |url| Client::Node(node_script("openai.mjs", "openai", &[url], &[])),
        "APIError",
    )
    .await;
    assert_eq!(raised["code"], "upstream_reset", "{raised}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_messages_create_raises_on_a_broken_answer() {
    raises_like_a_broken_connection(
        Api::Anthropic,
        |url| Client::py("anthropic-create", url),
        "APIStatusError",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_messages_stream_raises_on_a_broken_answer() {
    raises_like_a_broken_connection(
        Api::Anthropic,
        |url| Client::py("anthropic-stream", url),
        "APIStatusError",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ollama_chat_raises_on_a_broken_answer() {
    raises_like_a_broken_connection(
        Api::Ollama,
        |url| Client::py("ollama-chat", url),
        "ResponseError",
    )
    .await;
}

/// Over Redis, a client resuming on another instance gets the failure in the
/// same dialect as the client on the producing instance — also one that
/// attached before the first event, when the dialect was not decided yet —
/// and so does a resume after the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_instance_signals_in_the_same_dialect() {
    let redis = RedisServer::start().await.expect("start redis-server");
    let backend = Backend::Redis(redis.url());
    let upstream = Upstream::start().await;
    let (reply, ctl) = Api::Anthropic.reply();
    upstream.respond_once(reply);
    let a = TestRelay::start(heartbeat_config(&upstream, &backend)).await;
    let b = TestRelay::start(heartbeat_config(&upstream, &backend)).await;

    let mut origin = Client::py("anthropic-create", &a.url());
    let id = origin.started().await.expect("reprise-stream-id");
    // Attached on B before any event: B's metadata says nothing yet.
    let url_b = format!("{}/_reprise/streams/{id}", b.url());
    let mut early = Client::py("resume-anthropic", &url_b);
    early.started().await;

    let (head, _) = Api::Anthropic.wire();
    for chunk in head {
        ctl.send(chunk).await;
    }
    origin.read_head().await;
    early.read_head().await;
    ctl.abort().await;

    let mut raised = vec![origin.outcome().await, early.outcome().await];
    // After the end, from B (which may still hold its log, or reads the store).
    raised.push(Client::py("resume-anthropic", &url_b).outcome().await);
    for r in &raised {
        assert_eq!(r["kind"], "raised", "{raised:?}");
        assert_eq!(r["type"], "APIStatusError", "{raised:?}");
        assert_eq!(r["text"], head_text(), "{raised:?}");
        let message = r["message"].as_str().unwrap_or_default();
        assert!(message.contains("upstream_reset"), "{raised:?}");
    }
    a.stop().await;
    b.stop().await;
}

/// Reads a whole response body through the relay.
async fn body_of(resp: reqwest::Response) -> String {
    with_timeout("the body", resp.text()).await.expect("body")
}

/// The last SSE event block of `body` (its lines).
fn last_event(body: &str) -> Vec<String> {
    body.trim_end_matches('\n')
        .rsplit("\n\n")
        .next()
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.starts_with(':'))
        .map(String::from)
        .collect()
}

/// An AI SDK stream (its header shows it) ends with the SDK's own error part,
/// as an unnamed event: the `ai` package parses every event's data as a
/// part (tests/ai_sdk.rs drives the real SDK on such a stream).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ai_sdk_streams_end_with_an_unnamed_error_part() {
    let upstream = Upstream::start().await;
    let (reply, ctl) = Reply::controlled();
    upstream.respond_once(reply.header("x-vercel-ai-ui-message-stream", "v1"));
    let relay = TestRelay::start(heartbeat_config(&upstream, &Backend::Memory)).await;
    let client = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client");
    let resp = client
        .post(format!("{}/api/chat", relay.url()))
        .body("{}")
        .send()
        .await
        .expect("post");
    ctl.send_event(r#"{"type":"start","messageId":"m1"}"#).await;
    ctl.abort().await;
    let body = body_of(resp).await;
    let last = last_event(&body);
    assert_eq!(last.len(), 2, "{body:?}");
    assert!(last[0].starts_with("id: "), "{body:?}");
    let data: Value = serde_json::from_str(last[1].strip_prefix("data: ").expect("data line"))
        .expect("JSON data");
    assert_eq!(data["type"], "error");
    assert!(data["errorText"]
        .as_str()
        .unwrap_or_default()
        .starts_with("reprise: "));
    assert_eq!(data["reprise"]["code"], "upstream_reset");
    relay.stop().await;
}

/// A route's explicit `signals` wins over what the stream shows, and also
/// names the dialect of `history_lost` for a stream Reprise does not know.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_explicit_route_setting_wins() {
    let upstream = Upstream::start().await;
    let (reply, ctl) = Api::Anthropic.reply();
    upstream.respond_once(reply);
    let mut c = heartbeat_config(&upstream, &Backend::Memory);
    c.routes[0].signals = Signals::OpenAi;
    let relay = TestRelay::start(c).await;
    let client = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client");
    let resp = client
        .post(format!("{}/v1/messages", relay.url()))
        .body("{}")
        .send()
        .await
        .expect("post");
    let (head, _) = Api::Anthropic.wire();
    for chunk in head {
        ctl.send(chunk).await;
    }
    ctl.abort().await;
    let body = body_of(resp).await;
    let last = last_event(&body);
    assert_eq!(last.len(), 2, "an unnamed event: {body:?}");
    let data: Value = serde_json::from_str(last[1].strip_prefix("data: ").expect("data line"))
        .expect("JSON data");
    assert_eq!(data["error"]["code"], "upstream_reset", "{data}");
    assert_eq!(data["error"]["type"], "reprise_error", "{data}");

    let unknown = format!("{}.00000001.0000000003", "AAAAAAAAAAAAAAAAAAAAAA");
    let resp = client
        .get(format!("{}/v1/messages", relay.url()))
        .header("last-event-id", unknown)
        .send()
        .await
        .expect("get");
    assert_eq!(resp.status(), 200);
    let body = body_of(resp).await;
    let last = last_event(&body);
    assert_eq!(last.len(), 2, "an unnamed event: {body:?}");
    let data: Value = serde_json::from_str(last[1].strip_prefix("data: ").expect("data line"))
        .expect("JSON data");
    assert_eq!(data["error"]["code"], "history_lost", "{data}");
    relay.stop().await;
}
