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
//! | `P{<sid>}:m` | hash | metadata: `id`, `epoch`, `created_ms`, `route`, `format`, `headers` (JSON), `end` (JSON `[seq, outcome]`, once finished), `k` (name of the key binding pointing here, if any), `gaps` (number of gap entries, if any: the stream has lost history), `lease_owner` and `lease_until_ms` (the producer lease, if any), `cancel` (`1` once a cancel was requested) |
//! | `P{<sid>}:e` | stream | Redis stream entries with explicit ids `<seq>-0`, the last seq each covers, and one field: `p` = a **pack** of consecutive events (see below), `e` = one event's bytes, `x` = outcome JSON for the terminal entry, or `g` = first seq of a gap (see below) |
//! | `P{<sid>}:n` | shard channel | `SPUBLISH`ed after every append: the last seq covered |
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
//! each, on the stream's keys only. `end_if_abandoned` checks the lease and
//! writes the End entry after the top id in the same call, so no append can
//! slip in between; like an ending append it sets `end`, shortens the TTLs,
//! `SPUBLISH`es, and costs one more round trip when a key binding points at
//! the stream.
//!
//! `create` is one pipeline (`DEL` meta and entries, `HSET`, `PEXPIRE`);
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
//! One [`SubscriberClient`] per store, created at the first `watch`, holds one
//! `SSUBSCRIBE` per watched stream however many readers watch it. After that
//! connection comes back from any disconnection (a Redis restart, a failover)
//! every channel is subscribed again and every watcher is woken, because
//! notifications sent while disconnected are lost.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use fred::clients::{Pool, SubscriberClient};
use fred::error::{Error as FredError, ErrorKind};
use fred::prelude::*;
use fred::types::config::UnresponsiveConfig;
use fred::types::ConnectHandle;
use fred::types::Message;
use tokio::sync::{watch, OnceCell};
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::Instrument;

use reprise_core::{Epoch, Outcome, Seq, StreamId};

use crate::memory::validate_batch;

mod limits;
mod routing;
use crate::{
    Entry, EntryBody, KeyRef, LeaseRenewal, Store, StoreError, StoreOptions, StreamMeta, Watcher,
};
pub use limits::RedisLimiter;
use routing::{Cmd, Router};

/// Name of the Redis function library this version of Reprise loads. The
/// version suffix lets instances of two Reprise versions share one Redis
/// during a rolling upgrade.
///
/// Version 2: gap entries (field `g`, counted in the metadata's `gaps`).
/// Version 3: producer leases, cancel requests, ending abandoned streams.
/// Version 4: packed entries (field `p`, several events per Redis stream
/// entry), which version 3 readers cannot decode.
pub const LIBRARY_NAME: &str = "reprise_store_4";

const FN_APPEND: &str = "reprise_store_4_append";
const FN_NOTE_BINDING: &str = "reprise_store_4_note_binding";
const FN_END_BINDING: &str = "reprise_store_4_end_binding";
const FN_RENEW_LEASE: &str = "reprise_store_4_renew_lease";
const FN_REQUEST_CANCEL: &str = "reprise_store_4_request_cancel";
const FN_END_IF_ABANDONED: &str = "reprise_store_4_end_if_abandoned";

/// Deletes a key binding (KEYS[1]) only if it still holds ARGV[1], the
/// stream id whose claim is given back.
const RELEASE_KEY: &str =
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0";

/// How often the store looks for pooled clients whose connection task ended.
const SUPERVISE_INTERVAL: Duration = Duration::from_millis(50);

/// Error prefix the library uses for batches that do not follow the stream.
const CONFLICT_MARK: &str = "REPRISE_CONFLICT";

const LIBRARY: &str = r#"#!lua name=reprise_store_4

