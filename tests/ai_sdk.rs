//! The real Vercel AI SDK client (`ai` v5 from npm, its
//! `DefaultChatTransport`, driven by `tests/js/ai_sdk.mjs`) against Reprise
//! in front of a chat app's `/api/chat`: the SDK's own POST starts the
//! stream, and its `reconnectToStream` resumes it through the route's
//! `resume` template (`GET /api/chat/{chatId}/stream`) while the upstream is
//! still mid-answer. Every UI message chunk must arrive exactly once, in
//! order, and a finished stream must give `null` (Reprise's `204`). The
//! resume reaches another Reprise instance than the POST did, over Redis.

#[path = "js/node.rs"]
mod node;

use node::{node_script, NodeScript};
use reprise_relay::config::Config;
use reprise_tests::redis::RedisServer;
use reprise_tests::relay::{chat_config, Backend, TestRelay};
use reprise_tests::upstream::event;
use reprise_tests::{Reply, StreamControl, Upstream};
use serde_json::{json, Value};

/// The UI message stream of one assistant answer, part by part (AI SDK v5).
fn parts() -> Vec<Value> {
    let mut parts = vec![
        json!({"type": "start", "messageId": "msg-aS3k9QeB"}),
        json!({"type": "start-step"}),
        json!({"type": "text-start", "id": "txt-0"}),
    ];
    for delta in [
        "Reprise", " records", " every", " part", ", so", " a", " reload", " resumes", " ✨",
    ] {
        parts.push(json!({"type": "text-delta", "id": "txt-0", "delta": delta}));
    }
    parts.extend([
        json!({"type": "text-end", "id": "txt-0"}),
        json!({"type": "finish-step"}),
        json!({"type": "finish", "finishReason": "stop"}),
    ]);
    parts
}

fn text_of(parts: &[Value]) -> String {
    parts.iter().filter_map(|p| p["delta"].as_str()).collect()
}

/// Upstream (the chat app) with one controlled answer, and the config of
/// Reprise's AI SDK chat route in front of it.
async fn app(backend: &Backend) -> (Upstream, Config, StreamControl) {
    let (reply, ctl) = Reply::controlled();
    let upstream = Upstream::start().await;
    upstream.respond_once(reply.header("x-vercel-ai-ui-message-stream", "v1"));
    let config = chat_config(&upstream.url(), backend);
    (upstream, config, ctl)
}

/// `node tests/js/ai_sdk.mjs <args>`.
fn sdk(args: &[&str]) -> NodeScript {
    node_script("ai_sdk.mjs", "ai", args, &[])
}

fn api(relay: &TestRelay) -> String {
    format!("{}/api/chat", relay.url())
}

async fn push(ctl: &StreamControl, part: &Value) {
    ctl.send(event(&part.to_string())).await;
}

/// The chunks among `reports`, as the SDK parsed them.
fn chunks(reports: &[Value]) -> Vec<Value> {
    reports
        .iter()
        .filter(|r| r["kind"] == "chunk")
        .map(|r| r["chunk"].clone())
        .collect()
}

