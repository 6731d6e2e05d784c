//! The writer: after the producer, between a stream's in-memory log and
//! the store. Copies the log into the store in batches (lingering
//! `streams.store_linger` to gather them), retrying while the store is
//! unavailable and recovering from append conflicts (a store that lost the
//! stream, an answer lost in flight); its task is what the shutdown
//! sequence waits for before the last entries are stored.

use std::sync::Arc;
use std::time::Duration;

use reprise_core::{Dialect, Seq, StreamId};
use reprise_store::{Entry, EntryBody, KeyRef, Store, StoreError, StreamMeta};
use tokio_util::sync::CancellationToken;

use crate::retry::Backoff;
use crate::shutdown::WriterBusy;
use crate::state::Relay;
use crate::stream::live::LiveStream;

/// Most entries written to the store in one append.
const MAX_BATCH: usize = 512;

/// What `recorder::register` managed to store before the response started;
/// the writer stores the rest.
#[derive(Clone, Copy, Debug)]
pub struct Registered {
    pub(super) meta_stored: bool,
    pub(super) key_bound: bool,
}

/// Copies the log into the store: metadata, key binding, then entries in
/// batches until the terminal entry is stored.
pub(super) async fn write(
    relay: Arc<Relay>,
    live: Arc<LiveStream>,
    meta: StreamMeta,
    key: Option<KeyRef>,
    registered: Registered,
    busy: WriterBusy,
) {
    let store = relay.store.clone();
    // Its own token: waiting on it touches no lock shared with other streams.
    let stop = relay.shutdown.stop().child_token();
    let id = live.id;
    // Metadata written late (store down at the start, or lost) carries a
    // fresh lease, so other instances do not take it for abandoned.
    let lease = relay.config.streams.lease;
    let fresh = |m: &StreamMeta| StreamMeta {
        lease_until_ms: Some(crate::clock::now_ms() + lease.as_millis() as u64),
        signals: live.signals_decided().or(m.signals),
        ..m.clone()
    };
    // The dialect the stored metadata holds (`None` reads as `reprise`).
    let mut signals_stored = meta.signals;
    if !registered.meta_stored {
        let late = fresh(&meta);
        if retry(&stop, || store.create(&late)).await.is_err() {
            return;
        }
        signals_stored = late.signals;
    }
    if let (Some(key), false) = (&key, registered.key_bound) {
        if retry(&stop, || store.bind_key(key, id)).await.is_err() {
            return;
        }
    }
    let linger = relay.config.streams.store_linger;
    let mut persisted = Seq::ZERO;
    let mut rx = live.subscribe();
    loop {
        rx.borrow_and_update();
        let batch = live.entries_after(persisted, MAX_BATCH);
        let Some(last) = batch.last() else {
            tokio::select! {
                r = rx.changed() => if r.is_err() { return },
                _ = stop.cancelled() => return,
            }
            continue;
        };
        let (batch, last_seq, ended) = if linger.is_zero()
            || batch.len() >= MAX_BATCH
            || matches!(last.body, EntryBody::End(_))
        {
            let (last_seq, ended) = batch_end(last);
            (batch, last_seq, ended)
        } else {
            // Let more events join this append (fewer store round trips,
            // commands and wake-ups), unless the stream ends meanwhile.
            tokio::select! {
                _ = tokio::time::sleep(linger) => {}
                _ = live.wait_ended() => {}
                _ = stop.cancelled() => {}
            }
            let batch = live.entries_after(persisted, MAX_BATCH);
            let Some(last) = batch.last() else { continue };
            let (last_seq, ended) = batch_end(last);
            (batch, last_seq, ended)
        };
        // A dialect decided since the metadata was written goes into the
        // store before the entries after the event that decided it, so
        // that a loader reaching a signal finds it (see `hub`).
        if let Some(dialect) = live.signals_decided() {
            if dialect != signals_stored.unwrap_or(Dialect::Reprise) {
                if retry(&stop, || store.set_signals(id, dialect))
                    .await
                    .is_err()
                {
                    return;
                }
                signals_stored = Some(dialect);
            }
        }
        match retry_append(&stop, &*store, id, &batch).await {
            Appended::Ok => {
                persisted = last_seq;
                live.mark_stored(persisted);
            }
            Appended::Stop => return,
            Appended::Conflict => {
                let again = fresh(&meta);
                match recover(&stop, &*store, &again, key.as_ref()).await {
                    // The store lost the stream (a Redis restart without
                    // persistence, a flush): it was re-created; rewrite it all
                    // from the log, which still holds every entry.
                    Some(Recovered::Recreated) => {
                        tracing::warn!("the store lost this stream; rewriting it from memory");
                        signals_stored = again.signals;
                        persisted = Seq::ZERO;
                        continue;
                    }
                    // An earlier append was applied but its answer lost:
                    // continue after what the store has.
                    Some(Recovered::StoredUpTo(seq)) if seq >= persisted => {
                        persisted = seq;
                        live.mark_stored(persisted);
                        if live.end().is_some_and(|(end, _)| end <= seq) {
                            break;
                        }
                        continue;
                    }
                    _ => {
                        tracing::error!("append conflict the writer cannot resolve; the stream's record stays incomplete");
                        return;
                    }
                }
            }
        }
        if ended {
            break;
        }
    }
    tracing::debug!(entries = persisted.0, "stream stored");
    drop(busy);
    // Keep the finished log in memory a little, for reconnects right after the end.
    tokio::select! {
        _ = tokio::time::sleep(relay.config.streams.hot_linger) => {}
        _ = stop.cancelled() => {}
    }
    relay.hub.remove(&live);
}

