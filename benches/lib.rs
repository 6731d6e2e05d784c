//! Shared benchmark helpers.
//!
//! What a report prints about where it ran, shared by the benchmarks that
//! start processes (`load`, `outage`).

use std::fmt::Write as _;
use std::fs;
use std::process::Command;

/// The machine, for the top of the report.
pub fn machine_summary() -> String {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")?
                .split_once(':')
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let mhz = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("cpu MHz")?
                .split_once(':')
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_default();
    let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: u64 = meminfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("MemTotal:")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0);
    let nproc = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut s = String::new();
    let _ = write!(
        s,
        "nproc {nproc}; CPU {model}{}; memory {:.1} GiB; kernel {}",
        if mhz.is_empty() {
            String::new()
        } else {
            format!(" @ {mhz} MHz")
        },
        mem_kib as f64 / 1048576.0,
        kernel.trim()
    );
    s
}

/// First line of a command's output (`redis-server --version`), or "".
pub fn version_of(cmd: &str, arg: &str) -> String {
    Command::new(cmd)
        .arg(arg)
        .output()
        .ok()
        .map(|o| {
            let text = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .unwrap_or_default()
}