-- Append a batch of entries to a stream, atomically.
-- KEYS: metadata hash, entries stream, notification shard channel.
-- ARGV: first seq, last covered seq, live TTL ms, retention ms, end record
--       JSON or '', then for each entry: its id, its field name, its value.
--       Entry ids are the last seq each entry covers (a pack's last event,
--       a gap's `upto`); packs are built and unpacked by the relay.
-- Returns the key binding pointing at the stream when the batch ends it.
local function append(keys, args)
  local meta, entries, channel = keys[1], keys[2], keys[3]
  -- One lookup for both checks: every stream's metadata has an `id`.
  local state = redis.call('HMGET', meta, 'id', 'end')
  if not state[1] then
    return redis.error_reply('REPRISE_CONFLICT unknown or expired stream')
  end
  if state[2] then
    return redis.error_reply('REPRISE_CONFLICT stream already ended')
  end
  -- The top id is the last covered seq, a pack's or a gap's included.
  local stored = 0
  local top = redis.call('XREVRANGE', entries, '+', '-', 'COUNT', 1)
  if #top > 0 then
    stored = tonumber(string.match(top[1][1], '^(%d+)-'))
  end
  if stored + 1 ~= tonumber(args[1]) then
    return redis.error_reply('REPRISE_CONFLICT append at seq ' .. args[1] ..
      ' but the last stored seq is ' .. stored)
  end
  local gaps = 0
  for i = 6, #args, 3 do
    redis.call('XADD', entries, args[i], args[i + 1], args[i + 2])
    if args[i + 1] == 'g' then gaps = gaps + 1 end
  end
  if gaps > 0 then
    redis.call('HINCRBY', meta, 'gaps', gaps)
  end
  if stored == 0 then
    -- The entries expire with the metadata, whose life started at creation.
    local ttl = redis.call('PTTL', meta)
    if ttl <= 0 then ttl = args[3] end
    redis.call('PEXPIRE', entries, ttl)
  end
  local binding = false
  if args[5] ~= '' then
    redis.call('HSET', meta, 'end', args[5])
    redis.call('PEXPIRE', meta, args[4])
    redis.call('PEXPIRE', entries, args[4])
    binding = redis.call('HGET', meta, 'k')
  end
  redis.call('SPUBLISH', channel, args[2])
  return binding
end

-- Remember which key binding points at a stream, if the stream exists.
-- KEYS: metadata hash. ARGV: binding key name.
local function note_binding(keys, args)
  if redis.call('EXISTS', keys[1]) == 1 then
    redis.call('HSET', keys[1], 'k', args[1])
    return 1
  end
  return 0
end

-- Shorten a key binding to the retention if it still points at the stream.
-- KEYS: binding key. ARGV: stream id, retention ms.
local function end_binding(keys, args)
  if redis.call('GET', keys[1]) == args[1] then
    return redis.call('PEXPIRE', keys[1], args[2], 'LT')
  end
  return 0
end

-- Take or renew the producer lease.
-- KEYS: metadata hash. ARGV: owner, now ms, until ms.
-- Returns 1 if a cancel was requested, else 0.
local function renew_lease(keys, args)
  local meta = keys[1]
  if redis.call('EXISTS', meta) == 0 then
    return redis.error_reply('REPRISE_CONFLICT unknown or expired stream')
  end
  if redis.call('HEXISTS', meta, 'end') == 1 then
    return redis.error_reply('REPRISE_CONFLICT stream already ended')
  end
  local lease = redis.call('HMGET', meta, 'lease_owner', 'lease_until_ms')
  local owner, lease_until = lease[1], lease[2]
  if owner and lease_until and owner ~= args[1] and tonumber(lease_until) >= tonumber(args[2]) then
    return redis.error_reply('REPRISE_CONFLICT leased by ' .. owner .. ' until ' .. lease_until)
  end
  redis.call('HSET', meta, 'lease_owner', args[1], 'lease_until_ms', args[3])
  return redis.call('HEXISTS', meta, 'cancel')
end

-- Flag a cancel request for the stream's producer, if the stream exists.
-- KEYS: metadata hash. Returns 1 if it exists, else 0.
local function request_cancel(keys, args)
  if redis.call('EXISTS', keys[1]) == 0 then
    return 0
  end
  redis.call('HSET', keys[1], 'cancel', '1')
  return 1
end

-- End a stream whose lease expired, with an End entry after the last one.
-- KEYS: metadata hash, entries stream, notification shard channel.
-- ARGV: now ms, retention ms, outcome JSON.
-- Returns false if nothing was written, else {seq, key binding or ''}.
local function end_if_abandoned(keys, args)
  local meta, entries, channel = keys[1], keys[2], keys[3]
  if redis.call('EXISTS', meta) == 0 or redis.call('HEXISTS', meta, 'end') == 1 then
    return false
  end
  local lease_until = redis.call('HGET', meta, 'lease_until_ms')
  if not lease_until or tonumber(lease_until) >= tonumber(args[1]) then
    return false
  end
  local stored = 0
  local top = redis.call('XREVRANGE', entries, '+', '-', 'COUNT', 1)
  if #top > 0 then
    stored = tonumber(string.match(top[1][1], '^(%d+)-'))
  end
  local seq = string.format('%d', stored + 1)
  redis.call('XADD', entries, seq .. '-0', 'x', args[3])
  redis.call('HSET', meta, 'end', '[' .. seq .. ',' .. args[3] .. ']')
  redis.call('PEXPIRE', meta, args[2])
  redis.call('PEXPIRE', entries, args[2])
  redis.call('SPUBLISH', channel, seq)
  return {seq, redis.call('HGET', meta, 'k') or ''}
end

redis.register_function('reprise_store_4_append', append)
redis.register_function('reprise_store_4_renew_lease', renew_lease)
redis.register_function('reprise_store_4_request_cancel', request_cancel)
redis.register_function('reprise_store_4_end_if_abandoned', end_if_abandoned)
redis.register_function('reprise_store_4_note_binding', note_binding)
redis.register_function('reprise_store_4_end_binding', end_binding)
"#;

/// Connection settings of the Redis backend.
#[derive(Clone, Debug)]
pub struct RedisOptions {
    /// Connections used for commands (appends, reads, bindings).
    pub pool_size: usize,
    /// Bound of one TCP (and TLS) connection attempt, and with
    /// `command_timeout` of the whole [`RedisStore::connect`].
    pub connect_timeout: Duration,
    /// Bound of one command, queueing while reconnecting included. A connection
    /// that leaves a command unanswered for twice this is dropped and re-made.
    pub command_timeout: Duration,
    /// First delay between reconnection attempts after a connection is lost
    /// (or, with [`RedisStore::connect_lazy`], before it was ever made).
    /// Attempts never stop; the delay doubles up to `reconnect_max_delay`.
    pub reconnect_min_delay: Duration,
    /// Longest delay between reconnection attempts.
    pub reconnect_max_delay: Duration,
    /// Interval of the `PING` on the subscriber connection, which otherwise
    /// only receives and would not notice a silently dead peer.
    pub heartbeat_interval: Duration,
    /// Commands each pooled connection queues while disconnected before
    /// failing new ones with `Unavailable`.
    pub max_command_buffer: usize,
    /// Notifications buffered between the subscriber connection and the
    /// task that wakes watchers; when it overflows every watcher is woken.
    pub notification_buffer: usize,
    /// TLS settings replacing fred's default (system roots) for a
    /// `rediss://` URL, e.g. to trust a private CA. Ignored without TLS.
    pub tls: Option<fred::types::config::TlsConfig>,
}

impl Default for RedisOptions {
    fn default() -> Self {
        RedisOptions {
            pool_size: 4,
            connect_timeout: Duration::from_secs(5),
            command_timeout: Duration::from_secs(5),
            reconnect_min_delay: Duration::from_millis(100),
            reconnect_max_delay: Duration::from_secs(5),
            heartbeat_interval: Duration::from_secs(10),
            max_command_buffer: 100_000,
            notification_buffer: 4096,
            tls: None,
        }
    }
}

/// The Redis-backed [`Store`].
pub struct RedisStore {
    inner: Arc<Inner>,
    /// Cancels the background tasks (client shutdown, subscriber tasks) when
    /// the store is dropped.
    _shutdown: DropGuard,
}

struct Inner {
    pool: Pool,
    /// Builds the subscriber client with the same settings as the pool.
    builder: Builder,
    opts: StoreOptions,
    ropts: RedisOptions,
    /// Options of appends: fail fast when disconnected, never replay.
    write_opts: Options,
    /// Options of reads: fred's defaults (several attempts).
    read_opts: Options,
    /// Sends every keyed command, following cluster redirections (see
    /// [`routing`]).
    router: Router,
    /// The shared subscriber, created by the first `watch`.
    notifier: OnceCell<Arc<Notifier>>,
    /// Set once a connection is up and the function library loaded; until
    /// then (only with [`RedisStore::connect_lazy`]) calls fail at once.
    ready: AtomicBool,
    shutdown: CancellationToken,
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX).max(1)
}

