//! Reprise's own endpoints under `/_reprise/`:
//!
//! - `GET /_reprise/streams/{id}`: resume a stream by id (`Last-Event-ID`,
//!   `last_event_id` or `start_index=N`);
//! - `DELETE /_reprise/streams/{id}`: cancel a stream (see `cancel`);
//! - `GET /_reprise/healthz`: the process is alive;
//! - `GET /_reprise/readyz`: the store answers (JSON, `503` when not ready),
//!   from the state the store probe keeps (see `health`): never a store call;
//! - `GET /_reprise/metrics`: Prometheus metrics.
//!
//! Streams are always served on the public listener (via `proxy`). The
//! last three, the operational endpoints, are served there too unless an
//! admin listener is configured (`admin_listen`, [`serve_listener`]): then
//! only there, and the public listener answers them `404`. Raw store error
//! text is only ever shown on the admin listener. A method an endpoint does
//! not take is answered `405` with `Allow`.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use reprise_core::ids::parse_start_index;
use reprise_core::{Cursor, StreamId};
use serde_json::json;
use tokio::net::TcpListener;
use tracing::Instrument;

use crate::body::{full, Body};
use crate::error::RelayError;
use crate::resume::{self, Position, Via};
use crate::state::Relay;
use crate::uri::query_param;

/// Methods of `/_reprise/streams/{id}`.
const STREAM_METHODS: &str = "GET, DELETE";
/// Methods of the operational endpoints.
const OPS_METHODS: &str = "GET, HEAD";
/// How long admin connections get to close once the relay stops.
const ADMIN_CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Who asks: the operational endpoints show more to the admin listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Audience {
    Public,
    Admin,
}

/// `/_reprise/...` on the public listener.
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
            return Err(RelayError::MethodNotAllowed {
                allow: STREAM_METHODS,
            });
        }
        return stream(relay, id, &req).await;
    }
    if relay.admin_listener.load(Ordering::Relaxed) {
        // Served on the admin listener only.
        return Err(not_found());
    }
    ops(relay, &req, Audience::Public)
}

/// The operational endpoints, for either listener.
fn ops(
    relay: &Arc<Relay>,
    req: &Request<Incoming>,
    audience: Audience,
) -> Result<Response<Body>, RelayError> {
    let path = req.uri().path();
    if !matches!(
        path,
        "/_reprise/healthz" | "/_reprise/readyz" | "/_reprise/metrics"
    ) {
        return Err(not_found());
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Err(RelayError::MethodNotAllowed { allow: OPS_METHODS });
    }
    match path {
        // The instance id tells processes apart that took the same address
        // in turn (a restart, or a test's port reused after a shutdown).
        "/_reprise/healthz" => Ok(json_response(
            StatusCode::OK,
            json!({ "status": "ok", "instance": relay.instance }),
        )),
        "/_reprise/readyz" => Ok(ready(relay, audience)),
        _ => {
            // Sampled at scrape time: entries recorded here, not yet stored.
            relay
                .metrics
                .buffered_entries
                .set(relay.hub.unstored_entries() as i64);
            let budget = relay.hub.budget();
            relay.metrics.log_bytes.set(budget.held() as i64);
            let released = budget.released_total();
            let counted = relay.metrics.log_bytes_released.get();
            relay
                .metrics
                .log_bytes_released
                .inc_by(released.saturating_sub(counted));
            let mut resp = Response::new(full(relay.metrics.render()));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            Ok(resp)
        }
    }
}

fn not_found() -> RelayError {
    RelayError::NotFound {
        code: "not_found",
        message: "no such Reprise endpoint".into(),
    }
}

/// A request on the admin listener: the operational endpoints, nothing else.
async fn handle_admin(relay: Arc<Relay>, req: Request<Incoming>) -> Response<Body> {
    ops(&relay, &req, Audience::Admin).unwrap_or_else(RelayError::into_response)
}

/// Serves the admin listener (plain HTTP/1.1 and HTTP/2) until the end of
/// the shutdown's stop, so that metrics and a `503` readiness stay
/// visible while in-flight streams drain.
pub async fn serve_listener(relay: Arc<Relay>, listener: TcpListener) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "admin listener: metrics, healthz and readyz");
    }
    loop {
        let (io, addr) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(cause = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = relay.shutdown.stop().cancelled() => break,
        };
        let svc_relay = relay.clone();
        let svc = service_fn(move |req| {
            let relay = svc_relay.clone();
            async move { Ok::<_, Infallible>(handle_admin(relay, req).await) }
        });
        let conn = builder.serve_connection(TokioIo::new(io), svc).into_owned();
        let conn = graceful.watch(conn);
        relay.shutdown.tasks().spawn(
            async move {
                if let Err(e) = conn.await {
                    tracing::debug!(cause = %e, "admin connection ended with an error");
                }
            }
            .instrument(tracing::debug_span!("admin_conn", client.addr = %addr)),
        );
    }
    drop(listener);
    let _ = tokio::time::timeout(ADMIN_CLOSE_TIMEOUT, graceful.shutdown()).await;
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
    // Durable Streams read parameters: the recording as a Durable Stream.
    if crate::durable::recorded::wants(query) {
        return Ok(crate::durable::recorded::handle(relay, stream, query, req.headers()).await);
    }
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

/// Readiness from the probe's last verdict: answers at once whatever the
/// store does. Ready means the store answered its last probe and the relay
/// is not draining.
fn ready(relay: &Arc<Relay>, audience: Audience) -> Response<Body> {
    let draining = relay.shutdown.is_draining();
    let health = relay.store_health.snapshot();
    let ready = health.reachable && !draining;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut store = json!({
        "kind": relay.store.kind(),
        "reachable": health.reachable,
        "latency_ms": health.latency_ms,
    });
    // The store's own error text can name hosts and internals: only for
    // the admin listener (and the logs).
    if audience == Audience::Admin {
        store["error"] = json!(health.error);
    }
    json_response(
        status,
        json!({
            "ready": ready,
            "draining": draining,
            "store": store,
            "streams_in_memory": relay.hub.len(),
            "buffered_entries": relay.hub.unstored_entries(),
            "unstored_bytes": relay.unstored_total.load(Ordering::Relaxed),
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
