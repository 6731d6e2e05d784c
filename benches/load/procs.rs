//! The processes under measurement (Redis, Reprise, nginx, the mock
//! upstream), how they are started on free ports, and the figures read from
//! `/proc`: CPU time from `/proc/<pid>/stat`, RSS from `/proc/<pid>/status`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How long a started server gets to answer before the benchmark gives up.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A port nobody listens on right now (the OS picks it; a tiny race remains).
pub fn free_port() -> Result<u16, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port: {e}"))
}

/// A child process killed (and reaped) when dropped.
pub struct Proc {
    pub name: String,
    child: Child,
    log: Option<PathBuf>,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command, log: Option<PathBuf>) -> Result<Proc, String> {
        if let Some(path) = &log {
            let out = fs::File::create(path)
                .map_err(|e| format!("{name}: log file {}: {e}", path.display()))?;
            let err = out.try_clone().map_err(|e| format!("{name}: {e}"))?;
            cmd.stdout(out).stderr(err);
        } else {
            cmd.stdout(Stdio::null()).stderr(Stdio::inherit());
        }
        cmd.stdin(Stdio::null());
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {name}: {e}"))?;
        Ok(Proc {
            name: name.to_string(),
            child,
            log,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGINT and waits for the exit (perf writes its data file then).
    pub fn interrupt_and_wait(mut self) {
        let _ = Command::new("kill")
            .args(["-INT", &self.pid().to_string()])
            .status();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits up to `grace` for the exit; true if it exited.
    pub fn terminate(&mut self, grace: Duration) -> bool {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    /// `Some(reason)` if the process already exited, with the end of its log.
    pub fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(format!(
                "{} exited ({status}){}",
                self.name,
                self.log_tail()
            )),
            _ => None,
        }
    }

    fn log_tail(&self) -> String {
        let Some(path) = &self.log else {
            return String::new();
        };
        let text = fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(8)..].join("\n  ");
        format!("; log {}:\n  {tail}", path.display())
    }

    /// Waits until `ready` holds, failing if the process dies or time runs out.
    pub fn wait_until(
        &mut self,
        what: &str,
        mut ready: impl FnMut() -> bool,
    ) -> Result<(), String> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if ready() {
                return Ok(());
            }
            if let Some(why) = self.exited() {
                return Err(why);
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{}: {what} not ready after {START_TIMEOUT:?}{}",
                    self.name,
                    self.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Clock ticks per second of `/proc/<pid>/stat` times.
fn clk_tck() -> u64 {
    static TCK: OnceLock<u64> = OnceLock::new();
    *TCK.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100)
    })
}

/// Fields of `/proc/<pid>/stat` after the command name (field 3 first).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &text[text.rfind(')')? + 1..];
    Some(after.split_whitespace().map(String::from).collect())
}

/// User + system CPU time of a process (all its threads, dead ones included).
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let f = stat_fields(pid)?;
    // utime and stime are fields 14 and 15 of the line, 11 and 12 here.
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_nanos(ticks * 1_000_000_000 / clk_tck()))
}

/// Summed CPU time of several processes (0 for those that are gone).
pub fn cpu_sum(pids: &[u32]) -> Duration {
    pids.iter().filter_map(|p| cpu_time(*p)).sum()
}

/// A `kB` field of `/proc/<pid>/status` (`VmRSS`, `VmHWM`), in KiB.
pub fn status_kib(pid: u32, key: &str) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Read and write system calls of a process so far (`syscr`, `syscw` of
/// `/proc/<pid>/io`). They count read/readv and write/writev, not
/// recv/send: a proxy's socket reads (recv) do not show here, its writev
/// calls do.
pub fn io_calls(pid: u32) -> Option<(u64, u64)> {
    let text = fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    let get = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.trim().parse::<u64>().ok())
    };
    Some((get("syscr:")?, get("syscw:")?))
}

/// Summed `io_calls` of several processes.
pub fn io_calls_sum(pids: &[u32]) -> (u64, u64) {
    pids.iter()
        .filter_map(|p| io_calls(*p))
        .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
}

/// `TcpExt: ListenOverflows` of `/proc/net/netstat`: SYNs dropped because a
/// listener's accept queue was full (machine-wide, since boot).
pub fn listen_overflows() -> u64 {
    let text = fs::read_to_string("/proc/net/netstat").unwrap_or_default();
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "ListenOverflows")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// Busy and total jiffies of the whole machine, from `/proc/stat`.
pub fn machine_ticks() -> (u64, u64) {
    let text = fs::read_to_string("/proc/stat").unwrap_or_default();
    let nums: Vec<u64> = text
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = nums.iter().sum();
    let idle = nums.get(3).copied().unwrap_or(0) + nums.get(4).copied().unwrap_or(0);
    (total.saturating_sub(idle), total)
}

