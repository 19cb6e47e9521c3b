//! Chain operations: snapshot, list, revert, delete (merge), expand, and the
//! readers over a snapshot's contents and over ranges changed between two
//! snapshots.

use std::ops::Range;

use super::data::{Allocation, AllocationExtent, Segment};
use super::{mark, Maps, Source, State, Store};
use crate::engine::IoOp;
use crate::error::{Result, StoreError};
use crate::extent::RangeMap;
use crate::layer::{BlockKind, LayerFiles, MapEntry, ENTRY_LEN};
use crate::meta::{self, LayerMeta, SnapshotMeta};
use crate::BLOCK_SIZE;

/// Blocks merged per exclusive-lock section when deleting a snapshot, so
/// client IO interleaves with a long merge.
const MERGE_CHUNK_BLOCKS: u64 = 256;

/// Which state of the volume to read.
#[derive(Debug, Clone, Copy)]
pub enum View<'a> {
    /// The live volume.
    Head,
    /// A snapshot, as it was when taken.
    Snapshot(&'a str),
}

/// A snapshot in the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub name: String,
    /// Seconds since the Unix epoch.
    pub created: u64,
    /// Bytes the layer's files occupy on disk (data written while it was the
    /// head, plus its block map).
    pub allocated: u64,
    /// The volume's size when the snapshot was taken.
    pub size: u64,
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `[A-Za-z0-9._-]{1,64}`: the names a snapshot may have.
pub fn valid_snapshot_name(name: &str) -> bool {
    valid_name(name)
}

fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn position(st: &State, name: &str) -> Result<usize> {
    st.meta
        .layers
        .iter()
        .position(|l| l.snapshot.as_ref().is_some_and(|s| s.name == name))
        .ok_or_else(|| StoreError::NoSuchSnapshot(name.to_string()))
}

impl Store {
    /// Freezes the head as snapshot `name` and starts a new empty head. The
    /// snapshot holds every write completed before the call.
    pub fn snapshot(&self, name: &str) -> Result<()> {
        self.check_usable()?;
        if !valid_name(name) {
            return Err(StoreError::InvalidName(name.to_string()));
        }
        let _control = self.control.lock();
        let mut st = self.state.write();
        if position(&st, name).is_ok() {
            return Err(StoreError::SnapshotExists(name.to_string()));
        }
        let result = self.snapshot_locked(&mut st, name);
        if result.is_err() {
            self.poison("snapshot");
        }
        result
    }

    fn snapshot_locked(&self, st: &mut State, name: &str) -> Result<()> {
        let head = &st.layers[st.head_pos()];
        let mut ops = [
            IoOp::SyncData { file: &head.data },
            IoOp::SyncData { file: &head.map },
        ];
        self.engine
            .submit(&mut ops)
            .map_err(|e| StoreError::io("fdatasync", &head.data_path, 0, e.source))?;
        self.head_dirty
            .store(false, std::sync::atomic::Ordering::Release);
        self.failpoints.check("snapshot.head_flushed")?;
        let new_id = st.meta.next_layer_id;
        let files = LayerFiles::open(&self.dir, new_id, true)?;
        meta::sync_dir(&self.dir)?;
        self.failpoints.check("snapshot.files_created")?;
        let mut meta = st.meta.clone();
        meta.layers.last_mut().expect("chain has a head").snapshot = Some(SnapshotMeta {
            name: name.to_string(),
            created: now(),
            size: Some(st.meta.size),
        });
        meta.layers.push(LayerMeta {
            id: new_id,
            snapshot: None,
        });
        meta.next_layer_id += 1;
        self.commit_meta(st, meta, "snapshot")?;
        st.layers.push(files);
        st.maps.get_mut().extents.push(RangeMap::new());
        Ok(())
    }

    /// True if the chain holds snapshot `name`.
    pub fn has_snapshot(&self, name: &str) -> bool {
        position(&self.state.read(), name).is_ok()
    }

    /// Snapshot names, oldest first (no IO, unlike [`Store::snapshots`]).
    pub fn snapshot_names(&self) -> Vec<String> {
        let st = self.state.read();
        st.meta
            .layers
            .iter()
            .filter_map(|l| l.snapshot.as_ref().map(|s| s.name.clone()))
            .collect()
    }

