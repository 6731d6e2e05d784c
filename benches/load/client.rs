//! The load generator: one SSE client per stream, each on its own HTTP/1.1
//! connection (hyper's connection-level client, no pool), checking that the
//! events of its stream arrive exactly once and in order, and timing them.
//!
//! Clients bind to several loopback source addresses (127.0.0.1–16) so that
//! tens of thousands of connections never run out of ephemeral ports.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::{header, Request};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use memchr::memmem;
use tokio::net::TcpSocket;
use tokio::sync::{oneshot, OwnedSemaphorePermit};

use crate::now_us;

/// Loopback source addresses used in turn.
const SOURCE_ADDRS: u8 = 16;

/// One stream to read: where, and what it must contain.
#[derive(Clone, Debug)]
pub struct Job {
    pub addr: SocketAddr,
    pub path: String,
    /// The `s` every event must carry.
    pub tag: u64,
    /// Events expected, with indexes `0..n`.
    pub n: u64,
    /// The whole stream must be read within this.
    pub deadline: Duration,
}

/// What one client saw.
#[derive(Debug, Default)]
pub struct StreamResult {
    pub status: u16,
    /// `Reprise-Stream-Id` of the response, if any.
    pub stream_id: Option<String>,
    pub events: u64,
    /// Expected events that never came (gaps and a short stream).
    pub lost: u64,
    /// Events that came again, or out of order.
    pub dup: u64,
    /// Events of another stream, or unreadable.
    pub foreign: u64,
    /// Response body bytes.
    pub bytes: u64,
    /// Microseconds from connecting to the response headers / first event.
    pub ttfh_us: Option<u32>,
    pub ttfe_us: Option<u32>,
    /// Per-event latency: receive time minus the upstream's send time (µs).
    pub lat_us: Vec<u32>,
    pub error: Option<String>,
}

/// Optional signals from a running client to the scenario driving it.
#[derive(Default)]
pub struct Hooks {
    /// Gets the status and stream id once the response headers are in.
    pub on_headers: Option<oneshot::Sender<(u16, Option<String>)>>,
    /// Counts clients whose response headers are in.
    pub connected: Option<Arc<AtomicUsize>>,
    /// Held until the response headers are in (bounds concurrent connects).
    pub permit: Option<OwnedSemaphorePermit>,
    /// Counts clients whose first event is in.
    pub first_event: Option<Arc<AtomicUsize>>,
}

