//! Limits on what one caller can make Reprise do: streams at once and
//! starts per minute (429, shared by instances over Redis, failing open when
//! Redis is gone), which client address counts behind trusted proxies, and
//! bounds on request bodies (413) and heads (431).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use reprise_relay::config::{Config, RouteConfig, RouteLimits};
use reprise_store::{
    Admission, LimitKind, Limiter, MemoryLimiter, RateLimits, RedisStore, Store, StoreOptions,
};
use reprise_tests::redis::{RedisCluster, RedisServer};
use reprise_tests::relay::{config, Backend, RelayProcess, TestRelay};
use reprise_tests::upstream::{event, numbered_event};
use reprise_tests::{open_sse, read_raw, with_timeout, Reply, SseClient, SseResponse, Upstream};

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// `GET {base}{path}` as `token` (no token: an anonymous caller, counted
/// by address).
fn get(client: &SseClient, base: &str, path: &str, token: Option<&str>) -> reqwest::RequestBuilder {
    let r = client.get(&format!("{base}{path}"));
    match token {
        Some(t) => r.header("authorization", bearer(t)),
        None => r,
    }
}

/// Checks a 429 answer: `Retry-After` in whole seconds within `retry`, and
/// the JSON error naming `limit`.
async fn assert_rate_limited(
    request: reqwest::RequestBuilder,
    limit: &str,
    retry: std::ops::RangeInclusive<u64>,
) {
    let (status, headers, body) = read_raw(request).await;
    assert_eq!(status, 429, "{}", body.text());
    let after: u64 = headers
        .get("retry-after")
        .expect("Retry-After")
        .to_str()
        .unwrap()
        .parse()
        .expect("Retry-After in seconds");
    assert!(retry.contains(&after), "Retry-After {after}");
    assert_eq!(headers["content-type"], "application/json");
    let json: serde_json::Value = serde_json::from_slice(&body.bytes).expect("JSON error");
    assert_eq!(json["error"]["code"], "rate_limited", "{json}");
    assert_eq!(json["error"]["limit"], limit, "{json}");
    assert_eq!(json["error"]["retry_after"], after, "{json}");
}

