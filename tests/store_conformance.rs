//! The store conformance suite: one set of cases, written against
//! `dyn Store`, run on every backend the relay can use:
//!
//! - `memory::*`: the embedded [`MemoryStore`];
//! - `redis::*`: [`RedisStore`] on a standalone `redis-server` started for the test;
//! - `cluster::*`: [`RedisStore`] on a three-master Redis Cluster started for the test.
//!
//! Then backend-specific cases: Redis outages and restarts (`redis_only::*`),
//! memory bounds and deterministic expiry (`memory_only::*`).
//!
//! Every case builds its own servers and stores, so cases are independent and
//! run in parallel (nextest runs each in its own process). No fixed ports, no
//! sleeps as synchronisation: waits poll with a bounded deadline.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use reprise_core::{Dialect, Epoch, FailReason, Outcome, Seq, StreamId};
use reprise_store::{
    Checked, Entry, EntryBody, KeyRef, MemoryLimits, MemoryStore, ProducerClaim, RedisOptions,
    RedisStore, Store, StoreError, StoreOptions, StreamMeta, Watcher, WriterChecks,
};
use reprise_tests::redis::{free_port, raw_command, RedisCluster, RedisServer};
use reprise_tests::{init_tracing, with_timeout_of};
use tokio::time::Instant;

/// Bound of a single wake-up or store call in these tests.
const WAIT: Duration = Duration::from_secs(10);
/// Command timeout of the Redis stores under test: outages must surface
/// within about this.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backend {
    Memory,
    Redis,
    Cluster,
}

#[allow(dead_code)] // the servers are held only to keep them alive
enum Servers {
    None,
    Redis(RedisServer),
    Cluster(RedisCluster),
}

/// One backend instance for one test case.
struct Fixture {
    opts: StoreOptions,
    store: Arc<dyn Store>,
    /// Another instance on the same data, as a second relay would have (the
    /// memory store is its own peer). Appends through one and watching
    /// through the other exercises Redis pub/sub, not an in-process shortcut.
    peer: Arc<dyn Store>,
    servers: Servers,
    /// The embedded store itself, for its test hooks.
    memory: Option<Arc<MemoryStore>>,
}

fn options(retention: Duration, max_stream_duration: Duration) -> StoreOptions {
    StoreOptions {
        // A fresh prefix per case, so even a shared server would not mix cases.
        key_prefix: format!("t{}:", &StreamId::random().to_string()[..8]),
        retention,
        max_stream_duration,
    }
}

fn default_options() -> StoreOptions {
    options(Duration::from_secs(60), Duration::from_secs(600))
}

fn redis_options() -> RedisOptions {
    RedisOptions {
        pool_size: 2,
        connect_timeout: Duration::from_secs(2),
        command_timeout: COMMAND_TIMEOUT,
        reconnect_min_delay: Duration::from_millis(50),
        reconnect_max_delay: Duration::from_millis(500),
        heartbeat_interval: Duration::from_millis(500),
        ..RedisOptions::default()
    }
}

async fn connect(url: &str, opts: &StoreOptions) -> Arc<dyn Store> {
    let store = with_timeout_of(
        WAIT,
        "connect",
        RedisStore::connect_with(url, opts.clone(), redis_options()),
    )
    .await
    .expect("connect to the test Redis");
    Arc::new(store)
}

impl Fixture {
    async fn new(backend: Backend, opts: StoreOptions) -> Fixture {
        init_tracing();
        match backend {
            Backend::Memory => {
                let memory = Arc::new(MemoryStore::new(opts.clone(), MemoryLimits::default()));
                let store: Arc<dyn Store> = memory.clone();
                Fixture {
                    opts,
                    peer: store.clone(),
                    store,
                    servers: Servers::None,
                    memory: Some(memory),
                }
            }
            Backend::Redis => {
                let server = RedisServer::start().await.expect("start redis-server");
                let url = server.url();
                Fixture {
                    store: connect(&url, &opts).await,
                    peer: connect(&url, &opts).await,
                    opts,
                    servers: Servers::Redis(server),
                    memory: None,
                }
            }
            Backend::Cluster => {
                let cluster = RedisCluster::start().await.expect("start a Redis cluster");
                let url = cluster.url();
                Fixture {
                    store: connect(&url, &opts).await,
                    peer: connect(&url, &opts).await,
                    opts,
                    servers: Servers::Cluster(cluster),
                    memory: None,
                }
            }
        }
    }

    /// Another store on this fixture's data (the same servers) with other
    /// options; for the memory backend, a new store (its data is its own).
    async fn store_with(&self, opts: StoreOptions) -> Arc<dyn Store> {
        match &self.servers {
            Servers::None => Arc::new(MemoryStore::new(opts, MemoryLimits::default())),
            Servers::Redis(server) => connect(&server.url(), &opts).await,
            Servers::Cluster(cluster) => connect(&cluster.url(), &opts).await,
        }
    }

    /// Makes the store lose a stream, as a restart without persistence
    /// would: `DEL` of its keys on every Redis node (the nodes not serving
    /// its slot refuse), or the embedded store's test hook.
    async fn lose(&self, stream: StreamId) {
        if let Some(memory) = &self.memory {
            assert!(memory.forget(stream), "the stream to lose exists");
            return;
        }
        let prefix = &self.opts.key_prefix;
        let meta = format!("{prefix}{{{stream}}}:m");
        let entries = format!("{prefix}{{{stream}}}:e");
        for port in self.ports() {
            raw_command(port, &["DEL", &meta, &entries]).await.unwrap();
        }
    }

