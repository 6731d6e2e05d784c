//! The embedded store: streams kept in this process's memory, for a single
//! instance without Redis.
//!
//! The relay's producer appends here and its readers read here, exactly as
//! they would with [`crate::RedisStore`]; the conformance suite checks that
//! both behave alike. What differs is durability (none across restarts) and
//! the memory bound ([`MemoryLimits`]).
//!
//! Locking: a global `RwLock` maps stream ids to per-stream mutexes and is held
//! only for the lookup, so appends and reads of different streams never wait
//! on each other. No code path holds a stream's lock while taking the map's
//! lock or another stream's lock.
//!
//! Expiry: a finished stream and its key binding expire `retention` after the
//! end; a live stream expires `max_stream_duration + retention` after its
//! creation. Expired data is invisible from the moment it expires (every
//! access checks the deadline) and is reclaimed by a periodic sweep task, or
//! earlier when an append needs the room. Time is `tokio::time::Instant`, so
//! tests can pause and advance the clock.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, Weak};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::Instrument;

use reprise_core::{Dialect, Outcome, Seq, StreamId};

use crate::writers::{Checked, WriterChecks, Writers};
use crate::{
    Entry, EntryBody, KeyRef, LeaseRenewal, Store, StoreError, StoreOptions, StreamMeta, Watcher,
    Written,
};

/// Bookkeeping bytes charged per entry on top of its payload, so that a flood
/// of tiny events is bounded too.
const ENTRY_OVERHEAD: usize = 48;
/// Bookkeeping bytes charged per stream on top of its metadata text.
const META_OVERHEAD: usize = 128;
/// Longest pause between two sweeps (shorter when retention is shorter).
const MAX_SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// Shortest pause between two sweeps.
const MIN_SWEEP_INTERVAL: Duration = Duration::from_millis(10);

/// Memory bounds of the embedded store.
#[derive(Clone, Debug)]
pub struct MemoryLimits {
    /// Total bytes held: event payloads, outcome texts and stream metadata,
    /// plus a small fixed charge per entry and per stream. When an append
    /// would exceed it, finished streams are evicted oldest-first; if that is
    /// not enough the append fails with [`StoreError::Full`].
    pub max_bytes: usize,
}

impl Default for MemoryLimits {
    fn default() -> Self {
        MemoryLimits {
            max_bytes: 256 * 1024 * 1024,
        }
    }
}

/// The embedded, single-process [`Store`].
pub struct MemoryStore {
    shared: Arc<Shared>,
    /// Cancels the sweep task when the store is dropped.
    _sweeper: Option<DropGuard>,
}

struct Shared {
    opts: StoreOptions,
    limits: MemoryLimits,
    streams: RwLock<HashMap<StreamId, Arc<Mutex<StreamState>>>>,
    keys: Mutex<HashMap<KeyRef, Binding>>,
    /// Live tails, ref-counted per stream; independent of the stream records
    /// so that a stream can be watched before it is created.
    watchers: Mutex<HashMap<StreamId, WatchSlot>>,
    /// Expiry order of streams, for the sweep and for eviction.
    queues: Mutex<ExpiryQueues>,
    /// Bytes currently charged against `limits.max_bytes`.
    used: AtomicUsize,
}

struct StreamState {
    meta: StreamMeta,
    entries: Vec<Entry>,
    /// Bytes charged for this stream (metadata and entries).
    bytes: usize,
    expires_at: Instant,
    /// The last key bound to this stream, so the end can shorten its binding.
    bound_key: Option<KeyRef>,
    /// Set when the record was dropped from the map (expired, evicted or
    /// replaced): a writer holding an old handle must not resurrect it.
    removed: bool,
    /// Producer and `Stream-Seq` state ([`Store::append_checked`]).
    writers: Writers,
}

impl StreamState {
    fn alive(&self, now: Instant) -> bool {
        !self.removed && now < self.expires_at
    }
}

struct Binding {
    stream: StreamId,
    expires_at: Instant,
}

struct WatchSlot {
    tx: watch::Sender<u64>,
    refs: usize,
}

