//! Faulting a replica that lags its peers (a silent host, a hung disk)
//! instead of waiting for the IO timeout.
//!
//! `fan_out` waits for every replica as before, but once a write quorum of
//! healthy replicas has answered, the others get [`LagPolicy::bound`] more
//! to answer: the peers' recent time to quorum times a multiplier, never
//! below a floor (1 s) nor above half the IO timeout. A single healthy
//! replica still silent then is faulted with the reason "lagging", gets the
//! request's regions marked as missed, and the request is acknowledged; it
//! rejoins by the ordinary delta resync, its retry backed off so it cannot
//! flap. The rule never faults below the quorum (the quorum answered
//! without it), never two replicas at once (while one is out for lagging,
//! nobody else is faulted for it), never a syncing replica; page-cache
//! requests and durable ones (flush, FUA) keep separate latency scales.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// How a volume treats a replica that answers late.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LagPolicy {
    /// The least a lagging replica is given after the quorum answered.
    pub floor: Duration,
    /// How many times the peers' time to quorum it is given; 0 turns lag
    /// faults off (a replica is then faulted only by the IO timeout).
    pub multiplier: u32,
}

impl Default for LagPolicy {
    fn default() -> Self {
        LagPolicy {
            floor: Duration::from_secs(1),
            multiplier: 8,
        }
    }
}

/// Which latency scale a request belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LatencyClass {
    /// Writes, trims, zeroing into the page cache.
    Cached,
    /// Flushes and FUA writes: they wait for the disk.
    Durable,
}

/// The peers' recent time to quorum, per class (an exponentially weighted
/// average, in microseconds), and the lag faults taken so far.
#[derive(Debug, Default)]
pub struct LagState {
    cached_us: AtomicU64,
    durable_us: AtomicU64,
    pub faults: AtomicU64,
}

impl LagState {
    fn cell(&self, class: LatencyClass) -> &AtomicU64 {
        match class {
            LatencyClass::Cached => &self.cached_us,
            LatencyClass::Durable => &self.durable_us,
        }
    }

    /// Records one request's time to quorum (weight 1/8).
    pub fn observe(&self, class: LatencyClass, took: Duration) {
        let sample = took.as_micros().min(u64::MAX as u128) as u64;
        let cell = self.cell(class);
        let old = cell.load(Ordering::Relaxed);
        let new = if old == 0 {
            sample
        } else {
            old - old / 8 + sample / 8
        };
        cell.store(new, Ordering::Relaxed);
    }

    /// The recent time to quorum of `class`.
    pub fn typical(&self, class: LatencyClass) -> Duration {
        Duration::from_micros(self.cell(class).load(Ordering::Relaxed))
    }
}

impl LagPolicy {
    /// How long after the quorum answered a replica may still take, or
    /// None when lag faults are off.
    pub fn bound(&self, typical: Duration, io_timeout: Duration) -> Option<Duration> {
        if self.multiplier == 0 {
            return None;
        }
        let cap = (io_timeout / 2).max(self.floor);
        Some((typical * self.multiplier).clamp(self.floor, cap))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bound_has_a_floor_a_cap_and_an_off_switch() {
        let p = LagPolicy::default();
        let io = Duration::from_secs(10);
        assert_eq!(
            p.bound(Duration::from_micros(100), io),
            Some(Duration::from_secs(1))
        );
        assert_eq!(
            p.bound(Duration::from_millis(300), io),
            Some(Duration::from_millis(2400))
        );
        assert_eq!(
            p.bound(Duration::from_secs(3), io),
            Some(Duration::from_secs(5))
        );
        let off = LagPolicy { multiplier: 0, ..p };
        assert_eq!(off.bound(Duration::from_millis(1), io), None);
    }

    #[test]
    fn latency_is_a_moving_average_per_class() {
        let s = LagState::default();
        s.observe(LatencyClass::Cached, Duration::from_micros(800));
        assert_eq!(s.typical(LatencyClass::Cached), Duration::from_micros(800));
        for _ in 0..100 {
            s.observe(LatencyClass::Cached, Duration::from_micros(100));
        }
        assert!(s.typical(LatencyClass::Cached) < Duration::from_micros(120));
        assert_eq!(s.typical(LatencyClass::Durable), Duration::ZERO);
    }
}
