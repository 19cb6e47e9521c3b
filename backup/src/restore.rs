//! `restore` and `verify`: read a backup back.
//!
//! Restore reads the target's pack indexes, then runs one pipeline over
//! the manifest's index pages: each page's chunks are read pack by pack in
//! ranges of up to 8 MiB (`pack.rs`), at most `parallel × 2 × chunk_size`
//! bytes of ranges in flight across page boundaries, each chunk into a
//! buffer of its own; every chunk is checked (authentication tag or
//! checksum, then the keyed hash against its name) and only then written,
//! so memory stays at those ranges, decrypted in place. Chunks of targets
//! written before packs are read one object each. It stops at the first
//! missing or
//! corrupt object with an error naming it. Zero chunks and all-zero 4 KiB
//! blocks inside data chunks are not written to a sink that starts zeroed,
//! so a restored file stays sparse; on any other sink zero chunks become
//! `write_zeroes` runs (trims on a volume). `timing.rs` reports the busy
//! time of each stage.
//!
//! Verify checks that every object a backup needs exists (each pack a page
//! uses once, a chunk outside packs with a HEAD), or with `read` downloads
//! and checks them the way restore does, and reports every problem, not
//! just the first.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use futures::stream::FuturesUnordered;
use futures::StreamExt;

use crate::backup::is_zero;
use crate::envelope::ObjectId;
use crate::error::{BackupError, Result};
use crate::format::{Entry, IndexPage, Manifest};
use crate::locks::Lock;
use crate::pack::{plan_reads, read_blobs, Blob, ChunkIndex, RANGE_MAX};
use crate::progress::Progress;
use crate::source::{RestoreSink, SourceError};
use crate::target::{chunk_key, pack_key, page_key, Loaded, Target};
use crate::timing::{Stage, StageSeconds, Timings};

/// What a restore did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RestoreSummary {
    pub id: String,
    pub volume: String,
    pub snapshot: String,
    pub size: u64,
    /// Bytes of chunk data downloaded and checked.
    pub bytes_read: u64,
    /// Bytes written to the sink (zero blocks skipped on a zeroed sink).
    pub bytes_written: u64,
    pub duration_ms: u64,
    /// Busy seconds per stage, summed over the chunks (see `timing.rs`).
    pub timings: StageSeconds,
}

/// What verify checked.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VerifyReport {
    pub id: String,
    pub volume: String,
    pub pages: u64,
    pub chunks: u64,
    /// Bytes downloaded and checked (0 without `read`).
    pub bytes_read: u64,
}

const BLOCK: usize = 4096;

async fn load_page(
    target: &Target,
    l: &Loaded,
    m: &Manifest,
    p: usize,
    pid: ObjectId,
) -> Result<IndexPage> {
    let page = target.get_page(l, pid).await?;
    let first = p as u64 * m.page_chunks as u64;
    let chunks = m.size.div_ceil(m.chunk_size as u64);
    let n = (chunks - first).min(m.page_chunks as u64) as usize;
    if page.first_chunk != first || page.entries.len() != n {
        return Err(BackupError::Corrupt {
            target: target.url().to_string(),
            key: page_key(&pid),
            reason: format!("does not describe chunks {first}..+{n}"),
        });
    }
    Ok(page)
}

/// Restores backup `id` (`ID` or `VOLUME/ID`) into `sink`.
pub async fn restore<K: RestoreSink>(
    target: &Target,
    id: &str,
    sink: &K,
    progress: &dyn Progress,
) -> Result<RestoreSummary> {
    let t0 = Instant::now();
    let l = target.require().await?;
    let key = target.find_backup(id).await?;
    let m = target.get_manifest(&l, &key).await?;
    if sink.size() < m.size {
        return Err(BackupError::Invalid(format!(
            "backup {} of volume {:?} is {} bytes, the destination only {}",
            m.id,
            m.volume,
            m.size,
            sink.size()
        )));
    }
    let lock = Lock::acquire(target, "restore", &m.volume, &crate::backup::new_id()).await?;
    let timings = Arc::new(Timings::default());
    let res = async {
        let index = timings
            .time_async(Stage::Lookup, ChunkIndex::load(target, &l))
            .await?;
        restore_inner(target, &l, &index, &m, sink, progress, &timings).await
    }
    .await;
    lock.release().await;
    let (bytes_read, bytes_written) = res?;
    let timings = timings.report();
    tracing::info!(
        "volume {}: restore of {} busy time per stage: {timings}",
        m.volume,
        m.id
    );
    Ok(RestoreSummary {
        id: m.id.clone(),
        volume: m.volume.clone(),
        snapshot: m.snapshot.clone(),
        size: m.size,
        bytes_read,
        bytes_written,
        duration_ms: t0.elapsed().as_millis() as u64,
        timings,
    })
}

