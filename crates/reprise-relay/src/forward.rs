//! Forwarding, below dispatch: sends a request upstream (rate limits,
//! `Idempotency-Key`, bounded body) and relays its response; a `2xx` event
//! stream or NDJSON response is recorded (the start of a recording: the
//! log registered in the hub, the producer and writer spawned by
//! [`recorder`](crate::stream::recorder)), anything else passes through.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, Method, Request, Response};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use reprise_core::{Dialect, Epoch, Format, StreamId};
use reprise_store::{KeyRef, StreamMeta};

use crate::body::{full, Body, Bounded, BoxError, Holding};
use crate::clock::now_ms;
use crate::config::KeySource;
use crate::decode::Coding;
use crate::error::RelayError;
use crate::idempotency::{attach_idempotent, Claim};
use crate::keys::{idempotency_key, MAX_KEY_LEN};
use crate::metrics::{StatusLabels, UpstreamErrorLabels};
use crate::ratelimit::{self, LimitKey};
use crate::resume::{self};
use crate::routes::Route;
use crate::state::Relay;
use crate::stream::live::LiveStream;
use crate::stream::{reader, recorder};
use crate::upstream::UpstreamBody;
use crate::uri::query_param;

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

/// Forwards a request upstream and relays (and maybe records) the response.
pub(crate) async fn forward(
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
    // Plain-HTTP upstreams: the connection is driven by whoever reads the
    // response (one task less per event, see `upstream::direct`); HTTPS
    // ones (TLS, HTTP/2) go through the pooled client.
    let sending = async {
        if route.scheme == http::uri::Scheme::HTTP {
            crate::upstream::direct::send(up_req, relay.config.timeouts.connect)
                .await
                .map_err(BoxError::from)
        } else {
            relay
                .client_for(route)
                .request(up_req)
                .await
                .map(|r| r.map(UpstreamBody::pooled))
                .map_err(BoxError::from)
        }
    };
    let resp = match tokio::time::timeout(timeout, sending).await {
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
            let detail = error_chain(&*e);
            if is_timeout(&*e) {
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
        let body = resp_body
            .coalesced()
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
        headers: headers.clone(),
        lease_owner: Some(relay.instance.clone()),
        lease_until_ms: Some(now_ms() + relay.config.streams.lease.as_millis() as u64),
        caller: Some(caller.clone()),
        signals,
        ..StreamMeta::new(
            stream,
            epoch,
            route.path.as_str(),
            format.as_str(),
            now_ms(),
        )
    };
    let live = LiveStream::with_budget(
        stream,
        epoch,
        headers,
        format,
        relay.unstored_total.clone(),
        relay.hub.budget().clone(),
    );
    if let Some(dialect) = signals {
        live.decide_signals(dialect);
    }
    let _ = live.owner.set(crate::stream::live::Owner {
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
        slot.release_when_ended(relay.shutdown.tasks(), live.clone());
    }
    let key_ref = key.map(|key| KeyRef {
        route: format!("{}#{caller}", route.path),
        key,
    });
    // Until the writer has stored the binding (with the first events),
    // this instance resolves the key from memory.
    if let Some(key) = &key_ref {
        relay.hub.key_pending(key, stream);
    }
    recorder::spawn(relay, live.clone(), resp_body, coding, meta, key_ref);

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
        relay.reader_ctx(),
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
