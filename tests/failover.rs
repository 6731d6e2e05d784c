//! Redis Cluster failovers under live streams: three masters with a replica
//! each, two `reprise` processes (one records, the other serves readers from
//! the store), and a master failing over while the streams are written and
//! read — gracefully (`CLUSTER FAILOVER`), by `kill -9` with its replica
//! promoted, by `kill -9` after the replica's link was cut (the promoted
//! replica lacks the last writes), and by `kill -9` with no replica taking
//! over (only the dead master's streams may stall).
//!
//! The relays get a long `streams.lease`, so that a failover's few seconds
//! never pass for a dead producer (that is the README's advice: the lease
//! must outlast Redis's failover); what is checked is what readers receive.

use std::time::Duration;

use reprise_core::{Cursor, EventId, Seq};
use reprise_tests::redis::{raw_command, ClusterSettings, RedisCluster};
use reprise_tests::relay::RelayProcess;
use reprise_tests::upstream::{event, StreamControl};
use reprise_tests::{with_timeout_of, Collected, SseClient, SseEvent, SseResponse, Upstream};

/// Bound for readers to receive what was sent, failover included.
const DELIVERY: Duration = Duration::from_secs(30);
/// Streams per test: with random stream ids, enough that the victim's
/// shard and the healthy ones all hold some (the tests check it).
const STREAMS: usize = 6;

/// The data of event `i` of stream number `stream`.
fn payload(stream: usize, i: usize) -> String {
    format!("stream-{stream}-event-{i}")
}

/// A 3+3 cluster, an upstream and two Reprise processes: `producer` records
/// the streams, `reader_side` serves them to readers from the store.
struct Setup {
    cluster: RedisCluster,
    upstream: Upstream,
    producer: RelayProcess,
    reader_side: RelayProcess,
    client: SseClient,
    /// The command line of the instances, to start another.
    args: Vec<String>,
    _dir: tempfile::TempDir,
}

impl Setup {
    async fn start(settings: ClusterSettings) -> Setup {
        let cluster = RedisCluster::start_with_replicas(settings)
            .await
            .expect("start a Redis cluster with replicas");
        let upstream = Upstream::start().await;
        let dir = tempfile::tempdir().expect("temp dir");
        let cfg = dir.path().join("reprise.toml");
        std::fs::write(&cfg, "[streams]\nlease = \"60s\"\n").expect("write config");
        let cfg = cfg.to_string_lossy().into_owned();
        let url = cluster.url();
        let args = [
            "--config",
            &cfg,
            "--upstream",
            &upstream.url(),
            "--redis",
            &url,
        ];
        let (producer, reader_side) =
            tokio::join!(RelayProcess::start(&args), RelayProcess::start(&args));
        Setup {
            cluster,
            upstream,
            producer,
            reader_side,
            client: SseClient::new(),
            args: args.iter().map(|a| a.to_string()).collect(),
            _dir: dir,
        }
    }

    /// A third instance, which holds no stream in memory: what it serves
    /// comes from the store only.
    async fn another_instance(&self) -> RelayProcess {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        RelayProcess::start(&args).await
    }

    /// Starts stream number `index` through the producer and sends events
    /// `1..=before`, which its origin client receives.
    async fn produce(&self, index: usize, before: usize) -> Produced {
        let ctl = self.upstream.controlled_stream();
        let mut origin = self
            .client
            .open_get(&format!("{}/gen/{index}", self.producer.url()))
            .await;
        assert_eq!(origin.status(), 200, "stream {index}");
        ctl.send(event(&payload(index, 1))).await;
        let got = origin.next_event().await;
        let first = match Cursor::parse(&got.id) {
            Ok(Cursor::At(id)) => id,
            other => panic!("event 1 of stream {index} has id {:?}: {other:?}", got.id),
        };
        let mut p = Produced {
            index,
            first,
            ctl: Some(ctl),
            origin,
        };
        assert_events(&[got], &p, 0, 1, "origin");
        if before > 1 {
            p.send_and_see(2..=before).await;
        }
        p
    }

