//! [`Export`]: one backend as all connections share it, and the data
//! operations on it after a request is validated.
//!
//! Backends take block-aligned ranges only; clients are told the minimum
//! block size is 4096 but may send smaller requests anyway (or never ask).
//! Here an unaligned READ reads the covering aligned range and returns the
//! slice asked for; an unaligned WRITE reads the partial edge blocks,
//! patches them and writes the covering range back (read-modify-write);
//! WRITE_ZEROES zeroes the aligned middle with the backend and the edges
//! by read-modify-write; TRIM, being advisory, only discards the whole
//! blocks inside the range. Read-modify-write holds a lock on its edge
//! blocks, shared by every connection of the export, so two unaligned
//! writes to different bytes of one block never undo each other.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use strata_replica::{Allocation, AllocationExtent};
use tokio::sync::{Mutex, MutexGuard};

use super::handshake::ExportFacts;
use super::proto::{BlockDescriptor, NBD_STATE_HOLE, NBD_STATE_ZERO};
use crate::frontend::{Backend, BackendError, BLOCK_SIZE};

/// Lock stripes for read-modify-write (a block maps to `index % STRIPES`).
const STRIPES: usize = 256;
/// Most extents sent in one block status reply.
pub const MAX_DESCRIPTORS: usize = 16 * 1024;

fn align_down(x: u64) -> u64 {
    x - x % BLOCK_SIZE
}

/// Rounds up; callers only pass values at most the (aligned) export size,
/// so this cannot overflow.
fn align_up(x: u64) -> u64 {
    align_down(x.saturating_add(BLOCK_SIZE - 1))
}

fn aligned(x: u64) -> bool {
    x.is_multiple_of(BLOCK_SIZE)
}

/// One exported backend, shared by all its connections.
pub struct Export<B> {
    backend: Arc<B>,
    name: String,
    stripes: Vec<Mutex<()>>,
}

impl<B: Backend> Export<B> {
    pub fn new(backend: Arc<B>) -> Arc<Self> {
        let name = backend.volume_name().to_owned();
        let stripes = (0..STRIPES).map(|_| Mutex::new(())).collect();
        Arc::new(Export {
            backend,
            name,
            stripes,
        })
    }

    pub fn backend(&self) -> &Arc<B> {
        &self.backend
    }

    /// The size now, rounded down to 4096 (no allocation: read per request).
    pub fn size(&self) -> u64 {
        align_down(self.backend.size())
    }

    /// Name and size as advertised now (size rounded down to 4096). Read
    /// at each handshake: a volume that grew shows its new size to new
    /// connections.
    pub fn facts(&self) -> ExportFacts {
        ExportFacts {
            name: self.name.clone(),
            size: align_down(self.backend.size()),
        }
    }