    /// Ports of every Redis process behind this fixture.
    fn ports(&self) -> Vec<u16> {
        match &self.servers {
            Servers::None => Vec::new(),
            Servers::Redis(s) => vec![s.port()],
            Servers::Cluster(c) => c.nodes().iter().map(|n| n.port()).collect(),
        }
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn sample_meta(id: StreamId) -> StreamMeta {
    StreamMeta {
        id,
        epoch: Epoch::random(),
        created_ms: now_ms(),
        route: "/api/chat".into(),
        headers: vec![
            ("content-type".into(), "text/event-stream".into()),
            ("x-vercel-ai-ui-message-stream".into(), "v1".into()),
            ("x-note".into(), "ünïcödé ✓ \"quoted\"".into()),
        ],
        format: "sse".into(),
        end: None,
        lost_history: false,
        lease_owner: None,
        lease_until_ms: None,
        cancel_requested: false,
        caller: Some("9f86d081884c7d659a2feaa0c55ad015".into()),
        signals: None,
    }
}

fn ev(seq: u64, data: &str) -> Entry {
    Entry {
        seq: Seq(seq),
        body: EntryBody::Event(Bytes::from(format!("data: {data}"))),
    }
}

fn events(seqs: std::ops::RangeInclusive<u64>) -> Vec<Entry> {
    seqs.map(|s| ev(s, &format!("event {s}"))).collect()
}

/// A gap entry standing for `seq..=upto`.
fn gap(seq: u64, upto: u64) -> Entry {
    Entry {
        seq: Seq(seq),
        body: EntryBody::Gap { upto: Seq(upto) },
    }
}

fn end(seq: u64, outcome: Outcome) -> Entry {
    Entry {
        seq: Seq(seq),
        body: EntryBody::End(outcome),
    }
}

/// Writer checks of producer `id` at `epoch`, `seq`.
fn producer(id: &str, epoch: u64, seq: u64) -> WriterChecks {
    WriterChecks {
        producer: Some(ProducerClaim {
            id: id.into(),
            epoch,
            seq,
        }),
        stream_seq: None,
    }
}

/// Writer checks of `Stream-Seq` `v`.
fn stream_seq(v: &str) -> WriterChecks {
    WriterChecks {
        producer: None,
        stream_seq: Some(v.into()),
    }
}

/// A created stream with no entries.
async fn new_stream(store: &dyn Store) -> StreamId {
    let id = StreamId::random();
    store.create(&sample_meta(id)).await.expect("create");
    id
}

fn seqs(entries: &[Entry]) -> Vec<u64> {
    entries.iter().map(|e| e.seq.0).collect()
}

fn assert_conflict(r: Result<(), StoreError>, what: &str) {
    match r {
        Err(StoreError::Conflict { .. }) => {}
        other => panic!("{what}: expected Conflict, got {other:?}"),
    }
}

fn assert_lost<T: std::fmt::Debug>(r: Result<T, StoreError>, what: &str) {
    match r {
        Err(StoreError::Lost { .. }) => {}
        other => panic!("{what}: expected Lost, got {other:?}"),
    }
}

fn assert_conflicts<T: std::fmt::Debug>(r: Result<T, StoreError>, what: &str) {
    match r {
        Err(StoreError::Conflict { .. }) => {}
        other => panic!("{what}: expected Conflict, got {other:?}"),
    }
}

/// Polls `cond` every 20 ms until it holds; panics after `bound`.
async fn eventually<F, Fut>(bound: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + bound;
    loop {
        if cond().await {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {bound:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wakes(w: &mut Watcher, what: &str) {
    with_timeout_of(WAIT, what, w.changed()).await;
}

/// The generic cases, each taking the backend to run on.
mod cases {
    use super::*;

    pub async fn create_and_meta_round_trip(backend: Backend) {
        let f = Fixture::new(backend, default_options()).await;
        let id = StreamId::random();
        let meta = sample_meta(id);
        f.store.create(&meta).await.unwrap();
        assert_eq!(f.store.meta(id).await.unwrap(), Some(meta.clone()));
        // Another instance sees the same record.
        assert_eq!(f.peer.meta(id).await.unwrap(), Some(meta));
        assert!(f.store.read(id, Seq::ZERO, 10).await.unwrap().is_empty());
        assert_eq!(
            f.store.kind(),
            if backend == Backend::Memory {
                "memory"
            } else {
                "redis"
            }
        );
    }

    pub async fn create_replaces_an_existing_stream(backend: Backend) {
        let f = Fixture::new(backend, default_options()).await;
        let s = new_stream(&*f.store).await;
        f.store
            .append(s, &[ev(1, "old"), end(2, Outcome::Cancelled)])
            .await
            .unwrap();
        let fresh = sample_meta(s);
        f.peer.create(&fresh).await.unwrap();
        assert_eq!(f.store.meta(s).await.unwrap(), Some(fresh));
        assert!(f.store.read(s, Seq::ZERO, 10).await.unwrap().is_empty());
        f.store.append(s, &events(1..=1)).await.unwrap();
        assert_eq!(f.store.read(s, Seq::ZERO, 10).await.unwrap(), events(1..=1));
    }

    pub async fn append_and_read_with_paging(backend: Backend) {
        let f = Fixture::new(backend, default_options()).await;
        let s = new_stream(&*f.store).await;
        f.store.append(s, &events(1..=3)).await.unwrap();
        f.store.append(s, &events(4..=4)).await.unwrap();
        f.store.append(s, &events(5..=10)).await.unwrap();
        // An empty batch is a no-op.
        f.store.append(s, &[]).await.unwrap();

        let all = f.peer.read(s, Seq::ZERO, 100).await.unwrap();
        assert_eq!(all, events(1..=10));

        let mut pages = Vec::new();
        let mut after = Seq::ZERO;
        loop {
            let page = f.store.read(s, after, 3).await.unwrap();
            if page.is_empty() {
                break;
            }
            assert!(page.len() <= 3);
            after = page.last().map(|e| e.seq).unwrap();
            pages.push(seqs(&page));
        }
        assert_eq!(
            pages,
            vec![vec![1, 2, 3], vec![4, 5, 6], vec![7, 8, 9], vec![10]]
        );
        assert!(f.store.read(s, Seq(10), 5).await.unwrap().is_empty());
        assert!(f.store.read(s, Seq(1000), 5).await.unwrap().is_empty());
        assert!(f.store.read(s, Seq(u64::MAX), 5).await.unwrap().is_empty());
        assert!(f.store.read(s, Seq::ZERO, 0).await.unwrap().is_empty());
        assert_eq!(
            seqs(&f.store.read(s, Seq(8), usize::MAX).await.unwrap()),
            vec![9, 10]
        );

        // One large batch is fine too.
        f.store.append(s, &events(11..=1010)).await.unwrap();
        let tail = f.store.read(s, Seq(10), 5000).await.unwrap();
        assert_eq!(tail.len(), 1000);
        assert_eq!(tail.last().map(|e| e.seq), Some(Seq(1010)));
    }

    /// Large batches (which the Redis store packs, up to 128 events per
    /// stream entry) read back exactly from every position, whatever the
    /// page size, mixed with small batches, a gap and the end.
    pub async fn reads_across_large_batches(backend: Backend) {
        let f = Fixture::new(backend, default_options()).await;
        let s = new_stream(&*f.store).await;
        let mut all = events(1..=300);
        f.store.append(s, &all).await.unwrap();
        f.store.append(s, &events(301..=301)).await.unwrap();
        let mut batch = events(302..=430);
        batch.push(gap(431, 440));
        batch.extend(events(441..=700));
        f.store.append(s, &batch).await.unwrap();
        all.extend(events(301..=301));
        all.extend(batch);
        let last = end(701, Outcome::Completed);
        f.store
            .append(s, std::slice::from_ref(&last))
            .await
            .unwrap();
        all.push(last);

        // Everything, in one read and from another instance.
        assert_eq!(f.peer.read(s, Seq::ZERO, 10_000).await.unwrap(), all);
        // From every position (inside packs, on their edges, inside the
        // gap), with small, odd and large pages.
        for after in (0..=702).step_by(7).chain([
            127, 128, 129, 255, 256, 300, 301, 430, 431, 435, 440, 700, 701,
        ]) {
            let expected: Vec<Entry> = all
                .iter()
                .filter(|e| e.last_seq() > Seq(after))
                .cloned()
                .collect();
            for limit in [1, 5, 130, 1000] {
                let page = f.store.read(s, Seq(after), limit).await.unwrap();
                let want = &expected[..expected.len().min(limit)];
                assert_eq!(page, want, "after {after}, limit {limit}");
            }
        }
        // Paging through it all with an odd page size.
        let mut paged = Vec::new();
        let mut after = Seq::ZERO;
        loop {
            let page = f.peer.read(s, after, 37).await.unwrap();
            let Some(last) = page.last() else { break };
            after = last.last_seq();
            paged.extend(page);
        }
        assert_eq!(paged, all);
        // Appends still have to follow the last event of a pack.
        assert_conflict(
            f.store.append(s, &events(700..=700)).await,
            "append after the end",
        );
    }

    pub async fn payload_bytes_round_trip(backend: Backend) {
        let f = Fixture::new(backend, default_options()).await;
        let s = new_stream(&*f.store).await;
        let big: Vec<u8> = (0..(1 << 20)).map(|i| (i % 251) as u8).collect();
        let payloads: Vec<Bytes> = vec![
            Bytes::from_static(b""),
            Bytes::from_static(b"\0\r\n\xff\xfe not utf-8 \x80"),
            Bytes::from("event: x\ndata: {\"a\":\"ünï\"}".to_string()),
            Bytes::from(big),
        ];
        let batch: Vec<Entry> = payloads
            .iter()
            .enumerate()
            .map(|(i, p)| Entry {
                seq: Seq(i as u64 + 1),
                body: EntryBody::Event(p.clone()),
            })
            .collect();
        f.store.append(s, &batch).await.unwrap();
        assert_eq!(f.peer.read(s, Seq::ZERO, 10).await.unwrap(), batch);
    }

    pub async fn end_entry_finishes_the_stream(backend: Backend) {
        let f = Fixture::new(backend, default_options()).await;
        let outcome = Outcome::Failed {
            reason: FailReason::UpstreamReset,
            message: "connection reset\nby peer ✗".into(),
        };
        let s = new_stream(&*f.store).await;
        f.store.append(s, &events(1..=2)).await.unwrap();
        let mut last = events(3..=4);
        last.push(end(5, outcome.clone()));
        f.store.append(s, &last).await.unwrap();

        let meta = f.peer.meta(s).await.unwrap().expect("meta");
        assert_eq!(meta.end, Some((Seq(5), outcome.clone())));
        let all = f.peer.read(s, Seq::ZERO, 100).await.unwrap();
        assert_eq!(seqs(&all), vec![1, 2, 3, 4, 5]);
        assert_eq!(all.last().map(|e| &e.body), Some(&EntryBody::End(outcome)));
        assert_eq!(f.store.read(s, Seq(4), 10).await.unwrap().len(), 1);

        // A stream whose only entry is the end.
        for o in [Outcome::Completed, Outcome::Cancelled] {
            let s = new_stream(&*f.store).await;
            f.store.append(s, &[end(1, o.clone())]).await.unwrap();
            assert_eq!(
                f.store.meta(s).await.unwrap().and_then(|m| m.end),
                Some((Seq(1), o))
            );
        }
    }

    pub async fn misplaced_appends_conflict(backend: Backend) {
        let f = Fixture::new(backend, default_options()).await;
        let s = new_stream(&*f.store).await;
        f.store.append(s, &events(1..=3)).await.unwrap();

        assert_conflict(f.store.append(s, &events(2..=2)).await, "duplicate seq");
        assert_conflict(f.peer.append(s, &events(3..=4)).await, "overlapping batch");
        assert_conflict(f.store.append(s, &events(5..=5)).await, "gap");
        assert_conflict(
            f.store.append(s, &[ev(4, "a"), ev(6, "b")]).await,
            "batch with a hole",
        );
        assert_conflict(
            f.store
                .append(s, &[end(4, Outcome::Completed), ev(5, "late")])
                .await,
            "end not last",
        );
        assert_conflict(f.store.append(s, &[ev(0, "zero")]).await, "seq 0");
        // Rejected batches wrote nothing.
        assert_eq!(
            seqs(&f.store.read(s, Seq::ZERO, 100).await.unwrap()),
            vec![1, 2, 3]
        );

        f.store
            .append(s, &[ev(4, "d"), end(5, Outcome::Completed)])
            .await
            .unwrap();
        assert_conflict(
            f.store.append(s, &events(6..=6)).await,
            "append after the end",
        );
        assert_conflict(
            f.store.append(s, &[end(6, Outcome::Cancelled)]).await,
            "second end",
        );
        let meta = f.store.meta(s).await.unwrap().unwrap();
        assert_eq!(meta.end, Some((Seq(5), Outcome::Completed)));

        let unknown = StreamId::random();
        match f.store.append(unknown, &events(1..=1)).await {
            Err(StoreError::Conflict { stream, .. }) => assert_eq!(stream, unknown),
            other => panic!("append to an unknown stream: {other:?}"),
        }
        assert!(f
            .store
            .read(unknown, Seq::ZERO, 10)
            .await
            .unwrap()
            .is_empty());
    }

    pub async fn unknown_stream_is_absent(backend: Backend) {
        let f = Fixture::new(backend, default_options()).await;
        let id = StreamId::random();
        assert_eq!(f.store.meta(id).await.unwrap(), None);
        assert!(f.store.read(id, Seq::ZERO, 10).await.unwrap().is_empty());
        let key = KeyRef {
            route: "/api/chat".into(),
            key: "nobody".into(),
        };
        assert_eq!(f.store.resolve_key(&key).await.unwrap(), None);
    }

    pub async fn key_binding_latest_wins(backend: Backend) {
        let f = Fixture::new(backend, default_options()).await;
        let key = KeyRef {
            route: "/api/chat".into(),
            key: "chat-42".into(),
        };
        let other = KeyRef {
            route: "/api/chat".into(),
            key: "chat-43".into(),
        };
        let first = new_stream(&*f.store).await;
        let second = new_stream(&*f.store).await;
        f.store.bind_key(&key, first).await.unwrap();
        assert_eq!(f.peer.resolve_key(&key).await.unwrap(), Some(first));
        f.peer.bind_key(&key, second).await.unwrap();
        assert_eq!(f.store.resolve_key(&key).await.unwrap(), Some(second));
        assert_eq!(f.store.resolve_key(&other).await.unwrap(), None);

        // Ending the first stream does not disturb the binding that moved on.
        f.store
            .append(first, &[end(1, Outcome::Completed)])
            .await
            .unwrap();
        assert_eq!(f.store.resolve_key(&key).await.unwrap(), Some(second));
        // Binding a stream that was never created is allowed (the relay may bind first).
        let ghost = StreamId::random();
        f.store.bind_key(&other, ghost).await.unwrap();
        assert_eq!(f.store.resolve_key(&other).await.unwrap(), Some(ghost));
    }

    pub async fn odd_keys_are_safe_and_distinct(backend: Backend) {
        let f = Fixture::new(backend, default_options()).await;
        let keys: Vec<String> = vec![
            String::new(),
            "\r\n".into(),
            "a\0b".into(),
            "\0".into(),
            "ünïcödé ✓ 🦀".into(),
            "x".repeat(20_000),
            "k:1".into(),
            "{tag}".into(),
            "* ?[]\\".into(),
            " space ".into(),
            "SET k v\r\n".into(),
        ];
        let routes = ["/api/chat", "/api/chat:k", "/api/chat/", "a:b"];
        let mut expected = Vec::new();
        for route in routes {
            for key in &keys {
                let k = KeyRef {
                    route: route.into(),
                    key: key.clone(),
                };
                let s = StreamId::random();
                f.store.bind_key(&k, s).await.unwrap();
                expected.push((k, s));
            }
        }
        // Route "a", key "b:c" must not collide with route "a:b", key "c".
        let split_a = KeyRef {
            route: "a".into(),
            key: "b:c".into(),
        };
        let split_b = KeyRef {
            route: "a:b".into(),
            key: "c".into(),
        };
        let (sa, sb) = (StreamId::random(), StreamId::random());
        f.store.bind_key(&split_a, sa).await.unwrap();
        f.store.bind_key(&split_b, sb).await.unwrap();
        expected.push((split_a, sa));
        expected.push((split_b, sb));

        for (k, s) in &expected {
            assert_eq!(f.peer.resolve_key(k).await.unwrap(), Some(*s), "key {k:?}");
        }
        let absent = KeyRef {
            route: "/api/chat".into(),
            key: "\r\n ".into(),
        };
        assert_eq!(f.store.resolve_key(&absent).await.unwrap(), None);
    }

    /// A finished stream expires `retention` after its end; a live one does
    /// not go with it, and a live one whose producer vanished goes after
    /// `max_stream_duration + retention`, not before.
    ///
    /// Real time on Redis, so each claim is checked where no machine is too
    /// slow to check it: the live stream beside the finished one has a
    /// `max_stream_duration` of an hour, so it must be there whenever the
    /// finished one is seen gone; the abandoned stream's lower bound is
    /// measured from before its creation, so slowness only lengthens it.
    pub async fn retention_expires_finished_streams_not_live_ones(backend: Backend) {
        let retention = Duration::from_secs(1);
        let f = Fixture::new(backend, options(retention, Duration::from_secs(3600))).await;
        let live_key = KeyRef {
            route: "/r".into(),
            key: "live".into(),
        };
        let done_key = KeyRef {
            route: "/r".into(),
            key: "done".into(),
        };

        let live = new_stream(&*f.store).await;
        f.store.append(live, &events(1..=2)).await.unwrap();
        f.store.bind_key(&live_key, live).await.unwrap();

        let done = new_stream(&*f.store).await;
        f.store.bind_key(&done_key, done).await.unwrap();
        f.store.append(done, &events(1..=2)).await.unwrap();
        f.store
            .append(done, &[end(3, Outcome::Completed)])
            .await
            .unwrap();
        // Still resumable right after the end.
        assert!(f.store.meta(done).await.unwrap().is_some());
        assert_eq!(f.store.resolve_key(&done_key).await.unwrap(), Some(done));

        // Gone after the retention, not after the binding's initial lifetime
        // (an hour and a second): the end shortened both.
        let store = f.store.clone();
        eventually(
            retention * 30,
            "the finished stream and its binding to expire",
            || {
                let store = store.clone();
                let done_key = done_key.clone();
                async move {
                    store.meta(done).await.unwrap().is_none()
                        && store.read(done, Seq::ZERO, 10).await.unwrap().is_empty()
                        && store.resolve_key(&done_key).await.unwrap().is_none()
                }
            },
        )
        .await;
        // The live stream is all there: the finished one's retention is not
        // its own.
        assert!(
            f.store.meta(live).await.unwrap().is_some(),
            "the live stream expired with the finished one"
        );
        assert_eq!(f.store.read(live, Seq::ZERO, 10).await.unwrap().len(), 2);
        assert_eq!(f.store.resolve_key(&live_key).await.unwrap(), Some(live));

        // A producer that vanished: its records go after max duration +
        // retention. A second store on the same data with a short maximum.
        let max_duration = Duration::from_secs(2);
        let short = f.store_with(options(retention, max_duration)).await;
        let created = std::time::Instant::now();
        let abandoned = new_stream(&*short).await;
        short.append(abandoned, &events(1..=1)).await.unwrap();
        eventually(
            (max_duration + retention) * 10,
            "the abandoned live stream to expire",
            || {
                let short = short.clone();
                async move {
                    short.meta(abandoned).await.unwrap().is_none()
                        && short
                            .read(abandoned, Seq::ZERO, 10)
                            .await
                            .unwrap()
                            .is_empty()
                }
            },
        )
        .await;
        assert!(
            created.elapsed() >= max_duration,
            "live stream expired after {:?}, before max_stream_duration",
            created.elapsed()
        );
    }

    pub async fn watcher_wakes_on_append(backend: Backend) {
        let f = Fixture::new(backend, default_options()).await;
        let s = new_stream(&*f.store).await;
        let mut w = f.store.watch(s).await.unwrap();
        f.peer.append(s, &events(1..=1)).await.unwrap();
        wakes(&mut w, "a wake-up after an append").await;
        // An append between two waits is not lost.
        f.peer.append(s, &events(2..=3)).await.unwrap();
        wakes(&mut w, "a wake-up for an append made before waiting").await;
        f.peer
            .append(s, &[end(4, Outcome::Completed)])
            .await
            .unwrap();
        wakes(&mut w, "a wake-up for the end").await;
        assert_eq!(
            seqs(&f.store.read(s, Seq(1), 10).await.unwrap()),
            vec![2, 3, 4]
        );

        // Watching a stream that does not exist yet works too.
        let later = StreamId::random();
        let mut w = f.store.watch(later).await.unwrap();
        f.peer.create(&sample_meta(later)).await.unwrap();
        f.peer.append(later, &events(1..=1)).await.unwrap();
        wakes(&mut w, "a wake-up on a stream created after watching").await;
    }

    pub async fn watchers_share_and_release(backend: Backend) {
        let f = Fixture::new(backend, default_options()).await;
        let s = new_stream(&*f.store).await;
        let quiet = new_stream(&*f.store).await;
        let mut a = f.store.watch(s).await.unwrap();
        let mut b = f.store.watch(s).await.unwrap();
        f.peer.append(s, &events(1..=1)).await.unwrap();
        wakes(&mut a, "first watcher").await;
        wakes(&mut b, "second watcher").await;

        drop(a);
        f.peer.append(s, &events(2..=2)).await.unwrap();
        wakes(&mut b, "the remaining watcher after another one left").await;

        // Leave and come back at once, many times: a late unsubscribe must
        // never cancel a newer watcher's subscription.
        for i in 0..20u64 {
            drop(b);
            b = f.store.watch(s).await.unwrap();
            f.peer.append(s, &events(3 + i..=3 + i)).await.unwrap();
            wakes(&mut b, "a watcher re-created right after the last one left").await;
        }

        // Appends elsewhere do not wake this stream's watcher.
        let mut q = f.store.watch(quiet).await.unwrap();
        f.peer.append(s, &events(23..=23)).await.unwrap();
        wakes(&mut b, "the busy stream's watcher").await;
        assert!(
            tokio::time::timeout(Duration::from_millis(200), q.changed())
                .await
                .is_err(),
            "a watcher woke for another stream's append"
        );
    }

    /// A gap stands for its whole range: the next entry follows its `upto`,
    /// reads return it as one entry, paging with `last_seq` crosses it once,
    /// and the metadata says the stream lost history.
    pub async fn gaps_stand_for_their_range(backend: Backend) {
        let f = Fixture::new(backend, default_options()).await;
        let s = new_stream(&*f.store).await;
        assert!(!f.store.meta(s).await.unwrap().unwrap().lost_history);
        let mut w = f.store.watch(s).await.unwrap();
        f.store.append(s, &events(1..=2)).await.unwrap();
        // A gap alone in its batch, then what follows it in the next one.
        f.peer.append(s, &[gap(3, 6)]).await.unwrap();
        wakes(&mut w, "a wake-up for a gap").await;
        assert!(
            f.store.meta(s).await.unwrap().unwrap().lost_history,
            "a gap did not mark the stream as having lost history"
        );
        f.store.append(s, &events(7..=8)).await.unwrap();
        // Gaps inside a batch: one seq wide, and two in a row.
        let batch = vec![ev(9, "a"), gap(10, 10), gap(11, 12), ev(13, "b")];
        f.store.append(s, &batch).await.unwrap();

        let mut expected = events(1..=2);
        expected.push(gap(3, 6));
        expected.extend(events(7..=8));
        expected.extend(batch);
        assert_eq!(f.peer.read(s, Seq::ZERO, 100).await.unwrap(), expected);
        assert_eq!(
            expected.iter().map(|e| e.last_seq().0).collect::<Vec<_>>(),
            vec![1, 2, 6, 7, 8, 9, 10, 12, 13]
        );

        for page_size in [1, 2, 3] {
            let mut paged = Vec::new();
            let mut after = Seq::ZERO;
            loop {
                let page = f.store.read(s, after, page_size).await.unwrap();
                let Some(last) = page.last() else { break };
                assert!(page.len() <= page_size);
                after = last.last_seq();
                paged.extend(page);
            }
            assert_eq!(paged, expected, "paging by {page_size}");
        }
        let meta = f.peer.meta(s).await.unwrap().unwrap();
        assert!(meta.lost_history);
        assert_eq!(meta.end, None, "a gap does not end a stream");
    }

    /// `read(after)` returns the gap when `after` is before or inside it
    /// (so a reader learns it crossed one), and skips it once past its end.
    pub async fn reads_positioned_around_a_gap(backend: Backend) {
        let f = Fixture::new(backend, default_options()).await;
        let s = new_stream(&*f.store).await;
        // A gap at the very start, and one that is (for now) the last entry.
        let stored = vec![gap(1, 2), ev(3, "c"), ev(4, "d"), gap(5, 9)];
        f.store.append(s, &stored).await.unwrap();
        let read = |after: u64, limit: usize| {
            let store = f.peer.clone();
            async move { store.read(s, Seq(after), limit).await.unwrap() }
        };

        assert_eq!(read(0, 100).await, stored);
        assert_eq!(read(0, 2).await, stored[..2].to_vec());
        assert_eq!(read(1, 100).await, stored, "inside the first gap");
        assert_eq!(read(2, 100).await, stored[1..].to_vec(), "at its end");
        assert_eq!(read(3, 1).await, vec![ev(4, "d")]);
        assert_eq!(read(4, 100).await, vec![gap(5, 9)], "right before a gap");
        for after in 5..=8 {
            assert_eq!(
                read(after, 100).await,
                vec![gap(5, 9)],
                "inside, at {after}"
            );
            assert_eq!(read(after, 1).await, vec![gap(5, 9)], "inside, at {after}");
        }
        assert!(read(9, 100).await.is_empty(), "at the end of the last gap");
        assert!(read(100, 100).await.is_empty());
        assert!(read(u64::MAX, 100).await.is_empty());

        f.store.append(s, &events(10..=11)).await.unwrap();
        let mut tail = vec![gap(5, 9)];
        tail.extend(events(10..=11));
        assert_eq!(read(7, 100).await, tail);
        assert_eq!(read(9, 100).await, events(10..=11));
        assert_eq!(read(10, 100).await, events(11..=11));
    }

    /// Appends after a gap must start at its `upto + 1`; malformed gaps are
    /// refused; a refused batch writes nothing and flags nothing.
    pub async fn appends_must_follow_a_gap(backend: Backend) {
        let f = Fixture::new(backend, default_options()).await;
        let s = new_stream(&*f.store).await;
        f.store.append(s, &events(1..=2)).await.unwrap();
        f.store.append(s, &[gap(3, 6)]).await.unwrap();
        let before = f.store.read(s, Seq::ZERO, 100).await.unwrap();

        for seq in [3, 4, 6, 8] {
            assert_conflict(
                f.store.append(s, &events(seq..=seq)).await,
                &format!("an event at {seq} after a gap ending at 6"),
            );
        }
        assert_conflict(f.peer.append(s, &[gap(6, 8)]).await, "overlapping gap");
        assert_conflict(f.store.append(s, &[gap(8, 9)]).await, "gap after a hole");
        assert_conflict(
            f.store.append(s, &[end(6, Outcome::Completed)]).await,
            "an end inside a gap",
        );
        assert_conflict(
            f.store.append(s, &[gap(7, 9), ev(9, "x")]).await,
            "batch entry inside the gap before it",
        );
        assert_conflict(
            f.store.append(s, &[gap(7, 9), ev(11, "x")]).await,
            "batch with a hole after a gap",
        );
        assert_conflict(
            f.store.append(s, &[ev(7, "x"), gap(9, 10)]).await,
            "batch with a hole before a gap",
        );
        assert_conflict(
            f.store.append(s, &[gap(7, 6)]).await,
            "gap ending before it starts",
        );
        assert_conflict(
            f.store
                .append(s, &[gap(7, u64::MAX), ev(0, "wrapped")])
                .await,
            "entry after a gap to the last seq",
        );
        assert_eq!(f.store.read(s, Seq::ZERO, 100).await.unwrap(), before);

        f.store.append(s, &[ev(7, "g"), gap(8, 8)]).await.unwrap();
        f.store.append(s, &events(9..=9)).await.unwrap();
        assert_eq!(
            f.store
                .read(s, Seq::ZERO, 100)
                .await
                .unwrap()
                .iter()
                .map(|e| (e.seq.0, e.last_seq().0))
                .collect::<Vec<_>>(),
            vec![(1, 1), (2, 2), (3, 6), (7, 7), (8, 8), (9, 9)]
        );

        // A refused gap batch leaves the stream unflagged and empty.
        let t = new_stream(&*f.store).await;
        assert_conflict(f.store.append(t, &[gap(2, 3)]).await, "gap not at seq 1");
        assert_conflict(
            f.store.append(t, &[gap(1, 3), ev(3, "x")]).await,
            "batch overlapping its own gap",
        );
        assert!(!f.store.meta(t).await.unwrap().unwrap().lost_history);
        assert!(f.store.read(t, Seq::ZERO, 10).await.unwrap().is_empty());
        // A gap on an unknown stream is a conflict like any append.
        assert_conflict(
            f.store.append(StreamId::random(), &[gap(1, 5)]).await,
            "gap on an unknown stream",
        );
    }

    /// A stream can end right after a gap (in the same batch or the next),
    /// and the end is still its last entry.
    pub async fn gap_then_end(backend: Backend) {
        let f = Fixture::new(backend, default_options()).await;
        let outcome = Outcome::Failed {
            reason: FailReason::UpstreamReset,
            message: "store unreachable".into(),
        };
        let s = new_stream(&*f.store).await;
        let batch = vec![ev(1, "a"), gap(2, 4), end(5, outcome.clone())];
        f.store.append(s, &batch).await.unwrap();
        let meta = f.peer.meta(s).await.unwrap().unwrap();
        assert_eq!(meta.end, Some((Seq(5), outcome)));
        assert!(meta.lost_history);
        assert_eq!(f.peer.read(s, Seq::ZERO, 10).await.unwrap(), batch);
        assert_eq!(
            f.peer.read(s, Seq(3), 10).await.unwrap(),
            batch[1..].to_vec()
        );
        assert_eq!(
            f.peer.read(s, Seq(4), 10).await.unwrap(),
            batch[2..].to_vec()
        );
        assert_conflict(f.store.append(s, &[gap(6, 7)]).await, "a gap after the end");

        let t = new_stream(&*f.store).await;
        f.store.append(t, &[gap(1, 3)]).await.unwrap();
        assert_conflict(
            f.store.append(t, &[end(3, Outcome::Cancelled)]).await,
            "an end inside the gap",
        );
        assert_conflict(
            f.store.append(t, &[end(5, Outcome::Cancelled)]).await,
            "an end after a hole",
        );
        assert_conflict(
            f.store
                .append(t, &[end(4, Outcome::Cancelled), gap(5, 6)])
                .await,
            "a gap after the end in one batch",
        );
        f.store
            .append(t, &[end(4, Outcome::Cancelled)])
            .await
            .unwrap();
        assert_eq!(
            f.store.meta(t).await.unwrap().unwrap().end,
            Some((Seq(4), Outcome::Cancelled))
        );
        assert_eq!(
            f.store.read(t, Seq::ZERO, 10).await.unwrap(),
            vec![gap(1, 3), end(4, Outcome::Cancelled)]
        );
    }

    /// `lost_history` is stored as given by `create`, set by a gap, and
    /// cleared only by re-creating the stream.
    pub async fn lost_history_flag_in_meta(backend: Backend) {
        let f = Fixture::new(backend, default_options()).await;
        let id = StreamId::random();
        let mut meta = sample_meta(id);
        meta.lost_history = true;
        f.store.create(&meta).await.unwrap();
        assert_eq!(f.peer.meta(id).await.unwrap(), Some(meta.clone()));

        let fresh = sample_meta(id);
        f.store.create(&fresh).await.unwrap();
        assert_eq!(f.peer.meta(id).await.unwrap(), Some(fresh.clone()));
        f.store.append(id, &[gap(1, 1), gap(2, 2)]).await.unwrap();
        let flagged = f.peer.meta(id).await.unwrap().unwrap();
        assert!(flagged.lost_history);
        assert_eq!(
            StreamMeta {
                lost_history: false,
                ..flagged
            },
            fresh,
            "a gap changed more than the flag"
        );
        f.store.append(id, &events(3..=3)).await.unwrap();
        assert!(f.peer.meta(id).await.unwrap().unwrap().lost_history);
        f.store.create(&fresh).await.unwrap();
        assert_eq!(f.peer.meta(id).await.unwrap(), Some(fresh));
    }

    pub async fn lease_fields_round_trip(backend: Backend) {
        let f = Fixture::new(backend, default_options()).await;
        let id = StreamId::random();
        let meta = StreamMeta {
            lease_owner: Some("instance-a ✓".into()),
            lease_until_ms: Some(now_ms() + 5_000),
            cancel_requested: true,
            ..sample_meta(id)
        };
        f.store.create(&meta).await.unwrap();
        assert_eq!(f.peer.meta(id).await.unwrap(), Some(meta));
        // Re-creating replaces the lease and the cancel request too.
        let fresh = sample_meta(id);
        f.store.create(&fresh).await.unwrap();
        assert_eq!(f.peer.meta(id).await.unwrap(), Some(fresh));
    }

    /// The dialect of in-band signals: kept from creation, or set later by
    /// the producer; never creates a record for an unknown stream. A record
    /// without it (also one written before dialects existed) reads `None`.
    pub async fn signals_set_at_creation_or_later(backend: Backend) {
        let f = Fixture::new(backend, default_options()).await;
        let id = StreamId::random();
        let meta = StreamMeta {
            signals: Some(Dialect::AiSdk),
            ..sample_meta(id)
        };
        f.store.create(&meta).await.unwrap();
        assert_eq!(f.peer.meta(id).await.unwrap(), Some(meta));

        let later = new_stream(&*f.store).await;
        assert_eq!(f.peer.meta(later).await.unwrap().unwrap().signals, None);
        f.store.append(later, &events(1..=2)).await.unwrap();
        f.store
            .set_signals(later, Dialect::Anthropic)
            .await
            .unwrap();
        let got = f.peer.meta(later).await.unwrap().unwrap();
        assert_eq!(got.signals, Some(Dialect::Anthropic));
        f.store
            .append(later, &[end(3, Outcome::Cancelled)])
            .await
            .unwrap();
        let got = f.peer.meta(later).await.unwrap().unwrap();
        assert_eq!(got.signals, Some(Dialect::Anthropic), "kept past the end");
        assert_eq!(got.end, Some((Seq(3), Outcome::Cancelled)));

        let ghost = StreamId::random();
        f.store.set_signals(ghost, Dialect::OpenAi).await.unwrap();
        assert_eq!(f.peer.meta(ghost).await.unwrap(), None);
    }

    pub async fn lease_take_renew_conflict_and_takeover(backend: Backend) {
        let f = Fixture::new(backend, default_options()).await;
        let s = new_stream(&*f.store).await;
        let t = now_ms();
        // Unowned: anyone takes it.
        let r = f.store.renew_lease(s, "a", t, t + 1_000).await.unwrap();
        assert!(!r.cancel_requested);
        let m = f.peer.meta(s).await.unwrap().unwrap();
        assert_eq!(m.lease_owner.as_deref(), Some("a"));
        assert_eq!(m.lease_until_ms, Some(t + 1_000));
        // The owner renews, from any instance of the store.
        f.peer
            .renew_lease(s, "a", t + 500, t + 2_000)
            .await
            .unwrap();
        assert_eq!(
            f.store.meta(s).await.unwrap().unwrap().lease_until_ms,
            Some(t + 2_000)
        );
        // Another owner conflicts while the lease is valid, its last ms included.
        for now in [t + 500, t + 2_000] {
            match f.peer.renew_lease(s, "b", now, now + 1_000).await {
                Err(StoreError::Conflict { .. }) => {}
                other => panic!("takeover of a valid lease at {now}: {other:?}"),
            }
        }
        let m = f.store.meta(s).await.unwrap().unwrap();
        assert_eq!(
            m.lease_owner.as_deref(),
            Some("a"),
            "a refused takeover wrote"
        );
        assert_eq!(m.lease_until_ms, Some(t + 2_000));
        // Once it expired, another owner takes it over, and the old one conflicts.
        f.peer
            .renew_lease(s, "b", t + 2_001, t + 3_000)
            .await
            .unwrap();
        let m = f.store.meta(s).await.unwrap().unwrap();
        assert_eq!(m.lease_owner.as_deref(), Some("b"));
        assert_eq!(m.lease_until_ms, Some(t + 3_000));
        match f.store.renew_lease(s, "a", t + 2_002, t + 4_000).await {
            Err(StoreError::Conflict { .. }) => {}
            other => panic!("the old owner renewed a lease taken over: {other:?}"),
        }
        // A stream created with its lease already set is owned from the start.
        let id = StreamId::random();
        let meta = StreamMeta {
            lease_owner: Some("c".into()),
            lease_until_ms: Some(t + 1_000),
            ..sample_meta(id)
        };
        f.store.create(&meta).await.unwrap();
        assert!(f.peer.renew_lease(id, "d", t, t + 1_000).await.is_err());
        f.peer.renew_lease(id, "c", t, t + 1_000).await.unwrap();

        // Unknown and ended streams conflict.
        match f.store.renew_lease(StreamId::random(), "a", t, t + 1).await {
            Err(StoreError::Conflict { .. }) => {}
            other => panic!("lease of an unknown stream: {other:?}"),
        }
        f.store
            .append(s, &[end(1, Outcome::Completed)])
            .await
            .unwrap();
        match f.store.renew_lease(s, "b", t + 2_500, t + 4_000).await {
            Err(StoreError::Conflict { .. }) => {}
            other => panic!("lease of an ended stream: {other:?}"),
        }
    }

    pub async fn renewal_reports_a_cancel_request(backend: Backend) {
        let f = Fixture::new(backend, default_options()).await;
        let s = new_stream(&*f.store).await;
        let t = now_ms();
        let r = f.store.renew_lease(s, "a", t, t + 1_000).await.unwrap();
        assert!(!r.cancel_requested);
        assert!(f.peer.request_cancel(s).await.unwrap());
        assert!(f.store.meta(s).await.unwrap().unwrap().cancel_requested);
        let r = f.store.renew_lease(s, "a", t + 1, t + 1_000).await.unwrap();
        assert!(r.cancel_requested);
        // It stays requested, and asking again is harmless.
        assert!(f.peer.request_cancel(s).await.unwrap());
        let r = f.store.renew_lease(s, "a", t + 2, t + 1_000).await.unwrap();
        assert!(r.cancel_requested);
        // The request does not touch the lease or the entries.
        let m = f.store.meta(s).await.unwrap().unwrap();
        assert_eq!(m.lease_owner.as_deref(), Some("a"));
        assert!(m.end.is_none());
        assert!(f.store.read(s, Seq::ZERO, 10).await.unwrap().is_empty());
    }

    pub async fn request_cancel_of_unknown_or_ended_stream(backend: Backend) {
        let f = Fixture::new(backend, default_options()).await;
        let ghost = StreamId::random();
        assert!(!f.store.request_cancel(ghost).await.unwrap());
        // It created nothing.
        assert_eq!(f.store.meta(ghost).await.unwrap(), None);
        let s = new_stream(&*f.store).await;
        f.store
            .append(s, &[end(1, Outcome::Completed)])
            .await
            .unwrap();
        assert!(f.peer.request_cancel(s).await.unwrap());
        let m = f.store.meta(s).await.unwrap().unwrap();
        assert_eq!(m.end, Some((Seq(1), Outcome::Completed)));
    }

    pub async fn end_if_abandoned_fences_the_old_producer(backend: Backend) {
        let f = Fixture::new(backend, default_options()).await;
        let lost = Outcome::Failed {
            reason: FailReason::ProducerLost,
            message: "the producing instance stopped renewing its lease".into(),
        };
        let t = now_ms();
        let s = new_stream(&*f.store).await;
        // No lease: never abandoned.
        assert_eq!(
            f.peer.end_if_abandoned(s, t + 60_000, &lost).await.unwrap(),
            None
        );
        f.store.renew_lease(s, "a", t, t + 1_000).await.unwrap();
        f.store.append(s, &events(1..=2)).await.unwrap();
        f.store.append(s, &[gap(3, 4)]).await.unwrap();
        // Valid lease (its last ms included): nothing written.
        for now in [t, t + 1_000] {
            assert_eq!(f.peer.end_if_abandoned(s, now, &lost).await.unwrap(), None);
        }
        assert_eq!(f.store.meta(s).await.unwrap().unwrap().end, None);
        assert_eq!(f.store.read(s, Seq::ZERO, 10).await.unwrap().len(), 3);

        let mut w = f.store.watch(s).await.unwrap();
        // Expired: the End entry follows the last stored seq (a gap's upto).
        assert_eq!(
            f.peer.end_if_abandoned(s, t + 1_001, &lost).await.unwrap(),
            Some(Seq(5))
        );
        wakes(&mut w, "the wake-up of an abandoned end").await;
        let entries = f.store.read(s, Seq(4), 10).await.unwrap();
        assert_eq!(entries, vec![end(5, lost.clone())]);
        let m = f.store.meta(s).await.unwrap().unwrap();
        assert_eq!(m.end, Some((Seq(5), lost.clone())));
        assert!(m.lost_history);

        // The paused producer wakes up: it can neither append nor renew.
        assert_conflict(
            f.store.append(s, &events(5..=5)).await,
            "an append by the old producer after the abandoned end",
        );
        assert_conflict(
            f.store.append(s, &[end(5, Outcome::Completed)]).await,
            "the old producer's own end after the abandoned end",
        );
        assert!(f
            .store
            .renew_lease(s, "a", t + 1_002, t + 2_000)
            .await
            .is_err());
        // Ending twice does nothing.
        assert_eq!(
            f.peer.end_if_abandoned(s, t + 60_000, &lost).await.unwrap(),
            None
        );
        assert_eq!(f.store.read(s, Seq::ZERO, 10).await.unwrap().len(), 4);

        // A stream without entries ends at seq 1; an unknown one is left alone.
        let empty = StreamId::random();
        let meta = StreamMeta {
            lease_owner: Some("a".into()),
            lease_until_ms: Some(t),
            ..sample_meta(empty)
        };
        f.store.create(&meta).await.unwrap();
        assert_eq!(
            f.peer.end_if_abandoned(empty, t + 1, &lost).await.unwrap(),
            Some(Seq(1))
        );
        assert_eq!(
            f.store.read(empty, Seq::ZERO, 10).await.unwrap(),
            vec![end(1, lost.clone())]
        );
        let ghost = StreamId::random();
        assert_eq!(
            f.peer.end_if_abandoned(ghost, t, &lost).await.unwrap(),
            None
        );
        assert_eq!(f.store.meta(ghost).await.unwrap(), None);
        assert!(f.store.read(ghost, Seq::ZERO, 10).await.unwrap().is_empty());
    }

    /// Of concurrent abandoned ends and a late append, exactly one End lands.
    pub async fn abandoned_end_races_leave_one_end(backend: Backend) {
        let f = Fixture::new(backend, default_options()).await;
        let lost = Outcome::Failed {
            reason: FailReason::ProducerLost,
            message: String::new(),
        };
        let t = now_ms();
        let s = new_stream(&*f.store).await;
        f.store.renew_lease(s, "a", t, t + 10).await.unwrap();
        f.store.append(s, &events(1..=3)).await.unwrap();
        let tasks: Vec<_> = (0..10)
            .map(|i| {
                let st = if i % 2 == 0 {
                    f.store.clone()
                } else {
                    f.peer.clone()
                };
                let lost = lost.clone();
                tokio::spawn(async move { st.end_if_abandoned(s, t + 11, &lost).await })
            })
            .collect();
        let late_entries = events(4..=4);
        let late = f.store.append(s, &late_entries);
        let (results, late) = tokio::join!(futures::future::join_all(tasks), late);
        let ended: Vec<Seq> = results
            .into_iter()
            .filter_map(|r| r.expect("task").expect("end_if_abandoned"))
            .collect();
        assert_eq!(ended.len(), 1, "ends written: {ended:?}");
        // The late append either landed before the end or conflicted.
        let expected_end = if late.is_ok() { Seq(5) } else { Seq(4) };
        assert_eq!(ended[0], expected_end);
        let entries = f.store.read(s, Seq::ZERO, 10).await.unwrap();
        assert_eq!(entries.last(), Some(&end(expected_end.0, lost)));
        assert_eq!(entries.len() as u64, expected_end.0);
    }

    pub async fn claim_key_first_wins(backend: Backend) {
        let f = Fixture::new(backend, default_options()).await;
        let key = KeyRef {
            route: "/api/chat".into(),
            key: "idem-1\r\n{x}".into(),
        };
        let first = new_stream(&*f.store).await;
        let second = new_stream(&*f.store).await;
        assert_eq!(f.store.claim_key(&key, first).await.unwrap(), None);
        assert_eq!(f.peer.claim_key(&key, second).await.unwrap(), Some(first));
        assert_eq!(f.peer.claim_key(&key, first).await.unwrap(), Some(first));
        assert_eq!(f.store.resolve_key(&key).await.unwrap(), Some(first));
        // Another key, or the same key on another route, is another claim.
        let other_route = KeyRef {
            route: "/api/other".into(),
            ..key.clone()
        };
        assert_eq!(f.store.claim_key(&other_route, second).await.unwrap(), None);
        // bind_key still moves a claimed key on; claims then see the new stream.
        f.store.bind_key(&key, second).await.unwrap();
        assert_eq!(f.peer.claim_key(&key, first).await.unwrap(), Some(second));
        // A claim of a stream not created yet is allowed, like a binding.
        let fresh = KeyRef {
            route: "/api/chat".into(),
            key: "idem-2".into(),
        };
        let ghost = StreamId::random();
        assert_eq!(f.store.claim_key(&fresh, ghost).await.unwrap(), None);
        assert_eq!(f.store.resolve_key(&fresh).await.unwrap(), Some(ghost));
    }

    pub async fn release_key_drops_only_its_own_claim(backend: Backend) {
        let f = Fixture::new(backend, default_options()).await;
        let key = KeyRef {
            route: "idempotency:/api/chat".into(),
            key: "send-7\r\n{x}".into(),
        };
        let failed = StreamId::random();
        let retry = StreamId::random();
        assert_eq!(f.store.claim_key(&key, failed).await.unwrap(), None);
        // Giving back a claim another stream holds changes nothing.
        f.peer.release_key(&key, retry).await.unwrap();
        assert_eq!(f.store.resolve_key(&key).await.unwrap(), Some(failed));
        // The claimer gives it back: the next claim wins at once.
        f.store.release_key(&key, failed).await.unwrap();
        assert_eq!(f.peer.resolve_key(&key).await.unwrap(), None);
        assert_eq!(f.peer.claim_key(&key, retry).await.unwrap(), None);
        // A late give-back of the failed claim leaves the retry's alone.
        f.store.release_key(&key, failed).await.unwrap();
        assert_eq!(f.store.resolve_key(&key).await.unwrap(), Some(retry));
        // Releasing an unbound key is a no-op.
        let unbound = KeyRef {
            route: "idempotency:/api/chat".into(),
            key: "never".into(),
        };
        f.store.release_key(&unbound, retry).await.unwrap();
        assert_eq!(f.store.resolve_key(&unbound).await.unwrap(), None);
    }

    pub async fn concurrent_claims_one_wins(backend: Backend) {
        let f = Fixture::new(backend, default_options()).await;
        let key = KeyRef {
            route: "/api/chat".into(),
            key: "idem-race".into(),
        };
        let tasks: Vec<_> = (0..20)
            .map(|i| {
                let st = if i % 2 == 0 {
                    f.store.clone()
                } else {
                    f.peer.clone()
                };
                let key = key.clone();
                tokio::spawn(async move {
                    let s = StreamId::random();
                    st.create(&sample_meta(s)).await?;
                    st.claim_key(&key, s).await.map(|r| (s, r))
                })
            })
            .collect();
        let results: Vec<(StreamId, Option<StreamId>)> = futures::future::join_all(tasks)
            .await
            .into_iter()
            .map(|r| r.expect("task").expect("claim"))
            .collect();
        let winners: Vec<StreamId> = results
            .iter()
            .filter(|(_, r)| r.is_none())
            .map(|(s, _)| *s)
            .collect();
        assert_eq!(winners.len(), 1, "claims that won: {winners:?}");
        let winner = winners[0];
        for (s, r) in &results {
            if *s != winner {
                assert_eq!(*r, Some(winner), "a losing claim saw another stream");
            }
        }
        assert_eq!(f.store.resolve_key(&key).await.unwrap(), Some(winner));
    }

    pub async fn claim_key_respects_expiry(backend: Backend) {
        let retention = Duration::from_secs(1);
        let f = Fixture::new(backend, options(retention, Duration::from_secs(30))).await;
        let key = KeyRef {
            route: "/r".into(),
            key: "idem".into(),
        };
        let done = new_stream(&*f.store).await;
        assert_eq!(f.store.claim_key(&key, done).await.unwrap(), None);
        f.store
            .append(done, &[end(1, Outcome::Completed)])
            .await
            .unwrap();
        // Still claimed during the retention.
        let next = new_stream(&*f.store).await;
        assert_eq!(f.peer.claim_key(&key, next).await.unwrap(), Some(done));
        // The end shortened the claim to the retention, as for bind_key: then
        // the key is free again.
        let store = f.store.clone();
        let k = key.clone();
        eventually(retention * 8, "the claimed key to expire", || {
            let store = store.clone();
            let k = k.clone();
            async move { store.resolve_key(&k).await.unwrap().is_none() }
        })
        .await;
        assert_eq!(f.peer.claim_key(&key, next).await.unwrap(), None);
        assert_eq!(f.store.resolve_key(&key).await.unwrap(), Some(next));
    }

    pub async fn checked_appends_follow_the_producer_rules(backend: Backend) {
        let f = Fixture::new(backend, default_options()).await;
        let s = new_stream(&*f.store).await;
        let (a, b) = (&f.store, &f.peer);
        let ok = Checked::Appended;
        // A new producer starts at seq 0; a retry (through another
        // instance) is a duplicate and writes nothing.
        let first = a
            .append_checked(s, &events(1..=1), &producer("p", 0, 1))
            .await;
        assert_eq!(
            first.unwrap(),
            Checked::SeqGap {
                expected: 0,
                received: 1
            }
        );
        assert_eq!(
            a.append_checked(s, &events(1..=2), &producer("p", 0, 0))
                .await
                .unwrap(),
            ok
        );
        let retry = b
            .append_checked(s, &events(3..=3), &producer("p", 0, 0))
            .await;
        assert_eq!(
            retry.unwrap(),
            Checked::Duplicate {
                last_seq: 0,
                closed: false
            }
        );
        // Seqs follow one by one.
        let skipped = b
            .append_checked(s, &events(3..=3), &producer("p", 0, 2))
            .await;
        assert_eq!(
            skipped.unwrap(),
            Checked::SeqGap {
                expected: 1,
                received: 2
            }
        );
        assert_eq!(
            b.append_checked(s, &events(3..=3), &producer("p", 0, 1))
                .await
                .unwrap(),
            ok
        );
        // A batch that does not follow the tail conflicts and records
        // nothing: the same claim at the right place is then accepted.
        let misplaced = a
            .append_checked(s, &events(9..=9), &producer("p", 0, 2))
            .await;
        assert!(
            matches!(misplaced, Err(StoreError::Conflict { .. })),
            "{misplaced:?}"
        );
        assert_eq!(
            a.append_checked(s, &events(4..=4), &producer("p", 0, 2))
                .await
                .unwrap(),
            ok
        );
        // A new epoch starts at 0 and fences the old one.
        let bad_epoch = a
            .append_checked(s, &events(5..=5), &producer("p", 1, 3))
            .await;
        assert_eq!(bad_epoch.unwrap(), Checked::NewEpochNeedsSeqZero);
        assert_eq!(
            b.append_checked(s, &events(5..=5), &producer("p", 1, 0))
                .await
                .unwrap(),
            ok
        );
        let zombie = a
            .append_checked(s, &events(6..=6), &producer("p", 0, 3))
            .await;
        assert_eq!(zombie.unwrap(), Checked::StaleEpoch { current: 1 });
        // Producers are independent; refusals wrote nothing.
        assert_eq!(
            a.append_checked(s, &events(6..=6), &producer("q", 7, 0))
                .await
                .unwrap(),
            ok
        );
        assert_eq!(
            seqs(&b.read(s, Seq::ZERO, 100).await.unwrap()),
            (1..=6).collect::<Vec<_>>()
        );

        // Stream-Seq sorts bytewise ("B" < "a"), strictly increasing.
        assert_eq!(
            a.append_checked(s, &events(7..=7), &stream_seq("a"))
                .await
                .unwrap(),
            ok
        );
        for stale in ["a", "B", ""] {
            let r = b
                .append_checked(s, &events(8..=8), &stream_seq(stale))
                .await;
            assert_eq!(
                r.unwrap(),
                Checked::StreamSeqRegressed,
                "Stream-Seq {stale:?}"
            );
        }
        assert_eq!(
            b.append_checked(s, &events(8..=8), &stream_seq("aa"))
                .await
                .unwrap(),
            ok
        );
        // The producer check comes first: a retry with a stale Stream-Seq
        // is still a duplicate.
        let both = WriterChecks {
            stream_seq: Some("aa".into()),
            ..producer("q", 7, 0)
        };
        let dup = a.append_checked(s, &events(9..=9), &both).await.unwrap();
        assert_eq!(
            dup,
            Checked::Duplicate {
                last_seq: 0,
                closed: false
            }
        );

        // Closing with a claim: its retry is a duplicate of a closed
        // stream, anything else finds it ended.
        let close = [end(9, Outcome::Completed)];
        assert_eq!(
            a.append_checked(s, &close, &producer("q", 7, 1))
                .await
                .unwrap(),
            ok
        );
        let again = b
            .append_checked(s, &[end(10, Outcome::Completed)], &producer("q", 7, 1))
            .await;
        assert_eq!(
            again.unwrap(),
            Checked::Duplicate {
                last_seq: 1,
                closed: true
            }
        );
        for other in [
            producer("q", 7, 2),
            producer("p", 1, 1),
            WriterChecks::default(),
        ] {
            let r = b.append_checked(s, &events(10..=10), &other).await;
            assert_eq!(r.unwrap(), Checked::Ended, "{other:?}");
        }
        assert_eq!(b.last_seq(s).await.unwrap(), Seq(9));
        // An unknown stream conflicts, as for append.
        let unknown = a
            .append_checked(StreamId::random(), &events(1..=1), &producer("p", 0, 0))
            .await;
        assert!(
            matches!(unknown, Err(StoreError::Conflict { .. })),
            "{unknown:?}"
        );
    }

    pub async fn concurrent_retries_of_one_claim_append_once(backend: Backend) {
        let f = Fixture::new(backend, default_options()).await;
        let s = new_stream(&*f.store).await;
        let tasks: Vec<_> = (0..20)
            .map(|i| {
                let st = if i % 2 == 0 {
                    f.store.clone()
                } else {
                    f.peer.clone()
                };
                tokio::spawn(async move {
                    st.append_checked(s, &events(1..=1), &producer("p", 0, 0))
                        .await
                })
            })
            .collect();
        let results: Vec<Checked> = futures::future::join_all(tasks)
            .await
            .into_iter()
            .map(|r| r.expect("task").expect("append_checked"))
            .collect();
        let appended = results.iter().filter(|r| **r == Checked::Appended).count();
        assert_eq!(appended, 1, "{results:?}");
        let dup = Checked::Duplicate {
            last_seq: 0,
            closed: false,
        };
        assert!(
            results.iter().all(|r| *r == Checked::Appended || *r == dup),
            "{results:?}"
        );
        assert_eq!(
            seqs(&f.store.read(s, Seq::ZERO, 100).await.unwrap()),
            vec![1]
        );
    }

    pub async fn sliding_expiry_slides_with_touches(backend: Backend) {
        let f = Fixture::new(backend, default_options()).await;
        let id = StreamId::random();
        let created = 1_000_000;
        f.store
            .create(&StreamMeta {
                created_ms: created,
                ..sample_meta(id)
            })
            .await
            .unwrap();
        let (a, b) = (&f.store, &f.peer);
        // The window starts at creation; a look without touch leaves it.
        assert!(a
            .sliding_expiry(id, created + 900, 1000, false)
            .await
            .unwrap());
        assert!(!b
            .sliding_expiry(id, created + 1000, 1000, false)
            .await
            .unwrap());
        // A touch moves it, for every instance.
        assert!(a
            .sliding_expiry(id, created + 500, 1000, true)
            .await
            .unwrap());
        assert!(b
            .sliding_expiry(id, created + 1499, 1000, false)
            .await
            .unwrap());
        assert!(!b
            .sliding_expiry(id, created + 1500, 1000, false)
            .await
            .unwrap());
        // Once past, a touch does not bring it back.
        assert!(!a
            .sliding_expiry(id, created + 1600, 1000, true)
            .await
            .unwrap());
        assert!(!a
            .sliding_expiry(id, created + 1600, 1000, false)
            .await
            .unwrap());
        assert!(!a
            .sliding_expiry(StreamId::random(), created, 1000, true)
            .await
            .unwrap());
    }

    pub async fn last_seq_is_the_last_covered_seq(backend: Backend) {
        let f = Fixture::new(backend, default_options()).await;
        let s = new_stream(&*f.store).await;
        assert_eq!(f.store.last_seq(s).await.unwrap(), Seq::ZERO);
        // Many events (packed on Redis), then a gap, then the end.
        f.store.append(s, &events(1..=1500)).await.unwrap();
        assert_eq!(f.peer.last_seq(s).await.unwrap(), Seq(1500));
        f.store.append(s, &[gap(1501, 1510)]).await.unwrap();
        assert_eq!(f.peer.last_seq(s).await.unwrap(), Seq(1510));
        f.store
            .append(s, &[end(1511, Outcome::Completed)])
            .await
            .unwrap();
        assert_eq!(f.store.last_seq(s).await.unwrap(), Seq(1511));
        assert_eq!(
            f.store.last_seq(StreamId::random()).await.unwrap(),
            Seq::ZERO
        );
    }

    /// The writer's path: `start` records the stream, its key binding and
    /// its first entries at once; `append_at` follows, events, gaps and the
    /// end alike, and refuses a batch that does not follow.
    pub async fn writer_starts_and_appends_at(backend: Backend) {
        let f = Fixture::new(backend, default_options()).await;
        let s = StreamId::random();
        let meta = sample_meta(s);
        let key = KeyRef {
            route: "/api/chat#c".into(),
            key: "chat-1".into(),
        };
        let mut w = f.peer.watch(s).await.unwrap();
        let first = f
            .store
            .start(&meta, Some(&key), &events(1..=3))
            .await
            .unwrap();
        assert_eq!(first.last, Seq(3));
        assert!(first.records >= 1);
        wakes(&mut w, "the wake-up of a start").await;
        assert_eq!(f.peer.meta(s).await.unwrap(), Some(meta.clone()));
        assert_eq!(f.peer.resolve_key(&key).await.unwrap(), Some(s));
        assert_eq!(f.peer.read(s, Seq::ZERO, 10).await.unwrap(), events(1..=3));

        let more = f
            .store
            .append_at(s, first.records, &events(4..=300))
            .await
            .unwrap();
        assert_eq!(more.last, Seq(300));
        assert!(more.records > first.records);
        let gapped = f
            .store
            .append_at(s, more.records, &[gap(301, 305)])
            .await
            .unwrap();
        assert_eq!(gapped.last, Seq(305));
        assert!(f.peer.meta(s).await.unwrap().unwrap().lost_history);
        assert_conflicts(
            f.store.append_at(s, gapped.records, &events(5..=5)).await,
            "an append that does not follow",
        );
        let ended = f
            .store
            .append_at(
                s,
                gapped.records,
                &[ev(306, "last"), end(307, Outcome::Completed)],
            )
            .await
            .unwrap();
        assert_eq!(ended.last, Seq(307));
        let all = f.peer.read(s, Seq::ZERO, 1000).await.unwrap();
        assert_eq!(all.len(), 300 + 1 + 2);
        assert_eq!(all.last(), Some(&end(307, Outcome::Completed)));
        assert_eq!(
            f.peer.read(s, Seq(306), 10).await.unwrap(),
            vec![end(307, Outcome::Completed)]
        );
        assert!(f.peer.read(s, Seq(307), 10).await.unwrap().is_empty());
        assert_eq!(f.peer.last_seq(s).await.unwrap(), Seq(307));
        assert_eq!(
            f.peer.meta(s).await.unwrap().unwrap().end,
            Some((Seq(307), Outcome::Completed))
        );
        assert_conflicts(
            f.store
                .append_at(s, ended.records, &events(308..=310))
                .await,
            "an append after the end",
        );

        // Started before any event: the record first, the entries later.
        let empty = StreamId::random();
        let w0 = f.store.start(&sample_meta(empty), None, &[]).await.unwrap();
        assert_eq!(w0.last, Seq::ZERO);
        assert!(f.peer.meta(empty).await.unwrap().is_some());
        let w1 = f
            .store
            .append_at(empty, w0.records, &events(1..=2))
            .await
            .unwrap();
        assert_eq!(w1.last, Seq(2));
        assert_eq!(
            f.peer.read(empty, Seq::ZERO, 10).await.unwrap(),
            events(1..=2)
        );

        // A whole stream in its first batch.
        let short = StreamId::random();
        let failed = Outcome::Failed {
            reason: FailReason::UpstreamReset,
            message: "reset".into(),
        };
        f.store
            .start(
                &sample_meta(short),
                None,
                &[ev(1, "only"), end(2, failed.clone())],
            )
            .await
            .unwrap();
        assert_eq!(
            f.peer.meta(short).await.unwrap().unwrap().end,
            Some((Seq(2), failed.clone()))
        );
        assert_eq!(
            f.peer.read(short, Seq::ZERO, 10).await.unwrap(),
            vec![ev(1, "only"), end(2, failed)]
        );
        assert_eq!(f.peer.last_seq(short).await.unwrap(), Seq(2));
    }

    /// A store that lost a stream (a restart without persistence, a
    /// failover to a replica lacking the last writes) tells its writer,
    /// which can start it again and rewrite it.
    pub async fn a_writer_learns_the_store_lost_its_stream(backend: Backend) {
        let f = Fixture::new(backend, default_options()).await;
        let s = StreamId::random();
        let meta = sample_meta(s);
        let w = f.store.start(&meta, None, &events(1..=5)).await.unwrap();
        let w = f
            .store
            .append_at(s, w.records, &events(6..=8))
            .await
            .unwrap();
        f.lose(s).await;
        assert_lost(
            f.store.append_at(s, w.records, &events(9..=9)).await,
            "an append to a stream the store lost",
        );
        assert_lost(
            f.store
                .append_at(s, w.records, &[ev(9, "x"), end(10, Outcome::Completed)])
                .await,
            "an ending append to a stream the store lost",
        );
        // Started again and rewritten: every entry once.
        let again = f.store.start(&meta, None, &events(1..=9)).await.unwrap();
        assert_eq!(again.last, Seq(9));
        assert_eq!(f.peer.read(s, Seq::ZERO, 100).await.unwrap(), events(1..=9));
        if backend != Backend::Memory {
            // Only the last record lost (a replica lacking the last write):
            // the next append finds fewer records than were appended.
            let port_entries = format!("{}{{{s}}}:e", f.opts.key_prefix);
            for port in f.ports() {
                raw_command(port, &["XDEL", &port_entries, "9-0"])
                    .await
                    .unwrap();
            }
            assert_lost(
                f.store.append_at(s, again.records, &events(10..=10)).await,
                "an append after the store lost the last record",
            );
        }
    }

    /// After another instance ended an abandoned stream, its old writer's
    /// appends are refused, whatever their seqs: the terminal entry fences
    /// them off.
    pub async fn abandoned_end_fences_the_writer_path(backend: Backend) {
        let f = Fixture::new(backend, default_options()).await;
        let lost = Outcome::Failed {
            reason: FailReason::ProducerLost,
            message: "the producing instance stopped renewing its lease".into(),
        };
        let t = now_ms();
        let s = StreamId::random();
        let meta = StreamMeta {
            lease_owner: Some("a".into()),
            lease_until_ms: Some(t + 1_000),
            ..sample_meta(s)
        };
        let w = f.store.start(&meta, None, &events(1..=2)).await.unwrap();
        assert_eq!(
            f.peer.end_if_abandoned(s, t + 1_001, &lost).await.unwrap(),
            Some(Seq(3))
        );
        // A batch of the stale writer whose seqs go past the end.
        assert_conflicts(
            f.store.append_at(s, w.records, &events(3..=5)).await,
            "the stale writer's events after the abandoned end",
        );
        assert_conflicts(
            f.store.append_at(s, w.records, &events(3..=3)).await,
            "the stale writer's event after the abandoned end",
        );
        assert_conflicts(
            f.store
                .append_at(s, w.records, &[ev(3, "x"), end(4, Outcome::Completed)])
                .await,
            "the stale writer's end after the abandoned end",
        );
        let mut all = events(1..=2);
        all.push(end(3, lost.clone()));
        assert_eq!(f.peer.read(s, Seq::ZERO, 100).await.unwrap(), all);
        assert_eq!(f.peer.last_seq(s).await.unwrap(), Seq(3));
        assert_eq!(
            f.peer.meta(s).await.unwrap().unwrap().end,
            Some((Seq(3), lost))
        );
    }

    pub async fn ping_answers(backend: Backend) {
        let f = Fixture::new(backend, default_options()).await;
        let rtt = f.store.ping().await.unwrap();
        assert!(rtt < WAIT);
    }
}

macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::cases::$case(super::Backend::Memory).await
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::cases::$case(super::Backend::Redis).await
                }
            )*
        }
        mod cluster {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::cases::$case(super::Backend::Cluster).await
                }
            )*
        }
    };
}