/// Streams in deadline order. Every deadline change pushes a new record, so
/// a popped record may be stale: the stream's own `expires_at` decides.
#[derive(Default)]
struct ExpiryQueues {
    /// Live streams by creation (all share one lifetime, so this is also
    /// deadline order).
    live: VecDeque<(Instant, StreamId)>,
    /// Finished streams by end (all share `retention`, so also deadline
    /// order); the front is the oldest, evicted first under memory pressure.
    finished: VecDeque<(Instant, StreamId)>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a lock leaves plain data behind, still usable.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn meta_bytes(meta: &StreamMeta) -> usize {
    META_OVERHEAD
        + meta.route.len()
        + meta.format.len()
        + meta.lease_owner.as_ref().map_or(0, String::len)
        + meta
            .headers
            .iter()
            .map(|(n, v)| n.len() + v.len())
            .sum::<usize>()
}

fn entry_bytes(entry: &Entry) -> usize {
    ENTRY_OVERHEAD
        + match &entry.body {
            EntryBody::Event(b) => b.len(),
            EntryBody::End(o) => match o {
                reprise_core::Outcome::Failed { message, .. } => message.len(),
                _ => 0,
            },
            EntryBody::Gap { .. } => 0,
        }
}

/// Checks what can be checked without the stored stream: each entry starts
/// right after the last seq the previous one covers, gaps do not end before
/// they start, `End` only last. Shared with the Redis backend so both reject
/// the same malformed batches.
pub(crate) fn validate_batch(stream: StreamId, entries: &[Entry]) -> Result<(), StoreError> {
    for (i, e) in entries.iter().enumerate() {
        if let EntryBody::Gap { upto } = e.body {
            if upto < e.seq {
                return Err(StoreError::Conflict {
                    stream,
                    detail: format!("gap at seq {} ends before it, at {upto}", e.seq),
                });
            }
        }
        if let Some(next) = entries.get(i + 1) {
            if e.last_seq().0.checked_add(1) != Some(next.seq.0) {
                return Err(StoreError::Conflict {
                    stream,
                    detail: format!("batch seqs not consecutive at index {}", i + 1),
                });
            }
        }
    }
    if let Some(pos) = entries
        .iter()
        .position(|e| matches!(e.body, EntryBody::End(_)))
    {
        if pos + 1 != entries.len() {
            return Err(StoreError::Conflict {
                stream,
                detail: "end entry is not the last of the batch".into(),
            });
        }
    }
    if entries.first().is_some_and(|e| e.seq == Seq::ZERO) {
        return Err(StoreError::Conflict {
            stream,
            detail: "seq 0 is not a valid entry position".into(),
        });
    }
    Ok(())
}

impl MemoryStore {
    /// A new empty store. When called inside a tokio runtime it spawns the
    /// sweep task on it (stopped when the store is dropped); outside one,
    /// expired data stays invisible but is only reclaimed under memory
    /// pressure.
    pub fn new(opts: StoreOptions, limits: MemoryLimits) -> MemoryStore {
        let shared = Arc::new(Shared {
            opts,
            limits,
            streams: RwLock::new(HashMap::new()),
            keys: Mutex::new(HashMap::new()),
            watchers: Mutex::new(HashMap::new()),
            queues: Mutex::new(ExpiryQueues::default()),
            used: AtomicUsize::new(0),
        });
        let sweeper = match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                let token = CancellationToken::new();
                let interval =
                    (shared.opts.retention / 2).clamp(MIN_SWEEP_INTERVAL, MAX_SWEEP_INTERVAL);
                handle.spawn(
                    sweep_task(Arc::downgrade(&shared), token.clone(), interval)
                        .instrument(tracing::debug_span!("memory_store_sweep")),
                );
                Some(token.drop_guard())
            }
            Err(_) => {
                tracing::warn!("memory store created outside a tokio runtime: no periodic sweep");
                None
            }
        };
        MemoryStore {
            shared,
            _sweeper: sweeper,
        }
    }

    /// Bytes currently charged against [`MemoryLimits::max_bytes`].
    pub fn used_bytes(&self) -> usize {
        self.shared.used.load(Ordering::Acquire)
    }

    /// Reclaims expired streams and bindings now (the sweep task does this
    /// periodically).
    pub fn sweep(&self) {
        self.shared.sweep(Instant::now());
    }

    /// Drops a stream as a restart without persistence would (a test hook:
    /// the embedded store never loses a stream by itself). Its writer's next
    /// [`Store::append_at`] fails with [`StoreError::Lost`].
    pub fn forget(&self, stream: StreamId) -> bool {
        self.shared.remove_if(stream, |_| true)
    }

    /// Where the stream stands after a write (see [`Written`]).
    fn written(&self, stream: StreamId) -> Written {
        match self.shared.alive(stream) {
            Some(handle) => {
                let st = lock(&handle);
                Written {
                    last: st.entries.last().map_or(Seq::ZERO, Entry::last_seq),
                    records: st.entries.len() as u64,
                }
            }
            None => Written::default(),
        }
    }
}

