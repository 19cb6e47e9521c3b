//! CreateVolume, DeleteVolume and the calls that read volumes.
//!
//! CreateVolume's order makes every step safe to retry and leaves nothing
//! behind that DeleteVolume cannot find: the StrataVolume first (phase
//! Creating, with its replica nodes), then the replicas, then the Service
//! and the Deployment. A retry with the same name finds the resource and
//! finishes the remaining steps; a failure before the resource exists
//! leaves nothing.
//!
//! From a backup handle (`restore.rs`), the replicas are made empty, and
//! the backup is restored through the new volume's controller once it
//! runs; the phase stays Creating, and CreateVolume does not succeed,
//! until the restore is done.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use strata_proto::controller::{CloneRequest, ExpandRequest, SnapshotRef};
use strata_proto::csi::volume_content_source::{
    SnapshotSource, Type as SourceType, VolumeSource as CsiVolumeSource,
};
use strata_proto::csi::*;
use strata_proto::replica::{CreateReplicaRequest, ExpandReplicaRequest, ReplicaRef};
use tonic::Code;

use crate::cluster::{replica_client, Cluster};
use crate::crd::{phase, StrataVolume, StrataVolumeSpec, StrataVolumeStatus, VolumeSource};
use crate::error::{CsiError, CsiResult};
use crate::names;
use crate::objects;
use crate::params::VolumeParams;
use crate::placement;
use crate::request::{check_capabilities, size_for};

/// Volume context key: where the node plugin attaches (`nbd://IP:PORT/ID`).
pub const CONTEXT_NBD_URI: &str = "strata.io/nbd-uri";
/// How long DeleteVolume waits for the controller pod to go before it
/// answers UNAVAILABLE (the sidecar retries).
const POD_GONE_WAIT: Duration = Duration::from_secs(30);

pub async fn create(cluster: &Cluster, req: CreateVolumeRequest) -> CsiResult<Volume> {
    if req.name.is_empty() {
        return Err(CsiError::Invalid("CreateVolume needs a name".into()));
    }
    check_capabilities(&req.volume_capabilities)?;
    let size = size_for(req.capacity_range.as_ref())?;
    let params = VolumeParams::parse(&req.parameters)?;
    if params.wire_encryption && cluster.pod.cluster_key_secret.is_none() {
        return Err(CsiError::Invalid(format!(
            "parameter {}=\"true\" needs the cluster key: install the driver with a \
             cluster key Secret (csi serve --cluster-key-secret), the records are \
             encrypted with keys derived from it",
            crate::params::WIRE_ENCRYPTION
        )));
    }
    let id = names::volume_id(&req.name);
    let source = content_source(req.volume_content_source.as_ref())?;
    let preferred = preferred_nodes(req.accessibility_requirements.as_ref());

    let sv = match cluster.get_volume(&id).await? {
        Some(existing) => {
            check_same(&existing, &req, size, &params, &source)?;
            existing
        }
        None => {
            let restore = match &source {
                Some(s) => super::restore::restore_source(s)?,
                None => None,
            };
            let source_volume = match (&source, &restore) {
                (Some(_), Some(h)) => {
                    super::restore::check_restore(h, size, &params)?;
                    None
                }
                (Some(s), None) => Some(check_source(cluster, s, size).await?),
                (None, _) => None,
            };
            let replica_nodes = match &source_volume {
                // A clone's replicas are made by the source's replica
                // servers, next to the source's own.
                Some(src) => src.spec.replica_nodes.clone(),
                None => {
                    let volumes = cluster.list_volumes().await?;
                    let nodes = cluster.storage_nodes(&volumes).await?;
                    placement::choose(&nodes, params.replicas as usize, size, &preferred)?
                        .into_iter()
                        .map(|n| n.name.clone())
                        .collect()
                }
            };
            let spec = StrataVolumeSpec {
                csi_name: req.name.clone(),
                size_bytes: size,
                replicas: replica_nodes.len() as u32,
                replica_nodes,
                schedules: params.schedule_args(),
                backup_secret: params.backup_secret.clone(),
                sync_rate_mib: params.sync_rate_mib,
                wire_encryption: params.wire_encryption,
                source: source.clone(),
                preferred_nodes: preferred.clone(),
                snapshots: Vec::new(),
                backups: Vec::new(),
            };
            let mut sv = StrataVolume::new(&id, spec);
            sv.status = Some(StrataVolumeStatus {
                phase: phase::CREATING.into(),
                total_replicas: sv.spec.replicas,
                ..Default::default()
            });
            match cluster.volumes().create(&PostParams::default(), &sv).await {
                Ok(created) => created,
                // Another call with this name won the race: use its work.
                Err(kube::Error::Api(s)) if s.code == 409 => {
                    let existing = cluster.get_volume(&id).await?.ok_or_else(|| {
                        CsiError::Aborted(format!("volume {id} appeared and vanished"))
                    })?;
                    check_same(&existing, &req, size, &params, &source)?;
                    existing
                }
                Err(e) => return Err(CsiError::kube(&format!("creating StrataVolume {id}"), e)),
            }
        }
    };
    finish(cluster, &sv, &id).await?;
    volume_of(cluster, &sv, &id).await
}