    /// Opens a live reader of `s` on the reader side and reads its events
    /// `1..=seen` (from the store: they are stored on the stream's master).
    async fn remote_reader(&self, s: &Produced, seen: usize) -> SseResponse {
        let url = format!("{}/_reprise/streams/{}", self.reader_side.url(), s.id());
        let mut r = self.client.open_get(&url).await;
        assert_eq!(r.status(), 200, "remote reader of stream {}", s.index);
        // Bounded by the phases' own bounds.
        r.set_timeout(DELIVERY * 2);
        let got = r.next_events(seen).await;
        assert_events(&got, s, 0, seen, "remote reader");
        r
    }

    /// The master serving stream `s`'s keys, asked of every master.
    async fn master_of(&mut self, s: &Produced) -> u16 {
        let key = format!("reprise:{{{}}}:m", s.id());
        for port in self.cluster.master_ports().await.expect("masters") {
            let reply = raw_command(port, &["EXISTS", &key]).await.expect("EXISTS");
            // Another master answers `-MOVED`.
            if reply.first() == Some(&b':') {
                return port;
            }
        }
        panic!("no master serves stream {}", s.index)
    }
}

/// One stream recorded through the producer.
struct Produced {
    index: usize,
    /// Event 1's id: the stream id and epoch of every later id.
    first: EventId,
    /// `None` once finished.
    ctl: Option<StreamControl>,
    /// The client whose request started the stream.
    origin: SseResponse,
}

impl Produced {
    fn id(&self) -> String {
        self.first.stream.to_string()
    }

    /// Ends the upstream body: the stream completes.
    fn finish(&mut self) {
        if let Some(ctl) = self.ctl.take() {
            ctl.finish();
        }
    }

    /// Sends `events` and waits until the origin client got them: the
    /// producer has read them from the upstream.
    async fn send_and_see(&mut self, events: std::ops::RangeInclusive<usize>) {
        let ctl = self.ctl.as_ref().expect("the stream is not finished");
        for i in events.clone() {
            ctl.send(event(&payload(self.index, i))).await;
        }
        let got = self.origin.next_events(events.clone().count()).await;
        assert_events(&got, self, events.start() - 1, *events.end(), "origin");
    }
}

/// The id Reprise gives event `i` of `s`.
fn id_of(s: &Produced, i: usize) -> String {
    EventId {
        seq: Seq(i as u64),
        ..s.first
    }
    .to_string()
}

/// Asserts that `events` are exactly events `after+1..=to` of stream `s`,
/// each once, in order, with their Reprise ids.
fn assert_events(events: &[SseEvent], s: &Produced, after: usize, to: usize, who: &str) {
    let got: Vec<(String, String, String)> = events
        .iter()
        .map(|e| (e.id.clone(), e.event.clone(), e.data.clone()))
        .collect();
    let want: Vec<(String, String, String)> = (after + 1..=to)
        .map(|i| (id_of(s, i), "message".into(), payload(s.index, i)))
        .collect();
    assert_eq!(
        got, want,
        "{who} of stream {}: events after {after}",
        s.index
    );
}

/// Reads `reader` to its end, bounded by [`DELIVERY`].
async fn read_to_end(reader: &mut SseResponse, what: String) -> Collected {
    with_timeout_of(DELIVERY, what, reader.collect_all()).await
}

/// Every reader of `streams` on the reader side, opened after `seen`
/// events, reads the rest `seen+1..=to` and the end; then a fresh full
/// resume there reads `1..=to`.
async fn assert_every_reader_complete(
    t: &Setup,
    streams: &mut [Produced],
    readers: Vec<SseResponse>,
    seen: usize,
    to: usize,
) {
    let reading = readers
        .into_iter()
        .zip(streams.iter())
        .map(|(mut r, s)| async move {
            let what = format!("remote reader of stream {} to reach its end", s.index);
            (read_to_end(&mut r, what).await, s)
        });
    for (collected, s) in futures::future::join_all(reading).await {
        assert_eq!(collected.error, None, "remote reader of stream {}", s.index);
        assert_events(&collected.events, s, seen, to, "remote reader");
    }
    for s in streams.iter_mut() {
        let what = format!("origin of stream {} to end", s.index);
        let rest = read_to_end(&mut s.origin, what).await;
        assert_eq!(rest.events, vec![], "origin of stream {}", s.index);
        let url = format!("{}/_reprise/streams/{}", t.reader_side.url(), s.id());
        let mut fresh = t.client.open_get(&url).await;
        let what = format!("fresh resume of stream {} to end", s.index);
        let all = read_to_end(&mut fresh, what).await;
        assert_eq!(all.error, None, "fresh resume of stream {}", s.index);
        assert_events(&all.events, s, 0, to, "fresh resume");
    }
}

