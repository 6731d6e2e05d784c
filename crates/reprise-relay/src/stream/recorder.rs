//! Recording: where a forwarded SSE or NDJSON response starts being
//! recorded, right after `forward` got the upstream's headers and put the
//! stream's [`LiveStream`] in the hub.
//!
//! This file starts the three tasks that record it (nothing waits for the
//! store before the response starts: the writer stores the metadata and key
//! binding with the first events):
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

use reprise_store::{KeyRef, StreamMeta};
use tracing::Instrument;

use crate::decode::{Coding, Decoder};
use crate::state::Relay;
use crate::stream::live::LiveStream;
use crate::upstream::UpstreamBody;

/// Starts recording `body` into `live` (already registered in the hub).
/// `coding`: the content coding to decode the body from, if the upstream
/// compressed it.
pub fn spawn(
    relay: &Arc<Relay>,
    live: Arc<LiveStream>,
    body: UpstreamBody,
    coding: Option<Coding>,
    meta: StreamMeta,
    key: Option<KeyRef>,
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
    let writer = writer::write(relay.clone(), live, meta, key, busy);
    relay.shutdown.tasks().spawn(writer.instrument(span));
}