/// The steps after the resource exists: replicas, Service, Deployment.
async fn finish(cluster: &Cluster, sv: &StrataVolume, id: &str) -> CsiResult<()> {
    let creating = sv
        .status
        .as_ref()
        .is_none_or(|s| s.phase == phase::CREATING);
    let addrs = replica_addrs(cluster, sv).await?;
    // A backup is restored into an empty volume once its controller runs.
    let restore = match &sv.spec.source {
        Some(s) => super::restore::restore_source(s)?,
        None => None,
    };
    if creating {
        match &sv.spec.source {
            _ if restore.is_some() => {
                for addr in &addrs {
                    create_replica(*addr, id, sv.spec.size_bytes).await?;
                }
            }
            None => {
                for addr in &addrs {
                    create_replica(*addr, id, sv.spec.size_bytes).await?;
                }
            }
            Some(source) => clone_into(cluster, sv, source, id, &addrs).await?,
        }
    }
    cluster.ensure_service(sv, id).await?;
    if creating || cluster.replica_list(id).await?.is_none() {
        cluster.set_replica_list(sv, id, &addrs).await?;
    }
    cluster.ensure_deployment(sv, id).await?;
    if creating {
        if let Some(h) = &restore {
            // Phase Creating until it is done: a retry comes back here.
            super::restore::restore_into(cluster, id, h).await?;
        }
        set_phase(
            cluster,
            id,
            phase::UNAVAILABLE,
            "the controller pod is starting",
        )
        .await?;
    }
    Ok(())
}

async fn replica_addrs(cluster: &Cluster, sv: &StrataVolume) -> CsiResult<Vec<SocketAddr>> {
    let mut v = Vec::new();
    for node in &sv.spec.replica_nodes {
        let addr = cluster.replica_addr_of(node).await?.ok_or_else(|| {
            CsiError::Unavailable(format!(
                "node {node}, which holds a replica of the volume, is gone"
            ))
        })?;
        v.push(addr);
    }
    Ok(v)
}

pub(crate) async fn create_replica(addr: SocketAddr, id: &str, size: u64) -> CsiResult<()> {
    let mut c = replica_client(addr).await?;
    match c
        .create_replica(CreateReplicaRequest {
            volume: id.to_string(),
            size,
        })
        .await
    {
        Ok(_) => Ok(()),
        Err(s) if s.code() == Code::AlreadyExists => {
            // A retry: the replica from the first try must be this size.
            let st = c
                .status(ReplicaRef {
                    volume: id.to_string(),
                })
                .await
                .map_err(|s| CsiError::downstream(&format!("replica server {addr}"), s))?
                .into_inner();
            if st.size == size {
                Ok(())
            } else {
                Err(CsiError::AlreadyExists(format!(
                    "replica server {addr} already holds a volume {id} of {} bytes",
                    st.size
                )))
            }
        }
        Err(s) => Err(CsiError::downstream(
            &format!("creating the replica of {id} on {addr}"),
            s,
        )),
    }
}

