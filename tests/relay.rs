//! The core relay end to end: a real upstream streaming SSE, Reprise in
//! front of it (in-process, or as separate processes), real HTTP clients with
//! an SSE parser independent of Reprise's, and a real `redis-server` started
//! by each test. Every scenario runs against both stores.

use bytes::Bytes;
use reprise_tests::on_both_stores;
use reprise_tests::redis::RedisServer;
use reprise_tests::relay::{chat_config, config, Backend, RelayProcess, TestRelay};
use reprise_tests::upstream::{event, numbered_event, numbered_event_data};
use reprise_tests::{data, numbered};
use reprise_tests::{open_sse, read_raw, Reply, SseClient, SseEvent, Upstream};
use serde_json::json;

on_both_stores!(
    framing_is_transparent,
    resume_by_each_way_gets_every_event_once,
    client_disconnect_does_not_stop_recording,
    upstream_dying_mid_stream_is_signalled,
    non_sse_and_errors_pass_through_unrecorded,
    request_is_forwarded_whole,
    status_codes_of_resumes,
    many_readers_each_get_every_event,
);

/// (event type, data, retry in ms) as an EventSource sees them.
fn seen(events: &[SseEvent]) -> Vec<(String, String, Option<u128>)> {
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

/// Tricky framing split at awkward bytes, including inside a multi-byte character.
fn tricky_chunks(with_bom: bool) -> Vec<Bytes> {
    let emoji = "data: é unicode 🎉\n\n".as_bytes().to_vec();
    let (e1, e2) = emoji.split_at(14); // splits the 4-byte emoji
    let mut chunks: Vec<Bytes> = Vec::new();
    if with_bom {
        chunks.push(Bytes::from_static(b"\xEF\xBB"));
        chunks.push(Bytes::from_static(b"\xBF: a comment after a split BOM\r\n"));
    } else {
        chunks.push(Bytes::from_static(b": a comment\r\n"));
    }
    for c in [
        &b"event: greet\r\ndata: hel"[..],
        b"lo\r\n\r",
        b"\n",
        b"data: line1\ndata: line2\n\n",
        b"data:no-space\r",
        b"\r",
        b"retry: 1500\ndata: with retry\n\n",
        b"id: upstream-7\ndata: upstream id replaced\n\n",
        b"event: nodata\n\n",
        b"data:  two spaces\n\n",
    ] {
        chunks.push(Bytes::copy_from_slice(c));
    }
    chunks.push(Bytes::copy_from_slice(e1));
    chunks.push(Bytes::copy_from_slice(e2));
    chunks.push(Bytes::from_static(
        b"data: last\n\nevent: incomplete\ndata: never dispatched",
    ));
    chunks
}

async fn framing_is_transparent(backend: Backend) {
    let upstream = Upstream::start().await;
    upstream.respond(|req| Reply::sse(tricky_chunks(req.path() == "/bom")));
    let relay = TestRelay::start(config(&upstream.url(), &backend)).await;
    let client = SseClient::new();

    let expected: Vec<(String, String, Option<u128>)> = vec![
        ("greet".into(), "hello".into(), None),
        ("message".into(), "line1\nline2".into(), None),
        ("message".into(), "no-space".into(), None),
        ("message".into(), "with retry".into(), Some(1500)),
        ("message".into(), "upstream id replaced".into(), None),
        ("message".into(), " two spaces".into(), None),
        ("message".into(), "é unicode 🎉".into(), None),
        ("message".into(), "last".into(), None),
    ];

    // Through Reprise, the same events as direct, with Reprise's ids.
    let mut via = client.open_get(&format!("{}/stream", relay.url())).await;
    assert_eq!(via.status(), 200);
    let stream_id = via
        .header("reprise-stream-id")
        .expect("stream id header")
        .to_string();
    let via_events = via.collect_until_end().await;
    let mut direct = client.open_get(&format!("{}/stream", upstream.url())).await;
    let direct_events = direct.collect_until_end().await;
    assert_eq!(seen(&via_events), seen(&direct_events));
    assert_eq!(seen(&via_events), expected);

    // Ids are Reprise's: name the stream, strictly increasing, upstream ids gone.
    let ids: Vec<&str> = via_events.iter().map(|e| e.id.as_str()).collect();
    assert!(
        ids.iter()
            .all(|id| id.starts_with(&format!("{stream_id}."))),
        "{ids:?}"
    );
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    assert!(!ids.contains(&"upstream-7"));

    // A leading BOM split across chunks is skipped, as a browser would.
    let mut bom = client.open_get(&format!("{}/bom", relay.url())).await;
    assert_eq!(seen(&bom.collect_until_end().await), expected);

    // The replay of the finished stream is identical.
    let mut replay = client
        .open_get(&format!("{}/_reprise/streams/{stream_id}", relay.url()))
        .await;
    assert_eq!(replay.status(), 200);
    let replayed = replay.collect_until_end().await;
    assert_eq!(replayed, via_events);
    relay.stop().await;
}

async fn resume_by_each_way_gets_every_event_once(backend: Backend) {
    let upstream = Upstream::start().await;
    let relay = TestRelay::start(chat_config(&upstream.url(), &backend)).await;
    let client = SseClient::new();
    let base = relay.url();

    let ctl = upstream.controlled_stream();
    let mut first = open_sse(client.post_json(
        &format!("{base}/api/chat"),
        &json!({"id": "chat-1", "messages": []}),
    ))
    .await;
    assert_eq!(first.status(), 200);
    let stream_id = first
        .header("reprise-stream-id")
        .expect("stream id")
        .to_string();
    for i in 1..=3 {
        ctl.send(numbered_event(i)).await;
    }
    let got = first.next_events(3).await;
    assert_eq!(data(&got), numbered(1..=3));
    let last_id = got[2].id.clone();
    first.disconnect();

    ctl.send(numbered_event(4)).await;
    ctl.send(numbered_event(5)).await;

    // 1. Last-Event-ID on the route (what a browser EventSource does).
    let mut by_last_id = open_sse(
        client
            .get(&format!("{base}/api/chat"))
            .header("last-event-id", &last_id),
    )
    .await;
    assert_eq!(by_last_id.status(), 200);
    assert_eq!(
        by_last_id.header("reprise-stream-id"),
        Some(stream_id.as_str())
    );
    assert_eq!(data(&by_last_id.next_events(2).await), numbered(4..=5));
    // ... also as the last_event_id query parameter.
    let mut by_query = client
        .open_get(&format!("{base}/api/chat?last_event_id={last_id}"))
        .await;
    assert_eq!(data(&by_query.next_events(2).await), numbered(4..=5));

    // 2. The streams endpoint with start_index, and with Last-Event-ID.
    let mut by_index = client
        .open_get(&format!(
            "{base}/_reprise/streams/{stream_id}?start_index=2"
        ))
        .await;
    assert_eq!(data(&by_index.next_events(3).await), numbered(3..=5));
    let mut by_endpoint_id = open_sse(
        client
            .get(&format!("{base}/_reprise/streams/{stream_id}"))
            .header("last-event-id", &last_id),
    )
    .await;
    assert_eq!(data(&by_endpoint_id.next_events(2).await), numbered(4..=5));

    // 3. The AI SDK resume template: the key's stream from its first event.
    let mut by_key = client
        .open_get(&format!("{base}/api/chat/chat-1/stream"))
        .await;
    assert_eq!(by_key.status(), 200);
    assert_eq!(by_key.header("reprise-stream-id"), Some(stream_id.as_str()));
    assert_eq!(data(&by_key.next_events(5).await), numbered(1..=5));

    // The live tail continues for all of them, then ends with the stream.
    for i in 6..=10 {
        ctl.send(numbered_event(i)).await;
    }
    ctl.finish();
    assert_eq!(
        data(&by_last_id.collect_until_end().await),
        numbered(6..=10)
    );
    assert_eq!(data(&by_query.collect_until_end().await), numbered(6..=10));
    assert_eq!(data(&by_index.collect_until_end().await), numbered(6..=10));
    assert_eq!(
        data(&by_endpoint_id.collect_until_end().await),
        numbered(6..=10)
    );
    assert_eq!(data(&by_key.collect_until_end().await), numbered(6..=10));

    // After the end: full replays still work; nothing-left answers 204.
    let mut all = client
        .open_get(&format!("{base}/_reprise/streams/{stream_id}"))
        .await;
    let all_events = all.collect_until_end().await;
    assert_eq!(data(&all_events), numbered(1..=10));
    let mut rest = open_sse(
        client
            .get(&format!("{base}/api/chat"))
            .header("last-event-id", &all_events[6].id),
    )
    .await;
    assert_eq!(data(&rest.collect_until_end().await), numbered(8..=10));
    let done = open_sse(
        client
            .get(&format!("{base}/api/chat"))
            .header("last-event-id", &all_events[9].id),
    )
    .await;
    assert_eq!(done.status(), 204);
    let done = client
        .open_get(&format!(
            "{base}/_reprise/streams/{stream_id}?start_index=10"
        ))
        .await;
    assert_eq!(done.status(), 204);
    // The AI SDK convention: a finished stream is not resumed by key.
    let by_key_after = client
        .open_get(&format!("{base}/api/chat/chat-1/stream"))
        .await;
    assert_eq!(by_key_after.status(), 204);
    assert_eq!(
        upstream.request_count(),
        1,
        "resumes must never reach the upstream"
    );
    relay.stop().await;
}

async fn client_disconnect_does_not_stop_recording(backend: Backend) {
    let upstream = Upstream::start().await;
    let relay = TestRelay::start(config(&upstream.url(), &backend)).await;
    let client = SseClient::new();
    let ctl = upstream.controlled_stream();
    let mut s = client.open_get(&format!("{}/gen", relay.url())).await;
    let stream_id = s
        .header("reprise-stream-id")
        .expect("stream id")
        .to_string();
    ctl.send(numbered_event(1)).await;
    assert_eq!(s.next_event().await.data, numbered_event_data(1));
    s.disconnect();
    for i in 2..=50 {
        ctl.send_or_closed(numbered_event(i))
            .await
            .expect("Reprise must keep reading the upstream after the client left");
    }
    assert!(!ctl.is_closed());
    ctl.finish();
    let mut replay = client
        .open_get(&format!("{}/_reprise/streams/{stream_id}", relay.url()))
        .await;
    assert_eq!(data(&replay.collect_until_end().await), numbered(1..=50));
    relay.stop().await;
}

async fn upstream_dying_mid_stream_is_signalled(backend: Backend) {
    let upstream = Upstream::start().await;
    let relay = TestRelay::start(config(&upstream.url(), &backend)).await;
    let client = SseClient::new();
    let ctl = upstream.controlled_stream();
    let mut s = client.open_get(&format!("{}/gen", relay.url())).await;
    let stream_id = s
        .header("reprise-stream-id")
        .expect("stream id")
        .to_string();
    for i in 1..=3 {
        ctl.send(numbered_event(i)).await;
    }
    ctl.abort().await;
    let events = s.collect_until_end().await;
    assert_eq!(events.len(), 4, "{events:?}");
    assert_eq!(data(&events[..3]), numbered(1..=3));
    let signal = &events[3];
    assert_eq!(signal.event, "reprise-error");
    let body = signal.json();
    assert_eq!(body["type"], "error");
    assert_eq!(body["reprise"]["code"], "upstream_reset");
    assert_eq!(body["reprise"]["stream_id"], stream_id.as_str());

    // A later resume replays what was recorded, then the signal; resuming
    // from the signal's id answers 204 so an EventSource stops.
    let mut again = open_sse(
        client
            .get(&format!("{}/gen", relay.url()))
            .header("last-event-id", &events[1].id),
    )
    .await;
    let rest = again.collect_until_end().await;
    assert_eq!(rest.len(), 2);
    assert_eq!(rest[0].data, numbered_event_data(3));
    assert_eq!(rest[1].event, "reprise-error");
    let done = open_sse(
        client
            .get(&format!("{}/gen", relay.url()))
            .header("last-event-id", &signal.id),
    )
    .await;
    assert_eq!(done.status(), 204);
    relay.stop().await;
}

async fn non_sse_and_errors_pass_through_unrecorded(backend: Backend) {
    let upstream = Upstream::start().await;
    upstream.respond(|req| match req.path() {
        "/missing" => Reply::json(404, &json!({"error": "nope"})).header("x-up", "1"),
        "/json" => Reply::json(200, &json!({"answer": 42})),
        "/error-sse" => Reply::sse([event("not recorded")]).with_status(500),
        _ => Reply::sse([Bytes::from_static(b"id: up-1\ndata: plain\n\n")]),
    });
    let relay = TestRelay::start(chat_config(&upstream.url(), &backend)).await;
    let client = SseClient::new();

    let (status, headers, body) = read_raw(client.get(&format!("{}/missing", relay.url()))).await;
    assert_eq!(status, 404);
    assert_eq!(headers.get("x-up").map(|v| v.as_bytes()), Some(&b"1"[..]));
    assert!(headers.get("reprise-stream-id").is_none());
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&body.bytes).unwrap(),
        json!({"error": "nope"})
    );

    let (status, headers, body) = read_raw(client.get(&format!("{}/json", relay.url()))).await;
    assert_eq!(status, 200);
    assert!(headers.get("reprise-stream-id").is_none());
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&body.bytes).unwrap(),
        json!({"answer": 42})
    );

    let (status, headers, body) = read_raw(client.get(&format!("{}/error-sse", relay.url()))).await;
    assert_eq!(status, 500);
    assert!(headers.get("reprise-stream-id").is_none());
    assert_eq!(body.bytes, event("not recorded"));

    // A route with record = false passes SSE through byte for byte.
    let (status, headers, body) = read_raw(client.get(&format!("{}/plain/x", relay.url()))).await;
    assert_eq!(status, 200);
    assert!(headers.get("reprise-stream-id").is_none());
    assert_eq!(&body.bytes[..], b"id: up-1\ndata: plain\n\n");
    relay.stop().await;
}

