//! `Idempotency-Key`, used when forwarding a request: a retried
//! request attaches to the stream its first attempt started instead of
//! calling the upstream again; a claim is given back if its request fails
//! before its stream starts.

use std::sync::Arc;

use http::{HeaderMap, HeaderName, Response};
use reprise_core::StreamId;
use reprise_store::KeyRef;
use tracing::Instrument;

use crate::body::Body;
use crate::error::RelayError;
use crate::resume::{self, Position, Via};
use crate::state::Relay;

/// Claims `key` for the stream about to start (`stream`). If another
/// request claimed it first, answers with that request's stream (waiting up
/// to `streams.idempotency_wait` for it to start); if that request gives the
/// key back (it failed) or its stream never starts, takes the key over and
/// lets this request call the upstream.
pub(crate) async fn attach_idempotent(
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
    let mut existing = match bounded(relay.store.claim_key(key, stream)).await {
        Ok(None) => return Ok(None),
        Ok(Some(existing)) => existing,
        Err(e) => {
            tracing::warn!(cause = %e, "cannot check the Idempotency-Key; calling the upstream");
            return Ok(None);
        }
    };
    let deadline = tokio::time::Instant::now() + relay.config.streams.idempotency_wait;
    loop {
        let known = relay.hub.get(existing).is_some()
            || bounded(relay.store.meta(existing)).await?.is_some();
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
            bounded(relay.store.bind_key(key, stream)).await?;
            return Ok(None);
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        // The first request may have given the key back (it failed before
        // its stream started): then the next claim wins and calls upstream.
        if bounded(relay.store.resolve_key(key)).await? != Some(existing) {
            match bounded(relay.store.claim_key(key, stream)).await? {
                None => return Ok(None),
                Some(other) => existing = other,
            }
        }
    }
}

/// Longest wait for one store call of the claim: a stalled store (not yet
/// known down by the probe) must not hold the request for the client
/// library's whole command timeout.
const CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// `call`, or `Unavailable` if the store does not answer within
/// [`CALL_TIMEOUT`] (the first claim then fails open; later calls answer
/// `503` with `Retry-After`, as any store outage does).
async fn bounded<T>(
    call: impl std::future::Future<Output = Result<T, reprise_store::StoreError>>,
) -> Result<T, reprise_store::StoreError> {
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(answer) => answer,
        Err(_) => Err(reprise_store::StoreError::Unavailable(format!(
            "no answer within {CALL_TIMEOUT:?}"
        ))),
    }
}

/// An `Idempotency-Key` claimed for a stream that has not started yet. If
/// the request ends without starting it (refused, upstream error, a
/// response that is not recorded), dropping the claim gives the key back, so
/// that a retry calls the upstream at once instead of waiting
/// `streams.idempotency_wait` for a stream that will never exist.
pub(crate) struct Claim {
    pub(crate) relay: Arc<Relay>,
    pub(crate) key: Option<KeyRef>,
    pub(crate) stream: StreamId,
}

impl Claim {
    /// The stream started: the key stays bound to it.
    pub(crate) fn keep(mut self) {
        self.key = None;
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        let Some(key) = self.key.take() else { return };
        let (relay, stream) = (self.relay.clone(), self.stream);
        self.relay.shutdown.tasks().spawn(
            async move {
                if let Err(e) = bounded(relay.store.release_key(&key, stream)).await {
                    tracing::warn!(cause = %e, "cannot give back an Idempotency-Key; a retry waits for it to lapse");
                }
            }
            .in_current_span(),
        );
    }
}
