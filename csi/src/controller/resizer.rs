//! The built-in resizer: what the kubernetes-csi `csi-resizer` sidecar did
//! for strata, done in the CSI controller process itself (one Go process
//! and about 56 MiB fewer on the node, README "Footprint").
//!
//! It watches PersistentVolumeClaims in every namespace. A bound claim of
//! a strata PV whose request is larger than its capacity is expanded, with
//! the status updates the sidecar makes (kubernetes-csi external-resizer
//! v2, RecoverVolumeExpansionFailure on, as it is since Kubernetes 1.32):
//!
//! 1. the claim's status: condition `Resizing`, `allocatedResources` the
//!    new size, `allocatedResourceStatuses.storage:
//!    ControllerResizeInProgress`; event `Resizing`;
//! 2. ControllerExpandVolume (in process: [`super::volumes::expand`]);
//! 3. the PV's `spec.capacity` the new size;
//! 4. a filesystem volume: condition `FileSystemResizePending`, status
//!    `NodeResizePending`, event `FileSystemResizeRequired` (the kubelet
//!    then calls NodeExpandVolume and sets the claim's capacity); a block
//!    volume: `status.capacity` the new size, the resize conditions and
//!    status cleared, event `VolumeResizeSuccessful`.
//!
//! A refused expansion (a size strata cannot serve) is recorded as
//! `ControllerResizeInfeasible` with a `ControllerResizeError` condition
//! and tried again every 5 minutes, or at once when the user changes the
//! request; anything else is retried with backoff.

use std::time::Duration;

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams};
use kube::ResourceExt;
use serde_json::json;
use strata_proto::csi::volume_capability::access_mode::Mode as AccessMode;
use strata_proto::csi::volume_capability::{AccessMode as CsiAccessMode, AccessType};
use strata_proto::csi::{volume_capability, CapacityRange, ControllerExpandVolumeRequest};

use super::watch::{self, Next};
use crate::cluster::Cluster;
use crate::error::CsiError;
use crate::kube_api::events::{self, Kind};
use crate::quantity;

/// PVC condition and status names (core/v1).
const RESIZING: &str = "Resizing";
const FS_RESIZE_PENDING: &str = "FileSystemResizePending";
const CONTROLLER_RESIZE_ERROR: &str = "ControllerResizeError";
const RESIZE_CONDITIONS: [&str; 4] = [
    RESIZING,
    FS_RESIZE_PENDING,
    CONTROLLER_RESIZE_ERROR,
    "NodeResizeError",
];
const CONTROLLER_IN_PROGRESS: &str = "ControllerResizeInProgress";
const CONTROLLER_INFEASIBLE: &str = "ControllerResizeInfeasible";
const NODE_PENDING: &str = "NodeResizePending";
const NODE_IN_PROGRESS: &str = "NodeResizeInProgress";
/// An infeasible size is tried again this often (or when the claim changes).
const INFEASIBLE_RETRY: Duration = Duration::from_secs(300);

/// Why a claim could not be expanded this time.
#[derive(Debug, thiserror::Error)]
pub enum ResizeError {
    #[error("{what}: {source}")]
    Kube {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("expanding {pv}: {source}")]
    Expand {
        pv: String,
        #[source]
        source: CsiError,
    },
}

/// Runs until the process ends.
pub async fn run(cluster: Cluster) {
    let client = cluster.client.clone();
    watch::run(watch::Watched {
        what: "resizer",
        api_for: move |ns: Option<&str>| match ns {
            Some(ns) => Api::<PersistentVolumeClaim>::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        },
        // A new request is handled at once, even during a backoff.
        fingerprint: |pvc: &PersistentVolumeClaim| {
            pvc.spec
                .as_ref()
                .and_then(|s| s.resources.as_ref())
                .and_then(|r| r.requests.as_ref())
                .and_then(|r| r.get("storage"))
                .map(|q| q.0.clone())
                .unwrap_or_default()
        },
        handle: |pvc| {
            let cluster = cluster.clone();
            async move { handle(&cluster, pvc).await }
        },
    })
    .await
}

/// What a claim needs, from its own fields alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wanted {
    Nothing,
    /// Expand the PV named to this many bytes.
    Expand {
        pv: String,
        bytes: u64,
    },
}