fn b64(s: &str) -> String {
    URL_SAFE_NO_PAD.encode(s.as_bytes())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Maps a fred error to the store's error kinds.
fn map_err(e: FredError) -> StoreError {
    let details = e.details();
    match e.kind() {
        ErrorKind::Parse | ErrorKind::Protocol | ErrorKind::NotFound => {
            StoreError::Corrupt(e.to_string())
        }
        _ if details.starts_with("WRONGTYPE") => StoreError::Corrupt(e.to_string()),
        _ if details.starts_with("OOM") => StoreError::Full(e.to_string()),
        // IO, timeouts, cancellations while disconnected, cluster
        // reconfiguration, LOADING, and anything else the server refuses.
        _ => StoreError::Unavailable(e.to_string()),
    }
}

/// Maps a function's `REPRISE_CONFLICT …` refusal to [`StoreError::Conflict`],
/// anything else as [`map_err`] does.
fn conflict_or(stream: StreamId, e: FredError) -> StoreError {
    let details = e.details();
    match details.find(CONFLICT_MARK) {
        Some(at) => StoreError::Conflict {
            stream,
            detail: details[at + CONFLICT_MARK.len()..].trim().to_string(),
        },
        None => map_err(e),
    }
}

fn corrupt(what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(what.to_string())
}

struct StreamKeys {
    meta: String,
    entries: String,
    channel: String,
}

impl RedisStore {
    /// Connects with default [`RedisOptions`]. `url` uses fred's syntax:
    /// `redis://[user:pass@]host:port[/db]`, `rediss://…` (TLS),
    /// `redis-cluster://host:port?node=host:port&node=…`.
    ///
    /// Fails with [`StoreError::Unavailable`] if the server cannot be reached
    /// within the connect bound (see [`connect_lazy`](Self::connect_lazy) to
    /// start without it). Once connected, lost connections are re-made in the
    /// background forever.
    pub async fn connect(url: &str, opts: StoreOptions) -> Result<RedisStore, StoreError> {
        Self::connect_with(url, opts, RedisOptions::default()).await
    }

    /// Connects with explicit connection settings.
    pub async fn connect_with(
        url: &str,
        opts: StoreOptions,
        ropts: RedisOptions,
    ) -> Result<RedisStore, StoreError> {
        let builder = configure(url, &opts, &ropts)?;
        let pool = routing::without_redirections(&builder)
            .build_pool(ropts.pool_size.max(1))
            .map_err(map_err)?;
        // After an outage the pooled connections come back one by one: use
        // those already back rather than fail on one still reconnecting.
        pool.prefer_connected(true);

        let setup = async {
            // `fail_fast` (fred's default) makes a refused first connection an error, not a retry loop.
            let mut tasks = Vec::new();
            for c in pool.clients() {
                tasks.push(c.init().await?);
            }
            let () = pool.ping(None).await?;
            let _: Value = pool
                .next_connected()
                .function_load_cluster(true, LIBRARY)
                .await?;
            Ok::<Vec<ConnectHandle>, FredError>(tasks)
        };
        let bound = ropts
            .connect_timeout
            .saturating_mul(2)
            .saturating_add(ropts.command_timeout);
        let result = match tokio::time::timeout(bound, setup).await {
            Ok(Ok(tasks)) => Ok(tasks),
            Ok(Err(e)) => Err(StoreError::Unavailable(format!(
                "cannot connect to Redis: {e}"
            ))),
            Err(_) => Err(StoreError::Unavailable(format!(
                "cannot connect to Redis: no answer within {bound:?}"
            ))),
        };
        let tasks = match result {
            Ok(tasks) => tasks,
            Err(e) => {
                // Stop any connection attempt still running in the background.
                let pool = pool.clone();
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(Duration::from_secs(1), pool.quit()).await;
                });
                return Err(e);
            }
        };
        Ok(Self::assemble(pool, builder, opts, ropts, true, tasks))
    }

    /// Like [`connect_with`](Self::connect_with), but without waiting for the
    /// server: returns at once, and fails only on an invalid URL (with
    /// [`StoreError::Unavailable`], the URL never echoed).
    ///
    /// The store connects in the background and keeps trying forever, with
    /// the reconnection backoff of `ropts`. Until a connection is up and the
    /// function library is loaded, every call fails at once with
    /// [`StoreError::Unavailable`] (nothing is queued) and
    /// [`ping`](Store::ping) reports the same; from then on the store behaves
    /// exactly like one made by `connect_with`. Must be called within a tokio
    /// runtime.
    pub async fn connect_lazy(
        url: &str,
        opts: StoreOptions,
        ropts: RedisOptions,
    ) -> Result<RedisStore, StoreError> {
        let builder = configure(url, &opts, &ropts)?;
        // The first connection follows the reconnection policy instead of
        // failing. Only the pool's: the subscriber, made by the first `watch`
        // (which waits for `ready`), keeps failing fast like any call.
        let mut lazy = routing::without_redirections(&builder);
        lazy.with_config(|c| c.fail_fast = false);
        let pool = lazy.build_pool(ropts.pool_size.max(1)).map_err(map_err)?;
        pool.prefer_connected(true);
        let tasks = pool.connect_pool();
        let store = Self::assemble(pool, builder, opts, ropts, false, tasks);
        let token = store.inner.shutdown.child_token();
        tokio::spawn(
            become_ready(store.inner.clone(), token)
                .instrument(tracing::debug_span!("redis_store_connect")),
        );
        Ok(store)
    }

    /// Wraps a built pool into a store and starts its shutdown task, which
    /// closes the pool (and stops `tasks`, its connection tasks, if given)
    /// when the store is dropped.
    fn assemble(
        pool: Pool,
        builder: Builder,
        opts: StoreOptions,
        ropts: RedisOptions,
        ready: bool,
        tasks: Vec<ConnectHandle>,
    ) -> RedisStore {
        let shutdown = CancellationToken::new();
        let write_opts = Options {
            fail_fast: true,
            max_attempts: Some(1),
            ..Default::default()
        };
        let quit_bound = ropts.command_timeout;
        let inner = Arc::new(Inner {
            pool: pool.clone(),
            builder,
            opts,
            ropts,
            write_opts,
            read_opts: Options::default(),
            router: Router::new(pool.clone(), quit_bound),
            notifier: OnceCell::new(),
            ready: AtomicBool::new(ready),
            shutdown: shutdown.clone(),
        });
        tokio::spawn(
            {
                let token = shutdown.clone();
                async move {
                    let mut tasks = tasks;
                    // fred ends a client's connection task for good on some
                    // routing errors (e.g. `Max attempts reached` after an
                    // ASK during a slot migration), leaving the client
                    // disconnected forever: start such a task again.
                    let clients = pool.clients().to_vec();
                    loop {
                        tokio::select! {
                            _ = token.cancelled() => break,
                            _ = tokio::time::sleep(SUPERVISE_INTERVAL) => {}
                        }
                        if tasks.len() != clients.len() {
                            continue;
                        }
                        for (task, client) in tasks.iter_mut().zip(&clients) {
                            if task.is_finished() && !token.is_cancelled() {
                                tracing::warn!(
                                    client = %client.id(),
                                    "a Redis connection task ended; restarting it"
                                );
                                *task = client.connect();
                            }
                        }
                    }
                    let _ = tokio::time::timeout(quit_bound, pool.quit()).await;
                    // A connection task still in its first connection loop
                    // may have missed the quit: it must not retry forever.
                    for task in tasks {
                        task.abort();
                    }
                }
            }
            .instrument(tracing::debug_span!("redis_store_shutdown")),
        );
        RedisStore {
            inner,
            _shutdown: shutdown.drop_guard(),
        }
    }

    /// Fails at once while a store made by
    /// [`connect_lazy`](Self::connect_lazy) has not connected yet.
    fn ready(&self) -> Result<(), StoreError> {
        if self.inner.ready.load(Ordering::Acquire) {
            Ok(())
        } else {
            Err(StoreError::Unavailable(
                "not connected to Redis yet (still trying in the background)".into(),
            ))
        }
    }

    /// Runs one keyed command (see [`routing`]) and answers its reply.
    async fn run(&self, opts: &Options, key: &str, cmd: Cmd) -> Result<Value, FredError> {
        let mut replies = self.inner.router.run(opts, key, &[cmd]).await?;
        Ok(replies.pop().unwrap_or(Value::Null))
    }

    fn keys(&self, stream: StreamId) -> StreamKeys {
        stream_keys(&self.inner.opts.key_prefix, stream)
    }

    fn binding_key(&self, key: &KeyRef) -> String {
        format!(
            "{}k:{}:{}",
            self.inner.opts.key_prefix,
            b64(&key.route),
            b64(&key.key)
        )
    }

    fn live_ttl_ms(&self) -> i64 {
        millis(
            self.inner
                .opts
                .max_stream_duration
                .saturating_add(self.inner.opts.retention),
        )
    }

    fn retention_ms(&self) -> i64 {
        millis(self.inner.opts.retention)
    }

    /// Calls a function of [`LIBRARY`], loading the library once if the
    /// server lost it (restart, new node).
    async fn fcall(
        &self,
        write: bool,
        func: &str,
        keys: Vec<String>,
        args: Vec<Value>,
    ) -> Result<Value, FredError> {
        let opts = if write {
            &self.inner.write_opts
        } else {
            &self.inner.read_opts
        };
        let Some(first) = keys.first() else {
            return Err(FredError::new(
                ErrorKind::InvalidArgument,
                "FCALL without keys",
            ));
        };
        let mut full: Vec<Value> = Vec::with_capacity(2 + keys.len() + args.len());
        full.push(func.to_string().into());
        full.push(Value::Integer(keys.len() as i64));
        full.extend(keys.iter().map(|k| Value::from(k.as_str())));
        full.extend(args);
        let cmd = Cmd::new("FCALL", full);
        let call = || self.run(opts, first, cmd.clone());
        match call().await {
            Err(e) if e.details().contains("Function not found") => {
                tracing::info!("reloading the Redis function library");
                let _: Value = self
                    .inner
                    .pool
                    .next_connected()
                    .function_load_cluster(true, LIBRARY)
                    .await?;
                call().await
            }
            other => other,
        }
    }

    /// What follows a successful append (or abandoned end): wake this
    /// process's tails at once, and when the stream just ended with a key
    /// binding pointing at it, shorten the binding (best effort).
    async fn after_append(&self, stream: StreamId, last: Seq, binding: Option<String>) {
        // Same-process tails need not wait for the notification's round trip.
        if let Some(n) = self.inner.notifier.get() {
            n.bump(stream, last.0);
        }
        let Some(binding) = binding else { return };
        // Only ever our own key names; anything else (or '') is left alone.
        if binding.starts_with(&format!("{}k:", self.inner.opts.key_prefix)) {
            let args: Vec<Value> = vec![stream.to_string().into(), self.retention_ms().into()];
            if let Err(e) = self.fcall(false, FN_END_BINDING, vec![binding], args).await {
                tracing::debug!(stream.id = %stream, cause = %e, "could not shorten the key binding");
            }
        }
    }

    async fn notifier(&self) -> Result<&Arc<Notifier>, StoreError> {
        self.inner
            .notifier
            .get_or_try_init(|| Notifier::start(&self.inner))
            .await
    }
}

