//! The failover benchmark of issue 15 (item 2): how long a reader on
//! another instance waits for events when one Redis Cluster master dies and
//! its replica takes over, on the dead master's streams and on the others.
//!
//! ```text
//! REPRISE_BENCH_BASE_BIN=/path/to/base/reprise \
//!   cargo bench -p reprise-benches --bench failover -- [--streams N] [--rounds N]
//! ```
//!
//! One round starts three masters with a replica each (`redis-server`s on
//! free loopback ports, `cluster-node-timeout` 1000 ms,
//! `cluster-require-full-coverage no`), the tests' upstream and two `reprise`
//! processes of one build (a long `streams.lease`, so that no stream ends
//! with `producer_lost`): one records `--streams` streams, each fed one event
//! every [`PACE`], the other serves a live reader of each from the store.
//! After [`WARM_UP`] the master holding stream 0 is killed (SIGKILL), Redis
//! promotes its replica, and the streams run [`AFTER`] more before they end.
//! Per stream, the longest gap between two events its remote reader
//! received; the table shows the longest over the dead master's streams and
//! over the others, with the time Redis took to promote the replica.
//!
//! Builds compared, interleaved (base, new, base, new, ...): the `reprise`
//! binary at `REPRISE_BENCH_BASE_BIN` (e.g. main, whose fred lacks patches 4
//! and 5 of `crates/vendor/fred/PATCHES.md`) and this tree's
//! (`REPRISE_BENCH_NEW_BIN`, default `target/release/reprise`: build it with
//! `cargo build --release --bin reprise`). Without a base binary only the new
//! one runs. It prints figures and asserts nothing about them.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use futures::StreamExt;
use reprise_benches::machine_summary;
use reprise_tests::redis::{raw_command, ClusterSettings, RedisCluster};
use reprise_tests::relay::RelayProcess;
use reprise_tests::upstream::event;
use reprise_tests::{with_timeout_of, SseClient, Upstream};
use tokio_util::sync::CancellationToken;

/// One event per stream every this long.
const PACE: Duration = Duration::from_millis(20);
/// Streams run this long before the kill.
const WARM_UP: Duration = Duration::from_secs(2);
/// And this long after the replica was promoted.
const AFTER: Duration = Duration::from_secs(3);
/// Bound of one round.
const ROUND_BOUND: Duration = Duration::from_secs(90);

struct Args {
    streams: usize,
    rounds: usize,
}

impl Args {
    fn parse() -> Result<Args, String> {
        let mut args = Args {
            streams: 9,
            rounds: 2,
        };
        let mut it = std::env::args().skip(1);
        while let Some(a) = it.next() {
            let mut value = |name: &str| -> Result<usize, String> {
                it.next()
                    .and_then(|v| v.parse().ok())
                    .ok_or_else(|| format!("{name} needs a number"))
            };
            match a.as_str() {
                "--streams" => args.streams = value("--streams")?.max(2),
                "--rounds" => args.rounds = value("--rounds")?.max(1),
                // cargo bench passes `--bench`.
                "--bench" => {}
                other => return Err(format!("unknown argument {other}")),
            }
        }
        Ok(args)
    }
}

/// What one round measured.
struct Round {
    label: &'static str,
    /// Longest gap a reader of the dead master's streams saw.
    dead: Duration,
    /// Longest gap a reader of the other streams saw.
    healthy: Duration,
    /// From the kill to every node agreeing on the promoted replica.
    promotion: Duration,
    /// Events every reader should have got, and those missing.
    missing: usize,
}

/// The master serving `sid`'s keys (the others answer `-MOVED`).
async fn master_of(cluster: &mut RedisCluster, sid: &str) -> Result<u16, String> {
    let key = format!("reprise:{{{sid}}}:m");
    for port in cluster.master_ports().await.map_err(|e| e.to_string())? {
        let reply = raw_command(port, &["EXISTS", &key])
            .await
            .map_err(|e| e.to_string())?;
        if reply.first() == Some(&b':') {
            return Ok(port);
        }
    }
    Err(format!("no master serves stream {sid}"))
}

