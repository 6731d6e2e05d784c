//! Graceful shutdown of the real binary: SIGTERM with streams in flight.

use reprise_tests::data;
use reprise_tests::redis::RedisServer;
use reprise_tests::relay::RelayProcess;
use reprise_tests::upstream::{numbered_event, numbered_event_data};
use reprise_tests::{SseClient, Upstream};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_or_interrupts_streams_and_a_new_process_resumes_them() {
    let redis = RedisServer::start().await.expect("start redis-server");
    let upstream = Upstream::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let cfg = dir.join("reprise.toml");
    std::fs::write(
        &cfg,
        format!(
            "[store]\nredis_url = \"{}\"\n[timeouts]\nshutdown_grace = \"1500ms\"\n[[routes]]\npath = \"/\"\nupstream = \"{}\"\n",
            redis.url(),
            upstream.url()
        ),
    )
    .unwrap();
    let cfg = cfg.to_string_lossy().to_string();
    let mut first = RelayProcess::start(&["--config", &cfg]).await;
    let client = SseClient::new();

    // Two streams in flight: one that will finish within the grace period,
    // one that never finishes.
    let finishing = upstream.controlled_stream();
    let mut a = client.open_get(&format!("{}/a", first.url())).await;
    let a_id = a.header("reprise-stream-id").unwrap().to_string();
    let endless = upstream.controlled_stream();
    let mut b = client.open_get(&format!("{}/b", first.url())).await;
    let b_id = b.header("reprise-stream-id").unwrap().to_string();
    finishing.send(numbered_event(1)).await;
    endless.send(numbered_event(1)).await;
    a.next_event().await;
    b.next_event().await;

    let health = format!("{}/_reprise/healthz", first.url());
    let instance = |body: &[u8]| {
        let body: serde_json::Value = serde_json::from_slice(body).ok()?;
        body["instance"].as_str().map(str::to_owned)
    };
    let first_body = reqwest::get(&health).await.expect("healthz").bytes().await;
    let first_instance = instance(&first_body.expect("healthz body"));
    assert!(first_instance.is_some(), "healthz names its instance");
    first.signal("TERM");
    // New connections are no longer accepted by this process (once the
    // signal is handled); another test's relay may take the freed port, so
    // an answer from another instance counts as closed too...
    reprise_tests::with_timeout("the listener to close", async {
        loop {
            let answer = match reqwest::Client::new().get(&health).send().await {
                Ok(r) if r.status().is_success() => r.bytes().await.ok().and_then(|b| instance(&b)),
                _ => None,
            };
            if answer.is_none() || answer != first_instance {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await
        }
    })
    .await;
    // ...while the streams in flight go on.
    finishing.send(numbered_event(2)).await;
    finishing.finish();
    endless.send(numbered_event(2)).await;
    let a_rest = a.collect_until_end().await;
    assert_eq!(data(&a_rest), vec![numbered_event_data(2)]);
    let b_rest = b.collect_until_end().await;
    assert_eq!(b_rest[0].data, numbered_event_data(2));
    let signal = b_rest.last().unwrap();
    assert_eq!(signal.event, "reprise-error");
    assert_eq!(signal.json()["reprise"]["code"], "interrupted");
    assert_eq!(first.wait().await, Some(0), "graceful exit");
    endless.closed().await;

    // A new process on the same Redis serves both.
    let second = RelayProcess::start(&["--config", &cfg]).await;
    let mut ra = client
        .open_get(&format!("{}/_reprise/streams/{a_id}", second.url()))
        .await;
    assert_eq!(
        data(&ra.collect_until_end().await),
        vec![numbered_event_data(1), numbered_event_data(2)]
    );
    let mut rb = client
        .open_get(&format!("{}/_reprise/streams/{b_id}", second.url()))
        .await;
    let events = rb.collect_until_end().await;
    assert_eq!(
        data(&events[..2]),
        vec![numbered_event_data(1), numbered_event_data(2)]
    );
    assert_eq!(events[2].json()["reprise"]["code"], "interrupted");
}