/// Reads the URL and the connection settings into a fred builder, shared by
/// the constructors (and by the subscriber client).
fn configure(url: &str, opts: &StoreOptions, ropts: &RedisOptions) -> Result<Builder, StoreError> {
    // The URL may carry a password: never put it in an error or a log.
    // fred takes any scheme for a standalone server; refuse what is not
    // Redis here, so that a lazy store does not retry an `http://` forever.
    let scheme = url.split_once("://").map_or("", |(scheme, _)| scheme);
    let base = scheme
        .strip_suffix("-cluster")
        .or_else(|| scheme.strip_suffix("-sentinel"))
        .unwrap_or(scheme);
    if !["redis", "rediss", "valkey", "valkeys"].contains(&base) {
        return Err(StoreError::Unavailable(
            "invalid Redis URL: expected redis://, rediss://, redis-cluster:// or \
             redis-sentinel:// (or their valkey forms)"
                .into(),
        ));
    }
    let mut config = Config::from_url(url)
        .map_err(|e| StoreError::Unavailable(format!("invalid Redis URL: {}", e.details())))?;
    if let (Some(tls), true) = (&ropts.tls, config.tls.is_some()) {
        config.tls = Some(tls.clone());
    }
    if opts.key_prefix.contains(['{', '}']) {
        tracing::warn!("key_prefix contains braces: every stream will share one cluster slot");
    }
    let mut builder = Builder::from_config(config);
    builder
        .with_connection_config(|c| {
            c.connection_timeout = ropts.connect_timeout;
            c.internal_command_timeout = ropts.command_timeout;
            c.max_command_buffer_len = ropts.max_command_buffer;
            c.unresponsive = UnresponsiveConfig {
                max_timeout: Some(ropts.command_timeout.saturating_mul(2)),
                interval: (ropts.command_timeout / 4).max(Duration::from_millis(50)),
            };
        })
        .with_performance_config(|p| {
            p.default_command_timeout = ropts.command_timeout;
            p.broadcast_channel_capacity = ropts.notification_buffer.max(1);
        })
        .set_policy(ReconnectPolicy::new_exponential(
            0, // never give up once connected
            u32::try_from(ropts.reconnect_min_delay.as_millis()).unwrap_or(u32::MAX),
            u32::try_from(ropts.reconnect_max_delay.as_millis()).unwrap_or(u32::MAX),
            2,
        ));
    Ok(builder)
}

