//! Listing and housekeeping: `list`, `show`, `remove`, `forget` (retention)
//! and `gc`.
//!
//! `remove` and `forget` only delete manifests: a running backup never
//! depends on another backup's manifest after it has read its parent's
//! pages, and the chunks stay until gc. `gc` is mark and sweep over object
//! listings: it reads every manifest and every index page it names (small
//! metadata, each page once) and every pack index; then it lists `packs/`,
//! `chunks/` and `index/`. It deletes the packs and objects no manifest
//! reaches, and repacks a pack whose unused share is
//! [`GcOptions::repack_unused_percent`] or more: its chunks still in use
//! are copied into new packs (the only data gc reads), and the old pack is
//! deleted. Then it writes one merged pack index (split every 65536
//! chunks) in place of the ones it read. The order keeps every chunk a
//! manifest needs reachable at every step: new packs, then the new index,
//! then the old indexes, then the packs. Its cost grows with the number of
//! manifests, pages and listed objects. It coordinates with running
//! backups and restores through `locks.rs`: with a live one it deletes
//! nothing and says which lock deferred it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, TimeZone, Utc};
use futures::{StreamExt, TryStreamExt};

use crate::envelope::ObjectId;
use crate::error::{BackupError, Result};
use crate::format::{BackupStats, Entry, Manifest, PackEntry, PackIndex, MAX_PACK_INDEX_CHUNKS};
use crate::locks::{list_locks, server_now};
use crate::pack::{get_pack_index, list_pack_indexes, put_pack_index, PackWriter};
use crate::progress::Progress;
use crate::schedule::Retention;
use crate::target::{check_name, pack_key, Loaded, Target, GC_LOCK};
use crate::timing::Timings;

/// One backup as listed.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BackupInfo {
    pub id: String,
    pub volume: String,
    pub snapshot: String,
    pub parent: Option<String>,
    /// RFC 3339, UTC.
    pub created: String,
    #[serde(skip)]
    pub created_at: DateTime<Utc>,
    pub size: u64,
    #[serde(flatten)]
    pub stats: BackupStats,
    pub chunk_size: u32,
    /// Index pages that hold data (the others are all zero).
    pub pages: u64,
}

impl From<&Manifest> for BackupInfo {
    fn from(m: &Manifest) -> Self {
        let created_at = Utc
            .timestamp_millis_opt(m.created)
            .single()
            .unwrap_or_default();
        Self {
            id: m.id.clone(),
            volume: m.volume.clone(),
            snapshot: m.snapshot.clone(),
            parent: m.parent.clone(),
            created: created_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            created_at,
            size: m.size,
            stats: m.stats.clone(),
            chunk_size: m.chunk_size,
            pages: m.pages.iter().flatten().count() as u64,
        }
    }
}

async fn manifests(
    target: &Target,
    l: &Loaded,
    volume: Option<&str>,
) -> Result<Vec<(String, Manifest)>> {
    let prefix = match volume {
        Some(v) => {
            check_name(v)?;
            format!("manifests/{v}/")
        }
        None => "manifests/".to_string(),
    };
    let keys: Vec<String> = target
        .store
        .list(&prefix)
        .await?
        .into_iter()
        .map(|o| o.key)
        .collect();
    futures::stream::iter(keys)
        .map(|k| async move { target.get_manifest(l, &k).await.map(|m| (k, m)) })
        .buffered(target.opts.parallel)
        .try_collect()
        .await
}

/// Every complete backup (of one volume, or all), oldest first.
pub async fn list(target: &Target, volume: Option<&str>) -> Result<Vec<BackupInfo>> {
    let Some(l) = target.loaded(false).await? else {
        return Ok(Vec::new());
    };
    let mut v: Vec<BackupInfo> = manifests(target, &l, volume)
        .await?
        .iter()
        .map(|(_, m)| BackupInfo::from(m))
        .collect();
    v.sort_by(|a, b| (&a.volume, a.created_at, &a.id).cmp(&(&b.volume, b.created_at, &b.id)));
    Ok(v)
}

