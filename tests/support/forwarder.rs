//! A loopback TCP forwarder between a client and Reprise (client → **forwarder** → relay →
//! upstream) that the test controls: it cuts every open connection, as a network change
//! does, holds new ones until released, or drops each new one at once, as an unreachable
//! Reprise looks to a client.
//!
//! Tests drive real client programs through it (`tests/docs.rs`, `tests/browser.rs`), so
//! the client's own reconnect code is what meets the cut.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::{debug, Instrument};

use crate::{with_timeout, with_timeout_of};

/// What the forwarder does with a connection it accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Forward,
    /// Close it at once, before any byte: the client's request fails as if Reprise were gone.
    Drop,
}

struct Shared {
    mode: Mutex<Mode>,
    /// Cancelled by [`Forwarder::cut`]; the connections forwarded before it close.
    generation: Mutex<CancellationToken>,
    /// `false` while held: accepted connections wait before reaching the target.
    open: watch::Sender<bool>,
    /// Connections accepted so far (forwarded or dropped).
    accepted: watch::Sender<usize>,
}

/// A loopback TCP forwarder to `target`. Dropping it stops it and closes every connection.
pub struct Forwarder {
    addr: SocketAddr,
    shared: Arc<Shared>,
    /// Stops the accept loop and every forwarded connection.
    _stop: DropGuard,
}

impl Forwarder {
    /// Binds 127.0.0.1:0 and forwards every connection to `target`.
    pub async fn start(target: SocketAddr) -> Forwarder {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("forwarder: bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("forwarder: local_addr");
        let shared = Arc::new(Shared {
            mode: Mutex::new(Mode::Forward),
            generation: Mutex::new(CancellationToken::new()),
            open: watch::Sender::new(true),
            accepted: watch::Sender::new(0),
        });
        let stop = CancellationToken::new();
        tokio::spawn(
            accept_loop(listener, target, Arc::clone(&shared), stop.clone())
                .instrument(tracing::debug_span!("forwarder", %addr, %target)),
        );
        Forwarder {
            addr,
            shared,
            _stop: stop.drop_guard(),
        }
    }

    /// `http://127.0.0.1:PORT`, no trailing slash.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Closes every connection forwarded so far; later ones are forwarded as usual.
    pub fn cut(&self) {
        let old = std::mem::take(&mut *lock(&self.shared.generation));
        old.cancel();
    }

    /// [`Forwarder::cut`], and holds new connections (accepted by the kernel, not yet
    /// forwarded) until [`Forwarder::release`].
    pub fn cut_and_hold(&self) {
        self.shared.open.send_replace(false);
        self.cut();
    }

    /// Forwards the held connections, and new ones again.
    pub fn release(&self) {
        self.shared.open.send_replace(true);
    }

    /// From now on, closes each new connection at once (and [`Forwarder::cut`]s the open
    /// ones): to the client, Reprise is unreachable.
    pub fn drop_all(&self) {
        *lock(&self.shared.mode) = Mode::Drop;
        self.cut();
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        *self.shared.accepted.borrow()
    }

    /// Waits (bounded by [`crate::TIMEOUT`]) until at least `n` connections were accepted.
    pub async fn wait_for_accepted(&self, n: usize) {
        let mut accepted = self.shared.accepted.subscribe();
        let what = format!("the forwarder to accept {n} connection(s)");
        // The sender lives in `self.shared`, so `wait_for` cannot fail while `self` is borrowed.
        let _ = with_timeout(what, accepted.wait_for(|count| *count >= n)).await;
    }

    /// Like [`Forwarder::wait_for_accepted`], bounded by `bound` instead of [`crate::TIMEOUT`].
    pub async fn wait_for_accepted_within(&self, n: usize, bound: std::time::Duration) {
        let mut accepted = self.shared.accepted.subscribe();
        let what = format!("the forwarder to accept {n} connection(s)");
        let _ = with_timeout_of(bound, what, accepted.wait_for(|count| *count >= n)).await;
    }
}

impl std::fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarder")
            .field("addr", &self.addr)
            .field("accepted", &self.accepted())
            .finish()
    }
}

/// A test panicking while it holds a lock must not hide its own failure behind a poison panic.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

async fn accept_loop(
    listener: TcpListener,
    target: SocketAddr,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    loop {
        let inbound = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((inbound, _)) => inbound,
                // Transient (e.g. the peer reset before accept); keep serving.
                Err(err) => {
                    debug!(cause = %err, "accept failed");
                    continue;
                }
            },
        };
        let mode = *lock(&shared.mode);
        // Taken at accept: a cut ends only the connections made before it.
        let generation = lock(&shared.generation).clone();
        shared.accepted.send_modify(|count| *count += 1);
        if mode == Mode::Drop {
            debug!("dropping a new connection");
            drop(inbound);
            continue;
        }
        tokio::spawn(
            forward(
                inbound,
                target,
                generation,
                Arc::clone(&shared),
                stop.child_token(),
            )
            .in_current_span(),
        );
    }
}

async fn forward(
    mut inbound: TcpStream,
    target: SocketAddr,
    mut generation: CancellationToken,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    let mut open = shared.open.subscribe();
    if !*open.borrow_and_update() {
        tokio::select! {
            () = stop.cancelled() => return,
            held = open.wait_for(|open| *open) => if held.is_err() { return },
        }
        // A held connection belongs to the generation after the cut.
        generation = lock(&shared.generation).clone();
    }
    let mut outbound = match TcpStream::connect(target).await {
        Ok(outbound) => outbound,
        Err(err) => {
            debug!(cause = %err, "connecting to the target failed");
            return;
        }
    };
    // Dropping both streams on a cut closes the client's connection mid-answer.
    tokio::select! {
        () = stop.cancelled() => {}
        () = generation.cancelled() => debug!("connection cut"),
        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
    }
}
