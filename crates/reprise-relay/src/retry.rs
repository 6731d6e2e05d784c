//! Exponential backoff for store calls that failed with a retryable error.

use std::time::Duration;

const FIRST: Duration = Duration::from_millis(50);
const MAX: Duration = Duration::from_secs(5);

/// Doubles from 50 ms up to a maximum (5 s by default); `reset` after a success.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
    max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

impl Backoff {
    pub fn new() -> Self {
        Self::up_to(MAX)
    }

    pub fn up_to(max: Duration) -> Self {
        Backoff { next: FIRST, max }
    }

    pub fn reset(&mut self) {
        self.next = FIRST;
    }

    /// Sleeps for the current delay, then doubles it.
    pub async fn wait(&mut self) {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        tokio::time::sleep(d).await;
    }
}
