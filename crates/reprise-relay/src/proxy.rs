//! The request path: every request enters [`handle`], which decides whether
//! it is one of Reprise's own endpoints, a resume, or a request to forward
//! upstream, and in the last case whether its response gets recorded.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, Method, Request, Response};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use percent_encoding::percent_decode_str;
use reprise_core::{Cursor, Dialect, Epoch, Format, StreamId};
use reprise_store::{KeyRef, StreamMeta};
use tracing::Instrument;

use crate::body::{full, Body, Bounded, BoxError, Holding};
use crate::config::KeySource;
use crate::decode::Coding;
use crate::error::RelayError;
use crate::live::LiveStream;
use crate::metrics::{StatusLabels, UpstreamErrorLabels};
use crate::ratelimit::{self, LimitKey};
use crate::resume::{self, Position, Via};
use crate::routes::{is_unsafe_path, Route};
use crate::server::Relay;
use crate::{admin, reader, recorder};

/// Longest key value (chat id) accepted for a key binding.
const MAX_KEY_LEN: usize = 512;

/// Response headers kept with a stream and replayed to resuming readers:
/// the content type, the AI SDK's stream markers, and the upstream's CORS
/// answer (a cross-origin `EventSource` cannot reconnect without it).
const REPLAY_HEADERS: [&str; 7] = [
    "content-type",
    "x-vercel-ai-ui-message-stream",
    "x-vercel-ai-data-stream",
    "access-control-allow-origin",
    "access-control-allow-credentials",
    "access-control-expose-headers",
    "vary",
];

/// Entry point of every request.
pub async fn handle(
    relay: Arc<Relay>,
    req: Request<Incoming>,
    client: SocketAddr,
) -> Response<Body> {
    let result = dispatch(&relay, req, client).await;
    result.unwrap_or_else(|e| {
        if e.status().is_server_error() {
            tracing::warn!(error = %e, "request failed");
        } else {
            tracing::debug!(error = %e, "request refused");
        }
        e.into_response()
    })
}

async fn dispatch(
    relay: &Arc<Relay>,
    req: Request<Incoming>,
    client: SocketAddr,
) -> Result<Response<Body>, RelayError> {
    let path = req.uri().path().to_string();
    if path == "/_reprise" || path.starts_with("/_reprise/") {
        return admin::handle(relay, req).await;
    }
    if is_unsafe_path(&path) {
        return Err(RelayError::BadRequest {
            code: "invalid_path",
            message: "paths with '.' or '..' segments or encoded slashes are refused".into(),
        });
    }
    if req.method() == Method::GET || req.method() == Method::DELETE {
        if let Some((route, key)) = relay.router.match_resume(&path) {
            let route = route.clone();
            if req.method() == Method::DELETE {
                return cancel_by_key(relay, &route, key, req.headers()).await;
            }
            return resume_by_key(relay, &route, key, req.headers()).await;
        }
    }
    let route = relay
        .router
        .match_path(&path)
        .ok_or(RelayError::NoRoute)?
        .clone();
    if let Some(cursor) = reprise_cursor(&req) {
        return resume::resume(
            relay,
            cursor.stream(),
            Position::Cursor(cursor),
            Via::LastEventId,
            req.headers(),
            route.signals.fixed(),
        )
        .await;
    }
    forward(relay, &route, req, client).await
}

/// The request's `Last-Event-ID` header or `last_event_id` query parameter,
/// if it names a Reprise stream. Any other value belongs to the upstream.
fn reprise_cursor<B>(req: &Request<B>) -> Option<Cursor> {
    if let Some(v) = req
        .headers()
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
    {
        if let Ok(c) = Cursor::parse(v) {
            return Some(c);
        }
    }
    let q = query_param(req.uri().query()?, "last_event_id")?;
    Cursor::parse(&q).ok()
}

/// Value of a query parameter, percent-decoded (`+` as space).
pub fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let k = percent_decode_str(&k.replace('+', " "))
            .decode_utf8()
            .ok()?
            .into_owned();
        if k != name {
            return None;
        }
        Some(
            percent_decode_str(&v.replace('+', " "))
                .decode_utf8()
                .ok()?
                .into_owned(),
        )
    })
}

/// A route key as bound in the store: namespaced by route and caller, so
/// that keys of different routes or callers never collide, and another
/// caller's key resolves to nothing.
fn route_key(relay: &Relay, route: &Route, headers: &HeaderMap, key: String) -> KeyRef {
    let caller = relay.auth.caller(&route.path, &route.caller, headers);
    KeyRef {
        route: format!("{}#{caller}", route.path),
        key,
    }
}

