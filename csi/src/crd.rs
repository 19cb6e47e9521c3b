//! The `StrataVolume` custom resource: one per volume, in strata's
//! namespace, named by the volume ID. Its spec is what CreateVolume
//! decided (size, replicas and where they live, schedules); its status is
//! what the volume's controller last reported. With the replicas' own
//! metadata it is all the state strata keeps: the CSI controller holds
//! nothing in memory that a restart would lose.
//!
//! `deploy/crd.yaml` is generated from this type (`strata csi crd`), so the
//! schema the API server checks is the one this code reads.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// What a volume is.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "strata.io",
    version = "v1alpha1",
    kind = "StrataVolume",
    plural = "stratavolumes",
    shortname = "sv",
    namespaced,
    status = "StrataVolumeStatus",
    printcolumn = r#"{"name":"Size","type":"integer","format":"int64","jsonPath":".spec.sizeBytes"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Healthy","type":"integer","jsonPath":".status.healthyReplicas"}"#,
    printcolumn = r#"{"name":"Replicas","type":"integer","jsonPath":".spec.replicas"}"#,
    printcolumn = r#"{"name":"Rebuild","type":"string","jsonPath":".status.rebuildProgress"}"#,
    printcolumn = r#"{"name":"Epoch","type":"integer","jsonPath":".status.epoch"}"#,
    printcolumn = r#"{"name":"Controller","type":"string","jsonPath":".status.controllerNode"}"#,
    printcolumn = r#"{"name":"Last backup","type":"string","jsonPath":".status.lastBackup"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct StrataVolumeSpec {
    /// The name CreateVolume was called with (a second CreateVolume with
    /// the same name finds this volume; another name never does).
    pub csi_name: String,
    /// Bytes, a multiple of 4096.
    pub size_bytes: u64,
    /// Replica count.
    pub replicas: u32,
    /// The nodes holding the replicas, one each.
    pub replica_nodes: Vec<String>,
    /// Backup schedules (JSON, as `--backup-schedule` takes them).
    #[serde(default)]
    pub schedules: Vec<String>,
    /// A Secret whose keys become the controller's environment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup_secret: Option<String>,
    /// Resync/rebuild bandwidth cap in MiB/s (0: none).
    #[serde(default)]
    pub sync_rate_mib: u32,
    /// Encrypt the volume data on the wire to the replicas
    /// (`--encrypt-replica-wire`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub wire_encryption: bool,
    /// Where the data came from, if not empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<VolumeSource>,
    /// Nodes the controller pod should run on when it can (the consumer's
    /// node of a WaitForFirstConsumer claim).
    #[serde(default)]
    pub preferred_nodes: Vec<String>,
    /// The snapshots CSI created in this volume.
    #[serde(default)]
    pub snapshots: Vec<SnapshotRecord>,
    /// The backups CSI took of this volume (VolumeSnapshots of a
    /// `type: backup` class), running or done.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backups: Vec<BackupRecord>,
}

/// A volume's origin.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSource {
    /// A snapshot ID (`VOLUME/SNAPSHOT`) it was restored from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    /// A volume ID it was cloned from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
}

/// A snapshot CSI created.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotRecord {
    /// The name CreateSnapshot was called with.
    pub csi_name: String,
    /// The strata snapshot name in this volume.
    pub name: String,
    /// Unix seconds.
    pub created: i64,
    /// The volume's size when it was taken.
    pub size_bytes: u64,
}

/// A backup CSI took (or is taking) to S3. Written before the backup
/// starts, so a retried CreateSnapshot finds it instead of starting another.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupRecord {
    /// The name CreateSnapshot was called with.
    pub csi_name: String,
    /// The snapshot ID (`backup:SIZE:VOLUME/ID@TARGET`, see `names.rs`).
    pub handle: String,
    /// Unix seconds when it was asked for.
    pub created: i64,
    /// Running, Ready or Failed ([`backup_state`]).
    pub state: String,
    /// Why it failed ("" otherwise).
    #[serde(default)]
    pub message: String,
}

/// States of a [`BackupRecord`].
pub mod backup_state {
    pub const RUNNING: &str = "Running";
    pub const READY: &str = "Ready";
    pub const FAILED: &str = "Failed";
}

/// What the volume's controller last reported.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StrataVolumeStatus {
    /// Creating, Ready, Degraded, Rebuilding, Unavailable or Deleting.
    #[serde(default)]
    pub phase: String,
    #[serde(default)]
    pub healthy_replicas: u32,
    #[serde(default)]
    pub total_replicas: u32,
    /// Percent done of the running resync or rebuild ("" when none).
    #[serde(default)]
    pub rebuild_progress: String,
    /// The node the controller pod runs on.
    #[serde(default)]
    pub controller_node: String,
    #[serde(default)]
    pub epoch: u64,
    /// When the last backup finished, RFC 3339 ("" when none).
    #[serde(default)]
    pub last_backup: String,
    /// Why the phase is not Ready.
    #[serde(default)]
    pub message: String,
}

/// Phases a volume goes through.
pub mod phase {
    pub const CREATING: &str = "Creating";
    pub const READY: &str = "Ready";
    pub const DEGRADED: &str = "Degraded";
    pub const REBUILDING: &str = "Rebuilding";
    pub const UNAVAILABLE: &str = "Unavailable";
    pub const DELETING: &str = "Deleting";
}

/// The CRD as JSON (which `kubectl apply -f` takes), for `deploy/` and
/// the tests.
pub fn crd_json() -> String {
    use kube::CustomResourceExt;
    serde_json::to_value(StrataVolume::crd())
        .map(|v| serde_json::to_string_pretty(&v).expect("json"))
        .expect("the CRD serializes")
}

#[cfg(test)]
mod tests {
    #[test]
    fn deploy_has_the_crd_this_code_reads() {
        let shipped = include_str!("../../deploy/base/crd.yaml");
        assert_eq!(
            shipped.trim_end(),
            super::crd_json(),
            "deploy/base/crd.yaml is stale: run `strata csi crd > deploy/base/crd.yaml`"
        );
    }
}
