//! Bounded unflushed data: the head's dirty pages are written back behind
//! the writes, and writes wait when too much is still unwritten, so a FLUSH
//! (and a clean stop) waits for about `flush_target` of disk time, never for
//! whatever the kernel's dirty limits (a share of RAM) let pile up.
//!
//! ```text
//! Store::write ── note_write(bytes) ──▶ pending ──(≥ step)──▶ writeback thread
//!      │                                                  sync_file_range(WAIT_BEFORE|WRITE|WAIT_AFTER)
//!      └─ throttle(): waits while pending + in_flight ≥ limit      │ rate = bytes / time
//!                                                                  ▼
//!                          limit = rate × flush_target (clamped), step = limit / 4
//! ```
//!
//! The bytes counted are what the store wrote (data plus one map page per
//! write, an upper bound), not what the kernel still holds dirty: pages the
//! kernel wrote back by itself only make the count pessimistic. The rate is
//! measured on the writeback thread's own batches, so it is the rate this
//! disk takes this volume's writes (random 4 KiB writes back slower than
//! sequential ones, and the limit follows).
//!
//! Two kinds of write share the bound ([`WriteClass`]): the volume's
//! clients' and a rebuild's copies (PULL). While both are writing, each
//! may hold at most half of it unflushed, so each gets about half of the
//! disk: a rebuild onto a slow disk left the clients' writes waiting behind
//! its copies for a whole batch at a time (they kept 5% of their IOPS,
//! their 99th percentile near a second; BENCHMARKS.md, "Session 22"), and
//! a client writing as fast as it can must not starve the rebuild either.
//! Either kind alone may use all of it.
//!
//! The thread opens the head's files anew by path instead of sharing the
//! store's descriptors: `sync_file_range` reports (and consumes, per open
//! file description) writeback errors, and the store's own `fdatasync` must
//! still see them to poison the store.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

/// Writeback settings of a store.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WritebackConfig {
    /// The disk time a flush may need at most: unflushed bytes are bounded
    /// by the measured writeback rate times this.
    pub flush_target: Duration,
    /// A fixed bound on unflushed bytes instead of the measured one.
    pub fixed_limit: Option<u64>,
    /// No writeback thread and no bound (the kernel's dirty limits decide).
    pub disabled: bool,
}

impl Default for WritebackConfig {
    fn default() -> Self {
        WritebackConfig {
            flush_target: Duration::from_secs(1),
            fixed_limit: None,
            disabled: false,
        }
    }
}

/// The bound before the first measurement, and its floor: a disk slower
/// than this per second still gets batches large enough to write well.
pub const MIN_LIMIT: u64 = 16 << 20;
/// The bound's ceiling, however fast the disk.
pub const MAX_LIMIT: u64 = 1 << 30;
/// Bytes counted for the block-map page a write dirties.
const MAP_PAGE: u64 = 4096;
/// A kind of write counts as writing for this long after its last write
/// (or while one waits): the other kind then leaves it half the bound.
const ACTIVE: Duration = Duration::from_secs(1);

/// Whose write it is, for sharing the bound (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteClass {
    /// The volume's clients' writes (through the controller).
    Client,
    /// A rebuild's or resync's copy into this replica (PULL).
    Copy,
}

impl WriteClass {
    fn index(self) -> usize {
        self as usize
    }

    fn other(self) -> WriteClass {
        match self {
            WriteClass::Client => WriteClass::Copy,
            WriteClass::Copy => WriteClass::Client,
        }
    }
}

/// What [`Writeback`] measured, for status and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct WritebackStats {
    /// Bytes written and not yet known to be on disk.
    pub unflushed_bytes: u64,
    /// The current bound on them.
    pub limit_bytes: u64,
    /// Measured writeback rate, bytes per second (0 before a measurement).
    pub rate_bytes_per_sec: u64,
    /// Bytes the writeback thread has written back.
    pub written_back_bytes: u64,
    /// Writes that waited for the bound, and how long in total.
    pub throttled_writes: u64,
    pub throttled_secs: f64,
    /// Flushes (fdatasync of the head) and their latency.
    pub flushes: u64,
    pub last_flush_secs: f64,
    pub max_flush_secs: f64,
    pub flush_secs_total: f64,
}

