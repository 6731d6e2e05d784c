//! Configuration: the TOML file shape, its defaults, and validation.
//!
//! Loaded once at start-up ([`Config::load`]: the file, then env vars and
//! CLI flags), then checked by [`Config::validate`]. Every key is
//! documented in `docs/config.md`; `config/reprise.toml` is a commented example.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use bytesize::ByteSize;
use serde::Deserialize;

/// A secret string (a Redis URL with a password): `Debug` and `Display` mask it.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }

    /// The secret itself: only for handing to the client library that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

/// A Redis URL with any user info replaced by `***`, for logs.
pub fn redact_url(url: &str) -> String {
    mask_credentials(url)
}

/// Masks the user info of every URL in `text` (`redis://user:pw@host` →
/// `redis://***@host`), for messages that may quote a config file or URL.
pub fn mask_credentials(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        let end = tail
            // The authority ends at the path, query or fragment; user info is
            // everything before its last '@'.
            .find(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '`' | '/' | '?' | '#'))
            .unwrap_or(tail.len());
        match tail[..end].rfind('@') {
            Some(at) => {
                out.push_str("***");
                rest = &tail[at..];
            }
            None => rest = tail,
        }
    }
    out.push_str(rest);
    out
}

/// What [`Config::validate`] read from the TLS files the config names.
#[derive(Clone, Debug, Default)]
pub struct LoadedTls {
    /// `[tls]`: the listener's certificate chain and key.
    pub listener: Option<std::sync::Arc<rustls::ServerConfig>>,
    /// `routes[].ca_file`: a client config (system roots + the file's CAs)
    /// per distinct file.
    pub upstream_cas: std::collections::HashMap<PathBuf, rustls::ClientConfig>,
    /// `store.ca_file`: the Redis connection's client config.
    pub redis: Option<rustls::ClientConfig>,
}

/// What the command line and the environment say over the config file.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    /// `--config FILE`.
    pub file: Option<PathBuf>,
    /// `--listen ADDR`.
    pub listen: Option<SocketAddr>,
    /// `--admin-listen ADDR` (over `$REPRISE_ADMIN_LISTEN`, over the file).
    pub admin_listen: Option<SocketAddr>,
    /// `--redis URL`.
    pub redis: Option<String>,
    /// `--upstream URL`: one route `/` replacing the file's routes.
    pub upstream: Option<String>,
    /// `--threads N` (over `$REPRISE_THREADS`, over the file).
    pub threads: Option<usize>,
}

/// Errors found while loading or validating a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid config: {0}")]
    Parse(String),
    #[error("invalid config: {0}")]
    Invalid(String),
}

/// The whole configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address the relay listens on.
    pub listen: SocketAddr,
    /// A second, plain-HTTP listener for `/_reprise/metrics`, `healthz` and
    /// `readyz`; when set they are served only there (`404` on `listen`).
    pub admin_listen: Option<SocketAddr>,
    /// `[tls]`: serve HTTPS on `listen` with this certificate.
    pub tls: Option<ListenerTls>,
    pub store: StoreConfig,
    pub limits: LimitsConfig,
    pub timeouts: TimeoutsConfig,
    pub streams: StreamsConfig,
    pub auth: AuthConfig,
    pub routes: Vec<RouteConfig>,
    /// `[durable]`: the Durable Streams server (docs/durable.md).
    pub durable: DurableConfig,
    /// Peers (CIDRs) whose `X-Forwarded-For`, `X-Forwarded-Proto`,
    /// `X-Forwarded-Host` and `Forwarded` headers are believed; from any
    /// other peer they are replaced.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Threads serving connections, each with its own single-threaded
    /// runtime and its own listener on `listen` (`SO_REUSEPORT`), so that a
    /// stream's connections and tasks stay on one thread. 0: one per core.
    pub threads: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            admin_listen: None,
            tls: None,
            store: StoreConfig::default(),
            limits: LimitsConfig::default(),
            timeouts: TimeoutsConfig::default(),
            streams: StreamsConfig::default(),
            auth: AuthConfig::default(),
            routes: Vec::new(),
            durable: DurableConfig::default(),
            trusted_proxies: Vec::new(),
            threads: 0,
        }
    }
}