async fn request_is_forwarded_whole(backend: Backend) {
    let upstream = Upstream::start().await;
    upstream.respond(|_| Reply::sse([event("ok")]));
    let relay = TestRelay::start(chat_config(&upstream.url(), &backend)).await;
    let client = SseClient::new();
    let body = json!({"id": "c-9", "messages": [{"role": "user", "content": "hi"}]});
    let mut s = open_sse(
        client
            .post_json(&format!("{}/api/chat/sub?x=1&y=%20", relay.url()), &body)
            .header("authorization", "Bearer secret-token")
            .header("cookie", "session=abc")
            .header("x-custom", "kept")
            .header("connection", "keep-alive, x-hop")
            .header("x-hop", "dropped"),
    )
    .await;
    assert_eq!(data(&s.collect_until_end().await), vec!["ok".to_string()]);
    let req = upstream.nth_request(1).await;
    assert_eq!(req.method, "POST");
    assert_eq!(req.path_and_query, "/api/chat/sub?x=1&y=%20");
    assert_eq!(req.header("authorization"), Some("Bearer secret-token"));
    assert_eq!(req.header("cookie"), Some("session=abc"));
    assert_eq!(req.header("x-custom"), Some("kept"));
    assert_eq!(req.header("x-hop"), None);
    assert_eq!(req.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(
        req.header("host"),
        Some(upstream.addr().to_string().as_str())
    );
    assert_eq!(req.body_json(), body);

    // A Last-Event-ID that is not Reprise's belongs to the upstream.
    let mut foreign = open_sse(
        client
            .get(&format!("{}/x", relay.url()))
            .header("last-event-id", "chatcmpl-123"),
    )
    .await;
    foreign.collect_until_end().await;
    let req = upstream.nth_request(2).await;
    assert_eq!(req.header("last-event-id"), Some("chatcmpl-123"));
    relay.stop().await;
}

async fn status_codes_of_resumes(backend: Backend) {
    let upstream = Upstream::start().await;
    let relay = TestRelay::start(chat_config(&upstream.url(), &backend)).await;
    let client = SseClient::new();
    let base = relay.url();
    let unknown = "AAAAAAAAAAAAAAAAAAAAAA";

    let (status, _, body) =
        read_raw(client.get(&format!("{base}/_reprise/streams/{unknown}"))).await;
    assert_eq!(status, 404);
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&body.bytes).unwrap()["error"]["code"],
        "stream_not_found"
    );
    for (path, code) in [
        ("/_reprise/streams/not-an-id", "invalid_stream_id"),
        (
            "/_reprise/streams/AAAAAAAAAAAAAAAAAAAAAA?start_index=-1",
            "invalid_start_index",
        ),
        (
            "/_reprise/streams/AAAAAAAAAAAAAAAAAAAAAA?last_event_id=nope",
            "invalid_last_event_id",
        ),
        ("/api/chat/a%2Fb", "invalid_path"),
    ] {
        let (status, _, body) = read_raw(client.get(&format!("{base}{path}"))).await;
        assert_eq!(status, 400, "{path}");
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&body.bytes).unwrap()["error"]["code"],
            code,
            "{path}"
        );
    }

    // Dot segments, sent raw (HTTP clients would normalize them away).
    for target in ["/api/chat/../secret", "/api/chat/%2e%2e/secret", "/./x"] {
        assert_eq!(raw_status(relay.addr(), target).await, 400, "{target}");
    }
    assert_eq!(upstream.request_count(), 0);

    // An unknown stream via Last-Event-ID: in-band history_lost, never a
    // silent fresh upstream call; its id then gets 204.
    let lost_id = format!("{unknown}.0badcafe.0000000003");
    let mut lost = open_sse(
        client
            .get(&format!("{base}/api/chat"))
            .header("last-event-id", &lost_id),
    )
    .await;
    assert_eq!(lost.status(), 200);
    let events = lost.collect_until_end().await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].event, "reprise-error");
    assert_eq!(events[0].json()["reprise"]["code"], "history_lost");
    assert_eq!(events[0].id, format!("{unknown}.end"));
    let end = open_sse(
        client
            .get(&format!("{base}/api/chat"))
            .header("last-event-id", &events[0].id),
    )
    .await;
    assert_eq!(end.status(), 204);

    // A known stream but another epoch (deleted and re-created): history lost.
    upstream.respond(|_| Reply::sse([numbered_event(1), numbered_event(2)]));
    let mut s = client.open_get(&format!("{base}/x")).await;
    let stream_id = s
        .header("reprise-stream-id")
        .expect("stream id")
        .to_string();
    let events = s.collect_until_end().await;
    let real_epoch = events[0].id.split('.').nth(1).expect("epoch").to_string();
    let other_epoch = if real_epoch == "00000001" {
        "00000002"
    } else {
        "00000001"
    };
    let stale = format!("{stream_id}.{other_epoch}.0000000001");
    let mut stale_resume = open_sse(
        client
            .get(&format!("{base}/x"))
            .header("last-event-id", &stale),
    )
    .await;
    let events = stale_resume.collect_until_end().await;
    assert_eq!(events[0].json()["reprise"]["code"], "history_lost");

    // The resume template for a key that never streamed: 204.
    let none = client
        .open_get(&format!("{base}/api/chat/never/stream"))
        .await;
    assert_eq!(none.status(), 204);
    assert_eq!(
        upstream.request_count(),
        1,
        "only the one real request reached the upstream"
    );
    relay.stop().await;
}

