//! Three Reprise processes over a three-master Redis Cluster: producer
//! failure detection, cancel from any instance, idempotent starts.

use reprise_tests::redis::RedisCluster;
use reprise_tests::relay::{chat_config, Backend, RelayProcess, TestRelay};
use reprise_tests::upstream::numbered_event;
use reprise_tests::{data, numbered};
use reprise_tests::{open_sse, read_raw, with_timeout, SseClient, Upstream};
use serde_json::json;

/// A config file for a `reprise` process: one recorded route `/`, a short
/// lease, and the chat route with a resume template.
/// The file lives as long as the returned directory.
fn config_file(redis: &RedisCluster, upstream: &Upstream) -> (tempfile::TempDir, String) {
    config_file_with(redis, upstream, "")
}

/// [`config_file`] with more `[streams]` settings.
fn config_file_with(
    redis: &RedisCluster,
    upstream: &Upstream,
    streams: &str,
) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("reprise.toml");
    std::fs::write(
        &path,
        format!(
            r#"[store]
redis_url = "{redis}"
[streams]
lease = "1500ms"
tail_poll_interval = "200ms"
{streams}
[[routes]]
path = "/api/chat"
upstream = "{up}"
key = {{ json = "/id" }}
resume = "/api/chat/{{key}}/stream"
[[routes]]
path = "/"
upstream = "{up}"
"#,
            redis = redis.url(),
            up = upstream.url()
        ),
    )
    .unwrap();
    let path = path.to_string_lossy().to_string();
    (dir, path)
}

