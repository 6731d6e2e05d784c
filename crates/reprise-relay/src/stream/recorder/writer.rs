//! The writer: after the producer, between a stream's in-memory log and
//! the store. Copies the log into the store in batches (lingering
//! `streams.store_linger` to gather them), retrying while the store is
//! unavailable and recovering from a store that lost the stream (rewriting
//! it from the log) and from append conflicts (an answer lost in flight);
//! its task is what the shutdown
//! sequence waits for before the last entries are stored.

use std::sync::Arc;
use std::time::Duration;

use reprise_core::{Dialect, Seq};
use reprise_store::{Entry, EntryBody, KeyRef, Store, StoreError, StreamMeta, Written};
use tokio_util::sync::CancellationToken;

use crate::retry::Backoff;
use crate::shutdown::WriterBusy;
use crate::state::Relay;
use crate::stream::live::LiveStream;

/// Most entries written to the store in one append.
const MAX_BATCH: usize = 512;

/// Copies the log into the store: the stream's metadata and key binding
/// with its first entries ([`Store::start`], no round trip before the
/// response), then entries in batches ([`Store::append_at`]) until the
/// terminal entry is stored. A store that lost the stream
/// ([`StoreError::Lost`]) gets it again, rewritten from the log.
pub(super) async fn write(
    relay: Arc<Relay>,
    live: Arc<LiveStream>,
    meta: StreamMeta,
    key: Option<KeyRef>,
    busy: WriterBusy,
) {
    let store = relay.store.clone();
    // Its own token: waiting on it touches no lock shared with other streams.
    let stop = relay.shutdown.stop().child_token();
    let id = live.id;
    // Metadata written late (store down at the start, or lost) carries a
    // fresh lease, so other instances do not take it for abandoned, and the
    // dialect decided so far.
    let lease = relay.config.streams.lease;
    let fresh = |m: &StreamMeta| StreamMeta {
        lease_until_ms: Some(crate::clock::now_ms() + lease.as_millis() as u64),
        signals: live.signals_decided().or(m.signals),
        ..m.clone()
    };
    let linger = relay.config.streams.store_linger;
    let phase = crate::clock::phase_of(live.id.as_bytes());
    // Whether the store holds the stream's record (a `start` succeeded and
    // nothing since said it was lost).
    let mut started = false;
    // The dialect the stored metadata holds (`None` reads as `reprise`).
    let mut signals_stored = meta.signals;
    let mut persisted = Seq::ZERO;
    // What the store said it holds after the last write (see `Written`).
    let mut records = 0u64;
    let mut rx = live.subscribe();
    // Whether every entry, the terminal one included, is stored.
    let stored_all = 'copy: loop {
        rx.borrow_and_update();
        let mut batch = live.entries_after(persisted, MAX_BATCH);
        if batch.is_empty() && started {
            tokio::select! {
                r = rx.changed() => if r.is_err() { break 'copy false },
                _ = stop.cancelled() => break 'copy false,
            }
            continue;
        }
        let urgent = linger.is_zero()
            || batch.len() >= MAX_BATCH
            || batch
                .last()
                .is_some_and(|e| matches!(e.body, EntryBody::End(_)));
        if !urgent {
            // Let more events join this append (fewer store round trips,
            // commands and wake-ups), unless the stream ends meanwhile. The
            // writers of every stream flush on one beat (in one of a few
            // phases, by stream id), so that their
            // appends reach the store in the same few socket writes and the
            // store answers them in the same few wake-ups; each event still
            // waits at most `linger`. A
            // stream with no event yet is started empty after the linger,
            // so that its record and key binding are stored soon anyway.
            tokio::select! {
                _ = tokio::time::sleep_until(crate::clock::next_beat(linger, phase)) => {}
                _ = live.wait_ended() => {}
                _ = stop.cancelled() => {}
            }
            batch = live.entries_after(persisted, MAX_BATCH);
            if batch.is_empty() && (started || stop.is_cancelled()) {
                if stop.is_cancelled() {
                    break 'copy false;
                }
                continue;
            }
        }
        let (last_seq, ended) = batch.last().map_or((persisted, false), batch_end);
        let wrote = if started {
            // A dialect decided since the metadata was written goes into
            // the store before the entries after the event that decided it,
            // so that a loader reaching a signal finds it (see `hub`).
            if let Some(dialect) = live.signals_decided() {
                if dialect != signals_stored.unwrap_or(Dialect::Reprise) {
                    if retry(&stop, || store.set_signals(id, dialect))
                        .await
                        .is_err()
                    {
                        break 'copy false;
                    }
                    signals_stored = Some(dialect);
                }
            }
            retry_write(&stop, || store.append_at(id, records, &batch)).await
        } else {
            let first = fresh(&meta);
            signals_stored = first.signals;
            retry_write(&stop, || store.start(&first, key.as_ref(), &batch)).await
        };
        match wrote {
            Wrote::Ok(w) => {
                if !started {
                    started = true;
                    if let Some(key) = &key {
                        relay.hub.key_stored(key, id);
                    }
                }
                records = w.records;
                persisted = last_seq;
                live.mark_stored(persisted);
            }
            Wrote::Stop => break 'copy false,
            // The store holds less than was appended (a failover to a
            // replica lacking the last writes, a restart without
            // persistence): start the stream again and rewrite it all from
            // the log. Frames released from memory come back as a gap.
            Wrote::Lost(detail) => {
                tracing::warn!(
                    detail,
                    "the store lost part of this stream; rewriting it from memory"
                );
                started = false;
                persisted = Seq::ZERO;
                records = 0;
                continue;
            }
            Wrote::Conflict => match recover(&stop, &*store, &meta, &live).await {
                // The store lost the stream: start it again, rewrite it all.
                Some(Recovered::Missing) => {
                    tracing::warn!("the store lost this stream; rewriting it from memory");
                    started = false;
                    persisted = Seq::ZERO;
                    records = 0;
                    continue;
                }
                // An earlier append was applied but its answer lost:
                // continue after what the store has (its record count is
                // unknown: the next append does not check it).
                Some(Recovered::StoredUpTo(seq)) if seq >= persisted => {
                    persisted = seq;
                    records = 0;
                    live.mark_stored(persisted);
                    if live.end().is_some_and(|(end, _)| end <= seq) {
                        break 'copy true;
                    }
                    continue;
                }
                _ => {
                    tracing::error!("append conflict the writer cannot resolve (the stream was ended elsewhere, or replaced); the stream's record stays incomplete");
                    break 'copy false;
                }
            },
        }
        if ended {
            break 'copy true;
        }
    };
    drop(busy);
    if stored_all {
        tracing::debug!(entries = persisted.0, "stream stored");
    } else if stop.is_cancelled() {
        return;
    }
    // Keep the finished log in memory a little, for reconnects right after
    // the end; a log the store refused (see the errors above) stays for its
    // readers here until its stream ends, and is then released the same way.
    let hot_linger = relay.config.streams.hot_linger;
    tokio::select! {
        _ = async {
            live.wait_ended().await;
            tokio::time::sleep(hot_linger).await;
        } => {}
        _ = stop.cancelled() => {}
    }
    relay.hub.remove(&live);
}

