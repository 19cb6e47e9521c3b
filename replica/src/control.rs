//! The replica server's gRPC control API (`strata.replica.v1`): thin
//! handlers over [`ReplicaHost`], errors mapped to `tonic::Status` in one
//! place.

use std::sync::Arc;

use strata_proto::replica::replica_control_server::ReplicaControl;
use strata_proto::replica::{
    ChangedExtentsRequest, CloneReplicaRequest, CreateReplicaRequest, Empty, ExpandReplicaRequest,
    Extent, ExtentList, RegionDigestList, RegionDigestsRequest, ReplicaList, ReplicaRef,
    ReplicaStatus, SetEpochRequest, SnapshotInfo, SnapshotList, SnapshotRequest,
};
use tonic::{Request, Response, Status};

use crate::host::{HostError, ReplicaHost};
use crate::{OpenReport, Store, StoreError};

/// The largest window one ChangedExtents call may cover: at most 262,144
/// blocks, so a reply stays a few MiB even if every other block changed.
pub const MAX_EXTENT_WINDOW: u64 = 1 << 30;

/// The open report of a store this process created or that is known clean.
const CLEAN: OpenReport = OpenReport {
    was_clean: true,
    page_cache_lost: false,
};

/// Largest window of one RegionDigests call.
pub const MAX_DIGEST_WINDOW: u64 = 256 << 20;

pub struct ReplicaControlService {
    host: Arc<ReplicaHost>,
}

impl ReplicaControlService {
    pub fn new(host: Arc<ReplicaHost>) -> Self {
        ReplicaControlService { host }
    }
}

fn status_of(name: &str, store: &Store, report: OpenReport) -> ReplicaStatus {
    let info = store.info();
    ReplicaStatus {
        volume: name.to_string(),
        lineage: info.lineage,
        size: info.size,
        epoch: info.epoch,
        was_clean: report.was_clean,
        unflushed: store.has_unflushed_writes(),
        page_cache_lost: report.page_cache_lost,
        index_bytes: store.index_heap_bytes() as u64,
        snapshots: info.chain,
        engine: info.engine.to_string(),
        open: true,
        incomplete: info.incomplete,
        epoch_owner: info.epoch_owner.clone(),
        copies_from_peers: true,
        reads_pieces: true,
    }
}

/// Opens `name` (if it is not open yet) and describes it.
fn open_status(host: &ReplicaHost, name: &str) -> Result<ReplicaStatus, HostError> {
    let (store, report) = host.open_with_report(name)?;
    Ok(status_of(name, &store, report))
}

fn to_status(e: HostError) -> Status {
    // The whole chain: "Volume \"v\": No snapshot named \"s\"".
    let mut msg = e.to_string();
    let mut cause = std::error::Error::source(&e);
    while let Some(c) = cause {
        msg = format!("{msg}: {c}");
        cause = c.source();
    }
    match &e {
        HostError::Store { source, .. } => match source {
            StoreError::NotFound(_) => Status::not_found(msg),
            StoreError::AlreadyExists(_) => Status::already_exists(msg),
            StoreError::Locked(_) => Status::unavailable(msg),
            StoreError::BadSize { .. }
            | StoreError::InvalidName(_)
            | StoreError::Unaligned { .. }
            | StoreError::OutOfRange { .. } => Status::invalid_argument(msg),
            StoreError::NoSuchSnapshot(_) => Status::not_found(msg),
            StoreError::SnapshotExists(_) => Status::already_exists(msg),
            StoreError::NewerSnapshots { .. } => Status::failed_precondition(msg),
            e if e.is_corruption() => Status::data_loss(msg),
            _ => Status::internal(msg),
        },
        HostError::InvalidName(_) => Status::invalid_argument(msg),
        HostError::NotOpen(_) => Status::failed_precondition(msg),
        // Its users are going away (a controller stopping): try again.
        HostError::Busy { .. } => Status::unavailable(msg),
        // ABORTED is gRPC's code for a failed sequencer check: the request's
        // epoch is not the replica's, another controller owns it.
        HostError::Fenced { .. } => Status::aborted(msg),
        _ => Status::internal(msg),
    }
}