/// `[store]`: where streams are kept.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// Redis URL in fred's syntax; `None` selects the embedded in-memory store.
    pub redis_url: Option<Secret>,
    /// Prefix of every Redis key.
    pub key_prefix: String,
    /// How long a finished stream stays resumable.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// Memory bound of the embedded store (payload bytes of all streams).
    pub memory_max_bytes: ByteSize,
    /// PEM file of a CA trusted, besides the system's roots, for `rediss://`.
    pub ca_file: Option<PathBuf>,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            redis_url: None,
            key_prefix: "reprise:".to_string(),
            retention: Duration::from_secs(24 * 3600),
            memory_max_bytes: ByteSize::mib(256),
            ca_file: None,
        }
    }
}

/// `[tls]`: the listener's certificate; when set, `listen` serves HTTPS
/// (HTTP/2 or HTTP/1.1 through ALPN).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerTls {
    /// PEM: the server certificate, then any intermediates.
    pub cert_file: PathBuf,
    /// PEM: the certificate's private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
}

/// `[limits]`: bounds on input, all enforced without buffering past them.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Longest upstream SSE line.
    pub max_line: ByteSize,
    /// Largest upstream SSE event.
    pub max_event: ByteSize,
    /// Most events recorded in one stream.
    pub max_stream_events: u64,
    /// Most bytes recorded in one stream.
    pub max_stream_bytes: ByteSize,
    /// Largest request body forwarded (or buffered to extract a JSON key);
    /// larger ones are answered `413`.
    pub max_request_body: ByteSize,
    /// Largest request head (request line and headers); larger ones are
    /// answered `431`.
    pub max_request_headers: ByteSize,
    /// Most request header fields; more are answered `431`.
    pub max_request_header_count: usize,
    /// Streams one caller may have open at once on a route (0: unlimited).
    pub max_streams_per_caller: u32,
    /// Streams one caller may start per minute on a route (0: unlimited).
    pub max_starts_per_caller_per_minute: u32,
    /// Most client connections open at once; more are answered `503`.
    pub max_connections: usize,
    /// Most payload bytes of one stream held in memory while the store does
    /// not accept them; past it the unstored part is dropped as a gap.
    pub max_unstored_stream_bytes: ByteSize,
    /// The same bound over all streams of this instance.
    pub max_unstored_bytes: ByteSize,
    /// Most bytes of stream frames all logs of this instance hold in memory
    /// (besides the unstored ones, bounded above): past it, frames already
    /// stored are released, oldest first, and read from the store again.
    pub max_log_bytes: ByteSize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_line: ByteSize::mib(1),
            max_event: ByteSize::mib(4),
            max_stream_events: 1_000_000,
            max_stream_bytes: ByteSize::mib(64),
            max_request_body: ByteSize::mib(16),
            max_request_headers: ByteSize::kib(64),
            max_request_header_count: 100,
            max_streams_per_caller: 0,
            max_starts_per_caller_per_minute: 0,
            max_connections: 50_000,
            max_unstored_stream_bytes: ByteSize::mib(16),
            max_unstored_bytes: ByteSize::mib(256),
            max_log_bytes: ByteSize::mib(256),
        }
    }
}

/// `[timeouts]`: how long Reprise waits for an upstream.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TimeoutsConfig {
    /// TCP (and TLS) connect to the upstream.
    #[serde(with = "humantime_serde")]
    pub connect: Duration,
    /// From sending the request to the upstream's response headers.
    #[serde(with = "humantime_serde")]
    pub response: Duration,
    /// Longest silence between two chunks of a streamed upstream body.
    #[serde(with = "humantime_serde")]
    pub idle: Duration,
    /// Longest a stream may be recorded.
    #[serde(with = "humantime_serde")]
    pub max_stream_duration: Duration,
    /// On SIGTERM/SIGINT: how long in-flight streams may continue.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Longest a client connection may accept none of the bytes Reprise has
    /// for it (a reader that stopped reading) before Reprise closes it; the
    /// client can resume.
    #[serde(with = "humantime_serde")]
    pub client_write: Duration,
}

impl Default for TimeoutsConfig {
    fn default() -> Self {
        TimeoutsConfig {
            connect: Duration::from_secs(10),
            response: Duration::from_secs(120),
            idle: Duration::from_secs(300),
            max_stream_duration: Duration::from_secs(3600),
            shutdown_grace: Duration::from_secs(30),
            client_write: Duration::from_secs(60),
        }
    }
}