/// Children of `pid` (by scanning `/proc`, which works without
/// `CONFIG_PROC_CHILDREN`).
pub fn children(pid: u32) -> Vec<u32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            stat_fields(*p)
                .and_then(|f| f.get(1)?.parse::<u32>().ok())
                .is_some_and(|pp| pp == pid)
        })
        .collect()
}

/// A plain HTTP/1.1 request with `Connection: close`: status and body.
pub fn http_request(addr: SocketAddr, method: &str, path: &str) -> io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| io::Error::other("no HTTP status line"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

fn http_ok(addr: SocketAddr, path: &str) -> bool {
    matches!(http_request(addr, "GET", path), Ok((200, _)))
}

/// Searches `PATH` and the sbin directories (nginx lives in `/usr/sbin`).
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"])
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file());
    found
}

fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("Uid:")?
                    .split_whitespace()
                    .next()
                    .map(String::from)
            })
        })
        .is_some_and(|uid| uid == "0")
}

/// `apt-get install -y PACKAGE` (after `apt-get update` if the first try
/// fails), when running as root. Progress goes to stderr.
pub fn apt_install(package: &str) -> Result<(), String> {
    if !is_root() {
        return Err(format!(
            "not installed, and not root to `apt-get install {package}`"
        ));
    }
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends", package])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    eprintln!("load: `{package}` is missing; running apt-get install -y {package}");
    if install() {
        return Ok(());
    }
    let _ = Command::new("apt-get")
        .args(["update", "-qq"])
        .stdout(Stdio::null())
        .status();
    if install() {
        Ok(())
    } else {
        Err(format!(
            "not installed, and `apt-get install -y {package}` failed"
        ))
    }
}

// ---------------------------------------------------------------- Redis

/// A private `redis-server` on a free port, without persistence.
pub struct Redis {
    proc: Proc,
    pub addr: SocketAddr,
}

/// One RESP reply (errors are `Err`; what the benchmark never reads is `Other`).
#[derive(Debug)]
pub enum Resp {
    Simple(String),
    Bulk(Option<Vec<u8>>),
    Other,
}

impl Redis {
    pub fn start(dir: &Path) -> Result<Redis, String> {
        let bin = find_program("redis-server")
            .or_else(|| {
                apt_install("redis-server")
                    .ok()
                    .and_then(|()| find_program("redis-server"))
            })
            .ok_or("redis-server is not installed (apt-get install redis-server)")?;
        let port = free_port()?;
        let mut cmd = Command::new(bin);
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(dir)
            .args(["--maxclients", "4096"]);
        let mut proc = Proc::spawn("redis-server", &mut cmd, Some(dir.join("redis.log")))?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        proc.wait_until(
            "PING",
            || matches!(command(addr, &["PING"]), Ok(Resp::Simple(ref s)) if s == "PONG"),
        )?;
        Ok(Redis { proc, addr })
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    pub fn cmd(&self, args: &[&str]) -> Result<Resp, String> {
        command(self.addr, args).map_err(|e| format!("redis {args:?}: {e}"))
    }

    pub fn info(&self, section: &str) -> String {
        match self.cmd(&["INFO", section]) {
            Ok(Resp::Bulk(Some(b))) => String::from_utf8_lossy(&b).into_owned(),
            _ => String::new(),
        }
    }

    /// Calls and microseconds per command since start (`INFO
    /// commandstats`), without the benchmark's own `INFO`s. Commands run
    /// inside a function (`FCALL`) are counted too, under their own names.
    pub fn commandstats(&self) -> BTreeMap<String, (u64, u64)> {
        self.info("commandstats")
            .lines()
            .filter_map(|l| {
                let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
                let field = |key: &str| -> Option<u64> {
                    rest.split(',')
                        .find_map(|kv| kv.strip_prefix(key))?
                        .parse()
                        .ok()
                };
                Some((name.to_string(), (field("calls=")?, field("usec=")?)))
            })
            .filter(|(name, _)| name != "info")
            .collect()
    }

    /// Client connections, not counting the one asking.
    pub fn connected_clients(&self) -> u64 {
        self.info("clients")
            .lines()
            .find_map(|l| {
                l.strip_prefix("connected_clients:")?
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .map(|n| n.saturating_sub(1))
            .unwrap_or(0)
    }
}

/// Sends one command on a fresh connection and reads its reply.
fn command(addr: SocketAddr, args: &[&str]) -> io::Result<Resp> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut req = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        req.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        req.extend_from_slice(a.as_bytes());
        req.extend_from_slice(b"\r\n");
    }
    s.write_all(&req)?;
    read_resp(&mut BufReader::new(s))
}

fn read_resp(r: &mut impl BufRead) -> io::Result<Resp> {
    let mut line = String::new();
    r.read_line(&mut line)?;
    let line = line.trim_end();
    let bad = || io::Error::other(format!("bad RESP line {line:?}"));
    let (kind, rest) = (line.chars().next().ok_or_else(bad)?, &line[1..]);
    Ok(match kind {
        '+' => Resp::Simple(rest.to_string()),
        '-' => return Err(io::Error::other(rest.to_string())),
        ':' => Resp::Other,
        '$' => {
            let n: i64 = rest.parse().map_err(|_| bad())?;
            if n < 0 {
                Resp::Bulk(None)
            } else {
                let mut buf = vec![0; n as usize + 2];
                r.read_exact(&mut buf)?;
                buf.truncate(n as usize);
                Resp::Bulk(Some(buf))
            }
        }
        '*' => {
            let n: i64 = rest.parse().map_err(|_| bad())?;
            for _ in 0..n.max(0) {
                read_resp(r)?;
            }
            Resp::Other
        }
        _ => return Err(bad()),
    })
}

// ---------------------------------------------------------------- Reprise

/// How a Reprise process is configured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReprisePlan {
    /// One route with `record = false`.
    PassThrough,
    /// Recording into this Redis.
    Redis(SocketAddr),
    /// Recording into the embedded store.
    Embedded,
}

