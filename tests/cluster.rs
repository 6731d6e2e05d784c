//! Scale-out: several `reprise` processes in front of one upstream, over a
//! three-master Redis Cluster (or one Redis), with many readers on instances
//! that do not produce the streams they read, and a stream's slot moving to
//! another master while the stream is written and read.
//!
//! Readers are many here, so they share one reqwest client and read through
//! [`SseResponse::into_stream`] under one bound per phase: the per-event
//! bound of [`SseResponse::next`] costs a watchdog thread per wait, which a
//! thousand concurrent readers should not pay.

use std::collections::BTreeSet;
use std::pin::Pin;
use std::time::{Duration, Instant};

use futures::stream::{self, Stream, StreamExt};
use reprise_core::{Cursor, EventId, Seq};
use reprise_tests::client::error_chain;
use reprise_tests::redis::{raw_command, RedisCluster, RedisServer};
use reprise_tests::relay::RelayProcess;
use reprise_tests::upstream::{event, StreamControl};
use reprise_tests::{
    with_timeout, with_timeout_of, BodyError, Collected, SseClient, SseEvent, SseResponse, Upstream,
};

/// Bound of a phase that opens or drains thousands of readers at once.
const BULK: Duration = Duration::from_secs(60);
/// Readers opened at once (each is one TCP connection until it is drained).
const OPENING: usize = 64;
/// The key prefix `reprise` uses by default.
const PREFIX: &str = "reprise:";

// ---------------------------------------------------------------------------
// Redis, spoken raw: the tests inspect the servers without the code under test.

/// One RESP2 reply.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Resp {
    Status(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Vec<Resp>),
}

impl Resp {
    /// Parses one reply at the start of `buf`; returns it and its length.
    fn parse(buf: &[u8]) -> Option<(Resp, usize)> {
        let end = buf.windows(2).position(|w| w == b"\r\n")?;
        let line = std::str::from_utf8(buf.get(1..end)?).ok()?;
        let rest = end + 2;
        match buf.first()? {
            b'+' => Some((Resp::Status(line.to_owned()), rest)),
            b'-' => Some((Resp::Error(line.to_owned()), rest)),
            b':' => Some((Resp::Int(line.parse().ok()?), rest)),
            b'$' => {
                let Ok(n) = usize::try_from(line.parse::<i64>().ok()?) else {
                    return Some((Resp::Bulk(None), rest));
                };
                let body = buf.get(rest..rest + n)?.to_vec();
                Some((Resp::Bulk(Some(body)), rest + n + 2))
            }
            b'*' => {
                let n = usize::try_from(line.parse::<i64>().ok()?).unwrap_or(0);
                let mut items = Vec::with_capacity(n);
                let mut at = rest;
                for _ in 0..n {
                    let (item, used) = Resp::parse(buf.get(at..)?)?;
                    items.push(item);
                    at += used;
                }
                Some((Resp::Array(items), at))
            }
            _ => None,
        }
    }

    fn text(&self) -> String {
        match self {
            Resp::Status(s) => s.clone(),
            Resp::Bulk(Some(b)) => String::from_utf8_lossy(b).into_owned(),
            other => panic!("expected a string reply, got {other:?}"),
        }
    }

    fn int(&self) -> i64 {
        match self {
            Resp::Int(n) => *n,
            other => panic!("expected an integer reply, got {other:?}"),
        }
    }

    fn items(&self) -> &[Resp] {
        match self {
            Resp::Array(items) => items,
            other => panic!("expected an array reply, got {other:?}"),
        }
    }
}

/// Sends one command to the server on `port` (bounded) and returns its reply;
/// panics on a transport failure or an error reply.
async fn redis(port: u16, args: &[&str]) -> Resp {
    let raw = raw_command(port, args)
        .await
        .unwrap_or_else(|e| panic!("127.0.0.1:{port} {args:?}: {e:#}"));
    match Resp::parse(&raw) {
        Some((Resp::Error(e), _)) => panic!("127.0.0.1:{port} {args:?} answered {e}"),
        Some((reply, _)) => reply,
        None => panic!(
            "127.0.0.1:{port} {args:?}: unparsable reply {:?}",
            String::from_utf8_lossy(&raw)
        ),
    }
}

/// `connected_clients` of `INFO clients`.
async fn connected_clients(port: u16) -> i64 {
    let info = redis(port, &["INFO", "clients"]).await.text();
    info.lines()
        .find_map(|l| l.strip_prefix("connected_clients:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no connected_clients in {info:?}"))
}

/// Client ports of every connection in `CLIENT LIST`.
async fn client_ports(port: u16) -> BTreeSet<u16> {
    let list = redis(port, &["CLIENT", "LIST"]).await.text();
    list.lines()
        .filter_map(|l| l.split(' ').find_map(|f| f.strip_prefix("addr=")))
        .filter_map(|addr| addr.rsplit(':').next()?.parse().ok())
        .collect()
}

