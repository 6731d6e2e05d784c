//! The Durable Streams server (`[durable]`, docs/durable.md) with its real
//! clients: `@durable-streams/client` reading live over SSE while a worker
//! appends (`tests/js/durable_reader.mjs`), and the protocol's conformance
//! suite (`@durable-streams/server-conformance-tests`, run by vitest from
//! `tests/js/durable_conformance.test.mjs`) against Reprise on the embedded
//! store, on Redis and on a Redis Cluster; and an idempotent producer's
//! retries through two instances.
//!
//! The suite is not all green (forks are not implemented): the conformance
//! tests assert the exact set of suite tests that pass
//! (`tests/fixtures/durable/passing.txt`), so that a regression fails and a
//! newly passing test must be added there.

#[path = "js/node.rs"]
mod node;

use std::collections::BTreeSet;
use std::time::Duration;

use node::{js_dir, node_script, NodeScript};
use reprise_relay::config::{Config, Secret};
use reprise_tests::redis::{RedisCluster, RedisServer};
use reprise_tests::relay::{set_backend, Backend, TestRelay};
use serde_json::{json, Value};

const WRITE_TOKEN: &str = "test-write-token";

/// A relay serving only Durable Streams, with the suite's 3 s long-poll.
fn durable_config(backend: &Backend, anonymous: bool) -> Config {
    let mut c = Config::default();
    set_backend(&mut c, backend);
    c.durable.enabled = true;
    c.durable.long_poll_timeout = Duration::from_secs(3);
    c.durable.anonymous_reads = anonymous;
    c.durable.anonymous_writes = anonymous;
    c.durable.write_token = Some(Secret::new(WRITE_TOKEN));
    c.auth.secret = Some(Secret::new("durable-test-secret"));
    c.streams.tail_poll_interval = Duration::from_millis(200);
    c.timeouts.shutdown_grace = Duration::from_secs(5);
    c
}

/// The real client reading `url` from `offset`, with `token` if not empty.
fn reader(url: &str, offset: &str, token: &str) -> NodeScript {
    node_script(
        "durable_reader.mjs",
        "@durable-streams/client",
        &[url, offset, token],
        &[],
    )
}

