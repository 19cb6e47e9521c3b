//! Packs: many chunks to one object, so a backup and a restore cost one
//! S3 request per several MiB instead of one per chunk.
//!
//! Why: every request costs an S3 server time of its own (and money on a
//! paid one). On the benchmark's moto server each request costs about
//! 3.3 ms of its CPU whatever its size, and moto closes the connection
//! after each; with one object per 1 MiB chunk a restore of 1 GiB made
//! 1336 requests and spent 4.5 s of moto CPU on them, while restic, whose
//! packs are 16 MiB, made 84 (BENCHMARKS.md, "What limits the restores").
//!
//! - A **pack** (`packs/<2 hex>/<64 hex>`, a random name) is the sealed
//!   blobs of about [`PACK_TARGET`] bytes of chunks, one after the other,
//!   nothing else. Each blob is exactly the object a chunk would be on its
//!   own (`envelope.rs`), sealed under the chunk's own key
//!   `chunks/<2 hex>/<64 hex>`, so a blob cannot be moved to another
//!   chunk's place, and restore checks its tag and its hash as before.
//! - A **pack index** (`packidx/<64 hex>`, named by the keyed hash of its
//!   plaintext) lists, for some packs, where each chunk's blob lies. A
//!   backup rewrites its own index every [`CHECKPOINT_PACKS`] packs (the
//!   new one written before the last one is deleted), so an interrupted
//!   backup's packs, up to the last few, are found by its retry; it starts
//!   a new one every [`INDEX_FLUSH`] chunks, so none grows large; gc merges
//!   them into few. A pack is uploaded before any index names it, and an
//!   index before any manifest needs it.
//! - Backups and restores read every pack index at the start into a
//!   [`ChunkIndex`]: about 60 bytes of memory per chunk stored in the
//!   target (6 MiB per 100 GiB of distinct data with 1 MiB chunks). It
//!   answers "is this chunk stored?" without a request per chunk and tells
//!   restore where to read.
//! - Restore reads a page's chunks pack by pack in ranges of up to
//!   [`RANGE_MAX`] (`restore.rs`), each blob into a buffer of its own as
//!   the response arrives (so no allocation is larger than a chunk: the
//!   allocator returns them as it did before packs), and opens it there.
//! - Targets written before packs hold one object per chunk under
//!   `chunks/`: restore and verify read a chunk from there when no pack
//!   index lists it, and gc keeps those a backup still references.
//!
//! Memory of a backup: the [`ChunkIndex`], plus at most [`PACKS_IN_MEMORY`]
//! packs (one filling, one uploading), on top of the chunks in flight.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::envelope::{Keys, Kind, ObjectId};
use crate::error::{BackupError, Result};
use crate::format::{self, PackEntry, PackIndex};
use crate::target::{chunk_key, pack_index_key, pack_key, Loaded, Target};
use crate::timing::{Stage, Timings};

/// A pack is closed and uploaded once it holds this many bytes.
pub(crate) const PACK_TARGET: usize = 8 << 20;
/// Packs a backup holds at once: one filling, one uploading.
pub(crate) const PACKS_IN_MEMORY: usize = 2;
/// A running backup writes a pack index once this many chunks are in
/// uploaded packs no index lists yet.
pub(crate) const INDEX_FLUSH: usize = 4096;
/// A running backup rewrites its index after this many new packs.
pub(crate) const CHECKPOINT_PACKS: usize = 8;
/// Longest range restore reads from a pack in one request.
pub(crate) const RANGE_MAX: u64 = 8 << 20;
/// Restore reads across a gap this small between two blobs it needs
/// rather than making two requests.
pub(crate) const RANGE_GAP: u64 = 1 << 20;

/// Where a chunk's blob lies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Loc {
    pub pack: ObjectId,
    pub offset: u32,
    pub len: u32,
}

/// Every chunk the pack indexes of a target list, and where.
#[derive(Default)]
pub(crate) struct ChunkIndex {
    packs: Vec<ObjectId>,
    pack_no: HashMap<ObjectId, u32>,
    /// Chunk → (pack number, offset, length).
    chunks: HashMap<ObjectId, (u32, u32, u32)>,
}

impl ChunkIndex {
    /// Reads every pack index of the target.
    pub async fn load(target: &Target, l: &Loaded) -> Result<Self> {
        Self::load_keys(target, l, list_pack_indexes(target).await?).await
    }

