//! Which replica serves a read. Replicas on the controller's own host share
//! one page cache, so every read goes to the first healthy one of them (the
//! others only take writes); when it faults, the next one takes over. Real
//! replica servers on loopback, in this process.

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use strata_controller::assemble::{assemble, AssembleOptions};
use strata_controller::replicator::{Volume, READ_STRIPE};
use tokio::sync::watch;

const STRIPES: u64 = 8;

fn ops_ok(volume: &Volume) -> Vec<u64> {
    volume
        .slots()
        .iter()
        .map(|s| s.ops_ok.load(Ordering::Relaxed))
        .collect()
}

/// Reads one block in each stripe and checks its contents.
async fn read_every_stripe(volume: &Volume) {
    for stripe in 0..STRIPES {
        let data = volume.read(stripe * READ_STRIPE, 4096).await.unwrap();
        assert!(
            data.iter().all(|&b| b == stripe as u8 + 1),
            "stripe {stripe}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_go_to_the_first_healthy_replica_on_this_host() {
    let tmp = tempfile::tempdir().unwrap();
    let mut addrs = Vec::new();
    let mut stops = Vec::new();
    for i in 0..3 {
        let addr = strata_replica::testing::spare_loopback_addr();
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let (tx, rx) = watch::channel(false);
        let dir = tmp.path().join(format!("r{i}"));
        tokio::spawn(async move { strata_replica::node::serve_node(&dir, listener, rx).await });
        addrs.push(addr);
        stops.push(tx);
    }
    let volume = assemble(&AssembleOptions {
        volume: "routing".into(),
        replicas: addrs,
        create_size: Some(STRIPES * READ_STRIPE),
        io_timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(2),
        force_degraded: false,
        sync_rate: None,
        lag: strata_controller::replicator::LagPolicy::default(),
    })
    .await
    .unwrap();
    for slot in volume.slots() {
        assert!(slot.healthy_client().unwrap().is_local(), "{}", slot.addr);
    }
    for stripe in 0..STRIPES {
        let data = Bytes::from(vec![stripe as u8 + 1; 4096]);
        volume
            .write(stripe * READ_STRIPE, data, false)
            .await
            .unwrap();
    }

    // Every stripe is read from replica 0; the others see no reads.
    let before = ops_ok(&volume);
    read_every_stripe(&volume).await;
    let after = ops_ok(&volume);
    assert_eq!(
        [
            after[0] - before[0],
            after[1] - before[1],
            after[2] - before[2]
        ],
        [STRIPES, 0, 0],
        "reads per replica"
    );

    // With replica 0 out, replica 1 serves them all.
    volume.fault(&volume.slots()[0], "taken out by the test".into());
    let before = ops_ok(&volume);
    read_every_stripe(&volume).await;
    let after = ops_ok(&volume);
    assert_eq!(
        [after[1] - before[1], after[2] - before[2]],
        [STRIPES, 0],
        "reads per replica with replica 0 out"
    );
    for tx in stops {
        let _ = tx.send(true);
    }
}