async fn resume_by_key(
    relay: &Arc<Relay>,
    route: &Arc<Route>,
    key: String,
    headers: &HeaderMap,
) -> Result<Response<Body>, RelayError> {
    let key = route_key(relay, route, headers, key);
    match relay.store.resolve_key(&key).await? {
        Some(stream) => {
            resume::resume(
                relay,
                stream,
                Position::Beginning,
                Via::Key,
                headers,
                route.signals.fixed(),
            )
            .await
        }
        None => {
            relay.metrics.resume("key", "no_content");
            let mut resp = Response::new(crate::body::empty());
            *resp.status_mut() = http::StatusCode::NO_CONTENT;
            Ok(resp)
        }
    }
}

/// `DELETE` on a resume template: cancel the key's latest stream.
async fn cancel_by_key(
    relay: &Arc<Relay>,
    route: &Arc<Route>,
    key: String,
    headers: &HeaderMap,
) -> Result<Response<Body>, RelayError> {
    let key = route_key(relay, route, headers, key);
    match relay.store.resolve_key(&key).await? {
        Some(stream) => crate::cancel::cancel(relay, stream, headers).await,
        None => Err(RelayError::NotFound {
            code: "stream_not_found",
            message: "no stream for this key".into(),
        }),
    }
}

/// The `Idempotency-Key` of a request, namespaced by route and caller.
fn idempotency_key(relay: &Relay, route: &Route, headers: &HeaderMap) -> Option<KeyRef> {
    let v = headers.get("idempotency-key")?.to_str().ok()?.trim();
    if v.is_empty() || v.len() > MAX_KEY_LEN {
        return None;
    }
    let mut k = route_key(relay, route, headers, v.to_string());
    k.route = format!("idempotency:{}", k.route);
    Some(k)
}

