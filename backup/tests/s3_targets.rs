//! Backups to real S3-protocol servers through the real aws-sdk-s3 client:
//! the round trip against moto and (encrypted) against s3s-fs, which checks
//! SigV4 signatures; gc and retention over S3 listings; and the server
//! killed in the middle of a backup.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::servers::{Kind, Server};
use common::*;
use strata_backup::{
    create_backup, gc, list, remove, restore, verify, BackupError, BackupOptions, FileSink,
    GcOptions, NoProgress, Target, TargetOptions,
};

/// Scale of the round trip against S3 servers: (volume, data, change).
/// The full issue scale by default; `STRATA_S3_TEST_SMALL=1` for a quick run.
fn scale() -> (u64, u64, u64) {
    if std::env::var_os("STRATA_S3_TEST_SMALL").is_some() {
        (GIB, 256 * MIB, 16 * MIB)
    } else {
        (4 * GIB, GIB, 64 * MIB)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moto_round_trip_then_gc() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(server) = Server::start(Kind::Moto, &tmp.path().join("moto")) else {
        return;
    };
    let url = "s3://strata-test/moto-rt";
    let (size, data, change) = scale();
    round_trip(url, &server.options(), tmp.path(), size, data, change).await;
    // Remove the full backup: gc deletes what only it used, over S3 listings.
    let target = Target::open(url, &server.options()).await.unwrap();
    let backups = list(&target, None).await.unwrap();
    assert_eq!(backups.len(), 2);
    remove(&target, &backups[0].id).await.unwrap();
    let r = gc(&target, &GcOptions::default(), &NoProgress)
        .await
        .unwrap();
    assert!(r.deleted > 0 && r.deferred_by.is_empty(), "{r:?}");
    verify(&target, &backups[1].id, false, &NoProgress)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3s_fs_encrypted_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(server) = Server::start(Kind::S3sFs, &tmp.path().join("s3s")) else {
        return;
    };
    let opts = TargetOptions {
        key: Some(b"s3s-fs test key, 32 bytes long!!".to_vec()),
        ..server.options()
    };
    let (size, data, change) = scale();
    round_trip(
        "s3://strata-test/enc",
        &opts,
        tmp.path(),
        size,
        data,
        change,
    )
    .await;
    // Wrong credentials are a clear store error (s3s-fs checks signatures).
    let mut bad = opts.clone();
    bad.s3.credentials = Some(("strata-test-key".into(), "wrong-secret".into()));
    bad.s3.create_bucket = false;
    let t = Target::open("s3://strata-test/enc", &bad).await.unwrap();
    let e = list(&t, None).await.unwrap_err();
    assert!(matches!(e, BackupError::Store { .. }), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_server_killed_mid_backup_then_retry_uploads_only_missing() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(mut server) = Server::start(Kind::S3sFs, &tmp.path().join("s3s")) else {
        return;
    };
    let url = "s3://strata-test/kill";
    let opts = TargetOptions {
        parallel: 4,
        ..server.options()
    };
    let target = Arc::new(Target::open(url, &opts).await.unwrap());
    let mut v = Volume::new(tmp.path(), "vol", GIB);
    v.snapshot("s1", &scattered(21, GIB, 64, 4 * MIB));
    let v = Arc::new(v);
    let pack_dir = tmp.path().join("s3s/strata-test/kill/packs");

    let (t2, v2) = (target.clone(), v.clone());
    let running = tokio::spawn(async move {
        let mut src = v2.source(0);
        src.read_delay = Some(Duration::from_millis(20));
        create_backup(&t2, &src, &BackupOptions::default(), &NoProgress).await
    });
    // 12 packs: at least one checkpoint of the index (every 8 packs).
    while count_files(&pack_dir, "") < 12 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.kill();
    let started = std::time::Instant::now();
    let e = running.await.unwrap().unwrap_err();
    eprintln!(
        "backup failed after the server died ({:?} later): {e}",
        started.elapsed()
    );
    assert!(matches!(e, BackupError::Store { .. }), "{e}");
    assert!(started.elapsed() < Duration::from_secs(120));

    server.restart();
    assert!(
        list(&target, None).await.unwrap().is_empty(),
        "the failed backup lists as nothing"
    );
    let s = create_backup(
        &target,
        &v.source(0),
        &BackupOptions::default(),
        &NoProgress,
    )
    .await
    .unwrap();
    eprintln!("retry: {:?}", s.stats);
    assert!(
        s.target_chunks >= 64,
        "the checkpointed packs were indexed: {s:?}"
    );
    assert_eq!(
        s.stats.chunks_reused, s.target_chunks,
        "retry reused the chunks already uploaded"
    );
    let out = tmp.path().join("r.img");
    restore(
        &target,
        &s.id,
        &FileSink::create(&out, GIB).unwrap(),
        &NoProgress,
    )
    .await
    .unwrap();
    assert_same(&v, 0, &out);
}