/// Starts [`STREAMS`] streams with events `1..=seen` and a live remote
/// reader of each that read them.
async fn streams_with_readers(t: &Setup, seen: usize) -> (Vec<Produced>, Vec<SseResponse>) {
    let mut streams = Vec::new();
    let mut readers = Vec::new();
    for index in 0..STREAMS {
        let s = t.produce(index, seen).await;
        readers.push(t.remote_reader(&s, seen).await);
        streams.push(s);
    }
    (streams, readers)
}

/// A graceful `CLUSTER FAILOVER` of the master holding stream 0, between two
/// batches of events: every reader gets every event exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_failover_loses_nothing() {
    let mut t = Setup::start(ClusterSettings::quick_failover()).await;
    let (mut streams, readers) = streams_with_readers(&t, 3).await;
    let victim = t.master_of(&streams[0]).await;
    let promoted = t.cluster.failover(victim).await.expect("graceful failover");
    assert_eq!(t.master_of(&streams[0]).await, promoted);
    for s in streams.iter_mut() {
        s.send_and_see(4..=6).await;
        s.finish();
    }
    assert_every_reader_complete(&t, &mut streams, readers, 3, 6).await;
}

/// `kill -9` of the master holding stream 0, events sent while it is dead
/// and after its replica took over: every reader gets every event exactly
/// once. (The replica was in sync: it holds every stored event.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_master_is_replaced_by_its_replica() {
    let mut t = Setup::start(ClusterSettings::quick_failover()).await;
    let (mut streams, readers) = streams_with_readers(&t, 3).await;
    let victim = t.master_of(&streams[0]).await;
    t.cluster.wait_in_sync().await.expect("replicas in sync");
    let replica = t.cluster.replica_of(victim).await.expect("a replica");
    t.cluster.kill(victim);
    // While the master is dead: the producer has them in memory.
    for s in streams.iter_mut() {
        s.send_and_see(4..=5).await;
    }
    t.cluster
        .wait_promoted(replica)
        .await
        .expect("the replica is promoted");
    assert_eq!(t.master_of(&streams[0]).await, replica);
    for s in streams.iter_mut() {
        s.send_and_see(6..=8).await;
        s.finish();
    }
    assert_every_reader_complete(&t, &mut streams, readers, 3, 8).await;
}

/// Asserts what a reader of `s` that had `after` events read until the end:
/// every later event up to `to` exactly once, in order, and a normal end.
fn assert_complete(got: &Collected, s: &Produced, after: usize, to: usize, who: &str) {
    assert_eq!(got.error, None, "{who} of stream {}", s.index);
    assert_events(&got.events, s, after, to, who);
}