/// One backup (`ID` or `VOLUME/ID`).
pub async fn show(target: &Target, id: &str) -> Result<BackupInfo> {
    let l = target.require().await?;
    let key = target.find_backup(id).await?;
    Ok(BackupInfo::from(&target.get_manifest(&l, &key).await?))
}

/// Deletes one backup's manifest (its chunks go at the next gc).
pub async fn remove(target: &Target, id: &str) -> Result<BackupInfo> {
    let l = target.require().await?;
    let key = target.find_backup(id).await?;
    let info = BackupInfo::from(&target.get_manifest(&l, &key).await?);
    target.store.delete(&key).await?;
    Ok(info)
}

/// What forget kept and removed.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ForgetReport {
    pub kept: Vec<BackupInfo>,
    pub removed: Vec<BackupInfo>,
}

/// Applies `retention` to each volume's backups (or one volume's);
/// `dry_run` only reports.
pub async fn forget(
    target: &Target,
    volume: Option<&str>,
    retention: &Retention,
    dry_run: bool,
) -> Result<ForgetReport> {
    if retention.is_empty() {
        return Err(BackupError::Invalid(
            "a retention policy that keeps nothing would remove every backup: give --keep-last, --keep-daily or --keep-weekly".into(),
        ));
    }
    let Some(l) = target.loaded(false).await? else {
        return Ok(ForgetReport::default());
    };
    let mut by_volume: BTreeMap<String, Vec<(String, BackupInfo)>> = BTreeMap::new();
    for (k, m) in manifests(target, &l, volume).await? {
        by_volume
            .entry(m.volume.clone())
            .or_default()
            .push((k, BackupInfo::from(&m)));
    }
    let mut report = ForgetReport::default();
    for (_, mut v) in by_volume {
        v.sort_by(|a, b| (b.1.created_at, &b.1.id).cmp(&(a.1.created_at, &a.1.id)));
        let times: Vec<_> = v.iter().map(|(_, i)| i.created_at).collect();
        let keep = retention.select(&times);
        for ((key, info), k) in v.into_iter().zip(keep) {
            if k {
                report.kept.push(info);
            } else {
                if !dry_run {
                    target.store.delete(&key).await?;
                }
                report.removed.push(info);
            }
        }
    }
    Ok(report)
}

/// Choices for gc.
#[derive(Debug, Clone)]
pub struct GcOptions {
    /// Report what would be deleted, delete nothing.
    pub dry_run: bool,
    /// Repack a pack once this share of its bytes (0-100) belongs to
    /// chunks no backup uses; 100: never repack, only delete packs that
    /// are wholly unused.
    pub repack_unused_percent: u8,
}

impl Default for GcOptions {
    fn default() -> Self {
        Self {
            dry_run: false,
            repack_unused_percent: 25,
        }
    }
}

/// What gc found and did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct GcReport {
    pub manifests: u64,
    pub pages_referenced: u64,
    pub chunks_referenced: u64,
    pub objects_listed: u64,
    /// Objects no manifest reaches (packs none of whose chunks is used,
    /// packs no index lists, index pages, chunks stored on their own).
    pub unreferenced: u64,
    pub unreferenced_bytes: u64,
    /// Bytes of unused chunks left inside packs that stay (below the
    /// repack threshold).
    pub unused_in_packs_bytes: u64,
    /// Packs whose used chunks were copied into new packs.
    pub packs_repacked: u64,
    /// Bytes uploaded by repacking.
    pub repacked_bytes: u64,
    /// Pack index objects before and after.
    pub pack_indexes_read: u64,
    pub pack_indexes_written: u64,
    pub deleted: u64,
    pub deleted_bytes: u64,
    /// Stale locks of dead backups removed.
    pub stale_locks_removed: u64,
    /// Set when a running backup or restore kept gc from deleting.
    pub deferred_by: Vec<String>,
    pub duration_ms: u64,
}

