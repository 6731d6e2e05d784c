//! Connecting: the store's options, the connection pool and its
//! supervisor, and the lazy start that waits for Redis in the background.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fred::clients::Pool;
use fred::error::{Error as FredError, ErrorKind};
use fred::prelude::*;
use fred::types::config::UnresponsiveConfig;
use fred::types::ConnectHandle;
use tokio::sync::OnceCell;
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::Instrument;

use super::error::map_err;
use super::functions::LIBRARY;
use super::notifier::Notifier;
use super::routing::Router;
use crate::{StoreError, StoreOptions};

/// How often the store looks for pooled clients whose connection task ended.
pub(super) const SUPERVISE_INTERVAL: Duration = Duration::from_millis(50);

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
    pub tls: Option<rustls::ClientConfig>,
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
    pub(super) inner: Arc<Inner>,
    /// Cancels the background tasks (client shutdown, subscriber tasks) when
    /// the store is dropped.
    _shutdown: DropGuard,
}

pub(super) struct Inner {
    pub(super) pool: Pool,
    /// Builds the subscriber client with the same settings as the pool.
    pub(super) builder: Builder,
    pub(super) opts: StoreOptions,
    pub(super) ropts: RedisOptions,
    /// Options of appends: fail fast when disconnected, never replay.
    pub(super) write_opts: Options,
    /// Options of reads: fred's defaults (several attempts).
    pub(super) read_opts: Options,
    /// Sends every keyed command, following cluster redirections (see
    /// [`routing`]).
    pub(super) router: Router,
    /// The shared subscriber, created by the first `watch`.
    pub(super) notifier: OnceCell<Arc<Notifier>>,
    /// Set once a connection is up and the function library loaded; until
    /// then (only with [`RedisStore::connect_lazy`]) calls fail at once.
    pub(super) ready: AtomicBool,
    pub(super) shutdown: CancellationToken,
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
        let pool = builder
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
            // fred's message quotes Redis's reply, never the password.
            Ok(Err(e)) if *e.kind() == ErrorKind::Auth => Err(StoreError::AuthFailed(format!(
                "cannot connect to Redis: {e}"
            ))),
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
        let mut lazy = builder.clone();
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
    pub(super) fn ready(&self) -> Result<(), StoreError> {
        if self.inner.ready.load(Ordering::Acquire) {
            Ok(())
        } else {
            Err(StoreError::Unavailable(
                "not connected to Redis yet (still trying in the background)".into(),
            ))
        }
    }
}

/// Reads the URL and the connection settings into a fred builder, shared by
/// the constructors (and by the subscriber client).
pub(super) fn configure(
    url: &str,
    opts: &StoreOptions,
    ropts: &RedisOptions,
) -> Result<Builder, StoreError> {
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
        config.tls = Some(fred::types::config::TlsConfig::from(tls.clone()));
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
pub(super) async fn become_ready(inner: Arc<Inner>, token: CancellationToken) {
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
