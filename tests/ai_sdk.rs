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

/// The AI SDK's `stop()` in a resumable chat: the SDK aborts its request and
/// the app POSTs `{api}/{chatId}/stop` (the route's `stop` template). The
/// generation stops (the upstream sees its connection closed), the stream
/// is recorded as cancelled, and the answer is `200` whether or not a
/// stream was running, on any instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_posted_by_the_app_cancels_the_generation() {
    let redis = RedisServer::start().await.expect("start redis-server");
    let (upstream, config, ctl) = app(&Backend::Redis(redis.url())).await;
    let (relay, other) = tokio::join!(TestRelay::start(config.clone()), TestRelay::start(config));
    let parts = parts();
    let chat_id = "chat-stop-1";

    let mut stopper = sdk(&["stop", &api(&relay), chat_id, "3"]);
    for part in &parts[..5] {
        push(&ctl, part).await;
    }
    assert_eq!(read_chunks(&mut stopper, 3).await, parts[..3]);
    let stopped = stopper.finish().await;
    assert_eq!(stopped.len(), 1, "{stopped:?}");
    assert_eq!(stopped[0]["kind"], "stopped");
    assert_eq!(stopped[0]["status"], 200, "{stopped:?}");
    assert_eq!(stopped[0]["body"]["outcome"], "cancelled", "{stopped:?}");
    // The generation is aborted: Reprise closed the upstream connection.
    reprise_tests::with_timeout("the upstream to see the stop", ctl.closed()).await;

    // The stream is over: resuming gives null, on either instance.
    for instance in [&relay, &other] {
        let again = sdk(&["reconnect", &api(instance), chat_id]);
        assert_eq!(again.finish().await, [json!({"kind": "null"})]);
    }
    // Stopping again, elsewhere, or a chat with no stream: 200 all the same.
    let client = reprise_tests::SseClient::new();
    for (instance, chat, outcome) in [
        (&other, chat_id, "cancelled"),
        (&relay, "chat-never", "none"),
    ] {
        let res = client
            .post(&format!("{}/{chat}/stop", api(instance)), "")
            .send()
            .await
            .expect("POST stop");
        assert_eq!(res.status(), 200, "{chat}");
        let body: Value = serde_json::from_str(&res.text().await.expect("body")).expect("JSON");
        assert_eq!(body["outcome"], outcome, "{chat}: {body}");
    }
    assert_eq!(upstream.request_count(), 1, "stops never reach the app");
    relay.stop().await;
    other.stop().await;
}

/// `WorkflowChatTransport` (`@ai-sdk/workflow` on npm): its POST's
/// connection fails mid-answer and it resumes by itself with
/// `GET {api}/{runId}/stream?startIndex=<chunks it got>`; later readers start
/// from an index or (negative) from the tail, which they resolve with
/// `x-workflow-stream-tail-index`. Every chunk arrives exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workflow_transport_resumes_by_start_index() {
    let redis = RedisServer::start().await.expect("start redis-server");
    let (reply, ctl) = Reply::controlled();
    let upstream = Upstream::start().await;
    let chat_id = "chat-workflow-1";
    upstream.respond_once(
        reply
            .header("x-vercel-ai-ui-message-stream", "v1")
            .header("x-workflow-run-id", chat_id),
    );
    let config = chat_config(&upstream.url(), &Backend::Redis(redis.url()));
    let (relay, other) = tokio::join!(TestRelay::start(config.clone()), TestRelay::start(config));
    let parts = parts();
    let n = parts.len();

    let mut sender = sdk(&["workflow-send", &api(&relay), chat_id, "4"]);
    for part in &parts[..6] {
        push(&ctl, part).await;
    }
    let post = sender.report().await;
    assert_eq!(
        (&post["method"], &post["status"]),
        (&json!("POST"), &json!(200)),
        "{post}"
    );
    assert_eq!(read_chunks(&mut sender, 4).await, parts[..4]);
    let get = sender.report().await;
    assert_eq!(get["kind"], "response", "{get}");
    assert!(
        get["url"]
            .as_str()
            .unwrap_or_default()
            .ends_with(&format!("/api/chat/{chat_id}/stream?startIndex=4")),
        "{get}"
    );
    assert_eq!(get["status"], 200, "{get}");
    let tail: i64 = get["tail"]
        .as_str()
        .and_then(|t| t.parse().ok())
        .expect("a tail index");
    assert!(
        (4..=5).contains(&tail),
        "events 1-5 at least were recorded: {get}"
    );
    let mut got = parts[..4].to_vec();
    got.extend(read_chunks(&mut sender, 2).await);
    for part in &parts[6..] {
        push(&ctl, part).await;
    }
    ctl.send(event("[DONE]")).await;
    ctl.finish();
    let rest = sender.finish().await;
    got.extend(chunks(&rest));
    assert_eq!(got, parts, "every chunk exactly once, in order");
    assert_eq!(rest.last(), Some(&json!({"kind": "end"})));

    // Later readers, on the instance that did not record it (so the tail is
    // read from the store): the last 3 events ([DONE] is the last), and
    // from index 2. The tail index is that of [DONE]: n parts before it.
    // (From an index inside a text part the transport would make up the
    // missing `text-start` itself: its normalisation, not the wire.)
    for (start, want) in [("-3", &parts[n - 2..]), ("2", &parts[2..])] {
        let reports = sdk(&["workflow", &api(&other), chat_id, start])
            .finish()
            .await;
        let response = &reports[0];
        assert!(
            response["url"]
                .as_str()
                .unwrap_or_default()
                .ends_with(&format!("?startIndex={start}")),
            "{response}"
        );
        assert_eq!(response["status"], 200, "{response}");
        assert_eq!(response["tail"], json!(n.to_string()), "{response}");
        assert_eq!(chunks(&reports), want, "startIndex={start}");
    }
    assert_eq!(upstream.request_count(), 1, "resumes never reach the app");
    relay.stop().await;
    other.stop().await;
}
