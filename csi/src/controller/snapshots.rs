//! CreateSnapshot, DeleteSnapshot, ListSnapshots.
//!
//! A snapshot is a strata snapshot in its volume's replicas, taken by the
//! volume's controller (crash-consistent across replicas), and a record in
//! the volume's StrataVolume spec (its CSI name, for idempotency and
//! listing without waking every controller).
//!
//! A VolumeSnapshotClass with `type: backup` makes a backup to S3 instead:
//! those calls go to [`super::backups`], told apart by the class's
//! parameters and by the snapshot ID's form (`names.rs`).

use kube::api::PostParams;
use strata_proto::controller::{SnapshotRef, StatusRequest};
use strata_proto::csi::*;
use tonic::Code;

use crate::cluster::Cluster;
use crate::crd::{SnapshotRecord, StrataVolume};
use crate::error::{CsiError, CsiResult};
use crate::names::{self, BackupHandle};
use crate::params::SnapshotKind;

fn to_csi(volume_id: &str, r: &SnapshotRecord) -> Snapshot {
    Snapshot {
        size_bytes: r.size_bytes as i64,
        snapshot_id: names::snapshot_id(volume_id, &r.name),
        source_volume_id: volume_id.to_string(),
        creation_time: Some(prost_types::Timestamp {
            seconds: r.created,
            nanos: 0,
        }),
        ready_to_use: true,
        group_snapshot_id: String::new(),
    }
}

pub async fn create(cluster: &Cluster, req: CreateSnapshotRequest) -> CsiResult<Snapshot> {
    if req.name.is_empty() {
        return Err(CsiError::Invalid("CreateSnapshot needs a name".into()));
    }
    if req.source_volume_id.is_empty() {
        return Err(CsiError::Invalid(
            "CreateSnapshot needs a source volume ID".into(),
        ));
    }
    if let SnapshotKind::Backup { target } = SnapshotKind::parse(&req.parameters)? {
        return super::backups::create(cluster, &req, &target).await;
    }
    let volume_id = req.source_volume_id.clone();
    for sv in cluster.list_volumes().await? {
        if sv.spec.backups.iter().any(|r| r.csi_name == req.name) {
            return Err(CsiError::AlreadyExists(format!(
                "snapshot {:?} exists as a backup of volume {}",
                req.name,
                sv.metadata.name.as_deref().unwrap_or_default()
            )));
        }
        if let Some(r) = sv.spec.snapshots.iter().find(|r| r.csi_name == req.name) {
            let id = sv.metadata.name.clone().unwrap_or_default();
            if id == volume_id {
                return Ok(to_csi(&id, r));
            }
            return Err(CsiError::AlreadyExists(format!(
                "snapshot {:?} exists, of volume {id}",
                req.name
            )));
        }
    }
    let sv = cluster
        .get_volume(&volume_id)
        .await?
        .ok_or_else(|| CsiError::NotFound(format!("no volume {volume_id:?} to snapshot")))?;
    let name = names::snapshot_name(&req.name);
    let mut ctl = cluster.volume_controller(&volume_id).await?;
    match ctl
        .create_snapshot(SnapshotRef { name: name.clone() })
        .await
    {
        Ok(_) => {}
        // Taken by an earlier try that did not get to record it.
        Err(s) if s.code() == Code::AlreadyExists => {}
        Err(s) => {
            return Err(CsiError::downstream(
                &format!("snapshot {name} of {volume_id}"),
                s,
            ))
        }
    }
    let list = ctl
        .list_snapshots(StatusRequest {})
        .await
        .map_err(|s| CsiError::downstream(&format!("snapshots of {volume_id}"), s))?
        .into_inner();
    let taken = list
        .snapshots
        .iter()
        .find(|s| s.name == name)
        .ok_or_else(|| CsiError::Internal(format!("snapshot {name} of {volume_id} vanished")))?;
    let record = SnapshotRecord {
        csi_name: req.name.clone(),
        name,
        created: taken.created as i64,
        size_bytes: if taken.size > 0 {
            taken.size
        } else {
            sv.spec.size_bytes
        },
    };
    update(cluster, &volume_id, |sv| {
        if !sv.spec.snapshots.iter().any(|r| r.name == record.name) {
            sv.spec.snapshots.push(record.clone());
        }
    })
    .await?;
    Ok(to_csi(&volume_id, &record))
}

