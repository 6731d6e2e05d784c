//! A real client's script run as a child process (the far client end of the
//! request's path, client → relay → upstream) that reports one JSON object
//! per stdout line, read as they come so that a test can act mid-stream.
//! `tests/js/node.rs` (Node.js) and `tests/py/python.rs` (Python) start
//! theirs through [`Script::spawn`].

use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

use crate::{with_timeout, with_timeout_of, TIMEOUT};

/// Bound on a script's first report: it includes starting the interpreter
/// (and maybe a browser), on a machine that runs other tests at once.
const FIRST_REPORT: Duration = Duration::from_secs(60);

/// A running script. Dropping it kills the script.
pub struct Script {
    name: String,
    child: Child,
    /// The script's stdout, one JSON report per line.
    lines: Lines<BufReader<ChildStdout>>,
    /// Bound on the next report: [`FIRST_REPORT`], then [`TIMEOUT`].
    bound: Duration,
}

impl Script {
    /// Starts `command` (named `name` in failures) with stdout piped, no
    /// stdin, and stderr going to the test's output (shown when it fails).
    pub fn spawn(name: &str, mut command: Command) -> Script {
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let mut child = command
            .spawn()
            .unwrap_or_else(|err| panic!("starting {name}: {err}"));
        let stdout = child.stdout.take().expect("piped stdout");
        Script {
            name: name.to_owned(),
            child,
            lines: BufReader::new(stdout).lines(),
            bound: FIRST_REPORT,
        }
    }

    /// The next report, or `None` once the script closed its stdout. Panics
    /// on a line that is not JSON, or if nothing comes within the bound.
    pub async fn next(&mut self) -> Option<Value> {
        let what = format!("a report from {}", self.name);
        let line = with_timeout_of(self.bound, what, self.lines.next_line()).await;
        self.bound = TIMEOUT;
        let line = line.unwrap_or_else(|err| panic!("reading {}'s stdout: {err}", self.name))?;
        let report = serde_json::from_str(&line).unwrap_or_else(|err| {
            panic!(
                "{} printed a line that is not JSON ({err}): {line:?}",
                self.name
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
                panic!("{} ended ({status}) before the expected report", self.name)
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
            self.name
        );
        rest
    }

    async fn wait(&mut self) -> ExitStatus {
        let what = format!("{} to exit", self.name);
        with_timeout(what, self.child.wait())
            .await
            .unwrap_or_else(|err| panic!("waiting for {}: {err}", self.name))
    }
}
