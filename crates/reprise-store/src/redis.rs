//! The Redis backend: streams kept in Redis (or Valkey) 7+, standalone or
//! cluster, through fred.
//!
//! The producer's appends, the readers' replays and the live tails' wake-ups
//! of every relay instance meet here, so any instance can serve any resume.
//!
//! # Key layout
//!
//! With `P` the configured `key_prefix` and `<sid>` the stream id (22 URL-safe
//! characters), every key of one stream carries the hash tag `{<sid>}` so that
//! they live in one cluster slot and one function call can touch them all:
//!
//! | key | type | content |
//! |-----|------|---------|
//! | `P{<sid>}:m` | hash | metadata: `id`, `epoch`, `created_ms`, `route`, `format`, `headers` (JSON), `end` (JSON `[seq, outcome]`, once finished), `k` (name of the key binding pointing here, if any), `gaps` (number of gap entries, if any: the stream has lost history), `lease_owner` and `lease_until_ms` (the producer lease, if any), `cancel` (`1` once a cancel was requested), `signals` (the dialect of in-band signals, once decided; absent means `reprise`) |
//! | `P{<sid>}:e` | stream | Redis stream entries with explicit ids `<seq>-0`, the last seq each covers, and one field: `p` = a **pack** of consecutive events (see below), `e` = one event's bytes, `g` = first seq of a gap (see below), or, for the terminal entry, `f` = JSON `[seq, outcome]` under the largest possible id (see below) |
//! | `P{<sid>}:n` | shard channel | `SPUBLISH`ed after every append: the last seq covered |
//! | `P{<sid>}:w` | hash | Durable Streams writer state (`append_checked`, `sliding_expiry`) |
//! | `Pk:<b64(route)>:<b64(key)>` | string | key binding: the latest stream id for that route and key (unpadded base64url, so any bytes are safe and routes cannot collide with keys) |
//!
//! A gap entry covering seqs `S..=U` ([`EntryBody::Gap`]) is stored under
//! the id `<U>-0` (its *last* seq) with field `g` = `S`. So the id of every
//! Redis entry is the last seq it covers, and ids stay strictly increasing:
//! the append function's "last stored seq" is simply the top id, and
//! `XRANGE <after+1>-0 +` returns exactly the entries whose last covered seq
//! is greater than `after`, including a gap that contains `after`. A read
//! needs no second command to find a gap that started before its position.
//!
//! The terminal entry (an end, a failure, `producer_lost`) is stored under
//! the largest id a Redis stream entry can have,
//! `18446744073709551615-18446744073709551615`, with its seq in its value:
//! any later `XADD` fails ("equal or smaller than the target stream top
//! item", or "exhausted the last possible ID"), so a stale writer — one
//! whose stream another instance ended with `end_if_abandoned` — cannot
//! add entries after it, even with plain `XADD`s that check nothing else
//! (a fence). Reads decode it wherever they meet it; `XRANGE <after+1>-0 +`
//! always returns it last.
//!
//! A pack holds up to [`PACK_MAX`] consecutive events of one append, each
//! as a 4-byte big-endian length and its bytes, under the id of its last
//! event; its first seq is that minus the number of events plus one. Packing
//! makes an append of N events cost about N / 128 `XADD`s instead of N. Event
//! ids stay exact per event: a read positioned inside a pack gets the pack
//! (its id is past the position) and drops the events up to the position.
//!
//! Lifetimes: metadata and entries expire `max_stream_duration + retention`
//! after creation while live, and `retention` after the end. A binding
//! expires `max_stream_duration + retention` after it was set; when its stream
//! ends it is shortened to `retention` if it still points there.
//!
//! # Commands
//!
//! The relay's writer ([`Store::start`](crate::Store::start) and
//! [`Store::append_at`](crate::Store::append_at)) runs no function for
//! events. `start` is one pipeline in the stream's slot — `DEL` of what the
//! store held of the stream, `HSET` of the metadata (with `k`, the key
//! binding), `PEXPIRE`, an `XADD` per record, `PEXPIRE` of the entries,
//! `XLEN`, `SPUBLISH` — and, when a key is bound, a `SET … PX` of the
//! binding (another slot) at the same time. `append_at` of events is one
//! pipeline: `XADD key NOMKSTREAM <id> …` per record (ids are seqs, so an
//! append applied twice or after the terminal entry fails), `XLEN`,
//! `SPUBLISH`. The store lost the stream if an `XADD NOMKSTREAM` finds no
//! stream or `XLEN` is below the records the writer appended
//! ([`StoreError::Lost`](crate::StoreError::Lost)). A batch holding a gap
//! or the end is one `FCALL` of the library's `append_at`, which checks the
//! same (`EXISTS`, `XLEN`) and then runs `append`.
//!
//! `append` is one `FCALL` per batch (library [`LIBRARY_NAME`], loaded at
//! connect and again whenever a server answers that it is missing, e.g. after a
//! restart). The function checks that the stream exists and is not finished
//! (one `HMGET`) and that the batch starts right after the last stored seq
//! (`XREVRANGE … COUNT 1`), then runs one `XADD` per pack, gap or end, an
//! `HINCRBY … gaps` if the batch holds gaps, the expiry updates and one
//! `SPUBLISH` (of the last covered seq), atomically: a rejected batch
//! writes nothing. The batch itself (consecutive seqs, gaps not ending before
//! they start, the end last) is checked before sending, as the memory store
//! does. The batch that ends a stream costs one more round
//! trip when a key binding points at the stream (to shorten it; best effort).
//! fred pipelines `FCALL`s of concurrent appends on its pooled connections.
//!
//! `renew_lease`, `request_cancel` and `end_if_abandoned` are one `FCALL`
//! each, on the stream's keys only; `set_signals` one `EVAL` (an `HSET` if
//! the metadata exists), at most once per stream. `end_if_abandoned` checks the lease and
//! writes the End entry after the top id in the same call, so no append can
//! slip in between; like an ending append it sets `end`, shortens the TTLs,
//! `SPUBLISH`es, and costs one more round trip when a key binding points at
//! the stream.
//!
//! `create` (Durable Streams, tests) is one pipeline (`DEL` meta and
//! entries, `HSET`, `PEXPIRE`);
//! `read` one `XRANGE <after+1>-0 + COUNT <n>`, or a few when the entries
//! hold fewer events than asked for (it asks for 8 entries, then for as many
//! as the remaining events need at the pack size seen); `meta` one `HGETALL`;
//! `bind_key` a `SET … PX` and an `FCALL` noting the binding in the metadata,
//! concurrently; `claim_key` the same with `SET … NX GET` (a losing claim
//! notes the key too: harmless, since the end of a stream only shortens a
//! binding that still points at it); `resolve_key` one `GET`.
//!
//! Appends are sent with fred's fail-fast option and a single write attempt:
//! an append issued while disconnected fails at once with `Unavailable`
//! instead of being queued and replayed later behind the caller's back.
//!
//! Every command on a stream's or a binding's keys is sent through
//! [`routing`], which follows cluster redirections itself — including `ASK`
//! while a slot migrates, which fred 10.1 cannot follow — so appends, lease
//! renewals and resumes go on during a migration.
//!
//! # Connecting
//!
//! [`RedisStore::connect_with`] waits for the server and fails if it does not
//! answer. [`RedisStore::connect_lazy`] returns at once and connects in the
//! background (forever, with the reconnection backoff), so a relay can start
//! while Redis is down; until the first connection is up and the function
//! library loaded, every call fails at once with `Unavailable` without
//! touching the network. After that both behave the same.
//!
//! # Live tails
//!
//! One fred `SubscriberClient` per store, created at the first `watch`, holds one
//! `SSUBSCRIBE` per watched stream however many readers watch it. After that
//! connection comes back from any disconnection (a Redis restart, a failover)
//! every channel is subscribed again and every watcher is woken, because
//! notifications sent while disconnected are lost.
//!
//! # Files
//!
//! - [`connection`]: options, the pool and its supervisor, lazy connecting;
//! - [`ops`]: the [`Store`](crate::Store) operations and the commands each sends;
//! - [`codec`]: key names, metadata, packs and entries ↔ Redis values (no I/O);
//! - [`functions`] and `library.lua`: the function library the appends call;
//! - [`routing`]: keyed commands, following cluster redirections;
//! - [`notifier`]: live tails (`SSUBSCRIBE` per watched stream);
//! - [`limits`]: the rate limiter's counters;
//! - [`error`]: fred errors, library refusals and Redis's `XADD` refusals
//!   → `StoreError`.

mod codec;
mod connection;
mod error;
mod functions;
mod limits;
mod notifier;
mod ops;
mod routing;

pub use codec::PACK_MAX;
pub use connection::{RedisOptions, RedisStore};
pub use functions::LIBRARY_NAME;
pub use limits::RedisLimiter;

/// Locks a mutex of this backend's bookkeeping; a panic elsewhere leaves
/// maps that are still consistent, so poisoning is ignored.
fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