/// A client that read, from the producing instance's memory, events its
/// store never got (SIGKILL within `store_linger`) resumes on another
/// instance from the last of them: it is past the `producer_lost` end
/// recorded there, and must still get that signal, not a silent end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_past_what_was_stored_gets_producer_lost_elsewhere() {
    let redis = RedisCluster::start().await.expect("start a Redis cluster");
    let upstream = Upstream::start().await;
    let (_dir, cfg) = config_file_with(&redis, &upstream, r#"store_linger = "2s""#);
    let args = ["--config", cfg.as_str()];
    let (mut a, b) = tokio::join!(RelayProcess::start(&args), RelayProcess::start(&args));
    let client = SseClient::new();
    let ctl = upstream.controlled_stream();
    let mut origin = client.open_get(&format!("{}/gen", a.url())).await;
    let stream_id = origin.header("reprise-stream-id").unwrap().to_string();
    for i in 1..=2 {
        ctl.send(numbered_event(i)).await;
    }
    origin.next_events(2).await;
    // Stored (one linger later): a reader on B sees them.
    let mut on_b = client
        .open_get(&format!("{}/_reprise/streams/{stream_id}", b.url()))
        .await;
    assert_eq!(data(&on_b.next_events(2).await), numbered(1..=2));
    // 3 and 4 reach the client from A's memory; A dies well within the
    // linger, before storing them.
    for i in 3..=4 {
        ctl.send(numbered_event(i)).await;
    }
    let seen = origin.next_events(2).await;
    a.kill().await;
    assert_eq!(data(&seen), numbered(3..=4));
    let last_id = seen[1].id.clone();

    // The live reader on B ends with the signal.
    let rest = on_b.collect_until_end().await;
    assert_eq!(rest.len(), 1, "{rest:?}");
    assert_eq!(rest[0].json()["reprise"]["code"], "producer_lost");
    // The cut-off client resumes on B from event 4, which B never had.
    let mut resumed = open_sse(
        client
            .get(&format!("{}/_reprise/streams/{stream_id}", b.url()))
            .header("last-event-id", &last_id),
    )
    .await;
    assert_eq!(resumed.status(), 200);
    let rest = resumed.collect_until_end().await;
    assert_eq!(rest.len(), 1, "{rest:?}");
    assert_eq!(rest[0].event, "reprise-error");
    assert_eq!(rest[0].json()["reprise"]["code"], "producer_lost");
    // Its id is the stream's end: resuming from it is the end.
    assert_eq!(rest[0].id, format!("{stream_id}.end"));
    let after_signal = client
        .get(&format!("{}/_reprise/streams/{stream_id}", b.url()))
        .header("last-event-id", &rest[0].id)
        .send()
        .await
        .unwrap();
    assert_eq!(after_signal.status(), 204);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_producer_ends_readers_elsewhere_with_producer_lost() {
    let redis = RedisCluster::start().await.expect("start a Redis cluster");
    let upstream = Upstream::start().await;
    let (_dir, cfg) = config_file(&redis, &upstream);
    let args = ["--config", cfg.as_str()];
    let (mut a, b, c) = tokio::join!(
        RelayProcess::start(&args),
        RelayProcess::start(&args),
        RelayProcess::start(&args)
    );
    let client = SseClient::new();
    let ctl = upstream.controlled_stream();
    let mut origin = client.open_get(&format!("{}/gen", a.url())).await;
    let stream_id = origin.header("reprise-stream-id").unwrap().to_string();
    for i in 1..=3 {
        ctl.send(numbered_event(i)).await;
    }
    origin.next_events(3).await;
    let mut on_b = client
        .open_get(&format!("{}/_reprise/streams/{stream_id}", b.url()))
        .await;
    let mut on_c = client
        .open_get(&format!("{}/_reprise/streams/{stream_id}", c.url()))
        .await;
    for reader in [&mut on_b, &mut on_c] {
        assert_eq!(data(&reader.next_events(3).await), numbered(1..=3));
    }

    // SIGKILL: no goodbye, only the lease stops being renewed.
    a.kill().await;
    // Within the lease bound (1.5 s here; the wait is bounded generously).
    for reader in [&mut on_b, &mut on_c] {
        let rest = reader.collect_until_end().await;
        assert_eq!(rest.len(), 1, "{rest:?}");
        assert_eq!(rest[0].event, "reprise-error");
        assert_eq!(rest[0].json()["reprise"]["code"], "producer_lost");
    }
    // Later resumes replay what was recorded, then the failure.
    let mut later = client
        .open_get(&format!("{}/_reprise/streams/{stream_id}", b.url()))
        .await;
    let events = later.collect_until_end().await;
    assert_eq!(data(&events[..3]), numbered(1..=3));
    assert_eq!(events[3].json()["reprise"]["code"], "producer_lost");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_on_any_instance_stops_the_generation() {
    let redis = RedisCluster::start().await.expect("start a Redis cluster");
    let upstream = Upstream::start().await;
    let (_dir, cfg) = config_file(&redis, &upstream);
    let args = ["--config", cfg.as_str()];
    let (a, b, c) = tokio::join!(
        RelayProcess::start(&args),
        RelayProcess::start(&args),
        RelayProcess::start(&args)
    );
    let client = SseClient::new();

    // Cancel by stream id on C, for a stream produced on A and read on B.
    let ctl = upstream.controlled_stream();
    let mut origin = client.open_get(&format!("{}/gen", a.url())).await;
    let stream_id = origin.header("reprise-stream-id").unwrap().to_string();
    ctl.send(numbered_event(1)).await;
    origin.next_event().await;
    let mut on_b = client
        .open_get(&format!("{}/_reprise/streams/{stream_id}", b.url()))
        .await;
    on_b.next_event().await;
    let resp = client
        .http()
        .delete(format!("{}/_reprise/streams/{stream_id}", c.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&resp.bytes().await.unwrap()).unwrap()
            ["outcome"],
        "cancel_requested"
    );
    // The upstream sees its connection closed: the generation is aborted.
    ctl.closed().await;
    for reader in [&mut origin, &mut on_b] {
        let rest = reader.collect_until_end().await;
        let last = rest.last().expect("a signal");
        assert_eq!(last.event, "reprise-error");
        assert_eq!(last.json()["reprise"]["code"], "cancelled");
    }
    // Cancelling again reports the outcome; an unknown stream is 404.
    let resp = client
        .http()
        .delete(format!("{}/_reprise/streams/{stream_id}", b.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&resp.bytes().await.unwrap()).unwrap()
            ["outcome"],
        "cancelled"
    );
    let (status, _, _) = read_raw(client.http().delete(format!(
        "{}/_reprise/streams/AAAAAAAAAAAAAAAAAAAAAA",
        a.url()
    )))
    .await;
    assert_eq!(status, 404);

    // Cancel through the AI SDK resume template, on the producing instance.
    let ctl = upstream.controlled_stream();
    let mut chat =
        open_sse(client.post_json(&format!("{}/api/chat", a.url()), &json!({"id": "chat-x"})))
            .await;
    ctl.send(numbered_event(1)).await;
    chat.next_event().await;
    let resp = client
        .http()
        .delete(format!("{}/api/chat/chat-x/stream", a.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&resp.bytes().await.unwrap()).unwrap()
            ["outcome"],
        "cancelled"
    );
    ctl.closed().await;
    let rest = chat.collect_until_end().await;
    assert_eq!(rest.last().unwrap().json()["reprise"]["code"], "cancelled");
}

/// A retried or double-clicked request with the same `Idempotency-Key`
/// costs one upstream call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotent_retry_makes_one_upstream_call() {
    let redis = RedisCluster::start().await.expect("start a Redis cluster");
    let upstream = Upstream::start().await;
    let (reply, ctl) = reprise_tests::Reply::controlled();
    upstream.respond_once(reply);
    let backend = Backend::Redis(redis.url());
    let a = TestRelay::start(chat_config(&upstream.url(), &backend)).await;
    let b = TestRelay::start(chat_config(&upstream.url(), &backend)).await;
    let c = TestRelay::start(chat_config(&upstream.url(), &backend)).await;
    let client = SseClient::new();
    let body = json!({"id": "c1", "messages": []});
    let first = client
        .post_json(&format!("{}/api/chat", a.url()), &body)
        .header("idempotency-key", "send-42");
    let second = client
        .post_json(&format!("{}/api/chat", b.url()), &body)
        .header("idempotency-key", "send-42");
    let (mut one, mut two) = tokio::join!(open_sse(first), open_sse(second));
    assert_eq!(one.status(), 200);
    assert_eq!(two.status(), 200);
    assert_eq!(
        one.header("reprise-stream-id"),
        two.header("reprise-stream-id")
    );
    for i in 1..=5 {
        ctl.send(numbered_event(i)).await;
    }
    ctl.finish();
    let expected: Vec<String> = numbered(1..=5);
    assert_eq!(data(&one.collect_until_end().await), expected);
    assert_eq!(data(&two.collect_until_end().await), expected);
    // A retry after the end replays the answer too.
    let mut third = open_sse(
        client
            .post_json(&format!("{}/api/chat", c.url()), &body)
            .header("idempotency-key", "send-42"),
    )
    .await;
    assert_eq!(third.header("reprise-idempotent-replay"), Some("true"));
    assert_eq!(data(&third.collect_until_end().await), expected);
    assert_eq!(upstream.request_count(), 1);
    a.stop().await;
    b.stop().await;
    c.stop().await;
}

/// An attempt that never started its stream (an upstream error, a 429)
/// gives its `Idempotency-Key` back: the retry calls the upstream at once
/// instead of waiting `streams.idempotency_wait` (an hour here) for a stream
/// that will never exist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_attempt_gives_its_idempotency_key_back() {
    let redis = RedisCluster::start().await.expect("start a Redis cluster");
    let upstream = Upstream::start().await;
    let mut cfg = chat_config(&upstream.url(), &Backend::Redis(redis.url()));
    cfg.streams.idempotency_wait = std::time::Duration::from_secs(3600);
    cfg.limits.max_streams_per_caller = 1;
    let a = TestRelay::start(cfg.clone()).await;
    let b = TestRelay::start(cfg).await;
    let client = SseClient::new();
    let send = |base: &str, key: &str| {
        client
            .post_json(
                &format!("{base}/api/chat"),
                &json!({"id": "c9", "messages": []}),
            )
            .header("idempotency-key", key)
    };

    // The upstream fails the first attempt; the retry, on another instance,
    // is a new call.
    upstream.respond_once(reprise_tests::Reply::status(503));
    let (status, _, _) = read_raw(send(&a.url(), "send-1")).await;
    assert_eq!(status, 503);
    let ctl = upstream.controlled_stream();
    let mut retried =
        with_timeout("the retry after a 503", open_sse(send(&b.url(), "send-1"))).await;
    assert_eq!(retried.status(), 200);
    assert_eq!(retried.header("reprise-idempotent-replay"), None);
    assert_eq!(upstream.request_count(), 2);

    // While that stream holds the caller's only slot, a new send is refused;
    // once it ends, the same key starts a stream.
    let (status, _, _) = read_raw(send(&a.url(), "send-2")).await;
    assert_eq!(status, 429);
    ctl.send(numbered_event(1)).await;
    ctl.finish();
    assert_eq!(data(&retried.collect_until_end().await), numbered(1..=1));
    let ctl = upstream.controlled_stream();
    let admitted = with_timeout("a send admitted with the refused key", async {
        loop {
            let r = open_sse(send(&a.url(), "send-2")).await;
            if r.status() != 429 {
                return r;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await;
    assert_eq!(admitted.status(), 200);
    assert_eq!(admitted.header("reprise-idempotent-replay"), None);
    assert_eq!(upstream.request_count(), 3);
    ctl.finish();
    a.stop().await;
    b.stop().await;
}
