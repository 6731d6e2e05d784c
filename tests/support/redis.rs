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
    /// Cluster settings, for cluster nodes.
    cluster: Option<ClusterSettings>,
    bin: PathBuf,
    /// Working directory and log; removed on drop.
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts a standalone server and waits until it answers `PING`.
    pub async fn start() -> Result<RedisServer> {
        Self::start_inner(None).await
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
            cluster: None,
            bin: find_binary("redis-server")?,
            dir,
            child: None,
        };
        server.spawn_and_wait().await?;
        Ok(server)
    }

    async fn start_inner(cluster: Option<ClusterSettings>) -> Result<RedisServer> {
        let bin = find_binary("redis-server")?;
        let mut last_err = None;
        for _ in 0..PORT_ATTEMPTS {
            let port = free_port()?;
            let bus_port = if cluster.is_some() {
                Some(free_port()?)
            } else {
                None
            };
            let dir = tempfile::Builder::new()
                .prefix("reprise-redis-")
                .tempdir()
                .context("creating a temp dir")?;
            let mut server = RedisServer {
                port,
                bus_port,
                cluster: cluster.clone(),
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
        if let Some(settings) = &self.cluster {
            args.extend(["--cluster-enabled".into(), "yes".into()]);
            args.extend([
                "--cluster-config-file".into(),
                self.dir.path().join("nodes.conf").display().to_string(),
            ]);
            args.extend([
                "--cluster-node-timeout".into(),
                settings.node_timeout.as_millis().to_string(),
            ]);
            let coverage = if settings.require_full_coverage {
                "yes"
            } else {
                "no"
            };
            args.extend(["--cluster-require-full-coverage".into(), coverage.into()]);
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

/// How the nodes of a [`RedisCluster`] are configured.
#[derive(Clone, Debug)]
pub struct ClusterSettings {
    /// `cluster-node-timeout`: how long a node may be unreachable before
    /// the others mark it failed (and its replica, if any, takes over).
    pub node_timeout: Duration,
    /// `cluster-require-full-coverage`: whether every node refuses every
    /// command while some slot has no live master.
    pub require_full_coverage: bool,
}

impl Default for ClusterSettings {
    /// Redis's defaults but a shorter node timeout.
    fn default() -> Self {
        ClusterSettings {
            node_timeout: Duration::from_millis(5000),
            require_full_coverage: true,
        }
    }
}

impl ClusterSettings {
    /// Quick failure detection, for failover tests: a dead master's replica
    /// is promoted about two seconds after the master died.
    pub fn quick_failover() -> Self {
        ClusterSettings {
            node_timeout: Duration::from_millis(1000),
            require_full_coverage: true,
        }
    }
}

/// One node as another node's `CLUSTER NODES` lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeView {
    pub id: String,
    pub port: u16,
    /// Master or replica (`master` / `slave` in the flags).
    pub master: bool,
    /// Marked failed (`fail` or `fail?`).
    pub failed: bool,
    /// The master's id, for a replica.
    pub master_id: Option<String>,
    /// Slot ranges served (a master's), as `CLUSTER NODES` prints them.
    pub slots: Vec<String>,
}

/// Parses the text of `CLUSTER NODES`.
fn parse_nodes(text: &str) -> Vec<NodeView> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 8 {
                return None;
            }
            let port = f[1].split('@').next()?.rsplit(':').next()?.parse().ok()?;
            let flags: Vec<&str> = f[2].split(',').collect();
            Some(NodeView {
                id: f[0].to_owned(),
                port,
                master: flags.contains(&"master"),
                failed: flags.contains(&"fail") || flags.contains(&"fail?"),
                master_id: (f[3] != "-").then(|| f[3].to_owned()),
                slots: f[8..]
                    .iter()
                    .filter(|s| !s.starts_with('['))
                    .map(|s| s.to_string())
                    .collect(),
            })
        })
        .collect()
}

/// The text of a bulk-string reply (`$N\r\n...\r\n`), or of a status one.
fn reply_text(reply: &[u8]) -> Result<String> {
    let text = String::from_utf8_lossy(reply);
    if let Some(rest) = text.strip_prefix('$') {
        let (_, body) = rest
            .split_once("\r\n")
            .ok_or_else(|| anyhow!("bad reply {text:?}"))?;
        return Ok(body.trim_end_matches("\r\n").to_owned());
    }
    if let Some(rest) = text.strip_prefix('+') {
        return Ok(rest.trim_end().to_owned());
    }
    bail!("unexpected reply {text:?}")
}

