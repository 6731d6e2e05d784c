//! The server, at the top of a request's path: builds the [`Relay`] state,
//! accepts connections (public and admin listeners, TLS), hands each
//! request to [`dispatch`](crate::dispatch), and runs the shutdown
//! sequence. `run` is what the binary calls and what tests call in-process.
//!
//! Shutdown: the `shutdown` token given to `run` is phase 1 of
//! [`Shutdown`](crate::shutdown::Shutdown) (stop accepting); the server then
//! closes its connections gracefully while `Shutdown::drain` runs the other
//! phases (grace, interrupt, flush, stop), each bounded.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::{Config, LoadedTls};
use crate::dispatch;
use crate::error::RelayError;
use crate::metrics::GaugeGuard;
use crate::shutdown::DrainBounds;
use crate::state::{open_store, Relay, StartError};

/// How long a client may take to complete the TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long writers get to flush after producers stopped, at shutdown.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);
/// How long connections get to close after the stop.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a serving thread's runtime waits for its blocking tasks once
/// the drain is over.
const SIBLING_STOP_TIMEOUT: Duration = Duration::from_secs(1);
/// The sockets the relay serves.
pub struct Listeners {
    /// Streams, resumes and cancels; also the operational endpoints
    /// (metrics, healthz, readyz) unless `admin` is set.
    pub public: TcpListener,
    /// `admin_listen`: when set, the operational endpoints are served here
    /// only (plain HTTP) and answered `404` on `public`.
    pub admin: Option<TcpListener>,
    /// More listeners on `public`'s address (bound with `SO_REUSEPORT`, so
    /// that the kernel spreads connections over them), each served by a
    /// single-threaded runtime on a thread of its own: a connection, its
    /// upstream connection, its producer and its writer then stay on one
    /// thread. `public` is served on the caller's runtime.
    pub siblings: Vec<std::net::TcpListener>,
}

impl From<TcpListener> for Listeners {
    fn from(public: TcpListener) -> Self {
        Listeners {
            public,
            admin: None,
            siblings: Vec::new(),
        }
    }
}

/// Runs the relay on `listener` until `shutdown` fires, then shuts down as
/// described in the module docs. With `admin_listen` set, binds it too.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), StartError> {
    let loaded = config.validate()?;
    run_with(config, &loaded, listener, shutdown, || {}).await
}

/// [`run`] for a config the caller validated (`loaded` is what
/// [`Config::validate`] returned), calling `on_ready` once the store
/// answered for the first time (the binary's `READY=1`). The relay serves
/// from the start: while Redis is unreachable, streams are proxied and
/// recorded in memory, `/readyz` answers 503, and the store is retried in
/// the background.
pub async fn run_with(
    config: Config,
    loaded: &LoadedTls,
    listener: TcpListener,
    shutdown: CancellationToken,
    on_ready: impl FnOnce() + Send + 'static,
) -> Result<(), StartError> {
    run_listeners(config, loaded, listener.into(), shutdown, on_ready).await
}

/// [`run_with`] on explicit [`Listeners`] (`config` validated by the
/// caller, `loaded` what its validation returned). Without
/// `listeners.admin`, a configured `admin_listen` is bound here.
pub async fn run_listeners(
    config: Config,
    loaded: &LoadedTls,
    mut listeners: Listeners,
    shutdown: CancellationToken,
    on_ready: impl FnOnce() + Send + 'static,
) -> Result<(), StartError> {
    if let (None, Some(addr)) = (&listeners.admin, config.admin_listen) {
        let admin = TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::AdminListen { addr, source })?;
        listeners.admin = Some(admin);
    }
    let store = open_store(&config, loaded).await?;
    let relay = Relay::with_loaded(config, loaded, store, shutdown)?;
    // One probe per relay keeps the store's health (see `health`); it
    // calls `on_ready` the first time the store answers.
    crate::health::spawn_probe(
        relay.store.clone(),
        relay.store_health.clone(),
        relay.shutdown.tasks(),
        relay.shutdown.stop().clone(),
        on_ready,
    );
    serve_listeners(relay, listeners).await;
    Ok(())
}

/// The accept loop and shutdown sequence for an already built [`Relay`].
pub async fn serve(relay: Arc<Relay>, listener: TcpListener) {
    serve_listeners(relay, listener.into()).await
}

