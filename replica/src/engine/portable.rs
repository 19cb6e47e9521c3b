//! The portable engine: one `pread`/`pwrite`/`fdatasync`/`fallocate` per op.

use std::io;
use std::os::unix::fs::FileExt;

use super::{punch_hole, BatchError, IoEngine, IoOp};

/// Runs each op with a plain syscall, in order. Works on every kernel.
#[derive(Debug, Default, Clone, Copy)]
pub struct PortableEngine;

impl IoEngine for PortableEngine {
    fn name(&self) -> &'static str {
        "portable"
    }

    fn submit(&self, ops: &mut [IoOp<'_>]) -> Result<(), BatchError> {
        for (index, op) in ops.iter_mut().enumerate() {
            run_one(op).map_err(|source| BatchError { index, source })?;
        }
        Ok(())
    }
}

pub(crate) fn run_one(op: &mut IoOp<'_>) -> io::Result<()> {
    match op {
        IoOp::Read { file, offset, buf } => read_full_at(file, buf, *offset),
        IoOp::Write { file, offset, buf } => file.write_all_at(buf, *offset),
        IoOp::SyncData { file } => file.sync_data(),
        IoOp::PunchHole { file, offset, len } => punch_hole(file, *offset, *len),
    }
}

/// Reads until `buf` is full; past end of file the rest is zero-filled.
pub(crate) fn read_full_at(file: &std::fs::File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => {
                buf[done..].fill(0);
                return Ok(());
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Runs the `Read` ops of a batch from the page cache only
/// (`preadv2(RWF_NOWAIT)`): `Ok(false)` as soon as one would have to wait
/// for the disk (or is cut short, e.g. at end of file, which the blocking
/// path handles), and the buffers then hold nothing useful. Other ops are
/// not allowed here. A kernel without `RWF_NOWAIT` answers "would block"
/// every time, so callers always fall back to the blocking read.
pub(crate) fn read_nowait(ops: &mut [IoOp<'_>]) -> Result<bool, BatchError> {
    use std::os::fd::AsRawFd;
    for (index, op) in ops.iter_mut().enumerate() {
        let IoOp::Read { file, offset, buf } = op else {
            let source = io::Error::new(io::ErrorKind::InvalidInput, "read_nowait takes reads");
            return Err(BatchError { index, source });
        };
        let iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        loop {
            let n = preadv2_nowait(file.as_raw_fd(), &iov, *offset);
            if n >= 0 {
                if n as usize != buf.len() {
                    return Ok(false);
                }
                break;
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN)
                | Some(libc::EOPNOTSUPP)
                | Some(libc::EINVAL)
                | Some(libc::ENOSYS) => return Ok(false),
                _ => return Err(BatchError { index, source: e }),
            }
        }
    }
    Ok(true)
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn preadv2_nowait(fd: libc::c_int, iov: &libc::iovec, offset: u64) -> isize {
    // SAFETY: `iov` points into a buffer the caller borrows mutably for the
    // call; `fd` is open.
    unsafe { libc::preadv2(fd, iov, 1, offset as libc::off_t, libc::RWF_NOWAIT) }
}

/// Other C libraries: no `preadv2` binding, so every read "would block".
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn preadv2_nowait(_fd: libc::c_int, _iov: &libc::iovec, _offset: u64) -> isize {
    // SAFETY: sets the calling thread's errno.
    unsafe { *libc::__errno_location() = libc::EAGAIN };
    -1
}
