//! Live tails: the store's one subscriber connection, one `SSUBSCRIBE`
//! per watched stream, and the watchers it wakes (again after a reconnect).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fred::clients::SubscriberClient;
use fred::error::Error as FredError;
use fred::prelude::*;
use fred::types::Message;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::codec::{channel_stream, stream_keys};
use super::connection::Inner;
use super::connection::RedisOptions;
use super::error::map_err;
use super::lock;
use crate::{StoreError, Watcher};
use reprise_core::StreamId;

/// The store's one subscriber connection and the watchers it wakes.
pub(super) struct Notifier {
    client: SubscriberClient,
    prefix: String,
    topics: Mutex<HashMap<StreamId, Topic>>,
}

/// One watched stream.
pub(super) struct Topic {
    refs: usize,
    /// Whether `SSUBSCRIBE` succeeded (and no `SUNSUBSCRIBE` followed).
    subscribed: bool,
    tx: watch::Sender<u64>,
    /// Serializes this stream's subscribe and unsubscribe calls, so that a
    /// late unsubscribe never cancels a newer watcher's subscription.
    op: Arc<tokio::sync::Mutex<()>>,
}

impl Notifier {
    pub(super) async fn start(inner: &Inner) -> Result<Arc<Notifier>, StoreError> {
        let client = inner.builder.build_subscriber_client().map_err(map_err)?;
        // Take the receivers before connecting so nothing is missed.
        let messages = client.message_rx();
        let reconnects = client.reconnect_rx();
        let bound = inner
            .ropts
            .connect_timeout
            .saturating_add(inner.ropts.command_timeout);
        match tokio::time::timeout(bound, client.init()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(map_err(e)),
            Err(_) => {
                let c = client.clone();
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(Duration::from_secs(1), c.quit()).await;
                });
                return Err(StoreError::Unavailable(
                    "subscriber connection timed out".into(),
                ));
            }
        }
        let n = Arc::new(Notifier {
            client,
            prefix: inner.opts.key_prefix.clone(),
            topics: Mutex::new(HashMap::new()),
        });
        let token = inner.shutdown.child_token();
        tokio::spawn(
            route_messages(n.clone(), messages, token.clone())
                .instrument(tracing::debug_span!("redis_notify")),
        );
        tokio::spawn(
            resubscribe_on_reconnect(n.clone(), reconnects, token.clone(), inner.ropts.clone())
                .instrument(tracing::debug_span!("redis_resubscribe")),
        );
        let heartbeat = inner.ropts.heartbeat_interval;
        tokio::spawn(
            {
                let n = n.clone();
                async move {
                    tokio::select! {
                        _ = token.cancelled() => {}
                        _ = n.client.enable_heartbeat(heartbeat, false) => {}
                    }
                    let _ = n.client.quit().await;
                }
            }
            .instrument(tracing::debug_span!("redis_subscriber")),
        );
        Ok(n)
    }

    fn channel(&self, stream: StreamId) -> String {
        stream_keys(&self.prefix, stream).channel
    }

    pub(super) fn bump(&self, stream: StreamId, seq: u64) {
        if let Some(t) = lock(&self.topics).get(&stream) {
            t.tx.send_modify(|v| *v = (*v).max(seq));
        }
    }

    fn bump_all(&self) {
        for t in lock(&self.topics).values() {
            t.tx.send_modify(|_| {});
        }
    }

    pub(super) async fn watch(self: &Arc<Self>, stream: StreamId) -> Result<Watcher, StoreError> {
        let (rx, op) = {
            let mut topics = lock(&self.topics);
            let t = topics.entry(stream).or_insert_with(|| Topic {
                refs: 0,
                subscribed: false,
                tx: watch::Sender::new(0),
                op: Arc::new(tokio::sync::Mutex::new(())),
            });
            t.refs += 1;
            (t.tx.subscribe(), t.op.clone())
        };
        // From here on, dropping the guard (also on error) releases the topic.
        let guard = TopicGuard {
            notifier: self.clone(),
            stream,
        };
        let _op = op.lock().await;
        let subscribed = lock(&self.topics)
            .get(&stream)
            .is_some_and(|t| t.subscribed);
        if !subscribed {
            self.client
                .ssubscribe(self.channel(stream))
                .await
                .map_err(map_err)?;
            if let Some(t) = lock(&self.topics).get_mut(&stream) {
                t.subscribed = true;
            }
        }
        Ok(Watcher::new(rx, Some(Box::new(guard))))
    }

    fn release(self: &Arc<Self>, stream: StreamId) {
        let op = {
            let mut topics = lock(&self.topics);
            let Some(t) = topics.get_mut(&stream) else {
                return;
            };
            t.refs = t.refs.saturating_sub(1);
            if t.refs > 0 {
                return;
            }
            t.op.clone()
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            lock(&self.topics).remove(&stream);
            return;
        };
        let n = self.clone();
        rt.spawn(async move {
            let _op = op.lock().await;
            let subscribed = match lock(&n.topics).get(&stream) {
                Some(t) if t.refs == 0 => t.subscribed,
                _ => return,
            };
            if subscribed {
                if let Err(e) = n.client.sunsubscribe(n.channel(stream)).await {
                    tracing::debug!(stream.id = %stream, cause = %e, "SUNSUBSCRIBE failed");
                }
            }
            let mut topics = lock(&n.topics);
            if let Some(t) = topics.get_mut(&stream) {
                if t.refs == 0 {
                    topics.remove(&stream);
                } else {
                    // A watcher arrived meanwhile; it subscribes again after us.
                    t.subscribed = false;
                }
            }
        });
    }

    /// Subscribes again to every watched stream, one `SSUBSCRIBE` per slot.
    async fn resubscribe_all(&self) -> Result<usize, FredError> {
        let mut by_slot: BTreeMap<u16, Vec<String>> = BTreeMap::new();
        for (stream, t) in lock(&self.topics).iter() {
            if t.subscribed {
                let channel = self.channel(*stream);
                by_slot
                    .entry(fred::util::redis_keyslot(channel.as_bytes()))
                    .or_default()
                    .push(channel);
            }
        }
        let mut count = 0;
        for (_, channels) in by_slot {
            count += channels.len();
            self.client.ssubscribe(channels).await?;
        }
        Ok(count)
    }
}

