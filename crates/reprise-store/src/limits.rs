//! Rate limits per caller, kept where every relay instance sees them: how
//! many streams a caller has open now, and how many it started in the last
//! minute. The relay asks [`Limiter::acquire`] before it calls an upstream.
//!
//! Two backends: [`MemoryLimiter`] (one process, with the embedded store) and
//! the Redis one (`redis::limits`), where one Lua `EVAL` per check makes the
//! check-and-take atomic across instances.
//!
//! A caller's open streams are *slots*: one entry per stream, each with an
//! expiry that its holder refreshes ([`Limiter::refresh`]) while the stream
//! runs and removes when it ends ([`Limiter::release`]). A holder that dies
//! stops refreshing, so its slots expire on their own: nothing leaks.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;

use crate::StoreError;

/// The window of [`RateLimits::max_starts_per_minute`].
pub const START_WINDOW: Duration = Duration::from_secs(60);

/// The limits of one caller on one route; 0 means unlimited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateLimits {
    /// Streams open at once.
    pub max_streams: u32,
    /// Streams started in any 60 s window.
    pub max_starts_per_minute: u32,
}

impl RateLimits {
    /// Whether no limit applies (nothing to check or store).
    pub fn is_unlimited(&self) -> bool {
        self.max_streams == 0 && self.max_starts_per_minute == 0
    }
}

/// Which limit refused a start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LimitKind {
    /// [`RateLimits::max_streams`].
    Concurrent,
    /// [`RateLimits::max_starts_per_minute`].
    StartsPerMinute,
}

impl LimitKind {
    /// `concurrent_streams` or `starts_per_minute` (metric label, error text).
    pub fn as_str(self) -> &'static str {
        match self {
            LimitKind::Concurrent => "concurrent_streams",
            LimitKind::StartsPerMinute => "starts_per_minute",
        }
    }
}

/// The answer to [`Limiter::acquire`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Under every limit: the start is counted and the slot taken (if
    /// concurrency is limited).
    Admitted,
    /// Over `limit`; nothing was counted or taken. `retry_after` is when a
    /// start window frees up, or `None` when only a stream ending can help.
    Refused {
        limit: LimitKind,
        retry_after: Option<Duration>,
    },
}

/// Where the counts live. `caller` is an opaque identity (the relay's caller
/// hash or client address, scoped to a route); `slot` is unique per start.
#[async_trait]
pub trait Limiter: Send + Sync + 'static {
    /// Checks `limits` for `caller` and, if under all of them, counts one
    /// start and takes slot `slot`, valid for `slot_ttl` unless refreshed.
    /// Atomic: of concurrent acquires, no more than the limit succeed.
    async fn acquire(
        &self,
        caller: &str,
        slot: &str,
        limits: RateLimits,
        slot_ttl: Duration,
    ) -> Result<Admission, StoreError>;

    /// Extends a slot taken by `acquire` to `slot_ttl` from now. A slot that
    /// already expired is not taken again.
    async fn refresh(&self, caller: &str, slot: &str, slot_ttl: Duration)
        -> Result<(), StoreError>;

    /// Gives a slot back (its stream ended). Unknown slots are ignored.
    async fn release(&self, caller: &str, slot: &str) -> Result<(), StoreError>;
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// One caller's counts in a [`MemoryLimiter`].
#[derive(Default)]
struct CallerCounts {
    /// Open slots and when each expires (ms since the Unix epoch).
    slots: HashMap<String, u64>,
    /// When each start of the window happened, oldest first.
    starts: VecDeque<u64>,
}

impl CallerCounts {
    fn prune(&mut self, now: u64) {
        self.slots.retain(|_, until| *until > now);
        let window = ms(START_WINDOW);
        while self
            .starts
            .front()
            .is_some_and(|t| t.saturating_add(window) <= now)
        {
            self.starts.pop_front();
        }
    }

    fn is_empty(&self) -> bool {
        self.slots.is_empty() && self.starts.is_empty()
    }
}

/// The in-process [`Limiter`]: limits hold within one instance, which is
/// all the embedded store serves. Memory is bounded by the callers seen in
/// the last minute (or holding slots) times their limits.
#[derive(Default)]
pub struct MemoryLimiter {
    callers: Mutex<HashMap<String, CallerCounts>>,
}

/// After this many acquires, callers with nothing left are swept.
const SWEEP_EVERY: usize = 1024;

