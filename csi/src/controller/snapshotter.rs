//! The built-in snapshotter: what the kubernetes-csi `csi-snapshotter`
//! sidecar did for strata, done in the CSI controller process itself (one
//! Go process and about 52 MiB fewer on the node, README "Footprint"). The
//! cluster's snapshot-controller stays: it turns VolumeSnapshots into
//! VolumeSnapshotContents and back, and this loop acts on the contents of
//! driver `csi.strata.io`, as the sidecar (external-snapshotter v8) does:
//!
//! - **A dynamic content** (`spec.source.volumeHandle`) not yet ready: the
//!   annotation `volumesnapshot-being-created` goes on, CreateSnapshot
//!   runs in process ([`super::snapshots::create`]) with the name
//!   `snapshot-<VolumeSnapshot UID>`, the class's parameters (without its
//!   `csi.storage.k8s.io/` keys) and the Secret the snapshot-controller
//!   recorded, and the content's status gets the handle, creation time
//!   (Unix ns), size and readiness; the annotation comes off. A snapshot
//!   not yet ready (a backup still uploading) is asked again every second,
//!   by the same name, which finds the running one.
//! - **A pre-provisioned content** (`spec.source.snapshotHandle`): its
//!   status is read from the snapshot (GetSnapshot).
//! - **Deletion**: once the content is being deleted and the
//!   snapshot-controller has marked it `volumesnapshot-being-deleted` (or
//!   it is a pre-provisioned content bound to nothing), and no create is
//!   in flight: with policy `Delete` the snapshot is deleted (a backup
//!   with the recorded Secret), the status's handle cleared, then the
//!   finalizer `volumesnapshotcontent-bound-protection` removed. With
//!   `Retain` only the finalizer goes.
//!
//! Failures land in the content's `status.error` and a
//! `SnapshotCreationFailed` or `SnapshotDeleteError` event, and are tried
//! again with backoff.

use std::collections::HashMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::ResourceExt;
use serde_json::json;
use strata_proto::csi::{CreateSnapshotRequest, Snapshot};

use super::watch::{self, Next};
use crate::cluster::Cluster;
use crate::error::CsiError;
use crate::kube_api::events::{self, Kind};
use crate::kube_api::snapshot::{self as api, VolumeSnapshotContent};

/// How soon a snapshot not yet ready is asked again.
const NOT_READY_POLL: Duration = Duration::from_secs(1);
/// The name prefix of dynamic snapshots (the sidecar's default).
const NAME_PREFIX: &str = "snapshot";

#[derive(Debug, thiserror::Error)]
pub enum SnapshotterError {
    #[error("{what}: {source}")]
    Kube {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("{what}: {source}")]
    Csi {
        what: String,
        #[source]
        source: CsiError,
    },
    #[error("content {0}: {1}")]
    Content(String, String),
}

/// Runs until the process ends.
pub async fn run(cluster: Cluster) {
    let client = cluster.client.clone();
    watch::run(watch::Watched {
        what: "snapshotter",
        api_for: move |_: Option<&str>| Api::<VolumeSnapshotContent>::all(client.clone()),
        // Deletion is handled at once, even during a backoff.
        fingerprint: |c: &VolumeSnapshotContent| {
            format!(
                "{}{}",
                c.metadata.deletion_timestamp.is_some(),
                c.annotations().contains_key(api::BEING_DELETED)
            )
        },
        handle: |content| {
            let cluster = cluster.clone();
            async move { handle(&cluster, content).await }
        },
    })
    .await
}

/// What a content needs, from its own fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wanted {
    Nothing,
    Create,
    /// Read a pre-provisioned snapshot's state.
    Check,
    /// Delete (policy `Delete`) or only release (`Retain`), then remove
    /// the finalizer.
    Delete,
    /// Ready: only the `being-created` annotation is left to remove.
    Tidy,
}

pub fn wanted(c: &VolumeSnapshotContent) -> Wanted {
    if c.spec.driver != crate::DRIVER_NAME {
        return Wanted::Nothing;
    }
    let annotations = c.annotations();
    let pre_provisioned = c.spec.source.snapshot_handle.is_some();
    if c.metadata.deletion_timestamp.is_some() {
        let unbound = c
            .spec
            .volume_snapshot_ref
            .uid
            .as_deref()
            .unwrap_or("")
            .is_empty();
        let delete = if pre_provisioned && unbound {
            true
        } else if annotations.contains_key(api::BEING_CREATED) {
            false
        } else {
            annotations.contains_key(api::BEING_DELETED)
        };
        return if delete && c.finalizers().iter().any(|f| f == api::CONTENT_FINALIZER) {
            Wanted::Delete
        } else {
            Wanted::Nothing
        };
    }
    let ready = c.status.as_ref().and_then(|s| s.ready_to_use) == Some(true);
    if ready {
        return if annotations.contains_key(api::BEING_CREATED) {
            Wanted::Tidy
        } else {
            Wanted::Nothing
        };
    }
    if c.spec.source.volume_handle.is_some() {
        if annotations.contains_key(api::GROUP_HANDLE) {
            return Wanted::Nothing;
        }
        return Wanted::Create;
    }
    if pre_provisioned {
        return Wanted::Check;
    }
    Wanted::Nothing
}

