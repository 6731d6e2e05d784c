//! Shutdown, in phases: the one type every task of the relay waits on. A
//! leaf: the server drives it, everything else only listens.
//!
//! 1. **Stop accepting** ([`Shutdown::stop_accepting`], fired by whoever
//!    called `run`: SIGTERM in the binary): listeners close, connections
//!    finish their current response, `/readyz` answers `503`.
//! 2. **Grace**: in-flight recordings go on until they end or
//!    `timeouts.shutdown_grace` passes.
//! 3. **Interrupt** ([`Shutdown::interrupt`]): the recordings still running
//!    end as `interrupted`.
//! 4. **Flush**: writers store what is left, bounded; then **stop**
//!    ([`Shutdown::stop`]): readers close (clients resume elsewhere),
//!    writers, loaders and background tasks end.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The phases, and the tasks each phase waits for.
pub struct Shutdown {
    /// Phase 1 (given by the caller of `run`).
    stop_accepting: CancellationToken,
    /// Phase 3.
    interrupt: CancellationToken,
    /// After phase 4.
    stop: CancellationToken,
    /// Producers: the grace period waits for these.
    producers: TaskTracker,
    /// Everything else (writers, loaders, connections, probes): waited for,
    /// bounded, at the very end.
    tasks: TaskTracker,
    /// Writers with entries still to store: the flush waits for none.
    writers_busy: Arc<AtomicUsize>,
}

/// Bounds of the drain after phase 1.
#[derive(Clone, Copy, Debug)]
pub struct DrainBounds {
    /// Phase 2: how long producers may go on.
    pub grace: Duration,
    /// Phase 4: how long writers get to store what is left.
    pub flush: Duration,
    /// How long connections and tasks get to end after stop.
    pub close: Duration,
}

impl Shutdown {
    /// A shutdown whose phase 1 is `stop_accepting`.
    pub fn new(stop_accepting: CancellationToken) -> Shutdown {
        Shutdown {
            stop_accepting,
            interrupt: CancellationToken::new(),
            stop: CancellationToken::new(),
            producers: TaskTracker::new(),
            tasks: TaskTracker::new(),
            writers_busy: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Phase 1: fired when the relay stops accepting.
    pub fn stop_accepting(&self) -> &CancellationToken {
        &self.stop_accepting
    }

    /// Whether phase 1 has begun (readiness answers `503`).
    pub fn is_draining(&self) -> bool {
        self.stop_accepting.is_cancelled()
    }

    /// Phase 3: fired when recordings still running must end.
    pub fn interrupt(&self) -> &CancellationToken {
        &self.interrupt
    }

    /// The end: fired once writers flushed (or ran out of time).
    pub fn stop(&self) -> &CancellationToken {
        &self.stop
    }

    /// Where producers are spawned, so that the grace period waits for them.
    pub fn producers(&self) -> &TaskTracker {
        &self.producers
    }

    /// Where every other task is spawned.
    pub fn tasks(&self) -> &TaskTracker {
        &self.tasks
    }

    /// Counts a writer with entries to store until the guard is dropped.
    pub fn writer_busy(&self) -> WriterBusy {
        self.writers_busy.fetch_add(1, Ordering::SeqCst);
        WriterBusy(self.writers_busy.clone())
    }

    /// Phases 2 to 4 and the end, once phase 1 has fired; `connections`
    /// resolves when the server's connections have closed.
    pub async fn drain(&self, bounds: DrainBounds, connections: impl Future<Output = ()>) {
        self.producers.close();
        if tokio::time::timeout(bounds.grace, self.producers.wait())
            .await
            .is_err()
        {
            tracing::warn!("grace period over: recording the remaining streams as interrupted");
        }
        self.interrupt.cancel();
        self.producers.wait().await;
        let _ = tokio::time::timeout(bounds.flush, self.writers_flushed()).await;
        self.stop.cancel();
        self.tasks.close();
        let _ = tokio::time::timeout(bounds.close, connections).await;
        let _ = tokio::time::timeout(bounds.close, self.tasks.wait()).await;
    }

    /// Resolves once no writer has entries left to store.
    async fn writers_flushed(&self) {
        while self.writers_busy.load(Ordering::SeqCst) > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A writer with entries still to store (see [`Shutdown::writer_busy`]).
pub struct WriterBusy(Arc<AtomicUsize>);

impl Drop for WriterBusy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The phases fire in order: interrupt only after the grace period (or
    /// once producers ended), stop only once writers flushed.
    #[tokio::test(start_paused = true)]
    async fn phases_fire_in_order_within_their_bounds() {
        let shutdown = Arc::new(Shutdown::new(CancellationToken::new()));
        let busy = shutdown.writer_busy();
        let interrupted = shutdown.interrupt().clone();
        // A producer that ends only when interrupted.
        shutdown
            .producers()
            .spawn(async move { interrupted.cancelled().await });
        let bounds = DrainBounds {
            grace: Duration::from_secs(10),
            flush: Duration::from_secs(5),
            close: Duration::from_secs(1),
        };
        shutdown.stop_accepting().cancel();
        let s = shutdown.clone();
        let drain = tokio::spawn(async move { s.drain(bounds, async {}).await });
        tokio::time::sleep(Duration::from_secs(9)).await;
        assert!(
            !shutdown.interrupt().is_cancelled(),
            "interrupted before the grace ended"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(
            shutdown.interrupt().is_cancelled(),
            "not interrupted after the grace"
        );
        assert!(
            !shutdown.stop().is_cancelled(),
            "stopped while a writer was busy"
        );
        drop(busy);
        drain.await.expect("drain");
        assert!(shutdown.stop().is_cancelled());
    }
}
