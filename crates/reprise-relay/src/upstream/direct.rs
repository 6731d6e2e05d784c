//! HTTP/1 connections to plain-HTTP upstreams, driven by the task that reads
//! the response instead of a task of their own.
//!
//! Through hyper's pooled client every upstream connection has a task that
//! reads the socket and hands each chunk over a channel to whoever reads the
//! body: one more task woken per event. Here the connection future travels
//! with the response body ([`UpstreamBody`]), and polling the body polls the
//! connection first, so the producer (or, unrecorded, the client's
//! connection) reads the upstream socket itself.
//!
//! Connections are still reused. Once a response has been read to its end,
//! the connection goes to a keeper task that drives it while idle (noticing
//! a close by the upstream) and hands it back to the next request for the
//! same upstream on this thread. Idle connections live [`IDLE_TIMEOUT`],
//! as in the pooled client. HTTPS upstreams (TLS, HTTP/2 by ALPN) keep the
//! pooled client ([`crate::upstream::HttpClient`]).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body::Frame;
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, Connection, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use crate::body::{Body, Coalesce};

/// How long an unused connection is kept (as the pooled client's
/// `pool_idle_timeout`).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Idle connections kept per upstream and thread; more are closed.
const MAX_IDLE: usize = 512;

type Conn = Connection<TokioIo<TcpStream>, Body>;

/// An upstream's `host:port`, the key of its idle connections.
type Target = Arc<str>;

/// A connection and its request handle.
struct Parts {
    sender: SendRequest<Body>,
    conn: Conn,
    target: Target,
}

/// An idle connection, held by its keeper task: sending it a reply channel
/// gets the connection back.
struct Idle {
    reclaim: oneshot::Sender<oneshot::Sender<Parts>>,
}

/// Idle connections, by upstream.
#[derive(Default)]
struct Pool(Mutex<HashMap<Target, Vec<Idle>>>);

impl Pool {
    fn lock(&self) -> MutexGuard<'_, HashMap<Target, Vec<Idle>>> {
        // A panic while holding it leaves a map that is still whole.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

thread_local! {
    /// This thread's idle connections. Per thread because each serving
    /// thread runs its own runtime (see `upstream::use_thread_pools`); the
    /// lock is only ever taken by that thread there. A keeper registers in
    /// the pool of the thread that gave the connection back, wherever the
    /// keeper itself runs (a multi-threaded runtime, in tests).
    static IDLE: Arc<Pool> = Arc::new(Pool::default());
}

/// Why a request could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum DirectError {
    #[error("connecting to {target}: {source}")]
    Connect {
        target: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Http(#[from] hyper::Error),
    #[error("request target: {0}")]
    Target(#[from] http::uri::InvalidUriParts),
}

/// Sends `req` (an absolute `http://` URI) on an idle connection to its
/// upstream, or on a new one, and returns the response whose body drives
/// the connection.
pub async fn send(
    mut req: Request<Body>,
    connect_timeout: Duration,
) -> Result<Response<UpstreamBody>, DirectError> {
    let target = target_of(req.uri());
    // HTTP/1 wants the origin form; `Host` is already set.
    let mut origin = http::uri::Parts::default();
    origin.path_and_query = Some(
        req.uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
    );
    *req.uri_mut() = Uri::from_parts(origin)?;
    loop {
        let (mut parts, reused) = match take_idle(&target).await {
            Some(parts) => (parts, true),
            None => (connect(target.clone(), connect_timeout).await?, false),
        };
        let mut sending = std::pin::pin!(parts.sender.try_send_request(req));
        let mut ended = false;
        let sent = std::future::poll_fn(|cx| {
            if !ended && Pin::new(&mut parts.conn).poll(cx).is_ready() {
                // Closed (or failed): the request's future says how.
                ended = true;
            }
            sending.as_mut().poll(cx)
        })
        .await;
        match sent {
            Ok(resp) => {
                let held = (!ended).then_some(parts);
                return Ok(resp.map(|body| UpstreamBody { body, held }));
            }
            Err(mut e) => match e.take_message() {
                // A reused connection the upstream closed before the request
                // went out: send it again on another.
                Some(unsent) if reused => req = unsent,
                _ => return Err(DirectError::Http(e.into_error())),
            },
        }
    }
}

/// `host:port` of an `http://` URI (port 80 if none).
fn target_of(uri: &Uri) -> Target {
    let host = uri.host().unwrap_or("localhost");
    let port = uri.port_u16().unwrap_or(80);
    Arc::from(format!("{host}:{port}"))
}

async fn connect(target: Target, timeout: Duration) -> Result<Parts, DirectError> {
    let connect_error = |source| DirectError::Connect {
        target: target.to_string(),
        source,
    };
    // `[::1]:80` (what `host()` gives for an IPv6 literal) parses as a
    // socket address as it is.
    let tcp = match tokio::time::timeout(timeout, TcpStream::connect(&*target)).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => return Err(connect_error(e)),
        Err(_) => {
            return Err(connect_error(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "no connection within {}",
                    humantime::format_duration(timeout)
                ),
            )))
        }
    };
    tcp.set_nodelay(true).map_err(connect_error)?;
    let (sender, conn) = http1::handshake(TokioIo::new(tcp)).await?;
    Ok(Parts {
        sender,
        conn,
        target,
    })
}

