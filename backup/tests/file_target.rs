//! Backups to a `file://` target: the round trip at full scale
//! (4 GiB volume, 1 GiB scattered, 64 MiB changed), dedup across volumes,
//! corruption, keys, an interrupted backup and its retry, gc beside a
//! running backup, and retention.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use strata_backup::{
    create_backup, forget, gc, list, remove, restore, show, verify, BackupError, BackupOptions,
    FileSink, FileSource, GcOptions, NoProgress, Retention, Target, TargetOptions,
};

fn url(dir: &std::path::Path) -> String {
    format!("file://{}", dir.display())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_4g_volume_1g_data_64m_change() {
    let tmp = tempfile::tempdir().unwrap();
    let target = tmp.path().join("target");
    round_trip(
        &url(&target),
        &TargetOptions::default(),
        tmp.path(),
        4 * GIB,
        GIB,
        64 * MIB,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_volume_with_same_data_uploads_almost_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let target = Target::open(&url(&tmp.path().join("t")), &TargetOptions::default())
        .await
        .unwrap();
    let writes = scattered(7, GIB, 64, 4 * MIB);
    let mut a = Volume::new(tmp.path(), "vol-a", GIB);
    a.snapshot("s1", &writes);
    let mut b = Volume::new(tmp.path(), "vol-b", GIB);
    b.snapshot("other-name", &writes);
    let (a, b) = (Arc::new(a), Arc::new(b));
    let ra = create_backup(
        &target,
        &a.source(0),
        &BackupOptions::default(),
        &NoProgress,
    )
    .await
    .unwrap();
    let rb = create_backup(
        &target,
        &b.source(0),
        &BackupOptions::default(),
        &NoProgress,
    )
    .await
    .unwrap();
    assert!(ra.stats.bytes_uploaded > 200 * MIB);
    assert_eq!(rb.stats.chunks_new, 0);
    assert!(
        rb.stats.bytes_uploaded < MIB,
        "second volume uploaded {}",
        rb.stats.bytes_uploaded
    );
    assert_eq!(
        rb.stats.chunks_reused,
        ra.stats.chunks_new + ra.stats.chunks_reused
    );
    let backups = list(&target, None).await.unwrap();
    assert_eq!(backups.len(), 2);
    let out = tmp.path().join("b.img");
    restore(
        &target,
        &format!("vol-b/{}", rb.id),
        &FileSink::create(&out, GIB).unwrap(),
        &NoProgress,
    )
    .await
    .unwrap();
    assert_same(&b, 0, &out);
}

async fn small_backup(
    tmp: &std::path::Path,
    opts: &TargetOptions,
) -> (Target, Arc<Volume>, String) {
    let target = Target::open(&url(&tmp.join("t")), opts).await.unwrap();
    let mut v = Volume::new(tmp, "small", 64 * MIB);
    v.snapshot("s1", &scattered(3, 64 * MIB, 12, 2 * MIB));
    let v = Arc::new(v);
    let s = create_backup(
        &target,
        &v.source(0),
        &BackupOptions::default(),
        &NoProgress,
    )
    .await
    .unwrap();
    (target, v, s.id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipped_truncated_and_missing_objects_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let (target, _v, id) = small_backup(tmp.path(), &TargetOptions::default()).await;
    let root = tmp.path().join("t");
    // 12 writes of 2 MiB: over 16 MiB of chunks, so at least 2 packs
    // whatever order the chunks reach them in (a pack closes at 8 MiB);
    // the small volume's packs are the objects to damage.
    let chunks = files(&root, "packs");
    assert!(chunks.len() >= 2, "{chunks:?}");
    assert_eq!(
        count_files(&root, "chunks"),
        0,
        "chunks are stored in packs"
    );
    let name = |p: &std::path::Path| p.strip_prefix(&root).unwrap().display().to_string();

    // A flipped byte: restore and verify --read fail naming the object.
    let mut b = std::fs::read(&chunks[0]).unwrap();
    let mid = b.len() / 2;
    b[mid] ^= 1;
    std::fs::write(&chunks[0], &b).unwrap();
    let out = tmp.path().join("r1.img");
    let e = restore(
        &target,
        &id,
        &FileSink::create(&out, 64 * MIB).unwrap(),
        &NoProgress,
    )
    .await
    .unwrap_err();
    assert!(matches!(e, BackupError::Corrupt { .. }), "{e}");
    assert!(e.to_string().contains(&name(&chunks[0])), "{e}");
    let e = verify(&target, &id, true, &NoProgress).await.unwrap_err();
    assert!(e.to_string().contains(&name(&chunks[0])), "{e}");
    verify(&target, &id, false, &NoProgress).await.unwrap(); // present, only --read sees it

    // A truncated object.
    let b = std::fs::read(&chunks[1]).unwrap();
    std::fs::write(&chunks[1], &b[..b.len() - 7]).unwrap();
    let e = verify(&target, &id, true, &NoProgress).await.unwrap_err();
    assert!(e.to_string().contains(&name(&chunks[1])), "{e}");
    assert!(
        e.to_string().contains(&name(&chunks[0])),
        "verify lists every problem: {e}"
    );
    let e = restore(
        &target,
        &id,
        &FileSink::create(&tmp.path().join("r2.img"), 64 * MIB).unwrap(),
        &NoProgress,
    )
    .await
    .unwrap_err();
    assert!(matches!(e, BackupError::Corrupt { .. }), "{e}");

    // A missing object: plain verify names it.
    std::fs::remove_file(&chunks[1]).unwrap();
    let e = verify(&target, &id, false, &NoProgress).await.unwrap_err();
    assert!(
        e.to_string().contains(&name(&chunks[1])) && e.to_string().contains("missing"),
        "{e}"
    );
    // A damaged pack index is named.
    let ix = files(&root, "packidx")[0].clone();
    let mut b = std::fs::read(&ix).unwrap();
    b[30] ^= 0x02;
    std::fs::write(&ix, &b).unwrap();
    let e = verify(&target, &id, false, &NoProgress).await.unwrap_err();
    assert!(e.to_string().contains(&name(&ix)), "{e}");

    // A damaged manifest is named too.
    let m = files(&root, "manifests")[0].clone();
    let mut b = std::fs::read(&m).unwrap();
    b[20] ^= 0x40;
    std::fs::write(&m, &b).unwrap();
    let e = show(&target, &id).await.unwrap_err();
    assert!(e.to_string().contains(&name(&m)), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_wrong_missing_and_unexpected() {
    let tmp = tempfile::tempdir().unwrap();
    let key = b"0123456789abcdef0123456789abcdef".to_vec();
    let opts = TargetOptions {
        key: Some(key.clone()),
        ..Default::default()
    };
    let (target, v, id) = small_backup(tmp.path(), &opts).await;
    let cfg = target.config().await.unwrap().unwrap();
    assert_eq!(cfg.encryption, "xchacha20poly1305");
    assert!(
        cfg.hash_key.is_none(),
        "an encrypted target does not store its hash key"
    );
    let u = url(&tmp.path().join("t"));

    let no_key = Target::open(&u, &TargetOptions::default()).await.unwrap();
    let e = list(&no_key, None).await.unwrap_err();
    assert!(
        matches!(e, BackupError::Key(_)) && e.to_string().contains("encrypted"),
        "{e}"
    );
    let wrong = Target::open(
        &u,
        &TargetOptions {
            key: Some(b"another key of 16+ bytes".to_vec()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let e = restore(
        &wrong,
        &id,
        &FileSink::create(&tmp.path().join("x"), 64 * MIB).unwrap(),
        &NoProgress,
    )
    .await
    .unwrap_err();
    assert!(
        matches!(e, BackupError::Key(_)) && e.to_string().contains("wrong key"),
        "{e}"
    );

    // The right key restores.
    let out = tmp.path().join("ok.img");
    restore(
        &target,
        &id,
        &FileSink::create(&out, 64 * MIB).unwrap(),
        &NoProgress,
    )
    .await
    .unwrap();
    assert_same(&v, 0, &out);

    // A key for an unencrypted target is refused, not ignored.
    let tmp2 = tempfile::tempdir().unwrap();
    let (_t, _v, _id) = small_backup(tmp2.path(), &TargetOptions::default()).await;
    let t2 = Target::open(&url(&tmp2.path().join("t")), &opts)
        .await
        .unwrap();
    let e = list(&t2, None).await.unwrap_err();
    assert!(e.to_string().contains("not encrypted"), "{e}");

    // Stored objects do not hold the plaintext.
    let plain = v.read_at(0, 0, 64 * MIB as usize);
    let nonzero = plain
        .chunks(4096)
        .find(|c| c.iter().any(|&b| b != 0))
        .unwrap()
        .to_vec();
    let packs = files(&tmp.path().join("t"), "packs");
    assert!(!packs.is_empty());
    for f in packs {
        let b = std::fs::read(&f).unwrap();
        assert!(!b.windows(64).any(|w| w == &nonzero[..64]));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_backup_lists_nothing_and_retry_uploads_only_missing() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("t");
    let target = Target::open(
        &url(&root),
        &TargetOptions {
            parallel: 2,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let mut v = Volume::new(tmp.path(), "vol", 256 * MIB);
    v.snapshot("s1", &scattered(9, 256 * MIB, 32, 4 * MIB));
    let v = Arc::new(v);
    let mut failing = v.source(0);
    failing.fail_after_reads = Some(40);
    let e = create_backup(&target, &failing, &BackupOptions::default(), &NoProgress)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("injected read failure"), "{e}");
    assert!(
        list(&target, None).await.unwrap().is_empty(),
        "an interrupted backup lists as nothing"
    );
    assert_eq!(
        count_files(&root, "locks"),
        0,
        "the lock is released on failure"
    );
    // 40 chunks read: the full packs (8 chunks each) were uploaded and
    // indexed on the way out; the one being filled was not.
    let packs_before = count_files(&root, "packs") as u64;
    assert!(packs_before >= 3, "{packs_before} packs");
    let s = create_backup(
        &target,
        &v.source(0),
        &BackupOptions::default(),
        &NoProgress,
    )
    .await
    .unwrap();
    assert!(s.target_chunks >= 8 * packs_before, "{s:?}");
    assert_eq!(
        s.stats.chunks_reused, s.target_chunks,
        "retry reuses what the first try uploaded"
    );
    assert_eq!(
        s.packs + packs_before,
        count_files(&root, "packs") as u64,
        "the retry's packs hold only the rest"
    );
    let out = tmp.path().join("r.img");
    restore(
        &target,
        &s.id,
        &FileSink::create(&out, 256 * MIB).unwrap(),
        &NoProgress,
    )
    .await
    .unwrap();
    assert_same(&v, 0, &out);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_beside_a_running_backup_deletes_nothing_it_needs() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("t");
    let u = url(&root);
    let target = Arc::new(
        Target::open(
            &u,
            &TargetOptions {
                parallel: 2,
                ..Default::default()
            },
        )
        .await
        .unwrap(),
    );
    // An old backup, then removed: its chunks are garbage.
    let mut old = Volume::new(tmp.path(), "old", 64 * MIB);
    old.snapshot("s", &scattered(11, 64 * MIB, 8, 4 * MIB));
    let old = Arc::new(old);
    let o = create_backup(
        &target,
        &old.source(0),
        &BackupOptions::default(),
        &NoProgress,
    )
    .await
    .unwrap();
    // The running backup shares data with the old one (dedup against
    // chunks that are about to become garbage).
    let mut v = Volume::new(tmp.path(), "vol", 64 * MIB);
    let mut w = scattered(11, 64 * MIB, 8, 4 * MIB);
    w.extend(scattered(12, 64 * MIB, 4, 4 * MIB));
    v.snapshot("s", &w);
    let v = Arc::new(v);
    remove(&target, &o.id).await.unwrap();

    let (t2, v2) = (target.clone(), v.clone());
    let running = tokio::spawn(async move {
        let mut src = v2.source(0);
        src.read_delay = Some(Duration::from_millis(30));
        create_backup(&t2, &src, &BackupOptions::default(), &NoProgress).await
    });
    while count_files(&root, "locks") == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let r = gc(&target, &GcOptions::default(), &NoProgress)
        .await
        .unwrap();
    assert!(!r.deferred_by.is_empty(), "gc saw the running backup");
    assert_eq!(r.deleted, 0);
    assert!(r.unreferenced > 0);
    let s = running.await.unwrap().unwrap();
    assert!(
        s.stats.chunks_reused > 0,
        "the backup deduplicated against the old chunks"
    );
    // Now gc deletes the old backup's chunks that nothing uses, and the new
    // backup still verifies.
    let r = gc(&target, &GcOptions::default(), &NoProgress)
        .await
        .unwrap();
    assert!(r.deferred_by.is_empty());
    assert!(r.deleted > 0, "{r:?}");
    verify(&target, &s.id, true, &NoProgress).await.unwrap();
    let out = tmp.path().join("r.img");
    restore(
        &target,
        &s.id,
        &FileSink::create(&out, 64 * MIB).unwrap(),
        &NoProgress,
    )
    .await
    .unwrap();
    assert_same(&v, 0, &out);
    assert_eq!(
        gc(&target, &GcOptions::default(), &NoProgress)
            .await
            .unwrap()
            .unreferenced,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forget_keeps_last_and_gc_frees_the_rest() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("t");
    let target = Target::open(&url(&root), &TargetOptions::default())
        .await
        .unwrap();
    let mut v = Volume::new(tmp.path(), "vol", 32 * MIB);
    for i in 0..5 {
        v.snapshot(&format!("s{i}"), &scattered(100 + i, 32 * MIB, 2, 2 * MIB));
    }
    let v = Arc::new(v);
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(
            create_backup(
                &target,
                &v.source(i),
                &BackupOptions::default(),
                &NoProgress,
            )
            .await
            .unwrap()
            .id,
        );
    }
    assert!(
        forget(&target, None, &Retention::default(), false)
            .await
            .is_err(),
        "an empty policy is refused"
    );
    let r = forget(
        &target,
        None,
        &Retention {
            keep_last: 2,
            ..Default::default()
        },
        false,
    )
    .await
    .unwrap();
    assert_eq!(r.removed.len(), 3);
    let left: Vec<_> = list(&target, Some("vol"))
        .await
        .unwrap()
        .into_iter()
        .map(|b| b.id)
        .collect();
    assert_eq!(left, ids[3..].to_vec());
    let g = gc(&target, &GcOptions::default(), &NoProgress)
        .await
        .unwrap();
    assert!(g.deleted > 0);
    let out = tmp.path().join("r.img");
    restore(
        &target,
        &ids[4],
        &FileSink::create(&out, 32 * MIB).unwrap(),
        &NoProgress,
    )
    .await
    .unwrap();
    assert_same(&v, 4, &out);
    verify(&target, &ids[3], true, &NoProgress).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_source_reads_only_allocated_ranges() {
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("disk.img");
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(256 * MIB).unwrap();
    let mut buf = vec![0u8; 3 * MIB as usize];
    fill(5, &mut buf);
    use std::os::unix::fs::FileExt;
    f.write_all_at(&buf, 100 * MIB + 4096).unwrap();
    f.write_all_at(&buf[..8192], 200 * MIB).unwrap();
    drop(f);
    let target = Target::open(&url(&tmp.path().join("t")), &TargetOptions::default())
        .await
        .unwrap();
    let src = FileSource::open(&img, "disk", "now").unwrap();
    let s = create_backup(&target, &src, &BackupOptions::default(), &NoProgress)
        .await
        .unwrap();
    assert!(s.stats.bytes_read <= 6 * MIB, "read {}", s.stats.bytes_read);
    let out = tmp.path().join("out.img");
    restore(
        &target,
        &s.id,
        &FileSink::create(&out, 256 * MIB).unwrap(),
        &NoProgress,
    )
    .await
    .unwrap();
    assert_eq!(std::fs::read(&img).unwrap(), std::fs::read(&out).unwrap());
    assert!(
        allocated(&out) <= 4 * MIB,
        "sparse restore: {}",
        allocated(&out)
    );
    // A file source has no snapshots: the next backup is full again.
    let s2 = create_backup(&target, &src, &BackupOptions::default(), &NoProgress)
        .await
        .unwrap();
    assert!(s2.parent.is_none());
    assert_eq!(s2.stats.chunks_new, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chosen_id_names_the_backup_and_is_never_reused() {
    let tmp = tempfile::tempdir().unwrap();
    let target = Target::open(&url(&tmp.path().join("t")), &TargetOptions::default())
        .await
        .unwrap();
    let mut v = Volume::new(tmp.path(), "vol-a", 64 * MIB);
    v.snapshot("s1", &scattered(3, 64 * MIB, 4, MIB));
    let v = Arc::new(v);
    let chosen = BackupOptions {
        full: false,
        id: Some("20261205T010203.456Z-1a2b3c4d".into()),
    };
    let s = create_backup(&target, &v.source(0), &chosen, &NoProgress)
        .await
        .unwrap();
    assert_eq!(s.id, "20261205T010203.456Z-1a2b3c4d");
    assert_eq!(
        show(&target, "vol-a/20261205T010203.456Z-1a2b3c4d")
            .await
            .unwrap()
            .id,
        s.id
    );
    // The same id again (a retried request): refused, the backup kept.
    let e = create_backup(&target, &v.source(0), &chosen, &NoProgress)
        .await
        .unwrap_err();
    assert!(matches!(e, BackupError::Exists { .. }), "{e}");
    assert_eq!(list(&target, Some("vol-a")).await.unwrap().len(), 1);
    for bad in ["", "a/b", ".hidden", "with space"] {
        let opts = BackupOptions {
            full: false,
            id: Some(bad.into()),
        };
        let e = create_backup(&target, &v.source(0), &opts, &NoProgress)
            .await
            .unwrap_err();
        assert!(matches!(e, BackupError::Invalid(_)), "{bad:?}: {e}");
    }
}