/// Runs a chain change on the replica a request names, if the request's
/// epoch is the replica's (the controller that owns it now), and replies
/// with the replica's status.
async fn fenced_change(
    host: &Arc<ReplicaHost>,
    req: SnapshotRequest,
    change: impl FnOnce(&Store, &SnapshotRequest) -> crate::Result<()> + Send + 'static,
) -> Result<Response<ReplicaStatus>, Status> {
    let host = host.clone();
    let status = blocking(move || {
        let (store, report) = host.open_with_report(&req.volume)?;
        let current = store.epoch();
        if req.epoch != current {
            return Err(HostError::Fenced {
                volume: req.volume.clone(),
                current,
                requested: req.epoch,
            });
        }
        change(&store, &req).map_err(host_err(&req.volume))?;
        Ok(status_of(&req.volume, &store, report))
    })
    .await?;
    Ok(Response::new(status))
}

fn host_err(volume: &str) -> impl FnOnce(StoreError) -> HostError + '_ {
    move |source| HostError::Store {
        volume: volume.to_string(),
        source,
    }
}

/// Runs a blocking host call off the async runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, HostError> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("replica task failed: {e}")))?
        .map_err(to_status)
}

#[tonic::async_trait]
impl ReplicaControl for ReplicaControlService {
    async fn create_replica(
        &self,
        req: Request<CreateReplicaRequest>,
    ) -> Result<Response<ReplicaStatus>, Status> {
        let req = req.into_inner();
        let host = self.host.clone();
        let status = blocking(move || {
            let store = host.create(&req.volume, req.size)?;
            Ok(status_of(&req.volume, &store, CLEAN))
        })
        .await?;
        Ok(Response::new(status))
    }

    async fn open_replica(
        &self,
        req: Request<ReplicaRef>,
    ) -> Result<Response<ReplicaStatus>, Status> {
        let name = req.into_inner().volume;
        let host = self.host.clone();
        let status = blocking(move || open_status(&host, &name)).await?;
        Ok(Response::new(status))
    }

    async fn close_replica(
        &self,
        req: Request<ReplicaRef>,
    ) -> Result<Response<ReplicaStatus>, Status> {
        let name = req.into_inner().volume;
        let host = self.host.clone();
        let status = blocking(move || {
            let mut s = open_status(&host, &name)?;
            host.close(&name)?;
            s.open = false;
            Ok(s)
        })
        .await?;
        Ok(Response::new(status))
    }

    async fn delete_replica(&self, req: Request<ReplicaRef>) -> Result<Response<Empty>, Status> {
        let name = req.into_inner().volume;
        let host = self.host.clone();
        blocking(move || host.delete(&name)).await?;
        Ok(Response::new(Empty {}))
    }

    async fn status(&self, req: Request<ReplicaRef>) -> Result<Response<ReplicaStatus>, Status> {
        let name = req.into_inner().volume;
        let host = self.host.clone();
        let status = blocking(move || open_status(&host, &name)).await?;
        Ok(Response::new(status))
    }

    async fn list(&self, _req: Request<Empty>) -> Result<Response<ReplicaList>, Status> {
        let host = self.host.clone();
        let (replicas, space) = blocking(move || {
            let replicas = host
                .list()?
                .iter()
                .map(|name| open_status(&host, name))
                .collect::<Result<Vec<_>, _>>()?;
            Ok::<_, HostError>((replicas, crate::store::filesystem_space(host.dir())))
        })
        .await?;
        Ok(Response::new(ReplicaList {
            replicas,
            filesystem_bytes: space.map_or(0, |s| s.total),
            available_bytes: space.map_or(0, |s| s.available),
        }))
    }

    async fn set_epoch(
        &self,
        req: Request<SetEpochRequest>,
    ) -> Result<Response<ReplicaStatus>, Status> {
        let req = req.into_inner();
        let host = self.host.clone();
        let status = blocking(move || {
            let (store, report) = host.open_with_report(&req.volume)?;
            let info = store.info();
            let current = info.epoch;
            let same_owner = !req.owner.is_empty() && req.owner == info.epoch_owner;
            if req.epoch < current || (req.epoch == current && !same_owner && current > 0) {
                return Err(HostError::EpochBackwards {
                    volume: req.volume.clone(),
                    current,
                    requested: req.epoch,
                });
            }
            store
                .set_epoch_and_sync_state(req.epoch, req.incomplete, &req.owner)
                .map_err(|source| HostError::Store {
                    volume: req.volume.clone(),
                    source,
                })?;
            let report = if req.reconciled {
                host.mark_reconciled(&req.volume);
                CLEAN
            } else {
                report
            };
            Ok(status_of(&req.volume, &store, report))
        })
        .await?;
        Ok(Response::new(status))
    }