/// Reads `n` chunk reports; panics on any other report.
async fn read_chunks(script: &mut NodeScript, n: usize) -> Vec<Value> {
    let mut got = Vec::with_capacity(n);
    while got.len() < n {
        let report = script.report().await;
        assert_eq!(report["kind"], "chunk", "expected a chunk, got {report}");
        got.push(report["chunk"].clone());
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_to_stream_mid_answer_gets_every_chunk_once() {
    // Two Reprise instances over one Redis: the page reloads onto the other.
    let redis = RedisServer::start().await.expect("start redis-server");
    let (upstream, config, ctl) = app(&Backend::Redis(redis.url())).await;
    let (relay, other) = tokio::join!(TestRelay::start(config.clone()), TestRelay::start(config));
    let parts = parts();
    // Spaces, `+` and non-ASCII: the SDK percent-encodes the id in the resume URL.
    let chat_id = "chat ai+sdk ü1";

    // The SDK's own POST starts the answer; the tab closes after 3 chunks.
    let mut sender = sdk(&["send", &api(&relay), chat_id, "3"]);
    let request = ctl.request().await;
    let body = request.body_json();
    assert_eq!(
        body["id"], chat_id,
        "the SDK names the chat at /id, the route's key"
    );
    assert_eq!(body["trigger"], "submit-message");
    assert_eq!(body["messages"][0]["parts"][0]["type"], "text");
    for part in &parts[..4] {
        push(&ctl, part).await;
    }
    assert_eq!(read_chunks(&mut sender, 3).await, parts[..3]);
    assert_eq!(sender.finish().await, [json!({"kind": "aborted"})]);

    // The answer goes on while no client is connected.
    for part in &parts[4..8] {
        push(&ctl, part).await;
    }

    // useChat({ resume: true }) on the reloaded page: replay from the first
    // part (the SDK rebuilds the message from `start`), then live.
    let mut resumer = sdk(&["reconnect", &api(&other), chat_id]);
    let mut got = read_chunks(&mut resumer, 8).await;
    assert_eq!(got, parts[..8], "the replay, mid-answer");
    for part in &parts[8..] {
        push(&ctl, part).await;
    }
    ctl.send(event("[DONE]")).await;
    ctl.finish();
    let rest = resumer.finish().await;
    got.extend(chunks(&rest));
    assert_eq!(got, parts, "every chunk exactly once, in order");

    let tail: Vec<&Value> = rest.iter().filter(|r| r["kind"] != "chunk").collect();
    assert_eq!(tail.len(), 2, "{tail:?}");
    let message = &tail[0]["message"];
    assert_eq!(tail[0]["kind"], "message");
    assert_eq!(message["id"], "msg-aS3k9QeB");
    assert_eq!(message["role"], "assistant");
    let text: String = message["parts"]
        .as_array()
        .expect("message parts")
        .iter()
        .filter(|p| p["type"] == "text")
        .filter_map(|p| p["text"].as_str())
        .collect();
    assert_eq!(text, text_of(&parts), "the SDK rebuilt the whole answer");
    assert_eq!(*tail[1], json!({"kind": "end"}));

    // A finished stream: reconnectToStream gets 204 and returns null, on
    // either instance; so does a chat that never streamed.
    for (instance, chat) in [(&relay, chat_id), (&other, chat_id), (&other, "chat-never")] {
        let again = sdk(&["reconnect", &api(instance), chat]);
        assert_eq!(
            again.finish().await,
            [json!({"kind": "null"})],
            "{chat} on {}",
            instance.url()
        );
    }
    assert_eq!(upstream.request_count(), 1, "resumes never reach the app");
    relay.stop().await;
    other.stop().await;
}

/// An upstream that breaks mid-answer: the resumed stream ends with Reprise's
/// in-band signal, which the SDK reads as its own `error` chunk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_answer_ends_with_an_error_chunk() {
    let (upstream, config, ctl) = app(&Backend::Memory).await;
    let relay = TestRelay::start(config).await;
    let parts = parts();
    let chat_id = "chat-ai-sdk-2";

    let mut sender = sdk(&["send", &api(&relay), chat_id, "2"]);
    for part in &parts[..5] {
        push(&ctl, part).await;
    }
    assert_eq!(read_chunks(&mut sender, 2).await, parts[..2]);
    assert_eq!(sender.finish().await, [json!({"kind": "aborted"})]);

    let mut resumer = sdk(&["reconnect", &api(&relay), chat_id]);
    assert_eq!(read_chunks(&mut resumer, 5).await, parts[..5]);
    ctl.abort().await;
    let rest = resumer.finish().await;
    let error = &chunks(&rest)[..];
    assert_eq!(error.len(), 1, "{rest:?}");
    assert_eq!(error[0]["type"], "error");
    let error_text = error[0]["errorText"].as_str().unwrap_or_default();
    assert!(error_text.starts_with("reprise: "), "{error_text}");
    assert_eq!(error[0]["reprise"]["code"], "upstream_reset");
    let ui_error = rest
        .iter()
        .find(|r| r["kind"] == "ui-error")
        .expect("the SDK's onError ran");
    assert_eq!(ui_error["message"], error_text);
    let message = &rest
        .iter()
        .find(|r| r["kind"] == "message")
        .expect("a message")["message"];
    assert_eq!(message["id"], "msg-aS3k9QeB");

    // The stream is over: resuming it again gives null.
    let again = sdk(&["reconnect", &api(&relay), chat_id]);
    assert_eq!(again.finish().await, [json!({"kind": "null"})]);
    assert_eq!(upstream.request_count(), 1);
    relay.stop().await;
}