/// The last seq a batch covers, and whether it ends the stream.
fn batch_end(last: &Entry) -> (Seq, bool) {
    (last.last_seq(), matches!(last.body, EntryBody::End(_)))
}

enum Wrote {
    Ok(Written),
    /// The batch does not follow what the store holds, or the stream was
    /// ended (fenced) by another instance.
    Conflict,
    /// The store lost (part of) the stream: what it found.
    Lost(String),
    /// Permanent error, or shutting down.
    Stop,
}

/// Writes a batch, retrying while the store is unavailable.
async fn retry_write<F, Fut>(stop: &CancellationToken, mut write: F) -> Wrote
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Written, StoreError>>,
{
    let r = retry(stop, || {
        let call = write();
        async move {
            match call.await {
                Ok(w) => Ok(Wrote::Ok(w)),
                Err(StoreError::Conflict { detail, .. }) => {
                    tracing::debug!(detail, "append conflict");
                    Ok(Wrote::Conflict)
                }
                Err(StoreError::Lost { detail, .. }) => Ok(Wrote::Lost(detail)),
                Err(e) => Err(e),
            }
        }
    })
    .await;
    r.unwrap_or(Wrote::Stop)
}

enum Recovered {
    /// The store does not hold the stream.
    Missing,
    /// The store holds entries up to this seq.
    StoredUpTo(Seq),
}

/// After an append conflict: find whether the store lost the stream, or
/// where its stored entries end. `None` if the stream is no longer this
/// writer's: another epoch, or ended by someone else (the terminal entry
/// of `end_if_abandoned` fences this writer off).
async fn recover(
    stop: &CancellationToken,
    store: &dyn Store,
    meta: &StreamMeta,
    live: &LiveStream,
) -> Option<Recovered> {
    let found = retry(stop, || store.meta(meta.id)).await.ok()?;
    match found {
        None => Some(Recovered::Missing),
        Some(stored) if stored.epoch != meta.epoch => None,
        Some(stored) => {
            if let Some((end, _)) = &stored.end {
                // Ours (an ending append applied, its answer lost), or
                // another instance's: then this writer is fenced off.
                return live
                    .end()
                    .filter(|(own, _)| own == end)
                    .map(|_| Recovered::StoredUpTo(*end));
            }
            let mut last = Seq::ZERO;
            loop {
                let page = retry(stop, || store.read(meta.id, last, 1000)).await.ok()?;
                match page.last() {
                    Some(e) => last = e.last_seq(),
                    None => return Some(Recovered::StoredUpTo(last)),
                }
            }
        }
    }
}

/// Retries a store call while its error is retryable; gives up on a
/// permanent error or when `stop` fires.
async fn retry<T, F, Fut>(stop: &CancellationToken, mut call: F) -> Result<T, ()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    // Writers retry at least every second, so a store that comes back is
    // caught up with quickly.
    let mut backoff = Backoff::up_to(Duration::from_secs(1));
    loop {
        match call().await {
            Ok(v) => return Ok(v),
            Err(e) if e.is_retryable() => {
                tracing::warn!(cause = %e, "store call failed; retrying");
                tokio::select! {
                    _ = backoff.wait() => {}
                    _ = stop.cancelled() => return Err(()),
                }
            }
            Err(e) => {
                tracing::error!(cause = %e, "store call failed permanently; the stream's record is incomplete");
                return Err(());
            }
        }
    }
}
