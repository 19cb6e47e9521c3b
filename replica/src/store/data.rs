//! The data path: read, write, trim, write-zeroes, flush, and block status.

use std::sync::atomic::Ordering;

use super::verify::check_blocks;
use super::{mark, Maps, Source, State, Store, WriteClass};
use crate::engine::IoOp;
use crate::error::{Result, StoreError};
use crate::layer::{BlockKind, MapEntry, ENTRY_LEN};
use crate::BLOCK_SIZE;

const BS: usize = BLOCK_SIZE as usize;
/// Attempts for a read whose checksum disagrees, in case it raced a write or
/// trim of the same blocks; a real mismatch persists.
const READ_ATTEMPTS: usize = 3;
/// Block-map entries written per syscall when filling large ranges.
const FILL_CHUNK_ENTRIES: u64 = 64 * 1024;

/// How a range of the head view is backed, for NBD block status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allocation {
    /// Written data.
    Data,
    /// Reads as zeros and holds no data (trimmed or never written).
    Hole,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllocationExtent {
    pub offset: u64,
    pub len: u64,
    pub kind: Allocation,
}

/// Data is written to the page cache in pieces of at most this many bytes.
/// The kernel sizes a new page-cache folio by the write that creates it,
/// and every later 4 KiB write into a folio walks all of the folio's
/// blocks (ext4 `block_write_begin`, and again at writeback): a volume
/// filled with 1 MiB writes then takes 4 KiB random writes at a third of
/// the rate of one filled with small writes. Smaller pieces make large
/// sequential overwrites dearer instead (more folios per MiB): 32 KiB kept
/// 4 KiB random writes within 5% of 16 KiB pieces and made 1 MiB
/// sequential overwrites 12% faster (BENCHMARKS.md, session 5).
fn write_chunk() -> usize {
    static CHUNK: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CHUNK.get_or_init(|| {
        std::env::var("STRATA_WRITE_CHUNK")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|&n| n >= BS && n % BS == 0)
            .unwrap_or(32 * 1024)
    })
}

/// A resolved piece of a read: blocks `[start, end)` come from `source`
/// (`None`: nothing is written there, zeros).
pub(crate) type Segment = (u64, u64, Option<Source>);

