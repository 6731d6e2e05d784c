//! The fake "LLM": a real, scriptable HTTP server that sits where the upstream sits in the
//! request's path (client → relay → **upstream**), so integration tests drive the relay's real
//! upstream client over real TCP.
//!
//! Every request is recorded (method, path and query, headers, full body). Replies come first
//! from a FIFO of one-shot replies ([`Upstream::respond_once`], [`Upstream::controlled_stream`]),
//! then from the installed handler ([`Upstream::respond`]), else 404.
//!
//! A [`Reply`] is either a fixed body, a list of raw SSE chunks written one by one, or a
//! *controlled* stream whose chunks the test pushes through a [`StreamControl`]. Controlled
//! streams are how tests synchronise without sleeps: push event k, check the client saw it,
//! hang up, check [`StreamControl::closed`], and so on.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use futures::stream::{self, BoxStream, StreamExt};
use http::header::{HeaderName, HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use http::{HeaderMap, Method, Request, Response, StatusCode, Version};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::{debug, Instrument};

use crate::{with_timeout_of, TIMEOUT};

/// How many pushed chunks a [`StreamControl`] buffers before `send` waits for the relay to
/// read. Small on purpose: a test that pushes far ahead of the reader learns it quickly.
pub const CONTROL_BUFFER: usize = 64;

type ReplyBody = UnsyncBoxBody<Bytes, io::Error>;
type Handler = Arc<dyn Fn(&RecordedRequest) -> Reply + Send + Sync>;

/// One request as the upstream received it, body read to the end.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    pub method: Method,
    /// Path and query exactly as sent (`/v1/chat?x=1`).
    pub path_and_query: String,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl RecordedRequest {
    /// The path without the query.
    pub fn path(&self) -> &str {
        self.path_and_query
            .split_once('?')
            .map_or(self.path_and_query.as_str(), |(path, _)| path)
    }

    /// The query string, if any (without the `?`).
    pub fn query(&self) -> Option<&str> {
        self.path_and_query.split_once('?').map(|(_, query)| query)
    }

    /// The first value of header `name`, if present and valid UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|value| value.to_str().ok())
    }

    /// The body as UTF-8 text (lossy).
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON; panics with the body in the message if it is not JSON.
    pub fn body_json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|err| {
            panic!(
                "upstream: request body is not JSON ({err}): {:?}",
                self.body_text()
            )
        })
    }
}

/// What the upstream answers to one request. Build with the constructors, then add headers
/// with [`Reply::header`].
pub struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Body,
}

enum Body {
    Full(Bytes),
    /// Chunks written one by one, each followed by a flush. Ends cleanly, or with an abort.
    Chunks {
        chunks: Vec<Bytes>,
        interval: Option<Duration>,
        abort: bool,
    },
    Controlled {
        pushes: mpsc::Receiver<Push>,
        served: watch::Sender<Option<RecordedRequest>>,
    },
}

/// One thing a [`StreamControl`] pushes into its response body.
enum Push {
    Chunk(Bytes),
    Abort,
}

impl Reply {
    /// An empty body with this status.
    pub fn status(status: u16) -> Reply {
        Reply::bytes(status, Bytes::new())
    }

    /// `404 Not Found`, what the upstream answers when nothing is installed.
    pub fn not_found() -> Reply {
        Reply::text(404, "no reply installed")
    }

    /// A fixed body with no content type.
    pub fn bytes(status: u16, body: impl Into<Bytes>) -> Reply {
        Reply {
            status: status_code(status),
            headers: HeaderMap::new(),
            body: Body::Full(body.into()),
        }
    }

    /// A fixed `text/plain` body.
    pub fn text(status: u16, body: impl Into<Bytes>) -> Reply {
        Reply::bytes(status, body).header("content-type", "text/plain; charset=utf-8")
    }

    /// A fixed `application/json` body.
    pub fn json(status: u16, body: &serde_json::Value) -> Reply {
        Reply::bytes(status, body.to_string()).header("content-type", "application/json")
    }