/// `[streams]`: how readers are served.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StreamsConfig {
    /// A `: keep-alive` comment is sent to a reader after this much silence.
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
    /// A reader of a stream produced by another instance re-reads the store
    /// at least this often, even without a notification.
    #[serde(with = "humantime_serde")]
    pub tail_poll_interval: Duration,
    /// How long a finished stream stays cached in this instance's memory for
    /// fast resumes, after its last entry is stored.
    #[serde(with = "humantime_serde")]
    pub hot_linger: Duration,
    /// The producing instance renews its lease on each stream it records
    /// every third of this; readers elsewhere end a stream whose lease
    /// expired with `producer_lost`.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    /// How long a request with a known `Idempotency-Key` waits for the
    /// stream of the first request to start before calling the upstream itself.
    #[serde(with = "humantime_serde")]
    pub idempotency_wait: Duration,
    /// How long the store writer of a stream waits after new events before
    /// appending them, so that one append carries several events. Readers
    /// on this instance are not delayed; readers on other instances lag by
    /// up to this much. Zero appends as soon as events arrive.
    #[serde(with = "humantime_serde")]
    pub store_linger: Duration,
}

impl Default for StreamsConfig {
    fn default() -> Self {
        StreamsConfig {
            heartbeat: Duration::from_secs(15),
            tail_poll_interval: Duration::from_secs(1),
            hot_linger: Duration::from_secs(30),
            lease: Duration::from_secs(6),
            idempotency_wait: Duration::from_secs(10),
            store_linger: Duration::from_millis(50),
        }
    }
}

/// `[auth]`: the secret behind caller identities.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// HMAC key for caller identities; the same on every instance. Falls
    /// back to `REPRISE_AUTH_SECRET`, else a built-in key (with a warning).
    pub secret: Option<Secret>,
}

/// `[durable]`: the Durable Streams server (docs/durable.md): streams that
/// a writer creates and appends to over HTTP, read by offset.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DurableConfig {
    /// Serve the protocol at all.
    pub enabled: bool,
    /// Where streams are mounted: `{path}/{name}`.
    pub path: String,
    /// How long a long-poll read waits for data before `204`.
    #[serde(with = "humantime_serde")]
    pub long_poll_timeout: Duration,
    /// Bearer token of writers (and readers); falls back to
    /// `REPRISE_DURABLE_WRITE_TOKEN`.
    pub write_token: Option<Secret>,
    /// Bearer token of readers; falls back to `REPRISE_DURABLE_READ_TOKEN`.
    pub read_token: Option<Secret>,
    /// Writes need no token.
    pub anonymous_writes: bool,
    /// Reads need no token.
    pub anonymous_reads: bool,
    /// How long a pre-signed read URL (`Stream-Read-URL`, signed under
    /// `auth.secret`) stays valid.
    #[serde(with = "humantime_serde")]
    pub read_url_ttl: Duration,
    /// Where the proxy protocol is served: `POST {proxy_path}` starts a
    /// proxied stream, `{proxy_path}/{id}` reads and aborts it.
    pub proxy_path: String,
    /// Upstream URL prefixes the proxy may reach (`https://host[:port]/path`);
    /// empty: none.
    pub proxy_allow: Vec<String>,
}

impl Default for DurableConfig {
    fn default() -> Self {
        DurableConfig {
            enabled: false,
            path: "/v1/stream".into(),
            long_poll_timeout: Duration::from_secs(20),
            write_token: None,
            read_token: None,
            anonymous_writes: false,
            anonymous_reads: false,
            read_url_ttl: Duration::from_secs(3600),
            proxy_path: "/v1/proxy".into(),
            proxy_allow: Vec::new(),
        }
    }
}

/// `routes[].caller`: what identifies a caller on a route.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct CallerConfig {
    /// Request headers (whole values).
    pub headers: Vec<String>,
    /// Cookie names (their values in the `Cookie` header).
    pub cookies: Vec<String>,
}

impl Default for CallerConfig {
    fn default() -> Self {
        CallerConfig {
            headers: vec!["authorization".into(), "cookie".into()],
            cookies: Vec::new(),
        }
    }
}

/// `routes[].resume_auth`: who may resume by stream id or `Last-Event-ID`.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum ResumeAuth {
    /// Whoever has the (unguessable) stream id or event id.
    #[default]
    Capability,
    /// Only the caller that started the stream.
    SameCaller,
}

/// `routes[].signals`: how a failed stream's in-band signal is spelled on
/// an SSE stream (NDJSON streams always get Ollama's `{"error": ...}` line).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Signals {
    /// Picked per stream from what it shows: AI SDK headers, Anthropic or
    /// OpenAI events; `reprise` otherwise.
    #[default]
    Auto,
    /// `event: reprise-error`.
    Reprise,
    /// OpenAI's error object.
    #[serde(rename = "openai")]
    OpenAi,
    /// Anthropic's `event: error`.
    Anthropic,
    /// The AI SDK's `error` part.
    AiSdk,
}

