//! The parts of the VolumeSnapshot API (`snapshot.storage.k8s.io/v1`,
//! installed with the snapshot-controller) that the built-in snapshotter
//! reads. Only the fields it needs are typed; it writes by merge patch,
//! so fields it does not know are never dropped.

use std::collections::BTreeMap;

use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use kube::CustomResource;
use serde::{Deserialize, Serialize};

/// The annotation the snapshotter keeps on a content while CreateSnapshot
/// may be cutting it (the snapshot-controller then keeps the source PVC).
pub const BEING_CREATED: &str = "snapshot.storage.kubernetes.io/volumesnapshot-being-created";
/// Set by the snapshot-controller once the VolumeSnapshot is being deleted.
pub const BEING_DELETED: &str = "snapshot.storage.kubernetes.io/volumesnapshot-being-deleted";
/// The finalizer the snapshot-controller puts on a bound content; the
/// snapshotter removes it once the snapshot is deleted (or retained).
pub const CONTENT_FINALIZER: &str =
    "snapshot.storage.kubernetes.io/volumesnapshotcontent-bound-protection";
/// Where the snapshot-controller records the class's snapshotter Secret.
pub const SECRET_NAME: &str = "snapshot.storage.kubernetes.io/deletion-secret-name";
pub const SECRET_NAMESPACE: &str = "snapshot.storage.kubernetes.io/deletion-secret-namespace";
/// A content made by a group snapshot: not this snapshotter's to cut.
pub const GROUP_HANDLE: &str = "groupsnapshot.storage.k8s.io/volumeGroupSnapshotHandle";
/// VolumeSnapshotClass parameters under this prefix are for the
/// snapshotter, never passed to CreateSnapshot.
pub const CSI_PARAMETER_PREFIX: &str = "csi.storage.k8s.io/";
/// The only such keys there are (the kubernetes-csi snapshotter refuses any
/// other, and so does strata).
pub const KNOWN_CSI_PARAMETERS: [&str; 8] = [
    "csi.storage.k8s.io/snapshotter-secret-name",
    "csi.storage.k8s.io/snapshotter-secret-namespace",
    "csi.storage.k8s.io/snapshotter-list-secret-name",
    "csi.storage.k8s.io/snapshotter-list-secret-namespace",
    "csi.storage.k8s.io/group-snapshotter-secret-name",
    "csi.storage.k8s.io/group-snapshotter-secret-namespace",
    "csi.storage.k8s.io/group-snapshotter-get-secret-name",
    "csi.storage.k8s.io/group-snapshotter-get-secret-namespace",
];

/// A VolumeSnapshotContent: one snapshot on the storage side.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default)]
#[kube(
    group = "snapshot.storage.k8s.io",
    version = "v1",
    kind = "VolumeSnapshotContent",
    plural = "volumesnapshotcontents",
    status = "VolumeSnapshotContentStatus",
    schema = "disabled"
)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotContentSpec {
    #[serde(default)]
    pub driver: String,
    /// `Delete` or `Retain`.
    #[serde(default)]
    pub deletion_policy: String,
    #[serde(default)]
    pub source: ContentSource,
    #[serde(default)]
    pub volume_snapshot_class_name: Option<String>,
    #[serde(default)]
    pub volume_snapshot_ref: SnapshotRef,
}

/// Exactly one is set: a volume to cut a snapshot of (dynamic), or an
/// existing snapshot (pre-provisioned).
#[derive(Deserialize, Serialize, Clone, Debug, Default)]
#[serde(rename_all = "camelCase")]
pub struct ContentSource {
    #[serde(default)]
    pub volume_handle: Option<String>,
    #[serde(default)]
    pub snapshot_handle: Option<String>,
}

/// The VolumeSnapshot a content is bound to.
#[derive(Deserialize, Serialize, Clone, Debug, Default)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotRef {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub uid: Option<String>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotContentStatus {
    #[serde(default)]
    pub snapshot_handle: Option<String>,
    /// Unix nanoseconds.
    #[serde(default)]
    pub creation_time: Option<i64>,
    #[serde(default)]
    pub ready_to_use: Option<bool>,
    #[serde(default)]
    pub restore_size: Option<i64>,
}

/// VolumeSnapshotClasses have no spec (driver and parameters sit at the
/// top), so they are read untyped.
pub fn class_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("snapshot.storage.k8s.io", "v1", "VolumeSnapshotClass"),
        "volumesnapshotclasses",
    )
}

/// A class's driver and parameters.
pub fn class_driver_and_parameters(class: &DynamicObject) -> (String, BTreeMap<String, String>) {
    let driver = class
        .data
        .get("driver")
        .and_then(|d| d.as_str())
        .unwrap_or_default()
        .to_string();
    let parameters = class
        .data
        .get("parameters")
        .and_then(|p| p.as_object())
        .map(|p| {
            p.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default();
    (driver, parameters)
}

/// The parameters CreateSnapshot gets: the class's, without the
/// snapshotter's own keys. A `csi.storage.k8s.io/` key that is not one of
/// those is a mistake in the class, refused by name.
pub fn create_parameters(
    class: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for (k, v) in class {
        if k.starts_with(CSI_PARAMETER_PREFIX) {
            if !KNOWN_CSI_PARAMETERS.contains(&k.as_str()) {
                return Err(format!(
                    "the VolumeSnapshotClass has the unknown parameter {k:?} (the {CSI_PARAMETER_PREFIX} keys are {})",
                    KNOWN_CSI_PARAMETERS.join(", ")
                ));
            }
            continue;
        }
        out.insert(k.clone(), v.clone());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshotter_keys_stay_out_of_create_parameters() {
        let class: BTreeMap<String, String> = [
            ("type", "backup"),
            ("target", "s3://b/p"),
            ("csi.storage.k8s.io/snapshotter-secret-name", "s3"),
            (
                "csi.storage.k8s.io/snapshotter-secret-namespace",
                "strata-system",
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let p = create_parameters(&class).unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(p["type"], "backup");
        let mut bad = class.clone();
        bad.insert(
            "csi.storage.k8s.io/snapshotter-secret-nmae".into(),
            "x".into(),
        );
        let e = create_parameters(&bad).unwrap_err();
        assert!(e.contains("snapshotter-secret-nmae"), "{e}");
    }

    #[test]
    fn a_content_reads_as_the_snapshot_controller_writes_it() {
        let c: VolumeSnapshotContent = serde_json::from_value(serde_json::json!({
            "apiVersion": "snapshot.storage.k8s.io/v1",
            "kind": "VolumeSnapshotContent",
            "metadata": {"name": "snapcontent-1", "finalizers": [CONTENT_FINALIZER]},
            "spec": {
                "driver": "csi.strata.io",
                "deletionPolicy": "Delete",
                "source": {"volumeHandle": "v-1"},
                "volumeSnapshotClassName": "strata",
                "volumeSnapshotRef": {"name": "s", "namespace": "default", "uid": "u-1",
                                      "kind": "VolumeSnapshot"},
                "sourceVolumeMode": "Block"
            },
            "status": {"snapshotHandle": "h", "readyToUse": true, "creationTime": 1700000000000000000i64,
                       "restoreSize": 1048576, "error": null}
        }))
        .unwrap();
        assert_eq!(c.spec.source.volume_handle.as_deref(), Some("v-1"));
        assert_eq!(c.spec.volume_snapshot_ref.uid.as_deref(), Some("u-1"));
        let s = c.status.unwrap();
        assert_eq!(s.ready_to_use, Some(true));
        assert_eq!(s.restore_size, Some(1 << 20));
    }
}
