//! Faults and bad input: upstreams that stall, reset, flood or never answer;
//! limits; slow readers; bad requests. Each gets a clear, documented outcome.

use std::time::Duration;

use bytes::Bytes;
use bytesize::ByteSize;
use reprise_tests::relay::{chat_config, config, Backend, TestRelay};
use reprise_tests::upstream::{numbered_event, numbered_event_data};
use reprise_tests::{
    open_sse, read_raw, with_timeout, RawResponse, Reply, SseClient, SseEvent, Upstream,
};
use serde_json::json;

fn signal_code(e: &SseEvent) -> String {
    assert_eq!(e.event, "reprise-error", "not a signal: {e:?}");
    e.json()["reprise"]["code"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn error_code(body: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(body).expect("JSON error body");
    v["error"]["code"].as_str().unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_upstream_times_out_and_is_closed() {
    let upstream = Upstream::start().await;
    let mut c = config(&upstream.url(), &Backend::Memory);
    c.timeouts.idle = Duration::from_millis(300);
    let relay = TestRelay::start(c).await;
    let ctl = upstream.controlled_stream();
    let mut s = SseClient::new()
        .open_get(&format!("{}/gen", relay.url()))
        .await;
    ctl.send(numbered_event(1)).await;
    let events = s.collect_until_end().await;
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(events[0].data, numbered_event_data(1));
    assert_eq!(signal_code(&events[1]), "upstream_timeout");
    // Reprise hung up on the stalled upstream.
    ctl.closed().await;
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_longer_than_the_maximum_duration_is_cut() {
    let upstream = Upstream::start().await;
    upstream.respond(|_| Reply::paced_events(1000, Duration::from_millis(20)));
    let mut c = config(&upstream.url(), &Backend::Memory);
    c.timeouts.max_stream_duration = Duration::from_millis(400);
    let relay = TestRelay::start(c).await;
    let mut s = SseClient::new()
        .open_get(&format!("{}/gen", relay.url()))
        .await;
    let events = s.collect_until_end().await;
    let last = events.last().expect("events");
    assert_eq!(signal_code(last), "upstream_timeout");
    assert!(last.json()["errorText"]
        .as_str()
        .unwrap_or_default()
        .contains("maximum duration"));
    assert!(events.len() < 1000);
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_never_answers_gets_504_and_a_dead_one_502() {
    // Accepts connections, reads, never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((conn, _)) = silent.accept().await {
            held.push(conn);
        }
    });
    let mut c = config(&format!("http://{silent_addr}"), &Backend::Memory);
    c.timeouts.response = Duration::from_millis(300);
    let relay = TestRelay::start(c).await;
    let (status, _, body) = read_raw(SseClient::new().get(&format!("{}/gen", relay.url()))).await;
    assert_eq!(status, 504);
    assert_eq!(error_code(&body.bytes), "upstream_timeout");
    relay.stop().await;

    let closed_port = reprise_tests::redis::free_port().unwrap();
    let relay = TestRelay::start(config(
        &format!("http://127.0.0.1:{closed_port}"),
        &Backend::Memory,
    ))
    .await;
    let (status, _, body) = read_raw(SseClient::new().get(&format!("{}/gen", relay.url()))).await;
    assert_eq!(status, 502);
    assert_eq!(error_code(&body.bytes), "upstream_unavailable");
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_10_mb_line_without_newline_fails_the_stream_with_bounded_memory() {
    let upstream = Upstream::start().await;
    let mut c = config(&upstream.url(), &Backend::Memory);
    c.limits.max_line = ByteSize::kib(64);
    let relay = TestRelay::start(c).await;
    let ctl = upstream.controlled_stream();
    let mut s = SseClient::new()
        .open_get(&format!("{}/gen", relay.url()))
        .await;
    let stream_id = s.header("reprise-stream-id").unwrap().to_string();
    ctl.send(numbered_event(1)).await;
    let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
    let mut sent = 0;
    ctl.send(Bytes::from_static(b"data: ")).await;
    while sent < 10 * 1024 * 1024 {
        if ctl.send_or_closed(chunk.clone()).await.is_err() {
            break; // Reprise gave up on the upstream: expected before 10 MB.
        }
        sent += chunk.len();
    }
    let events = s.collect_until_end().await;
    assert_eq!(
        events.len(),
        2,
        "{:?}",
        events.iter().map(|e| &e.event).collect::<Vec<_>>()
    );
    assert_eq!(signal_code(&events[1]), "upstream_protocol");
    ctl.closed().await;
    // What was recorded before the bad line is kept.
    let mut replay = SseClient::new()
        .open_get(&format!("{}/_reprise/streams/{stream_id}", relay.url()))
        .await;
    let replayed = replay.collect_until_end().await;
    assert_eq!(replayed[0].data, numbered_event_data(1));
    assert_eq!(signal_code(&replayed[1]), "upstream_protocol");
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_upstream_hits_the_stream_limit() {
    let upstream = Upstream::start().await;
    upstream.respond(|_| Reply::sse((1..=1000).map(numbered_event)));
    let mut c = config(&upstream.url(), &Backend::Memory);
    c.limits.max_stream_events = 100;
    let relay = TestRelay::start(c).await;
    let mut s = SseClient::new()
        .open_get(&format!("{}/gen", relay.url()))
        .await;
    let events = s.collect_until_end().await;
    assert_eq!(events.len(), 101);
    assert_eq!(events[99].data, numbered_event_data(100));
    assert_eq!(signal_code(&events[100]), "stream_too_large");
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_utf8_and_binary_bytes_pass_through_untouched() {
    let upstream = Upstream::start().await;
    let payload: &[u8] = b"data: \xff\xfe\x00bin\x80ary\xc3\n\n";
    upstream.respond(move |_| Reply::sse([Bytes::from_static(payload)]));
    let relay = TestRelay::start(config(&upstream.url(), &Backend::Memory)).await;
    let client = SseClient::new();
    let (status, headers, body) = read_raw(client.get(&format!("{}/gen", relay.url()))).await;
    assert_eq!(status, 200);
    let stream_id = headers["reprise-stream-id"].to_str().unwrap().to_string();
    let id_line_end = body.bytes.iter().position(|b| *b == b'\n').unwrap() + 1;
    assert!(body
        .bytes
        .starts_with(format!("id: {stream_id}.").as_bytes()));
    assert_eq!(&body.bytes[id_line_end..], payload);
    // And the same from the store.
    let (_, _, replay) =
        read_raw(client.get(&format!("{}/_reprise/streams/{stream_id}", relay.url()))).await;
    assert_eq!(replay.bytes, body.bytes);
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_request_body_is_refused_before_the_upstream() {
    let upstream = Upstream::start().await;
    let mut c = chat_config(&upstream.url(), &Backend::Memory);
    c.limits.max_request_body = ByteSize::kib(1);
    let relay = TestRelay::start(c).await;
    let big = json!({"id": "c", "messages": ["x".repeat(4096)]});
    let (status, _, body) =
        read_raw(SseClient::new().post_json(&format!("{}/api/chat", relay.url()), &big)).await;
    assert_eq!(status, 413);
    assert_eq!(error_code(&body.bytes), "payload_too_large");
    assert_eq!(upstream.request_count(), 0);
    relay.stop().await;
}

/// A client that never reads does not slow the producer or another reader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_never_reads_does_not_slow_the_others() {
    let upstream = Upstream::start().await;
    let event = Bytes::from(format!("data: {}\n\n", "y".repeat(1000)));
    let ctl = upstream.controlled_stream();
    let relay = TestRelay::start(config(&upstream.url(), &Backend::Memory)).await;
    let client = SseClient::new();
    let mut origin = client.open_get(&format!("{}/gen", relay.url())).await;
    let stream_id = origin.header("reprise-stream-id").unwrap().to_string();

    // The stuck reader: sends its request, then never reads its socket.
    use tokio::io::AsyncWriteExt;
    let mut stuck = tokio::net::TcpStream::connect(relay.addr()).await.unwrap();
    let req = format!("GET /_reprise/streams/{stream_id} HTTP/1.1\r\nHost: r\r\n\r\n");
    stuck.write_all(req.as_bytes()).await.unwrap();

    // 8 MB: far more than the stuck reader's socket buffers hold.
    let mut fast = client
        .open_get(&format!("{}/_reprise/streams/{stream_id}", relay.url()))
        .await;
    let producer = async {
        for _ in 0..8000 {
            ctl.send(event.clone()).await;
        }
        ctl.finish();
    };
    let readers = async {
        let a = origin.collect_until_end().await;
        let b = fast.collect_until_end().await;
        (a.len(), b.len())
    };
    let (_, (a, b)) = with_timeout("the fast readers", async {
        tokio::join!(producer, readers)
    })
    .await;
    assert_eq!((a, b), (8000, 8000));
    drop(stuck);
    relay.stop().await;
}

/// A client that stops reading is disconnected once its socket has accepted
/// nothing for `timeouts.client_write`, even after its stream ended (it would
/// otherwise hold its connection forever); it can resume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_stops_reading_is_disconnected() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const EVENTS: usize = 8000;
    let upstream = Upstream::start().await;
    let event = Bytes::from(format!("data: {}\n\n", "y".repeat(1000)));
    let ctl = upstream.controlled_stream();
    let mut c = config(&upstream.url(), &Backend::Memory);
    c.timeouts.client_write = Duration::from_secs(2);
    let relay = TestRelay::start(c).await;
    let client = SseClient::new();
    // The stream's own client leaves at once: the recording goes on, and
    // the stalled client below is its only reader.
    let origin = client.open_get(&format!("{}/gen", relay.url())).await;
    let stream_id = origin.header("reprise-stream-id").unwrap().to_string();
    drop(origin);

    // Small receive buffer, so that 8 MB cannot all fit in the socket.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stuck = socket.connect(relay.addr()).await.unwrap();
    // `close`: a reader that got everything sees the end of the connection.
    let req = format!(
        "GET /_reprise/streams/{stream_id} HTTP/1.1\r\nHost: r\r\nConnection: close\r\n\r\n"
    );
    stuck.write_all(req.as_bytes()).await.unwrap();
    for _ in 0..EVENTS {
        ctl.send(event.clone()).await;
    }
    ctl.finish();
    // The client stalls for longer than `client_write` (the scenario, not a
    // synchronisation: a client that resumed reading earlier would be fine).
    tokio::time::sleep(Duration::from_secs(3)).await;

    // The stuck client now reads: what the kernel buffered, then the end
    // of a connection the relay closed (not the whole stream).
    let mut received = Vec::new();
    let read = with_timeout(
        "the relay to close the stalled connection",
        stuck.read_to_end(&mut received),
    )
    .await;
    assert!(
        received.len() < EVENTS * event.len(),
        "the stalled reader got all {} bytes ({read:?}): it was not cut off",
        received.len()
    );
    // Nothing was lost: a resume gets the whole stream.
    let mut again = client
        .open_get(&format!("{}/_reprise/streams/{stream_id}", relay.url()))
        .await;
    assert_eq!(again.collect_until_end().await.len(), EVENTS);
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_limit_get_503() {
    let upstream = Upstream::start().await;
    let mut c = config(&upstream.url(), &Backend::Memory);
    c.limits.max_connections = 2;
    let relay = TestRelay::start(c).await;
    let ctl1 = upstream.controlled_stream();
    let ctl2 = upstream.controlled_stream();
    let a = RawResponse::open(reqwest::Client::new().get(format!("{}/a", relay.url()))).await;
    let b = RawResponse::open(reqwest::Client::new().get(format!("{}/b", relay.url()))).await;
    assert_eq!((a.status().as_u16(), b.status().as_u16()), (200, 200));
    let (status, headers, body) =
        read_raw(reqwest::Client::new().get(format!("{}/c", relay.url()))).await;
    assert_eq!(status, 503);
    assert!(headers.contains_key("retry-after"));
    assert_eq!(error_code(&body.bytes), "too_many_connections");
    ctl1.finish();
    ctl2.finish();
    drop((a, b));
    relay.stop().await;
}

/// Header values with CR/LF never reach a response: a raw request that
/// smuggles one in is rejected by the HTTP parser with 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cr_lf_in_ids_never_reach_headers_or_output() {
    let upstream = Upstream::start().await;
    let relay = TestRelay::start(config(&upstream.url(), &Backend::Memory)).await;
    let client = SseClient::new();
    for bad in [
        "AAAAAAAAAAAAAAAAAAAAAA%0D%0Aevil:%201",
        "AAAAAAAAAAAAAAAAAAAAAA%00",
    ] {
        let (status, headers, body) =
            read_raw(client.get(&format!("{}/_reprise/streams/{bad}", relay.url()))).await;
        assert_eq!(status, 400, "{bad}");
        assert!(!headers.contains_key("evil"));
        assert_eq!(error_code(&body.bytes), "invalid_stream_id");
    }
    let (status, _, body) = read_raw(client.get(&format!(
        "{}/_reprise/streams/AAAAAAAAAAAAAAAAAAAAAA?last_event_id=AAAAAAAAAAAAAAAAAAAAAA.00000001.1%0D%0Aevent:%20x",
        relay.url()
    )))
    .await;
    assert_eq!(status, 400);
    assert_eq!(error_code(&body.bytes), "invalid_last_event_id");
    // A Last-Event-ID query value with CR/LF on a route is not Reprise's: it
    // goes upstream as a query string, never into Reprise's SSE output.
    upstream.respond(|_| Reply::sse([numbered_event(1)]));
    let mut s = open_sse(client.get(&format!(
        "{}/x?last_event_id=a%0D%0Adata:%20evil",
        relay.url()
    )))
    .await;
    let events = s.collect_until_end().await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].data, numbered_event_data(1));
    relay.stop().await;
}