async fn sweep_task(shared: Weak<Shared>, token: CancellationToken, interval: Duration) {
    loop {
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        let Some(shared) = shared.upgrade() else {
            return;
        };
        shared.sweep(Instant::now());
    }
}

impl Shared {
    fn live_ttl(&self) -> Duration {
        self.opts
            .max_stream_duration
            .saturating_add(self.opts.retention)
    }

    fn get(&self, stream: StreamId) -> Option<Arc<Mutex<StreamState>>> {
        self.streams
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&stream)
            .cloned()
    }

    fn release(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::AcqRel);
    }

    /// Removes `stream` if `pred` holds for it; returns whether it did.
    fn remove_if(&self, stream: StreamId, pred: impl FnOnce(&StreamState) -> bool) -> bool {
        let Some(handle) = self.get(stream) else {
            return false;
        };
        let (freed, bound_key) = {
            let mut st = lock(&handle);
            if st.removed || !pred(&st) {
                return false;
            }
            st.removed = true;
            st.entries = Vec::new();
            (std::mem::take(&mut st.bytes), st.bound_key.take())
        };
        {
            let mut map = self.streams.write().unwrap_or_else(PoisonError::into_inner);
            if map.get(&stream).is_some_and(|h| Arc::ptr_eq(h, &handle)) {
                map.remove(&stream);
            }
        }
        // A binding to a stream that no longer exists resolves to nothing useful.
        if let Some(key) = bound_key {
            let mut keys = lock(&self.keys);
            if keys.get(&key).is_some_and(|b| b.stream == stream) {
                keys.remove(&key);
            }
        }
        self.release(freed);
        true
    }

    /// Drops expired streams and bindings.
    fn sweep(&self, now: Instant) {
        loop {
            let next = {
                let mut q = lock(&self.queues);
                match (q.live.front(), q.finished.front()) {
                    (Some(&(t, _)), _) if t <= now => q.live.pop_front(),
                    (_, Some(&(t, _))) if t <= now => q.finished.pop_front(),
                    _ => None,
                }
            };
            let Some((_, stream)) = next else { break };
            self.remove_if(stream, |st| st.expires_at <= now);
        }
        lock(&self.keys).retain(|_, b| b.expires_at > now);
    }

    /// Frees room for one more reservation: first expired streams, then the
    /// oldest finished one. Returns false when nothing could be freed.
    fn evict_one(&self, now: Instant) -> bool {
        let popped = {
            let mut q = lock(&self.queues);
            match q.live.front() {
                Some(&(t, _)) if t <= now => q.live.pop_front(),
                _ => q.finished.pop_front(),
            }
        };
        let Some((_, stream)) = popped else {
            return false;
        };
        let evicted = self.remove_if(stream, |st| st.meta.end.is_some() || st.expires_at <= now);
        if evicted {
            tracing::debug!(stream.id = %stream, "memory store evicted a finished stream");
        }
        true
    }

    /// Charges `bytes` against the limit, evicting finished streams if needed.
    fn reserve(&self, bytes: usize) -> Result<(), StoreError> {
        let max = self.limits.max_bytes;
        if bytes > max {
            return Err(StoreError::Full(format!(
                "{bytes} bytes do not fit in a store of {max} bytes"
            )));
        }
        let now = Instant::now();
        loop {
            let cur = self.used.load(Ordering::Acquire);
            if cur + bytes <= max {
                if self
                    .used
                    .compare_exchange(cur, cur + bytes, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    return Ok(());
                }
                continue;
            }
            if !self.evict_one(now) {
                return Err(StoreError::Full(format!(
                    "{cur} of {max} bytes held by live streams; {bytes} more requested"
                )));
            }
        }
    }

    /// Marks a stream finished by its End entry at `seq`: metadata `end`,
    /// retention countdown, and its key binding shortened to match.
    fn finish(&self, stream: StreamId, st: &mut StreamState, seq: Seq, outcome: &Outcome) {
        st.meta.end = Some((seq, outcome.clone()));
        st.expires_at = Instant::now() + self.opts.retention;
        lock(&self.queues)
            .finished
            .push_back((st.expires_at, stream));
        if let Some(key) = st.bound_key.clone() {
            if let Some(b) = lock(&self.keys).get_mut(&key) {
                if b.stream == stream {
                    b.expires_at = b.expires_at.min(st.expires_at);
                }
            }
        }
    }

    /// The stream's record if it exists and has not expired.
    fn alive(&self, stream: StreamId) -> Option<Arc<Mutex<StreamState>>> {
        self.get(stream).filter(|h| lock(h).alive(Instant::now()))
    }

    fn notify(&self, stream: StreamId, last: Seq) {
        if let Some(slot) = lock(&self.watchers).get(&stream) {
            slot.tx.send_modify(|v| *v = (*v).max(last.0));
        }
    }
}

