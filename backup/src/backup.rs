//! `create_backup`: one snapshot to the target.
//!
//! 1. Lock (`locks.rs`), then pick the parent: the newest backup of the
//!    volume in this target whose snapshot the source still has. With one,
//!    only the ranges changed since that snapshot are read, and every other
//!    chunk entry is copied from the parent's index pages; without one the
//!    allocated ranges are read and the holes are recorded as zero.
//! 2. Walk the volume one window (one index page, 1 GiB by default) at a
//!    time: ask the source what changed in the window, read each touched
//!    chunk whole, hash it (keyed BLAKE3), and store it only if the target
//!    does not have it yet (whichever volume put it there: the target's
//!    pack indexes, read once at the start, say). New chunks are sealed and
//!    gathered into packs of about 8 MiB, one PUT each (`pack.rs`). At most
//!    `parallel` chunks are in flight; each holds its plaintext and its
//!    sealed object, so memory is about `parallel × 2 × chunk_size` plus
//!    two packs and two index pages (8 × 2 × 1 MiB + 2 × 8 MiB + 2 × 34 KiB
//!    with the defaults), plus the chunk index (`pack.rs`: about 60 bytes
//!    per chunk stored in the target), whatever the volume size.
//! 3. Write each window's index page (skipped when identical to the
//!    parent's), the last pack and a pack index naming this backup's
//!    packs, then the manifest, last: until it exists the backup does not
//!    list. A backup rewrites its pack index every 8 packs as it goes, and
//!    one that fails writes it for every pack it did upload, so a retry
//!    uploads only the chunks still missing (after a lost connection: and
//!    those of the last few packs).

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use futures::StreamExt;

use crate::envelope::{Kind, ObjectId};
use crate::error::{BackupError, Result};
use crate::format::{self, BackupStats, Entry, IndexPage, Manifest};
use crate::locks::Lock;
use crate::pack::{ChunkIndex, PackWriter};
use crate::progress::Progress;
use crate::source::{ExtentKind, SnapshotSource, SourceError};
use crate::target::{check_name, chunk_key, manifest_key, page_key, Loaded, Target};
use crate::timing::{Stage, StageSeconds, Timings};

/// Choices for one backup.
#[derive(Debug, Clone, Default)]
pub struct BackupOptions {
    /// Read every allocated range even if an earlier backup could be the
    /// base.
    pub full: bool,
    /// The new backup's id, chosen by the caller (so it can name the backup
    /// before it exists, as the CSI driver's snapshot handles do); None: a
    /// new [`new_id`]. A chosen id should sort by time like those (the
    /// newest manifest is the next backup's parent). A backup with this id
    /// already in the target is refused with [`BackupError::Exists`].
    pub id: Option<String>,
}

/// What one backup did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BackupSummary {
    pub id: String,
    pub volume: String,
    pub snapshot: String,
    /// The backup this one is incremental to.
    pub parent: Option<String>,
    pub size: u64,
    #[serde(flatten)]
    pub stats: BackupStats,
    /// Busy seconds per stage, summed over the chunks (see `timing.rs`).
    pub timings: StageSeconds,
    /// Chunks the target held (any volume's) when the backup started.
    pub target_chunks: u64,
    /// Packs uploaded.
    pub packs: u64,
}

/// Which chunks the target has: its pack indexes as read at the start, and
/// the chunks this backup stored since.
struct Dedup {
    index: ChunkIndex,
    stored: HashSet<ObjectId>,
}

impl Dedup {
    /// True if `id` is new (and from now on counts as stored).
    fn claim(&mut self, id: ObjectId) -> bool {
        !self.index.contains(&id) && self.stored.insert(id)
    }
}

struct Ctx<'a, S> {
    target: &'a Target,
    l: Arc<Loaded>,
    source: &'a S,
    progress: &'a dyn Progress,
    dedup: Mutex<Dedup>,
    packs: PackWriter<'a>,
    bytes_read: AtomicU64,
    bytes_uploaded: AtomicU64,
    chunks_new: AtomicU64,
    chunks_reused: AtomicU64,
    data_bytes: AtomicU64,
    timings: Arc<Timings>,
}

fn src_err<'a>(volume: &'a str, op: &'static str) -> impl Fn(SourceError) -> BackupError + 'a {
    move |source| BackupError::Source {
        volume: volume.to_string(),
        op,
        source,
    }
}

