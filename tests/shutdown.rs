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

/// A relay serving a second listener on a thread (and runtime) of its own
/// (`Listeners::siblings`, what `threads` > 1 gives the binary): a stream
/// started through it records, resumes through the first listener (another
/// thread), and the graceful shutdown waits for it to finish before `run`
/// returns. Without sibling serving, the second listener refuses the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_served_by_a_sibling_thread_records_resumes_and_drains() {
    use reprise_tests::relay::{config, Backend};
    reprise_tests::init_tracing();
    let upstream = Upstream::start().await;
    let mut cfg = config(&upstream.url(), &Backend::Memory);
    cfg.timeouts.shutdown_grace = std::time::Duration::from_secs(30);
    let public = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sibling = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (public_addr, sibling_addr) = (public.local_addr().unwrap(), sibling.local_addr().unwrap());
    let shutdown = tokio_util::sync::CancellationToken::new();
    let token = shutdown.clone();
    let relay = tokio::spawn(async move {
        let loaded = cfg.validate().expect("valid config");
        let listeners = reprise_relay::Listeners {
            public,
            admin: None,
            siblings: vec![sibling],
        };
        reprise_relay::run_listeners(cfg, &loaded, listeners, token, || {}).await
    });
    let client = SseClient::new();
    let stream = upstream.controlled_stream();
    let mut origin = client.open_get(&format!("http://{sibling_addr}/s")).await;
    let id = origin.header("reprise-stream-id").unwrap().to_string();
    stream.send(numbered_event(1)).await;
    assert_eq!(origin.next_event().await.data, numbered_event_data(1));
    // The first listener's thread reads the log the sibling's producer fills.
    let mut resumed = client
        .open_get(&format!("http://{public_addr}/_reprise/streams/{id}"))
        .await;
    assert_eq!(resumed.next_event().await.data, numbered_event_data(1));

    shutdown.cancel();
    // The drain lets the sibling's recording finish.
    stream.send(numbered_event(2)).await;
    stream.finish();
    assert_eq!(
        data(&origin.collect_until_end().await),
        vec![numbered_event_data(2)]
    );
    assert_eq!(
        data(&resumed.collect_until_end().await),
        vec![numbered_event_data(2)]
    );
    reprise_tests::with_timeout("the relay to stop", relay)
        .await
        .expect("relay task")
        .expect("relay ran");
}
