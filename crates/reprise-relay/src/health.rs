//! The store's health as this instance sees it, kept by one background
//! probe so that nothing on the request path waits on a store that is
//! known to be down.
//!
//! Readers of [`StoreHealth`]: `/_reprise/readyz` (answers from it at once,
//! never with a store call), the rate limiter and the `Idempotency-Key`
//! claim (`ratelimit`, `idempotency`), which skip the store while it is
//! [`StoreHealth::is_known_down`], and the
//! `reprise_store_up` gauge.
//!
//! The probe ([`spawn_probe`], one task per relay, stopped by the shutdown's stop)
//! `PING`s the store every [`PROBE_INTERVAL`], each bounded by
//! [`PROBE_TIMEOUT`] (a stalled Redis, e.g. `SIGSTOP`ped, never answers),
//! and in between looks every [`WATCH_INTERVAL`] at the store's own view of
//! its connections ([`Store::connected`]: no round trip), so that a dropped
//! connection is noticed at once. Down within `PROBE_INTERVAL +
//! PROBE_TIMEOUT` (1.5 s) of the store stalling, at once when its
//! connections drop; up at the first `PING` answered after the client
//! reconnected.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use reprise_store::Store;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How often the probe sends a `PING`.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(500);
/// Longest a `PING` may take before the store counts as down.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// How often the probe looks at the store client's connection state.
pub const WATCH_INTERVAL: Duration = Duration::from_millis(100);

const UNKNOWN: u8 = 0;
const UP: u8 = 1;
const DOWN: u8 = 2;

/// The last verdict of the probe, shared by every request.
#[derive(Debug)]
pub struct StoreHealth {
    /// [`UNKNOWN`] until the first probe, then [`UP`] or [`DOWN`].
    state: AtomicU8,
    /// Round trip of the last answered `PING`, in microseconds.
    latency_us: AtomicU64,
    /// Why the store is down (the store's own error text): for logs and
    /// the admin listener only, never the public answer.
    error: Mutex<Option<String>>,
    /// `reprise_store_up`, set with every change.
    gauge: Gauge,
}

/// What `/readyz` reports about the store.
#[derive(Clone, Debug, PartialEq)]
pub struct HealthSnapshot {
    pub reachable: bool,
    /// Round trip of the last answered `PING` while reachable.
    pub latency_ms: Option<f64>,
    /// The store's error text while unreachable (`None` before the first probe).
    pub error: Option<String>,
}

impl StoreHealth {
    /// A health record that sets `gauge` (`reprise_store_up`) as it changes.
    pub fn new(gauge: Gauge) -> StoreHealth {
        StoreHealth {
            state: AtomicU8::new(UNKNOWN),
            latency_us: AtomicU64::new(0),
            error: Mutex::new(None),
            gauge,
        }
    }

    /// The last probe answered.
    pub fn is_up(&self) -> bool {
        self.state.load(Ordering::Acquire) == UP
    }

    /// The last probe failed: callers skip the store instead of waiting
    /// for it. Not before the first probe (a relay without a probe, say a
    /// test's, always tries the store).
    pub fn is_known_down(&self) -> bool {
        self.state.load(Ordering::Acquire) == DOWN
    }

    pub fn snapshot(&self) -> HealthSnapshot {
        let reachable = self.is_up();
        HealthSnapshot {
            reachable,
            latency_ms: reachable.then(|| self.latency_us.load(Ordering::Relaxed) as f64 / 1000.0),
            error: if reachable {
                None
            } else {
                self.error
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clone()
            },
        }
    }