struct Inner {
    config: WritebackConfig,
    /// Paths of the head's data and map files, and the head's id.
    head: Option<(u64, Arc<HeadPaths>)>,
    pending: u64,
    in_flight: u64,
    /// The copies' part of `pending` and `in_flight`.
    copy_pending: u64,
    copy_in_flight: u64,
    /// Per [`WriteClass`]: its last write, and its writes waiting now.
    last_write: [Option<Instant>; 2],
    waiting: [u32; 2],
    /// Bytes per second, from a moving average of the batches' seconds
    /// per byte (an average of rates would let one batch the kernel had
    /// already written, done in no time, inflate it wildly).
    rate: f64,
    /// Flushes running, and flushes started: a batch that overlapped a
    /// flush found its pages already written and measures nothing.
    flushes_running: u32,
    flush_gen: u64,
    stop: bool,
    stats: WritebackStats,
}

struct HeadPaths {
    data: PathBuf,
    map: PathBuf,
}

impl Inner {
    fn limit(&self) -> u64 {
        if let Some(fixed) = self.config.fixed_limit {
            return fixed.max(MAP_PAGE * 4);
        }
        if self.rate <= 0.0 {
            return MIN_LIMIT;
        }
        ((self.rate * self.config.flush_target.as_secs_f64()) as u64).clamp(MIN_LIMIT, MAX_LIMIT)
    }

    fn step(&self) -> u64 {
        self.limit() / 4
    }

    /// Bytes of `class` written and not yet known to be on disk.
    fn unflushed(&self, class: WriteClass) -> u64 {
        let copy = self.copy_pending + self.copy_in_flight;
        match class {
            WriteClass::Copy => copy,
            WriteClass::Client => (self.pending + self.in_flight).saturating_sub(copy),
        }
    }

    fn active(&self, class: WriteClass, now: Instant) -> bool {
        self.waiting[class.index()] > 0
            || self.last_write[class.index()].is_some_and(|t| now.duration_since(t) < ACTIVE)
    }

    /// True if a write of `class` must wait now: the bound is reached, or
    /// the other class is writing too and this one holds its half.
    fn must_wait(&self, class: WriteClass, now: Instant) -> bool {
        if self.config.disabled || self.stop {
            return false;
        }
        let limit = self.limit();
        self.pending + self.in_flight >= limit
            || (self.active(class.other(), now) && self.unflushed(class) >= limit / 2)
    }
}

/// What [`Writeback::before_flush`] saw; given back to [`Writeback::flushed`].
pub(crate) struct FlushStart {
    pending: u64,
    copy_pending: u64,
    started: Instant,
}

struct Shared {
    inner: Mutex<Inner>,
    /// Wakes the writeback thread.
    work: Condvar,
    /// Wakes writes waiting for the bound.
    settled: Condvar,
}

/// The writeback state of one store. See the module docs.
pub(crate) struct Writeback {
    shared: Arc<Shared>,
}

