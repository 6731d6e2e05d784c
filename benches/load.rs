//! The load benchmark of issue 7: Reprise next to a direct connection and
//! nginx, under chat, firehose, resume-storm, idle and open-streams loads,
//! in one run.
//!
//! ```text
//! cargo bench -p reprise-benches --bench load -- [--quick] [--scenario NAME[,NAME..]]
//!     [--columns direct,pass,redis,embedded,nginx] [--perf DIR] [--no-build]
//!     [--charts DIR]
//! ```
//!
//! One run starts everything it measures, each on a free loopback port: the
//! mock LLM upstream (this binary again, `--serve-upstream`; see
//! `load/upstream.rs`), a private `redis-server` without persistence, a fresh
//! Reprise process (the release binary) per column and scenario so that its
//! CPU time and peak RSS belong to that configuration alone, and nginx as a
//! plain `proxy_pass` when installed (installed with apt-get if missing and
//! root). The load generator (`load/client.rs`) checks every event of every
//! stream and prints one Markdown table per scenario, followed by the
//! targets of issue 14 that apply with this run's figures (met / not met). It
//! prints figures; it asserts nothing about them.
//!
//! It also draws SVG charts (`load/charts.rs`) into `--charts DIR` (default
//! `target/bench-charts`; a relative DIR is taken from the workspace root):
//! per load scenario the latency distribution and the CPU per event of every
//! column, and for the open-streams scenario the RSS per open stream.
//!
//! `REPRISE_BIN=path` measures that binary instead of building
//! `target/release/reprise` (e.g. a build of an exact commit).
//!
//! `--perf DIR` records a `perf record -e cpu-clock` profile of each proxy
//! process during each measured window into DIR (set `LOAD_PERF_ARGS` to
//! change the perf options).
#![forbid(unsafe_code)]

// The crate root sits beside its modules' folder, hence the paths.
#[path = "load/charts.rs"]
mod charts;
#[path = "load/client.rs"]
mod client;
#[path = "load/procs.rs"]
mod procs;
#[path = "load/report.rs"]
mod report;
#[path = "load/targets.rs"]
mod targets;
#[path = "load/upstream.rs"]
mod upstream;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use client::{Hooks, Job, StreamResult, Totals};
use procs::{Nginx, Proc, Redis, ReprisePlan};
use report::{mib, ms2, ms3, rate, thousands, us_per, Table, NA};
use reprise_benches::{machine_summary, version_of};

/// Microseconds since the Unix epoch: the clock shared by the upstream's
/// send stamps and the clients' receive times (same machine).
fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

const SCENARIOS: [&str; 6] = [
    "chat",
    "chat-1000",
    "firehose",
    "resume-storm",
    "idle",
    "open",
];

/// nginx's `worker_connections` and `worker_rlimit_nofile`.
const NGINX_CONNS: u64 = 19_500;
/// A proxy holds two sockets per proxied stream and the machine's hard limit
/// on open files is often 20,000: proxied idle streams are capped below it.
const MAX_PROXIED_IDLE: usize = 9_000;
/// The machine is shared (builds, tests): a load-scenario column whose
/// window saw other processes use more than this share of all cores (%) is
/// run again, at most [`MAX_TRIES`] times in all, and the quietest run kept.
const QUIET_OTHERS: f64 = 10.0;
const MAX_TRIES: usize = 2;
/// Connections being opened at once in the idle scenario.
const CONNECT_CONCURRENCY: usize = 256;

/// A system under test: one column of every table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Col {
    Direct,
    Pass,
    Redis,
    Embedded,
    Nginx,
}

impl Col {
    const ALL: [Col; 5] = [
        Col::Direct,
        Col::Pass,
        Col::Redis,
        Col::Embedded,
        Col::Nginx,
    ];

    /// Position in [`Col::ALL`] (its colour in the charts).
    fn index(self) -> usize {
        Col::ALL.iter().position(|c| *c == self).unwrap_or(0)
    }

    fn key(self) -> &'static str {
        match self {
            Col::Direct => "direct",
            Col::Pass => "pass",
            Col::Redis => "redis",
            Col::Embedded => "embedded",
            Col::Nginx => "nginx",
        }
    }

    fn title(self) -> &'static str {
        match self {
            Col::Direct => "direct to upstream",
            Col::Pass => "Reprise pass-through",
            Col::Redis => "Reprise → Redis",
            Col::Embedded => "Reprise → embedded",
            Col::Nginx => "nginx",
        }
    }
}

struct Args {
    quick: bool,
    scenarios: Vec<String>,
    cols: Vec<Col>,
    perf: Option<PathBuf>,
    /// Where the SVG charts go (`None`: the default under `target/`).
    charts: Option<PathBuf>,
    build: bool,
    /// As given, for the "reproduce with" line.
    raw: Vec<String>,
}

const USAGE: &str = "usage: cargo bench -p reprise-benches --bench load -- [--quick] [--scenario chat,chat-1000,firehose,resume-storm,idle,open] [--columns direct,pass,redis,embedded,nginx] [--perf DIR] [--charts DIR] [--no-build]";