async fn handle(cluster: &Cluster, c: VolumeSnapshotContent) -> Result<Next, SnapshotterError> {
    if wanted(&c) == Wanted::Nothing {
        return Ok(Next::Done);
    }
    let contents: Api<VolumeSnapshotContent> = Api::all(cluster.client.clone());
    let name = c.name_any();
    // Decide on the content as it is now, not as an older event shows it.
    let Some(c) = contents
        .get_opt(&name)
        .await
        .map_err(kube(format!("reading content {name}")))?
    else {
        return Ok(Next::Done);
    };
    match wanted(&c) {
        Wanted::Nothing => Ok(Next::Done),
        Wanted::Tidy => {
            remove_being_created(&contents, &name).await?;
            Ok(Next::Done)
        }
        Wanted::Create => create(cluster, &contents, &c).await,
        Wanted::Check => check(cluster, &contents, &c).await,
        Wanted::Delete => delete(cluster, &contents, &c).await,
    }
}

fn kube(what: String) -> impl FnOnce(kube::Error) -> SnapshotterError {
    move |source| SnapshotterError::Kube { what, source }
}

async fn create(
    cluster: &Cluster,
    contents: &Api<VolumeSnapshotContent>,
    c: &VolumeSnapshotContent,
) -> Result<Next, SnapshotterError> {
    let name = c.name_any();
    let content_error = |m: String| SnapshotterError::Content(name.clone(), m);
    let uid = c
        .spec
        .volume_snapshot_ref
        .uid
        .clone()
        .filter(|u| !u.is_empty())
        .ok_or_else(|| content_error("its volumeSnapshotRef has no uid".into()))?;
    let class_name = c
        .spec
        .volume_snapshot_class_name
        .clone()
        .ok_or_else(|| content_error("it names no VolumeSnapshotClass".into()))?;
    let classes: Api<DynamicObject> = Api::all_with(cluster.client.clone(), &api::class_resource());
    let class = classes
        .get(&class_name)
        .await
        .map_err(kube(format!("reading VolumeSnapshotClass {class_name}")))?;
    let (driver, class_parameters) = api::class_driver_and_parameters(&class);
    if driver != crate::DRIVER_NAME {
        return Ok(Next::Done);
    }
    let parameters = match api::create_parameters(&class_parameters) {
        Ok(p) => p,
        Err(m) => {
            let e = CsiError::Invalid(m);
            return create_failed(cluster, contents, c, e).await;
        }
    };
    let secrets = secrets_of(cluster, c).await?;
    if !c.annotations().contains_key(api::BEING_CREATED) {
        let patch = json!({"metadata": {"annotations": {api::BEING_CREATED: "yes"}}});
        contents
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(kube(format!("marking content {name} being created")))?;
    }
    let request = CreateSnapshotRequest {
        source_volume_id: c.spec.source.volume_handle.clone().unwrap_or_default(),
        name: format!("{NAME_PREFIX}-{uid}"),
        secrets,
        parameters: parameters.into_iter().collect(),
    };
    match super::snapshots::create(cluster, request).await {
        Ok(snapshot) => {
            write_status(contents, &name, &snapshot, &snapshot.snapshot_id).await?;
            if snapshot.ready_to_use {
                remove_being_created(contents, &name).await?;
                tracing::info!(content = %name, handle = %snapshot.snapshot_id, "snapshot ready");
                Ok(Next::Done)
            } else {
                tracing::info!(content = %name, "snapshot not ready yet; asking again in 1 s");
                Ok(Next::After(NOT_READY_POLL))
            }
        }
        Err(e) => create_failed(cluster, contents, c, e).await,
    }
}

