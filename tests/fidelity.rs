//! SSE fidelity, end to end: what a client reading the upstream directly
//! would get reaches it through Reprise too, recorded and resumable.
//!
//! - `retry`: a browser sets its reconnection time as soon as it reads a
//!   `retry:` line, whether or not the block is ever dispatched. The bytes
//!   Reprise sends are checked with a reading of the HTML standard written in
//!   the test support (`reconnection_times`) and with the independent SSE
//!   parser (`eventsource-stream`): the same reconnection times as directly,
//!   no extra event, and a last event id that a resume answers with `204`.
//! - compression: an upstream that compresses its event stream (gzip,
//!   deflate, br) although Reprise asks for `identity` is decoded and
//!   recorded; the client gets identity-encoded SSE with Reprise's ids, the
//!   same events as from the same stream uncompressed.
//!
//! Every scenario runs against both stores (with Redis, a second instance
//! resumes from the store).

use std::time::Duration;

use bytes::Bytes;
use flate2::write::{DeflateEncoder, GzEncoder, ZlibEncoder};
use flate2::Compression;
use reprise_tests::client::{browser_last_event_id, parse_sse, reconnection_times};
use reprise_tests::on_both_stores;
use reprise_tests::relay::{chat_config, config, Backend, TestRelay};
use reprise_tests::upstream::{event, numbered_event};
use reprise_tests::{data, read_raw, RawResponse, Reply, SseClient, Upstream};

on_both_stores!(
    retry_in_an_unfinished_last_block_reaches_the_client,
    retry_before_an_upstream_failure_reaches_the_client,
    compressed_event_streams_are_recorded,
    corrupt_compressed_stream_fails_keeping_what_came_before,
    compressed_ndjson_is_recorded,
);

/// The relay under test, and with Redis a second instance reading from the store.
async fn relays(upstream: &Upstream, backend: &Backend) -> (TestRelay, Option<TestRelay>) {
    let config = config(&upstream.url(), backend);
    let other = match backend {
        Backend::Redis(_) => Some(TestRelay::start(config.clone()).await),
        Backend::Memory => None,
    };
    (TestRelay::start(config).await, other)
}

fn bases(relay: &TestRelay, other: Option<&TestRelay>) -> Vec<String> {
    let mut bases = vec![relay.url()];
    bases.extend(other.map(TestRelay::url));
    bases
}

fn ms(values: &[u64]) -> Vec<Duration> {
    values.iter().copied().map(Duration::from_millis).collect()
}

fn stream_id(response: &RawResponse) -> String {
    response
        .header("reprise-stream-id")
        .expect("a recorded stream has reprise-stream-id")
        .to_owned()
}

/// A retry-only block mid-stream, then a block the body ends inside: a
/// browser applies both (300, then 500) and sees one event.
async fn retry_in_an_unfinished_last_block_reaches_the_client(backend: Backend) {
    let upstream = Upstream::start().await;
    let (relay, other) = relays(&upstream, &backend).await;
    let client = SseClient::new();
    upstream.respond(|_| Reply::sse(["retry: 300\n\n", "data: a\n\n", "retry: 500\n"]));

    let (_, _, direct) = read_raw(client.get(&upstream.url())).await;
    assert_eq!(reconnection_times(&direct.bytes), ms(&[300, 500]));
    let direct_events = parse_sse(&direct.bytes).await;

    let via = RawResponse::open(client.get(&relay.url())).await;
    assert_eq!(via.status(), 200);
    let id = stream_id(&via);
    let body = via.read_to_end().await;
    assert_eq!(body.error, None);
    assert_eq!(
        reconnection_times(&body.bytes),
        ms(&[300, 500]),
        "{}",
        body.text()
    );
    let events = parse_sse(&body.bytes).await;
    let last_id = browser_last_event_id(&body.bytes);
    assert_eq!(data(&events), data(&direct_events), "{}", body.text());
    assert_eq!(data(&events), ["a"], "no event of Reprise's own");
    assert!(last_id.starts_with(&format!("{id}.")), "{last_id}");
    assert_ne!(last_id, events[0].id, "the retry moves the last event id");

    // Recorded: resumed after the event, from this instance or from the
    // store, the retry comes again; from where a browser's last event id
    // points after the whole body, there is nothing left (no reconnection
    // loop on a stream that ended with a retry).
    for base in bases(&relay, other.as_ref()) {
        let after_a = client.get(&base).header("last-event-id", &events[0].id);
        let (status, _, rest) = read_raw(after_a).await;
        assert_eq!(status, 200, "{base}");
        assert_eq!(reconnection_times(&rest.bytes), ms(&[500]), "{base}");
        assert_eq!(parse_sse(&rest.bytes).await, [], "{base}");
        let from_start = format!("{base}/_reprise/streams/{id}?start_index=0");
        let (status, _, all) = read_raw(client.http().get(from_start)).await;
        assert_eq!(status, 200);
        assert_eq!(all.bytes, body.bytes, "{base}: replay is byte for byte");
        let at_end = client.get(&base).header("last-event-id", &last_id);
        let (status, _, _) = read_raw(at_end).await;
        assert_eq!(status, 204, "{base}");
    }
    assert_eq!(
        upstream.request_count(),
        2,
        "resumes never reach the upstream"
    );
    relay.stop().await;
    if let Some(other) = other {
        other.stop().await;
    }
}