/// Reads a claim: bound, with a request above its capacity, and not
/// waiting for the kubelet's node step.
pub fn wanted(pvc: &PersistentVolumeClaim) -> Wanted {
    let (Some(spec), Some(status)) = (&pvc.spec, &pvc.status) else {
        return Wanted::Nothing;
    };
    let Some(pv) = spec.volume_name.clone().filter(|v| !v.is_empty()) else {
        return Wanted::Nothing;
    };
    if status.phase.as_deref() != Some("Bound") {
        return Wanted::Nothing;
    }
    let storage = |m: Option<&std::collections::BTreeMap<String, _>>| {
        m.and_then(|m| m.get("storage")).and_then(
            |q: &k8s_openapi::apimachinery::pkg::api::resource::Quantity| {
                quantity::bytes_of(&q.0).ok()
            },
        )
    };
    let Some(requested) = storage(spec.resources.as_ref().and_then(|r| r.requests.as_ref())) else {
        return Wanted::Nothing;
    };
    let capacity = storage(status.capacity.as_ref()).unwrap_or(0);
    if requested <= capacity {
        return Wanted::Nothing;
    }
    let node_step = status
        .allocated_resource_statuses
        .as_ref()
        .and_then(|s| s.get("storage"))
        .is_some_and(|s| s == NODE_PENDING || s == NODE_IN_PROGRESS);
    let allocated = storage(status.allocated_resources.as_ref());
    if node_step && allocated.is_some_and(|a| a >= requested) {
        return Wanted::Nothing;
    }
    Wanted::Expand {
        pv,
        bytes: requested,
    }
}

async fn handle(cluster: &Cluster, pvc: PersistentVolumeClaim) -> Result<Next, ResizeError> {
    if wanted(&pvc) == Wanted::Nothing {
        return Ok(Next::Done);
    }
    let client = &cluster.client;
    let kube = |what: String| move |source| ResizeError::Kube { what, source };
    // An event may carry an older version (the status written a moment
    // ago comes back as an event later): decide on the claim as it is.
    let namespace = pvc.namespace().unwrap_or_default();
    let name = pvc.name_any();
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &namespace);
    let Some(pvc) = claims
        .get_opt(&name)
        .await
        .map_err(kube(format!("reading {namespace}/{name}")))?
    else {
        return Ok(Next::Done);
    };
    let Wanted::Expand { pv: pv_name, bytes } = wanted(&pvc) else {
        return Ok(Next::Done);
    };
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    let Some(pv) = pvs
        .get_opt(&pv_name)
        .await
        .map_err(kube(format!("reading PV {pv_name}")))?
    else {
        return Ok(Next::Done);
    };
    let Some(pv_spec) = &pv.spec else {
        return Ok(Next::Done);
    };
    let Some(csi) = pv_spec
        .csi
        .as_ref()
        .filter(|c| c.driver == crate::DRIVER_NAME)
    else {
        return Ok(Next::Done);
    };
    // The PV must be this claim's.
    if pv_spec.claim_ref.as_ref().and_then(|r| r.uid.as_deref()) != pvc.uid().as_deref() {
        return Ok(Next::Done);
    }
    let size = quantity::of_bytes(bytes);
    let kept = kept_conditions(&pvc);

    // 1. In progress (with the version read: a claim changed meanwhile is
    //    read again rather than overwritten).
    let mut conditions = kept.clone();
    conditions.push(condition(RESIZING, ""));
    let patch = json!({
        "metadata": {"resourceVersion": pvc.resource_version()},
        "status": {
            "conditions": conditions,
            "allocatedResources": {"storage": size},
            "allocatedResourceStatuses": {"storage": CONTROLLER_IN_PROGRESS},
        }
    });
    claims
        .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(kube(format!("marking {namespace}/{name} resizing")))?;
    events::record(
        client,
        &pvc,
        Kind::Normal,
        "Resizing",
        &format!("strata is resizing volume {pv_name} to {size}"),
    )
    .await;

    // 2. The volume.
    let request = ControllerExpandVolumeRequest {
        volume_id: csi.volume_handle.clone(),
        capacity_range: Some(CapacityRange {
            required_bytes: bytes as i64,
            limit_bytes: 0,
        }),
        secrets: Default::default(),
        volume_capability: Some(capability_of(&pv)),
    };
    let reply = match super::volumes::expand(cluster, request).await {
        Ok(reply) => reply,
        Err(e) => return failed(cluster, &pvc, &kept, &pv_name, e).await,
    };
    let new_size = quantity::of_bytes(reply.capacity_bytes.max(0) as u64);

    // 3. The PV.
    let patch = json!({"spec": {"capacity": {"storage": new_size}}});
    pvs.patch(&pv_name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(kube(format!("recording the size of PV {pv_name}")))?;

    // 4. The claim.
    let (status, reason, message) = if reply.node_expansion_required {
        let mut conditions = kept.clone();
        conditions.push(condition(
            FS_RESIZE_PENDING,
            "Waiting for user to (re-)start a pod to finish file system resize of volume on node.",
        ));
        (
            json!({
                "conditions": conditions,
                "allocatedResourceStatuses": {"storage": NODE_PENDING},
            }),
            "FileSystemResizeRequired",
            format!("volume {pv_name} is {new_size}; the node grows its filesystem next"),
        )
    } else {
        (
            json!({
                "conditions": kept,
                "capacity": {"storage": new_size},
                "allocatedResourceStatuses": {"storage": null},
            }),
            "VolumeResizeSuccessful",
            format!("volume {pv_name} is {new_size}"),
        )
    };
    claims
        .patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Merge(&json!({ "status": status })),
        )
        .await
        .map_err(kube(format!("recording the size of {namespace}/{name}")))?;
    events::record(client, &pvc, Kind::Normal, reason, &message).await;
    tracing::info!(claim = %format!("{namespace}/{name}"), pv = %pv_name, size = %new_size, "resized");
    Ok(Next::Done)
}