/// Records a failed CreateSnapshot on the content. The `being-created`
/// annotation stays only when the call may still be cutting a snapshot.
async fn create_failed(
    cluster: &Cluster,
    contents: &Api<VolumeSnapshotContent>,
    c: &VolumeSnapshotContent,
    e: CsiError,
) -> Result<Next, SnapshotterError> {
    let name = c.name_any();
    if !e.is_transient() {
        remove_being_created(contents, &name).await?;
    }
    let message = format!("failed to take snapshot of the volume: {e}");
    let patch = json!({"status": {
        "readyToUse": false,
        "error": {"time": k8s_openapi::jiff::Timestamp::now().to_string(), "message": message},
    }});
    if let Err(err) = contents
        .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        tracing::debug!(content = %name, error = %err, "cannot record the error");
    }
    events::record(
        &cluster.client,
        c,
        Kind::Warning,
        "SnapshotCreationFailed",
        &message,
    )
    .await;
    Err(SnapshotterError::Csi {
        what: format!("cutting the snapshot of content {name}"),
        source: e,
    })
}

async fn check(
    cluster: &Cluster,
    contents: &Api<VolumeSnapshotContent>,
    c: &VolumeSnapshotContent,
) -> Result<Next, SnapshotterError> {
    let name = c.name_any();
    let handle = c.spec.source.snapshot_handle.clone().unwrap_or_default();
    let snapshot = super::snapshots::get(cluster, &handle)
        .await
        .map_err(|source| SnapshotterError::Csi {
            what: format!("reading snapshot {handle} of content {name}"),
            source,
        })?;
    write_status(contents, &name, &snapshot, &handle).await?;
    Ok(if snapshot.ready_to_use {
        Next::Done
    } else {
        Next::After(NOT_READY_POLL)
    })
}

async fn delete(
    cluster: &Cluster,
    contents: &Api<VolumeSnapshotContent>,
    c: &VolumeSnapshotContent,
) -> Result<Next, SnapshotterError> {
    let name = c.name_any();
    let handle = c
        .status
        .as_ref()
        .and_then(|s| s.snapshot_handle.clone())
        .or_else(|| c.spec.source.snapshot_handle.clone());
    if c.spec.deletion_policy == "Delete" {
        if let Some(handle) = handle {
            let secrets = secrets_of(cluster, c).await?;
            if let Err(e) = super::snapshots::delete(cluster, &handle, &secrets).await {
                let message = format!("failed to delete snapshot {handle}: {e}");
                events::record(
                    &cluster.client,
                    c,
                    Kind::Warning,
                    "SnapshotDeleteError",
                    &message,
                )
                .await;
                return Err(SnapshotterError::Csi {
                    what: format!("deleting the snapshot of content {name}"),
                    source: e,
                });
            }
            let patch = json!({"status": {
                "snapshotHandle": null, "readyToUse": null, "creationTime": null, "restoreSize": null,
            }});
            contents
                .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map_err(kube(format!("clearing the status of content {name}")))?;
            tracing::info!(content = %name, %handle, "snapshot deleted");
        }
    }
    let finalizers: Vec<String> = c
        .finalizers()
        .iter()
        .filter(|f| *f != api::CONTENT_FINALIZER)
        .cloned()
        .collect();
    let patch = json!({"metadata": {
        "resourceVersion": c.resource_version(),
        "finalizers": finalizers,
    }});
    contents
        .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(kube(format!("removing the finalizer of content {name}")))?;
    Ok(Next::Done)
}

async fn write_status(
    contents: &Api<VolumeSnapshotContent>,
    name: &str,
    snapshot: &Snapshot,
    handle: &str,
) -> Result<(), SnapshotterError> {
    let created_ns = snapshot
        .creation_time
        .as_ref()
        .map(|t| {
            t.seconds
                .saturating_mul(1_000_000_000)
                .saturating_add(t.nanos as i64)
        })
        .filter(|ns| *ns > 0)
        .unwrap_or_else(|| k8s_openapi::jiff::Timestamp::now().as_nanosecond() as i64);
    let mut status = json!({
        "snapshotHandle": handle,
        "creationTime": created_ns,
        "readyToUse": snapshot.ready_to_use,
        "error": null,
    });
    if snapshot.size_bytes > 0 {
        status["restoreSize"] = json!(snapshot.size_bytes);
    }
    contents
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(&json!({ "status": status })),
        )
        .await
        .map_err(kube(format!("writing the status of content {name}")))?;
    Ok(())
}

async fn remove_being_created(
    contents: &Api<VolumeSnapshotContent>,
    name: &str,
) -> Result<(), SnapshotterError> {
    let patch = json!({"metadata": {"annotations": {api::BEING_CREATED: null}}});
    contents
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(kube(format!("unmarking content {name}")))?;
    Ok(())
}