    /// Snapshots, oldest first.
    pub fn snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        let st = self.state.read();
        let mut out = Vec::new();
        for (lm, files) in st.meta.layers.iter().zip(&st.layers) {
            if let Some(s) = &lm.snapshot {
                out.push(SnapshotInfo {
                    name: s.name.clone(),
                    created: s.created,
                    allocated: files.allocated_bytes()?,
                    size: s.size.unwrap_or(st.meta.size),
                });
            }
        }
        Ok(out)
    }

    /// Discards the head (and, with `discard_newer`, every snapshot newer
    /// than `name`) and starts a new empty head on top of `name`.
    pub fn revert(&self, name: &str, discard_newer: bool) -> Result<()> {
        self.check_usable()?;
        let _control = self.control.lock();
        let mut st = self.state.write();
        let pos = position(&st, name)?;
        let newer: Vec<String> = st.meta.layers[pos + 1..]
            .iter()
            .filter_map(|l| l.snapshot.as_ref().map(|s| s.name.clone()))
            .collect();
        if !newer.is_empty() && !discard_newer {
            return Err(StoreError::NewerSnapshots {
                name: name.to_string(),
                newer,
            });
        }
        let result = self.revert_locked(&mut st, pos);
        if result.is_err() {
            self.poison("revert");
        }
        result
    }

    fn revert_locked(&self, st: &mut State, pos: usize) -> Result<()> {
        let new_id = st.meta.next_layer_id;
        let files = LayerFiles::open(&self.dir, new_id, true)?;
        meta::sync_dir(&self.dir)?;
        self.failpoints.check("revert.files_created")?;
        let mut meta = st.meta.clone();
        meta.layers.truncate(pos + 1);
        meta.layers.push(LayerMeta {
            id: new_id,
            snapshot: None,
        });
        meta.next_layer_id += 1;
        self.commit_meta(st, meta, "revert")?;
        self.failpoints.check("revert.meta_written")?;
        for old in st.layers.drain(pos + 1..) {
            remove_layer_files(&old);
        }
        st.layers.push(files);
        let mut extents = std::mem::take(&mut st.maps.get_mut().extents);
        extents.truncate(pos + 1);
        extents.push(RangeMap::new());
        *st.maps.get_mut() = Maps::rebuild(extents);
        self.head_dirty
            .store(false, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    /// Deletes snapshot `name`, merging what it holds into its child layer
    /// wherever the child holds nothing, so no remaining layer reads
    /// differently. Interrupted at any point, it can be run again.
    pub fn delete_snapshot(&self, name: &str) -> Result<()> {
        self.check_usable()?;
        let _control = self.control.lock();
        let result = self.delete_snapshot_locked(name);
        if matches!(result, Err(ref e) if !matches!(e, StoreError::NoSuchSnapshot(_))) {
            self.poison("delete snapshot");
        }
        result
    }

    fn delete_snapshot_locked(&self, name: &str) -> Result<()> {
        let (pos, extents): (usize, Vec<(u64, u64, BlockKind)>) = {
            let st = self.state.read();
            let pos = position(&st, name)?;
            let extents = st.maps.lock().extents[pos].iter().collect();
            (pos, extents)
        };
        let child = pos + 1;
        // Phase 1: copy into the child, a chunk at a time under the exclusive
        // lock (the child may be the head, which takes writes between chunks).
        let mut merged_any = false;
        for (s, e, kind) in extents {
            let mut b = s;
            while b < e {
                let end = (b + MERGE_CHUNK_BLOCKS).min(e);
                let st = self.state.write();
                let gaps = st.maps.lock().extents[child].gaps(b, end);
                for gap in gaps {
                    self.merge_range(&st, pos, child, gap.start, gap.end, kind)?;
                }
                drop(st);
                if !merged_any {
                    merged_any = true;
                    self.failpoints.check("delete.chunk_merged")?;
                }
                b = end;
            }
        }
        // Phase 2: make the child durable before the chain forgets the parent.
        let mut st = self.state.write();
        {
            let c = &st.layers[child];
            let mut ops = [
                IoOp::SyncData { file: &c.data },
                IoOp::SyncData { file: &c.map },
            ];
            self.engine
                .submit(&mut ops)
                .map_err(|e| StoreError::io("fdatasync", &c.data_path, 0, e.source))?;
        }
        self.failpoints.check("delete.child_synced")?;
        // Phase 3: commit the shorter chain, then remove the files.
        let mut meta = st.meta.clone();
        meta.layers.remove(pos);
        self.commit_meta(&mut st, meta, "delete snapshot")?;
        self.failpoints.check("delete.meta_written")?;
        let old = st.layers.remove(pos);
        remove_layer_files(&old);
        let mut extents = std::mem::take(&mut st.maps.get_mut().extents);
        extents.remove(pos);
        *st.maps.get_mut() = Maps::rebuild(extents);
        Ok(())
    }

    /// Copies blocks `[b0, b1)` of layer `from` (all of `kind`) into layer
    /// `to`, data and checksums alike.
    fn merge_range(
        &self,
        st: &State,
        from: usize,
        to: usize,
        b0: u64,
        b1: u64,
        kind: BlockKind,
    ) -> Result<()> {
        let dst = &st.layers[to];
        let is_head = to == st.head_pos();
        match kind {
            BlockKind::Zero => {
                let raw = MapEntry::Zero.encode().to_le_bytes();
                let entries: Vec<u8> = raw
                    .iter()
                    .copied()
                    .cycle()
                    .take(((b1 - b0) * ENTRY_LEN) as usize)
                    .collect();
                let mut ops = [IoOp::Write {
                    file: &dst.map,
                    offset: b0 * ENTRY_LEN,
                    buf: &entries,
                }];
                self.engine.submit(&mut ops).map_err(|e| {
                    StoreError::io("write", &dst.map_path, b0 * ENTRY_LEN, e.source)
                })?;
            }
            BlockKind::Data => {
                // Read through the checksum check: never spread bad data.
                let mut data = vec![0u8; ((b1 - b0) * BLOCK_SIZE) as usize];
                self.read_segments(st, &[(b0, b1, Some(Source::layer(from)))], b0, &mut data)?;
                let mut entries = vec![0u8; ((b1 - b0) * ENTRY_LEN) as usize];
                let src = &st.layers[from];
                let mut read = [IoOp::Read {
                    file: &src.map,
                    offset: b0 * ENTRY_LEN,
                    buf: &mut entries,
                }];
                self.engine
                    .submit(&mut read)
                    .map_err(|e| StoreError::io("read", &src.map_path, b0 * ENTRY_LEN, e.source))?;
                let mut ops = [
                    IoOp::Write {
                        file: &dst.data,
                        offset: b0 * BLOCK_SIZE,
                        buf: &data,
                    },
                    IoOp::Write {
                        file: &dst.map,
                        offset: b0 * ENTRY_LEN,
                        buf: &entries,
                    },
                ];
                self.engine.submit(&mut ops).map_err(|e| {
                    StoreError::io("write", &dst.data_path, b0 * BLOCK_SIZE, e.source)
                })?;
            }
        }
        let mut maps = st.maps.lock();
        maps.extents[to].set(b0, b1, kind);
        if is_head {
            mark(&self.head_dirty);
            let src = match kind {
                BlockKind::Data => Source::layer(to),
                BlockKind::Zero => Source::Zero,
            };
            maps.index.set(b0, b1, src);
        }
        Ok(())
    }

    /// Grows the volume to `new_size` bytes (a multiple of 4096); the same
    /// size is a no-op. The grown range reads as zeros. Snapshots keep the
    /// size they were taken at (written into the older ones that lack it).
    pub fn expand(&self, new_size: u64) -> Result<()> {
        self.check_usable()?;
        let _control = self.control.lock();
        let mut st = self.state.write();
        let current = st.meta.size;
        if !new_size.is_multiple_of(BLOCK_SIZE) || new_size < current {
            return Err(StoreError::BadSize {
                current,
                requested: new_size,
                reason: if new_size < current {
                    "volumes only grow"
                } else {
                    "the size must be a multiple of 4096"
                },
            });
        }
        if new_size == current {
            return Ok(());
        }
        if let Some(capacity) = filesystem_bytes(&self.dir) {
            if new_size > capacity {
                return Err(StoreError::BadSize {
                    current,
                    requested: new_size,
                    reason: "larger than the whole filesystem holding the replica",
                });
            }
        }
        let mut meta = st.meta.clone();
        for layer in &mut meta.layers {
            if let Some(s) = &mut layer.snapshot {
                s.size.get_or_insert(current);
            }
        }
        meta.size = new_size;
        self.commit_meta(&mut st, meta, "expand")
    }

    /// Reads from `view` (the head or a snapshot) at `offset`.
    pub fn read_view(&self, view: View<'_>, offset: u64, buf: &mut [u8]) -> Result<()> {
        let View::Snapshot(name) = view else {
            return self.read(offset, buf);
        };
        let st = self.state.read();
        let top = position(&st, name)?;
        let (b0, b1) = self.check_range(snapshot_size(&st, top), offset, buf.len() as u64)?;
        let segments = {
            let maps = st.maps.lock();
            view_segments(&maps, top, b0, b1)
        };
        self.read_segments(&st, &segments, b0, buf)
    }

    /// Byte ranges that may differ between snapshot `from` and `to`
    /// (everything written in the layers above `from` up to `to`); with
    /// `from` = None, every range `to` holds. Sorted and disjoint.
    pub fn changed_ranges(&self, from: Option<&str>, to: View<'_>) -> Result<Vec<Range<u64>>> {
        let st = self.state.read();
        let (bottom, top) = layer_span(&st, from, to)?;
        let maps = st.maps.lock();
        let mut union = RangeMap::new();
        for layer in &maps.extents[bottom..=top] {
            for (s, e, _) in layer.iter() {
                union.set(s, e, ());
            }
        }
        Ok(union
            .iter()
            .map(|(s, e, _)| s * BLOCK_SIZE..e * BLOCK_SIZE)
            .collect())
    }
}

impl Store {
    /// Allocation of `[offset, offset + len)` as `view` sees it: data, or a
    /// hole (never written, trimmed, or hidden by a zero tombstone).
    pub fn allocation_view(
        &self,
        view: View<'_>,
        offset: u64,
        len: u64,
    ) -> Result<Vec<AllocationExtent>> {
        let View::Snapshot(name) = view else {
            return self.allocation(offset, len);
        };
        let st = self.state.read();
        let top = position(&st, name)?;
        let (b0, b1) = self.check_range(snapshot_size(&st, top), offset, len)?;
        let maps = st.maps.lock();
        Ok(merge_extents(view_segments(&maps, top, b0, b1)))
    }

    /// The size of what `view` reads: the volume's, or a snapshot's size
    /// when it was taken.
    pub fn view_size(&self, view: View<'_>) -> Result<u64> {
        let st = self.state.read();
        match view {
            View::Head => Ok(st.meta.size),
            View::Snapshot(name) => Ok(snapshot_size(&st, position(&st, name)?)),
        }
    }

    /// The ranges of `[offset, offset + len)` that may differ between
    /// snapshot `from` (None: an empty volume) and `to`, each with what `to`
    /// holds there: data, or zeros (a hole or a tombstone). Ranges not
    /// listed read the same in both. Sorted and disjoint.
    pub fn changed_extents(
        &self,
        from: Option<&str>,
        to: View<'_>,
        offset: u64,
        len: u64,
    ) -> Result<Vec<AllocationExtent>> {
        let st = self.state.read();
        let (b0, b1) = self.check_range(st.meta.size, offset, len)?;
        let (bottom, top) = layer_span(&st, from, to)?;
        let maps = st.maps.lock();
        let mut union = RangeMap::new();
        for layer in &maps.extents[bottom..=top] {
            for (s, e, _) in layer.overlapping(b0, b1) {
                union.set(s.max(b0), e.min(b1), ());
            }
        }
        let mut out = Vec::new();
        for (s, e, _) in union.iter() {
            out.extend(merge_extents(view_segments(&maps, top, s, e)));
        }
        Ok(out)
    }
}

/// Segments as allocation extents in bytes, neighbours of one kind merged.
fn merge_extents(segments: Vec<Segment>) -> Vec<AllocationExtent> {
    let mut out: Vec<AllocationExtent> = Vec::new();
    for (s, e, src) in segments {
        let kind = match src {
            Some(Source::Layer(_)) => Allocation::Data,
            _ => Allocation::Hole,
        };
        match out.last_mut() {
            Some(last) if last.kind == kind && last.offset + last.len == s * BLOCK_SIZE => {
                last.len += (e - s) * BLOCK_SIZE
            }
            _ => out.push(AllocationExtent {
                offset: s * BLOCK_SIZE,
                len: (e - s) * BLOCK_SIZE,
                kind,
            }),
        }
    }
    out
}

/// Chain positions `bottom..=top`: the layers written after snapshot
/// `from` (None: every layer) up to and including view `to`.
fn layer_span(st: &State, from: Option<&str>, to: View<'_>) -> Result<(usize, usize)> {
    let top = match to {
        View::Head => st.head_pos(),
        View::Snapshot(name) => position(st, name)?,
    };
    let bottom = match from {
        None => 0,
        Some(name) => {
            let p = position(st, name)?;
            if p > top {
                return Err(StoreError::NoSuchSnapshot(format!(
                    "{name} (it is newer than the target view)"
                )));
            }
            p + 1
        }
    };
    Ok((bottom, top))
}

/// The view through layer `top` and below of `[b0, b1)`, as consecutive
/// segments.
fn view_segments(maps: &Maps, top: usize, b0: u64, b1: u64) -> Vec<Segment> {
    let mut resolved: Vec<Segment> = Vec::new();
    let mut unresolved: Vec<Range<u64>> = Vec::with_capacity(4);
    unresolved.push(b0..b1);
    for pos in (0..=top).rev() {
        if unresolved.is_empty() {
            break;
        }
        let mut still = Vec::new();
        for r in unresolved {
            let mut cursor = r.start;
            for (s, e, kind) in maps.extents[pos].overlapping(r.start, r.end) {
                if s > cursor {
                    still.push(cursor..s);
                }
                let src = match kind {
                    BlockKind::Data => Source::layer(pos),
                    BlockKind::Zero => Source::Zero,
                };
                resolved.push((s, e, Some(src)));
                cursor = e;
            }
            if cursor < r.end {
                still.push(cursor..r.end);
            }
        }
        unresolved = still;
    }
    resolved.extend(unresolved.into_iter().map(|r| (r.start, r.end, None)));
    resolved.sort_by_key(|s| s.0);
    resolved
}

fn remove_layer_files(files: &LayerFiles) {
    for p in [&files.data_path, &files.map_path] {
        if let Err(e) = std::fs::remove_file(p) {
            tracing::warn!(path = ?p, "could not remove a discarded layer file ({e}); it is removed at next open");
        }
    }
}

/// The volume's size when the snapshot at chain position `top` was taken.
fn snapshot_size(st: &State, top: usize) -> u64 {
    st.meta.layers[top]
        .snapshot
        .as_ref()
        .and_then(|s| s.size)
        .unwrap_or(st.meta.size)
}

/// Total bytes of the filesystem holding `dir` (None if it cannot be told).
/// A volume may be larger than the free space (it is thin), never larger
/// than the filesystem itself: that one could never be filled.
fn filesystem_bytes(dir: &std::path::Path) -> Option<u64> {
    filesystem_space(dir).map(|s| s.total)
}

/// The size of the filesystem holding a directory, and what is free in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FilesystemSpace {
    pub total: u64,
    /// Bytes an unprivileged writer may still use.
    pub available: u64,
}

/// [`FilesystemSpace`] of the filesystem holding `dir` (None if it cannot
/// be told).
pub fn filesystem_space(dir: &std::path::Path) -> Option<FilesystemSpace> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs is a plain C struct for which all-zero bytes are valid.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is a valid NUL-terminated string and `st` a writable
    // statvfs that outlives the call.
    let r = unsafe { libc::statvfs(path.as_ptr(), &mut st) };
    (r == 0).then(|| FilesystemSpace {
        total: st.f_blocks as u64 * st.f_frsize as u64,
        available: st.f_bavail as u64 * st.f_frsize as u64,
    })
}