/// Local ports of the established TCP connections that process `pid` holds
/// to port `port` (from `/proc`: the process's socket inodes, matched in the
/// kernel's TCP tables).
fn connections_of(pid: u32, port: u16) -> BTreeSet<u16> {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|e| panic!("reading /proc/{pid}/fd: {e}"));
    let inodes: BTreeSet<String> = fds
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter_map(|target| {
            let target = target.to_str()?;
            Some(
                target
                    .strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .to_owned(),
            )
        })
        .collect();
    let port_of = |addr: &str| u16::from_str_radix(addr.rsplit(':').next()?, 16).ok();
    let mut ports = BTreeSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // sl, local, remote, state (01 = established), ..., inode (10th).
            if f.len() > 9 && f[3] == "01" && port_of(f[2]) == Some(port) && inodes.contains(f[9]) {
                ports.extend(port_of(f[1]));
            }
        }
    }
    ports
}

/// The Redis connections of one relay process, as Redis itself lists them.
async fn relay_connections(redis_port: u16, relay: &RelayProcess) -> usize {
    let pid = relay.pid().expect("the relay process runs");
    let held = connections_of(pid, redis_port);
    let listed = client_ports(redis_port).await;
    held.intersection(&listed).count()
}

/// A cluster master.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Master {
    port: u16,
    id: String,
}

/// Slot ranges and their masters, as the node on `port` sees them.
async fn slot_owners(port: u16) -> Vec<(i64, i64, Master)> {
    let slots = redis(port, &["CLUSTER", "SLOTS"]).await;
    slots
        .items()
        .iter()
        .map(|range| {
            let r = range.items();
            let node = r[2].items();
            let master = Master {
                port: u16::try_from(node[1].int()).expect("port"),
                id: node[2].text(),
            };
            (r[0].int(), r[1].int(), master)
        })
        .collect()
}

fn owner(owners: &[(i64, i64, Master)], slot: i64) -> Master {
    owners
        .iter()
        .find(|(from, to, _)| (*from..=*to).contains(&slot))
        .map(|(_, _, m)| m.clone())
        .unwrap_or_else(|| panic!("slot {slot} has no master"))
}

async fn key_slot(port: u16, key: &str) -> i64 {
    redis(port, &["CLUSTER", "KEYSLOT", key]).await.int()
}

fn meta_key(stream: &str) -> String {
    format!("{PREFIX}{{{stream}}}:m")
}

fn entries_key(stream: &str) -> String {
    format!("{PREFIX}{{{stream}}}:e")
}

fn channel(stream: &str) -> String {
    format!("{PREFIX}{{{stream}}}:n")
}

/// Every key of this test's streams on the server on `port`.
async fn stream_keys_on(port: u16) -> BTreeSet<String> {
    let keys = redis(port, &["KEYS", &format!("{PREFIX}*")]).await;
    keys.items().iter().map(Resp::text).collect()
}

/// Subscribers of `channel` on the node on `port` (`PUBSUB SHARDNUMSUB`).
async fn shard_subscribers(port: u16, channel: &str) -> i64 {
    let reply = redis(port, &["PUBSUB", "SHARDNUMSUB", channel]).await;
    reply.items()[1].int()
}

/// Moves `slot` from `from` to `to`, step 1 of the standard resharding
/// sequence: `to` imports, `from` migrates.
async fn begin_migration(slot: i64, from: &Master, to: &Master) {
    let slot = slot.to_string();
    redis(
        to.port,
        &["CLUSTER", "SETSLOT", &slot, "IMPORTING", &from.id],
    )
    .await;
    redis(
        from.port,
        &["CLUSTER", "SETSLOT", &slot, "MIGRATING", &to.id],
    )
    .await;
}

/// Step 2: `MIGRATE` every key of the slot, until `from` holds none.
async fn migrate_keys(slot: i64, from: &Master, to: &Master) -> usize {
    let (slot, port) = (slot.to_string(), to.port.to_string());
    let mut moved = 0;
    loop {
        let keys = redis(from.port, &["CLUSTER", "GETKEYSINSLOT", &slot, "100"]).await;
        let keys: Vec<String> = keys.items().iter().map(Resp::text).collect();
        if keys.is_empty() {
            return moved;
        }
        let mut args = vec!["MIGRATE", "127.0.0.1", &port, "", "0", "1500", "KEYS"];
        args.extend(keys.iter().map(String::as_str));
        redis(from.port, &args).await;
        moved += keys.len();
    }
}

/// Step 3: every master learns that `to` owns the slot (the new owner first).
async fn end_migration(slot: i64, to: &Master, masters: &[Master]) {
    let slot = slot.to_string();
    redis(to.port, &["CLUSTER", "SETSLOT", &slot, "NODE", &to.id]).await;
    for m in masters.iter().filter(|m| *m != to) {
        redis(m.port, &["CLUSTER", "SETSLOT", &slot, "NODE", &to.id]).await;
    }
}

async fn masters(cluster: &RedisCluster) -> Vec<Master> {
    let mut out = Vec::new();
    for node in cluster.nodes() {
        let id = redis(node.port(), &["CLUSTER", "MYID"]).await.text();
        out.push(Master {
            port: node.port(),
            id,
        });
    }
    out
}

