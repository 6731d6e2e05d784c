//! Redis going away: killed and restarted (empty, as a Redis without
//! persistence comes back) while streams are recorded and read.

use std::time::Duration;

use reprise_tests::redis::RedisServer;
use reprise_tests::relay::{config, Backend, RelayProcess, TestRelay};
use reprise_tests::upstream::{numbered_event, numbered_event_data};
use reprise_tests::{data, numbered};
use reprise_tests::{read_raw, with_timeout, SseClient, Upstream};

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
    // Readiness says the store is unreachable.
    let (status, _, body) = read_raw(client.get(&format!("{}/_reprise/readyz", relay.url()))).await;
    assert_eq!(status, 503);
    assert!(
        body.text().contains("\"reachable\":false"),
        "{}",
        body.text()
    );
    // ... and how much waits in memory (events 6-10 at least).
    let ready: serde_json::Value = serde_json::from_slice(&body.bytes).expect("readyz JSON");
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
