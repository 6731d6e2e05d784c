//! The hub: this instance's registry of [`LiveStream`]s, and the loader that
//! fills one from the store when the stream is not produced here.
//!
//! A reader never talks to the store itself. It asks the hub for the stream:
//! - produced on this instance → the recorder's log, in-process, no Redis trip;
//! - otherwise → one loader task per stream per instance pages the entries
//!   out of the store into a log, then follows new appends (store watcher
//!   plus a poll interval), until the terminal entry. Every local reader of
//!   that stream shares it, so N readers cost one store reader, and a resume
//!   storm on a finished stream reads the store once.
//!
//! Logs stay in the hub while readers are attached and for `hot_linger`
//! after the stream ended, then are dropped.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reprise_core::{FailReason, Format, Outcome, StreamId};
use reprise_store::{Entry, EntryBody, KeyRef, Store, StoreError, StreamMeta};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::retry::Backoff;
use crate::stream::budget::LogBudget;
use crate::stream::live::{LiveStream, ReaderGuard};

/// Entries read from the store per call.
pub const STORE_PAGE: usize = 1000;

/// Registry of the streams this instance holds in memory.
pub struct Hub {
    streams: Mutex<HashMap<StreamId, Arc<LiveStream>>>,
    /// What all logs may hold (`limits.max_log_bytes`).
    budget: Arc<LogBudget>,
    /// Metadata lookups in flight, shared by concurrent resumes of one
    /// stream (see [`Hub::meta`]).
    meta_flights: Mutex<HashMap<StreamId, Arc<MetaFlight>>>,
    /// Key bindings of streams produced here that their writer has not
    /// stored yet (it stores them with the first events): resolved from
    /// here meanwhile (see [`Hub::resolve_key`]).
    pending_keys: Mutex<HashMap<KeyRef, StreamId>>,
}

/// One shared metadata lookup: the first resume does it, the others wait.
type MetaFlight = tokio::sync::OnceCell<Result<Option<StreamMeta>, StoreError>>;

/// One resume waiting on a [`MetaFlight`]. Its drop retires the flight from
/// the hub's map when the lookup is done (the first to finish retires it:
/// later resumes read afresh, by then the stream is usually held here), or
/// when it is the last waiter to leave (its client hung up mid-lookup and
/// the future was dropped): a flight nobody waits on must not stay forever.
struct FlightWaiter<'a> {
    hub: &'a Hub,
    id: StreamId,
    flight: Arc<MetaFlight>,
    done: bool,
}

impl Drop for FlightWaiter<'_> {
    fn drop(&mut self) {
        let mut flights = self.hub.flights();
        let registered = flights
            .get(&self.id)
            .is_some_and(|f| Arc::ptr_eq(f, &self.flight));
        // Waiters clone the flight only under this lock, so the count is
        // exact here: the map's reference plus this waiter's means no one
        // else waits.
        if registered && (self.done || Arc::strong_count(&self.flight) == 2) {
            flights.remove(&self.id);
        }
    }
}

impl Hub {
    /// An empty registry whose logs share `budget`.
    pub fn new(budget: Arc<LogBudget>) -> Hub {
        Hub {
            streams: Mutex::default(),
            budget,
            meta_flights: Mutex::default(),
            pending_keys: Mutex::default(),
        }
    }