impl Signals {
    /// The dialect this setting fixes, or `None` for `auto`.
    pub fn fixed(&self) -> Option<reprise_core::Dialect> {
        use reprise_core::Dialect;
        match self {
            Signals::Auto => None,
            Signals::Reprise => Some(Dialect::Reprise),
            Signals::OpenAi => Some(Dialect::OpenAi),
            Signals::Anthropic => Some(Dialect::Anthropic),
            Signals::AiSdk => Some(Dialect::AiSdk),
        }
    }
}

/// `routes[].limits`: a route's own rate limits per caller; a key left out
/// takes the `[limits]` value.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct RouteLimits {
    pub max_streams_per_caller: Option<u32>,
    pub max_starts_per_caller_per_minute: Option<u32>,
}

/// Where a route finds the key (e.g. chat id) that names its latest stream.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum KeySource {
    /// A JSON pointer (RFC 6901) into the JSON request body, e.g. `/id`.
    Json(String),
    /// A request header, e.g. `x-chat-id`.
    Header(String),
    /// A query parameter, e.g. `chat`.
    Query(String),
}

/// `[[routes]]`: one upstream behind a path prefix.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Path prefix, matched on segment boundaries; the longest match wins.
    pub path: String,
    /// Upstream base URL (`http://` or `https://`). If it has a path, that
    /// path replaces the route prefix; otherwise the request path is kept.
    pub upstream: String,
    /// Where the route's key comes from, if streams are resumable by key.
    #[serde(default)]
    pub key: Option<KeySource>,
    /// Resume URL template containing `{key}`, e.g. `/api/chat/{key}/stream`.
    #[serde(default)]
    pub resume: Option<String>,
    /// Stop URL template containing `{key}`, e.g. `/api/chat/{key}/stop`:
    /// a `POST` there cancels the key's latest stream (the AI SDK's
    /// convention for `stop()` in a resumable chat).
    #[serde(default)]
    pub stop: Option<String>,
    /// Record SSE responses (default true); `false` makes a plain pass-through route.
    #[serde(default = "default_true")]
    pub record: bool,
    /// What identifies a caller (for key resumes, cancels, `same-caller`).
    #[serde(default)]
    pub caller: CallerConfig,
    /// Who may resume by stream id or `Last-Event-ID`.
    #[serde(default)]
    pub resume_auth: ResumeAuth,
    /// PEM file of a CA trusted, besides the system's roots, for this
    /// route's `https://` upstream.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Rate limits per caller overriding `[limits]` on this route.
    #[serde(default)]
    pub limits: RouteLimits,
    /// The dialect of in-band signals on this route's SSE streams.
    #[serde(default)]
    pub signals: Signals,
}

impl RouteConfig {
    /// A route with every optional key at its default, exactly as a
    /// `[[routes]]` table with only `path` and `upstream` would give.
    pub fn new(path: &str, upstream: &str) -> Result<RouteConfig, ConfigError> {
        let mut table = toml::Table::new();
        table.insert("path".into(), path.into());
        table.insert("upstream".into(), upstream.into());
        RouteConfig::deserialize(table).map_err(|e| ConfigError::Parse(e.to_string()))
    }
}

fn default_true() -> bool {
    true
}

