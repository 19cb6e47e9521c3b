//! One backup of the volume, and one restore into it.
//!
//! A backup without a snapshot name takes its own, `backup-<tag>-<time>`
//! (`tag`: a hash of the target URL, so two targets keep separate bases).
//! The engine reads only what changed since the volume's last backup in
//! that target, whose snapshot must still exist: so after a successful
//! backup, the snapshot it read is kept as the next one's base and the
//! older snapshots this module took for the same target are deleted (in
//! the background: the store merges a deleted snapshot's data into the
//! next layer, which costs local IO in proportion to the data it holds;
//! see the README's status list). A failed backup deletes the snapshot it
//! took.

use std::sync::Arc;

use strata_backup::{
    create_backup, restore, BackupOptions, BackupSummary, Progress, RestoreSummary, Target,
    TargetOptions,
};

use super::{JobError, ReplicaSnapshotSource, VolumeSink};
use crate::replicator::Volume;

/// The prefix of the snapshots backups to `url` take.
fn snapshot_prefix(url: &str) -> String {
    format!("backup-{:08x}-", crc32fast::hash(url.as_bytes()))
}

/// `YYYYMMDDTHHMMSSZ`, UTC.
fn stamp() -> String {
    chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ").to_string()
}

/// Backs the volume up to `url`: from snapshot `snapshot` if given, else
/// from a new snapshot. See the module docs.
pub async fn run_backup(
    volume: &Arc<Volume>,
    opts: &TargetOptions,
    url: &str,
    snapshot: Option<&str>,
    backup_opts: &BackupOptions,
    progress: &dyn Progress,
) -> Result<BackupSummary, JobError> {
    let target = Target::open(url, opts)
        .await
        .map_err(|source| JobError::Target {
            url: url.to_string(),
            source,
        })?;
    let prefix = snapshot_prefix(url);
    let (name, ours) = match snapshot {
        Some(s) => (s.to_string(), false),
        None => {
            let name = format!("{prefix}{}", stamp());
            volume.create_snapshot(&name).await?;
            (name, true)
        }
    };
    let result = async {
        let source = ReplicaSnapshotSource::open(volume, &name).await?;
        Ok::<_, JobError>(create_backup(&target, &source, backup_opts, progress).await?)
    }
    .await;
    if ours {
        match &result {
            // In the background: deleting a snapshot merges its data into
            // the next layer, local IO on every replica that the caller
            // need not wait for.
            Ok(_) => {
                let (volume, name) = (volume.clone(), name.clone());
                tokio::spawn(async move { drop_older(&volume, &prefix, &name).await });
            }
            Err(_) => {
                if let Err(e) = volume.delete_snapshot(&name).await {
                    tracing::warn!(volume = %volume.name, snapshot = %name, "could not delete the snapshot of a failed backup: {e}");
                }
            }
        }
    }
    result.map_err(|e| JobError::Backup {
        volume: volume.name.clone(),
        snapshot: name,
        url: url.to_string(),
        source: Box::new(e),
    })
}

/// Deletes the snapshots backups to the same target took before `keep`.
async fn drop_older(volume: &Arc<Volume>, prefix: &str, keep: &str) {
    let Ok(chain) = volume.list_snapshots().await else {
        return;
    };
    for s in chain {
        if s.name.starts_with(prefix) && s.name != keep {
            if let Err(e) = volume.delete_snapshot(&s.name).await {
                tracing::warn!(volume = %volume.name, snapshot = %s.name, "could not delete an older backup snapshot: {e}");
            }
        }
    }
}

/// Restores backup `id` from `url` into the volume.
pub async fn run_restore(
    volume: &Arc<Volume>,
    opts: &TargetOptions,
    url: &str,
    id: &str,
    progress: &dyn Progress,
) -> Result<RestoreSummary, JobError> {
    let target = Target::open(url, opts)
        .await
        .map_err(|source| JobError::Target {
            url: url.to_string(),
            source,
        })?;
    let result = async {
        let sink = VolumeSink::open(volume).await?;
        Ok::<_, JobError>(restore(&target, id, &sink, progress).await?)
    }
    .await;
    result.map_err(|e| JobError::Restore {
        id: id.to_string(),
        url: url.to_string(),
        volume: volume.name.clone(),
        source: Box::new(e),
    })
}