/// Keeps one watcher's interest in a stream.
pub(super) struct TopicGuard {
    notifier: Arc<Notifier>,
    stream: StreamId,
}

impl Drop for TopicGuard {
    fn drop(&mut self) {
        self.notifier.release(self.stream);
    }
}

pub(super) async fn route_messages(
    n: Arc<Notifier>,
    mut rx: tokio::sync::broadcast::Receiver<Message>,
    token: CancellationToken,
) {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        let msg = tokio::select! {
            _ = token.cancelled() => return,
            msg = rx.recv() => msg,
        };
        match msg {
            Ok(m) => {
                let Some(stream) = channel_stream(&n.prefix, &m.channel) else {
                    continue;
                };
                let seq = m
                    .value
                    .as_str()
                    .and_then(|s| s.parse::<u64>().ok())
                    .unwrap_or(0);
                n.bump(stream, seq);
            }
            Err(RecvError::Lagged(missed)) => {
                tracing::warn!(
                    missed,
                    "notification buffer overflowed; waking every watcher"
                );
                n.bump_all();
            }
            Err(RecvError::Closed) => return,
        }
    }
}

/// How often a cluster subscriber checks whether its channels' slots moved.
pub(super) const CLUSTER_CHECK_INTERVAL: Duration = Duration::from_secs(2);

/// Refreshes the subscriber's view of the cluster and tells whether the slot
/// of a subscribed channel changed owner since the last look (or is new).
pub(super) async fn owners_changed(n: &Notifier, owners: &mut HashMap<u16, Server>) -> bool {
    let slots: Vec<u16> = lock(&n.topics)
        .iter()
        .filter(|(_, t)| t.subscribed)
        .map(|(s, _)| fred::util::redis_keyslot(n.channel(*s).as_bytes()))
        .collect();
    if slots.is_empty() {
        return false;
    }
    if let Err(e) = n.client.sync_cluster().await {
        tracing::debug!(cause = %e, "refreshing the cluster state failed");
        return false;
    }
    let Some(state) = n.client.cached_cluster_state() else {
        return false;
    };
    let mut changed = false;
    for slot in slots {
        if let Some(server) = state.get_server(slot) {
            // A slot seen for the first time counts as changed: it may have
            // moved between its subscription and this look, and subscribing
            // again is harmless.
            changed |= owners
                .insert(slot, server.clone())
                .is_none_or(|old| old != *server);
        }
    }
    changed
}

pub(super) async fn resubscribe_on_reconnect(
    n: Arc<Notifier>,
    mut rx: tokio::sync::broadcast::Receiver<Server>,
    token: CancellationToken,
    ropts: RedisOptions,
) {
    use tokio::sync::broadcast::error::RecvError;
    // Retry until the subscriptions are back; a failure must not leave the
    // tails deaf until the next reconnection.
    let mut pending = false;
    let mut delay = ropts.reconnect_min_delay;
    // fred reports the first connection as a reconnection too.
    let mut first = true;
    // In a cluster, a moved slot ends its shard subscriptions (Redis pushes
    // `sunsubscribe`, which fred drops): look at the slot owners now and
    // then, and subscribe again when one changed.
    let clustered = n.client.is_clustered();
    let mut owners: HashMap<u16, Server> = HashMap::new();
    let mut check = tokio::time::interval(CLUSTER_CHECK_INTERVAL);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = token.cancelled() => return,
            _ = check.tick(), if clustered && !pending => {
                if owners_changed(&n, &mut owners).await {
                    pending = true;
                    delay = Duration::ZERO;
                } else {
                    continue;
                }
            }
            ev = rx.recv() => match ev {
                Ok(_) | Err(RecvError::Lagged(_)) => {
                    pending = true;
                    delay = ropts.reconnect_min_delay;
                }
                Err(RecvError::Closed) => return,
            },
            _ = tokio::time::sleep(delay), if pending => {}
        }
        if !pending {
            continue;
        }
        match n.resubscribe_all().await {
            Ok(count) => {
                pending = false;
                if first {
                    tracing::debug!("subscriber connected");
                } else {
                    tracing::info!(
                        channels = count,
                        "subscriber reconnected; resubscribed and woke every watcher"
                    );
                }
                first = false;
                // Notifications sent while disconnected are lost: make every tail re-read.
                n.bump_all();
            }
            Err(e) => {
                tracing::warn!(cause = %e, "resubscribing after reconnection failed; retrying");
                delay = delay.saturating_mul(2).min(ropts.reconnect_max_delay);
            }
        }
    }
}