    async fn list_snapshots(
        &self,
        req: Request<ReplicaRef>,
    ) -> Result<Response<SnapshotList>, Status> {
        let name = req.into_inner().volume;
        let host = self.host.clone();
        let snapshots = blocking(move || {
            let store = host.open(&name)?;
            let list = store.snapshots().map_err(host_err(&name))?;
            Ok(list
                .into_iter()
                .map(|s| SnapshotInfo {
                    name: s.name,
                    created: s.created,
                    allocated: s.allocated,
                    size: s.size,
                })
                .collect())
        })
        .await?;
        Ok(Response::new(SnapshotList { snapshots }))
    }

    async fn delete_snapshot(
        &self,
        req: Request<SnapshotRequest>,
    ) -> Result<Response<ReplicaStatus>, Status> {
        fenced_change(&self.host, req.into_inner(), |store, req| {
            store.delete_snapshot(&req.name)
        })
        .await
    }

    async fn expand_replica(
        &self,
        req: Request<ExpandReplicaRequest>,
    ) -> Result<Response<ReplicaStatus>, Status> {
        let req = req.into_inner();
        let snapshot_req = SnapshotRequest {
            volume: req.volume,
            name: String::new(),
            epoch: req.epoch,
            discard_newer: false,
        };
        let size = req.size;
        fenced_change(&self.host, snapshot_req, move |store, _| store.expand(size)).await
    }

    async fn revert_snapshot(
        &self,
        req: Request<SnapshotRequest>,
    ) -> Result<Response<ReplicaStatus>, Status> {
        fenced_change(&self.host, req.into_inner(), |store, req| {
            store.revert(&req.name, req.discard_newer)
        })
        .await
    }

    async fn changed_extents(
        &self,
        req: Request<ChangedExtentsRequest>,
    ) -> Result<Response<ExtentList>, Status> {
        let req = req.into_inner();
        if req.length > MAX_EXTENT_WINDOW {
            return Err(Status::invalid_argument(format!(
                "window of {} bytes is above the limit of {MAX_EXTENT_WINDOW}",
                req.length
            )));
        }
        let host = self.host.clone();
        let extents = blocking(move || {
            let store = host.open(&req.volume)?;
            let from = (!req.from_snapshot.is_empty()).then_some(req.from_snapshot.as_str());
            let to = if req.to_snapshot.is_empty() {
                crate::View::Head
            } else {
                crate::View::Snapshot(&req.to_snapshot)
            };
            let list = store
                .changed_extents(from, to, req.offset, req.length)
                .map_err(host_err(&req.volume))?;
            Ok(list
                .into_iter()
                .map(|e| Extent {
                    offset: e.offset,
                    length: e.len,
                    data: e.kind == crate::Allocation::Data,
                })
                .collect())
        })
        .await?;
        Ok(Response::new(ExtentList { extents }))
    }

    async fn region_digests(
        &self,
        req: Request<RegionDigestsRequest>,
    ) -> Result<Response<RegionDigestList>, Status> {
        let req = req.into_inner();
        if req.length > MAX_DIGEST_WINDOW
            || req.region == 0
            || !req.region.is_multiple_of(crate::BLOCK_SIZE)
        {
            return Err(Status::invalid_argument(format!(
                "window {} (at most {MAX_DIGEST_WINDOW}) or region {} (a multiple of 4096) out of bounds",
                req.length, req.region
            )));
        }
        let host = self.host.clone();
        let digests = blocking(move || {
            let store = host.open(&req.volume)?;
            store
                .region_digests(req.offset, req.length, req.region)
                .map_err(host_err(&req.volume))
        })
        .await?;
        Ok(Response::new(RegionDigestList {
            digests: digests.into_iter().map(|d| d.to_vec()).collect(),
        }))
    }

    async fn clone_replica(
        &self,
        req: Request<CloneReplicaRequest>,
    ) -> Result<Response<ReplicaStatus>, Status> {
        let req = req.into_inner();
        let host = self.host.clone();
        let status = blocking(move || {
            let store = host.clone_snapshot(&req.volume, &req.snapshot, &req.new_volume)?;
            Ok(status_of(&req.new_volume, &store, CLEAN))
        })
        .await?;
        Ok(Response::new(status))
    }
}