/// Makes the new volume's replicas from a snapshot (or a temporary
/// snapshot of a volume) through the source's controller, then grows them
/// to the volume's size.
async fn clone_into(
    cluster: &Cluster,
    sv: &StrataVolume,
    source: &VolumeSource,
    id: &str,
    addrs: &[SocketAddr],
) -> CsiResult<()> {
    let (source_volume, snapshot, temporary) = match (&source.snapshot, &source.volume) {
        (Some(snap), _) => {
            let (v, s) = names::parse_snapshot_id(snap)
                .ok_or_else(|| CsiError::NotFound(format!("no snapshot {snap:?}")))?;
            (v.to_string(), s.to_string(), false)
        }
        (None, Some(v)) => (v.clone(), format!("clone-for-{id}"), true),
        (None, None) => return Err(CsiError::Invalid("an empty content source".into())),
    };
    let mut ctl = cluster.volume_controller(&source_volume).await?;
    if temporary {
        match ctl
            .create_snapshot(SnapshotRef {
                name: snapshot.clone(),
            })
            .await
        {
            Ok(_) => {}
            Err(s) if s.code() == Code::AlreadyExists => {}
            Err(s) => {
                return Err(CsiError::downstream(
                    &format!("snapshot of {source_volume} for the clone"),
                    s,
                ))
            }
        }
    }
    let cloned = ctl
        .clone_volume(CloneRequest {
            snapshot: snapshot.clone(),
            new_volume: id.to_string(),
        })
        .await;
    if temporary {
        // The clone no longer needs the snapshot; a failure to delete it
        // leaves a snapshot the next clone attempt reuses.
        if let Err(s) = ctl
            .delete_snapshot(SnapshotRef {
                name: snapshot.clone(),
            })
            .await
        {
            tracing::warn!(volume = %source_volume, snapshot, error = %s.message(), "temporary snapshot left");
        }
    }
    match cloned {
        Ok(_) => {}
        // A retry after the clone was made.
        Err(s) if s.code() == Code::AlreadyExists => {}
        Err(s) => {
            return Err(CsiError::downstream(
                &format!("cloning {source_volume}/{snapshot} into {id}"),
                s,
            ))
        }
    }
    for addr in addrs {
        let mut c = replica_client(*addr).await?;
        let st = c
            .status(ReplicaRef {
                volume: id.to_string(),
            })
            .await
            .map_err(|s| CsiError::downstream(&format!("replica {id} on {addr}"), s))?
            .into_inner();
        if st.size < sv.spec.size_bytes {
            c.expand_replica(ExpandReplicaRequest {
                volume: id.to_string(),
                size: sv.spec.size_bytes,
                epoch: st.epoch,
            })
            .await
            .map_err(|s| CsiError::downstream(&format!("growing the clone {id} on {addr}"), s))?;
        }
    }
    Ok(())
}

async fn set_phase(cluster: &Cluster, id: &str, phase: &str, message: &str) -> CsiResult<()> {
    let patch = serde_json::json!({"status": {"phase": phase, "message": message}});
    cluster
        .volumes()
        .patch_status(id, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(|e| CsiError::kube(&format!("updating StrataVolume {id}"), e))?;
    Ok(())
}

/// The CSI Volume for a resource.
async fn volume_of(cluster: &Cluster, sv: &StrataVolume, id: &str) -> CsiResult<Volume> {
    let nbd = cluster.service_addr(id, objects::NBD_PORT).await?;
    Ok(Volume {
        capacity_bytes: sv.spec.size_bytes as i64,
        volume_id: id.to_string(),
        volume_context: HashMap::from([(CONTEXT_NBD_URI.to_string(), format!("nbd://{nbd}/{id}"))]),
        content_source: sv.spec.source.as_ref().map(|s| VolumeContentSource {
            r#type: Some(match (&s.snapshot, &s.volume) {
                (Some(snapshot_id), _) => SourceType::Snapshot(SnapshotSource {
                    snapshot_id: snapshot_id.clone(),
                }),
                (None, v) => SourceType::Volume(CsiVolumeSource {
                    volume_id: v.clone().unwrap_or_default(),
                }),
            }),
        }),
        // Reachable from every node: the data goes over the network.
        accessible_topology: Vec::new(),
    })
}