    /// `200 text/event-stream` whose body is `chunks`, each written and flushed separately
    /// (so a chunk can split a line, a CRLF or a UTF-8 sequence anywhere). The reader's socket
    /// may still merge adjacent chunks; use [`Reply::sse_paced`] to make that unlikely.
    pub fn sse<I, B>(chunks: I) -> Reply
    where
        I: IntoIterator<Item = B>,
        B: Into<Bytes>,
    {
        Reply::sse_body(Body::Chunks {
            chunks: chunks.into_iter().map(Into::into).collect(),
            interval: None,
            abort: false,
        })
    }

    /// Like [`Reply::sse`], waiting `interval` between chunks.
    pub fn sse_paced<I, B>(chunks: I, interval: Duration) -> Reply
    where
        I: IntoIterator<Item = B>,
        B: Into<Bytes>,
    {
        Reply::sse_body(Body::Chunks {
            chunks: chunks.into_iter().map(Into::into).collect(),
            interval: Some(interval),
            abort: false,
        })
    }

    /// `n` events, [`numbered_event`]`(1..=n)`, one every `interval`.
    pub fn paced_events(n: usize, interval: Duration) -> Reply {
        Reply::sse_paced((1..=n).map(numbered_event), interval)
    }

    /// A `200 text/event-stream` reply whose body the test writes through the returned
    /// [`StreamControl`]. Hand the reply to [`Upstream::respond_once`] or return it from a
    /// handler (sending the control to the test over a channel).
    pub fn controlled() -> (Reply, StreamControl) {
        let (push_tx, pushes) = mpsc::channel(CONTROL_BUFFER);
        let (served, served_rx) = watch::channel(None);
        let reply = Reply::sse_body(Body::Controlled { pushes, served });
        let control = StreamControl {
            pushes: push_tx,
            served: served_rx,
        };
        (reply, control)
    }

    fn sse_body(body: Body) -> Reply {
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        Reply {
            status: StatusCode::OK,
            headers,
            body,
        }
    }

    /// Sets (replaces) header `name`. Panics on an invalid name or value: that is a bug in
    /// the test, not something the relay did.
    pub fn header(mut self, name: &str, value: &str) -> Reply {
        let name = HeaderName::from_bytes(name.as_bytes())
            .unwrap_or_else(|err| panic!("Reply::header: bad name {name:?}: {err}"));
        let value = HeaderValue::from_str(value)
            .unwrap_or_else(|err| panic!("Reply::header: bad value {value:?}: {err}"));
        self.headers.insert(name, value);
        self
    }

    /// Removes header `name` (e.g. the default `content-type` of an SSE reply).
    pub fn without_header(mut self, name: &str) -> Reply {
        self.headers.remove(name);
        self
    }

    /// Replaces the status code.
    pub fn with_status(mut self, status: u16) -> Reply {
        self.status = status_code(status);
        self
    }

    /// Ends the body by dropping the connection mid-body (no terminating chunk) after the last
    /// chunk instead of ending it cleanly. The client sees a truncated, failed body. A fixed
    /// body becomes one chunk. Has no effect on a controlled reply (use
    /// [`StreamControl::abort`]).
    pub fn abort_at_end(mut self) -> Reply {
        self.body = match self.body {
            Body::Full(body) => Body::Chunks {
                chunks: vec![body],
                interval: None,
                abort: true,
            },
            Body::Chunks {
                chunks, interval, ..
            } => Body::Chunks {
                chunks,
                interval,
                abort: true,
            },
            controlled @ Body::Controlled { .. } => controlled,
        };
        self
    }

    fn into_response(self, request: &RecordedRequest) -> Response<ReplyBody> {
        let body = match self.body {
            Body::Full(bytes) => full_body(bytes),
            Body::Chunks {
                chunks,
                interval,
                abort,
            } => StreamBody::new(chunk_stream(chunks, interval, abort)).boxed_unsync(),
            Body::Controlled { pushes, served } => {
                served.send_replace(Some(request.clone()));
                StreamBody::new(controlled_stream(pushes)).boxed_unsync()
            }
        };
        let mut response = Response::new(body);
        *response.status_mut() = self.status;
        *response.headers_mut() = self.headers;
        response
    }
}

