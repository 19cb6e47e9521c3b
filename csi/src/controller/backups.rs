//! Backups as CSI snapshots: CreateSnapshot with a `type: backup`
//! VolumeSnapshotClass, DeleteSnapshot, List/GetSnapshot of backup handles,
//! and CreateVolume from one (a restore, also in another cluster; `restore.rs`).
//!
//! The data never passes through the CSI controller: a backup is the
//! source volume's controller's CreateBackup stream (it snapshots the
//! volume itself and reads the snapshot from a replica), a restore is the
//! new volume's controller's RestoreBackup stream. Both controllers get
//! their S3 credentials and backup key from the StorageClass
//! `backupSecret` (their environment). Only DeleteSnapshot talks to S3
//! from here, with the credentials the snapshotter passes (the class's
//! `csi.storage.k8s.io/snapshotter-secret-*`, or a pre-provisioned
//! content's deletion-secret annotations).
//!
//! Idempotency while a backup runs longer than the snapshotter's call:
//! the handle must be known at once (the snapshotter stores the first
//! snapshot ID it gets and never updates it), so the CSI controller
//! chooses the backup's id itself ([`names::backup_id`]: time-sortable
//! like the engine's own, plus a hash of the CSI name) and passes it in
//! CreateBackup. Before starting, it writes a [`BackupRecord`] (state
//! Running, with the handle) into the source StrataVolume's spec, starts
//! the CreateBackup stream as a background task it owns ([`super::jobs::Jobs`]) and
//! answers `ready_to_use: false`. A retry finds the record and answers
//! from it; when the task ends it marks the record Ready or Failed. After a
//! CSI controller restart the record says Running but no task runs: the
//! next retry starts CreateBackup again with the same id, and the
//! controller answers ALREADY_EXISTS if the first run finished (Ready), or
//! runs it (a first run still going writes the same manifest key; both are
//! complete backups). Chosen over finding the finished backup by listing
//! manifests because that needs S3 credentials and the backup key in the
//! CSI controller and cannot hand out a handle before the backup exists.
//! A Failed record is reported once and dropped, so the snapshotter's next
//! retry starts a fresh backup.
//!
//! A restore runs the same way (a background task keyed by the new
//! volume), but CreateVolume does not answer until it is done: the volume
//! stays in phase Creating, a retry that finds the task running answers
//! ABORTED with its progress (the provisioner retries), one that finds it
//! failed gets the error once (the next retry restores again: a restore
//! rewrites the whole backup, so repeating it is safe).

use std::collections::HashMap;

use strata_backup::{BackupError, GcOptions, NoProgress, S3Options, Target, TargetOptions};
use strata_proto::controller::BackupRequest;
use strata_proto::csi::{
    list_snapshots_response, CreateSnapshotRequest, ListSnapshotsRequest, Snapshot,
};

use super::jobs::{drain, target_spec};
use crate::cluster::Cluster;
use crate::crd::{backup_state, BackupRecord, StrataVolume};
use crate::error::{CsiError, CsiResult};
use crate::names::{self, BackupHandle};

/// Secret keys DeleteSnapshot reads (the same names the volume controller
/// reads from its environment).
pub const SECRET_ACCESS_KEY_ID: &str = "AWS_ACCESS_KEY_ID";
pub const SECRET_SECRET_ACCESS_KEY: &str = "AWS_SECRET_ACCESS_KEY";
pub const SECRET_REGION: &str = "AWS_REGION";
pub const SECRET_ENDPOINT: &str = "STRATA_S3_ENDPOINT";

fn creation(secs: i64) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp {
        seconds: secs,
        nanos: 0,
    })
}

fn to_csi(volume_id: &str, r: &BackupRecord) -> Snapshot {
    let size = BackupHandle::parse(&r.handle).map_or(0, |h| h.size_bytes);
    Snapshot {
        size_bytes: size as i64,
        snapshot_id: r.handle.clone(),
        source_volume_id: volume_id.to_string(),
        creation_time: creation(r.created),
        ready_to_use: r.state == backup_state::READY,
        group_snapshot_id: String::new(),
    }
}

/// A handle no StrataVolume here knows (a pre-provisioned content, or a
/// backup whose volume is gone): the handle is trusted, the restore
/// checks the backup is there.
fn from_handle(h: &BackupHandle) -> Snapshot {
    let created =
        h.id.get(..15)
            .and_then(|s| chrono::NaiveDateTime::parse_from_str(s, "%Y%m%dT%H%M%S").ok())
            .map_or(0, |t| t.and_utc().timestamp());
    Snapshot {
        size_bytes: h.size_bytes as i64,
        snapshot_id: h.to_id(),
        source_volume_id: h.volume.clone(),
        creation_time: creation(created),
        ready_to_use: true,
        group_snapshot_id: String::new(),
    }
}

