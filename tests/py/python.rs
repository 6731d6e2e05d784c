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

use reprise_tests::script::Script;
use tokio::process::Command;

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

/// A running script of `tests/py/` (see [`Script`]).
pub type PyScript = Script;

/// Starts `python tests/py/<script> <args>` with `env` added.
pub fn py_script(script: &str, args: &[&str], env: &[(&str, &str)]) -> PyScript {
    let mut command = Command::new(python());
    command
        .arg(py_dir().join(script))
        .args(args)
        .current_dir(py_dir())
        .env("PYTHONUNBUFFERED", "1");
    for (name, value) in env {
        command.env(name, value);
    }
    Script::spawn(script, command)
}