impl Config {
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))
    }

    /// How many threads serve connections: `threads`, or one per core
    /// (the available parallelism) when it is 0.
    pub fn serving_threads(&self) -> usize {
        match self.threads {
            0 => std::thread::available_parallelism().map_or(1, usize::from),
            n => n,
        }
    }

    pub fn from_file(path: &str) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_string(),
            source,
        })?;
        Config::from_toml(&text)
    }

    /// The configuration the binary runs with: the file (or the defaults),
    /// then `env` and `over`, in this order for the Redis URL: `--redis`,
    /// `$REPRISE_REDIS_URL`, the file's `store.redis_url`, `$REDIS_URL`.
    /// `env` reads an environment variable (empty counts as unset). Not
    /// validated here: the server validates once.
    pub fn load(
        over: &Overrides,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let mut config = match &over.file {
            Some(path) => Config::from_file(&path.to_string_lossy())?,
            None => Config::default(),
        };
        let env = |name: &str| env(name).filter(|v| !v.trim().is_empty());
        if let Some(listen) = over.listen {
            config.listen = listen;
        }
        if let Some(admin) = over.admin_listen {
            config.admin_listen = Some(admin);
        } else if let Some(v) = env("REPRISE_ADMIN_LISTEN") {
            let addr = v
                .trim()
                .parse()
                .map_err(|e| ConfigError::Invalid(format!("REPRISE_ADMIN_LISTEN {v:?}: {e}")))?;
            config.admin_listen = Some(addr);
        }
        config.store.redis_url = over
            .redis
            .clone()
            .or_else(|| env("REPRISE_REDIS_URL"))
            .map(Secret::new)
            .or(config.store.redis_url.take())
            .or_else(|| env("REDIS_URL").map(Secret::new));
        if config.auth.secret.is_none() {
            config.auth.secret = env("REPRISE_AUTH_SECRET").map(Secret::new);
        }
        if let Some(n) = over.threads {
            config.threads = n;
        } else if let Some(v) = env("REPRISE_THREADS") {
            config.threads = v
                .trim()
                .parse()
                .map_err(|e| ConfigError::Invalid(format!("REPRISE_THREADS {v:?}: {e}")))?;
        }
        if config.durable.write_token.is_none() {
            config.durable.write_token = env("REPRISE_DURABLE_WRITE_TOKEN").map(Secret::new);
        }
        if config.durable.read_token.is_none() {
            config.durable.read_token = env("REPRISE_DURABLE_READ_TOKEN").map(Secret::new);
        }
        if let Some(upstream) = &over.upstream {
            config.routes = vec![RouteConfig::new("/", upstream)?];
        }
        Ok(config)
    }

    /// `durable.proxy_path` and `durable.proxy_allow`.
    fn validate_proxy(&self) -> Result<(), ConfigError> {
        let d = &self.durable;
        let bad = |m: String| Err(ConfigError::Invalid(m));
        let p = &d.proxy_path;
        let under = |a: &str, b: &str| a == b || a.starts_with(&format!("{b}/"));
        if !p.starts_with('/')
            || p.ends_with('/')
            || p.starts_with("/_reprise")
            || under(p, &d.path)
            || under(&d.path, p)
        {
            return bad(format!(
                "durable.proxy_path must start with '/', not end with '/', not be under /_reprise and not overlap durable.path: {p:?}"
            ));
        }
        for a in &d.proxy_allow {
            let ok = a.parse::<http::Uri>().is_ok_and(|u| {
                matches!(u.scheme_str(), Some("http" | "https"))
                    && u.authority().is_some_and(|au| !au.as_str().contains('@'))
            });
            if !ok {
                return bad(format!(
                    "durable.proxy_allow entries are http(s) URL prefixes with a host: {a:?}"
                ));
            }
        }
        if !d.proxy_allow.is_empty() && self.auth.secret.is_none() {
            return bad(
                "durable.proxy_allow needs auth.secret (or REPRISE_AUTH_SECRET): it signs the proxy's read URLs"
                    .into(),
            );
        }
        Ok(())
    }

    /// Checks what serde cannot: consistent routes and sane bounds, and
    /// reads every TLS file the config names. What it read is returned, so
    /// that starting the relay reads no file twice.
    pub fn validate(&self) -> Result<LoadedTls, ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        // Port 0 twice is fine: each listener gets its own free port.
        if self.admin_listen == Some(self.listen) && self.listen.port() != 0 {
            return bad(format!(
                "admin_listen {} must differ from listen",
                self.listen
            ));
        }
        if self.durable.enabled {
            let d = &self.durable;
            if !d.path.starts_with('/') || d.path.ends_with('/') || d.path.starts_with("/_reprise")
            {
                return bad(format!(
                    "durable.path must start with '/', not end with '/' and not be under /_reprise: {:?}",
                    d.path
                ));
            }
            if d.long_poll_timeout.is_zero() {
                return bad("durable.long_poll_timeout must be positive".into());
            }
            self.validate_proxy()?;
        }
        if self.routes.is_empty() && !self.durable.enabled {
            return bad("no routes: give --upstream URL or at least one [[routes]] entry".into());
        }
        let mut seen = std::collections::HashSet::new();
        for (i, r) in self.routes.iter().enumerate() {
            let at = format!("routes[{i}]");
            if !r.path.starts_with('/') {
                return bad(format!("{at}.path must start with '/': {:?}", r.path));
            }
            if r.path.starts_with("/_reprise") {
                return bad(format!(
                    "{at}.path: /_reprise is reserved for Reprise's own endpoints"
                ));
            }
            if !seen.insert(normalize_prefix(&r.path)) {
                return bad(format!("{at}.path {:?} is defined twice", r.path));
            }
            match r.upstream.parse::<http::Uri>() {
                Ok(u)
                    if matches!(u.scheme_str(), Some("http") | Some("https"))
                        && u.authority().is_some() =>
                {
                    if u.query().is_some() {
                        return bad(format!("{at}.upstream must not have a query string"));
                    }
                }
                _ => {
                    return bad(format!(
                        "{at}.upstream must be an http:// or https:// URL: {:?}",
                        r.upstream
                    ))
                }
            }
            if let Some(KeySource::Json(p)) = &r.key {
                if !p.is_empty() && !p.starts_with('/') {
                    return bad(format!(
                        "{at}.key.json must be a JSON pointer starting with '/': {p:?}"
                    ));
                }
            }
            for (name, template) in [("resume", &r.resume), ("stop", &r.stop)] {
                let Some(t) = template else { continue };
                if r.key.is_none() {
                    return bad(format!(
                        "{at}.{name} needs {at}.key: the template names a key's latest stream"
                    ));
                }
                if !t.starts_with('/') || t.matches("{key}").count() != 1 {
                    return bad(format!(
                        "{at}.{name} must start with '/' and contain {{key}} exactly once: {t:?}"
                    ));
                }
                if t.starts_with("/_reprise") {
                    return bad(format!("{at}.{name}: /_reprise is reserved"));
                }
            }
        }
        if self.threads > 1024 {
            return bad(format!("threads must be at most 1024: {}", self.threads));
        }
        let l = &self.limits;
        if l.max_line.as_u64() < 1024 || l.max_event.as_u64() < 1024 {
            return bad("limits.max_line and limits.max_event must be at least 1 KiB".into());
        }
        if l.max_stream_events == 0 || l.max_stream_bytes.as_u64() < l.max_event.as_u64() {
            return bad(
                "limits.max_stream_bytes must be at least limits.max_event, max_stream_events > 0"
                    .into(),
            );
        }
        if l.max_request_headers.as_u64() < 8192
            || l.max_request_headers.as_u64() > (u32::MAX as u64)
        {
            return bad("limits.max_request_headers must be between 8 KiB and 4 GiB".into());
        }
        if l.max_request_header_count == 0 {
            return bad("limits.max_request_header_count must be more than 0".into());
        }
        if self.store.retention.is_zero() {
            return bad("store.retention must be more than 0".into());
        }
        if self.timeouts.client_write.is_zero() {
            return bad("timeouts.client_write must be more than 0".into());
        }
        if self.streams.lease < Duration::from_millis(300) {
            return bad("streams.lease must be at least 300ms".into());
        }
        if self.streams.heartbeat.is_zero() || self.streams.tail_poll_interval.is_zero() {
            return bad(
                "streams.heartbeat and streams.tail_poll_interval must be more than 0".into(),
            );
        }
        if self
            .store
            .key_prefix
            .bytes()
            .any(|b| b.is_ascii_control() || b == b' ')
        {
            return bad("store.key_prefix must not contain spaces or control characters".into());
        }
        self.load_tls()
    }

    /// Reads every TLS file the config names, so that a missing or invalid
    /// one stops start-up (and `--check-config`) with its name.
    fn load_tls(&self) -> Result<LoadedTls, ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        let mut loaded = LoadedTls::default();
        if let Some(t) = &self.tls {
            match crate::tls::server_config(&t.cert_file, &t.key_file) {
                Ok(c) => loaded.listener = Some(c),
                Err(e) => return bad(format!("tls: {e}")),
            }
        }
        for (i, r) in self.routes.iter().enumerate() {
            let Some(ca) = &r.ca_file else { continue };
            if !r.upstream.starts_with("https://") {
                return bad(format!("routes[{i}].ca_file needs an https:// upstream"));
            }
            if loaded.upstream_cas.contains_key(ca) {
                continue;
            }
            match crate::tls::client_config(Some(ca)) {
                Ok(c) => loaded.upstream_cas.insert(ca.clone(), c),
                Err(e) => return bad(format!("routes[{i}].ca_file: {e}")),
            };
        }
        if let Some(ca) = &self.store.ca_file {
            let url = self.store.redis_url.as_ref();
            let tls_url = url.is_some_and(|u| redis_url_uses_tls(u.expose()));
            if !tls_url {
                return bad("store.ca_file needs a rediss:// (TLS) Redis URL".into());
            }
            match crate::tls::client_config(Some(ca)) {
                Ok(c) => loaded.redis = Some(c),
                Err(e) => return bad(format!("store.ca_file: {e}")),
            }
        }
        Ok(loaded)
    }
}