/// The upstream's connection breaks inside a block that carried a `retry`:
/// the client gets the retry before Reprise's failure signal.
async fn retry_before_an_upstream_failure_reaches_the_client(backend: Backend) {
    let upstream = Upstream::start().await;
    let (relay, other) = relays(&upstream, &backend).await;
    let client = SseClient::new();
    upstream.respond(|_| Reply::sse(["data: a\n\n", "retry: 700\ndata: cut"]).abort_at_end());

    let via = RawResponse::open(client.get(&relay.url())).await;
    let id = stream_id(&via);
    let body = via.read_to_end().await;
    let text = body.text();
    assert_eq!(reconnection_times(&body.bytes), ms(&[700]), "{text}");
    let events = parse_sse(&body.bytes).await;
    // The event, then Reprise's failure signal (whatever its dialect, it
    // carries the code).
    assert_eq!(events.len(), 2, "{text}");
    assert_eq!(events[0].data, "a");
    assert!(events[1].data.contains("upstream_reset"), "{text}");
    let retry_at = text.find("retry: 700").expect("retry line");
    assert!(
        retry_at < text.find("upstream_reset").expect("signal"),
        "{text}"
    );
    for base in bases(&relay, other.as_ref()) {
        let url = format!("{base}/_reprise/streams/{id}?start_index=0");
        let (_, _, replay) = read_raw(client.http().get(url)).await;
        assert_eq!(replay.bytes, body.bytes, "{base}");
    }
    relay.stop().await;
    if let Some(other) = other {
        other.stop().await;
    }
}

/// How an upstream compresses: the header value and an encoder.
#[derive(Clone, Copy, Debug)]
enum Coding {
    Gzip,
    /// `deflate` as HTTP defines it: zlib-wrapped.
    Zlib,
    /// `deflate` as some servers send it: raw.
    RawDeflate,
    Brotli,
}

const CODINGS: [Coding; 4] = [
    Coding::Gzip,
    Coding::Zlib,
    Coding::RawDeflate,
    Coding::Brotli,
];

impl Coding {
    fn header(self) -> &'static str {
        match self {
            Coding::Gzip => "gzip",
            Coding::Zlib | Coding::RawDeflate => "deflate",
            Coding::Brotli => "br",
        }
    }

    /// `pieces` compressed as one stream, flushed after each piece so that
    /// each becomes its own chunk on the wire, as a streaming server does.
    fn compress(self, pieces: &[Bytes]) -> Vec<Bytes> {
        fn run<W: std::io::Write>(
            mut w: W,
            pieces: &[Bytes],
            take: impl Fn(&mut W) -> Vec<u8>,
            finish: impl FnOnce(W) -> Vec<u8>,
        ) -> Vec<Bytes> {
            let mut chunks = Vec::new();
            for piece in pieces {
                w.write_all(piece).expect("compress");
                w.flush().expect("flush");
                chunks.push(Bytes::from(take(&mut w)));
            }
            chunks.push(Bytes::from(finish(w)));
            chunks
        }
        let level = Compression::default();
        match self {
            Coding::Gzip => run(
                GzEncoder::new(Vec::new(), level),
                pieces,
                |w| std::mem::take(w.get_mut()),
                |w| w.finish().expect("gzip"),
            ),
            Coding::Zlib => run(
                ZlibEncoder::new(Vec::new(), level),
                pieces,
                |w| std::mem::take(w.get_mut()),
                |w| w.finish().expect("zlib"),
            ),
            Coding::RawDeflate => run(
                DeflateEncoder::new(Vec::new(), level),
                pieces,
                |w| std::mem::take(w.get_mut()),
                |w| w.finish().expect("deflate"),
            ),
            Coding::Brotli => run(
                brotli::CompressorWriter::new(Vec::new(), 4096, 5, 22),
                pieces,
                |w| std::mem::take(w.get_mut()),
                |w| w.into_inner(),
            ),
        }
    }
}

