//! Recorded streams read as Durable Streams, and the Durable Streams proxy
//! protocol (issue 16, items 2 and 3; docs/durable.md), with the real
//! `@durable-streams/client` (`tests/js/durable_reader.mjs`):
//!
//! - a stream Reprise records on a route, read through
//!   `GET /_reprise/streams/{id}?offset=…` live over SSE and in catch-up:
//!   one JSON message per event, the recording's end as the close;
//! - `POST /v1/proxy` with `Upstream-URL`: the upstream's answer read
//!   through the signed `Location`, then aborted with
//!   `PATCH …?action=abort` (the upstream sees its connection closed);
//! - the allowlist, and signed URLs that are altered or missing.

#[path = "js/node.rs"]
mod node;

use std::time::Duration;

use node::{node_script, NodeScript};
use reprise_relay::config::{Config, Secret};
use reprise_tests::relay::{config, Backend, TestRelay};
use reprise_tests::upstream::event;
use reprise_tests::{Reply, Upstream};
use serde_json::{json, Value};

const WRITE_TOKEN: &str = "proxy-write-token";

/// The real client reading `url` from `offset`: `mode` is `sse` (live) or
/// `catch-up`.
fn reader(url: &str, offset: &str, mode: &str) -> NodeScript {
    node_script(
        "durable_reader.mjs",
        "@durable-streams/client",
        &[url, offset, "", mode],
        &[],
    )
}

/// Reads one item report.
async fn item(script: &mut NodeScript) -> (Value, String) {
    let r = script.report().await;
    assert_eq!(r["kind"], "item", "unexpected report {r}");
    (
        r["item"].clone(),
        r["offset"].as_str().unwrap_or("").to_string(),
    )
}

/// The rest of a script's reports: its items, then that it saw the close.
async fn rest(script: NodeScript) -> Vec<Value> {
    let reports = script.finish().await;
    let (last, items) = reports.split_last().expect("a final report");
    assert_eq!(
        last["kind"], "closed",
        "the stream ends closed: {reports:?}"
    );
    assert_eq!(
        last["streamClosed"], true,
        "the stream ends closed: {reports:?}"
    );
    items
        .iter()
        .map(|r| {
            assert_eq!(r["kind"], "item", "{r}");
            r["item"].clone()
        })
        .collect()
}

/// AI SDK UI message chunks (JSON), then a non-JSON `[DONE]`.
fn chunks() -> Vec<String> {
    let mut c: Vec<String> = vec![
        json!({"type": "start", "messageId": "m1"}).to_string(),
        json!({"type": "text-start", "id": "t"}).to_string(),
    ];
    for d in ["Durable", " streams", " read", " this"] {
        c.push(json!({"type": "text-delta", "id": "t", "delta": d}).to_string());
    }
    c.push(json!({"type": "finish"}).to_string());
    c.push("[DONE]".into());
    c
}

/// What a Durable Streams reader gets for [`chunks`]: the JSON ones as
/// values, `[DONE]` as a string.
fn messages() -> Vec<Value> {
    chunks()
        .iter()
        .map(|c| serde_json::from_str(c).unwrap_or_else(|_| Value::String(c.clone())))
        .collect()
}