/// Claims `key` for the stream about to start (`stream`). If another
/// request claimed it first, answers with that request's stream (waiting up
/// to `streams.idempotency_wait` for it to start); if that request gives the
/// key back (it failed) or its stream never starts, takes the key over and
/// lets this request call the upstream.
async fn attach_idempotent(
    relay: &Arc<Relay>,
    key: &KeyRef,
    stream: StreamId,
    headers: &HeaderMap,
) -> Result<Option<Response<Body>>, RelayError> {
    if relay.store_health.is_known_down() {
        // As when the claim fails, but without waiting for it to.
        relay.metrics.skipped("claim_key");
        tracing::debug!(
            "store known unreachable; calling the upstream without checking the Idempotency-Key"
        );
        return Ok(None);
    }
    let mut existing = match relay.store.claim_key(key, stream).await {
        Ok(None) => return Ok(None),
        Ok(Some(existing)) => existing,
        Err(e) => {
            tracing::warn!(cause = %e, "cannot check the Idempotency-Key; calling the upstream");
            return Ok(None);
        }
    };
    let deadline = tokio::time::Instant::now() + relay.config.streams.idempotency_wait;
    loop {
        let known =
            relay.hub.get(existing).is_some() || relay.store.meta(existing).await?.is_some();
        if known {
            tracing::debug!(stream.id = %existing, "Idempotency-Key matches a stream: attaching to it");
            let mut resp = resume::resume(
                relay,
                existing,
                Position::Beginning,
                Via::Idempotent,
                headers,
                None,
            )
            .await?;
            resp.headers_mut().insert(
                HeaderName::from_static("reprise-idempotent-replay"),
                http::HeaderValue::from_static("true"),
            );
            return Ok(Some(resp));
        }
        if tokio::time::Instant::now() >= deadline {
            // The first request never produced a stream (upstream error,
            // not an event stream): this one tries for real.
            relay.store.bind_key(key, stream).await?;
            return Ok(None);
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        // The first request may have given the key back (it failed before
        // its stream started): then the next claim wins and calls upstream.
        if relay.store.resolve_key(key).await? != Some(existing) {
            match relay.store.claim_key(key, stream).await? {
                None => return Ok(None),
                Some(other) => existing = other,
            }
        }
    }
}

/// An `Idempotency-Key` claimed for a stream that has not started yet. If
/// the request ends without starting it (refused, upstream error, a
/// response that is not recorded), dropping the claim gives the key back, so
/// that a retry calls the upstream at once instead of waiting
/// `streams.idempotency_wait` for a stream that will never exist.
struct Claim {
    relay: Arc<Relay>,
    key: Option<KeyRef>,
    stream: StreamId,
}

impl Claim {
    /// The stream started: the key stays bound to it.
    fn keep(mut self) {
        self.key = None;
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        let Some(key) = self.key.take() else { return };
        let (relay, stream) = (self.relay.clone(), self.stream);
        self.relay.tasks.spawn(
            async move {
                if let Err(e) = relay.store.release_key(&key, stream).await {
                    tracing::warn!(cause = %e, "cannot give back an Idempotency-Key; a retry waits for it to lapse");
                }
            }
            .in_current_span(),
        );
    }
}

/// Forwards a request upstream and relays (and maybe records) the response.
async fn forward(
    relay: &Arc<Relay>,
    route: &Arc<Route>,
    req: Request<Incoming>,
    client: SocketAddr,
) -> Result<Response<Body>, RelayError> {
    // A body announced larger than the bound is refused before anything
    // else; one that grows past it on the way is cut off below.
    let body_limit = relay.config.limits.max_request_body.as_u64();
    if declared_length(req.headers()).is_some_and(|n| n > body_limit) {
        return Err(RelayError::PayloadTooLarge { limit: body_limit });
    }
    let fwd = relay.trusted_proxies.assess(client, req.headers());
    // The id of the stream this request may start, known up front so that
    // an Idempotency-Key can be claimed for it.
    let stream = StreamId::random();
    let idempotency = if route.record {
        idempotency_key(relay, route, req.headers())
    } else {
        None
    };
    // Given back on any return before the stream starts.
    let mut claim = None;
    if let Some(key) = idempotency {
        if let Some(resp) = attach_idempotent(relay, &key, stream, req.headers()).await? {
            return Ok(resp);
        }
        claim = Some(Claim {
            relay: relay.clone(),
            key: Some(key),
            stream,
        });
    }
    let caller = relay.auth.caller(&route.path, &route.caller, req.headers());
    // Rate limits: a 429 here costs the upstream nothing. The slot (if the
    // route limits concurrent streams) is held until the stream ends; on
    // any early return below it is dropped, which gives it back.
    let who = LimitKey::of(route, &caller, req.headers(), &fwd);
    let limits = if req.method() == Method::OPTIONS {
        // CORS preflights start nothing; counting them would halve a
        // browser's allowance.
        reprise_store::RateLimits::default()
    } else {
        ratelimit::limits_for(&relay.config.limits, route)
    };
    let slot = relay.limiter.admit(route, limits, &who).await?;
    let (parts, body) = req.into_parts();
    let pq = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    let uri = route
        .upstream_uri(&pq)
        .map_err(|e| RelayError::Internal(format!("building upstream URI: {e}")))?;

    // A JSON key needs the body; other requests stream it through, cut off
    // past the limit (`body_too_large` tells a 413 from an upstream failure).
    let mut body_too_large = None;
    let (key, body): (Option<String>, Body) = match &route.key {
        Some(KeySource::Json(pointer)) if route.record => {
            let bytes = read_body(body, body_limit).await?;
            (json_key(&bytes, pointer), full(bytes))
        }
        other => {
            let key = match other {
                Some(KeySource::Header(name)) => parts
                    .headers
                    .get(name.as_str())
                    .and_then(|v| v.to_str().ok())
                    .map(String::from),
                Some(KeySource::Query(name)) => {
                    parts.uri.query().and_then(|q| query_param(q, name))
                }
                _ => None,
            };
            let (bounded, exceeded) = Bounded::new(
                body.map_err(|e| Box::new(e) as BoxError).boxed(),
                body_limit,
            );
            body_too_large = Some(exceeded);
            (key, bounded.boxed())
        }
    };
    let key = key.filter(|k| !k.is_empty() && k.len() <= MAX_KEY_LEN);

    let headers = crate::upstream::upstream_request_headers(
        &parts.headers,
        parts.uri.authority(),
        &fwd,
        relay.tls.is_some(),
        route.authority.as_str(),
    );
    let mut up_req = Request::new(body);
    *up_req.method_mut() = parts.method.clone();
    *up_req.uri_mut() = uri;
    *up_req.headers_mut() = headers;

    let timeout = relay.config.timeouts.response;
    let upstream_error = |kind: &str| {
        relay
            .metrics
            .upstream_errors
            .get_or_create(&UpstreamErrorLabels {
                route: route.path.clone(),
                kind: kind.to_string(),
            })
            .inc();
    };
    let resp = match tokio::time::timeout(timeout, relay.client_for(route).request(up_req)).await {
        Err(_) => {
            upstream_error("timeout");
            return Err(RelayError::UpstreamTimeout(format!(
                "no response headers within {}",
                humantime::format_duration(timeout)
            )));
        }
        Ok(Err(_)) if body_too_large.is_some_and(|b| b.load(Ordering::SeqCst)) => {
            // Our own cut-off aborted the request, not the upstream.
            return Err(RelayError::PayloadTooLarge { limit: body_limit });
        }
        Ok(Err(e)) => {
            let detail = error_chain(&e);
            if is_timeout(&e) {
                upstream_error("timeout");
                return Err(RelayError::UpstreamTimeout(detail));
            }
            upstream_error("connect");
            return Err(RelayError::Upstream(detail));
        }
        Ok(Ok(r)) => r,
    };
    relay
        .metrics
        .upstream_responses
        .get_or_create(&StatusLabels {
            route: route.path.clone(),
            status: resp.status().as_u16().to_string(),
        })
        .inc();
    let (mut resp_parts, resp_body) = resp.into_parts();
    crate::upstream::strip_hop_by_hop(&mut resp_parts.headers);

    let format = if route.record && resp_parts.status.is_success() {
        recordable_format(&resp_parts.headers)
    } else {
        None
    };
    let Some((format, coding)) = format else {
        tracing::debug!(status = %resp_parts.status, "passing response through unrecorded");
        // Bursts go out in one write (see `Coalesce`).
        let body = crate::body::Coalesce::new(resp_body)
            .map_err(|e| Box::new(e) as BoxError)
            .boxed();
        let body = match slot {
            // The caller's slot is held while the response streams.
            Some(slot) => Holding::new(body, slot).boxed(),
            None => body,
        };
        return Ok(Response::from_parts(resp_parts, body));
    };

    let epoch = Epoch::random();
    let headers = replay_headers(&resp_parts.headers);
    // The dialect of the stream's signals, if the route fixes it or the
    // headers show it; otherwise the producer decides it from the first
    // events (`auto`). NDJSON streams have a single dialect.
    let signals = match format {
        Format::Sse => route
            .signals
            .fixed()
            .or_else(|| Dialect::from_headers(&headers)),
        Format::Ndjson => None,
    };
    let meta = StreamMeta {
        id: stream,
        epoch,
        created_ms: now_ms(),
        route: route.path.clone(),
        headers: headers.clone(),
        format: format.as_str().into(),
        end: None,
        lost_history: false,
        lease_owner: Some(relay.instance.clone()),
        lease_until_ms: Some(now_ms() + relay.config.streams.lease.as_millis() as u64),
        cancel_requested: false,
        caller: Some(caller.clone()),
        signals,
    };
    let live =
        LiveStream::with_budget(stream, epoch, headers, format, relay.unstored_total.clone());
    if let Some(dialect) = signals {
        live.decide_signals(dialect);
    }
    let _ = live.owner.set(crate::live::Owner {
        route: route.path.clone(),
        caller: Some(caller.clone()),
    });
    relay.hub.insert(live.clone());
    // The stream exists now: requests with the same Idempotency-Key attach.
    if let Some(claim) = claim {
        claim.keep();
    }
    if let Some(slot) = slot {
        // Held until the recording ends, even if this client goes.
        slot.release_when_ended(&relay.tasks, live.clone());
    }
    let key_ref = key.map(|key| KeyRef {
        route: format!("{}#{caller}", route.path),
        key,
    });
    let registered = recorder::register(relay, &meta, key_ref.as_ref()).await;
    recorder::spawn(
        relay,
        live.clone(),
        resp_body,
        coding,
        meta,
        key_ref,
        registered,
    );

    resp_parts.headers.remove(header::CONTENT_LENGTH);
    // Readers get the decoded stream (with Reprise's ids), as every resume does.
    resp_parts.headers.remove(header::CONTENT_ENCODING);
    resume::sse_headers(&mut resp_parts.headers, stream);
    let guard = live.attach();
    let body = reader::body(
        live,
        guard,
        reprise_core::Seq::ZERO,
        reader::ReaderKind::Origin,
        relay.metrics.clone(),
        relay.config.streams.heartbeat,
        relay.hard_stop.clone(),
    );
    Ok(Response::from_parts(resp_parts, body))
}

/// The request's `Content-Length`, if it has a valid one.
fn declared_length(h: &HeaderMap) -> Option<u64> {
    h.get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Reads a request body into memory, refusing more than `limit` bytes.
async fn read_body(body: Incoming, limit: u64) -> Result<Bytes, RelayError> {
    match Limited::new(body, limit as usize).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            Err(RelayError::PayloadTooLarge { limit })
        }
        Err(e) => Err(RelayError::BadRequest {
            code: "request_body_failed",
            message: format!("reading the request body failed: {e}"),
        }),
    }
}