/// Keeps one watcher's registration; dropping it unregisters.
struct WatchGuard {
    shared: Weak<Shared>,
    stream: StreamId,
}

impl Drop for WatchGuard {
    fn drop(&mut self) {
        let Some(shared) = self.shared.upgrade() else {
            return;
        };
        let mut watchers = lock(&shared.watchers);
        if let Some(slot) = watchers.get_mut(&self.stream) {
            slot.refs -= 1;
            if slot.refs == 0 {
                watchers.remove(&self.stream);
            }
        }
    }
}

impl MemoryStore {
    /// [`Store::append`], and with `checks` [`Store::append_checked`]: the
    /// checks and the append under the stream's lock.
    fn append_inner(
        &self,
        stream: StreamId,
        entries: &[Entry],
        checks: Option<&WriterChecks>,
    ) -> Result<Checked, StoreError> {
        let s = &self.shared;
        let Some(last) = entries.last() else {
            return Ok(Checked::Appended);
        };
        validate_batch(stream, entries)?;
        let bytes: usize = entries.iter().map(entry_bytes).sum();
        // Reserve before taking the stream's lock: eviction locks other streams.
        s.reserve(bytes)?;
        let conflict = |detail: String| StoreError::Conflict { stream, detail };

        let Some(handle) = s.get(stream) else {
            s.release(bytes);
            return Err(conflict("unknown or expired stream".into()));
        };
        let now = Instant::now();
        let mut st = lock(&handle);
        let stored = st.entries.last().map_or(0, |e| e.last_seq().0);
        let refused = match checks {
            Some(c) if st.alive(now) => st.writers.check(c, st.meta.end.is_some()),
            _ => None,
        };
        if let Some(refused) = refused {
            drop(st);
            s.release(bytes);
            return Ok(refused);
        }
        let check = if !st.alive(now) {
            Err(conflict("unknown or expired stream".into()))
        } else if st.meta.end.is_some() {
            Err(conflict("stream already ended".into()))
        } else if entries[0].seq.0 != stored + 1 {
            Err(conflict(format!(
                "append at seq {} but the last stored seq is {stored}",
                entries[0].seq
            )))
        } else {
            Ok(())
        };
        if let Err(e) = check {
            drop(st);
            s.release(bytes);
            return Err(e);
        }

        st.entries.extend_from_slice(entries);
        st.bytes += bytes;
        if entries
            .iter()
            .any(|e| matches!(e.body, EntryBody::Gap { .. }))
        {
            st.meta.lost_history = true;
        }
        let closing = matches!(last.body, EntryBody::End(_));
        if let Some(c) = checks {
            st.writers.commit(c, closing);
        }
        if let EntryBody::End(outcome) = &last.body {
            s.finish(stream, &mut st, last.seq, outcome);
        }
        drop(st);
        s.notify(stream, last.last_seq());
        Ok(Checked::Appended)
    }
}