// ---------------------------------------------------------------------------
// Streams and readers.

/// Raises the soft limit on open files to the hard limit (child processes
/// inherit it) and checks that `needed` descriptors fit.
fn raise_fd_limit(needed: u64) {
    let limit = rlimit::increase_nofile_limit(u64::MAX).expect("raise RLIMIT_NOFILE");
    assert!(
        limit >= needed,
        "this test needs {needed} open files per process; the hard limit is {limit}"
    );
}

/// The data of event `i` of stream number `stream`: unique across streams,
/// so a reader fed from the wrong stream is caught.
fn payload(stream: usize, i: usize) -> String {
    format!("stream-{stream}-event-{i}")
}

/// One stream recorded through a relay.
struct Produced {
    /// Its number in the test.
    index: usize,
    /// Event 1's id: the stream id and epoch of every later id.
    first: EventId,
    /// The test's end of the upstream body.
    ctl: StreamControl,
    /// The client whose request started it.
    origin: SseResponse,
}

impl Produced {
    fn id(&self) -> String {
        self.first.stream.to_string()
    }

    async fn send(&self, events: std::ops::RangeInclusive<usize>) {
        for i in events {
            self.ctl.send(event(&payload(self.index, i))).await;
        }
    }

    /// Sends `events` and waits until the origin client got them: the
    /// producer has read them from the upstream.
    async fn send_and_see(&mut self, events: std::ops::RangeInclusive<usize>) {
        self.send(events.clone()).await;
        let got = self.origin.next_events(events.clone().count()).await;
        let label = format!("origin of stream {}", self.index);
        assert_events(
            &got,
            &self.first,
            self.index,
            events.start() - 1,
            *events.end(),
            &label,
        );
    }
}

/// Starts stream number `index` through `relay` and sends its events
/// `1..=before`, which the origin client receives.
async fn produce(
    upstream: &Upstream,
    client: &SseClient,
    relay: &str,
    index: usize,
    before: usize,
) -> Produced {
    let ctl = upstream.controlled_stream();
    let mut origin = client.open_get(&format!("{relay}/gen/{index}")).await;
    assert_eq!(origin.status(), 200, "stream {index}");
    ctl.send(event(&payload(index, 1))).await;
    let got = origin.next_event().await;
    let first = match Cursor::parse(&got.id) {
        Ok(Cursor::At(id)) => id,
        other => panic!("event 1 of stream {index} has id {:?}: {other:?}", got.id),
    };
    assert_eq!(
        origin.header("reprise-stream-id"),
        Some(first.stream.to_string().as_str())
    );
    let mut p = Produced {
        index,
        first,
        ctl,
        origin,
    };
    assert_events(&[got], &p.first, index, 0, 1, "origin");
    if before > 1 {
        p.send_and_see(2..=before).await;
    }
    p
}

/// Asserts that `events` are exactly events `after+1..=to` of the stream,
/// each once, in order, with their Reprise ids.
fn assert_events(
    events: &[SseEvent],
    first: &EventId,
    index: usize,
    after: usize,
    to: usize,
    who: &str,
) {
    let got: Vec<(&str, &str, &str)> = events
        .iter()
        .map(|e| (e.id.as_str(), e.event.as_str(), e.data.as_str()))
        .collect();
    let want: Vec<(String, String)> = (after + 1..=to)
        .map(|i| {
            let id = EventId {
                seq: Seq(i as u64),
                ..*first
            };
            (id.to_string(), payload(index, i))
        })
        .collect();
    let want: Vec<(&str, &str, &str)> = want
        .iter()
        .map(|(id, data)| (id.as_str(), "message", data.as_str()))
        .collect();
    assert_eq!(got, want, "{who}: events after {after}");
}

/// How a reader names its position.
#[derive(Clone, Copy, Debug)]
enum Way {
    /// `Last-Event-ID` on a route request, as a browser's EventSource sends it.
    LastEventIdHeader,
    /// `?last_event_id=` on a route request.
    LastEventIdQuery,
    /// `/_reprise/streams/{id}?start_index=N`.
    StartIndex,
    /// `/_reprise/streams/{id}` with `Last-Event-ID`.
    StreamsEndpoint,
}

const WAYS: [Way; 4] = [
    Way::LastEventIdHeader,
    Way::LastEventIdQuery,
    Way::StartIndex,
    Way::StreamsEndpoint,
];

/// One reader to open.
#[derive(Clone, Debug)]
struct Spec {
    /// Index of the stream in the test's list.
    stream: usize,
    /// Base URL of the relay it reads from.
    relay: String,
    /// Events it already has.
    after: usize,
    way: Way,
}

impl Spec {
    fn label(&self) -> String {
        format!(
            "reader of stream {} on {} after {} via {:?}",
            self.stream, self.relay, self.after, self.way
        )
    }

