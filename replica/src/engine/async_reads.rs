//! Reads that wait for the disk without a thread: one io_uring per data
//! server, submitted from the connection's task and completed by a task
//! that waits on the ring's eventfd.
//!
//! A read that misses the page cache used to go to tokio's blocking pool:
//! a thread woken to run `pread`, put to sleep by the disk, woken again,
//! and the connection's task woken after it. At 4 KiB random reads and
//! QD32 that hand-off was about half of the replica's CPU (`BENCHMARKS.md`,
//! session 24). Here the kernel reads the pages itself (buffered reads are
//! asynchronous in io_uring on ext4, xfs and btrfs since Linux 5.9) and the
//! completion arrives as an event on the runtime's own poller.
//!
//! The ring owns each read's buffers from submission to completion, so a
//! caller that goes away cannot free memory the kernel still writes into;
//! dropping the ring waits for whatever is still in flight.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use io_uring::{opcode, types, IoUring};
use parking_lot::Mutex;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// Requests read through a ring and handed back whole, in this process.
static READ_THROUGH_RING: AtomicU64 = AtomicU64::new(0);

/// How many requests, in this process, a ring has read whole (for tests
/// and diagnostics: a read that fell back to the blocking pool is not
/// counted).
pub fn reads_through_ring() -> u64 {
    READ_THROUGH_RING.load(Ordering::Relaxed)
}

/// Submission queue entries; the completion queue is twice as long.
const RING_ENTRIES: u32 = 256;
/// Entries in flight at most, so the completion queue never overflows.
const MAX_IN_FLIGHT: usize = RING_ENTRIES as usize;

/// Attempts at a submission the kernel turns away for now (no memory for
/// a request, a full completion queue) before the ring counts as broken.
const SUBMIT_TRIES: u32 = 1000;

/// An `io_uring_enter` error worth trying again.
fn transient(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EAGAIN | libc::EBUSY | libc::EINTR)
    )
}

/// One read of a request: `len` bytes of file `fd` at `offset` into
/// `bufs[buf][at..at + len]`.
#[derive(Debug, Clone, Copy)]
pub struct ReadOp {
    pub fd: RawFd,
    pub offset: u64,
    pub buf: usize,
    pub at: usize,
    pub len: usize,
}

/// A request's buffers: handed to the ring at submission, back with the
/// outcome.
pub type Buffers = [Vec<u8>; 2];

/// What a request's callback gets: `Ok` when every read filled its range,
/// `Err` when one failed or came back short, or the ring refused the
/// request (full, or broken): the caller then reads the blocking way, which
/// reports errors and finishes reads at the end of a file.
pub type Outcome = Result<Buffers, Buffers>;

type Done = Box<dyn FnOnce(Outcome) + Send>;

struct Pending {
    bufs: Buffers,
    /// Reads not yet completed.
    remaining: usize,
    /// Bytes the reads must fill, and what they filled so far.
    expected: usize,
    filled: usize,
    /// A read failed.
    failed: bool,
    done: Done,
}

struct Ring {
    ring: IoUring,
    /// Requests by `user_data`; `None` slots are free.
    pending: Vec<Option<Pending>>,
    free: Vec<usize>,
    /// Reads submitted and not yet completed.
    in_flight: usize,
    /// The kernel refused a submission for good: entries it never took
    /// may still sit in the queue, naming files that can be closed by now,
    /// so the ring is never entered again (requests are refused, and what
    /// was in flight is left to the connections' timeouts).
    broken: bool,
}

/// The data server's reads that wait for the disk. Build one with
/// [`AsyncReads::start`] inside a tokio runtime.
pub struct AsyncReads {
    ring: Mutex<Ring>,
    /// The task that reaps completions; stopped by [`AsyncReads::stop`].
    driver: Mutex<Option<tokio::task::AbortHandle>>,
}

impl std::fmt::Debug for AsyncReads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncReads")
            .field("in_flight", &self.ring.lock().in_flight)
            .finish()
    }
}

impl AsyncReads {
    /// Creates the ring and its completion task on the current runtime.
    /// `None` where io_uring is unavailable (an old kernel, a seccomp
    /// profile that refuses it, `kernel.io_uring_disabled`) or turned off
    /// with `STRATA_IO_ENGINE=portable`: reads then use the blocking pool.
    pub fn start() -> Option<Arc<Self>> {
        if std::env::var("STRATA_IO_ENGINE").as_deref() == Ok("portable") {
            return None;
        }
        match Self::try_start() {
            Ok(reads) => Some(reads),
            Err(e) => {
                tracing::info!("reads that miss the page cache use threads: io_uring: {e}");
                None
            }
        }
    }