struct Marks {
    seen_manifests: HashSet<String>,
    pages: HashSet<ObjectId>,
    chunks: HashSet<ObjectId>,
}

async fn mark(
    target: &Target,
    l: &Loaded,
    marks: &mut Marks,
    progress: &dyn Progress,
) -> Result<()> {
    let keys: Vec<String> = target
        .store
        .list("manifests/")
        .await?
        .into_iter()
        .map(|o| o.key)
        .filter(|k| !marks.seen_manifests.contains(k))
        .collect();
    progress.start(
        "gc: read manifests and index pages",
        keys.len() as u64,
        false,
    );
    let ms: Vec<(String, Manifest)> = futures::stream::iter(keys)
        .map(|k| async move { target.get_manifest(l, &k).await.map(|m| (k, m)) })
        .buffered(target.opts.parallel)
        .try_collect()
        .await?;
    for (k, m) in ms {
        marks.seen_manifests.insert(k);
        let new_pages: Vec<ObjectId> = m
            .pages
            .iter()
            .flatten()
            .filter(|p| marks.pages.insert(**p))
            .copied()
            .collect();
        let pages: Vec<_> = futures::stream::iter(new_pages)
            .map(|p| target.get_page(l, p))
            .buffer_unordered(target.opts.parallel)
            .try_collect()
            .await?;
        for page in pages {
            for e in page.entries {
                if let Entry::Data(id) = e {
                    marks.chunks.insert(id);
                }
            }
        }
        progress.advance(1);
    }
    progress.finish();
    Ok(())
}

/// Deletes every chunk and index page no manifest reaches. See the module
/// docs and `locks.rs` for why this is safe beside running backups.
pub async fn gc(target: &Target, opts: &GcOptions, progress: &dyn Progress) -> Result<GcReport> {
    let t0 = Instant::now();
    let Some(l) = target.loaded(false).await? else {
        return Ok(GcReport::default());
    };
    let mut marks = Marks {
        seen_manifests: HashSet::new(),
        pages: HashSet::new(),
        chunks: HashSet::new(),
    };
    // Mark without the gc lock (backups go on), then lock and catch up
    // with manifests written meanwhile.
    mark(target, &l, &mut marks, progress).await?;
    target
        .store
        .put(GC_LOCK, bytes::Bytes::from_static(b"{}"))
        .await?;
    let res = sweep(target, &l, &mut marks, opts, progress).await;
    if let Err(e) = target.store.delete(GC_LOCK).await {
        tracing::warn!("cannot remove {GC_LOCK}: {e}");
    }
    let mut report = res?;
    report.duration_ms = t0.elapsed().as_millis() as u64;
    Ok(report)
}