conformance!(
    create_and_meta_round_trip,
    create_replaces_an_existing_stream,
    append_and_read_with_paging,
    reads_across_large_batches,
    payload_bytes_round_trip,
    end_entry_finishes_the_stream,
    misplaced_appends_conflict,
    unknown_stream_is_absent,
    key_binding_latest_wins,
    odd_keys_are_safe_and_distinct,
    retention_expires_finished_streams_not_live_ones,
    watcher_wakes_on_append,
    watchers_share_and_release,
    gaps_stand_for_their_range,
    reads_positioned_around_a_gap,
    appends_must_follow_a_gap,
    gap_then_end,
    lost_history_flag_in_meta,
    lease_fields_round_trip,
    signals_set_at_creation_or_later,
    lease_take_renew_conflict_and_takeover,
    renewal_reports_a_cancel_request,
    request_cancel_of_unknown_or_ended_stream,
    end_if_abandoned_fences_the_old_producer,
    abandoned_end_races_leave_one_end,
    claim_key_first_wins,
    concurrent_claims_one_wins,
    release_key_drops_only_its_own_claim,
    claim_key_respects_expiry,
    checked_appends_follow_the_producer_rules,
    concurrent_retries_of_one_claim_append_once,
    sliding_expiry_slides_with_touches,
    last_seq_is_the_last_covered_seq,
    writer_starts_and_appends_at,
    a_writer_learns_the_store_lost_its_stream,
    abandoned_end_fences_the_writer_path,
    ping_answers,
);