fn content_source(s: Option<&VolumeContentSource>) -> CsiResult<Option<VolumeSource>> {
    Ok(match s.and_then(|s| s.r#type.as_ref()) {
        None => None,
        Some(SourceType::Snapshot(s)) => Some(VolumeSource {
            snapshot: Some(s.snapshot_id.clone()),
            volume: None,
        }),
        Some(SourceType::Volume(v)) => Some(VolumeSource {
            snapshot: None,
            volume: Some(v.volume_id.clone()),
        }),
    })
}

/// The source exists and fits in `size`; returns the source volume.
async fn check_source(cluster: &Cluster, s: &VolumeSource, size: u64) -> CsiResult<StrataVolume> {
    let (volume, needed) = match (&s.snapshot, &s.volume) {
        (Some(snap), _) => {
            let missing = || CsiError::NotFound(format!("no snapshot {snap:?}"));
            let (v, name) = names::parse_snapshot_id(snap).ok_or_else(missing)?;
            let sv = cluster.get_volume(v).await?.ok_or_else(missing)?;
            let rec = sv
                .spec
                .snapshots
                .iter()
                .find(|r| r.name == name)
                .ok_or_else(missing)?;
            let needed = rec.size_bytes;
            (sv, needed)
        }
        (None, Some(v)) => {
            let sv = cluster
                .get_volume(v)
                .await?
                .ok_or_else(|| CsiError::NotFound(format!("no volume {v:?} to clone")))?;
            let needed = sv.spec.size_bytes;
            (sv, needed)
        }
        (None, None) => return Err(CsiError::Invalid("an empty content source".into())),
    };
    if size < needed {
        return Err(CsiError::OutOfRange(format!(
            "the source holds {needed} bytes; the new volume asks for {size}"
        )));
    }
    Ok(volume)
}

/// A second CreateVolume with a name must ask for the same volume.
fn check_same(
    sv: &StrataVolume,
    req: &CreateVolumeRequest,
    size: u64,
    params: &VolumeParams,
    source: &Option<VolumeSource>,
) -> CsiResult<()> {
    let s = &sv.spec;
    let taken =
        |what: String| CsiError::AlreadyExists(format!("volume {:?} exists with {what}", req.name));
    if s.csi_name != req.name {
        return Err(taken(format!("another name ({:?}) for its ID", s.csi_name)));
    }
    let (required, limit) = req.capacity_range.as_ref().map_or((0, 0), |r| {
        (r.required_bytes.max(0) as u64, r.limit_bytes.max(0) as u64)
    });
    let fits = s.size_bytes >= required && (limit == 0 || s.size_bytes <= limit);
    if !fits || (required == 0 && limit == 0 && s.size_bytes != size) {
        return Err(taken(format!("a size of {} bytes", s.size_bytes)));
    }
    if s.replicas != params.replicas && s.source.is_none()
        || s.schedules != params.schedule_args()
        || s.sync_rate_mib != params.sync_rate_mib
        || s.backup_secret != params.backup_secret
        || s.wire_encryption != params.wire_encryption
    {
        return Err(taken("other parameters".into()));
    }
    if &s.source != source {
        return Err(taken("another content source".into()));
    }
    Ok(())
}

/// Consumer nodes, from the accessibility requirements (preferred first).
fn preferred_nodes(req: Option<&TopologyRequirement>) -> Vec<String> {
    let Some(req) = req else { return Vec::new() };
    req.preferred
        .iter()
        .chain(req.requisite.iter())
        .filter_map(|t| t.segments.get(crate::TOPOLOGY_HOSTNAME).cloned())
        .fold(Vec::new(), |mut v, n| {
            if !v.contains(&n) {
                v.push(n);
            }
            v
        })
}

