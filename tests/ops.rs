//! Operating Reprise: the systemd unit (checked by `systemd-analyze`), the
//! `sd_notify` protocol as the real binary speaks it (a test-bound datagram
//! socket stands in for systemd), `--check-config` on good and bad files, and
//! JSON logs. Every test runs the built `reprise` binary as a child process.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use reprise_tests::redis::{free_port, RedisServer};
use reprise_tests::relay::binary;
use reprise_tests::upstream::{event, numbered_event};
use reprise_tests::{with_timeout, Reply, SseClient, Upstream};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::UnixDatagram;
use tokio::process::Child;

/// The workspace root (the tests package lives in `tests/`).
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `reprise ARGS` with a clean environment: no store URL, no systemd
/// variables inherited from whatever runs the tests.
fn reprise(args: &[&str]) -> Command {
    let mut cmd = Command::new(binary());
    cmd.args(args)
        .env_remove("REDIS_URL")
        .env_remove("REPRISE_REDIS_URL")
        .env_remove("REPRISE_ADMIN_LISTEN")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID")
        .env_remove("RUST_LOG")
        .env("REPRISE_LOG", "warn")
        .stdin(Stdio::null());
    cmd
}

/// Starts `cmd` as a child killed when dropped.
fn spawn(cmd: Command) -> Child {
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.kill_on_drop(true).spawn().expect("spawn reprise")
}

/// SIGTERM, what `systemctl stop` sends.
fn terminate(child: &Child) {
    let pid = child.id().expect("reprise is still running");
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -TERM {pid} failed");
}

/// Runs `cmd` to its end (bounded) and returns its status and output.
async fn output(cmd: &mut Command) -> Output {
    let mut cmd = tokio::process::Command::from(std::mem::replace(cmd, Command::new("true")));
    // Killed if the bound is hit: a config that should fail must not start serving.
    cmd.kill_on_drop(true)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    with_timeout("reprise to exit", cmd.output())
        .await
        .expect("run reprise")
}

async fn exit_code(child: &mut Child) -> Option<i32> {
    with_timeout("reprise to exit", child.wait())
        .await
        .expect("wait for reprise")
        .code()
}

/// Polls `/_reprise/readyz` until it answers 200; panics if the child exits.
async fn wait_ready(child: &mut Child, addr: SocketAddr) {
    let client = SseClient::new();
    let url = format!("http://{addr}/_reprise/readyz");
    with_timeout("reprise to become ready", async {
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("reprise exited during start-up: {status}");
            }
            if let Ok(r) = client.http().get(&url).send().await {
                if r.status().is_success() {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    })
    .await
}

/// `systemd-analyze`, from the `systemd` Debian package (tests/run.sh
/// installs it).
fn systemd_analyze() -> Command {
    let found = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .any(|dir| dir.join("systemd-analyze").is_file());
    assert!(
        found,
        "`systemd-analyze` not found on PATH: install it (`apt-get install systemd`; tests/run.sh does)"
    );
    Command::new("systemd-analyze")
}

/// The shipped unit.
fn unit_text() -> String {
    std::fs::read_to_string(root().join("systemd/reprise.service"))
        .expect("read systemd/reprise.service")
}

const SHIPPED_EXEC_START: &str =
    "ExecStart=/usr/local/bin/reprise --config /etc/reprise/reprise.toml";

/// Writes `text` as `DIR/reprise.service`, with ExecStart pointing at
/// `exec` (systemd-analyze checks that the binary exists).
fn write_unit(dir: &Path, text: &str, exec: &Path) -> PathBuf {
    let text = text.replace(
        SHIPPED_EXEC_START,
        &format!(
            "ExecStart={} --config /etc/reprise/reprise.toml",
            exec.display()
        ),
    );
    let path = dir.join("reprise.service");
    std::fs::write(&path, text).expect("write unit");
    path
}

/// `systemd-analyze verify`: Ok if it exits 0 and says nothing about the
/// unit. It only warns (exit 0) about unknown or misspelt directives, so its
/// diagnostics count as failures too.
fn verify(unit: &Path) -> Result<(), String> {
    let out = systemd_analyze()
        .arg("verify")
        .arg(unit)
        .output()
        .expect("run systemd-analyze verify");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let diagnostics: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("reprise.service"))
        .collect();
    if out.status.success() && diagnostics.is_empty() {
        Ok(())
    } else {
        Err(format!("{}: {stderr}", out.status))
    }
}

