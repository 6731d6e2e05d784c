//! The Durable Streams proxy protocol (issue 16, item 3; PROXY_PROTOCOL.md
//! of durable-streams): `POST {proxy_path}` with `Upstream-URL` and
//! `Upstream-Method` sends the request upstream through
//! [`forward`](crate::forward) (a route made for the request: the same
//! recorder, limits and metrics as a configured route), and answers `201`
//! with a pre-signed `Location` (HMAC under `auth.secret`, with an expiry).
//! Through that URL: `GET` reads the recording as a Durable Stream
//! ([`recorded`](super::recorded)), `PATCH ?action=abort` cancels the
//! upstream ([`cancel`](crate::cancel)). Upstreams must match
//! `durable.proxy_allow` (empty: none).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use hmac::{Hmac, Mac};
use http::{
    header, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri,
};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use reprise_core::StreamId;
use sha2::Sha256;

use super::access::{self, Need};
use super::error::DsError;
use super::headers;
use super::recorded;
use crate::body::{empty, full, Body};
use crate::config::{CallerConfig, Config, ResumeAuth};
use crate::error::RelayError;
use crate::routes::{is_unsafe_path, Route};
use crate::state::Relay;
use crate::uri::query_param;

type HmacSha256 = Hmac<Sha256>;

/// The longest validity a client may ask for with `Stream-Signed-URL-TTL`.
const MAX_URL_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// Upstream error bodies passed back in a `502` are cut to this.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// Request headers for the proxy, never forwarded upstream.
const PROXY_HEADERS: [&str; 7] = [
    "authorization",
    "upstream-url",
    "upstream-method",
    "upstream-authorization",
    "use-stream-url",
    "session-id",
    "stream-signed-url-ttl",
];

/// What a request under `durable.proxy_path` addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// `{proxy_path}`: create.
    Root,
    /// `{proxy_path}/{id}`: read, abort, metadata.
    Stream(StreamId),
    /// `{proxy_path}/{anything else}`.
    Unknown,
}

/// What `path` addresses, if it is under `durable.proxy_path` (and the
/// Durable Streams server is on).
pub fn target(relay: &Relay, path: &str) -> Option<Target> {
    let d = &relay.config.durable;
    if !d.enabled {
        return None;
    }
    let rest = path.strip_prefix(d.proxy_path.as_str())?;
    if rest.is_empty() {
        return Some(Target::Root);
    }
    let id = rest.strip_prefix('/')?;
    Some(match id.parse::<StreamId>() {
        Ok(id) => Target::Stream(id),
        Err(_) => Target::Unknown,
    })
}

