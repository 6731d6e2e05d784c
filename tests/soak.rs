//! Soak: chat-paced load over three Reprise processes on a Redis Cluster,
//! while instances are killed with SIGKILL and started again, and (with
//! replicas) masters fail over.
//!
//! Every chat stream must end one of two ways for its client: complete (every
//! event once, in order), or with an explicit signal (`reprise-error`, or a
//! resume answered "no such stream" when the instance that produced it was
//! killed before anything of it was stored, within its first
//! `streams.store_linger`, which the README documents). A
//! client cut off by a killed instance resumes on another one from its
//! `Last-Event-ID`. Nothing may be lost, repeated or stall silently.
//!
//! The cluster has three masters, each with a replica. Masters fail over in
//! turn, alternately gracefully (`CLUSTER FAILOVER`) and by `kill -9` of the
//! master (its replica promoted by Redis).
//!
//! `REPRISE_SOAK_SECS` sets the length (default 60 s, the suite's version);
//! with 300 s or more an instance is killed every minute and a master fails
//! over every three minutes, else every 20 s and every 25 s.
//! The figures (streams, signals, RSS and open files of the instance that is
//! never killed) are printed at the end: run
//! `REPRISE_SOAK_SECS=600 cargo test -p reprise-tests --test soak -- --nocapture`
//! for the README's 10-minute figures.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use reprise_tests::redis::{ClusterSettings, RedisCluster};
use reprise_tests::relay::RelayProcess;
use reprise_tests::{Reply, SseClient, SseEvent, SseResponse, Upstream};
use serde_json::json;

/// Events per chat answer, and their pace.
const EVENTS: usize = 100;
const PACE: Duration = Duration::from_millis(20);
/// Chat sessions running at once.
const SESSIONS: usize = 24;
/// A wait for the next event longer than this is a silent stall: far more
/// than the lease (2 s) plus a failover.
const STALL: Duration = Duration::from_secs(30);

/// By when a stream's record is in the store, after its response started:
/// `streams.store_linger` (50 ms) and a loaded round trip, with room to spare.
/// A stream cut off later must be found by a resume elsewhere.
const FIRST_WRITE: Duration = Duration::from_secs(1);

struct Settings {
    length: Duration,
    kill_every: Duration,
    failover_every: Duration,
}

impl Settings {
    fn from_env() -> Settings {
        let secs: u64 = std::env::var("REPRISE_SOAK_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(60);
        let (kill_every, failover_every) = if secs >= 300 { (60, 180) } else { (20, 25) };
        Settings {
            length: Duration::from_secs(secs),
            kill_every: Duration::from_secs(kill_every),
            failover_every: Duration::from_secs(failover_every),
        }
    }
}

fn config_file(redis: &RedisCluster, upstream: &Upstream) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("reprise.toml");
    std::fs::write(
        &path,
        format!(
            r#"[store]
redis_url = "{redis}"
[streams]
lease = "2s"
tail_poll_interval = "200ms"
hot_linger = "5s"
[[routes]]
path = "/api/chat"
upstream = "{up}"
key = {{ json = "/id" }}
resume = "/api/chat/{{key}}/stream"
"#,
            redis = redis.url(),
            up = upstream.url()
        ),
    )
    .expect("write config");
    (dir, path.to_string_lossy().into_owned())
}

/// How one chat stream ended for its client.
#[derive(Debug)]
enum Ending {
    /// Every event once, in order, then a clean end.
    Complete,
    /// A `reprise-error` signal with this code, after a gapless prefix.
    Signal(String),
    /// The instance that produced it died before any of it was stored (at
    /// once, or within `FIRST_WRITE` of the start): a resume elsewhere
    /// answered "no such stream" (404 or 204).
    LostWithProducer,
    /// Anything else: the test fails with this description.
    Violation(String),
}

#[derive(Default)]
struct Tally {
    complete: u64,
    signals: BTreeMap<String, u64>,
    lost_with_producer: u64,
    resumed: u64,
    events: u64,
    violations: Vec<String>,
}