impl Writeback {
    pub(crate) fn new(config: WritebackConfig) -> Writeback {
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                config,
                head: None,
                pending: 0,
                in_flight: 0,
                copy_pending: 0,
                copy_in_flight: 0,
                last_write: [None; 2],
                waiting: [0; 2],
                rate: 0.0,
                flushes_running: 0,
                flush_gen: 0,
                stop: false,
                stats: WritebackStats::default(),
            }),
            work: Condvar::new(),
            settled: Condvar::new(),
        });
        let worker = shared.clone();
        let spawned = thread::Builder::new()
            .name("strata-writeback".into())
            .spawn(move || run(&worker));
        if let Err(e) = spawned {
            // Without the thread nothing is written back early and nobody
            // may wait for it: the kernel's limits decide, as before.
            tracing::warn!(error = %e, "cannot start a writeback thread; unflushed data is not bounded");
            shared.inner.lock().config.disabled = true;
        }
        Writeback { shared }
    }

    pub(crate) fn configure(&self, config: WritebackConfig) {
        let mut g = self.shared.inner.lock();
        let was_disabled = g.config.disabled;
        g.config = WritebackConfig {
            // A thread that failed to start stays absent.
            disabled: config.disabled || was_disabled,
            ..config
        };
        drop(g);
        self.shared.settled.notify_all();
        self.shared.work.notify_one();
    }

    /// True if a write of `class` now would wait for the bound.
    pub(crate) fn would_throttle(&self, class: WriteClass) -> bool {
        self.shared.inner.lock().must_wait(class, Instant::now())
    }

    /// Waits while a write of `class` must (the bound, or its share of
    /// it). Call before taking any store lock: the writeback thread takes
    /// none, but a chain change waiting for the state lock must not wait
    /// behind a throttled write.
    pub(crate) fn throttle(&self, class: WriteClass) {
        let mut g = self.shared.inner.lock();
        if !g.must_wait(class, Instant::now()) {
            return;
        }
        let started = Instant::now();
        g.waiting[class.index()] += 1;
        while g.must_wait(class, Instant::now()) {
            self.shared.work.notify_one();
            self.shared
                .settled
                .wait_for(&mut g, Duration::from_millis(100));
        }
        g.waiting[class.index()] -= 1;
        g.stats.throttled_writes += 1;
        g.stats.throttled_secs += started.elapsed().as_secs_f64();
    }

    /// Counts `bytes` of `class` written into head `head_id` (whose files
    /// are at `data` and `map`) and wakes the thread when a batch is due.
    pub(crate) fn note_write(
        &self,
        class: WriteClass,
        head_id: u64,
        data: &Path,
        map: &Path,
        bytes: u64,
    ) {
        let mut g = self.shared.inner.lock();
        if g.config.disabled {
            return;
        }
        g.last_write[class.index()] = Some(Instant::now());
        if g.head.as_ref().map(|h| h.0) != Some(head_id) {
            // A new head (snapshot, revert): the old one was flushed.
            g.head = Some((
                head_id,
                Arc::new(HeadPaths {
                    data: data.to_path_buf(),
                    map: map.to_path_buf(),
                }),
            ));
            g.pending = 0;
            g.copy_pending = 0;
        }
        g.pending += bytes + MAP_PAGE;
        if class == WriteClass::Copy {
            g.copy_pending += bytes + MAP_PAGE;
        }
        if g.pending >= g.step() {
            self.shared.work.notify_one();
        }
    }

    /// The count of unflushed bytes before a flush starts; pass it to
    /// [`Writeback::flushed`] when the flush ends.
    pub(crate) fn before_flush(&self) -> FlushStart {
        let mut g = self.shared.inner.lock();
        g.flushes_running += 1;
        g.flush_gen += 1;
        FlushStart {
            pending: g.pending,
            copy_pending: g.copy_pending,
            started: Instant::now(),
        }
    }

    /// A flush that started as `start` says ended (`ok`: it succeeded).
    pub(crate) fn flushed(&self, start: FlushStart, ok: bool) {
        let FlushStart {
            pending,
            copy_pending,
            started,
        } = start;
        let secs = started.elapsed().as_secs_f64();
        let mut g = self.shared.inner.lock();
        g.flushes_running = g.flushes_running.saturating_sub(1);
        if !ok {
            return;
        }
        if !g.config.disabled && secs > 2.0 * g.config.flush_target.as_secs_f64() {
            tracing::warn!(
                secs,
                unflushed_at_start = pending + g.in_flight,
                limit = g.limit(),
                rate = g.rate as u64,
                "a flush took more than twice the flush target"
            );
        }
        g.pending = g.pending.saturating_sub(pending);
        g.copy_pending = g.copy_pending.saturating_sub(copy_pending).min(g.pending);
        g.stats.flushes += 1;
        g.stats.last_flush_secs = secs;
        g.stats.max_flush_secs = g.stats.max_flush_secs.max(secs);
        g.stats.flush_secs_total += secs;
        drop(g);
        self.shared.settled.notify_all();
    }

    pub(crate) fn stats(&self) -> WritebackStats {
        let g = self.shared.inner.lock();
        WritebackStats {
            unflushed_bytes: g.pending + g.in_flight,
            limit_bytes: if g.config.disabled { 0 } else { g.limit() },
            rate_bytes_per_sec: g.rate as u64,
            ..g.stats
        }
    }
}