/// The record of `name` or of `handle`, with its volume's ID.
fn find(
    volumes: &[StrataVolume],
    hit: impl Fn(&BackupRecord) -> bool,
) -> Option<(&str, &BackupRecord)> {
    volumes.iter().find_map(|sv| {
        let id = sv.metadata.name.as_deref()?;
        sv.spec.backups.iter().find(|r| hit(r)).map(|r| (id, r))
    })
}

/// CreateSnapshot of a `type: backup` class (see module docs).
pub async fn create(
    cluster: &Cluster,
    req: &CreateSnapshotRequest,
    target: &str,
) -> CsiResult<Snapshot> {
    let volume_id = req.source_volume_id.as_str();
    let volumes = cluster.list_volumes().await?;
    if let Some(sv) = volumes
        .iter()
        .find(|sv| sv.spec.snapshots.iter().any(|r| r.csi_name == req.name))
    {
        return Err(CsiError::AlreadyExists(format!(
            "snapshot {:?} exists as an in-cluster snapshot of volume {}",
            req.name,
            sv.metadata.name.as_deref().unwrap_or_default()
        )));
    }
    if let Some((id, r)) = find(&volumes, |r| r.csi_name == req.name) {
        let same_target = BackupHandle::parse(&r.handle).is_ok_and(|h| h.target == target);
        if id != volume_id || !same_target {
            return Err(CsiError::AlreadyExists(format!(
                "snapshot {:?} exists: backup {} of volume {id}",
                req.name, r.handle
            )));
        }
        return answer(cluster, id, r.clone()).await;
    }
    let sv = volumes
        .iter()
        .find(|sv| sv.metadata.name.as_deref() == Some(volume_id))
        .ok_or_else(|| CsiError::NotFound(format!("no volume {volume_id:?} to back up")))?;
    if sv.spec.backup_secret.is_none() {
        return Err(CsiError::Precondition(format!(
            "volume {volume_id} cannot be backed up: its StorageClass has no backupSecret \
             parameter, so its controller has no S3 credentials"
        )));
    }
    let now = chrono::Utc::now();
    let handle = BackupHandle {
        size_bytes: sv.spec.size_bytes,
        volume: volume_id.to_string(),
        id: names::backup_id(&req.name, now),
        target: target.to_string(),
    };
    let record = BackupRecord {
        csi_name: req.name.clone(),
        handle: handle.to_id(),
        created: now.timestamp(),
        state: backup_state::RUNNING.into(),
        message: String::new(),
    };
    super::snapshots::update(cluster, volume_id, |sv| {
        if !sv
            .spec
            .backups
            .iter()
            .any(|r| r.csi_name == record.csi_name)
        {
            sv.spec.backups.push(record.clone());
        }
    })
    .await?;
    // A concurrent call may have recorded its own first: answer from
    // whatever the resource holds.
    let sv = cluster
        .get_volume(volume_id)
        .await?
        .ok_or_else(|| CsiError::NotFound(format!("volume {volume_id} is gone")))?;
    let r = sv
        .spec
        .backups
        .iter()
        .find(|r| r.csi_name == req.name)
        .cloned()
        .ok_or_else(|| {
            CsiError::Aborted(format!("the record of backup {:?} vanished", req.name))
        })?;
    answer(cluster, volume_id, r).await
}

/// The answer for a recorded backup; starts its task when it should run
/// and none does.
async fn answer(cluster: &Cluster, volume_id: &str, r: BackupRecord) -> CsiResult<Snapshot> {
    match r.state.as_str() {
        backup_state::READY => Ok(to_csi(volume_id, &r)),
        backup_state::FAILED => {
            // Reported once; the next retry starts a new backup.
            super::snapshots::update(cluster, volume_id, |sv| {
                sv.spec.backups.retain(|b| b.handle != r.handle)
            })
            .await?;
            Err(CsiError::Internal(format!(
                "backup {} failed (the next try starts a new one): {}",
                r.handle, r.message
            )))
        }
        _ => {
            let h = BackupHandle::parse(&r.handle).map_err(|e| {
                CsiError::Internal(format!(
                    "StrataVolume {volume_id} records a bad handle: {e}"
                ))
            })?;
            start_backup(cluster, volume_id, h);
            Ok(to_csi(volume_id, &r))
        }
    }
}

