//! How much of the volume a sync job holds locked at once.
//!
//! A region being copied is under its range lock (`recovery.rs`), and a
//! client write to it waits until the copy is done. With a fixed number of
//! runs in flight, the time a run holds its lock grows as the target's disk
//! slows: eight 8 MiB runs onto a 30 MiB/s disk share it for about 2 s
//! each, and a client writing 4 KiB blocks at random waited that long for
//! one write in sixty (its 99th percentile was 0.8 s, and it kept 5% of its
//! IOPS; BENCHMARKS.md, "Session 22").
//!
//! [`SyncPace`] bounds the bytes locked by the time they take instead: at
//! most what the job copied in the last [`LOCK_TIME`] at its measured rate,
//! so a run holds its lock for about that long on any disk. On a fast disk
//! the bound is above what [`SYNC_PARALLEL`] runs of [`SYNC_RUN`] regions
//! hold, and nothing changes; on a slow one fewer and shorter runs are in
//! flight, which still keep the disk busy (the target writes into its page
//! cache, ahead of the disk, up to its writeback bound).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::recovery::{SYNC_PARALLEL, SYNC_RUN};
use super::REGION;

/// About how long a copy holds its range locked.
pub const LOCK_TIME: Duration = Duration::from_millis(250);

/// Completions the rate is measured over.
const WINDOW: usize = 16;

/// The most a job locks, however fast the disk: what it held before pacing.
pub const MAX_LOCKED: u64 = SYNC_PARALLEL as u64 * SYNC_RUN * REGION;

/// The sync job's copy rate over its last completions, and the bytes it
/// may hold locked at that rate.
#[derive(Debug)]
pub struct SyncPace {
    /// (when, region bytes copied by then), oldest first; the first entry
    /// is the job's start until [`WINDOW`] completions have pushed it out.
    points: VecDeque<(Instant, u64)>,
}

impl SyncPace {
    pub fn new(started: Instant) -> SyncPace {
        let mut points = VecDeque::with_capacity(WINDOW + 1);
        points.push_back((started, 0));
        SyncPace { points }
    }

    /// A run of `bytes` (its regions' length) finished copying at `at`.
    pub fn completed(&mut self, at: Instant, bytes: u64) {
        let copied = self.points.back().map_or(0, |p| p.1) + bytes;
        self.points.push_back((at, copied));
        while self.points.len() > WINDOW + 1 {
            self.points.pop_front();
        }
    }

    /// Region bytes per second over the window; `None` before the first
    /// completion.
    pub fn rate(&self) -> Option<f64> {
        let (t0, b0) = *self.points.front()?;
        let (t1, b1) = *self.points.back()?;
        if b1 == b0 {
            return None;
        }
        let secs = t1.duration_since(t0).as_secs_f64().max(1e-3);
        Some((b1 - b0) as f64 / secs)
    }

    /// Bytes the job may hold locked now: [`LOCK_TIME`] at the measured
    /// rate, between one run and [`MAX_LOCKED`]. Before a measurement, one
    /// run: the first completion (milliseconds on a fast disk) sets it.
    pub fn budget(&self) -> u64 {
        let run = SYNC_RUN * REGION;
        match self.rate() {
            None => run,
            Some(rate) => ((rate * LOCK_TIME.as_secs_f64()) as u64).clamp(REGION, MAX_LOCKED),
        }
    }

    /// Regions the next run may take when `locked` bytes are held: as many
    /// whole regions as fit the budget, at most [`SYNC_RUN`]; `None` when
    /// not one fits. A job holding nothing always gets one region at least.
    pub fn next_run(&self, locked: u64) -> Option<u64> {
        let regions = self.budget().saturating_sub(locked) / REGION;
        if regions == 0 && locked > 0 {
            return None;
        }
        Some(regions.clamp(1, SYNC_RUN))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// A job whose runs of `run` bytes each complete `every` apart.
    fn paced(run: u64, every: Duration, completions: u32) -> SyncPace {
        let t0 = Instant::now();
        let mut pace = SyncPace::new(t0);
        for i in 1..=completions {
            pace.completed(t0 + every * i, run);
        }
        pace
    }

    #[test]
    fn one_run_until_the_first_completion() {
        let pace = SyncPace::new(Instant::now());
        assert_eq!(pace.rate(), None);
        assert_eq!(pace.budget(), SYNC_RUN * REGION);
        assert_eq!(pace.next_run(0), Some(SYNC_RUN));
        assert_eq!(pace.next_run(SYNC_RUN * REGION), None);
    }

    #[test]
    fn a_fast_disk_keeps_every_run_in_flight() {
        // 8 MiB every 13 ms: about 600 MiB/s, as a rebuild here copies.
        let pace = paced(8 * MIB, Duration::from_millis(13), 20);
        assert_eq!(pace.budget(), MAX_LOCKED);
        let mut locked = 0;
        let mut runs = 0;
        while let Some(n) = pace.next_run(locked) {
            assert_eq!(n, SYNC_RUN);
            locked += n * REGION;
            runs += 1;
            if runs == SYNC_PARALLEL {
                break;
            }
        }
        assert_eq!(
            runs, SYNC_PARALLEL,
            "the job's own parallelism is the limit"
        );
    }

    #[test]
    fn a_slow_disk_locks_a_quarter_second_of_copying() {
        // 30 MiB/s: 7.5 MiB may be locked, one run of 7 regions.
        let pace = paced(3 * MIB, Duration::from_millis(100), 20);
        let budget = pace.budget();
        assert!((7 * MIB..8 * MIB).contains(&budget), "{budget}");
        assert_eq!(pace.next_run(0), Some(7));
        assert_eq!(pace.next_run(7 * MIB), None);
        // The time a run holds its lock stays about LOCK_TIME.
        let secs = 7.0 * MIB as f64 / pace.rate().unwrap();
        assert!((0.2..0.3).contains(&secs), "{secs}");
    }

    #[test]
    fn a_very_slow_disk_still_copies_one_region_at_a_time() {
        // 1 MiB/s (a failing card): the floor is one region.
        let pace = paced(MIB, Duration::from_secs(1), 3);
        assert_eq!(pace.budget(), REGION);
        assert_eq!(pace.next_run(0), Some(1));
        assert_eq!(pace.next_run(REGION), None);
    }

    #[test]
    fn the_rate_follows_the_last_completions() {
        // Fast at first, then the disk slows (a client started writing):
        // after a window of slow completions the budget is the slow one.
        let t0 = Instant::now();
        let mut pace = SyncPace::new(t0);
        let mut t = t0;
        for _ in 0..20 {
            t += Duration::from_millis(10);
            pace.completed(t, 8 * MIB);
        }
        assert_eq!(pace.budget(), MAX_LOCKED);
        for _ in 0..WINDOW {
            t += Duration::from_millis(400);
            pace.completed(t, 4 * MIB);
        }
        let rate = pace.rate().unwrap();
        assert!((rate - 10.0 * MIB as f64).abs() < MIB as f64, "{rate}");
        assert_eq!(pace.next_run(0), Some(2));
    }
}
