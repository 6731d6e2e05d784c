//! Self-tests of the test fixtures (upstream server, SSE and raw clients, timeouts), run
//! without the relay: client → upstream directly. If these fail, relay tests prove nothing.

use std::time::Duration;

use bytes::Bytes;
use reprise_tests::client::{read_raw, BodyError, RawResponse, SseClient};
use reprise_tests::upstream::{event, numbered_event, numbered_event_data, Reply, Upstream};
use reprise_tests::{init_tracing, open_sse, with_timeout, with_timeout_of};

/// An event stream exercising every field and line ending, as one string.
const WIRE: &str = "retry: 1500\r\nid: 1\r\nevent: delta\r\ndata: {\"text\":\"h\u{e9}\"}\r\n\r\n\
                    : comment\rid: 2\rdata: line one\rdata: line two\r\r\
                    data: no id here\n\n";

fn assert_parsed_wire(events: &[reprise_tests::SseEvent]) {
    assert_eq!(events.len(), 3, "{events:?}");
    assert_eq!(events[0].id, "1");
    assert_eq!(events[0].event, "delta");
    assert_eq!(events[0].data, "{\"text\":\"h\u{e9}\"}");
    assert_eq!(events[0].retry, Some(Duration::from_millis(1500)));
    assert_eq!(events[0].json()["text"], "h\u{e9}");
    assert_eq!(events[1].id, "2");
    assert_eq!(events[1].event, "message");
    assert_eq!(events[1].data, "line one\nline two");
    // The last event id carries over, as in a browser.
    assert_eq!(events[2].id, "2");
    assert_eq!(events[2].data, "no id here");
}

#[tokio::test]
async fn sse_chunks_split_at_every_byte_parse_like_one_chunk() {
    init_tracing();
    let upstream = Upstream::start().await;
    // Every byte its own write: splits CRLF pairs and the two-byte UTF-8 "é".
    let chunks: Vec<Bytes> = WIRE
        .as_bytes()
        .iter()
        .map(|byte| Bytes::copy_from_slice(&[*byte]))
        .collect();
    upstream.respond_once(Reply::sse(chunks));
    upstream.respond_once(Reply::sse([WIRE]));

    let client = SseClient::new();
    for _ in 0..2 {
        let mut stream = client.open_get(&format!("{}/stream", upstream.url())).await;
        assert_eq!(stream.status(), 200);
        assert_eq!(stream.header("content-type"), Some("text/event-stream"));
        assert_parsed_wire(&stream.collect_until_end().await);
        assert_eq!(stream.last_event_id(), "2");
    }
}

#[tokio::test]
async fn requests_are_recorded_and_replies_chosen_in_order() {
    init_tracing();
    let upstream = Upstream::start().await;
    let client = SseClient::new();

    // Nothing installed: 404.
    let (status, _, _) = read_raw(client.get(&upstream.url())).await;
    assert_eq!(status, 404);

    upstream.respond(|request| {
        Reply::json(201, &serde_json::json!({ "path": request.path() }))
            .header("x-vercel-ai-ui-message-stream", "v1")
    });
    upstream.respond_once(Reply::text(503, "busy").header("retry-after", "1"));

    let body = serde_json::json!({ "model": "m", "stream": true });
    let request = client
        .post_json(&format!("{}/v1/chat?x=1&y=2", upstream.url()), &body)
        .header("authorization", "Bearer secret");
    let (status, headers, raw) = read_raw(request).await;
    assert_eq!(status, 503, "the one-shot reply comes before the handler");
    assert_eq!(headers["retry-after"], "1");
    assert_eq!(raw.text(), "busy");
    assert_eq!(raw.error, None);

    let (status, headers, raw) = read_raw(client.get(&format!("{}/b", upstream.url()))).await;
    assert_eq!(status, 201);
    assert_eq!(headers["x-vercel-ai-ui-message-stream"], "v1");
    assert_eq!(raw.text(), r#"{"path":"/b"}"#);

    let requests = upstream.wait_for_requests(3).await;
    assert_eq!(upstream.request_count(), 3);
    let post = &requests[1];
    assert_eq!(post.method, "POST");
    assert_eq!(post.path(), "/v1/chat");
    assert_eq!(post.query(), Some("x=1&y=2"));
    assert_eq!(post.header("authorization"), Some("Bearer secret"));
    assert_eq!(post.header("accept"), Some("text/event-stream"));
    assert_eq!(post.body_json(), body);
    assert_eq!(upstream.nth_request(3).await.path_and_query, "/b");
}

#[tokio::test]
async fn controlled_stream_delivers_pushed_chunks_then_ends_cleanly() {
    init_tracing();
    let upstream = Upstream::start().await;
    let control = upstream.controlled_stream();
    let client = SseClient::new();
    let mut stream = open_sse(client.post(&format!("{}/gen", upstream.url()), "{}")).await;
    assert_eq!(stream.status(), 200);
    assert_eq!(control.request().await.path(), "/gen");

    control.send_event("one").await;
    assert_eq!(stream.next_event().await.data, "one");
    // An event split across two pushes, the split inside the CRLF.
    control.send("id: 7\r\ndata: tw").await;
    control.send("o\r").await;
    control.send("\n\r\n").await;
    let second = stream.next_event().await;
    assert_eq!((second.id.as_str(), second.data.as_str()), ("7", "two"));

    control.send_event("three").await;
    control.finish();
    let rest = stream.collect_until_end().await;
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0].data, "three");
}