/// Parses a RESP2 array of bulk strings (`KEYS` replies).
fn resp_strings(reply: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut at = 0;
    let line = |at: usize| -> Option<(String, usize)> {
        let end = reply[at..].windows(2).position(|w| w == b"\r\n")? + at;
        Some((
            String::from_utf8_lossy(&reply[at..end]).into_owned(),
            end + 2,
        ))
    };
    let Some((head, next)) = line(0) else {
        return out;
    };
    at = at.max(next);
    let n: usize = head.trim_start_matches('*').parse().unwrap_or(0);
    for _ in 0..n {
        let Some((len, next)) = line(at) else { break };
        let len: usize = len.trim_start_matches('$').parse().unwrap_or(0);
        out.push(reply[next..next + len].to_vec());
        at = next + len + 2;
    }
    out
}

async fn pttl(port: u16, key: &[u8]) -> i64 {
    let key = String::from_utf8_lossy(key).into_owned();
    let reply = raw_command(port, &["PTTL", &key]).await.unwrap();
    String::from_utf8_lossy(&reply)
        .trim()
        .trim_start_matches(':')
        .parse()
        .unwrap()
}

/// Every key the Redis backend writes has an expiry and lives in the
/// documented layout.
async fn every_key_has_a_ttl(backend: Backend) {
    let f = Fixture::new(backend, default_options()).await;
    let key = KeyRef {
        route: "/api/chat".into(),
        key: "k\r\n".into(),
    };
    let live = new_stream(&*f.store).await;
    f.store.bind_key(&key, live).await.unwrap();
    f.store.append(live, &events(1..=3)).await.unwrap();
    f.store.append(live, &[gap(4, 5)]).await.unwrap();
    let done = new_stream(&*f.store).await;
    f.store.append(done, &events(1..=1)).await.unwrap();
    f.store
        .append(done, &[end(2, Outcome::Cancelled)])
        .await
        .unwrap();
    // A dialect set on a live stream, and on one that does not exist (which
    // must not leave a record without expiry behind).
    f.store.set_signals(live, Dialect::OpenAi).await.unwrap();
    f.store
        .set_signals(StreamId::random(), Dialect::OpenAi)
        .await
        .unwrap();
    // A claimed key, and a stream ended as abandoned before any entry.
    let claimed = KeyRef {
        route: "/api/chat".into(),
        key: "c".into(),
    };
    assert_eq!(f.store.claim_key(&claimed, done).await.unwrap(), None);
    let abandoned = new_stream(&*f.store).await;
    f.store.renew_lease(abandoned, "a", 0, 1).await.unwrap();
    assert_eq!(
        f.store
            .end_if_abandoned(abandoned, 2, &Outcome::Cancelled)
            .await
            .unwrap(),
        Some(Seq(1))
    );
    // Durable Streams writer state, and writer checks or touches of unknown
    // streams (which must create no keys).
    let checked = f
        .store
        .append_checked(live, &events(6..=6), &producer("p", 0, 0))
        .await
        .unwrap();
    assert_eq!(checked, Checked::Appended);
    assert!(f
        .store
        .sliding_expiry(live, now_ms(), 60_000, true)
        .await
        .unwrap());
    let ghost = StreamId::random();
    let refused = f
        .store
        .append_checked(ghost, &events(1..=1), &producer("p", 0, 0))
        .await;
    assert!(refused.is_err());
    assert!(!f
        .store
        .sliding_expiry(ghost, now_ms(), 60_000, true)
        .await
        .unwrap());
    // Watching, cancel requests and leases of unknown streams create no keys.
    let _w = f.store.watch(live).await.unwrap();
    assert!(!f.store.request_cancel(StreamId::random()).await.unwrap());
    assert!(f
        .store
        .renew_lease(StreamId::random(), "a", 0, 1)
        .await
        .is_err());

    let prefix = &f.opts.key_prefix;
    let mut names = Vec::new();
    for port in f.ports() {
        let reply = raw_command(port, &["KEYS", &format!("{prefix}*")])
            .await
            .unwrap();
        for name in resp_strings(&reply) {
            let ttl = pttl(port, &name).await;
            let shown = String::from_utf8_lossy(&name).into_owned();
            assert!(ttl > 0, "{shown} has no expiry (PTTL {ttl})");
            names.push(shown);
        }
    }
    names.sort();
    let mut expected = vec![
        format!("{prefix}{{{live}}}:m"),
        format!("{prefix}{{{live}}}:e"),
        format!("{prefix}{{{live}}}:w"),
        format!("{prefix}{{{done}}}:m"),
        format!("{prefix}{{{done}}}:e"),
        format!("{prefix}{{{abandoned}}}:m"),
        format!("{prefix}{{{abandoned}}}:e"),
        format!("{prefix}k:L2FwaS9jaGF0:aw0K"),
        format!("{prefix}k:L2FwaS9jaGF0:Yw"),
    ];
    expected.sort();
    assert_eq!(names, expected);
}

