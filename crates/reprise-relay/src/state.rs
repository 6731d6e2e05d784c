//! The relay's shared state ([`Relay`]): configuration, store, hub,
//! upstream clients, limits and the shutdown tokens that every request
//! handler and stream task is given; and how it is built (`open_store`).
//! Below the handlers and the stream tasks, above the leaves.

use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::Arc;
use std::time::Duration;

use reprise_store::{MemoryStore, RedisStore, Store, StoreError, StoreOptions};
use tokio_util::sync::CancellationToken;

use crate::config::{redact_url, Config, ConfigError, LoadedTls};
use crate::health::StoreHealth;
use crate::metrics::{InstrumentedStore, Metrics};
use crate::routes::{Route, RouteError, Router};
use crate::shutdown::Shutdown;
use crate::stream::budget::LogBudget;
use crate::stream::hub::{Hub, LoaderCtx};
use crate::stream::reader::ReaderCtx;
use crate::upstream::{Clients, HttpClient};

/// Longest pause between two attempts to reconnect to Redis: short, so
/// that an instance is ready again soon after Redis is (an attempt against
/// a server that is down costs one refused connection).
const REDIS_RECONNECT_MAX_DELAY: Duration = Duration::from_secs(1);

/// Errors that stop the relay from starting.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Route(#[from] RouteError),
    #[error("cannot open the store: {0}")]
    Store(#[from] reprise_store::StoreError),
    #[error("cannot listen on admin_listen {addr}: {source}")]
    AdminListen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// Everything a request handler or a stream task needs.
pub struct Relay {
    pub config: Config,
    pub router: Router,
    pub store: Arc<dyn Store>,
    pub hub: Arc<Hub>,
    /// The default upstream client (system roots); use [`Relay::client_for`].
    pub client: HttpClient,
    /// Upstream clients by trusted roots (`routes[].ca_file`).
    pub clients: Clients,
    /// The listener's TLS (`[tls]`); `None` serves plain HTTP.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// The shutdown's phases, and the tasks they wait for.
    pub shutdown: Shutdown,
    pub metrics: Arc<Metrics>,
    /// Payload bytes recorded and not yet stored, over all streams.
    pub unstored_total: Arc<std::sync::atomic::AtomicUsize>,
    /// This process's identity as a producer (lease owner), random per start.
    pub instance: String,
    /// Caller identities (HMAC under `auth.secret`).
    pub auth: crate::auth::Auth,
    /// Rate limits per caller, counted in the store.
    pub limiter: crate::ratelimit::RateLimiter,
    /// Peers whose forwarding headers are believed (`trusted_proxies`).
    pub trusted_proxies: crate::forwarded::TrustedProxies,
    /// The store's health, kept by the probe ([`crate::health`]): readiness
    /// answers from it, and the request path skips a store known down.
    pub store_health: Arc<StoreHealth>,
    /// Set while an admin listener serves the operational endpoints
    /// (`admin_listen`): the public listener then answers them `404`.
    pub admin_listener: AtomicBool,
}

impl Relay {
    pub fn new(
        config: Config,
        store: Arc<dyn Store>,
        shutdown: CancellationToken,
    ) -> Result<Arc<Relay>, StartError> {
        let loaded = config.validate()?;
        Self::with_loaded(config, &loaded, store, shutdown)
    }

    /// [`Relay::new`] for a config already validated, with the TLS material
    /// its validation loaded.
    pub fn with_loaded(
        config: Config,
        loaded: &LoadedTls,
        store: Arc<dyn Store>,
        shutdown: CancellationToken,
    ) -> Result<Arc<Relay>, StartError> {
        let router = Router::new(&config.routes)?;
        let clients = Clients::build(&config.routes, &config.timeouts, &loaded.upstream_cas)
            .map_err(|e| ConfigError::Invalid(format!("routes[].ca_file: {e}")))?;
        let client = clients.default_client().clone();
        let tls = loaded.listener.clone().map(tokio_rustls::TlsAcceptor::from);
        let metrics = Arc::new(Metrics::new());
        let shutdown = Shutdown::new(shutdown);
        let store_health = Arc::new(StoreHealth::new(metrics.store_up.clone()));
        let limiter = crate::ratelimit::RateLimiter::new(
            store.as_ref(),
            config.streams.lease,
            metrics.clone(),
            store_health.clone(),
            shutdown.tasks().clone(),
            shutdown.stop().clone(),
        );
        Ok(Arc::new(Relay {
            limiter,
            store_health,
            admin_listener: AtomicBool::new(false),
            trusted_proxies: crate::forwarded::TrustedProxies::new(&config.trusted_proxies),
            router,
            store: InstrumentedStore::wrap(store, metrics.clone()),
            metrics,
            hub: Arc::new(Hub::new(Arc::new(LogBudget::new(
                config.limits.max_log_bytes.as_u64() as usize,
            )))),
            client,
            clients,
            tls,
            shutdown,
            unstored_total: Arc::new(AtomicUsize::new(0)),
            instance: reprise_core::StreamId::random().to_string(),
            auth: crate::auth::Auth::new(config.auth.secret.as_ref()),
            config,
        }))
    }

    /// The client that reaches `route`'s upstream (trusting its `ca_file`).
    /// On a thread serving its own runtime, a client with this thread's pools.
    pub fn client_for(&self, route: &Route) -> HttpClient {
        self.clients.for_route(route)
    }

    pub fn reader_ctx(&self) -> ReaderCtx {
        ReaderCtx {
            store: self.store.clone(),
            metrics: self.metrics.clone(),
            heartbeat: self.config.streams.heartbeat,
            stop: self.shutdown.stop().clone(),
        }
    }

    pub fn loader_ctx(&self) -> LoaderCtx {
        LoaderCtx {
            store: self.store.clone(),
            tasks: self.shutdown.tasks().clone(),
            stop: self.shutdown.stop().clone(),
            poll_interval: self.config.streams.tail_poll_interval,
            lease: self.config.streams.lease,
            linger: self.config.streams.hot_linger,
        }
    }
}

/// Opens the store the config names: Redis if a URL is set, else embedded.
pub async fn open_store(config: &Config, loaded: &LoadedTls) -> Result<Arc<dyn Store>, StartError> {
    let opts = StoreOptions {
        key_prefix: config.store.key_prefix.clone(),
        retention: config.store.retention,
        max_stream_duration: config.timeouts.max_stream_duration,
    };
    match &config.store.redis_url {
        Some(url) => {
            tracing::info!(url = %redact_url(url.expose()), "connecting to Redis");
            // Connect now if Redis answers; if it does not, start anyway and
            // keep trying in the background (only an invalid URL fails).
            let ropts = reprise_store::RedisOptions {
                tls: loaded.redis.clone(),
                // Readiness (and the store) come back within about this
                // after Redis returns, however long it was away.
                reconnect_max_delay: REDIS_RECONNECT_MAX_DELAY,
                ..Default::default()
            };
            let store = match RedisStore::connect_with(url.expose(), opts.clone(), ropts.clone())
                .await
            {
                Ok(store) => store,
                // Wrong credentials are a configuration error, not an outage:
                // retrying would only fill the log.
                Err(e @ StoreError::AuthFailed(_)) => return Err(StartError::Store(e)),
                Err(e) => {
                    tracing::warn!(cause = %e, "Redis unreachable at start-up; starting anyway");
                    RedisStore::connect_lazy(url.expose(), opts, ropts).await?
                }
            };
            Ok(Arc::new(store))
        }
        None => {
            tracing::info!(
                max_bytes = config.store.memory_max_bytes.as_u64(),
                "no Redis configured: using the embedded in-memory store (one instance; streams are lost on restart)"
            );
            let limits = reprise_store::memory::MemoryLimits {
                max_bytes: config.store.memory_max_bytes.as_u64() as usize,
            };
            Ok(Arc::new(MemoryStore::new(opts, limits)))
        }
    }
}