async fn sweep(
    target: &Target,
    l: &Arc<Loaded>,
    marks: &mut Marks,
    opts: &GcOptions,
    progress: &dyn Progress,
) -> Result<GcReport> {
    let mut report = GcReport::default();
    let now = server_now(&target.store, GC_LOCK).await;
    let (live, stale) = list_locks(target, now).await?;
    if !opts.dry_run {
        for k in &stale {
            tracing::info!("gc: removing stale lock {k}");
            target.store.delete(k).await?;
            report.stale_locks_removed += 1;
        }
    }
    report.deferred_by = live;
    mark(target, l, marks, progress).await?;
    report.manifests = marks.seen_manifests.len() as u64;
    report.pages_referenced = marks.pages.len() as u64;
    report.chunks_referenced = marks.chunks.len() as u64;
    let mut doomed = Vec::new();
    for (prefix, set) in [("index/", &marks.pages), ("chunks/", &marks.chunks)] {
        for o in target.store.list(prefix).await? {
            report.objects_listed += 1;
            let name = o.key.rsplit('/').next().unwrap_or("");
            let referenced = ObjectId::from_hex(name).is_some_and(|id| set.contains(&id));
            if !referenced {
                report.unreferenced += 1;
                report.unreferenced_bytes += o.size;
                doomed.push(o);
            }
        }
    }
    let mut packs = plan_packs(target, l, marks, opts, &mut report).await?;
    for key in &packs.doomed {
        report.unreferenced += 1;
        report.unreferenced_bytes += key.size;
    }
    if opts.dry_run || !report.deferred_by.is_empty() {
        if !report.deferred_by.is_empty() {
            tracing::info!(
                "gc: {} unreferenced objects kept: in use by {}",
                report.unreferenced,
                report.deferred_by.join(", ")
            );
        }
        return Ok(report);
    }
    let new_index = repack(target, l, &mut packs, &mut report, progress).await?;
    // The merged index, then the old ones go, then the packs.
    let mut written = HashSet::new();
    for part in split_index(new_index) {
        let (key, n) = put_pack_index(target, l, &part, true).await?;
        if n > 0 {
            report.pack_indexes_written += 1;
        }
        written.insert(key);
    }
    for key in &packs.index_keys {
        if !written.contains(key) {
            target.store.delete(key).await?;
        }
    }
    doomed.extend(packs.doomed);
    doomed.extend(packs.repacked);
    progress.start("gc: delete", doomed.len() as u64, false);
    let sizes: Vec<u64> = futures::stream::iter(doomed)
        .map(|o| async move {
            target.store.delete(&o.key).await?;
            progress.advance(1);
            Ok::<u64, BackupError>(o.size)
        })
        .buffer_unordered(target.opts.parallel * 4)
        .try_collect()
        .await?;
    progress.finish();
    report.deleted = sizes.len() as u64;
    report.deleted_bytes = sizes.iter().sum();
    Ok(report)
}

/// What gc found in the packs.
struct PackPlan {
    /// The pack index objects read.
    index_keys: Vec<String>,
    /// Packs kept as they are, with every chunk they hold (used or not:
    /// a later backup may use it again).
    kept: BTreeMap<ObjectId, Vec<PackEntry>>,
    /// Packs to repack, with the chunks still used in them.
    to_repack: Vec<(crate::store::ObjectInfo, Vec<PackEntry>)>,
    /// Packs no backup uses, or no index lists.
    doomed: Vec<crate::store::ObjectInfo>,
    /// Filled in by [`repack`]: the packs repacked, to delete last.
    repacked: Vec<crate::store::ObjectInfo>,
}

/// Sorts every listed pack into kept, to repack, or doomed, from the pack
/// indexes and the marked chunks.
async fn plan_packs(
    target: &Target,
    l: &Loaded,
    marks: &Marks,
    opts: &GcOptions,
    report: &mut GcReport,
) -> Result<PackPlan> {
    let index_keys = list_pack_indexes(target).await?;
    report.pack_indexes_read = index_keys.len() as u64;
    // A running backup (gc then deletes nothing) may replace its
    // checkpoint index after the listing: a vanished index is skipped.
    let indexes: Vec<PackIndex> = futures::stream::iter(index_keys.clone())
        .map(|k| async move {
            match get_pack_index(target, l, &k).await {
                Err(BackupError::Missing { .. }) => Ok(None),
                r => r.map(Some),
            }
        })
        .buffered(target.opts.parallel)
        .try_collect::<Vec<_>>()
        .await?
        .into_iter()
        .flatten()
        .collect();
    let mut listed: HashMap<ObjectId, crate::store::ObjectInfo> = HashMap::new();
    let mut doomed = Vec::new();
    for o in target.store.list("packs/").await? {
        report.objects_listed += 1;
        match ObjectId::from_hex(o.key.rsplit('/').next().unwrap_or("")) {
            Some(id) if o.key == pack_key(&id) => {
                listed.insert(id, o);
            }
            _ => doomed.push(o),
        }
    }
    // Every chunk each pack holds, each chunk counted in its first place
    // only (where restore reads it).
    let mut placed: HashSet<ObjectId> = HashSet::new();
    let mut holds: BTreeMap<ObjectId, Vec<PackEntry>> = BTreeMap::new();
    for (pack, entries) in indexes.into_iter().flat_map(|ix| ix.packs) {
        let Some(info) = listed.get(&pack) else {
            tracing::warn!(
                "gc: a pack index lists {}, which does not exist",
                pack_key(&pack)
            );
            continue;
        };
        for e in entries {
            if e.offset as u64 + e.len as u64 > info.size {
                tracing::warn!(
                    "gc: a pack index places chunk {} past the end of {}",
                    e.chunk.hex(),
                    pack_key(&pack)
                );
                continue;
            }
            if placed.insert(e.chunk) {
                holds.entry(pack).or_default().push(e);
            }
        }
    }
    let mut plan = PackPlan {
        index_keys,
        kept: BTreeMap::new(),
        to_repack: Vec::new(),
        doomed,
        repacked: Vec::new(),
    };
    for (pack, info) in listed {
        let entries = holds.remove(&pack).unwrap_or_default();
        let used: Vec<PackEntry> = entries
            .iter()
            .filter(|e| marks.chunks.contains(&e.chunk))
            .copied()
            .collect();
        let used_bytes: u64 = used.iter().map(|e| e.len as u64).sum();
        let unused = info.size.saturating_sub(used_bytes);
        if used.is_empty() {
            plan.doomed.push(info);
        } else if unused * 100 >= info.size * opts.repack_unused_percent.min(100) as u64
            && opts.repack_unused_percent < 100
            && unused > 0
        {
            plan.to_repack.push((info, used));
        } else {
            report.unused_in_packs_bytes += unused;
            plan.kept.insert(pack, entries);
        }
    }
    Ok(plan)
}