impl fmt::Debug for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let body = match &self.body {
            Body::Full(bytes) => format!("Full({} bytes)", bytes.len()),
            Body::Chunks { chunks, abort, .. } => {
                format!("Chunks({} chunks, abort: {abort})", chunks.len())
            }
            Body::Controlled { .. } => "Controlled".to_owned(),
        };
        f.debug_struct("Reply")
            .field("status", &self.status)
            .field("headers", &self.headers)
            .field("body", &body)
            .finish()
    }
}

fn full_body(bytes: Bytes) -> ReplyBody {
    Full::new(bytes)
        .map_err(|never| match never {})
        .boxed_unsync()
}

fn empty_body() -> ReplyBody {
    full_body(Bytes::new())
}

fn status_code(status: u16) -> StatusCode {
    StatusCode::from_u16(status).unwrap_or_else(|err| panic!("Reply: bad status {status}: {err}"))
}

/// The wire form of event number `i` in [`Reply::paced_events`]: `data: event-{i}\n\n`.
pub fn numbered_event(i: usize) -> Bytes {
    event(&numbered_event_data(i))
}

/// The `data` a client parses from [`numbered_event`]`(i)`.
pub fn numbered_event_data(i: usize) -> String {
    format!("event-{i}")
}

/// `data` as one SSE event (one `data:` line per line of `data`, then a blank line).
pub fn event(data: &str) -> Bytes {
    let mut out = String::new();
    for line in data.split('\n') {
        out.push_str("data: ");
        out.push_str(line);
        out.push('\n');
    }
    out.push('\n');
    Bytes::from(out)
}

/// The error a body stream yields to make hyper drop the connection mid-body.
fn abort_error() -> io::Error {
    io::Error::other("upstream fixture: stream aborted by the test")
}

fn chunk_stream(
    chunks: Vec<Bytes>,
    interval: Option<Duration>,
    abort: bool,
) -> BoxStream<'static, Result<Frame<Bytes>, io::Error>> {
    let state = (chunks.into_iter(), false, false);
    stream::unfold(state, move |(mut chunks, started, done)| async move {
        if done {
            return None;
        }
        // A pause before every chunk but the first (and before an abort) returns Pending to
        // hyper, which flushes what it has: one chunk per write, and nothing left unflushed
        // when the abort kills the connection.
        if started {
            match interval {
                Some(interval) => tokio::time::sleep(interval).await,
                None => tokio::task::yield_now().await,
            }
        }
        match chunks.next() {
            Some(chunk) => Some((Ok(Frame::data(chunk)), (chunks, true, false))),
            None if abort => {
                tokio::task::yield_now().await;
                Some((Err(abort_error()), (chunks, true, true)))
            }
            None => None,
        }
    })
    .boxed()
}

fn controlled_stream(
    pushes: mpsc::Receiver<Push>,
) -> BoxStream<'static, Result<Frame<Bytes>, io::Error>> {
    stream::unfold(Some(pushes), |pushes| async move {
        let mut pushes = pushes?;
        match pushes.recv().await {
            Some(Push::Chunk(chunk)) => Some((Ok(Frame::data(chunk)), Some(pushes))),
            Some(Push::Abort) => {
                // Let hyper flush the chunks already written before the connection dies.
                tokio::task::yield_now().await;
                Some((Err(abort_error()), None))
            }
            None => None,
        }
    })
    .boxed()
}

/// The test's end of a controlled reply (see [`Reply::controlled`]).
///
/// Dropping it ends the body cleanly, like [`StreamControl::finish`].
pub struct StreamControl {
    /// Feeds the response body; the receiver lives in hyper's connection task and is dropped
    /// when hyper drops the body, which is how [`StreamControl::closed`] notices the peer.
    pushes: mpsc::Sender<Push>,
    /// Set to the request this reply was served to.
    served: watch::Receiver<Option<RecordedRequest>>,
}

/// The peer of a controlled stream went away before the push could be queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamClosed;

impl fmt::Display for StreamClosed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the upstream response was dropped (the relay closed the connection)")
    }
}

impl std::error::Error for StreamClosed {}

impl StreamControl {
    /// Queues `chunk` for the body. Waits (bounded) while [`CONTROL_BUFFER`] chunks are
    /// queued. Returning does not mean the relay has read it. Panics if the peer is gone.
    pub async fn send(&self, chunk: impl Into<Bytes>) {
        if let Err(err) = self.send_or_closed(chunk).await {
            panic!("StreamControl::send: {err}");
        }
    }