/// [`serve`] on explicit [`Listeners`].
pub async fn serve_listeners(relay: Arc<Relay>, listeners: Listeners) {
    let Listeners {
        public: listener,
        admin,
        siblings,
    } = listeners;
    if let Some(admin) = admin {
        relay.admin_listener.store(true, Ordering::SeqCst);
        let r = relay.clone();
        relay
            .shutdown
            .tasks()
            .spawn(crate::admin::serve_listener(r, admin).instrument(tracing::info_span!("admin")));
    }
    let builder = connection_builder(&relay);
    if let Ok(addr) = listener.local_addr() {
        let scheme = if relay.tls.is_some() { "https" } else { "http" };
        let threads = 1 + siblings.len();
        tracing::info!(%addr, scheme, threads, store = relay.store.kind(), routes = relay.config.routes.len(), "listening");
    }
    // Fired once the drain is over: the sibling threads then end.
    let finished = CancellationToken::new();
    let mut siblings_closed = Vec::new();
    let mut threads = Vec::new();
    if !siblings.is_empty() {
        crate::upstream::use_thread_pools();
    }
    for (i, sibling) in siblings.into_iter().enumerate() {
        let (closed, closed_rx) = tokio::sync::oneshot::channel();
        let (relay, builder, finished) = (relay.clone(), builder.clone(), finished.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("reprise-{}", i + 1))
            .spawn(move || serve_sibling(relay, sibling, builder, closed, finished));
        match spawned {
            Ok(t) => {
                threads.push(t);
                siblings_closed.push(closed_rx);
            }
            // Its listener is closed with the closure: the kernel sends its
            // connections to the other listeners.
            Err(e) => tracing::error!(cause = %e, "cannot start a serving thread"),
        }
    }
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    accept_loop(&relay, listener, &builder, &graceful).await;
    shut_down(relay, graceful, siblings_closed).await;
    finished.cancel();
    for t in threads {
        // The siblings' runtimes drop what is left of their tasks; bounded
        // by the drain's close bound, which has passed.
        let _ = tokio::task::spawn_blocking(move || t.join()).await;
    }
}

/// A sibling listener's thread: its own single-threaded runtime accepts and
/// serves its connections until phase 1, closes them gracefully (then
/// tells `closed`), and keeps running their tasks until `finished`.
fn serve_sibling(
    relay: Arc<Relay>,
    listener: std::net::TcpListener,
    builder: auto::Builder<TokioExecutor>,
    closed: tokio::sync::oneshot::Sender<()>,
    finished: CancellationToken,
) {
    crate::upstream::use_thread_pools();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(cause = %e, "cannot start a serving thread's runtime");
            return;
        }
    };
    let drain_over = finished.clone();
    runtime.block_on(async move {
        let listener = match listener
            .set_nonblocking(true)
            .and_then(|()| TcpListener::from_std(listener))
        {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(cause = %e, "cannot serve a sibling listener");
                return;
            }
        };
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        accept_loop(&relay, listener, &builder, &graceful).await;
        // Connections that outlive the drain's bound do not hold the thread.
        let close = async move {
            graceful.shutdown().await;
            let _ = closed.send(());
            finished.cancelled().await;
        };
        tokio::select! {
            () = close => {}
            () = drain_over.cancelled() => {}
        }
    });
    // Tasks still running are dropped; a blocking task (a DNS lookup) is
    // not waited for long.
    runtime.shutdown_timeout(SIBLING_STOP_TIMEOUT);
}

/// The HTTP/1 and HTTP/2 settings of client connections.
fn connection_builder(relay: &Relay) -> auto::Builder<TokioExecutor> {
    let limits = &relay.config.limits;
    // Request heads over `limits.max_request_headers` (bytes) or
    // `max_request_header_count` (fields, HTTP/1 only) are answered 431 by
    // hyper (HTTP/1) and h2 (HTTP/2) before they reach a handler. The byte
    // bound is hyper's HTTP/1 buffer size, which also caps its read and
    // write buffers (64 KiB by default, plenty for SSE frames).
    let head_bytes = limits.max_request_headers.as_u64();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30))
        .max_buf_size(usize::try_from(head_bytes).unwrap_or(usize::MAX))
        .max_headers(limits.max_request_header_count);
    builder
        .http2()
        .max_header_list_size(u32::try_from(head_bytes).unwrap_or(u32::MAX));
    builder
}