/// Starts the release binary with a config file of its own, and waits for
/// `/_reprise/readyz`.
pub fn start_reprise(
    bin: &Path,
    dir: &Path,
    name: &str,
    upstream: SocketAddr,
    plan: ReprisePlan,
) -> Result<(Proc, SocketAddr), String> {
    let port = free_port()?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut toml = format!("listen = \"{addr}\"\n");
    if let ReprisePlan::Redis(redis) = plan {
        let _ = write!(toml, "\n[store]\nredis_url = \"redis://{redis}\"\n");
    }
    let record = plan != ReprisePlan::PassThrough;
    let _ = write!(
        toml,
        "\n[[routes]]\npath = \"/\"\nupstream = \"http://{upstream}\"\nrecord = {record}\n"
    );
    let config = dir.join(format!("{name}.toml"));
    fs::write(&config, toml).map_err(|e| format!("writing {}: {e}", config.display()))?;
    let mut cmd = Command::new(bin);
    cmd.arg("--config")
        .arg(&config)
        .env_remove("REPRISE_REDIS_URL")
        .env_remove("REDIS_URL");
    let mut proc = Proc::spawn(name, &mut cmd, Some(dir.join(format!("{name}.log"))))?;
    proc.wait_until("/_reprise/readyz", || http_ok(addr, "/_reprise/readyz"))?;
    Ok((proc, addr))
}

// ---------------------------------------------------------------- nginx

/// nginx in the foreground (`daemon off`), master plus `worker_processes 1`,
/// proxying everything to the upstream without buffering.
pub struct Nginx {
    proc: Proc,
    pub addr: SocketAddr,
    pub worker: u32,
}

impl Nginx {
    pub fn start(
        bin: &Path,
        dir: &Path,
        upstream: SocketAddr,
        max_conns: u64,
    ) -> Result<Nginx, String> {
        let port = free_port()?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let root = dir.join("nginx");
        fs::create_dir_all(root.join("tmp")).map_err(|e| format!("nginx dir: {e}"))?;
        let d = root.display();
        let conf = format!(
            r#"worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
worker_rlimit_nofile {max_conns};
events {{
    worker_connections {max_conns};
    use epoll;
}}
http {{
    access_log off;
    client_body_temp_path {d}/tmp/body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
    upstream llm {{
        server {upstream};
        keepalive 1024;
    }}
    server {{
        listen {addr};
        location / {{
            proxy_pass http://llm;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 600s;
        }}
    }}
}}
"#
        );
        let conf_path = root.join("nginx.conf");
        fs::write(&conf_path, conf).map_err(|e| format!("nginx.conf: {e}"))?;
        let mut cmd = Command::new(bin);
        cmd.arg("-p")
            .arg(&root)
            .arg("-c")
            .arg(&conf_path)
            .arg("-e")
            .arg(root.join("error.log"));
        let mut proc = Proc::spawn("nginx", &mut cmd, Some(root.join("stderr.log")))?;
        proc.wait_until("proxying /health", || http_ok(addr, "/health"))?;
        let master = proc.pid();
        let mut worker = None;
        proc.wait_until("its worker", || {
            worker = children(master).first().copied();
            worker.is_some()
        })?;
        let worker = worker.ok_or("nginx has no worker")?;
        Ok(Nginx { proc, addr, worker })
    }

    /// Master and worker, for CPU time.
    pub fn pids(&self) -> Vec<u32> {
        vec![self.proc.pid(), self.worker]
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGKILL on the master would orphan its worker: a fast shutdown
        // (SIGTERM) stops the worker first.
        if !self.proc.terminate(Duration::from_secs(5)) {
            let _ = Command::new("kill")
                .args(["-KILL", &self.worker.to_string()])
                .status();
        }
    }
}