/// What every chunk of one restore shares.
struct RestoreCtx<'a, K> {
    target: &'a Target,
    l: &'a Arc<Loaded>,
    index: &'a ChunkIndex,
    m: &'a Manifest,
    sink: &'a K,
    progress: &'a dyn Progress,
    timings: &'a Arc<Timings>,
    zeroed: bool,
    read: AtomicU64,
    written: AtomicU64,
}

fn sink_error(m: &Manifest, op: &'static str, source: SourceError) -> BackupError {
    BackupError::Source {
        volume: m.volume.clone(),
        op,
        source,
    }
}

async fn restore_inner<K: RestoreSink>(
    target: &Target,
    l: &Arc<Loaded>,
    index: &ChunkIndex,
    m: &Manifest,
    sink: &K,
    progress: &dyn Progress,
    timings: &Arc<Timings>,
) -> Result<(u64, u64)> {
    let cs = m.chunk_size as u64;
    let window = cs * m.page_chunks as u64;
    let ctx = RestoreCtx {
        target,
        l,
        index,
        m,
        sink,
        progress,
        timings,
        zeroed: sink.starts_zeroed(),
        read: AtomicU64::new(0),
        written: AtomicU64::new(0),
    };
    progress.start(&format!("restore {}", m.volume), m.stats.data_bytes, true);
    // One pipeline over the whole backup: reads of the next page join the
    // slots as soon as slots free up, so the slots do not drain at a page
    // boundary (they are only not polled while the next page, one small
    // object per GiB, loads). Each slot holds one read from its download
    // to the end of its writes: a range of up to 8 MiB of a pack, or one
    // chunk object, decrypted in place: as many slots as keep the memory
    // bound of `parallel × 2 × chunk_size` (2 with the defaults: 3.9-4.5 s
    // and 38-40 MiB for the benchmark's restore; 4 slots took 3.9-4.1 s
    // at 49-56 MiB).
    let parallel =
        (target.opts.parallel as u64 * 2 * m.chunk_size as u64 / RANGE_MAX).max(1) as usize;
    let mut in_flight = FuturesUnordered::new();
    for (p, pid) in m.pages.iter().enumerate() {
        let off = p as u64 * window;
        let len = window.min(m.size - off);
        let Some(pid) = pid else {
            if !ctx.zeroed {
                timings
                    .time_async(Stage::Write, sink.write_zeroes(off, len))
                    .await
                    .map_err(|e| sink_error(m, "write zeroes", e))?;
            }
            continue;
        };
        let page = load_page(target, l, m, p, *pid).await?;
        if !ctx.zeroed {
            for (s, n) in zero_runs(&page.entries, off, cs, m.size) {
                timings
                    .time_async(Stage::Write, sink.write_zeroes(s, n))
                    .await
                    .map_err(|e| sink_error(m, "write zeroes", e))?;
            }
        }
        // Where each chunk goes (a chunk may fill several places).
        let mut places: HashMap<ObjectId, Vec<u64>> = HashMap::new();
        let mut order = Vec::new();
        for (i, e) in page.entries.iter().enumerate() {
            let Entry::Data(id) = e else { continue };
            let at = places.entry(*id).or_default();
            if at.is_empty() {
                order.push(*id);
            }
            at.push(off + i as u64 * cs);
        }
        let places = Arc::new(places);
        for read in reads_for(index, &order) {
            while in_flight.len() >= parallel {
                if let Some(r) = in_flight.next().await {
                    r?;
                }
            }
            in_flight.push(restore_read(&ctx, read, places.clone()));
        }
    }
    while let Some(r) = in_flight.next().await {
        r?;
    }
    timings
        .time_async(Stage::Write, sink.flush())
        .await
        .map_err(|e| sink_error(m, "flush", e))?;
    progress.finish();
    Ok((
        ctx.read.load(Ordering::Relaxed),
        ctx.written.load(Ordering::Relaxed),
    ))
}

/// One download of a restore.
enum Read {
    /// Blobs of one pack, read in one range.
    Pack(ObjectId, Vec<Blob>),
    /// A chunk stored as an object of its own (before packs).
    Loose(ObjectId),
}

