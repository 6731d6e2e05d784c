//! Cancelling a stream ("stop generating"): `DELETE /_reprise/streams/{id}`
//! and `DELETE` on a route's resume template.
//!
//! On the instance that produces the stream, the producer stops reading the
//! upstream (closing its connection, which aborts the generation), records
//! the outcome `cancelled`, and every reader gets the `cancelled` signal.

use std::sync::Arc;

use http::{header, HeaderMap, HeaderValue, Response, StatusCode};
use reprise_core::StreamId;
use serde_json::json;

use crate::auth::is_owner;
use crate::body::{full, Body};
use crate::error::RelayError;
use crate::state::Relay;
use crate::stream::live::Owner;

/// Cancels `stream` and answers with what happened:
/// `200 {"outcome":"cancelled"}` once recorded here, `202
/// {"outcome":"cancel_requested"}` when another instance produces it,
/// `200 {"outcome":"<completed|failed|cancelled>"}` if it had already ended,
/// `404` if unknown.
///
/// Only the caller that started the stream may cancel it; anyone else gets
/// the same `404` as for an unknown stream.
pub async fn cancel(
    relay: &Arc<Relay>,
    stream: StreamId,
    headers: &HeaderMap,
) -> Result<Response<Body>, RelayError> {
    cancel_if(relay, stream, |owner| {
        is_owner(&relay.auth, &relay.router, owner, headers)
    })
    .await
}

/// [`cancel`], for whoever `allowed` accepts as the stream's owner (the
/// proxy protocol: whoever holds the stream's signed URL).
pub async fn cancel_if(
    relay: &Arc<Relay>,
    stream: StreamId,
    allowed: impl Fn(&Owner) -> bool,
) -> Result<Response<Body>, RelayError> {
    let not_found = || RelayError::NotFound {
        code: "stream_not_found",
        message: "no such stream (unknown, or expired after its retention)".into(),
    };
    if let Some(live) = relay.hub.get(stream) {
        if let Some(owner) = live.owner.get() {
            if !allowed(owner) {
                return Err(not_found());
            }
        }
        if let Some((_, outcome)) = live.end() {
            return Ok(answer(StatusCode::OK, stream, outcome.label()));
        }
        if live.local {
            let mut rx = live.subscribe();
            live.cancel.cancel();
            // The producer records the outcome at once; wait for it so that
            // the answer states a fact.
            while live.end().is_none() {
                if rx.changed().await.is_err() {
                    break;
                }
            }
            let label = live.end().map(|(_, o)| o.label()).unwrap_or("cancelled");
            tracing::info!(stream.id = %stream, "stream cancelled");
            return Ok(answer(StatusCode::OK, stream, label));
        }
    }
    match relay.store.meta(stream).await? {
        None => Err(not_found()),
        Some(meta)
            if !allowed(&Owner {
                route: meta.route.clone(),
                caller: meta.caller.clone(),
            }) =>
        {
            Err(not_found())
        }
        Some(meta) => match meta.end {
            Some((_, outcome)) => Ok(answer(StatusCode::OK, stream, outcome.label())),
            None => {
                relay.store.request_cancel(stream).await?;
                tracing::info!(stream.id = %stream, "cancel requested from the producing instance");
                Ok(answer(StatusCode::ACCEPTED, stream, "cancel_requested"))
            }
        },
    }
}

fn answer(status: StatusCode, stream: StreamId, outcome: &str) -> Response<Body> {
    let body = json!({ "stream_id": stream.to_string(), "outcome": outcome });
    let mut resp = Response::new(full(body.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}