/// A new backup id: UTC time to the millisecond (so ids sort by time) and
/// 32 random bits.
pub(crate) fn new_id() -> String {
    format!(
        "{}-{:08x}",
        chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ"),
        rand::random::<u32>()
    )
}

/// Backs up `source` to `target`. See the module docs.
pub async fn create_backup<S: SnapshotSource>(
    target: &Target,
    source: &S,
    opts: &BackupOptions,
    progress: &dyn Progress,
) -> Result<BackupSummary> {
    let volume = source.volume().to_string();
    check_name(&volume)?;
    let l = target
        .loaded(true)
        .await?
        .ok_or_else(|| BackupError::Invalid("target config vanished".into()))?;
    format::geometry(source.size(), l.config.chunk_size, l.config.page_chunks)
        .map_err(|e| BackupError::Invalid(format!("volume {volume:?}: {}", e.0)))?;
    let id = match &opts.id {
        Some(id) => {
            check_name(id)?;
            if target.store.exists(&manifest_key(&volume, id)).await? {
                return Err(BackupError::Exists {
                    target: target.url().to_string(),
                    id: format!("{volume}/{id}"),
                });
            }
            id.clone()
        }
        None => new_id(),
    };
    let lock = Lock::acquire(target, "backup", &volume, &id).await?;
    let res = run(target, l, source, opts, progress, &id, &lock).await;
    lock.release().await;
    res
}

async fn parent_of<S: SnapshotSource>(
    target: &Target,
    l: &Loaded,
    source: &S,
) -> Result<Option<Manifest>> {
    let volume = source.volume();
    let mut keys: Vec<String> = target
        .store
        .list(&format!("manifests/{volume}/"))
        .await?
        .into_iter()
        .map(|o| o.key)
        .collect();
    keys.sort();
    for key in keys.iter().rev() {
        let m = match target.get_manifest(l, key).await {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!("volume {volume}: skipping unreadable backup {key}: {e}");
                continue;
            }
        };
        // A parent of the same size, or of a smaller one that ends on a
        // chunk boundary (the volume grew since: the new range is read as
        // changed, the rest reused).
        let grown_cleanly =
            m.size < source.size() && m.size.is_multiple_of(l.config.chunk_size as u64);
        if (m.size != source.size() && !grown_cleanly)
            || m.chunk_size != l.config.chunk_size
            || m.page_chunks != l.config.page_chunks
        {
            return Ok(None);
        }
        let has = source
            .has_snapshot(&m.snapshot)
            .await
            .map_err(src_err(volume, "has_snapshot"))?;
        return Ok(has.then_some(m));
    }
    Ok(None)
}

