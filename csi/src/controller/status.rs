//! Keeps each StrataVolume's status current: every few seconds the CSI
//! controller asks each volume's controller for its status and writes
//! phase, healthy/total replicas, rebuild progress, epoch and last backup
//! into the resource (only when something changed), so `kubectl get
//! stratavolumes` reads like `strata volume status`. The same loop runs
//! [`super::repair`], which replaces replicas lost with their nodes.

use std::time::Duration;

use kube::api::{Patch, PatchParams};

use crate::cluster::Cluster;
use crate::crd::{phase, StrataVolume, StrataVolumeStatus};

/// How often the statuses are refreshed.
pub const INTERVAL: Duration = Duration::from_secs(10);

/// Runs until the process ends; replaces lost replicas after
/// `replace_after` (None: never).
pub async fn keep_current(cluster: Cluster, replace_after: Option<Duration>) {
    loop {
        if let Err(e) = refresh_all(&cluster).await {
            tracing::warn!(error = %e, "refreshing StrataVolume statuses");
        }
        if let Err(e) = super::repair::repair_all(&cluster, replace_after).await {
            tracing::warn!(error = %e, "repairing volumes");
        }
        tokio::time::sleep(INTERVAL).await;
    }
}

/// One pass over every volume.
pub async fn refresh_all(cluster: &Cluster) -> Result<(), crate::CsiError> {
    for sv in cluster.list_volumes().await? {
        refresh(cluster, &sv).await;
    }
    Ok(())
}

async fn refresh(cluster: &Cluster, sv: &StrataVolume) {
    let Some(id) = sv.metadata.name.clone() else {
        return;
    };
    let old = sv.status.clone().unwrap_or_default();
    if old.phase == phase::CREATING || old.phase == phase::DELETING {
        return;
    }
    let node = cluster.controller_node(&id).await.unwrap_or_default();
    let new = match cluster.quick_status(&id).await {
        Some(s) => super::condition::to_resource_status(&s, &node),
        None => StrataVolumeStatus {
            phase: phase::UNAVAILABLE.into(),
            message: "the volume's controller does not answer".into(),
            controller_node: node,
            ..old.clone()
        },
    };
    if new == old {
        return;
    }
    let patch = serde_json::json!({ "status": new });
    if let Err(e) = cluster
        .volumes()
        .patch_status(&id, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        tracing::debug!(volume = %id, error = %e, "status patch failed");
    }
}