    /// Like [`StreamControl::send`], but reports a peer that went away instead of panicking.
    pub async fn send_or_closed(&self, chunk: impl Into<Bytes>) -> Result<(), StreamClosed> {
        let push = self.pushes.send(Push::Chunk(chunk.into()));
        with_timeout_of(TIMEOUT, "StreamControl::send: the relay to read", push)
            .await
            .map_err(|_| StreamClosed)
    }

    /// Queues one SSE event with this data (see [`event`]).
    pub async fn send_event(&self, data: &str) {
        self.send(event(data)).await;
    }

    /// Ends the body cleanly (terminating chunk) once the queued chunks are written.
    pub fn finish(self) {
        drop(self);
    }

    /// Kills the connection once the queued chunks are written, without the terminating
    /// chunk: the relay's upstream read fails with an incomplete body.
    pub async fn abort(self) {
        // A closed peer needs no abort; the error is moot.
        let push = self.pushes.send(Push::Abort);
        let _ = with_timeout_of(TIMEOUT, "StreamControl::abort: the relay to read", push).await;
    }

    /// Resolves once the response body was dropped: the relay closed the upstream connection
    /// (or the body ended). Panics if that does not happen within [`TIMEOUT`].
    pub async fn closed(&self) {
        with_timeout_of(
            TIMEOUT,
            "StreamControl::closed: the relay to close the upstream connection",
            self.pushes.closed(),
        )
        .await;
    }

    /// Whether the response body was already dropped.
    pub fn is_closed(&self) -> bool {
        self.pushes.is_closed()
    }

    /// The request this reply was served to, waiting (bounded) until it is served.
    pub async fn request(&self) -> RecordedRequest {
        let mut served = self.served.clone();
        let wait = async move {
            match served.wait_for(Option::is_some).await {
                Ok(request) => request.clone(),
                Err(_) => None,
            }
        };
        match with_timeout_of(TIMEOUT, "StreamControl::request: a request to serve", wait).await {
            Some(request) => request,
            None => panic!("StreamControl::request: the reply was dropped without being served"),
        }
    }
}

impl fmt::Debug for StreamControl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamControl")
            .field("served", &self.served.borrow().is_some())
            .field("closed", &self.is_closed())
            .finish()
    }
}

/// State shared by the test's [`Upstream`] handle and the server's connection tasks.
#[derive(Default)]
struct Shared {
    requests: Mutex<Vec<RecordedRequest>>,
    /// Number of recorded requests, watched by [`Upstream::wait_for_requests`].
    request_count: watch::Sender<usize>,
    once: Mutex<VecDeque<Reply>>,
    handler: Mutex<Option<Handler>>,
    connections: AtomicUsize,
}

impl Shared {
    fn record(&self, request: RecordedRequest) {
        let count = {
            let mut requests = lock(&self.requests);
            requests.push(request);
            requests.len()
        };
        self.request_count.send_replace(count);
    }

    fn reply_for(&self, request: &RecordedRequest) -> Reply {
        if let Some(reply) = lock(&self.once).pop_front() {
            return reply;
        }
        // Clone the handler out so it runs without the lock held.
        let handler = lock(&self.handler).clone();
        match handler {
            Some(handler) => handler(request),
            None => Reply::not_found(),
        }
    }
}

/// A test panicking while it holds a lock must not hide its own failure behind a poison panic.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A scriptable upstream HTTP server (HTTP/1.1 and h2c) on `127.0.0.1:<free port>`.
/// Dropping it stops the server and drops every open connection.
pub struct Upstream {
    addr: SocketAddr,
    shared: Arc<Shared>,
    /// Cancels the accept loop and every connection task when the handle drops.
    _shutdown: DropGuard,
}