/// A command whose reply must be `+OK` (or another status).
async fn expect_ok(port: u16, args: &[&str]) -> Result<()> {
    let reply = raw_command(port, args).await?;
    if reply.first() == Some(&b'-') {
        bail!(
            "127.0.0.1:{port} {args:?} answered {}",
            String::from_utf8_lossy(&reply).trim_end()
        );
    }
    Ok(())
}

/// A field of `INFO <section>` on the node on `port`.
async fn info_field(port: u16, section: &str, field: &str) -> Result<String> {
    let text = reply_text(&raw_command(port, &["INFO", section]).await?)?;
    let prefix = format!("{field}:");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(|v| v.trim().to_owned())
        .ok_or_else(|| anyhow!("no {field} in INFO {section} of 127.0.0.1:{port}"))
}

/// Polls `check` every 50 ms until it answers `Ok(true)`, for at most
/// [`CLUSTER_BOUND`]; `what` names the wait in the error.
async fn wait_until<F, Fut>(what: impl std::fmt::Display, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let deadline = Instant::now() + CLUSTER_BOUND;
    let mut last = None;
    loop {
        match check().await {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last = Some(e),
        }
        if Instant::now() >= deadline {
            bail!(
                "{what}: not within {CLUSTER_BOUND:?} (last error: {})",
                last.map(|e| format!("{e:#}"))
                    .unwrap_or_else(|| "none".into())
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `redis-server`s forming one cluster: three masters, with or without a
/// replica each.
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

/// What [`RedisCluster::cut_replica`] changed, to undo it.
#[derive(Debug)]
pub struct Cut {
    pub master: u16,
    pub replica: u16,
}

impl RedisCluster {
    /// Starts three masters (no replicas), joins them with
    /// `redis-cli --cluster create`, and waits until every node reports
    /// `cluster_state:ok`.
    pub async fn start() -> Result<RedisCluster> {
        Self::create(ClusterSettings::default(), 0).await
    }

    /// Three masters and three replicas, one per master, with `settings`;
    /// returns once every node agrees on the topology and every replica is
    /// in sync with its master.
    pub async fn start_with_replicas(settings: ClusterSettings) -> Result<RedisCluster> {
        let mut cluster = Self::create(settings, 1).await?;
        cluster.settle().await?;
        cluster.wait_in_sync().await?;
        Ok(cluster)
    }

    async fn create(settings: ClusterSettings, replicas: usize) -> Result<RedisCluster> {
        let cli = find_binary("redis-cli")?;
        let count = 3 * (1 + replicas);
        let starting = (0..count).map(|_| RedisServer::start_inner(Some(settings.clone())));
        let nodes = futures::future::try_join_all(starting).await?;
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let create = tokio::process::Command::new(&cli)
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
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

    /// `redis-cluster://127.0.0.1:<p1>?node=127.0.0.1:<p2>&node=...`, every
    /// node (replicas too) as a seed.
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

    /// The server on `port`.
    pub fn node_mut(&mut self, port: u16) -> &mut RedisServer {
        self.nodes
            .iter_mut()
            .find(|n| n.port == port)
            .unwrap_or_else(|| panic!("no cluster node on port {port}"))
    }

    /// Ports of the nodes whose process runs.
    fn live_ports(&mut self) -> Vec<u16> {
        self.nodes
            .iter_mut()
            .filter_map(|n| n.is_running().then_some(n.port))
            .collect()
    }

    /// The cluster as the node on `port` sees it.
    pub async fn view(port: u16) -> Result<Vec<NodeView>> {
        let reply = raw_command(port, &["CLUSTER", "NODES"]).await?;
        Ok(parse_nodes(&reply_text(&reply)?))
    }

    /// The cluster as a live node sees it.
    pub async fn topology(&mut self) -> Result<Vec<NodeView>> {
        let mut last = None;
        for port in self.live_ports() {
            match Self::view(port).await {
                Ok(view) => return Ok(view),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow!("no live cluster node")))
    }

    /// Ports of the masters that serve slots (as a live node sees them),
    /// ordered by port.
    pub async fn master_ports(&mut self) -> Result<Vec<u16>> {
        let mut ports: Vec<u16> = self
            .topology()
            .await?
            .into_iter()
            .filter(|n| n.master && !n.failed && !n.slots.is_empty())
            .map(|n| n.port)
            .collect();
        ports.sort_unstable();
        Ok(ports)
    }

    /// The port of `master`'s (first) replica that is not marked failed.
    pub async fn replica_of(&mut self, master: u16) -> Result<u16> {
        let view = self.topology().await?;
        let id = &view
            .iter()
            .find(|n| n.port == master)
            .ok_or_else(|| anyhow!("no node on port {master}"))?
            .id;
        view.iter()
            .find(|n| n.master_id.as_ref() == Some(id) && !n.failed)
            .map(|n| n.port)
            .ok_or_else(|| anyhow!("127.0.0.1:{master} has no replica"))
    }

    /// Waits until every live node reports `cluster_state:ok` and every
    /// live node lists the same masters, with the same slots, none of them
    /// marked failed, each live one's replicas as its replicas.
    pub async fn settle(&mut self) -> Result<()> {
        let live = self.live_ports();
        wait_until("cluster nodes to agree on the topology", || {
            let live = live.clone();
            async move {
                let mut agreed: Option<Vec<(u16, Vec<String>)>> = None;
                for &port in &live {
                    let info = raw_command(port, &["CLUSTER", "INFO"]).await?;
                    if !String::from_utf8_lossy(&info).contains("cluster_state:ok") {
                        return Ok(false);
                    }
                    let view = Self::view(port).await?;
                    let mut masters: Vec<(u16, Vec<String>)> = view
                        .iter()
                        .filter(|n| n.master && !n.slots.is_empty())
                        .map(|n| (n.port, n.slots.clone()))
                        .collect();
                    masters.sort();
                    if view
                        .iter()
                        .any(|n| n.master && !n.slots.is_empty() && n.failed)
                    {
                        return Ok(false);
                    }
                    // A live replica must be listed as a replica by everyone.
                    if view
                        .iter()
                        .any(|n| live.contains(&n.port) && !n.master && n.master_id.is_none())
                    {
                        return Ok(false);
                    }
                    match &agreed {
                        None => agreed = Some(masters),
                        Some(a) if *a != masters => return Ok(false),
                        Some(_) => {}
                    }
                }
                Ok(true)
            }
        })
        .await
    }

    /// Waits until every live replica's link to its master is up and its
    /// replication offset equals its master's: it holds every write.
    pub async fn wait_in_sync(&mut self) -> Result<()> {
        let live = self.live_ports();
        wait_until("replicas to be in sync", || {
            let live = live.clone();
            async move {
                for &port in &live {
                    if info_field(port, "replication", "role").await? != "slave" {
                        continue;
                    }
                    if info_field(port, "replication", "master_link_status").await? != "up" {
                        return Ok(false);
                    }
                    let master: u16 = info_field(port, "replication", "master_port")
                        .await?
                        .parse()?;
                    let theirs = info_field(master, "replication", "master_repl_offset").await?;
                    let ours = info_field(port, "replication", "slave_repl_offset").await?;
                    if ours != theirs {
                        return Ok(false);
                    }
                }
                Ok(true)
            }
        })
        .await
    }

    /// Waits until the node on `port` is a master serving slots, in the
    /// view of every live node, and the cluster has settled.
    pub async fn wait_promoted(&mut self, port: u16) -> Result<()> {
        let live = self.live_ports();
        wait_until(format!("127.0.0.1:{port} to be promoted"), || {
            let live = live.clone();
            async move {
                for &p in &live {
                    let view = Self::view(p).await?;
                    let promoted = view
                        .iter()
                        .any(|n| n.port == port && n.master && !n.slots.is_empty());
                    if !promoted {
                        return Ok(false);
                    }
                }
                Ok(true)
            }
        })
        .await?;
        self.settle().await
    }

    /// A graceful failover: `CLUSTER FAILOVER` on `master`'s replica, which
    /// waits for every write of the master before taking over. Returns the
    /// new master's port once every node agrees.
    pub async fn failover(&mut self, master: u16) -> Result<u16> {
        let replica = self.replica_of(master).await?;
        expect_ok(replica, &["CLUSTER", "FAILOVER"]).await?;
        self.wait_promoted(replica).await?;
        // The old master follows the new one as its replica.
        wait_until(
            format!("127.0.0.1:{master} to follow 127.0.0.1:{replica}"),
            || async move { Ok(info_field(master, "replication", "role").await? == "slave") },
        )
        .await?;
        self.settle().await?;
        Ok(replica)
    }

    /// SIGKILLs the master on `port`, without waiting for anything.
    pub fn kill(&mut self, port: u16) {
        self.node_mut(port).kill();
    }

    /// SIGKILLs `master` and waits until its replica is promoted (Redis's
    /// own failover, after `cluster-node-timeout`) and every live node
    /// agrees. Returns the new master's port.
    pub async fn kill_master(&mut self, master: u16) -> Result<u16> {
        let replica = self.replica_of(master).await?;
        self.kill(master);
        self.wait_promoted(replica).await?;
        Ok(replica)
    }

    /// Waits until every live node marks the node on `port` as failed.
    pub async fn wait_marked_failed(&mut self, port: u16) -> Result<()> {
        let live = self.live_ports();
        wait_until(format!("127.0.0.1:{port} to be marked failed"), || {
            let live = live.clone();
            async move {
                for &p in &live {
                    let view = Self::view(p).await?;
                    if !view.iter().any(|n| n.port == port && n.failed) {
                        return Ok(false);
                    }
                }
                Ok(true)
            }
        })
        .await
    }

    /// Keeps `master`'s replica from taking over by itself
    /// (`cluster-replica-no-failover yes`), so that a dead master stays dead
    /// until the test says otherwise. Returns the replica's port.
    pub async fn hold_failover(&mut self, master: u16) -> Result<u16> {
        let replica = self.replica_of(master).await?;
        expect_ok(
            replica,
            &["CONFIG", "SET", "cluster-replica-no-failover", "yes"],
        )
        .await?;
        Ok(replica)
    }

    /// Promotes `replica` without its master's agreement
    /// (`CLUSTER FAILOVER TAKEOVER`) and waits until every live node agrees.
    pub async fn take_over(&mut self, replica: u16) -> Result<()> {
        expect_ok(replica, &["CLUSTER", "FAILOVER", "TAKEOVER"]).await?;
        self.wait_promoted(replica).await
    }

    /// Cuts `master`'s replica off, so that what is written to the master
    /// from now on is not replicated (a lossy failover's precondition):
    /// the replica is given credentials the master refuses (`masteruser` /
    /// `masterauth` of a user that does not exist) and its link is closed
    /// (`CLIENT KILL TYPE replica`); it keeps trying to reconnect and is
    /// refused. Waits until the replica reports its link down.
    pub async fn cut_replica(&mut self, master: u16) -> Result<Cut> {
        let replica = self.replica_of(master).await?;
        expect_ok(
            replica,
            &["CONFIG", "SET", "masteruser", "reprise-test-nobody"],
        )
        .await?;
        expect_ok(replica, &["CONFIG", "SET", "masterauth", "refused"]).await?;
        expect_ok(master, &["CLIENT", "KILL", "TYPE", "replica"]).await?;
        wait_until(
            format!("127.0.0.1:{replica}'s link to be down"),
            || async move {
                Ok(info_field(replica, "replication", "master_link_status").await? == "down")
            },
        )
        .await?;
        // Nor may it take over by itself: the test decides when.
        expect_ok(
            replica,
            &["CONFIG", "SET", "cluster-replica-no-failover", "yes"],
        )
        .await?;
        Ok(Cut { master, replica })
    }

    /// SIGKILLs the master of a [`cut_replica`](Self::cut_replica) and
    /// promotes the cut replica with `CLUSTER FAILOVER TAKEOVER`: it serves
    /// the master's slots without the writes it missed. Returns its port.
    pub async fn kill_master_and_take_over(&mut self, cut: Cut) -> Result<u16> {
        self.kill(cut.master);
        self.take_over(cut.replica).await?;
        Ok(cut.replica)
    }
}
