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

use reprise_tests::script::Script;
use tokio::process::Command;

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

/// A running Node script of `tests/js/` (see [`Script`]).
pub type NodeScript = Script;

/// Starts `node tests/js/<script> <args>` after checking that Node.js and
/// the npm `package` the script imports are installed.
pub fn node_script(
    script: &str,
    package: &str,
    args: &[&str],
    env: &[(&str, &Path)],
) -> NodeScript {
    require_node(package);
    let mut command = Command::new("node");
    command
        .arg(js_dir().join(script))
        .args(args)
        .current_dir(js_dir());
    for (name, value) in env {
        command.env(name, value);
    }
    Script::spawn(script, command)
}