/// Accepts and serves connections on `listener` (on the current runtime)
/// until phase 1 of the shutdown.
async fn accept_loop(
    relay: &Arc<Relay>,
    listener: TcpListener,
    builder: &auto::Builder<TokioExecutor>,
    graceful: &hyper_util::server::graceful::GracefulShutdown,
) {
    let tls = relay.tls.clone();
    loop {
        let (io, addr) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    tracing::warn!(cause = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = relay.shutdown.stop_accepting().cancelled() => break,
        };
        let _ = io.set_nodelay(true);
        let svc_relay = relay.clone();
        // Over the connection limit: answer every request 503 and close.
        let over_limit =
            relay.metrics.connections_open.get() as usize >= relay.config.limits.max_connections;
        if over_limit {
            tracing::warn!(
                limit = relay.config.limits.max_connections,
                "connection limit reached; refusing"
            );
        }
        let svc = service_fn(move |req| {
            let relay = svc_relay.clone();
            async move {
                if over_limit {
                    let mut resp = RelayError::TooManyConnections.into_response();
                    resp.headers_mut().insert(
                        http::header::CONNECTION,
                        http::HeaderValue::from_static("close"),
                    );
                    return Ok::<_, Infallible>(resp);
                }
                // Boxed: hyper keeps the service future's memory for the
                // connection's life; the handler's (large) state is freed
                // once the response starts.
                Ok::<_, Infallible>(Box::pin(dispatch::handle(relay, req, addr)).await)
            }
        });
        let span = tracing::debug_span!("conn", client.addr = %addr);
        let open = GaugeGuard::new(&relay.metrics.connections_open);
        let (builder, watcher) = (builder.clone(), graceful.watcher());
        let (tls, stop) = (tls.clone(), relay.shutdown.stop_accepting().clone());
        // A client whose socket accepts nothing for `client_write` (a reader
        // that stopped reading) is closed: it holds no queue, but it would
        // hold its connection and task forever. It can resume.
        let mut io = tokio_io_timeout::TimeoutStream::new(io);
        io.set_write_timeout(Some(relay.config.timeouts.client_write));
        let io = Box::pin(io);
        relay.shutdown.tasks().spawn(
            async move {
                let _open = open;
                let result = match tls {
                    None => {
                        let conn = builder.serve_connection(TokioIo::new(io), svc);
                        watcher.watch(conn.into_owned()).await
                    }
                    // Boxed: its state (rustls) is larger than a plain
                    // connection's, and would otherwise size every task.
                    Some(acceptor) => {
                        Box::pin(async move {
                            // In the connection's task, so that a slow handshake
                            // never holds up the accept loop.
                            let handshake =
                                tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(io));
                            let stream = tokio::select! {
                                r = handshake => match r {
                                    Ok(Ok(stream)) => stream,
                                    Ok(Err(e)) => {
                                        tracing::debug!(cause = %e, "TLS handshake failed");
                                        return Ok(());
                                    }
                                    Err(_) => {
                                        tracing::debug!("TLS handshake timed out");
                                        return Ok(());
                                    }
                                },
                                _ = stop.cancelled() => return Ok(()),
                            };
                            let conn = builder.serve_connection(TokioIo::new(stream), svc);
                            watcher.watch(conn.into_owned()).await
                        })
                        .await
                    }
                };
                if let Err(e) = result {
                    // A client hanging up is routine, not an error.
                    tracing::debug!(cause = %e, "connection ended with an error");
                }
            }
            .instrument(span),
        );
    }
}

/// Phases 2 to 4 of the shutdown, once the accept loops ended; `siblings`
/// tell when the sibling threads' connections closed.
async fn shut_down(
    relay: Arc<Relay>,
    graceful: hyper_util::server::graceful::GracefulShutdown,
    siblings: Vec<tokio::sync::oneshot::Receiver<()>>,
) {
    let in_flight = relay.hub.len();
    tracing::info!(in_flight, grace = ?relay.config.timeouts.shutdown_grace, "shutting down");
    // Connections stop taking new requests; responses in progress continue.
    let connections = tokio::spawn(graceful.shutdown());
    let bounds = DrainBounds {
        grace: relay.config.timeouts.shutdown_grace,
        flush: FLUSH_TIMEOUT,
        close: CLOSE_TIMEOUT,
    };
    relay
        .shutdown
        .drain(bounds, async {
            let _ = connections.await;
            for closed in siblings {
                let _ = closed.await;
            }
        })
        .await;
    tracing::info!("stopped");
}
