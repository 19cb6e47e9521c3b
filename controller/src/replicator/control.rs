//! gRPC calls from the controller to replica servers (`strata.replica.v1`):
//! open or create a replica, persist an epoch with the sync state, and the
//! snapshot chain calls (list, delete, revert, changed ranges, clone).

use std::net::SocketAddr;
use std::time::Duration;

use strata_proto::replica::replica_control_client::ReplicaControlClient;
use strata_proto::replica::{
    ChangedExtentsRequest, CloneReplicaRequest, CreateReplicaRequest, ExpandReplicaRequest, Extent,
    RegionDigestsRequest, ReplicaRef, ReplicaStatus, SetEpochRequest, SnapshotInfo,
    SnapshotRequest,
};
use strata_replica::error_chain;
use tonic::Code;

/// Why a call to a replica server's control API failed. The kind is told
/// by the gRPC code the replica chose (`replica/src/control.rs`,
/// `to_status`), never by the message.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ControlError {
    #[error("Replica server {addr}: cannot connect: {reason}")]
    Connect { addr: SocketAddr, reason: String },
    /// The request is wrong on this replica (no such snapshot or replica,
    /// a name taken, a bad argument, a precondition such as newer
    /// snapshots): nothing is wrong with the replica itself.
    #[error("Replica server {addr}: {op} refused: {message}")]
    Refused {
        addr: SocketAddr,
        op: &'static str,
        refusal: Refusal,
        message: String,
    },
    /// The replica is at another epoch: another controller owns it.
    #[error("Replica server {addr}: {op} refused, the replica is fenced: {message}")]
    Fenced {
        addr: SocketAddr,
        op: &'static str,
        message: String,
    },
    /// The replica or the call failed (IO, timeout, corruption...).
    #[error("Replica server {addr}: {op} failed: {message}")]
    Failed {
        addr: SocketAddr,
        op: &'static str,
        message: String,
    },
}

/// What kind of refusal a [`ControlError::Refused`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No such replica or snapshot.
    NotFound,
    /// The name is taken.
    AlreadyExists,
    /// A malformed argument (name, size, range).
    Invalid,
    /// The replica's state forbids it now (newer snapshots exist, the
    /// replica is not open).
    Precondition,
}

impl ControlError {
    /// Classifies a replica server's answer by its gRPC code.
    pub fn from_status(addr: SocketAddr, op: &'static str, s: tonic::Status) -> ControlError {
        let message = s.message().to_string();
        let refused = |refusal| ControlError::Refused {
            addr,
            op,
            refusal,
            message: message.clone(),
        };
        match s.code() {
            Code::NotFound => refused(Refusal::NotFound),
            Code::AlreadyExists => refused(Refusal::AlreadyExists),
            Code::InvalidArgument => refused(Refusal::Invalid),
            Code::FailedPrecondition => refused(Refusal::Precondition),
            Code::Aborted => ControlError::Fenced { addr, op, message },
            _ => ControlError::Failed { addr, op, message },
        }
    }

    /// The refusal kind, if the replica refused the request as wrong.
    pub fn refusal(&self) -> Option<Refusal> {
        match self {
            ControlError::Refused { refusal, .. } => Some(*refusal),
            _ => None,
        }
    }
}

/// A gRPC client of the replica server at `addr`, for many calls. It
/// proves the process's cluster key, if any ([`strata_replica::auth`]).
pub async fn connect(
    addr: SocketAddr,
    timeout: Duration,
) -> Result<ReplicaControlClient<tonic::transport::Channel>, ControlError> {
    let unreachable = |reason: String| ControlError::Connect { addr, reason };
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| unreachable(e.to_string()))?
        .connect_timeout(timeout)
        .timeout(timeout);
    let key = strata_replica::auth::process_key();
    let channel = strata_replica::auth::control_channel(endpoint, addr, key)
        .await
        .map_err(|e| unreachable(error_chain(&e)))?;
    Ok(ReplicaControlClient::new(channel))
}

/// Opens the replica of `volume` at `addr`; creates it with `create_size`
/// when missing (a new node or a wiped disk). The bool is true if created.
pub async fn open_or_create(
    addr: SocketAddr,
    volume: &str,
    create_size: Option<u64>,
    timeout: Duration,
) -> Result<(ReplicaStatus, bool), ControlError> {
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
                .map_err(|s| ControlError::from_status(addr, "create", s)),
            None => Err(ControlError::from_status(addr, "open", s)),
        },
        Err(s) => Err(ControlError::from_status(addr, "open", s)),
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
) -> Result<(), ControlError> {
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
    .map_err(|s| ControlError::from_status(addr, "set epoch", s))
}