    /// Reads the pack indexes `keys`. One that is gone by the time it is
    /// read was a running backup's checkpoint, replaced by a newer one
    /// (only gc deletes a complete backup's index, and not beside a backup
    /// or restore): it is skipped. Its packs belong to no complete backup
    /// yet, so a restore needs none of them, and a backup only misses the
    /// chance to reuse them.
    async fn load_keys(target: &Target, l: &Loaded, keys: Vec<String>) -> Result<Self> {
        let mut ix = Self::default();
        let mut objects = futures::stream::iter(keys)
            .map(|key| async move { get_pack_index(target, l, &key).await })
            .buffer_unordered(target.opts.parallel);
        while let Some(pi) = objects.next().await {
            let pi = match pi {
                Ok(pi) => pi,
                Err(BackupError::Missing { key, .. }) => {
                    tracing::debug!("pack index {key} was replaced while listed; skipped");
                    continue;
                }
                Err(e) => return Err(e),
            };
            for (pack, entries) in pi.packs {
                ix.add(pack, &entries);
            }
        }
        Ok(ix)
    }

    /// Records the chunks of `pack`; a chunk already listed keeps its
    /// first place.
    pub fn add(&mut self, pack: ObjectId, entries: &[PackEntry]) {
        let no = *self.pack_no.entry(pack).or_insert_with(|| {
            self.packs.push(pack);
            (self.packs.len() - 1) as u32
        });
        for e in entries {
            self.chunks.entry(e.chunk).or_insert((no, e.offset, e.len));
        }
    }

    pub fn get(&self, chunk: &ObjectId) -> Option<Loc> {
        self.chunks.get(chunk).map(|&(no, offset, len)| Loc {
            pack: self.packs[no as usize],
            offset,
            len,
        })
    }

    pub fn contains(&self, chunk: &ObjectId) -> bool {
        self.chunks.contains_key(chunk)
    }

    pub fn len(&self) -> usize {
        self.chunks.len()
    }
}

/// The keys of every pack index object.
pub(crate) async fn list_pack_indexes(target: &Target) -> Result<Vec<String>> {
    Ok(target
        .store
        .list("packidx/")
        .await?
        .into_iter()
        .map(|o| o.key)
        .collect())
}

/// Reads and checks one pack index object.
pub(crate) async fn get_pack_index(target: &Target, l: &Loaded, key: &str) -> Result<PackIndex> {
    let plain = target
        .get_object(&l.keys, Kind::PackIndex, key, format::MAX_PACK_INDEX_BYTES)
        .await?;
    let corrupt = |reason: String| BackupError::Corrupt {
        target: target.url().to_string(),
        key: key.to_string(),
        reason,
    };
    if pack_index_key(&l.keys.chunk_id(&plain)) != key {
        return Err(corrupt("content does not hash to the object's name".into()));
    }
    PackIndex::decode(&plain).map_err(|e| corrupt(e.0))
}

/// Seals and stores `index` under its content name; returns (key, bytes
/// uploaded). With `skip_existing`, 0 bytes when an identical object was
/// there already (gc's merged index, unchanged since the last gc); a
/// backup's index lists new packs, so it does not ask.
pub(crate) async fn put_pack_index(
    target: &Target,
    l: &Loaded,
    index: &PackIndex,
    skip_existing: bool,
) -> Result<(String, u64)> {
    let plain = index.encode();
    let key = pack_index_key(&l.keys.chunk_id(&plain));
    if skip_existing && target.store.exists(&key).await? {
        return Ok((key, 0));
    }
    let obj = l
        .keys
        .seal(Kind::PackIndex, &key, &plain)
        .map_err(BackupError::Invalid)?;
    let n = obj.len() as u64;
    target.store.put(&key, Bytes::from(obj)).await?;
    Ok((key, n))
}

/// A pack being filled.
struct OpenPack {
    buf: Vec<u8>,
    entries: Vec<PackEntry>,
    _slot: OwnedSemaphorePermit,
}

