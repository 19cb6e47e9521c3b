//! The CSI Controller service: volumes, snapshots, clones, expansion.
//!
//! - [`volumes`]: CreateVolume (empty, from a snapshot, from a volume),
//!   DeleteVolume, ListVolumes, ControllerGetVolume, GetCapacity.
//! - [`snapshots`]: CreateSnapshot, DeleteSnapshot, ListSnapshots.
//! - [`backups`]: the same for `type: backup` classes (S3); [`restore`]:
//!   CreateVolume from a backup handle; [`jobs`]: the backups and
//!   restores running in the background.
//! - [`condition`]: a volume's health as VOLUME_CONDITION reports it.
//! - [`status`]: the StrataVolume statuses, kept current.
//! - [`repair`]: lost replicas replaced, left-over ones removed.
//! - [`resizer`] and [`snapshotter`]: the work of the kubernetes-csi
//!   resizer and snapshotter sidecars, done here over the Kubernetes API
//!   ([`watch`] is the loop under both), so the controller pod needs only
//!   the provisioner beside strata.
//!
//! No ControllerPublish: the node plugin attaches at NodeStage, and two
//! controllers or two writers are kept apart by epochs in the replicas,
//! not by a VolumeAttachment (ARCHITECTURE.md says why).

pub mod backups;
pub mod condition;
pub mod jobs;
pub mod repair;
pub mod resizer;
pub mod restore;
pub mod snapshots;
pub mod snapshotter;
pub mod status;
pub mod volumes;
pub mod watch;

use strata_proto::csi::controller_server::Controller;
use strata_proto::csi::controller_service_capability::{rpc, Rpc, Type};
use strata_proto::csi::*;
use tonic::{Request, Response, Status};

use crate::cluster::Cluster;

/// The Controller service over a [`Cluster`].
pub struct ControllerService {
    pub cluster: Cluster,
}

/// Paging: a token is the index of the next entry, as decimal text.
pub(crate) fn page<T: Clone>(
    entries: &[T],
    starting_token: &str,
    max_entries: i32,
) -> Result<(Vec<T>, String), crate::CsiError> {
    if max_entries < 0 {
        return Err(crate::CsiError::Invalid(format!(
            "max_entries {max_entries} is negative"
        )));
    }
    let start = if starting_token.is_empty() {
        0
    } else {
        starting_token
            .parse::<usize>()
            .ok()
            .filter(|s| *s <= entries.len())
            .ok_or_else(|| {
                crate::CsiError::Aborted(format!(
                    "starting_token {starting_token:?} is not one this driver gave"
                ))
            })?
    };
    let end = if max_entries == 0 {
        entries.len()
    } else {
        (start + max_entries as usize).min(entries.len())
    };
    let next = if end < entries.len() {
        end.to_string()
    } else {
        String::new()
    };
    Ok((entries[start..end].to_vec(), next))
}

#[tonic::async_trait]
impl Controller for ControllerService {
    async fn create_volume(
        &self,
        req: Request<CreateVolumeRequest>,
    ) -> Result<Response<CreateVolumeResponse>, Status> {
        let volume = volumes::create(&self.cluster, req.into_inner()).await?;
        Ok(Response::new(CreateVolumeResponse {
            volume: Some(volume),
        }))
    }

    async fn delete_volume(
        &self,
        req: Request<DeleteVolumeRequest>,
    ) -> Result<Response<DeleteVolumeResponse>, Status> {
        volumes::delete(&self.cluster, &req.into_inner().volume_id).await?;
        Ok(Response::new(DeleteVolumeResponse {}))
    }

    async fn controller_publish_volume(
        &self,
        _req: Request<ControllerPublishVolumeRequest>,
    ) -> Result<Response<ControllerPublishVolumeResponse>, Status> {
        Err(Status::unimplemented(
            "strata attaches at NodeStage; it has no ControllerPublish",
        ))
    }