async fn append(http: &reqwest::Client, url: &str, item: &Value) {
    let resp = http
        .post(url)
        .bearer_auth(WRITE_TOKEN)
        .header("content-type", "application/json")
        .body(item.to_string())
        .send()
        .await
        .expect("append");
    assert_eq!(resp.status(), 204, "append {item}");
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

#[tokio::test]
async fn a_worker_appends_while_a_client_reads_live_is_cut_off_and_resumes_by_offset() {
    let relay = TestRelay::start(durable_config(&Backend::Memory, false)).await;
    let url = format!("{}/v1/stream/answers/run-1", relay.url());
    worker_and_reader(&url, &url).await;
    relay.stop().await;
}

/// The same over Redis with two instances: the worker writes through one,
/// the reader reads (live, then resumed) through the other.
#[tokio::test]
async fn a_reader_on_another_instance_follows_the_worker_over_redis() {
    let redis = RedisServer::start().await.expect("redis-server");
    let backend = Backend::Redis(redis.url());
    let writer = TestRelay::start(durable_config(&backend, false)).await;
    let reader_side = TestRelay::start(durable_config(&backend, false)).await;
    let path = "/v1/stream/answers/run-2";
    worker_and_reader(
        &format!("{}{path}", writer.url()),
        &format!("{}{path}", reader_side.url()),
    )
    .await;
    writer.stop().await;
    reader_side.stop().await;
}

/// A worker appends 15 JSON items to `write_url` and closes; a real client
/// reads `read_url` live over SSE, is cut off after 5, and resumes from its
/// last offset (through the signed read URL) while the worker goes on.
async fn worker_and_reader(write_url: &str, read_url_base: &str) {
    let url = write_url.to_string();
    let http = reqwest::Client::new();

    // Without the write token, nothing is created.
    let refused = http
        .put(&url)
        .header("content-type", "application/json")
        .send()
        .await
        .expect("put");
    assert_eq!(refused.status(), 401);
    let created = http
        .put(&url)
        .bearer_auth(WRITE_TOKEN)
        .header("content-type", "application/json")
        .send()
        .await
        .expect("put");
    assert_eq!(created.status(), 201);
    // The URL the worker hands to readers: signed, no token needed.
    let read_url = created
        .headers()
        .get("stream-read-url")
        .and_then(|v| v.to_str().ok())
        .expect("Stream-Read-URL on the create answer")
        .to_string();

    // Live: each append reaches the reader before the next is made.
    let mut got = Vec::new();
    let mut first = reader(read_url_base, "-1", WRITE_TOKEN);
    let mut offset = String::new();
    for i in 0..5 {
        append(&http, &url, &json!({"n": i})).await;
        let (it, off) = item(&mut first).await;
        got.push(it);
        offset = off;
    }
    // Cut off: the reader is gone while the worker keeps appending.
    drop(first);
    for i in 5..10 {
        append(&http, &url, &json!({"n": i})).await;
    }
    // Resumed from the last offset it saw, through the signed read URL
    // (on the reader's instance): the missed items, then live ones.
    let (_, signature) = read_url.split_once('?').expect("signed URL query");
    let signed = format!("{read_url_base}?{signature}");
    let mut second = reader(&signed, &offset, "");
    for _ in 5..10 {
        got.push(item(&mut second).await.0);
    }
    for i in 10..15 {
        append(&http, &url, &json!({"n": i})).await;
        got.push(item(&mut second).await.0);
    }
    let close = http
        .post(&url)
        .bearer_auth(WRITE_TOKEN)
        .header("stream-closed", "true")
        .send()
        .await
        .expect("close");
    assert_eq!(close.status(), 204);
    let rest = second.finish().await;
    assert_eq!(
        rest.iter().map(|r| r["kind"].clone()).collect::<Vec<_>>(),
        vec![json!("closed")],
        "after the close: {rest:?}"
    );
    let want: Vec<Value> = (0..15).map(|i| json!({"n": i})).collect();
    assert_eq!(got, want, "every item exactly once, in order");
}

#[tokio::test]
async fn reads_need_a_token_unless_anonymous() {
    let relay = TestRelay::start(durable_config(&Backend::Memory, false)).await;
    let url = format!("{}/v1/stream/private", relay.url());
    let http = reqwest::Client::new();
    let created = http
        .put(&url)
        .bearer_auth(WRITE_TOKEN)
        .header("content-type", "text/plain")
        .body("secret")
        .send()
        .await
        .expect("put");
    assert_eq!(created.status(), 201);
    let anonymous = http.get(&url).send().await.expect("get");
    assert_eq!(anonymous.status(), 401);
    let wrong = http
        .get(&url)
        .bearer_auth("nope")
        .send()
        .await
        .expect("get");
    assert_eq!(wrong.status(), 401);
    let ok = http
        .get(&url)
        .bearer_auth(WRITE_TOKEN)
        .send()
        .await
        .expect("get");
    assert_eq!(ok.status(), 200);
    assert_eq!(ok.text().await.expect("body"), "secret");
    // A pre-signed read URL reads without a token; altered or for another
    // stream, it does not; it never writes.
    let read_url = created
        .headers()
        .get("stream-read-url")
        .and_then(|v| v.to_str().ok())
        .expect("Stream-Read-URL")
        .to_string();
    let signed = http.get(&read_url).send().await.expect("get");
    assert_eq!(signed.status(), 200);
    assert_eq!(signed.text().await.expect("body"), "secret");
    let (_, query) = read_url.split_once('?').expect("query");
    let other = format!("{}/v1/stream/other?{query}", relay.url());
    assert_eq!(http.get(&other).send().await.expect("get").status(), 401);
    let tampered = read_url.replace("expires=", "expires=1");
    assert_eq!(http.get(&tampered).send().await.expect("get").status(), 401);
    let write = http
        .post(&read_url)
        .header("content-type", "text/plain")
        .body("x")
        .send()
        .await
        .expect("post");
    assert_eq!(write.status(), 401);
    relay.stop().await;
}

/// What one run of the conformance suite gave: full test names.
struct SuiteRun {
    passed: BTreeSet<String>,
    failed: BTreeSet<String>,
}

/// Runs the conformance suite against `base_url` (vitest, JSON report).
async fn run_suite(base_url: &str) -> SuiteRun {
    let out = tempfile::tempdir().expect("tempdir");
    let report = out.path().join("report.json");
    let vitest = js_dir().join("node_modules/vitest/vitest.mjs");
    assert!(
        vitest.is_file(),
        "{} is missing: run `npm ci --prefix tests/js` (`bash tests/run.sh` does it)",
        vitest.display()
    );
    let status = tokio::process::Command::new("node")
        .arg(&vitest)
        .args(["run", "durable_conformance.test.mjs", "--reporter=json"])
        .arg(format!("--outputFile={}", report.display()))
        .current_dir(js_dir())
        .env("DS_BASE_URL", base_url)
        .env("DS_LONG_POLL_MS", "3000")
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .status();
    // The suite takes about 40 s; bound it well above.
    let status = tokio::time::timeout(Duration::from_secs(300), status)
        .await
        .expect("the conformance suite finished within 300 s")
        .expect("running vitest");
    let text = std::fs::read_to_string(&report)
        .unwrap_or_else(|e| panic!("no vitest report ({e}); vitest exited {status}"));
    let json: Value = serde_json::from_str(&text).expect("vitest JSON report");
    let mut run = SuiteRun {
        passed: BTreeSet::new(),
        failed: BTreeSet::new(),
    };
    for file in json["testResults"].as_array().expect("testResults") {
        for t in file["assertionResults"]
            .as_array()
            .expect("assertionResults")
        {
            let name = t["fullName"].as_str().unwrap_or_default().to_string();
            match t["status"].as_str() {
                Some("passed") => {
                    run.passed.insert(name);
                }
                Some("failed") => {
                    run.failed.insert(name);
                }
                _ => {}
            }
        }
    }
    run
}

fn known_passing() -> BTreeSet<String> {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/durable/passing.txt");
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect()
}

/// Asserts that exactly the known tests pass, printing the counts and the
/// failures (what is not done yet).
fn check(backend: &str, run: &SuiteRun) {
    let known = known_passing();
    eprintln!(
        "durable conformance on {backend}: {} passed, {} failed",
        run.passed.len(),
        run.failed.len()
    );
    for f in &run.failed {
        eprintln!("  failed: {f}");
    }
    let lost: Vec<_> = known.difference(&run.passed).collect();
    let new: Vec<_> = run.passed.difference(&known).collect();
    assert!(
        lost.is_empty() && new.is_empty(),
        "on {backend}: known-passing tests that failed: {lost:#?}\n\
         newly passing (add them to tests/fixtures/durable/passing.txt): {new:#?}"
    );
}

#[tokio::test]
async fn conformance_suite_on_the_embedded_store() {
    let relay = TestRelay::start(durable_config(&Backend::Memory, true)).await;
    let run = run_suite(&relay.url()).await;
    check("the embedded store", &run);
    relay.stop().await;
}

#[tokio::test]
async fn conformance_suite_on_redis() {
    let redis = RedisServer::start().await.expect("redis-server");
    let relay = TestRelay::start(durable_config(&Backend::Redis(redis.url()), true)).await;
    let run = run_suite(&relay.url()).await;
    check("Redis", &run);
    relay.stop().await;
}

#[tokio::test]
async fn conformance_suite_on_a_redis_cluster() {
    let cluster = RedisCluster::start().await.expect("redis cluster");
    let relay = TestRelay::start(durable_config(&Backend::Redis(cluster.url()), true)).await;
    let run = run_suite(&relay.url()).await;
    check("a Redis Cluster", &run);
    relay.stop().await;
}

/// An idempotent producer's retries, sent at once through two instances on
/// one Redis: exactly one is stored (`200`), the others are answered as
/// duplicates (`204`); a zombie epoch is fenced (`403`) and a `Stream-Seq`
/// regression refused (`409`) whichever instance it reaches.
#[tokio::test]
async fn producer_retries_through_two_instances_are_stored_once() {
    let redis = RedisServer::start().await.expect("redis-server");
    let backend = Backend::Redis(redis.url());
    let a = TestRelay::start(durable_config(&backend, false)).await;
    let b = TestRelay::start(durable_config(&backend, false)).await;
    let path = "/v1/stream/jobs/producer-1";
    let (url_a, url_b) = (format!("{}{path}", a.url()), format!("{}{path}", b.url()));
    let http = reqwest::Client::new();
    let created = http
        .put(&url_a)
        .bearer_auth(WRITE_TOKEN)
        .header("content-type", "text/plain")
        .send()
        .await
        .expect("put");
    assert_eq!(created.status(), 201);
    let post = |url: &str, epoch: u64, seq: u64, body: &str| {
        http.post(url)
            .bearer_auth(WRITE_TOKEN)
            .header("content-type", "text/plain")
            .header("producer-id", "worker-7")
            .header("producer-epoch", epoch.to_string())
            .header("producer-seq", seq.to_string())
            .body(body.to_string())
            .send()
    };
    let sends = (0..10).map(|i| post(if i % 2 == 0 { &url_a } else { &url_b }, 0, 0, "once"));
    let statuses: Vec<u16> = futures::future::join_all(sends)
        .await
        .into_iter()
        .map(|r| r.expect("post").status().as_u16())
        .collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        1,
        "{statuses:?}"
    );
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 204),
        "{statuses:?}"
    );
    // A new epoch fences the old one, on the other instance too.
    assert_eq!(post(&url_b, 1, 0, "new").await.expect("post").status(), 200);
    let zombie = post(&url_a, 0, 1, "zombie").await.expect("post");
    assert_eq!(zombie.status(), 403);
    assert_eq!(zombie.headers()["producer-epoch"], "1");
    // Stream-Seq must grow, whichever instance checks it.
    let seq = |url: &str, v: &str| {
        http.post(url)
            .bearer_auth(WRITE_TOKEN)
            .header("content-type", "text/plain")
            .header("stream-seq", v)
            .body(format!("seq {v}"))
            .send()
    };
    assert_eq!(seq(&url_a, "0002").await.expect("post").status(), 204);
    assert_eq!(seq(&url_b, "0001").await.expect("post").status(), 409);
    let body = http
        .get(&url_b)
        .bearer_auth(WRITE_TOKEN)
        .send()
        .await
        .expect("get")
        .text()
        .await
        .expect("body");
    assert_eq!(body, "oncenewseq 0002");
    a.stop().await;
    b.stop().await;
}
