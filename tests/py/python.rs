//! The Rust side of the real Python clients in `tests/py/` (`openai`,
//! `anthropic`, `ollama` from PyPI, pinned in `tests/py/requirements.txt`):
//! runs one of its scripts with the virtualenv's interpreter and reads its
//! reports, one JSON object per stdout line, as they come.
//!
//! Included with `#[path = "py/python.rs"] mod python;`. Nothing is skipped:
//! a missing virtualenv fails the test with what to run (`bash tests/run.sh`
//! creates it).

#![allow(dead_code)] // Each including test uses its own part of it.

use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use reprise_tests::{with_timeout, with_timeout_of, TIMEOUT};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

/// Bound on a script's first report: starting Python and importing an SDK,
/// on a machine that runs other tests at the same time.
const FIRST_REPORT: Duration = Duration::from_secs(60);

/// `tests/py`: the scripts and `requirements.txt`.
pub fn py_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("py")
}

/// The virtualenv's interpreter (`$REPRISE_PYTHON` overrides it). Panics with
/// what to run if it is missing.
pub fn python() -> PathBuf {
    let path = std::env::var_os("REPRISE_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| py_dir().join(".venv/bin/python"));
    assert!(
        path.is_file(),
        "{} is missing: create the virtualenv with `python3 -m venv tests/py/.venv && \
         tests/py/.venv/bin/pip install -r tests/py/requirements.txt` (`bash tests/run.sh` does it)",
        path.display()
    );
    path
}

/// A running script of `tests/py/`. Dropping it kills the script.
pub struct PyScript {
    script: String,
    child: Child,
    /// The script's stdout, one JSON report per line.
    lines: Lines<BufReader<ChildStdout>>,
    /// Bound on the next report: [`FIRST_REPORT`], then [`TIMEOUT`].
    bound: Duration,
}

impl PyScript {
    /// Starts `python tests/py/<script> <args>` with `env` added. Its stderr
    /// goes to the test's output (shown when the test fails).
    pub fn spawn(script: &str, args: &[&str], env: &[(&str, &str)]) -> PyScript {
        let mut command = Command::new(python());
        command
            .arg(py_dir().join(script))
            .args(args)
            .current_dir(py_dir())
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        for (name, value) in env {
            command.env(name, value);
        }
        let mut child = command
            .spawn()
            .unwrap_or_else(|err| panic!("starting python {script}: {err}"));
        let stdout = child.stdout.take().expect("piped stdout");
        PyScript {
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