    async fn controller_unpublish_volume(
        &self,
        _req: Request<ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<ControllerUnpublishVolumeResponse>, Status> {
        Err(Status::unimplemented(
            "strata attaches at NodeStage; it has no ControllerUnpublish",
        ))
    }

    async fn validate_volume_capabilities(
        &self,
        req: Request<ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<ValidateVolumeCapabilitiesResponse>, Status> {
        Ok(Response::new(
            volumes::validate(&self.cluster, req.into_inner()).await?,
        ))
    }

    async fn list_volumes(
        &self,
        req: Request<ListVolumesRequest>,
    ) -> Result<Response<ListVolumesResponse>, Status> {
        Ok(Response::new(
            volumes::list(&self.cluster, req.into_inner()).await?,
        ))
    }

    async fn get_capacity(
        &self,
        req: Request<GetCapacityRequest>,
    ) -> Result<Response<GetCapacityResponse>, Status> {
        Ok(Response::new(
            volumes::capacity(&self.cluster, req.into_inner()).await?,
        ))
    }

    async fn controller_get_capabilities(
        &self,
        _req: Request<ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<ControllerGetCapabilitiesResponse>, Status> {
        let capabilities = [
            rpc::Type::CreateDeleteVolume,
            rpc::Type::CreateDeleteSnapshot,
            rpc::Type::ListSnapshots,
            rpc::Type::CloneVolume,
            rpc::Type::ExpandVolume,
            rpc::Type::ListVolumes,
            rpc::Type::GetCapacity,
            rpc::Type::GetVolume,
            rpc::Type::VolumeCondition,
            rpc::Type::SingleNodeMultiWriter,
            rpc::Type::GetSnapshot,
        ]
        .into_iter()
        .map(|t| ControllerServiceCapability {
            r#type: Some(Type::Rpc(Rpc { r#type: t as i32 })),
        })
        .collect();
        Ok(Response::new(ControllerGetCapabilitiesResponse {
            capabilities,
        }))
    }

    async fn create_snapshot(
        &self,
        req: Request<CreateSnapshotRequest>,
    ) -> Result<Response<CreateSnapshotResponse>, Status> {
        let snapshot = snapshots::create(&self.cluster, req.into_inner()).await?;
        Ok(Response::new(CreateSnapshotResponse {
            snapshot: Some(snapshot),
        }))
    }

    async fn delete_snapshot(
        &self,
        req: Request<DeleteSnapshotRequest>,
    ) -> Result<Response<DeleteSnapshotResponse>, Status> {
        let req = req.into_inner();
        snapshots::delete(&self.cluster, &req.snapshot_id, &req.secrets).await?;
        Ok(Response::new(DeleteSnapshotResponse {}))
    }

    async fn list_snapshots(
        &self,
        req: Request<ListSnapshotsRequest>,
    ) -> Result<Response<ListSnapshotsResponse>, Status> {
        Ok(Response::new(
            snapshots::list(&self.cluster, req.into_inner()).await?,
        ))
    }

    async fn get_snapshot(
        &self,
        req: Request<GetSnapshotRequest>,
    ) -> Result<Response<GetSnapshotResponse>, Status> {
        let snapshot = snapshots::get(&self.cluster, &req.into_inner().snapshot_id).await?;
        Ok(Response::new(GetSnapshotResponse {
            snapshot: Some(snapshot),
        }))
    }

    async fn controller_expand_volume(
        &self,
        req: Request<ControllerExpandVolumeRequest>,
    ) -> Result<Response<ControllerExpandVolumeResponse>, Status> {
        Ok(Response::new(
            volumes::expand(&self.cluster, req.into_inner()).await?,
        ))
    }

    async fn controller_get_volume(
        &self,
        req: Request<ControllerGetVolumeRequest>,
    ) -> Result<Response<ControllerGetVolumeResponse>, Status> {
        Ok(Response::new(
            volumes::get(&self.cluster, &req.into_inner().volume_id).await?,
        ))
    }

    async fn controller_modify_volume(
        &self,
        _req: Request<ControllerModifyVolumeRequest>,
    ) -> Result<Response<ControllerModifyVolumeResponse>, Status> {
        Err(Status::unimplemented(
            "ControllerModifyVolume is not offered",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_and_tokens() {
        let v: Vec<u32> = (0..5).collect();
        assert_eq!(page(&v, "", 0).unwrap(), (v.clone(), String::new()));
        assert_eq!(page(&v, "", 2).unwrap(), (vec![0, 1], "2".into()));
        assert_eq!(page(&v, "4", 2).unwrap(), (vec![4], String::new()));
        assert_eq!(page(&v, "5", 2).unwrap(), (vec![], String::new()));
        assert!(matches!(page(&v, "6", 2), Err(crate::CsiError::Aborted(_))));
        assert!(matches!(page(&v, "x", 2), Err(crate::CsiError::Aborted(_))));
        assert!(matches!(page(&v, "", -1), Err(crate::CsiError::Invalid(_))));
    }
}