async fn run<S: SnapshotSource>(
    target: &Target,
    l: Arc<Loaded>,
    source: &S,
    opts: &BackupOptions,
    progress: &dyn Progress,
    id: &str,
    lock: &Lock,
) -> Result<BackupSummary> {
    let t0 = Instant::now();
    let volume = source.volume();
    let size = source.size();
    let chunk_size = l.config.chunk_size as u64;
    let page_chunks = l.config.page_chunks;
    let window = chunk_size * page_chunks as u64;
    let (_, n_pages) = format::geometry(size, l.config.chunk_size, page_chunks)
        .map_err(|e| BackupError::Invalid(e.0))?;

    let parent = if opts.full {
        None
    } else {
        parent_of(target, &l, source).await?
    };
    let base = parent.as_ref().map(|m| m.snapshot.clone());
    tracing::info!(
        "volume {volume}: backup {id} of snapshot {:?} to {}, {}",
        source.snapshot(),
        target.url(),
        match &parent {
            Some(p) => format!("incremental to {} (snapshot {:?})", p.id, p.snapshot),
            None => "full".to_string(),
        }
    );

    // First pass: how much will be read (for the progress bar).
    let mut to_read = 0u64;
    for p in 0..n_pages {
        let off = p * window;
        let len = window.min(size - off);
        let ext = source
            .changed(base.as_deref(), off, len)
            .await
            .map_err(src_err(volume, "changed"))?;
        to_read += plan(&ext, off, len, chunk_size)
            .0
            .values()
            .map(|c| c.len)
            .sum::<u64>();
    }
    let timings = Arc::new(Timings::default());
    let index = timings
        .time_async(Stage::Lookup, ChunkIndex::load(target, &l))
        .await?;
    let target_chunks = index.len() as u64;
    progress.start(&format!("backup {volume}"), to_read, true);

    let ctx = Ctx {
        target,
        l: l.clone(),
        source,
        progress,
        dedup: Mutex::new(Dedup {
            index,
            stored: HashSet::new(),
        }),
        packs: PackWriter::new(target, l.clone(), timings.clone()),
        bytes_read: AtomicU64::new(0),
        bytes_uploaded: AtomicU64::new(0),
        chunks_new: AtomicU64::new(0),
        chunks_reused: AtomicU64::new(0),
        data_bytes: AtomicU64::new(0),
        timings,
    };
    let pages = match write_pages(&ctx, parent.as_ref(), n_pages).await {
        Ok(pages) => pages,
        Err(e) => {
            // The packs already uploaded are indexed, so a retry reuses them.
            if let Err(ie) = ctx.packs.write_index(true).await {
                tracing::warn!(
                    "volume {volume}: cannot index the packs of failed backup {id}: {ie}"
                );
            }
            return Err(e);
        }
    };
    progress.finish();

    if !lock.still_held().await? {
        return Err(BackupError::Invalid(format!(
            "volume {volume}: backup {id} lost its lock (removed as stale by gc); run it again"
        )));
    }
    let mut m = Manifest {
        id: id.to_string(),
        volume: volume.to_string(),
        snapshot: source.snapshot().to_string(),
        parent: parent.as_ref().map(|p| p.id.clone()),
        created: chrono::Utc::now().timestamp_millis(),
        size,
        chunk_size: l.config.chunk_size,
        page_chunks,
        stats: BackupStats::default(),
        pages,
    };
    let key = manifest_key(volume, id);
    // The manifest's own size is counted in an estimate before sealing.
    let stats = BackupStats {
        data_bytes: ctx.data_bytes.load(Ordering::Relaxed),
        bytes_read: ctx.bytes_read.load(Ordering::Relaxed),
        bytes_uploaded: ctx.bytes_uploaded.load(Ordering::Relaxed),
        chunks_new: ctx.chunks_new.load(Ordering::Relaxed),
        chunks_reused: ctx.chunks_reused.load(Ordering::Relaxed),
        duration_ms: t0.elapsed().as_millis() as u64,
    };
    m.stats = stats;
    let plain = m.encode().map_err(|e| BackupError::Invalid(e.0))?;
    let obj = l
        .keys
        .seal(Kind::Manifest, &key, &plain)
        .map_err(BackupError::Invalid)?;
    target.store.put(&key, Bytes::from(obj)).await?;
    tracing::info!(
        "volume {volume}: backup {id} done: read {} MiB, uploaded {} MiB in {} packs, {} new chunks, {} reused, {:.1}s",
        m.stats.bytes_read >> 20,
        m.stats.bytes_uploaded >> 20,
        ctx.packs.uploaded(),
        m.stats.chunks_new,
        m.stats.chunks_reused,
        t0.elapsed().as_secs_f64()
    );
    tracing::info!(
        "volume {volume}: backup {id} busy time per stage: {}",
        ctx.timings.report()
    );
    Ok(BackupSummary {
        id: id.to_string(),
        volume: volume.to_string(),
        snapshot: m.snapshot,
        parent: m.parent,
        size,
        stats: m.stats,
        timings: ctx.timings.report(),
        target_chunks,
        packs: ctx.packs.uploaded(),
    })
}