    /// The bound the logs of this hub share.
    pub fn budget(&self) -> &Arc<LogBudget> {
        &self.budget
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<StreamId, Arc<LiveStream>>> {
        self.streams.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, id: StreamId) -> Option<Arc<LiveStream>> {
        self.map().get(&id).cloned()
    }

    /// Registers a stream produced on this instance.
    pub fn insert(&self, live: Arc<LiveStream>) {
        self.map().insert(live.id, live);
    }

    /// Removes `live` if it is still the registered log for its id.
    pub fn remove(&self, live: &Arc<LiveStream>) {
        let mut map = self.map();
        if map.get(&live.id).is_some_and(|l| Arc::ptr_eq(l, live)) {
            map.remove(&live.id);
            drop(map);
            self.pending().retain(|_, id| *id != live.id);
        }
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<KeyRef, StreamId>> {
        self.pending_keys.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `key` now points at `stream`, produced here, whose writer has not
    /// stored the binding yet.
    pub fn key_pending(&self, key: &KeyRef, stream: StreamId) {
        self.pending().insert(key.clone(), stream);
    }

    /// The writer of `stream` stored its key binding: the store answers
    /// for `key` from now on (a later stream may take the key elsewhere).
    pub fn key_stored(&self, key: &KeyRef, stream: StreamId) {
        let mut pending = self.pending();
        if pending.get(key) == Some(&stream) {
            pending.remove(key);
        }
    }

    /// The stream `key` points at: a stream started here whose binding is
    /// not stored yet, else the store's binding.
    pub async fn resolve_key(
        &self,
        store: &dyn Store,
        key: &KeyRef,
    ) -> Result<Option<StreamId>, StoreError> {
        let pending = self.pending().get(key).copied();
        match pending {
            Some(stream) => Ok(Some(stream)),
            None => store.resolve_key(key).await,
        }
    }

    /// Entries recorded here and not yet stored, over all streams.
    pub fn unstored_entries(&self) -> usize {
        let streams: Vec<Arc<LiveStream>> = self.map().values().cloned().collect();
        streams.iter().map(|l| l.unstored_entries()).sum()
    }

    pub fn len(&self) -> usize {
        self.map().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The log for a stream known to exist in the store (`meta`), starting a
    /// loader if this instance does not hold it yet. The caller is attached
    /// as a reader before the registry lock is released, so a loader never
    /// leaves while a reader is joining.
    pub fn open(
        self: &Arc<Self>,
        meta: &StreamMeta,
        ctx: LoaderCtx,
    ) -> (Arc<LiveStream>, ReaderGuard) {
        let mut map = self.map();
        if let Some(l) = map.get(&meta.id) {
            if l.epoch == meta.epoch {
                let guard = l.attach();
                return (l.clone(), guard);
            }
        }
        let format = meta.format.parse().unwrap_or(Format::Sse);
        let live = LiveStream::new(
            meta.id,
            meta.epoch,
            meta.headers.clone(),
            format,
            self.budget.clone(),
        );
        if let Some(dialect) = meta.signals {
            live.decide_signals(dialect);
        }
        let _ = live.owner.set(crate::stream::live::Owner {
            route: meta.route.clone(),
            caller: meta.caller.clone(),
        });
        let guard = live.attach();
        map.insert(meta.id, live.clone());
        drop(map);
        let span = tracing::debug_span!("loader", stream.id = %meta.id);
        let hub = self.clone();
        let task_live = live.clone();
        ctx.tasks
            .clone()
            .spawn(async move { load(hub, task_live, ctx).await }.instrument(span));
        (live, guard)
    }

    /// The stream's metadata from the store, for a resume of a stream not
    /// held here. Concurrent callers for one stream share one lookup, so a
    /// storm of resumes of a stream this instance never saw reads the
    /// metadata once, not once per client.
    pub async fn meta(
        &self,
        store: &dyn Store,
        id: StreamId,
    ) -> Result<Option<StreamMeta>, StoreError> {
        let mut waiter = {
            let mut flights = self.flights();
            FlightWaiter {
                hub: self,
                id,
                flight: flights.entry(id).or_default().clone(),
                done: false,
            }
        };
        let result = waiter.flight.get_or_init(|| store.meta(id)).await;
        // Dropping the waiter retires the flight (see `FlightWaiter`).
        waiter.done = true;
        let result = match result {
            Ok(meta) => Ok(meta.clone()),
            Err(e) => Err(e.clone()),
        };
        drop(waiter);
        result
    }

    fn flights(&self) -> std::sync::MutexGuard<'_, HashMap<StreamId, Arc<MetaFlight>>> {
        self.meta_flights.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Attaches a reader to a stream held here, if any.
    pub fn attach(&self, id: StreamId) -> Option<(Arc<LiveStream>, ReaderGuard)> {
        let map = self.map();
        let l = map.get(&id)?;
        Some((l.clone(), l.attach()))
    }

    /// Removes `live` if no reader is attached; true if it was removed (or
    /// was no longer registered).
    fn remove_if_idle(&self, live: &Arc<LiveStream>) -> bool {
        let mut map = self.map();
        if live.reader_count() > 0 {
            return false;
        }
        if map.get(&live.id).is_some_and(|l| Arc::ptr_eq(l, live)) {
            map.remove(&live.id);
        }
        true
    }
}

/// What a loader needs.
#[derive(Clone)]
pub struct LoaderCtx {
    pub store: Arc<dyn Store>,
    pub tasks: tokio_util::task::TaskTracker,
    pub stop: CancellationToken,
    pub poll_interval: Duration,
    pub linger: Duration,
    /// Producer lease length: a stream whose lease ran out is abandoned.
    pub lease: Duration,
}

/// Before a loaded log writes its first signal (a gap or a failed end, which
/// fixes the dialect): if the dialect was still undecided when the loader
/// read the metadata, read it again. The producer stores its decision
/// before appending anything after the event that decided it, so this
/// finds it if there is one.
async fn learn_signals(live: &LiveStream, entries: &[Entry], store: &dyn Store) {
    let signals_ahead = entries
        .iter()
        .any(|e| matches!(e.body, EntryBody::Gap { .. } | EntryBody::End(_)));
    if live.format != Format::Sse || live.signals_decided().is_some() || !signals_ahead {
        return;
    }
    match store.meta(live.id).await {
        Ok(Some(meta)) => {
            if let Some(dialect) = meta.signals {
                live.decide_signals(dialect);
            }
        }
        Ok(None) => {}
        // Unreachable store: the signal goes out in `reprise`.
        Err(e) => tracing::debug!(cause = %e, "metadata re-read for the signal dialect failed"),
    }
}

/// Follows a stream in the store until its end; see the module docs.
async fn load(hub: Arc<Hub>, live: Arc<LiveStream>, ctx: LoaderCtx) {
    let mut watcher = match ctx.store.watch(live.id).await {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::debug!(cause = %e, "no store watcher, polling only");
            None
        }
    };
    let mut backoff = Backoff::new();
    // Polls without any attached reader; the loader stops after a few.
    let mut idle_polls = 0u32;
    // Consecutive reads that found nothing new.
    let mut empty_polls = 0u32;
    // Consecutive metadata checks that found the stream gone.
    let mut missing_checks = 0u32;
    loop {
        if ctx.stop.is_cancelled() {
            break;
        }
        let after = live.last_seq();
        match ctx.store.read(live.id, after, STORE_PAGE).await {
            Ok(entries) if !entries.is_empty() => {
                backoff.reset();
                empty_polls = 0;
                let full_page = entries.len() == STORE_PAGE;
                learn_signals(&live, &entries, &*ctx.store).await;
                if !live.append_loaded(&entries) {
                    // The store's entries do not continue what we hold: the
                    // stream was lost and re-created underneath us.
                    tracing::warn!(
                        after = after.0,
                        "stream entries are not contiguous; ending readers"
                    );
                    live.finish(Outcome::Failed {
                        reason: FailReason::ProducerLost,
                        message: "the stream's history changed in the store".into(),
                    });
                }
                if live.is_ended() {
                    break;
                }
                if full_page {
                    continue;
                }
            }
            Ok(_) => {
                backoff.reset();
                empty_polls += 1;
                // Nothing new: if the producing instance stopped renewing its
                // lease (it died), record that, once, for every reader.
                let lost = Outcome::Failed {
                    reason: FailReason::ProducerLost,
                    message: "the instance recording this stream stopped".into(),
                };
                match ctx
                    .store
                    .end_if_abandoned(live.id, crate::clock::now_ms(), &lost)
                    .await
                {
                    Ok(Some(seq)) => {
                        tracing::warn!(
                            end = seq.0,
                            "producer lease expired; stream ended as producer_lost"
                        );
                        continue;
                    }
                    Ok(None) => {}
                    Err(e) => tracing::debug!(cause = %e, "abandonment check failed"),
                }
                // Nothing new for a while: if the stream itself vanished
                // (expired) and stays gone, end the readers instead of
                // waiting forever. A producer whose store lost the stream
                // (a Redis restart) re-creates it, hence several checks.
                if empty_polls % 10 == 0 {
                    match ctx.store.meta(live.id).await {
                        Ok(None) => missing_checks += 1,
                        // Ended in the store at or before what this log
                        // holds: the store lost the log's last entries (a
                        // failover to a replica that lacked them) and the
                        // end landed behind them. The readers get the
                        // end's signal, never a silent stall.
                        Ok(Some(meta)) => {
                            missing_checks = 0;
                            if let Some((end_seq, outcome)) = meta.end {
                                if end_seq <= after {
                                    tracing::warn!(
                                        end = end_seq.0,
                                        held = after.0,
                                        "the stream ended in the store behind what this instance read; ending readers"
                                    );
                                    live.finish(outcome);
                                    break;
                                }
                            }
                        }
                        Err(_) => missing_checks = 0,
                    }
                    if missing_checks >= 3 {
                        live.finish(Outcome::Failed {
                            reason: FailReason::ProducerLost,
                            message: "the stream expired before it ended".into(),
                        });
                        break;
                    }
                }
            }
            Err(e) => {
                tracing::debug!(cause = %e, "store read failed; retrying");
                tokio::select! {
                    _ = backoff.wait() => {}
                    _ = ctx.stop.cancelled() => break,
                }
                continue;
            }
        }
        if live.reader_count() == 0 {
            idle_polls += 1;
            if idle_polls >= 3 && hub.remove_if_idle(&live) {
                return;
            }
        } else {
            idle_polls = 0;
        }
        let wait = async {
            match watcher.as_mut() {
                Some(w) => w.changed().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = wait => {}
            _ = tokio::time::sleep(ctx.poll_interval) => {}
            _ = ctx.stop.cancelled() => break,
        }
    }
    if live.is_ended() {
        tokio::select! {
            _ = tokio::time::sleep(ctx.linger) => {}
            _ = ctx.stop.cancelled() => {}
        }
    }
    // Ended (or stopping): drop the log once no reader uses it.
    while !hub.remove_if_idle(&live) && !ctx.stop.is_cancelled() {
        tokio::time::sleep(ctx.poll_interval).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_trait::async_trait;
    use reprise_core::Seq;
    use reprise_store::{
        Entry, KeyRef, LeaseRenewal, MemoryLimits, MemoryStore, StoreOptions, Watcher,
    };
    use std::sync::atomic::{AtomicBool, Ordering};

    /// The real memory store, except that `meta` hangs while `stalled` is
    /// set: a lookup a client can walk away from.
    struct Stalling {
        inner: MemoryStore,
        stalled: AtomicBool,
    }

    #[async_trait]
    impl Store for Stalling {
        fn kind(&self) -> &'static str {
            self.inner.kind()
        }
        async fn create(&self, meta: &StreamMeta) -> Result<(), StoreError> {
            self.inner.create(meta).await
        }
        async fn append(&self, stream: StreamId, entries: &[Entry]) -> Result<(), StoreError> {
            self.inner.append(stream, entries).await
        }
        async fn start(
            &self,
            meta: &StreamMeta,
            key: Option<&KeyRef>,
            entries: &[Entry],
        ) -> Result<reprise_store::Written, StoreError> {
            self.inner.start(meta, key, entries).await
        }
        async fn append_at(
            &self,
            stream: StreamId,
            records: u64,
            entries: &[Entry],
        ) -> Result<reprise_store::Written, StoreError> {
            self.inner.append_at(stream, records, entries).await
        }
        async fn append_checked(
            &self,
            stream: StreamId,
            entries: &[Entry],
            checks: &reprise_store::WriterChecks,
        ) -> Result<reprise_store::Checked, StoreError> {
            self.inner.append_checked(stream, entries, checks).await
        }
        async fn sliding_expiry(
            &self,
            stream: StreamId,
            now_ms: u64,
            window_ms: u64,
            touch: bool,
        ) -> Result<bool, StoreError> {
            self.inner
                .sliding_expiry(stream, now_ms, window_ms, touch)
                .await
        }
        async fn meta(&self, stream: StreamId) -> Result<Option<StreamMeta>, StoreError> {
            if self.stalled.load(Ordering::SeqCst) {
                std::future::pending::<()>().await;
            }
            self.inner.meta(stream).await
        }
        async fn read(
            &self,
            stream: StreamId,
            after: Seq,
            limit: usize,
        ) -> Result<Vec<Entry>, StoreError> {
            self.inner.read(stream, after, limit).await
        }
        async fn bind_key(&self, key: &KeyRef, stream: StreamId) -> Result<(), StoreError> {
            self.inner.bind_key(key, stream).await
        }
        async fn claim_key(
            &self,
            key: &KeyRef,
            stream: StreamId,
        ) -> Result<Option<StreamId>, StoreError> {
            self.inner.claim_key(key, stream).await
        }
        async fn release_key(&self, key: &KeyRef, stream: StreamId) -> Result<(), StoreError> {
            self.inner.release_key(key, stream).await
        }
        async fn resolve_key(&self, key: &KeyRef) -> Result<Option<StreamId>, StoreError> {
            self.inner.resolve_key(key).await
        }
        async fn renew_lease(
            &self,
            stream: StreamId,
            owner: &str,
            now_ms: u64,
            until_ms: u64,
        ) -> Result<LeaseRenewal, StoreError> {
            self.inner
                .renew_lease(stream, owner, now_ms, until_ms)
                .await
        }
        async fn request_cancel(&self, stream: StreamId) -> Result<bool, StoreError> {
            self.inner.request_cancel(stream).await
        }
        async fn set_signals(
            &self,
            stream: StreamId,
            signals: reprise_core::Dialect,
        ) -> Result<(), StoreError> {
            self.inner.set_signals(stream, signals).await
        }
        async fn end_if_abandoned(
            &self,
            stream: StreamId,
            now_ms: u64,
            outcome: &Outcome,
        ) -> Result<Option<Seq>, StoreError> {
            self.inner.end_if_abandoned(stream, now_ms, outcome).await
        }
        async fn watch(&self, stream: StreamId) -> Result<Watcher, StoreError> {
            self.inner.watch(stream).await
        }
        async fn ping(&self) -> Result<Duration, StoreError> {
            self.inner.ping().await
        }
    }

    fn stalling() -> Stalling {
        let opts = StoreOptions {
            key_prefix: "reprise:".into(),
            retention: Duration::from_secs(60),
            max_stream_duration: Duration::from_secs(60),
        };
        Stalling {
            inner: MemoryStore::new(opts, MemoryLimits::default()),
            stalled: AtomicBool::new(true),
        }
    }

    #[tokio::test]
    async fn resumes_that_leave_during_a_lookup_leave_no_flight_behind() {
        let hub = Hub::new(Arc::new(LogBudget::unbounded()));
        let store = stalling();
        let id = StreamId::random();
        let mut first = Box::pin(hub.meta(&store, id));
        let mut second = Box::pin(hub.meta(&store, id));
        assert!(futures::poll!(first.as_mut()).is_pending());
        assert!(futures::poll!(second.as_mut()).is_pending());
        assert_eq!(hub.flights().len(), 1, "one shared lookup");
        // The one doing the lookup leaves: the other still waits on it.
        drop(first);
        assert_eq!(hub.flights().len(), 1);
        assert!(futures::poll!(second.as_mut()).is_pending());
        // The last one leaves: nothing is left.
        drop(second);
        assert_eq!(hub.flights().len(), 0);

        // A lookup that completes retires its flight too, and a new one
        // after a departed waiter works.
        let mut abandoned = Box::pin(hub.meta(&store, id));
        assert!(futures::poll!(abandoned.as_mut()).is_pending());
        drop(abandoned);
        store.stalled.store(false, Ordering::SeqCst);
        assert!(matches!(hub.meta(&store, id).await, Ok(None)));
        assert_eq!(hub.flights().len(), 0);
    }
}