/// The last seq a batch covers, and whether it ends the stream.
fn batch_end(last: &Entry) -> (Seq, bool) {
    (last.last_seq(), matches!(last.body, EntryBody::End(_)))
}

enum Appended {
    Ok,
    /// The batch does not follow what the store holds.
    Conflict,
    /// Permanent error, or shutting down.
    Stop,
}

/// Appends a batch, retrying while the store is unavailable.
async fn retry_append(
    stop: &CancellationToken,
    store: &dyn Store,
    id: StreamId,
    batch: &[Entry],
) -> Appended {
    let r = retry(stop, || async {
        match store.append(id, batch).await {
            Err(StoreError::Conflict { detail, .. }) => {
                tracing::debug!(detail, "append conflict");
                Ok(Appended::Conflict)
            }
            Ok(()) => Ok(Appended::Ok),
            Err(e) => Err(e),
        }
    })
    .await;
    r.unwrap_or(Appended::Stop)
}

enum Recovered {
    /// The stream was missing and has been created again (empty).
    Recreated,
    /// The store holds entries up to this seq.
    StoredUpTo(Seq),
}

/// After an append conflict: re-create a stream the store lost, or find
/// where the stored entries end.
async fn recover(
    stop: &CancellationToken,
    store: &dyn Store,
    meta: &StreamMeta,
    key: Option<&KeyRef>,
) -> Option<Recovered> {
    let found = retry(stop, || store.meta(meta.id)).await.ok()?;
    match found {
        None => {
            retry(stop, || store.create(meta)).await.ok()?;
            if let Some(k) = key {
                retry(stop, || store.bind_key(k, meta.id)).await.ok()?;
            }
            Some(Recovered::Recreated)
        }
        Some(stored) if stored.epoch != meta.epoch => None,
        Some(_) => {
            let mut last = Seq::ZERO;
            loop {
                let page = retry(stop, || store.read(meta.id, last, 1000)).await.ok()?;
                match page.last() {
                    Some(Entry {
                        body: EntryBody::Gap { upto },
                        ..
                    }) => last = *upto,
                    Some(e) => last = e.seq,
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
