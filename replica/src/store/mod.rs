//! [`Store`]: one replica of one volume, a directory of layered sparse files.
//!
//! ```text
//! dir/
//!   volume.meta          chain, size, epoch, clean flag   (meta.rs)
//!   volume.lock          flock: one process per replica directory
//!   layer-000001.data    oldest snapshot: data at volume offsets (sparse)
//!   layer-000001.map     its block map: crc32 + kind per 4 KiB block (layer.rs)
//!   ...
//!   layer-00000N.data    the head: the only layer that takes writes
//! ```
//!
//! In memory the store keeps, per layer, the extents it holds
//! ([`RangeMap<BlockKind>`]), and one merged read index mapping every
//! written range to the newest layer holding it. Both grow with extents
//! written, not with volume size, and a fragmented 1 MiB region costs a
//! bitmap, not its extents (see `extent`).
//!
//! Concurrency: data operations (read, write, trim, flush) take the state
//! lock shared and may run in parallel; chain changes (snapshot, revert,
//! delete, expand, epoch) are serialised by a control mutex and take the
//! state lock exclusively only for their short critical sections. Callers
//! must not issue overlapping writes concurrently (the controller's range
//! lock guarantees it); a read racing a write of the same blocks returns
//! either version.
//!
//! The code is split by concern: `data.rs` (read, write, trim, flush),
//! `ring_read.rs` (a read through the data server's io_uring),
//! `verify.rs` (the crc check every read makes), `chain.rs` (snapshots,
//! revert, delete, expand, views, changed ranges), `writeback.rs` (the
//! bound on unflushed data).

mod chain;
mod data;
mod ring_read;
mod verify;
mod writeback;

use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

use crate::engine::IoEngine;
use crate::error::{Result, StoreError};
use crate::extent::RangeMap;
use crate::failpoint::FailPoints;
use crate::layer::{self, BlockKind, LayerFiles};
use crate::meta::{self, LayerMeta, VolumeMeta};
use crate::BLOCK_SIZE;

pub use chain::{filesystem_space, valid_snapshot_name, FilesystemSpace, SnapshotInfo, View};
pub use data::{Allocation, AllocationExtent};
pub use writeback::{WriteClass, WritebackConfig, WritebackStats};

const LOCK_FILE: &str = "volume.lock";

/// Where the merged read index says a block's current contents live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    /// In the data file of the layer at this position of the chain (u32,
    /// not usize: the index holds one per extent; see [`Source::layer`]).
    Layer(u32),
    /// Zeros (a tombstone hides lower layers).
    Zero,
}

impl Source {
    /// The source for the layer at chain position `pos`. A chain never
    /// comes near 2^32 layers (each is two open files).
    pub(crate) fn layer(pos: usize) -> Source {
        Source::Layer(pos as u32)
    }
}

/// What [`Store::create`] needs.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    pub volume_id: String,
    /// Bytes; a multiple of 4096.
    pub size: u64,
}

/// What [`Store::open`] found.
#[derive(Debug, Clone, Copy)]
pub struct OpenReport {
    /// False if the previous process did not close the store (crash, kill):
    /// writes since its last flush may be lost or torn.
    pub was_clean: bool,
    /// Not closed cleanly and the machine has restarted since it was last
    /// opened (another boot id): writes since its last flush may be gone
    /// with the page cache, not only torn.
    pub page_cache_lost: bool,
}

/// A summary of the store for status calls.
#[derive(Debug, Clone)]
pub struct StoreInfo {
    pub volume_id: String,
    pub lineage: String,
    pub size: u64,
    pub epoch: u64,
    /// A controller marked the replica as being resynced (not a valid source).
    pub incomplete: bool,
    /// Which controller set the epoch.
    pub epoch_owner: String,
    pub engine: &'static str,
    /// Snapshot names, oldest first.
    pub chain: Vec<String>,
}