impl Store {
    /// Reads `buf.len()` bytes of the current volume (the head view) at
    /// `offset`. Both must be multiples of 4096. Every block read from a
    /// layer is checked against its stored crc32.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let st = self.state.read();
        let (b0, b1) = self.check_range(st.meta.size, offset, buf.len() as u64)?;
        let mut attempt = 0;
        loop {
            let segments = {
                let maps = st.maps.lock();
                head_segments(&maps, b0, b1)
            };
            match self.read_segments(&st, &segments, b0, buf) {
                Err(StoreError::Checksum { .. }) if attempt + 1 < READ_ATTEMPTS => attempt += 1,
                other => return other,
            }
        }
    }

    /// [`Store::read`] for a copy (a rebuild's source): the pages the read
    /// brought into the page cache are dropped after it, so copying a
    /// whole replica does not push out what the applications' reads keep
    /// cached. A range that was cached whole is read from the cache and
    /// left there; one cached in part is read and then dropped whole.
    pub fn read_for_copy(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        if self.read_cached(offset, buf)? {
            return Ok(());
        }
        self.read_for_copy_uncached(offset, buf)
    }

    /// The second half of [`Store::read_for_copy`], for a caller whose own
    /// [`Store::read_cached`] declined: reads, then drops the range from
    /// the page cache. (Trying the cache again would find the pages the
    /// declined try's readahead brought in, and keep them.)
    pub fn read_for_copy_uncached(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.read(offset, buf)?;
        let st = self.state.read();
        let b0 = offset / BLOCK_SIZE;
        let b1 = b0 + buf.len() as u64 / BLOCK_SIZE;
        let segments = {
            let maps = st.maps.lock();
            head_segments(&maps, b0, b1)
        };
        for (s, e, src) in segments {
            if let Some(Source::Layer(pos)) = src {
                let file = &st.layers[pos as usize].data;
                drop_cached(file, s * BLOCK_SIZE, (e - s) * BLOCK_SIZE);
            }
        }
        Ok(())
    }

    /// [`Store::read`] if it can be done without waiting: every block it
    /// needs is in the page cache and no chain change holds the store.
    /// `Ok(false)` means "would block" and `buf` holds nothing useful; the
    /// caller then reads with [`Store::read`] on a thread that may wait.
    /// Lets a server answer cached reads without a thread hand-off.
    pub fn read_cached(&self, offset: u64, buf: &mut [u8]) -> Result<bool> {
        let Some(st) = self.state.try_read() else {
            return Ok(false);
        };
        let (b0, b1) = self.check_range(st.meta.size, offset, buf.len() as u64)?;
        let segments = {
            let maps = st.maps.lock();
            head_segments(&maps, b0, b1)
        };
        match self.read_segments_with(&st, &segments, b0, buf, true) {
            // A mismatch may be a race with a write: the blocking read retries.
            Err(StoreError::Checksum { .. }) => Ok(false),
            other => other,
        }
    }

    /// Reads `segments` (covering `[b0, b0 + buf.len()/4096)` in order) into
    /// `buf`, verifying checksums.
    pub(crate) fn read_segments(
        &self,
        st: &State,
        segments: &[Segment],
        b0: u64,
        buf: &mut [u8],
    ) -> Result<()> {
        self.read_segments_with(st, segments, b0, buf, false)
            .map(drop)
    }

    /// [`Store::read_segments`]; with `nowait`, from the page cache only,
    /// `Ok(false)` if a page is not cached.
    fn read_segments_with(
        &self,
        st: &State,
        segments: &[Segment],
        b0: u64,
        buf: &mut [u8],
        nowait: bool,
    ) -> Result<bool> {
        let data_blocks: u64 = segments
            .iter()
            .filter(|s| matches!(s.2, Some(Source::Layer(_))))
            .map(|s| s.1 - s.0)
            .sum();
        let mut entries = vec![0u8; (data_blocks * ENTRY_LEN) as usize];
        {
            let mut ops = Vec::with_capacity(segments.len() * 2);
            let mut rest_buf: &mut [u8] = buf;
            let mut rest_entries: &mut [u8] = &mut entries;
            let mut cursor = b0;
            for &(s, e, src) in segments {
                debug_assert_eq!(s, cursor);
                let (chunk, tail) = rest_buf.split_at_mut(((e - s) as usize) * BS);
                rest_buf = tail;
                cursor = e;
                match src {
                    Some(Source::Layer(pos)) => {
                        let layer = &st.layers[pos as usize];
                        let (ents, tail) =
                            rest_entries.split_at_mut(((e - s) * ENTRY_LEN) as usize);
                        rest_entries = tail;
                        ops.push(IoOp::Read {
                            file: &layer.data,
                            offset: s * BLOCK_SIZE,
                            buf: chunk,
                        });
                        ops.push(IoOp::Read {
                            file: &layer.map,
                            offset: s * ENTRY_LEN,
                            buf: ents,
                        });
                    }
                    _ => chunk.fill(0),
                }
            }
            let submitted = if nowait {
                crate::engine::read_nowait(&mut ops)
            } else {
                self.engine.submit(&mut ops).map(|()| true)
            };
            let complete = submitted.map_err(|e| {
                let op = &ops[e.index];
                let path = path_of(st, op);
                StoreError::io(op.name(), path, op.offset(), e.source)
            })?;
            if !complete {
                return Ok(false);
            }
        }
        if let Some(bad) = check_blocks(segments, b0, buf, &entries) {
            return Err(bad.into_error(st));
        }
        Ok(true)
    }

    /// Writes `buf` at `offset` into the head, as a client's write.
    /// Durable after [`Store::flush`]. Waits first while the store's
    /// unflushed bytes are at their bound (`writeback.rs`).
    pub fn write(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.write_as(WriteClass::Client, offset, buf)
    }

    /// [`Store::write`] for a write of `class`, which shares the bound on
    /// unflushed bytes with the other class (`writeback.rs`).
    pub fn write_as(&self, class: WriteClass, offset: u64, buf: &[u8]) -> Result<()> {
        self.check_usable()?;
        self.writeback.throttle(class);
        let _one_copy = (class == WriteClass::Copy).then(|| self.copy_writes.lock());
        let st = self.state.read();
        self.write_locked(&st, class, offset, buf)
    }

    /// [`Store::write_as`] unless a chain change holds the store or the
    /// write would wait for the bound on unflushed bytes: `Ok(false)` then,
    /// and nothing was written. A buffered write still waits for the kernel
    /// (page cache, block allocation), never for another request.
    pub fn write_unless_busy(&self, class: WriteClass, offset: u64, buf: &[u8]) -> Result<bool> {
        self.check_usable()?;
        if self.writeback.would_throttle(class) {
            return Ok(false);
        }
        let _one_copy = match class {
            WriteClass::Copy => match self.copy_writes.try_lock() {
                Some(guard) => Some(guard),
                None => return Ok(false),
            },
            WriteClass::Client => None,
        };
        let Some(st) = self.state.try_read() else {
            return Ok(false);
        };
        self.write_locked(&st, class, offset, buf).map(|()| true)
    }

    fn write_locked(&self, st: &State, class: WriteClass, offset: u64, buf: &[u8]) -> Result<()> {
        let (b0, b1) = self.check_range(st.meta.size, offset, buf.len() as u64)?;
        if b0 == b1 {
            return Ok(());
        }
        let mut entries = Vec::with_capacity(((b1 - b0) * ENTRY_LEN) as usize);
        for block in buf.chunks_exact(BS) {
            let entry = MapEntry::Data {
                crc: crc32fast::hash(block),
            };
            entries.extend_from_slice(&entry.encode().to_le_bytes());
        }
        let head_pos = st.head_pos();
        let head = &st.layers[head_pos];
        let chunk = write_chunk();
        let mut ops = Vec::with_capacity(buf.len().div_ceil(chunk) + 1);
        for (i, piece) in buf.chunks(chunk).enumerate() {
            ops.push(IoOp::Write {
                file: &head.data,
                offset: offset + (i * chunk) as u64,
                buf: piece,
            });
        }
        ops.push(IoOp::Write {
            file: &head.map,
            offset: b0 * ENTRY_LEN,
            buf: &entries,
        });
        self.engine.submit(&mut ops).map_err(|e| {
            let op = &ops[e.index];
            StoreError::io(op.name(), path_of(st, op), op.offset(), e.source)
        })?;
        mark(&self.head_dirty);
        self.writeback.note_write(
            class,
            head.id,
            &head.data_path,
            &head.map_path,
            buf.len() as u64,
        );
        let mut maps = st.maps.lock();
        maps.extents[head_pos].set(b0, b1, BlockKind::Data);
        maps.index.set(b0, b1, Source::layer(head_pos));
        Ok(())
    }

    /// Discards `[offset, offset + len)`: it reads back as zeros, even where
    /// an older snapshot holds data, and the head frees its space.
    pub fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.zero_range(offset, len, true)
    }

    /// Makes `[offset, offset + len)` read as zeros. With `may_punch` the
    /// space is freed as by [`Store::trim`]; without it, zero blocks are
    /// written so the range stays allocated (NBD's NO_HOLE).
    pub fn write_zeroes(&self, offset: u64, len: u64, may_punch: bool) -> Result<()> {
        self.zero_range(offset, len, may_punch)
    }

    fn zero_range(&self, offset: u64, len: u64, punch: bool) -> Result<()> {
        self.check_usable()?;
        let size = self.state.read().meta.size;
        let (b0, b1) = self.check_range(size, offset, len)?;
        if b0 == b1 {
            return Ok(());
        }
        if !punch {
            let zeros = vec![0u8; 1 << 20];
            let mut off = offset;
            while off < offset + len {
                let n = (offset + len - off).min(zeros.len() as u64);
                self.write(off, &zeros[..n as usize])?;
                off += n;
            }
            return Ok(());
        }
        let st = self.state.read();
        let head_pos = st.head_pos();
        // Where a lower layer has data, the head needs zero tombstones; where
        // nothing lies below, the head simply forgets the range.
        let (covered, uncovered) = {
            let mut maps = st.maps.lock();
            let mut below = crate::extent::RangeMap::new();
            for layer in &maps.extents[..head_pos] {
                for (s, e, kind) in layer.overlapping(b0, b1) {
                    if kind == BlockKind::Data {
                        below.set(s, e, ());
                    }
                }
            }
            let covered: Vec<(u64, u64)> = below.iter().map(|(s, e, _)| (s, e)).collect();
            let uncovered = below.gaps(b0, b1);
            // Index first: a concurrent read then sees zeros, or retries.
            for &(s, e) in &covered {
                maps.extents[head_pos].set(s, e, BlockKind::Zero);
                maps.index.set(s, e, Source::Zero);
            }
            for r in &uncovered {
                maps.extents[head_pos].clear(r.start, r.end);
                maps.index.clear(r.start, r.end);
            }
            (covered, uncovered)
        };
        let head = &st.layers[head_pos];
        let io_err = |op: &'static str, path: &std::path::Path, off: u64, e| {
            StoreError::io(op, path, off, e)
        };
        for &(s, e) in &covered {
            self.fill_map(&st, s, e, MapEntry::Zero)?;
        }
        for r in &uncovered {
            self.clear_map(&st, r.start, r.end)?;
        }
        let mut punch_op = [IoOp::PunchHole {
            file: &head.data,
            offset,
            len,
        }];
        self.engine
            .submit(&mut punch_op)
            .map_err(|e| io_err("punch hole", &head.data_path, offset, e.source))?;
        mark(&self.head_dirty);
        Ok(())
    }

    /// Writes `entry` for blocks `[b0, b1)` of the head's block map.
    fn fill_map(&self, st: &State, b0: u64, b1: u64, entry: MapEntry) -> Result<()> {
        let head = &st.layers[st.head_pos()];
        let raw = entry.encode().to_le_bytes();
        let chunk_entries = (b1 - b0).min(FILL_CHUNK_ENTRIES);
        let buf: Vec<u8> = raw
            .iter()
            .copied()
            .cycle()
            .take((chunk_entries * ENTRY_LEN) as usize)
            .collect();
        let mut b = b0;
        while b < b1 {
            let n = (b1 - b).min(chunk_entries);
            let mut op = [IoOp::Write {
                file: &head.map,
                offset: b * ENTRY_LEN,
                buf: &buf[..(n * ENTRY_LEN) as usize],
            }];
            self.engine
                .submit(&mut op)
                .map_err(|e| StoreError::io("write", &head.map_path, b * ENTRY_LEN, e.source))?;
            b += n;
        }
        Ok(())
    }

    /// Clears the head's block-map entries for `[b0, b1)`: punches whole
    /// pages of the map and writes zeros at the unaligned edges.
    fn clear_map(&self, st: &State, b0: u64, b1: u64) -> Result<()> {
        let head = &st.layers[st.head_pos()];
        let (start, end) = (b0 * ENTRY_LEN, b1 * ENTRY_LEN);
        let page = BLOCK_SIZE;
        let inner_start = start.div_ceil(page) * page;
        let inner_end = end / page * page;
        if inner_start < inner_end {
            let mut op = [IoOp::PunchHole {
                file: &head.map,
                offset: inner_start,
                len: inner_end - inner_start,
            }];
            self.engine
                .submit(&mut op)
                .map_err(|e| StoreError::io("punch hole", &head.map_path, inner_start, e.source))?;
            if start < inner_start {
                self.fill_map(st, b0, inner_start / ENTRY_LEN, MapEntry::Absent)?;
            }
            if inner_end < end {
                self.fill_map(st, inner_end / ENTRY_LEN, b1, MapEntry::Absent)?;
            }
            Ok(())
        } else {
            self.fill_map(st, b0, b1, MapEntry::Absent)
        }
    }

    /// Makes every write and trim completed before the call durable.
    pub fn flush(&self) -> Result<()> {
        self.check_usable()?;
        let st = self.state.read();
        if !self.head_dirty.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        let head = &st.layers[st.head_pos()];
        let token = self.writeback.before_flush();
        let mut ops = [
            IoOp::SyncData { file: &head.data },
            IoOp::SyncData { file: &head.map },
        ];
        let synced = self.engine.submit(&mut ops);
        self.writeback.flushed(token, synced.is_ok());
        if let Err(e) = synced {
            // After a failed fsync the kernel may have dropped the dirty
            // pages; a retry could report success for lost data. Refuse all
            // further writes instead.
            self.poison("flush");
            let op = &ops[e.index];
            return Err(StoreError::io("fdatasync", path_of(&st, op), 0, e.source));
        }
        Ok(())
    }

    /// Block status of the head view over `[offset, offset + len)`:
    /// consecutive extents of data or holes covering the whole range.
    /// One BLAKE3 digest per `region` bytes of `[offset, offset + len)` of
    /// the live volume: over the data where there is data and over the
    /// extent of each hole, so equal digests mean equal contents (a hole
    /// and written zeros digest differently: comparing them costs a copy,
    /// never a miss). A region whose data fails its checksum gets a digest
    /// of all 0xFF bytes, which no real region has.
    pub fn region_digests(&self, offset: u64, len: u64, region: u64) -> Result<Vec<[u8; 32]>> {
        const PIECE: u64 = 1 << 20;
        let size = self.size();
        self.check_range(size, offset, len)?;
        let mut out = Vec::with_capacity(len.div_ceil(region.max(1)) as usize);
        let mut buf = vec![0u8; PIECE as usize];
        let mut start = offset;
        while start < offset + len {
            let n = region.min(offset + len - start);
            let mut h = blake3::Hasher::new();
            let mut corrupt = false;
            'region: for ext in self.allocation(start, n)? {
                match ext.kind {
                    Allocation::Data => {
                        h.update(b"D");
                        h.update(&ext.offset.to_le_bytes());
                        let mut at = ext.offset;
                        while at < ext.offset + ext.len {
                            let m = PIECE.min(ext.offset + ext.len - at) as usize;
                            match self.read(at, &mut buf[..m]) {
                                Ok(()) => {
                                    h.update(&buf[..m]);
                                }
                                Err(e) if e.is_corruption() => {
                                    corrupt = true;
                                    break 'region;
                                }
                                Err(e) => return Err(e),
                            }
                            at += m as u64;
                        }
                    }
                    Allocation::Hole => {
                        h.update(b"H");
                        h.update(&ext.offset.to_le_bytes());
                        h.update(&ext.len.to_le_bytes());
                    }
                }
            }
            out.push(if corrupt {
                [0xff; 32]
            } else {
                *h.finalize().as_bytes()
            });
            start += n;
        }
        Ok(out)
    }

    pub fn allocation(&self, offset: u64, len: u64) -> Result<Vec<AllocationExtent>> {
        let st = self.state.read();
        let (b0, b1) = self.check_range(st.meta.size, offset, len)?;
        let maps = st.maps.lock();
        let mut out: Vec<AllocationExtent> = Vec::new();
        for (s, e, src) in head_segments(&maps, b0, b1) {
            let kind = match src {
                Some(Source::Layer(_)) => Allocation::Data,
                _ => Allocation::Hole,
            };
            match out.last_mut() {
                Some(last) if last.kind == kind => last.len += (e - s) * BLOCK_SIZE,
                _ => out.push(AllocationExtent {
                    offset: s * BLOCK_SIZE,
                    len: (e - s) * BLOCK_SIZE,
                    kind,
                }),
            }
        }
        Ok(out)
    }
}