/// The replica's status (opens it if needed).
pub async fn status(
    addr: SocketAddr,
    volume: &str,
    timeout: Duration,
) -> Result<ReplicaStatus, ControlError> {
    let mut c = connect(addr, timeout).await?;
    c.status(ReplicaRef {
        volume: volume.to_string(),
    })
    .await
    .map(|s| s.into_inner())
    .map_err(|s| ControlError::from_status(addr, "status", s))
}

/// Deletes the replica of `volume` at `addr` and its data.
pub async fn delete_replica(
    addr: SocketAddr,
    volume: &str,
    timeout: Duration,
) -> Result<(), ControlError> {
    let mut c = connect(addr, timeout).await?;
    c.delete_replica(ReplicaRef {
        volume: volume.to_string(),
    })
    .await
    .map(|_| ())
    .map_err(|s| ControlError::from_status(addr, "delete", s))
}

/// Deletes snapshot `name` on one replica, fenced at `epoch`.
pub async fn delete_snapshot(
    addr: SocketAddr,
    volume: &str,
    name: &str,
    epoch: u64,
    timeout: Duration,
) -> Result<(), ControlError> {
    let mut c = connect(addr, timeout).await?;
    c.delete_snapshot(SnapshotRequest {
        volume: volume.to_string(),
        name: name.to_string(),
        epoch,
        discard_newer: false,
    })
    .await
    .map(|_| ())
    .map_err(|s| ControlError::from_status(addr, "snapshot delete", s))
}

/// Grows one replica to `size` bytes, fenced at `epoch`; its status after.
pub async fn expand_replica(
    addr: SocketAddr,
    volume: &str,
    size: u64,
    epoch: u64,
    timeout: Duration,
) -> Result<ReplicaStatus, ControlError> {
    let mut c = connect(addr, timeout).await?;
    c.expand_replica(ExpandReplicaRequest {
        volume: volume.to_string(),
        size,
        epoch,
    })
    .await
    .map(|s| s.into_inner())
    .map_err(|s| ControlError::from_status(addr, "expand", s))
}

/// Reverts one replica to snapshot `name`, fenced at `epoch`.
pub async fn revert_snapshot(
    addr: SocketAddr,
    volume: &str,
    name: &str,
    epoch: u64,
    discard_newer: bool,
    timeout: Duration,
) -> Result<(), ControlError> {
    let mut c = connect(addr, timeout).await?;
    c.revert_snapshot(SnapshotRequest {
        volume: volume.to_string(),
        name: name.to_string(),
        epoch,
        discard_newer,
    })
    .await
    .map(|_| ())
    .map_err(|s| ControlError::from_status(addr, "revert", s))
}

/// Snapshots of one replica, oldest first.
pub async fn list_snapshots(
    addr: SocketAddr,
    volume: &str,
    timeout: Duration,
) -> Result<Vec<SnapshotInfo>, ControlError> {
    let mut c = connect(addr, timeout).await?;
    c.list_snapshots(ReplicaRef {
        volume: volume.to_string(),
    })
    .await
    .map(|s| s.into_inner().snapshots)
    .map_err(|s| ControlError::from_status(addr, "list snapshots", s))
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
) -> Result<Vec<Extent>, ControlError> {
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
    .map_err(|s| ControlError::from_status(addr, "list changed ranges", s))
}

/// Creates volume `new` on the server at `addr` from snapshot `snapshot` of
/// `volume` (a local copy on that server).
pub async fn clone_replica(
    addr: SocketAddr,
    volume: &str,
    snapshot: &str,
    new: &str,
    timeout: Duration,
) -> Result<ReplicaStatus, ControlError> {
    let mut c = connect(addr, timeout).await?;
    c.clone_replica(CloneReplicaRequest {
        volume: volume.to_string(),
        snapshot: snapshot.to_string(),
        new_volume: new.to_string(),
    })
    .await
    .map(|s| s.into_inner())
    .map_err(|s| ControlError::from_status(addr, "clone", s))
}

/// Digests of each `region` bytes of `[offset, offset + length)` of the
/// live volume on one replica (`client` from [`connect`]).
pub async fn region_digests(
    client: &mut ReplicaControlClient<tonic::transport::Channel>,
    addr: SocketAddr,
    volume: &str,
    offset: u64,
    length: u64,
    region: u64,
) -> Result<Vec<Vec<u8>>, ControlError> {
    client
        .region_digests(RegionDigestsRequest {
            volume: volume.to_string(),
            offset,
            length,
            region,
        })
        .await
        .map(|r| r.into_inner().digests)
        .map_err(|s| ControlError::from_status(addr, "region digests", s))
}
