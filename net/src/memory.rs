//! Giving freed heap memory back to the system.
//!
//! glibc's malloc keeps what a burst of large buffers freed: after the
//! first 1 MiB buffer is freed it raises its mmap threshold, so later ones
//! come from its arenas, and an arena returns pages only from its top. A
//! volume controller that had just taken 4 GiB of 1 MiB writes held 15 MiB
//! of anonymous memory afterwards, against 2.4 MiB before them, and kept it
//! while idle; `malloc_trim(0)` gave back 8 MiB of it (BENCHMARKS.md,
//! "Session 22"). [`return_freed_memory`] calls it every 10 s, so a
//! server's resident memory follows what it holds, not its last burst.
//! Elsewhere than glibc it does nothing.

use std::time::Duration;

/// How often freed memory is given back: soon after a burst, and rarely
/// enough to cost nothing measurable. Every 2 s, a controller taking 1 MiB
/// writes at 2 GB/s may have lost a few percent (1477-2120 MiB/s against
/// 2010-2160 without, six rounds each: the pages a trim gives back are
/// faulted in again by the next buffers).
pub const TRIM_EVERY: Duration = Duration::from_secs(10);

/// Gives freed heap memory back every [`TRIM_EVERY`], until dropped.
/// Spawn it once per server process.
pub async fn return_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let mut tick = tokio::time::interval(TRIM_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            trim();
        }
    }
}

/// One `malloc_trim(0)`: every arena's free pages back to the system.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn trim() {
    // SAFETY: malloc_trim takes the arenas' locks itself; 0 keeps no pad.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    use super::*;

    fn rss_anon_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("RssAnon:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    /// Buffers freed out of order in the heap leave their pages resident
    /// until a trim gives them back.
    #[test]
    fn a_trim_gives_back_what_a_burst_freed() {
        // Raise the mmap threshold as a freed 1 MiB buffer does, then
        // allocate 48 MiB of 1 MiB buffers from the heap, touch them, and
        // free all but the last (the top stays, so nothing is returned
        // by free itself).
        drop(vec![1u8; 1 << 20]);
        let mut bufs: Vec<Vec<u8>> = (0..48).map(|i| vec![i as u8 + 1; 1 << 20]).collect();
        let last = bufs.pop();
        let before = rss_anon_kib();
        drop(bufs);
        let kept = rss_anon_kib();
        trim();
        let after = rss_anon_kib();
        drop(last);
        assert!(
            kept + 8 * 1024 > before,
            "free returned the pages by itself ({before} -> {kept} KiB); the test does not test"
        );
        assert!(
            after + 32 * 1024 < kept,
            "the trim gave back too little: {kept} -> {after} KiB"
        );
    }
}