/// Stores every window's chunks and index page; returns the page list of
/// the manifest. The packs are uploaded and indexed when it returns Ok.
async fn write_pages<S: SnapshotSource>(
    ctx: &Ctx<'_, S>,
    parent: Option<&Manifest>,
    n_pages: u64,
) -> Result<Vec<Option<ObjectId>>> {
    let (target, l, source) = (ctx.target, &ctx.l, ctx.source);
    let volume = source.volume();
    let size = source.size();
    let chunk_size = l.config.chunk_size as u64;
    let page_chunks = l.config.page_chunks;
    let window = chunk_size * page_chunks as u64;
    let base = parent.map(|m| m.snapshot.clone());
    let mut pages = Vec::with_capacity(n_pages as usize);
    for p in 0..n_pages {
        let off = p * window;
        let len = window.min(size - off);
        let first_chunk = p * page_chunks as u64;
        let n = len.div_ceil(chunk_size) as usize;
        let parent_page = parent.and_then(|m| m.pages.get(p as usize).copied().flatten());
        let mut entries = match (parent, parent_page) {
            (Some(_), Some(pid)) => {
                let mut page = target.get_page(l, pid).await?;
                // The parent's last page, shorter when the volume was smaller.
                let parent_size = parent.map_or(size, |m| m.size);
                if parent_size < size && page.entries.len() < n {
                    page.entries.resize(n, Entry::Zero);
                }
                if page.first_chunk != first_chunk || page.entries.len() != n {
                    return Err(BackupError::Corrupt {
                        target: target.url().to_string(),
                        key: page_key(&pid),
                        reason: format!("does not describe chunks {first_chunk}..+{n}"),
                    });
                }
                page.entries
            }
            _ => vec![Entry::Zero; n],
        };
        let ext = source
            .changed(base.as_deref(), off, len)
            .await
            .map_err(src_err(volume, "changed"))?;
        let (reads, zeros) = plan(&ext, off, len, chunk_size);
        for i in zeros {
            entries[i] = Entry::Zero;
        }
        // After the first error no new chunk starts, but the ones under way
        // finish before the error is returned: an upload must not outlive
        // the backup (and its lock), even one that failed.
        let failed = AtomicBool::new(false);
        let results: Vec<Result<Option<(usize, Entry)>>> = futures::stream::iter(reads)
            .map(|(i, c)| {
                let failed = &failed;
                async move {
                    if failed.load(Ordering::Acquire) {
                        return Ok(None);
                    }
                    let r = ctx.chunk(c.offset, c.len).await;
                    if r.is_err() {
                        failed.store(true, Ordering::Release);
                    }
                    r.map(|e| Some((i, e)))
                }
            })
            .buffer_unordered(target.opts.parallel)
            .collect()
            .await;
        for r in results {
            if let Some((i, e)) = r? {
                entries[i] = e;
            }
        }
        for (i, e) in entries.iter().enumerate() {
            if matches!(e, Entry::Data(_)) {
                let c_off = off + i as u64 * chunk_size;
                ctx.data_bytes
                    .fetch_add(chunk_size.min(size - c_off), Ordering::Relaxed);
            }
        }
        let page = IndexPage {
            first_chunk,
            entries,
        };
        pages.push(if page.is_zero() {
            None
        } else {
            let plain = page.encode();
            let pid = l.keys.chunk_id(&plain);
            if Some(pid) != parent_page {
                let key = page_key(&pid);
                if !target.store.exists(&key).await? {
                    let obj = l
                        .keys
                        .seal(Kind::IndexPage, &key, &plain)
                        .map_err(BackupError::Invalid)?;
                    ctx.bytes_uploaded
                        .fetch_add(obj.len() as u64, Ordering::Relaxed);
                    target.store.put(&key, Bytes::from(obj)).await?;
                }
            }
            Some(pid)
        });
    }
    ctx.packs.finish().await?;
    ctx.bytes_uploaded
        .fetch_add(ctx.packs.index_bytes(), Ordering::Relaxed);
    Ok(pages)
}

/// A chunk to read.
#[derive(Debug, Clone, Copy)]
struct ChunkRead {
    offset: u64,
    len: u64,
}

/// Which chunks of the window `[off, off+len)` to read (index within the
/// page → range), and which are wholly covered by zero extents (recorded
/// as zero without reading).
fn plan(
    extents: &[crate::source::Extent],
    off: u64,
    len: u64,
    chunk_size: u64,
) -> (BTreeMap<usize, ChunkRead>, Vec<usize>) {
    let end = off + len;
    let mut data: BTreeMap<usize, ChunkRead> = BTreeMap::new();
    let mut zero_cover: BTreeMap<usize, u64> = BTreeMap::new();
    for e in extents {
        let s = e.offset.max(off);
        let t = e.offset.saturating_add(e.len).min(end);
        if s >= t {
            continue;
        }
        let first = ((s - off) / chunk_size) as usize;
        let last = ((t - 1 - off) / chunk_size) as usize;
        for i in first..=last {
            let c_off = off + i as u64 * chunk_size;
            let c_len = chunk_size.min(end - c_off);
            match e.kind {
                ExtentKind::Data => {
                    data.insert(
                        i,
                        ChunkRead {
                            offset: c_off,
                            len: c_len,
                        },
                    );
                }
                ExtentKind::Zero => {
                    let covered = t.min(c_off + c_len) - s.max(c_off);
                    *zero_cover.entry(i).or_default() += covered;
                }
            }
        }
    }
    let mut zeros = Vec::new();
    for (i, covered) in zero_cover {
        if data.contains_key(&i) {
            continue;
        }
        let c_off = off + i as u64 * chunk_size;
        let c_len = chunk_size.min(end - c_off);
        if covered >= c_len {
            zeros.push(i);
        } else {
            // Partly zeroed: the rest is the parent's data; read it whole.
            data.insert(
                i,
                ChunkRead {
                    offset: c_off,
                    len: c_len,
                },
            );
        }
    }
    (data, zeros)
}

