//! The wall clock, in the milliseconds the store's leases and metadata use,
//! and the process's shared beats for periodic work.
//! A leaf: imports nothing of the crate.

use std::time::Duration;

use tokio::time::Instant;

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// How many phases a beat has: periodic work is spread over this many
/// instants per period, so that one instant's burst of work (and the events
/// delayed behind it) stays small.
pub(crate) const PHASES: u32 = 4;

/// The phase of the beat a stream's periodic work takes, from bytes of its
/// (random) id: streams spread evenly over the phases.
pub(crate) fn phase_of(id: &[u8]) -> u32 {
    id.last().map_or(0, |b| u32::from(*b)) % PHASES
}

/// The next instant, within `period`, on a grid of `period`s shared by the
/// whole process, shifted by `phase` (of [`PHASES`]) quarters of a period.
/// Periodic work of many streams (store writes, lease renewals) done on it
/// happens together: a timer wake-up and a few pipelined socket writes per
/// phase, not one of each per stream.
pub(crate) fn next_beat(period: Duration, phase: u32) -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    let now = Instant::now();
    let step = period.as_nanos().max(1);
    let shift = step * u128::from(phase % PHASES) / u128::from(PHASES);
    // Counted from one period before the epoch's first beat of this phase,
    // so that it never goes negative.
    let since = now.saturating_duration_since(epoch).as_nanos() + step - shift;
    let at = (since / step + 1).saturating_mul(step) + shift - step;
    let beat = epoch + Duration::from_nanos(u64::try_from(at).unwrap_or(u64::MAX));
    // (An epoch taken on another runtime's paused clock, in tests, may lie
    // ahead: never wait longer than `period`.)
    beat.min(now + period)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Beats fall on one grid whenever they are asked for, never more than
    /// a period away.
    #[tokio::test]
    async fn beats_share_a_grid_within_the_period() {
        let period = Duration::from_millis(50);
        for phase in 0..PHASES {
            let first = next_beat(period, phase);
            let now = Instant::now();
            assert!(first > now && first <= now + period);
            tokio::time::sleep(Duration::from_millis(7)).await;
            let second = next_beat(period, phase);
            let now = Instant::now();
            assert!(second > now && second <= now + period);
            let apart = second.max(first) - second.min(first);
            assert_eq!(apart.as_nanos() % period.as_nanos(), 0, "{apart:?}");
            // Phases a quarter of a period apart.
            let zero = next_beat(period, 0);
            let off = (second.max(zero) - second.min(zero)).as_nanos() % period.as_nanos();
            let quarter = period.as_nanos() / u128::from(PHASES);
            assert_eq!(off % quarter, 0, "phase {phase}: {off} ns off beat 0");
        }
    }
}
