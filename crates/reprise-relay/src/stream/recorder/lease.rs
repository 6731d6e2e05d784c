//! The lease keeper: beside a stream's producer, from the start of a
//! recording to its end; keeps other instances from taking the stream for
//! abandoned, and hears of a cancel requested on another instance.

use std::sync::Arc;

use crate::state::Relay;
use crate::stream::live::LiveStream;

/// Renews this instance's lease on a stream it records, every third of the
/// lease (on the process's beat: the renewals of all its streams go out
/// together), until the stream ends; a renewal that reports a cancel request
/// (`DELETE` on another instance) cancels the producer.
pub(super) async fn keep_lease(relay: Arc<Relay>, live: Arc<LiveStream>) {
    let lease = relay.config.streams.lease;
    // Not woken by every event: only by the end.
    let ended = live.wait_ended();
    tokio::pin!(ended);
    let every = lease / 3;
    loop {
        // The first renewal not sooner than half a period after the start
        // (the lease was just written with the stream's record).
        let mut at = crate::clock::next_beat(every, crate::clock::phase_of(live.id.as_bytes()));
        if at.saturating_duration_since(tokio::time::Instant::now()) < every / 2 {
            at += every;
        }
        tokio::select! {
            _ = tokio::time::sleep_until(at) => {}
            _ = &mut ended => return,
            _ = relay.shutdown.stop().cancelled() => return,
        }
        let now = crate::clock::now_ms();
        match relay
            .store
            .renew_lease(
                live.id,
                &relay.instance,
                now,
                now + lease.as_millis() as u64,
            )
            .await
        {
            Ok(r) if r.cancel_requested => {
                tracing::info!("cancel requested through the store");
                live.cancel.cancel();
            }
            Ok(_) => {}
            // The store may have lost the stream (the writer re-creates it),
            // or be unreachable: keep producing, renew again later.
            Err(e) => tracing::debug!(cause = %e, "lease renewal failed"),
        }
    }
}