impl<S: SnapshotSource> Ctx<'_, S> {
    /// Reads one chunk, stores it unless the target has it, returns its entry.
    async fn chunk(&self, offset: u64, len: u64) -> Result<Entry> {
        let volume = self.source.volume();
        let data = self
            .timings
            .time_async(Stage::Read, self.source.read(offset, len as u32))
            .await
            .map_err(src_err(volume, "read"))?;
        if data.len() as u64 != len {
            return Err(BackupError::Source {
                volume: volume.to_string(),
                op: "read",
                source: SourceError::Other(format!(
                    "read at offset {offset} returned {} bytes, asked {len}",
                    data.len()
                )),
            });
        }
        self.bytes_read.fetch_add(len, Ordering::Relaxed);
        self.progress.advance(len);
        let (l, timings) = (self.l.clone(), self.timings.clone());
        let d2 = data.clone();
        let id = tokio::task::spawn_blocking(move || {
            timings.time(Stage::Hash, || {
                if is_zero(&d2) {
                    None
                } else {
                    Some(l.keys.chunk_id(&d2))
                }
            })
        })
        .await
        .map_err(|e| BackupError::Invalid(format!("hash task failed: {e}")))?;
        let Some(id) = id else {
            return Ok(Entry::Zero);
        };
        let new = self.dedup.lock().map(|mut d| d.claim(id)).unwrap_or(true);
        if new {
            let (l, timings) = (self.l.clone(), self.timings.clone());
            let key = chunk_key(&id);
            let obj = tokio::task::spawn_blocking(move || {
                let compressed = timings.time(Stage::Compress, || l.keys.compress(&data))?;
                timings.time(Stage::Encrypt, || {
                    l.keys
                        .seal_compressed(Kind::Chunk, &key, &data, compressed.as_deref())
                })
            })
            .await
            .map_err(|e| BackupError::Invalid(format!("seal task failed: {e}")))?
            .map_err(BackupError::Invalid)?;
            self.packs.add(id, &obj).await?;
            self.bytes_uploaded
                .fetch_add(obj.len() as u64, Ordering::Relaxed);
            self.chunks_new.fetch_add(1, Ordering::Relaxed);
        } else {
            self.chunks_reused.fetch_add(1, Ordering::Relaxed);
        }
        Ok(Entry::Data(id))
    }
}

/// True if every byte of `data` is zero (64 bytes at a time: the OR of a
/// block vectorizes; the first non-zero block ends the scan).
pub(crate) fn is_zero(data: &[u8]) -> bool {
    let mut blocks = data.chunks_exact(64);
    let zero_blocks = blocks
        .by_ref()
        .all(|b| b.iter().fold(0u8, |acc, &x| acc | x) == 0);
    zero_blocks && blocks.remainder().iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::Extent;

    #[test]
    fn plan_covers_touched_chunks() {
        let cs = 1 << 20;
        let ext = [
            Extent {
                offset: 4096,
                len: 4096,
                kind: ExtentKind::Data,
            },
            Extent {
                offset: (2 << 20) - 4096,
                len: 8192,
                kind: ExtentKind::Data,
            },
            Extent {
                offset: 5 << 20,
                len: 1 << 20,
                kind: ExtentKind::Zero,
            },
            Extent {
                offset: 7 << 20,
                len: 4096,
                kind: ExtentKind::Zero,
            },
        ];
        let (reads, zeros) = plan(&ext, 0, 8 << 20, cs);
        assert_eq!(reads.keys().copied().collect::<Vec<_>>(), vec![0, 1, 2, 7]);
        assert_eq!(zeros, vec![5]);
        // Clipped to a window, short last chunk.
        let (reads, _) = plan(&ext, 1 << 20, (1 << 20) + 100, cs);
        assert_eq!(reads.len(), 2);
        assert_eq!(reads[&1].len, 100);
    }
}
