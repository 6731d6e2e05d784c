//! Rate limits per caller, checked on the way upstream: before a request is
//! forwarded, its caller must be under the route's `max_streams_per_caller`
//! and `max_starts_per_caller_per_minute`, or it is answered `429`.
//!
//! The caller is the route's caller identity (the HMAC of `auth`) when the
//! request carries any of the values that identify callers there, else the
//! client's address (see `forwarded`). Counts live in the store's
//! [`Limiter`] (Redis: shared by every instance; embedded: in memory).
//!
//! A forwarded request holds a [`Slot`] from its start until its stream ends:
//! a recorded stream until its recording ends (completed, failed, cancelled;
//! a client hanging up does not end it), a pass-through response until its
//! body ends or the client goes. Dropping the slot gives it back. While
//! held, a task refreshes its expiry every third of `streams.lease`, so a
//! slot of an instance that died expires within about a lease.
//!
//! If the store cannot answer within a second, the request is served (fail open): an outage
//! of Redis must not take the chat down. It is logged and counted in
//! `reprise_rate_limit_errors_total`. While the store is known to be down
//! (the probe of `health` says so) the check is not even tried: the outage
//! costs each request nothing, not a second (also counted in
//! `reprise_store_calls_skipped_total{op="rate_limit"}`).

use std::sync::Arc;
use std::time::Duration;

use http::HeaderMap;
use reprise_store::{Admission, LimitKind, Limiter, MemoryLimiter, RateLimits, Store};
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::config::LimitsConfig;
use crate::error::RelayError;
use crate::forwarded::Forwarding;
use crate::health::StoreHealth;
use crate::metrics::{Metrics, RateLimitedLabels};
use crate::routes::Route;
use crate::stream::live::LiveStream;

/// `Retry-After` for a caller at its concurrent-stream limit: only one of
/// its streams ending helps, and that cannot be known in advance.
const CONCURRENT_RETRY_AFTER: Duration = Duration::from_secs(2);

/// Longest a start waits for the store's answer before it is served
/// unchecked: a Redis that stalls (or died and is not yet noticed) must not
/// hold up the chat for the store's whole command timeout.
const CHECK_TIMEOUT: Duration = Duration::from_secs(1);

/// The relay's rate limiter.
pub struct RateLimiter {
    backend: Arc<dyn Limiter>,
    /// How long a slot lives without a refresh (`streams.lease`).
    slot_ttl: Duration,
    metrics: Arc<Metrics>,
    /// Whether the store is known to be down (then checks are skipped).
    health: Arc<StoreHealth>,
    /// Runs the slots' refresh tasks.
    tasks: TaskTracker,
    /// Ends the refresh tasks at the end of the shutdown.
    stop: CancellationToken,
}

/// A caller's identity for rate limits, scoped to one route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LimitKey(String);

impl LimitKey {
    /// The caller identity if the request carries any value that
    /// identifies callers on the route, else the client's address.
    pub fn of(route: &Route, caller: &str, headers: &HeaderMap, fwd: &Forwarding) -> LimitKey {
        if crate::auth::identifies(&route.caller, headers) {
            // The caller hash already covers the route.
            LimitKey(format!("c:{caller}"))
        } else {
            LimitKey(format!("ip:{}#{}", route.path, fwd.client_ip))
        }
    }
}

/// The limits that apply on `route`: its own, else `[limits]`.
pub fn limits_for(global: &LimitsConfig, route: &Route) -> RateLimits {
    RateLimits {
        max_streams: route
            .limits
            .max_streams_per_caller
            .unwrap_or(global.max_streams_per_caller),
        max_starts_per_minute: route
            .limits
            .max_starts_per_caller_per_minute
            .unwrap_or(global.max_starts_per_caller_per_minute),
    }
}

/// A concurrent-stream slot held by one forwarded request. Dropping it gives
/// it back (and stops its refreshes).
pub struct Slot {
    _release: DropGuard,
}

impl Slot {
    /// Holds the slot until `live`'s recording ended, whatever its outcome.
    pub fn release_when_ended(self, tasks: &TaskTracker, live: Arc<LiveStream>) {
        tasks.spawn(
            async move {
                let mut changes = live.subscribe();
                while !live.is_ended() {
                    if changes.changed().await.is_err() {
                        break;
                    }
                }
                drop(self);
            }
            .in_current_span(),
        );
    }
}

impl RateLimiter {
    /// The limiter of `store`: its shared one, else one in this process.
    pub fn new(
        store: &dyn Store,
        slot_ttl: Duration,
        metrics: Arc<Metrics>,
        health: Arc<StoreHealth>,
        tasks: TaskTracker,
        stop: CancellationToken,
    ) -> RateLimiter {
        let backend = store
            .shared_limiter()
            .unwrap_or_else(|| Arc::new(MemoryLimiter::new()));
        RateLimiter {
            backend,
            slot_ttl,
            metrics,
            health,
            tasks,
            stop,
        }
    }

