//! The store: where recorded streams live between the producer that writes
//! them and the readers that resume them.
//!
//! One trait, [`Store`], with two backends that pass the same conformance
//! suite (`tests/store_conformance.rs`):
//! - [`redis::RedisStore`]: Redis or Valkey through fred, standalone or cluster;
//! - [`memory::MemoryStore`]: embedded, one process, bounded memory.
//!
//! A stream is: metadata (a small record written once at creation and updated
//! at the end), an append-only list of entries numbered by [`Seq`] from 1
//! whose last one is the terminal [`Outcome`], and optionally a key binding
//! (`route key → latest stream id`).
//!
//! Entries are numbered densely, but one entry may stand for several seqs: a
//! [`EntryBody::Gap`] records that a range of events was produced but could
//! not be stored (the store was unreachable for longer than the relay could
//! buffer). [`Entry::last_seq`] is the last seq an entry covers; the next
//! entry's seq follows it, and readers page with it.
#![forbid(unsafe_code)]

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use reprise_core::{Dialect, Epoch, Outcome, Seq, StreamId};

pub mod limits;
pub mod memory;
pub mod redis;
pub mod writers;

pub use limits::{Admission, LimitKind, Limiter, MemoryLimiter, RateLimits};
pub use memory::{MemoryLimits, MemoryStore};
pub use redis::{RedisOptions, RedisStore};
pub use writers::{Checked, ProducerClaim, WriterChecks};

/// Errors of the store layer.
#[derive(Debug, thiserror::Error, Clone)]
pub enum StoreError {
    /// The backend could not be reached or timed out: retrying later makes sense.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The backend answered something that is not a valid Reprise record.
    #[error("corrupt store record: {0}")]
    Corrupt(String),
    /// An append did not follow the stream's last entry (another writer, or
    /// a stream that was deleted while being written).
    #[error("append conflict on stream {stream}: {detail}")]
    Conflict { stream: StreamId, detail: String },
    /// A memory or size bound of the embedded store was hit.
    #[error("store full: {0}")]
    Full(String),
    /// The backend refused the configured credentials (Redis `WRONGPASS`,
    /// `NOAUTH`): a configuration error, which retrying does not mend.
    #[error("store refused the credentials: {0}")]
    AuthFailed(String),
    /// The store holds less of a stream than its writer appended (its
    /// metadata, or entries the writer was told were written, are gone: a
    /// failover to a replica lacking the last writes, a restart without
    /// persistence, a flush). Nothing of the failed call was kept; the
    /// writer starts the stream again ([`Store::start`]) and rewrites it.
    #[error("store lost stream {stream}: {detail}")]
    Lost { stream: StreamId, detail: String },
}

impl StoreError {
    /// Whether retrying the same call later can succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

/// What is known about a stream besides its entries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamMeta {
    pub id: StreamId,
    pub epoch: Epoch,
    /// Milliseconds since the Unix epoch.
    pub created_ms: u64,
    /// The route path (config `routes[].path`) that produced the stream.
    pub route: String,
    /// Response headers replayed to resuming readers (content type, AI SDK
    /// headers), lower-case names.
    pub headers: Vec<(String, String)>,
    /// Entry format: `sse` or `ndjson`.
    pub format: String,
    /// Set once the terminal entry is written: its seq and the outcome.
    pub end: Option<(Seq, Outcome)>,
    /// Whether some of the stream's history is missing: set by the first
    /// [`EntryBody::Gap`] appended, never cleared (re-creating the stream
    /// replaces it).
    #[serde(default)]
    pub lost_history: bool,
    /// The instance (its id) whose producer holds the stream's lease, if any
    /// (see [`Store::renew_lease`]). Appends do not check it: the fence
    /// against a stale producer is the End entry of
    /// [`Store::end_if_abandoned`].
    #[serde(default)]
    pub lease_owner: Option<String>,
    /// Until when the lease is valid, in milliseconds since the Unix epoch.
    /// After that another instance may take it over or end the stream as
    /// abandoned ([`Store::end_if_abandoned`]).
    #[serde(default)]
    pub lease_until_ms: Option<u64>,
    /// Set by [`Store::request_cancel`]; the producer learns it at its next
    /// renewal. Never cleared (re-creating the stream replaces it).
    #[serde(default)]
    pub cancel_requested: bool,
    /// Keyed hash (HMAC) identifying the caller that started the stream, if
    /// the route checks callers; never the credential itself.
    #[serde(default)]
    pub caller: Option<String>,
    /// The dialect of the stream's in-band signals, once its producer has
    /// decided it (at creation, or with [`Store::set_signals`] after its
    /// first events). `None` (also for records written before dialects
    /// existed) means `reprise`. Every instance renders a failure, a gap or
    /// `history_lost` of the stream in this dialect.
    #[serde(default)]
    pub signals: Option<Dialect>,
}

