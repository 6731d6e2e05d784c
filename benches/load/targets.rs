//! The targets of issue 14 ("record at the price of a plain proxy"), checked
//! against the figures of this run and printed under each scenario's table:
//! `chat: Reprise → Redis CPU/event 57.88 µs vs nginx 20.50 µs: not met`.
//! Every comparison is within the run (the columns side by side), as the
//! issue asks; nothing here fails the bench.

use crate::report::{pct, rate, thousands, Table};
use crate::{per_event_us, Col, Measure, OpenMeasure};

/// Which side of the limit meets the target.
#[derive(Clone, Copy)]
enum Bound {
    AtMost,
    AtLeast,
}

/// A figure as printed in a target line.
type Fmt = fn(f64) -> String;

fn us(v: f64) -> String {
    format!("{v:.2} µs")
}

fn ms(v: f64) -> String {
    format!("{v:.2} ms")
}

fn per_s(v: f64) -> String {
    format!("{}/s", thousands(v as u64))
}

fn kib(v: f64) -> String {
    format!("{v:.1} KiB")
}

/// One target line: this run's figure, the limit it is held to, met or not.
#[allow(clippy::too_many_arguments)]
fn line(
    t: &mut Table,
    scenario: &str,
    what: &str,
    ours: Option<f64>,
    against: &str,
    limit: Option<f64>,
    bound: Bound,
    fmt: Fmt,
) {
    let sign = match bound {
        Bound::AtMost => "≤",
        Bound::AtLeast => "≥",
    };
    let against = if against.is_empty() {
        String::new()
    } else {
        format!("{against} ")
    };
    let (Some(v), Some(l)) = (ours, limit) else {
        let against = against.trim_end_matches(" = ").trim_end();
        t.target(format!(
            "{scenario}: {what} {sign} {against}: cannot tell (a column was not run or failed)"
        ));
        return;
    };
    let met = match bound {
        Bound::AtMost => v <= l,
        Bound::AtLeast => v >= l,
    };
    t.target(format!(
        "{scenario}: {what} {} (target {sign} {against}{}): {}",
        fmt(v),
        fmt(l),
        if met { "met" } else { "**not met**" }
    ));
}

fn get(results: &[(Col, Result<Measure, String>)], col: Col) -> Option<&Measure> {
    results
        .iter()
        .find(|(c, _)| *c == col)
        .and_then(|(_, r)| r.as_ref().ok())
        .filter(|m| m.totals.events > 0)
}

/// The proxy's CPU per event (µs).
fn cpu(m: &Measure) -> Option<f64> {
    Some(per_event_us(m.delta.proxy, m.totals.events))
}

fn redis_cpu(m: &Measure) -> Option<f64> {
    Some(per_event_us(m.delta.redis, m.totals.events))
}

fn cpu_with_redis(m: &Measure) -> Option<f64> {
    Some(per_event_us(m.delta.proxy + m.delta.redis, m.totals.events))
}

fn p99_ms(m: &Measure) -> Option<f64> {
    pct(&m.totals.lat_us, 99.0).map(|u| u as f64 / 1000.0)
}

fn ttfe_p50_ms(m: &Measure) -> Option<f64> {
    pct(&m.totals.ttfe_us, 50.0).map(|u| u as f64 / 1000.0)
}

fn events_per_s(m: &Measure) -> Option<f64> {
    Some(rate(m.totals.events as f64, m.delta.wall))
}

/// The targets of a load scenario (chat, chat-1000, firehose).
pub fn load(t: &mut Table, scenario: &str, results: &[(Col, Result<Measure, String>)]) {
    use Bound::{AtLeast, AtMost};
    let nginx = get(results, Col::Nginx);
    let direct = get(results, Col::Direct);
    let redis = get(results, Col::Redis);
    let recording = [
        (Col::Redis, get(results, Col::Redis)),
        (Col::Embedded, get(results, Col::Embedded)),
    ];
    let of = |m: Option<&Measure>, f: fn(&Measure) -> Option<f64>| m.and_then(f);
    match scenario {
        "chat" => {
            line(
                t,
                scenario,
                "Reprise → Redis CPU/event",
                of(redis, cpu),
                "nginx",
                of(nginx, cpu),
                AtMost,
                us,
            );
            line(
                t,
                scenario,
                "Redis's own CPU/event",
                of(redis, redis_cpu),
                "",
                Some(3.0),
                AtMost,
                us,
            );
            line(
                t,
                scenario,
                "Reprise → embedded CPU/event",
                of(recording[1].1, cpu),
                "nginx",
                of(nginx, cpu),
                AtMost,
                us,
            );
            for (col, m) in recording {
                let what = format!("{} p99 latency", col.title());
                line(
                    t,
                    scenario,
                    &what,
                    of(m, p99_ms),
                    "nginx",
                    of(nginx, p99_ms),
                    AtMost,
                    ms,
                );
                line(
                    t,
                    scenario,
                    &what,
                    of(m, p99_ms),
                    "direct + 2 ms =",
                    of(direct, p99_ms).map(|d| d + 2.0),
                    AtMost,
                    ms,
                );
            }
            for (col, m) in recording {
                line(
                    t,
                    scenario,
                    &format!("{} time to first event p50", col.title()),
                    of(m, ttfe_p50_ms),
                    "nginx + 2 ms =",
                    of(nginx, ttfe_p50_ms).map(|n| n + 2.0),
                    AtMost,
                    ms,
                );
            }
        }
        "chat-1000" => {
            line(
                t,
                scenario,
                "Reprise → Redis events/s",
                of(redis, events_per_s),
                "nginx",
                of(nginx, events_per_s),
                AtLeast,
                per_s,
            );
            line(
                t,
                scenario,
                "Reprise → Redis p99 latency",
                of(redis, p99_ms),
                "2 × nginx =",
                of(nginx, p99_ms).map(|n| 2.0 * n),
                AtMost,
                ms,
            );
        }
        "firehose" => {
            line(
                t,
                scenario,
                "(Reprise + Redis) CPU/event",
                of(redis, cpu_with_redis),
                "nginx",
                of(nginx, cpu),
                AtMost,
                us,
            );
            line(
                t,
                scenario,
                "Reprise → embedded CPU/event",
                of(recording[1].1, cpu),
                "nginx",
                of(nginx, cpu),
                AtMost,
                us,
            );
            for (col, m) in recording {
                line(
                    t,
                    scenario,
                    &format!("{} events/s", col.title()),
                    of(m, events_per_s),
                    "nginx",
                    of(nginx, events_per_s),
                    AtLeast,
                    per_s,
                );
            }
        }
        _ => {}
    }
}

/// The open-streams target: RSS per open recorded stream ≤ 1.5 × nginx's.
pub fn open(t: &mut Table, results: &[(Col, Result<OpenMeasure, String>)]) {
    let per_stream = |col: Col| {
        results
            .iter()
            .find(|(c, _)| *c == col)
            .and_then(|(_, r)| r.as_ref().ok())
            .and_then(OpenMeasure::rss_per_stream_kib)
    };
    let nginx = per_stream(Col::Nginx);
    for col in [Col::Redis, Col::Embedded] {
        line(
            t,
            "open",
            &format!("{} RSS per open stream", col.title()),
            per_stream(col),
            "1.5 × nginx =",
            nginx.map(|n| 1.5 * n),
            Bound::AtMost,
            kib,
        );
    }
}