pub(crate) struct State {
    pub meta: VolumeMeta,
    /// Parallel to `meta.layers`: oldest first, head last.
    pub layers: Vec<LayerFiles>,
    pub maps: Mutex<Maps>,
}

pub(crate) struct Maps {
    /// Parallel to `State::layers`.
    pub extents: Vec<RangeMap<BlockKind>>,
    /// Head view: newest layer holding each range.
    pub index: RangeMap<Source>,
}

impl Maps {
    fn rebuild(extents: Vec<RangeMap<BlockKind>>) -> Self {
        let mut index = RangeMap::new();
        for (pos, layer) in extents.iter().enumerate() {
            for (s, e, kind) in layer.iter() {
                let src = match kind {
                    BlockKind::Data => Source::layer(pos),
                    BlockKind::Zero => Source::Zero,
                };
                index.set(s, e, src);
            }
        }
        Maps { extents, index }
    }
}

impl State {
    pub fn head_pos(&self) -> usize {
        self.layers.len() - 1
    }
}

/// One replica of one volume. See the module docs for the layout.
pub struct Store {
    dir: PathBuf,
    engine: Arc<dyn IoEngine>,
    state: RwLock<State>,
    control: Mutex<()>,
    /// Held by a copy's write (a rebuild's PULL): one at a time, so copies
    /// queue here rather than spin on the data file's inode lock in the
    /// kernel, which burned a tenth of a rebuilding replica's CPU.
    copy_writes: Mutex<()>,
    head_dirty: AtomicBool,
    /// Bounds the head's unflushed bytes (`writeback.rs`).
    writeback: writeback::Writeback,
    poisoned: Mutex<Option<&'static str>>,
    failpoints: FailPoints,
    _lock: File,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

fn lock_dir(dir: &Path) -> Result<File> {
    let path = dir.join(LOCK_FILE);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| StoreError::io("open", &path, 0, e))?;
    // SAFETY: flock only reads its integer arguments; the fd is owned by `f`.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        return Err(StoreError::Locked(dir.to_path_buf()));
    }
    Ok(f)
}

fn new_lineage() -> String {
    format!("{:032x}", rand::random::<u128>())
}

impl Store {
    /// Creates an empty volume in `dir` (created if missing). Fails if `dir`
    /// already holds one.
    pub fn create(dir: &Path, opts: &CreateOptions, engine: Arc<dyn IoEngine>) -> Result<Store> {
        if !opts.size.is_multiple_of(BLOCK_SIZE) {
            return Err(StoreError::BadSize {
                current: 0,
                requested: opts.size,
                reason: "the size must be a multiple of 4096",
            });
        }
        fs::create_dir_all(dir).map_err(|e| StoreError::io("create directory", dir, 0, e))?;
        let lock = lock_dir(dir)?;
        if dir.join(meta::META_FILE).exists() {
            return Err(StoreError::AlreadyExists(dir.to_path_buf()));
        }
        remove_orphans(dir, &[])?;
        let meta = VolumeMeta {
            volume_id: opts.volume_id.clone(),
            lineage: new_lineage(),
            size: opts.size,
            block_size: BLOCK_SIZE as u32,
            epoch: 0,
            clean: false,
            stopped_unflushed: false,
            incomplete: false,
            epoch_owner: String::new(),
            boot_id: meta::boot_id(),
            next_layer_id: 2,
            layers: vec![LayerMeta {
                id: 1,
                snapshot: None,
            }],
        };
        let head = LayerFiles::open(dir, 1, true)?;
        meta::sync_dir(dir)?;
        let failpoints = FailPoints::default();
        meta::write(dir, &meta, &failpoints)?;
        Ok(Store {
            dir: dir.to_path_buf(),
            engine,
            state: RwLock::new(State {
                meta,
                layers: vec![head],
                maps: Mutex::new(Maps::rebuild(vec![RangeMap::new()])),
            }),
            control: Mutex::new(()),
            copy_writes: Mutex::new(()),
            head_dirty: AtomicBool::new(false),
            writeback: writeback::Writeback::new(WritebackConfig::default()),
            poisoned: Mutex::new(None),
            failpoints,
            _lock: lock,
        })
    }