/// Collects a backup's new chunks into packs and uploads them.
pub(crate) struct PackWriter<'a> {
    target: &'a Target,
    l: Arc<Loaded>,
    timings: Arc<Timings>,
    open: Mutex<Option<OpenPack>>,
    slots: Arc<Semaphore>,
    /// The packs of the index object being built.
    segment: Mutex<Segment>,
    /// Held while an index object is written.
    writing: tokio::sync::Mutex<()>,
    uploaded: std::sync::atomic::AtomicU64,
    index_bytes: std::sync::atomic::AtomicU64,
    /// Write checkpoint indexes while uploading (a backup; not gc).
    checkpoints: bool,
    /// Buffers of uploaded packs, for the next packs: allocating and
    /// freeing an 8 MiB buffer per pack made glibc's malloc keep freed
    /// ones in its per-thread arenas (it raises its mmap threshold to the
    /// largest block freed), which doubled a backup's peak RSS.
    spare: Mutex<Vec<Vec<u8>>>,
}

/// The packs uploaded since the last complete index object.
#[derive(Default)]
struct Segment {
    index: PackIndex,
    /// The checkpoint object listing the first `written` packs of `index`.
    key: Option<String>,
    written: usize,
}

impl<'a> PackWriter<'a> {
    /// A writer for a backup: it checkpoints its index as it goes.
    pub fn new(target: &'a Target, l: Arc<Loaded>, timings: Arc<Timings>) -> Self {
        Self::with_checkpoints(target, l, timings, true)
    }

    pub fn with_checkpoints(
        target: &'a Target,
        l: Arc<Loaded>,
        timings: Arc<Timings>,
        checkpoints: bool,
    ) -> Self {
        Self {
            checkpoints,
            spare: Mutex::new(Vec::new()),
            target,
            l,
            timings,
            open: Mutex::new(None),
            slots: Arc::new(Semaphore::new(PACKS_IN_MEMORY)),
            segment: Mutex::new(Segment::default()),
            writing: tokio::sync::Mutex::new(()),
            uploaded: Default::default(),
            index_bytes: Default::default(),
        }
    }