/// Redis-only cases: layout, outages, restarts, connection bounds.
mod redis_only {
    use super::*;

    type Call = std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), StoreError>> + Send>>;

    /// One call of each `Store` method on `store`, about stream `s` and `key`.
    fn every_call(store: &Arc<dyn Store>, s: StreamId, key: &KeyRef) -> Vec<(&'static str, Call)> {
        vec![
            (
                "create",
                Box::pin({
                    let st = store.clone();
                    async move { st.create(&sample_meta(StreamId::random())).await }
                }),
            ),
            (
                "append",
                Box::pin({
                    let st = store.clone();
                    async move { st.append(s, &events(2..=2)).await }
                }),
            ),
            (
                "meta",
                Box::pin({
                    let st = store.clone();
                    async move { st.meta(s).await.map(drop) }
                }),
            ),
            (
                "read",
                Box::pin({
                    let st = store.clone();
                    async move { st.read(s, Seq::ZERO, 10).await.map(drop) }
                }),
            ),
            (
                "bind_key",
                Box::pin({
                    let st = store.clone();
                    let k = key.clone();
                    async move { st.bind_key(&k, s).await }
                }),
            ),
            (
                "resolve_key",
                Box::pin({
                    let st = store.clone();
                    let k = key.clone();
                    async move { st.resolve_key(&k).await.map(drop) }
                }),
            ),
            (
                "claim_key",
                Box::pin({
                    let st = store.clone();
                    let k = key.clone();
                    async move { st.claim_key(&k, s).await.map(drop) }
                }),
            ),
            (
                "renew_lease",
                Box::pin({
                    let st = store.clone();
                    async move { st.renew_lease(s, "a", 0, 1).await.map(drop) }
                }),
            ),
            (
                "request_cancel",
                Box::pin({
                    let st = store.clone();
                    async move { st.request_cancel(s).await.map(drop) }
                }),
            ),
            (
                "end_if_abandoned",
                Box::pin({
                    let st = store.clone();
                    async move {
                        st.end_if_abandoned(s, 0, &Outcome::Cancelled)
                            .await
                            .map(drop)
                    }
                }),
            ),
            (
                "append_checked",
                Box::pin({
                    let st = store.clone();
                    async move {
                        st.append_checked(s, &events(2..=2), &producer("p", 0, 0))
                            .await
                            .map(drop)
                    }
                }),
            ),
            (
                "sliding_expiry",
                Box::pin({
                    let st = store.clone();
                    async move { st.sliding_expiry(s, 0, 1000, true).await.map(drop) }
                }),
            ),
            (
                "last_seq",
                Box::pin({
                    let st = store.clone();
                    async move { st.last_seq(s).await.map(drop) }
                }),
            ),
            (
                "ping",
                Box::pin({
                    let st = store.clone();
                    async move { st.ping().await.map(drop) }
                }),
            ),
            (
                "watch",
                Box::pin({
                    let st = store.clone();
                    async move { st.watch(StreamId::random()).await.map(drop) }
                }),
            ),
        ]
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_key_has_a_ttl_standalone() {
        every_key_has_a_ttl(Backend::Redis).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_key_has_a_ttl_cluster() {
        every_key_has_a_ttl(Backend::Cluster).await
    }

    fn standalone(f: &mut Fixture) -> &mut RedisServer {
        match &mut f.servers {
            Servers::Redis(s) => s,
            _ => panic!("not a standalone fixture"),
        }
    }

    /// The case older relays fail: after Redis restarts, live tails must
    /// keep receiving.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn watcher_survives_a_redis_restart() {
        let mut f = Fixture::new(Backend::Redis, default_options()).await;
        let s = StreamId::random();
        let meta = sample_meta(s);
        f.peer.create(&meta).await.unwrap();
        let mut w = f.store.watch(s).await.unwrap();
        f.peer.append(s, &events(1..=1)).await.unwrap();
        wakes(&mut w, "a wake-up before the restart").await;

        standalone(&mut f).restart().await.unwrap();
        // The subscriber reconnects, subscribes again and wakes every tail,
        // since notifications sent meanwhile are lost.
        wakes(&mut w, "the wake-up that follows a reconnection").await;

        // The data went with the old server: the producer starts over.
        let peer = f.peer.clone();
        let m = meta.clone();
        eventually(WAIT, "the producer's store to reconnect", || {
            let peer = peer.clone();
            let m = m.clone();
            async move { peer.create(&m).await.is_ok() }
        })
        .await;
        for seq in 1..=3 {
            f.peer.append(s, &events(seq..=seq)).await.unwrap();
            wakes(&mut w, "a wake-up for an append after the restart").await;
        }
        assert_eq!(
            seqs(&f.store.read(s, Seq::ZERO, 10).await.unwrap()),
            vec![1, 2, 3]
        );

        // And the subscription really is back on the server.
        let port = standalone(&mut f).port();
        let channel = format!("{}{{{s}}}:n", f.opts.key_prefix);
        let reply = raw_command(port, &["PUBSUB", "SHARDNUMSUB", &channel])
            .await
            .unwrap();
        assert!(
            reply.ends_with(b":1\r\n"),
            "expected one subscriber on {channel}: {:?}",
            String::from_utf8_lossy(&reply)
        );
    }

    /// While Redis is down every call fails with `Unavailable` within about
    /// the command timeout; after it returns, calls succeed again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn outage_is_unavailable_then_recovers() {
        let mut f = Fixture::new(Backend::Redis, default_options()).await;
        let s = new_stream(&*f.store).await;
        f.store.append(s, &events(1..=1)).await.unwrap();
        let key = KeyRef {
            route: "/r".into(),
            key: "k".into(),
        };
        // Start the subscriber before the outage.
        let _w = f.store.watch(s).await.unwrap();

        standalone(&mut f).kill();
        let bound = COMMAND_TIMEOUT * 3 + Duration::from_secs(1);
        let store = f.store.clone();
        let calls = every_call(&store, s, &key);
        // All at once, as a busy relay would issue them.
        let timed = calls.into_iter().map(|(name, call)| async move {
            let started = Instant::now();
            let r = with_timeout_of(WAIT, name, call).await;
            (name, r, started.elapsed())
        });
        for (name, r, took) in futures::future::join_all(timed).await {
            match r {
                Err(e @ StoreError::Unavailable(_)) => assert!(e.is_retryable()),
                other => panic!("{name} during the outage: expected Unavailable, got {other:?}"),
            }
            assert!(
                took <= bound,
                "{name} took {took:?} to fail (bound {bound:?})"
            );
        }

        standalone(&mut f).start_again().await.unwrap();
        let (st, peer) = (store.clone(), f.peer.clone());
        eventually(WAIT, "both instances to answer again", || {
            let (st, peer) = (st.clone(), peer.clone());
            async move { st.ping().await.is_ok() && peer.ping().await.is_ok() }
        })
        .await;
        // Data is gone with the old process; everything works on new data,
        // including the function library, which is loaded again on demand.
        let s2 = new_stream(&*f.store).await;
        f.store.append(s2, &events(1..=2)).await.unwrap();
        f.store.bind_key(&key, s2).await.unwrap();
        assert_eq!(f.store.resolve_key(&key).await.unwrap(), Some(s2));
        assert_eq!(f.store.read(s2, Seq::ZERO, 10).await.unwrap().len(), 2);
        let mut w = f.store.watch(s2).await.unwrap();
        f.peer.append(s2, &events(3..=3)).await.unwrap();
        wakes(&mut w, "a watcher created after the outage").await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connect_to_a_dead_port_fails_fast() {
        init_tracing();
        let port = free_port().unwrap();
        let started = Instant::now();
        let r = with_timeout_of(
            WAIT,
            "connect to a dead port",
            RedisStore::connect_with(
                &format!("redis://127.0.0.1:{port}"),
                default_options(),
                redis_options(),
            ),
        )
        .await;
        assert!(
            matches!(r, Err(StoreError::Unavailable(_))),
            "{:?}",
            r.err()
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "took {:?}",
            started.elapsed()
        );
    }

    /// A peer that accepts TCP connections but never answers (a wedged
    /// server, a wrong port behind a proxy) must not hang `connect`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connect_to_a_silent_server_times_out() {
        init_tracing();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let hold = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((sock, _)) = listener.accept().await {
                held.push(sock);
            }
        });
        let ropts = redis_options();
        let bound = ropts.connect_timeout * 2 + ropts.command_timeout + Duration::from_secs(1);
        let started = Instant::now();
        let r = with_timeout_of(
            WAIT * 2,
            "connect to a silent server",
            RedisStore::connect_with(
                &format!("redis://127.0.0.1:{port}"),
                default_options(),
                ropts,
            ),
        )
        .await;
        assert!(
            matches!(r, Err(StoreError::Unavailable(_))),
            "{:?}",
            r.err()
        );
        assert!(started.elapsed() <= bound, "took {:?}", started.elapsed());
        hold.abort();
    }

    /// A relay may start while Redis is down: `connect_lazy` returns at once,
    /// every call fails fast until a server appears on the port, then the
    /// same store works (function library, appends, reads, watchers).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lazy_store_starts_before_redis() {
        init_tracing();
        let port = free_port().unwrap();
        let url = format!("redis://127.0.0.1:{port}");
        let opts = default_options();
        let ropts = redis_options();
        let started = Instant::now();
        let store: Arc<dyn Store> = Arc::new(
            with_timeout_of(
                WAIT,
                "connect_lazy",
                RedisStore::connect_lazy(&url, opts.clone(), ropts.clone()),
            )
            .await
            .expect("connect_lazy accepts a valid URL with no server behind it"),
        );
        assert!(
            started.elapsed() < COMMAND_TIMEOUT,
            "connect_lazy waited {:?}",
            started.elapsed()
        );

        let key = KeyRef {
            route: "/r".into(),
            key: "k".into(),
        };
        let check_fail_fast = |when: &'static str| {
            let calls = every_call(&store, StreamId::random(), &key);
            async move {
                for (name, call) in calls {
                    let started = Instant::now();
                    match with_timeout_of(WAIT, name, call).await {
                        Err(e @ StoreError::Unavailable(_)) => assert!(e.is_retryable()),
                        other => panic!("{name} {when}: expected Unavailable, got {other:?}"),
                    }
                    let took = started.elapsed();
                    assert!(
                        took < COMMAND_TIMEOUT,
                        "{name} {when} took {took:?} to fail"
                    );
                }
            }
        };
        check_fail_fast("right after connect_lazy").await;
        // Redis stays down long enough for the retry delay to reach its cap:
        // the store must keep trying, not give up (this is the scenario's
        // duration, not a synchronisation).
        tokio::time::sleep(ropts.reconnect_max_delay * 3).await;
        check_fail_fast("while Redis is still down").await;

        let server = RedisServer::start_on_port(port)
            .await
            .expect("start redis-server on the port the store was given");
        let st = store.clone();
        eventually(WAIT, "the lazy store to connect", || {
            let st = st.clone();
            async move { st.ping().await.is_ok() }
        })
        .await;
        // Ready means the store loaded its function library itself.
        let libs = raw_command(
            server.port(),
            &[
                "FUNCTION",
                "LIST",
                "LIBRARYNAME",
                reprise_store::redis::LIBRARY_NAME,
            ],
        )
        .await
        .unwrap();
        assert!(
            String::from_utf8_lossy(&libs).contains(reprise_store::redis::LIBRARY_NAME),
            "library not loaded once connected: {:?}",
            String::from_utf8_lossy(&libs)
        );

        let s = new_stream(&*store).await;
        let mut w = store.watch(s).await.unwrap();
        store.append(s, &events(1..=2)).await.unwrap();
        wakes(&mut w, "a wake-up for the lazy store's own append").await;
        store.bind_key(&key, s).await.unwrap();
        assert_eq!(store.resolve_key(&key).await.unwrap(), Some(s));

        // Another instance sees the data and wakes the lazy store's watcher.
        let peer = connect(&url, &opts).await;
        assert_eq!(peer.read(s, Seq::ZERO, 10).await.unwrap(), events(1..=2));
        peer.append(s, &[gap(3, 4), end(5, Outcome::Completed)])
            .await
            .unwrap();
        wakes(&mut w, "a wake-up for a peer's append").await;
        assert_eq!(seqs(&store.read(s, Seq(2), 10).await.unwrap()), vec![3, 5]);
        let meta = store.meta(s).await.unwrap().unwrap();
        assert_eq!(meta.end, Some((Seq(5), Outcome::Completed)));
        assert!(meta.lost_history);
    }

    /// Dropping a lazy store that never connected stops its connection
    /// attempts: a server that appears later sees no connection from it.
    ///
    /// The evidence, without sleeps: the store's tasks (its connection
    /// loop, fred's connection tasks, its shutdown task) all run on this
    /// runtime, so once the runtime's count of alive tasks is back to what
    /// it was before the store, nothing is left that could connect; then a
    /// server on its port sees only the test's own connection.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dropped_lazy_store_stops_trying() {
        init_tracing();
        let port = free_port().unwrap();
        let alive = || {
            tokio::runtime::Handle::current()
                .metrics()
                .num_alive_tasks()
        };
        let before = alive();
        let store = RedisStore::connect_lazy(
            &format!("redis://127.0.0.1:{port}"),
            default_options(),
            redis_options(),
        )
        .await
        .unwrap();
        assert!(matches!(
            store.ping().await,
            Err(StoreError::Unavailable(_))
        ));
        assert!(alive() > before, "the store works in tasks of its own");
        drop(store);
        // Its shutdown may take up to the command timeout (a QUIT), then
        // aborts what is left.
        eventually(WAIT, "the dropped store's tasks to end", || async {
            alive() == before
        })
        .await;
        let server = RedisServer::start_on_port(port).await.unwrap();
        let info = raw_command(server.port(), &["INFO", "clients"])
            .await
            .unwrap();
        assert!(
            String::from_utf8_lossy(&info).contains("connected_clients:1\r\n"),
            "a dropped store still connects: {}",
            String::from_utf8_lossy(&info)
        );
    }

    /// The documented Redis representation of a gap: one stream entry under
    /// the gap's last seq, field `g` = its first seq, and a `gaps` count in
    /// the metadata.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn gap_is_stored_under_its_last_seq() {
        let mut f = Fixture::new(Backend::Redis, default_options()).await;
        let s = new_stream(&*f.store).await;
        f.store
            .append(s, &[ev(1, "a"), gap(2, 6), gap(7, 7)])
            .await
            .unwrap();
        let port = standalone(&mut f).port();
        let entries = format!("{}{{{s}}}:e", f.opts.key_prefix);
        let meta = format!("{}{{{s}}}:m", f.opts.key_prefix);
        let reply = raw_command(port, &["XRANGE", &entries, "2-0", "+"])
            .await
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&reply),
            "*2\r\n*2\r\n$3\r\n6-0\r\n*2\r\n$1\r\ng\r\n$1\r\n2\r\n\
             *2\r\n$3\r\n7-0\r\n*2\r\n$1\r\ng\r\n$1\r\n7\r\n"
        );
        let reply = raw_command(port, &["HGET", &meta, "gaps"]).await.unwrap();
        assert_eq!(String::from_utf8_lossy(&reply), "$1\r\n2\r\n");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bad_urls_are_rejected_without_echoing_secrets() {
        init_tracing();
        for url in ["", "http://127.0.0.1:1", "redis://user:s3cr3t@[::1"] {
            let eager = RedisStore::connect_with(url, default_options(), redis_options()).await;
            let lazy = RedisStore::connect_lazy(url, default_options(), redis_options()).await;
            for r in [eager, lazy] {
                match r {
                    Err(StoreError::Unavailable(msg)) => assert!(!msg.contains("s3cr3t"), "{msg}"),
                    Err(other) => panic!("{url:?}: {other:?}"),
                    Ok(_) => panic!("{url:?} was accepted"),
                }
            }
        }
    }

    /// The URL forms the relay documents work: password in the URL.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn password_in_url() {
        init_tracing();
        let server = RedisServer::start().await.unwrap();
        raw_command(server.port(), &["CONFIG", "SET", "requirepass", "p@ss"])
            .await
            .unwrap();
        // No password (NOAUTH) and a wrong one (WRONGPASS) are told apart
        // from an outage by type: a configuration error, not retried.
        let none =
            RedisStore::connect_with(&server.url(), default_options(), redis_options()).await;
        assert!(
            matches!(none, Err(StoreError::AuthFailed(_))),
            "{:?}",
            none.err()
        );
        let wrong_url = format!("redis://:nope@127.0.0.1:{}", server.port());
        let wrong = RedisStore::connect_with(&wrong_url, default_options(), redis_options()).await;
        match wrong {
            Err(StoreError::AuthFailed(m)) => assert!(!m.contains("nope"), "{m}"),
            other => panic!("expected AuthFailed, got {:?}", other.err()),
        }
        let url = format!("redis://:p%40ss@127.0.0.1:{}", server.port());
        let store = RedisStore::connect_with(&url, default_options(), redis_options())
            .await
            .unwrap();
        let s = new_stream(&store).await;
        store.append(s, &events(1..=1)).await.unwrap();
        let mut w = store.watch(s).await.unwrap();
        store.append(s, &events(2..=2)).await.unwrap();
        wakes(&mut w, "a watcher on an authenticated connection").await;
    }
}

