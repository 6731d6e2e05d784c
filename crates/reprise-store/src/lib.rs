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

use reprise_core::{Epoch, Outcome, Seq, StreamId};

pub mod memory;
pub mod redis;

pub use memory::{MemoryLimits, MemoryStore};
pub use redis::{RedisOptions, RedisStore};

/// Errors of the store layer.
#[derive(Debug, thiserror::Error)]
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

    /// Point `key` at `stream` (the latest stream for a key wins).
    async fn bind_key(&self, key: &KeyRef, stream: StreamId) -> Result<(), StoreError>;

    /// The stream `key` points at, if any.
    async fn resolve_key(&self, key: &KeyRef) -> Result<Option<StreamId>, StoreError>;

    /// Watch a stream for appends (see [`Watcher`]).
    async fn watch(&self, stream: StreamId) -> Result<Watcher, StoreError>;

    /// Round trip to the backend, for readiness checks.
    async fn ping(&self) -> Result<Duration, StoreError>;
}