    /// Opens the volume in `dir`, rebuilding the in-memory index from the
    /// block maps, removing files a crash left behind, and marking the store
    /// open (not clean) until [`Store::close`].
    pub fn open(dir: &Path, engine: Arc<dyn IoEngine>) -> Result<(Store, OpenReport)> {
        let lock = lock_dir(dir)?;
        let mut meta = meta::read(dir)?;
        let tmp = dir.join(meta::META_TMP);
        if tmp.exists() {
            fs::remove_file(&tmp).map_err(|e| StoreError::io("remove", &tmp, 0, e))?;
        }
        let ids: Vec<u64> = meta.layers.iter().map(|l| l.id).collect();
        remove_orphans(dir, &ids)?;
        let blocks = meta.size / BLOCK_SIZE;
        let mut layers = Vec::with_capacity(ids.len());
        let mut extents = Vec::with_capacity(ids.len());
        for &id in &ids {
            let files = LayerFiles::open(dir, id, false)?;
            extents.push(files.scan_extents(blocks)?);
            layers.push(files);
        }
        let boot = meta::boot_id();
        let same_boot = meta.boot_id == boot && !boot.is_empty();
        // A stop that drained every request but ran out of time for its
        // flush left the rest in the page cache. On the same boot that cache
        // is still there: syncing it now finishes the stop's flush.
        let finished_stop = !meta.clean && meta.stopped_unflushed && same_boot;
        if finished_stop {
            let head = layers.last().expect("a chain has a head");
            for (file, path) in [(&head.data, &head.data_path), (&head.map, &head.map_path)] {
                file.sync_data()
                    .map_err(|e| StoreError::io("fdatasync", path, 0, e))?;
            }
            tracing::info!(dir = %dir.display(), "the previous stop ran out of time for its flush; finished it now");
        }
        let report = OpenReport {
            was_clean: meta.clean || finished_stop,
            page_cache_lost: !meta.clean && !finished_stop && !same_boot,
        };
        let failpoints = FailPoints::default();
        if meta.clean || meta.boot_id != boot || meta.stopped_unflushed {
            meta.clean = false;
            meta.stopped_unflushed = false;
            meta.boot_id = boot;
            meta::write(dir, &meta, &failpoints)?;
        }
        let store = Store {
            dir: dir.to_path_buf(),
            engine,
            state: RwLock::new(State {
                meta,
                layers,
                maps: Mutex::new(Maps::rebuild(extents)),
            }),
            control: Mutex::new(()),
            copy_writes: Mutex::new(()),
            head_dirty: AtomicBool::new(false),
            writeback: writeback::Writeback::new(WritebackConfig::default()),
            poisoned: Mutex::new(None),
            failpoints,
            _lock: lock,
        };
        Ok((store, report))
    }

    /// Flushes everything and marks the store clean. Dropping a store without
    /// calling this is a crash as far as the next open can tell.
    pub fn close(self) -> Result<()> {
        self.flush()?;
        let _control = self.control.lock();
        let mut st = self.state.write();
        let mut meta = st.meta.clone();
        meta.clean = true;
        meta::write(&self.dir, &meta, &self.failpoints)?;
        st.meta = meta;
        Ok(())
    }

