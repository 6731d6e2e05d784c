//! Printing: one Markdown table per scenario (so the output pastes into
//! `benches/RESULTS.md` as is), and the number formats the tables use.

use std::time::Duration;

/// One scenario's table: a row per figure, a column per system under test.
pub struct Table {
    title: String,
    columns: Vec<String>,
    rows: Vec<(String, Vec<String>)>,
    notes: Vec<String>,
    /// Target lines (issue 14), printed as a list after the notes.
    targets: Vec<String>,
}

impl Table {
    pub fn new(title: impl Into<String>, columns: Vec<String>) -> Table {
        Table {
            title: title.into(),
            columns,
            rows: Vec::new(),
            notes: Vec::new(),
            targets: Vec::new(),
        }
    }

    pub fn row(&mut self, label: &str, cells: Vec<String>) {
        self.rows.push((label.to_string(), cells));
    }

    pub fn note(&mut self, note: impl Into<String>) {
        self.notes.push(note.into());
    }

    /// A target with this run's figures: `chat: … 57.9 vs nginx 20.5: not met`.
    pub fn target(&mut self, line: impl Into<String>) {
        self.targets.push(line.into());
    }

    pub fn print(&self) {
        let ncols = self.columns.len() + 1;
        let mut widths = vec![0usize; ncols];
        let header: Vec<&str> = std::iter::once("")
            .chain(self.columns.iter().map(String::as_str))
            .collect();
        let lines: Vec<Vec<&str>> = self
            .rows
            .iter()
            .map(|(l, cells)| {
                std::iter::once(l.as_str())
                    .chain(cells.iter().map(String::as_str))
                    .collect()
            })
            .collect();
        for line in std::iter::once(&header).chain(lines.iter()) {
            for (i, c) in line.iter().enumerate().take(ncols) {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
        let fmt = |line: &[&str]| {
            let cells: Vec<String> = (0..ncols)
                .map(|i| {
                    let c = line.get(i).copied().unwrap_or("");
                    if i == 0 {
                        format!("{c:<w$}", w = widths[i])
                    } else {
                        format!("{c:>w$}", w = widths[i])
                    }
                })
                .collect();
            format!("| {} |", cells.join(" | "))
        };
        println!("\n### {}\n", self.title);
        println!("{}", fmt(&header));
        // `|---|---:|`: the label column left-aligned, figures right-aligned.
        let rule: Vec<String> = (0..ncols)
            .map(|i| {
                if i == 0 {
                    "-".repeat(widths[i] + 2)
                } else {
                    format!("{}:", "-".repeat(widths[i] + 1))
                }
            })
            .collect();
        println!("|{}|", rule.join("|"));
        for line in &lines {
            println!("{}", fmt(line));
        }
        for n in &self.notes {
            println!("\n{n}");
        }
        if !self.targets.is_empty() {
            println!("\nTargets of issue 14 with this run's figures:\n");
            for t in &self.targets {
                println!("- {t}");
            }
        }
    }
}

/// Not measured in this column.
pub const NA: &str = "–";

/// The `p`-th percentile (0–100) of sorted samples.
pub fn pct(sorted: &[u32], p: f64) -> Option<u32> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// Microseconds as milliseconds with two decimals.
pub fn ms(us: Option<u32>) -> String {
    us.map_or(NA.into(), |u| format!("{:.2}", u as f64 / 1000.0))
}

/// p50 / p99 / max of sorted samples, in ms.
pub fn ms3(sorted: &[u32]) -> String {
    if sorted.is_empty() {
        return NA.into();
    }
    format!(
        "{} / {} / {}",
        ms(pct(sorted, 50.0)),
        ms(pct(sorted, 99.0)),
        ms(sorted.last().copied())
    )
}

/// p50 / p99 of sorted samples, in ms.
pub fn ms2(sorted: &[u32]) -> String {
    if sorted.is_empty() {
        return NA.into();
    }
    format!("{} / {}", ms(pct(sorted, 50.0)), ms(pct(sorted, 99.0)))
}

/// CPU time per event in µs (two decimals).
pub fn us_per(cpu: Duration, events: u64) -> String {
    if events == 0 {
        return NA.into();
    }
    format!("{:.2}", cpu.as_secs_f64() * 1e6 / events as f64)
}

pub fn mib(kib: Option<u64>) -> String {
    kib.map_or(NA.into(), |k| format!("{:.1}", k as f64 / 1024.0))
}

/// A rate per second with thousands separators.
pub fn rate(count: f64, wall: Duration) -> f64 {
    if wall.is_zero() {
        0.0
    } else {
        count / wall.as_secs_f64()
    }
}

/// An integer with thousands separators: 1234567 → 1,234,567.
pub fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}
