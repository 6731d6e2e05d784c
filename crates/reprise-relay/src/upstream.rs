//! The client side: the HTTP(S) client Reprise uses to reach upstreams, and
//! the header rules of a reverse proxy (RFC 9110 §7.6).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::body::Body;
use crate::config::{normalize_prefix, RouteConfig, TimeoutsConfig};
use crate::forwarded::Forwarding;
use crate::routes::Route;
use crate::tls::{self, TlsError};

pub mod direct;

pub use direct::UpstreamBody;

pub type HttpClient = Client<HttpsConnector<HttpConnector>, Body>;

thread_local! {
    /// The upstream clients of a thread that serves connections on its own
    /// runtime (see [`use_thread_pools`]): `(Clients::id, set)`. Their
    /// connections (and the tasks driving them) stay on this thread.
    static THREAD_SET: RefCell<Option<(u64, ClientSet)>> = const { RefCell::new(None) };
    /// Whether this thread keeps its own upstream connection pools.
    static THREAD_POOLS: Cell<bool> = const { Cell::new(false) };
}

/// Tells [`Clients::for_route`] to hand out, on this thread, clients with
/// pools of this thread's own: for a thread running a single-threaded
/// runtime, so that an upstream connection is never driven by (nor handed
/// over to) another thread.
pub fn use_thread_pools() {
    THREAD_POOLS.with(|p| p.set(true));
}

/// The upstream clients: one per distinct set of trusted roots. Routes
/// without `ca_file` share the default client (the system's roots); routes
/// naming the same CA file share that file's client, and its connection pool.
/// On a thread that called [`use_thread_pools`], a set of clients (and
/// pools) of that thread's own.
pub struct Clients {
    /// Tells apart the sets of several relays on one thread (tests).
    id: u64,
    timeouts: TimeoutsConfig,
    /// The CA files' client configs, by file.
    cas: HashMap<PathBuf, rustls::ClientConfig>,
    /// Route path (normalized, as in [`Route::path`]) → its CA file.
    route_cas: HashMap<String, PathBuf>,
    /// The set shared by every other thread.
    shared: ClientSet,
}

/// One client per distinct set of trusted roots.
#[derive(Clone)]
struct ClientSet {
    default: HttpClient,
    /// Route path → client, for the routes with a `ca_file`.
    by_route: HashMap<String, HttpClient>,
}

impl ClientSet {
    fn build(
        clients_cas: &HashMap<PathBuf, rustls::ClientConfig>,
        route_cas: &HashMap<String, PathBuf>,
        timeouts: &TimeoutsConfig,
    ) -> ClientSet {
        let by_ca: HashMap<&PathBuf, HttpClient> = clients_cas
            .iter()
            .map(|(path, tls)| (path, client_with_tls(timeouts, tls.clone())))
            .collect();
        let by_route = route_cas
            .iter()
            .filter_map(|(route, ca)| Some((route.clone(), by_ca.get(ca)?.clone())))
            .collect();
        ClientSet {
            default: build_client(timeouts),
            by_route,
        }
    }

    fn for_route(&self, route: &Route) -> &HttpClient {
        self.by_route.get(&route.path).unwrap_or(&self.default)
    }
}

impl Clients {
    /// Builds the clients of `routes` from the CA files' client configs
    /// that validation loaded (one client per file); a route whose file is
    /// missing from `cas` is a caller's error, reported as a TLS error.
    pub fn build(
        routes: &[RouteConfig],
        timeouts: &TimeoutsConfig,
        cas: &HashMap<PathBuf, rustls::ClientConfig>,
    ) -> Result<Clients, TlsError> {
        static NEXT_ID: AtomicU64 = AtomicU64::new(0);
        let mut used = HashMap::new();
        let mut route_cas = HashMap::new();
        for r in routes {
            let Some(ca) = &r.ca_file else { continue };
            let tls = cas
                .get(ca)
                .cloned()
                .ok_or_else(|| TlsError::new(ca, "not loaded by validation"))?;
            used.insert(ca.clone(), tls);
            route_cas.insert(normalize_prefix(&r.path).to_string(), ca.clone());
        }
        let shared = ClientSet::build(&used, &route_cas, timeouts);
        Ok(Clients {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            timeouts: timeouts.clone(),
            cas: used,
            route_cas,
            shared,
        })
    }