impl Drop for Writeback {
    fn drop(&mut self) {
        // The thread is not joined: it may be inside a long sync_file_range
        // and a stop must not wait for it. It holds no store resource.
        self.shared.inner.lock().stop = true;
        self.shared.work.notify_one();
        self.shared.settled.notify_all();
    }
}

fn run(shared: &Shared) {
    loop {
        let (head, batch, copy_batch, quiet, gen) = {
            let mut g = shared.inner.lock();
            while !g.stop && (g.config.disabled || g.pending < g.step().max(1)) {
                shared.work.wait(&mut g);
            }
            if g.stop {
                return;
            }
            let batch = g.pending;
            let copy_batch = g.copy_pending;
            g.pending = 0;
            g.copy_pending = 0;
            g.in_flight += batch;
            g.copy_in_flight += copy_batch;
            let quiet = g.flushes_running == 0;
            (
                g.head.as_ref().map(|h| h.1.clone()),
                batch,
                copy_batch,
                quiet,
                g.flush_gen,
            )
        };
        let started = Instant::now();
        if let Some(head) = &head {
            for path in [&head.data, &head.map] {
                if let Err(e) = write_back(path, 0, 0) {
                    // The store's own fdatasync reports (and poisons on)
                    // a real write error; this is only the early start.
                    tracing::warn!(file = %path.display(), error = %e, "background writeback failed");
                }
            }
        }
        let secs = started.elapsed().as_secs_f64();
        let mut g = shared.inner.lock();
        g.in_flight = g.in_flight.saturating_sub(batch);
        g.copy_in_flight = g.copy_in_flight.saturating_sub(copy_batch);
        g.stats.written_back_bytes += batch;
        // Small batches measure latency more than rate; a flush during the
        // batch wrote its pages.
        let measured = quiet && g.flushes_running == 0 && g.flush_gen == gen;
        if head.is_some() && measured && batch >= MIN_LIMIT / 4 {
            g.rate = next_rate(g.rate, batch as f64 / secs.max(1e-6));
        }
        drop(g);
        shared.settled.notify_all();
    }
}

/// The writeback rate after a batch measured at `measured` bytes per
/// second, from `rate` (0: none yet). A slower batch counts most: a disk
/// that slows down (its own cache full, another volume's writes) must
/// lower the bound within a batch or two. A faster one raises the rate by
/// at most [`MAX_GROWTH`] per batch, from the rate the first bound stands
/// for ([`MIN_LIMIT`] a second): a disk with a write cache (an SD card's,
/// a USB disk's, a virtual disk's host) takes its first tens of MiB at
/// memory speed, and believing that at once set a bound of a gigabyte
/// that then took the disk half a minute to write, every write waiting
/// behind it (a rebuild onto a 30 MiB/s disk timed out again and again,
/// BENCHMARKS.md "Session 21"). One batch the kernel had already written,
/// done in no time, likewise raises it by that factor at most.
fn next_rate(rate: f64, measured: f64) -> f64 {
    let current = if rate > 0.0 { rate } else { MIN_LIMIT as f64 };
    if measured < current {
        // Averaged as seconds per byte.
        1.0 / (0.3 / current + 0.7 / measured)
    } else {
        measured.min(current * MAX_GROWTH)
    }
}

/// How much one batch may raise the writeback rate (and so the bound).
const MAX_GROWTH: f64 = 1.5;