impl MemoryLimiter {
    pub fn new() -> MemoryLimiter {
        MemoryLimiter::default()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, CallerCounts>> {
        self.callers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// [`Limiter::acquire`] at time `now` (ms), for tests with a fixed clock.
    pub fn acquire_at(
        &self,
        now: u64,
        caller: &str,
        slot: &str,
        limits: RateLimits,
        slot_ttl: Duration,
    ) -> Admission {
        let mut callers = self.lock();
        if callers.len() % SWEEP_EVERY == 0 {
            callers.retain(|_, c| {
                c.prune(now);
                !c.is_empty()
            });
        }
        let c = callers.entry(caller.to_string()).or_default();
        c.prune(now);
        if limits.max_streams > 0 && c.slots.len() >= limits.max_streams as usize {
            return Admission::Refused {
                limit: LimitKind::Concurrent,
                retry_after: None,
            };
        }
        if limits.max_starts_per_minute > 0
            && c.starts.len() >= limits.max_starts_per_minute as usize
        {
            let oldest = c.starts.front().copied().unwrap_or(now);
            let free_at = oldest.saturating_add(ms(START_WINDOW));
            return Admission::Refused {
                limit: LimitKind::StartsPerMinute,
                retry_after: Some(Duration::from_millis(free_at.saturating_sub(now))),
            };
        }
        if limits.max_streams > 0 {
            c.slots
                .insert(slot.to_string(), now.saturating_add(ms(slot_ttl)));
        }
        if limits.max_starts_per_minute > 0 {
            c.starts.push_back(now);
        }
        Admission::Admitted
    }

    /// [`Limiter::refresh`] at time `now` (ms).
    pub fn refresh_at(&self, now: u64, caller: &str, slot: &str, slot_ttl: Duration) {
        if let Some(c) = self.lock().get_mut(caller) {
            if let Some(until) = c.slots.get_mut(slot) {
                if *until > now {
                    *until = now.saturating_add(ms(slot_ttl));
                }
            }
        }
    }
}

#[async_trait]
impl Limiter for MemoryLimiter {
    async fn acquire(
        &self,
        caller: &str,
        slot: &str,
        limits: RateLimits,
        slot_ttl: Duration,
    ) -> Result<Admission, StoreError> {
        Ok(self.acquire_at(now_ms(), caller, slot, limits, slot_ttl))
    }

    async fn refresh(
        &self,
        caller: &str,
        slot: &str,
        slot_ttl: Duration,
    ) -> Result<(), StoreError> {
        self.refresh_at(now_ms(), caller, slot, slot_ttl);
        Ok(())
    }

    async fn release(&self, caller: &str, slot: &str) -> Result<(), StoreError> {
        let mut callers = self.lock();
        if let Some(c) = callers.get_mut(caller) {
            c.slots.remove(slot);
            if c.is_empty() {
                callers.remove(caller);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(6);

    fn limits(max_streams: u32, max_starts_per_minute: u32) -> RateLimits {
        RateLimits {
            max_streams,
            max_starts_per_minute,
        }
    }

    #[test]
    fn concurrent_slots_are_bounded_released_and_expire() {
        let l = MemoryLimiter::new();
        let lim = limits(2, 0);
        assert_eq!(l.acquire_at(0, "a", "s1", lim, TTL), Admission::Admitted);
        assert_eq!(l.acquire_at(1, "a", "s2", lim, TTL), Admission::Admitted);
        let refused = Admission::Refused {
            limit: LimitKind::Concurrent,
            retry_after: None,
        };
        assert_eq!(l.acquire_at(2, "a", "s3", lim, TTL), refused);
        // Another caller has its own slots.
        assert_eq!(l.acquire_at(2, "b", "s3", lim, TTL), Admission::Admitted);
        // Released: free again.
        futures::executor::block_on(l.release("a", "s1")).unwrap();
        assert_eq!(l.acquire_at(3, "a", "s4", lim, TTL), Admission::Admitted);
        assert_eq!(l.acquire_at(4, "a", "s5", lim, TTL), refused);
        // Refreshed slots outlive their first expiry; others expire.
        l.refresh_at(5_000, "a", "s2", TTL);
        assert_eq!(
            l.acquire_at(7_000, "a", "s6", lim, TTL),
            Admission::Admitted
        );
        assert_eq!(l.acquire_at(7_001, "a", "s7", lim, TTL), refused);
    }

    #[test]
    fn starts_are_counted_over_a_sliding_minute() {
        let l = MemoryLimiter::new();
        let lim = limits(0, 2);
        assert_eq!(l.acquire_at(1_000, "a", "1", lim, TTL), Admission::Admitted);
        assert_eq!(l.acquire_at(2_000, "a", "2", lim, TTL), Admission::Admitted);
        assert_eq!(
            l.acquire_at(30_000, "a", "3", lim, TTL),
            Admission::Refused {
                limit: LimitKind::StartsPerMinute,
                retry_after: Some(Duration::from_millis(31_000)),
            }
        );
        // A refused start is not counted: the first one frees at 61 s.
        assert_eq!(
            l.acquire_at(61_000, "a", "4", lim, TTL),
            Admission::Admitted
        );
        assert!(matches!(
            l.acquire_at(61_500, "a", "5", lim, TTL),
            Admission::Refused { .. }
        ));
    }

    #[test]
    fn refused_by_one_limit_takes_nothing_from_the_other() {
        let l = MemoryLimiter::new();
        let lim = limits(1, 5);
        assert_eq!(l.acquire_at(0, "a", "1", lim, TTL), Admission::Admitted);
        for t in 1..10 {
            assert!(matches!(
                l.acquire_at(t, "a", "x", lim, TTL),
                Admission::Refused {
                    limit: LimitKind::Concurrent,
                    ..
                }
            ));
        }
        futures::executor::block_on(l.release("a", "1")).unwrap();
        // Only one start counted so far.
        for i in 0..4 {
            let slot = format!("n{i}");
            assert_eq!(l.acquire_at(20, "a", &slot, lim, TTL), Admission::Admitted);
            futures::executor::block_on(l.release("a", &slot)).unwrap();
        }
        assert!(matches!(
            l.acquire_at(21, "a", "last", lim, TTL),
            Admission::Refused {
                limit: LimitKind::StartsPerMinute,
                ..
            }
        ));
    }

    #[test]
    fn unlimited_stores_nothing() {
        let l = MemoryLimiter::new();
        for i in 0..100 {
            assert_eq!(
                l.acquire_at(i, "a", "s", RateLimits::default(), TTL),
                Admission::Admitted
            );
        }
        assert!(l.lock().get("a").is_none_or(CallerCounts::is_empty));
    }
}
