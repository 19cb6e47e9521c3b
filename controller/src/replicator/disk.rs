//! [`DiskStats`]: how fast each replica's disk answers, as the controller
//! sees it: the latency of its flushes (durable requests: FLUSH and FUA
//! writes, which wait for its disk) and of its page-cache writes, and the
//! bytes it took. A replica whose flushes take longer than
//! [`SLOW_FLUSH`] — on average, or one flush still waiting — is reported
//! *slow*, with the reason, long before the durable timeout faults it.
//!
//! Latencies are moving averages (weight 1/8 per request) in microseconds;
//! throughput is the bytes written over the last [`RATE_WINDOW`].

use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// A replica whose flushes take longer than this is reported slow. The
/// replicas bound their unflushed data to about a second of disk time, so
/// a healthy disk flushes well within it.
pub const SLOW_FLUSH: Duration = Duration::from_secs(3);
/// The window over which write throughput is measured.
pub const RATE_WINDOW: Duration = Duration::from_secs(5);

/// What a status call reports for one replica's disk.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DiskReport {
    /// Moving average of the flush latency (0 before the first flush).
    pub flush_latency: Duration,
    /// The longest flush seen.
    pub flush_latency_max: Duration,
    /// Moving average of the page-cache write latency.
    pub write_latency: Duration,
    /// Bytes written per second over the last [`RATE_WINDOW`].
    pub write_bytes_per_sec: u64,
    pub bytes_written: u64,
    /// Why the replica is slow; `None` when it is not.
    pub slow: Option<String>,
}

#[derive(Debug, Default)]
struct Inner {
    flush_avg_us: f64,
    flush_max: Duration,
    write_avg_us: f64,
    bytes_written: u64,
    /// (start of the window, bytes written before it) and the last
    /// complete window's rate.
    window: Option<(Instant, u64)>,
    last_rate: u64,
    /// Start times of the flushes waiting on this replica now.
    flushes_waiting: Vec<Instant>,
    /// Whether the last report said slow (logged once per episode).
    was_slow: bool,
}

/// One replica's disk figures. See the module docs.
#[derive(Debug, Default)]
pub struct DiskStats {
    inner: Mutex<Inner>,
}

fn average(avg: f64, sample: f64) -> f64 {
    if avg == 0.0 {
        sample
    } else {
        avg + (sample - avg) / 8.0
    }
}

impl DiskStats {
    /// A flush (or FUA write) was sent to the replica; pass the returned
    /// instant to [`DiskStats::flush_done`].
    pub fn flush_started(&self) -> Instant {
        let now = Instant::now();
        self.inner.lock().flushes_waiting.push(now);
        now
    }

    /// The flush started at `started` got its answer (or failed).
    pub fn flush_done(&self, started: Instant) {
        let took = started.elapsed();
        let mut g = self.inner.lock();
        if let Some(i) = g.flushes_waiting.iter().position(|t| *t == started) {
            g.flushes_waiting.swap_remove(i);
        }
        g.flush_avg_us = average(g.flush_avg_us, took.as_micros() as f64);
        g.flush_max = g.flush_max.max(took);
    }

    /// A page-cache write of `bytes` took `took`.
    pub fn write_done(&self, bytes: u64, took: Duration) {
        let mut g = self.inner.lock();
        g.write_avg_us = average(g.write_avg_us, took.as_micros() as f64);
        g.bytes_written += bytes;
        let now = Instant::now();
        let total = g.bytes_written;
        match g.window {
            Some((start, before)) if now.duration_since(start) >= RATE_WINDOW => {
                let secs = now.duration_since(start).as_secs_f64();
                g.last_rate = ((total - before) as f64 / secs) as u64;
                g.window = Some((now, total));
            }
            Some(_) => {}
            None => g.window = Some((now, total - bytes)),
        }
    }

    /// The figures now, and whether the replica is slow (with the reason;
    /// the first report of a slow episode is logged for `replica`).
    pub fn report(&self, volume: &str, replica: &str) -> DiskReport {
        let mut g = self.inner.lock();
        let now = Instant::now();
        let oldest = g
            .flushes_waiting
            .iter()
            .min()
            .map(|t| now.duration_since(*t));
        let avg = Duration::from_micros(g.flush_avg_us as u64);
        let slow = match oldest {
            Some(waiting) if waiting > SLOW_FLUSH => Some(format!(
                "a flush has been waiting {:.1} s (slow above {} s): its disk is not keeping up",
                waiting.as_secs_f64(),
                SLOW_FLUSH.as_secs()
            )),
            _ if avg > SLOW_FLUSH => Some(format!(
                "its flushes take {:.1} s on average (slow above {} s): its disk is not keeping up",
                avg.as_secs_f64(),
                SLOW_FLUSH.as_secs()
            )),
            _ => None,
        };
        if slow.is_some() != g.was_slow {
            g.was_slow = slow.is_some();
            match &slow {
                Some(reason) => tracing::warn!(volume, replica, %reason, "replica is slow"),
                None => tracing::info!(volume, replica, "replica is no longer slow"),
            }
        }
        // The rate decays to 0 when writes stop.
        let rate = match g.window {
            Some((start, _)) if now.duration_since(start) > RATE_WINDOW * 2 => 0,
            _ => g.last_rate,
        };
        DiskReport {
            flush_latency: avg,
            flush_latency_max: g.flush_max,
            write_latency: Duration::from_micros(g.write_avg_us as u64),
            write_bytes_per_sec: rate,
            bytes_written: g.bytes_written,
            slow,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flush_waiting_past_the_threshold_makes_the_replica_slow() {
        let d = DiskStats::default();
        assert_eq!(d.report("v", "r").slow, None);
        let started = Instant::now() - SLOW_FLUSH - Duration::from_millis(100);
        d.inner.lock().flushes_waiting.push(started);
        let slow = d.report("v", "r").slow.expect("slow");
        assert!(slow.contains("waiting"), "{slow}");
        d.flush_done(started);
        // One long flush moves the average above the threshold too.
        assert!(d.report("v", "r").slow.is_some());
        for _ in 0..40 {
            let t = d.flush_started();
            d.flush_done(t);
        }
        assert_eq!(d.report("v", "r").slow, None);
        assert!(d.report("v", "r").flush_latency_max > SLOW_FLUSH);
    }

    #[test]
    fn writes_count_bytes_and_latency() {
        let d = DiskStats::default();
        d.write_done(4096, Duration::from_micros(100));
        d.write_done(4096, Duration::from_micros(100));
        let r = d.report("v", "r");
        assert_eq!(r.bytes_written, 8192);
        assert_eq!(r.write_latency, Duration::from_micros(100));
    }
}
