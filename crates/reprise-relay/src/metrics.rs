//! Prometheus metrics, served at `GET /_reprise/metrics` (OpenMetrics text).
//!
//! One [`Metrics`] per relay (no global registry, so several relays in one
//! test process do not mix). Label values are bounded: route paths from the
//! config, status codes, and fixed enums. The list, with labels, is in
//! `docs/metrics.md`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use reprise_core::{Outcome, Seq, StreamId};
use reprise_store::{Entry, KeyRef, LeaseRenewal, Store, StoreError, StreamMeta, Watcher, Written};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndLabels {
    pub route: String,
    /// completed, failed, cancelled
    pub outcome: String,
    /// the failure code (`upstream_reset`, ...), empty otherwise
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResumeLabels {
    /// last_event_id, stream_id, key
    pub kind: String,
    /// ok, no_content, not_found, history_lost, error
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    pub op: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabels {
    pub route: String,
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamErrorLabels {
    pub route: String,
    /// connect, timeout
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RateLimitedLabels {
    pub route: String,
    /// concurrent_streams, starts_per_minute
    pub limit: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 100 µs .. ~26 s
    Histogram::new(exponential_buckets(0.0001, 2.0, 19))
}

/// All of Reprise's metrics.
pub struct Metrics {
    registry: Registry,
    pub streams_started: Family<RouteLabels, Counter>,
    pub streams_active: Gauge,
    pub streams_ended: Family<EndLabels, Counter>,
    pub events_recorded: Counter,
    pub bytes_recorded: Counter,
    pub events_replayed: Counter,
    pub bytes_replayed: Counter,
    pub resumes: Family<ResumeLabels, Counter>,
    pub replay_lag: Histogram,
    pub store_latency: HistogramFamily<OpLabels>,
    pub store_errors: Family<OpLabels, Counter>,
    pub buffered_entries: Gauge,
    pub entries_lost: Counter,
    pub connections_open: Gauge,
    pub readers_active: Gauge,
    pub upstream_responses: Family<StatusLabels, Counter>,
    pub upstream_errors: Family<UpstreamErrorLabels, Counter>,
    pub rate_limited: Family<RateLimitedLabels, Counter>,
    pub rate_limit_errors: Counter,
    /// 1 while the store answers the health probe, else 0 (see `health`).
    pub store_up: Gauge,
    /// Store calls not made because the store was known to be down.
    pub store_skipped: Family<OpLabels, Counter>,
    /// Wire bytes of stream frames held in memory (`limits.max_log_bytes`).
    pub log_bytes: Gauge,
    /// Bytes of stored frames released from memory to stay in that budget.
    pub log_bytes_released: Counter,
    /// Store reads by readers behind what a log holds.
    pub released_reads: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("reprise");
        let m = Metrics {
            streams_started: Family::default(),
            streams_active: Gauge::default(),
            streams_ended: Family::default(),
            events_recorded: Counter::default(),
            bytes_recorded: Counter::default(),
            events_replayed: Counter::default(),
            bytes_replayed: Counter::default(),
            resumes: Family::default(),
            replay_lag: latency_histogram(),
            store_latency: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            store_errors: Family::default(),
            buffered_entries: Gauge::default(),
            entries_lost: Counter::default(),
            connections_open: Gauge::default(),
            readers_active: Gauge::default(),
            upstream_responses: Family::default(),
            upstream_errors: Family::default(),
            rate_limited: Family::default(),
            rate_limit_errors: Counter::default(),
            store_up: Gauge::default(),
            store_skipped: Family::default(),
            log_bytes: Gauge::default(),
            log_bytes_released: Counter::default(),
            released_reads: Counter::default(),
            registry: Registry::default(),
        };
        registry.register(
            "streams_started",
            "Streams whose recording started",
            m.streams_started.clone(),
        );
        registry.register(
            "streams_active",
            "Streams being recorded by this instance",
            m.streams_active.clone(),
        );
        registry.register(
            "streams_ended",
            "Streams whose recording ended, by outcome",
            m.streams_ended.clone(),
        );
        registry.register(
            "events_recorded",
            "Entries (events or NDJSON lines) recorded",
            m.events_recorded.clone(),
        );
        registry.register(
            "bytes_recorded",
            "Payload bytes recorded",
            m.bytes_recorded.clone(),
        );
        registry.register(
            "events_replayed",
            "Entries sent to resuming readers",
            m.events_replayed.clone(),
        );
        registry.register(
            "bytes_replayed",
            "Bytes sent to resuming readers",
            m.bytes_replayed.clone(),
        );
        registry.register(
            "resumes",
            "Resume requests, by kind and outcome",
            m.resumes.clone(),
        );
        registry.register(
            "replay_to_live_lag_seconds",
            "Time from a resume's start until its reader caught up with the live stream",
            m.replay_lag.clone(),
        );
        registry.register(
            "store_latency_seconds",
            "Store call latency, by operation",
            m.store_latency.clone(),
        );
        registry.register(
            "store_errors",
            "Failed store calls, by operation",
            m.store_errors.clone(),
        );
        registry.register(
            "store_buffered_entries",
            "Entries recorded in memory and not yet written to the store",
            m.buffered_entries.clone(),
        );
        registry.register(
            "entries_lost",
            "Entries dropped unstored because the store was unavailable past the memory budget",
            m.entries_lost.clone(),
        );
        registry.register(
            "log_bytes",
            "Bytes of stream frames held in memory, over all streams (bounded by limits.max_log_bytes plus the unstored bound)",
            m.log_bytes.clone(),
        );
        registry.register(
            "log_bytes_released",
            "Bytes of stored frames released from memory to stay within limits.max_log_bytes",
            m.log_bytes_released.clone(),
        );
        registry.register(
            "released_reads",
            "Store reads by readers behind the frames a stream's log still holds",
            m.released_reads.clone(),
        );
        registry.register(
            "connections_open",
            "Open client connections",
            m.connections_open.clone(),
        );
        registry.register(
            "readers_active",
            "Response bodies streaming a recorded stream",
            m.readers_active.clone(),
        );
        registry.register(
            "upstream_responses",
            "Upstream responses, by route and status code",
            m.upstream_responses.clone(),
        );
        registry.register(
            "upstream_errors",
            "Upstream requests that got no response, by route and kind",
            m.upstream_errors.clone(),
        );
        registry.register(
            "rate_limited",
            "Requests refused with 429, by route and limit",
            m.rate_limited.clone(),
        );
        registry.register(
            "rate_limit_errors",
            "Rate-limit checks the store could not answer (the request was served unchecked)",
            m.rate_limit_errors.clone(),
        );
        registry.register(
            "store_up",
            "1 while the store answers the health probe, 0 while it is unreachable",
            m.store_up.clone(),
        );
        registry.register(
            "store_calls_skipped",
            "Store calls on the request path not made because the store was known to be unreachable, by operation",
            m.store_skipped.clone(),
        );
        Metrics { registry, ..m }
    }

    /// The OpenMetrics text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }

    /// Counts a store call skipped because the store is known to be down.
    pub fn skipped(&self, op: &str) {
        self.store_skipped
            .get_or_create(&OpLabels { op: op.to_string() })
            .inc();
    }

    pub fn resume(&self, kind: &str, outcome: &str) {
        self.resumes
            .get_or_create(&ResumeLabels {
                kind: kind.to_string(),
                outcome: outcome.to_string(),
            })
            .inc();
    }
}

/// Increments a gauge for as long as it lives.
pub struct GaugeGuard(Gauge);

impl GaugeGuard {
    pub fn new(g: &Gauge) -> GaugeGuard {
        g.inc();
        GaugeGuard(g.clone())
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// A [`Store`] that records latency and errors of every call.
pub struct InstrumentedStore {
    inner: Arc<dyn Store>,
    metrics: Arc<Metrics>,
}

impl InstrumentedStore {
    pub fn wrap(inner: Arc<dyn Store>, metrics: Arc<Metrics>) -> Arc<dyn Store> {
        Arc::new(InstrumentedStore { inner, metrics })
    }

    fn observe<T>(&self, op: &str, started: Instant, r: &Result<T, StoreError>) {
        let labels = OpLabels { op: op.to_string() };
        self.metrics
            .store_latency
            .get_or_create(&labels)
            .observe(started.elapsed().as_secs_f64());
        if r.is_err() {
            self.metrics.store_errors.get_or_create(&labels).inc();
        }
    }
}

macro_rules! timed {
    ($self:ident, $op:literal, $call:expr) => {{
        let started = Instant::now();
        let r = $call.await;
        $self.observe($op, started, &r);
        r
    }};
}

#[async_trait]
impl Store for InstrumentedStore {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
    fn shared_limiter(&self) -> Option<Arc<dyn reprise_store::Limiter>> {
        self.inner.shared_limiter()
    }
    async fn create(&self, meta: &StreamMeta) -> Result<(), StoreError> {
        timed!(self, "create", self.inner.create(meta))
    }
    async fn append(&self, stream: StreamId, entries: &[Entry]) -> Result<(), StoreError> {
        timed!(self, "append", self.inner.append(stream, entries))
    }
    async fn start(
        &self,
        meta: &StreamMeta,
        key: Option<&KeyRef>,
        entries: &[Entry],
    ) -> Result<Written, StoreError> {
        timed!(self, "start", self.inner.start(meta, key, entries))
    }
    async fn append_at(
        &self,
        stream: StreamId,
        records: u64,
        entries: &[Entry],
    ) -> Result<Written, StoreError> {
        timed!(
            self,
            "append",
            self.inner.append_at(stream, records, entries)
        )
    }
    async fn meta(&self, stream: StreamId) -> Result<Option<StreamMeta>, StoreError> {
        timed!(self, "meta", self.inner.meta(stream))
    }
    async fn append_checked(
        &self,
        stream: StreamId,
        entries: &[Entry],
        checks: &reprise_store::WriterChecks,
    ) -> Result<reprise_store::Checked, StoreError> {
        timed!(
            self,
            "append_checked",
            self.inner.append_checked(stream, entries, checks)
        )
    }
    async fn sliding_expiry(
        &self,
        stream: StreamId,
        now_ms: u64,
        window_ms: u64,
        touch: bool,
    ) -> Result<bool, StoreError> {
        timed!(
            self,
            "sliding_expiry",
            self.inner.sliding_expiry(stream, now_ms, window_ms, touch)
        )
    }
    async fn last_seq(&self, stream: StreamId) -> Result<Seq, StoreError> {
        timed!(self, "last_seq", self.inner.last_seq(stream))
    }
    async fn read(
        &self,
        stream: StreamId,
        after: Seq,
        limit: usize,
    ) -> Result<Vec<Entry>, StoreError> {
        timed!(self, "read", self.inner.read(stream, after, limit))
    }
    async fn bind_key(&self, key: &KeyRef, stream: StreamId) -> Result<(), StoreError> {
        timed!(self, "bind_key", self.inner.bind_key(key, stream))
    }
    async fn resolve_key(&self, key: &KeyRef) -> Result<Option<StreamId>, StoreError> {
        timed!(self, "resolve_key", self.inner.resolve_key(key))
    }
    async fn release_key(&self, key: &KeyRef, stream: StreamId) -> Result<(), StoreError> {
        timed!(self, "release_key", self.inner.release_key(key, stream))
    }
    async fn claim_key(
        &self,
        key: &KeyRef,
        stream: StreamId,
    ) -> Result<Option<StreamId>, StoreError> {
        timed!(self, "claim_key", self.inner.claim_key(key, stream))
    }
    async fn renew_lease(
        &self,
        stream: StreamId,
        owner: &str,
        now_ms: u64,
        until_ms: u64,
    ) -> Result<LeaseRenewal, StoreError> {
        timed!(
            self,
            "renew_lease",
            self.inner.renew_lease(stream, owner, now_ms, until_ms)
        )
    }
    async fn set_signals(
        &self,
        stream: StreamId,
        signals: reprise_core::Dialect,
    ) -> Result<(), StoreError> {
        timed!(self, "set_signals", self.inner.set_signals(stream, signals))
    }
    async fn request_cancel(&self, stream: StreamId) -> Result<bool, StoreError> {
        timed!(self, "request_cancel", self.inner.request_cancel(stream))
    }
    async fn end_if_abandoned(
        &self,
        stream: StreamId,
        now_ms: u64,
        outcome: &Outcome,
    ) -> Result<Option<Seq>, StoreError> {
        timed!(
            self,
            "end_if_abandoned",
            self.inner.end_if_abandoned(stream, now_ms, outcome)
        )
    }
    async fn watch(&self, stream: StreamId) -> Result<Watcher, StoreError> {
        self.inner.watch(stream).await
    }
    async fn ping(&self) -> Result<Duration, StoreError> {
        timed!(self, "ping", self.inner.ping())
    }
    fn connected(&self) -> Option<bool> {
        self.inner.connected()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_registered_metrics_with_labels() {
        let m = Metrics::new();
        m.streams_started
            .get_or_create(&RouteLabels {
                route: "/api/chat".into(),
            })
            .inc();
        m.resume("key", "no_content");
        let text = m.render();
        assert!(
            text.contains("reprise_streams_started_total{route=\"/api/chat\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("reprise_resumes_total{kind=\"key\",outcome=\"no_content\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE reprise_replay_to_live_lag_seconds histogram"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"));
    }
}