#[test]
fn systemd_unit_passes_systemd_analyze_verify() {
    let text = unit_text();
    assert!(
        text.lines().any(|l| l == SHIPPED_EXEC_START),
        "the unit must start `{SHIPPED_EXEC_START}`"
    );
    for line in [
        "Type=notify",
        "Restart=on-failure",
        "KillSignal=SIGTERM",
        "DynamicUser=yes",
    ] {
        assert!(text.lines().any(|l| l == line), "the unit lacks {line}");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let unit = write_unit(dir.path(), &text, &binary());
    if let Err(e) = verify(&unit) {
        panic!("systemd-analyze verify rejected systemd/reprise.service:\n{e}");
    }

    // The same check catches a misspelt directive (systemd would ignore it,
    // silently dropping a hardening setting) ...
    let typo = text.replace("ProtectHome=yes", "ProtectHome=yes\nProtectHomes=yes");
    let unit = write_unit(dir.path(), &typo, &binary());
    let err = verify(&unit).expect_err("verify accepted an unknown directive");
    assert!(err.contains("ProtectHomes"), "{err}");
    // ... and a missing binary.
    let unit = write_unit(dir.path(), &text, &dir.path().join("no-such-reprise"));
    let err = verify(&unit).expect_err("verify accepted a missing ExecStart binary");
    assert!(err.contains("no-such-reprise"), "{err}");
}

#[test]
fn systemd_unit_sandbox_exposure_is_low() {
    // `systemd-analyze security` scores exposure from 0 (locked down) to 10;
    // its --threshold is in tenths. 2.0 leaves room for the network access a
    // proxy needs and nothing much else.
    let security = |unit: &Path| -> Output {
        systemd_analyze()
            .args(["security", "--offline=true", "--threshold=20"])
            .arg(unit)
            .output()
            .expect("run systemd-analyze security")
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let unit = write_unit(dir.path(), &unit_text(), &binary());
    let out = security(&unit);
    assert!(
        out.status.success(),
        "exposure above 2.0:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // Without the sandbox the same threshold fails, so the check is real.
    let bare = format!("[Service]\nType=notify\n{SHIPPED_EXEC_START}\n");
    let unit = write_unit(dir.path(), &bare, &binary());
    assert!(
        !security(&unit).status.success(),
        "an unsandboxed unit passed the exposure threshold"
    );
}

/// The value of `key=` in the unit.
fn unit_setting(text: &str, key: &str) -> String {
    let prefix = format!("{key}=");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("the unit has no {key}="))
        .to_string()
}

#[test]
fn systemd_unit_stop_timeout_and_env_file_fit_the_binary() {
    let text = unit_text();
    let stop = unit_setting(&text, "TimeoutStopSec");
    let stop = Duration::from_secs(
        stop.strip_suffix('s')
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("TimeoutStopSec={stop}: expected whole seconds like 45s")),
    );
    // The default grace, then up to 5 s of writer flush and 2 + 2 s to close
    // connections and tasks (server.rs): SIGKILL must not cut that short.
    let grace = reprise_relay::Config::default().timeouts.shutdown_grace;
    let sequence = grace + Duration::from_secs(5 + 2 + 2);
    assert!(
        stop > sequence,
        "TimeoutStopSec {stop:?} must exceed the shutdown sequence {sequence:?}"
    );
    // No capabilities (the unit documents the drop-in for ports below 1024),
    // and the env file is optional.
    assert_eq!(unit_setting(&text, "CapabilityBoundingSet"), "");
    assert_eq!(unit_setting(&text, "AmbientCapabilities"), "");
    assert_eq!(
        unit_setting(&text, "EnvironmentFile"),
        "-/etc/reprise/reprise.env"
    );

    // The example env file sets only variables the binary reads.
    let env = std::fs::read_to_string(root().join("systemd/reprise.env"))
        .expect("read systemd/reprise.env");
    let names: Vec<&str> = env
        .lines()
        .map(|l| l.trim_start_matches('#'))
        .filter_map(|l| l.split_once('=').map(|(name, _)| name))
        .filter(|name| {
            !name.is_empty() && name.bytes().all(|b| b.is_ascii_uppercase() || b == b'_')
        })
        .collect();
    assert!(!names.is_empty(), "no variables in systemd/reprise.env");
    for name in names {
        assert!(
            ["REPRISE_REDIS_URL", "REDIS_URL", "REPRISE_LOG", "RUST_LOG"].contains(&name),
            "systemd/reprise.env mentions {name}, which reprise does not read"
        );
    }
}

/// A Unix datagram socket in a temp dir, standing where systemd's
/// `$NOTIFY_SOCKET` would be.
struct NotifySocket {
    socket: UnixDatagram,
    /// The same socket (a dup), read directly: tokio's `try_recv` consults
    /// cached readiness and can miss a datagram the reactor has not seen yet.
    direct: std::os::unix::net::UnixDatagram,
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl NotifySocket {
    fn bind() -> NotifySocket {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify.sock");
        let direct = std::os::unix::net::UnixDatagram::bind(&path).expect("bind notify socket");
        direct
            .set_nonblocking(true)
            .expect("nonblocking notify socket");
        let socket = direct.try_clone().expect("dup notify socket");
        let socket = UnixDatagram::from_std(socket).expect("register notify socket");
        NotifySocket {
            socket,
            direct,
            path,
            _dir: dir,
        }
    }

    /// The next datagram; panics if `child` exits first and sent nothing more.
    async fn next(&self, child: &mut Child, what: &str) -> String {
        let mut buf = vec![0u8; 4096];
        with_timeout(what, async {
            tokio::select! {
                biased;
                r = self.socket.recv(&mut buf) => {
                    let n = r.expect("recv on notify socket");
                    String::from_utf8(buf[..n].to_vec()).expect("notification is UTF-8")
                }
                status = child.wait() => match self.try_next() {
                    // Sent before the exit, not yet seen by the reactor.
                    Some(msg) => msg,
                    None => panic!("reprise exited ({status:?}) while waiting for {what}"),
                },
            }
        })
        .await
    }

    /// Datagrams until one has the line `state`; returns that datagram.
    async fn wait_for(&self, child: &mut Child, state: &str) -> String {
        loop {
            let msg = self.next(child, state).await;
            if msg.lines().any(|l| l == state) {
                return msg;
            }
        }
    }

    /// Datagrams until one has a line starting with `prefix`; returns it.
    async fn wait_for_prefix(&self, child: &mut Child, prefix: &str) -> String {
        loop {
            let msg = self.next(child, prefix).await;
            if msg.lines().any(|l| l.starts_with(prefix)) {
                return msg;
            }
        }
    }

    /// A queued datagram, without waiting.
    fn try_next(&self) -> Option<String> {
        let mut buf = vec![0u8; 4096];
        let n = self.direct.recv(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    /// Everything queued, without waiting.
    fn drain(&self) -> Vec<String> {
        std::iter::from_fn(|| self.try_next()).collect()
    }
}

/// The address in `STATUS=listening on ADDR, store: KIND`.
fn status_addr(msg: &str) -> (SocketAddr, String) {
    let status = msg
        .lines()
        .find_map(|l| l.strip_prefix("STATUS="))
        .unwrap_or_else(|| panic!("no STATUS= in {msg:?}"));
    let rest = status
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected STATUS: {status:?}"));
    let (addr, store) = rest
        .split_once(", store: ")
        .unwrap_or_else(|| panic!("unexpected STATUS: {status:?}"));
    (addr.parse().expect("STATUS address"), store.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_is_notified_once_listening_with_the_store_checked() {
    let redis = RedisServer::start().await.expect("start redis-server");
    let notify = NotifySocket::bind();
    let mut cmd = reprise(&[
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        "http://127.0.0.1:9",
    ]);
    cmd.env("NOTIFY_SOCKET", &notify.path)
        .env("REPRISE_REDIS_URL", redis.url());
    let mut child = spawn(cmd);

    // Port 0: the STATUS line is the only way to learn the address, so
    // nothing can have reached the relay before READY=1.
    let msg = notify.wait_for(&mut child, "READY=1").await;
    let (addr, store) = status_addr(&msg);
    assert_eq!(store, "redis");
    let ready = SseClient::new()
        .http()
        .get(format!("http://{addr}/_reprise/readyz"))
        .send()
        .await
        .expect("GET /_reprise/readyz right after READY=1");
    assert_eq!(ready.status(), 200);
    let body = ready.text().await.expect("readyz body");
    let body: Value = serde_json::from_str(&body).expect("readyz JSON");
    assert_eq!(body["store"]["kind"], "redis", "{body}");
    assert_eq!(body["store"]["reachable"], true, "{body}");

    terminate(&child);
    let msg = notify.wait_for(&mut child, "STOPPING=1").await;
    assert!(msg.lines().any(|l| l.starts_with("STATUS=")), "{msg:?}");
    assert_eq!(exit_code(&mut child).await, Some(0));
    let late = notify.drain();
    assert!(
        late.iter().all(|m| !m.contains("READY=1")),
        "READY=1 sent again: {late:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_waits_for_an_unreachable_store_while_serving() {
    let notify = NotifySocket::bind();
    let port = free_port().expect("free port");
    let upstream = Upstream::start().await;
    upstream.respond(|_| Reply::sse([numbered_event(1)]));
    let mut cmd = reprise(&[
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        &upstream.url(),
        "--redis",
        &format!("redis://127.0.0.1:{port}"),
    ]);
    cmd.env("NOTIFY_SOCKET", &notify.path);
    let mut child = spawn(cmd);
    // It starts and serves without Redis, but is neither READY nor ready.
    let msg = notify.wait_for_prefix(&mut child, "STATUS=listening").await;
    assert!(!msg.contains("READY=1"), "{msg}");
    let (addr, _) = status_addr(&msg);
    let readyz = format!("http://{addr}/_reprise/readyz");
    let r = reqwest::get(&readyz).await.expect("readyz");
    assert_eq!(r.status(), 503);
    // Streams are proxied (and recorded in memory) meanwhile.
    let mut s = SseClient::new()
        .open_get(&format!("http://{addr}/gen"))
        .await;
    assert_eq!(s.collect_until_end().await.len(), 1);
    // Redis comes up: READY=1 follows, and readiness turns 200.
    let _redis = RedisServer::start_on_port(port)
        .await
        .expect("start redis-server");
    notify.wait_for(&mut child, "READY=1").await;
    let r = reqwest::get(&readyz).await.expect("readyz");
    assert_eq!(r.status(), 200);
    terminate(&child);
    notify.wait_for(&mut child, "STOPPING=1").await;
    assert_eq!(exit_code(&mut child).await, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchdog_is_pinged_when_systemd_asks() {
    let notify = NotifySocket::bind();
    let mut cmd = reprise(&[
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        "http://127.0.0.1:9",
    ]);
    // 200 ms: pings every 100 ms. No WATCHDOG_PID: the child's pid is not
    // known before it starts, and sd_watchdog_enabled(3) accepts its absence.
    cmd.env("NOTIFY_SOCKET", &notify.path)
        .env("WATCHDOG_USEC", "200000");
    let mut child = spawn(cmd);
    let msg = notify.wait_for(&mut child, "READY=1").await;
    assert_eq!(status_addr(&msg).1, "memory");
    for _ in 0..3 {
        notify.wait_for(&mut child, "WATCHDOG=1").await;
    }
    terminate(&child);
    notify.wait_for(&mut child, "STOPPING=1").await;
    assert_eq!(exit_code(&mut child).await, Some(0));
}

#[tokio::test]
async fn check_config_accepts_the_example_and_masks_secrets() {
    let example = root().join("config/reprise.toml");
    let out = output(reprise(&["--check-config", "--config"]).arg(&example)).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("configuration OK"), "{stdout}");
    assert!(
        stdout.contains("route /api/chat -> http://127.0.0.1:3000"),
        "{stdout}"
    );

    // The same file with a password in the Redis URL.
    let text = std::fs::read_to_string(&example).expect("read example config");
    let (before, after) = text
        .split_once("redis_url = ")
        .expect("example sets redis_url");
    let after = after.split_once('\n').map_or("", |(_, rest)| rest);
    let text = format!("{before}redis_url = \"redis://user:hunter2@127.0.0.1:1\"\n{after}");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("reprise.toml");
    std::fs::write(&path, text).expect("write config");

    let mut from_file = reprise(&["--check-config", "--config"]);
    from_file.arg(&path);
    // From the flag and the env var (which override the file), masked too.
    let from_flag = reprise(&[
        "--check-config",
        "--upstream",
        "http://127.0.0.1:9",
        "--redis",
        "redis://u:hunter2@h:1",
    ]);
    let mut from_env = reprise(&["--check-config", "--upstream", "http://127.0.0.1:9"]);
    from_env.env("REPRISE_REDIS_URL", "redis://u:hunter2@h:1");
    for mut cmd in [from_file, from_flag, from_env] {
        let out = output(&mut cmd).await;
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.status.code(), Some(0), "{all}");
        assert!(!all.contains("hunter2"), "the password was printed:\n{all}");
        assert!(all.contains("store = redis (redis://***@"), "{all}");
    }
}

#[tokio::test]
async fn invalid_configs_exit_2_naming_the_problem() {
    let dir = root().join("tests/fixtures/invalid-config");
    let mut fixtures: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("read tests/fixtures/invalid-config")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    fixtures.sort();
    assert!(
        fixtures.len() >= 4,
        "expected invalid config fixtures in {}",
        dir.display()
    );
    for path in fixtures {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let text = std::fs::read_to_string(&path).expect("read fixture");
        // Each fixture names what the error must say: `# expect: TEXT` lines.
        let expected: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# expect: "))
            .collect();
        assert!(!expected.is_empty(), "{name}: no `# expect:` line");
        // --check-config, and a plain start: both refuse before binding.
        for check in [true, false] {
            let mut cmd = reprise(&["--listen", "127.0.0.1:0", "--config"]);
            cmd.arg(&path);
            if check {
                cmd.arg("--check-config");
            }
            let out = output(&mut cmd).await;
            let stdout = String::from_utf8_lossy(&out.stdout);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{name}: {stdout}{stderr}");
            assert!(stdout.is_empty(), "{name}: printed {stdout:?}");
            for needle in &expected {
                assert!(
                    stderr.contains(needle),
                    "{name}: error lacks {needle:?}:\n{stderr}"
                );
            }
            assert!(
                !stderr.contains("hunter2"),
                "{name}: the password was printed:\n{stderr}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line() {
    let upstream = Upstream::start().await;
    upstream.respond(|_| {
        Reply::sse([
            event("{\"type\":\"start\"}"),
            numbered_event(1),
            numbered_event(2),
        ])
    });
    let mut cmd = reprise(&[
        "--log-format",
        "json",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
    ]);
    // Debug: the connection spans and the relay's per-stream events too.
    cmd.arg(upstream.url())
        .env("REPRISE_LOG", "debug")
        .stderr(Stdio::piped());
    let mut child = spawn(cmd);
    let stderr = child.stderr.take().expect("stderr pipe");
    let mut lines = BufReader::new(stderr).lines();

    // The "listening" event carries the bound address as a field.
    let mut seen = Vec::new();
    let addr: SocketAddr = with_timeout("the `listening` log line", async {
        loop {
            let line = lines
                .next_line()
                .await
                .expect("read stderr")
                .expect("reprise exited before listening");
            let value = parse_log_line(&line);
            seen.push(line);
            if value["message"] == "listening" {
                return value["addr"]
                    .as_str()
                    .expect("listening has addr")
                    .parse()
                    .expect("addr");
            }
        }
    })
    .await;
    wait_ready(&mut child, addr).await;

    let client = SseClient::new();
    let mut sse = client.open_get(&format!("http://{addr}/chat")).await;
    assert_eq!(sse.status(), 200);
    assert_eq!(sse.collect_until_end().await.len(), 3);

    // Read the rest concurrently so that a full pipe never blocks the relay.
    let rest = tokio::spawn(async move {
        let mut rest = Vec::new();
        while let Ok(Some(line)) = lines.next_line().await {
            rest.push(line);
        }
        rest
    });
    terminate(&child);
    assert_eq!(exit_code(&mut child).await, Some(0));
    seen.extend(
        with_timeout("the rest of stderr", rest)
            .await
            .expect("stderr reader"),
    );

    let events: Vec<Value> = seen.iter().map(|l| parse_log_line(l)).collect();
    for message in ["listening", "SIGTERM received", "shutting down", "stopped"] {
        assert!(
            events.iter().any(|e| e["message"] == message),
            "no {message:?} line in:\n{}",
            seen.join("\n")
        );
    }
    assert!(
        events.iter().any(|e| e.get("span").is_some()),
        "no line carries its span:\n{}",
        seen.join("\n")
    );
}

/// One line of `--log-format json`: a JSON object with the event's time,
/// level, target and (flattened) fields.
fn parse_log_line(line: &str) -> Value {
    let value: Value =
        serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"));
    assert!(value.is_object(), "not an object: {line}");
    for key in ["timestamp", "level", "target"] {
        assert!(value.get(key).is_some(), "no {key:?} in {line}");
    }
    value
}

/// `--admin-listen` (and `REPRISE_ADMIN_LISTEN`, below the flag) moves the
/// operational endpoints of the real binary to their own listener.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_listen_from_the_flag_or_the_env_serves_the_ops_endpoints() {
    // The flag wins over the env var, which wins over the file.
    let mut both = reprise(&[
        "--check-config",
        "--upstream",
        "http://127.0.0.1:9",
        "--admin-listen",
        "127.0.0.1:9101",
    ]);
    both.env("REPRISE_ADMIN_LISTEN", "127.0.0.1:9102");
    let mut env_only = reprise(&["--check-config", "--upstream", "http://127.0.0.1:9"]);
    env_only.env("REPRISE_ADMIN_LISTEN", "127.0.0.1:9102");
    for (mut cmd, want) in [(both, "9101"), (env_only, "9102")] {
        let out = output(&mut cmd).await;
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{stdout}");
        assert!(
            stdout.contains(&format!("admin_listen = 127.0.0.1:{want}")),
            "{stdout}"
        );
    }

    let upstream = Upstream::start().await;
    upstream.respond(|_| Reply::sse([numbered_event(1)]));
    let (port, admin_port) = (
        free_port().expect("free port"),
        free_port().expect("free port"),
    );
    let mut cmd = reprise(&[
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--upstream",
        &upstream.url(),
    ]);
    cmd.env("REPRISE_ADMIN_LISTEN", format!("127.0.0.1:{admin_port}"));
    let mut child = spawn(cmd);
    let admin: SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();
    wait_ready(&mut child, admin).await;
    let client = SseClient::new();
    let r = client
        .http()
        .get(format!("http://127.0.0.1:{port}/_reprise/metrics"))
        .send()
        .await
        .expect("public metrics");
    assert_eq!(r.status(), 404);
    let r = client
        .http()
        .get(format!("http://{admin}/_reprise/metrics"))
        .send()
        .await
        .expect("admin metrics");
    assert_eq!(r.status(), 200);
    let mut s = client
        .open_get(&format!("http://127.0.0.1:{port}/gen"))
        .await;
    assert_eq!(s.collect_until_end().await.len(), 1);
    terminate(&child);
    assert_eq!(exit_code(&mut child).await, Some(0));
}