    fn request(&self, client: &SseClient, first: &EventId) -> reqwest::RequestBuilder {
        let (base, sid) = (&self.relay, first.stream);
        let last = EventId {
            seq: Seq(self.after as u64),
            ..*first
        }
        .to_string();
        match (self.way, self.after) {
            (Way::StartIndex, n) => {
                client.get(&format!("{base}/_reprise/streams/{sid}?start_index={n}"))
            }
            // No event yet: no Last-Event-ID; from the beginning.
            (_, 0) => client.get(&format!("{base}/_reprise/streams/{sid}")),
            (Way::LastEventIdHeader, _) => client
                .get(&format!("{base}/gen"))
                .header("last-event-id", last),
            (Way::LastEventIdQuery, _) => client.get(&format!("{base}/gen?last_event_id={last}")),
            (Way::StreamsEndpoint, _) => client
                .get(&format!("{base}/_reprise/streams/{sid}"))
                .header("last-event-id", last),
        }
    }
}

type Events = Pin<Box<dyn Stream<Item = Result<SseEvent, BodyError>> + Send>>;

/// A reader whose first event arrived, so the relay serving it follows the
/// stream.
struct Reader {
    spec: Spec,
    got: Vec<SseEvent>,
    events: Events,
}

/// Opens a resume and waits for its first event. Unbounded: call it inside
/// a bounded phase.
async fn open_reader(client: &SseClient, spec: Spec, first: EventId) -> Reader {
    let label = spec.label();
    let response = spec
        .request(client, &first)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{label}: request failed: {}", error_chain(&e)));
    assert_eq!(response.status(), 200, "{label}");
    assert_eq!(
        response
            .headers()
            .get("reprise-stream-id")
            .and_then(|v| v.to_str().ok()),
        Some(first.stream.to_string().as_str()),
        "{label}"
    );
    let mut events = SseResponse::from_response(response).into_stream();
    let got = match events.next().await {
        Some(Ok(e)) => vec![e],
        other => panic!("{label}: expected a first event, got {other:?}"),
    };
    Reader { spec, got, events }
}

/// Opens every reader, [`OPENING`] at a time, each up to its first event.
async fn open_readers(client: &SseClient, specs: Vec<Spec>, firsts: &[EventId]) -> Vec<Reader> {
    let what = format!("{} readers to open and receive a first event", specs.len());
    let opening = stream::iter(specs)
        .map(|spec| {
            let first = firsts[spec.stream];
            open_reader(client, spec, first)
        })
        .buffer_unordered(OPENING)
        .collect::<Vec<_>>();
    with_timeout_of(BULK, what, opening).await
}

/// Reads a reader to its end in a task of its own.
fn follow(reader: Reader) -> tokio::task::JoinHandle<(Spec, Collected)> {
    tokio::spawn(async move {
        let Reader {
            spec,
            mut got,
            mut events,
        } = reader;
        let mut error = None;
        while let Some(item) = events.next().await {
            match item {
                Ok(e) => got.push(e),
                Err(e) => {
                    error = Some(e);
                    break;
                }
            }
        }
        (spec, Collected { events: got, error })
    })
}

/// Waits (bounded) for every followed reader to end; checks that each got
/// every event after its position up to `to`, once, in order.
async fn assert_readers_complete(
    handles: Vec<tokio::task::JoinHandle<(Spec, Collected)>>,
    firsts: &[EventId],
    to: usize,
) {
    let what = format!("{} readers to reach the end of their stream", handles.len());
    let done = with_timeout_of(BULK, what, futures::future::join_all(handles)).await;
    for result in done {
        let (spec, collected) = result.expect("reader task panicked");
        let label = spec.label();
        assert_eq!(collected.error, None, "{label}: body failed");
        assert_events(
            &collected.events,
            &firsts[spec.stream],
            spec.stream,
            spec.after,
            to,
            &label,
        );
    }
}

fn secs(since: Instant) -> String {
    format!("{:.2}s", since.elapsed().as_secs_f64())
}

// ---------------------------------------------------------------------------
// The tests.