pub async fn delete(cluster: &Cluster, id: &str) -> CsiResult<()> {
    if id.is_empty() {
        return Err(CsiError::Invalid("DeleteVolume needs a volume ID".into()));
    }
    let Some(sv) = cluster.get_volume(id).await? else {
        return Ok(());
    };
    if !sv.spec.snapshots.is_empty() {
        return Err(CsiError::Precondition(format!(
            "volume {id} still has {} snapshot(s) ({}): they live in its replicas, delete them first",
            sv.spec.snapshots.len(),
            sv.spec
                .snapshots
                .iter()
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    set_phase(cluster, id, phase::DELETING, "").await.ok();
    cluster.remove_controller(id).await?;
    let deadline = tokio::time::Instant::now() + POD_GONE_WAIT;
    while cluster.deployment_exists(id).await? {
        if tokio::time::Instant::now() >= deadline {
            return Err(CsiError::Unavailable(format!(
                "volume {id}: its controller pod is still stopping"
            )));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for node in &sv.spec.replica_nodes {
        // A node that is gone took its data with it.
        let Some(addr) = cluster.replica_addr_of(node).await? else {
            continue;
        };
        delete_replica(addr, id).await?;
    }
    // A controller that was still starting may have rebuilt a replica
    // just deleted (it replaces lost replicas): look again, and let the
    // sidecar retry the whole delete if one is back.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for node in &sv.spec.replica_nodes {
        let Some(addr) = cluster.replica_addr_of(node).await? else {
            continue;
        };
        let mut c = replica_client(addr).await?;
        let present = c
            .list(strata_proto::replica::Empty {})
            .await
            .map_err(|s| CsiError::downstream(&format!("listing replicas on {addr}"), s))?
            .into_inner()
            .replicas
            .iter()
            .any(|r| r.volume == id);
        if present {
            delete_replica(addr, id).await?;
            return Err(CsiError::Unavailable(format!(
                "volume {id}: a replica on {addr} came back while deleting (a controller was still running); deleting again"
            )));
        }
    }
    match cluster.volumes().delete(id, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(CsiError::kube(&format!("deleting StrataVolume {id}"), e)),
    }
}

pub(crate) async fn delete_replica(addr: SocketAddr, id: &str) -> CsiResult<()> {
    let deadline = tokio::time::Instant::now() + POD_GONE_WAIT;
    loop {
        let mut c = replica_client(addr).await?;
        match c
            .delete_replica(ReplicaRef {
                volume: id.to_string(),
            })
            .await
        {
            Ok(_) => return Ok(()),
            Err(s) if s.code() == Code::NotFound => return Ok(()),
            // Still open by a controller that is going away.
            Err(s)
                if matches!(s.code(), Code::Unavailable | Code::FailedPrecondition)
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(s) => {
                return Err(CsiError::downstream(
                    &format!("deleting the replica of {id} on {addr}"),
                    s,
                ))
            }
        }
    }
}

/// The volume `id`, or NOT_FOUND.
async fn existing(cluster: &Cluster, id: &str) -> CsiResult<StrataVolume> {
    cluster
        .get_volume(id)
        .await?
        .ok_or_else(|| CsiError::NotFound(format!("no volume {id:?}")))
}

pub async fn validate(
    cluster: &Cluster,
    req: ValidateVolumeCapabilitiesRequest,
) -> CsiResult<ValidateVolumeCapabilitiesResponse> {
    if req.volume_id.is_empty() {
        return Err(CsiError::Invalid("a volume ID is needed".into()));
    }
    if req.volume_capabilities.is_empty() {
        return Err(CsiError::Invalid("volume capabilities are missing".into()));
    }
    existing(cluster, &req.volume_id).await?;
    Ok(match check_capabilities(&req.volume_capabilities) {
        Ok(_) => ValidateVolumeCapabilitiesResponse {
            confirmed: Some(validate_volume_capabilities_response::Confirmed {
                volume_context: req.volume_context,
                volume_capabilities: req.volume_capabilities,
                parameters: req.parameters,
                mutable_parameters: req.mutable_parameters,
            }),
            message: String::new(),
        },
        Err(e) => ValidateVolumeCapabilitiesResponse {
            confirmed: None,
            message: e.to_string(),
        },
    })
}

fn resource_condition(sv: &StrataVolume) -> VolumeCondition {
    let st = sv.status.clone().unwrap_or_default();
    VolumeCondition {
        abnormal: st.phase != phase::READY,
        message: if st.message.is_empty() {
            format!("phase {}", st.phase)
        } else {
            st.message
        },
    }
}

pub async fn list(cluster: &Cluster, req: ListVolumesRequest) -> CsiResult<ListVolumesResponse> {
    let volumes = cluster.list_volumes().await?;
    let (page, next_token) = super::page(&volumes, &req.starting_token, req.max_entries)?;
    let mut entries = Vec::new();
    for sv in page {
        let id = sv.metadata.name.clone().unwrap_or_default();
        entries.push(list_volumes_response::Entry {
            volume: Some(Volume {
                capacity_bytes: sv.spec.size_bytes as i64,
                volume_id: id,
                ..Default::default()
            }),
            status: Some(list_volumes_response::VolumeStatus {
                published_node_ids: Vec::new(),
                volume_condition: Some(resource_condition(&sv)),
            }),
        });
    }
    Ok(ListVolumesResponse {
        entries,
        next_token,
    })
}

pub async fn get(cluster: &Cluster, id: &str) -> CsiResult<ControllerGetVolumeResponse> {
    if id.is_empty() {
        return Err(CsiError::Invalid("a volume ID is needed".into()));
    }
    let sv = existing(cluster, id).await?;
    // The controller's own report when it answers quickly, else the last
    // one recorded.
    let condition = match cluster.quick_status(id).await {
        Some(s) => super::condition::from_status(&s),
        None => resource_condition(&sv),
    };
    Ok(ControllerGetVolumeResponse {
        volume: Some(Volume {
            capacity_bytes: sv.spec.size_bytes as i64,
            volume_id: id.to_string(),
            ..Default::default()
        }),
        status: Some(controller_get_volume_response::VolumeStatus {
            published_node_ids: Vec::new(),
            volume_condition: Some(condition),
        }),
    })
}

pub async fn capacity(
    cluster: &Cluster,
    req: GetCapacityRequest,
) -> CsiResult<GetCapacityResponse> {
    if !req.volume_capabilities.is_empty() {
        check_capabilities(&req.volume_capabilities)?;
    }
    let params = VolumeParams::parse(&req.parameters)?;
    let volumes = cluster.list_volumes().await?;
    let nodes = cluster.storage_nodes(&volumes).await?;
    let mut usable: Vec<_> = nodes.iter().filter(|n| n.unusable.is_none()).collect();
    let n = params.replicas as usize;
    if usable.len() < n {
        return Ok(GetCapacityResponse::default());
    }
    // A volume needs `n` nodes: the n-th largest free space bounds it.
    usable.sort_by_key(|x| std::cmp::Reverse(x.available_bytes));
    let available = usable[n - 1].available_bytes;
    usable.sort_by_key(|x| std::cmp::Reverse(x.filesystem_bytes));
    let largest = usable[n - 1].filesystem_bytes;
    Ok(GetCapacityResponse {
        available_capacity: available as i64,
        maximum_volume_size: Some(largest as i64),
        minimum_volume_size: Some(crate::request::BLOCK as i64),
    })
}

pub async fn expand(
    cluster: &Cluster,
    req: ControllerExpandVolumeRequest,
) -> CsiResult<ControllerExpandVolumeResponse> {
    if req.volume_id.is_empty() {
        return Err(CsiError::Invalid("a volume ID is needed".into()));
    }
    if req.capacity_range.is_none() {
        return Err(CsiError::Invalid("a capacity range is needed".into()));
    }
    let size = size_for(req.capacity_range.as_ref())?;
    let id = req.volume_id;
    let sv = existing(cluster, &id).await?;
    let node_expansion_required = match &req.volume_capability {
        Some(c) => matches!(
            crate::request::check_capability(c)?,
            crate::request::Access::Mount { .. }
        ),
        None => true,
    };
    if size <= sv.spec.size_bytes {
        return Ok(ControllerExpandVolumeResponse {
            capacity_bytes: sv.spec.size_bytes as i64,
            node_expansion_required,
        });
    }
    let mut ctl = cluster.volume_controller(&id).await?;
    let reply = ctl
        .expand_volume(ExpandRequest { size })
        .await
        .map_err(|s| CsiError::downstream(&format!("expanding {id}"), s))?
        .into_inner();
    let patch = serde_json::json!({"spec": {"sizeBytes": reply.new_size}});
    cluster
        .volumes()
        .patch(&id, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(|e| CsiError::kube(&format!("recording the size of {id}"), e))?;
    Ok(ControllerExpandVolumeResponse {
        capacity_bytes: reply.new_size as i64,
        node_expansion_required,
    })
}