/// The background half of [`RedisStore::connect_lazy`]: waits until one
/// pooled connection is up (fred makes the attempts, with the reconnection
/// backoff), loads the function library, then opens the store to calls.
async fn become_ready(inner: Arc<Inner>, token: CancellationToken) {
    let ropts = &inner.ropts;
    // How often to look whether fred got a connection: cheap (a flag), and
    // it bounds how long calls keep failing after Redis is back.
    let poll = ropts.reconnect_min_delay.max(Duration::from_millis(10));
    let mut backoff = ropts.reconnect_min_delay;
    let mut waiting_logged = false;
    loop {
        let pause = if inner.pool.clients().iter().any(|c| c.is_connected()) {
            let load = inner
                .pool
                .next_connected()
                .function_load_cluster::<Value, _>(true, LIBRARY);
            match tokio::time::timeout(ropts.command_timeout, load).await {
                Ok(Ok(_)) => {
                    inner.ready.store(true, Ordering::Release);
                    tracing::info!("connected to Redis");
                    return;
                }
                Ok(Err(e)) => {
                    tracing::warn!(cause = %e, "loading the Redis function library failed; retrying")
                }
                Err(_) => tracing::warn!("loading the Redis function library timed out; retrying"),
            }
            let pause = backoff;
            backoff = backoff.saturating_mul(2).min(ropts.reconnect_max_delay);
            pause
        } else {
            if !waiting_logged {
                tracing::warn!("Redis not reachable yet; store calls fail until it is, retrying in the background");
                waiting_logged = true;
            }
            poll
        };
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

fn stream_keys(prefix: &str, stream: StreamId) -> StreamKeys {
    StreamKeys {
        meta: format!("{prefix}{{{stream}}}:m"),
        entries: format!("{prefix}{{{stream}}}:e"),
        channel: format!("{prefix}{{{stream}}}:n"),
    }
}

/// The stream a notification channel name belongs to.
fn channel_stream(prefix: &str, channel: &str) -> Option<StreamId> {
    channel
        .strip_prefix(prefix)?
        .strip_prefix('{')?
        .strip_suffix("}:n")?
        .parse()
        .ok()
}

fn parse_meta(stream: StreamId, mut h: HashMap<String, String>) -> Result<StreamMeta, StoreError> {
    let mut take = |field: &str| {
        h.remove(field)
            .ok_or_else(|| corrupt(format!("stream {stream}: metadata lacks `{field}`")))
    };
    let id: StreamId = take("id")?.parse().map_err(corrupt)?;
    let epoch = Epoch(take("epoch")?.parse().map_err(corrupt)?);
    let created_ms: u64 = take("created_ms")?.parse().map_err(corrupt)?;
    let route = take("route")?;
    let format = take("format")?;
    let headers: Vec<(String, String)> =
        serde_json::from_str(&take("headers")?).map_err(corrupt)?;
    let end: Option<(Seq, Outcome)> = match h.remove("end") {
        Some(s) => Some(serde_json::from_str(&s).map_err(corrupt)?),
        None => None,
    };
    let lost_history = match h.remove("gaps") {
        Some(n) => n.parse::<u64>().map_err(corrupt)? > 0,
        None => false,
    };
    let lease_owner = h.remove("lease_owner");
    let lease_until_ms = match h.remove("lease_until_ms") {
        Some(ms) => Some(ms.parse::<u64>().map_err(corrupt)?),
        None => None,
    };
    let cancel_requested = h.remove("cancel").is_some();
    let caller = h.remove("caller");
    Ok(StreamMeta {
        id,
        epoch,
        created_ms,
        route,
        headers,
        format,
        end,
        lost_history,
        lease_owner,
        lease_until_ms,
        cancel_requested,
        caller,
    })
}

/// Most events in one packed Redis stream entry.
pub const PACK_MAX: usize = 128;
/// Entries the first `XRANGE` of a read asks for.
const FIRST_READ_COUNT: usize = 8;

/// The Redis stream entry id of the entry ending at `seq`.
fn entry_id(seq: Seq) -> String {
    let mut id = seq.0.to_string();
    id.push_str("-0");
    id
}

/// Packs consecutive events into one value: per event, its length as a
/// 4-byte big-endian integer, then its bytes.
fn pack(events: &[Entry]) -> bytes::Bytes {
    let len: usize = events
        .iter()
        .map(|e| match &e.body {
            EntryBody::Event(b) => 4 + b.len(),
            _ => 0,
        })
        .sum();
    let mut out = bytes::BytesMut::with_capacity(len);
    for e in events {
        if let EntryBody::Event(b) = &e.body {
            // validate_batch bounds nothing per event; u32 is 4 GiB.
            out.extend_from_slice(&(b.len() as u32).to_be_bytes());
            out.extend_from_slice(b);
        }
    }
    out.freeze()
}

/// The events of a pack whose last event is `last`, without copying.
fn unpack(last: Seq, value: bytes::Bytes, out: &mut Vec<Entry>) -> Result<(), StoreError> {
    let bad = || corrupt(format!("pack ending at {}: bad lengths", last.0));
    let mut spans = Vec::new();
    let mut at = 0usize;
    while at < value.len() {
        let head: [u8; 4] = value
            .get(at..at + 4)
            .and_then(|h| h.try_into().ok())
            .ok_or_else(bad)?;
        let len = u32::from_be_bytes(head) as usize;
        let end = (at + 4).checked_add(len).filter(|&e| e <= value.len());
        let end = end.ok_or_else(bad)?;
        spans.push(at + 4..end);
        at = end;
    }
    let n = spans.len() as u64;
    if n == 0 || n > last.0 {
        return Err(bad());
    }
    let first = last.0 - n + 1;
    out.extend(spans.into_iter().enumerate().map(|(i, span)| Entry {
        seq: Seq(first + i as u64),
        body: EntryBody::Event(value.slice(span)),
    }));
    Ok(())
}

/// Decodes one `XRANGE` item, `[id, [field, value]]`, into `out` (a pack
/// gives several entries). The id is the last seq the item covers; for a
/// gap (field `g`) the value is its first seq.
fn parse_entry(item: Value, out: &mut Vec<Entry>) -> Result<(), StoreError> {
    let Value::Array(mut parts) = item else {
        return Err(corrupt("stream entry is not an array"));
    };
    if parts.len() != 2 {
        return Err(corrupt("stream entry is not [id, fields]"));
    }
    let fields = parts.pop().unwrap_or(Value::Null);
    let id = parts
        .pop()
        .and_then(|v| v.into_string())
        .ok_or_else(|| corrupt("stream entry id"))?;
    let last = id
        .strip_suffix("-0")
        .and_then(|s| s.parse::<u64>().ok())
        .map(Seq)
        .ok_or_else(|| corrupt(format!("stream entry id {id:?} is not <seq>-0")))?;
    let mut fields = match fields {
        Value::Array(f) if f.len() == 2 => f.into_iter(),
        _ => return Err(corrupt(format!("entry {id}: expected one field"))),
    };
    let name = fields
        .next()
        .and_then(|v| v.into_string())
        .unwrap_or_default();
    let value = fields
        .next()
        .and_then(|v| v.into_bytes())
        .ok_or_else(|| corrupt(format!("entry {id}: value")))?;
    let entry = match name.as_str() {
        "p" => return unpack(last, value, out),
        "e" => Entry {
            seq: last,
            body: EntryBody::Event(value),
        },
        "x" => Entry {
            seq: last,
            body: EntryBody::End(serde_json::from_slice(&value).map_err(corrupt)?),
        },
        "g" => {
            let first = std::str::from_utf8(&value)
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
                .filter(|&first| first >= 1 && first <= last.0)
                .ok_or_else(|| corrupt(format!("gap entry {id}: first seq {value:?}")))?;
            Entry {
                seq: Seq(first),
                body: EntryBody::Gap { upto: last },
            }
        }
        other => return Err(corrupt(format!("entry {id}: unknown field {other:?}"))),
    };
    out.push(entry);
    Ok(())
}

#[async_trait]
impl Store for RedisStore {
    fn kind(&self) -> &'static str {
        "redis"
    }

    async fn create(&self, meta: &StreamMeta) -> Result<(), StoreError> {
        self.ready()?;
        let k = self.keys(meta.id);
        let headers = serde_json::to_string(&meta.headers).map_err(corrupt)?;
        let mut fields: Vec<(&str, String)> = vec![
            ("id", meta.id.to_string()),
            ("epoch", meta.epoch.0.to_string()),
            ("created_ms", meta.created_ms.to_string()),
            ("route", meta.route.clone()),
            ("format", meta.format.clone()),
            ("headers", headers),
        ];
        if let Some(end) = &meta.end {
            fields.push(("end", serde_json::to_string(end).map_err(corrupt)?));
        }
        if meta.lost_history {
            fields.push(("gaps", "1".into()));
        }
        if let Some(owner) = &meta.lease_owner {
            fields.push(("lease_owner", owner.clone()));
        }
        if let Some(until) = meta.lease_until_ms {
            fields.push(("lease_until_ms", until.to_string()));
        }
        if meta.cancel_requested {
            fields.push(("cancel", "1".into()));
        }
        if let Some(caller) = &meta.caller {
            fields.push(("caller", caller.clone()));
        }
        // Creating an id that exists replaces the stream, entries included,
        // so a re-created stream never inherits an old `end` or old entries.
        let mut hset: Vec<Value> = Vec::with_capacity(1 + 2 * fields.len());
        hset.push(k.meta.as_str().into());
        for (name, value) in fields {
            hset.push(name.into());
            hset.push(value.into());
        }
        let cmds = [
            Cmd::new(
                "DEL",
                vec![k.meta.as_str().into(), k.entries.as_str().into()],
            ),
            Cmd::new("HSET", hset),
            Cmd::new(
                "PEXPIRE",
                vec![k.meta.as_str().into(), self.live_ttl_ms().into()],
            ),
        ];
        self.inner
            .router
            .run(&self.inner.read_opts, &k.meta, &cmds)
            .await
            .map_err(map_err)?;
        Ok(())
    }

    async fn append(&self, stream: StreamId, entries: &[Entry]) -> Result<(), StoreError> {
        let (Some(first), Some(last)) = (entries.first(), entries.last()) else {
            return Ok(());
        };
        validate_batch(stream, entries)?;
        self.ready()?;
        let k = self.keys(stream);
        let end_record = match &last.body {
            EntryBody::End(outcome) => {
                serde_json::to_string(&(last.seq, outcome)).map_err(corrupt)?
            }
            EntryBody::Event(_) | EntryBody::Gap { .. } => String::new(),
        };
        let mut args: Vec<Value> = Vec::with_capacity(5 + 3 * entries.len().min(PACK_MAX));
        args.push(first.seq.0.to_string().into());
        args.push(last.last_seq().0.to_string().into());
        args.push(self.live_ttl_ms().into());
        args.push(self.retention_ms().into());
        args.push(end_record.into());
        let mut rest = entries;
        while let Some(e) = rest.first() {
            // A run of events becomes one pack (up to PACK_MAX events) under
            // the seq of its last event; gaps and the end stay entries of
            // their own. Every entry is stored under the last seq it covers.
            let run = rest
                .iter()
                .take(PACK_MAX)
                .take_while(|e| matches!(e.body, EntryBody::Event(_)))
                .count();
            let (id, field, value): (Seq, &'static str, Value) = match &e.body {
                EntryBody::Event(b) if run == 1 => (e.seq, "e", Value::Bytes(b.clone())),
                EntryBody::Event(_) => (rest[run - 1].seq, "p", Value::Bytes(pack(&rest[..run]))),
                EntryBody::End(o) => (
                    e.seq,
                    "x",
                    serde_json::to_string(o).map_err(corrupt)?.into(),
                ),
                EntryBody::Gap { upto } => (*upto, "g", e.seq.0.to_string().into()),
            };
            args.push(entry_id(id).into());
            args.push(field.into());
            args.push(value);
            rest = &rest[run.max(1)..];
        }
        let keys = vec![k.meta, k.entries, k.channel];
        let binding = self
            .fcall(true, FN_APPEND, keys, args)
            .await
            .map_err(|e| conflict_or(stream, e))?;
        self.after_append(stream, last.last_seq(), binding.into_string())
            .await;
        Ok(())
    }

    async fn meta(&self, stream: StreamId) -> Result<Option<StreamMeta>, StoreError> {
        self.ready()?;
        let k = self.keys(stream);
        let h: HashMap<String, String> = self
            .run(
                &self.inner.read_opts,
                &k.meta,
                Cmd::new("HGETALL", vec![k.meta.as_str().into()]),
            )
            .await
            .and_then(|v| v.convert())
            .map_err(map_err)?;
        if h.is_empty() {
            return Ok(None);
        }
        parse_meta(stream, h).map(Some)
    }

    async fn read(
        &self,
        stream: StreamId,
        after: Seq,
        limit: usize,
    ) -> Result<Vec<Entry>, StoreError> {
        let Some(from) = after.0.checked_add(1) else {
            return Ok(Vec::new());
        };
        if limit == 0 {
            return Ok(Vec::new());
        }
        self.ready()?;
        let k = self.keys(stream);
        // Ids are last covered seqs, so this also returns a gap or a pack
        // holding `after`. Packs hold a varying number of events: ask for a
        // few entries first, then for as many as the events still wanted
        // need at the density seen so far (at most `limit` entries in all,
        // since an entry holds at least one event).
        let mut out: Vec<Entry> = Vec::new();
        let mut from = from;
        let mut entries_seen = 0usize;
        let mut count = limit.min(FIRST_READ_COUNT);
        loop {
            // COUNT is a signed 64-bit integer, which fred wants strictly below i64::MAX.
            let count_arg = u64::try_from(count)
                .unwrap_or(u64::MAX)
                .min(i64::MAX as u64 - 1);
            let args: Vec<Value> = vec![
                k.entries.as_str().into(),
                entry_id(Seq(from)).into(),
                "+".into(),
                "COUNT".into(),
                count_arg.to_string().into(),
            ];
            let items: Value = self
                .run(&self.inner.read_opts, &k.entries, Cmd::new("XRANGE", args))
                .await
                .map_err(map_err)?;
            let items = match items {
                Value::Null => Vec::new(),
                Value::Array(items) => items,
                other => return Err(corrupt(format!("XRANGE answered {:?}", other.kind()))),
            };
            let got = items.len();
            entries_seen += got;
            for item in items {
                let before = out.len();
                parse_entry(item, &mut out)?;
                // Events of a pack that straddles the position were read before.
                let skip = out[before..]
                    .iter()
                    .take_while(|e| e.last_seq() < Seq(from))
                    .count();
                out.drain(before..before + skip);
            }
            let exhausted = got < count;
            let ended = out
                .last()
                .is_some_and(|e| matches!(e.body, EntryBody::End(_)));
            if out.len() >= limit || exhausted || ended {
                break;
            }
            let Some(last) = out.last() else { break };
            from = last.last_seq().0.saturating_add(1);
            let wanted = limit - out.len();
            let per_entry = (out.len() / entries_seen.max(1)).max(1);
            count = wanted.div_ceil(per_entry).clamp(1, wanted);
        }
        out.truncate(limit);
        Ok(out)
    }

    async fn bind_key(&self, key: &KeyRef, stream: StreamId) -> Result<(), StoreError> {
        self.ready()?;
        let name = self.binding_key(key);
        let k = self.keys(stream);
        let set = self.run(
            &self.inner.read_opts,
            &name,
            Cmd::new(
                "SET",
                vec![
                    name.as_str().into(),
                    stream.to_string().into(),
                    "PX".into(),
                    self.live_ttl_ms().into(),
                ],
            ),
        );
        let note = self.fcall(
            false,
            FN_NOTE_BINDING,
            vec![k.meta],
            vec![name.clone().into()],
        );
        let (set, note) = tokio::join!(set, note);
        set.map_err(map_err)?;
        note.map_err(map_err)?;
        Ok(())
    }

    async fn claim_key(
        &self,
        key: &KeyRef,
        stream: StreamId,
    ) -> Result<Option<StreamId>, StoreError> {
        self.ready()?;
        let name = self.binding_key(key);
        let k = self.keys(stream);
        // SET NX GET: sets only if absent and answers the previous value, in
        // one command. Sent once: a replay would find its own binding.
        let set = self.run(
            &self.inner.write_opts,
            &name,
            Cmd::new(
                "SET",
                vec![
                    name.as_str().into(),
                    stream.to_string().into(),
                    "PX".into(),
                    self.live_ttl_ms().into(),
                    "NX".into(),
                    "GET".into(),
                ],
            ),
        );
        // Noted concurrently (one round trip), even if the claim loses: the
        // end of the stream only shortens a binding still pointing at it.
        let note = self.fcall(
            false,
            FN_NOTE_BINDING,
            vec![k.meta],
            vec![name.clone().into()],
        );
        let (set, note) = tokio::join!(set, note);
        let previous: Option<String> = set.and_then(|v| v.convert()).map_err(map_err)?;
        note.map_err(map_err)?;
        previous
            .map(|s| {
                s.parse()
                    .map_err(|_| corrupt(format!("key binding holds {s:?}")))
            })
            .transpose()
    }

    async fn release_key(&self, key: &KeyRef, stream: StreamId) -> Result<(), StoreError> {
        self.ready()?;
        let name = self.binding_key(key);
        // Compare and delete, atomically: never drops a binding that moved on.
        self.run(
            &self.inner.write_opts,
            &name,
            Cmd::new(
                "EVAL",
                vec![
                    RELEASE_KEY.into(),
                    1.into(),
                    name.as_str().into(),
                    stream.to_string().into(),
                ],
            ),
        )
        .await
        .map_err(map_err)?;
        Ok(())
    }

    async fn resolve_key(&self, key: &KeyRef) -> Result<Option<StreamId>, StoreError> {
        self.ready()?;
        let name = self.binding_key(key);
        let v: Option<String> = self
            .run(
                &self.inner.read_opts,
                &name,
                Cmd::new("GET", vec![name.as_str().into()]),
            )
            .await
            .and_then(|v| v.convert())
            .map_err(map_err)?;
        v.map(|s| {
            s.parse()
                .map_err(|_| corrupt(format!("key binding holds {s:?}")))
        })
        .transpose()
    }

    async fn renew_lease(
        &self,
        stream: StreamId,
        owner: &str,
        now_ms: u64,
        until_ms: u64,
    ) -> Result<LeaseRenewal, StoreError> {
        self.ready()?;
        let k = self.keys(stream);
        let args: Vec<Value> = vec![
            owner.into(),
            now_ms.to_string().into(),
            until_ms.to_string().into(),
        ];
        let cancel = self
            .fcall(true, FN_RENEW_LEASE, vec![k.meta], args)
            .await
            .map_err(|e| conflict_or(stream, e))?;
        match cancel.as_i64() {
            Some(flag) => Ok(LeaseRenewal {
                cancel_requested: flag != 0,
            }),
            None => Err(corrupt(format!("renew_lease answered {:?}", cancel.kind()))),
        }
    }

    async fn request_cancel(&self, stream: StreamId) -> Result<bool, StoreError> {
        self.ready()?;
        let k = self.keys(stream);
        let known = self
            .fcall(true, FN_REQUEST_CANCEL, vec![k.meta], Vec::new())
            .await
            .map_err(map_err)?;
        match known.as_i64() {
            Some(flag) => Ok(flag != 0),
            None => Err(corrupt(format!(
                "request_cancel answered {:?}",
                known.kind()
            ))),
        }
    }

    async fn end_if_abandoned(
        &self,
        stream: StreamId,
        now_ms: u64,
        outcome: &Outcome,
    ) -> Result<Option<Seq>, StoreError> {
        self.ready()?;
        let k = self.keys(stream);
        let args: Vec<Value> = vec![
            now_ms.to_string().into(),
            self.retention_ms().into(),
            serde_json::to_string(outcome).map_err(corrupt)?.into(),
        ];
        let keys = vec![k.meta, k.entries, k.channel];
        let reply = self
            .fcall(true, FN_END_IF_ABANDONED, keys, args)
            .await
            .map_err(map_err)?;
        let (seq, binding) = match reply {
            // Lua's false arrives as a nil.
            Value::Null => return Ok(None),
            Value::Array(parts) if parts.len() == 2 => {
                let mut parts = parts.into_iter();
                let seq = parts
                    .next()
                    .and_then(|v| v.as_u64())
                    .map(Seq)
                    .ok_or_else(|| corrupt("end_if_abandoned answered a bad seq"))?;
                (seq, parts.next().and_then(|v| v.into_string()))
            }
            other => {
                return Err(corrupt(format!(
                    "end_if_abandoned answered {:?}",
                    other.kind()
                )))
            }
        };
        self.after_append(stream, seq, binding).await;
        Ok(Some(seq))
    }

    fn shared_limiter(&self) -> Option<Arc<dyn crate::limits::Limiter>> {
        Some(Arc::new(RedisLimiter::new(self.inner.clone())))
    }

    async fn watch(&self, stream: StreamId) -> Result<Watcher, StoreError> {
        self.ready()?;
        let n = self.notifier().await?;
        n.watch(stream).await
    }

    async fn ping(&self) -> Result<Duration, StoreError> {
        self.ready()?;
        let start = Instant::now();
        let () = self.inner.pool.ping(None).await.map_err(map_err)?;
        Ok(start.elapsed())
    }

    fn connected(&self) -> Option<bool> {
        let clients = self.inner.pool.clients();
        // A cluster client reports its least healthy node: one node down
        // (or failing over) is not the whole store, so only PING decides.
        if clients.iter().any(|c| c.is_clustered()) {
            return None;
        }
        // fred flips a client's state as soon as its socket closes; one
        // pooled connection up is enough to serve (`prefer_connected`).
        Some(self.inner.ready.load(Ordering::Acquire) && clients.iter().any(|c| c.is_connected()))
    }
}

/// The store's one subscriber connection and the watchers it wakes.
struct Notifier {
    client: SubscriberClient,
    prefix: String,
    topics: Mutex<HashMap<StreamId, Topic>>,
}

/// One watched stream.
struct Topic {
    refs: usize,
    /// Whether `SSUBSCRIBE` succeeded (and no `SUNSUBSCRIBE` followed).
    subscribed: bool,
    tx: watch::Sender<u64>,
    /// Serializes this stream's subscribe and unsubscribe calls, so that a
    /// late unsubscribe never cancels a newer watcher's subscription.
    op: Arc<tokio::sync::Mutex<()>>,
}

impl Notifier {
    async fn start(inner: &Inner) -> Result<Arc<Notifier>, StoreError> {
        let client = inner.builder.build_subscriber_client().map_err(map_err)?;
        // Take the receivers before connecting so nothing is missed.
        let messages = client.message_rx();
        let reconnects = client.reconnect_rx();
        let bound = inner
            .ropts
            .connect_timeout
            .saturating_add(inner.ropts.command_timeout);
        match tokio::time::timeout(bound, client.init()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(map_err(e)),
            Err(_) => {
                let c = client.clone();
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(Duration::from_secs(1), c.quit()).await;
                });
                return Err(StoreError::Unavailable(
                    "subscriber connection timed out".into(),
                ));
            }
        }
        let n = Arc::new(Notifier {
            client,
            prefix: inner.opts.key_prefix.clone(),
            topics: Mutex::new(HashMap::new()),
        });
        let token = inner.shutdown.child_token();
        tokio::spawn(
            route_messages(n.clone(), messages, token.clone())
                .instrument(tracing::debug_span!("redis_notify")),
        );
        tokio::spawn(
            resubscribe_on_reconnect(n.clone(), reconnects, token.clone(), inner.ropts.clone())
                .instrument(tracing::debug_span!("redis_resubscribe")),
        );
        let heartbeat = inner.ropts.heartbeat_interval;
        tokio::spawn(
            {
                let n = n.clone();
                async move {
                    tokio::select! {
                        _ = token.cancelled() => {}
                        _ = n.client.enable_heartbeat(heartbeat, false) => {}
                    }
                    let _ = n.client.quit().await;
                }
            }
            .instrument(tracing::debug_span!("redis_subscriber")),
        );
        Ok(n)
    }

    fn channel(&self, stream: StreamId) -> String {
        stream_keys(&self.prefix, stream).channel
    }

    fn bump(&self, stream: StreamId, seq: u64) {
        if let Some(t) = lock(&self.topics).get(&stream) {
            t.tx.send_modify(|v| *v = (*v).max(seq));
        }
    }

    fn bump_all(&self) {
        for t in lock(&self.topics).values() {
            t.tx.send_modify(|_| {});
        }
    }

    async fn watch(self: &Arc<Self>, stream: StreamId) -> Result<Watcher, StoreError> {
        let (rx, op) = {
            let mut topics = lock(&self.topics);
            let t = topics.entry(stream).or_insert_with(|| Topic {
                refs: 0,
                subscribed: false,
                tx: watch::Sender::new(0),
                op: Arc::new(tokio::sync::Mutex::new(())),
            });
            t.refs += 1;
            (t.tx.subscribe(), t.op.clone())
        };
        // From here on, dropping the guard (also on error) releases the topic.
        let guard = TopicGuard {
            notifier: self.clone(),
            stream,
        };
        let _op = op.lock().await;
        let subscribed = lock(&self.topics)
            .get(&stream)
            .is_some_and(|t| t.subscribed);
        if !subscribed {
            self.client
                .ssubscribe(self.channel(stream))
                .await
                .map_err(map_err)?;
            if let Some(t) = lock(&self.topics).get_mut(&stream) {
                t.subscribed = true;
            }
        }
        Ok(Watcher::new(rx, Some(Box::new(guard))))
    }

    fn release(self: &Arc<Self>, stream: StreamId) {
        let op = {
            let mut topics = lock(&self.topics);
            let Some(t) = topics.get_mut(&stream) else {
                return;
            };
            t.refs = t.refs.saturating_sub(1);
            if t.refs > 0 {
                return;
            }
            t.op.clone()
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            lock(&self.topics).remove(&stream);
            return;
        };
        let n = self.clone();
        rt.spawn(async move {
            let _op = op.lock().await;
            let subscribed = match lock(&n.topics).get(&stream) {
                Some(t) if t.refs == 0 => t.subscribed,
                _ => return,
            };
            if subscribed {
                if let Err(e) = n.client.sunsubscribe(n.channel(stream)).await {
                    tracing::debug!(stream.id = %stream, cause = %e, "SUNSUBSCRIBE failed");
                }
            }
            let mut topics = lock(&n.topics);
            if let Some(t) = topics.get_mut(&stream) {
                if t.refs == 0 {
                    topics.remove(&stream);
                } else {
                    // A watcher arrived meanwhile; it subscribes again after us.
                    t.subscribed = false;
                }
            }
        });
    }

    /// Subscribes again to every watched stream, one `SSUBSCRIBE` per slot.
    async fn resubscribe_all(&self) -> Result<usize, FredError> {
        let mut by_slot: BTreeMap<u16, Vec<String>> = BTreeMap::new();
        for (stream, t) in lock(&self.topics).iter() {
            if t.subscribed {
                let channel = self.channel(*stream);
                by_slot
                    .entry(fred::util::redis_keyslot(channel.as_bytes()))
                    .or_default()
                    .push(channel);
            }
        }
        let mut count = 0;
        for (_, channels) in by_slot {
            count += channels.len();
            self.client.ssubscribe(channels).await?;
        }
        Ok(count)
    }
}