/// Memory-only cases: the byte bound, eviction, expiry on a paused clock.
mod memory_only {
    use super::*;

    fn store(max_bytes: usize, opts: StoreOptions) -> MemoryStore {
        MemoryStore::new(opts, MemoryLimits { max_bytes })
    }

    fn blob(seq: u64, len: usize) -> Entry {
        Entry {
            seq: Seq(seq),
            body: EntryBody::Event(Bytes::from(vec![b'x'; len])),
        }
    }

    #[tokio::test]
    async fn full_when_only_live_streams_hold_the_memory() {
        let st = store(20_000, default_options());
        let s = new_stream(&st).await;
        let mut seq = 0;
        let err = loop {
            seq += 1;
            match st.append(s, &[blob(seq, 4000)]).await {
                Ok(()) => assert!(seq < 10, "the bound was never hit"),
                Err(e) => break e,
            }
        };
        assert!(matches!(err, StoreError::Full(_)), "{err:?}");
        assert!(!err.is_retryable());
        assert!(st.used_bytes() <= 20_000);
        // What was stored is intact and the stream can still be ended.
        assert_eq!(
            st.read(s, Seq::ZERO, 100).await.unwrap().len() as u64,
            seq - 1
        );
        st.append(s, &[end(seq, Outcome::Completed)]).await.unwrap();
        // A batch larger than the whole store never fits.
        let t = new_stream(&st).await;
        assert!(matches!(
            st.append(t, &[blob(1, 30_000)]).await,
            Err(StoreError::Full(_))
        ));
    }