/// Writes back the dirty pages of `[offset, offset + len)` of the file at
/// `path` (`len` 0: to the end) and waits for them, through a file
/// description of its own (see the module docs).
pub(crate) fn write_back(path: &Path, offset: u64, len: u64) -> std::io::Result<()> {
    let file = File::open(path)?;
    sync_range(&file, offset, len)
}

/// Pieces [`write_back_until`] writes back between two deadline checks.
const STOP_PIECE: u64 = 16 << 20;

/// Writes back the dirty pages of the file at `path`, one piece of its
/// allocated ranges at a time, until all are written (`Ok(true)`) or
/// `deadline` passes (`Ok(false)`). Each piece is one disk-bound call of at
/// most [`STOP_PIECE`] bytes, so the deadline is overrun by that at most.
pub(crate) fn write_back_until(path: &Path, deadline: Instant) -> std::io::Result<bool> {
    let file = File::open(path)?;
    let size = file.metadata()?.len();
    let mut offset = 0u64;
    while offset < size {
        if Instant::now() >= deadline {
            return Ok(false);
        }
        // SAFETY: lseek on a descriptor `file` owns.
        let data = unsafe { libc::lseek(file.as_raw_fd(), offset as i64, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::ENXIO) => return Ok(true), // no data after offset
                Some(libc::EINVAL) => {}              // no SEEK_DATA: go linearly
                _ => return Err(e),
            }
        } else {
            offset = data as u64;
        }
        sync_range(&file, offset, STOP_PIECE)?;
        offset += STOP_PIECE;
    }
    Ok(true)
}