/// Keeps one watcher's interest in a stream.
struct TopicGuard {
    notifier: Arc<Notifier>,
    stream: StreamId,
}

impl Drop for TopicGuard {
    fn drop(&mut self) {
        self.notifier.release(self.stream);
    }
}

async fn route_messages(
    n: Arc<Notifier>,
    mut rx: tokio::sync::broadcast::Receiver<Message>,
    token: CancellationToken,
) {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        let msg = tokio::select! {
            _ = token.cancelled() => return,
            msg = rx.recv() => msg,
        };
        match msg {
            Ok(m) => {
                let Some(stream) = channel_stream(&n.prefix, &m.channel) else {
                    continue;
                };
                let seq = m
                    .value
                    .as_str()
                    .and_then(|s| s.parse::<u64>().ok())
                    .unwrap_or(0);
                n.bump(stream, seq);
            }
            Err(RecvError::Lagged(missed)) => {
                tracing::warn!(
                    missed,
                    "notification buffer overflowed; waking every watcher"
                );
                n.bump_all();
            }
            Err(RecvError::Closed) => return,
        }
    }
}

/// How often a cluster subscriber checks whether its channels' slots moved.
const CLUSTER_CHECK_INTERVAL: Duration = Duration::from_secs(2);

/// Refreshes the subscriber's view of the cluster and tells whether the slot
/// of a subscribed channel changed owner since the last look (or is new).
async fn owners_changed(n: &Notifier, owners: &mut HashMap<u16, Server>) -> bool {
    let slots: Vec<u16> = lock(&n.topics)
        .iter()
        .filter(|(_, t)| t.subscribed)
        .map(|(s, _)| fred::util::redis_keyslot(n.channel(*s).as_bytes()))
        .collect();
    if slots.is_empty() {
        return false;
    }
    if let Err(e) = n.client.sync_cluster().await {
        tracing::debug!(cause = %e, "refreshing the cluster state failed");
        return false;
    }
    let Some(state) = n.client.cached_cluster_state() else {
        return false;
    };
    let mut changed = false;
    for slot in slots {
        if let Some(server) = state.get_server(slot) {
            // A slot seen for the first time counts as changed: it may have
            // moved between its subscription and this look, and subscribing
            // again is harmless.
            changed |= owners
                .insert(slot, server.clone())
                .is_none_or(|old| old != *server);
        }
    }
    changed
}

