//! Redis going away: killed and restarted (empty, as a Redis without
//! persistence comes back) or stalled (SIGSTOP) while streams are recorded
//! and read; readiness follows it without waiting on it, and an outage
//! known to the store probe costs new streams nothing.

use std::time::{Duration, Instant};

use reprise_relay::config::Config;
use reprise_tests::redis::{raw_command, RedisServer};
use reprise_tests::relay::{config, Backend, RelayProcess, TestRelay};
use reprise_tests::upstream::{numbered_event, numbered_event_data};
use reprise_tests::{data, numbered};
use reprise_tests::{open_sse, read_raw, with_timeout, Reply, SseClient, Upstream};

/// Longest a readiness request may take in these tests: generous for a
/// noisy machine, far below the wait of a PING to a stalled Redis (which
/// never answers) or of the store's command timeout (5 s).
const READYZ_CLIENT_TIMEOUT: Duration = Duration::from_secs(2);

/// `GET {base}/_reprise/readyz`, which must answer within
/// [`READYZ_CLIENT_TIMEOUT`] whatever the store does.
async fn readyz(base: &str) -> (u16, serde_json::Value) {
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(READYZ_CLIENT_TIMEOUT)
        .build()
        .expect("client");
    let r = client
        .get(format!("{base}/_reprise/readyz"))
        .send()
        .await
        .unwrap_or_else(|e| {
            panic!("readyz did not answer within {READYZ_CLIENT_TIMEOUT:?} (does it wait on the store?): {e}")
        });
    let status = r.status().as_u16();
    let body = r.bytes().await.expect("readyz body");
    let json = serde_json::from_slice(&body).expect("readyz JSON");
    (status, json)
}

