//! Running Reprise in tests: in-process (`TestRelay`, calling
//! `reprise_relay::run` on 127.0.0.1:0) or as a real process of the built
//! binary (`RelayProcess`), for tests with several instances.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use reprise_relay::config::{Config, KeySource, RouteConfig, Secret};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::redis::free_port;

/// Which store a test relay uses.
#[derive(Clone, Debug)]
pub enum Backend {
    Memory,
    Redis(String),
}

/// A config with one recorded route `/` to `upstream`, short timers so that
/// tests run quickly, and the given store.
pub fn config(upstream: &str, backend: &Backend) -> Config {
    let mut c = Config {
        routes: vec![RouteConfig {
            path: "/".into(),
            upstream: upstream.into(),
            key: None,
            resume: None,
            stop: None,
            record: true,
            caller: Default::default(),
            resume_auth: Default::default(),
            ca_file: None,
            limits: Default::default(),
            signals: Default::default(),
        }],
        ..Config::default()
    };
    set_backend(&mut c, backend);
    c.streams.tail_poll_interval = Duration::from_millis(200);
    c.streams.hot_linger = Duration::from_millis(500);
    c.timeouts.shutdown_grace = Duration::from_secs(5);
    c
}

/// A config with the AI SDK chat route: `/api/chat`, key `{json = "/id"}`,
/// resume template `/api/chat/{key}/stream`, stop template
/// `/api/chat/{key}/stop`, plus a pass-through `/plain`.
pub fn chat_config(upstream: &str, backend: &Backend) -> Config {
    let mut c = config(upstream, backend);
    c.routes = vec![
        RouteConfig {
            path: "/api/chat".into(),
            upstream: upstream.into(),
            key: Some(KeySource::Json("/id".into())),
            resume: Some("/api/chat/{key}/stream".into()),
            stop: Some("/api/chat/{key}/stop".into()),
            record: true,
            caller: Default::default(),
            resume_auth: Default::default(),
            ca_file: None,
            limits: Default::default(),
            signals: Default::default(),
        },
        RouteConfig {
            path: "/plain".into(),
            upstream: upstream.into(),
            key: None,
            resume: None,
            stop: None,
            record: false,
            caller: Default::default(),
            resume_auth: Default::default(),
            ca_file: None,
            limits: Default::default(),
            signals: Default::default(),
        },
        RouteConfig {
            path: "/".into(),
            upstream: upstream.into(),
            key: None,
            resume: None,
            stop: None,
            record: true,
            caller: Default::default(),
            resume_auth: Default::default(),
            ca_file: None,
            limits: Default::default(),
            signals: Default::default(),
        },
    ];
    c
}

/// Sets the store. The key prefix stays the default (`reprise:`), so
/// in-process relays and `reprise` processes on one Redis share streams;
/// each test starts its own redis-server.
pub fn set_backend(c: &mut Config, backend: &Backend) {
    c.store.redis_url = match backend {
        Backend::Memory => None,
        Backend::Redis(url) => Some(Secret::new(url.clone())),
    };
}

/// Reprise running inside the test process.
pub struct TestRelay {
    addr: SocketAddr,
    /// The admin listener, if started with one.
    admin: Option<SocketAddr>,
    shutdown: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl TestRelay {
    pub async fn start(config: Config) -> TestRelay {
        Self::start_inner(config, false).await
    }

    /// Like [`start`](Self::start), with an admin listener (`admin_listen`)
    /// on another free port: see [`admin_url`](Self::admin_url).
    pub async fn start_with_admin(config: Config) -> TestRelay {
        Self::start_inner(config, true).await
    }

    async fn start_inner(config: Config, with_admin: bool) -> TestRelay {
        crate::init_tracing();
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind relay listener");
        let addr = listener.local_addr().expect("relay addr");
        let admin = if with_admin {
            Some(
                TcpListener::bind("127.0.0.1:0")
                    .await
                    .expect("bind admin listener"),
            )
        } else {
            None
        };
        let admin_addr = admin.as_ref().map(|a| a.local_addr().expect("admin addr"));
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        let task = tokio::spawn(async move {
            let listeners = reprise_relay::Listeners {
                public: listener,
                admin,
                siblings: Vec::new(),
            };
            let started = match config.validate() {
                Ok(loaded) => {
                    reprise_relay::run_listeners(config, &loaded, listeners, token, || {}).await
                }
                Err(e) => Err(e.into()),
            };
            if let Err(e) = started {
                panic!("relay failed to start: {e}");
            }
        });
        let relay = TestRelay {
            addr,
            admin: admin_addr,
            shutdown,
            task: Some(task),
        };
        relay.wait_ready().await;
        relay
    }

    /// Waits until `/_reprise/readyz` answers 200 (the store is reachable),
    /// on the admin listener if there is one.
    pub async fn wait_ready(&self) {
        wait_ready(
            self.admin.unwrap_or(self.addr),
            "the relay to become ready",
            || {},
        )
        .await
    }

    /// `http://ADDR` of the admin listener.
    pub fn admin_url(&self) -> String {
        format!(
            "http://{}",
            self.admin.expect("started with an admin listener")
        )
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Starts the graceful shutdown and waits for it to finish.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            crate::with_timeout("relay shutdown", task)
                .await
                .expect("relay task panicked");
        }
    }
}