async fn resubscribe_on_reconnect(
    n: Arc<Notifier>,
    mut rx: tokio::sync::broadcast::Receiver<Server>,
    token: CancellationToken,
    ropts: RedisOptions,
) {
    use tokio::sync::broadcast::error::RecvError;
    // Retry until the subscriptions are back; a failure must not leave the
    // tails deaf until the next reconnection.
    let mut pending = false;
    let mut delay = ropts.reconnect_min_delay;
    // fred reports the first connection as a reconnection too.
    let mut first = true;
    // In a cluster, a moved slot ends its shard subscriptions (Redis pushes
    // `sunsubscribe`, which fred drops): look at the slot owners now and
    // then, and subscribe again when one changed.
    let clustered = n.client.is_clustered();
    let mut owners: HashMap<u16, Server> = HashMap::new();
    let mut check = tokio::time::interval(CLUSTER_CHECK_INTERVAL);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = token.cancelled() => return,
            _ = check.tick(), if clustered && !pending => {
                if owners_changed(&n, &mut owners).await {
                    pending = true;
                    delay = Duration::ZERO;
                } else {
                    continue;
                }
            }
            ev = rx.recv() => match ev {
                Ok(_) | Err(RecvError::Lagged(_)) => {
                    pending = true;
                    delay = ropts.reconnect_min_delay;
                }
                Err(RecvError::Closed) => return,
            },
            _ = tokio::time::sleep(delay), if pending => {}
        }
        if !pending {
            continue;
        }
        match n.resubscribe_all().await {
            Ok(count) => {
                pending = false;
                if first {
                    tracing::debug!("subscriber connected");
                } else {
                    tracing::info!(
                        channels = count,
                        "subscriber reconnected; resubscribed and woke every watcher"
                    );
                }
                first = false;
                // Notifications sent while disconnected are lost: make every tail re-read.
                n.bump_all();
            }
            Err(e) => {
                tracing::warn!(cause = %e, "resubscribing after reconnection failed; retrying");
                delay = delay.saturating_mul(2).min(ropts.reconnect_max_delay);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn channel_names_round_trip() {
        let s = StreamId::random();
        let k = stream_keys("reprise:", s);
        assert_eq!(k.meta, format!("reprise:{{{s}}}:m"));
        assert_eq!(channel_stream("reprise:", &k.channel), Some(s));
        assert_eq!(channel_stream("other:", &k.channel), None);
        assert_eq!(channel_stream("reprise:", &k.meta), None);
    }

    #[test]
    fn binding_parts_cannot_collide() {
        // ':' separates route from key and never occurs in base64url.
        assert_ne!(
            format!("{}:{}", b64("a:b"), b64("c")),
            format!("{}:{}", b64("a"), b64("b:c"))
        );
        assert!(!b64("\r\n\0{}").contains([':', '{', '}']));
    }

    #[test]
    fn error_mapping() {
        let e = FredError::new(ErrorKind::IO, "connection reset");
        assert!(matches!(map_err(e), StoreError::Unavailable(_)));
        let e = FredError::new(ErrorKind::Timeout, "timed out");
        assert!(matches!(map_err(e), StoreError::Unavailable(_)));
        let e = FredError::new(ErrorKind::Parse, "bad frame");
        assert!(matches!(map_err(e), StoreError::Corrupt(_)));
        let e = FredError::new(ErrorKind::Unknown, "OOM command not allowed");
        assert!(matches!(map_err(e), StoreError::Full(_)));
    }

    fn parse_one(item: Value) -> Result<Entry, StoreError> {
        let mut out = Vec::new();
        parse_entry(item, &mut out)?;
        assert_eq!(out.len(), 1);
        Ok(out.remove(0))
    }

    #[test]
    fn packs_round_trip_and_reject_bad_lengths() {
        let events: Vec<Entry> = (5..=9)
            .map(|s| Entry {
                seq: Seq(s),
                body: EntryBody::Event(Bytes::from(vec![b'x'; s as usize * 3])),
            })
            .collect();
        let packed = pack(&events);
        let item = Value::Array(vec![
            "9-0".into(),
            Value::Array(vec!["p".into(), Value::Bytes(packed.clone())]),
        ]);
        let mut out = Vec::new();
        parse_entry(item, &mut out).unwrap();
        assert_eq!(out, events);
        // Truncated, or more events than seqs before the id.
        for (id, value) in [
            ("9-0", packed.slice(..packed.len() - 1)),
            ("3-0", packed.clone()),
            ("9-0", Bytes::new()),
            ("9-0", Bytes::from_static(b"\0\0")),
        ] {
            let item = Value::Array(vec![
                id.into(),
                Value::Array(vec!["p".into(), Value::Bytes(value)]),
            ]);
            assert!(matches!(
                parse_entry(item, &mut Vec::new()),
                Err(StoreError::Corrupt(_))
            ));
        }
    }

    #[test]
    fn entry_parsing_rejects_foreign_records() {
        let good = Value::Array(vec![
            "7-0".into(),
            Value::Array(vec![
                "e".into(),
                Value::Bytes(Bytes::from_static(b"\0\xff")),
            ]),
        ]);
        let e = parse_one(good).unwrap();
        assert_eq!(e.seq, Seq(7));
        assert_eq!(e.body, EntryBody::Event(Bytes::from_static(b"\0\xff")));
        // A gap is stored under its last seq, with its first seq as value.
        let gap = Value::Array(vec![
            "9-0".into(),
            Value::Array(vec!["g".into(), "4".into()]),
        ]);
        let e = parse_one(gap).unwrap();
        assert_eq!(e.seq, Seq(4));
        assert_eq!(e.body, EntryBody::Gap { upto: Seq(9) });
        assert_eq!(e.last_seq(), Seq(9));
        for bad in [
            Value::Array(vec![
                "7-1".into(),
                Value::Array(vec!["e".into(), "x".into()]),
            ]),
            Value::Array(vec![
                "7-0".into(),
                Value::Array(vec!["z".into(), "x".into()]),
            ]),
            Value::Array(vec![
                "7-0".into(),
                Value::Array(vec!["x".into(), "not json".into()]),
            ]),
            // Gaps that end before they start, start at 0, or are not numbers.
            Value::Array(vec![
                "7-0".into(),
                Value::Array(vec!["g".into(), "8".into()]),
            ]),
            Value::Array(vec![
                "7-0".into(),
                Value::Array(vec!["g".into(), "0".into()]),
            ]),
            Value::Array(vec![
                "7-0".into(),
                Value::Array(vec!["g".into(), "x".into()]),
            ]),
            Value::Array(vec!["7-0".into()]),
            "nope".into(),
        ] {
            assert!(matches!(parse_one(bad), Err(StoreError::Corrupt(_))));
        }
    }
}