#[tokio::test]
async fn abort_truncates_the_body() {
    init_tracing();
    let upstream = Upstream::start().await;
    let control = upstream.controlled_stream();
    let client = SseClient::new();
    let mut stream = client.open_get(&upstream.url()).await;

    control.send_event("complete").await;
    assert_eq!(stream.next_event().await.data, "complete");
    control.send("data: half an ev").await;
    control.abort().await;

    let (events, error) = stream.collect_until_error().await;
    assert!(
        events.is_empty(),
        "a half event is never dispatched: {events:?}"
    );
    assert!(matches!(error, BodyError::Transport(_)), "{error:?}");
}

#[tokio::test]
async fn abort_at_end_truncates_a_scripted_body_on_the_wire() {
    init_tracing();
    let upstream = Upstream::start().await;
    upstream.respond_once(Reply::sse([event("a"), Bytes::from_static(b"data: b")]).abort_at_end());
    let raw = RawResponse::open(SseClient::new().get(&upstream.url()))
        .await
        .read_to_end()
        .await;
    assert_eq!(
        raw.text(),
        "data: a\n\ndata: b",
        "everything written before the abort arrives"
    );
    assert!(raw.error.is_some(), "the body must fail, not end cleanly");
}

#[tokio::test]
async fn closed_fires_when_the_client_hangs_up() {
    init_tracing();
    let upstream = Upstream::start().await;
    let control = upstream.controlled_stream();
    let mut stream = SseClient::new().open_get(&upstream.url()).await;
    control.send_event("before").await;
    assert_eq!(stream.next_event().await.data, "before");
    assert!(!control.is_closed());

    stream.disconnect();
    control.closed().await;
    assert!(control.is_closed());
    assert!(control.send_or_closed(event("after")).await.is_err());
}

#[tokio::test]
async fn raw_reader_sees_exact_bytes() {
    init_tracing();
    let upstream = Upstream::start().await;
    let control = upstream.controlled_stream();
    let mut raw = RawResponse::open(SseClient::new().get(&upstream.url())).await;
    assert_eq!(raw.header("cache-control"), Some("no-cache"));

    control.send("id: 1\r\ndata: x\r\n\r\n").await;
    control.send(": ping\n\n").await;
    assert_eq!(
        &raw.read_until(b"\r\n\r\n").await[..],
        b"id: 1\r\ndata: x\r\n\r\n"
    );
    control.finish();
    let rest = raw.read_to_end().await;
    assert_eq!(rest.text(), ": ping\n\n");
    assert_eq!(rest.error, None);
}

#[tokio::test]
async fn paced_events_arrive_in_order() {
    init_tracing();
    let upstream = Upstream::start().await;
    upstream.respond(|_| Reply::paced_events(5, Duration::from_millis(5)));
    let mut stream = SseClient::new().open_get(&upstream.url()).await;
    let data: Vec<String> = stream
        .collect_until_end()
        .await
        .into_iter()
        .map(|event| event.data)
        .collect();
    let expected: Vec<String> = (1..=5).map(numbered_event_data).collect();
    assert_eq!(data, expected);
    assert_eq!(&numbered_event(2)[..], b"data: event-2\n\n");
}

// Tests of keep-alive and lease logic pause the clock while real sockets are open; tokio then
// jumps time forward whenever no I/O is ready. The fixtures must keep working: their bounds
// use the wall clock and the upstream runs no hyper timers.
#[tokio::test(start_paused = true)]
async fn bounded_waits_survive_a_paused_clock() {
    init_tracing();
    let upstream = Upstream::start().await;
    let control = upstream.controlled_stream();
    let mut stream = SseClient::new().open_get(&upstream.url()).await;
    for i in 1..=20 {
        control.send(numbered_event(i)).await;
        assert_eq!(stream.next_event().await.data, numbered_event_data(i));
    }
    control.finish();
    assert!(stream.collect_until_end().await.is_empty());
}

#[tokio::test]
#[should_panic(expected = "timed out after 0.05s waiting for the impossible")]
async fn with_timeout_of_fails_loudly() {
    with_timeout_of(
        Duration::from_millis(50),
        "the impossible",
        std::future::pending::<()>(),
    )
    .await;
}

#[tokio::test]
async fn with_timeout_returns_the_output() {
    assert_eq!(with_timeout("a ready future", async { 7 }).await, 7);
}