fn start_backup(cluster: &Cluster, volume_id: &str, h: BackupHandle) {
    let key = format!("backup/{}", h.to_id());
    let (c, vid) = (cluster.clone(), volume_id.to_string());
    cluster.jobs.start(&key, move |jobs, key| {
        drop(tokio::spawn(async move {
            let what = format!("backup {} of volume {vid} to {}", h.id, h.target);
            let result = async {
                let mut ctl = c.volume_controller(&vid).await?;
                let stream = ctl
                    .create_backup(BackupRequest {
                        target: target_spec(&h.target),
                        snapshot: String::new(),
                        full: false,
                        id: h.id.clone(),
                    })
                    .await
                    .map_err(|s| CsiError::downstream(&what, s))?
                    .into_inner();
                drain(&jobs, &key, &what, stream).await
            }
            .await;
            let (state, message) = match &result {
                Ok(()) => (backup_state::READY, String::new()),
                // Done by an earlier run (before a CSI controller restart).
                Err(CsiError::AlreadyExists(_)) => (backup_state::READY, String::new()),
                // The controller pod or the API is not there now: keep
                // Running, the snapshotter's next retry starts it again.
                Err(e @ (CsiError::Unavailable(_) | CsiError::Aborted(_))) => {
                    tracing::warn!(error = %e, "backup interrupted; the next CreateSnapshot retries it");
                    jobs.forget(&key);
                    return;
                }
                Err(e) => (backup_state::FAILED, e.to_string()),
            };
            tracing::info!(volume = %vid, backup = %h.id, state, message, "backup ended");
            let handle = h.to_id();
            let recorded = super::snapshots::update(&c, &vid, |sv| {
                for r in sv.spec.backups.iter_mut().filter(|r| r.handle == handle) {
                    r.state = state.to_string();
                    r.message = message.clone();
                }
            })
            .await;
            if let Err(e) = recorded {
                tracing::warn!(volume = %vid, error = %e, "could not record the backup's end; a retry finds it");
            }
            jobs.forget(&key);
        }));
    });
}

/// S3 settings from the snapshotter's secret.
fn options_from(secrets: &HashMap<String, String>, h: &BackupHandle) -> CsiResult<TargetOptions> {
    let get = |k: &str| secrets.get(k).filter(|v| !v.is_empty()).cloned();
    let (Some(id), Some(secret)) = (get(SECRET_ACCESS_KEY_ID), get(SECRET_SECRET_ACCESS_KEY))
    else {
        return Err(CsiError::Invalid(format!(
            "deleting backup {} from {} needs S3 credentials: set \
             csi.storage.k8s.io/snapshotter-secret-name and -namespace in the \
             VolumeSnapshotClass (or the snapshot.storage.kubernetes.io/deletion-secret-name \
             and -namespace annotations on a pre-provisioned VolumeSnapshotContent) to a Secret \
             with {SECRET_ACCESS_KEY_ID} and {SECRET_SECRET_ACCESS_KEY}",
            h.backup_ref(),
            h.target
        )));
    };
    let endpoint = get(SECRET_ENDPOINT);
    let key = match get(strata_backup::KEY_ENV) {
        Some(k) => {
            let k = k.trim_end().as_bytes().to_vec();
            if k.len() < 16 {
                return Err(CsiError::Invalid(format!(
                    "the secret's {} is shorter than 16 bytes",
                    strata_backup::KEY_ENV
                )));
            }
            Some(k)
        }
        None => None,
    };
    Ok(TargetOptions {
        s3: S3Options {
            path_style: endpoint.is_some(),
            endpoint,
            region: get(SECRET_REGION),
            credentials: Some((id, secret)),
            create_bucket: false,
        },
        key,
        ..Default::default()
    })
}

fn backup_error(what: &str, e: BackupError) -> CsiError {
    match e {
        BackupError::Key(_) | BackupError::InvalidTarget { .. } => {
            CsiError::Invalid(format!("{what}: {e}"))
        }
        BackupError::Store { .. } => CsiError::Unavailable(format!("{what}: {e}")),
        _ => CsiError::Internal(format!("{what}: {e}")),
    }
}

/// DeleteSnapshot of a backup handle: its manifest goes at once, the
/// chunks no other backup uses at a gc started in the background. A
/// backup that is not there is success.
pub async fn delete(
    cluster: &Cluster,
    snapshot_id: &str,
    secrets: &HashMap<String, String>,
) -> CsiResult<()> {
    let h = BackupHandle::parse(snapshot_id).map_err(|e| CsiError::Invalid(e.to_string()))?;
    let volumes = cluster.list_volumes().await?;
    let recorded = find(&volumes, |r| r.handle == snapshot_id).map(|(v, _)| v.to_string());
    if cluster.jobs.is_running(&format!("backup/{snapshot_id}")) {
        return Err(CsiError::Unavailable(format!(
            "backup {} is still running; it can be deleted when it ends",
            h.backup_ref()
        )));
    }
    let what = format!("deleting backup {} from {}", h.backup_ref(), h.target);
    let opts = options_from(secrets, &h)?;
    let target = Target::open(&h.target, &opts)
        .await
        .map_err(|e| backup_error(&what, e))?;
    let present = target
        .config()
        .await
        .map_err(|e| backup_error(&what, e))?
        .is_some();
    if present {
        match strata_backup::remove(&target, &h.backup_ref()).await {
            Ok(_) => {
                tracing::info!(backup = %h.backup_ref(), target = %h.target, "backup deleted");
                tokio::spawn(async move {
                    match strata_backup::gc(&target, &GcOptions::default(), &NoProgress).await {
                        Ok(r) => {
                            tracing::info!(target = %target.url(), report = ?r, "gc after a deleted backup")
                        }
                        Err(e) => {
                            tracing::warn!(target = %target.url(), error = %e, "gc after a deleted backup failed")
                        }
                    }
                });
            }
            Err(BackupError::NoSuchBackup { .. }) => {}
            Err(e) => return Err(backup_error(&what, e)),
        }
    }
    if let Some(volume_id) = recorded {
        super::snapshots::update(cluster, &volume_id, |sv| {
            sv.spec.backups.retain(|r| r.handle != snapshot_id)
        })
        .await?;
    }
    Ok(())
}

