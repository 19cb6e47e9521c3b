//! Snapshot chain operations through the replicator, in one process with
//! real replica servers on loopback: a snapshot a backup holds cannot be
//! deleted or discarded by a revert until the backup lets go; snapshots
//! are taken at the same point on every replica.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use strata_controller::assemble::{assemble, AssembleOptions};
use strata_controller::replicator::{Volume, VolumeError};
use tokio::sync::watch;

const SIZE: u64 = 4 << 20;

async fn volume(dir: &std::path::Path) -> (Arc<Volume>, Vec<watch::Sender<bool>>) {
    let mut addrs: Vec<SocketAddr> = Vec::new();
    let mut stops = Vec::new();
    for i in 0..3 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        addrs.push(listener.local_addr().unwrap());
        let (tx, rx) = watch::channel(false);
        let d = dir.join(format!("r{i}"));
        tokio::spawn(async move { strata_replica::node::serve_node(&d, listener, rx).await });
        stops.push(tx);
    }
    let opts = AssembleOptions {
        volume: "chain".into(),
        replicas: addrs,
        create_size: Some(SIZE),
        io_timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(2),
        force_degraded: false,
        sync_rate: None,
        lag: strata_controller::replicator::LagPolicy::default(),
    };
    (Arc::new(assemble(&opts).await.unwrap()), stops)
}

fn names(list: &[strata_proto::replica::SnapshotInfo]) -> Vec<&str> {
    list.iter().map(|s| s.name.as_str()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_held_by_a_backup_is_neither_deleted_nor_reverted_away() {
    let dir = tempfile::tempdir().unwrap();
    let (v, _stops) = volume(dir.path()).await;
    v.write(0, Bytes::from(vec![1u8; 4096]), false)
        .await
        .unwrap();
    v.create_snapshot("a").await.unwrap();
    v.write(0, Bytes::from(vec![2u8; 4096]), false)
        .await
        .unwrap();
    v.create_snapshot("b").await.unwrap();
    assert!(matches!(
        v.create_snapshot("b").await,
        Err(VolumeError::Snapshot { .. })
    ));

    let hold = v.hold_snapshot("b");
    let err = v.delete_snapshot("b").await.unwrap_err().to_string();
    assert!(err.contains("backup") && err.contains("\"b\""), "{err}");
    let err = v.revert_snapshot("a", true).await.unwrap_err().to_string();
    assert!(err.contains("backup"), "{err}");
    assert_eq!(names(&v.list_snapshots().await.unwrap()), ["a", "b"]);
    // Deleting another snapshot is fine meanwhile.
    v.delete_snapshot("a").await.unwrap();
    drop(hold);
    v.delete_snapshot("b").await.unwrap();
    assert!(v.list_snapshots().await.unwrap().is_empty());
    // The volume reads what it read before.
    assert_eq!(&v.read(0, 4096).await.unwrap()[..], &[2u8; 4096][..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_holds_every_acknowledged_write_and_none_after() {
    let dir = tempfile::tempdir().unwrap();
    let (v, _stops) = volume(dir.path()).await;
    // Writers race the snapshot; each records whether its write was
    // acknowledged before the snapshot call started or began after it
    // returned.
    let before = v.clone();
    for i in 0..64u64 {
        before
            .write(i * 4096, Bytes::from(vec![7u8; 4096]), false)
            .await
            .unwrap();
    }
    let writer = {
        let v = v.clone();
        tokio::spawn(async move {
            for i in 64..512u64 {
                v.write(i * 4096, Bytes::from(vec![9u8; 4096]), false)
                    .await
                    .unwrap();
            }
        })
    };
    let pause = v.create_snapshot("mid").await.unwrap();
    let after_start = 512u64;
    for i in after_start..after_start + 64 {
        v.write(i * 4096, Bytes::from(vec![5u8; 4096]), false)
            .await
            .unwrap();
    }
    writer.await.unwrap();
    assert!(pause < Duration::from_secs(5), "{pause:?}");
    // Read the snapshot straight from every replica: identical, with all of
    // the first 64 blocks, none of the last 64, and some prefix of the racing ones.
    drop(v);
    let mut views = Vec::new();
    for i in 0..3 {
        let (store, _) = strata_replica::Store::open(
            &dir.path().join(format!("r{i}")).join("chain"),
            Arc::new(strata_replica::engine::PortableEngine),
        )
        .or_else(|_| {
            // The server still holds the lock: read through a copy.
            let copy = dir.path().join(format!("copy{i}"));
            copy_dir(&dir.path().join(format!("r{i}")).join("chain"), &copy);
            strata_replica::Store::open(&copy, Arc::new(strata_replica::engine::PortableEngine))
        })
        .unwrap();
        let mut buf = vec![0u8; 576 * 4096];
        store
            .read_view(strata_replica::View::Snapshot("mid"), 0, &mut buf)
            .unwrap();
        views.push(buf);
    }
    assert!(
        views[1] == views[0] && views[2] == views[0],
        "replicas' snapshots differ"
    );
    let block = |i: usize| views[0][i * 4096];
    assert!((0..64).all(|i| block(i) == 7));
    assert!((512..576).all(|i| block(i) == 0));
    // The racing writer's blocks: written ones form a prefix (it writes in order).
    let written = (64..512).take_while(|&i| block(i) == 9).count();
    assert!((64 + written..512).all(|i| block(i) == 0));
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_name() != "volume.lock" {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}