    /// [`Store::close`] with a deadline, for a server stopping within a
    /// grace period. The head's dirty pages are written back a piece at a
    /// time until `deadline`; if that finishes, the store closes cleanly.
    /// If not, the metadata records that the stop drained every request but
    /// not its flush ([`StoreError::StopUnflushed`]): the next open on the
    /// same boot finishes the flush and counts the stop as clean, and after
    /// a machine restart the replica is compared with its peers as after a
    /// crash. The caller must have stopped every request first.
    pub fn close_within(self, deadline: std::time::Instant) -> Result<()> {
        let started = std::time::Instant::now();
        let (data, map) = {
            let st = self.state.read();
            let head = &st.layers[st.head_pos()];
            (head.data_path.clone(), head.map_path.clone())
        };
        let mut written = true;
        for path in [&data, &map] {
            match writeback::write_back_until(path, deadline) {
                Ok(true) => {}
                Ok(false) => written = false,
                Err(e) => return Err(StoreError::io("sync_file_range", path, 0, e)),
            }
        }
        if written {
            return self.close();
        }
        let _control = self.control.lock();
        let mut st = self.state.write();
        let mut meta = st.meta.clone();
        meta.stopped_unflushed = true;
        self.commit_meta(&mut st, meta, "stop")?;
        Err(StoreError::StopUnflushed {
            dir: self.dir.clone(),
            waited: started.elapsed(),
        })
    }

    /// What the writeback of unflushed data measured: the bound, the disk's
    /// writeback rate, throttled writes, flush latencies.
    pub fn writeback_stats(&self) -> WritebackStats {
        self.writeback.stats()
    }

    /// Changes the bound on unflushed bytes (see [`WritebackConfig`]).
    pub fn configure_writeback(&self, config: WritebackConfig) {
        self.writeback.configure(config);
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn size(&self) -> u64 {
        self.state.read().meta.size
    }

    pub fn epoch(&self) -> u64 {
        self.state.read().meta.epoch
    }

    pub fn engine_name(&self) -> &'static str {
        self.engine.name()
    }

    pub fn info(&self) -> StoreInfo {
        let st = self.state.read();
        StoreInfo {
            volume_id: st.meta.volume_id.clone(),
            lineage: st.meta.lineage.clone(),
            size: st.meta.size,
            epoch: st.meta.epoch,
            incomplete: st.meta.incomplete,
            epoch_owner: st.meta.epoch_owner.clone(),
            engine: self.engine.name(),
            chain: st
                .meta
                .layers
                .iter()
                .filter_map(|l| l.snapshot.as_ref().map(|s| s.name.clone()))
                .collect(),
        }
    }

    /// Persists a new fencing epoch.
    pub fn set_epoch(&self, epoch: u64) -> Result<()> {
        let (incomplete, owner) = {
            let st = self.state.read();
            (st.meta.incomplete, st.meta.epoch_owner.clone())
        };
        self.set_epoch_and_sync_state(epoch, incomplete, &owner)
    }

    /// Persists a new fencing epoch and whether the replica's data is
    /// complete (false while a controller resyncs or rebuilds it), in one
    /// metadata update.
    pub fn set_epoch_and_sync_state(
        &self,
        epoch: u64,
        incomplete: bool,
        owner: &str,
    ) -> Result<()> {
        self.check_usable()?;
        let _control = self.control.lock();
        let mut st = self.state.write();
        let mut meta = st.meta.clone();
        meta.epoch = epoch;
        meta.incomplete = incomplete;
        meta.epoch_owner = owner.to_string();
        self.commit_meta(&mut st, meta, "set epoch")
    }

    /// Heap bytes held by the in-memory extent maps and read index.
    /// True if writes were made since the last flush (they may still be
    /// only in the page cache).
    pub fn has_unflushed_writes(&self) -> bool {
        self.head_dirty.load(Ordering::Acquire)
    }

    pub fn index_heap_bytes(&self) -> usize {
        let st = self.state.read();
        let maps = st.maps.lock();
        maps.index.heap_bytes() + maps.extents.iter().map(|m| m.heap_bytes()).sum::<usize>()
    }

    /// Number of extents in the merged read index.
    pub fn index_extents(&self) -> usize {
        self.state.read().maps.lock().index.len()
    }

    /// Fail points, for crash tests.
    pub fn failpoints(&self) -> &FailPoints {
        &self.failpoints
    }