impl StreamMeta {
    /// A stream just started: its identity, route, entry format and start
    /// time; nothing else known yet (no headers, end, lease, cancel request
    /// or caller; dialect undecided). Set the rest with struct update syntax.
    pub fn new(
        id: StreamId,
        epoch: Epoch,
        route: impl Into<String>,
        format: impl Into<String>,
        created_ms: u64,
    ) -> StreamMeta {
        StreamMeta {
            id,
            epoch,
            created_ms,
            route: route.into(),
            headers: Vec::new(),
            format: format.into(),
            end: None,
            lost_history: false,
            lease_owner: None,
            lease_until_ms: None,
            cancel_requested: false,
            caller: None,
            signals: None,
        }
    }
}

/// Where a stream stands in the store after a successful [`Store::start`]
/// or [`Store::append_at`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Written {
    /// The last seq the stream's stored entries cover.
    pub last: Seq,
    /// How many records the backend holds for the stream's entries (a
    /// backend may store several entries in one record): the writer hands it
    /// back to the next [`Store::append_at`], which reports
    /// [`StoreError::Lost`] if the store holds fewer. `0` means unknown (no
    /// check).
    pub records: u64,
}

/// What a successful [`Store::renew_lease`] tells the producer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct LeaseRenewal {
    /// Someone asked the stream to stop ([`Store::request_cancel`]).
    pub cancel_requested: bool,
}

/// What one entry holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EntryBody {
    /// One event, encoded as its wire fields without `id:` line or blank
    /// terminator (see `reprise_core::sse::encode_fields`).
    Event(Bytes),
    /// The terminal entry: always the last one of a stream.
    End(Outcome),
    /// Entries `seq..=upto` (this entry's seq through `upto`) were recorded but
    /// could not be stored: a reader crossing them has lost history.
    Gap { upto: Seq },
}

/// One entry of a stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub seq: Seq,
    pub body: EntryBody,
}

impl Entry {
    /// The last seq this entry covers: `upto` for a [`EntryBody::Gap`], its
    /// own seq otherwise. The next entry of the stream has seq
    /// `last_seq() + 1`, and a reader that got this entry continues with
    /// `read(stream, entry.last_seq(), …)`.
    pub fn last_seq(&self) -> Seq {
        match self.body {
            EntryBody::Gap { upto } => upto,
            _ => self.seq,
        }
    }
}

/// A route key binding: `(route, key) → latest stream`. The key text is
/// opaque to the store; backends encode it so that it cannot inject into key
/// names.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct KeyRef {
    pub route: String,
    pub key: String,
}

/// Store-wide settings fixed at construction.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// Prefix of every Redis key (`reprise:`).
    pub key_prefix: String,
    /// How long a finished stream (and its key binding) stays resumable.
    pub retention: Duration,
    /// Upper bound of a stream's life while it is being written; records of a
    /// producer that vanished expire after this plus `retention`.
    pub max_stream_duration: Duration,
}

/// Wakes a live tail when entries may have been appended to a stream.
///
/// Notifications are hints: wake-ups may be spurious or coalesced, and a
/// reader must still read the store to learn what is new. Dropping the
/// watcher stops watching.
pub struct Watcher {
    rx: tokio::sync::watch::Receiver<u64>,
    _guard: Option<Box<dyn Send + Sync>>,
}

impl Watcher {
    pub fn new(rx: tokio::sync::watch::Receiver<u64>, guard: Option<Box<dyn Send + Sync>>) -> Self {
        Watcher { rx, _guard: guard }
    }

    /// Waits until a change may have happened since the last call. Returns
    /// immediately if the backend dropped the watch (the caller then polls).
    pub async fn changed(&mut self) {
        if self.rx.changed().await.is_err() {
            // Sender gone: never block forever, the caller's poll interval takes over.
            std::future::pending::<()>().await
        }
    }
}