    /// Locks the stripes of the given blocks, in stripe order (no deadlock).
    async fn lock_blocks(&self, blocks: &[u64]) -> Vec<MutexGuard<'_, ()>> {
        let mut idx: Vec<usize> = blocks
            .iter()
            .map(|b| (b / BLOCK_SIZE % STRIPES as u64) as usize)
            .collect();
        idx.sort_unstable();
        idx.dedup();
        let mut guards = Vec::with_capacity(idx.len());
        for i in idx {
            guards.push(self.stripes[i].lock().await);
        }
        guards
    }

    async fn read_exact(&self, offset: u64, len: u64) -> Result<Bytes, BackendError> {
        let len32 = u32::try_from(len)
            .map_err(|_| BackendError::Invalid(format!("read of {len} bytes is too long")))?;
        let data = self.backend.read(offset, len32).await?;
        if data.len() as u64 != len {
            return Err(BackendError::Io(format!(
                "backend returned {} bytes for a read of {len} at offset {offset}",
                data.len()
            )));
        }
        Ok(data)
    }

    /// Reads `len` bytes at `offset` (validated to lie inside the export).
    pub async fn read(&self, offset: u64, len: u32) -> Result<Bytes, BackendError> {
        let end = offset + len as u64;
        if aligned(offset) && aligned(end) {
            return self.read_exact(offset, len as u64).await;
        }
        let (a0, a1) = (align_down(offset), align_up(end));
        let data = self.read_exact(a0, a1 - a0).await?;
        let at = (offset - a0) as usize;
        Ok(data.slice(at..at + len as usize))
    }

    /// Writes `data` at `offset` (validated), read-modify-write at unaligned edges.
    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), BackendError> {
        let end = offset + data.len() as u64;
        if (aligned(offset) && aligned(end)) || self.backend.handles_unaligned() {
            return self.backend.write(offset, data, fua).await;
        }
        self.patch(offset, Some(&data), end - offset, fua).await
    }

    /// Read-modify-write of `[offset, offset + len)` with `data` (zeros if
    /// `None`): reads the partial edge blocks under their locks, patches,
    /// writes the covering aligned range.
    async fn patch(
        &self,
        offset: u64,
        data: Option<&[u8]>,
        len: u64,
        fua: bool,
    ) -> Result<(), BackendError> {
        let end = offset + len;
        let (a0, a1) = (align_down(offset), align_up(end));
        let head = (!aligned(offset)).then_some(a0);
        let tail = (!aligned(end)).then_some(a1 - BLOCK_SIZE);
        let edges: Vec<u64> = head.iter().chain(tail.iter()).copied().collect();
        let _guards = self.lock_blocks(&edges).await;

        let mut buf = BytesMut::zeroed((a1 - a0) as usize);
        let bs = BLOCK_SIZE as usize;
        if a1 - a0 <= 2 * BLOCK_SIZE {
            // One or two blocks: both are edges, read them in one call.
            buf.copy_from_slice(&self.read_exact(a0, a1 - a0).await?);
        } else {
            if let Some(h) = head {
                buf[..bs].copy_from_slice(&self.read_exact(h, BLOCK_SIZE).await?);
            }
            if let Some(t) = tail {
                let at = (t - a0) as usize;
                buf[at..].copy_from_slice(&self.read_exact(t, BLOCK_SIZE).await?);
            }
        }
        let range = (offset - a0) as usize..(end - a0) as usize;
        match data {
            Some(d) => buf[range].copy_from_slice(d),
            None => buf[range].fill(0),
        }
        self.backend.write(a0, buf.freeze(), fua).await
    }

    /// Flushes every completed write, on any connection.
    pub async fn flush(&self) -> Result<(), BackendError> {
        self.backend.flush().await
    }

    /// Discards the whole blocks inside the range (advisory; the partial
    /// edges keep their data). With `fua`, flushes afterwards.
    pub async fn trim(&self, offset: u64, len: u32, fua: bool) -> Result<(), BackendError> {
        let (b0, b1) = (align_up(offset), align_down(offset + len as u64));
        if b1 > b0 {
            // b1 - b0 <= len, so it fits.
            self.backend.trim(b0, (b1 - b0) as u32).await?;
        }
        if fua {
            self.backend.flush().await?;
        }
        Ok(())
    }

    /// Zeroes the range: the aligned middle through the backend (holes
    /// allowed if `may_punch`), partial edges by read-modify-write.
    pub async fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        may_punch: bool,
        fua: bool,
    ) -> Result<(), BackendError> {
        let end = offset + len as u64;
        if self.backend.handles_unaligned() {
            return self.backend.write_zeroes(offset, len, may_punch, fua).await;
        }
        let (b0, b1) = (align_up(offset), align_down(end));
        if b1 <= b0 && !(aligned(offset) && aligned(end)) {
            // Within one block, or two partial blocks with nothing between.
            return self.patch(offset, None, len as u64, fua).await;
        }
        if offset < b0 {
            self.patch(offset, None, b0 - offset, fua).await?;
        }
        if b1 > b0 {
            self.backend
                .write_zeroes(b0, (b1 - b0) as u32, may_punch, fua)
                .await?;
        }
        if end > b1 {
            self.patch(b1, None, end - b1, fua).await?;
        }
        Ok(())
    }

    /// `base:allocation` descriptors for `[offset, offset + len)`.
    pub async fn block_status(
        &self,
        offset: u64,
        len: u32,
        req_one: bool,
    ) -> Result<Vec<BlockDescriptor>, BackendError> {
        let a0 = align_down(offset);
        let a1 = align_up(offset + len as u64);
        // Ask for at most what fits in a u32, aligned; replying with less is allowed.
        let q = (a1 - a0).min(align_down(u32::MAX as u64));
        let extents = self.backend.block_status(a0, q as u32).await?;
        let limit = if req_one { 1 } else { MAX_DESCRIPTORS };
        Ok(descriptors(&extents, offset, len, limit))
    }
}

fn state(kind: Allocation) -> u32 {
    match kind {
        Allocation::Data => 0,
        Allocation::Hole => NBD_STATE_HOLE | NBD_STATE_ZERO,
    }
}