    /// Records an answered probe; true if the store was not up before.
    fn set_up(&self, latency: Duration) -> bool {
        self.latency_us.store(
            u64::try_from(latency.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        self.gauge.set(1);
        self.state.swap(UP, Ordering::AcqRel) != UP
    }

    /// Records a failed probe; true if the store was not down before.
    fn set_down(&self, error: String) -> bool {
        *self.error.lock().unwrap_or_else(PoisonError::into_inner) = Some(error);
        self.gauge.set(0);
        self.state.swap(DOWN, Ordering::AcqRel) != DOWN
    }
}

/// Starts the probe of `store` on `tasks`; it runs until `stop` fires.
/// `on_up` is called the first time the store answers (the binary's
/// systemd `READY=1`).
pub fn spawn_probe(
    store: Arc<dyn Store>,
    health: Arc<StoreHealth>,
    tasks: &tokio_util::task::TaskTracker,
    stop: CancellationToken,
    on_up: impl FnOnce() + Send + 'static,
) {
    use tracing::Instrument;
    tasks.spawn(probe(store, health, stop, on_up).instrument(tracing::info_span!("store_probe")));
}

async fn probe(
    store: Arc<dyn Store>,
    health: Arc<StoreHealth>,
    stop: CancellationToken,
    on_up: impl FnOnce() + Send + 'static,
) {
    let mut on_up = Some(on_up);
    let mut watch = tokio::time::interval(WATCH_INTERVAL);
    watch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The PING in flight, if any: polled beside the connection watch, so a
    // dropped connection is noticed while a PING to a stalled server hangs.
    let mut ping: Option<std::pin::Pin<Box<dyn std::future::Future<Output = PingResult> + Send>>> =
        None;
    let mut next_ping = Instant::now();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            result = async { ping.as_mut().expect("guarded by the branch condition").await },
                if ping.is_some() =>
            {
                ping = None;
                match result {
                    // A PING answered on one connection while the client
                    // says all are gone is a race; the next probe decides.
                    Ok(_) if store.connected() == Some(false) => {}
                    Ok(latency) => {
                        if health.set_up(latency) {
                            tracing::info!(latency_ms = latency.as_secs_f64() * 1000.0, "store reachable");
                        }
                        if let Some(f) = on_up.take() {
                            f();
                        }
                    }
                    Err(e) => went_down(&health, e),
                }
            }
            _ = watch.tick() => {
                if store.connected() == Some(false) && !health.is_known_down() {
                    went_down(&health, "the connection to the store is lost".into());
                }
                if ping.is_none() && Instant::now() >= next_ping {
                    next_ping = Instant::now() + PROBE_INTERVAL;
                    let store = store.clone();
                    ping = Some(Box::pin(async move {
                        match tokio::time::timeout(PROBE_TIMEOUT, store.ping()).await {
                            Ok(Ok(latency)) => Ok(latency),
                            Ok(Err(e)) => Err(e.to_string()),
                            Err(_) => Err(format!("no answer to PING within {PROBE_TIMEOUT:?}")),
                        }
                    }));
                }
            }
        }
    }
}

type PingResult = Result<Duration, String>;

