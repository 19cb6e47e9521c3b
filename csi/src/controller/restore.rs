//! CreateVolume from a backup handle: the checks before anything is made,
//! and the restore through the new volume's controller, which CreateVolume
//! waits for (`volumes.rs` calls these; `backups.rs` explains the
//! background job and why a retry is safe).

use std::time::Duration;

use strata_proto::controller::RestoreRequest;

use super::jobs::{drain, target_spec};
use crate::cluster::Cluster;
use crate::crd::VolumeSource;
use crate::error::{CsiError, CsiResult};
use crate::names::BackupHandle;
use crate::params::VolumeParams;

/// How long CreateVolume waits for a restore before answering ABORTED
/// (the provisioner's own timeout is longer: `--timeout=90s`).
const RESTORE_WAIT: Duration = Duration::from_secs(60);

/// The backup handle of a volume source, if it is one.
pub fn restore_source(s: &VolumeSource) -> CsiResult<Option<BackupHandle>> {
    match &s.snapshot {
        Some(id) if BackupHandle::claims(id) => BackupHandle::parse(id)
            .map(Some)
            .map_err(|e| CsiError::Invalid(e.to_string())),
        _ => Ok(None),
    }
}

/// CreateVolume from a backup: the class must give the new volume's
/// controller S3 credentials, and the volume must hold the backup.
pub fn check_restore(h: &BackupHandle, size: u64, params: &VolumeParams) -> CsiResult<()> {
    if params.backup_secret.is_none() {
        return Err(CsiError::Invalid(format!(
            "restoring backup {} from {} needs S3 credentials: give the StorageClass a \
             backupSecret parameter (a Secret in strata's namespace with AWS_ACCESS_KEY_ID, \
             AWS_SECRET_ACCESS_KEY, STRATA_S3_ENDPOINT and STRATA_BACKUP_KEY)",
            h.backup_ref(),
            h.target
        )));
    }
    if size < h.size_bytes {
        return Err(CsiError::OutOfRange(format!(
            "backup {} holds {} bytes; the new volume asks for {size}",
            h.backup_ref(),
            h.size_bytes
        )));
    }
    Ok(())
}
/// Restores `h` into the new volume `id` through its controller, waiting
/// up to [`RESTORE_WAIT`]; ABORTED while it still runs (see module docs).
pub async fn restore_into(cluster: &Cluster, id: &str, h: &BackupHandle) -> CsiResult<()> {
    let key = format!("restore/{id}");
    let jobs = cluster.jobs.clone();
    let (c, vid, handle) = (cluster.clone(), id.to_string(), h.clone());
    jobs.start(&key, move |jobs, key| {
        drop(tokio::spawn(async move {
            let what = format!(
                "restoring backup {} from {} into {vid}",
                handle.backup_ref(),
                handle.target
            );
            let result = async {
                let mut ctl = c.volume_controller(&vid).await?;
                let stream = ctl
                    .restore_backup(RestoreRequest {
                        target: target_spec(&handle.target),
                        backup: handle.backup_ref(),
                        force: false,
                    })
                    .await
                    .map_err(|s| CsiError::downstream(&what, s))?
                    .into_inner();
                drain(&jobs, &key, &what, stream).await
            }
            .await;
            match &result {
                Ok(()) => tracing::info!(volume = %vid, backup = %handle.backup_ref(), "restored"),
                Err(e) => tracing::warn!(volume = %vid, error = %e, "restore failed"),
            }
            jobs.finish(&key, result);
        }));
    });
    let deadline = tokio::time::Instant::now() + RESTORE_WAIT;
    loop {
        match jobs.take_done(&key) {
            (Some(result), _) => return result,
            (None, Some(progress)) if tokio::time::Instant::now() >= deadline => {
                return Err(CsiError::Aborted(format!(
                    "volume {id}: still restoring backup {} ({progress}); not ready until it is done",
                    h.backup_ref()
                )))
            }
            (None, Some(_)) => tokio::time::sleep(Duration::from_millis(250)).await,
            (None, None) => {
                return Err(CsiError::Aborted(format!(
                    "volume {id}: the restore job vanished; retry"
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handle() -> BackupHandle {
        BackupHandle::parse("backup:65536:pvc-1/20261205T010203.456Z-1a2b3c4d@s3://strata/dr")
            .unwrap()
    }

    #[test]
    fn restores_need_a_secret_and_room() {
        let h = handle();
        let with_secret = VolumeParams {
            backup_secret: Some("s3".into()),
            ..Default::default()
        };
        let e = check_restore(&h, 65536, &VolumeParams::default()).unwrap_err();
        assert!(matches!(e, CsiError::Invalid(_)) && e.to_string().contains("backupSecret"));
        let e = check_restore(&h, 61440, &with_secret).unwrap_err();
        assert!(matches!(e, CsiError::OutOfRange(_)), "{e}");
        assert!(check_restore(&h, 65536, &with_secret).is_ok());
        assert!(check_restore(&h, 1 << 30, &with_secret).is_ok());
    }

    #[test]
    fn restore_sources() {
        let src = |s: &str| VolumeSource {
            snapshot: Some(s.into()),
            volume: None,
        };
        assert_eq!(restore_source(&src("pvc-1/snap")).unwrap(), None);
        assert_eq!(
            restore_source(&src(&handle().to_id())).unwrap(),
            Some(handle())
        );
        let e = restore_source(&src("backup:12:x")).unwrap_err();
        assert!(matches!(e, CsiError::Invalid(_)), "{e}");
    }
}