    fn try_start() -> io::Result<Arc<Self>> {
        let ring = IoUring::new(RING_ENTRIES)?;
        let mut probe = io_uring::Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        if !probe.is_supported(opcode::Read::CODE) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "the kernel's io_uring lacks the read opcode",
            ));
        }
        // SAFETY: eventfd takes integer arguments and returns a new fd or -1.
        let raw = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a new fd that nothing else owns.
        let event = unsafe { OwnedFd::from_raw_fd(raw) };
        ring.submitter().register_eventfd(event.as_raw_fd())?;
        // SAFETY: the AsyncFd owns the eventfd, so it stays open and the
        // same for the AsyncFd's whole life.
        let event = unsafe { AsyncFd::register_with_interest(event, Interest::READABLE) }?;
        let reads = Arc::new(AsyncReads {
            ring: Mutex::new(Ring {
                ring,
                pending: Vec::new(),
                free: Vec::new(),
                in_flight: 0,
                broken: false,
            }),
            driver: Mutex::new(None),
        });
        let task = tokio::spawn(drive(reads.clone(), event));
        *reads.driver.lock() = Some(task.abort_handle());
        Ok(reads)
    }

    /// Stops reaping completions (the server has stopped). Reads still in
    /// flight complete into their buffers and are dropped with the ring;
    /// their callbacks do not run.
    pub fn stop(&self) {
        if let Some(task) = self.driver.lock().take() {
            task.abort();
        }
    }

    /// Reads `ops` into `bufs` and calls `done` with the outcome: later,
    /// on the completion task, or right away when the ring cannot take the
    /// request. Every op's range must lie inside its buffer, and its fd
    /// must stay open until this call returns (the kernel holds the file
    /// from then on).
    pub fn submit(
        &self,
        bufs: Buffers,
        ops: &[ReadOp],
        done: impl FnOnce(Outcome) + Send + 'static,
    ) {
        let fits = ops
            .iter()
            .all(|op| op.buf < bufs.len() && op.at.saturating_add(op.len) <= bufs[op.buf].len());
        if ops.is_empty() || !fits || ops.len() > MAX_IN_FLIGHT {
            return done(Err(bufs));
        }
        let mut guard = self.ring.lock();
        let r = &mut *guard;
        let room = {
            let sq = r.ring.submission();
            sq.capacity() - sq.len()
        };
        if r.broken || r.in_flight + ops.len() > MAX_IN_FLIGHT || room < ops.len() {
            drop(guard);
            return done(Err(bufs));
        }
        let slot = r.free.pop().unwrap_or_else(|| {
            r.pending.push(None);
            r.pending.len() - 1
        });
        let mut pending = Pending {
            bufs,
            remaining: ops.len(),
            expected: ops.iter().map(|op| op.len).sum(),
            filled: 0,
            failed: false,
            done: Box::new(done),
        };
        {
            let mut sq = r.ring.submission();
            for op in ops {
                let ptr = pending.bufs[op.buf][op.at..op.at + op.len].as_mut_ptr();
                let entry = opcode::Read::new(types::Fd(op.fd), ptr, op.len as u32)
                    .offset(op.offset)
                    .build()
                    .user_data(slot as u64);
                // SAFETY: the entry's buffer lives in `pending`, which the
                // ring keeps (a Vec's heap block does not move with it)
                // until the entry's completion is reaped; the room was
                // checked above.
                unsafe { sq.push(&entry) }.expect("room was checked");
            }
        }
        r.pending[slot] = Some(pending);
        r.in_flight += ops.len();
        // The kernel takes each file while it takes the entry, so every
        // entry must go now, while the caller still holds its files open.
        let mut tries = 0;
        while !r.ring.submission().is_empty() {
            match r.ring.submit() {
                Ok(_) => {}
                Err(e) if transient(&e) && tries < SUBMIT_TRIES => {
                    tries += 1;
                    std::thread::yield_now();
                }
                Err(e) => {
                    tracing::error!(
                        "io_uring refused reads ({e}); reads that miss the page cache use \
                         threads from now on"
                    );
                    r.broken = true;
                    return;
                }
            }
        }
    }

    /// Takes every completed request off the ring and returns them with
    /// their outcomes, for the caller to run outside the lock.
    fn reap(&self) -> Vec<(Done, Outcome)> {
        let mut guard = self.ring.lock();
        let r = &mut *guard;
        let mut finished = Vec::new();
        let completions: Vec<(usize, i32)> = r
            .ring
            .completion()
            .map(|cqe| (cqe.user_data() as usize, cqe.result()))
            .collect();
        for (slot, result) in completions {
            let Some(p) = r.pending.get_mut(slot).and_then(Option::as_mut) else {
                continue;
            };
            r.in_flight -= 1;
            p.remaining -= 1;
            match usize::try_from(result) {
                Ok(n) => p.filled += n,
                Err(_) => p.failed = true,
            }
            if p.remaining == 0 {
                let p = r.pending[slot].take().expect("checked above");
                r.free.push(slot);
                // A short read (the end of a file) counts as failed too:
                // the blocking read zero-fills it.
                let outcome = if p.failed || p.filled != p.expected {
                    Err(p.bufs)
                } else {
                    READ_THROUGH_RING.fetch_add(1, Ordering::Relaxed);
                    Ok(p.bufs)
                };
                finished.push((p.done, outcome));
            }
        }
        finished
    }
}