/// The relays' URLs, and which are down (being restarted) right now.
#[derive(Clone)]
struct Instances {
    urls: Arc<Vec<String>>,
    down: Arc<Mutex<Vec<bool>>>,
}

impl Instances {
    /// An instance that is up, other than `not`, chosen by `n`.
    fn pick(&self, n: usize, not: Option<usize>) -> usize {
        let down = self.down.lock().expect("lock").clone();
        let up: Vec<usize> = (0..self.urls.len())
            .filter(|&i| !down[i] && Some(i) != not)
            .collect();
        match up.len() {
            0 => not.unwrap_or(0),
            k => up[n % k],
        }
    }
}

/// Reads events of one stream, checking that they continue `next` (the
/// number of the next event), until a clean end, a signal, a transport
/// failure or a stall.
enum Read {
    End,
    Signal(String),
    Cut,
    Bad(String),
}

async fn follow(
    resp: SseResponse,
    next: &mut usize,
    last_id: &mut String,
    events: &mut u64,
) -> Read {
    let mut stream = resp.into_stream();
    loop {
        let item = match tokio::time::timeout(STALL, stream.next()).await {
            Ok(item) => item,
            Err(_) => return Read::Bad(format!("stalled silently after event {}", *next - 1)),
        };
        let ev: SseEvent = match item {
            None => return Read::End,
            Some(Err(_)) => return Read::Cut,
            Some(Ok(ev)) => ev,
        };
        if ev.event == "reprise-error" {
            let code = serde_json::from_str::<serde_json::Value>(&ev.data)
                .ok()
                .and_then(|v| v["reprise"]["code"].as_str().map(String::from))
                .unwrap_or_else(|| format!("unparsed {:?}", ev.data));
            return Read::Signal(code);
        }
        let want = format!("event-{next}");
        if ev.data != want {
            return Read::Bad(format!("got {:?} where {want:?} was due", ev.data));
        }
        *next += 1;
        *events += 1;
        *last_id = ev.id;
    }
}

/// One chat: started on an instance, resumed elsewhere whenever its
/// connection is cut, until it ends.
async fn chat(
    client: &SseClient,
    inst: &Instances,
    session: usize,
    n: usize,
) -> (Ending, bool, u64) {
    let key = format!("soak-{session}-{n}");
    let mut events = 0;
    let mut next = 1;
    let mut last_id = String::new();
    let mut at = inst.pick(session + n, None);
    // Start: an instance being killed right now refuses; try another.
    let mut started = None;
    for attempt in 0..6 {
        let url = format!("{}/api/chat", inst.urls[at]);
        match client.post_json(&url, &json!({ "id": key })).send().await {
            Ok(r) if r.status() == 200 => {
                started = Some(r);
                break;
            }
            Ok(r) => {
                return (
                    Ending::Violation(format!("{key}: start answered {}", r.status())),
                    false,
                    0,
                )
            }
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                at = inst.pick(session + n + attempt + 1, Some(at));
            }
        }
    }
    let Some(resp) = started else {
        return (
            Ending::Violation(format!("{key}: no instance took the start")),
            false,
            0,
        );
    };
    let Some(stream_id) = resp
        .headers()
        .get("reprise-stream-id")
        .and_then(|v| v.to_str().ok())
        .map(String::from)
    else {
        return (
            Ending::Violation(format!("{key}: no reprise-stream-id")),
            false,
            0,
        );
    };
    let answered = Instant::now();
    let mut resp = SseResponse::from_response(resp);
    let mut resumed = false;
    let mut resumes = 0;
    loop {
        let read = follow(resp, &mut next, &mut last_id, &mut events).await;
        let cut_after = answered.elapsed();
        match read {
            Read::End if next == EVENTS + 1 => return (Ending::Complete, resumed, events),
            Read::End => {
                return (
                    Ending::Violation(format!(
                        "{key}: clean end after event {} of {EVENTS} (from instance {at}, {resumes} resume attempts)",
                        next - 1
                    )),
                    resumed,
                    events,
                )
            }
            Read::Signal(code) => return (Ending::Signal(code), resumed, events),
            Read::Bad(why) => return (Ending::Violation(format!("{key}: {why}")), resumed, events),
            Read::Cut => {}
        }
        // Cut off: the instance died. Resume elsewhere from the last id.
        resumed = true;
        resp = loop {
            resumes += 1;
            if resumes > 10 {
                let why = format!("{key}: could not resume after event {}", next - 1);
                return (Ending::Violation(why), resumed, events);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            at = inst.pick(session + n + resumes, Some(at));
            let url = format!("{}/_reprise/streams/{stream_id}", inst.urls[at]);
            let mut req = client.get(&url);
            if !last_id.is_empty() {
                req = req.header("last-event-id", &last_id);
            }
            match req.send().await {
                Ok(r) if r.status() == 200 => break SseResponse::from_response(r),
                // Nothing of the stream was stored when its producer died:
                // it had sent nothing, or only what arrived within its first
                // `streams.store_linger` (the record is written with the
                // first events, README "Failure modes").
                Ok(r)
                    if (r.status() == 404 || r.status() == 204)
                        && (next == 1 || cut_after <= FIRST_WRITE) =>
                {
                    return (Ending::LostWithProducer, resumed, events)
                }
                Ok(r) if r.status() == 204 && next == EVENTS + 1 => {
                    return (Ending::Complete, resumed, events)
                }
                Ok(r) => {
                    let why = format!(
                        "{key}: resume after event {} answered {}",
                        next - 1,
                        r.status()
                    );
                    return (Ending::Violation(why), resumed, events);
                }
                // That instance is down too: try another.
                Err(_) => {}
            }
        };
    }
}