async fn round(
    label: &'static str,
    bin: &std::path::Path,
    streams: usize,
) -> Result<Round, String> {
    let settings = ClusterSettings {
        require_full_coverage: false,
        ..ClusterSettings::quick_failover()
    };
    let mut cluster = RedisCluster::start_with_replicas(settings)
        .await
        .map_err(|e| format!("cluster: {e:#}"))?;
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let cfg = dir.path().join("reprise.toml");
    std::fs::write(&cfg, "[streams]\nlease = \"60s\"\n").map_err(|e| e.to_string())?;
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
    let (producer, reader_side) = tokio::join!(
        RelayProcess::start_binary(bin, &args),
        RelayProcess::start_binary(bin, &args)
    );
    let client = SseClient::new();
    let stop = CancellationToken::new();
    let mut feeders = Vec::new();
    let mut readers = Vec::new();
    let mut sids = Vec::new();
    for i in 0..streams {
        let ctl = upstream.controlled_stream();
        let mut origin = client
            .open_get(&format!("{}/gen/{i}", producer.url()))
            .await;
        ctl.send(event("0")).await;
        let first = origin.next_event().await;
        let sid = origin
            .header("reprise-stream-id")
            .ok_or("no reprise-stream-id")?
            .to_owned();
        let _ = first;
        // Drain the origin so that it never holds the producer back.
        tokio::spawn(async move { origin.collect_all().await });
        let stop = stop.clone();
        feeders.push(tokio::spawn(async move {
            let mut sent = 1usize;
            let mut tick = tokio::time::interval(PACE);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => {}
                }
                ctl.send(event(&sent.to_string())).await;
                sent += 1;
            }
            ctl.finish();
            sent
        }));
        let remote = client
            .open_get(&format!("{}/_reprise/streams/{sid}", reader_side.url()))
            .await;
        readers.push(tokio::spawn(async move {
            let mut arrivals = Vec::new();
            let mut events = remote.into_stream();
            while let Some(Ok(_)) = events.next().await {
                arrivals.push(Instant::now());
            }
            arrivals
        }));
        sids.push(sid);
    }
    tokio::time::sleep(WARM_UP).await;
    let victim = master_of(&mut cluster, &sids[0]).await?;
    let mut on_victim = Vec::new();
    for sid in &sids {
        on_victim.push(master_of(&mut cluster, sid).await? == victim);
    }
    let killed = Instant::now();
    cluster
        .kill_master(victim)
        .await
        .map_err(|e| format!("failover: {e:#}"))?;
    let promotion = killed.elapsed();
    tokio::time::sleep(AFTER).await;
    stop.cancel();
    let mut sent = Vec::new();
    for f in feeders {
        sent.push(f.await.map_err(|e| e.to_string())?);
    }
    let mut dead = Duration::ZERO;
    let mut healthy = Duration::ZERO;
    let mut missing = 0;
    for ((r, v), n) in readers.into_iter().zip(on_victim).zip(sent) {
        let arrivals = with_timeout_of(Duration::from_secs(30), "a reader to end", r)
            .await
            .map_err(|e| e.to_string())?;
        missing += n.saturating_sub(arrivals.len());
        let gap = arrivals
            .windows(2)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or_default();
        let worst = if v { &mut dead } else { &mut healthy };
        *worst = (*worst).max(gap);
    }
    drop((producer, reader_side));
    Ok(Round {
        label,
        dead,
        healthy,
        promotion,
        missing,
    })
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

fn main() -> ExitCode {
    let args = match Args::parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("failover: {e}");
            return ExitCode::FAILURE;
        }
    };
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let new = std::env::var_os("REPRISE_BENCH_NEW_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target/release/reprise"));
    if !new.exists() {
        eprintln!(
            "failover: {} is missing: cargo build --release --bin reprise",
            new.display()
        );
        return ExitCode::FAILURE;
    }
    let base = std::env::var_os("REPRISE_BENCH_BASE_BIN").map(PathBuf::from);
    let mut plan: Vec<(&'static str, PathBuf)> = Vec::new();
    for _ in 0..args.rounds {
        if let Some(base) = &base {
            plan.push(("base", base.clone()));
        }
        plan.push(("new", new.clone()));
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("failover: tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("{}", machine_summary());
    println!(
        "{} streams, one event every {} each; kill -9 of stream 0's master after {}; \
         cluster-node-timeout 1000 ms, cluster-require-full-coverage no",
        args.streams,
        ms(PACE),
        ms(WARM_UP)
    );
    println!(
        "{:<6} {:>22} {:>22} {:>12} {:>8}",
        "build", "longest gap, dead shard", "longest gap, healthy", "promotion", "missing"
    );
    let mut failed = false;
    for (label, bin) in plan {
        let result = runtime.block_on(with_timeout_of(
            ROUND_BOUND,
            "a failover round",
            round(label, &bin, args.streams),
        ));
        match result {
            Ok(r) => println!(
                "{:<6} {:>22} {:>22} {:>12} {:>8}",
                r.label,
                ms(r.dead),
                ms(r.healthy),
                ms(r.promotion),
                r.missing
            ),
            Err(e) => {
                eprintln!("failover: {label}: {e}");
                failed = true;
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
