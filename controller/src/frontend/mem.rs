//! [`MemBackend`]: an in-memory sparse [`Backend`] for tests and demos.
//!
//! Blocks of [`BLOCK_SIZE`] live in a `BTreeMap` keyed by block index; a
//! block that is not in the map is a hole (reads as zeros). Trim and
//! write-zeroes with `may_punch` remove blocks; write-zeroes without it
//! stores zero blocks (allocated). Like a real volume it insists on
//! aligned ranges inside the device, so tests notice when the server
//! forwards an unaligned request. Counters and error injection let tests
//! see what the server asked for.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use strata_replica::{Allocation, AllocationExtent};

use super::{Backend, BackendError, BLOCK_SIZE};

const BS: usize = BLOCK_SIZE as usize;

/// Which calls [`MemBackend::fail_with`] makes fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailOn {
    Reads,
    Writes,
    All,
}

/// Calls seen, for tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MemStats {
    pub reads: u64,
    pub writes: u64,
    pub fua_writes: u64,
    pub flushes: u64,
    pub trims: u64,
    pub zeroes: u64,
}

#[derive(Default)]
struct Counters {
    reads: AtomicU64,
    writes: AtomicU64,
    fua_writes: AtomicU64,
    flushes: AtomicU64,
    trims: AtomicU64,
    zeroes: AtomicU64,
}

/// An in-memory sparse block device.
pub struct MemBackend {
    name: String,
    size: u64,
    blocks: Mutex<BTreeMap<u64, Box<[u8]>>>,
    fail: Mutex<Option<(FailOn, BackendError)>>,
    counters: Counters,
}

impl MemBackend {
    /// A device of `size` bytes (rounded down to [`BLOCK_SIZE`]), all holes.
    pub fn new(name: impl Into<String>, size: u64) -> Self {
        MemBackend {
            name: name.into(),
            size: size - size % BLOCK_SIZE,
            blocks: Mutex::new(BTreeMap::new()),
            fail: Mutex::new(None),
            counters: Counters::default(),
        }
    }

    /// Makes later calls of the given kind fail with `err` (`None` heals).
    pub fn fail_with(&self, fail: Option<(FailOn, BackendError)>) {
        *self.fail.lock() = fail;
    }

    /// Number of allocated blocks.
    pub fn allocated_blocks(&self) -> usize {
        self.blocks.lock().len()
    }

    pub fn stats(&self) -> MemStats {
        let c = &self.counters;
        MemStats {
            reads: c.reads.load(Ordering::Relaxed),
            writes: c.writes.load(Ordering::Relaxed),
            fua_writes: c.fua_writes.load(Ordering::Relaxed),
            flushes: c.flushes.load(Ordering::Relaxed),
            trims: c.trims.load(Ordering::Relaxed),
            zeroes: c.zeroes.load(Ordering::Relaxed),
        }
    }

    fn injected(&self, write: bool) -> Result<(), BackendError> {
        match &*self.fail.lock() {
            Some((FailOn::All, e)) => Err(e.clone()),
            Some((FailOn::Writes, e)) if write => Err(e.clone()),
            Some((FailOn::Reads, e)) if !write => Err(e.clone()),
            _ => Ok(()),
        }
    }

