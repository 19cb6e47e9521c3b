//! StorageClass parameters (CreateVolume's `parameters`), checked before
//! anything is created.
//!
//! | key | default | meaning |
//! |---|---|---|
//! | `replicas` | 3 | replica count, 1 to 5, each on its own node |
//! | `syncRateMiB` | 0 | cap on resync/rebuild bandwidth (0: none) |
//! | `backupSchedules` | none | JSON list of schedules, each as `strata controller serve --backup-schedule` takes it |
//! | `backupSecret` | none | a Secret in strata's namespace whose keys become the volume controller's environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `STRATA_S3_ENDPOINT`, `STRATA_BACKUP_KEY`) |
//! | `wireEncryption` | `"false"` | `"true"`: the volume's controller encrypts the volume data on the wire to its replicas (`controller serve --encrypt-replica-wire`); needs the driver's cluster key |
//!
//! VolumeSnapshotClass parameters (CreateSnapshot's `parameters`),
//! [`SnapshotKind`]:
//!
//! | key | default | meaning |
//! |---|---|---|
//! | `type` | `snapshot` | `snapshot`: in the volume's replicas; `backup`: to S3 |
//! | `target` | none | `s3://bucket/prefix`, required with `type: backup` (and only then) |
//!
//! Keys starting with `csi.storage.k8s.io/` are the sidecars' own (the
//! PVC's name and namespace with `--extra-create-metadata`) and are
//! ignored; any other key is refused, so a typo is an error and not a
//! silently different volume.

use std::collections::{BTreeMap, HashMap};

use strata_backup::BackupSchedule;

use crate::error::CsiError;

pub const REPLICAS: &str = "replicas";
pub const SYNC_RATE_MIB: &str = "syncRateMiB";
pub const BACKUP_SCHEDULES: &str = "backupSchedules";
pub const BACKUP_SECRET: &str = "backupSecret";
pub const WIRE_ENCRYPTION: &str = "wireEncryption";
const SIDECAR_PREFIX: &str = "csi.storage.k8s.io/";

/// Most replicas a volume may have (the controller's limit).
pub const MAX_REPLICAS: u32 = 5;

/// A volume's settings from its StorageClass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeParams {
    pub replicas: u32,
    pub sync_rate_mib: u32,
    pub schedules: Vec<BackupSchedule>,
    pub backup_secret: Option<String>,
    /// Encrypt the volume data between its controller and its replicas.
    pub wire_encryption: bool,
}

impl Default for VolumeParams {
    fn default() -> Self {
        VolumeParams {
            replicas: 3,
            sync_rate_mib: 0,
            schedules: Vec::new(),
            backup_secret: None,
            wire_encryption: false,
        }
    }
}

impl VolumeParams {
    pub fn parse(params: &HashMap<String, String>) -> Result<VolumeParams, CsiError> {
        let mut p = VolumeParams::default();
        for (key, value) in params.iter().collect::<BTreeMap<_, _>>() {
            let bad = |why: String| CsiError::Invalid(format!("parameter {key}={value:?}: {why}"));
            match key.as_str() {
                REPLICAS => {
                    p.replicas = value
                        .parse()
                        .ok()
                        .filter(|n| (1..=MAX_REPLICAS).contains(n))
                        .ok_or_else(|| bad(format!("a replica count is 1 to {MAX_REPLICAS}")))?;
                }
                SYNC_RATE_MIB => {
                    p.sync_rate_mib = value
                        .parse()
                        .map_err(|_| bad("a whole number of MiB/s (0: no cap)".into()))?;
                }
                BACKUP_SCHEDULES => {
                    let schedules: Vec<BackupSchedule> =
                        serde_json::from_str(value).map_err(|e| {
                            bad(format!(
                                "a JSON list of {{\"cron\":...,\"target\":...,\"retention\":{{...}}}}: {e}"
                            ))
                        })?;
                    for s in &schedules {
                        s.validate().map_err(|e| bad(e.to_string()))?;
                    }
                    p.schedules = schedules;
                }
                BACKUP_SECRET => {
                    if value.is_empty() || value.len() > 253 {
                        return Err(bad("a Secret name".into()));
                    }
                    p.backup_secret = Some(value.clone());
                }
                WIRE_ENCRYPTION => {
                    p.wire_encryption = match value.as_str() {
                        "true" => true,
                        "false" => false,
                        _ => return Err(bad("\"true\" or \"false\"".into())),
                    };
                }
                k if k.starts_with(SIDECAR_PREFIX) => {}
                _ => {
                    return Err(CsiError::Invalid(format!(
                        "unknown parameter {key:?}; strata takes {REPLICAS}, {SYNC_RATE_MIB}, \
                         {BACKUP_SCHEDULES}, {BACKUP_SECRET}, {WIRE_ENCRYPTION}"
                    )))
                }
            }
        }
        Ok(p)
    }

    /// The schedules as the controller's `--backup-schedule` values.
    pub fn schedule_args(&self) -> Vec<String> {
        self.schedules
            .iter()
            .map(|s| serde_json::to_string(s).expect("a schedule serializes"))
            .collect()
    }
}

pub const SNAPSHOT_TYPE: &str = "type";
pub const SNAPSHOT_TARGET: &str = "target";

/// What a CreateSnapshot makes, from its class's parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotKind {
    /// A strata snapshot in the volume's replicas.
    InCluster,
    /// A backup to an S3 target (`s3://bucket/prefix`).
    Backup { target: String },
}

