//! When a backup asks the target whether a chunk is there before uploading
//! it (a HEAD per chunk).
//!
//! The question only pays when the answer is sometimes yes: a chunk another
//! volume (or an earlier, interrupted backup) already stored is not sent
//! again. On a first backup of new data every answer is no, and the HEAD
//! is a whole request per chunk for nothing: on the benchmark's moto server
//! the HEADs took 41 of the 101 busy seconds of a full backup (moto spends
//! about as much per request as per megabyte).
//!
//! So after [`SKIP_AFTER`] misses in a row, a backup uploads new chunks
//! without asking, and still asks for one chunk in [`PROBE_EVERY`]; the
//! first hit (a probe finding its chunk) goes back to asking for every
//! chunk. Uploading a chunk the target already has is harmless: its name is
//! the hash of its plaintext, so the object is replaced by one with the same
//! content (a new nonce), and gc cannot run beside a backup (`locks.rs`).
//! The cost of a wrong guess is bounded: at most `PROBE_EVERY - 1` chunks
//! sent again before the next probe notices duplicates.

use std::sync::atomic::{AtomicU64, Ordering};

/// Misses in a row after which lookups become probes.
pub const SKIP_AFTER: u64 = 32;
/// While skipping, one new chunk in this many is still looked up.
pub const PROBE_EVERY: u64 = 16;

/// The lookup policy's state for one backup, shared by its chunk tasks.
#[derive(Debug, Default)]
pub struct Lookups {
    /// Lookups in a row that found nothing.
    misses: AtomicU64,
    /// Chunks that reached the decision while skipping.
    seen_skipping: AtomicU64,
    skipped: AtomicU64,
}

impl Lookups {
    /// Whether to ask the target about the next chunk that is not known to
    /// be there.
    pub fn should_look(&self) -> bool {
        if self.misses.load(Ordering::Relaxed) < SKIP_AFTER {
            return true;
        }
        let n = self.seen_skipping.fetch_add(1, Ordering::Relaxed);
        if n.is_multiple_of(PROBE_EVERY) {
            return true;
        }
        self.skipped.fetch_add(1, Ordering::Relaxed);
        false
    }

    /// The answer of a lookup.
    pub fn record(&self, found: bool) {
        if found {
            self.misses.store(0, Ordering::Relaxed);
        } else {
            self.misses.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Chunks uploaded without a lookup.
    pub fn skipped(&self) -> u64 {
        self.skipped.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn asks_until_misses_pile_up_then_probes_and_a_hit_resets() {
        let l = Lookups::default();
        for _ in 0..SKIP_AFTER {
            assert!(l.should_look());
            l.record(false);
        }
        // Skipping: one probe in PROBE_EVERY.
        let looks = (0..PROBE_EVERY * 4).filter(|_| l.should_look()).count();
        assert_eq!(looks, 4);
        assert_eq!(l.skipped(), PROBE_EVERY * 4 - 4);
        // A probe that finds its chunk: every chunk is asked about again.
        l.record(true);
        assert!((0..SKIP_AFTER).all(|_| l.should_look()));
    }

    #[test]
    fn hits_keep_every_lookup() {
        let l = Lookups::default();
        for i in 0..1000u64 {
            assert!(l.should_look());
            l.record(i.is_multiple_of(10));
        }
        assert_eq!(l.skipped(), 0);
    }
}