/// The most recently used idle connection to `target` on this thread.
async fn take_idle(target: &Target) -> Option<Parts> {
    loop {
        let idle = IDLE.with(|pool| pool.lock().get_mut(target)?.pop())?;
        let (reply, parts) = oneshot::channel();
        if idle.reclaim.send(reply).is_err() {
            continue; // its keeper saw it close
        }
        match parts.await {
            Ok(parts) if !parts.sender.is_closed() => return Some(parts),
            _ => continue,
        }
    }
}

/// Keeps a connection whose response was read to its end for the next
/// request, if it can take one.
fn give_back(parts: Parts) {
    if parts.sender.is_closed() {
        return;
    }
    tokio::spawn(keep(parts, IDLE.with(Arc::clone)));
}

/// Drives an idle connection until a request takes it back, the upstream
/// closes it, or it has been idle for [`IDLE_TIMEOUT`].
async fn keep(mut parts: Parts, pool: Arc<Pool>) {
    let mut expiry = std::pin::pin!(tokio::time::sleep(IDLE_TIMEOUT));
    // Ready for another request once hyper has seen the last response out
    // (a connection that never gets there is closed at the expiry too).
    let ready = std::future::poll_fn(|cx| {
        if Pin::new(&mut parts.conn).poll(cx).is_ready() || expiry.as_mut().poll(cx).is_ready() {
            return Poll::Ready(false);
        }
        parts.sender.poll_ready(cx).map(|r| r.is_ok())
    })
    .await;
    if !ready {
        return;
    }
    let (reclaim, mut wanted) = oneshot::channel();
    {
        let mut idle = pool.lock();
        let list = idle.entry(parts.target.clone()).or_default();
        list.retain(|i| !i.reclaim.is_closed());
        if list.len() >= MAX_IDLE {
            return;
        }
        list.push(Idle { reclaim });
    }
    let reply = std::future::poll_fn(|cx| {
        if Pin::new(&mut parts.conn).poll(cx).is_ready() || expiry.as_mut().poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        Pin::new(&mut wanted).poll(cx).map(|r| r.ok())
    })
    .await;
    if let Some(reply) = reply {
        let _ = reply.send(parts);
    }
}

/// An upstream response body. Through the pooled client (HTTPS) it is
/// hyper's body; through [`send`] it also holds the connection, polled
/// before the body each time the body is.
pub struct UpstreamBody {
    body: Incoming,
    held: Option<Parts>,
}

impl UpstreamBody {
    /// A body whose connection a task of hyper's pooled client drives.
    pub fn pooled(body: Incoming) -> UpstreamBody {
        UpstreamBody { body, held: None }
    }

    /// This body with the bursts it delivers joined into single frames
    /// ([`Coalesce`]); inline when polling it reads its connection (no
    /// task of its own to yield to).
    pub fn coalesced(self) -> Coalesce<UpstreamBody> {
        if self.held.is_some() {
            Coalesce::inline(self)
        } else {
            Coalesce::new(self)
        }
    }

    /// Returns `frame`; at the end of the body (which readers that stop at
    /// `is_end_stream` never poll for), the connection goes to the pool.
    fn finish(
        &mut self,
        frame: Option<Result<Frame<Bytes>, hyper::Error>>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let ended = match &frame {
            None => true,
            Some(Ok(_)) => http_body::Body::is_end_stream(&self.body),
            Some(Err(_)) => false,
        };
        if ended {
            if let Some(parts) = self.held.take() {
                give_back(parts);
            }
        }
        Poll::Ready(frame)
    }
}

impl http_body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        if let Poll::Ready(frame) = Pin::new(&mut this.body).poll_frame(cx) {
            return this.finish(frame);
        }
        let Some(parts) = &mut this.held else {
            return Poll::Pending;
        };
        // Reads the socket and hands what it decoded to the body (waking
        // this very task, which is cheap: it is running).
        if Pin::new(&mut parts.conn).poll(cx).is_ready() {
            // Closed or failed; hyper ends the body with an error if the
            // response was not complete.
            this.held = None;
        }
        match Pin::new(&mut this.body).poll_frame(cx) {
            Poll::Ready(frame) => this.finish(frame),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}