/// Sends `request()` until it is not answered 429 (a slot is given back
/// asynchronously after a stream ends), bounded by the test timeout.
async fn until_admitted(mut request: impl FnMut() -> reqwest::RequestBuilder) -> SseResponse {
    with_timeout("a start to be admitted again", async {
        loop {
            let r = open_sse(request()).await;
            if r.status() != 429 {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
}

async fn metrics(base: &str) -> String {
    let (_, _, body) = read_raw(SseClient::new().get(&format!("{base}/_reprise/metrics"))).await;
    body.text()
}

fn with_limits(mut c: Config, streams: u32, starts: u32) -> Config {
    c.limits.max_streams_per_caller = streams;
    c.limits.max_starts_per_caller_per_minute = starts;
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_streams_are_limited_across_instances_and_freed_when_streams_end() {
    let redis = RedisServer::start().await.expect("start redis-server");
    let upstream = Upstream::start().await;
    let c = with_limits(config(&upstream.url(), &Backend::Redis(redis.url())), 2, 0);
    let (a, b) = tokio::join!(TestRelay::start(c.clone()), TestRelay::start(c));
    let client = SseClient::new();

    // Alice opens one stream on each instance: her limit is reached on both.
    let first_ctl = upstream.controlled_stream();
    let mut first = open_sse(get(&client, &a.url(), "/gen", Some("alice"))).await;
    assert_eq!(first.status(), 200);
    let second_ctl = upstream.controlled_stream();
    let second = open_sse(get(&client, &b.url(), "/gen", Some("alice"))).await;
    assert_eq!(second.status(), 200);
    for relay in [&a, &b] {
        assert_rate_limited(
            get(&client, &relay.url(), "/gen", Some("alice")),
            "concurrent_streams",
            1..=5,
        )
        .await;
    }
    assert_eq!(
        upstream.request_count(),
        2,
        "a refused start reaches no upstream"
    );
    // Another caller has limits of its own.
    let bob_ctl = upstream.controlled_stream();
    let bob = open_sse(get(&client, &a.url(), "/gen", Some("bob"))).await;
    assert_eq!(bob.status(), 200);
    bob_ctl.finish();

    // Alice's first stream ends: its slot is given back, on every instance.
    first_ctl.send(numbered_event(1)).await;
    first_ctl.finish();
    first.collect_until_end().await;
    let third_ctl = upstream.controlled_stream();
    let third = until_admitted(|| get(&client, &b.url(), "/gen", Some("alice"))).await;
    assert_eq!(third.status(), 200);
    third_ctl.finish();
    second_ctl.finish();
    drop(second);

    let m = metrics(&a.url()).await;
    // One refusal on each instance.
    assert!(
        m.contains(r#"reprise_rate_limited_total{route="/",limit="concurrent_streams"} 1"#),
        "{m}"
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_per_minute_are_limited_per_caller_with_a_retry_after() {
    let redis = RedisServer::start().await.expect("start redis-server");
    let upstream = Upstream::start().await;
    upstream.respond(|_| Reply::sse([event("hi")]));
    let c = with_limits(config(&upstream.url(), &Backend::Redis(redis.url())), 0, 2);
    let (a, b) = tokio::join!(TestRelay::start(c.clone()), TestRelay::start(c));
    let client = SseClient::new();
    // Two starts, one per instance; they end at once (no concurrency limit).
    for relay in [&a, &b] {
        let mut r = open_sse(get(&client, &relay.url(), "/gen", Some("carol"))).await;
        assert_eq!(r.status(), 200);
        r.collect_until_end().await;
    }
    // The third within the minute is refused on either instance, with the
    // time until the first start leaves the window.
    for relay in [&a, &b] {
        assert_rate_limited(
            get(&client, &relay.url(), "/gen", Some("carol")),
            "starts_per_minute",
            1..=60,
        )
        .await;
    }
    assert_eq!(upstream.request_count(), 2);
    // CORS preflights are not counted.
    let (status, _, _) = read_raw(
        client
            .http()
            .request(reqwest::Method::OPTIONS, format!("{}/gen", a.url()))
            .header("authorization", bearer("carol")),
    )
    .await;
    assert_ne!(status, 429);
    // Anonymous callers are counted by address, apart from carol.
    let mut anon = open_sse(get(&client, &a.url(), "/gen", None)).await;
    assert_eq!(anon.status(), 200);
    anon.collect_until_end().await;
    let m = metrics(&b.url()).await;
    assert!(
        m.contains(r#"reprise_rate_limited_total{route="/",limit="starts_per_minute"} 1"#),
        "{m}"
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_store_limits_and_route_overrides() {
    let upstream = Upstream::start().await;
    let mut c = with_limits(config(&upstream.url(), &Backend::Memory), 1, 0);
    // A pass-through route, and a route without limits.
    let route = |path: &str, record: bool, limits: RouteLimits| RouteConfig {
        path: path.into(),
        upstream: upstream.url(),
        key: None,
        resume: None,
        stop: None,
        record,
        caller: Default::default(),
        resume_auth: Default::default(),
        ca_file: None,
        limits,
        signals: Default::default(),
    };
    c.routes
        .push(route("/plain", false, RouteLimits::default()));
    c.routes.push(route(
        "/free",
        true,
        RouteLimits {
            max_streams_per_caller: Some(0),
            max_starts_per_caller_per_minute: None,
        },
    ));
    let relay = TestRelay::start(c).await;
    let client = SseClient::new();

    // A pass-through response holds its slot while it streams...
    let ctl = upstream.controlled_stream();
    let mut plain = open_sse(get(&client, &relay.url(), "/plain", Some("dan"))).await;
    assert_eq!(plain.status(), 200);
    ctl.send(event("x")).await;
    plain.next_event().await;
    assert_rate_limited(
        get(&client, &relay.url(), "/plain", Some("dan")),
        "concurrent_streams",
        1..=5,
    )
    .await;
    // ... and gives it back when the client goes.
    plain.disconnect();
    ctl.closed().await;
    let next_ctl = upstream.controlled_stream();
    let next = until_admitted(|| get(&client, &relay.url(), "/plain", Some("dan"))).await;
    assert_eq!(next.status(), 200);

    // Limits are per route: /free has none, however many streams are open.
    let mut open = Vec::new();
    for _ in 0..3 {
        let ctl = upstream.controlled_stream();
        let r = open_sse(get(&client, &relay.url(), "/free", Some("dan"))).await;
        assert_eq!(r.status(), 200);
        open.push((ctl, r));
    }
    // A recorded stream keeps its slot after its client goes, until the
    // upstream finishes (the generation still runs).
    let rec_ctl = upstream.controlled_stream();
    let rec = open_sse(get(&client, &relay.url(), "/gen", Some("erin"))).await;
    assert_eq!(rec.status(), 200);
    rec.disconnect();
    rec_ctl.send(event("still generating")).await;
    assert_rate_limited(
        get(&client, &relay.url(), "/gen", Some("erin")),
        "concurrent_streams",
        1..=5,
    )
    .await;
    rec_ctl.finish();
    let after_ctl = upstream.controlled_stream();
    let after = until_admitted(|| get(&client, &relay.url(), "/gen", Some("erin"))).await;
    assert_eq!(after.status(), 200);
    after_ctl.finish();
    next_ctl.finish();
    for (ctl, _) in open {
        ctl.finish();
    }
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_upstream_calls_give_their_slot_back() {
    let upstream = Upstream::start().await;
    let mut c = with_limits(config(&upstream.url(), &Backend::Memory), 1, 0);
    c.limits.max_request_body = bytesize::ByteSize::b(100);
    let relay = TestRelay::start(c).await;
    let client = SseClient::new();
    let url = format!("{}/gen", relay.url());
    // Admitted, then aborted while forwarding its body (413).
    let chunks: Vec<Result<Bytes, std::io::Error>> =
        (0..3).map(|_| Ok(Bytes::from(vec![b'y'; 60]))).collect();
    let body = reqwest::Body::wrap_stream(futures::stream::iter(chunks));
    let (status, _, _) =
        read_raw(client.post(&url, body).header("authorization", "Bearer f")).await;
    assert_eq!(status, 413);
    // The upstream answers an error (passed through).
    upstream.respond_once(Reply::text(502, "bad gateway"));
    let failed = until_admitted(|| get(&client, &relay.url(), "/gen", Some("f"))).await;
    assert_eq!(failed.status(), 502);
    drop(failed);
    // Neither kept the slot: a stream can start, and holds it.
    let ctl = upstream.controlled_stream();
    let held = until_admitted(|| get(&client, &relay.url(), "/gen", Some("f"))).await;
    assert_eq!(held.status(), 200);
    assert_rate_limited(
        get(&client, &relay.url(), "/gen", Some("f")),
        "concurrent_streams",
        1..=5,
    )
    .await;
    ctl.finish();
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_fail_open_when_redis_is_gone() {
    let mut redis = RedisServer::start().await.expect("start redis-server");
    let upstream = Upstream::start().await;
    upstream.respond(|_| Reply::sse([event("hi")]));
    let c = with_limits(config(&upstream.url(), &Backend::Redis(redis.url())), 1, 1);
    let relay = TestRelay::start(c).await;
    let client = SseClient::new();
    let mut r = open_sse(get(&client, &relay.url(), "/gen", Some("gina"))).await;
    assert_eq!(r.status(), 200);
    r.collect_until_end().await;
    assert_rate_limited(
        get(&client, &relay.url(), "/gen", Some("gina")),
        "starts_per_minute",
        1..=60,
    )
    .await;

    redis.kill();
    // The limit cannot be checked: the chat goes on.
    for _ in 0..2 {
        let mut r = open_sse(get(&client, &relay.url(), "/gen", Some("gina"))).await;
        assert_eq!(r.status(), 200);
        r.collect_until_end().await;
    }
    let m = metrics(&relay.url()).await;
    let errors = m
        .lines()
        .find_map(|l| l.strip_prefix("reprise_rate_limit_errors_total "))
        .expect("the errors metric");
    assert!(errors.trim().parse::<u64>().unwrap() >= 2, "{m}");
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slots_of_a_dead_instance_expire() {
    let redis = RedisServer::start().await.expect("start redis-server");
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("reprise.toml");
    std::fs::write(
        &path,
        format!(
            "[store]\nredis_url = \"{}\"\n[streams]\nlease = \"1s\"\n[limits]\nmax_streams_per_caller = 1\n\
             [[routes]]\npath = \"/\"\nupstream = \"{}\"\n",
            redis.url(),
            upstream.url()
        ),
    )
    .expect("write config");
    let cfg = path.to_string_lossy().to_string();
    let args = ["--config", cfg.as_str()];
    let (mut a, b) = tokio::join!(RelayProcess::start(&args), RelayProcess::start(&args));
    let client = SseClient::new();
    let ctl = upstream.controlled_stream();
    let held = open_sse(get(&client, &a.url(), "/gen", Some("hal"))).await;
    assert_eq!(held.status(), 200);
    assert_rate_limited(
        get(&client, &b.url(), "/gen", Some("hal")),
        "concurrent_streams",
        1..=5,
    )
    .await;
    // The instance holding the slot dies without giving it back: the slot
    // expires once no one refreshes it.
    a.kill().await;
    drop(held);
    let next_ctl = upstream.controlled_stream();
    let next = until_admitted(|| get(&client, &b.url(), "/gen", Some("hal"))).await;
    assert_eq!(next.status(), 200);
    next_ctl.finish();
    drop(ctl);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_headers_from_an_untrusted_peer_are_replaced() {
    let upstream = Upstream::start().await;
    upstream.respond(|_| Reply::text(200, "ok"));
    // One start per minute per client address.
    let relay =
        TestRelay::start(with_limits(config(&upstream.url(), &Backend::Memory), 0, 1)).await;
    let client = SseClient::new();
    let spoofed = |ip: &str| {
        client
            .get(&format!("{}/gen", relay.url()))
            .header("x-forwarded-for", ip)
            .header("x-forwarded-proto", "https")
            .header("x-forwarded-host", "evil.example")
            .header("forwarded", format!("for={ip}"))
    };
    let (status, _, _) = read_raw(spoofed("6.6.6.6")).await;
    assert_eq!(status, 200);
    let seen = upstream.nth_request(1).await;
    assert_eq!(seen.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(seen.header("x-forwarded-proto"), Some("http"));
    assert_eq!(
        seen.header("x-forwarded-host"),
        Some(relay.addr().to_string().as_str())
    );
    assert_eq!(seen.header("forwarded"), None);
    // Claiming another address does not make another client.
    assert_rate_limited(spoofed("7.7.7.7"), "starts_per_minute", 1..=60).await;
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_headers_from_a_trusted_proxy_are_honoured() {
    let upstream = Upstream::start().await;
    upstream.respond(|_| Reply::text(200, "ok"));
    let mut c = with_limits(config(&upstream.url(), &Backend::Memory), 0, 1);
    c.trusted_proxies = vec!["127.0.0.0/8".parse().unwrap()];
    let relay = TestRelay::start(c).await;
    let client = SseClient::new();
    let via_proxy = |chain: &str| {
        client
            .get(&format!("{}/gen", relay.url()))
            .header("x-forwarded-for", chain)
            .header("x-forwarded-proto", "https")
            .header("x-forwarded-host", "chat.example")
    };
    let (status, _, _) = read_raw(via_proxy("6.6.6.6, 198.51.100.1")).await;
    assert_eq!(status, 200);
    let seen = upstream.nth_request(1).await;
    assert_eq!(
        seen.header("x-forwarded-for"),
        Some("6.6.6.6, 198.51.100.1, 127.0.0.1")
    );
    assert_eq!(seen.header("x-forwarded-proto"), Some("https"));
    assert_eq!(seen.header("x-forwarded-host"), Some("chat.example"));
    // The client is the rightmost untrusted address: 198.51.100.1, whatever
    // it wrote to the left of it.
    assert_rate_limited(
        via_proxy("1.2.3.4, 198.51.100.1"),
        "starts_per_minute",
        1..=60,
    )
    .await;
    // Another client behind the same proxy has its own count.
    let (status, _, _) = read_raw(via_proxy("198.51.100.2")).await;
    assert_eq!(status, 200);
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_over_the_limit_get_413_before_or_while_forwarding() {
    let upstream = Upstream::start().await;
    upstream.respond(|r| Reply::text(200, format!("got {}", r.body.len())));
    let mut c = config(&upstream.url(), &Backend::Memory);
    c.limits.max_request_body = bytesize::ByteSize::b(1000);
    let relay = TestRelay::start(c).await;
    let client = SseClient::new();
    let url = format!("{}/upload", relay.url());

    // Announced too large: refused before the upstream is called.
    let (status, _, body) = read_raw(client.post(&url, vec![b'x'; 1001])).await;
    assert_eq!(status, 413, "{}", body.text());
    let json: serde_json::Value = serde_json::from_slice(&body.bytes).unwrap();
    assert_eq!(json["error"]["code"], "payload_too_large");

    // Chunked, growing past the limit on the way: cut off, the upstream
    // request aborted, 413.
    let chunked = |n: usize| {
        let chunks: Vec<Result<Bytes, std::io::Error>> =
            (0..n).map(|_| Ok(Bytes::from(vec![b'y'; 300]))).collect();
        reqwest::Body::wrap_stream(futures::stream::iter(chunks))
    };
    let (status, _, body) = read_raw(client.post(&url, chunked(4))).await;
    assert_eq!(status, 413, "{}", body.text());
    assert_eq!(upstream.request_count(), 0, "no upstream request completed");

    // Under the limit, both ways: forwarded whole.
    let (status, _, body) = read_raw(client.post(&url, chunked(3))).await;
    assert_eq!((status.as_u16(), body.text().as_str()), (200, "got 900"));
    let (status, _, body) = read_raw(client.post(&url, vec![b'x'; 1000])).await;
    assert_eq!((status.as_u16(), body.text().as_str()), (200, "got 1000"));
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_request_heads_get_431() {
    let upstream = Upstream::start().await;
    upstream.respond(|_| Reply::text(200, "ok"));
    let mut c = config(&upstream.url(), &Backend::Memory);
    c.limits.max_request_headers = bytesize::ByteSize::kib(16);
    c.limits.max_request_header_count = 50;
    let relay = TestRelay::start(c).await;
    let url = format!("{}/gen", relay.url());
    // A new client each time: the relay closes a connection after a 431.
    let client = SseClient::new;

    let (status, _, _) = read_raw(client().get(&url).header("x-big", "a".repeat(8 * 1024))).await;
    assert_eq!(status, 200, "a head under the bound passes");
    let (status, _, _) = read_raw(client().get(&url).header("x-big", "a".repeat(20 * 1024))).await;
    assert_eq!(status, 431, "a head over the bound");
    let mut many = client().get(&url);
    for i in 0..60 {
        many = many.header(format!("x-h{i}"), "v");
    }
    let (status, _, _) = read_raw(many).await;
    assert_eq!(status, 431, "more header fields than allowed");
    assert_eq!(upstream.request_count(), 1);

    // HTTP/2 (prior knowledge, cleartext): the same bound on the header list.
    let stream = tokio::net::TcpStream::connect(relay.addr()).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .expect("h2 handshake");
    tokio::spawn(conn);
    let request = |size: usize| {
        http::Request::get(format!("http://{}/gen", relay.addr()))
            .header("x-big", "b".repeat(size))
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap()
    };
    let ok = with_timeout("h2 response", sender.send_request(request(1024)))
        .await
        .expect("h2 request");
    assert_eq!(ok.status(), 200);
    let too_big = with_timeout("h2 response", sender.send_request(request(20 * 1024)))
        .await
        .expect("h2 request");
    assert_eq!(too_big.status(), 431);
    relay.stop().await;
}

/// The limiter contract, run against both backends (as the store's
/// conformance suite does for streams): limits, release, atomicity under
/// concurrent acquires, and slots that expire without refreshes.
async fn limiter_contract(limiter: Arc<dyn Limiter>) {
    let ttl = Duration::from_secs(30);
    let both = RateLimits {
        max_streams: 2,
        max_starts_per_minute: 3,
    };
    let caller = format!("contract-{}", reprise_core::StreamId::random());
    let c = caller.as_str();
    assert_eq!(
        limiter.acquire(c, "s1", both, ttl).await.unwrap(),
        Admission::Admitted
    );
    assert_eq!(
        limiter.acquire(c, "s2", both, ttl).await.unwrap(),
        Admission::Admitted
    );
    assert_eq!(
        limiter.acquire(c, "s3", both, ttl).await.unwrap(),
        Admission::Refused {
            limit: LimitKind::Concurrent,
            retry_after: None
        }
    );
    // Another caller is apart; a release frees a place.
    let other = format!("{caller}-other");
    assert_eq!(
        limiter.acquire(&other, "s1", both, ttl).await.unwrap(),
        Admission::Admitted
    );
    limiter.release(c, "s1").await.unwrap();
    limiter.release(c, "never-taken").await.unwrap();
    assert_eq!(
        limiter.acquire(c, "s4", both, ttl).await.unwrap(),
        Admission::Admitted
    );
    // Three starts counted (the refused one was not): the start limit now.
    limiter.release(c, "s2").await.unwrap();
    match limiter.acquire(c, "s5", both, ttl).await.unwrap() {
        Admission::Refused {
            limit: LimitKind::StartsPerMinute,
            retry_after: Some(after),
        } => assert!(
            after > Duration::ZERO && after <= Duration::from_secs(60),
            "{after:?}"
        ),
        other => panic!("expected the start limit, got {other:?}"),
    }
    // Unlimited: always admitted, nothing counted.
    for i in 0..5 {
        let slot = format!("u{i}");
        let free = RateLimits::default();
        assert_eq!(
            limiter.acquire(c, &slot, free, ttl).await.unwrap(),
            Admission::Admitted
        );
    }

    // Atomic: of 20 concurrent acquires under a limit of 5, exactly 5 win.
    let racer = format!("{caller}-race");
    let five = RateLimits {
        max_streams: 5,
        max_starts_per_minute: 0,
    };
    let attempts = (0..20).map(|i| {
        let (limiter, racer) = (limiter.clone(), racer.clone());
        tokio::spawn(async move { limiter.acquire(&racer, &format!("r{i}"), five, ttl).await })
    });
    let mut admitted = 0;
    for a in attempts {
        if a.await.unwrap().unwrap() == Admission::Admitted {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 5);

    // A slot nobody refreshes expires; a refreshed one stays.
    let short = Duration::from_millis(300);
    let one = RateLimits {
        max_streams: 1,
        max_starts_per_minute: 0,
    };
    let lapsing = format!("{caller}-lapse");
    assert_eq!(
        limiter.acquire(&lapsing, "old", one, short).await.unwrap(),
        Admission::Admitted
    );
    with_timeout("an unrefreshed slot to expire", async {
        while limiter.acquire(&lapsing, "new", one, short).await.unwrap() != Admission::Admitted {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let kept = format!("{caller}-kept");
    assert_eq!(
        limiter.acquire(&kept, "a", one, ttl).await.unwrap(),
        Admission::Admitted
    );
    limiter.refresh(&kept, "a", ttl).await.unwrap();
    assert!(matches!(
        limiter.acquire(&kept, "b", one, ttl).await.unwrap(),
        Admission::Refused { .. }
    ));
}

fn store_options() -> StoreOptions {
    StoreOptions {
        key_prefix: "reprise:".into(),
        retention: Duration::from_secs(60),
        max_stream_duration: Duration::from_secs(600),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limiter_contract_memory() {
    limiter_contract(Arc::new(MemoryLimiter::new())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limiter_contract_redis() {
    let redis = RedisServer::start().await.expect("start redis-server");
    let store = RedisStore::connect(&redis.url(), store_options())
        .await
        .expect("connect");
    limiter_contract(store.shared_limiter().expect("a shared limiter")).await;
    // The embedded store has none: the relay counts in its own memory.
    let memory = reprise_store::MemoryStore::new(store_options(), Default::default());
    assert!(memory.shared_limiter().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limiter_contract_redis_cluster() {
    let cluster = RedisCluster::start().await.expect("start a Redis cluster");
    let store = RedisStore::connect(&cluster.url(), store_options())
        .await
        .expect("connect");
    limiter_contract(store.shared_limiter().expect("a shared limiter")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_hold_across_instances_on_a_redis_cluster() {
    let cluster = RedisCluster::start().await.expect("start a Redis cluster");
    let upstream = Upstream::start().await;
    let c = with_limits(
        config(&upstream.url(), &Backend::Redis(cluster.url())),
        1,
        0,
    );
    let (a, b) = tokio::join!(TestRelay::start(c.clone()), TestRelay::start(c));
    let client = SseClient::new();
    // Callers whose keys hash to different masters (distinct random tokens).
    for i in 0..6 {
        let token = format!("caller-{i}");
        let ctl = upstream.controlled_stream();
        let held = open_sse(get(&client, &a.url(), "/gen", Some(&token))).await;
        assert_eq!(held.status(), 200);
        assert_rate_limited(
            get(&client, &b.url(), "/gen", Some(&token)),
            "concurrent_streams",
            1..=5,
        )
        .await;
        ctl.finish();
        drop(held);
    }
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_and_broken_streams_give_their_slot_back() {
    let redis = RedisServer::start().await.expect("start redis-server");
    let upstream = Upstream::start().await;
    let c = with_limits(config(&upstream.url(), &Backend::Redis(redis.url())), 1, 0);
    let relay = TestRelay::start(c).await;
    let client = SseClient::new();
    let start = || get(&client, &relay.url(), "/gen", Some("ivy"));

    // Cancelled by its caller ("stop generating").
    let ctl = upstream.controlled_stream();
    let mut first = open_sse(start()).await;
    assert_eq!(first.status(), 200);
    let id = first.header("reprise-stream-id").unwrap().to_string();
    assert_rate_limited(start(), "concurrent_streams", 1..=5).await;
    let (status, _, _) = read_raw(
        client
            .http()
            .delete(format!("{}/_reprise/streams/{id}", relay.url()))
            .header("authorization", bearer("ivy")),
    )
    .await;
    assert_eq!(status, 200);
    first.collect_until_end().await;
    ctl.closed().await;

    // The upstream breaks mid-stream.
    let broken_ctl = upstream.controlled_stream();
    let mut broken = until_admitted(start).await;
    assert_eq!(broken.status(), 200);
    assert_rate_limited(start(), "concurrent_streams", 1..=5).await;
    broken_ctl.send(numbered_event(1)).await;
    broken_ctl.abort().await;
    let events = broken.collect_until_end().await;
    assert_eq!(
        events.last().unwrap().json()["reprise"]["code"],
        "upstream_reset"
    );

    let last_ctl = upstream.controlled_stream();
    let last = until_admitted(start).await;
    assert_eq!(last.status(), 200);
    last_ctl.finish();
    relay.stop().await;
}