    /// Checks alignment and bounds; returns the block range `[b0, b1)`.
    fn range(&self, op: &str, offset: u64, len: u64) -> Result<(u64, u64), BackendError> {
        if !offset.is_multiple_of(BLOCK_SIZE) || !len.is_multiple_of(BLOCK_SIZE) {
            return Err(BackendError::Invalid(format!(
                "{op} at offset {offset} length {len} is not {BLOCK_SIZE}-aligned"
            )));
        }
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok((offset / BLOCK_SIZE, end / BLOCK_SIZE)),
            _ => Err(BackendError::Invalid(format!(
                "{op} at offset {offset} length {len} is beyond the size {}",
                self.size
            ))),
        }
    }

    fn read_now(&self, offset: u64, len: u32) -> Result<Bytes, BackendError> {
        self.counters.reads.fetch_add(1, Ordering::Relaxed);
        self.injected(false)?;
        let (b0, b1) = self.range("read", offset, len as u64)?;
        let mut out = BytesMut::zeroed(len as usize);
        let blocks = self.blocks.lock();
        for (&b, data) in blocks.range(b0..b1) {
            let at = ((b - b0) as usize) * BS;
            out[at..at + BS].copy_from_slice(data);
        }
        Ok(out.freeze())
    }

    fn write_now(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), BackendError> {
        self.counters.writes.fetch_add(1, Ordering::Relaxed);
        if fua {
            self.counters.fua_writes.fetch_add(1, Ordering::Relaxed);
        }
        self.injected(true)?;
        let (b0, _) = self.range("write", offset, data.len() as u64)?;
        let mut blocks = self.blocks.lock();
        for (i, chunk) in data.chunks_exact(BS).enumerate() {
            blocks.insert(b0 + i as u64, chunk.into());
        }
        Ok(())
    }

    fn punch(&self, op: &str, offset: u64, len: u32) -> Result<(), BackendError> {
        let (b0, b1) = self.range(op, offset, len as u64)?;
        let mut blocks = self.blocks.lock();
        let doomed: Vec<u64> = blocks.range(b0..b1).map(|(&b, _)| b).collect();
        for b in doomed {
            blocks.remove(&b);
        }
        Ok(())
    }

    fn zero_now(&self, offset: u64, len: u32, may_punch: bool) -> Result<(), BackendError> {
        self.counters.zeroes.fetch_add(1, Ordering::Relaxed);
        self.injected(true)?;
        if may_punch {
            return self.punch("write_zeroes", offset, len);
        }
        let (b0, b1) = self.range("write_zeroes", offset, len as u64)?;
        let mut blocks = self.blocks.lock();
        for b in b0..b1 {
            blocks.insert(b, vec![0u8; BS].into_boxed_slice());
        }
        Ok(())
    }

    fn status_now(&self, offset: u64, len: u32) -> Result<Vec<AllocationExtent>, BackendError> {
        self.injected(false)?;
        let (b0, b1) = self.range("block_status", offset, len as u64)?;
        let blocks = self.blocks.lock();
        let mut out: Vec<AllocationExtent> = Vec::new();
        let mut push = |start: u64, end: u64, kind: Allocation| {
            if start == end {
                return;
            }
            match out.last_mut() {
                Some(last) if last.kind == kind && last.offset + last.len == start * BLOCK_SIZE => {
                    last.len += (end - start) * BLOCK_SIZE;
                }
                _ => out.push(AllocationExtent {
                    offset: start * BLOCK_SIZE,
                    len: (end - start) * BLOCK_SIZE,
                    kind,
                }),
            }
        };
        let mut at = b0;
        for (&b, _) in blocks.range(b0..b1) {
            push(at, b, Allocation::Hole);
            push(b, b + 1, Allocation::Data);
            at = b + 1;
        }
        push(at, b1, Allocation::Hole);
        Ok(out)
    }
}