/// The backups ListSnapshots reports: every one a StrataVolume records,
/// and a handle asked for by ID that none does (see [`from_handle`]).
pub fn list(
    volumes: &[StrataVolume],
    req: &ListSnapshotsRequest,
) -> Vec<list_snapshots_response::Entry> {
    let entry = |s| list_snapshots_response::Entry { snapshot: Some(s) };
    let mut out = Vec::new();
    for sv in volumes {
        let id = sv.metadata.name.clone().unwrap_or_default();
        if !req.source_volume_id.is_empty() && req.source_volume_id != id {
            continue;
        }
        for r in &sv.spec.backups {
            if req.snapshot_id.is_empty() || req.snapshot_id == r.handle {
                out.push(entry(to_csi(&id, r)));
            }
        }
    }
    if out.is_empty() && BackupHandle::claims(&req.snapshot_id) {
        if let Ok(h) = BackupHandle::parse(&req.snapshot_id) {
            if req.source_volume_id.is_empty() || req.source_volume_id == h.volume {
                out.push(entry(from_handle(&h)));
            }
        }
    }
    out
}

/// GetSnapshot of a backup handle.
pub async fn get(cluster: &Cluster, snapshot_id: &str) -> CsiResult<Snapshot> {
    let h = BackupHandle::parse(snapshot_id).map_err(|e| CsiError::NotFound(e.to_string()))?;
    let volumes = cluster.list_volumes().await?;
    Ok(match find(&volumes, |r| r.handle == snapshot_id) {
        Some((id, r)) => to_csi(id, r),
        None => from_handle(&h),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handle() -> BackupHandle {
        BackupHandle::parse("backup:65536:pvc-1/20261205T010203.456Z-1a2b3c4d@s3://strata/dr")
            .unwrap()
    }

    #[test]
    fn a_handle_alone_answers_list_and_get() {
        let h = handle();
        let s = from_handle(&h);
        assert!(s.ready_to_use);
        assert_eq!(
            (s.size_bytes, s.source_volume_id.as_str()),
            (65536, "pvc-1")
        );
        assert_eq!(
            s.creation_time.unwrap().seconds,
            chrono::DateTime::parse_from_rfc3339("2026-12-05T01:02:03Z")
                .unwrap()
                .timestamp()
        );
        let req = ListSnapshotsRequest {
            snapshot_id: h.to_id(),
            ..Default::default()
        };
        assert_eq!(list(&[], &req).len(), 1);
        let other = ListSnapshotsRequest {
            snapshot_id: h.to_id(),
            source_volume_id: "pvc-2".into(),
            ..Default::default()
        };
        assert!(list(&[], &other).is_empty());
        let garbage = ListSnapshotsRequest {
            snapshot_id: "backup:nonsense".into(),
            ..Default::default()
        };
        assert!(list(&[], &garbage).is_empty());
    }

    #[test]
    fn delete_credentials_from_the_secret() {
        let h = handle();
        let e = options_from(&HashMap::new(), &h).unwrap_err();
        assert!(
            matches!(e, CsiError::Invalid(_)) && e.to_string().contains("snapshotter-secret-name")
        );
        let mut s: HashMap<String, String> = [
            (SECRET_ACCESS_KEY_ID, "k"),
            (SECRET_SECRET_ACCESS_KEY, "s"),
            (SECRET_ENDPOINT, "http://127.0.0.1:9000"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let o = options_from(&s, &h).unwrap();
        assert!(o.s3.path_style && o.key.is_none());
        assert_eq!(o.s3.credentials, Some(("k".into(), "s".into())));
        s.insert(strata_backup::KEY_ENV.into(), "short".into());
        assert!(matches!(options_from(&s, &h), Err(CsiError::Invalid(_))));
        s.insert(strata_backup::KEY_ENV.into(), "0123456789abcdef\n".into());
        assert_eq!(options_from(&s, &h).unwrap().key.unwrap().len(), 16);
    }
}