/// Source address for the `i`-th connection.
pub fn source_ip(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(
        127,
        0,
        0,
        1 + (i % SOURCE_ADDRS as usize) as u8,
    ))
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Reads one stream to its end (or its deadline) and checks it.
pub async fn run_stream(job: &Job, src: IpAddr, latency: bool, mut hooks: Hooks) -> StreamResult {
    let started = Instant::now();
    let mut r = StreamResult::default();
    let mut check = Checker {
        tag: job.tag,
        n: job.n,
        next: 0,
    };
    let read = async {
        let sock = TcpSocket::new_v4()?;
        sock.bind(SocketAddr::new(src, 0))?;
        let tcp = sock.connect(job.addr).await?;
        tcp.set_nodelay(true)?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = Request::get(job.path.as_str())
            .header(header::HOST, job.addr.to_string())
            .header(header::ACCEPT, "text/event-stream")
            .body(Empty::<Bytes>::new())?;
        let resp = sender.send_request(req).await?;
        r.status = resp.status().as_u16();
        r.ttfh_us = Some(elapsed_us(started));
        r.stream_id = resp
            .headers()
            .get("reprise-stream-id")
            .and_then(|v| v.to_str().ok())
            .map(String::from);
        if let Some(tx) = hooks.on_headers.take() {
            let _ = tx.send((r.status, r.stream_id.clone()));
        }
        if let Some(c) = &hooks.connected {
            c.fetch_add(1, Ordering::Relaxed);
        }
        drop(hooks.permit.take());
        if r.status != 200 {
            return Err::<(), BoxError>(format!("HTTP status {}", r.status).into());
        }
        let mut body = resp.into_body();
        let mut buf = BytesMut::new();
        while let Some(frame) = body.frame().await {
            let Ok(data) = frame?.into_data() else {
                continue;
            };
            r.bytes += data.len() as u64;
            let now = if latency || r.ttfe_us.is_none() {
                now_us()
            } else {
                0
            };
            let before = r.events;
            if buf.is_empty() {
                // Usual case: parse in place, keep only an incomplete tail.
                let used = check.feed(&data, now, latency, &mut r);
                buf.extend_from_slice(&data[used..]);
            } else {
                buf.extend_from_slice(&data);
                let used = check.feed(&buf, now, latency, &mut r);
                buf.advance(used);
            }
            if before == 0 && r.events > 0 {
                r.ttfe_us = Some(elapsed_us(started));
                if let Some(c) = &hooks.first_event {
                    c.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        Ok(())
    };
    match tokio::time::timeout(job.deadline, read).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => r.error = Some(error_chain(&*e)),
        Err(_) => r.error = Some(format!("stream not finished after {:?}", job.deadline)),
    }
    drop(hooks);
    r.lost += check.n.saturating_sub(check.next);
    r
}

fn elapsed_us(since: Instant) -> u32 {
    since.elapsed().as_micros().min(u32::MAX as u128) as u32
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}

/// Per-stream order and completeness check.
struct Checker {
    tag: u64,
    n: u64,
    /// Index expected next.
    next: u64,
}

impl Checker {
    /// Handles every complete event in `data`; returns the bytes consumed.
    fn feed(&mut self, data: &[u8], now: u64, latency: bool, r: &mut StreamResult) -> usize {
        let mut pos = 0;
        let finder = memmem::Finder::new(b"\n\n");
        while let Some(end) = finder.find(&data[pos..]) {
            self.event(&data[pos..pos + end], now, latency, r);
            pos += end + 2;
        }
        pos
    }

    /// One event block (lines without the blank line). Blocks without a
    /// `data:` line (comments, heartbeats) are ignored.
    fn event(&mut self, block: &[u8], now: u64, latency: bool, r: &mut StreamResult) {
        let data = if let Some(rest) = block.strip_prefix(b"data: ") {
            rest
        } else if let Some(at) = memmem::find(block, b"\ndata: ") {
            &block[at + 7..]
        } else {
            return;
        };
        let Some((s, i, t)) = parse_fields(data) else {
            r.foreign += 1;
            return;
        };
        if s != self.tag || i >= self.n {
            r.foreign += 1;
            return;
        }
        r.events += 1;
        if i == self.next {
            self.next += 1;
        } else if i < self.next {
            r.dup += 1;
        } else {
            r.lost += i - self.next;
            self.next = i + 1;
        }
        if latency {
            r.lat_us
                .push(now.saturating_sub(t).min(u32::MAX as u64) as u32);
        }
    }
}

/// `{"s":S,"i":I,"t":T,...` → (S, I, T).
fn parse_fields(d: &[u8]) -> Option<(u64, u64, u64)> {
    let mut p = 0;
    let s = field(d, &mut p, b"{\"s\":")?;
    let i = field(d, &mut p, b",\"i\":")?;
    let t = field(d, &mut p, b",\"t\":")?;
    Some((s, i, t))
}

fn field(d: &[u8], p: &mut usize, lit: &[u8]) -> Option<u64> {
    if !d[*p..].starts_with(lit) {
        return None;
    }
    *p += lit.len();
    let start = *p;
    let mut v: u64 = 0;
    while let Some(c) = d.get(*p).filter(|c| c.is_ascii_digit()) {
        v = v.checked_mul(10)?.checked_add(u64::from(c - b'0'))?;
        *p += 1;
    }
    (*p > start).then_some(v)
}

/// Runs `jobs` with at most `concurrency` streams at a time. Worker `w`
/// starts `w × stagger / concurrency` late, so that throttled streams do
/// not all tick at the same instant.
pub async fn run_many(
    jobs: Arc<Vec<Job>>,
    concurrency: usize,
    stagger: Duration,
    latency: bool,
) -> Vec<StreamResult> {
    let next = Arc::new(AtomicUsize::new(0));
    let workers = concurrency.clamp(1, jobs.len().max(1));
    let mut set = tokio::task::JoinSet::new();
    for w in 0..workers {
        let (jobs, next) = (jobs.clone(), next.clone());
        let delay = stagger * w as u32 / workers as u32;
        set.spawn(async move {
            tokio::time::sleep(delay).await;
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(job) = jobs.get(i) else { break };
                out.push(run_stream(job, source_ip(i), latency, Hooks::default()).await);
            }
            out
        });
    }
    let mut all = Vec::with_capacity(jobs.len());
    while let Some(res) = set.join_next().await {
        match res {
            Ok(out) => all.extend(out),
            Err(e) => all.push(StreamResult {
                error: Some(format!("client task failed: {e}")),
                ..StreamResult::default()
            }),
        }
    }
    all
}

/// Many streams' results, summed.
#[derive(Debug, Default)]
pub struct Totals {
    pub streams: u64,
    /// Streams read completely, in order, without error.
    pub complete: u64,
    pub events: u64,
    pub bytes: u64,
    pub lost: u64,
    pub dup: u64,
    pub foreign: u64,
    pub lat_us: Vec<u32>,
    pub ttfe_us: Vec<u32>,
    pub ttfh_us: Vec<u32>,
    /// Error messages and how often each occurred.
    pub errors: BTreeMap<String, u64>,
}

impl Totals {
    pub fn add(&mut self, r: StreamResult) {
        self.streams += 1;
        if r.error.is_none() && r.lost == 0 && r.dup == 0 && r.foreign == 0 {
            self.complete += 1;
        }
        self.events += r.events;
        self.bytes += r.bytes;
        self.lost += r.lost;
        self.dup += r.dup;
        self.foreign += r.foreign;
        self.lat_us.extend_from_slice(&r.lat_us);
        self.ttfe_us.extend(r.ttfe_us);
        self.ttfh_us.extend(r.ttfh_us);
        if let Some(e) = r.error {
            *self.errors.entry(e).or_default() += 1;
        }
    }

    pub fn of(results: impl IntoIterator<Item = StreamResult>) -> Totals {
        let mut t = Totals::default();
        for r in results {
            t.add(r);
        }
        t.lat_us.sort_unstable();
        t.ttfe_us.sort_unstable();
        t.ttfh_us.sort_unstable();
        t
    }

    /// Errors in one line, most frequent first, for the notes under a table.
    pub fn error_summary(&self) -> Option<String> {
        if self.errors.is_empty() {
            return None;
        }
        let mut v: Vec<_> = self.errors.iter().collect();
        v.sort_by(|a, b| b.1.cmp(a.1));
        Some(
            v.iter()
                .take(3)
                .map(|(e, n)| format!("{n}× {e}"))
                .collect::<Vec<_>>()
                .join("; "),
        )
    }
}