/// The head view of `[b0, b1)` as consecutive segments.
pub(crate) fn head_segments(maps: &Maps, b0: u64, b1: u64) -> Vec<Segment> {
    let mut out = Vec::with_capacity(4);
    let mut cursor = b0;
    for (s, e, src) in maps.index.overlapping(b0, b1) {
        if s > cursor {
            out.push((cursor, s, None));
        }
        out.push((s, e, Some(src)));
        cursor = e;
    }
    if cursor < b1 {
        out.push((cursor, b1, None));
    }
    out
}

fn path_of(st: &State, op: &IoOp<'_>) -> std::path::PathBuf {
    use std::os::fd::AsRawFd;
    let fd = match op {
        IoOp::Read { file, .. }
        | IoOp::Write { file, .. }
        | IoOp::SyncData { file }
        | IoOp::PunchHole { file, .. } => file.as_raw_fd(),
    };
    for l in &st.layers {
        if l.data.as_raw_fd() == fd {
            return l.data_path.clone();
        }
        if l.map.as_raw_fd() == fd {
            return l.map_path.clone();
        }
    }
    std::path::PathBuf::from("<unknown file>")
}

/// Asks the kernel to drop `[offset, offset + len)` of `file` from the page
/// cache (clean pages go at once; dirty ones are left to writeback). Only
/// advice: a failure changes nothing but the cache, so it is ignored.
fn drop_cached(file: &std::fs::File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: posix_fadvise on a descriptor the store keeps open; it reads
    // no memory of ours.
    unsafe {
        libc::posix_fadvise(
            file.as_raw_fd(),
            offset as libc::off_t,
            len as libc::off_t,
            libc::POSIX_FADV_DONTNEED,
        );
    }
}