    /// The client that reaches `route`'s upstream (a cheap handle).
    pub fn for_route(&self, route: &Route) -> HttpClient {
        if !THREAD_POOLS.with(Cell::get) {
            return self.shared.for_route(route).clone();
        }
        THREAD_SET.with(|set| {
            let mut set = set.borrow_mut();
            match &*set {
                Some((id, s)) if *id == self.id => s.for_route(route).clone(),
                _ => {
                    let s = ClientSet::build(&self.cas, &self.route_cas, &self.timeouts);
                    let client = s.for_route(route).clone();
                    *set = Some((self.id, s));
                    client
                }
            }
        })
    }

    /// The client of routes without `ca_file` (the shared one).
    pub fn default_client(&self) -> &HttpClient {
        &self.shared.default
    }
}

/// Builds the shared upstream client: rustls with the system's roots,
/// HTTP/2 where the upstream offers it through ALPN, HTTP/1.1 otherwise.
pub fn build_client(timeouts: &TimeoutsConfig) -> HttpClient {
    let tls = match tls::client_config(None) {
        Ok(tls) => tls,
        // Without a CA file only the protocol versions can fail, and the
        // ring provider supports the default ones.
        Err(e) => panic!("TLS client config without a CA file: {e}"),
    };
    client_with_tls(timeouts, tls)
}

fn client_with_tls(timeouts: &TimeoutsConfig, tls: rustls::ClientConfig) -> HttpClient {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(timeouts.connect));
    http.set_nodelay(true);
    // hyper-rustls sets the ALPN protocols from the enabled versions.
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(std::time::Duration::from_secs(90))
        .build(https)
}

/// Headers that concern only one connection and are never forwarded.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Removes hop-by-hop headers, including those the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    headers.remove(header::UPGRADE);
}

/// Headers that say who the client is and how it reached the proxy chain:
/// kept only from a trusted proxy (`trusted_proxies`), else replaced.
const FORWARDING: [&str; 5] = [
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "forwarded",
    "x-real-ip",
];

