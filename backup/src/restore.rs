//! `restore` and `verify`: read a backup back.
//!
//! Restore walks the manifest one index page at a time, downloads at most
//! `parallel` chunks at once, checks each one (authentication tag or
//! checksum, then the keyed hash against its name) before writing it, and
//! stops at the first missing or corrupt object with an error naming it.
//! Zero chunks and all-zero 4 KiB blocks inside data chunks are not written
//! to a sink that starts zeroed, so a restored file stays sparse.
//!
//! Verify checks that every object a backup needs exists (one HEAD each,
//! shared chunks once per page), or with `read` downloads and checks them
//! the way restore does, and reports every problem, not just the first.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};

use crate::envelope::ObjectId;
use crate::error::{BackupError, Result};
use crate::format::{Entry, IndexPage, Manifest};
use crate::locks::Lock;
use crate::progress::Progress;
use crate::source::{RestoreSink, SourceError};
use crate::target::{chunk_key, page_key, Loaded, Target};

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
    let res = restore_inner(target, &l, &m, sink, progress).await;
    lock.release().await;
    let (bytes_read, bytes_written) = res?;
    Ok(RestoreSummary {
        id: m.id.clone(),
        volume: m.volume.clone(),
        snapshot: m.snapshot.clone(),
        size: m.size,
        bytes_read,
        bytes_written,
        duration_ms: t0.elapsed().as_millis() as u64,
    })
}

async fn restore_inner<K: RestoreSink>(
    target: &Target,
    l: &std::sync::Arc<Loaded>,
    m: &Manifest,
    sink: &K,
    progress: &dyn Progress,
) -> Result<(u64, u64)> {
    let cs = m.chunk_size as u64;
    let window = cs * m.page_chunks as u64;
    let zeroed = sink.starts_zeroed();
    let sink_err = |op: &'static str| {
        let volume = m.volume.clone();
        move |source: SourceError| BackupError::Source {
            volume: volume.clone(),
            op,
            source,
        }
    };
    let read = AtomicU64::new(0);
    let written = AtomicU64::new(0);
    progress.start(&format!("restore {}", m.volume), m.stats.data_bytes, true);
    for (p, pid) in m.pages.iter().enumerate() {
        let off = p as u64 * window;
        let len = window.min(m.size - off);
        let Some(pid) = pid else {
            if !zeroed {
                sink.write_zeroes(off, len)
                    .await
                    .map_err(sink_err("write zeroes"))?;
            }
            continue;
        };
        let page = load_page(target, l, m, p, *pid).await?;
        // Zero runs (only on a sink that does not start zeroed).
        if !zeroed {
            let mut run: Option<(u64, u64)> = None;
            for (i, e) in page.entries.iter().enumerate() {
                let c_off = off + i as u64 * cs;
                let c_len = cs.min(m.size - c_off);
                if *e == Entry::Zero {
                    run = Some(match run {
                        Some((s, n)) => (s, n + c_len),
                        None => (c_off, c_len),
                    });
                } else if let Some((s, n)) = run.take() {
                    sink.write_zeroes(s, n)
                        .await
                        .map_err(sink_err("write zeroes"))?;
                }
            }
            if let Some((s, n)) = run {
                sink.write_zeroes(s, n)
                    .await
                    .map_err(sink_err("write zeroes"))?;
            }
        }
        // Collected rather than a lazy iterator: a closure over borrowed
        // entries held across awaits makes the future not provably Send
        // (rust-lang/rust#64552), and callers spawn restores.
        let jobs: Vec<(u64, ObjectId)> = page
            .entries
            .iter()
            .enumerate()
            .filter_map(|(i, e)| match e {
                Entry::Data(id) => Some((off + i as u64 * cs, *id)),
                Entry::Zero => None,
            })
            .collect();
        futures::stream::iter(jobs)
            .map(|(c_off, id)| {
                let (read, written) = (&read, &written);
                let sink_err = &sink_err;
                async move {
                    let c_len = cs.min(m.size - c_off) as usize;
                    let data = target.get_chunk(l, id).await?;
                    if data.len() != c_len {
                        return Err(BackupError::Corrupt {
                            target: target.url().to_string(),
                            key: chunk_key(&id),
                            reason: format!(
                                "holds {} bytes, the volume needs {c_len} at offset {c_off}",
                                data.len()
                            ),
                        });
                    }
                    read.fetch_add(c_len as u64, Ordering::Relaxed);
                    let data = Bytes::from(data);
                    if zeroed {
                        // Write only the runs of non-zero 4 KiB blocks.
                        let mut i = 0;
                        while i < data.len() {
                            let is_zero = |j: usize| {
                                data[j..(j + BLOCK).min(data.len())].iter().all(|&b| b == 0)
                            };
                            if is_zero(i) {
                                i += BLOCK;
                                continue;
                            }
                            let s = i;
                            while i < data.len() && !is_zero(i) {
                                i += BLOCK;
                            }
                            let e = i.min(data.len());
                            sink.write(c_off + s as u64, data.slice(s..e))
                                .await
                                .map_err(sink_err("write"))?;
                            written.fetch_add((e - s) as u64, Ordering::Relaxed);
                        }
                    } else {
                        sink.write(c_off, data).await.map_err(sink_err("write"))?;
                        written.fetch_add(c_len as u64, Ordering::Relaxed);
                    }
                    progress.advance(c_len as u64);
                    Ok::<(), BackupError>(())
                }
            })
            .buffer_unordered(target.opts.parallel)
            .try_collect::<()>()
            .await?;
    }
    sink.flush().await.map_err(sink_err("flush"))?;
    progress.finish();
    Ok((
        read.load(Ordering::Relaxed),
        written.load(Ordering::Relaxed),
    ))
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
                let l = &l;
                let bytes_read = &bytes_read;
                async move {
                    let key = chunk_key(&id);
                    if read {
                        match target.get_chunk(l, id).await {
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
