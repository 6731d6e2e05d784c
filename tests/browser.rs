//! A real browser `EventSource` (headless Chromium, driven by
//! `tests/js/eventsource.mjs` through playwright-core) reading a stream
//! through Reprise, across a dropped connection.
//!
//! The browser reaches Reprise through a TCP forwarder that the test cuts
//! mid-stream, as a network change would: the browser must reconnect by
//! itself with `Last-Event-ID` (the first event carries `retry: 200`), read
//! every event exactly once, and stop reconnecting once Reprise answers `204`
//! after the end. The page is served by the upstream through Reprise on the
//! stream's origin (a pass-through response); one test serves it from
//! another origin, where the browser checks CORS headers on every
//! reconnection. Another checks that a `retry` in the block the upstream's
//! body ends inside sets the browser's reconnection time.

#[path = "js/node.rs"]
mod node;

use std::sync::Mutex;

use node::{node_script, NodeScript};
use reprise_tests::forwarder::Forwarder;
use reprise_tests::relay::{config, Backend, TestRelay};
use reprise_tests::upstream::event;
use reprise_tests::{Reply, StreamControl, Upstream};
use serde_json::{json, Value};

/// The page: an EventSource on `?src=URL` (default `/events`, its own
/// origin), reporting everything it sees to the Node script
/// (`window.report`, exposed by playwright).
const PAGE: &str = r#"<!doctype html>
<meta charset="utf-8">
<title>Reprise EventSource</title>
<script>
  const src = new URLSearchParams(location.search).get('src') || '/events';
  const es = window.es = new EventSource(src);
  es.onopen = () => report({ kind: 'open' });
  es.onmessage = (e) => report({ kind: 'message', id: e.lastEventId, data: e.data });
  es.addEventListener('reprise-error', (e) =>
    report({ kind: 'reprise-error', id: e.lastEventId, data: e.data }));
  es.onerror = () => report({ kind: 'error', readyState: es.readyState });
</script>
"#;