#[tokio::test]
async fn a_recorded_route_stream_reads_as_a_json_durable_stream() {
    let upstream = Upstream::start().await;
    let (reply, ctl) = Reply::controlled();
    upstream.respond_once(reply);
    let relay = TestRelay::start(config(&upstream.url(), &Backend::Memory)).await;
    let http = reqwest::Client::new();
    // The app's own request starts the recording.
    let origin = http
        .post(format!("{}/api/chat", relay.url()))
        .body("{}")
        .send()
        .await
        .expect("post");
    assert_eq!(origin.status(), 200);
    let id = origin
        .headers()
        .get("reprise-stream-id")
        .and_then(|v| v.to_str().ok())
        .expect("Reprise-Stream-Id")
        .to_string();
    let url = format!("{}/_reprise/streams/{id}", relay.url());

    // Live over SSE: each event reaches the Durable Streams reader before
    // the next is sent.
    let chunks = chunks();
    let want = messages();
    let mut live = reader(&url, "-1", "sse");
    let mut offsets = Vec::new();
    for (i, c) in chunks.iter().enumerate().take(5) {
        ctl.send(event(c)).await;
        let (got, offset) = item(&mut live).await;
        assert_eq!(got, want[i], "message {i}");
        offsets.push(offset);
    }
    // Cut off while the upstream goes on; resumed from the last offset it
    // saw: the missed messages, then live ones, nothing lost or repeated.
    drop(live);
    for c in &chunks[5..7] {
        ctl.send(event(c)).await;
    }
    let mut resumed = reader(&url, &offsets[4], "sse");
    for (i, want) in want.iter().enumerate().take(7).skip(5) {
        let (got, offset) = item(&mut resumed).await;
        assert_eq!(&got, want, "message {i}");
        offsets.push(offset);
    }
    ctl.send(event(&chunks[7])).await;
    let (got, offset) = item(&mut resumed).await;
    assert_eq!(got, want[7]);
    offsets.push(offset);
    // (Messages that came in one batch share the batch's offset.)
    assert!(
        offsets.windows(2).all(|w| w[0] <= w[1]),
        "offsets grow and sort as text: {offsets:?}"
    );
    // The recording's end is the stream's close.
    ctl.finish();
    assert_eq!(rest(resumed).await, Vec::<Value>::new());

    // Catch-up, from the start and from an offset.
    let all = reader(&url, "-1", "catch-up");
    assert_eq!(rest(all).await, want);
    let tail = reader(&url, &offsets[2], "catch-up");
    assert_eq!(rest(tail).await, want[3..].to_vec());

    // Without those parameters, the endpoint resumes in Reprise's own way.
    let plain = http.get(&url).send().await.expect("get");
    assert_eq!(plain.status(), 200);
    assert_eq!(plain.headers()["content-type"], "text/event-stream");
    let text = plain.text().await.expect("body");
    assert!(
        text.starts_with(&format!("id: {id}.")) && text.contains("data: [DONE]\n"),
        "{text}"
    );
    relay.stop().await;
}

/// A relay with the Durable Streams server and its proxy, allowed to
/// reach `allow`.
fn proxy_config(upstream: &str, allow: &[String]) -> Config {
    let mut c = config(upstream, &Backend::Memory);
    c.routes.clear();
    c.durable.enabled = true;
    c.durable.write_token = Some(Secret::new(WRITE_TOKEN));
    c.durable.proxy_allow = allow.to_vec();
    c.durable.long_poll_timeout = Duration::from_secs(3);
    c.auth.secret = Some(Secret::new("proxy-test-secret"));
    c
}

