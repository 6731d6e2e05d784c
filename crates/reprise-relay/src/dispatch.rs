//! Dispatch, just below the server: every request enters [`handle`],
//! which decides whether it is one of Reprise's own endpoints
//! ([`admin`](crate::admin)), a resume ([`resume`](crate::resume): a route's
//! resume template, or a Reprise `Last-Event-ID`), a cancel (`DELETE` on
//! the resume template, `POST` on the stop template), or a request to
//! [`forward`](crate::forward) upstream.

use std::net::SocketAddr;
use std::sync::Arc;

use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use reprise_core::Cursor;

use crate::admin;
use crate::body::{full, Body};
use crate::error::RelayError;
use crate::forward::forward;
use crate::keys::route_key;
use crate::resume::{self, Position, Via, TAIL_INDEX_HEADER};
use crate::routes::{is_unsafe_path, Route};
use crate::state::Relay;
use crate::uri::query_param;

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
    if let Some(target) = crate::durable::proxy::target(relay, &path) {
        return Ok(crate::durable::proxy::handle(relay, req, client, target).await);
    }
    if let Some(name) = crate::durable::stream_name(relay, &path) {
        if is_unsafe_path(&path) {
            return Err(RelayError::BadRequest {
                code: "invalid_path",
                message: "paths with '.' or '..' segments or encoded slashes are refused".into(),
            });
        }
        let name = name.to_string();
        return Ok(crate::durable::handle(relay, req, name).await);
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
            let start = start_index(req.uri().query())?;
            return resume_by_key(relay, &route, key, start, req.headers()).await;
        }
    }
    if req.method() == Method::POST {
        if let Some((route, key)) = relay.router.match_stop(&path) {
            let route = route.clone();
            return stop_by_key(relay, &route, key, req.headers()).await;
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

/// The `startIndex` query parameter of a key resume (the AI SDK's
/// `WorkflowChatTransport`): events to skip, or with a minus sign how many
/// of the latest to send.
fn start_index(query: Option<&str>) -> Result<Option<i64>, RelayError> {
    let Some(raw) = query.and_then(|q| query_param(q, "startIndex")) else {
        return Ok(None);
    };
    raw.parse::<i64>()
        .map(Some)
        .map_err(|_| RelayError::BadRequest {
            code: "invalid_start_index",
            message: format!("startIndex must be an integer, got {raw:?}"),
        })
}

async fn resume_by_key(
    relay: &Arc<Relay>,
    route: &Arc<Route>,
    key: String,
    start: Option<i64>,
    headers: &HeaderMap,
) -> Result<Response<Body>, RelayError> {
    let key = route_key(relay, route, headers, key);
    let (pos, via) = match start {
        None => (Position::Beginning, Via::Key),
        Some(n) if n >= 0 => (
            Position::StartIndex(reprise_core::Seq(n as u64)),
            Via::KeyIndex,
        ),
        Some(n) => (Position::FromTail(n.unsigned_abs()), Via::KeyIndex),
    };
    match relay.hub.resolve_key(&*relay.store, &key).await? {
        Some(stream) => {
            resume::resume(relay, stream, pos, via, headers, route.signals.fixed()).await
        }
        None => {
            relay.metrics.resume("key", "no_content");
            let mut resp = Response::new(crate::body::empty());
            *resp.status_mut() = http::StatusCode::NO_CONTENT;
            if via == Via::KeyIndex {
                // Nothing recorded for this key: no chunk, index -1.
                resp.headers_mut()
                    .insert(TAIL_INDEX_HEADER, HeaderValue::from_static("-1"));
            }
            Ok(resp)
        }
    }
}

/// `POST` on a stop template: cancel the key's latest stream if it runs.
/// Answers `200` whether or not one was running (the AI SDK's convention:
/// `stop()` calls it without knowing); the body says what happened. Who
/// may stop is decided as for `DELETE`; for anyone else, and for a key
/// with no stream, the answer is the same `{"outcome":"none"}`.
async fn stop_by_key(
    relay: &Arc<Relay>,
    route: &Arc<Route>,
    key: String,
    headers: &HeaderMap,
) -> Result<Response<Body>, RelayError> {
    let mut resp = match cancel_by_key(relay, route, key, headers).await {
        Ok(resp) => resp,
        Err(RelayError::NotFound { .. }) => {
            let mut resp = Response::new(full(r#"{"outcome":"none"}"#));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            resp
        }
        Err(e) => return Err(e),
    };
    // `202 cancel_requested` (another instance produces it) is a 200 here.
    *resp.status_mut() = StatusCode::OK;
    Ok(resp)
}

/// `DELETE` on a resume template: cancel the key's latest stream.
async fn cancel_by_key(
    relay: &Arc<Relay>,
    route: &Arc<Route>,
    key: String,
    headers: &HeaderMap,
) -> Result<Response<Body>, RelayError> {
    let key = route_key(relay, route, headers, key);
    match relay.hub.resolve_key(&*relay.store, &key).await? {
        Some(stream) => crate::cancel::cancel(relay, stream, headers).await,
        None => Err(RelayError::NotFound {
            code: "stream_not_found",
            message: "no stream for this key".into(),
        }),
    }
}