impl Upstream {
    /// Binds a free port on 127.0.0.1 and starts serving.
    pub async fn start() -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("upstream fixture: bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("upstream fixture: local_addr");
        let shared = Arc::new(Shared::default());
        let shutdown = CancellationToken::new();
        tokio::spawn(
            accept_loop(listener, Arc::clone(&shared), shutdown.clone())
                .instrument(tracing::debug_span!("upstream", %addr)),
        );
        Upstream {
            addr,
            shared,
            _shutdown: shutdown.drop_guard(),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`, no trailing slash.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Installs the handler that picks the reply for each request not served by a one-shot
    /// reply. Replaces any previous handler.
    pub fn respond<F>(&self, handler: F)
    where
        F: Fn(&RecordedRequest) -> Reply + Send + Sync + 'static,
    {
        *lock(&self.shared.handler) = Some(Arc::new(handler));
    }

    /// Queues `reply` for the next request that arrives; one-shot replies are served in FIFO
    /// order before the handler is asked.
    pub fn respond_once(&self, reply: Reply) {
        lock(&self.shared.once).push_back(reply);
    }

    /// Queues a one-shot controlled SSE reply and returns its control.
    pub fn controlled_stream(&self) -> StreamControl {
        let (reply, control) = Reply::controlled();
        self.respond_once(reply);
        control
    }

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.shared.requests).clone()
    }

    pub fn request_count(&self) -> usize {
        lock(&self.shared.requests).len()
    }

    /// Waits (bounded by [`TIMEOUT`]) until at least `n` requests arrived; returns them all.
    pub async fn wait_for_requests(&self, n: usize) -> Vec<RecordedRequest> {
        let mut count = self.shared.request_count.subscribe();
        let what = format!("the upstream to receive {n} request(s)");
        // The sender lives in `self.shared`, so `wait_for` cannot fail while `self` is borrowed.
        let _ = with_timeout_of(TIMEOUT, what, count.wait_for(|count| *count >= n)).await;
        self.requests()
    }

    /// The `n`-th request (1-based), waiting for it like [`Upstream::wait_for_requests`].
    pub async fn nth_request(&self, n: usize) -> RecordedRequest {
        assert!(n >= 1, "nth_request is 1-based");
        self.wait_for_requests(n).await.swap_remove(n - 1)
    }

    /// TCP connections accepted so far (to check connection reuse).
    pub fn connection_count(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }
}

impl fmt::Debug for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upstream")
            .field("addr", &self.addr)
            .field("requests", &self.request_count())
            .finish()
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, shutdown: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((io, peer)) => {
                shared.connections.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(
                    serve_connection(io, Arc::clone(&shared), shutdown.child_token())
                        .instrument(tracing::debug_span!("conn", client.addr = %peer)),
                );
            }
            // Transient (e.g. the peer reset before accept); keep serving.
            Err(err) => debug!(cause = %err, "accept failed"),
        }
    }
}

async fn serve_connection(io: TcpStream, shared: Arc<Shared>, shutdown: CancellationToken) {
    let service = service_fn(move |request| handle(Arc::clone(&shared), request));
    // No hyper timer: under `tokio::time::pause()` a header-read timeout would fire at once.
    let builder = auto::Builder::new(TokioExecutor::new());
    let connection = builder.serve_connection(TokioIo::new(io), service);
    // On shutdown the connection is dropped, not drained: a controlled stream may never end.
    tokio::select! {
        () = shutdown.cancelled() => debug!("upstream stopped; dropping connection"),
        result = connection => match result {
            Ok(()) => debug!("connection closed"),
            // Aborts and peers hanging up land here; both are expected in tests.
            Err(err) => debug!(cause = %err, "connection ended with an error"),
        },
    }
}

async fn handle(
    shared: Arc<Shared>,
    request: Request<Incoming>,
) -> Result<Response<ReplyBody>, Infallible> {
    let (parts, body) = request.into_parts();
    let body = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(err) => {
            debug!(cause = %err, "request body failed; not recorded");
            let mut response = Response::new(empty_body());
            *response.status_mut() = StatusCode::BAD_REQUEST;
            return Ok(response);
        }
    };
    let request = RecordedRequest {
        method: parts.method,
        path_and_query: parts
            .uri
            .path_and_query()
            .map_or_else(|| parts.uri.path().to_owned(), ToString::to_string),
        version: parts.version,
        headers: parts.headers,
        body,
    };
    debug!(method = %request.method, path = %request.path_and_query, "request");
    let reply = shared.reply_for(&request);
    let response = reply.into_response(&request);
    shared.record(request);
    Ok(response)
}