/// Records a failed expansion on the claim. Refusals (a size strata
/// cannot serve) wait [`INFEASIBLE_RETRY`] or for the user; anything else
/// is returned for the backoff.
async fn failed(
    cluster: &Cluster,
    pvc: &PersistentVolumeClaim,
    kept: &[serde_json::Value],
    pv_name: &str,
    e: CsiError,
) -> Result<Next, ResizeError> {
    let infeasible = matches!(
        e,
        CsiError::Invalid(_)
            | CsiError::Unsupported(_)
            | CsiError::OutOfRange(_)
            | CsiError::NotFound(_)
    );
    let transient = e.is_transient();
    let message = format!("failed to expand pvc with {e}");
    if !transient {
        let mut conditions = kept.to_vec();
        conditions.push(condition(CONTROLLER_RESIZE_ERROR, &message));
        let mut status = json!({ "conditions": conditions });
        if infeasible {
            status["allocatedResourceStatuses"] = json!({"storage": CONTROLLER_INFEASIBLE});
        }
        let claims: Api<PersistentVolumeClaim> =
            Api::namespaced(cluster.client.clone(), &pvc.namespace().unwrap_or_default());
        if let Err(err) = claims
            .patch_status(
                &pvc.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&json!({ "status": status })),
            )
            .await
        {
            tracing::debug!(error = %err, "cannot record the resize error");
        }
    }
    events::record(
        &cluster.client,
        pvc,
        Kind::Warning,
        "VolumeResizeFailed",
        &message,
    )
    .await;
    if infeasible {
        tracing::warn!(pv = %pv_name, error = %e, "resize refused");
        return Ok(Next::After(INFEASIBLE_RETRY));
    }
    Err(ResizeError::Expand {
        pv: pv_name.to_string(),
        source: e,
    })
}

/// The claim's conditions that are not about resizing (kept as they are).
fn kept_conditions(pvc: &PersistentVolumeClaim) -> Vec<serde_json::Value> {
    pvc.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .map(|cs| {
            cs.iter()
                .filter(|c| !RESIZE_CONDITIONS.contains(&c.type_.as_str()))
                .filter_map(|c| serde_json::to_value(c).ok())
                .collect()
        })
        .unwrap_or_default()
}

fn condition(type_: &str, message: &str) -> serde_json::Value {
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    json!({
        "type": type_,
        "status": "True",
        "lastTransitionTime": now,
        "message": message,
    })
}