/// The downloads that fetch `chunks`: ranges of packs (`plan_reads`), then
/// one object each for chunks no pack index lists.
fn reads_for(index: &ChunkIndex, chunks: &[ObjectId]) -> Vec<Read> {
    let mut reads: Vec<Read> = plan_reads(index, chunks)
        .into_iter()
        .map(|(pack, blobs)| Read::Pack(pack, blobs))
        .collect();
    reads.extend(
        chunks
            .iter()
            .filter(|id| !index.contains(id))
            .map(|id| Read::Loose(*id)),
    );
    reads
}

/// Downloads and checks one read, then writes each of its chunks to every
/// place `places` gives for it.
async fn restore_read<K: RestoreSink>(
    ctx: &RestoreCtx<'_, K>,
    read: Read,
    places: Arc<HashMap<ObjectId, Vec<u64>>>,
) -> Result<()> {
    let chunks = match read {
        Read::Pack(pack, blobs) => read_blobs(ctx.target, ctx.l, pack, blobs, ctx.timings).await?,
        Read::Loose(id) => vec![(
            id,
            ctx.target.get_loose_chunk(ctx.l, id, ctx.timings).await?,
        )],
    };
    // The chunks of a range are written at once, not one after another: a
    // volume takes each write to 3 replicas, and with 2 ranges in flight
    // one at a time would leave it 2 writes deep (8 before packs).
    let writes = chunks.into_iter().flat_map(|(id, data)| {
        places
            .get(&id)
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .map(move |&c_off| write_chunk(ctx, c_off, id, data.clone()))
            .collect::<Vec<_>>()
    });
    futures::future::try_join_all(writes).await?;
    Ok(())
}

/// Writes the checked chunk `id` at volume offset `c_off`.
async fn write_chunk<K: RestoreSink>(
    ctx: &RestoreCtx<'_, K>,
    c_off: u64,
    id: ObjectId,
    data: bytes::Bytes,
) -> Result<()> {
    let m = ctx.m;
    let c_len = (m.chunk_size as u64).min(m.size - c_off) as usize;
    if data.len() != c_len {
        let key = match ctx.index.get(&id) {
            Some(loc) => format!("{} (chunk {})", pack_key(&loc.pack), id.hex()),
            None => chunk_key(&id),
        };
        return Err(BackupError::Corrupt {
            target: ctx.target.url().to_string(),
            key,
            reason: format!(
                "holds {} bytes, the volume needs {c_len} at offset {c_off}",
                data.len()
            ),
        });
    }
    ctx.read.fetch_add(c_len as u64, Ordering::Relaxed);
    // On a zeroed sink only the runs of non-zero 4 KiB blocks are written
    // (usually the whole chunk, in one request).
    let runs = if ctx.zeroed {
        nonzero_runs(&data)
    } else {
        vec![(0, data.len())]
    };
    for (s, e) in runs {
        ctx.timings
            .time_async(
                Stage::Write,
                ctx.sink.write(c_off + s as u64, data.slice(s..e)),
            )
            .await
            .map_err(|e| sink_error(m, "write", e))?;
        ctx.written.fetch_add((e - s) as u64, Ordering::Relaxed);
    }
    ctx.progress.advance(c_len as u64);
    Ok(())
}

/// The runs of zero entries of a page starting at volume offset `off`, as
/// (offset, length) ranges of the volume.
fn zero_runs(entries: &[Entry], off: u64, cs: u64, size: u64) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        if *e != Entry::Zero {
            continue;
        }
        let c_off = off + i as u64 * cs;
        let c_len = cs.min(size - c_off);
        match runs.last_mut() {
            Some((s, n)) if *s + *n == c_off => *n += c_len,
            _ => runs.push((c_off, c_len)),
        }
    }
    runs
}

/// The runs of `data` made of 4 KiB blocks that are not all zero, as byte
/// ranges (the last block may be short).
fn nonzero_runs(data: &[u8]) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (b, block) in data.chunks(BLOCK).enumerate() {
        if is_zero(block) {
            continue;
        }
        let (s, e) = (b * BLOCK, b * BLOCK + block.len());
        match runs.last_mut() {
            Some((_, end)) if *end == s => *end = e,
            _ => runs.push((s, e)),
        }
    }
    runs
}