/// `sync_file_range(WAIT_BEFORE | WRITE | WAIT_AFTER)` on an open file.
pub(crate) fn sync_range(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
        | libc::SYNC_FILE_RANGE_WRITE
        | libc::SYNC_FILE_RANGE_WAIT_AFTER;
    // SAFETY: plain integer arguments on a descriptor `file` owns.
    let rc = unsafe { libc::sync_file_range(file.as_raw_fd(), offset as i64, len as i64, flags) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inner(rate: f64, fixed: Option<u64>) -> Inner {
        Inner {
            config: WritebackConfig {
                fixed_limit: fixed,
                ..Default::default()
            },
            head: None,
            pending: 0,
            in_flight: 0,
            copy_pending: 0,
            copy_in_flight: 0,
            last_write: [None; 2],
            waiting: [0; 2],
            rate,
            flushes_running: 0,
            flush_gen: 0,
            stop: false,
            stats: WritebackStats::default(),
        }
    }

    #[test]
    fn the_limit_is_a_second_of_the_measured_rate_within_bounds() {
        assert_eq!(inner(0.0, None).limit(), MIN_LIMIT);
        assert_eq!(inner(30.0 * 1048576.0, None).limit(), 30 << 20);
        assert_eq!(inner(1.0 * 1048576.0, None).limit(), MIN_LIMIT);
        assert_eq!(inner(10e9, None).limit(), MAX_LIMIT);
        assert_eq!(inner(10e9, Some(8 << 20)).limit(), 8 << 20);
    }

    /// A disk whose cache takes 64 MiB at 1.4 GB/s and then writes at
    /// 30 MiB/s, in the writeback thread's batches (a quarter of the
    /// bound): the bound never exceeds what the disk writes in a few
    /// seconds, and is back near a second of it soon after the cache fills.
    #[test]
    fn a_disk_cache_does_not_inflate_the_bound() {
        let mib = 1048576.0;
        let mut g = inner(0.0, None);
        let (mut cached, mut highest) = (64.0 * mib, 0u64);
        let mut after_cache = Vec::new();
        for _ in 0..40 {
            let batch = g.step() as f64;
            let measured = if cached > 0.0 {
                1400.0 * mib
            } else {
                30.0 * mib
            };
            if cached <= 0.0 {
                after_cache.push(g.limit());
            }
            cached -= batch;
            g.rate = next_rate(g.rate, measured);
            highest = highest.max(g.limit());
        }
        assert!(
            highest <= 200 << 20,
            "the bound reached {} MiB",
            highest >> 20
        );
        // Within three batches of the cache filling, at most about 2 s of the disk.
        assert!(after_cache[3] <= 64 << 20, "{:?}", after_cache);
        assert!(
            after_cache.last().unwrap().abs_diff(30 << 20) < 2 << 20,
            "{:?}",
            after_cache
        );
        // A steady fast disk still gets its second's worth, within a few batches.
        let mut g = inner(0.0, None);
        for _ in 0..12 {
            g.rate = next_rate(g.rate, 900.0 * mib);
        }
        assert!(g.limit() > 800 << 20, "{}", g.limit() >> 20);
        // One slow batch on a fast disk lowers the bound, a few fast ones restore it.
        g.rate = next_rate(g.rate, 90.0 * mib);
        assert!(g.limit() < 200 << 20, "{}", g.limit() >> 20);
        for _ in 0..6 {
            g.rate = next_rate(g.rate, 900.0 * mib);
        }
        assert!(g.limit() > 600 << 20, "{}", g.limit() >> 20);
    }

    #[test]
    fn a_client_and_a_copy_each_keep_half_of_the_bound() {
        use WriteClass::{Client, Copy};
        let limit = 32 << 20;
        let mut g = inner(0.0, Some(limit));
        let now = Instant::now();
        // A copy alone may use all of it.
        g.copy_pending = limit - 1;
        g.pending = limit - 1;
        assert!(!g.must_wait(Copy, now));
        g.last_write[Client.index()] = Some(now);
        // A client writing: the copy, over its half, waits; the client
        // waits only for the bound itself.
        assert!(g.must_wait(Copy, now));
        assert!(!g.must_wait(Client, now));
        g.pending += 1;
        assert!(g.must_wait(Client, now), "the bound holds for both");
        // Each at its half: both wait; under it, neither.
        g.last_write[Copy.index()] = Some(now);
        g.pending = limit / 2;
        g.copy_pending = 0;
        g.copy_in_flight = limit / 2;
        g.in_flight = limit / 2;
        assert_eq!(g.unflushed(Client), limit / 2);
        assert!(g.must_wait(Client, now) && g.must_wait(Copy, now));
        g.pending = limit / 2;
        g.in_flight = limit / 2 - (1 << 20);
        g.copy_in_flight = limit / 2 - (1 << 20);
        assert!(g.must_wait(Client, now), "the client still holds its half");
        assert!(!g.must_wait(Copy, now));
        // A client gone quiet for longer than ACTIVE (and none waiting)
        // leaves the copy the whole bound again.
        let later = now + ACTIVE + Duration::from_millis(1);
        g.last_write[Client.index()] = Some(now);
        g.pending = 0;
        g.in_flight = limit - (1 << 20);
        g.copy_in_flight = limit - (1 << 20);
        assert!(!g.must_wait(Copy, later));
        g.waiting[Client.index()] = 1;
        assert!(g.must_wait(Copy, later), "a waiting client is writing");
    }

    #[test]
    fn writes_past_the_limit_wait_until_written_back() {
        let dir = tempfile::tempdir().unwrap();
        let (data, map) = (dir.path().join("d"), dir.path().join("m"));
        std::fs::write(&data, vec![1u8; 1 << 20]).unwrap();
        std::fs::write(&map, vec![1u8; 4096]).unwrap();
        let wb = Writeback::new(WritebackConfig {
            fixed_limit: Some(1 << 20),
            ..Default::default()
        });
        for _ in 0..64 {
            wb.throttle(WriteClass::Client);
            wb.note_write(WriteClass::Client, 1, &data, &map, 64 << 10);
        }
        let stats = wb.stats();
        assert!(stats.unflushed_bytes <= 2 << 20, "{stats:?}");
        assert!(stats.written_back_bytes >= 2 << 20, "{stats:?}");
        assert!(stats.throttled_writes > 0, "{stats:?}");
    }
}
