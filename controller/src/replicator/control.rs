//! gRPC calls from the controller to replica servers (`strata.replica.v1`):
//! open or create a replica, persist an epoch with the sync state, and the
//! snapshot chain calls (list, delete, revert, changed ranges, clone).

use std::net::SocketAddr;
use std::time::Duration;

use strata_proto::replica::replica_control_client::ReplicaControlClient;
use strata_proto::replica::{
    ChangedExtentsRequest, CloneReplicaRequest, CreateReplicaRequest, Extent, RegionDigestsRequest,
    ReplicaRef, ReplicaStatus, SetEpochRequest, SnapshotInfo, SnapshotRequest,
};
use tonic::Code;

/// A gRPC client of the replica server at `addr`, for many calls.
pub async fn connect(
    addr: SocketAddr,
    timeout: Duration,
) -> Result<ReplicaControlClient<tonic::transport::Channel>, String> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| e.to_string())?
        .connect_timeout(timeout)
        .timeout(timeout);
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    Ok(ReplicaControlClient::new(channel))
}

/// Opens the replica of `volume` at `addr`; creates it with `create_size`
/// when missing (a new node or a wiped disk). The bool is true if created.
pub async fn open_or_create(
    addr: SocketAddr,
    volume: &str,
    create_size: Option<u64>,
    timeout: Duration,
) -> Result<(ReplicaStatus, bool), String> {
    let mut c = connect(addr, timeout).await?;
    match c
        .open_replica(ReplicaRef {
            volume: volume.to_string(),
        })
        .await
    {
        Ok(s) => Ok((s.into_inner(), false)),
        Err(s) if s.code() == Code::NotFound => match create_size {
            Some(size) => c
                .create_replica(CreateReplicaRequest {
                    volume: volume.to_string(),
                    size,
                })
                .await
                .map(|s| (s.into_inner(), true))
                .map_err(|s| format!("create failed: {}", s.message())),
            None => Err(format!("no replica of {volume} there: {}", s.message())),
        },
        Err(s) => Err(format!("open failed: {}", s.message())),
    }
}

/// Persists `epoch` (and whether the replica is still being synced) on the
/// replica at `addr`; `reconciled` tells a healthy replica that it matches
/// the volume, so an unclean stop before no longer calls for a comparison. Refused by the replica if it already has a newer
/// epoch: some other controller took over.
pub async fn set_epoch(
    addr: SocketAddr,
    volume: &str,
    epoch: u64,
    owner: &str,
    incomplete: bool,
    reconciled: bool,
    timeout: Duration,
) -> Result<(), String> {
    let mut c = connect(addr, timeout).await?;
    c.set_epoch(SetEpochRequest {
        volume: volume.to_string(),
        epoch,
        incomplete,
        owner: owner.to_string(),
        reconciled,
    })
    .await
    .map(|_| ())
    .map_err(|s| format!("set epoch {epoch} failed: {}", s.message()))
}

/// The replica's status (opens it if needed).
pub async fn status(
    addr: SocketAddr,
    volume: &str,
    timeout: Duration,
) -> Result<ReplicaStatus, String> {
    let mut c = connect(addr, timeout).await?;
    c.status(ReplicaRef {
        volume: volume.to_string(),
    })
    .await
    .map(|s| s.into_inner())
    .map_err(|s| format!("status failed: {}", s.message()))
}

/// Deletes the replica of `volume` at `addr` and its data.
pub async fn delete_replica(
    addr: SocketAddr,
    volume: &str,
    timeout: Duration,
) -> Result<(), String> {
    let mut c = connect(addr, timeout).await?;
    c.delete_replica(ReplicaRef {
        volume: volume.to_string(),
    })
    .await
    .map(|_| ())
    .map_err(|s| format!("delete failed: {}", s.message()))
}

/// Why a chain change was refused by a replica.
#[derive(Debug)]
pub enum ChainError {
    /// The request itself is wrong everywhere (no such snapshot, newer
    /// snapshots exist): report it, fault nobody.
    Refused(String),
    /// The replica is fenced at another epoch.
    Fenced(String),
    /// The replica failed.
    Failed(String),
}

