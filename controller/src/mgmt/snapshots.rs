//! The snapshot calls of the management API: thin wrappers over
//! [`Volume`]'s snapshot operations (`replicator/snapshot.rs`) that turn
//! their errors into gRPC statuses naming the volume and snapshot.

use std::sync::atomic::Ordering;

use strata_proto::controller::{
    CloneReply, CloneRequest, RevertRequest, Snapshot, SnapshotCreated, SnapshotList, SnapshotRef,
};
use tonic::Status;

use crate::replicator::Volume;

pub async fn create(volume: &Volume, req: SnapshotRef) -> Result<SnapshotCreated, Status> {
    let pause = volume
        .create_snapshot(&req.name)
        .await
        .map_err(Status::from)?;
    Ok(SnapshotCreated {
        name: req.name,
        pause_us: pause.as_micros() as u64,
    })
}

pub async fn list(volume: &Volume) -> Result<SnapshotList, Status> {
    let snapshots = volume.list_snapshots().await.map_err(Status::from)?;
    Ok(SnapshotList {
        volume: volume.name.clone(),
        snapshots: snapshots
            .into_iter()
            .map(|s| Snapshot {
                name: s.name,
                created: s.created,
                allocated: s.allocated,
                size: s.size,
            })
            .collect(),
    })
}

pub async fn delete(volume: &Volume, req: SnapshotRef) -> Result<SnapshotList, Status> {
    volume
        .delete_snapshot(&req.name)
        .await
        .map_err(Status::from)?;
    list(volume).await
}

pub async fn revert(volume: &Volume, req: RevertRequest) -> Result<SnapshotList, Status> {
    let attached = volume.attached.load(Ordering::Relaxed);
    if attached > 0 && !req.force {
        return Err(Status::failed_precondition(format!(
            "Volume {}, snapshot {:?}: {attached} client(s) attached; detach them first or pass --force (they will see their disk change under them)",
            volume.name, req.name
        )));
    }
    volume
        .revert_snapshot(&req.name, req.discard_newer)
        .await
        .map_err(Status::from)?;
    list(volume).await
}

pub async fn clone(volume: &Volume, req: CloneRequest) -> Result<CloneReply, Status> {
    let replicas = volume
        .clone_snapshot(&req.snapshot, &req.new_volume)
        .await
        .map_err(Status::from)?;
    Ok(CloneReply {
        volume: req.new_volume,
        replicas: replicas.iter().map(|a| a.to_string()).collect(),
    })
}