/// The headers sent upstream for a client request.
///
/// End-to-end headers (Authorization, cookies, content type, ...) pass
/// unchanged. `Host` becomes the upstream's authority; `Accept-Encoding`
/// asks for an uncompressed body, which the recorder must be able to parse.
///
/// Forwarding headers: from a trusted proxy, `X-Forwarded-For` gains the
/// peer's address, `Forwarded` a `for=` element, and `X-Forwarded-Proto` /
/// `-Host` are kept (or set, if absent). From anyone else, all of them
/// (and `X-Real-IP`) are dropped and replaced: `X-Forwarded-For` is the
/// peer, `-Proto` how it reached Reprise (`https` with `[tls]`), `-Host`
/// the `Host` it asked for, or on HTTP/2 the request's `:authority`
/// (`request_authority`).
pub fn upstream_request_headers(
    client_headers: &HeaderMap,
    request_authority: Option<&http::uri::Authority>,
    fwd: &Forwarding,
    https: bool,
    upstream_authority: &str,
) -> HeaderMap {
    let mut h = client_headers.clone();
    strip_hop_by_hop(&mut h);
    // HTTP/2 (and HTTP/3) clients name the host in `:authority`, which
    // hyper puts in the request URI, and usually send no `Host` at all.
    let original_host = h
        .remove(header::HOST)
        .or_else(|| request_authority.and_then(|a| HeaderValue::from_str(a.as_str()).ok()));
    if let Ok(v) = HeaderValue::from_str(upstream_authority) {
        h.insert(header::HOST, v);
    }
    if !fwd.peer_trusted {
        for name in FORWARDING {
            h.remove(name);
        }
    }
    let xff = HeaderName::from_static("x-forwarded-for");
    let ip = fwd.peer.to_string();
    let prev: Vec<&str> = h
        .get_all(&xff)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    let forwarded_for = if prev.is_empty() {
        ip
    } else {
        format!("{}, {ip}", prev.join(", "))
    };
    if let Ok(v) = HeaderValue::from_str(&forwarded_for) {
        h.insert(xff, v);
    }
    let prev_forwarded: Vec<&str> = h
        .get_all(header::FORWARDED)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    if !prev_forwarded.is_empty() {
        let chained = format!(
            "{}, {}",
            prev_forwarded.join(", "),
            crate::forwarded::forwarded_for(fwd.peer)
        );
        if let Ok(v) = HeaderValue::from_str(&chained) {
            h.insert(header::FORWARDED, v);
        }
    }
    let proto = HeaderName::from_static("x-forwarded-proto");
    if !h.contains_key(&proto) {
        let scheme = if https { "https" } else { "http" };
        h.insert(proto, HeaderValue::from_static(scheme));
    }
    let fwd_host = HeaderName::from_static("x-forwarded-host");
    if !h.contains_key(&fwd_host) {
        if let Some(host) = original_host {
            h.insert(fwd_host, host);
        }
    }
    h.insert(
        header::ACCEPT_ENCODING,
        HeaderValue::from_static("identity"),
    );
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_dropped_and_end_to_end_kept() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret-hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer t"));
        h.insert(header::COOKIE, HeaderValue::from_static("a=b"));
        h.insert(header::HOST, HeaderValue::from_static("relay.example"));
        h.insert(header::ACCEPT_ENCODING, HeaderValue::from_static("gzip"));
        h.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        let trusted_peer = Forwarding {
            peer: "192.0.2.7".parse().unwrap(),
            peer_trusted: true,
            client_ip: "10.0.0.1".parse().unwrap(),
        };
        let out = upstream_request_headers(&h, None, &trusted_peer, false, "up:3000");
        assert!(out.get("x-secret-hop").is_none());
        assert!(out.get("keep-alive").is_none());
        assert!(out.get(header::TE).is_none());
        assert!(out.get(header::CONNECTION).is_none());
        assert_eq!(out[header::AUTHORIZATION], "Bearer t");
        assert_eq!(out[header::COOKIE], "a=b");
        assert_eq!(out[header::HOST], "up:3000");
        assert_eq!(out["x-forwarded-host"], "relay.example");
        assert_eq!(out["x-forwarded-for"], "10.0.0.1, 192.0.2.7");
        assert_eq!(out[header::ACCEPT_ENCODING], "identity");
        assert_eq!(out["x-forwarded-proto"], "http");
    }

    #[test]
    fn forwarding_headers_are_kept_from_trusted_proxies_only() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("relay.example"));
        h.insert("x-forwarded-for", HeaderValue::from_static("6.6.6.6"));
        h.append("x-forwarded-for", HeaderValue::from_static("7.7.7.7"));
        h.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        h.insert("x-forwarded-host", HeaderValue::from_static("evil.example"));
        h.insert(header::FORWARDED, HeaderValue::from_static("for=6.6.6.6"));
        h.insert("x-real-ip", HeaderValue::from_static("6.6.6.6"));
        let mut fwd = Forwarding {
            peer: "203.0.113.5".parse().unwrap(),
            peer_trusted: false,
            client_ip: "203.0.113.5".parse().unwrap(),
        };
        let out = upstream_request_headers(&h, None, &fwd, false, "up");
        assert_eq!(out["x-forwarded-for"], "203.0.113.5");
        assert_eq!(out["x-forwarded-proto"], "http");
        assert_eq!(out["x-forwarded-host"], "relay.example");
        assert!(out.get(header::FORWARDED).is_none());
        assert!(out.get("x-real-ip").is_none());
        let out = upstream_request_headers(&h, None, &fwd, true, "up");
        assert_eq!(out["x-forwarded-proto"], "https");

        fwd.peer_trusted = true;
        let out = upstream_request_headers(&h, None, &fwd, false, "up");
        assert_eq!(out["x-forwarded-for"], "6.6.6.6, 7.7.7.7, 203.0.113.5");
        assert_eq!(out["x-forwarded-proto"], "https");
        assert_eq!(out["x-forwarded-host"], "evil.example");
        assert_eq!(out[header::FORWARDED], "for=6.6.6.6, for=203.0.113.5");
        assert_eq!(out["x-real-ip"], "6.6.6.6");
    }

    #[test]
    fn http2_requests_forward_their_authority_as_host() {
        let fwd = Forwarding {
            peer: "203.0.113.5".parse().unwrap(),
            peer_trusted: false,
            client_ip: "203.0.113.5".parse().unwrap(),
        };
        let authority: http::uri::Authority = "relay.example:8443".parse().unwrap();
        let out = upstream_request_headers(&HeaderMap::new(), Some(&authority), &fwd, true, "up");
        assert_eq!(out["x-forwarded-host"], "relay.example:8443");
        assert_eq!(out[header::HOST], "up");
        // A Host header, where there is one, wins.
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("relay.example"));
        let out = upstream_request_headers(&h, Some(&authority), &fwd, true, "up");
        assert_eq!(out["x-forwarded-host"], "relay.example");
    }
}
