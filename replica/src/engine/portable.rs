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
