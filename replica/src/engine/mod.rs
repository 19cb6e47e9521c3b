//! IO engines: how the store's reads, writes, syncs and hole punches reach
//! the kernel.
//!
//! One trait, [`IoEngine`], takes a batch of [`IoOp`]s. The portable engine
//! ([`PortableEngine`]) runs them one by one with `pread`/`pwrite`; the
//! io_uring engine ([`UringEngine`]) submits the whole batch with one
//! syscall. [`detect`] probes io_uring once per process and falls back to the
//! portable engine where it is missing (older arm boards, seccomp-locked
//! kernels).
//!
//! Which one runs is chosen by `STRATA_IO_ENGINE`: `portable` (the default),
//! `io_uring` (probe, fall back to portable if missing) or `auto` (same as
//! `io_uring`). The default is portable because it measured faster here:
//! `cargo bench --bench store` on Linux 6.18/ext4 gave 9 µs per 4 KiB random
//! buffered write with pwrite against 73 µs with io_uring (ext4 punts
//! allocating buffered writes to io-wq threads), and 1.3 µs against 1.5 µs
//! per cached read. io_uring pays off once the server submits asynchronously
//! instead of from blocking threads; until then it stays opt-in.
//!
//! That asynchronous use exists for one path: [`AsyncReads`], the data
//! server's reads that miss the page cache, on by default where io_uring
//! works (`STRATA_IO_ENGINE=portable` turns it off too).

mod async_reads;
mod portable;
mod uring;

use std::fs::File;
use std::io;
use std::sync::{Arc, OnceLock};

pub use async_reads::{reads_through_ring, AsyncReads, Buffers, Outcome, ReadOp};
pub use portable::PortableEngine;
pub(crate) use portable::{read_full_at, read_nowait};
pub use uring::UringEngine;

/// One IO on an open file. Ops in one batch may run in any order and
/// concurrently: put a sync in its own batch after the writes it covers.
#[derive(Debug)]
pub enum IoOp<'a> {
    /// Fill `buf` from `offset`; bytes past the end of the file read as zeros.
    Read {
        file: &'a File,
        offset: u64,
        buf: &'a mut [u8],
    },
    /// Write all of `buf` at `offset`.
    Write {
        file: &'a File,
        offset: u64,
        buf: &'a [u8],
    },
    /// `fdatasync`: make the file's written data durable.
    SyncData { file: &'a File },
    /// Deallocate `len` bytes at `offset`, keeping the file size; the range
    /// reads back as zeros.
    PunchHole {
        file: &'a File,
        offset: u64,
        len: u64,
    },
}

impl IoOp<'_> {
    pub fn offset(&self) -> u64 {
        match self {
            IoOp::Read { offset, .. }
            | IoOp::Write { offset, .. }
            | IoOp::PunchHole { offset, .. } => *offset,
            IoOp::SyncData { .. } => 0,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            IoOp::Read { .. } => "read",
            IoOp::Write { .. } => "write",
            IoOp::SyncData { .. } => "fdatasync",
            IoOp::PunchHole { .. } => "punch hole",
        }
    }
}

/// A failed op in a batch: which one, and why.
#[derive(Debug)]
pub struct BatchError {
    pub index: usize,
    pub source: io::Error,
}

/// Runs batches of file IO. Implementations must complete (or fail) every op
/// of a batch before returning: the buffers are borrowed only for the call.
pub trait IoEngine: Send + Sync + std::fmt::Debug {
    fn name(&self) -> &'static str;
    fn submit(&self, ops: &mut [IoOp<'_>]) -> Result<(), BatchError>;
}

/// The engine this process uses (see the module docs for the choice). When
/// io_uring is asked for, it is probed once: used when the kernel offers
/// every op the store needs, else pread/pwrite.
pub fn detect() -> Arc<dyn IoEngine> {
    static ENGINE: OnceLock<Arc<dyn IoEngine>> = OnceLock::new();
    ENGINE
        .get_or_init(|| {
            let wanted = std::env::var("STRATA_IO_ENGINE").unwrap_or_default();
            if wanted != "io_uring" && wanted != "auto" {
                if !wanted.is_empty() && wanted != "portable" {
                    tracing::warn!(
                        "unknown STRATA_IO_ENGINE={wanted:?}; using the portable engine"
                    );
                }
                return Arc::new(PortableEngine);
            }
            match UringEngine::probe() {
                Ok(engine) => Arc::new(engine),
                Err(e) => {
                    if wanted == "io_uring" {
                        tracing::warn!(
                            "STRATA_IO_ENGINE=io_uring requested but io_uring is unavailable: {e}"
                        );
                    } else {
                        tracing::info!(
                            "io_uring unavailable ({e}); using the portable pread/pwrite engine"
                        );
                    }
                    Arc::new(PortableEngine)
                }
            }
        })
        .clone()
}

/// Punches a hole with `fallocate(PUNCH_HOLE | KEEP_SIZE)`.
pub(crate) fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    if len == 0 {
        return Ok(());
    }
    // SAFETY: fallocate only reads its integer arguments; the fd is owned by `file`.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