impl Drop for TestRelay {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The `reprise` binary: `REPRISE_TEST_BIN` if set (another build, a
/// release one), else the one built by `cargo build` (tests/run.sh builds
/// it first; if it is missing, this builds it).
pub fn binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("REPRISE_TEST_BIN") {
        return PathBuf::from(bin);
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let bin = target.join("debug").join("reprise");
    if !bin.exists() {
        let status = std::process::Command::new(env!("CARGO"))
            .args(["build", "--bin", "reprise"])
            .current_dir(&root)
            .status()
            .expect("run cargo build");
        assert!(status.success(), "cargo build --bin reprise failed");
    }
    bin
}

/// Reprise as a separate OS process.
pub struct RelayProcess {
    child: tokio::process::Child,
    bin: std::path::PathBuf,
    addr: SocketAddr,
    /// What it was started with, to start it again ([`RelayProcess::restart`]).
    args: Vec<String>,
    log: Option<std::path::PathBuf>,
    level: Option<String>,
}

impl RelayProcess {
    /// Starts `reprise --listen 127.0.0.1:<free> <args>` and waits until
    /// `/_reprise/readyz` answers 200.
    pub async fn start(args: &[&str]) -> RelayProcess {
        Self::spawn(&binary(), args, None, None).await
    }

    /// Like [`RelayProcess::start`], running the executable `bin` (another
    /// build of Reprise, to compare two).
    pub async fn start_binary(bin: &std::path::Path, args: &[&str]) -> RelayProcess {
        Self::spawn(bin, args, None, None).await
    }

    /// Like [`RelayProcess::start`], with stderr (the logs) written to `log`
    /// and the log filter `level`.
    pub async fn start_logging(args: &[&str], log: &std::path::Path, level: &str) -> RelayProcess {
        Self::spawn(&binary(), args, Some(log), Some(level)).await
    }

    async fn spawn(
        bin: &std::path::Path,
        args: &[&str],
        log: Option<&std::path::Path>,
        level: Option<&str>,
    ) -> RelayProcess {
        let port = free_port().expect("free port");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        let mut p = RelayProcess {
            child: Self::spawn_child(bin, addr, args, log, level),
            bin: bin.into(),
            addr,
            args: args.iter().map(|a| a.to_string()).collect(),
            log: log.map(Into::into),
            level: level.map(Into::into),
        };
        p.wait_ready().await;
        p
    }

    /// SIGKILLs the process (if it still runs) and starts it again on the
    /// same address with the same arguments; waits until it is ready. Its
    /// log, if any, is appended to.
    pub async fn restart(&mut self) {
        self.kill().await;
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        self.child = Self::spawn_child(
            &self.bin.clone(),
            self.addr,
            &args,
            self.log.as_deref(),
            self.level.as_deref(),
        );
        self.wait_ready().await;
    }

    fn spawn_child(
        bin: &std::path::Path,
        addr: SocketAddr,
        args: &[&str],
        log: Option<&std::path::Path>,
        level: Option<&str>,
    ) -> tokio::process::Child {
        tokio::process::Command::new(bin)
            .arg("--listen")
            .arg(addr.to_string())
            .args(args)
            .env_remove("REDIS_URL")
            .env_remove("REPRISE_REDIS_URL")
            .env_remove("REPRISE_ADMIN_LISTEN")
            .env(
                "REPRISE_LOG",
                level.map(String::from).unwrap_or_else(|| {
                    std::env::var("REPRISE_LOG").unwrap_or_else(|_| "warn".into())
                }),
            )
            .stderr(match log {
                Some(path) => Stdio::from(
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(path)
                        .expect("open log file"),
                ),
                None => Stdio::inherit(),
            })
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn reprise")
    }

    async fn wait_ready(&mut self) {
        let child = &mut self.child;
        wait_ready(self.addr, "reprise process to become ready", || {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("reprise exited during start-up: {status}");
            }
        })
        .await
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// SIGKILL.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }

    /// Sends a signal by name (`TERM`, `INT`) with the `kill` command.
    pub fn signal(&self, name: &str) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .arg(format!("-{name}"))
                .arg(pid.to_string())
                .status();
        }
    }

    /// Waits for the process to exit and returns its exit code.
    pub async fn wait(&mut self) -> Option<i32> {
        crate::with_timeout("reprise process to exit", self.child.wait())
            .await
            .ok()
            .and_then(|s| s.code())
    }
}

/// Polls `GET /_reprise/readyz` on `addr` until it answers 200, calling
/// `check` before each attempt (to fail fast on a dead process).
async fn wait_ready(addr: SocketAddr, what: &str, mut check: impl FnMut()) {
    let url = format!("http://{addr}/_reprise/readyz");
    let client = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client");
    crate::with_timeout(what, async {
        loop {
            check();
            if let Ok(r) = client.get(&url).send().await {
                if r.status().is_success() {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}