/// Three processes over a three-master cluster: streams started through A,
/// a thousand readers joining mid-stream on A, B and C by every way of
/// naming a position, every reader getting every later event once, in
/// order; and the streams' keys spread over all three masters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_over_a_cluster() {
    const STREAMS: usize = 20;
    const READERS: usize = 1000;
    const BEFORE: usize = 20;
    const TOTAL: usize = 40;
    raise_fd_limit(READERS as u64 + 1024);
    let cluster = RedisCluster::start().await.expect("start a Redis cluster");
    let masters = masters(&cluster).await;
    let owners = slot_owners(masters[0].port).await;
    let upstream = Upstream::start().await;
    let url = cluster.url();
    let args = ["--upstream", &upstream.url(), "--redis", &url];
    let (a, b, c) = tokio::join!(
        RelayProcess::start(&args),
        RelayProcess::start(&args),
        RelayProcess::start(&args)
    );
    let relays = [a.url(), b.url(), c.url()];
    let client = SseClient::new();

    // Streams through A until there are STREAMS of them and every master
    // owns at least one (stream ids are random; 20 nearly always suffice).
    let started = Instant::now();
    let mut streams: Vec<Produced> = Vec::new();
    let mut owned_by = Vec::new();
    while streams.len() < STREAMS || owned_by.iter().collect::<BTreeSet<_>>().len() < 3 {
        assert!(
            streams.len() < 3 * STREAMS,
            "stream ids never reached all three masters"
        );
        let s = produce(&upstream, &client, &relays[0], streams.len(), BEFORE).await;
        let slot = key_slot(masters[0].port, &meta_key(&s.id())).await;
        owned_by.push(owner(&owners, slot).port);
        streams.push(s);
    }
    let firsts: Vec<EventId> = streams.iter().map(|s| s.first).collect();
    eprintln!("{} streams started in {}", streams.len(), secs(started));

    // Mid-stream, readers join on every instance, from every position
    // before the live end, by every way.
    let specs: Vec<Spec> = (0..READERS)
        .map(|j| {
            let (stream, round) = (j % streams.len(), j / streams.len());
            Spec {
                stream,
                relay: relays[round % 3].clone(),
                after: (round * 7 + stream) % BEFORE,
                way: WAYS[(round / 3) % WAYS.len()],
            }
        })
        .collect();
    let started = Instant::now();
    let readers = open_readers(&client, specs, &firsts).await;
    eprintln!(
        "{READERS} readers opened and caught up in {}",
        secs(started)
    );
    let handles: Vec<_> = readers.into_iter().map(follow).collect();

    // The rest of every stream, then its end.
    let started = Instant::now();
    let mut ids = Vec::new();
    for s in streams {
        s.send(BEFORE + 1..=TOTAL).await;
        let Produced {
            index,
            first,
            ctl,
            mut origin,
        } = s;
        ctl.finish();
        let label = format!("origin of stream {index}");
        let rest = origin.collect_until_end().await;
        assert_events(&rest, &first, index, BEFORE, TOTAL, &label);
        ids.push(first.stream.to_string());
    }
    assert_readers_complete(handles, &firsts, TOTAL).await;
    eprintln!("{READERS} readers received the rest in {}", secs(started));
    assert_eq!(
        upstream.request_count(),
        ids.len(),
        "resumes never reach the upstream"
    );

    // Each master holds exactly the keys of the streams whose slot it owns,
    // and every master holds some.
    for m in &masters {
        let want: BTreeSet<String> = ids
            .iter()
            .zip(&owned_by)
            .filter(|(_, port)| **port == m.port)
            .flat_map(|(id, _)| [meta_key(id), entries_key(id)])
            .collect();
        assert!(!want.is_empty(), "no stream on master {}", m.port);
        assert_eq!(
            stream_keys_on(m.port).await,
            want,
            "keys on master {}",
            m.port
        );
        let dbsize = redis(m.port, &["DBSIZE"]).await.int();
        eprintln!(
            "master {}: {} keys ({} streams)",
            m.port,
            dbsize,
            want.len() / 2
        );
    }
}

/// An instance that only reads (the streams are produced on another one)
/// holds the same few Redis connections with ten readers as with thousands:
/// one command pool and one subscriber, shared by every reader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_share_redis_connections() {
    const STREAMS: usize = 20;
    // The figure; they take about 12 s to open on a two-core
    // machine in a debug build.
    const READERS: usize = 10_000;
    const BATCH: usize = 500;
    const BEFORE: usize = 5;
    const TOTAL: usize = 15;
    raise_fd_limit(READERS as u64 + 1024);
    let redis_server = RedisServer::start().await.expect("start redis-server");
    let port = redis_server.port();
    let upstream = Upstream::start().await;
    let url = redis_server.url();
    let args = ["--upstream", &upstream.url(), "--redis", &url];
    let producer = RelayProcess::start(&args).await;
    let reader_side = RelayProcess::start(&args).await;
    let client = SseClient::new();

    let mut streams = Vec::new();
    for index in 0..STREAMS {
        streams.push(produce(&upstream, &client, &producer.url(), index, BEFORE).await);
    }
    let firsts: Vec<EventId> = streams.iter().map(|s| s.first).collect();
    let spec = |j: usize| {
        let (stream, round) = (j % STREAMS, j / STREAMS);
        Spec {
            stream,
            relay: reader_side.url(),
            after: (round + stream) % BEFORE,
            way: WAYS[round % WAYS.len()],
        }
    };

    // Counted per process (its sockets, as `CLIENT LIST` shows them), so
    // that the producer's connections and this test's probes do not blur
    // the figure; `connected_clients` is only reported.
    let idle = relay_connections(port, &reader_side).await;
    // Ten readers, on ten streams.
    let mut readers = open_readers(&client, (0..10).map(|j| spec(j * 2)).collect(), &firsts).await;
    let with_ten = relay_connections(port, &reader_side).await;
    let total_with_ten = connected_clients(port).await;
    // Then thousands, over all the streams, counted after every batch.
    let started = Instant::now();
    let mut counts = Vec::new();
    let rest: Vec<usize> = (0..READERS).filter(|j| j % 2 == 1 || *j >= 20).collect();
    for batch in rest.chunks(BATCH) {
        let specs = batch.iter().map(|&j| spec(j)).collect();
        readers.extend(open_readers(&client, specs, &firsts).await);
        counts.push((readers.len(), relay_connections(port, &reader_side).await));
    }
    let opened = secs(started);
    let total_with_all = connected_clients(port).await;
    eprintln!(
        "reader instance's Redis connections: {idle} idle, {with_ten} with 10 readers, \
         {counts:?} (readers, connections) while {} readers opened in {opened}; \
         connected_clients on the server (both instances and this probe): \
         {total_with_ten} with 10 readers, {total_with_all} with {} readers",
        readers.len(),
        readers.len()
    );
    assert_eq!(readers.len(), READERS);
    assert!(
        (1..=8).contains(&with_ten),
        "the reader instance holds {with_ten} Redis connections with 10 readers"
    );
    for (n, conns) in &counts {
        assert_eq!(
            *conns, with_ten,
            "Redis connections of the reader instance with {n} readers vs. with 10"
        );
    }

    // Every reader receives the rest of its stream.
    let handles: Vec<_> = readers.into_iter().map(follow).collect();
    let started = Instant::now();
    for s in &streams {
        s.send(BEFORE + 1..=TOTAL).await;
    }
    for s in streams {
        s.ctl.finish();
    }
    assert_readers_complete(handles, &firsts, TOTAL).await;
    eprintln!("{READERS} readers received the rest in {}", secs(started));
}