/// The proxy's errors, answered as `{"error":{"code","message"}}`.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("Upstream-URL header is required")]
    MissingUpstreamUrl,
    #[error("Upstream-Method header is required")]
    MissingUpstreamMethod,
    #[error("Upstream-Method must be one of GET, POST, PUT, PATCH, DELETE")]
    InvalidUpstreamMethod,
    #[error("the upstream URL matches no entry of durable.proxy_allow")]
    UpstreamNotAllowed,
    #[error("proxy cannot follow redirects")]
    RedirectNotAllowed,
    #[error("only action=abort is supported")]
    InvalidAction,
    #[error("service authentication (Authorization: Bearer <durable.write_token>) is required")]
    MissingSecret,
    #[error("service authentication is invalid")]
    InvalidSecret,
    #[error("pre-signed URL parameters (expires, signature) are required")]
    MissingSignature,
    #[error("pre-signed URL signature verification failed")]
    SignatureInvalid,
    #[error("pre-signed URL has expired")]
    SignatureExpired(StreamId),
    #[error("the specified stream does not exist")]
    StreamNotFound,
    #[error("no such proxy endpoint")]
    NotFound,
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("{0} is not implemented by Reprise")]
    NotImplemented(&'static str),
    /// The upstream answered neither `2xx` nor `3xx`: its status and body.
    #[error("upstream answered {status}")]
    Upstream {
        status: StatusCode,
        content_type: Option<HeaderValue>,
        body: bytes::Bytes,
    },
    /// A `2xx` that is neither an event stream nor NDJSON (not recordable).
    #[error("the upstream response is not an event stream or NDJSON: not recorded")]
    NotRecordable { content_type: Option<HeaderValue> },
    #[error("upstream unavailable: {0}")]
    Unreachable(String),
    #[error("upstream did not answer in time: {0}")]
    UpstreamTimeout(String),
    #[error("auth.secret is not set: no URL can be signed")]
    NoSigningKey,
    /// Anything else `forward` or a read refused (rate limits, body size, store).
    #[error(transparent)]
    Relay(#[from] RelayError),
    #[error(transparent)]
    Durable(#[from] DsError),
}

impl ProxyError {
    fn into_response(self) -> Response<Body> {
        use ProxyError as E;
        let this = match self {
            E::Relay(e) if !matches!(e, RelayError::StoreUnavailable(_)) => {
                return e.into_response()
            }
            E::Durable(e) => return e.into_response(),
            other => other,
        };
        let (status, code) = match &this {
            E::MissingUpstreamUrl => (StatusCode::BAD_REQUEST, "MISSING_UPSTREAM_URL"),
            E::MissingUpstreamMethod => (StatusCode::BAD_REQUEST, "MISSING_UPSTREAM_METHOD"),
            E::InvalidUpstreamMethod => (StatusCode::BAD_REQUEST, "INVALID_UPSTREAM_METHOD"),
            E::UpstreamNotAllowed => (StatusCode::FORBIDDEN, "UPSTREAM_NOT_ALLOWED"),
            E::RedirectNotAllowed => (StatusCode::BAD_REQUEST, "REDIRECT_NOT_ALLOWED"),
            E::InvalidAction => (StatusCode::BAD_REQUEST, "INVALID_ACTION"),
            E::MissingSecret => (StatusCode::UNAUTHORIZED, "MISSING_SECRET"),
            E::InvalidSecret => (StatusCode::UNAUTHORIZED, "INVALID_SECRET"),
            E::MissingSignature => (StatusCode::UNAUTHORIZED, "MISSING_SIGNATURE"),
            E::SignatureInvalid => (StatusCode::UNAUTHORIZED, "SIGNATURE_INVALID"),
            E::SignatureExpired(_) => (StatusCode::UNAUTHORIZED, "SIGNATURE_EXPIRED"),
            E::StreamNotFound => (StatusCode::NOT_FOUND, "STREAM_NOT_FOUND"),
            E::NotFound => (StatusCode::NOT_FOUND, "NOT_FOUND"),
            E::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "METHOD_NOT_ALLOWED"),
            E::NotImplemented(_) => (StatusCode::NOT_IMPLEMENTED, "NOT_IMPLEMENTED"),
            E::Upstream { .. } => (StatusCode::BAD_GATEWAY, "UPSTREAM_ERROR"),
            E::NotRecordable { .. } => (StatusCode::BAD_GATEWAY, "UPSTREAM_NOT_RECORDABLE"),
            E::Unreachable(_) => (StatusCode::BAD_GATEWAY, "UPSTREAM_ERROR"),
            E::UpstreamTimeout(_) => (StatusCode::GATEWAY_TIMEOUT, "UPSTREAM_TIMEOUT"),
            E::NoSigningKey => (StatusCode::INTERNAL_SERVER_ERROR, "MISSING_SIGNING_KEY"),
            E::Relay(RelayError::StoreUnavailable(_)) => (StatusCode::BAD_GATEWAY, "STORAGE_ERROR"),
            E::Relay(_) | E::Durable(_) => (StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL"),
        };
        if let E::Upstream {
            status,
            content_type,
            body,
        } = this
        {
            // The upstream's own error, as it sent it (cut to a bound).
            let mut resp = Response::new(full(body));
            *resp.status_mut() = StatusCode::BAD_GATEWAY;
            let h = resp.headers_mut();
            headers::set(h, "upstream-status", status.as_str());
            if let Some(ct) = content_type {
                h.insert(header::CONTENT_TYPE, ct);
            }
            return resp;
        }
        let mut error = serde_json::json!({ "code": code, "message": this.to_string() });
        if let E::SignatureExpired(id) = &this {
            error["renewable"] = false.into();
            error["streamId"] = id.to_string().into();
        }
        let mut resp = Response::new(full(serde_json::json!({ "error": error }).to_string()));
        *resp.status_mut() = status;
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let E::NotRecordable {
            content_type: Some(ct),
        } = this
        {
            h.insert("upstream-content-type", ct);
        }
        if status == StatusCode::METHOD_NOT_ALLOWED {
            h.insert(
                header::ALLOW,
                HeaderValue::from_static("GET, HEAD, POST, PATCH, OPTIONS"),
            );
        }
        resp
    }
}

/// Serves one request under `durable.proxy_path`.
pub async fn handle(
    relay: &Arc<Relay>,
    req: Request<Incoming>,
    client: SocketAddr,
    target: Target,
) -> Response<Body> {
    let mut resp = serve(relay, req, client, target)
        .await
        .unwrap_or_else(ProxyError::into_response);
    let h = resp.headers_mut();
    headers::security(h);
    h.insert(
        "access-control-expose-headers",
        HeaderValue::from_static(
            "Location, Upstream-Content-Type, Upstream-Status, Stream-Next-Offset, \
             Stream-Cursor, Stream-Up-To-Date, Stream-Closed, ETag, Content-Type",
        ),
    );
    resp
}

async fn serve(
    relay: &Arc<Relay>,
    req: Request<Incoming>,
    client: SocketAddr,
    target: Target,
) -> Result<Response<Body>, ProxyError> {
    if req.method() == Method::OPTIONS {
        let mut resp = Response::new(empty());
        *resp.status_mut() = StatusCode::NO_CONTENT;
        let h = resp.headers_mut();
        h.insert(
            "access-control-allow-methods",
            HeaderValue::from_static("GET, HEAD, POST, PATCH, OPTIONS"),
        );
        h.insert(
            "access-control-allow-headers",
            HeaderValue::from_static(
                "Authorization, Content-Type, Upstream-URL, Upstream-Method, \
                 Upstream-Authorization, Use-Stream-URL, Session-Id, Stream-Signed-URL-TTL, \
                 If-None-Match",
            ),
        );
        h.insert("access-control-max-age", HeaderValue::from_static("86400"));
        return Ok(resp);
    }
    let now = crate::clock::now_ms();
    let query = req.uri().query().unwrap_or("").to_string();
    match (target, req.method().clone()) {
        (Target::Root, Method::POST) => create(relay, req, client, now).await,
        (Target::Root, _) => Err(ProxyError::MethodNotAllowed),
        (Target::Unknown, _) => Err(ProxyError::NotFound),
        (Target::Stream(id), Method::GET) => {
            if has_signature(&query) {
                check_signature(&relay.config, &query, id, now)?;
            } else {
                service_auth(relay, req.headers(), Need::Read)
                    .map_err(|_| ProxyError::MissingSignature)?;
            }
            let r = recorded::find(relay.store.as_ref(), id)
                .await?
                .ok_or(ProxyError::StreamNotFound)?;
            Ok(recorded::get(relay, r, &query, req.headers()).await?)
        }
        (Target::Stream(id), Method::HEAD) => {
            service_auth(relay, req.headers(), Need::Read)?;
            let r = recorded::find(relay.store.as_ref(), id)
                .await?
                .ok_or(ProxyError::StreamNotFound)?;
            Ok(recorded::head(relay, &r).await?)
        }
        (Target::Stream(id), Method::PATCH) => {
            // Only the signed URL's holder may abort (no service fallback).
            if !has_signature(&query) {
                return Err(ProxyError::MissingSignature);
            }
            check_signature(&relay.config, &query, id, now)?;
            if query_param(&query, "action").as_deref() != Some("abort") {
                return Err(ProxyError::InvalidAction);
            }
            abort(relay, id).await
        }
        (Target::Stream(_), Method::DELETE) => Err(ProxyError::NotImplemented("DELETE")),
        (Target::Stream(_), _) => Err(ProxyError::MethodNotAllowed),
    }
}

/// Cancels the stream's upstream (idempotent: an ended stream is `204` too).
async fn abort(relay: &Arc<Relay>, id: StreamId) -> Result<Response<Body>, ProxyError> {
    // Proxy streams only: a route's stream keeps its own caller rule.
    let proxy_path = relay.config.durable.proxy_path.clone();
    match crate::cancel::cancel_if(relay, id, |owner| owner.route == proxy_path).await {
        Ok(_) => {}
        Err(RelayError::NotFound { .. }) => return Err(ProxyError::StreamNotFound),
        Err(e) => return Err(e.into()),
    }
    let mut resp = Response::new(empty());
    *resp.status_mut() = StatusCode::NO_CONTENT;
    Ok(resp)
}

/// Service authentication: the durable write token (reads: or the read
/// token), unless anonymous access is configured.
fn service_auth(relay: &Relay, h: &HeaderMap, need: Need) -> Result<(), ProxyError> {
    match access::check(&relay.config.durable, h, need) {
        Ok(()) => Ok(()),
        Err(_) if h.contains_key(header::AUTHORIZATION) => Err(ProxyError::InvalidSecret),
        Err(_) => Err(ProxyError::MissingSecret),
    }
}

/// `POST {proxy_path}`: create.
async fn create(
    relay: &Arc<Relay>,
    req: Request<Incoming>,
    client: SocketAddr,
    now: u64,
) -> Result<Response<Body>, ProxyError> {
    service_auth(relay, req.headers(), Need::Write)?;
    let h = req.headers();
    if h.contains_key("use-stream-url") {
        return Err(ProxyError::NotImplemented("append (Use-Stream-URL)"));
    }
    if h.contains_key("session-id") {
        return Err(ProxyError::NotImplemented("connect (Session-Id)"));
    }
    let raw_url = text(h, "upstream-url").ok_or(ProxyError::MissingUpstreamUrl)?;
    let raw_method = text(h, "upstream-method").ok_or(ProxyError::MissingUpstreamMethod)?;
    let method = match raw_method.to_ascii_uppercase().as_str() {
        "GET" => Method::GET,
        "POST" => Method::POST,
        "PUT" => Method::PUT,
        "PATCH" => Method::PATCH,
        "DELETE" => Method::DELETE,
        _ => return Err(ProxyError::InvalidUpstreamMethod),
    };
    let upstream: Uri = raw_url
        .parse()
        .map_err(|_| ProxyError::UpstreamNotAllowed)?;
    if !allowed(&relay.config.durable.proxy_allow, &upstream) {
        return Err(ProxyError::UpstreamNotAllowed);
    }
    let ttl = text(h, "stream-signed-url-ttl")
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|s| Duration::from_secs(s).min(MAX_URL_TTL))
        .unwrap_or(relay.config.durable.read_url_ttl);
    let route = proxy_route(relay, &upstream)?;
    let (mut parts, body) = req.into_parts();
    let location_base = super::location(relay, &parts);
    // The route strips `proxy_path` and puts the rest on the upstream.
    let pq = upstream.path_and_query().map_or("/", |p| p.as_str());
    parts.uri = format!("{}{pq}", route.path)
        .parse()
        .map_err(|_| ProxyError::UpstreamNotAllowed)?;
    let upstream_auth = parts.headers.get("upstream-authorization").cloned();
    for name in PROXY_HEADERS {
        parts.headers.remove(name);
    }
    if let Some(v) = upstream_auth {
        parts.headers.insert(header::AUTHORIZATION, v);
    }
    parts.method = method;
    let resp = match crate::forward::forward(
        relay,
        &route,
        Request::from_parts(parts, body),
        client,
    )
    .await
    {
        Ok(r) => r,
        Err(RelayError::UpstreamTimeout(m)) => return Err(ProxyError::UpstreamTimeout(m)),
        Err(RelayError::Upstream(m)) => return Err(ProxyError::Unreachable(m)),
        Err(e) => return Err(e.into()),
    };
    let status = resp.status();
    let content_type = resp.headers().get(header::CONTENT_TYPE).cloned();
    if status.is_redirection() {
        return Err(ProxyError::RedirectNotAllowed);
    }
    if !status.is_success() {
        let body = cut(resp.into_body(), MAX_ERROR_BODY).await;
        return Err(ProxyError::Upstream {
            status,
            content_type,
            body,
        });
    }
    let stream = resp
        .headers()
        .get(crate::resume::STREAM_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<StreamId>().ok());
    let Some(stream) = stream else {
        return Err(ProxyError::NotRecordable { content_type });
    };
    // The recording goes on without this reader.
    drop(resp);
    let location = signed_url(&relay.config, &location_base, stream, now, ttl)
        .ok_or(ProxyError::NoSigningKey)?;
    let mut out = Response::new(empty());
    *out.status_mut() = StatusCode::CREATED;
    let h = out.headers_mut();
    headers::set(h, "location", &location);
    if let Some(ct) = content_type {
        h.insert(HeaderName::from_static("upstream-content-type"), ct);
    }
    Ok(out)
}

/// The route a proxied request goes through: its upstream's origin, under
/// `proxy_path` (metrics, the stream's owner), recorded, no key.
fn proxy_route(relay: &Relay, upstream: &Uri) -> Result<Arc<Route>, ProxyError> {
    let (Some(scheme), Some(authority)) = (upstream.scheme(), upstream.authority()) else {
        return Err(ProxyError::UpstreamNotAllowed);
    };
    Ok(Arc::new(Route {
        path: relay.config.durable.proxy_path.clone(),
        scheme: scheme.clone(),
        authority: authority.clone(),
        base_path: Some(String::new()),
        key: None,
        resume: None,
        stop: None,
        record: true,
        caller: CallerConfig::default(),
        resume_auth: ResumeAuth::Capability,
        limits: Default::default(),
        signals: Default::default(),
    }))
}

/// Whether `url` matches an entry of `durable.proxy_allow`: same scheme,
/// host and port, and a path under the entry's path (on a segment
/// boundary). URLs with credentials, `.`/`..` segments or encoded slashes
/// never match.
pub fn allowed(allow: &[String], url: &Uri) -> bool {
    let (Some(scheme), Some(auth)) = (url.scheme_str(), url.authority()) else {
        return false;
    };
    if !matches!(scheme, "http" | "https") || auth.as_str().contains('@') {
        return false;
    }
    if is_unsafe_path(url.path()) {
        return false;
    }
    let port = |u: &Uri| {
        u.port_u16().or(match u.scheme_str() {
            Some("https") => Some(443),
            Some("http") => Some(80),
            _ => None,
        })
    };
    allow.iter().any(|entry| {
        let Ok(e) = entry.parse::<Uri>() else {
            return false;
        };
        let same_origin = e.scheme_str() == Some(scheme)
            && e.host()
                .is_some_and(|h| h.eq_ignore_ascii_case(auth.host()))
            && port(&e) == port(url);
        let prefix = e.path().trim_end_matches('/');
        same_origin
            && (prefix.is_empty()
                || url.path() == prefix
                || url
                    .path()
                    .strip_prefix(prefix)
                    .is_some_and(|r| r.starts_with('/')))
    })
}

fn text(h: &HeaderMap, name: &str) -> Option<String> {
    h.get(name)?
        .to_str()
        .ok()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
}

/// The first `max` bytes of a body (errors end it early).
async fn cut(mut body: Body, max: usize) -> bytes::Bytes {
    let mut out = BytesMut::new();
    while out.len() < max {
        match body.frame().await {
            Some(Ok(f)) => {
                if let Ok(d) = f.into_data() {
                    let take = d.len().min(max - out.len());
                    out.extend_from_slice(&d[..take]);
                }
            }
            _ => break,
        }
    }
    out.freeze()
}

/// The signature of stream `id`'s URL valid until `expires` (Unix
/// seconds), or `None` without `auth.secret`.
fn mac(config: &Config, id: StreamId, expires: u64) -> Option<HmacSha256> {
    let secret = config.auth.secret.as_ref()?;
    let mut mac = HmacSha256::new_from_slice(secret.expose().as_bytes()).ok()?;
    mac.update(b"reprise durable proxy\n");
    mac.update(id.to_string().as_bytes());
    mac.update(b"\n");
    mac.update(expires.to_string().as_bytes());
    Some(mac)
}

/// `{base}/{id}?expires=…&signature=…`, valid for `ttl` from `now_ms`.
fn signed_url(
    config: &Config,
    base: &str,
    id: StreamId,
    now_ms: u64,
    ttl: Duration,
) -> Option<String> {
    let expires = now_ms / 1000 + ttl.as_secs();
    let sig = hex::encode(mac(config, id, expires)?.finalize().into_bytes());
    Some(format!("{base}/{id}?expires={expires}&signature={sig}"))
}

fn has_signature(query: &str) -> bool {
    query_param(query, "expires").is_some() || query_param(query, "signature").is_some()
}

/// Checks the query's signature for stream `id` (in constant time), then
/// its expiry.
fn check_signature(
    config: &Config,
    query: &str,
    id: StreamId,
    now_ms: u64,
) -> Result<(), ProxyError> {
    let (Some(expires), Some(sig)) = (
        query_param(query, "expires"),
        query_param(query, "signature"),
    ) else {
        return Err(ProxyError::MissingSignature);
    };
    let expires: u64 = expires.parse().map_err(|_| ProxyError::SignatureInvalid)?;
    let sig = hex::decode(sig).map_err(|_| ProxyError::SignatureInvalid)?;
    let mac = mac(config, id, expires).ok_or(ProxyError::SignatureInvalid)?;
    mac.verify_slice(&sig)
        .map_err(|_| ProxyError::SignatureInvalid)?;
    if expires.saturating_mul(1000) <= now_ms {
        return Err(ProxyError::SignatureExpired(id));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowlist_prefixes() {
        let allow = vec![
            "https://api.example.com/v1/".to_string(),
            "http://127.0.0.1:8080".to_string(),
        ];
        let ok = |u: &str| allowed(&allow, &u.parse().unwrap());
        assert!(ok("https://api.example.com/v1/chat?x=1"));
        assert!(ok("https://API.example.com:443/v1"));
        assert!(!ok("https://api.example.com/v10"));
        assert!(!ok("https://api.example.com/v1/../admin"));
        assert!(!ok("http://api.example.com/v1/chat"));
        assert!(!ok("https://api.example.com:8443/v1/chat"));
        assert!(ok("http://127.0.0.1:8080/anything"));
        assert!(!ok("http://127.0.0.1:8081/anything"));
        assert!(!ok("http://user@127.0.0.1:8080/"));
        assert!(!allowed(&[], &"http://127.0.0.1:8080/".parse().unwrap()));
    }
}
