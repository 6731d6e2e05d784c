//! Who may resume or cancel: caller identities, and no credential in logs.

use reprise_relay::config::{ResumeAuth, Secret};
use reprise_tests::redis::RedisServer;
use reprise_tests::relay::{chat_config, Backend, RelayProcess, TestRelay};
use reprise_tests::upstream::{numbered_event, numbered_event_data};
use reprise_tests::{open_sse, read_raw, SseClient, Upstream};
use serde_json::json;

fn chat(
    relay: &TestRelay,
    client: &SseClient,
    chat_id: &str,
    token: &str,
) -> reqwest::RequestBuilder {
    client
        .post_json(
            &format!("{}/api/chat", relay.url()),
            &json!({"id": chat_id}),
        )
        .header("authorization", format!("Bearer {token}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_caller_cannot_resume_or_cancel_by_key() {
    let redis = RedisServer::start().await.expect("start redis-server");
    let upstream = Upstream::start().await;
    let mut c = chat_config(&upstream.url(), &Backend::Redis(redis.url()));
    c.auth.secret = Some(Secret::new("test-secret"));
    let relay = TestRelay::start(c).await;
    let client = SseClient::new();
    let alice_ctl = upstream.controlled_stream();
    let mut alice = open_sse(chat(&relay, &client, "c1", "alice")).await;
    alice_ctl.send(numbered_event(1)).await;
    alice.next_event().await;
    // Bob uses the same (guessable) chat id for his own chat.
    let bob_ctl = upstream.controlled_stream();
    let mut bob = open_sse(chat(&relay, &client, "c1", "bob")).await;
    bob_ctl.send(numbered_event(100)).await;
    bob.next_event().await;

    let resume = |token: &str| {
        client
            .get(&format!("{}/api/chat/c1/stream", relay.url()))
            .header("authorization", format!("Bearer {token}"))
    };
    // Each caller resumes their own stream: keys of different callers never collide.
    let mut a = open_sse(resume("alice")).await;
    assert_eq!(a.next_event().await.data, numbered_event_data(1));
    let mut b = open_sse(resume("bob")).await;
    assert_eq!(b.next_event().await.data, numbered_event_data(100));
    // A third caller gets what "no such stream" gets: 204.
    let eve = open_sse(resume("eve")).await;
    assert_eq!(eve.status(), 204);
    let anonymous = client
        .open_get(&format!("{}/api/chat/c1/stream", relay.url()))
        .await;
    assert_eq!(anonymous.status(), 204);

    // Cancel by key or by id: only the caller that started the stream.
    let alice_id = alice.header("reprise-stream-id").unwrap().to_string();
    for (method_url, token) in [
        (format!("{}/api/chat/c1/stream", relay.url()), "eve"),
        (
            format!("{}/_reprise/streams/{alice_id}", relay.url()),
            "eve",
        ),
        (
            format!("{}/_reprise/streams/{alice_id}", relay.url()),
            "bob",
        ),
    ] {
        let (status, _, body) = read_raw(
            client
                .http()
                .delete(&method_url)
                .header("authorization", format!("Bearer {token}")),
        )
        .await;
        assert_eq!(status, 404, "{method_url} as {token}");
        assert!(body.text().contains("stream_not_found"));
    }
    assert!(!alice_ctl.is_closed());
    let (status, _, _) = read_raw(
        client
            .http()
            .delete(format!("{}/_reprise/streams/{alice_id}", relay.url()))
            .header("authorization", "Bearer alice"),
    )
    .await;
    assert_eq!(status, 200);
    alice_ctl.closed().await;
    bob_ctl.finish();
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_caller_routes_check_every_resume() {
    let upstream = Upstream::start().await;
    let mut c = chat_config(&upstream.url(), &Backend::Memory);
    c.auth.secret = Some(Secret::new("test-secret"));
    c.routes[0].resume_auth = ResumeAuth::SameCaller;
    let relay = TestRelay::start(c).await;
    let client = SseClient::new();
    let ctl = upstream.controlled_stream();
    let mut alice = open_sse(chat(&relay, &client, "c1", "alice")).await;
    let id = alice.header("reprise-stream-id").unwrap().to_string();
    ctl.send(numbered_event(1)).await;
    let first = alice.next_event().await;
    // By stream id: another caller gets 404, the owner gets the stream.
    let (status, _, _) = read_raw(
        client
            .get(&format!("{}/_reprise/streams/{id}", relay.url()))
            .header("authorization", "Bearer eve"),
    )
    .await;
    assert_eq!(status, 404);
    // By Last-Event-ID: another caller gets history_lost, never the events.
    let mut eve = open_sse(
        client
            .get(&format!("{}/api/chat", relay.url()))
            .header("authorization", "Bearer eve")
            .header("last-event-id", &first.id),
    )
    .await;
    let events = eve.collect_until_end().await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].json()["reprise"]["code"], "history_lost");
    let mut owner = open_sse(
        client
            .get(&format!("{}/api/chat", relay.url()))
            .header("authorization", "Bearer alice")
            .header("last-event-id", &first.id),
    )
    .await;
    ctl.send(numbered_event(2)).await;
    ctl.finish();
    assert_eq!(
        owner.collect_until_end().await[0].data,
        numbered_event_data(2)
    );
    relay.stop().await;
}

/// Credentials, cookies, the auth secret and the Redis password never appear
/// in the logs, even at the most verbose level.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_contain_no_credential() {
    let redis = RedisServer::start().await.expect("start redis-server");
    let upstream = Upstream::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let log = dir.join("stderr.log");
    let cfg = dir.join("reprise.toml");
    // A password in the URL: Redis ignores it without ACLs... so give the
    // default user one and use it.
    let _ = std::process::Command::new("redis-cli")
        .args([
            "-p",
            &redis.port().to_string(),
            "CONFIG",
            "SET",
            "requirepass",
            "hunter2-redis",
        ])
        .output();
    std::fs::write(
        &cfg,
        format!(
            "[store]\nredis_url = \"redis://:hunter2-redis@127.0.0.1:{}\"\n[auth]\nsecret = \"hunter2-hmac\"\n[[routes]]\npath = \"/\"\nupstream = \"{}\"\n",
            redis.port(),
            upstream.url()
        ),
    )
    .unwrap();
    upstream.respond(|_| reprise_tests::Reply::sse([numbered_event(1)]));
    let relay =
        RelayProcess::start_logging(&["--config", &cfg.to_string_lossy()], &log, "trace").await;
    let client = SseClient::new();
    let mut s = open_sse(
        client
            .get(&format!("{}/x", relay.url()))
            .header("authorization", "Bearer hunter2-token")
            .header("cookie", "session=hunter2-cookie"),
    )
    .await;
    let id = s.header("reprise-stream-id").unwrap().to_string();
    s.collect_until_end().await;
    let (status, _, _) =
        read_raw(client.get(&format!("{}/_reprise/streams/{id}", relay.url()))).await;
    assert_eq!(status, 200);
    drop(relay);
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(text.contains("listening"), "the log was captured: {text}");
    for secret in [
        "hunter2-token",
        "hunter2-cookie",
        "hunter2-hmac",
        "hunter2-redis",
    ] {
        assert!(!text.contains(secret), "{secret} leaked into the logs");
    }
}