async fn many_readers_each_get_every_event(backend: Backend) {
    let upstream = Upstream::start().await;
    let relay = TestRelay::start(config(&upstream.url(), &backend)).await;
    let client = SseClient::new();
    let ctl = upstream.controlled_stream();
    let mut origin = client.open_get(&format!("{}/gen", relay.url())).await;
    let stream_id = origin
        .header("reprise-stream-id")
        .expect("stream id")
        .to_string();
    let mut readers = Vec::new();
    for i in 1..=100usize {
        ctl.send(numbered_event(i)).await;
        if i % 10 == 0 {
            // A reader joining now, from a different position each time.
            let url = format!(
                "{}/_reprise/streams/{stream_id}?start_index={}",
                relay.url(),
                i / 2
            );
            readers.push((i / 2, client.open_get(&url).await));
        }
    }
    ctl.finish();
    assert_eq!(data(&origin.collect_until_end().await), numbered(1..=100));
    for (from, mut r) in readers {
        assert_eq!(
            data(&r.collect_until_end().await),
            numbered(from + 1..=100),
            "reader from {from}"
        );
    }
    relay.stop().await;
}

/// AI SDK headers reach resuming readers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ai_sdk_headers_are_replayed_on_resume() {
    let upstream = Upstream::start().await;
    let relay = TestRelay::start(chat_config(&upstream.url(), &Backend::Memory)).await;
    let (reply, ctl) = Reply::controlled();
    upstream.respond_once(reply.header("x-vercel-ai-ui-message-stream", "v1"));
    let client = SseClient::new();
    let mut s =
        open_sse(client.post_json(&format!("{}/api/chat", relay.url()), &json!({"id": "k1"})))
            .await;
    assert_eq!(s.header("x-vercel-ai-ui-message-stream"), Some("v1"));
    ctl.send(event(r#"{"type":"start"}"#)).await;
    s.next_event().await;
    let mut resumed = client
        .open_get(&format!("{}/api/chat/k1/stream", relay.url()))
        .await;
    assert_eq!(resumed.status(), 200);
    assert_eq!(resumed.header("x-vercel-ai-ui-message-stream"), Some("v1"));
    assert!(resumed
        .header("content-type")
        .is_some_and(|v| v.starts_with("text/event-stream")));
    assert_eq!(resumed.next_event().await.data, r#"{"type":"start"}"#);
    ctl.finish();
    relay.stop().await;
}

/// Two Reprise processes over one Redis: a stream started on A is resumed on
/// B mid-stream, and B follows it live to the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_share_streams_over_one_redis() {
    let redis = RedisServer::start().await.expect("start redis-server");
    let upstream = Upstream::start().await;
    let args = ["--upstream", &upstream.url(), "--redis", &redis.url()];
    let (a, b) = tokio::join!(RelayProcess::start(&args), RelayProcess::start(&args));
    let client = SseClient::new();

    let ctl = upstream.controlled_stream();
    let mut on_a = client.open_get(&format!("{}/gen", a.url())).await;
    let stream_id = on_a
        .header("reprise-stream-id")
        .expect("stream id")
        .to_string();
    for i in 1..=5 {
        ctl.send(numbered_event(i)).await;
    }
    let got = on_a.next_events(2).await;
    on_a.disconnect();

    let mut on_b = open_sse(
        client
            .get(&format!("{}/gen", b.url()))
            .header("last-event-id", &got[1].id),
    )
    .await;
    assert_eq!(on_b.status(), 200);
    assert_eq!(data(&on_b.next_events(3).await), numbered(3..=5));
    let mut on_b_by_id = client
        .open_get(&format!("{}/_reprise/streams/{stream_id}", b.url()))
        .await;
    assert_eq!(data(&on_b_by_id.next_events(5).await), numbered(1..=5));
    for i in 6..=20 {
        ctl.send(numbered_event(i)).await;
    }
    ctl.finish();
    assert_eq!(data(&on_b.collect_until_end().await), numbered(6..=20));
    assert_eq!(
        data(&on_b_by_id.collect_until_end().await),
        numbered(6..=20)
    );
    assert_eq!(upstream.request_count(), 1);
}

/// An absolute-form target or a forged `Host` never picks the upstream: the
/// route's configured upstream is called, with its own authority.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absolute_form_targets_and_host_tricks_stay_on_the_route() {
    let upstream = Upstream::start().await;
    let relay = TestRelay::start(chat_config(&upstream.url(), &Backend::Memory)).await;
    upstream.respond(|_| Reply::text(200, "ok"));
    let own = upstream.addr().to_string();
    let cases = [
        ("http://evil.example/api/chat/x", "relay"),
        ("http://evil.example:80/plain/y?q=1", "evil.example"),
        ("/plain/z", "evil.example"),
        ("/plain/w", "evil.example@127.0.0.1:1"),
    ];
    for (i, (target, host)) in cases.iter().enumerate() {
        let status = raw_status_with_host(relay.addr(), target, host).await;
        assert_eq!(status, 200, "{target} with Host {host}");
        let req = upstream.nth_request(i + 1).await;
        assert_eq!(req.header("host"), Some(own.as_str()), "{target}");
        assert!(
            !req.path_and_query.contains("evil"),
            "{target} reached the upstream as {}",
            req.path_and_query
        );
    }
    assert_eq!(upstream.nth_request(1).await.path_and_query, "/api/chat/x");
    assert_eq!(upstream.nth_request(2).await.path_and_query, "/plain/y?q=1");
    relay.stop().await;
}

