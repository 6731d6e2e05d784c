//! The admin listener (`admin_listen`) and the manners of `/_reprise/...`:
//! operational endpoints only on the admin listener when it is set, streams
//! always public, no store error text in a public answer, `405` with
//! `Allow` for wrong methods, and `X-Forwarded-Host` for HTTP/2 clients.

use bytes::Bytes;
use reprise_tests::redis::RedisServer;
use reprise_tests::relay::{config, Backend, TestRelay};
use reprise_tests::upstream::{numbered_event, numbered_event_data};
use reprise_tests::{read_raw, with_timeout, Reply, SseClient, Upstream};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_an_admin_listener_ops_endpoints_move_there_and_streams_stay_public() {
    let upstream = Upstream::start().await;
    upstream.respond(|_| Reply::sse([numbered_event(1)]));
    let relay = TestRelay::start_with_admin(config(&upstream.url(), &Backend::Memory)).await;
    let client = SseClient::new();
    let (public, admin) = (relay.url(), relay.admin_url());

    for path in ["metrics", "healthz", "readyz"] {
        let (status, _, body) = read_raw(client.get(&format!("{public}/_reprise/{path}"))).await;
        assert_eq!(status, 404, "public /_reprise/{path}: {}", body.text());
        let (status, headers, body) =
            read_raw(client.get(&format!("{admin}/_reprise/{path}"))).await;
        assert_eq!(status, 200, "admin /_reprise/{path}: {}", body.text());
        if path == "metrics" {
            assert!(headers["content-type"]
                .to_str()
                .unwrap()
                .starts_with("application/openmetrics-text"));
            assert!(
                body.text().contains("reprise_store_up 1"),
                "{}",
                body.text()
            );
        }
    }

    // Streams, resumes and cancels stay on the public listener.
    let mut origin = client.open_get(&format!("{public}/gen")).await;
    assert_eq!(origin.status(), 200);
    let id = origin
        .header("reprise-stream-id")
        .expect("stream id")
        .to_string();
    origin.collect_until_end().await;
    let mut resumed = client
        .open_get(&format!("{public}/_reprise/streams/{id}"))
        .await;
    assert_eq!(resumed.status(), 200);
    let events = resumed.collect_until_end().await;
    assert_eq!(events[0].data, numbered_event_data(1));
    let cancel = client
        .http()
        .delete(format!("{public}/_reprise/streams/{id}"))
        .send()
        .await
        .expect("DELETE");
    assert_eq!(cancel.status(), 200, "cancel of an ended stream");
    // The admin listener serves nothing else: no streams, no proxying.
    for path in [format!("/_reprise/streams/{id}"), "/gen".to_string()] {
        let (status, _, _) = read_raw(client.get(&format!("{admin}{path}"))).await;
        assert_eq!(status, 404, "admin {path}");
    }
    assert_eq!(upstream.request_count(), 1);
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_methods_get_405_with_allow() {
    let upstream = Upstream::start().await;
    let relay = TestRelay::start(config(&upstream.url(), &Backend::Memory)).await;
    let admin_relay = TestRelay::start_with_admin(config(&upstream.url(), &Backend::Memory)).await;
    let http = SseClient::new().http().clone();
    let cases = [
        (
            http::Method::POST,
            relay.url(),
            "/_reprise/readyz",
            "GET, HEAD",
        ),
        (
            http::Method::PUT,
            relay.url(),
            "/_reprise/metrics",
            "GET, HEAD",
        ),
        (
            http::Method::DELETE,
            relay.url(),
            "/_reprise/healthz",
            "GET, HEAD",
        ),
        (
            http::Method::POST,
            relay.url(),
            "/_reprise/streams/AAAAAAAAAAAAAAAAAAAAAA",
            "GET, DELETE",
        ),
        (
            http::Method::POST,
            admin_relay.admin_url(),
            "/_reprise/metrics",
            "GET, HEAD",
        ),
    ];
    for (method, base, path, allow) in cases {
        let r = with_timeout(
            "a 405",
            http.request(method.clone(), format!("{base}{path}")).send(),
        )
        .await
        .expect("request");
        assert_eq!(r.status(), 405, "{method} {path}");
        assert_eq!(r.headers()["allow"], allow, "{method} {path}");
        let body: serde_json::Value =
            serde_json::from_slice(&r.bytes().await.expect("body")).expect("JSON error");
        assert_eq!(body["error"]["code"], "method_not_allowed", "{body}");
    }
    // HEAD is fine where GET is.
    let r = http
        .head(format!("{}/_reprise/healthz", relay.url()))
        .send()
        .await
        .expect("HEAD");
    assert_eq!(r.status(), 200);
    relay.stop().await;
    admin_relay.stop().await;
}

/// The store's error text (which can name hosts and internals) is never in
/// a public readiness answer; the admin listener shows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_readiness_carries_no_store_error_text() {
    let mut redis = RedisServer::start().await.expect("start redis-server");
    let upstream = Upstream::start().await;
    let backend = Backend::Redis(redis.url());
    let public_only = TestRelay::start(config(&upstream.url(), &backend)).await;
    let with_admin = TestRelay::start_with_admin(config(&upstream.url(), &backend)).await;
    redis.kill();
    let client = SseClient::new();
    let until_503 = |url: String| {
        let client = client.clone();
        async move {
            with_timeout(format!("{url} to answer 503"), async {
                loop {
                    let (status, _, body) = read_raw(client.get(&url)).await;
                    if status == 503 {
                        return serde_json::from_slice::<serde_json::Value>(&body.bytes)
                            .expect("readyz JSON");
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            })
            .await
        }
    };
    let public = until_503(format!("{}/_reprise/readyz", public_only.url())).await;
    assert_eq!(public["store"]["reachable"], false, "{public}");
    assert!(public["store"].get("error").is_none(), "{public}");
    let text = public.to_string();
    assert!(
        !text.contains(&redis.port().to_string()) && !text.contains("127.0.0.1"),
        "{text}"
    );
    let admin = until_503(format!("{}/_reprise/readyz", with_admin.admin_url())).await;
    assert!(
        admin["store"]["error"]
            .as_str()
            .is_some_and(|e| !e.is_empty()),
        "{admin}"
    );
    public_only.stop().await;
    with_admin.stop().await;
}

/// An HTTP/2 client names the host in `:authority` and sends no `Host`:
/// the upstream still learns it through `X-Forwarded-Host`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_clients_authority_reaches_the_upstream_as_x_forwarded_host() {
    let upstream = Upstream::start().await;
    upstream.respond(|_| Reply::sse([numbered_event(1)]));
    let relay = TestRelay::start(config(&upstream.url(), &Backend::Memory)).await;
    let tcp = tokio::net::TcpStream::connect(relay.addr())
        .await
        .expect("connect");
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .expect("h2 handshake");
    tokio::spawn(conn);
    let req = http::Request::get("http://chat.example:8443/gen")
        .body(http_body_util::Empty::<Bytes>::new())
        .expect("request");
    assert!(req.headers().get("host").is_none());
    let resp = with_timeout("h2 response", sender.send_request(req))
        .await
        .expect("h2 request");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let seen = upstream.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].header("x-forwarded-host"),
        Some("chat.example:8443"),
        "{:?}",
        seen[0]
    );
    relay.stop().await;
}
