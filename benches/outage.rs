//! The outage benchmark of issue 12 (items 4 and 5): what a Redis outage
//! costs a new stream and a readiness probe, once the store probe
//! (`reprise_relay::health`) has noticed it, and how long the probe takes
//! to notice.
//!
//! ```text
//! cargo bench -p reprise-benches --bench outage -- [--streams N] [--requests N] [--cycles N]
//! ```
//!
//! One run starts, on free loopback ports, a private `redis-server` (the
//! tests' `RedisServer`, which can SIGSTOP, SIGCONT, kill and restart it),
//! the tests' scriptable upstream answering every request with two SSE
//! events at once, and Reprise in-process (`TestRelay`, built with the bench
//! profile) recording into that Redis, with rate limits on. It then measures,
//! in three states of Redis — (a) up, (b) stalled by SIGSTOP, (c) killed
//! (connection refused), (b) and (c) only once readiness says 503:
//!
//! - the time to first event of new recorded streams, one after another
//!   (`GET` with a fresh `Idempotency-Key`: rate-limit check, key claim and
//!   registration all apply), from sending the request to reading the event;
//! - the latency and status of `/_reprise/readyz`, each request on a new
//!   connection as a kubelet probe opens one;
//!
//! and the transitions, polling readiness every 10 ms: SIGSTOP → 503,
//! SIGCONT → 200, kill → 503, restart → 200, over `--cycles` cycles.
//!
//! A state starts no new stream after [`STATE_BUDGET`] (a relay that waits
//! on the store would take seconds per stream), so that a regression still
//! prints its table.
//!
//! It prints one table of figures with the issue's targets beside them; it
//! asserts nothing about them. Every wait is bounded, and the whole run too
//! ([`RUN_BOUND`]); the Redis server is killed when the run ends, however it
//! ends (the server's `Drop`).
#![forbid(unsafe_code)]

use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use reprise_benches::{machine_summary, version_of};
use reprise_relay::health::{PROBE_INTERVAL, PROBE_TIMEOUT, WATCH_INTERVAL};
use reprise_tests::redis::RedisServer;
use reprise_tests::relay::{config, Backend, TestRelay};
use reprise_tests::upstream::numbered_event;
use reprise_tests::{open_sse, with_timeout_of, Reply, SseClient, Upstream};

/// The whole run, start-up included; past it the run fails (and cleans up).
const RUN_BOUND: Duration = Duration::from_secs(55);
/// How often readiness is polled while a transition is awaited.
const POLL_EVERY: Duration = Duration::from_millis(10);
/// Longest one readiness request may take before it counts as unanswered.
const READYZ_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest a transition is awaited before it is reported as not seen.
const TRANSITION_BOUND: Duration = Duration::from_secs(8);
/// Bound on each wait inside one stream (first event, end of body).
const STREAM_BOUND: Duration = Duration::from_secs(5);
/// Time after which a state starts no more streams (a relay that waits on
/// the store would take seconds per stream): the table still prints, with
/// the streams measured so far.
const STATE_BUDGET: Duration = Duration::from_secs(8);
/// Streams started and thrown away before the first measured state (the
/// first connection, cold code paths).
const WARM_UP_STREAMS: usize = 5;

/// Issue 12's targets.
const FIRST_EVENT_EXTRA: Duration = Duration::from_millis(50);
const READYZ_TARGET: Duration = Duration::from_millis(100);
const TRANSITION_TARGET: Duration = Duration::from_secs(2);

struct Args {
    streams: usize,
    requests: usize,
    cycles: usize,
}

impl Args {
    fn parse() -> Result<Args, String> {
        let mut args = Args {
            streams: 50,
            requests: 50,
            cycles: 3,
        };
        let mut it = std::env::args().skip(1);
        while let Some(arg) = it.next() {
            let slot = match arg.as_str() {
                "--streams" => &mut args.streams,
                "--requests" => &mut args.requests,
                "--cycles" => &mut args.cycles,
                // `cargo bench` passes `--bench` to every harness-less bench.
                "--bench" => continue,
                other => return Err(format!("unknown argument {other:?}")),
            };
            *slot = it
                .next()
                .and_then(|v| v.parse().ok())
                .filter(|n| *n > 0)
                .ok_or_else(|| format!("{arg} takes a positive number"))?;
        }
        Ok(args)
    }
}

