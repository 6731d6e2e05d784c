//! A Durable Stream in the store: its name is a key binding (route
//! `#durable`) to a store stream whose metadata holds the stream's
//! configuration (content type, TTL, expiry) and whose entries are its
//! messages, one `Event` entry each; closing appends the `End` entry.
//! Every backend (Redis, Redis Cluster, embedded) serves it through the
//! [`Store`](reprise_store::Store) trait. Used by the read and write handlers.

use reprise_core::{Epoch, Outcome, Seq, StreamId};
use reprise_store::{
    Checked, Entry, EntryBody, KeyRef, Store, StoreError, StreamMeta, WriterChecks,
};

use super::error::DsError;

/// The route name of Durable Streams key bindings (route paths start with
/// `/`, so it cannot collide with one).
const ROUTE: &str = "#durable";
/// `StreamMeta::format` of a Durable Stream.
pub const FORMAT: &str = "durable";
/// Attempts of an append that lost a race with another writer.
const APPEND_ATTEMPTS: usize = 16;

/// A stream's configuration, fixed at creation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    pub content_type: String,
    /// `Stream-TTL`, seconds.
    pub ttl_secs: Option<u64>,
    /// `Stream-Expires-At`, as given (RFC 3339).
    pub expires_at: Option<String>,
}

impl Settings {
    /// Whether messages are JSON values (the protocol's JSON mode).
    pub fn is_json(&self) -> bool {
        essence(&self.content_type) == "application/json"
    }
}

/// The media type without parameters, lower case.
pub fn essence(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

/// A stream found by name.
#[derive(Clone, Debug)]
pub struct Found {
    pub id: StreamId,
    pub settings: Settings,
    pub created_ms: u64,
    /// The `End` entry's seq, once closed.
    pub closed_at: Option<Seq>,
}

impl Found {
    /// `Stream-Expires-At` in milliseconds since the Unix epoch. (A
    /// `Stream-TTL` slides: the store keeps the last access, see [`find`].)
    pub fn expires_at_ms(&self) -> Option<u64> {
        self.settings
            .expires_at
            .as_deref()
            .and_then(|s| humantime::parse_rfc3339_weak(s).ok())
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_millis() as u64)
    }

    pub fn closed(&self) -> bool {
        self.closed_at.is_some()
    }
}

fn key(name: &str) -> KeyRef {
    KeyRef {
        route: ROUTE.into(),
        key: name.into(),
    }
}

fn settings_of(meta: &StreamMeta) -> Settings {
    let get = |n: &str| {
        meta.headers
            .iter()
            .find(|(k, _)| k == n)
            .map(|(_, v)| v.clone())
    };
    Settings {
        content_type: get("content-type").unwrap_or_else(|| "application/octet-stream".into()),
        ttl_secs: get("stream-ttl").and_then(|v| v.parse().ok()),
        expires_at: get("stream-expires-at"),
    }
}

/// The stream named `name`, if it exists and has not expired; an access
/// that extends a `Stream-TTL` (reads and writes do, the protocol says).
pub async fn find(store: &dyn Store, name: &str, now_ms: u64) -> Result<Option<Found>, DsError> {
    lookup(store, name, now_ms, true).await
}

/// [`find`] without extending a `Stream-TTL` (`HEAD`, create, delete).
pub async fn peek(store: &dyn Store, name: &str, now_ms: u64) -> Result<Option<Found>, DsError> {
    lookup(store, name, now_ms, false).await
}

async fn lookup(
    store: &dyn Store,
    name: &str,
    now_ms: u64,
    touch: bool,
) -> Result<Option<Found>, DsError> {
    let Some(id) = store.resolve_key(&key(name)).await? else {
        return Ok(None);
    };
    found(store, id, now_ms, touch).await
}

async fn found(
    store: &dyn Store,
    id: StreamId,
    now_ms: u64,
    touch: bool,
) -> Result<Option<Found>, DsError> {
    let Some(meta) = store.meta(id).await? else {
        return Ok(None);
    };
    if meta.format != FORMAT {
        return Ok(None);
    }
    let f = Found {
        id,
        settings: settings_of(&meta),
        created_ms: meta.created_ms,
        closed_at: meta.end.map(|(seq, _)| seq),
    };
    if f.expires_at_ms().is_some_and(|e| e <= now_ms) {
        return Ok(None);
    }
    if let Some(ttl) = f.settings.ttl_secs {
        let window = ttl.saturating_mul(1000);
        if !store.sliding_expiry(id, now_ms, window, touch).await? {
            return Ok(None);
        }
    }
    Ok(Some(f))
}

/// What [`create`] did.
pub enum Created {
    /// A new stream.
    New(Found),
    /// The name was already taken by this stream (its settings may differ).
    Existing(Found),
}