    #[tokio::test]
    async fn finished_streams_are_evicted_oldest_first() {
        let st = store(20_000, default_options());
        let a = new_stream(&st).await;
        st.append(a, &[blob(1, 5000), end(2, Outcome::Completed)])
            .await
            .unwrap();
        let b = new_stream(&st).await;
        st.append(b, &[blob(1, 5000), end(2, Outcome::Completed)])
            .await
            .unwrap();
        let key = KeyRef {
            route: "/r".into(),
            key: "a".into(),
        };
        st.bind_key(&key, a).await.unwrap();

        let live = new_stream(&st).await;
        st.append(live, &[blob(1, 5000)]).await.unwrap();
        assert!(st.meta(a).await.unwrap().is_some());
        // No room for another 5000 bytes: the oldest finished stream goes.
        st.append(live, &[blob(2, 5000)]).await.unwrap();
        assert!(
            st.meta(a).await.unwrap().is_none(),
            "oldest finished stream kept"
        );
        assert!(st.read(a, Seq::ZERO, 10).await.unwrap().is_empty());
        assert_eq!(
            st.resolve_key(&key).await.unwrap(),
            None,
            "binding to an evicted stream kept"
        );
        assert!(
            st.meta(b).await.unwrap().is_some(),
            "newer finished stream evicted first"
        );
        // Then the next one.
        st.append(live, &[blob(3, 5000)]).await.unwrap();
        assert!(st.meta(b).await.unwrap().is_none());
        // Then only the live stream is left: full.
        assert!(matches!(
            st.append(live, &[blob(4, 5000)]).await,
            Err(StoreError::Full(_))
        ));
        assert_eq!(st.read(live, Seq::ZERO, 10).await.unwrap().len(), 3);
    }