/// Fails over a master that has a replica (the `n`th such, by port):
/// gracefully when `n` is even, else by `kill -9` (its replica promoted by
/// Redis; the killed node stays down, so that shard has no replica left).
/// Returns what was done, for the log.
async fn fail_over(redis: &mut RedisCluster, n: usize) -> String {
    let mut masters = Vec::new();
    for port in redis.master_ports().await.expect("masters") {
        if redis.replica_of(port).await.is_ok() {
            masters.push(port);
        }
    }
    assert!(!masters.is_empty(), "no master has a replica left");
    let master = masters[n % masters.len()];
    let took = Instant::now();
    if n % 2 == 0 {
        let promoted = redis.failover(master).await.expect("graceful failover");
        format!(
            "CLUSTER FAILOVER of 127.0.0.1:{master}: 127.0.0.1:{promoted} took over in {:.1?}",
            took.elapsed()
        )
    } else {
        let promoted = redis.kill_master(master).await.expect("kill -9 failover");
        format!(
            "kill -9 of master 127.0.0.1:{master}: its replica 127.0.0.1:{promoted} promoted in {:.1?}",
            took.elapsed()
        )
    }
}

/// RSS (KiB) and open file descriptors of a process.
fn usage(pid: u32) -> Option<(u64, usize)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count();
    Some((rss, fds))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_load_survives_killed_instances() {
    let settings = Settings::from_env();
    let mut redis = RedisCluster::start_with_replicas(ClusterSettings::quick_failover())
        .await
        .expect("start a Redis cluster with replicas");
    let upstream = Upstream::start().await;
    upstream.respond(|_| Reply::paced_events(EVENTS, PACE));
    let (_dir, cfg) = config_file(&redis, &upstream);
    let args = ["--config", cfg.as_str()];
    let (a, b, c) = tokio::join!(
        RelayProcess::start(&args),
        RelayProcess::start(&args),
        RelayProcess::start(&args)
    );
    // Instances 0 and 1 take turns being killed; 2 is never killed, and is
    // the one whose memory and open files are watched.
    let mut relays = [a, b, c];
    let inst = Instances {
        urls: Arc::new(relays.iter().map(RelayProcess::url).collect()),
        down: Arc::new(Mutex::new(vec![false; 3])),
    };
    let watched = relays[2].pid().expect("pid");
    let started = Instant::now();
    let deadline = started + settings.length;
    let tally = Arc::new(Mutex::new(Tally::default()));

    let mut sessions = Vec::new();
    for s in 0..SESSIONS {
        let inst = inst.clone();
        let tally = tally.clone();
        sessions.push(tokio::spawn(async move {
            let client = SseClient::new();
            let mut n = 0;
            // Spread the starts over one answer's length.
            tokio::time::sleep(PACE * (s * EVENTS / SESSIONS) as u32).await;
            while Instant::now() < deadline {
                let (ending, resumed, events) = chat(&client, &inst, s, n).await;
                n += 1;
                let mut t = tally.lock().expect("lock");
                t.events += events;
                t.resumed += u64::from(resumed);
                match ending {
                    Ending::Complete => t.complete += 1,
                    Ending::Signal(code) => *t.signals.entry(code).or_default() += 1,
                    Ending::LostWithProducer => t.lost_with_producer += 1,
                    Ending::Violation(v) => t.violations.push(v),
                }
            }
        }));
    }

    // Chaos and sampling.
    let mut samples: Vec<(Duration, u64, usize)> = Vec::new();
    let mut next_kill = started + settings.kill_every;
    let mut kills = 0usize;
    let mut next_failover = started + settings.failover_every;
    let mut failovers: Vec<String> = Vec::new();
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(2)).await;
        if let Some((rss, fds)) = usage(watched) {
            samples.push((started.elapsed(), rss, fds));
        }
        if Instant::now() >= next_kill && Instant::now() + Duration::from_secs(5) < deadline {
            let victim = kills % 2;
            kills += 1;
            next_kill += settings.kill_every;
            inst.down.lock().expect("lock")[victim] = true;
            relays[victim].kill().await;
            eprintln!(
                "soak: {:>4.0?} SIGKILL instance {victim}",
                started.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
            relays[victim].restart().await;
            inst.down.lock().expect("lock")[victim] = false;
        }
        if Instant::now() >= next_failover && Instant::now() + Duration::from_secs(5) < deadline {
            next_failover += settings.failover_every;
            let done = fail_over(&mut redis, failovers.len()).await;
            eprintln!("soak: {:>4.0?} {done}", started.elapsed());
            failovers.push(done);
        }
    }
    for s in sessions {
        s.await.expect("a chat session panicked");
    }
    // Load is over: let the finished streams leave memory (hot_linger).
    tokio::time::sleep(Duration::from_secs(7)).await;
    let idle = usage(watched);

    let t = tally.lock().expect("lock");
    let chats = t.complete + t.signals.values().sum::<u64>() + t.lost_with_producer;
    eprintln!(
        "soak: {:?}, {kills} SIGKILLs, {} master failovers; {chats} chats: {} complete, signals {:?}, {} lost with their producer before anything was stored; {} resumed after a cut; {} events checked; {} violations",
        settings.length,
        failovers.len(),
        t.complete,
        t.signals,
        t.lost_with_producer,
        t.resumed,
        t.events,
        t.violations.len()
    );
    for (at, rss, fds) in &samples {
        eprintln!(
            "soak: watched instance at {:>4.0?}: RSS {rss} KiB, {fds} open files",
            at
        );
    }
    eprintln!("soak: watched instance idle after the load: {idle:?} (RSS KiB, open files)");
    assert!(t.violations.is_empty(), "violations: {:#?}", t.violations);
    assert!(kills >= 1, "the soak is too short to kill an instance");
    assert!(
        !failovers.is_empty(),
        "the soak is too short to fail a master over"
    );
    assert!(t.complete > 0, "no chat completed");
    assert!(
        t.resumed > 0,
        "no chat was cut off and resumed: the kills missed the load"
    );
    // Open files: back to a handful once idle, whatever the number of chats
    // served (a leak of one per stream would be hundreds).
    let first_fds = samples.first().map(|s| s.2).unwrap_or(0);
    if let Some((_, fds)) = idle {
        assert!(
            fds <= first_fds + 16,
            "open files grew from {first_fds} (under load, first sample) to {fds} (idle)"
        );
    }
}