/// The wire text without its `id:` lines (Reprise's ids differ per stream).
fn without_ids(body: &[u8]) -> String {
    String::from_utf8_lossy(body)
        .split_inclusive('\n')
        .filter(|line| !line.starts_with("id: "))
        .collect()
}

/// The events of an OpenAI-style chat, with a `retry` and a named event.
fn chat_events() -> Vec<Bytes> {
    let mut events: Vec<Bytes> = (1..=12).map(numbered_event).collect();
    events.insert(
        3,
        Bytes::from_static(b"event: ping\nretry: 2500\ndata: {}\n\n"),
    );
    events.push(event("[DONE]"));
    events
}

async fn compressed_event_streams_are_recorded(backend: Backend) {
    let upstream = Upstream::start().await;
    let (relay, other) = relays(&upstream, &backend).await;
    let client = SseClient::new();
    let events = chat_events();

    // The same stream uncompressed, as the reference.
    let plain = events.clone();
    upstream.respond_once(Reply::sse(plain));
    let reference = RawResponse::open(client.get(&relay.url())).await;
    assert_eq!(reference.header("content-encoding"), None);
    let reference = reference.read_to_end().await;
    assert_eq!(reference.error, None);
    let reference_events = parse_sse(&reference.bytes).await;
    assert_eq!(reference_events.len(), events.len());

    for coding in CODINGS {
        let chunks = coding.compress(&events);
        upstream
            .respond_once(Reply::sse(chunks.clone()).header("content-encoding", coding.header()));
        // Asking for compression changes nothing: Reprise sends identity.
        let request = client
            .get(&relay.url())
            .header("accept-encoding", "gzip, deflate, br");
        let via = RawResponse::open(request).await;
        assert_eq!(via.status(), 200, "{coding:?}");
        assert_eq!(via.header("content-encoding"), None, "{coding:?}");
        assert_eq!(via.header("content-length"), None, "{coding:?}");
        assert_eq!(via.header("content-type"), Some("text/event-stream"));
        let id = stream_id(&via);
        let body = via.read_to_end().await;
        assert_eq!(body.error, None, "{coding:?}");
        assert_eq!(
            without_ids(&body.bytes),
            without_ids(&reference.bytes),
            "{coding:?}: the same events as uncompressed, byte for byte"
        );
        let got = parse_sse(&body.bytes).await;
        assert!(
            got.iter().all(|e| e.id.starts_with(&format!("{id}."))),
            "{coding:?}: Reprise's ids"
        );

        // Resumable from every position, on this instance and from the store.
        for n in 0..=got.len() {
            for base in bases(&relay, other.as_ref()) {
                let url = format!("{base}/_reprise/streams/{id}?start_index={n}");
                let (status, headers, rest) = read_raw(client.http().get(url)).await;
                if n == got.len() {
                    assert_eq!(status, 204, "{coding:?} {n} {base}");
                    continue;
                }
                assert_eq!(status, 200, "{coding:?} {n} {base}");
                assert!(headers.get("content-encoding").is_none());
                assert_eq!(parse_sse(&rest.bytes).await, got[n..], "{coding:?} {n}");
            }
        }
    }
    assert_eq!(upstream.request_count(), 1 + CODINGS.len());

    // A coding Reprise does not decode passes through as it came, unrecorded.
    let opaque = Bytes::from_static(b"\x28\xb5\x2f\xfd not really zstd");
    upstream.respond_once(Reply::sse([opaque.clone()]).header("content-encoding", "zstd"));
    let (status, headers, body) = read_raw(client.get(&relay.url())).await;
    assert_eq!(status, 200);
    assert_eq!(headers["content-encoding"], "zstd");
    assert!(headers.get("reprise-stream-id").is_none(), "not recorded");
    assert_eq!(body.bytes, opaque);
    relay.stop().await;
    if let Some(other) = other {
        other.stop().await;
    }
}

