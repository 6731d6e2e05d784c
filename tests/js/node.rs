//! The Rust side of the real JavaScript clients in `tests/js/` (the far
//! client end of the request's path, client → relay → upstream): runs one of
//! its Node scripts as a child process and reads its reports, one JSON object
//! per stdout line, as they come, so that a test can act mid-stream.
//!
//! Included with `#[path = "js/node.rs"] mod node;` by the tests that drive
//! JavaScript clients. Nothing is skipped: a missing Node.js, npm install or
//! browser fails the test with what to run (`bash tests/run.sh` installs
//! them all).

#![allow(dead_code)] // Each including test uses its own part of it.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use reprise_tests::{with_timeout, with_timeout_of, TIMEOUT};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

/// Bound on a script's first report: it includes starting Node.js and maybe a
/// browser, on a machine that runs other tests at the same time.
const FIRST_REPORT: Duration = Duration::from_secs(60);

/// `tests/js`: the scripts, `package.json` and `node_modules`.
pub fn js_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("js")
}

/// Debian's Chromium (`apt-get install chromium`), or `$REPRISE_CHROMIUM`.
/// Panics with the install command if it is missing: never downloads one.
pub fn chromium() -> PathBuf {
    let path = std::env::var_os("REPRISE_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    assert!(
        path.is_file(),
        "headless Chromium not found at {}: install Debian's package \
         (`apt-get install -y chromium`, which `bash tests/run.sh` does) or set REPRISE_CHROMIUM",
        path.display()
    );
    path
}

/// Panics with what to run unless `node` runs and `package` is installed
/// under `tests/js/node_modules`.
fn require_node(package: &str) {
    let version = std::process::Command::new("node")
        .arg("--version")
        .output()
        .unwrap_or_else(|err| {
            panic!(
                "Node.js not found ({err}): these tests drive real JavaScript clients; \
                 install Node.js 20+ (`bash tests/run.sh` checks it)"
            )
        });
    assert!(version.status.success(), "`node --version` failed");
    let installed = js_dir()
        .join("node_modules")
        .join(package)
        .join("package.json");
    assert!(
        installed.is_file(),
        "{} is missing: run `npm ci --prefix tests/js` (`bash tests/run.sh` does it)",
        installed.display()
    );
}

/// A running Node script of `tests/js/`. Dropping it kills the script.
pub struct NodeScript {
    script: String,
    child: Child,
    /// The script's stdout, one JSON report per line.
    lines: Lines<BufReader<ChildStdout>>,
    /// Bound on the next report: [`FIRST_REPORT`], then [`TIMEOUT`].
    bound: Duration,
}

impl NodeScript {
    /// Starts `node tests/js/<script> <args>` after checking that Node.js and
    /// the npm `package` the script imports are installed. Its stderr goes to
    /// the test's output (shown when the test fails).
    pub fn spawn(script: &str, package: &str, args: &[&str], env: &[(&str, &Path)]) -> NodeScript {
        require_node(package);
        let mut command = Command::new("node");
        command
            .arg(js_dir().join(script))
            .args(args)
            .current_dir(js_dir())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        for (name, value) in env {
            command.env(name, value);
        }
        let mut child = command
            .spawn()
            .unwrap_or_else(|err| panic!("starting node {script}: {err}"));
        let stdout = child.stdout.take().expect("piped stdout");
        NodeScript {
            script: script.to_owned(),
            child,
            lines: BufReader::new(stdout).lines(),
            bound: FIRST_REPORT,
        }
    }

    /// The next report, or `None` once the script closed its stdout. Panics
    /// on a line that is not JSON, or if nothing comes within the bound.
    pub async fn next(&mut self) -> Option<Value> {
        let what = format!("a report from {}", self.script);
        let line = with_timeout_of(self.bound, what, self.lines.next_line()).await;
        self.bound = TIMEOUT;
        let line = line.unwrap_or_else(|err| panic!("reading {}'s stdout: {err}", self.script))?;
        let report = serde_json::from_str(&line).unwrap_or_else(|err| {
            panic!(
                "{} printed a line that is not JSON ({err}): {line:?}",
                self.script
            )
        });
        Some(report)
    }

    /// The next report; panics (with the exit status) if the script ended.
    pub async fn report(&mut self) -> Value {
        match self.next().await {
            Some(report) => report,
            None => {
                let status = self.wait().await;
                panic!(
                    "{} ended ({status}) before the expected report",
                    self.script
                )
            }
        }
    }

    /// Reads reports until one has `"kind": kind`; returns those before it
    /// and that one.
    pub async fn until_kind(&mut self, kind: &str) -> (Vec<Value>, Value) {
        let mut before = Vec::new();
        loop {
            let report = self.report().await;
            if report["kind"] == kind {
                return (before, report);
            }
            before.push(report);
        }
    }

    /// Every remaining report; then waits for the script to exit and panics
    /// unless it succeeded.
    pub async fn finish(mut self) -> Vec<Value> {
        let mut rest = Vec::new();
        while let Some(report) = self.next().await {
            rest.push(report);
        }
        let status = self.wait().await;
        assert!(
            status.success(),
            "{} failed ({status}); its stderr is above",
            self.script
        );
        rest
    }

    async fn wait(&mut self) -> ExitStatus {
        let what = format!("{} to exit", self.script);
        with_timeout(what, self.child.wait())
            .await
            .unwrap_or_else(|err| panic!("waiting for {}: {err}", self.script))
    }
}
