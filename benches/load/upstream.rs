//! The mock LLM upstream: an HTTP/1.1 server (hyper) that answers
//! `GET /sse?...` with a `text/event-stream` of numbered, timestamped events,
//! each written and flushed on its own. It runs as a process of its own (the
//! benchmark binary started with `--serve-upstream ADDR`), so that its CPU is
//! neither the proxy's nor the load generator's.
//!
//! Query parameters of `/sse`:
//! - `n`: events in the stream; `size`: bytes per event, `data: ` to the
//!   blank line included (at least ~60);
//! - `interval_us`: time between events (event `k` is due `k × interval`
//!   after the request; 0 = as fast as the connection takes them);
//! - `tag`: a number echoed in every event, so clients detect crossed streams;
//! - `hold=1`: send the headers, then nothing until `POST /release`;
//! - `hold_at=K`: send the headers and the first `K` events, then nothing
//!   until `POST /release` (the connection stays open: an answer that
//!   paused after its first token).
//!
//! Each event is `data: {"s":TAG,"i":INDEX,"t":SEND_TIME_US,"p":"xxx…"}`
//! followed by a blank line; `t` is microseconds since the Unix epoch, taken
//! right before the event is handed to the connection.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpSocket;
use tokio_util::sync::CancellationToken;

use crate::now_us;

type Body = BoxBody<Bytes, Infallible>;

/// Shared by every connection: the token `POST /release` cancels.
#[derive(Default)]
struct State {
    release: Mutex<CancellationToken>,
}

impl State {
    fn current(&self) -> CancellationToken {
        self.release
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Releases every held stream; streams held later wait for the next call.
    fn release(&self) {
        let old = std::mem::take(&mut *self.release.lock().unwrap_or_else(|p| p.into_inner()));
        old.cancel();
    }
}

/// Serves until the process is killed.
pub fn serve(addr: SocketAddr) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("upstream runtime: {e}"))?;
    rt.block_on(async move {
        // A deep accept queue: the upstream must never be what drops a SYN.
        let listener = (|| {
            let sock = TcpSocket::new_v4()?;
            sock.set_reuseaddr(true)?;
            sock.bind(addr)?;
            sock.listen(4096)
        })()
        .map_err(|e| format!("upstream listen {addr}: {e}"))?;
        let state = Arc::new(State::default());
        loop {
            let (io, _) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    eprintln!("upstream: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            };
            let _ = io.set_nodelay(true);
            let state = state.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let state = state.clone();
                    async move { Ok::<_, Infallible>(handle(&state, req)) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .keep_alive(true)
                    .serve_connection(TokioIo::new(io), svc)
                    .await;
            });
        }
    })
}

fn handle(state: &State, req: Request<Incoming>) -> Response<Body> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/sse") => {
            let q = req.uri().query().unwrap_or("");
            let param_opt = |name: &str| -> Option<u64> {
                q.split('&')
                    .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
                    .and_then(|v| v.parse().ok())
            };
            let param = |name: &str| param_opt(name).unwrap_or(0);
            // `hold=1` is `hold_at=0`.
            let hold_at = if param("hold") == 1 {
                Some(0)
            } else {
                param_opt("hold_at")
            };
            let gen = Gen {
                tag: param("tag"),
                n: param("n"),
                size: param("size") as usize,
                interval: Duration::from_micros(param("interval_us")),
                hold: hold_at.map(|at| (at, state.current())),
                next: 0,
                start: tokio::time::Instant::now(),
            };
            let frames = futures::stream::unfold(gen, |mut g| async move {
                let event = g.next_event().await?;
                Some((Ok::<_, Infallible>(Frame::data(event)), g))
            });
            Response::builder()
                .header(header::CONTENT_TYPE, "text/event-stream")
                .header(header::CACHE_CONTROL, "no-cache")
                .body(StreamBody::new(frames).boxed())
                .unwrap_or_else(|_| text(StatusCode::INTERNAL_SERVER_ERROR, "response"))
        }
        (&Method::POST, "/release") => {
            state.release();
            text(StatusCode::OK, "released")
        }
        (&Method::GET, "/health") => text(StatusCode::OK, "ok"),
        _ => text(StatusCode::NOT_FOUND, "no such path"),
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())).boxed());
    *r.status_mut() = status;
    r
}

/// One stream's event generator.
struct Gen {
    tag: u64,
    n: u64,
    size: usize,
    interval: Duration,
    /// Wait for this release token before sending the event of this index.
    hold: Option<(u64, CancellationToken)>,
    next: u64,
    start: tokio::time::Instant,
}

impl Gen {
    async fn next_event(&mut self) -> Option<Bytes> {
        if self.next >= self.n {
            return None;
        }
        if self.hold.as_ref().is_some_and(|(at, _)| *at == self.next) {
            if let Some((_, token)) = self.hold.take() {
                token.cancelled().await;
            }
            // The pace restarts from the release.
            let now = tokio::time::Instant::now();
            self.start = now
                .checked_sub(self.interval * self.next as u32)
                .unwrap_or(now);
        }
        if !self.interval.is_zero() {
            let due = self.start + self.interval * self.next as u32;
            tokio::time::sleep_until(due).await;
        } else if self.next > 0 {
            // Return Pending once, so hyper flushes this event before the
            // next one exists: one write per event, as a token stream does.
            tokio::task::yield_now().await;
        }
        let event = self.event(self.next, now_us());
        self.next += 1;
        Some(event)
    }

    /// `data: {"s":..,"i":..,"t":..,"p":"xx"}\n\n`, padded to `size` bytes.
    fn event(&self, index: u64, t: u64) -> Bytes {
        let head = format!(
            "data: {{\"s\":{},\"i\":{index},\"t\":{t},\"p\":\"",
            self.tag
        );
        let tail = b"\"}\n\n";
        let pad = self.size.saturating_sub(head.len() + tail.len());
        let mut b = BytesMut::with_capacity(head.len() + pad + tail.len());
        b.put_slice(head.as_bytes());
        b.put_bytes(b'x', pad);
        b.put_slice(tail);
        b.freeze()
    }
}