/// Downloads and checks one read for verify; returns the bytes checked,
/// or every problem: a pack range that fails is read again blob by blob,
/// so each bad chunk is named.
async fn read_and_check(
    target: &Target,
    l: &Arc<Loaded>,
    read: Read,
    timings: &Arc<Timings>,
) -> std::result::Result<u64, Vec<String>> {
    let sum =
        |chunks: Vec<(ObjectId, bytes::Bytes)>| chunks.iter().map(|(_, d)| d.len() as u64).sum();
    match read {
        Read::Loose(id) => target
            .get_loose_chunk(l, id, timings)
            .await
            .map(|d| d.len() as u64)
            .map_err(|e| vec![e.to_string()]),
        Read::Pack(pack, blobs) => {
            match read_blobs(target, l, pack, blobs.clone(), timings).await {
                Ok(chunks) => Ok(sum(chunks)),
                Err(_) if blobs.len() > 1 => {
                    let mut problems = Vec::new();
                    for b in blobs {
                        if let Err(e) = read_blobs(target, l, pack, vec![b], timings).await {
                            problems.push(e.to_string());
                        }
                    }
                    Err(problems)
                }
                Err(e) => Err(vec![e.to_string()]),
            }
        }
    }
}

/// Most problems listed by verify.
const MAX_PROBLEMS: usize = 100;