fn went_down(health: &StoreHealth, error: String) {
    // Logged once per outage, not per probe.
    if health.set_down(error.clone()) {
        tracing::warn!(cause = %error, "store unreachable; streams are recorded in memory and written once it is back");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_trait::async_trait;
    use reprise_core::{Outcome, Seq, StreamId};
    use reprise_store::{Entry, KeyRef, LeaseRenewal, StoreError, StreamMeta, Watcher};

    /// What the fake store's `PING` does.
    #[derive(Clone, Copy, Debug, PartialEq)]
    enum Ping {
        Answer,
        /// A stalled server: never answers.
        Hang,
    }

    /// A store whose `ping` and `connected` the test sets; nothing else is
    /// called by the probe.
    struct Fake {
        ping: Mutex<Ping>,
        connected: Mutex<Option<bool>>,
    }

    impl Fake {
        fn set(&self, ping: Ping, connected: Option<bool>) {
            *self.ping.lock().unwrap() = ping;
            *self.connected.lock().unwrap() = connected;
        }
    }

    fn unused() -> StoreError {
        StoreError::Unavailable("not used by the probe".into())
    }

    #[async_trait]
    impl Store for Fake {
        fn kind(&self) -> &'static str {
            "fake"
        }
        async fn create(&self, _: &StreamMeta) -> Result<(), StoreError> {
            Err(unused())
        }
        async fn append(&self, _: StreamId, _: &[Entry]) -> Result<(), StoreError> {
            Err(unused())
        }
        async fn start(
            &self,
            _: &StreamMeta,
            _: Option<&KeyRef>,
            _: &[Entry],
        ) -> Result<reprise_store::Written, StoreError> {
            Err(unused())
        }
        async fn append_at(
            &self,
            _: StreamId,
            _: u64,
            _: &[Entry],
        ) -> Result<reprise_store::Written, StoreError> {
            Err(unused())
        }
        async fn append_checked(
            &self,
            _: StreamId,
            _: &[Entry],
            _: &reprise_store::WriterChecks,
        ) -> Result<reprise_store::Checked, StoreError> {
            Err(unused())
        }
        async fn sliding_expiry(
            &self,
            _: StreamId,
            _: u64,
            _: u64,
            _: bool,
        ) -> Result<bool, StoreError> {
            Err(unused())
        }
        async fn meta(&self, _: StreamId) -> Result<Option<StreamMeta>, StoreError> {
            Err(unused())
        }
        async fn read(&self, _: StreamId, _: Seq, _: usize) -> Result<Vec<Entry>, StoreError> {
            Err(unused())
        }
        async fn bind_key(&self, _: &KeyRef, _: StreamId) -> Result<(), StoreError> {
            Err(unused())
        }
        async fn claim_key(&self, _: &KeyRef, _: StreamId) -> Result<Option<StreamId>, StoreError> {
            Err(unused())
        }
        async fn release_key(&self, _: &KeyRef, _: StreamId) -> Result<(), StoreError> {
            Err(unused())
        }
        async fn resolve_key(&self, _: &KeyRef) -> Result<Option<StreamId>, StoreError> {
            Err(unused())
        }
        async fn renew_lease(
            &self,
            _: StreamId,
            _: &str,
            _: u64,
            _: u64,
        ) -> Result<LeaseRenewal, StoreError> {
            Err(unused())
        }
        async fn request_cancel(&self, _: StreamId) -> Result<bool, StoreError> {
            Err(unused())
        }
        async fn set_signals(
            &self,
            _: StreamId,
            _: reprise_core::Dialect,
        ) -> Result<(), StoreError> {
            Err(unused())
        }
        async fn end_if_abandoned(
            &self,
            _: StreamId,
            _: u64,
            _: &Outcome,
        ) -> Result<Option<Seq>, StoreError> {
            Err(unused())
        }
        async fn watch(&self, _: StreamId) -> Result<Watcher, StoreError> {
            Err(unused())
        }
        async fn ping(&self) -> Result<Duration, StoreError> {
            let mode = *self.ping.lock().unwrap();
            match mode {
                Ping::Answer => Ok(Duration::from_micros(300)),
                Ping::Hang => std::future::pending().await,
            }
        }
        fn connected(&self) -> Option<bool> {
            *self.connected.lock().unwrap()
        }
    }

    /// The bounds, on tokio's paused clock: down within 2 s of the
    /// store stalling (its PING hangs for ever), at once when the client
    /// reports its connections lost, and up within 2 s of its return.
    #[tokio::test(start_paused = true)]
    async fn the_probe_follows_the_store_within_two_seconds() {
        let fake = Arc::new(Fake {
            ping: Mutex::new(Ping::Answer),
            connected: Mutex::new(Some(true)),
        });
        let health = Arc::new(StoreHealth::new(Gauge::default()));
        let tasks = tokio_util::task::TaskTracker::new();
        let stop = CancellationToken::new();
        let (up_tx, up_rx) = tokio::sync::oneshot::channel();
        spawn_probe(
            fake.clone(),
            health.clone(),
            &tasks,
            stop.clone(),
            move || {
                let _ = up_tx.send(());
            },
        );
        let bound = Duration::from_secs(2);
        tokio::time::sleep(bound).await;
        assert!(health.is_up());
        up_rx.await.expect("on_up called");

        // Stalled: connected, but PINGs never answer.
        fake.set(Ping::Hang, Some(true));
        tokio::time::sleep(bound).await;
        assert!(health.is_known_down(), "down within 2 s of a stall");
        assert!(health.snapshot().error.is_some_and(|e| e.contains("PING")));

        fake.set(Ping::Answer, Some(true));
        tokio::time::sleep(bound).await;
        assert!(health.is_up(), "up within 2 s of the store's return");

        // Connections dropped: noticed by the watch, not by a PING.
        fake.set(Ping::Hang, Some(false));
        tokio::time::sleep(WATCH_INTERVAL * 2).await;
        assert!(health.is_known_down(), "down at once when disconnected");
        // A PING answered while the client says it is disconnected does not
        // count; the reconnection does.
        fake.set(Ping::Answer, Some(false));
        tokio::time::sleep(bound).await;
        assert!(health.is_known_down());
        fake.set(Ping::Answer, Some(true));
        tokio::time::sleep(bound).await;
        assert!(health.is_up());

        stop.cancel();
        tasks.close();
        tasks.wait().await;
    }

    #[test]
    fn states_and_gauge() {
        let gauge = Gauge::default();
        let h = StoreHealth::new(gauge.clone());
        assert!(!h.is_up() && !h.is_known_down());
        assert!(h.set_down("refused".into()));
        assert!(!h.set_down("refused again".into()));
        assert!(h.is_known_down());
        assert_eq!(gauge.get(), 0);
        assert_eq!(h.snapshot().error.as_deref(), Some("refused again"));
        assert!(h.set_up(Duration::from_micros(1500)));
        assert_eq!(gauge.get(), 1);
        let s = h.snapshot();
        assert!(s.reachable && s.error.is_none());
        assert_eq!(s.latency_ms, Some(1.5));
    }
}