impl Backend for MemBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn volume_name(&self) -> &str {
        &self.name
    }

    fn read(
        &self,
        offset: u64,
        len: u32,
    ) -> impl Future<Output = Result<Bytes, BackendError>> + Send {
        std::future::ready(self.read_now(offset, len))
    }

    fn write(
        &self,
        offset: u64,
        data: Bytes,
        fua: bool,
    ) -> impl Future<Output = Result<(), BackendError>> + Send {
        std::future::ready(self.write_now(offset, &data, fua))
    }

    fn flush(&self) -> impl Future<Output = Result<(), BackendError>> + Send {
        self.counters.flushes.fetch_add(1, Ordering::Relaxed);
        std::future::ready(self.injected(true))
    }

    fn trim(&self, offset: u64, len: u32) -> impl Future<Output = Result<(), BackendError>> + Send {
        self.counters.trims.fetch_add(1, Ordering::Relaxed);
        std::future::ready(
            self.injected(true)
                .and_then(|()| self.punch("trim", offset, len)),
        )
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        may_punch: bool,
        _fua: bool,
    ) -> impl Future<Output = Result<(), BackendError>> + Send {
        std::future::ready(self.zero_now(offset, len, may_punch))
    }

    fn block_status(
        &self,
        offset: u64,
        len: u32,
    ) -> impl Future<Output = Result<Vec<AllocationExtent>, BackendError>> + Send {
        std::future::ready(self.status_now(offset, len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(offset: u64, len: u64, kind: Allocation) -> AllocationExtent {
        AllocationExtent { offset, len, kind }
    }

    #[tokio::test]
    async fn sparse_read_write_trim_zero_status() {
        let m = MemBackend::new("t", 64 * 1024 + 100);
        assert_eq!(m.size(), 64 * 1024);
        assert_eq!(m.read(0, 8192).await.unwrap(), vec![0u8; 8192]);
        m.write(8192, Bytes::from(vec![7u8; 8192]), true)
            .await
            .unwrap();
        let r = m.read(4096, 16384).await.unwrap();
        assert!(r[..4096].iter().all(|&b| b == 0));
        assert!(r[4096..12288].iter().all(|&b| b == 7));
        assert!(r[12288..].iter().all(|&b| b == 0));
        assert_eq!(
            m.block_status(0, 65536).await.unwrap(),
            vec![
                ext(0, 8192, Allocation::Hole),
                ext(8192, 8192, Allocation::Data),
                ext(16384, 49152, Allocation::Hole)
            ]
        );
        m.trim(8192, 4096).await.unwrap();
        m.write_zeroes(20480, 8192, false, false).await.unwrap();
        assert_eq!(
            m.block_status(4096, 40960).await.unwrap(),
            vec![
                ext(4096, 8192, Allocation::Hole),
                ext(12288, 4096, Allocation::Data),
                ext(16384, 4096, Allocation::Hole),
                ext(20480, 8192, Allocation::Data),
                ext(28672, 16384, Allocation::Hole)
            ]
        );
        m.write_zeroes(20480, 8192, true, false).await.unwrap();
        assert_eq!(m.allocated_blocks(), 1);
        let s = m.stats();
        assert_eq!((s.writes, s.fua_writes, s.trims, s.zeroes), (1, 1, 1, 2));
    }

    #[tokio::test]
    async fn refuses_unaligned_and_out_of_range() {
        let m = MemBackend::new("t", 1 << 20);
        assert!(matches!(
            m.read(1, 4096).await,
            Err(BackendError::Invalid(_))
        ));
        assert!(matches!(
            m.read(0, 4095).await,
            Err(BackendError::Invalid(_))
        ));
        assert!(matches!(
            m.read(1 << 20, 4096).await,
            Err(BackendError::Invalid(_))
        ));
        assert!(matches!(
            m.write(u64::MAX - 4095, Bytes::from(vec![0; 4096]), false)
                .await,
            Err(BackendError::Invalid(_))
        ));
        assert!(matches!(
            m.trim(0, 100).await,
            Err(BackendError::Invalid(_))
        ));
    }

    #[tokio::test]
    async fn injected_failures() {
        let m = MemBackend::new("t", 1 << 20);
        m.fail_with(Some((
            FailOn::Writes,
            BackendError::Fenced("epoch 3".into()),
        )));
        assert!(m.read(0, 4096).await.is_ok());
        let err = m
            .write(0, Bytes::from(vec![1; 4096]), false)
            .await
            .unwrap_err();
        assert_eq!(err, BackendError::Fenced("epoch 3".into()));
        m.fail_with(None);
        assert!(m.write(0, Bytes::from(vec![1; 4096]), false).await.is_ok());
    }
}
