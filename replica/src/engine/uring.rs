//! The io_uring engine: a whole batch in one `io_uring_enter`.
//!
//! Rings are pooled (one per concurrent caller, created on demand) so
//! threads never wait for each other's batches. Short reads and writes, which
//! io_uring reports as a smaller result, are finished with plain syscalls.

use std::io;
use std::os::fd::AsRawFd;

use io_uring::{opcode, types, IoUring};
use parking_lot::Mutex;

use super::portable::run_one;
use super::{BatchError, IoEngine, IoOp};

const RING_ENTRIES: u32 = 64;

/// Batches IO through io_uring. Build it with [`UringEngine::probe`].
pub struct UringEngine {
    rings: Mutex<Vec<IoUring>>,
}

impl std::fmt::Debug for UringEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringEngine")
            .field("pooled_rings", &self.rings.lock().len())
            .finish()
    }
}

impl UringEngine {
    /// Creates a ring and checks the kernel supports every opcode the store
    /// uses; an error means "use the portable engine".
    pub fn probe() -> io::Result<Self> {
        let ring = IoUring::new(RING_ENTRIES)?;
        let mut probe = io_uring::Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        for (code, name) in [
            (opcode::Read::CODE, "read"),
            (opcode::Write::CODE, "write"),
            (opcode::Fsync::CODE, "fsync"),
            (opcode::Fallocate::CODE, "fallocate"),
            (opcode::Nop::CODE, "nop"),
        ] {
            if !probe.is_supported(code) {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("io_uring lacks the {name} opcode"),
                ));
            }
        }
        let engine = UringEngine {
            rings: Mutex::new(vec![ring]),
        };
        // A real round trip: some sandboxes create rings but refuse to run them.
        let mut nop_ring = engine.take_ring()?;
        // SAFETY: a NOP references no memory.
        unsafe {
            nop_ring
                .submission()
                .push(&opcode::Nop::new().build().user_data(0))
        }
        .map_err(|_| io::Error::other("io_uring submission queue full"))?;
        nop_ring.submit_and_wait(1)?;
        nop_ring.completion().for_each(drop);
        engine.rings.lock().push(nop_ring);
        Ok(engine)
    }

    fn take_ring(&self) -> io::Result<IoUring> {
        if let Some(ring) = self.rings.lock().pop() {
            return Ok(ring);
        }
        IoUring::new(RING_ENTRIES)
    }

    fn run_chunk(
        &self,
        ring: &mut IoUring,
        ops: &mut [IoOp<'_>],
        base: usize,
    ) -> Result<(), BatchError> {
        let mut pushed = 0usize;
        for (i, op) in ops.iter_mut().enumerate() {
            let entry = match op {
                IoOp::Read { file, offset, buf } => opcode::Read::new(
                    types::Fd(file.as_raw_fd()),
                    buf.as_mut_ptr(),
                    buf.len() as u32,
                )
                .offset(*offset)
                .build(),
                IoOp::Write { file, offset, buf } => {
                    opcode::Write::new(types::Fd(file.as_raw_fd()), buf.as_ptr(), buf.len() as u32)
                        .offset(*offset)
                        .build()
                }
                IoOp::SyncData { file } => opcode::Fsync::new(types::Fd(file.as_raw_fd()))
                    .flags(types::FsyncFlags::DATASYNC)
                    .build(),
                IoOp::PunchHole { file, offset, len } => {
                    opcode::Fallocate::new(types::Fd(file.as_raw_fd()), *len)
                        .offset(*offset)
                        .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
                        .build()
                }
            };
            // SAFETY: every buffer and fd referenced by the entry is borrowed
            // by `ops` for the whole call, and this function does not return
            // before every pushed entry has completed (the loop below).
            let pushed_ok = unsafe { ring.submission().push(&entry.user_data(i as u64)) }.is_ok();
            if !pushed_ok {
                break;
            }
            pushed += 1;
        }
        let mut results: Vec<Option<i32>> = vec![None; pushed];
        let mut completed = 0;
        let mut first_error: Option<BatchError> = None;
        while completed < pushed {
            match ring.submit_and_wait(pushed - completed) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
                Err(e) => {
                    // The kernel may still own submitted entries whose buffers
                    // we borrow: wait for them rather than return early.
                    tracing::error!("io_uring_enter failed: {e}; draining");
                    first_error.get_or_insert(BatchError {
                        index: base,
                        source: e,
                    });
                    std::thread::yield_now();
                }
            }
            for cqe in ring.completion() {
                let idx = cqe.user_data() as usize;
                if idx < pushed && results[idx].is_none() {
                    results[idx] = Some(cqe.result());
                    completed += 1;
                }
            }
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        for (i, res) in results.into_iter().enumerate() {
            let res = res.unwrap_or(-libc::EIO);
            let op = &mut ops[i];
            if res < 0 {
                return Err(BatchError {
                    index: base + i,
                    source: io::Error::from_raw_os_error(-res),
                });
            }
            let done = res as usize;
            // Finish short transfers (and zero-fill reads past end of file).
            let rest = match op {
                IoOp::Read { file, offset, buf } if done < buf.len() => Some(IoOp::Read {
                    file,
                    offset: *offset + done as u64,
                    buf: &mut buf[done..],
                }),
                IoOp::Write { file, offset, buf } if done < buf.len() => Some(IoOp::Write {
                    file,
                    offset: *offset + done as u64,
                    buf: &buf[done..],
                }),
                _ => None,
            };
            if let Some(mut rest) = rest {
                run_one(&mut rest).map_err(|source| BatchError {
                    index: base + i,
                    source,
                })?;
            }
        }
        // Ops that did not fit in the submission queue: run them next round.
        if pushed < ops.len() {
            return self.run_chunk(ring, &mut ops[pushed..], base + pushed);
        }
        Ok(())
    }
}

impl IoEngine for UringEngine {
    fn name(&self) -> &'static str {
        "io_uring"
    }

    fn submit(&self, ops: &mut [IoOp<'_>]) -> Result<(), BatchError> {
        if ops.is_empty() {
            return Ok(());
        }
        if ops.len() == 1 {
            // One op gains nothing from a ring round trip.
            return run_one(&mut ops[0]).map_err(|source| BatchError { index: 0, source });
        }
        let mut ring = self
            .take_ring()
            .map_err(|source| BatchError { index: 0, source })?;
        let result = self.run_chunk(&mut ring, ops, 0);
        self.rings.lock().push(ring);
        result
    }
}
