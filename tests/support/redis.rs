//! Real Redis servers for tests: a `redis-server` child process per test on a
//! free port of 127.0.0.1, which the test can kill and restart, and a
//! three-master cluster built from them.
//!
//! Nothing here touches a Redis already running on the machine (6379 or
//! otherwise): every server gets a port the OS just handed out, its own
//! empty directory, and no persistence.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// How long a fresh server may take to answer `PING`.
const START_BOUND: Duration = Duration::from_secs(10);
/// How long a cluster may take to report `cluster_state:ok` on every node.
const CLUSTER_BOUND: Duration = Duration::from_secs(30);
/// Pause between two readiness probes.
const PROBE_INTERVAL: Duration = Duration::from_millis(10);
/// Start attempts when the picked port was taken meanwhile.
const PORT_ATTEMPTS: usize = 5;

/// Finds an executable on `PATH`.
fn find_binary(name: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| anyhow!("`{name}` not found on PATH: install Redis 7+ (e.g. `apt-get install redis-server`) to run these tests"))
}

/// A port nobody listens on right now (the OS picks it; it may be taken again
/// before we use it, which `start` detects and retries).
pub fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// One RESP request on a fresh connection; returns the raw reply (bounded).
pub async fn raw_command(port: u16, args: &[&str]) -> Result<Vec<u8>> {
    let io = async {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await?;
        let mut req = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            req.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            req.extend_from_slice(a.as_bytes());
            req.extend_from_slice(b"\r\n");
        }
        s.write_all(&req).await?;
        let mut buf = Vec::new();
        loop {
            let mut chunk = [0u8; 4096];
            let n = s.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
            if reply_complete(&buf) {
                break;
            }
        }
        Ok::<_, anyhow::Error>(buf)
    };
    tokio::time::timeout(Duration::from_secs(2), io)
        .await
        .map_err(|_| anyhow!("no reply from 127.0.0.1:{port}"))?
}

/// Whether `buf` holds one whole RESP2 reply.
fn reply_complete(buf: &[u8]) -> bool {
    fn parse(buf: &[u8]) -> Option<usize> {
        let line_end = buf.windows(2).position(|w| w == b"\r\n")?;
        let line = std::str::from_utf8(&buf[1..line_end]).ok()?;
        let rest = line_end + 2;
        match buf.first()? {
            b'+' | b'-' | b':' => Some(rest),
            b'$' => {
                let n: i64 = line.parse().ok()?;
                if n < 0 {
                    return Some(rest);
                }
                let end = rest + n as usize + 2;
                (buf.len() >= end).then_some(end)
            }
            b'*' => {
                let n: i64 = line.parse().ok()?;
                let mut at = rest;
                for _ in 0..n.max(0) {
                    at += parse(&buf[at..])?;
                }
                Some(at)
            }
            _ => None,
        }
    }
    parse(buf).is_some()
}

/// A `redis-server` child process owned by a test.
pub struct RedisServer {
    port: u16,
    /// Cluster bus port, for cluster nodes.
    bus_port: Option<u16>,
    cluster: bool,
    bin: PathBuf,
    /// Working directory and log; removed on drop.
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts a standalone server and waits until it answers `PING`.
    pub async fn start() -> Result<RedisServer> {
        Self::start_inner(false).await
    }

    /// Starts a standalone server on `port` (one a store was already pointed
    /// at, say) and waits until it answers `PING`. Unlike [`start`](Self::start)
    /// it cannot move to another port if this one was taken meanwhile.
    pub async fn start_on_port(port: u16) -> Result<RedisServer> {
        let dir = tempfile::Builder::new()
            .prefix("reprise-redis-")
            .tempdir()
            .context("creating a temp dir")?;
        let mut server = RedisServer {
            port,
            bus_port: None,
            cluster: false,
            bin: find_binary("redis-server")?,
            dir,
            child: None,
        };
        server.spawn_and_wait().await?;
        Ok(server)
    }