/// A stream's slot moves to another master (`SETSLOT IMPORTING/MIGRATING`,
/// `MIGRATE … KEYS`, `SETSLOT NODE` on every master) while the upstream
/// keeps sending and readers on another instance follow it: they end with
/// every event once, in order; a resume that reads the store half-way
/// through the move is served; a fresh instance replays it all; and the
/// instances go on serving new streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topology_change_with_readers_resuming() {
    const BEFORE: usize = 10;
    const TOTAL: usize = 30;
    let cluster = RedisCluster::start().await.expect("start a Redis cluster");
    let masters = masters(&cluster).await;
    let upstream = Upstream::start().await;
    let url = cluster.url();
    let args = ["--upstream", &upstream.url(), "--redis", &url];
    let (producer, reader_side, late) = tokio::join!(
        RelayProcess::start(&args),
        RelayProcess::start(&args),
        RelayProcess::start(&args)
    );
    let client = SseClient::new();
    let mut s = produce(&upstream, &client, &producer.url(), 0, BEFORE).await;
    let firsts = [s.first];
    let sid = s.id();

    // Readers on an instance that does not produce the stream.
    let specs = (0..20)
        .map(|j| Spec {
            stream: 0,
            relay: reader_side.url(),
            after: j % BEFORE,
            way: WAYS[j % WAYS.len()],
        })
        .collect();
    let readers = open_readers(&client, specs, &firsts).await;
    let mut handles: Vec<_> = readers.into_iter().map(follow).collect();

    let slot = key_slot(masters[0].port, &meta_key(&sid)).await;
    let from = owner(&slot_owners(masters[0].port).await, slot);
    let to = masters
        .iter()
        .find(|m| **m != from)
        .expect("another master")
        .clone();
    assert_eq!(
        redis(
            from.port,
            &["CLUSTER", "COUNTKEYSINSLOT", &slot.to_string()]
        )
        .await
        .int(),
        2
    );

    s.send_and_see(BEFORE + 1..=15).await;
    begin_migration(slot, &from, &to).await;
    s.send_and_see(16..=20).await;
    let moved = migrate_keys(slot, &from, &to).await;
    assert_eq!(moved, 2, "the stream's metadata and entries moved");
    s.send_and_see(21..=25).await;
    // While `from` answers ASK for the moved keys: a resume on an instance
    // that never saw the stream, so it reads the store. Its answer is
    // checked last, after what matters more (nothing lost, no duplicate).
    let spec = Spec {
        stream: 0,
        relay: late.url(),
        after: 0,
        way: Way::StreamsEndpoint,
    };
    let during = reprise_tests::client::send(spec.request(&client, &s.first)).await;
    let during = match during.status().as_u16() {
        200 => {
            let mut events = SseResponse::from_response(during).into_stream();
            let first =
                with_timeout("the first event of a resume during the move", events.next()).await;
            let got = vec![first.expect("an event").expect("an event")];
            handles.push(follow(Reader { spec, got, events }));
            None
        }
        status => {
            let body = with_timeout("the body of a refused resume", during.text()).await;
            Some(format!("{status} {}", body.unwrap_or_default()))
        }
    };
    end_migration(slot, &to, &masters).await;
    s.send_and_see(26..=TOTAL).await;
    s.ctl.finish();
    assert_eq!(s.origin.collect_until_end().await.len(), 0);

    assert_readers_complete(handles, &firsts, TOTAL).await;
    let slot_arg = slot.to_string();
    assert_eq!(
        redis(to.port, &["CLUSTER", "COUNTKEYSINSLOT", &slot_arg])
            .await
            .int(),
        2
    );
    assert_eq!(
        redis(from.port, &["CLUSTER", "COUNTKEYSINSLOT", &slot_arg])
            .await
            .int(),
        0
    );

    // A fresh instance replays it all from the new owner.
    let fresh = RelayProcess::start(&args).await;
    let mut all = client
        .open_get(&format!("{}/_reprise/streams/{sid}", fresh.url()))
        .await;
    assert_eq!(all.status(), 200);
    assert_events(
        &all.collect_until_end().await,
        &s.first,
        0,
        0,
        TOTAL,
        "fresh replay",
    );
    let last = EventId {
        seq: Seq(15),
        ..s.first
    };
    let mut rest = reprise_tests::open_sse(
        client
            .get(&format!("{}/gen", fresh.url()))
            .header("last-event-id", last.to_string()),
    )
    .await;
    assert_events(
        &rest.collect_until_end().await,
        &s.first,
        0,
        15,
        TOTAL,
        "fresh resume",
    );
    assert_eq!(upstream.request_count(), 1);

    // The instances still work after the move: a new stream through the
    // producer, followed from the store by the other two.
    let mut next = produce(&upstream, &client, &producer.url(), 1, 1).await;
    let firsts = [s.first, next.first];
    let specs = [reader_side.url(), late.url()]
        .into_iter()
        .map(|relay| Spec {
            stream: 1,
            relay,
            after: 0,
            way: Way::StartIndex,
        })
        .collect();
    let handles = open_readers(&client, specs, &firsts)
        .await
        .into_iter()
        .map(follow)
        .collect();
    next.send_and_see(2..=5).await;
    next.ctl.finish();
    assert_readers_complete(handles, &firsts, 5).await;

    assert_eq!(
        during, None,
        "a resume on an instance that had to read the stream from the store while its slot \
         was migrating (the old master answering ASK) was refused"
    );
}

