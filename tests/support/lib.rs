//! Test support for Reprise's integration tests: the real servers and clients that surround
//! the relay in a request's path (client → relay → upstream, with Redis behind the relay).
//!
//! - [`upstream`]: a scriptable upstream HTTP server (the fake LLM), recording every request.
//! - [`forwarder`]: a loopback TCP forwarder in front of the relay that cuts client connections.
//! - [`client`]: SSE and raw HTTP clients built on reqwest and `eventsource-stream`, an SSE
//!   parser independent of Reprise's own.
//!
//! Every wait is bounded ([`TIMEOUT`]): a broken relay fails a test, it never hangs it. The
//! bounds are generous because the machine is shared; tests never assert on timing.
#![forbid(unsafe_code)]

pub mod client;
pub mod forwarder;
pub mod redis;
pub mod relay;
pub mod script;
pub mod upstream;

use std::fmt;
use std::future::Future;
use std::sync::mpsc::RecvTimeoutError;
use std::time::Duration;

pub use client::{
    open_sse, read_raw, BodyError, Collected, RawBody, RawResponse, SseClient, SseEvent,
    SseResponse,
};
pub use upstream::{RecordedRequest, Reply, StreamControl, Upstream};

/// The `data` of each event, in order.
pub fn data(events: &[SseEvent]) -> Vec<String> {
    events.iter().map(|e| e.data.clone()).collect()
}

/// The data of [`upstream::numbered_event`]s `range`, as a client sees them.
pub fn numbered(range: std::ops::RangeInclusive<usize>) -> Vec<String> {
    range.map(upstream::numbered_event_data).collect()
}

/// The default bound on any single wait in a test.
pub const TIMEOUT: Duration = Duration::from_secs(20);

/// Installs a tracing subscriber writing through the test harness (shown for failing tests),
/// filtered by `RUST_LOG` (default `warn`). Safe to call from every test.
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    // Err means another test already installed it, which is fine.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// Awaits `fut`, panicking with "timed out after …s waiting for {what}" past [`TIMEOUT`].
pub async fn with_timeout<F: Future>(what: impl fmt::Display, fut: F) -> F::Output {
    with_timeout_of(TIMEOUT, what, fut).await
}

/// Awaits `fut`, panicking with "timed out after …s waiting for {what}" past `bound`.
///
/// The bound is measured on the wall clock by a helper thread, not with `tokio::time`: under
/// `tokio::time::pause()` the runtime jumps its clock forward whenever no I/O is ready, so a
/// tokio timeout can fire while a real peer (a redis-server, say) is still answering.
pub async fn with_timeout_of<F: Future>(
    bound: Duration,
    what: impl fmt::Display,
    fut: F,
) -> F::Output {
    let (expired_tx, mut expired) = tokio::sync::oneshot::channel::<()>();
    // Dropping `done` (when this function returns or is cancelled) wakes the thread at once.
    let (done, done_rx) = std::sync::mpsc::channel::<()>();
    std::thread::Builder::new()
        .name("test-timeout".to_owned())
        .spawn(move || {
            if let Err(RecvTimeoutError::Timeout) = done_rx.recv_timeout(bound) {
                let _ = expired_tx.send(());
            }
        })
        .expect("with_timeout: spawn watchdog thread");
    let out = tokio::select! {
        biased;
        out = fut => out,
        Ok(()) = &mut expired => panic!("timed out after {}s waiting for {what}", bound.as_secs_f64()),
    };
    drop(done);
    out
}

/// Runs each named scenario of the calling test file, an
/// `async fn name(backend: Backend)`, once with the embedded store and once
/// with a fresh redis-server of its own (tests `memory::name`, `redis::name`).
#[macro_export]
macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
               async fn $name() { super::$name($crate::relay::Backend::Memory).await } )*
        }
        mod redis {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
               async fn $name() {
                   let server = $crate::redis::RedisServer::start().await.expect("start redis-server");
                   super::$name($crate::relay::Backend::Redis(server.url())).await;
                   drop(server);
               } )*
        }
    };
}
