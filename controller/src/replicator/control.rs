//! gRPC calls from the controller to replica servers (`strata.replica.v1`):
//! open or create a replica, and persist an epoch with the sync state.

use std::net::SocketAddr;
use std::time::Duration;

use strata_proto::replica::replica_control_client::ReplicaControlClient;
use strata_proto::replica::{CreateReplicaRequest, ReplicaRef, ReplicaStatus, SetEpochRequest};
use tonic::Code;

async fn connect(
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
/// replica at `addr`. Refused by the replica if it already has a newer
/// epoch: some other controller took over.
pub async fn set_epoch(
    addr: SocketAddr,
    volume: &str,
    epoch: u64,
    owner: &str,
    incomplete: bool,
    timeout: Duration,
) -> Result<(), String> {
    let mut c = connect(addr, timeout).await?;
    c.set_epoch(SetEpochRequest {
        volume: volume.to_string(),
        epoch,
        incomplete,
        owner: owner.to_string(),
    })
    .await
    .map(|_| ())
    .map_err(|s| format!("set epoch {epoch} failed: {}", s.message()))
}