/// Whether a Redis URL asks for TLS (`rediss://`, `rediss-cluster://`, ...).
pub fn redis_url_uses_tls(url: &str) -> bool {
    let scheme = url.split_once("://").map_or("", |(scheme, _)| scheme);
    let base = scheme
        .strip_suffix("-cluster")
        .or_else(|| scheme.strip_suffix("-sentinel"))
        .unwrap_or(scheme);
    matches!(base, "rediss" | "valkeys")
}

/// `/api/chat/` and `/api/chat` are the same prefix.
pub(crate) fn normalize_prefix(p: &str) -> &str {
    if p.len() > 1 {
        p.trim_end_matches('/')
    } else {
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../../config/reprise.toml");

    #[test]
    fn example_config_parses_and_validates() {
        let c = Config::from_toml(EXAMPLE).unwrap();
        c.validate().unwrap();
        assert_eq!(c.store.key_prefix, "reprise:");
        assert_eq!(c.store.retention, Duration::from_secs(24 * 3600));
        assert_eq!(c.routes[0].key, Some(KeySource::Json("/id".into())));
    }

    #[test]
    fn key_sources_parse() {
        let c = Config::from_toml(
            r#"
            [[routes]]
            path = "/a"
            upstream = "http://127.0.0.1:1"
            key = { header = "x-chat-id" }
            [[routes]]
            path = "/b"
            upstream = "https://example.com/v1"
            key = { query = "chat" }
            "#,
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.routes[0].key, Some(KeySource::Header("x-chat-id".into())));
        assert_eq!(c.routes[1].key, Some(KeySource::Query("chat".into())));
    }

    #[test]
    fn signals_parse_and_default_to_auto() {
        let c = Config::from_toml(
            r#"
            [[routes]]
            path = "/a"
            upstream = "http://127.0.0.1:1"
            [[routes]]
            path = "/b"
            upstream = "http://127.0.0.1:1"
            signals = "ai-sdk"
            [[routes]]
            path = "/c"
            upstream = "http://127.0.0.1:1"
            signals = "openai"
            "#,
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.routes[0].signals, Signals::Auto);
        assert_eq!(c.routes[0].signals.fixed(), None);
        assert_eq!(
            c.routes[1].signals.fixed(),
            Some(reprise_core::Dialect::AiSdk)
        );
        assert_eq!(
            c.routes[2].signals.fixed(),
            Some(reprise_core::Dialect::OpenAi)
        );
    }

    #[test]
    fn invalid_configs_are_rejected_with_a_reason() {
        for (text, needle) in [
            ("lissen = \"1\"", "unknown field"),
            ("[store]\nretention = \"forever\"", "retention"),
            ("", "no routes"),
            ("[[routes]]\npath = \"api\"\nupstream = \"http://x\"", "start with '/'"),
            ("[[routes]]\npath = \"/a\"\nupstream = \"ftp://x\"", "http:// or https://"),
            ("[[routes]]\npath = \"/a\"\nupstream = \"http://x\"\nresume = \"/a/{key}\"", "needs"),
            ("[[routes]]\npath = \"/a\"\nupstream = \"http://x\"\nkey = { json = \"/id\" }\nresume = \"/a/stream\"", "{key}"),
            ("[[routes]]\npath = \"/a\"\nupstream = \"http://x\"\nkey = { cookie = \"c\" }", "unknown variant"),
            ("[[routes]]\npath = \"/_reprise/x\"\nupstream = \"http://x\"", "reserved"),
            ("[[routes]]\npath = \"/a\"\nupstream = \"http://x\"\nsignals = \"gemini\"", "unknown variant"),
            ("admin_listen = \"localhost:9090\"", "admin_listen"),
            ("listen = \"127.0.0.1:9090\"\nadmin_listen = \"127.0.0.1:9090\"\n[[routes]]\npath = \"/a\"\nupstream = \"http://x\"", "must differ from listen"),
            ("[[routes]]\npath = \"/a\"\nupstream = \"http://x\"\n[[routes]]\npath = \"/a/\"\nupstream = \"http://y\"", "twice"),
        ] {
            let err = Config::from_toml(text).and_then(|c| c.validate()).unwrap_err().to_string();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }

    #[test]
    fn credentials_in_messages_are_masked() {
        for (text, want) in [
            (
                "redis_url = redis://user:hunter2@127.0.0.1:6379\n",
                "redis_url = redis://***@127.0.0.1:6379\n",
            ),
            (
                "\"rediss://:pw@a:1\" and redis-cluster://u:p@b:2?node=c:3",
                "\"rediss://***@a:1\" and redis-cluster://***@b:2?node=c:3",
            ),
            (
                "https://api.example.com/v1/@scope?x=a@b",
                "https://api.example.com/v1/@scope?x=a@b",
            ),
            ("no url here: user:pw@host", "no url here: user:pw@host"),
            ("ends with redis://", "ends with redis://"),
        ] {
            assert_eq!(mask_credentials(text), want);
        }
    }

    #[test]
    fn a_route_from_flags_has_the_files_defaults() {
        let built = RouteConfig::new("/", "http://127.0.0.1:1").unwrap();
        let parsed =
            Config::from_toml("[[routes]]\npath = \"/\"\nupstream = \"http://127.0.0.1:1\"\n")
                .unwrap()
                .routes
                .remove(0);
        assert_eq!(format!("{built:?}"), format!("{parsed:?}"));
    }

    #[test]
    fn flags_and_env_override_the_file_in_order() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                vars.iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.to_string())
            }
        };
        let url = |c: &Config| c.store.redis_url.as_ref().map(|u| u.expose().to_string());
        let none = Overrides::default();
        // $REDIS_URL is the last resort; an empty variable counts as unset.
        let c = Config::load(
            &none,
            env(&[("REDIS_URL", "redis://low:1"), ("REPRISE_REDIS_URL", " ")]),
        )
        .unwrap();
        assert_eq!(url(&c).as_deref(), Some("redis://low:1"));
        let c = Config::load(
            &none,
            env(&[
                ("REDIS_URL", "redis://low:1"),
                ("REPRISE_REDIS_URL", "redis://mid:1"),
            ]),
        )
        .unwrap();
        assert_eq!(url(&c).as_deref(), Some("redis://mid:1"));
        let flags = Overrides {
            redis: Some("redis://top:1".into()),
            upstream: Some("http://127.0.0.1:9".into()),
            listen: Some("127.0.0.1:9999".parse().unwrap()),
            ..Overrides::default()
        };
        let c = Config::load(
            &flags,
            env(&[
                ("REPRISE_REDIS_URL", "redis://mid:1"),
                ("REPRISE_AUTH_SECRET", "s"),
            ]),
        )
        .unwrap();
        assert_eq!(url(&c).as_deref(), Some("redis://top:1"));
        assert_eq!(c.listen.port(), 9999);
        assert_eq!(c.routes.len(), 1);
        assert_eq!(c.routes[0].upstream, "http://127.0.0.1:9");
        assert_eq!(c.auth.secret.as_ref().map(Secret::expose), Some("s"));
    }

    #[test]
    fn threads_come_from_the_flag_then_the_environment_then_the_file() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.to_string())
            }
        };
        let none = Overrides::default();
        let c = Config::load(&none, env(&[])).unwrap();
        assert_eq!(c.threads, 0);
        assert!(c.serving_threads() >= 1, "0 means one per core");
        let c = Config::load(&none, env(&[("REPRISE_THREADS", "3")])).unwrap();
        assert_eq!(c.serving_threads(), 3);
        let flag = Overrides {
            threads: Some(1),
            ..Overrides::default()
        };
        let c = Config::load(&flag, env(&[("REPRISE_THREADS", "3")])).unwrap();
        assert_eq!(c.serving_threads(), 1);
        assert!(matches!(
            Config::load(&none, env(&[("REPRISE_THREADS", "many")])),
            Err(ConfigError::Invalid(_))
        ));
        let mut c =
            Config::from_toml("threads = 2\n[[routes]]\npath = \"/\"\nupstream = \"http://u\"\n")
                .unwrap();
        assert_eq!(c.serving_threads(), 2);
        c.threads = 5000;
        assert!(c.validate().is_err(), "more than 1024 threads");
    }

    #[test]
    fn secrets_are_masked() {
        let s = Secret::new("redis://user:hunter2@host:6379");
        assert!(!format!("{s:?}").contains("hunter2"));
        assert_eq!(redact_url(s.expose()), "redis://***@host:6379");
        assert_eq!(redact_url("redis://host:6379"), "redis://host:6379");
    }
}