/// Read, change, replace; again on a conflict.
pub(crate) async fn update(
    cluster: &Cluster,
    id: &str,
    change: impl Fn(&mut StrataVolume),
) -> CsiResult<()> {
    for _ in 0..10 {
        let Some(mut sv) = cluster.get_volume(id).await? else {
            return Err(CsiError::NotFound(format!("volume {id} is gone")));
        };
        change(&mut sv);
        match cluster
            .volumes()
            .replace(id, &PostParams::default(), &sv)
            .await
        {
            Ok(_) => return Ok(()),
            Err(kube::Error::Api(s)) if s.code == 409 => continue,
            Err(e) => return Err(CsiError::kube(&format!("updating StrataVolume {id}"), e)),
        }
    }
    Err(CsiError::Aborted(format!(
        "StrataVolume {id} kept changing under the update"
    )))
}

pub async fn delete(
    cluster: &Cluster,
    snapshot_id: &str,
    secrets: &std::collections::HashMap<String, String>,
) -> CsiResult<()> {
    if snapshot_id.is_empty() {
        return Err(CsiError::Invalid(
            "DeleteSnapshot needs a snapshot ID".into(),
        ));
    }
    if BackupHandle::claims(snapshot_id) {
        return super::backups::delete(cluster, snapshot_id, secrets).await;
    }
    let Some((volume_id, name)) = names::parse_snapshot_id(snapshot_id) else {
        return Ok(());
    };
    let Some(sv) = cluster.get_volume(volume_id).await? else {
        return Ok(());
    };
    if !sv.spec.snapshots.iter().any(|r| r.name == name) {
        return Ok(());
    }
    let mut ctl = cluster.volume_controller(volume_id).await?;
    match ctl
        .delete_snapshot(SnapshotRef {
            name: name.to_string(),
        })
        .await
    {
        Ok(_) => {}
        Err(s) if s.code() == Code::NotFound => {}
        Err(s) => {
            return Err(CsiError::downstream(
                &format!("deleting snapshot {name} of {volume_id}"),
                s,
            ))
        }
    }
    update(cluster, volume_id, |sv| {
        sv.spec.snapshots.retain(|r| r.name != name)
    })
    .await
}

pub async fn list(
    cluster: &Cluster,
    req: ListSnapshotsRequest,
) -> CsiResult<ListSnapshotsResponse> {
    let mut all = Vec::new();
    let volumes = cluster.list_volumes().await?;
    for sv in &volumes {
        let id = sv.metadata.name.clone().unwrap_or_default();
        if !req.source_volume_id.is_empty() && req.source_volume_id != id {
            continue;
        }
        for r in &sv.spec.snapshots {
            let s = to_csi(&id, r);
            if req.snapshot_id.is_empty() || req.snapshot_id == s.snapshot_id {
                all.push(s);
            }
        }
    }
    let mut all: Vec<_> = all
        .into_iter()
        .map(|s| list_snapshots_response::Entry { snapshot: Some(s) })
        .collect();
    all.extend(super::backups::list(&volumes, &req));
    let (entries, next_token) = super::page(&all, &req.starting_token, req.max_entries)?;
    Ok(ListSnapshotsResponse {
        entries,
        next_token,
    })
}

pub async fn get(cluster: &Cluster, snapshot_id: &str) -> CsiResult<Snapshot> {
    if snapshot_id.is_empty() {
        return Err(CsiError::Invalid("GetSnapshot needs a snapshot ID".into()));
    }
    if BackupHandle::claims(snapshot_id) {
        return super::backups::get(cluster, snapshot_id).await;
    }
    let missing = || CsiError::NotFound(format!("no snapshot {snapshot_id:?}"));
    let (volume_id, name) = names::parse_snapshot_id(snapshot_id).ok_or_else(missing)?;
    let sv = cluster.get_volume(volume_id).await?.ok_or_else(missing)?;
    let r = sv
        .spec
        .snapshots
        .iter()
        .find(|r| r.name == name)
        .ok_or_else(missing)?;
    Ok(to_csi(volume_id, r))
}