fn parse_args(argv: &[String]) -> Result<Args, String> {
    let mut a = Args {
        quick: false,
        scenarios: SCENARIOS.iter().map(|s| s.to_string()).collect(),
        cols: Col::ALL.to_vec(),
        perf: None,
        charts: None,
        build: true,
        raw: Vec::new(),
    };
    let mut it = argv.iter();
    while let Some(arg) = it.next() {
        let mut value = || {
            it.next()
                .cloned()
                .ok_or(format!("{arg} needs a value\n{USAGE}"))
        };
        match arg.as_str() {
            // cargo bench passes --bench to harness = false targets.
            "--bench" => continue,
            "--quick" => a.quick = true,
            "--no-build" => a.build = false,
            "--scenario" => {
                let v = value()?;
                a.scenarios = v.split(',').map(|s| s.trim().to_string()).collect();
                if let Some(bad) = a
                    .scenarios
                    .iter()
                    .find(|s| !SCENARIOS.contains(&s.as_str()))
                {
                    return Err(format!(
                        "unknown scenario {bad:?}; known: {}",
                        SCENARIOS.join(", ")
                    ));
                }
                a.raw.extend([arg.clone(), v]);
                continue;
            }
            "--columns" => {
                let v = value()?;
                a.cols = v
                    .split(',')
                    .map(|s| {
                        Col::ALL
                            .into_iter()
                            .find(|c| c.key() == s.trim())
                            .ok_or(format!("unknown column {s:?}\n{USAGE}"))
                    })
                    .collect::<Result<_, _>>()?;
                a.raw.extend([arg.clone(), v]);
                continue;
            }
            "--perf" => {
                let v = value()?;
                a.perf = Some(PathBuf::from(&v));
                a.raw.extend([arg.clone(), v]);
                continue;
            }
            "--charts" => {
                let v = value()?;
                a.charts = Some(PathBuf::from(&v));
                a.raw.extend([arg.clone(), v]);
                continue;
            }
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
        a.raw.push(arg.clone());
    }
    Ok(a)
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    // Open files: thousands of sockets per process in the idle scenario.
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    if argv.first().map(String::as_str) == Some("--serve-upstream") {
        let addr = argv.get(1).and_then(|a| a.parse().ok());
        let Some(addr) = addr else {
            eprintln!("--serve-upstream needs ADDR");
            return ExitCode::from(2);
        };
        return match upstream::serve(addr) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        };
    }
    let args = match parse_args(&argv) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("load: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Progress, on stderr (stdout carries only the report).
fn progress(msg: impl AsRef<str>) {
    eprintln!("load: {}", msg.as_ref());
}

// ------------------------------------------------------------ scenarios

/// A scenario of many streams read from start to end.
struct LoadSpec {
    name: &'static str,
    concurrency: usize,
    total: usize,
    events: u64,
    interval_us: u64,
    size: usize,
}

impl LoadSpec {
    fn describe(&self) -> String {
        let pace = if self.interval_us == 0 {
            "unthrottled".to_string()
        } else {
            format!("one every {} ms", self.interval_us / 1000)
        };
        format!(
            "{} streams in all, {} at a time, {} events of {} bytes each, {pace}",
            thousands(self.total as u64),
            thousands(self.concurrency as u64),
            thousands(self.events),
            self.size
        )
    }
}

/// Every size of the run, full or `--quick`.
struct Sizes {
    chat: LoadSpec,
    chat_wide: LoadSpec,
    firehose: LoadSpec,
    storm_events: u64,
    storm_clients: usize,
    idle_streams: usize,
    idle_readers_per_stream: usize,
    idle_proxied: usize,
    /// Open recorded streams (idle after their first event).
    open_streams: usize,
}

impl Sizes {
    fn new(quick: bool) -> Sizes {
        let chat = |name, concurrency, total, events| LoadSpec {
            name,
            concurrency,
            total,
            events,
            interval_us: 20_000,
            size: 150,
        };
        if quick {
            Sizes {
                chat: chat("chat", 50, 100, 50),
                chat_wide: chat("chat-1000", 250, 250, 50),
                firehose: LoadSpec {
                    name: "firehose",
                    concurrency: 20,
                    total: 20,
                    events: 1000,
                    interval_us: 0,
                    size: 100,
                },
                storm_events: 2_000,
                storm_clients: 100,
                idle_streams: 10,
                idle_readers_per_stream: 50,
                idle_proxied: 500,
                open_streams: 300,
            }
        } else {
            Sizes {
                chat: chat("chat", 200, 400, 200),
                chat_wide: chat("chat-1000", 1000, 2000, 200),
                firehose: LoadSpec {
                    name: "firehose",
                    concurrency: 50,
                    total: 100,
                    events: 2000,
                    interval_us: 0,
                    size: 100,
                },
                storm_events: 10_000,
                storm_clients: 1_000,
                idle_streams: 100,
                idle_readers_per_stream: 100,
                idle_proxied: MAX_PROXIED_IDLE,
                open_streams: 2_000,
            }
        }
    }
}

// ------------------------------------------------------------ the bench

struct Bench {
    args: Args,
    /// Where the SVG charts are written.
    charts: PathBuf,
    dir: tempfile::TempDir,
    reprise_bin: PathBuf,
    up_addr: SocketAddr,
    upstream: Proc,
    redis: Redis,
    /// The nginx binary, or why the nginx column is skipped.
    nginx: Result<PathBuf, String>,
    rt: tokio::runtime::Runtime,
    /// Processes started so far (names their files).
    runs: usize,
}

/// What keeps a system under test running.
enum Keep {
    Nothing,
    Proc(#[allow(dead_code)] Proc),
    Nginx(#[allow(dead_code)] Nginx),
}

/// A system under test, started for one column of one scenario.
struct Under {
    col: Col,
    addr: SocketAddr,
    /// Processes whose CPU time is the proxy's.
    cpu_pids: Vec<u32>,
    /// The process whose memory is the proxy's (nginx: its worker).
    mem_pid: Option<u32>,
    _keep: Keep,
}

/// Counters read at both ends of a measured window.
struct Snap {
    at: Instant,
    proxy: Duration,
    redis: Duration,
    upstream: Duration,
    gen: Duration,
    cmds: BTreeMap<String, (u64, u64)>,
    ticks: (u64, u64),
    /// The proxy's read and write system calls.
    io: (u64, u64),
    overflows: u64,
}

/// What happened in a measured window.
struct Delta {
    wall: Duration,
    proxy: Duration,
    redis: Duration,
    upstream: Duration,
    gen: Duration,
    cmds: BTreeMap<String, u64>,
    /// Microseconds Redis spent per command name (a function's time
    /// includes the commands it ran).
    cmd_usec: BTreeMap<String, u64>,
    /// Whole machine, percent of all cores.
    busy: f64,
    /// The part of `busy` that none of the measured processes used (other
    /// work on the machine: noise in every figure of the window).
    others: f64,
    /// The proxy's read and write system calls.
    io: (u64, u64),
    /// SYNs dropped on full accept queues, machine-wide.
    overflows: u64,
}

impl Delta {
    fn redis_calls(&self) -> u64 {
        self.cmds.values().sum()
    }

    /// `xadd 80,000 (1.2 µs) · fcall 1,234 (9.9 µs) · …`: calls, most
    /// called first, with Redis's time per call.
    fn cmd_breakdown(&self, limit: usize) -> String {
        let mut v: Vec<_> = self.cmds.iter().filter(|(_, n)| **n > 0).collect();
        v.sort_by(|a, b| b.1.cmp(a.1));
        let s: Vec<String> = v
            .iter()
            .take(limit)
            .map(|(c, n)| {
                let usec = self.cmd_usec.get(*c).copied().unwrap_or(0) as f64;
                format!("{c} {} ({:.1} µs)", thousands(**n), usec / **n as f64)
            })
            .collect();
        if s.is_empty() {
            "none".into()
        } else {
            s.join(" · ")
        }
    }
}

/// A load scenario's figures for one column.
struct Measure {
    totals: Totals,
    delta: Delta,
    hwm_kib: Option<u64>,
    /// Runs made to get a window quiet enough (see [`QUIET_OTHERS`]).
    tries: usize,
}

fn run(args: Args) -> Result<(), String> {
    let sizes = Sizes::new(args.quick);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let exe = std::env::current_exe().map_err(|e| format!("own path: {e}"))?;
    // target/<profile>/deps/load-<hash> → target/<profile>/reprise
    let reprise_bin = match std::env::var_os("REPRISE_BIN") {
        Some(p) => PathBuf::from(p),
        None => exe
            .parent()
            .and_then(Path::parent)
            .map(|d| d.join("reprise"))
            .ok_or("cannot locate the target directory")?,
    };
    if args.build {
        progress("cargo build --release --bin reprise");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let ok = Command::new(cargo)
            .args(["build", "--release", "--bin", "reprise"])
            .current_dir(&root)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            return Err("cargo build --release --bin reprise failed".into());
        }
    }
    if !reprise_bin.is_file() {
        return Err(format!(
            "{} not found (build it, or set REPRISE_BIN)",
            reprise_bin.display()
        ));
    }
    if let Some(dir) = &args.perf {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    // target/<profile>/deps/load-<hash> → target/bench-charts
    let charts = match &args.charts {
        Some(d) => root.join(d),
        None => exe
            .parent()
            .and_then(Path::parent)
            .and_then(Path::parent)
            .map(|t| t.join("bench-charts"))
            .ok_or("cannot locate the target directory")?,
    };
    std::fs::create_dir_all(&charts).map_err(|e| format!("{}: {e}", charts.display()))?;

    let started = Instant::now();
    let dir = tempfile::Builder::new()
        .prefix("reprise-load-")
        .tempdir()
        .map_err(|e| format!("temp dir: {e}"))?;
    let up_port = procs::free_port()?;
    let up_addr = SocketAddr::from(([127, 0, 0, 1], up_port));
    let mut upstream = Proc::spawn(
        "mock upstream",
        Command::new(&exe)
            .arg("--serve-upstream")
            .arg(up_addr.to_string()),
        Some(dir.path().join("upstream.log")),
    )?;
    upstream.wait_until("/health", || {
        matches!(procs::http_request(up_addr, "GET", "/health"), Ok((200, _)))
    })?;
    let redis = Redis::start(dir.path())?;
    let nginx = procs::find_program("nginx")
        .ok_or_else(|| "nginx is not installed".to_string())
        .or_else(|_| {
            procs::apt_install("nginx").and_then(|()| {
                procs::find_program("nginx").ok_or("nginx not found after installing it".into())
            })
        });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;

    println!(
        "# Reprise load benchmark{}\n",
        if args.quick { " (--quick)" } else { "" }
    );
    let extra = if args.raw.is_empty() {
        String::new()
    } else {
        format!(" -- {}", args.raw.join(" "))
    };
    let env = std::env::var("REPRISE_BIN")
        .map(|b| format!("REPRISE_BIN={b} "))
        .unwrap_or_default();
    println!("- command: `{env}cargo bench -p reprise-benches --bench load{extra}`");
    println!("- machine: {}", machine_summary());
    // The checkout's revision says what was built only when the bench built it.
    let origin = if std::env::var_os("REPRISE_BIN").is_some() {
        "set by REPRISE_BIN".to_string()
    } else {
        git_describe(&root)
    };
    println!(
        "- reprise: {} ({}; {})",
        reprise_bin.display(),
        version_of(&reprise_bin.to_string_lossy(), "--version"),
        origin
    );
    println!(
        "- redis: {} (private, port {}, `--save \"\" --appendonly no`)",
        version_of("redis-server", "--version"),
        redis.addr.port()
    );
    match &nginx {
        Ok(bin) => println!(
            "- nginx: {} — `worker_processes 1` (a master plus one worker, CPU summed), `proxy_buffering off`, HTTP/1.1 keepalive upstream, access_log off",
            version_of(&bin.to_string_lossy(), "-v")
        ),
        Err(why) => println!("- nginx: column skipped: {why}"),
    }
    println!("- upstream: mock LLM server (hyper, own process), one write per event; load generator: hyper HTTP/1.1 clients on 2 tokio threads, one connection per stream");
    println!("- all of them share this machine; CPU figures are utime+stime deltas from /proc/<pid>/stat over the measured window, per event received by the clients");

    println!("- charts (SVG): {}", charts.display());

    let mut bench = Bench {
        args,
        charts,
        dir,
        reprise_bin,
        up_addr,
        upstream,
        redis,
        nginx,
        rt,
        runs: 0,
    };
    let scenarios = bench.args.scenarios.clone();
    for s in &scenarios {
        let table = match s.as_str() {
            "chat" => bench.load_scenario(&sizes.chat, "chat"),
            "chat-1000" => {
                bench.load_scenario(&sizes.chat_wide, "chat at 1,000 concurrent streams")
            }
            "firehose" => bench.load_scenario(&sizes.firehose, "firehose"),
            "resume-storm" => bench.storm(sizes.storm_events, sizes.storm_clients),
            "idle" => bench.idle(
                sizes.idle_streams,
                sizes.idle_readers_per_stream,
                sizes.idle_proxied,
            ),
            "open" => bench.open(sizes.open_streams),
            _ => continue,
        };
        table.print();
    }
    println!(
        "\n_Benchmark time, build excluded: {:.0} s._",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn git_describe(root: &Path) -> String {
    let out = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(root)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let rev = out(&["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "unknown revision".into());
    let dirty =
        out(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    format!(
        "git {rev}{}",
        if dirty {
            ", with uncommitted changes"
        } else {
            ""
        }
    )
}

impl Bench {
    /// Starts the system under test for `col`.
    fn setup(&mut self, col: Col) -> Result<Under, String> {
        self.runs += 1;
        let name = format!("reprise-{}-{}", col.key(), self.runs);
        let reprise = |plan| -> Result<Under, String> {
            let (p, addr) = procs::start_reprise(
                &self.reprise_bin,
                self.dir.path(),
                &name,
                self.up_addr,
                plan,
            )?;
            Ok(Under {
                col,
                addr,
                cpu_pids: vec![p.pid()],
                mem_pid: Some(p.pid()),
                _keep: Keep::Proc(p),
            })
        };
        match col {
            Col::Direct => Ok(Under {
                col,
                addr: self.up_addr,
                cpu_pids: Vec::new(),
                mem_pid: None,
                _keep: Keep::Nothing,
            }),
            Col::Pass => reprise(ReprisePlan::PassThrough),
            Col::Redis => {
                self.redis.cmd(&["FLUSHALL"])?;
                reprise(ReprisePlan::Redis(self.redis.addr))
            }
            Col::Embedded => reprise(ReprisePlan::Embedded),
            Col::Nginx => {
                let bin = self.nginx.clone()?;
                let dir = self.dir.path().join(format!("nginx-{}", self.runs));
                let n = Nginx::start(&bin, &dir, self.up_addr, NGINX_CONNS)?;
                Ok(Under {
                    col,
                    addr: n.addr,
                    cpu_pids: n.pids(),
                    mem_pid: Some(n.worker),
                    _keep: Keep::Nginx(n),
                })
            }
        }
    }

    /// A few short streams through the system, so that the measured window
    /// does not include first connections and first allocations.
    fn warm_up(&self, u: &Under, size: usize) -> Result<(), String> {
        let jobs: Vec<Job> = (0..16)
            .map(|k| Job {
                addr: u.addr,
                path: format!("/sse?n=20&interval_us=0&size={size}&tag={k}"),
                tag: k,
                n: 20,
                deadline: Duration::from_secs(30),
            })
            .collect();
        let t = Totals::of(self.rt.block_on(client::run_many(
            Arc::new(jobs),
            16,
            Duration::ZERO,
            false,
        )));
        if t.complete != t.streams {
            return Err(format!(
                "warm-up through {} failed: {}",
                u.col.title(),
                t.error_summary()
                    .unwrap_or_else(|| format!("lost {} dup {}", t.lost, t.dup))
            ));
        }
        Ok(())
    }

    fn snap(&self, u: &Under) -> Snap {
        Snap {
            at: Instant::now(),
            proxy: procs::cpu_sum(&u.cpu_pids),
            redis: procs::cpu_time(self.redis.pid()).unwrap_or_default(),
            upstream: procs::cpu_time(self.upstream.pid()).unwrap_or_default(),
            gen: procs::cpu_time(std::process::id()).unwrap_or_default(),
            cmds: self.redis.commandstats(),
            ticks: procs::machine_ticks(),
            io: procs::io_calls_sum(&u.cpu_pids),
            overflows: procs::listen_overflows(),
        }
    }

    fn delta(a: &Snap, b: &Snap) -> Delta {
        let before = |k: &String| a.cmds.get(k).copied().unwrap_or((0, 0));
        let cmds: BTreeMap<String, u64> = b
            .cmds
            .iter()
            .map(|(k, v)| (k.clone(), v.0.saturating_sub(before(k).0)))
            .filter(|(_, v)| *v > 0)
            .collect();
        let cmd_usec = b
            .cmds
            .iter()
            .map(|(k, v)| (k.clone(), v.1.saturating_sub(before(k).1)))
            .filter(|(k, _)| cmds.contains_key(k))
            .collect();
        let busy = b.ticks.0.saturating_sub(a.ticks.0) as f64 * 100.0
            / b.ticks.1.saturating_sub(a.ticks.1).max(1) as f64;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let wall = (b.at - a.at).as_secs_f64().max(1e-9);
        let ours = (b.proxy + b.redis + b.upstream + b.gen)
            .saturating_sub(a.proxy + a.redis + a.upstream + a.gen)
            .as_secs_f64();
        let others = (busy - ours * 100.0 / (wall * cores)).max(0.0);
        Delta {
            wall: b.at - a.at,
            proxy: b.proxy.saturating_sub(a.proxy),
            redis: b.redis.saturating_sub(a.redis),
            upstream: b.upstream.saturating_sub(a.upstream),
            gen: b.gen.saturating_sub(a.gen),
            cmds,
            cmd_usec,
            busy,
            others,
            io: (b.io.0.saturating_sub(a.io.0), b.io.1.saturating_sub(a.io.1)),
            overflows: b.overflows.saturating_sub(a.overflows),
        }
    }

    /// Attaches `perf record` to the proxy process, if `--perf` was given.
    fn perf_start(&self, label: &str, u: &Under) -> Option<Proc> {
        let dir = self.args.perf.as_ref()?;
        let pid = u.mem_pid?;
        let opts =
            std::env::var("LOAD_PERF_ARGS").unwrap_or_else(|_| "-e cpu-clock -F 999 -g".into());
        let mut cmd = Command::new("perf");
        cmd.arg("record")
            .args(opts.split_whitespace())
            .args(["-p", &pid.to_string(), "-o"])
            .arg(dir.join(format!("{label}.data")));
        match Proc::spawn(
            "perf",
            &mut cmd,
            Some(dir.join(format!("{label}.perf.log"))),
        ) {
            Ok(p) => {
                std::thread::sleep(Duration::from_millis(500));
                Some(p)
            }
            Err(e) => {
                progress(format!("perf not started: {e}"));
                None
            }
        }
    }

    // ------------------------------------------------ chat, firehose

    fn load_scenario(&mut self, spec: &LoadSpec, title: &str) -> Table {
        let mut results = Vec::new();
        for col in Col::ALL {
            if !self.args.cols.contains(&col) {
                continue;
            }
            progress(format!("{}: {}", spec.name, col.title()));
            let mut best: Option<Result<Measure, String>> = None;
            // --quick must stay quick: one run per column.
            let max_tries = if self.args.quick { 1 } else { MAX_TRIES };
            for tries in 1..=max_tries {
                let m = self.load_column(spec, col).map(|m| Measure { tries, ..m });
                let others = m.as_ref().map_or(0.0, |m| m.delta.others);
                let quieter = match (&best, &m) {
                    (Some(Ok(b)), Ok(m)) => m.delta.others < b.delta.others,
                    (Some(Ok(_)), Err(_)) => false,
                    _ => true,
                };
                if quieter {
                    best = Some(m);
                }
                if others <= QUIET_OTHERS || tries == max_tries {
                    break;
                }
                progress(format!(
                    "{}: {}: other processes used {others:.0}% of the machine; running it again",
                    spec.name,
                    col.title()
                ));
            }
            if let Some(m) = best {
                results.push((col, m));
            }
        }
        let mut t = load_table(title, spec, &results);
        targets::load(&mut t, spec.name, &results);
        self.load_charts(&mut t, spec.name, title, &results);
        t
    }

    /// The scenario's latency and CPU charts; their paths go under the table.
    fn load_charts(
        &self,
        t: &mut Table,
        name: &str,
        title: &str,
        results: &[(Col, Result<Measure, String>)],
    ) {
        let ok: Vec<(Col, &Measure)> = results
            .iter()
            .filter_map(|(c, r)| Some((*c, r.as_ref().ok()?)))
            .filter(|(_, m)| m.totals.events > 0)
            .collect();
        let curves: Vec<charts::Curve> = ok
            .iter()
            .map(|(c, m)| charts::Curve {
                name: c.title(),
                color: charts::color(c.index()),
                sorted_us: &m.totals.lat_us,
            })
            .collect();
        let bars: Vec<charts::Bar> = ok
            .iter()
            .filter(|(c, _)| *c != Col::Direct)
            .map(|(c, m)| charts::Bar {
                name: c.title(),
                color: charts::color(c.index()),
                parts: vec![
                    per_event_us(m.delta.proxy, m.totals.events),
                    if *c == Col::Redis {
                        per_event_us(m.delta.redis, m.totals.events)
                    } else {
                        0.0
                    },
                ],
            })
            .collect();
        let lat = self.charts.join(format!("{name}-latency.svg"));
        let cpu = self.charts.join(format!("{name}-cpu.svg"));
        let written = [
            charts::latency(
                &lat,
                &format!("{title}: per-event latency (upstream send → client receive)"),
                &curves,
            )
            .map(|()| lat),
            charts::bars(
                &cpu,
                &format!("{title}: CPU per event"),
                "CPU µs per event",
                &["proxy", "Redis"],
                &bars,
                None,
            )
            .map(|()| cpu),
        ];
        chart_note(t, written);
    }

    fn load_column(&mut self, spec: &LoadSpec, col: Col) -> Result<Measure, String> {
        let u = self.setup(col)?;
        self.warm_up(&u, spec.size)?;
        let deadline =
            Duration::from_micros(spec.interval_us * spec.events) + Duration::from_secs(120);
        let jobs: Vec<Job> = (0..spec.total)
            .map(|k| Job {
                addr: u.addr,
                path: format!(
                    "/sse?n={}&interval_us={}&size={}&tag={k}",
                    spec.events, spec.interval_us, spec.size
                ),
                tag: k as u64,
                n: spec.events,
                deadline,
            })
            .collect();
        let stagger = Duration::from_micros(spec.interval_us);
        let perf = self.perf_start(&format!("{}-{}", spec.name, col.key()), &u);
        let a = self.snap(&u);
        let results = self.rt.block_on(client::run_many(
            Arc::new(jobs),
            spec.concurrency,
            stagger,
            true,
        ));
        let b = self.snap(&u);
        if let Some(p) = perf {
            p.interrupt_and_wait();
        }
        Ok(Measure {
            totals: Totals::of(results),
            delta: Self::delta(&a, &b),
            hwm_kib: u.mem_pid.and_then(|p| procs::status_kib(p, "VmHWM")),
            tries: 1,
        })
    }

    // ------------------------------------------------ resume storm

    fn storm(&mut self, events: u64, clients: usize) -> Table {
        let mut hot: Vec<(Col, Result<Measure, String>)> = Vec::new();
        let mut cold: Option<Result<Measure, String>> = None;
        for col in [Col::Redis, Col::Embedded] {
            if !self.args.cols.contains(&col) {
                continue;
            }
            progress(format!("resume-storm: {}", col.title()));
            match self.storm_column(col, events, clients) {
                Ok((h, c)) => {
                    hot.push((col, Ok(h)));
                    if c.is_some() {
                        cold = c;
                    }
                }
                Err(e) => hot.push((col, Err(e))),
            }
        }
        storm_table(events, clients, &hot, cold.as_ref())
    }

    /// Records one stream through a fresh Reprise, then storms it there
    /// (hot: still in that instance's memory) and, with Redis, from a second
    /// instance that never saw it (cold: it must come from Redis).
    fn storm_column(
        &mut self,
        col: Col,
        events: u64,
        clients: usize,
    ) -> Result<(Measure, Option<Result<Measure, String>>), String> {
        let u = self.setup(col)?;
        self.warm_up(&u, 150)?;
        let tag = 1_000_000;
        let rec = Job {
            addr: u.addr,
            path: format!("/sse?n={events}&interval_us=0&size=150&tag={tag}"),
            tag,
            n: events,
            deadline: Duration::from_secs(120),
        };
        let r = self.rt.block_on(client::run_stream(
            &rec,
            client::source_ip(0),
            false,
            Hooks::default(),
        ));
        let id = check_recording(&r)?;
        wait_finished(u.addr, &id, events)?;
        if col == Col::Redis {
            // The end is in memory first: let the writer's last append land.
            self.wait_redis_quiet();
        }
        let hot = self.storm_once(
            &u,
            &id,
            tag,
            events,
            clients,
            &format!("resume-storm-{}", col.key()),
        )?;
        drop(u);
        let cold = (col == Col::Redis).then(|| {
            progress("resume-storm: Reprise → Redis, a fresh instance");
            self.runs += 1;
            let name = format!("reprise-redis-cold-{}", self.runs);
            let (p, addr) = procs::start_reprise(
                &self.reprise_bin,
                self.dir.path(),
                &name,
                self.up_addr,
                ReprisePlan::Redis(self.redis.addr),
            )?;
            let u2 = Under {
                col,
                addr,
                cpu_pids: vec![p.pid()],
                mem_pid: Some(p.pid()),
                _keep: Keep::Proc(p),
            };
            wait_finished(addr, &id, events)?;
            self.storm_once(&u2, &id, tag, events, clients, "resume-storm-redis-cold")
        });
        Ok((hot, cold))
    }

    /// Waits (at most 10 s) until Redis's command counters stop moving.
    fn wait_redis_quiet(&self) {
        let calls = || self.redis.commandstats().values().map(|v| v.0).sum::<u64>();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut last = calls();
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
            let now = calls();
            if now == last {
                return;
            }
            last = now;
        }
    }

    fn storm_once(
        &self,
        u: &Under,
        id: &str,
        tag: u64,
        events: u64,
        clients: usize,
        label: &str,
    ) -> Result<Measure, String> {
        let jobs: Vec<Job> = (0..clients)
            .map(|_| Job {
                addr: u.addr,
                path: format!("/_reprise/streams/{id}"),
                tag,
                n: events,
                deadline: Duration::from_secs(600),
            })
            .collect();
        let perf = self.perf_start(label, u);
        let a = self.snap(u);
        let results = self.rt.block_on(client::run_many(
            Arc::new(jobs),
            clients,
            Duration::ZERO,
            false,
        ));
        let b = self.snap(u);
        if let Some(p) = perf {
            p.interrupt_and_wait();
        }
        Ok(Measure {
            totals: Totals::of(results),
            delta: Self::delta(&a, &b),
            hwm_kib: u.mem_pid.and_then(|p| procs::status_kib(p, "VmHWM")),
            tries: 1,
        })
    }

    // ------------------------------------------------ idle

    fn idle(&mut self, streams: usize, per_stream: usize, proxied: usize) -> Table {
        let mut results = Vec::new();
        for col in Col::ALL {
            if !self.args.cols.contains(&col) {
                continue;
            }
            progress(format!("idle: {}", col.title()));
            results.push((col, self.idle_column(col, streams, per_stream, proxied)));
        }
        idle_table(streams, per_stream, proxied, &results)
    }

    fn idle_column(
        &mut self,
        col: Col,
        streams: usize,
        per_stream: usize,
        proxied: usize,
    ) -> Result<IdleMeasure, String> {
        let u = self.setup(col)?;
        self.warm_up(&u, 150)?;
        let recording = matches!(col, Col::Redis | Col::Embedded);
        let rss = || u.mem_pid.and_then(|p| procs::status_kib(p, "VmRSS"));
        let redis_clients = || (col == Col::Redis).then(|| self.redis.connected_clients());
        let held = |k: usize| Job {
            addr: u.addr,
            path: format!("/sse?hold=1&n=1&size=150&tag={k}"),
            tag: k as u64,
            n: 1,
            deadline: Duration::from_secs(600),
        };
        let sem = Arc::new(tokio::sync::Semaphore::new(CONNECT_CONCURRENCY));
        let connected = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();

        // Recording columns: the live streams the readers will wait on.
        let mut ids = Vec::new();
        if recording {
            let mut rxs = Vec::new();
            for k in 0..streams {
                let (tx, rx) = tokio::sync::oneshot::channel();
                let job = held(k);
                let permit = self
                    .rt
                    .block_on(sem.clone().acquire_owned())
                    .map_err(|e| e.to_string())?;
                let hooks = Hooks {
                    on_headers: Some(tx),
                    permit: Some(permit),
                    ..Hooks::default()
                };
                tasks.push(self.rt.spawn(async move {
                    client::run_stream(&job, client::source_ip(k), true, hooks).await
                }));
                rxs.push(rx);
            }
            for rx in rxs {
                match self.rt.block_on(rx) {
                    Ok((200, Some(id))) => ids.push(id),
                    other => {
                        let _ = procs::http_request(self.up_addr, "POST", "/release");
                        return Err(format!("a live stream did not start: {other:?}"));
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_millis(500));
        let rss_before = rss();
        let clients_before = redis_clients();

        let conns = if recording {
            streams * per_stream
        } else {
            proxied
        };
        let t0 = Instant::now();
        let overflows0 = procs::listen_overflows();
        for j in 0..conns {
            let job = if recording {
                let k = j % streams;
                Job {
                    addr: u.addr,
                    path: format!("/_reprise/streams/{}", ids[k]),
                    tag: k as u64,
                    n: 1,
                    deadline: Duration::from_secs(600),
                }
            } else {
                held(streams + j)
            };
            let permit = self
                .rt
                .block_on(sem.clone().acquire_owned())
                .map_err(|e| e.to_string())?;
            let hooks = Hooks {
                connected: Some(connected.clone()),
                permit: Some(permit),
                ..Hooks::default()
            };
            let src = client::source_ip(streams + j);
            tasks.push(
                self.rt
                    .spawn(async move { client::run_stream(&job, src, true, hooks).await }),
            );
        }
        let deadline = Instant::now() + Duration::from_secs(180);
        while connected.load(Ordering::Relaxed) < conns && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let all_connected = connected.load(Ordering::Relaxed);
        let connect_wall = t0.elapsed();
        let connect_overflows = procs::listen_overflows().saturating_sub(overflows0);
        std::thread::sleep(Duration::from_secs(1));
        let rss_with = rss();
        let clients_with = redis_clients();

        let a = self.snap(&u);
        procs::http_request(self.up_addr, "POST", "/release")
            .map_err(|e| format!("releasing the upstream: {e}"))?;
        let results: Vec<StreamResult> = self.rt.block_on(async {
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await.unwrap_or_else(|e| StreamResult {
                    error: Some(format!("client task failed: {e}")),
                    ..StreamResult::default()
                }));
            }
            out
        });
        let b = self.snap(&u);
        Ok(IdleMeasure {
            conns,
            all_connected,
            connect_wall,
            connect_overflows,
            rss_before,
            rss_with,
            clients_before,
            clients_with,
            totals: Totals::of(results),
            release: Self::delta(&a, &b),
            hwm_kib: u.mem_pid.and_then(|p| procs::status_kib(p, "VmHWM")),
        })
    }
}

// ------------------------------------------------ open recorded streams

/// Releases every held upstream stream when dropped, so that a scenario
/// that fails half-way leaves nothing held for the next one.
struct ReleaseOnDrop(SocketAddr);

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        let _ = procs::http_request(self.0, "POST", "/release");
    }
}

impl Bench {
    /// Many streams open at once, each idle after its first event: what an
    /// open stream costs in memory, Reprise (recording or not) against nginx.
    fn open(&mut self, streams: usize) -> Table {
        let mut results = Vec::new();
        for col in Col::ALL {
            // Direct has no proxy whose memory to measure.
            if col == Col::Direct || !self.args.cols.contains(&col) {
                continue;
            }
            progress(format!("open: {}", col.title()));
            results.push((col, self.open_column(col, streams)));
        }
        let mut t = open_table(streams, &results);
        targets::open(&mut t, &results);
        let bars: Vec<charts::Bar> = results
            .iter()
            .filter_map(|(c, r)| {
                Some(charts::Bar {
                    name: c.title(),
                    color: charts::color(c.index()),
                    parts: vec![r.as_ref().ok()?.rss_per_stream_kib()?],
                })
            })
            .collect();
        let nginx = results
            .iter()
            .find(|(c, _)| *c == Col::Nginx)
            .and_then(|(_, r)| r.as_ref().ok()?.rss_per_stream_kib());
        let path = self.charts.join("open-rss.svg");
        let drawn = charts::bars(
            &path,
            &format!(
                "open: RSS per open stream, {} streams idle after their first event",
                thousands(streams as u64)
            ),
            "KiB per open stream",
            &["RSS"],
            &bars,
            nginx.map(|n| (1.5 * n, "target: 1.5 × nginx".to_string())),
        )
        .map(|()| path);
        chart_note(&mut t, [drawn]);
        t
    }

    fn open_column(&mut self, col: Col, streams: usize) -> Result<OpenMeasure, String> {
        let u = self.setup(col)?;
        self.warm_up(&u, 150)?;
        let rss = || u.mem_pid.and_then(|p| procs::status_kib(p, "VmRSS"));
        std::thread::sleep(Duration::from_millis(500));
        let rss_before = rss();
        let release = ReleaseOnDrop(self.up_addr);
        let sem = Arc::new(tokio::sync::Semaphore::new(CONNECT_CONCURRENCY));
        let first = Arc::new(AtomicUsize::new(0));
        let a = self.snap(&u);
        let mut tasks = Vec::with_capacity(streams);
        for k in 0..streams {
            // Event 0 at once, then nothing until the release; event 1 after.
            let job = Job {
                addr: u.addr,
                path: format!("/sse?hold_at=1&n=2&size=150&tag={k}"),
                tag: k as u64,
                n: 2,
                deadline: Duration::from_secs(600),
            };
            let permit = self
                .rt
                .block_on(sem.clone().acquire_owned())
                .map_err(|e| e.to_string())?;
            let hooks = Hooks {
                permit: Some(permit),
                first_event: Some(first.clone()),
                ..Hooks::default()
            };
            let src = client::source_ip(k);
            tasks.push(
                self.rt
                    .spawn(async move { client::run_stream(&job, src, true, hooks).await }),
            );
        }
        // Until every stream has its first event, or has ended without it.
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let ended = tasks.iter().filter(|t| t.is_finished()).count();
            if first.load(Ordering::Relaxed) + ended >= streams || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let b = self.snap(&u);
        let first_events = first.load(Ordering::Relaxed);
        // Let the proxy settle (buffers returned, writers idle) before reading RSS.
        std::thread::sleep(Duration::from_secs(1));
        let rss_with = rss();
        let hwm_kib = u.mem_pid.and_then(|p| procs::status_kib(p, "VmHWM"));
        drop(release);
        let results: Vec<StreamResult> = self.rt.block_on(async {
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await.unwrap_or_else(|e| StreamResult {
                    error: Some(format!("client task failed: {e}")),
                    ..StreamResult::default()
                }));
            }
            out
        });
        Ok(OpenMeasure {
            streams,
            first_events,
            opening: Self::delta(&a, &b),
            rss_before,
            rss_with,
            hwm_kib,
            totals: Totals::of(results),
        })
    }
}

/// The open-streams scenario's figures for one column.
pub struct OpenMeasure {
    streams: usize,
    /// Streams whose first event arrived while all were open.
    first_events: usize,
    /// From the first connect to the last first event.
    opening: Delta,
    rss_before: Option<u64>,
    rss_with: Option<u64>,
    /// Peak RSS with the streams open.
    hwm_kib: Option<u64>,
    /// Every stream, after the release (two events each).
    totals: Totals,
}

impl OpenMeasure {
    /// (RSS with every stream open − RSS before) / streams, in KiB; only
    /// when every stream got its first event.
    fn rss_per_stream_kib(&self) -> Option<f64> {
        if self.streams == 0 || self.first_events < self.streams {
            return None;
        }
        let (a, b) = (self.rss_before?, self.rss_with?);
        Some(b.saturating_sub(a) as f64 / self.streams as f64)
    }
}

/// The recorded stream's id, if it was recorded whole.
fn check_recording(r: &StreamResult) -> Result<String, String> {
    if let Some(e) = &r.error {
        return Err(format!("recording the stream failed: {e}"));
    }
    if r.lost + r.dup + r.foreign > 0 {
        return Err(format!(
            "recording the stream: lost {} dup {} foreign {}",
            r.lost, r.dup, r.foreign
        ));
    }
    r.stream_id
        .clone()
        .ok_or_else(|| "no Reprise-Stream-Id header".into())
}

/// Waits until the stream's end is visible through `addr`: a resume after
/// its last event answers `204`.
fn wait_finished(addr: SocketAddr, id: &str, events: u64) -> Result<(), String> {
    let path = format!("/_reprise/streams/{id}?start_index={events}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match procs::http_request(addr, "GET", &path) {
            Ok((204, _)) => return Ok(()),
            other if Instant::now() > deadline => {
                return Err(format!("stream {id} not finished in the store: {other:?}"))
            }
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

// ------------------------------------------------------------ tables

fn columns() -> Vec<String> {
    Col::ALL.iter().map(|c| c.title().to_string()).collect()
}

/// A row with one cell per column, `NA` where the column was not run.
fn cells<T>(results: &[(Col, Result<T, String>)], f: impl Fn(Col, &T) -> String) -> Vec<String> {
    Col::ALL
        .iter()
        .map(|c| match results.iter().find(|(col, _)| col == c) {
            Some((_, Ok(m))) => f(*c, m),
            Some((_, Err(_))) => "failed".into(),
            None => NA.into(),
        })
        .collect()
}

fn error_notes<T>(table: &mut Table, results: &[(Col, Result<T, String>)]) {
    for (col, r) in results {
        if let Err(e) = r {
            table.note(format!("**{}** failed or was skipped: {e}", col.title()));
        }
    }
}

fn load_table(title: &str, spec: &LoadSpec, results: &[(Col, Result<Measure, String>)]) -> Table {
    let mut t = Table::new(format!("{title} — {}", spec.describe()), columns());
    let proxy = |c: Col| c != Col::Direct;
    t.row(
        "streams complete",
        cells(results, |_, m| {
            format!("{}/{}", m.totals.complete, m.totals.streams)
        }),
    );
    t.row(
        "events received",
        cells(results, |_, m| thousands(m.totals.events)),
    );
    t.row(
        "events/s",
        cells(results, |_, m| {
            thousands(rate(m.totals.events as f64, m.delta.wall) as u64)
        }),
    );
    t.row(
        "MB/s",
        cells(results, |_, m| {
            format!("{:.2}", rate(m.totals.bytes as f64, m.delta.wall) / 1e6)
        }),
    );
    t.row(
        "latency p50 / p99 / max (ms)",
        cells(results, |_, m| ms3(&m.totals.lat_us)),
    );
    t.row(
        "time to first event p50 / p99 (ms)",
        cells(results, |_, m| ms2(&m.totals.ttfe_us)),
    );
    t.row(
        "proxy CPU µs/event",
        cells(results, |c, m| {
            if proxy(c) {
                us_per(m.delta.proxy, m.totals.events)
            } else {
                NA.into()
            }
        }),
    );
    t.row(
        "Redis CPU µs/event",
        cells(results, |c, m| {
            if c == Col::Redis {
                us_per(m.delta.redis, m.totals.events)
            } else {
                NA.into()
            }
        }),
    );
    t.row(
        "proxy + Redis CPU µs/event",
        cells(results, |c, m| match c {
            Col::Direct => NA.into(),
            Col::Redis => us_per(m.delta.proxy + m.delta.redis, m.totals.events),
            _ => us_per(m.delta.proxy, m.totals.events),
        }),
    );
    t.row(
        "proxy write(v) syscalls per event",
        cells(results, |c, m| {
            if c == Col::Direct || m.totals.events == 0 {
                return NA.into();
            }
            format!("{:.2}", m.delta.io.1 as f64 / m.totals.events as f64)
        }),
    );
    t.row(
        "proxy peak RSS, VmHWM (MiB)",
        cells(results, |_, m| mib(m.hwm_kib)),
    );
    t.row(
        "Redis commands/event (FCALLs/event)",
        cells(results, |c, m| {
            if c != Col::Redis || m.totals.events == 0 {
                return NA.into();
            }
            let ev = m.totals.events as f64;
            let fcall = m.delta.cmds.get("fcall").copied().unwrap_or(0) as f64;
            format!(
                "{:.3} ({:.3})",
                m.delta.redis_calls() as f64 / ev,
                fcall / ev
            )
        }),
    );
    t.row(
        "lost / duplicated",
        cells(results, |_, m| {
            let f = if m.totals.foreign > 0 {
                format!(" / {} foreign", m.totals.foreign)
            } else {
                String::new()
            };
            format!("{} / {}{f}", m.totals.lost, m.totals.dup)
        }),
    );
    t.row(
        "SYNs dropped, full accept queue (machine-wide)",
        cells(results, |_, m| thousands(m.delta.overflows)),
    );
    t.row(
        "upstream CPU µs/event",
        cells(results, |_, m| us_per(m.delta.upstream, m.totals.events)),
    );
    t.row(
        "load generator CPU µs/event",
        cells(results, |_, m| us_per(m.delta.gen, m.totals.events)),
    );
    t.row(
        "machine CPU busy, all cores (other processes)",
        cells(results, |_, m| {
            format!("{:.0}% ({:.0}%)", m.delta.busy, m.delta.others)
        }),
    );
    t.row(
        "wall time (s)",
        cells(results, |_, m| format!("{:.1}", m.delta.wall.as_secs_f64())),
    );
    t.row(
        "runs (quietest kept)",
        cells(results, |_, m| m.tries.to_string()),
    );
    t.note(format!(
        "A column whose window saw other processes use more than {QUIET_OTHERS:.0}% of the machine was run again (at most {MAX_TRIES} runs); the table shows its quietest run (`--quick`: one run)."
    ));
    for (col, r) in results {
        if let (Col::Redis, Ok(m)) = (col, r) {
            t.note(format!(
                "Redis commands in the {} column: {}.",
                col.title(),
                m.delta.cmd_breakdown(12)
            ));
        }
        if let Ok(m) = r {
            if let Some(e) = m.totals.error_summary() {
                t.note(format!("**{}** stream errors: {e}", col.title()));
            }
        }
    }
    error_notes(&mut t, results);
    t
}

fn storm_table(
    events: u64,
    clients: usize,
    hot: &[(Col, Result<Measure, String>)],
    cold: Option<&Result<Measure, String>>,
) -> Table {
    let mut cols = columns();
    cols.push("Reprise → Redis, fresh instance".into());
    let mut t = Table::new(
        format!(
            "resume storm — one finished stream of {} events (150 bytes) recorded through Reprise, then {} clients resume it at once via GET /_reprise/streams/{{id}}",
            thousands(events),
            thousands(clients as u64)
        ),
        cols,
    );
    let row = |f: &dyn Fn(Col, &Measure) -> String| {
        let mut v = cells(hot, f);
        v.push(match cold {
            Some(Ok(m)) => f(Col::Redis, m),
            Some(Err(_)) => "failed".into(),
            None => NA.into(),
        });
        v
    };
    t.row(
        "clients complete",
        row(&|_, m| format!("{}/{}", m.totals.complete, m.totals.streams)),
    );
    t.row("events replayed", row(&|_, m| thousands(m.totals.events)));
    t.row(
        "storm wall time (s)",
        row(&|_, m| format!("{:.2}", m.delta.wall.as_secs_f64())),
    );
    t.row(
        "replayed events/s",
        row(&|_, m| thousands(rate(m.totals.events as f64, m.delta.wall) as u64)),
    );
    t.row(
        "MB/s",
        row(&|_, m| format!("{:.1}", rate(m.totals.bytes as f64, m.delta.wall) / 1e6)),
    );
    t.row(
        "time to first event p50 / p99 (ms)",
        row(&|_, m| ms2(&m.totals.ttfe_us)),
    );
    t.row(
        "Reprise CPU µs per replayed event",
        row(&|_, m| format!("{:.3}", per_event_us(m.delta.proxy, m.totals.events))),
    );
    t.row(
        "Redis CPU µs per replayed event",
        row(&|c, m| {
            if c == Col::Redis {
                format!("{:.3}", per_event_us(m.delta.redis, m.totals.events))
            } else {
                NA.into()
            }
        }),
    );
    t.row(
        "Redis commands during the storm",
        row(&|c, m| {
            if c == Col::Redis {
                thousands(m.delta.redis_calls())
            } else {
                NA.into()
            }
        }),
    );
    t.row(
        "Reprise write(v) syscalls per replayed event",
        row(&|_, m| format!("{:.4}", m.delta.io.1 as f64 / m.totals.events.max(1) as f64)),
    );
    t.row(
        "SYNs dropped, full accept queue (machine-wide)",
        row(&|_, m| thousands(m.delta.overflows)),
    );
    t.row("Reprise peak RSS, VmHWM (MiB)", row(&|_, m| mib(m.hwm_kib)));
    t.row(
        "lost / duplicated",
        row(&|_, m| format!("{} / {}", m.totals.lost, m.totals.dup)),
    );
    t.row(
        "load generator CPU µs/event",
        row(&|_, m| format!("{:.3}", per_event_us(m.delta.gen, m.totals.events))),
    );
    t.row(
        "machine CPU busy, all cores (other processes)",
        row(&|_, m| format!("{:.0}% ({:.0}%)", m.delta.busy, m.delta.others)),
    );
    t.note("Direct, pass-through and nginx record nothing, so there is nothing to resume (–). \"Fresh instance\" is a second Reprise process on the same Redis that never saw the stream: it must read it from Redis.");
    for (col, r) in hot
        .iter()
        .map(|(c, r)| (c.title(), r))
        .chain(cold.map(|r| ("Reprise → Redis, fresh instance", r)))
    {
        if let Ok(m) = r {
            if col.contains("Redis") {
                t.note(format!(
                    "Redis commands during the storm, {col}: {}.",
                    m.delta.cmd_breakdown(12)
                ));
            }
            if let Some(e) = m.totals.error_summary() {
                t.note(format!("**{col}** client errors: {e}"));
            }
        }
    }
    error_notes(&mut t, hot);
    if let Some(Err(e)) = cold {
        t.note(format!("**fresh instance** failed: {e}"));
    }
    t
}

/// A note under the table naming the charts written (or why not).
fn chart_note(t: &mut Table, written: impl IntoIterator<Item = Result<PathBuf, String>>) {
    let v: Vec<String> = written
        .into_iter()
        .map(|r| match r {
            Ok(p) => format!("`{}`", p.display()),
            Err(e) => format!("not drawn ({e})"),
        })
        .collect();
    t.note(format!("Charts: {}.", v.join(", ")));
}

fn per_event_us(cpu: Duration, events: u64) -> f64 {
    if events == 0 {
        return 0.0;
    }
    cpu.as_secs_f64() * 1e6 / events as f64
}

/// The idle scenario's figures for one column.
struct IdleMeasure {
    conns: usize,
    all_connected: usize,
    connect_wall: Duration,
    /// SYNs dropped on full accept queues while connecting (machine-wide).
    connect_overflows: u64,
    rss_before: Option<u64>,
    rss_with: Option<u64>,
    clients_before: Option<u64>,
    clients_with: Option<u64>,
    /// Every stream after the release (one event each).
    totals: Totals,
    /// From the release to the last stream's end.
    release: Delta,
    hwm_kib: Option<u64>,
}

fn open_table(streams: usize, results: &[(Col, Result<OpenMeasure, String>)]) -> Table {
    let mut t = Table::new(
        format!(
            "open — {} streams open at once, each upstream idle after its first event (150 bytes), connection kept open; then one more event each",
            thousands(streams as u64)
        ),
        columns(),
    );
    let nginx = results
        .iter()
        .find(|(c, _)| *c == Col::Nginx)
        .and_then(|(_, r)| r.as_ref().ok()?.rss_per_stream_kib());
    t.row(
        "streams open with their first event",
        cells(results, |_, m| {
            format!(
                "{}/{}",
                thousands(m.first_events as u64),
                thousands(m.streams as u64)
            )
        }),
    );
    t.row(
        "all first events in after (s)",
        cells(results, |_, m| {
            format!("{:.1}", m.opening.wall.as_secs_f64())
        }),
    );
    t.row(
        "time to first event p50 / p99 (ms)",
        cells(results, |_, m| ms2(&m.totals.ttfe_us)),
    );
    t.row(
        "proxy RSS before (MiB)",
        cells(results, |_, m| mib(m.rss_before)),
    );
    t.row(
        "proxy RSS with the streams open (MiB)",
        cells(results, |_, m| mib(m.rss_with)),
    );
    t.row(
        "RSS per open stream (KiB)",
        cells(results, |_, m| {
            m.rss_per_stream_kib()
                .map_or(NA.into(), |k| format!("{k:.1}"))
        }),
    );
    t.row(
        "RSS per open stream ÷ nginx's",
        cells(results, |_, m| match (m.rss_per_stream_kib(), nginx) {
            (Some(k), Some(n)) if n > 0.0 => format!("{:.2}×", k / n),
            _ => NA.into(),
        }),
    );
    t.row(
        "proxy CPU while opening (ms)",
        cells(results, |_, m| {
            format!("{:.0}", m.opening.proxy.as_secs_f64() * 1e3)
        }),
    );
    t.row(
        "Redis CPU while opening (ms)",
        cells(results, |c, m| {
            if c == Col::Redis {
                format!("{:.0}", m.opening.redis.as_secs_f64() * 1e3)
            } else {
                NA.into()
            }
        }),
    );
    t.row(
        "SYNs dropped while opening (machine-wide)",
        cells(results, |_, m| thousands(m.opening.overflows)),
    );
    t.row(
        "proxy peak RSS, VmHWM (MiB)",
        cells(results, |_, m| mib(m.hwm_kib)),
    );
    t.row(
        "after the release: streams complete",
        cells(results, |_, m| {
            format!(
                "{}/{}",
                thousands(m.totals.complete),
                thousands(m.totals.streams)
            )
        }),
    );
    t.row(
        "lost / duplicated",
        cells(results, |_, m| {
            format!("{} / {}", m.totals.lost, m.totals.dup)
        }),
    );
    t.row(
        "machine CPU busy while opening (other processes)",
        cells(results, |_, m| {
            format!("{:.0}% ({:.0}%)", m.opening.busy, m.opening.others)
        }),
    );
    t.note("RSS per open stream = (the proxy's VmRSS with every stream open and its first event received, 1 s after the last first event − VmRSS before the first connect) / streams; nginx: its worker. At most 256 connections are being opened at once. Direct has no proxy (–). RSS per stream is given only when every stream got its first event.");
    for (col, r) in results {
        if let Ok(m) = r {
            if let Some(e) = m.totals.error_summary() {
                t.note(format!("**{}** stream errors: {e}", col.title()));
            }
        }
    }
    error_notes(&mut t, results);
    t
}

fn idle_table(
    streams: usize,
    per_stream: usize,
    proxied: usize,
    results: &[(Col, Result<IdleMeasure, String>)],
) -> Table {
    let mut t = Table::new(
        format!(
            "idle — recording columns: {} readers ({} live streams × {}) resuming via /_reprise/streams/{{id}}; other columns: {} proxied streams; the upstream sends nothing, then one event per stream",
            thousands((streams * per_stream) as u64),
            streams,
            per_stream,
            thousands(proxied as u64)
        ),
        columns(),
    );
    t.row(
        "connections held",
        cells(results, |_, m| {
            format!(
                "{}/{}",
                thousands(m.all_connected as u64),
                thousands(m.conns as u64)
            )
        }),
    );
    t.row(
        "all connected after (s)",
        cells(results, |_, m| {
            format!("{:.1}", m.connect_wall.as_secs_f64())
        }),
    );
    t.row(
        "proxy RSS before (MiB)",
        cells(results, |_, m| mib(m.rss_before)),
    );
    t.row(
        "proxy RSS with the connections (MiB)",
        cells(results, |_, m| mib(m.rss_with)),
    );
    t.row(
        "RSS per held connection (KiB)",
        cells(results, |_, m| match (m.rss_before, m.rss_with) {
            (Some(a), Some(b)) if m.conns > 0 => {
                format!("{:.1}", b.saturating_sub(a) as f64 / m.conns as f64)
            }
            _ => NA.into(),
        }),
    );
    t.row(
        "Redis client connections: before → with readers",
        cells(results, |_, m| match (m.clients_before, m.clients_with) {
            (Some(a), Some(b)) => format!("{a} → {b}"),
            _ => NA.into(),
        }),
    );
    t.row(
        "SYNs dropped while connecting (machine-wide)",
        cells(results, |_, m| thousands(m.connect_overflows)),
    );
    t.row(
        "time to response headers p50 / p99 (ms)",
        cells(results, |_, m| ms2(&m.totals.ttfh_us)),
    );
    t.row(
        "after the release: latency p50 / p99 / max (ms)",
        cells(results, |_, m| ms3(&m.totals.lat_us)),
    );
    t.row(
        "streams complete",
        cells(results, |_, m| {
            format!(
                "{}/{}",
                thousands(m.totals.complete),
                thousands(m.totals.streams)
            )
        }),
    );
    t.row(
        "lost / duplicated",
        cells(results, |_, m| {
            format!("{} / {}", m.totals.lost, m.totals.dup)
        }),
    );
    t.row(
        "proxy CPU from the release to the end (ms)",
        cells(results, |c, m| {
            if c == Col::Direct {
                NA.into()
            } else {
                format!("{:.0}", m.release.proxy.as_secs_f64() * 1e3)
            }
        }),
    );
    t.row(
        "proxy peak RSS, VmHWM (MiB)",
        cells(results, |_, m| mib(m.hwm_kib)),
    );
    t.note(format!(
        "Each proxied stream costs a proxy two sockets and the hard limit on open files here is 20,000 per process, so the pass-through and nginx columns hold {} streams. The recording columns' RSS before is with the {streams} live streams open and no reader; their rows after the release include those {streams} original clients.",
        thousands(proxied as u64)
    ));
    for (col, r) in results {
        if let Ok(m) = r {
            if let Some(e) = m.totals.error_summary() {
                t.note(format!("**{}** stream errors: {e}", col.title()));
            }
        }
    }
    error_notes(&mut t, results);
    t
}