    async fn start_inner(cluster: bool) -> Result<RedisServer> {
        let bin = find_binary("redis-server")?;
        let mut last_err = None;
        for _ in 0..PORT_ATTEMPTS {
            let port = free_port()?;
            let bus_port = if cluster { Some(free_port()?) } else { None };
            let dir = tempfile::Builder::new()
                .prefix("reprise-redis-")
                .tempdir()
                .context("creating a temp dir")?;
            let mut server = RedisServer {
                port,
                bus_port,
                cluster,
                bin: bin.clone(),
                dir,
                child: None,
            };
            match server.spawn_and_wait().await {
                Ok(()) => return Ok(server),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow!("redis-server did not start")))
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    fn args(&self) -> Vec<String> {
        let dir = self.dir.path().display().to_string();
        let mut args: Vec<String> = [
            "--port",
            &self.port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            &dir,
            "--logfile",
            &self.log_path().display().to_string(),
            "--daemonize",
            "no",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if self.cluster {
            args.extend(["--cluster-enabled".into(), "yes".into()]);
            args.extend([
                "--cluster-config-file".into(),
                self.dir.path().join("nodes.conf").display().to_string(),
            ]);
            args.extend(["--cluster-node-timeout".into(), "5000".into()]);
            if let Some(bus) = self.bus_port {
                args.extend(["--cluster-port".into(), bus.to_string()]);
            }
        }
        args
    }

    /// Spawns the process and waits for `PING`; fails if it exits first.
    async fn spawn_and_wait(&mut self) -> Result<()> {
        // A restart must start from empty data, as after losing the machine.
        let _ = std::fs::remove_file(self.dir.path().join("nodes.conf"));
        let _ = std::fs::remove_file(self.log_path());
        let child = Command::new(&self.bin)
            .args(self.args())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("spawning {}", self.bin.display()))?;
        self.child = Some(child);
        let deadline = Instant::now() + START_BOUND;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    self.child = None;
                    bail!(
                        "redis-server on port {} exited with {status}:\n{}",
                        self.port,
                        self.log_tail()
                    );
                }
            }
            if self.answers_as_ours().await {
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.kill();
                bail!(
                    "redis-server on port {} did not answer within {START_BOUND:?}:\n{}",
                    self.port,
                    self.log_tail()
                );
            }
            tokio::time::sleep(PROBE_INTERVAL).await;
        }
    }

    /// Whether the server on our port answers and is ours (its `dir` is ours),
    /// not another process that grabbed the port.
    async fn answers_as_ours(&self) -> bool {
        match raw_command(self.port, &["CONFIG", "GET", "dir"]).await {
            Ok(reply) => {
                let dir = self.dir.path().display().to_string();
                reply.windows(dir.len()).any(|w| w == dir.as_bytes())
                    || std::fs::canonicalize(self.dir.path())
                        .map(|d| {
                            let d = d.display().to_string();
                            reply.windows(d.len()).any(|w| w == d.as_bytes())
                        })
                        .unwrap_or(false)
            }
            Err(_) => false,
        }
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Kills the server with SIGKILL, as a crash would, and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Freezes the server with SIGSTOP: its connections stay open but
    /// nothing is answered (a stalled Redis: every command hangs) until
    /// [`resume`](Self::resume). Dropping or killing it still works.
    pub fn pause(&mut self) {
        self.signal("STOP");
    }

    /// SIGCONT after [`pause`](Self::pause).
    pub fn resume(&mut self) {
        self.signal("CONT");
    }

    fn signal(&mut self, name: &str) {
        let pid = self
            .child
            .as_ref()
            .map(|c| c.id())
            .expect("redis-server is running");
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(pid.to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} {pid} failed");
    }

    /// Stops the server cleanly (`SHUTDOWN NOSAVE`), killing it if it does
    /// not exit within a few seconds.
    pub async fn stop(&mut self) {
        if self.child.is_none() {
            return;
        }
        let _ = raw_command(self.port, &["SHUTDOWN", "NOSAVE"]).await;
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if !self.is_running() {
                self.child = None;
                return;
            }
            tokio::time::sleep(PROBE_INTERVAL).await;
        }
        self.kill();
    }

    /// Kills the server and starts a new one on the same port, with empty data.
    pub async fn restart(&mut self) -> Result<()> {
        self.kill();
        self.spawn_and_wait().await
    }

    /// Starts the server again after [`kill`](Self::kill) or [`stop`](Self::stop).
    pub async fn start_again(&mut self) -> Result<()> {
        if self.is_running() {
            return Ok(());
        }
        self.spawn_and_wait().await
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Three `redis-server` masters forming one cluster (no replicas).
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts three nodes, joins them with `redis-cli --cluster create`, and
    /// waits until every node reports `cluster_state:ok`.
    pub async fn start() -> Result<RedisCluster> {
        let cli = find_binary("redis-cli")?;
        let mut nodes = Vec::with_capacity(3);
        for _ in 0..3 {
            nodes.push(RedisServer::start_inner(true).await?);
        }
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let create = tokio::process::Command::new(&cli)
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(CLUSTER_BOUND, create)
            .await
            .map_err(|_| {
                anyhow!("redis-cli --cluster create did not finish within {CLUSTER_BOUND:?}")
            })?
            .context("running redis-cli --cluster create")?;
        if !out.status.success() {
            bail!(
                "redis-cli --cluster create failed ({}):\n{}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let cluster = RedisCluster { nodes };
        cluster.wait_ok().await?;
        Ok(cluster)
    }

    async fn wait_ok(&self) -> Result<()> {
        let deadline = Instant::now() + CLUSTER_BOUND;
        'poll: loop {
            for n in &self.nodes {
                let info = raw_command(n.port, &["CLUSTER", "INFO"])
                    .await
                    .unwrap_or_default();
                if !String::from_utf8_lossy(&info).contains("cluster_state:ok") {
                    if Instant::now() >= deadline {
                        bail!(
                            "cluster node 127.0.0.1:{} not ok within {CLUSTER_BOUND:?}",
                            n.port
                        );
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue 'poll;
                }
            }
            return Ok(());
        }
    }

    /// `redis-cluster://127.0.0.1:<p1>?node=127.0.0.1:<p2>&node=127.0.0.1:<p3>`.
    pub fn url(&self) -> String {
        let mut url = format!("redis-cluster://127.0.0.1:{}", self.nodes[0].port);
        for (i, n) in self.nodes.iter().enumerate().skip(1) {
            url.push(if i == 1 { '?' } else { '&' });
            url.push_str(&format!("node=127.0.0.1:{}", n.port));
        }
        url
    }

    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }

    pub fn nodes_mut(&mut self) -> &mut [RedisServer] {
        &mut self.nodes
    }
}