/// Clips `extents` to `[offset, offset + len)` and turns them into at most
/// `limit` descriptors, merging neighbours of one kind. A range the backend
/// left out before its last extent is reported as data (always safe);
/// a shorter answer than asked is allowed; an empty one becomes one data
/// descriptor covering the request.
pub fn descriptors(
    extents: &[AllocationExtent],
    offset: u64,
    len: u32,
    limit: usize,
) -> Vec<BlockDescriptor> {
    let end = offset + len as u64;
    let mut out: Vec<BlockDescriptor> = Vec::new();
    let push = |out: &mut Vec<BlockDescriptor>, len: u64, flags: u32| match out.last_mut() {
        Some(last) if last.flags == flags => last.len += len as u32,
        _ => out.push(BlockDescriptor {
            len: len as u32,
            flags,
        }),
    };
    let mut at = offset;
    for e in extents {
        let (s, t) = (e.offset, e.offset.saturating_add(e.len));
        if t <= at || e.len == 0 {
            continue;
        }
        if s >= end {
            break;
        }
        if s > at {
            push(&mut out, s - at, 0);
            at = s;
        }
        let t = t.min(end);
        push(&mut out, t - at, state(e.kind));
        at = t;
        if at >= end {
            break;
        }
    }
    if out.is_empty() {
        out.push(BlockDescriptor { len, flags: 0 });
    }
    out.truncate(limit.max(1));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frontend::mem::MemBackend;

    const HZ: u32 = NBD_STATE_HOLE | NBD_STATE_ZERO;

    fn ext(offset: u64, len: u64, kind: Allocation) -> AllocationExtent {
        AllocationExtent { offset, len, kind }
    }

    fn d(len: u32, flags: u32) -> BlockDescriptor {
        BlockDescriptor { len, flags }
    }

    #[test]
    fn descriptors_clip_merge_and_fill_gaps() {
        use Allocation::*;
        let e = [
            ext(0, 4096, Hole),
            ext(4096, 4096, Hole),
            ext(8192, 8192, Data),
            ext(20480, 4096, Hole),
        ];
        // The gap at 16384 is reported as data and merges with its neighbour.
        assert_eq!(
            descriptors(&e, 0, 24576, 100),
            [d(8192, HZ), d(12288, 0), d(4096, HZ)]
        );
        // Unaligned request: clipped on both sides.
        assert_eq!(descriptors(&e, 100, 8192, 100), [d(8092, HZ), d(100, 0)]);
        assert_eq!(descriptors(&e, 0, 24576, 1), [d(8192, HZ)]);
        assert_eq!(descriptors(&[], 0, 512, 100), [d(512, 0)]);
        // Extents past the range or empty are ignored; short answers stay short.
        assert_eq!(
            descriptors(&[ext(0, 0, Data), ext(0, 4096, Hole)], 0, 8192, 9),
            [d(4096, HZ)]
        );
        assert_eq!(
            descriptors(&[ext(8192, 4096, Hole)], 0, 4096, 9),
            [d(4096, 0)]
        );
        // Overlapping or unsorted extents from a buggy backend do not break anything.
        let weird = [
            ext(4096, 4096, Hole),
            ext(0, 8192, Data),
            ext(u64::MAX, 5, Hole),
        ];
        let got = descriptors(&weird, 0, 8192, 9);
        assert_eq!(got.iter().map(|x| x.len as u64).sum::<u64>(), 8192);
    }

    fn export() -> Arc<Export<MemBackend>> {
        Export::new(Arc::new(MemBackend::new("t", 1 << 20)))
    }

    #[tokio::test]
    async fn unaligned_write_is_read_modify_write() {
        let x = export();
        x.write(0, Bytes::from(vec![1u8; 16384]), false)
            .await
            .unwrap();
        x.write(4000, Bytes::from(vec![2u8; 200]), false)
            .await
            .unwrap();
        x.write(8191, Bytes::from(vec![3u8; 4098]), true)
            .await
            .unwrap();
        let r = x.read(0, 16384).await.unwrap();
        let mut want = vec![1u8; 16384];
        want[4000..4200].fill(2);
        want[8191..12289].fill(3);
        assert_eq!(&r[..], &want[..]);
        assert_eq!(&x.read(4001, 3).await.unwrap()[..], &[2, 2, 2]);
        assert_eq!(x.backend().stats().fua_writes, 1);
    }

    #[tokio::test]
    async fn concurrent_unaligned_writes_to_one_block_both_land() {
        let x = export();
        let mut tasks = Vec::new();
        for i in 0..8u64 {
            let x = x.clone();
            tasks.push(tokio::spawn(async move {
                x.write(i * 512, Bytes::from(vec![i as u8 + 1; 512]), false)
                    .await
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let r = x.read(0, 4096).await.unwrap();
        for i in 0..8usize {
            assert!(r[i * 512..(i + 1) * 512].iter().all(|&b| b == i as u8 + 1));
        }
    }

    #[tokio::test]
    async fn write_zeroes_and_trim_at_unaligned_edges() {
        let x = export();
        x.write(0, Bytes::from(vec![9u8; 32768]), false)
            .await
            .unwrap();
        x.write_zeroes(1000, 20000, true, false).await.unwrap();
        let r = x.read(0, 32768).await.unwrap();
        assert!(r[..1000].iter().all(|&b| b == 9));
        assert!(r[1000..21000].iter().all(|&b| b == 0));
        assert!(r[21000..].iter().all(|&b| b == 9));
        // Blocks 1..5 were punched; 0 and 5 hold data.
        let st = x.block_status(0, 32768, false).await.unwrap();
        assert_eq!(st, [d(4096, 0), d(16384, HZ), d(12288, 0)]);
        // Within one block.
        x.write_zeroes(24577, 10, false, false).await.unwrap();
        assert!(x.read(24576, 12).await.unwrap()[1..11]
            .iter()
            .all(|&b| b == 0));

        // Trim only discards whole blocks inside the range.
        x.trim(28000, 4096 + 500, false).await.unwrap();
        assert_eq!(x.backend().stats().trims, 0, "no whole block inside");
        x.trim(24000, 9000, true).await.unwrap();
        let st = x.block_status(24576, 8192, false).await.unwrap();
        assert_eq!(st, [d(8192, HZ)]);
        assert!(x.backend().stats().flushes >= 1);
    }
}
