//! Copies a volume's snapshot chain to a replica being rebuilt, before it
//! joins: for each snapshot, oldest first, the ranges that changed since the
//! previous one are copied from a healthy replica's snapshot into the
//! target's head (data written, zeros trimmed), then the target freezes its
//! head under the snapshot's name. Snapshots never change, so this runs
//! while client IO goes on; the live data is copied after the join by the
//! ordinary sync job. Chain changes in the meantime are caught when the
//! replica joins (`recovery::rejoin` compares the chains under the chain
//! lock and copies what is still missing).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};
use strata_replica::client::ReplicaClient;
use strata_replica::control::MAX_EXTENT_WINDOW;

use super::{control, SyncError, Volume};

/// Largest piece read and written at once.
const PIECE: u64 = 4 << 20;
/// Pieces in flight.
const PARALLEL: usize = 4;

/// Copies snapshots `snapshots` (in chain order; the target already holds
/// every snapshot before them, the last being `base`) to the replica at
/// `target_addr`, which is at `target_epoch`. Returns bytes copied.
pub async fn copy_snapshots(
    volume: &Volume,
    target_addr: SocketAddr,
    target_epoch: u64,
    mut base: Option<String>,
    snapshots: &[String],
) -> Result<u64, SyncError> {
    let timeout = volume.options.io_timeout;
    let target = ReplicaClient::connect(target_addr, &volume.name, target_epoch, timeout)
        .await
        .map_err(|e| SyncError::data("data connection to the target", e))?;
    let started = Instant::now();
    let mut copied = 0u64;
    for snap in snapshots {
        let source_addr = volume.healthy_addr()?;
        let source = ReplicaClient::connect_snapshot(
            source_addr,
            &volume.name,
            snap,
            volume.epoch(),
            timeout,
        )
        .await
        .map_err(|e| SyncError::data(format!("reading snapshot {snap} from {source_addr}"), e))?;
        let mut offset = 0;
        while offset < volume.size() {
            let len = MAX_EXTENT_WINDOW.min(volume.size() - offset);
            let extents = control::changed_extents(
                source_addr,
                &volume.name,
                base.as_deref(),
                Some(snap),
                offset,
                len,
                volume.options.control_timeout,
            )
            .await?;
            let mut pieces = extents.iter().flat_map(|e| {
                (e.offset..e.offset + e.length)
                    .step_by(PIECE as usize)
                    .map(move |s| (s, PIECE.min(e.offset + e.length - s), e.data))
            });
            let mut in_flight = FuturesUnordered::new();
            loop {
                while in_flight.len() < PARALLEL {
                    let Some((s, n, data)) = pieces.next() else {
                        break;
                    };
                    let (source, target) = (&source, &target);
                    in_flight.push(async move {
                        if data {
                            let bytes = source.read(s, n as u32).await.map_err(|e| {
                                SyncError::data(format!("read of snapshot {snap}"), e)
                            })?;
                            target
                                .write(s, bytes, false)
                                .await
                                .map_err(|e| SyncError::data("write to the target", e))?;
                            Ok::<u64, SyncError>(n)
                        } else {
                            target
                                .trim(s, n as u32)
                                .await
                                .map_err(|e| SyncError::data("trim on the target", e))?;
                            Ok(0)
                        }
                    });
                }
                match in_flight.next().await {
                    Some(r) => copied += r?,
                    None => break,
                }
                throttle(volume, copied, started).await;
            }
            offset += len;
        }
        target
            .snapshot(snap)
            .await
            .map_err(|e| SyncError::data(format!("snapshot {snap} on the target"), e))?;
        tracing::info!(volume = %volume.name, replica = %target_addr, snapshot = %snap, mib = copied >> 20, "snapshot layer rebuilt");
        base = Some(snap.clone());
    }
    Ok(copied)
}

/// Sleeps while the copy is ahead of the volume's sync bandwidth cap.
async fn throttle(volume: &Volume, copied: u64, started: Instant) {
    if let Some(rate) = volume.options.sync_rate {
        let due = Duration::from_secs_f64(copied as f64 / rate.max(1) as f64);
        let since = started.elapsed();
        if due > since {
            tokio::time::sleep(due - since).await;
        }
    }
}