    fn check_usable(&self) -> Result<()> {
        match *self.poisoned.lock() {
            Some(op) => Err(StoreError::Poisoned(op)),
            None => Ok(()),
        }
    }

    fn poison(&self, op: &'static str) {
        self.poisoned.lock().get_or_insert(op);
    }

    /// Writes `meta` durably and installs it; a failure poisons the store
    /// because the file on disk may now hold either version.
    fn commit_meta(&self, st: &mut State, meta: VolumeMeta, op: &'static str) -> Result<()> {
        if let Err(e) = meta::write(&self.dir, &meta, &self.failpoints) {
            self.poison(op);
            return Err(e);
        }
        st.meta = meta;
        Ok(())
    }

    fn check_range(&self, size: u64, offset: u64, len: u64) -> Result<(u64, u64)> {
        if !offset.is_multiple_of(BLOCK_SIZE) || !len.is_multiple_of(BLOCK_SIZE) {
            return Err(StoreError::Unaligned {
                offset,
                len,
                block: BLOCK_SIZE,
            });
        }
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok((offset / BLOCK_SIZE, end / BLOCK_SIZE)),
            _ => Err(StoreError::OutOfRange { offset, len, size }),
        }
    }
}

/// Deletes layer files whose id is not in `keep`: leftovers of an operation
/// a crash interrupted before or after its metadata commit.
fn remove_orphans(dir: &Path, keep: &[u64]) -> Result<()> {
    let entries = fs::read_dir(dir).map_err(|e| StoreError::io("read directory", dir, 0, e))?;
    let mut removed = false;
    for entry in entries {
        let entry = entry.map_err(|e| StoreError::io("read directory", dir, 0, e))?;
        let name = entry.file_name();
        let Some(id) = name.to_str().and_then(layer::parse_file_name) else {
            continue;
        };
        if !keep.contains(&id) {
            tracing::info!(file = ?entry.path(), "removing a layer file no metadata refers to");
            fs::remove_file(entry.path())
                .map_err(|e| StoreError::io("remove", entry.path(), 0, e))?;
            removed = true;
        }
    }
    if removed {
        meta::sync_dir(dir)?;
    }
    Ok(())
}

pub(crate) fn mark(flag: &AtomicBool) {
    flag.store(true, Ordering::Release);
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::{CreateOptions, Source, Store, WriteClass};
    use crate::engine::PortableEngine;

    fn store(dir: &std::path::Path) -> Arc<Store> {
        let opts = CreateOptions {
            volume_id: "v".into(),
            size: 1 << 20,
        };
        Arc::new(Store::create(dir, &opts, Arc::new(PortableEngine)).unwrap())
    }

    #[test]
    fn copies_write_one_at_a_time_and_clients_never_wait_for_them() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        let block = vec![7u8; 4096];
        let held = store.copy_writes.lock();
        // Another copy's write is under way: a copy that must not wait is
        // refused, a client's write goes through.
        assert!(!store
            .write_unless_busy(WriteClass::Copy, 0, &block)
            .unwrap());
        assert!(store
            .write_unless_busy(WriteClass::Client, 4096, &block)
            .unwrap());
        // A copy that may wait waits for it.
        let copier = {
            let store = store.clone();
            let block = block.clone();
            std::thread::spawn(move || store.write_as(WriteClass::Copy, 8192, &block))
        };
        std::thread::sleep(Duration::from_millis(200));
        assert!(!copier.is_finished(), "two copies wrote at once");
        drop(held);
        copier.join().unwrap().unwrap();
        let mut back = vec![0u8; 3 * 4096];
        store.read(0, &mut back).unwrap();
        assert!(back[..4096].iter().all(|&b| b == 0));
        assert!(back[4096..].iter().all(|&b| b == 7));
    }

    #[test]
    fn a_read_index_value_is_eight_bytes() {
        // The read index holds one per extent; `Layer(usize)` made it 16.
        assert_eq!(std::mem::size_of::<Source>(), 8);
    }
}
