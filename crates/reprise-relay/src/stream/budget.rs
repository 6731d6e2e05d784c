//! The instance-wide bound on stream frames held in memory
//! (`limits.max_log_bytes`).
//!
//! Every [`LiveStream`](crate::stream::live::LiveStream) counts the wire
//! bytes of the frames it holds here. Frames the store already has can be
//! let go: a log whose writer stored frames (or a loader that read them from
//! the store) queues itself once, oldest first. When the held bytes pass the
//! budget, the oldest queued logs release their stored frames until the
//! total is back under it; a reader still behind that point reads those
//! frames from the store again (see `reader`), so nobody is cut off.
//!
//! Frames not stored yet are never released here: they have their own
//! bound (`limits.max_unstored_bytes`), past which they become a gap. So
//! what logs hold stays under `max_log_bytes` plus the unstored bound.
//!
//! This module knows logs only as [`Release`]: it sits below `live`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, Weak};

/// A log that can let go of its stored frames.
pub trait Release: Send + Sync {
    /// Drops the frames the store holds (keeping the last frame, and every
    /// frame not stored yet); returns the bytes released.
    fn release_stored(&self) -> usize;
}

/// See the module docs.
pub struct LogBudget {
    max: usize,
    held: AtomicUsize,
    released_total: AtomicU64,
    /// Logs with stored frames to release, in the order they got them.
    queue: Mutex<VecDeque<Weak<dyn Release>>>,
}

impl LogBudget {
    /// A budget of `max` bytes of frames over all logs.
    pub fn new(max: usize) -> LogBudget {
        LogBudget {
            max,
            held: AtomicUsize::new(0),
            released_total: AtomicU64::new(0),
            queue: Mutex::new(VecDeque::new()),
        }
    }

    /// No bound (tests and tools that build a log on its own).
    pub fn unbounded() -> LogBudget {
        LogBudget::new(usize::MAX)
    }

    /// Wire bytes of the frames all logs hold now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// Bytes released so far (served from the store again if read).
    pub fn released_total(&self) -> u64 {
        self.released_total.load(Ordering::Relaxed)
    }

    /// A log took `bytes` more.
    pub fn add(&self, bytes: usize) {
        self.held.fetch_add(bytes, Ordering::Relaxed);
    }

    /// A log let go of `bytes` (dropped, or its frames replaced).
    pub fn sub(&self, bytes: usize) {
        self.held.fetch_sub(bytes, Ordering::Relaxed);
    }

    /// `log` has stored frames it could release. A log calls this once per
    /// release: after it, once it has new stored frames again.
    pub fn queue(&self, log: Weak<dyn Release>) {
        self.lock().push_back(log);
    }

    /// Whether held frames are over the budget (cheap; call after adding).
    pub fn is_over(&self) -> bool {
        self.held() > self.max
    }

    /// Releases the oldest queued logs' stored frames until the held bytes
    /// are back under the budget, or nothing is left to release. Never
    /// called with a log's own lock held: it takes the logs' locks.
    pub fn enforce(&self) {
        while self.is_over() {
            // One at a time, without holding the queue across a log's lock.
            let Some(next) = self.lock().pop_front() else {
                return;
            };
            if let Some(log) = next.upgrade() {
                let freed = log.release_stored();
                self.released_total
                    .fetch_add(freed as u64, Ordering::Relaxed);
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Weak<dyn Release>>> {
        // The queue holds no invariant a panic could break.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    struct Log {
        budget: Arc<LogBudget>,
        stored: AtomicUsize,
    }

    impl Release for Log {
        fn release_stored(&self) -> usize {
            let n = self.stored.swap(0, Ordering::Relaxed);
            self.budget.sub(n);
            n
        }
    }

    #[test]
    fn releases_the_oldest_stored_frames_until_under_the_budget() {
        let budget = Arc::new(LogBudget::new(100));
        let logs: Vec<Arc<Log>> = (0..3)
            .map(|_| {
                budget.add(60);
                Arc::new(Log {
                    budget: budget.clone(),
                    stored: AtomicUsize::new(60),
                })
            })
            .collect();
        for log in &logs {
            let weak: Weak<dyn Release> = Arc::downgrade(&(log.clone() as Arc<dyn Release>));
            budget.queue(weak);
        }
        assert!(budget.is_over());
        budget.enforce();
        // 180 held: the two oldest go, the newest stays.
        assert_eq!(budget.held(), 60);
        assert_eq!(budget.released_total(), 120);
        assert_eq!(logs[2].stored.load(Ordering::Relaxed), 60);
        assert_eq!(logs[0].stored.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_dropped_log_in_the_queue_is_skipped() {
        let budget = Arc::new(LogBudget::new(10));
        let gone = Arc::new(Log {
            budget: budget.clone(),
            stored: AtomicUsize::new(0),
        });
        let weak: Weak<dyn Release> = Arc::downgrade(&(gone.clone() as Arc<dyn Release>));
        budget.queue(weak);
        drop(gone);
        budget.add(50);
        budget.enforce();
        assert_eq!(budget.held(), 50, "nothing left to release");
    }
}