impl Drop for AsyncReads {
    fn drop(&mut self) {
        // The kernel may still write into buffers the ring owns: wait for
        // every read in flight before they are freed.
        let r = self.ring.get_mut();
        if r.broken {
            // Entering the ring could send stale entries: leak instead.
            for p in r.pending.drain(..).flatten() {
                std::mem::forget(p.bufs);
            }
            return;
        }
        while r.in_flight > 0 {
            match r.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if transient(&e) => {}
                Err(e) => {
                    tracing::error!("io_uring wait at shutdown: {e}; leaking its buffers");
                    for p in r.pending.drain(..).flatten() {
                        std::mem::forget(p.bufs);
                    }
                    return;
                }
            }
            let n = r.ring.completion().count();
            r.in_flight = r.in_flight.saturating_sub(n);
        }
    }
}

/// Reaps completions whenever the ring's eventfd says there are some.
async fn drive(reads: Arc<AsyncReads>, event: AsyncFd<OwnedFd>) {
    loop {
        let mut ready = match event.readable().await {
            Ok(ready) => ready,
            Err(e) => {
                tracing::error!("io_uring eventfd: {e}");
                return;
            }
        };
        // Reset the counter, then take what completed. A completion after
        // the reset signals the eventfd again, and tokio keeps that newer
        // readiness through `clear_ready`.
        let mut count = [0u8; 8];
        // SAFETY: reads 8 bytes into `count` from the eventfd we own.
        unsafe { libc::read(event.as_raw_fd(), count.as_mut_ptr().cast(), 8) };
        ready.clear_ready();
        for (done, outcome) in reads.reap() {
            // A callback that panics must not stop the reaping of others.
            let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| done(outcome)));
            if ran.is_err() {
                tracing::error!("a read's completion panicked");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use tokio::sync::oneshot;

    use super::*;

    fn file_of(len: usize) -> (tempfile::NamedTempFile, Vec<u8>) {
        let f = tempfile::NamedTempFile::new().unwrap();
        let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        f.as_file().write_all_at(&data, 0).unwrap();
        (f, data)
    }

    /// The ring, or `None` where this kernel (or emulator) has no io_uring
    /// and `STRATA_TEST_NO_IO_URING=1` says that is expected (qemu-user, in
    /// `scripts/arm64.sh`, has none).
    fn ring() -> Option<Arc<AsyncReads>> {
        let ring = AsyncReads::start();
        assert!(
            ring.is_some() || std::env::var_os("STRATA_TEST_NO_IO_URING").is_some(),
            "io_uring is unavailable; set STRATA_TEST_NO_IO_URING=1 where that is expected"
        );
        ring
    }

    /// A read into the first buffer.
    fn op(fd: RawFd, offset: u64, at: usize, len: usize) -> ReadOp {
        ReadOp {
            fd,
            offset,
            buf: 0,
            at,
            len,
        }
    }

    async fn read(reads: &AsyncReads, bufs: Buffers, ops: &[ReadOp]) -> Outcome {
        let (tx, rx) = oneshot::channel();
        reads.submit(bufs, ops, move |outcome| {
            let _ = tx.send(outcome);
        });
        rx.await.unwrap()
    }

    #[tokio::test]
    async fn reads_fill_both_buffers_from_several_files() {
        let Some(reads) = ring() else { return };
        let (a, a_data) = file_of(64 << 10);
        let (b, b_data) = file_of(4096);
        let fd_a = a.as_file().as_raw_fd();
        let fd_b = b.as_file().as_raw_fd();
        let ops = [
            op(fd_a, 8192, 4096, 8192),
            op(fd_a, 0, 0, 4096),
            ReadOp {
                fd: fd_b,
                offset: 100,
                buf: 1,
                at: 0,
                len: 16,
            },
        ];
        let before = reads_through_ring();
        let [got, small] = read(&reads, [vec![0; 12288], vec![0; 16]], &ops)
            .await
            .unwrap();
        assert_eq!(&got[..4096], &a_data[..4096]);
        assert_eq!(&got[4096..], &a_data[8192..16384]);
        assert_eq!(&small[..], &b_data[100..116]);
        assert!(reads_through_ring() > before);
        reads.stop();
    }

    #[tokio::test]
    async fn a_short_read_a_bad_file_or_a_bad_range_falls_back() {
        let Some(reads) = ring() else { return };
        let (f, _) = file_of(4096);
        let fd = f.as_file().as_raw_fd();
        // Past the end of the file: short, so the blocking read zero-fills.
        let past_end = [op(fd, 2048, 0, 4096)];
        assert!(read(&reads, [vec![0; 4096], vec![]], &past_end)
            .await
            .is_err());
        // A closed descriptor: the kernel's error.
        let bad = [op(-1, 0, 0, 4096)];
        assert!(read(&reads, [vec![0; 4096], vec![]], &bad).await.is_err());
        // A range outside its buffer is refused before the kernel sees it.
        let outside = [op(fd, 0, 1, 4096)];
        assert!(read(&reads, [vec![0; 4096], vec![]], &outside)
            .await
            .is_err());
        let no_buffer = [ReadOp {
            fd,
            offset: 0,
            buf: 2,
            at: 0,
            len: 1,
        }];
        assert!(read(&reads, [vec![0; 4096], vec![]], &no_buffer)
            .await
            .is_err());
        // More reads than the ring may hold at once: refused, not queued.
        let many = vec![
            ReadOp {
                fd,
                offset: 0,
                buf: 0,
                at: 0,
                len: 1
            };
            MAX_IN_FLIGHT + 1
        ];
        assert!(read(&reads, [vec![0; 4096], vec![]], &many).await.is_err());
        // The ring still works after all that.
        let good = [op(fd, 0, 0, 4096)];
        assert!(read(&reads, [vec![0; 4096], vec![]], &good).await.is_ok());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_reads_in_flight_all_complete_with_their_own_data() {
        let Some(reads) = ring() else { return };
        let (f, data) = file_of(1 << 20);
        let fd = f.as_file().as_raw_fd();
        let data = Arc::new(data);
        let tasks: Vec<_> = (0..600usize)
            .map(|i| {
                let (reads, data) = (reads.clone(), data.clone());
                tokio::spawn(async move {
                    let offset = (i * 4096 * 37) % (1 << 20);
                    let ops = [op(fd, offset as u64, 0, 4096)];
                    // The ring may be full: a refusal is the caller's cue
                    // to read elsewhere, so try again.
                    loop {
                        if let Ok([got, _]) = read(&reads, [vec![0; 4096], vec![]], &ops).await {
                            assert_eq!(&got[..], &data[offset..offset + 4096], "read {i}");
                            return;
                        }
                        tokio::task::yield_now().await;
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(reads.ring.lock().in_flight, 0);
    }

    #[tokio::test]
    async fn dropping_the_ring_waits_for_reads_in_flight() {
        let Some(reads) = ring() else { return };
        let (f, _) = file_of(1 << 20);
        let fd = f.as_file().as_raw_fd();
        reads.stop();
        for i in 0..32u64 {
            let ops = [op(fd, i * 32768, 0, 32768)];
            reads.submit([vec![0; 32768], vec![]], &ops, |_| {});
        }
        // Its completion task is stopped: Drop must reap them itself.
        for _ in 0..1000 {
            if Arc::strong_count(&reads) == 1 {
                break;
            }
            tokio::task::yield_now().await;
        }
        let reads = Arc::into_inner(reads).expect("the stopped task let go of the ring");
        drop(reads);
    }
}