/// The lossy failover: the replica of stream 0's master is cut off, events
/// 4-6 are stored on the master only, the master is killed and the cut
/// replica takes over without them. The producer still holds them in
/// memory: its next append finds the store holds less than it appended
/// (`StoreError::Lost`) and it rewrites the stream, so every reader (live
/// on the other instance, or resuming afresh there) gets every event
/// exactly once, without gap (each read is bounded).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_missing_the_last_writes_takes_over() {
    let mut t = Setup::start(ClusterSettings::quick_failover()).await;
    let (mut streams, mut readers) = streams_with_readers(&t, 3).await;
    let victim = t.master_of(&streams[0]).await;
    t.cluster.wait_in_sync().await.expect("replicas in sync");
    let cut = t
        .cluster
        .cut_replica(victim)
        .await
        .expect("cut the replica");
    for (s, r) in streams.iter_mut().zip(readers.iter_mut()) {
        s.send_and_see(4..=6).await;
        // Read on the other instance: stored, on the victim only.
        let got = with_timeout_of(DELIVERY, "remote reader, events 4-6", r.next_events(3)).await;
        assert_events(&got, s, 3, 6, "remote reader");
    }
    let promoted = t
        .cluster
        .kill_master_and_take_over(cut)
        .await
        .expect("kill the master, promote the cut replica");
    assert_eq!(t.master_of(&streams[0]).await, promoted);
    for s in streams.iter_mut() {
        s.send_and_see(7..=9).await;
        s.finish();
    }
    for (s, r) in streams.iter_mut().zip(readers.iter_mut()) {
        let what = format!(
            "remote reader of stream {} to end (lossy failover)",
            s.index
        );
        let got = read_to_end(r, what).await;
        assert_complete(&got, s, 6, 9, "remote reader");
    }
    // Resumed afresh where nothing is held in memory: the store holds
    // every event, rewritten by the producer.
    let late = t.another_instance().await;
    for s in streams.iter_mut() {
        let url = format!("{}/_reprise/streams/{}", late.url(), s.id());
        let mut fresh = t.client.open_get(&url).await;
        let what = format!("fresh resume of stream {} to end (lossy failover)", s.index);
        let got = read_to_end(&mut fresh, what).await;
        assert_complete(&got, s, 0, 9, "fresh resume");
    }
}

/// One master dead, its replica not taking over (held back, so the shard
/// stays dead as long as the test needs), `cluster-require-full-coverage
/// no`: the streams on the two healthy masters keep flowing to readers on
/// the other instance, every event once and in order, while the dead
/// master still owns its slots. Once its replica takes over, the dead
/// shard's stream continues too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_master_stalls_only_its_own_streams() {
    let mut t = Setup::start(ClusterSettings {
        require_full_coverage: false,
        ..ClusterSettings::quick_failover()
    })
    .await;
    let (mut streams, readers) = streams_with_readers(&t, 2).await;
    let victim = t.master_of(&streams[0]).await;
    let mut on_victim = Vec::new();
    for s in &streams {
        on_victim.push(t.master_of(s).await == victim);
    }
    assert!(
        on_victim.iter().any(|v| !v),
        "all {STREAMS} streams landed on one master; run again"
    );
    t.cluster.wait_in_sync().await.expect("replicas in sync");
    let replica = t
        .cluster
        .hold_failover(victim)
        .await
        .expect("hold failover");
    t.cluster.kill(victim);
    t.cluster
        .wait_marked_failed(victim)
        .await
        .expect("the dead master is marked failed");

    // Healthy shards: the rest of their streams, to the end, on the other
    // instance, while the victim is dead and still owns its slots.
    let mut dead = Vec::new();
    let mut healthy = Vec::new();
    for ((s, r), v) in streams.drain(..).zip(readers).zip(on_victim) {
        if v {
            dead.push((s, r));
        } else {
            healthy.push((s, r));
        }
    }
    for (s, _) in healthy.iter_mut() {
        s.send_and_see(3..=5).await;
        s.finish();
    }
    let reading = healthy.iter_mut().map(|(s, r)| async move {
        let what = format!(
            "remote reader of stream {} (healthy shard) to end while a master is dead",
            s.index
        );
        (read_to_end(r, what).await, &*s)
    });
    for (got, s) in futures::future::join_all(reading).await {
        assert_eq!(got.error, None, "remote reader of stream {}", s.index);
        assert_events(&got.events, s, 2, 5, "remote reader (healthy shard)");
    }
    let owners = t.cluster.topology().await.expect("topology");
    assert!(
        owners
            .iter()
            .any(|n| n.port == victim && n.master && !n.slots.is_empty()),
        "the dead master still owns its slots: nobody took over meanwhile ({owners:?})"
    );

    // The dead shard comes back through its replica; its streams continue.
    t.cluster.take_over(replica).await.expect("take over");
    for (s, r) in dead.iter_mut() {
        s.send_and_see(3..=5).await;
        s.finish();
        let what = format!("remote reader of stream {} (dead shard) to end", s.index);
        let got = read_to_end(r, what).await;
        assert_eq!(got.error, None, "remote reader of stream {}", s.index);
        assert_events(
            &got.events,
            s,
            2,
            5,
            "remote reader (dead shard, after take-over)",
        );
    }
}