fn chain_error(s: tonic::Status) -> ChainError {
    match s.code() {
        Code::NotFound | Code::InvalidArgument | Code::AlreadyExists => {
            ChainError::Refused(s.message().to_string())
        }
        Code::FailedPrecondition if s.message().contains("epoch") => {
            ChainError::Fenced(s.message().to_string())
        }
        Code::FailedPrecondition => ChainError::Refused(s.message().to_string()),
        _ => ChainError::Failed(s.message().to_string()),
    }
}

/// Deletes snapshot `name` on one replica, fenced at `epoch`.
pub async fn delete_snapshot(
    addr: SocketAddr,
    volume: &str,
    name: &str,
    epoch: u64,
    timeout: Duration,
) -> Result<(), ChainError> {
    let mut c = connect(addr, timeout).await.map_err(ChainError::Failed)?;
    c.delete_snapshot(SnapshotRequest {
        volume: volume.to_string(),
        name: name.to_string(),
        epoch,
        discard_newer: false,
    })
    .await
    .map(|_| ())
    .map_err(chain_error)
}

/// Reverts one replica to snapshot `name`, fenced at `epoch`.
pub async fn revert_snapshot(
    addr: SocketAddr,
    volume: &str,
    name: &str,
    epoch: u64,
    discard_newer: bool,
    timeout: Duration,
) -> Result<(), ChainError> {
    let mut c = connect(addr, timeout).await.map_err(ChainError::Failed)?;
    c.revert_snapshot(SnapshotRequest {
        volume: volume.to_string(),
        name: name.to_string(),
        epoch,
        discard_newer,
    })
    .await
    .map(|_| ())
    .map_err(chain_error)
}

/// Snapshots of one replica, oldest first.
pub async fn list_snapshots(
    addr: SocketAddr,
    volume: &str,
    timeout: Duration,
) -> Result<Vec<SnapshotInfo>, String> {
    let mut c = connect(addr, timeout).await?;
    c.list_snapshots(ReplicaRef {
        volume: volume.to_string(),
    })
    .await
    .map(|s| s.into_inner().snapshots)
    .map_err(|s| format!("listing snapshots failed: {}", s.message()))
}

/// What snapshot `to` (None: the live volume) holds where it may differ
/// from snapshot `from` (None: an empty volume), in one window of at most
/// [`strata_replica::control::MAX_EXTENT_WINDOW`] bytes.
pub async fn changed_extents(
    addr: SocketAddr,
    volume: &str,
    from: Option<&str>,
    to: Option<&str>,
    offset: u64,
    length: u64,
    timeout: Duration,
) -> Result<Vec<Extent>, String> {
    let mut c = connect(addr, timeout).await?;
    c.changed_extents(ChangedExtentsRequest {
        volume: volume.to_string(),
        from_snapshot: from.unwrap_or_default().to_string(),
        to_snapshot: to.unwrap_or_default().to_string(),
        offset,
        length,
    })
    .await
    .map(|s| s.into_inner().extents)
    .map_err(|s| format!("listing changed ranges failed: {}", s.message()))
}

/// Creates volume `new` on the server at `addr` from snapshot `snapshot` of
/// `volume` (a local copy on that server).
pub async fn clone_replica(
    addr: SocketAddr,
    volume: &str,
    snapshot: &str,
    new: &str,
    timeout: Duration,
) -> Result<ReplicaStatus, String> {
    let mut c = connect(addr, timeout).await?;
    c.clone_replica(CloneReplicaRequest {
        volume: volume.to_string(),
        snapshot: snapshot.to_string(),
        new_volume: new.to_string(),
    })
    .await
    .map(|s| s.into_inner())
    .map_err(|s| format!("clone failed: {}", s.message()))
}

/// Digests of each `region` bytes of `[offset, offset + length)` of the
/// live volume on one replica (`client` from [`connect`]).
pub async fn region_digests(
    client: &mut ReplicaControlClient<tonic::transport::Channel>,
    volume: &str,
    offset: u64,
    length: u64,
    region: u64,
) -> Result<Vec<Vec<u8>>, String> {
    client
        .region_digests(RegionDigestsRequest {
            volume: volume.to_string(),
            offset,
            length,
            region,
        })
        .await
        .map(|r| r.into_inner().digests)
        .map_err(|s| format!("region digests failed: {}", s.message()))
}
