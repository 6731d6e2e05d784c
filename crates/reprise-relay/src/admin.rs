//! Reprise's own endpoints under `/_reprise/`:
//!
//! - `GET /_reprise/streams/{id}`: resume a stream by id (`Last-Event-ID`,
//!   `last_event_id` or `start_index=N`);
//! - `DELETE /_reprise/streams/{id}`: cancel a stream (see `cancel`);
//! - `GET /_reprise/healthz`: the process is alive;
//! - `GET /_reprise/readyz`: the store answers (JSON, `503` when not ready);
//! - `GET /_reprise/metrics`: Prometheus metrics.

use std::sync::Arc;

use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use reprise_core::ids::parse_start_index;
use reprise_core::{Cursor, StreamId};
use serde_json::json;

use crate::body::{full, Body};
use crate::error::RelayError;
use crate::proxy::query_param;
use crate::resume::{self, Position, Via};
use crate::server::Relay;

pub async fn handle(
    relay: &Arc<Relay>,
    req: Request<Incoming>,
) -> Result<Response<Body>, RelayError> {
    let path = req.uri().path();
    if let Some(id) = path.strip_prefix("/_reprise/streams/") {
        if req.method() == Method::DELETE {
            let stream: StreamId = id.parse().map_err(|e| RelayError::BadRequest {
                code: "invalid_stream_id",
                message: format!("{e}"),
            })?;
            return crate::cancel::cancel(relay, stream, req.headers()).await;
        }
        if req.method() != Method::GET {
            return Err(method_not_allowed());
        }
        return stream(relay, id, &req).await;
    }
    match path {
        "/_reprise/healthz" => Ok(json_response(StatusCode::OK, json!({ "status": "ok" }))),
        "/_reprise/readyz" => Ok(ready(relay).await),
        "/_reprise/metrics" => {
            // Sampled at scrape time: entries recorded here, not yet stored.
            relay
                .metrics
                .buffered_entries
                .set(relay.hub.unstored_entries() as i64);
            let mut resp = Response::new(full(relay.metrics.render()));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            Ok(resp)
        }
        _ => Err(RelayError::NotFound {
            code: "not_found",
            message: "no such Reprise endpoint".into(),
        }),
    }
}

fn method_not_allowed() -> RelayError {
    RelayError::BadRequest {
        code: "method_not_allowed",
        message: "only GET (and DELETE on streams) is supported here".into(),
    }
}

async fn stream(
    relay: &Arc<Relay>,
    id: &str,
    req: &Request<Incoming>,
) -> Result<Response<Body>, RelayError> {
    let stream: StreamId = id.parse().map_err(|e| RelayError::BadRequest {
        code: "invalid_stream_id",
        message: format!("{e}"),
    })?;
    let query = req.uri().query().unwrap_or("");
    let last_event_id = req
        .headers()
        .get("last-event-id")
        .map(|v| v.to_str().map(String::from).unwrap_or_default())
        .or_else(|| query_param(query, "last_event_id"));
    let pos = match (last_event_id, query_param(query, "start_index")) {
        (Some(_), Some(_)) => {
            return Err(RelayError::BadRequest {
                code: "conflicting_position",
                message: "give either Last-Event-ID / last_event_id or start_index, not both"
                    .into(),
            })
        }
        (Some(v), None) => {
            let cursor = Cursor::parse(&v).map_err(|e| RelayError::BadRequest {
                code: "invalid_last_event_id",
                message: e.to_string(),
            })?;
            if cursor.stream() != stream {
                return Err(RelayError::BadRequest {
                    code: "invalid_last_event_id",
                    message: "Last-Event-ID belongs to another stream".into(),
                });
            }
            Position::Cursor(cursor)
        }
        (None, Some(n)) => {
            Position::StartIndex(parse_start_index(&n).map_err(|e| RelayError::BadRequest {
                code: "invalid_start_index",
                message: e.to_string(),
            })?)
        }
        (None, None) => Position::Beginning,
    };
    resume::resume(
        relay,
        stream,
        pos,
        Via::StreamsEndpoint,
        req.headers(),
        None,
    )
    .await
}

async fn ready(relay: &Arc<Relay>) -> Response<Body> {
    let draining = relay.shutdown.is_cancelled();
    let (reachable, latency_ms, error) = match relay.store.ping().await {
        Ok(d) => (true, Some(d.as_secs_f64() * 1000.0), None),
        Err(e) => (false, None, Some(e.to_string())),
    };
    let ready = reachable && !draining;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json_response(
        status,
        json!({
            "ready": ready,
            "draining": draining,
            "store": {
                "kind": relay.store.kind(),
                "reachable": reachable,
                "latency_ms": latency_ms,
                "error": error,
            },
            "streams_in_memory": relay.hub.len(),
            "buffered_entries": relay.hub.unstored_entries(),
            "unstored_bytes": relay.unstored_total.load(std::sync::atomic::Ordering::Relaxed),
        }),
    )
}

fn json_response(status: StatusCode, body: serde_json::Value) -> Response<Body> {
    let mut resp = Response::new(full(body.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}