    /// Counts a start for `who` on `route` if under its limits. `Ok(None)`:
    /// admitted without a slot to hold (concurrency unlimited, or the store
    /// did not answer); `Err(RateLimited)`: over a limit, nothing counted.
    pub async fn admit(
        &self,
        route: &Route,
        limits: RateLimits,
        who: &LimitKey,
    ) -> Result<Option<Slot>, RelayError> {
        if limits.is_unlimited() {
            return Ok(None);
        }
        if self.health.is_known_down() {
            // Fail open at once: waiting for a store known to be down would
            // only add its timeout to every start of the outage.
            self.metrics.rate_limit_errors.inc();
            self.metrics.skipped("rate_limit");
            tracing::debug!("store known unreachable; serving the request unchecked");
            return Ok(None);
        }
        let slot_id = reprise_core::StreamId::random().to_string();
        let check = self
            .backend
            .acquire(&who.0, &slot_id, limits, self.slot_ttl);
        let answer = match tokio::time::timeout(CHECK_TIMEOUT, check).await {
            Ok(answer) => answer,
            Err(_) => Err(reprise_store::StoreError::Unavailable(format!(
                "no answer within {CHECK_TIMEOUT:?}"
            ))),
        };
        match answer {
            Ok(Admission::Admitted) if limits.max_streams > 0 => {
                Ok(Some(self.hold(who.clone(), slot_id)))
            }
            Ok(Admission::Admitted) => Ok(None),
            Ok(Admission::Refused { limit, retry_after }) => {
                self.metrics
                    .rate_limited
                    .get_or_create(&RateLimitedLabels {
                        route: route.path.clone(),
                        limit: limit.as_str().to_string(),
                    })
                    .inc();
                let (max, retry_after) = match limit {
                    LimitKind::Concurrent => (limits.max_streams, CONCURRENT_RETRY_AFTER),
                    LimitKind::StartsPerMinute => (
                        limits.max_starts_per_minute,
                        retry_after.unwrap_or(CONCURRENT_RETRY_AFTER),
                    ),
                };
                Err(RelayError::RateLimited {
                    limit,
                    max,
                    retry_after,
                })
            }
            Err(e) => {
                self.metrics.rate_limit_errors.inc();
                tracing::warn!(cause = %e, "cannot check rate limits; serving the request unchecked");
                Ok(None)
            }
        }
    }

    /// Starts the task that keeps `slot_id` alive until the returned
    /// [`Slot`] is dropped, then releases it.
    fn hold(&self, who: LimitKey, slot_id: String) -> Slot {
        let release = CancellationToken::new();
        let (backend, ttl, stop) = (self.backend.clone(), self.slot_ttl, self.stop.clone());
        let token = release.clone();
        self.tasks.spawn(
            async move {
                let every = ttl / 3;
                loop {
                    tokio::select! {
                        _ = token.cancelled() => break,
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(every) => {
                            if let Err(e) = backend.refresh(&who.0, &slot_id, ttl).await {
                                tracing::debug!(cause = %e, "could not refresh a rate-limit slot");
                            }
                        }
                    }
                }
                if let Err(e) = backend.release(&who.0, &slot_id).await {
                    // It expires on its own within a lease.
                    tracing::debug!(cause = %e, "could not release a rate-limit slot");
                }
            }
            .in_current_span(),
        );
        Slot {
            _release: release.drop_guard(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{RouteConfig, RouteLimits};
    use crate::routes::Router;

    fn route(limits: RouteLimits) -> Arc<Route> {
        let c = RouteConfig {
            path: "/api".into(),
            upstream: "http://127.0.0.1:1".into(),
            key: None,
            resume: None,
            stop: None,
            record: true,
            caller: Default::default(),
            resume_auth: Default::default(),
            ca_file: None,
            limits,
            signals: Default::default(),
        };
        let router = Router::new(&[c]).unwrap();
        router.match_path("/api").unwrap().clone()
    }

    #[test]
    fn a_route_overrides_the_global_limits_key_by_key() {
        let global = LimitsConfig {
            max_streams_per_caller: 4,
            max_starts_per_caller_per_minute: 60,
            ..LimitsConfig::default()
        };
        let inherit = route(RouteLimits::default());
        assert_eq!(
            limits_for(&global, &inherit),
            RateLimits {
                max_streams: 4,
                max_starts_per_minute: 60
            }
        );
        let own = route(RouteLimits {
            max_streams_per_caller: Some(0),
            max_starts_per_caller_per_minute: None,
        });
        assert_eq!(
            limits_for(&global, &own),
            RateLimits {
                max_streams: 0,
                max_starts_per_minute: 60
            }
        );
    }

    #[test]
    fn anonymous_callers_are_counted_by_address_and_route() {
        let r = route(RouteLimits::default());
        let fwd = Forwarding {
            peer: "10.0.0.1".parse().unwrap(),
            peer_trusted: true,
            client_ip: "198.51.100.1".parse().unwrap(),
        };
        let mut h = HeaderMap::new();
        assert_eq!(
            LimitKey::of(&r, "hash", &h, &fwd),
            LimitKey("ip:/api#198.51.100.1".into())
        );
        h.insert("authorization", "Bearer t".parse().unwrap());
        assert_eq!(
            LimitKey::of(&r, "hash", &h, &fwd),
            LimitKey("c:hash".into())
        );
    }
}