/// Status code of a GET sent as raw bytes, so the target is not normalized.
async fn raw_status(addr: std::net::SocketAddr, target: &str) -> u16 {
    raw_status_with_host(addr, target, "relay").await
}

async fn raw_status_with_host(addr: std::net::SocketAddr, target: &str, host: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let req = format!("GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    conn.write_all(req.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    reprise_tests::with_timeout("raw response", conn.read_to_end(&mut buf))
        .await
        .expect("read");
    let head = String::from_utf8_lossy(&buf);
    head.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"))
}

/// NDJSON (Ollama): one entry per line, forwarded and replayed in the
/// original format; `start_index=N` sends the remaining lines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ndjson_streams_are_recorded_per_line() {
    let redis = RedisServer::start().await.expect("start redis-server");
    let upstream = Upstream::start().await;
    let relay = TestRelay::start(config(&upstream.url(), &Backend::Redis(redis.url()))).await;
    let (reply, ctl) = Reply::controlled();
    upstream.respond_once(reply.header("content-type", "application/x-ndjson"));
    let client = SseClient::new();
    let mut raw = reprise_tests::RawResponse::open(
        client.http().post(format!("{}/api/generate", relay.url())),
    )
    .await;
    assert_eq!(raw.status(), 200);
    let stream_id = raw
        .header("reprise-stream-id")
        .expect("stream id")
        .to_string();
    ctl.send(Bytes::from_static(
        b"{\"response\":\"He\",\"done\":false}\n{\"resp",
    ))
    .await;
    ctl.send(Bytes::from_static(b"onse\":\"llo\",\"done\":false}\r\n\n"))
        .await;
    assert_eq!(
        &raw.read_until(b"\"llo\",\"done\":false}\n").await[..],
        b"{\"response\":\"He\",\"done\":false}\n{\"response\":\"llo\",\"done\":false}\n"
    );
    ctl.send(Bytes::from_static(b"{\"response\":\"\",\"done\":true}"))
        .await;
    ctl.finish();
    let rest = raw.read_to_end().await;
    assert_eq!(&rest.bytes[..], b"{\"response\":\"\",\"done\":true}\n");

    let (status, headers, body) = read_raw(client.get(&format!(
        "{}/_reprise/streams/{stream_id}?start_index=1",
        relay.url()
    )))
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        headers.get("content-type").map(|v| v.as_bytes()),
        Some(&b"application/x-ndjson"[..])
    );
    assert_eq!(
        &body.bytes[..],
        b"{\"response\":\"llo\",\"done\":false}\n{\"response\":\"\",\"done\":true}\n"
    );

    // A failure ends the NDJSON stream with an Ollama-style error line.
    let (reply, ctl) = Reply::controlled();
    upstream.respond_once(reply.header("content-type", "application/x-ndjson"));
    let raw = reprise_tests::RawResponse::open(
        client.http().post(format!("{}/api/generate", relay.url())),
    )
    .await;
    ctl.send(Bytes::from_static(b"{\"response\":\"a\"}\n"))
        .await;
    ctl.abort().await;
    let body = raw.read_to_end().await;
    let text = body.text();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    let err: serde_json::Value = serde_json::from_str(lines[1]).expect("error line is JSON");
    assert_eq!(err["reprise"]["code"], "upstream_reset");
    assert!(err["error"]
        .as_str()
        .is_some_and(|e| e.starts_with("reprise: ")));
    relay.stop().await;
}