/// The `data` of event `i` (multi-byte text, to check the browser decodes
/// what Reprise forwards).
fn data(i: usize) -> String {
    format!("token {i} — é🎉")
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Upstream, Reprise (embedded store), and the forwarder in front of it.
/// The upstream serves the page, and one controlled stream on `/events`.
struct Setup {
    upstream: Upstream,
    relay: TestRelay,
    forwarder: Forwarder,
}

impl Setup {
    /// The setup, and the control of the `/events` stream.
    async fn start() -> (Setup, StreamControl) {
        let upstream = Upstream::start().await;
        let (reply, ctl) = Reply::controlled();
        let stream = Mutex::new(Some(reply));
        upstream.respond(move |req| match req.path() {
            "/page.html" => {
                Reply::bytes(200, PAGE).header("content-type", "text/html; charset=utf-8")
            }
            // An API that allows cross-origin readers, as many do.
            "/events" => lock(&stream)
                .take()
                .map(|reply| reply.header("access-control-allow-origin", "*"))
                .unwrap_or_else(|| Reply::text(409, "the upstream was called twice for /events")),
            _ => Reply::not_found(),
        });
        let relay = TestRelay::start(config(&upstream.url(), &Backend::Memory)).await;
        let forwarder = Forwarder::start(relay.addr()).await;
        (
            Setup {
                upstream,
                relay,
                forwarder,
            },
            ctl,
        )
    }

    /// The browser on the page served through Reprise (same origin as the
    /// stream), or with `cross_origin` straight from the upstream, another
    /// origin than Reprise's.
    fn browser(&self, cross_origin: bool) -> NodeScript {
        let page = if cross_origin {
            format!(
                "{}/page.html?src={}/events",
                self.upstream.url(),
                self.forwarder.url()
            )
        } else {
            format!("{}/page.html", self.forwarder.url())
        };
        let chromium = node::chromium();
        node_script(
            "eventsource.mjs",
            "playwright-core",
            &[&page],
            &[("REPRISE_CHROMIUM", &chromium)],
        )
    }

    fn stream_requests(&self) -> usize {
        self.upstream
            .requests()
            .iter()
            .filter(|r| r.path() == "/events")
            .count()
    }
}

/// Sends event `i` down the upstream stream; the first one sets the
/// browser's reconnection delay.
async fn push(ctl: &StreamControl, i: usize) {
    if i == 1 {
        ctl.send("retry: 200\n").await;
    }
    ctl.send(event(&data(i))).await;
}

/// Reads reports until `n` messages arrived; panics on anything else but
/// `open`.
async fn messages(browser: &mut NodeScript, n: usize) -> Vec<Value> {
    let mut got = Vec::with_capacity(n);
    while got.len() < n {
        let report = browser.report().await;
        match report["kind"].as_str() {
            Some("message") => got.push(report),
            Some("open") => {}
            _ => panic!("expected a message, the browser reported {report}"),
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eventsource_reconnects_through_a_cut_and_reads_every_event_once() {
    reconnects_through_a_cut(false).await;
}

/// The page on another origin than Reprise (an API on its own host name):
/// the upstream allows it with `Access-Control-Allow-Origin`, and the
/// browser checks that header on every reconnection too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_origin_eventsource_reconnects_through_a_cut() {
    reconnects_through_a_cut(true).await;
}

async fn reconnects_through_a_cut(cross_origin: bool) {
    let (setup, ctl) = Setup::start().await;
    let mut browser = setup.browser(cross_origin);

    assert_eq!(browser.report().await, json!({"kind": "open"}));
    ctl.request().await;
    for i in 1..=5 {
        push(&ctl, i).await;
    }
    let mut got = messages(&mut browser, 5).await;

    // The network drops; events keep coming while the browser is away, so
    // its reconnection replays them from Reprise's log.
    setup.forwarder.cut_and_hold();
    let report = browser.report().await;
    assert_eq!(
        report,
        json!({"kind": "error", "readyState": 0}),
        "the browser is reconnecting"
    );
    for i in 6..=10 {
        push(&ctl, i).await;
    }
    setup.forwarder.release();
    assert_eq!(
        browser.report().await,
        json!({"kind": "open"}),
        "the browser must reconnect, not give up (its console, above, says why)"
    );
    got.extend(messages(&mut browser, 5).await);
    // Live again.
    for i in 11..=15 {
        push(&ctl, i).await;
    }
    got.extend(messages(&mut browser, 5).await);
    ctl.finish();

    // The end: the response closes, the browser reconnects from the last id,
    // Reprise answers 204, and the EventSource gives up for good.
    let (before, closed) = browser.until_kind("error").await;
    assert!(
        before.is_empty(),
        "nothing after the last event: {before:?}"
    );
    assert_eq!(
        closed["readyState"], 0,
        "the end of the response makes it reconnect"
    );
    let closed = browser.report().await;
    assert_eq!(
        closed,
        json!({"kind": "error", "readyState": 2}),
        "204 closes the EventSource"
    );
    let connections = setup.forwarder.accepted();
    let rest = browser.finish().await;
    assert_eq!(
        rest,
        [json!({"kind": "final", "readyState": 2})],
        "no reconnection after 204"
    );
    assert_eq!(
        setup.forwarder.accepted(),
        connections,
        "no connection after 204"
    );

    let datas: Vec<&str> = got
        .iter()
        .map(|m| m["data"].as_str().unwrap_or_default())
        .collect();
    let expected: Vec<String> = (1..=15).map(data).collect();
    assert_eq!(datas, expected, "every event exactly once, in order");
    let ids: Vec<&str> = got
        .iter()
        .map(|m| m["id"].as_str().unwrap_or_default())
        .collect();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "Reprise's ids, increasing: {ids:?}"
    );
    assert_eq!(
        setup.stream_requests(),
        1,
        "the reconnection was served by Reprise, not the upstream"
    );
    setup.relay.stop().await;
}

/// A failed upstream reaches the page only through the `reprise-error`
/// listener, never as a message; its id then gets `204`, so the browser
/// stops instead of reconnecting forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eventsource_sees_reprise_error_then_stops() {
    let (setup, ctl) = Setup::start().await;
    let mut browser = setup.browser(false);

    assert_eq!(browser.report().await, json!({"kind": "open"}));
    ctl.request().await;
    for i in 1..=3 {
        push(&ctl, i).await;
    }
    let got = messages(&mut browser, 3).await;
    // The upstream connection breaks mid-body.
    ctl.abort().await;

    let signal = browser.report().await;
    assert_eq!(signal["kind"], "reprise-error", "{signal}");
    let body: Value =
        serde_json::from_str(signal["data"].as_str().unwrap_or_default()).expect("JSON data");
    assert_eq!(body["type"], "error");
    assert_eq!(body["reprise"]["code"], "upstream_reset");
    assert!(signal["id"].as_str().unwrap_or_default() > got[2]["id"].as_str().unwrap_or_default());
    assert_eq!(
        browser.report().await,
        json!({"kind": "error", "readyState": 0})
    );
    assert_eq!(
        browser.report().await,
        json!({"kind": "error", "readyState": 2}),
        "204 closes the EventSource"
    );
    let rest = browser.finish().await;
    assert_eq!(
        rest,
        [json!({"kind": "final", "readyState": 2})],
        "no reconnection after 204"
    );
    assert_eq!(setup.stream_requests(), 1);
    setup.relay.stop().await;
}

/// A `retry` in the block the upstream's body ends inside: a browser applies
/// it on reading the line, so through Reprise it must too. The first event
/// sets a reconnection time of ten minutes; the unfinished last block sets
/// 10 ms. Only if that last `retry` reached the browser does it reconnect
/// (and get `204`, since the `retry` block's id is the end) within the
/// test's bounds; with ten minutes it would not, so the margin is the whole
/// bound, not a timing guess.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eventsource_applies_a_retry_the_stream_ends_inside() {
    let (setup, ctl) = Setup::start().await;
    let mut browser = setup.browser(false);

    assert_eq!(browser.report().await, json!({"kind": "open"}));
    ctl.request().await;
    ctl.send("retry: 600000\n").await;
    ctl.send(event(&data(1))).await;
    let got = messages(&mut browser, 1).await;
    ctl.send("retry: 10\n").await;
    ctl.finish();

    assert_eq!(
        browser.report().await,
        json!({"kind": "error", "readyState": 0}),
        "the end of the response makes it reconnect"
    );
    assert_eq!(
        browser.report().await,
        json!({"kind": "error", "readyState": 2}),
        "it reconnected at once (the last retry applied) and 204 closed it"
    );
    let rest = browser.finish().await;
    assert_eq!(rest, [json!({"kind": "final", "readyState": 2})]);
    assert_eq!(got[0]["data"], data(1));
    assert_eq!(
        setup.stream_requests(),
        1,
        "the reconnection was answered by Reprise"
    );
    setup.relay.stop().await;
}