    fn lock_open(&self) -> std::sync::MutexGuard<'_, Option<OpenPack>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_segment(&self) -> std::sync::MutexGuard<'_, Segment> {
        self.segment.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds the sealed blob of `chunk`; the call that fills a pack uploads
    /// it. Waits while [`PACKS_IN_MEMORY`] packs are held.
    pub async fn add(&self, chunk: ObjectId, blob: &[u8]) -> Result<()> {
        let len = u32::try_from(blob.len())
            .map_err(|_| BackupError::Invalid("sealed chunk larger than 4 GiB".into()))?;
        loop {
            let full = {
                let mut open = self.lock_open();
                if let Some(p) = open.as_mut() {
                    let offset = p.buf.len() as u32;
                    p.buf.extend_from_slice(blob);
                    p.entries.push(PackEntry { chunk, offset, len });
                    if p.buf.len() >= PACK_TARGET {
                        open.take()
                    } else {
                        return Ok(());
                    }
                } else {
                    None
                }
            };
            if let Some(p) = full {
                return self.upload(p).await;
            }
            let slot = self
                .slots
                .clone()
                .acquire_owned()
                .await
                .map_err(|_| BackupError::Invalid("pack writer closed".into()))?;
            let spare = self.spare.lock().ok().and_then(|mut s| s.pop());
            let mut open = self.lock_open();
            if open.is_none() {
                *open = Some(OpenPack {
                    buf: spare
                        .unwrap_or_else(|| Vec::with_capacity(PACK_TARGET + blob.len() + 4096)),
                    entries: Vec::new(),
                    _slot: slot,
                });
            } else if let (Some(buf), Ok(mut s)) = (spare, self.spare.lock()) {
                s.push(buf);
            }
        }
    }

    async fn upload(&self, p: OpenPack) -> Result<()> {
        let pack = ObjectId(rand::random());
        let OpenPack {
            buf,
            entries,
            _slot,
        } = p;
        let body = Bytes::from(buf);
        let kept = body.clone();
        self.timings
            .time_async(Stage::Upload, self.target.store.put(&pack_key(&pack), body))
            .await?;
        // The store is done with the body: its buffer serves the next pack.
        if let (Ok(mut b), Ok(mut s)) = (kept.try_into_mut(), self.spare.lock()) {
            if s.len() < PACKS_IN_MEMORY {
                b.clear();
                s.push(Vec::from(b));
            }
        }
        let unwritten = {
            let mut seg = self.lock_segment();
            seg.index.packs.push((pack, entries));
            seg.index.packs.len() - seg.written
        };
        self.uploaded
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if self.checkpoints && unwritten >= CHECKPOINT_PACKS {
            self.write_index(false).await?;
        }
        Ok(())
    }

    /// Packs uploaded so far.
    pub fn uploaded(&self) -> u64 {
        self.uploaded.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Bytes of index objects uploaded so far.
    pub fn index_bytes(&self) -> u64 {
        self.index_bytes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Writes an index object for the packs of the current segment in
    /// place of its last checkpoint; with `close`, or once the segment
    /// holds [`INDEX_FLUSH`] chunks, the next pack starts a new segment.
    pub async fn write_index(&self, close: bool) -> Result<()> {
        let _writing = self.writing.lock().await;
        let (index, old) = {
            let mut seg = self.lock_segment();
            let nothing_new = seg.index.packs.len() == seg.written;
            if seg.index.packs.is_empty() || (nothing_new && !close) {
                return Ok(());
            }
            if nothing_new {
                // The checkpoint lists every pack: it is the segment's index.
                *seg = Segment::default();
                return Ok(());
            }
            (seg.index.clone(), seg.key.clone())
        };
        let (key, n) = put_pack_index(self.target, &self.l, &index, false).await?;
        self.index_bytes
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        if let Some(old) = old.filter(|o| *o != key) {
            self.target.store.delete(&old).await?;
        }
        let mut seg = self.lock_segment();
        let covered = index.packs.len();
        if close || index.chunks() >= INDEX_FLUSH {
            seg.index.packs.drain(..covered);
            seg.key = None;
            seg.written = 0;
        } else {
            seg.key = Some(key);
            seg.written = covered;
        }
        Ok(())
    }

    /// Uploads the pack being filled and writes the last index.
    pub async fn finish(&self) -> Result<()> {
        self.finish_packs().await?;
        self.write_index(true).await
    }

    /// Uploads the pack being filled.
    pub async fn finish_packs(&self) -> Result<()> {
        let last = self.lock_open().take();
        match last {
            Some(p) if !p.entries.is_empty() => self.upload(p).await,
            _ => Ok(()),
        }
    }

    /// The packs uploaded that no index lists yet, for the caller to index
    /// (gc's repack, whose writer keeps no checkpoints: gc deletes nothing
    /// until its merged index is stored).
    pub fn take_unindexed(&self) -> PackIndex {
        std::mem::take(&mut self.lock_segment().index)
    }
}

/// One chunk to read from a pack.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Blob {
    pub chunk: ObjectId,
    pub offset: u32,
    pub len: u32,
}

/// Reads `blobs` (sorted by offset, all in `pack`) with one range request,
/// each into a buffer of its own, checks each (tag or checksum, then its
/// hash against its name) and returns their plaintexts in the same order.
/// Nothing is returned unless every blob checks.
pub(crate) async fn read_blobs(
    target: &Target,
    l: &Arc<Loaded>,
    pack: ObjectId,
    blobs: Vec<Blob>,
    timings: &Arc<Timings>,
) -> Result<Vec<(ObjectId, Bytes)>> {
    let key = pack_key(&pack);
    let parts: Vec<(u64, u64)> = blobs
        .iter()
        .map(|b| (b.offset as u64, b.len as u64))
        .collect();
    let data = timings
        .time_async(Stage::Download, target.store.get_parts(&key, &parts))
        .await?
        .ok_or_else(|| BackupError::Missing {
            target: target.url().to_string(),
            key: key.clone(),
        })?;
    let corrupt = |reason: String| BackupError::Corrupt {
        target: target.url().to_string(),
        key: key.clone(),
        reason,
    };
    let (l2, t2) = (l.clone(), timings.clone());
    let max = l.config.chunk_size as usize;
    tokio::task::spawn_blocking(move || open_blobs(&l2.keys, data, &blobs, max, &t2))
        .await
        .map_err(|e| corrupt(format!("check task failed: {e}")))?
        .map_err(corrupt)
}

/// Opens each blob in its own buffer (decrypted in place, so a chunk
/// stored as is becomes a view of it).
fn open_blobs(
    keys: &Keys,
    data: Vec<Vec<u8>>,
    blobs: &[Blob],
    max: usize,
    timings: &Timings,
) -> std::result::Result<Vec<(ObjectId, Bytes)>, String> {
    let mut out = Vec::with_capacity(blobs.len());
    for (b, buf) in blobs.iter().zip(data) {
        let at = |r: String| format!("chunk {} at offset {}: {r}", b.chunk.hex(), b.offset);
        if buf.len() != b.len as usize {
            return Err(at(format!(
                "truncated: {} of its {} bytes in the pack",
                buf.len(),
                b.len
            )));
        }
        let name = chunk_key(&b.chunk);
        let opened = timings
            .time(Stage::Decrypt, || {
                keys.authenticate(Kind::Chunk, &name, Cow::Owned(buf), max)
            })
            .map_err(at)?;
        let plain = timings
            .time(Stage::Decompress, || Keys::decompress(opened))
            .map_err(at)?;
        if timings.time(Stage::Verify, || keys.chunk_id(&plain)) != b.chunk {
            return Err(at("content does not hash to its name".into()));
        }
        out.push((b.chunk, plain));
    }
    if out.len() != blobs.len() {
        return Err(format!("{} of {} chunks returned", out.len(), blobs.len()));
    }
    Ok(out)
}

/// Groups the chunks a restore needs into range reads: by pack, in offset
/// order, one read per run of blobs less than [`RANGE_GAP`] apart and at
/// most [`RANGE_MAX`] long. A chunk asked for twice is read once.
pub(crate) fn plan_reads(index: &ChunkIndex, chunks: &[ObjectId]) -> Vec<(ObjectId, Vec<Blob>)> {
    let mut seen = HashSet::new();
    let mut located: Vec<(Loc, ObjectId)> = chunks
        .iter()
        .filter(|c| seen.insert(**c))
        .filter_map(|c| index.get(c).map(|loc| (loc, *c)))
        .collect();
    located.sort_by_key(|(loc, _)| (loc.pack, loc.offset));
    let mut reads: Vec<(ObjectId, Vec<Blob>)> = Vec::new();
    for (loc, chunk) in located {
        let blob = Blob {
            chunk,
            offset: loc.offset,
            len: loc.len,
        };
        if let Some((pack, blobs)) = reads.last_mut() {
            let first = blobs[0].offset as u64;
            let prev = blobs[blobs.len() - 1];
            let prev_end = prev.offset as u64 + prev.len as u64;
            let end = loc.offset as u64 + loc.len as u64;
            if *pack == loc.pack
                && loc.offset as u64 >= prev_end
                && loc.offset as u64 - prev_end <= RANGE_GAP
                && end - first <= RANGE_MAX
            {
                blobs.push(blob);
                continue;
            }
        }
        reads.push((loc.pack, vec![blob]));
    }
    reads
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> ObjectId {
        ObjectId([n; 32])
    }

    #[test]
    fn reads_are_grouped_by_pack_within_gap_and_size() {
        let mut ix = ChunkIndex::default();
        let mb = 1u32 << 20;
        // Pack 1: chunks 1..=9 of 1 MiB back to back; pack 2: chunk 20.
        let entries: Vec<PackEntry> = (0..9)
            .map(|i| PackEntry {
                chunk: id(i as u8 + 1),
                offset: i * mb,
                len: mb,
            })
            .collect();
        ix.add(id(100), &entries);
        ix.add(
            id(200),
            &[PackEntry {
                chunk: id(20),
                offset: 0,
                len: 100,
            }],
        );
        // A duplicate in another pack keeps the first place.
        ix.add(
            id(201),
            &[PackEntry {
                chunk: id(1),
                offset: 0,
                len: 5,
            }],
        );
        assert_eq!(ix.get(&id(1)).unwrap().pack, id(100));
        assert_eq!(ix.len(), 10);
        // All of pack 1 (9 MiB) splits at 8 MiB; chunk 20 alone; chunk 99
        // (not in any pack) is left out; chunk 3 asked twice is read once.
        let want: Vec<ObjectId> = [20, 9, 8, 7, 6, 5, 4, 3, 3, 2, 1, 99]
            .iter()
            .map(|&n| id(n))
            .collect();
        let reads = plan_reads(&ix, &want);
        let shape: Vec<(ObjectId, usize)> = reads.iter().map(|(p, b)| (*p, b.len())).collect();
        assert_eq!(shape, vec![(id(100), 8), (id(100), 1), (id(200), 1)]);
        assert_eq!(reads[0].1[0].chunk, id(1));
        // A gap over RANGE_GAP starts a new read.
        let reads = plan_reads(&ix, &[id(1), id(3)]);
        assert_eq!(reads.len(), 1, "a 1 MiB gap is read across");
        let reads = plan_reads(&ix, &[id(1), id(4)]);
        assert_eq!(reads.len(), 2, "a 2 MiB gap is two reads");
    }

    /// A backup's checkpoint replaced between the listing and the read is
    /// skipped; a damaged index is still an error naming it.
    #[tokio::test]
    async fn an_index_gone_since_the_listing_is_skipped() {
        let tmp = tempfile::tempdir().unwrap();
        let url = format!("file://{}", tmp.path().display());
        let target = Target::open(&url, &Default::default()).await.unwrap();
        let l = target.loaded(true).await.unwrap().unwrap();
        let index = PackIndex {
            packs: vec![(
                id(1),
                vec![PackEntry {
                    chunk: id(2),
                    offset: 0,
                    len: 10,
                }],
            )],
        };
        let (key, _) = put_pack_index(&target, &l, &index, false).await.unwrap();
        let gone = pack_index_key(&id(3));
        let ix = ChunkIndex::load_keys(&target, &l, vec![gone.clone(), key.clone()])
            .await
            .unwrap();
        assert_eq!(ix.len(), 1);
        assert!(ix.contains(&id(2)));
        target
            .store
            .put(&gone, Bytes::from_static(b"not an index"))
            .await
            .unwrap();
        let e = ChunkIndex::load_keys(&target, &l, vec![gone.clone(), key])
            .await
            .err()
            .unwrap();
        assert!(
            matches!(&e, BackupError::Corrupt { key, .. } if *key == gone),
            "{e}"
        );
    }

    #[test]
    fn blobs_open_in_place_and_a_swapped_blob_is_refused() {
        for keys in [Keys::new([7; 32], None), Keys::new([7; 32], Some([9; 32]))] {
            let plains: Vec<Vec<u8>> = vec![
                (0..70_000u32).map(|i| (i % 13) as u8).collect(),
                (0..50_000u32).map(|i| ((i * 7919) >> 3) as u8).collect(),
            ];
            let mut pack = b"junk".to_vec();
            let mut blobs = Vec::new();
            for p in &plains {
                let chunk = keys.chunk_id(p);
                let obj = keys.seal(Kind::Chunk, &chunk_key(&chunk), p).unwrap();
                blobs.push(Blob {
                    chunk,
                    offset: pack.len() as u32,
                    len: obj.len() as u32,
                });
                pack.extend_from_slice(&obj);
            }
            let t = Timings::default();
            let parts = |pack: &[u8]| -> Vec<Vec<u8>> {
                blobs
                    .iter()
                    .map(|b| pack[b.offset as usize..(b.offset + b.len) as usize].to_vec())
                    .collect()
            };
            let out = open_blobs(&keys, parts(&pack), &blobs, 1 << 20, &t).unwrap();
            assert_eq!(out[0].1, plains[0]);
            assert_eq!(out[1].1, plains[1]);
            // The index names the chunks the other way round: both refused.
            let mut swapped = blobs.clone();
            swapped[0].chunk = blobs[1].chunk;
            swapped[1].chunk = blobs[0].chunk;
            assert!(open_blobs(&keys, parts(&pack), &swapped, 1 << 20, &t).is_err());
            // A flipped byte in the second blob.
            let mut bad = pack.clone();
            bad[blobs[1].offset as usize + 20] ^= 1;
            let err = open_blobs(&keys, parts(&bad), &blobs, 1 << 20, &t).unwrap_err();
            assert!(err.contains(&blobs[1].chunk.hex()), "{err}");
            // A short read of the pack.
            let mut short = parts(&pack);
            short[1].truncate(10);
            let err = open_blobs(&keys, short, &blobs, 1 << 20, &t).unwrap_err();
            assert!(err.contains("truncated"), "{err}");
        }
    }
}