/// `/_reprise/metrics` counts streams, events, resumes and store calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_reflect_streams_and_resumes() {
    let redis = RedisServer::start().await.expect("start redis-server");
    let upstream = Upstream::start().await;
    upstream.respond(|req| match req.path() {
        "/missing" => Reply::status(404),
        _ => Reply::sse([numbered_event(1), numbered_event(2), numbered_event(3)]),
    });
    let relay = TestRelay::start(chat_config(&upstream.url(), &Backend::Redis(redis.url()))).await;
    let client = SseClient::new();
    let mut s = client.open_get(&format!("{}/x", relay.url())).await;
    let stream_id = s
        .header("reprise-stream-id")
        .expect("stream id")
        .to_string();
    s.collect_until_end().await;
    let mut r = client
        .open_get(&format!(
            "{}/_reprise/streams/{stream_id}?start_index=1",
            relay.url()
        ))
        .await;
    assert_eq!(r.collect_until_end().await.len(), 2);
    assert_eq!(
        client
            .open_get(&format!("{}/api/chat/none/stream", relay.url()))
            .await
            .status(),
        204
    );
    let (status, _, _) = read_raw(client.get(&format!("{}/missing", relay.url()))).await;
    assert_eq!(status, 404);

    let (status, headers, body) =
        read_raw(client.get(&format!("{}/_reprise/metrics", relay.url()))).await;
    assert_eq!(status, 200);
    assert!(headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/openmetrics-text"));
    let text = body.text();
    let value = |line_start: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(line_start))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no metric {line_start} in:\n{text}"))
    };
    assert_eq!(value("reprise_streams_started_total{route=\"/\"}"), 1.0);
    assert_eq!(
        value("reprise_streams_ended_total{route=\"/\",outcome=\"completed\",reason=\"\"}"),
        1.0
    );
    assert_eq!(value("reprise_events_recorded_total"), 3.0);
    assert_eq!(value("reprise_events_replayed_total"), 2.0);
    assert_eq!(
        value("reprise_resumes_total{kind=\"stream_id\",outcome=\"ok\"}"),
        1.0
    );
    assert_eq!(
        value("reprise_resumes_total{kind=\"key\",outcome=\"no_content\"}"),
        1.0
    );
    assert_eq!(
        value("reprise_upstream_responses_total{route=\"/\",status=\"200\"}"),
        1.0
    );
    assert_eq!(
        value("reprise_upstream_responses_total{route=\"/\",status=\"404\"}"),
        1.0
    );
    // A short stream is stored in one call: its start, with every entry.
    assert!(value("reprise_store_latency_seconds_count{op=\"start\"}") >= 1.0);
    assert_eq!(value("reprise_streams_active"), 0.0);
    relay.stop().await;
}