/// Garbage in the middle of a gzip stream: the events before it are
/// delivered and recorded, then the stream fails as `upstream_protocol`.
async fn corrupt_compressed_stream_fails_keeping_what_came_before(backend: Backend) {
    let upstream = Upstream::start().await;
    let (relay, other) = relays(&upstream, &backend).await;
    let client = SseClient::new();
    let events: Vec<Bytes> = (1..=6).map(numbered_event).collect();
    let mut chunks = Coding::Gzip.compress(&events);
    // Chunks 0..3 carry events 1..=3 whole; then garbage instead of the rest.
    chunks.truncate(3);
    chunks.push(Bytes::from(vec![0xFF; 64]));
    upstream.respond_once(Reply::sse(chunks).header("content-encoding", "gzip"));

    let via = RawResponse::open(client.get(&relay.url())).await;
    let id = stream_id(&via);
    let body = via.read_to_end().await;
    let got = parse_sse(&body.bytes).await;
    let expected = parse_sse(&events[..3].concat()).await;
    assert_eq!(got.len(), 4, "{}", body.text());
    assert_eq!(
        data(&got[..3]),
        data(&expected),
        "nothing before the break is lost"
    );
    assert!(got[3].data.contains("upstream_protocol"), "{}", got[3].data);
    for base in bases(&relay, other.as_ref()) {
        let url = format!("{base}/_reprise/streams/{id}?start_index=0");
        let (_, _, replay) = read_raw(client.http().get(url)).await;
        assert_eq!(parse_sse(&replay.bytes).await, got, "{base}");
    }

    // Cut short (no gzip trailer, the connection closes cleanly): the same.
    let mut chunks = Coding::Gzip.compress(&events);
    chunks.truncate(3);
    upstream.respond_once(Reply::sse(chunks).header("content-encoding", "gzip"));
    let (_, _, body) = read_raw(client.get(&relay.url())).await;
    let got = parse_sse(&body.bytes).await;
    assert_eq!(data(&got[..3]), data(&expected));
    assert!(got[3].data.contains("upstream_protocol"), "{}", got[3].data);
    relay.stop().await;
    if let Some(other) = other {
        other.stop().await;
    }
}

/// Ollama-style NDJSON compressed: decoded, recorded, resumed line for line.
async fn compressed_ndjson_is_recorded(backend: Backend) {
    let upstream = Upstream::start().await;
    let config = chat_config(&upstream.url(), &backend);
    let relay = TestRelay::start(config).await;
    let client = SseClient::new();
    let lines: Vec<Bytes> = (0..5)
        .map(|i| {
            Bytes::from(format!(
                "{{\"message\":{{\"content\":\"t{i} é\"}},\"done\":false}}\n"
            ))
        })
        .chain([Bytes::from_static(b"{\"done\":true}\n")])
        .collect();
    for coding in CODINGS {
        upstream.respond_once(
            Reply::sse(coding.compress(&lines))
                .header("content-type", "application/x-ndjson")
                .header("content-encoding", coding.header()),
        );
        let post = client.post_json(
            &format!("{}/api/chat", relay.url()),
            &serde_json::json!({"id": format!("ndjson-{coding:?}"), "model": "llama3.2", "messages": []}),
        );
        let via = RawResponse::open(post).await;
        assert_eq!(via.header("content-type"), Some("application/x-ndjson"));
        assert_eq!(via.header("content-encoding"), None);
        let id = stream_id(&via);
        let body = via.read_to_end().await;
        assert_eq!(body.bytes, lines.concat(), "{coding:?}");
        let url = format!("{}/_reprise/streams/{id}?start_index=2", relay.url());
        let (status, _, rest) = read_raw(client.http().get(url)).await;
        assert_eq!(status, 200);
        assert_eq!(rest.bytes, lines[2..].concat(), "{coding:?}");
    }
    relay.stop().await;
}