/// After a stream's slot moved, an instance following the stream for its
/// readers still hears of new events: its shard subscription follows the
/// slot to the new master. Polling is made too slow to matter here, so only
/// the notification can deliver an event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_tail_follows_a_moved_slot() {
    let cluster = RedisCluster::start().await.expect("start a Redis cluster");
    let masters = masters(&cluster).await;
    let upstream = Upstream::start().await;
    let url = cluster.url();
    let dir = tempfile::tempdir().expect("temp dir");
    let cfg = dir.path().join("reprise.toml");
    std::fs::write(&cfg, "[streams]\ntail_poll_interval = \"1h\"\n").expect("write config");
    let cfg = cfg.to_string_lossy().into_owned();
    let args = ["--upstream", &upstream.url(), "--redis", &url];
    let producer = RelayProcess::start(&args).await;
    let reader_side = RelayProcess::start(&[
        "--config",
        &cfg,
        "--upstream",
        &upstream.url(),
        "--redis",
        &url,
    ])
    .await;
    let client = SseClient::new();
    let mut s = produce(&upstream, &client, &producer.url(), 0, 1).await;
    let sid = s.id();
    let mut remote = client
        .open_get(&format!("{}/_reprise/streams/{sid}", reader_side.url()))
        .await;
    assert_events(
        &[remote.next_event().await],
        &s.first,
        0,
        0,
        1,
        "remote reader",
    );
    // Live before the move: only the notification can have delivered it.
    s.send_and_see(2..=2).await;
    assert_events(
        &[remote.next_event().await],
        &s.first,
        0,
        1,
        2,
        "remote reader",
    );

    let slot = key_slot(masters[0].port, &meta_key(&sid)).await;
    let from = owner(&slot_owners(masters[0].port).await, slot);
    let to = masters
        .iter()
        .find(|m| **m != from)
        .expect("another master")
        .clone();
    assert_eq!(shard_subscribers(from.port, &channel(&sid)).await, 1);
    begin_migration(slot, &from, &to).await;
    migrate_keys(slot, &from, &to).await;
    end_migration(slot, &to, &masters).await;

    s.send_and_see(3..=3).await;
    let what = format!(
        "the remote reader to hear of event 3 after slot {slot} moved from {} to {} \
         (subscribers of the stream's channel right after the move: {} on the old \
         master, {} on the new one)",
        from.port,
        to.port,
        shard_subscribers(from.port, &channel(&sid)).await,
        shard_subscribers(to.port, &channel(&sid)).await,
    );
    // The client's own bound is longer, so that this one reports.
    remote.set_timeout(Duration::from_secs(60));
    let got = with_timeout(what, remote.next()).await;
    let got = got.expect("an event").expect("an event");
    assert_events(&[got], &s.first, 0, 2, 3, "remote reader");
    s.send_and_see(4..=5).await;
    s.ctl.finish();
    assert_events(
        &remote.collect_until_end().await,
        &s.first,
        0,
        3,
        5,
        "remote reader",
    );
}

/// A three-master cluster, a mock upstream and two Reprise processes over
/// them: one records, the other reads.
struct TwoInstances {
    _cluster: RedisCluster,
    masters: Vec<Master>,
    upstream: Upstream,
    producer: RelayProcess,
    reader_side: RelayProcess,
    client: SseClient,
}