/// The string (or number) at `pointer` in a JSON body.
fn json_key(body: &[u8], pointer: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    match v.pointer(pointer)? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The format of a response Reprise records (SSE or NDJSON), and the
/// content coding to decode it from: upstreams that compress although asked
/// for `Accept-Encoding: identity` are decoded (gzip, deflate, br); another
/// coding is passed through unrecorded.
fn recordable_format(h: &HeaderMap) -> Option<(Format, Option<Coding>)> {
    let format = h
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(Format::from_content_type)?;
    match Coding::of(h) {
        Ok(coding) => {
            if let Some(coding) = coding {
                tracing::debug!(
                    coding = coding.as_str(),
                    "upstream compressed a stream despite Accept-Encoding: identity; decoding it"
                );
            }
            Some((format, coding))
        }
        Err(coding) => {
            tracing::warn!(
                coding = %coding,
                "upstream sent a stream in a content coding Reprise does not decode; not recording it"
            );
            None
        }
    }
}

fn replay_headers(h: &HeaderMap) -> Vec<(String, String)> {
    REPLAY_HEADERS
        .iter()
        .filter_map(|name| {
            let v = h.get(HeaderName::from_static(name))?.to_str().ok()?;
            Some((name.to_string(), v.to_string()))
        })
        .collect()
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// An error and its sources, joined, for messages that say what happened.
/// Whether an upstream request failed because a bound ran out (the connect
/// timeout: hyper-util reports it as an `io::Error` of kind `TimedOut`),
/// told by type anywhere in the error's source chain.
fn is_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
            || err.is::<tokio::time::error::Elapsed>()
        {
            return true;
        }
        cur = err.source();
    }
    false
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An error that wraps another, as hyper-util's connect errors do.
    #[derive(Debug)]
    struct Wrapped(std::io::Error);

    impl std::fmt::Display for Wrapped {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("client error (Connect)")
        }
    }

    impl std::error::Error for Wrapped {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn timeouts_are_told_by_kind_not_text() {
        let timed_out = Wrapped(std::io::Error::new(std::io::ErrorKind::TimedOut, "slow"));
        assert!(is_timeout(&timed_out));
        // A message that merely says "timed out" is not a timeout.
        let refused = Wrapped(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "timed out waiting: refused",
        ));
        assert!(!is_timeout(&refused));
    }

    #[test]
    fn query_params() {
        assert_eq!(
            query_param("a=1&last_event_id=x%2Ey&b", "last_event_id").as_deref(),
            Some("x.y")
        );
        assert_eq!(query_param("chat=a+b", "chat").as_deref(), Some("a b"));
        assert_eq!(query_param("b", "b").as_deref(), Some(""));
        assert_eq!(query_param("a=1", "b"), None);
    }

    #[test]
    fn json_keys() {
        assert_eq!(
            json_key(br#"{"id":"c1","messages":[]}"#, "/id").as_deref(),
            Some("c1")
        );
        assert_eq!(
            json_key(br#"{"chat":{"n":7}}"#, "/chat/n").as_deref(),
            Some("7")
        );
        assert_eq!(json_key(br#"{"id":null}"#, "/id"), None);
        assert_eq!(json_key(b"not json", "/id"), None);
    }

    #[test]
    fn recordable_formats() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            "Text/Event-Stream; charset=utf-8".parse().unwrap(),
        );
        assert_eq!(recordable_format(&h), Some((Format::Sse, None)));
        h.insert(header::CONTENT_ENCODING, "gzip".parse().unwrap());
        assert_eq!(
            recordable_format(&h),
            Some((Format::Sse, Some(Coding::Gzip)))
        );
        h.insert(header::CONTENT_ENCODING, "zstd".parse().unwrap());
        assert_eq!(recordable_format(&h), None);
        h.remove(header::CONTENT_ENCODING);
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            "application/x-ndjson".parse().unwrap(),
        );
        assert_eq!(recordable_format(&h), Some((Format::Ndjson, None)));
        h.insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
        assert_eq!(recordable_format(&h), None);
    }
}