/// Polls readiness (every answer bounded as in [`readyz`]) until it answers
/// `status`, within the test bound; returns that answer's body.
async fn until_ready_is(base: &str, status: u16) -> serde_json::Value {
    with_timeout(format!("readyz to answer {status}"), async {
        loop {
            let (s, body) = readyz(base).await;
            if s == status {
                return body;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
}

/// The value of a metric line (`name{labels} value`) in `/_reprise/metrics`.
async fn metric(base: &str, line_start: &str) -> Option<f64> {
    let (_, _, body) = read_raw(SseClient::new().get(&format!("{base}/_reprise/metrics"))).await;
    body.text()
        .lines()
        .find_map(|l| l.strip_prefix(line_start)?.trim().parse().ok())
}

/// Connected clients keep receiving live events while Redis is down; once it
/// is back (empty), everything recorded is written again, in order, and a
/// second instance can resume the stream from the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_mid_stream_loses_nothing() {
    let mut redis = RedisServer::start().await.expect("start redis-server");
    let upstream = Upstream::start().await;
    let relay = TestRelay::start(config(&upstream.url(), &Backend::Redis(redis.url()))).await;
    let client = SseClient::new();
    let ctl = upstream.controlled_stream();
    let mut live = client.open_get(&format!("{}/gen", relay.url())).await;
    let stream_id = live
        .header("reprise-stream-id")
        .expect("stream id")
        .to_string();
    for i in 1..=5 {
        ctl.send(numbered_event(i)).await;
    }
    assert_eq!(data(&live.next_events(5).await), numbered(1..=5));

    redis.kill();
    for i in 6..=10 {
        ctl.send(numbered_event(i)).await;
    }
    // Live delivery does not depend on Redis.
    assert_eq!(data(&live.next_events(5).await), numbered(6..=10));
    // A resume of a stream this instance holds is served from memory.
    let mut during = client
        .open_get(&format!(
            "{}/_reprise/streams/{stream_id}?start_index=8",
            relay.url()
        ))
        .await;
    assert_eq!(during.status(), 200);
    assert_eq!(data(&during.next_events(2).await), numbered(9..=10));
    // A resume the instance cannot serve from memory: 503 with Retry-After.
    let (status, headers, _) = read_raw(client.get(&format!(
        "{}/_reprise/streams/AAAAAAAAAAAAAAAAAAAAAA",
        relay.url()
    )))
    .await;
    assert_eq!(status, 503);
    assert!(headers.contains_key("retry-after"));
    // Readiness says the store is unreachable (once the probe noticed).
    let ready = until_ready_is(&relay.url(), 503).await;
    assert_eq!(ready["store"]["reachable"], false, "{ready}");
    // ... and how much waits in memory (events 6-10 at least).
    assert!(
        ready["buffered_entries"].as_u64().is_some_and(|n| n >= 5),
        "{ready}"
    );
    assert!(
        ready["unstored_bytes"].as_u64().is_some_and(|n| n > 0),
        "{ready}"
    );

    redis.restart().await.expect("restart redis-server");
    for i in 11..=15 {
        ctl.send(numbered_event(i)).await;
    }
    ctl.finish();
    assert_eq!(data(&live.collect_until_end().await), numbered(11..=15));
    assert_eq!(data(&during.collect_until_end().await), numbered(11..=15));

    // Another instance on the same Redis replays the whole stream from the
    // store, once the writer has rewritten it.
    let other =
        RelayProcess::start(&["--upstream", &upstream.url(), "--redis", &redis.url()]).await;
    let url = format!("{}/_reprise/streams/{stream_id}", other.url());
    let replayed = with_timeout("the stream to be stored again", async {
        loop {
            let mut r = client.open_get(&url).await;
            if r.status() == 200 {
                let events = r.collect_until_end().await;
                if events.len() == 15 {
                    return events;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert_eq!(data(&replayed), numbered(1..=15));
    relay.stop().await;
}

/// Readers on an instance that does not produce the stream re-establish
/// their live tail after Redis restarts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_readers_continue_after_a_redis_restart() {
    let mut redis = RedisServer::start().await.expect("start redis-server");
    let upstream = Upstream::start().await;
    let producer = TestRelay::start(config(&upstream.url(), &Backend::Redis(redis.url()))).await;
    let reader_side = TestRelay::start(config(&upstream.url(), &Backend::Redis(redis.url()))).await;
    let client = SseClient::new();
    let ctl = upstream.controlled_stream();
    let mut origin = client.open_get(&format!("{}/gen", producer.url())).await;
    let stream_id = origin
        .header("reprise-stream-id")
        .expect("stream id")
        .to_string();
    ctl.send(numbered_event(1)).await;
    origin.next_event().await;
    let mut remote = client
        .open_get(&format!(
            "{}/_reprise/streams/{stream_id}",
            reader_side.url()
        ))
        .await;
    assert_eq!(remote.next_event().await.data, numbered_event_data(1));

    redis.kill();
    ctl.send(numbered_event(2)).await;
    origin.next_event().await;
    redis.restart().await.expect("restart redis-server");
    for i in 3..=6 {
        ctl.send(numbered_event(i)).await;
    }
    ctl.finish();
    assert_eq!(data(&origin.collect_until_end().await), numbered(3..=6));
    // The remote reader gets every event exactly once, in order, once the
    // producer has rewritten the stream into the restarted Redis.
    assert_eq!(data(&remote.collect_until_end().await), numbered(2..=6));
    producer.stop().await;
    reader_side.stop().await;
}

/// The producing instance stores a stream's metadata with its first events,
/// not before the response starts: a resume on another instance that
/// arrives in between waits for the metadata instead of answering `404`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_elsewhere_right_after_the_first_event_waits_for_the_metadata() {
    let redis = RedisServer::start().await.expect("start redis-server");
    let upstream = Upstream::start().await;
    let mut cfg = config(&upstream.url(), &Backend::Redis(redis.url()));
    // A linger long enough that the resume surely arrives before the
    // metadata is stored.
    cfg.streams.store_linger = Duration::from_millis(300);
    let producer = TestRelay::start(cfg.clone()).await;
    let reader_side = TestRelay::start(cfg).await;
    let client = SseClient::new();
    let ctl = upstream.controlled_stream();
    let mut origin = client.open_get(&format!("{}/gen", producer.url())).await;
    let stream_id = origin
        .header("reprise-stream-id")
        .expect("stream id")
        .to_string();
    ctl.send(numbered_event(1)).await;
    assert_eq!(origin.next_event().await.data, numbered_event_data(1));
    let mut remote = client
        .open_get(&format!(
            "{}/_reprise/streams/{stream_id}",
            reader_side.url()
        ))
        .await;
    assert_eq!(
        remote.status(),
        200,
        "the resume elsewhere finds the stream"
    );
    for i in 2..=3 {
        ctl.send(numbered_event(i)).await;
    }
    ctl.finish();
    assert_eq!(data(&origin.collect_until_end().await), numbered(2..=3));
    assert_eq!(data(&remote.collect_until_end().await), numbered(1..=3));
    producer.stop().await;
    reader_side.stop().await;
}

/// A Redis outage longer than the memory budget: the unstored part of the
/// stream is dropped as a gap. Clients that already had it lose nothing; a
/// resume that crosses the gap gets `history_lost`, never a silent hole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_past_the_memory_budget_marks_lost_history() {
    let mut redis = RedisServer::start().await.expect("start redis-server");
    let upstream = Upstream::start().await;
    let mut c = config(&upstream.url(), &Backend::Redis(redis.url()));
    c.limits.max_unstored_stream_bytes = bytesize::ByteSize::b(1024);
    let relay = TestRelay::start(c).await;
    let other = TestRelay::start(config(&upstream.url(), &Backend::Redis(redis.url()))).await;
    let client = SseClient::new();
    let ctl = upstream.controlled_stream();
    let mut live = client.open_get(&format!("{}/gen", relay.url())).await;
    let stream_id = live
        .header("reprise-stream-id")
        .expect("stream id")
        .to_string();
    for i in 1..=5 {
        ctl.send(numbered_event(i)).await;
    }
    assert_eq!(data(&live.next_events(5).await), numbered(1..=5));
    // Wait until the first five are stored: the other instance replays them.
    let mut elsewhere = client
        .open_get(&format!("{}/_reprise/streams/{stream_id}", other.url()))
        .await;
    assert_eq!(data(&elsewhere.next_events(5).await), numbered(1..=5));
    drop(elsewhere);

    redis.kill();
    // The client at the head receives everything live: it reads each event
    // before the memory budget drops it.
    for i in 6..=300 {
        ctl.send(numbered_event(i)).await;
        assert_eq!(live.next_event().await.data, numbered_event_data(i));
    }
    redis.restart().await.expect("restart redis-server");
    for i in 301..=310 {
        ctl.send(numbered_event(i)).await;
    }
    ctl.finish();
    assert_eq!(data(&live.collect_until_end().await), numbered(301..=310));

    // From the store: the first events, then history_lost, then the end of
    // that reader; a reader positioned after the gap gets the rest.
    let url = format!("{}/_reprise/streams/{stream_id}", other.url());
    let events = with_timeout("the gap to be stored", async {
        loop {
            let mut r = client.open_get(&url).await;
            if r.status() == 200 {
                let events = r.collect_until_end().await;
                if events.last().is_some_and(|e| e.event == "reprise-error") {
                    return events;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let signal = events.last().unwrap();
    assert_eq!(signal.json()["reprise"]["code"], "history_lost");
    let before: Vec<String> = data(&events[..events.len() - 1]);
    assert!(
        before.len() >= 5 && before.len() < 300,
        "{} events before the gap",
        before.len()
    );
    assert_eq!(before, numbered(1..=before.len()));
    let mut after = client
        .open_get(&format!(
            "{}/_reprise/streams/{stream_id}?start_index=300",
            other.url()
        ))
        .await;
    assert_eq!(data(&after.collect_until_end().await), numbered(301..=310));
    relay.stop().await;
    other.stop().await;
}

/// `/_reprise/readyz` answers from the store probe's state, never from a
/// store call: while Redis is stalled (SIGSTOP: a PING would hang for ever)
/// and while it is dead, every readiness request answers before the client
/// gives up, turns 503, and turns 200 again once Redis is back; the
/// `reprise_store_up` gauge follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_answers_at_once_whatever_redis_does() {
    let mut redis = RedisServer::start().await.expect("start redis-server");
    let upstream = Upstream::start().await;
    let relay = TestRelay::start(config(&upstream.url(), &Backend::Redis(redis.url()))).await;
    let base = relay.url();
    let (status, ready) = readyz(&base).await;
    assert_eq!(status, 200, "{ready}");
    assert_eq!(metric(&base, "reprise_store_up ").await, Some(1.0));

    // Stalled: the probe's PING times out, readiness does not wait for it.
    let t = Instant::now();
    redis.pause();
    let ready = until_ready_is(&base, 503).await;
    eprintln!("stalled -> 503 after {:?}", t.elapsed());
    assert_eq!(ready["store"]["reachable"], false, "{ready}");
    assert_eq!(metric(&base, "reprise_store_up ").await, Some(0.0));
    let mut slowest = Duration::ZERO;
    for _ in 0..10 {
        let asked = Instant::now();
        let (status, ready) = readyz(&base).await;
        slowest = slowest.max(asked.elapsed());
        assert_eq!(status, 503, "{ready}");
    }
    // The target is 100 ms; a figure for the log, not an assertion.
    eprintln!("slowest of 10 readiness answers while Redis is stalled: {slowest:?}");
    let t = Instant::now();
    redis.resume();
    until_ready_is(&base, 200).await;
    eprintln!("resumed -> 200 after {:?}", t.elapsed());
    assert_eq!(metric(&base, "reprise_store_up ").await, Some(1.0));

    // Dead, then restarted.
    let t = Instant::now();
    redis.kill();
    until_ready_is(&base, 503).await;
    eprintln!("killed -> 503 after {:?}", t.elapsed());
    assert_eq!(metric(&base, "reprise_store_up ").await, Some(0.0));
    redis.restart().await.expect("restart redis-server");
    let t = Instant::now();
    let ready = until_ready_is(&base, 200).await;
    eprintln!("restarted (answering PING) -> 200 after {:?}", t.elapsed());
    assert_eq!(ready["store"]["reachable"], true, "{ready}");
    assert_eq!(metric(&base, "reprise_store_up ").await, Some(1.0));
    relay.stop().await;
}

/// With the probe knowing Redis is stalled (every store call would hang),
/// a new stream does not wait for the store: its rate-limit check,
/// Idempotency-Key claim and registration are skipped (counted), its first
/// event arrives, and once Redis answers again the writer stores the whole
/// stream, which another instance then replays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_started_while_redis_is_stalled_does_not_wait_for_it() {
    let mut redis = RedisServer::start().await.expect("start redis-server");
    let upstream = Upstream::start().await;
    let mut c = config(&upstream.url(), &Backend::Redis(redis.url()));
    c.limits.max_streams_per_caller = 10;
    c.limits.max_starts_per_caller_per_minute = 100;
    let relay = TestRelay::start(c).await;
    let base = relay.url();
    let client = SseClient::new();

    // A figure to compare with (printed, not asserted: the machine is shared).
    upstream.respond_once(Reply::sse([numbered_event(1)]));
    let started = Instant::now();
    let mut up = client.open_get(&format!("{base}/gen")).await;
    up.next_event().await;
    let with_redis_up = started.elapsed();
    up.collect_until_end().await;

    redis.pause();
    until_ready_is(&base, 503).await;
    let ctl = upstream.controlled_stream();
    let started = Instant::now();
    let mut live = open_sse(
        client
            .get(&format!("{base}/gen"))
            .header("idempotency-key", "during-the-stall"),
    )
    .await;
    assert_eq!(live.status(), 200);
    let stream_id = live
        .header("reprise-stream-id")
        .expect("stream id")
        .to_string();
    ctl.send(numbered_event(1)).await;
    assert_eq!(live.next_event().await.data, numbered_event_data(1));
    let stalled = started.elapsed();
    eprintln!(
        "first event with Redis up: {with_redis_up:?}; with Redis stalled (known down): {stalled:?}"
    );
    // The request path made no store call it would have waited for.
    for op in ["rate_limit", "claim_key"] {
        let skipped = metric(
            &base,
            &format!("reprise_store_calls_skipped_total{{op=\"{op}\"}} "),
        )
        .await;
        assert_eq!(skipped, Some(1.0), "{op} skipped once");
    }
    assert!(
        metric(&base, "reprise_rate_limit_errors_total ")
            .await
            .is_some_and(|n| n >= 1.0),
        "the skipped check counts as a rate-limit error"
    );

    redis.resume();
    until_ready_is(&base, 200).await;
    for i in 2..=3 {
        ctl.send(numbered_event(i)).await;
    }
    ctl.finish();
    assert_eq!(data(&live.collect_until_end().await), numbered(2..=3));
    // Everything reached the store once it answered again.
    let other = TestRelay::start(config(&upstream.url(), &Backend::Redis(redis.url()))).await;
    let url = format!("{}/_reprise/streams/{stream_id}", other.url());
    let replayed = with_timeout("the stream to be stored", async {
        loop {
            let mut r = client.open_get(&url).await;
            if r.status() == 200 {
                return r.collect_until_end().await;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert_eq!(data(&replayed), numbered(1..=3));
    relay.stop().await;
    other.stop().await;
}

/// Rate limits fail open while Redis is known to be dead, and hold again
/// once it is back (restarted empty: the starts of the outage went
/// uncounted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_hold_again_once_redis_is_back() {
    let mut redis = RedisServer::start().await.expect("start redis-server");
    let upstream = Upstream::start().await;
    upstream.respond(|_| Reply::sse([numbered_event(1)]));
    let mut c: Config = config(&upstream.url(), &Backend::Redis(redis.url()));
    c.limits.max_starts_per_caller_per_minute = 2;
    let relay = TestRelay::start(c).await;
    let base = relay.url();
    let client = SseClient::new();
    let start = || {
        let client = client.clone();
        let url = format!("{base}/gen");
        async move {
            let mut r = open_sse(client.get(&url).header("authorization", "Bearer gina")).await;
            let status = r.status().as_u16();
            if status == 200 {
                r.collect_until_end().await;
            }
            status
        }
    };
    assert_eq!(start().await, 200);
    assert_eq!(start().await, 200);
    assert_eq!(start().await, 429);

    redis.kill();
    until_ready_is(&base, 503).await;
    for _ in 0..3 {
        assert_eq!(start().await, 200, "fail open during the outage");
    }

    redis.restart().await.expect("restart redis-server");
    until_ready_is(&base, 200).await;
    assert_eq!(start().await, 200);
    assert_eq!(start().await, 200);
    assert_eq!(start().await, 429, "the limit holds again");
    relay.stop().await;
}

/// A stream whose record the store refuses for good (its entries key
/// replaced by a string under the writer: every append answers `WRONGTYPE`)
/// is still served whole from memory to its reader; and its log leaves
/// memory once the stream has ended and `hot_linger` passed, as every
/// stream's does, instead of staying for the process's life.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_the_store_refuses_leaves_memory_once_it_ends() {
    let redis = RedisServer::start().await.expect("start redis-server");
    let upstream = Upstream::start().await;
    let c = config(&upstream.url(), &Backend::Redis(redis.url()));
    let prefix = c.store.key_prefix.clone();
    let relay = TestRelay::start(c).await;
    let ctl = upstream.controlled_stream();
    let mut live = SseClient::new()
        .open_get(&format!("{}/gen", relay.url()))
        .await;
    let stream_id = live
        .header("reprise-stream-id")
        .expect("stream id")
        .to_string();
    for i in 1..=3 {
        ctl.send(numbered_event(i)).await;
    }
    assert_eq!(data(&live.next_events(3).await), numbered(1..=3));
    // Once the writer has stored the first events, their key becomes a
    // string.
    let entries = format!("{prefix}{{{stream_id}}}:e");
    with_timeout("the first events to be stored", async {
        loop {
            let n = raw_command(redis.port(), &["XLEN", &entries])
                .await
                .expect("XLEN");
            if n != b":0\r\n" {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let set = raw_command(redis.port(), &["SET", &entries, "not a stream"])
        .await
        .expect("SET");
    assert_eq!(set, b"+OK\r\n");
    for i in 4..=6 {
        ctl.send(numbered_event(i)).await;
    }
    ctl.finish();
    assert_eq!(data(&live.collect_until_end().await), numbered(4..=6));
    with_timeout("the refused stream's log to leave memory", async {
        loop {
            if metric(&relay.url(), "reprise_log_bytes ").await == Some(0.0) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    relay.stop().await;
}
