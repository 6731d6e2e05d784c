//! Recording: where a forwarded SSE or NDJSON response starts being
//! recorded, right after `forward` got the upstream's headers and put the
//! stream's [`LiveStream`] in the hub.
//!
//! This file registers the stream in the store (metadata and key binding,
//! before the response starts) and starts the three tasks that record it:
//!
//! - `producer`: upstream body → log (ids and wire frames, signal
//!   dialect, limits, decoding a compressed body), with the `framer`
//!   splitting the body into events or lines;
//! - `writer`: log → store, in batches;
//! - `lease`: keeps this instance's producer lease on the stream alive.
//!
//! All run as tasks of their own, detached from the client's connection:
//! a client that hangs up stops only its reader, never the recording (the
//! generation is paid for). The writer batches: it waits
//! `streams.store_linger` after new events before an append (not when the
//! stream ends), and while one append is in flight new events accumulate in
//! the log and go in the next one. The producer appends each upstream burst
//! to the log at once (see `producer::Batch` and `body::Coalesce`).

mod framer;
mod lease;
mod producer;
mod writer;

use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use reprise_store::{KeyRef, StreamMeta};
use tracing::Instrument;

use crate::decode::{Coding, Decoder};
use crate::state::Relay;
use crate::stream::live::LiveStream;

pub use writer::Registered;

/// How long the response waits for the store before a stream starts anyway.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(1);

/// Stores the stream's metadata and key binding before the response starts,
/// so that a client resuming on another instance right after its first event
/// finds the stream. One attempt: if the store is unavailable the stream
/// still starts, and the writer retries in the background. While the store
/// is known to be down (see `health`) there is no attempt at all: the
/// response starts at once and the writer stores everything once it is back.
pub async fn register(relay: &Relay, meta: &StreamMeta, key: Option<&KeyRef>) -> Registered {
    if relay.store_health.is_known_down() {
        relay.metrics.skipped("register");
        tracing::debug!(stream.id = %meta.id, "store known unreachable; registering the stream later");
        return Registered {
            meta_stored: false,
            key_bound: key.is_none(),
        };
    }
    let meta_stored = match tokio::time::timeout(REGISTER_TIMEOUT, relay.store.create(meta)).await {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            tracing::warn!(stream.id = %meta.id, cause = %e, "storing stream metadata failed; will retry");
            false
        }
        Err(_) => {
            tracing::warn!(stream.id = %meta.id, "storing stream metadata timed out; will retry");
            false
        }
    };
    let key_bound = match key {
        Some(k) if meta_stored => matches!(
            tokio::time::timeout(REGISTER_TIMEOUT, relay.store.bind_key(k, meta.id)).await,
            Ok(Ok(()))
        ),
        Some(_) => false,
        None => true,
    };
    Registered {
        meta_stored,
        key_bound,
    }
}

/// Starts recording `body` into `live` (already registered in the hub).
/// `coding`: the content coding to decode the body from, if the upstream
/// compressed it.
pub fn spawn(
    relay: &Arc<Relay>,
    live: Arc<LiveStream>,
    body: Incoming,
    coding: Option<Coding>,
    meta: StreamMeta,
    key: Option<KeyRef>,
    registered: Registered,
) {
    let span = tracing::info_span!("stream", stream.id = %live.id, route = %meta.route);
    let producer = producer::produce(
        relay.clone(),
        live.clone(),
        body,
        coding.map(Decoder::new),
        meta.route.clone(),
    );
    relay
        .shutdown
        .producers()
        .spawn(producer.instrument(span.clone()));
    let busy = relay.shutdown.writer_busy();
    relay
        .shutdown
        .tasks()
        .spawn(lease::keep_lease(relay.clone(), live.clone()).instrument(span.clone()));
    let writer = writer::write(relay.clone(), live, meta, key, registered, busy);
    relay.shutdown.tasks().spawn(writer.instrument(span));
}