/// Copies the used chunks of the packs to repack into new packs; returns
/// the merged index of the kept and the new packs. The gc lock is
/// rewritten before each pack so no backup takes it for stale.
async fn repack(
    target: &Target,
    l: &Arc<Loaded>,
    plan: &mut PackPlan,
    report: &mut GcReport,
    progress: &dyn Progress,
) -> Result<PackIndex> {
    let writer =
        PackWriter::with_checkpoints(target, l.clone(), Arc::new(Timings::default()), false);
    progress.start("gc: repack", plan.to_repack.len() as u64, false);
    for (info, used) in std::mem::take(&mut plan.to_repack) {
        target
            .store
            .put(GC_LOCK, bytes::Bytes::from_static(b"{}"))
            .await?;
        let data = target.store.get_required(&info.key).await?;
        for e in &used {
            let (s, t) = (e.offset as usize, e.offset as usize + e.len as usize);
            let Some(blob) = data.get(s..t) else {
                return Err(BackupError::Corrupt {
                    target: target.url().to_string(),
                    key: info.key.clone(),
                    reason: format!("shorter than its index says ({} bytes)", data.len()),
                });
            };
            writer.add(e.chunk, blob).await?;
            report.repacked_bytes += blob.len() as u64;
        }
        report.packs_repacked += 1;
        plan.repacked.push(info);
        progress.advance(1);
    }
    writer.finish_packs().await?;
    progress.finish();
    let mut merged = PackIndex {
        packs: std::mem::take(&mut plan.kept).into_iter().collect(),
    };
    merged.packs.extend(writer.take_unindexed().packs);
    merged.packs.sort_by_key(|(p, _)| *p);
    Ok(merged)
}

/// `index` cut into objects of at most [`MAX_PACK_INDEX_CHUNKS`] chunks,
/// between packs.
fn split_index(index: PackIndex) -> Vec<PackIndex> {
    let mut parts = vec![PackIndex::default()];
    for (pack, mut entries) in index.packs {
        entries.sort_by_key(|e| e.offset);
        let last = parts.last_mut().expect("one part");
        if !last.packs.is_empty() && last.chunks() + entries.len() > MAX_PACK_INDEX_CHUNKS {
            parts.push(PackIndex::default());
        }
        parts
            .last_mut()
            .expect("one part")
            .packs
            .push((pack, entries));
    }
    parts.retain(|p| !p.packs.is_empty());
    parts
}