/// Upstream connections (plain HTTP: driven by the stream's own task, see
/// `upstream::direct`) are reused once a response has been read to its
/// end, recorded or not; one the upstream closes after its response
/// (`Connection: close`) is not, and the next request gets a new one.
// One thread, as each of Reprise's serving runtimes (the idle connections
// are a thread's own).
#[tokio::test]
async fn upstream_connections_are_reused_and_a_closed_one_is_replaced() {
    let upstream = Upstream::start().await;
    upstream.respond(|req| match req.path() {
        "/plain/json" => Reply::json(200, &json!({"answer": 42})),
        "/close" => Reply::sse([event("last on this connection")]).header("connection", "close"),
        _ => Reply::sse([event("a"), event("b")]),
    });
    let mut c = chat_config(&upstream.url(), &Backend::Memory);
    // One serving thread: one thread's idle connections.
    c.threads = 1;
    let relay = TestRelay::start(c).await;
    let client = SseClient::new();
    for i in 0..8 {
        let path = if i % 2 == 0 { "/chat" } else { "/plain/json" };
        let (status, _, body) = read_raw(client.get(&format!("{}{path}", relay.url()))).await;
        assert_eq!(status, 200, "request {i}");
        assert!(!body.bytes.is_empty(), "request {i}");
    }
    assert_eq!(upstream.request_count(), 8);
    let reused = upstream.connection_count();
    assert_eq!(
        reused, 1,
        "8 sequential requests took {reused} upstream connections"
    );

    // The upstream ends the connection after this response: the next
    // request goes out on a new one and succeeds.
    let (status, _, body) = read_raw(client.get(&format!("{}/close", relay.url()))).await;
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&body.bytes).contains("last on this connection"));
    let (status, _, body) = read_raw(client.get(&format!("{}/chat", relay.url()))).await;
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&body.bytes).contains("data: b"));
    assert_eq!(upstream.connection_count(), 2);
    relay.stop().await;
}