/// The capability ControllerExpandVolume gets: block or mount (with the
/// PV's filesystem), and the access mode, from the PV.
pub fn capability_of(pv: &PersistentVolume) -> strata_proto::csi::VolumeCapability {
    let spec = pv.spec.as_ref();
    let block = spec.and_then(|s| s.volume_mode.as_deref()) == Some("Block");
    let access_type = if block {
        AccessType::Block(volume_capability::BlockVolume {})
    } else {
        AccessType::Mount(volume_capability::MountVolume {
            fs_type: spec
                .and_then(|s| s.csi.as_ref())
                .and_then(|c| c.fs_type.clone())
                .unwrap_or_default(),
            mount_flags: spec
                .and_then(|s| s.mount_options.clone())
                .unwrap_or_default(),
            volume_mount_group: String::new(),
        })
    };
    let modes = spec
        .and_then(|s| s.access_modes.clone())
        .unwrap_or_default();
    let mode = if modes.iter().any(|m| m == "ReadWriteMany") {
        AccessMode::MultiNodeMultiWriter
    } else if modes.iter().any(|m| m == "ReadOnlyMany") {
        AccessMode::MultiNodeReaderOnly
    } else if modes.iter().any(|m| m == "ReadWriteOncePod") {
        AccessMode::SingleNodeSingleWriter
    } else {
        // ReadWriteOnce: strata offers SINGLE_NODE_MULTI_WRITER.
        AccessMode::SingleNodeMultiWriter
    };
    strata_proto::csi::VolumeCapability {
        access_mode: Some(CsiAccessMode { mode: mode as i32 }),
        access_type: Some(access_type),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(requested: &str, capacity: &str, status: Option<&str>) -> PersistentVolumeClaim {
        let mut status_json = json!({"phase": "Bound", "capacity": {"storage": capacity}});
        if let Some(s) = status {
            status_json["allocatedResourceStatuses"] = json!({"storage": s});
            status_json["allocatedResources"] = json!({"storage": requested});
        }
        serde_json::from_value(json!({
            "metadata": {"name": "c", "namespace": "default", "uid": "u"},
            "spec": {"volumeName": "pv-1", "resources": {"requests": {"storage": requested}}},
            "status": status_json,
        }))
        .unwrap()
    }

    #[test]
    fn a_larger_request_is_an_expansion() {
        assert_eq!(
            wanted(&claim("128Mi", "64Mi", None)),
            Wanted::Expand {
                pv: "pv-1".into(),
                bytes: 128 << 20
            }
        );
        assert_eq!(wanted(&claim("64Mi", "64Mi", None)), Wanted::Nothing);
        assert_eq!(wanted(&claim("1G", "1Gi", None)), Wanted::Nothing);
        // A controller step that did not finish is taken up again.
        assert!(matches!(
            wanted(&claim("128Mi", "64Mi", Some(CONTROLLER_IN_PROGRESS))),
            Wanted::Expand { .. }
        ));
    }

    #[test]
    fn the_node_step_is_the_kubelets() {
        assert_eq!(
            wanted(&claim("128Mi", "64Mi", Some(NODE_PENDING))),
            Wanted::Nothing
        );
        assert_eq!(
            wanted(&claim("128Mi", "64Mi", Some(NODE_IN_PROGRESS))),
            Wanted::Nothing
        );
    }

    #[test]
    fn unbound_or_unreadable_claims_are_left_alone() {
        let mut c = claim("128Mi", "64Mi", None);
        c.status.as_mut().unwrap().phase = Some("Pending".into());
        assert_eq!(wanted(&c), Wanted::Nothing);
        assert_eq!(wanted(&claim("lots", "64Mi", None)), Wanted::Nothing);
    }

    #[test]
    fn capabilities_follow_the_pv() {
        let pv: PersistentVolume = serde_json::from_value(json!({
            "metadata": {"name": "pv-1"},
            "spec": {"volumeMode": "Block", "accessModes": ["ReadWriteOnce"],
                     "csi": {"driver": crate::DRIVER_NAME, "volumeHandle": "v"}}
        }))
        .unwrap();
        let c = capability_of(&pv);
        assert!(matches!(c.access_type, Some(AccessType::Block(_))));
        assert_eq!(
            c.access_mode.unwrap().mode,
            AccessMode::SingleNodeMultiWriter as i32
        );
        let pv: PersistentVolume = serde_json::from_value(json!({
            "metadata": {"name": "pv-2"},
            "spec": {"accessModes": ["ReadWriteOncePod"], "mountOptions": ["noatime"],
                     "csi": {"driver": crate::DRIVER_NAME, "volumeHandle": "v", "fsType": "xfs"}}
        }))
        .unwrap();
        let c = capability_of(&pv);
        match c.access_type {
            Some(AccessType::Mount(m)) => {
                assert_eq!(m.fs_type, "xfs");
                assert_eq!(m.mount_flags, vec!["noatime".to_string()]);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            c.access_mode.unwrap().mode,
            AccessMode::SingleNodeSingleWriter as i32
        );
    }
}