    /// Expiry on tokio's paused clock: exact deadlines, no waiting.
    #[tokio::test(start_paused = true)]
    async fn expiry_deadlines_on_a_paused_clock() {
        let retention = Duration::from_secs(30);
        let max_duration = Duration::from_secs(300);
        let st = store(1 << 20, options(retention, max_duration));
        let key = KeyRef {
            route: "/r".into(),
            key: "k".into(),
        };
        let live = new_stream(&st).await;
        st.append(live, &events(1..=1)).await.unwrap();
        let done = new_stream(&st).await;
        st.bind_key(&key, done).await.unwrap();
        st.append(done, &[ev(1, "a"), end(2, Outcome::Completed)])
            .await
            .unwrap();
        let used = st.used_bytes();
        assert!(used > 0);

        tokio::time::advance(retention - Duration::from_millis(1)).await;
        assert!(st.meta(done).await.unwrap().is_some());
        assert_eq!(st.resolve_key(&key).await.unwrap(), Some(done));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(
            st.meta(done).await.unwrap().is_none(),
            "finished stream outlived its retention"
        );
        assert!(st.read(done, Seq::ZERO, 10).await.unwrap().is_empty());
        assert_eq!(st.resolve_key(&key).await.unwrap(), None);
        assert_conflict(
            st.append(done, &events(3..=3)).await,
            "append to an expired stream",
        );

        // The live stream lasts max duration + retention from its creation.
        tokio::time::advance(max_duration - Duration::from_millis(1)).await;
        assert!(
            st.meta(live).await.unwrap().is_some(),
            "live stream expired early"
        );
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(st.meta(live).await.unwrap().is_none());

        // The sweep task reclaims the memory.
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(st.used_bytes(), 0);
    }

    /// The sweep task is the store's only task: dropping the store ends it
    /// at once (its drop guard), not at its next tick, and leaves a watcher
    /// that outlived the store harmless. Time is paused: the task could only
    /// end through the guard.
    #[tokio::test(start_paused = true)]
    async fn dropping_the_store_stops_the_sweeper() {
        let alive = || {
            tokio::runtime::Handle::current()
                .metrics()
                .num_alive_tasks()
        };
        let before = alive();
        let st = store(
            1 << 20,
            options(Duration::from_secs(60), Duration::from_secs(60)),
        );
        assert_eq!(alive(), before + 1, "the sweeper runs");
        let s = new_stream(&st).await;
        st.append(s, &events(1..=1)).await.unwrap();
        let mut w = st.watch(s).await.unwrap();
        drop(st);
        // Let the runtime run the cancelled task to its end (no clock moves:
        // on a paused clock a sleep would auto-advance it).
        for _ in 0..100 {
            if alive() == before {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(alive(), before, "the sweeper outlived its store");
        // The watcher outlives the store without panicking; it just never
        // wakes, however long one waits.
        assert!(tokio::time::timeout(Duration::from_secs(3600), w.changed())
            .await
            .is_err());
    }
}