/// The Secret the snapshot-controller recorded on the content (the
/// class's `csi.storage.k8s.io/snapshotter-secret-*`), if any.
async fn secrets_of(
    cluster: &Cluster,
    c: &VolumeSnapshotContent,
) -> Result<HashMap<String, String>, SnapshotterError> {
    let a = c.annotations();
    let (Some(name), Some(namespace)) = (a.get(api::SECRET_NAME), a.get(api::SECRET_NAMESPACE))
    else {
        return Ok(HashMap::new());
    };
    if name.is_empty() || namespace.is_empty() {
        return Ok(HashMap::new());
    }
    let secrets: Api<Secret> = Api::namespaced(cluster.client.clone(), namespace);
    let secret = secrets
        .get(name)
        .await
        .map_err(kube(format!("reading Secret {namespace}/{name}")))?;
    let mut out = HashMap::new();
    for (k, v) in secret.data.unwrap_or_default() {
        if let Ok(v) = String::from_utf8(v.0) {
            out.insert(k, v);
        }
    }
    for (k, v) in secret.string_data.unwrap_or_default() {
        out.insert(k, v);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn content(extra: serde_json::Value) -> VolumeSnapshotContent {
        let mut v = json!({
            "apiVersion": "snapshot.storage.k8s.io/v1",
            "kind": "VolumeSnapshotContent",
            "metadata": {"name": "snapcontent-1", "finalizers": [api::CONTENT_FINALIZER]},
            "spec": {
                "driver": crate::DRIVER_NAME,
                "deletionPolicy": "Delete",
                "source": {"volumeHandle": "v-1"},
                "volumeSnapshotClassName": "strata",
                "volumeSnapshotRef": {"name": "s", "namespace": "default", "uid": "u-1"}
            }
        });
        merge(&mut v, extra);
        serde_json::from_value(v).unwrap()
    }

    fn merge(a: &mut serde_json::Value, b: serde_json::Value) {
        match (a, b) {
            (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
                for (k, v) in b {
                    merge(a.entry(k).or_insert(serde_json::Value::Null), v);
                }
            }
            (a, b) => *a = b,
        }
    }

    #[test]
    fn a_new_content_is_cut_and_a_ready_one_left_alone() {
        assert_eq!(wanted(&content(json!({}))), Wanted::Create);
        assert_eq!(
            wanted(&content(
                json!({"status": {"readyToUse": false, "snapshotHandle": "h"}})
            )),
            Wanted::Create
        );
        assert_eq!(
            wanted(&content(json!({"status": {"readyToUse": true}}))),
            Wanted::Nothing
        );
        assert_eq!(
            wanted(&content(json!({"status": {"readyToUse": true},
                "metadata": {"annotations": {api::BEING_CREATED: "yes"}}}))),
            Wanted::Tidy
        );
        assert_eq!(
            wanted(&content(json!({"spec": {"driver": "other.csi.io"}}))),
            Wanted::Nothing
        );
        assert_eq!(
            wanted(&content(
                json!({"metadata": {"annotations": {api::GROUP_HANDLE: "g"}}})
            )),
            Wanted::Nothing
        );
    }

    #[test]
    fn deletion_waits_for_the_snapshot_controller_and_for_a_create_in_flight() {
        let deleting = json!({"metadata": {"deletionTimestamp": "2026-12-06T00:00:00Z"}});
        assert_eq!(wanted(&content(deleting.clone())), Wanted::Nothing);
        let mut marked = deleting.clone();
        merge(
            &mut marked,
            json!({"metadata": {"annotations": {api::BEING_DELETED: "yes"}}}),
        );
        assert_eq!(wanted(&content(marked.clone())), Wanted::Delete);
        let mut creating = marked.clone();
        merge(
            &mut creating,
            json!({"metadata": {"annotations": {api::BEING_CREATED: "yes"}}}),
        );
        assert_eq!(wanted(&content(creating)), Wanted::Nothing);
        // Finalizer gone: nothing left to do.
        let mut released = marked;
        merge(&mut released, json!({"metadata": {"finalizers": []}}));
        assert_eq!(wanted(&content(released)), Wanted::Nothing);
        // A pre-provisioned content bound to nothing goes without the mark.
        let mut pre = deleting;
        merge(
            &mut pre,
            json!({"spec": {"source": {"volumeHandle": null, "snapshotHandle": "h"},
                            "volumeSnapshotRef": {"uid": ""}}}),
        );
        assert_eq!(wanted(&content(pre)), Wanted::Delete);
    }

    #[test]
    fn a_pre_provisioned_content_is_checked() {
        assert_eq!(
            wanted(&content(
                json!({"spec": {"source": {"volumeHandle": null, "snapshotHandle": "h"}}})
            )),
            Wanted::Check
        );
    }
}