/// Checks backup `id`: every page and chunk present, and with `read`
/// downloaded and checked. Fails with [`BackupError::Verify`] listing the
/// problems.
pub async fn verify(
    target: &Target,
    id: &str,
    read: bool,
    progress: &dyn Progress,
) -> Result<VerifyReport> {
    let l = target.require().await?;
    let key = target.find_backup(id).await?;
    let m = target.get_manifest(&l, &key).await?;
    let mut problems: Vec<String> = Vec::new();
    let mut report = VerifyReport {
        id: m.id.clone(),
        volume: m.volume.clone(),
        pages: 0,
        chunks: 0,
        bytes_read: 0,
    };
    let bytes_read = AtomicU64::new(0);
    let timings = Arc::new(Timings::default());
    let index = ChunkIndex::load(target, &l).await?;
    // Packs found present (each asked about once).
    let packs_seen = std::sync::Mutex::new(HashSet::new());
    progress.start(
        &format!("verify {}", m.id),
        if read {
            m.stats.data_bytes
        } else {
            m.pages.iter().flatten().count() as u64
        },
        read,
    );
    for (p, pid) in m.pages.iter().enumerate() {
        let Some(pid) = pid else { continue };
        report.pages += 1;
        let page = match load_page(target, &l, &m, p, *pid).await {
            Ok(page) => page,
            Err(e) => {
                problems.push(e.to_string());
                continue;
            }
        };
        let ids: HashSet<ObjectId> = page
            .entries
            .iter()
            .filter_map(|e| match e {
                Entry::Data(id) => Some(*id),
                Entry::Zero => None,
            })
            .collect();
        report.chunks += ids.len() as u64;
        let order: Vec<ObjectId> = ids.into_iter().collect();
        let found: Vec<Vec<String>> = futures::stream::iter(reads_for(&index, &order))
            .map(|r| {
                let (l, timings) = (&l, &timings);
                let (bytes_read, packs_seen) = (&bytes_read, &packs_seen);
                async move {
                    if read {
                        let n = read_and_check(target, l, r, timings).await;
                        n.as_ref()
                            .map(|&n| {
                                bytes_read.fetch_add(n, Ordering::Relaxed);
                                progress.advance(n);
                            })
                            .ok();
                        n.err().unwrap_or_default()
                    } else {
                        let key = match &r {
                            Read::Pack(pack, _) => {
                                if !packs_seen
                                    .lock()
                                    .map(|mut s| s.insert(*pack))
                                    .unwrap_or(true)
                                {
                                    return Vec::new();
                                }
                                pack_key(pack)
                            }
                            Read::Loose(id) => chunk_key(id),
                        };
                        match target.store.exists(&key).await {
                            Ok(true) => Vec::new(),
                            Ok(false) => vec![BackupError::Missing {
                                target: target.url().to_string(),
                                key,
                            }
                            .to_string()],
                            Err(e) => vec![e.to_string()],
                        }
                    }
                }
            })
            .buffer_unordered(target.opts.parallel)
            .collect()
            .await;
        problems.extend(found.into_iter().flatten());
        if !read {
            progress.advance(1);
        }
        if problems.len() >= MAX_PROBLEMS {
            problems.truncate(MAX_PROBLEMS);
            problems.push("(more problems not listed)".into());
            break;
        }
    }
    progress.finish();
    report.bytes_read = bytes_read.load(Ordering::Relaxed);
    if problems.is_empty() {
        Ok(report)
    } else {
        problems.sort();
        Err(BackupError::Verify { id: m.id, problems })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pack::{get_pack_index, list_pack_indexes};
    use crate::TargetOptions;
    use crate::{create_backup, gc, BackupOptions, FileSink, FileSource, GcOptions, NoProgress};

    /// A target written before packs held each chunk as an object of its
    /// own, byte for byte what a blob in a pack is now. Such a target
    /// (made here by unpacking a new one) restores, verifies, takes a new
    /// incremental backup that reuses its chunks, and gc keeps them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_target_of_single_chunk_objects_still_restores_and_gc_keeps_it() {
        let tmp = tempfile::tempdir().unwrap();
        let img = tmp.path().join("disk.img");
        let mut data = vec![0u8; 24 << 20];
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for (i, b) in data.chunks_mut(8).enumerate() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Every third MiB compresses (a zstd blob), the rest does not.
            let v = if ((i * 8) >> 20) % 3 == 0 {
                (i as u64) / 512
            } else {
                x
            };
            b.copy_from_slice(&v.to_le_bytes());
        }
        std::fs::write(&img, &data).unwrap();
        let root = tmp.path().join("t");
        let url = format!("file://{}", root.display());
        let opts = TargetOptions {
            key: Some(b"legacy key of 16+ bytes".to_vec()),
            ..Default::default()
        };
        let target = Target::open(&url, &opts).await.unwrap();
        let src = FileSource::open(&img, "old", "s1").unwrap();
        let s = create_backup(&target, &src, &BackupOptions::default(), &NoProgress)
            .await
            .unwrap();
        // Unpack: every blob to chunks/<2 hex>/<64 hex>, packs and pack
        // indexes gone.
        let l = target.require().await.unwrap();
        let mut n = 0;
        for key in list_pack_indexes(&target).await.unwrap() {
            for (pack, entries) in get_pack_index(&target, &l, &key).await.unwrap().packs {
                let bytes = target
                    .store
                    .get_required(&crate::target::pack_key(&pack))
                    .await
                    .unwrap();
                for e in entries {
                    let blob = bytes.slice(e.offset as usize..(e.offset + e.len) as usize);
                    target.store.put(&chunk_key(&e.chunk), blob).await.unwrap();
                    n += 1;
                }
                target
                    .store
                    .delete(&crate::target::pack_key(&pack))
                    .await
                    .unwrap();
            }
            target.store.delete(&key).await.unwrap();
        }
        assert_eq!(n, 24);
        let check = |name: &str| {
            let out = tmp.path().join(name);
            (out.clone(), FileSink::create(&out, 24 << 20).unwrap())
        };
        let (out, sink) = check("r1.img");
        restore(&target, &s.id, &sink, &NoProgress).await.unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), data);
        verify(&target, &s.id, true, &NoProgress).await.unwrap();
        verify(&target, &s.id, false, &NoProgress).await.unwrap();

        // gc keeps the chunks a backup references, deletes the others.
        let l2 = l.clone();
        let stray = l2.keys.chunk_id(b"stray");
        target
            .store
            .put(&chunk_key(&stray), bytes::Bytes::from_static(b"x"))
            .await
            .unwrap();
        let g = gc(&target, &GcOptions::default(), &NoProgress)
            .await
            .unwrap();
        assert_eq!(g.deleted, 1, "{g:?}");
        let (out, sink) = check("r2.img");
        restore(&target, &s.id, &sink, &NoProgress).await.unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), data);

        // A new backup beside the old chunks. A file has no snapshots, so it
        // is a full backup, and chunks stored on their own are not looked
        // up: it stores all 24 again, in packs. (An incremental backup
        // takes the unchanged chunks from its parent's pages instead.)
        data[5 << 20..6 << 20].fill(7);
        std::fs::write(&img, &data).unwrap();
        let src = FileSource::open(&img, "old", "s2").unwrap();
        let s2 = create_backup(&target, &src, &BackupOptions::default(), &NoProgress)
            .await
            .unwrap();
        assert_eq!(s2.stats.chunks_new, 24);
        assert!(s2.packs >= 2, "{s2:?}");
        let (out, sink) = check("r3.img");
        restore(&target, &s2.id, &sink, &NoProgress).await.unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), data);
    }
}
