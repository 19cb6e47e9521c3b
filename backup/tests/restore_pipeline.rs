//! The backup and restore pipelines' promises (issue 20): zero chunks and
//! zero blocks come back as zeros on a sink that starts zeroed (kept sparse)
//! and on one that does not (written over); a corrupt chunk never reaches
//! the sink; chunks go to the target in packs, deduplicate across volumes
//! through the pack index, and gc deletes and repacks packs without losing
//! a chunk a backup needs.

mod common;

use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use common::*;
use strata_backup::{
    create_backup, gc, remove, restore, verify, BackupError, BackupOptions, FileSink, GcOptions,
    NoProgress, RestoreSink, SourceError, Target, TargetOptions,
};

fn url(dir: &std::path::Path) -> String {
    format!("file://{}", dir.display())
}

/// A 16 MiB volume with 8 MiB written, then zeros written over one whole
/// chunk ([2, 3) MiB) and one 4 KiB block inside another (at 5 MiB + 4 KiB).
fn volume_with_zeros(dir: &std::path::Path) -> Arc<Volume> {
    let mut v = Volume::new(dir, "zeros", 16 * MIB);
    v.snapshot("s1", &[(0, 8 * MIB, 11)]);
    let layer = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("zeros-s1.layer"))
        .unwrap();
    layer
        .write_all_at(&vec![0u8; MIB as usize], 2 * MIB)
        .unwrap();
    layer.write_all_at(&[0u8; 4096], 5 * MIB + 4096).unwrap();
    Arc::new(v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_chunks_and_blocks_restore_as_zeros_on_new_and_dirty_sinks() {
    let tmp = tempfile::tempdir().unwrap();
    let v = volume_with_zeros(tmp.path());
    let target = Target::open(&url(&tmp.path().join("t")), &TargetOptions::default())
        .await
        .unwrap();
    let s = create_backup(
        &target,
        &v.source(0),
        &BackupOptions::default(),
        &NoProgress,
    )
    .await
    .unwrap();
    assert_eq!(s.stats.chunks_new, 7, "the all-zero chunk is not stored");

    // A new file: zero chunks and zero blocks are holes, never written.
    let fresh = tmp.path().join("fresh.img");
    let r = restore(
        &target,
        &s.id,
        &FileSink::create(&fresh, 16 * MIB).unwrap(),
        &NoProgress,
    )
    .await
    .unwrap();
    assert_same(&v, 0, &fresh);
    assert_eq!(r.bytes_written, 7 * MIB - 4096);
    assert!(
        allocated(&fresh) <= 7 * MIB,
        "zero chunk and block left as holes: {} bytes allocated",
        allocated(&fresh)
    );

    // A file full of garbage: everything the backup holds as zero is zeroed.
    let dirty = tmp.path().join("dirty.img");
    std::fs::write(&dirty, vec![0xAAu8; 16 * MIB as usize]).unwrap();
    let r = restore(
        &target,
        &s.id,
        &FileSink::open_existing(&dirty).unwrap(),
        &NoProgress,
    )
    .await
    .unwrap();
    assert_same(&v, 0, &dirty);
    assert_eq!(r.bytes_written, 7 * MIB, "data chunks written whole");
}

/// A sink that checks every write against the snapshot it should hold.
struct CheckingSink {
    vol: Arc<Volume>,
    writes: Mutex<Vec<(u64, usize, bool)>>,
}

impl RestoreSink for CheckingSink {
    fn size(&self) -> u64 {
        self.vol.size
    }
    fn starts_zeroed(&self) -> bool {
        true
    }
    async fn write(&self, offset: u64, data: Bytes) -> Result<(), SourceError> {
        let same = self.vol.read_at(0, offset, data.len()) == data[..];
        self.writes.lock().unwrap().push((offset, data.len(), same));
        Ok(())
    }
    async fn write_zeroes(&self, _offset: u64, _len: u64) -> Result<(), SourceError> {
        Ok(())
    }
    async fn flush(&self) -> Result<(), SourceError> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_chunk_is_refused_before_any_of_it_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    // Unencrypted: a flipped payload byte would be plausible data if the
    // checksum were not checked before the write.
    let target = Target::open(&url(&tmp.path().join("t")), &TargetOptions::default())
        .await
        .unwrap();
    let mut v = Volume::new(tmp.path(), "corrupt", 32 * MIB);
    v.snapshot("s1", &[(0, 32 * MIB, 5)]);
    let v = Arc::new(v);
    let s = create_backup(
        &target,
        &v.source(0),
        &BackupOptions::default(),
        &NoProgress,
    )
    .await
    .unwrap();
    let root = tmp.path().join("t");
    let packs = files(&root, "packs");
    assert_eq!(packs.len(), 4, "32 chunks in packs of 8");
    // One flipped byte in every other pack: the 8 chunks of each of those
    // are read in one range, and none of the range is written.
    for c in packs.iter().step_by(2) {
        let mut b = std::fs::read(c).unwrap();
        let mid = b.len() / 2;
        b[mid] ^= 0x01;
        std::fs::write(c, &b).unwrap();
    }
    let sink = CheckingSink {
        vol: v.clone(),
        writes: Mutex::new(Vec::new()),
    };
    let e = restore(&target, &s.id, &sink, &NoProgress)
        .await
        .unwrap_err();
    assert!(matches!(e, BackupError::Corrupt { .. }), "{e}");
    let writes = sink.writes.lock().unwrap();
    assert!(
        writes.iter().all(|&(_, _, same)| same),
        "a write held data other than the snapshot's: {writes:?}"
    );
    let written: usize = writes.iter().map(|w| w.1).sum();
    assert!(
        written as u64 <= 16 * MIB,
        "{written} bytes written from 16 MiB of good chunks"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packs_deduplicate_across_volumes_and_gc_repacks_what_is_left() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("t");
    let target = Target::open(
        &url(&root),
        &TargetOptions {
            key: Some(b"0123456789abcdef0123".to_vec()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    // Volume a: 48 new chunks, 6 packs, one pack index (its checkpoints
    // replaced as it went).
    let mut a = Volume::new(tmp.path(), "vol-a", 128 * MIB);
    a.snapshot("s1", &[(0, 48 * MIB, 21)]);
    let a = Arc::new(a);
    let sa = create_backup(
        &target,
        &a.source(0),
        &BackupOptions::default(),
        &NoProgress,
    )
    .await
    .unwrap();
    assert_eq!(sa.stats.chunks_new, 48);
    assert_eq!(sa.packs, 6);
    assert_eq!(count_files(&root, "packs"), 6);
    assert_eq!(count_files(&root, "packidx"), 1);
    assert_eq!(count_files(&root, "chunks"), 0);

    // Volume c: the first 24 MiB of a's data (the same bytes), then 24 MiB
    // of its own: a's 24 chunks are found in a's packs, not stored again.
    let mut c = Volume::new(tmp.path(), "vol-c", 128 * MIB);
    c.snapshot("s1", &[(0, 24 * MIB, 21), (24 * MIB, 24 * MIB, 22)]);
    let c = Arc::new(c);
    let sc = create_backup(
        &target,
        &c.source(0),
        &BackupOptions::default(),
        &NoProgress,
    )
    .await
    .unwrap();
    assert_eq!(sc.target_chunks, 48);
    assert_eq!((sc.stats.chunks_reused, sc.stats.chunks_new), (24, 24));
    assert_eq!(sc.packs, 3);
    for (v, id, name) in [(&a, &sa.id, "a.img"), (&c, &sc.id, "c.img")] {
        let out = tmp.path().join(name);
        restore(
            &target,
            id,
            &FileSink::create(&out, 128 * MIB).unwrap(),
            &NoProgress,
        )
        .await
        .unwrap();
        assert_same(v, 0, &out);
    }

    // Without a: half of a's packs are still used by c, the rest are not.
    // gc deletes the unused packs, repacks the partly used ones (chunks
    // reach packs in completion order, so a pack may straddle chunk 24),
    // merges the indexes into one, and c still restores and verifies.
    remove(&target, &format!("vol-a/{}", sa.id)).await.unwrap();
    let g = gc(&target, &GcOptions::default(), &NoProgress)
        .await
        .unwrap();
    eprintln!("{g:?}");
    assert!(g.deleted >= 2, "{g:?}");
    assert_eq!(g.pack_indexes_read, 2);
    assert_eq!(count_files(&root, "packidx"), 1);
    let pack_bytes: u64 = files(&root, "packs")
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    assert!(
        pack_bytes < 51 * MIB,
        "{pack_bytes} bytes of packs for 48 MiB of used chunks"
    );
    verify(&target, &sc.id, true, &NoProgress).await.unwrap();
    let out = tmp.path().join("c2.img");
    restore(
        &target,
        &sc.id,
        &FileSink::create(&out, 128 * MIB).unwrap(),
        &NoProgress,
    )
    .await
    .unwrap();
    assert_same(&c, 0, &out);
    // A second gc finds nothing to do and rewrites nothing.
    let g = gc(&target, &GcOptions::default(), &NoProgress)
        .await
        .unwrap();
    assert_eq!(
        (
            g.unreferenced,
            g.packs_repacked,
            g.pack_indexes_written,
            g.deleted
        ),
        (0, 0, 0, 0),
        "{g:?}"
    );
    // Without any backup, gc leaves no pack and no index.
    remove(&target, &format!("vol-c/{}", sc.id)).await.unwrap();
    gc(&target, &GcOptions::default(), &NoProgress)
        .await
        .unwrap();
    assert_eq!(count_files(&root, "packs"), 0);
    assert_eq!(count_files(&root, "packidx"), 0);
}