impl SnapshotKind {
    pub fn parse(params: &HashMap<String, String>) -> Result<SnapshotKind, CsiError> {
        let mut kind = None;
        let mut target = None;
        for (key, value) in params.iter().collect::<BTreeMap<_, _>>() {
            match key.as_str() {
                SNAPSHOT_TYPE => kind = Some(value.as_str()),
                SNAPSHOT_TARGET => target = Some(value.clone()),
                k if k.starts_with(SIDECAR_PREFIX) => {}
                _ => {
                    return Err(CsiError::Invalid(format!(
                        "unknown snapshot parameter {key:?}; strata takes {SNAPSHOT_TYPE} \
                         (snapshot or backup) and {SNAPSHOT_TARGET} (for a backup)"
                    )))
                }
            }
        }
        match (kind.unwrap_or("snapshot"), target) {
            ("snapshot", None) => Ok(SnapshotKind::InCluster),
            ("snapshot", Some(_)) => Err(CsiError::Invalid(format!(
                "snapshot parameter {SNAPSHOT_TARGET} is for {SNAPSHOT_TYPE}: backup; \
                 an in-cluster snapshot lives in the volume's replicas"
            ))),
            ("backup", Some(target)) => {
                crate::names::check_target(&target)
                    .map_err(|e| CsiError::Invalid(format!("snapshot parameter {e}")))?;
                Ok(SnapshotKind::Backup { target })
            }
            ("backup", None) => Err(CsiError::Invalid(format!(
                "{SNAPSHOT_TYPE}: backup needs {SNAPSHOT_TARGET}: s3://BUCKET/PREFIX"
            ))),
            (other, _) => Err(CsiError::Invalid(format!(
                "snapshot parameter {SNAPSHOT_TYPE}={other:?}: snapshot or backup"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(pairs: &[(&str, &str)]) -> Result<VolumeParams, CsiError> {
        VolumeParams::parse(
            &pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn defaults_and_sidecar_keys() {
        let p = parse(&[("csi.storage.k8s.io/pvc/name", "data")]).unwrap();
        assert_eq!(p, VolumeParams::default());
        let p = parse(&[("replicas", "2"), ("syncRateMiB", "40")]).unwrap();
        assert_eq!((p.replicas, p.sync_rate_mib), (2, 40));
        assert!(!p.wire_encryption);
        assert!(
            parse(&[("wireEncryption", "true")])
                .unwrap()
                .wire_encryption
        );
        assert!(
            !parse(&[("wireEncryption", "false")])
                .unwrap()
                .wire_encryption
        );
    }

    #[test]
    fn wire_encryption_takes_only_true_or_false() {
        for bad in ["yes", "True", "1", "", "on"] {
            let e = parse(&[("wireEncryption", bad)]).unwrap_err();
            assert!(matches!(e, CsiError::Invalid(_)), "{bad:?}: {e}");
            assert!(
                e.to_string().contains("wireEncryption") && e.to_string().contains("\"true\""),
                "{e}"
            );
        }
    }

    #[test]
    fn refuses_what_it_does_not_know() {
        for bad in [
            ("replicas", "0"),
            ("replicas", "6"),
            ("replicas", "three"),
            ("syncRateMiB", "-1"),
            ("backupSchedules", "{}"),
            (
                "backupSchedules",
                r#"[{"cron":"every day","target":"s3://b/p"}]"#,
            ),
            (
                "backupSchedules",
                r#"[{"cron":"0 3 * * *","target":"ftp://x"}]"#,
            ),
            ("replica", "3"),
        ] {
            let e = parse(&[bad]).unwrap_err();
            assert!(matches!(e, CsiError::Invalid(_)), "{bad:?}: {e}");
        }
    }

    #[test]
    fn schedules_round_trip_to_controller_flags() {
        let p = parse(&[(
            "backupSchedules",
            r#"[{"cron":"0 3 * * *","target":"s3://b/p","retention":{"keep_last":7}}]"#,
        )])
        .unwrap();
        let arg = &p.schedule_args()[0];
        let back: BackupSchedule = serde_json::from_str(arg).unwrap();
        assert_eq!(back, p.schedules[0]);
    }

    fn kind(pairs: &[(&str, &str)]) -> Result<SnapshotKind, CsiError> {
        SnapshotKind::parse(
            &pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn snapshot_classes() {
        assert_eq!(kind(&[]).unwrap(), SnapshotKind::InCluster);
        assert_eq!(
            kind(&[
                ("type", "snapshot"),
                ("csi.storage.k8s.io/volumesnapshot/name", "s")
            ])
            .unwrap(),
            SnapshotKind::InCluster
        );
        assert_eq!(
            kind(&[("type", "backup"), ("target", "s3://strata/dr")]).unwrap(),
            SnapshotKind::Backup {
                target: "s3://strata/dr".into()
            }
        );
        for (bad, why) in [
            (&[("type", "Backup")][..], "snapshot or backup"),
            (&[("type", "backup")], "needs target"),
            (
                &[("type", "backup"), ("target", "file:///tmp/b")],
                "only s3://",
            ),
            (&[("type", "backup"), ("target", "s3://x")], "bucket"),
            (&[("target", "s3://strata/dr")], "is for type: backup"),
            (
                &[
                    ("type", "backup"),
                    ("target", "s3://strata/dr"),
                    ("targt", "x"),
                ],
                "unknown",
            ),
        ] {
            let e = kind(bad).unwrap_err();
            assert!(matches!(e, CsiError::Invalid(_)), "{bad:?}: {e}");
            assert!(e.to_string().contains(why), "{bad:?}: {e}");
        }
    }
}