impl TwoInstances {
    async fn start() -> TwoInstances {
        let cluster = RedisCluster::start().await.expect("start a Redis cluster");
        let masters = masters(&cluster).await;
        let upstream = Upstream::start().await;
        let url = cluster.url();
        let args = ["--upstream", &upstream.url(), "--redis", &url];
        let (producer, reader_side) =
            tokio::join!(RelayProcess::start(&args), RelayProcess::start(&args));
        TwoInstances {
            _cluster: cluster,
            masters,
            upstream,
            producer,
            reader_side,
            client: SseClient::new(),
        }
    }
}

/// Starts moving stream `sid`'s slot to another master and moves its keys
/// there, leaving the slot half-migrated (the old master answers `ASK`).
/// Returns the slot, the keys moved and the importing master.
async fn move_keys_of(masters: &[Master], sid: &str) -> (i64, usize, Master) {
    let slot = key_slot(masters[0].port, &meta_key(sid)).await;
    let from = owner(&slot_owners(masters[0].port).await, slot);
    let to = masters
        .iter()
        .find(|m| **m != from)
        .expect("another master")
        .clone();
    begin_migration(slot, &from, &to).await;
    let moved = migrate_keys(slot, &from, &to).await;
    (slot, moved, to)
}

/// Store calls that meet the half-way state of a migration (the stream's
/// keys already on the new master, the old one answering `ASK`) do no
/// lasting harm: once the slot has moved, the instance that made them is
/// ready again and serves the stream from the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_recovers_from_redirections_during_a_migration() {
    const DURING: usize = 8;
    let t = TwoInstances::start().await;
    let (masters, client, reader_side) = (&t.masters, &t.client, &t.reader_side);
    let mut s = produce(&t.upstream, client, &t.producer.url(), 0, 3).await;
    let sid = s.id();
    let resume_url = format!("{}/_reprise/streams/{sid}", reader_side.url());

    let (slot, _, to) = move_keys_of(masters, &sid).await;
    // Resumes that read the stream's metadata from the store now; how they
    // are answered is `topology_change_with_readers_resuming`'s concern.
    let during = (0..DURING).map(|_| async {
        let response = client.http().get(&resume_url).send().await;
        response
            .map(|r| r.status().as_u16())
            .map_err(|e| error_chain(&e))
    });
    let during = with_timeout_of(
        BULK,
        "resumes during the migration",
        futures::future::join_all(during),
    )
    .await;
    end_migration(slot, &to, masters).await;
    s.send_and_see(4..=5).await;
    s.ctl.finish();
    assert_eq!(s.origin.collect_until_end().await.len(), 0);

    // Ready again, within a bound, and serving the stream from the store.
    let readyz = format!("{}/_reprise/readyz", reader_side.url());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, _, body) = reprise_tests::read_raw(client.get(&readyz)).await;
        if status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the instance that resumed {DURING} times during the migration (answers: \
             {during:?}) is still not ready 30 s after the slot moved: {status} {}",
            body.text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut all = client.open_get(&resume_url).await;
    assert_eq!(all.status(), 200);
    assert_events(
        &all.collect_until_end().await,
        &s.first,
        0,
        0,
        5,
        "resume after the move",
    );
}

/// Redis Cluster's `ASK`, followed as specified: while a stream's slot
/// stays half-migrated (its keys already on the importing master, the old
/// one answering `ASK` for them), a fresh instance resumes the stream and
/// follows it live, and the producing instance keeps appending — every
/// command reaches the importing master with `ASKING` before it. (A client
/// that sent the command back to the old master after `ASKING` would be
/// redirected until it gave up: the resume would fail once
/// `store.command_timeout` has passed, and the appends with it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_migrated_slot_is_served_through_ask() {
    let t = TwoInstances::start().await;
    let (masters, client, reader_side) = (&t.masters, &t.client, &t.reader_side);
    let mut s = produce(&t.upstream, client, &t.producer.url(), 0, 3).await;
    let sid = s.id();
    // Let the writer store events 1-3 before the keys move.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let (slot, moved, to) = move_keys_of(masters, &sid).await;
    assert!(moved > 0, "the stream's keys moved");
    // The slot stays half-migrated until the end of the test.
    let mut resumed = client
        .open_get(&format!("{}/_reprise/streams/{sid}", reader_side.url()))
        .await;
    assert_eq!(
        resumed.status(),
        200,
        "a resume while the old master answers ASK"
    );
    assert_events(&resumed.next_events(3).await, &s.first, 0, 0, 3, "resume");
    s.send_and_see(4..=6).await;
    s.ctl.finish();
    assert_eq!(s.origin.collect_until_end().await.len(), 0);
    assert_events(
        &resumed.collect_until_end().await,
        &s.first,
        0,
        3,
        6,
        "resume, live",
    );
    // What the producer appended during the migration is on the importing
    // master: a second fresh resume reads all of it.
    let mut all = client
        .open_get(&format!("{}/_reprise/streams/{sid}", reader_side.url()))
        .await;
    assert_events(
        &all.collect_until_end().await,
        &s.first,
        0,
        0,
        6,
        "full resume",
    );
    let on_to = stream_keys_on(to.port).await;
    assert!(on_to.contains(&entries_key(&sid)), "{on_to:?}");
    end_migration(slot, &to, masters).await;
}