#[tokio::test]
async fn a_proxied_upstream_is_read_through_its_signed_url_then_aborted() {
    let upstream = Upstream::start().await;
    let (reply, ctl) = Reply::controlled();
    upstream.respond_once(reply);
    let relay = TestRelay::start(proxy_config(
        &upstream.url(),
        &[format!("{}/v1/", upstream.url())],
    ))
    .await;
    let http = reqwest::Client::new();
    let proxy = format!("{}/v1/proxy", relay.url());
    let created = http
        .post(&proxy)
        .bearer_auth(WRITE_TOKEN)
        .header(
            "upstream-url",
            format!("{}/v1/chat?model=m", upstream.url()),
        )
        .header("upstream-method", "POST")
        .header("upstream-authorization", "Bearer upstream-key")
        .header("content-type", "application/json")
        .body(r#"{"prompt":"hi"}"#)
        .send()
        .await
        .expect("post");
    assert_eq!(created.status(), 201);
    assert_eq!(
        created.headers()["upstream-content-type"],
        "text/event-stream"
    );
    let location = created.headers()["location"]
        .to_str()
        .expect("Location")
        .to_string();
    assert!(
        location.starts_with(&format!("{proxy}/")) && location.contains("signature="),
        "{location}"
    );
    // What the upstream got: the method, path, query and body asked for,
    // `Upstream-Authorization` as its `Authorization`, not the proxy's.
    let req = ctl.request().await;
    assert_eq!(req.method, "POST");
    assert_eq!(req.path(), "/v1/chat");
    assert_eq!(req.query(), Some("model=m"));
    assert_eq!(req.body_text(), r#"{"prompt":"hi"}"#);
    assert_eq!(req.header("authorization"), Some("Bearer upstream-key"));
    assert_eq!(req.header("upstream-url"), None);

    // Read live through the signed URL, no token.
    let want = messages();
    let mut live = reader(&location, "-1", "sse");
    for (i, c) in chunks().iter().take(3).enumerate() {
        ctl.send(event(c)).await;
        assert_eq!(item(&mut live).await.0, want[i], "message {i}");
    }

    // Abort: only with the signed URL, then the upstream's connection closes
    // and the reader sees the stream closed after what was sent.
    let (base, query) = location.split_once('?').expect("signed query");
    let unsigned = http
        .patch(format!("{base}?action=abort"))
        .bearer_auth(WRITE_TOKEN)
        .send()
        .await
        .expect("patch");
    assert_eq!(unsigned.status(), 401);
    assert!(!ctl.is_closed(), "an unsigned abort aborts nothing");
    let aborted = http
        .patch(format!("{location}&action=abort"))
        .send()
        .await
        .expect("patch");
    assert_eq!(aborted.status(), 204);
    ctl.closed().await;
    assert_eq!(rest(live).await, Vec::<Value>::new());
    let again = http
        .patch(format!("{base}?{query}&action=abort"))
        .send()
        .await
        .expect("patch");
    assert_eq!(again.status(), 204, "aborting again is fine");
    // The catch-up read after the abort: what was recorded, closed.
    let all = reader(&location, "-1", "catch-up");
    assert_eq!(rest(all).await, want[..3].to_vec());
    relay.stop().await;
}

async fn error_code(resp: reqwest::Response) -> (u16, String) {
    let status = resp.status().as_u16();
    let body: Value = serde_json::from_str(&resp.text().await.expect("body")).expect("JSON error");
    (
        status,
        body["error"]["code"].as_str().unwrap_or("").to_string(),
    )
}

#[tokio::test]
async fn upstreams_off_the_allowlist_are_refused_and_never_called() {
    let upstream = Upstream::start().await;
    let http = reqwest::Client::new();
    let create = |relay: &TestRelay, url: String| {
        http.post(format!("{}/v1/proxy", relay.url()))
            .bearer_auth(WRITE_TOKEN)
            .header("upstream-url", url)
            .header("upstream-method", "GET")
            .send()
    };
    // By default nothing is allowed.
    let relay = TestRelay::start(proxy_config(&upstream.url(), &[])).await;
    let resp = create(&relay, format!("{}/v1/chat", upstream.url()))
        .await
        .expect("post");
    assert_eq!(error_code(resp).await, (403, "UPSTREAM_NOT_ALLOWED".into()));
    relay.stop().await;

    let relay = TestRelay::start(proxy_config(
        &upstream.url(),
        &[format!("{}/v1", upstream.url())],
    ))
    .await;
    for url in [
        format!("{}/v2/chat", upstream.url()),
        format!("{}/v1/../admin", upstream.url()),
        format!("{}/v10", upstream.url()),
        "http://127.0.0.1:9/v1/chat".to_string(),
    ] {
        let resp = create(&relay, url.clone()).await.expect("post");
        assert_eq!(
            error_code(resp).await,
            (403, "UPSTREAM_NOT_ALLOWED".into()),
            "{url}"
        );
    }
    assert_eq!(upstream.request_count(), 0, "no refused request went out");
    // Without the service token, nothing is proxied either.
    let resp = http
        .post(format!("{}/v1/proxy", relay.url()))
        .header("upstream-url", format!("{}/v1/chat", upstream.url()))
        .header("upstream-method", "GET")
        .send()
        .await
        .expect("post");
    assert_eq!(error_code(resp).await, (401, "MISSING_SECRET".into()));
    // Missing headers.
    let resp = http
        .post(format!("{}/v1/proxy", relay.url()))
        .bearer_auth(WRITE_TOKEN)
        .header("upstream-url", format!("{}/v1/chat", upstream.url()))
        .send()
        .await
        .expect("post");
    assert_eq!(
        error_code(resp).await,
        (400, "MISSING_UPSTREAM_METHOD".into())
    );
    assert_eq!(upstream.request_count(), 0);
    relay.stop().await;
}

#[tokio::test]
async fn altered_or_missing_signatures_are_refused() {
    let upstream = Upstream::start().await;
    for _ in 0..2 {
        upstream.respond_once(Reply::sse([event("{\"n\":1}")]));
    }
    let relay = TestRelay::start(proxy_config(
        &upstream.url(),
        &[format!("{}/", upstream.url())],
    ))
    .await;
    let http = reqwest::Client::new();
    let created = http
        .post(format!("{}/v1/proxy", relay.url()))
        .bearer_auth(WRITE_TOKEN)
        .header("upstream-url", format!("{}/events", upstream.url()))
        .header("upstream-method", "GET")
        .send()
        .await
        .expect("post");
    assert_eq!(created.status(), 201);
    let location = created.headers()["location"]
        .to_str()
        .expect("Location")
        .to_string();
    let (base, query) = location.split_once('?').expect("query");
    let ok = http
        .get(format!("{location}&offset=-1"))
        .send()
        .await
        .expect("get");
    assert_eq!(ok.status(), 200);
    // Another expiry, another signature, the signature of another stream,
    // or none: refused, for reads and aborts alike.
    let later = query.replace("expires=", "expires=9");
    let flipped = match query.chars().last() {
        Some('0') => format!("{}1", &query[..query.len() - 1]),
        _ => format!("{}0", &query[..query.len() - 1]),
    };
    let other = format!(
        "{}/v1/proxy/{}?{query}",
        relay.url(),
        reprise_core::StreamId::random()
    );
    for (url, code) in [
        (format!("{base}?{later}&offset=-1"), "SIGNATURE_INVALID"),
        (format!("{base}?{flipped}&offset=-1"), "SIGNATURE_INVALID"),
        (format!("{other}&offset=-1"), "SIGNATURE_INVALID"),
        (format!("{base}?offset=-1"), "MISSING_SIGNATURE"),
    ] {
        let resp = http.get(&url).send().await.expect("get");
        assert_eq!(error_code(resp).await, (401, code.into()), "GET {url}");
        let resp = http
            .patch(format!("{url}&action=abort"))
            .send()
            .await
            .expect("patch");
        assert_eq!(error_code(resp).await, (401, code.into()), "PATCH {url}");
    }
    // Expired (validly signed URLs only come from the relay: one with a
    // zero TTL has expired at once).
    let created = http
        .post(format!("{}/v1/proxy", relay.url()))
        .bearer_auth(WRITE_TOKEN)
        .header("upstream-url", format!("{}/events", upstream.url()))
        .header("upstream-method", "GET")
        .header("stream-signed-url-ttl", "0")
        .send()
        .await
        .expect("post");
    assert_eq!(created.status(), 201);
    let expired = created.headers()["location"]
        .to_str()
        .expect("Location")
        .to_string();
    let resp = http
        .get(format!("{expired}&offset=-1"))
        .send()
        .await
        .expect("get");
    let status = resp.status();
    let body: Value = serde_json::from_str(&resp.text().await.expect("body")).expect("JSON");
    assert_eq!(status, 401);
    assert_eq!(body["error"]["code"], "SIGNATURE_EXPIRED");
    assert_eq!(body["error"]["renewable"], false);
    relay.stop().await;
}

/// The Durable Streams read of a recorded stream follows the resume-by-id
/// rule: on a `resume_auth = "same-caller"` route, only the caller that
/// started the stream reads it; anyone else gets the unknown stream's `404`.
#[tokio::test]
async fn durable_reads_of_same_caller_routes_are_the_callers_only() {
    let upstream = Upstream::start().await;
    upstream.respond_once(Reply::sse([event("{\"n\":1}")]));
    let mut c = config(&upstream.url(), &Backend::Memory);
    c.auth.secret = Some(Secret::new("test-secret"));
    c.routes[0].resume_auth = reprise_relay::config::ResumeAuth::SameCaller;
    let relay = TestRelay::start(c).await;
    let http = reqwest::Client::new();
    let origin = http
        .post(format!("{}/api/chat", relay.url()))
        .bearer_auth("alice")
        .body("{}")
        .send()
        .await
        .expect("post");
    let id = origin.headers()["reprise-stream-id"]
        .to_str()
        .expect("id")
        .to_string();
    assert!(origin
        .text()
        .await
        .expect("body")
        .contains("data: {\"n\":1}"));
    let url = format!("{}/_reprise/streams/{id}?offset=-1", relay.url());
    let eve = http.get(&url).bearer_auth("eve").send().await.expect("get");
    assert_eq!(eve.status(), 404);
    let alice = http
        .get(&url)
        .bearer_auth("alice")
        .send()
        .await
        .expect("get");
    assert_eq!(alice.status(), 200);
    assert_eq!(alice.headers()["stream-closed"], "true");
    assert_eq!(alice.text().await.expect("body"), "[{\"n\":1}]");
    relay.stop().await;
}