/// The three states of Redis that are measured.
#[derive(Clone, Copy)]
enum State {
    Up,
    Stalled,
    Killed,
}

/// What one state measured.
struct Measured {
    first_event: Vec<Duration>,
    readyz: Vec<Duration>,
    /// Status of each readiness answer; `None`: no answer within
    /// [`READYZ_TIMEOUT`].
    statuses: Vec<Option<u16>>,
    /// `reprise_store_calls_skipped_total{op="claim_key"}` gained meanwhile.
    skipped_claims: Option<f64>,
}

/// One cycle's transition times; `None`: not seen within [`TRANSITION_BOUND`].
#[derive(Default)]
struct Transitions {
    stop_to_503: Option<Duration>,
    cont_to_200: Option<Duration>,
    kill_to_503: Option<Duration>,
    restart_to_200: Option<Duration>,
    /// Of `restart_to_200`: until the new redis-server answered `PING`.
    restart_to_ping: Option<Duration>,
}

fn main() -> ExitCode {
    let args = match Args::parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("outage: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The relay logs every failed store call while Redis is away: keep the
    // report readable unless asked otherwise (the tests' subscriber reads
    // RUST_LOG).
    if std::env::var_os("RUST_LOG").is_none() {
        std::env::set_var("RUST_LOG", "error");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("outage: tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // A panic inside (a bound passed, a helper's check) unwinds through
    // `block_on`, which drops the run and with it the redis-server.
    let result = runtime.block_on(with_timeout_of(
        RUN_BOUND,
        "the outage benchmark",
        run(&args),
    ));
    match result {
        Ok(report) => {
            print!("{report}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("outage: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: &Args) -> Result<String, String> {
    let load_before = load_average();
    let mut redis = RedisServer::start()
        .await
        .map_err(|e| format!("redis-server: {e:#}"))?;
    let upstream = Upstream::start().await;
    upstream.respond(|_| Reply::sse([numbered_event(1), numbered_event(2)]));
    let mut c = config(&upstream.url(), &Backend::Redis(redis.url()));
    // Limits on, so that a start makes every store call it can make.
    c.limits.max_streams_per_caller = 100_000;
    c.limits.max_starts_per_caller_per_minute = 1_000_000;
    let relay = TestRelay::start(c).await;
    let base = relay.url();
    let probe = Probe::new(&base)?;
    let client = SseClient::new();
    let mut keys = 0usize;

    first_event_times(&client, &base, WARM_UP_STREAMS, &mut keys, None).await?;
    let up = measure(State::Up, args, &client, &probe, &mut keys).await?;

    // Cycle 1 measures the outage states between its transitions.
    let mut cycles = Vec::with_capacity(args.cycles);
    let mut t = Transitions::default();
    let since = Instant::now();
    redis.pause();
    t.stop_to_503 = probe.until(503, since).await;
    let stalled = measure(State::Stalled, args, &client, &probe, &mut keys).await?;
    let since = Instant::now();
    redis.resume();
    t.cont_to_200 = probe.until(200, since).await;
    let since = Instant::now();
    redis.kill();
    t.kill_to_503 = probe.until(503, since).await;
    let killed = measure(State::Killed, args, &client, &probe, &mut keys).await?;
    restart(&mut redis, &probe, &mut t).await?;
    cycles.push(t);

    for _ in 1..args.cycles {
        let mut t = Transitions::default();
        let since = Instant::now();
        redis.pause();
        t.stop_to_503 = probe.until(503, since).await;
        let since = Instant::now();
        redis.resume();
        t.cont_to_200 = probe.until(200, since).await;
        let since = Instant::now();
        redis.kill();
        t.kill_to_503 = probe.until(503, since).await;
        restart(&mut redis, &probe, &mut t).await?;
        cycles.push(t);
    }
    relay.stop().await;
    drop(redis);

    Ok(report(
        args,
        &load_before,
        [&up, &stalled, &killed],
        &cycles,
    ))
}

/// Starts the killed server again (same port, empty) and times readiness.
async fn restart(
    redis: &mut RedisServer,
    probe: &Probe,
    t: &mut Transitions,
) -> Result<(), String> {
    let since = Instant::now();
    redis
        .restart()
        .await
        .map_err(|e| format!("restarting redis-server: {e:#}"))?;
    t.restart_to_ping = Some(since.elapsed());
    t.restart_to_200 = probe.until(200, since).await;
    Ok(())
}

/// New streams, then readiness requests, in one state of Redis.
async fn measure(
    state: State,
    args: &Args,
    client: &SseClient,
    probe: &Probe,
    keys: &mut usize,
) -> Result<Measured, String> {
    let skipped_before = probe.skipped_claims().await;
    let first_event =
        first_event_times(client, &probe.base, args.streams, keys, Some(STATE_BUDGET))
            .await
            .map_err(|e| format!("{}: {e}", title(state)))?;
    let skipped_after = probe.skipped_claims().await;
    let mut readyz = Vec::with_capacity(args.requests);
    let mut statuses = Vec::with_capacity(args.requests);
    for _ in 0..args.requests {
        let (status, took) = probe.readyz().await;
        readyz.push(took);
        statuses.push(status);
    }
    Ok(Measured {
        first_event,
        readyz,
        statuses,
        skipped_claims: skipped_before
            .zip(skipped_after)
            .map(|(before, after)| after - before),
    })
}

/// Starts `n` recorded streams one after another (fewer once `budget` has
/// passed); the time from sending each request to reading its first event.
/// Each body is read to its end before the next starts.
async fn first_event_times(
    client: &SseClient,
    base: &str,
    n: usize,
    keys: &mut usize,
    budget: Option<Duration>,
) -> Result<Vec<Duration>, String> {
    let url = format!("{base}/gen");
    let mut times = Vec::with_capacity(n);
    let began = Instant::now();
    for _ in 0..n {
        if budget.is_some_and(|b| began.elapsed() >= b) {
            break;
        }
        *keys += 1;
        let request = client
            .get(&url)
            .header("idempotency-key", format!("outage-bench-{keys}"));
        let started = Instant::now();
        let mut response = open_sse(request).await;
        if response.status() != 200 {
            return Err(format!("a new stream was answered {}", response.status()));
        }
        response.set_timeout(STREAM_BOUND);
        response.next_event().await;
        times.push(started.elapsed());
        response.collect_until_end().await;
    }
    Ok(times)
}

/// Readiness requests, each on a new connection, bounded by [`READYZ_TIMEOUT`].
struct Probe {
    base: String,
    http: reqwest::Client,
}

impl Probe {
    fn new(base: &str) -> Result<Probe, String> {
        let http = reqwest::Client::builder()
            .no_proxy()
            // A kubelet probe opens a connection per probe.
            .pool_max_idle_per_host(0)
            .timeout(READYZ_TIMEOUT)
            .build()
            .map_err(|e| format!("readiness client: {e}"))?;
        Ok(Probe {
            base: base.to_string(),
            http,
        })
    }

    /// One `GET /_reprise/readyz`, body read: its status (`None` if it did
    /// not answer in time) and how long it took.
    async fn readyz(&self) -> (Option<u16>, Duration) {
        let started = Instant::now();
        let answer = async {
            let r = self
                .http
                .get(format!("{}/_reprise/readyz", self.base))
                .send()
                .await?;
            let status = r.status().as_u16();
            r.bytes().await?;
            Ok::<_, reqwest::Error>(status)
        }
        .await;
        (answer.ok(), started.elapsed())
    }

    /// Polls readiness every [`POLL_EVERY`] until it answers `status`:
    /// the time from `since` to that answer, `None` past [`TRANSITION_BOUND`].
    async fn until(&self, status: u16, since: Instant) -> Option<Duration> {
        loop {
            if self.readyz().await.0 == Some(status) {
                return Some(since.elapsed());
            }
            if since.elapsed() >= TRANSITION_BOUND {
                return None;
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
    }

    /// `reprise_store_calls_skipped_total{op="claim_key"}` from the metrics.
    async fn skipped_claims(&self) -> Option<f64> {
        let text = self
            .http
            .get(format!("{}/_reprise/metrics", self.base))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        let line = "reprise_store_calls_skipped_total{op=\"claim_key\"} ";
        // Absent until the first skip: zero.
        Some(
            text.lines()
                .find_map(|l| l.strip_prefix(line)?.trim().parse().ok())
                .unwrap_or(0.0),
        )
    }
}

// ---------------------------------------------------------------- report

fn title(state: State) -> &'static str {
    match state {
        State::Up => "(a) Redis up",
        State::Stalled => "(b) Redis stalled (SIGSTOP)",
        State::Killed => "(c) Redis killed (refused)",
    }
}

/// Nearest-rank percentile `p` (0–100) of unsorted samples.
fn percentile(samples: &[Duration], p: usize) -> Duration {
    let mut s = samples.to_vec();
    s.sort();
    let rank = (p * s.len()).div_ceil(100).max(1);
    s.get(rank - 1).copied().unwrap_or_default()
}

fn max(samples: &[Duration]) -> Duration {
    samples.iter().max().copied().unwrap_or_default()
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn secs(d: Option<Duration>) -> String {
    match d {
        Some(d) => format!("{:.2} s", d.as_secs_f64()),
        None => format!("not seen in {} s", TRANSITION_BOUND.as_secs()),
    }
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "**not met**"
    }
}

/// `503 ×50` or `503 ×49, no answer ×1`.
fn status_counts(statuses: &[Option<u16>]) -> String {
    let mut counts: Vec<(Option<u16>, usize)> = Vec::new();
    for s in statuses {
        match counts.iter_mut().find(|(k, _)| k == s) {
            Some((_, n)) => *n += 1,
            None => counts.push((*s, 1)),
        }
    }
    counts
        .iter()
        .map(|(s, n)| match s {
            Some(code) => format!("{code} ×{n}"),
            None => format!("no answer ×{n}"),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn report(
    args: &Args,
    load_before: &str,
    states: [&Measured; 3],
    cycles: &[Transitions],
) -> String {
    let [up, stalled, killed] = states;
    let mut out = String::new();
    let o = &mut out;
    let _ = writeln!(o, "# Outages and readiness (issue 12)\n");
    let _ = writeln!(o, "- machine: {}", machine_summary());
    let _ = writeln!(
        o,
        "- load average (1, 5, 15 min) before / after: {load_before} / {}",
        load_average()
    );
    let _ = writeln!(o, "- redis: {}", version_of("redis-server", "--version"));
    let _ = writeln!(
        o,
        "- relay: in-process, bench profile; store probe PING every {} ms bounded by {} ms, connection state watched every {} ms",
        PROBE_INTERVAL.as_millis(),
        PROBE_TIMEOUT.as_millis(),
        WATCH_INTERVAL.as_millis()
    );
    let _ = writeln!(
        o,
        "- per state: {} new recorded streams one after another (fresh Idempotency-Key, rate limits on; the upstream sends 2 events at once), then {} readiness requests, each on a new connection; (b) and (c) start once readiness answers 503",
        args.streams, args.requests
    );
    let _ = writeln!(
        o,
        "- reproduce: cargo bench -p reprise-benches --bench outage -- --streams {} --requests {} --cycles {}\n",
        args.streams, args.requests, args.cycles
    );

    let _ = writeln!(
        o,
        "| | {} | {} | {} | target | |",
        title(State::Up),
        title(State::Stalled),
        title(State::Killed)
    );
    let _ = writeln!(o, "|---|---:|---:|---:|---|---|");
    let first_event_row = |o: &mut String, name: &str, f: &dyn Fn(&[Duration]) -> Duration| {
        let (a, b, c) = (
            f(&up.first_event),
            f(&stalled.first_event),
            f(&killed.first_event),
        );
        let _ = writeln!(
            o,
            "| time to first event, {name} | {} | {} | {} | (b), (c) ≤ (a) + {} ms | {} |",
            ms(a),
            ms(b),
            ms(c),
            FIRST_EVENT_EXTRA.as_millis(),
            verdict(b <= a + FIRST_EVENT_EXTRA && c <= a + FIRST_EVENT_EXTRA)
        );
    };
    let _ = writeln!(
        o,
        "| streams measured | {} | {} | {} | {} (fewer: {} s passed) | |",
        up.first_event.len(),
        stalled.first_event.len(),
        killed.first_event.len(),
        args.streams,
        STATE_BUDGET.as_secs()
    );
    first_event_row(o, "p50", &|s| percentile(s, 50));
    first_event_row(o, "p90", &|s| percentile(s, 90));
    first_event_row(o, "max", &max);
    let readyz_row = |o: &mut String, name: &str, f: &dyn Fn(&[Duration]) -> Duration| {
        let (a, b, c) = (f(&up.readyz), f(&stalled.readyz), f(&killed.readyz));
        let _ = writeln!(
            o,
            "| readyz latency, {name} | {} | {} | {} | ≤ {} ms | {} |",
            ms(a),
            ms(b),
            ms(c),
            READYZ_TARGET.as_millis(),
            verdict(a.max(b).max(c) <= READYZ_TARGET)
        );
    };
    readyz_row(o, "p50", &|s| percentile(s, 50));
    readyz_row(o, "max", &max);
    let all = |m: &Measured, code: u16| m.statuses.iter().all(|s| *s == Some(code));
    let _ = writeln!(
        o,
        "| readyz status | {} | {} | {} | 200 / 503 / 503 | {} |",
        status_counts(&up.statuses),
        status_counts(&stalled.statuses),
        status_counts(&killed.statuses),
        verdict(all(up, 200) && all(stalled, 503) && all(killed, 503))
    );
    let skipped = |m: &Measured| {
        m.skipped_claims
            .map(|n| format!("{n}"))
            .unwrap_or_else(|| "?".into())
    };
    let _ = writeln!(
        o,
        "| Idempotency-Key claims skipped (store known down) | {} | {} | {} | | |",
        skipped(up),
        skipped(stalled),
        skipped(killed)
    );

    let _ = write!(
        o,
        "\n| transition (readiness polled every {} ms)",
        POLL_EVERY.as_millis()
    );
    for i in 1..=cycles.len() {
        let _ = write!(o, " | cycle {i}");
    }
    let _ = writeln!(o, " | target | |");
    let _ = write!(o, "|---");
    for _ in cycles {
        let _ = write!(o, "|---:");
    }
    let _ = writeln!(o, "|---|---|");
    let mut transition_row =
        |name: &str, get: &dyn Fn(&Transitions) -> Option<Duration>, target: bool| {
            let _ = write!(o, "| {name}");
            for t in cycles {
                let _ = write!(o, " | {}", secs(get(t)));
            }
            if target {
                let met = cycles
                    .iter()
                    .all(|t| get(t).is_some_and(|d| d <= TRANSITION_TARGET));
                let _ = writeln!(
                    o,
                    " | ≤ {} s | {} |",
                    TRANSITION_TARGET.as_secs(),
                    verdict(met)
                );
            } else {
                let _ = writeln!(o, " | | |");
            }
        };
    transition_row("SIGSTOP → readyz 503", &|t| t.stop_to_503, true);
    transition_row("SIGCONT → readyz 200", &|t| t.cont_to_200, true);
    transition_row("kill → readyz 503", &|t| t.kill_to_503, true);
    transition_row("restart → readyz 200", &|t| t.restart_to_200, true);
    transition_row(
        "  of which redis-server starting (until it answers PING)",
        &|t| t.restart_to_ping,
        false,
    );
    out
}