/// The storage contract both backends implement.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// `"redis"` or `"memory"`, for logs and health.
    fn kind(&self) -> &'static str;

    /// Record a new stream's metadata. Its entries follow with [`Store::append`].
    async fn create(&self, meta: &StreamMeta) -> Result<(), StoreError>;

    /// Append entries, in order, each starting right after the last seq
    /// covered before it (see [`Entry::last_seq`]): the first one follows the
    /// last stored entry. An [`EntryBody::Gap`] must have `upto >= seq` and
    /// sets the metadata's `lost_history`. An [`EntryBody::End`] entry, if
    /// present, must be last; it marks the stream finished (metadata `end`)
    /// and starts its retention countdown. A batch that breaks any of this
    /// fails with [`StoreError::Conflict`] and writes nothing. Notifies
    /// watchers.
    async fn append(&self, stream: StreamId, entries: &[Entry]) -> Result<(), StoreError>;

    /// Starts (or starts again) a stream with its first entries, in one
    /// round trip: drops whatever the store holds of it, records `meta`,
    /// binds `key` to it if given, then appends `entries` (which may be
    /// empty) from seq 1 as [`Store::append`] does. The writer of a stream
    /// calls it instead of [`Store::create`] and [`Store::bind_key`] before
    /// its first append, so no store call waits before a response starts;
    /// and again after [`StoreError::Lost`], to rewrite the stream.
    async fn start(
        &self,
        meta: &StreamMeta,
        key: Option<&KeyRef>,
        entries: &[Entry],
    ) -> Result<Written, StoreError>;

    /// [`Store::append`] by the stream's writer, which knows how many
    /// `records` it left the stream with ([`Written::records`] of its last
    /// call, `0` for unknown). Fails with [`StoreError::Lost`], writing
    /// nothing, if the stream's metadata is gone or the store holds fewer
    /// records than that; with [`StoreError::Conflict`] if the batch starts
    /// at or before the last stored seq (an earlier append applied whose
    /// answer was lost), or the stream has ended (its terminal entry fences
    /// every later append). Unlike [`Store::append`], a batch that starts
    /// past the next seq is not refused by every backend (Redis appends
    /// events with `XADD` alone): the writer never skips.
    async fn append_at(
        &self,
        stream: StreamId,
        records: u64,
        entries: &[Entry],
    ) -> Result<Written, StoreError>;

    /// The stream's metadata, `None` if unknown or expired.
    async fn meta(&self, stream: StreamId) -> Result<Option<StreamMeta>, StoreError>;

    /// Up to `limit` entries that cover some seq greater than `after` (those
    /// whose [`Entry::last_seq`] is greater than `after`), in order. A gap
    /// counts as one entry; a reader positioned inside a gap
    /// (`seq <= after < upto`) gets that gap first, so it learns it crossed one.
    async fn read(
        &self,
        stream: StreamId,
        after: Seq,
        limit: usize,
    ) -> Result<Vec<Entry>, StoreError>;

    /// [`Store::append`] of `entries` if the stream's writer state lets
    /// `checks` through (see [`writers`]: idempotent producers and
    /// `Stream-Seq`), checked and written atomically (one Redis function
    /// call in the stream's slot, so also between Reprise instances). In
    /// order: an ended stream answers [`Checked::Ended`] (or
    /// [`Checked::Duplicate`] for a retry of the claim that ended it), then
    /// the producer rule, then `Stream-Seq`; a refusal writes nothing. Then
    /// the batch must follow the last stored entry as for
    /// [`Store::append`] (else [`StoreError::Conflict`]); once written, the
    /// producer's seq, the `Stream-Seq` and, if the batch ends the stream,
    /// the claim that ended it are recorded. The writer state lives and
    /// expires with the stream.
    async fn append_checked(
        &self,
        stream: StreamId,
        entries: &[Entry],
        checks: &WriterChecks,
    ) -> Result<Checked, StoreError>;

    /// A sliding expiry of `window_ms` after the stream's last access (its
    /// creation if never accessed): `false` if the stream is unknown or its
    /// window passed before `now_ms`; else `true`, and with `touch` the last
    /// access becomes `now_ms`. Atomic, shared by every instance.
    async fn sliding_expiry(
        &self,
        stream: StreamId,
        now_ms: u64,
        window_ms: u64,
        touch: bool,
    ) -> Result<bool, StoreError>;

    /// The last seq the stream's stored entries cover (`Seq::ZERO` if none).
    /// The default pages through [`Store::read`]; both backends answer it
    /// directly (Redis: the top entry id; embedded: the last entry).
    async fn last_seq(&self, stream: StreamId) -> Result<Seq, StoreError> {
        const PAGE: usize = 1000;
        let mut last = Seq::ZERO;
        loop {
            let page = self.read(stream, last, PAGE).await?;
            match page.last() {
                Some(e) => last = e.last_seq(),
                None => return Ok(last),
            }
            if page.len() < PAGE {
                return Ok(last);
            }
        }
    }

    /// Point `key` at `stream` (the latest stream for a key wins).
    async fn bind_key(&self, key: &KeyRef, stream: StreamId) -> Result<(), StoreError>;

    /// Bind `key` to `stream` only if it is not bound (an expired binding
    /// counts as unbound), with the same lifetime rules as
    /// [`Store::bind_key`]. Returns the stream it was already bound to
    /// (possibly `stream` itself), or `None` if this call bound it. Atomic: of
    /// concurrent claims of one key, exactly one gets `None`. This is how
    /// a retried request with an idempotency key finds the stream the first
    /// attempt started instead of starting another.
    async fn claim_key(
        &self,
        key: &KeyRef,
        stream: StreamId,
    ) -> Result<Option<StreamId>, StoreError>;

    /// Remove `key`'s binding if it still points at `stream` (a claim whose
    /// request never started its stream: an upstream error, a refusal), so
    /// that a retry with the same key calls the upstream at once instead of
    /// waiting for a stream that will never exist. A binding that has moved
    /// on to another stream is left alone.
    async fn release_key(&self, key: &KeyRef, stream: StreamId) -> Result<(), StoreError>;

    /// The stream `key` points at, if any.
    async fn resolve_key(&self, key: &KeyRef) -> Result<Option<StreamId>, StoreError>;

    /// Take or renew the producer lease of `stream` for `owner` (an instance
    /// id), valid until `until_ms` (ms since the Unix epoch). Succeeds if the
    /// stream is unowned, owned by `owner`, or its lease expired before
    /// `now_ms` (`lease_until_ms < now_ms`); fails with
    /// [`StoreError::Conflict`] if another owner holds an unexpired lease, or
    /// the stream is unknown or ended. Returns whether a cancel was requested.
    ///
    /// `now_ms` is the caller's clock: instances must agree on time to within
    /// a small fraction of the lease length.
    async fn renew_lease(
        &self,
        stream: StreamId,
        owner: &str,
        now_ms: u64,
        until_ms: u64,
    ) -> Result<LeaseRenewal, StoreError>;

    /// Record the dialect of the stream's in-band signals in its metadata
    /// ([`StreamMeta::signals`]). Does nothing if the stream is unknown or
    /// expired (it never creates a record). The producer calls it before
    /// appending anything after the event that decided the dialect, so a
    /// reader that got such an entry finds the dialect in the metadata.
    async fn set_signals(&self, stream: StreamId, signals: Dialect) -> Result<(), StoreError>;

    /// Ask the stream's producer to stop (it learns it at its next
    /// [`Store::renew_lease`]). Returns `false` if the stream is unknown or
    /// expired; `true` otherwise, also if it already ended.
    async fn request_cancel(&self, stream: StreamId) -> Result<bool, StoreError>;

    /// If the stream is not ended and has a lease that expired before
    /// `now_ms`, append `outcome` as its End entry right after the last
    /// stored entry, atomically, exactly as an [`Store::append`] of that
    /// entry would (metadata `end`, retention countdown, watchers notified),
    /// and return its seq. Otherwise (unknown, ended, lease still valid, or
    /// no lease at all) return `None` and write nothing.
    ///
    /// This is how another instance records `producer_lost` for a producer
    /// that died. The End entry makes every later append conflict, so a
    /// paused producer that wakes up can never add entries after it
    /// (fencing).
    async fn end_if_abandoned(
        &self,
        stream: StreamId,
        now_ms: u64,
        outcome: &Outcome,
    ) -> Result<Option<Seq>, StoreError>;

    /// A rate limiter whose counts every instance using this store shares
    /// (Redis), or `None` if the store is this process's own (embedded), in
    /// which case the relay counts in memory ([`MemoryLimiter`]). A wrapper
    /// around a store must pass this through.
    fn shared_limiter(&self) -> Option<std::sync::Arc<dyn Limiter>> {
        None
    }

    /// Watch a stream for appends (see [`Watcher`]).
    async fn watch(&self, stream: StreamId) -> Result<Watcher, StoreError>;

    /// Round trip to the backend, for readiness checks.
    async fn ping(&self) -> Result<Duration, StoreError>;

    /// Whether the backend's connections are up right now, as its client
    /// library sees them, without a round trip: `Some(false)` as soon as
    /// every connection dropped (a server killed or restarted), `None` if
    /// the backend cannot tell (embedded; a Redis Cluster, whose client
    /// reports its least healthy node). A stalled server still counts as
    /// connected: only [`Store::ping`] with a deadline finds that out. A
    /// wrapper around a store must pass this through.
    fn connected(&self) -> Option<bool> {
        None
    }
}
