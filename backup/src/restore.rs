//! `restore` and `verify`: read a backup back.
//!
//! Restore runs one pipeline over the manifest's index pages: at most
//! `parallel` chunks are in flight at once across page boundaries, each
//! downloaded, checked (authentication tag or checksum, then the keyed hash
//! against its name) and only then written, so memory stays at `parallel`
//! sealed objects decrypted in place. It stops at the first missing or
//! corrupt object with an error naming it. Zero chunks and all-zero 4 KiB
//! blocks inside data chunks are not written to a sink that starts zeroed,
//! so a restored file stays sparse; on any other sink zero chunks become
//! `write_zeroes` runs (trims on a volume). `timing.rs` reports the busy
//! time of each stage.
//!
//! Verify checks that every object a backup needs exists (one HEAD each,
//! shared chunks once per page), or with `read` downloads and checks them
//! the way restore does, and reports every problem, not just the first.

use std::collections::HashSet;
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
use crate::progress::Progress;
use crate::source::{RestoreSink, SourceError};
use crate::target::{chunk_key, page_key, Loaded, Target};
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
    let res = restore_inner(target, &l, &m, sink, progress, &timings).await;
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
        m,
        sink,
        progress,
        timings,
        zeroed: sink.starts_zeroed(),
        read: AtomicU64::new(0),
        written: AtomicU64::new(0),
    };
    progress.start(&format!("restore {}", m.volume), m.stats.data_bytes, true);
    // One pipeline over the whole backup: chunks of the next page join the
    // `parallel` slots as soon as slots free up, so the slots do not drain
    // at a page boundary (they are only not polled while the next page, one
    // small object per GiB, loads). Each slot holds one chunk from its
    // download to the end of its write: the sealed object, decrypted in
    // place, never more than `parallel` of them (the memory bound).
    let parallel = target.opts.parallel;
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
        for (i, e) in page.entries.iter().enumerate() {
            let Entry::Data(id) = e else { continue };
            while in_flight.len() >= parallel {
                if let Some(r) = in_flight.next().await {
                    r?;
                }
            }
            in_flight.push(restore_chunk(&ctx, off + i as u64 * cs, *id));
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

/// Downloads, checks and writes the chunk `id` at volume offset `c_off`.
async fn restore_chunk<K: RestoreSink>(
    ctx: &RestoreCtx<'_, K>,
    c_off: u64,
    id: ObjectId,
) -> Result<()> {
    let m = ctx.m;
    let c_len = (m.chunk_size as u64).min(m.size - c_off) as usize;
    let data = ctx.target.get_chunk(ctx.l, id, ctx.timings).await?;
    if data.len() != c_len {
        return Err(BackupError::Corrupt {
            target: ctx.target.url().to_string(),
            key: chunk_key(&id),
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
        let found: Vec<Option<String>> = futures::stream::iter(ids)
            .map(|id| {
                let (l, timings) = (&l, &timings);
                let bytes_read = &bytes_read;
                async move {
                    let key = chunk_key(&id);
                    if read {
                        match target.get_chunk(l, id, timings).await {
                            Ok(d) => {
                                bytes_read.fetch_add(d.len() as u64, Ordering::Relaxed);
                                progress.advance(d.len() as u64);
                                None
                            }
                            Err(e) => Some(e.to_string()),
                        }
                    } else {
                        match target.store.exists(&key).await {
                            Ok(true) => None,
                            Ok(false) => Some(
                                BackupError::Missing {
                                    target: target.url().to_string(),
                                    key,
                                }
                                .to_string(),
                            ),
                            Err(e) => Some(e.to_string()),
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