/// Creates the stream `name` unless it exists.
pub async fn create(
    store: &dyn Store,
    name: &str,
    settings: &Settings,
    now_ms: u64,
) -> Result<Created, DsError> {
    if let Some(f) = peek(store, name, now_ms).await? {
        return Ok(Created::Existing(f));
    }
    let id = StreamId::random();
    let mut headers = vec![("content-type".to_string(), settings.content_type.clone())];
    if let Some(t) = settings.ttl_secs {
        headers.push(("stream-ttl".into(), t.to_string()));
    }
    if let Some(e) = &settings.expires_at {
        headers.push(("stream-expires-at".into(), e.clone()));
    }
    let meta = StreamMeta {
        headers,
        ..StreamMeta::new(id, Epoch::random(), ROUTE, FORMAT, now_ms)
    };
    store.create(&meta).await?;
    // A binding left by an expired or deleted stream is replaced; a live one
    // taken meanwhile by a concurrent create wins.
    let k = key(name);
    loop {
        match store.claim_key(&k, id).await? {
            None => break,
            Some(other) if other == id => break,
            Some(other) => match found(store, other, now_ms, false).await? {
                Some(f) => return Ok(Created::Existing(f)),
                None => {
                    store.release_key(&k, other).await?;
                }
            },
        }
    }
    Ok(Created::New(Found {
        id,
        settings: settings.clone(),
        created_ms: now_ms,
        closed_at: None,
    }))
}

/// Removes the name (readers then get `404`) and closes the stream, so
/// that live readers stop.
pub async fn delete(store: &dyn Store, name: &str, f: &Found) -> Result<(), DsError> {
    store.release_key(&key(name), f.id).await?;
    if !f.closed() {
        // Best effort: a concurrent close may have ended it already.
        let _ = append(
            store,
            f.id,
            &[],
            Some(Outcome::Cancelled),
            &WriterChecks::default(),
        )
        .await;
    }
    Ok(())
}

/// The seq of the last message (`Seq::ZERO` if none).
pub async fn tail(store: &dyn Store, f: &Found) -> Result<Seq, DsError> {
    match f.closed_at {
        Some(end) => Ok(Seq(end.0.saturating_sub(1))),
        None => {
            let last = store.last_seq(f.id).await?;
            // Closed since it was found: the last entry is the End.
            match store.meta(f.id).await?.and_then(|m| m.end) {
                Some((end, _)) if end == last => Ok(Seq(last.0.saturating_sub(1))),
                _ => Ok(last),
            }
        }
    }
}

/// What [`append`] did.
#[derive(Debug)]
pub enum Appended {
    /// The messages are stored; the seq of the last message.
    Stored(Seq),
    /// The stream was closed before (nothing written); its last message.
    WasClosed(Seq),
    /// A retry of an idempotent producer's append (nothing written): its
    /// highest accepted seq, and the last message if the stream is closed
    /// (by that very append).
    Duplicate {
        producer_seq: u64,
        closed_at: Option<Seq>,
    },
    /// A writer check refused it (nothing written): a stale producer
    /// epoch, a producer seq gap, a `Stream-Seq` regression.
    Refused(Checked),
}

/// Appends `messages` after the stream's last entry, and the `End` entry
/// if `close` is given, as one batch, if the writer `checks` pass (checked
/// and written atomically by the store); retries when another writer got
/// in first.
pub async fn append(
    store: &dyn Store,
    id: StreamId,
    messages: &[bytes::Bytes],
    close: Option<Outcome>,
    checks: &WriterChecks,
) -> Result<Appended, DsError> {
    for _ in 0..APPEND_ATTEMPTS {
        let last = store.last_seq(id).await?;
        let mut seq = last;
        let mut entries = Vec::with_capacity(messages.len() + 1);
        for m in messages {
            seq = seq.next();
            entries.push(Entry {
                seq,
                body: EntryBody::Event(m.clone()),
            });
        }
        if let Some(outcome) = &close {
            entries.push(Entry {
                seq: seq.next(),
                body: EntryBody::End(outcome.clone()),
            });
        }
        if entries.is_empty() {
            return Ok(Appended::Stored(last));
        }
        match store.append_checked(id, &entries, checks).await {
            Ok(Checked::Appended) => return Ok(Appended::Stored(seq)),
            Ok(Checked::Ended) => return Ok(Appended::WasClosed(closed_tail(store, id).await?)),
            Ok(Checked::Duplicate { last_seq, closed }) => {
                let closed_at = match closed {
                    true => Some(closed_tail(store, id).await?),
                    false => None,
                };
                return Ok(Appended::Duplicate {
                    producer_seq: last_seq,
                    closed_at,
                });
            }
            Ok(refused) => return Ok(Appended::Refused(refused)),
            Err(StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(DsError::Conflict {
        message: "too many concurrent appends".into(),
        closed: false,
    })
}

/// The last message of a closed stream (the seq before its `End`).
async fn closed_tail(store: &dyn Store, id: StreamId) -> Result<Seq, DsError> {
    let end = store.meta(id).await?.and_then(|m| m.end);
    Ok(Seq(end.map_or(0, |(seq, _)| seq.0.saturating_sub(1))))
}