#[async_trait]
impl Store for MemoryStore {
    fn kind(&self) -> &'static str {
        "memory"
    }

    async fn create(&self, meta: &StreamMeta) -> Result<(), StoreError> {
        let s = &self.shared;
        let bytes = meta_bytes(meta);
        s.reserve(bytes)?;
        let now = Instant::now();
        let expires_at = now + s.live_ttl();
        let state = StreamState {
            meta: meta.clone(),
            entries: Vec::new(),
            bytes,
            expires_at,
            bound_key: None,
            removed: false,
            writers: Writers::default(),
        };
        // Creating an id that exists replaces the record, entries included.
        s.remove_if(meta.id, |_| true);
        let previous = s
            .streams
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(meta.id, Arc::new(Mutex::new(state)));
        if let Some(prev) = previous {
            // Lost a race with another create of the same id: account for it.
            let mut st = lock(&prev);
            if !st.removed {
                st.removed = true;
                let freed = std::mem::take(&mut st.bytes);
                drop(st);
                s.release(freed);
            }
        }
        lock(&s.queues).live.push_back((expires_at, meta.id));
        Ok(())
    }

    async fn append(&self, stream: StreamId, entries: &[Entry]) -> Result<(), StoreError> {
        self.append_inner(stream, entries, None).map(|_| ())
    }

    async fn start(
        &self,
        meta: &StreamMeta,
        key: Option<&KeyRef>,
        entries: &[Entry],
    ) -> Result<Written, StoreError> {
        self.create(meta).await?;
        if let Some(key) = key {
            self.bind_key(key, meta.id).await?;
        }
        self.append_inner(meta.id, entries, None)?;
        Ok(self.written(meta.id))
    }

    async fn append_at(
        &self,
        stream: StreamId,
        records: u64,
        entries: &[Entry],
    ) -> Result<Written, StoreError> {
        let held = self
            .shared
            .alive(stream)
            .map(|handle| lock(&handle).entries.len() as u64);
        let lost = |detail: String| StoreError::Lost { stream, detail };
        match held {
            None => return Err(lost("unknown or expired stream".into())),
            Some(held) if held < records => {
                return Err(lost(format!(
                    "the store holds {held} entries, the writer appended {records}"
                )))
            }
            Some(_) => {}
        }
        self.append_inner(stream, entries, None)?;
        Ok(self.written(stream))
    }

    async fn append_checked(
        &self,
        stream: StreamId,
        entries: &[Entry],
        checks: &WriterChecks,
    ) -> Result<Checked, StoreError> {
        self.append_inner(stream, entries, Some(checks))
    }

    async fn sliding_expiry(
        &self,
        stream: StreamId,
        now_ms: u64,
        window_ms: u64,
        touch: bool,
    ) -> Result<bool, StoreError> {
        let Some(handle) = self.shared.alive(stream) else {
            return Ok(false);
        };
        let mut st = lock(&handle);
        let last = st.writers.accessed_ms.unwrap_or(st.meta.created_ms);
        if last.saturating_add(window_ms) <= now_ms {
            return Ok(false);
        }
        if touch {
            st.writers.accessed_ms = Some(now_ms.max(last));
        }
        Ok(true)
    }

    async fn last_seq(&self, stream: StreamId) -> Result<Seq, StoreError> {
        let Some(handle) = self.shared.alive(stream) else {
            return Ok(Seq::ZERO);
        };
        let st = lock(&handle);
        Ok(st.entries.last().map_or(Seq::ZERO, Entry::last_seq))
    }

    async fn meta(&self, stream: StreamId) -> Result<Option<StreamMeta>, StoreError> {
        let Some(handle) = self.shared.get(stream) else {
            return Ok(None);
        };
        let st = lock(&handle);
        Ok(st.alive(Instant::now()).then(|| st.meta.clone()))
    }

    async fn read(
        &self,
        stream: StreamId,
        after: Seq,
        limit: usize,
    ) -> Result<Vec<Entry>, StoreError> {
        let Some(handle) = self.shared.get(stream) else {
            return Ok(Vec::new());
        };
        let st = lock(&handle);
        if !st.alive(Instant::now()) {
            return Ok(Vec::new());
        }
        // Entries are in seq order and so is their last covered seq: skip
        // those that end at or before `after` (a gap containing `after` stays).
        let start = st.entries.partition_point(|e| e.last_seq() <= after);
        let end = start.saturating_add(limit).min(st.entries.len());
        Ok(st.entries[start..end].to_vec())
    }

    async fn bind_key(&self, key: &KeyRef, stream: StreamId) -> Result<(), StoreError> {
        let s = &self.shared;
        let expires_at = Instant::now() + s.live_ttl();
        lock(&s.keys).insert(key.clone(), Binding { stream, expires_at });
        if let Some(handle) = s.get(stream) {
            lock(&handle).bound_key = Some(key.clone());
        }
        Ok(())
    }

    async fn claim_key(
        &self,
        key: &KeyRef,
        stream: StreamId,
    ) -> Result<Option<StreamId>, StoreError> {
        let s = &self.shared;
        let now = Instant::now();
        {
            // Check and set under one lock: concurrent claims serialize here.
            let mut keys = lock(&s.keys);
            if let Some(b) = keys.get(key).filter(|b| b.expires_at > now) {
                return Ok(Some(b.stream));
            }
            let expires_at = now + s.live_ttl();
            keys.insert(key.clone(), Binding { stream, expires_at });
        }
        if let Some(handle) = s.get(stream) {
            lock(&handle).bound_key = Some(key.clone());
        }
        Ok(None)
    }

    async fn release_key(&self, key: &KeyRef, stream: StreamId) -> Result<(), StoreError> {
        let mut keys = lock(&self.shared.keys);
        if keys.get(key).is_some_and(|b| b.stream == stream) {
            keys.remove(key);
        }
        Ok(())
    }

    async fn resolve_key(&self, key: &KeyRef) -> Result<Option<StreamId>, StoreError> {
        let now = Instant::now();
        Ok(lock(&self.shared.keys)
            .get(key)
            .filter(|b| b.expires_at > now)
            .map(|b| b.stream))
    }

    async fn renew_lease(
        &self,
        stream: StreamId,
        owner: &str,
        now_ms: u64,
        until_ms: u64,
    ) -> Result<LeaseRenewal, StoreError> {
        let conflict = |detail: String| StoreError::Conflict { stream, detail };
        let Some(handle) = self.shared.alive(stream) else {
            return Err(conflict("unknown or expired stream".into()));
        };
        let mut st = lock(&handle);
        // Checked again under the lock: it may have expired or been replaced.
        if !st.alive(Instant::now()) {
            return Err(conflict("unknown or expired stream".into()));
        }
        if st.meta.end.is_some() {
            return Err(conflict("stream already ended".into()));
        }
        if let (Some(other), Some(until)) = (&st.meta.lease_owner, st.meta.lease_until_ms) {
            if other != owner && until >= now_ms {
                return Err(conflict(format!("leased by {other:?} until {until}")));
            }
        }
        st.meta.lease_owner = Some(owner.to_string());
        st.meta.lease_until_ms = Some(until_ms);
        Ok(LeaseRenewal {
            cancel_requested: st.meta.cancel_requested,
        })
    }

    async fn set_signals(&self, stream: StreamId, signals: Dialect) -> Result<(), StoreError> {
        if let Some(handle) = self.shared.alive(stream) {
            let mut st = lock(&handle);
            if st.alive(Instant::now()) {
                st.meta.signals = Some(signals);
            }
        }
        Ok(())
    }

    async fn request_cancel(&self, stream: StreamId) -> Result<bool, StoreError> {
        let Some(handle) = self.shared.alive(stream) else {
            return Ok(false);
        };
        let mut st = lock(&handle);
        if !st.alive(Instant::now()) {
            return Ok(false);
        }
        st.meta.cancel_requested = true;
        Ok(true)
    }

    async fn end_if_abandoned(
        &self,
        stream: StreamId,
        now_ms: u64,
        outcome: &Outcome,
    ) -> Result<Option<Seq>, StoreError> {
        let s = &self.shared;
        let Some(handle) = s.alive(stream) else {
            return Ok(None);
        };
        let abandoned = |st: &StreamState| {
            st.alive(Instant::now())
                && st.meta.end.is_none()
                && st.meta.lease_until_ms.is_some_and(|until| until < now_ms)
        };
        // Cheap check first, so a valid lease costs no reservation.
        if !abandoned(&lock(&handle)) {
            return Ok(None);
        }
        let probe = Entry {
            seq: Seq::ZERO,
            body: EntryBody::End(outcome.clone()),
        };
        let bytes = entry_bytes(&probe);
        // Reserve before taking the stream's lock: eviction locks other streams.
        s.reserve(bytes)?;
        let mut st = lock(&handle);
        // Decided again under the lock: a renewal or an append may have come in.
        if !abandoned(&st) {
            drop(st);
            s.release(bytes);
            return Ok(None);
        }
        let seq = Seq(st.entries.last().map_or(0, |e| e.last_seq().0) + 1);
        st.entries.push(Entry {
            seq,
            body: EntryBody::End(outcome.clone()),
        });
        st.bytes += bytes;
        s.finish(stream, &mut st, seq, outcome);
        drop(st);
        s.notify(stream, seq);
        Ok(Some(seq))
    }

    async fn watch(&self, stream: StreamId) -> Result<Watcher, StoreError> {
        let rx = {
            let mut watchers = lock(&self.shared.watchers);
            let slot = watchers.entry(stream).or_insert_with(|| WatchSlot {
                tx: watch::Sender::new(0),
                refs: 0,
            });
            slot.refs += 1;
            slot.tx.subscribe()
        };
        let guard = WatchGuard {
            shared: Arc::downgrade(&self.shared),
            stream,
        };
        Ok(Watcher::new(rx, Some(Box::new(guard))))
    }

    async fn ping(&self) -> Result<Duration, StoreError> {
        Ok(Duration::ZERO)
    }
}
