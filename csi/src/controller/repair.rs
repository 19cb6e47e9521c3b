//! Replaces replicas lost with their nodes, and removes the replicas a
//! replacement left behind.
//!
//! Every pass of the status loop (every 10 s) does, in this order:
//!
//! 1. **Clean up.** A Ready node whose replica server still holds a
//!    replica of a volume whose spec no longer names that node (the node
//!    came back after its replica was replaced, or a replacement was
//!    interrupted before the spec named it) has that replica deleted.
//!    Volumes being created or deleted, and replicas of volumes the CSI
//!    driver does not know, are left alone.
//! 2. **Replace.** For each volume that is not being created or deleted and
//!    whose controller answers: a replica node that is gone (no Node
//!    object), or NotReady for `replace_after`, and whose replica the
//!    controller does not count healthy, is swapped for another node that
//!    placement accepts (Ready, not cordoned, a replica server that
//!    answers, room for the volume, not already holding one of its
//!    replicas). The replica is created there first, then the spec names
//!    the new node. One replacement per volume per pass; a volume with no
//!    such node stays Degraded, and the pass says why in the log.
//! 3. **Reconcile.** The StrataVolume's `replicaNodes` is the truth. The
//!    ConfigMap's list (what a restarted controller pod reads) is made to
//!    match it, then the running controller: AddReplica for an address it
//!    lacks (it rebuilds that replica fully while IO goes on),
//!    RemoveReplica for one the spec no longer names. The pod is not
//!    restarted.
//!
//! Each step is safe to repeat and to interrupt between any two calls.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams};
use strata_proto::controller::{ReplicaAddress, VolumeStatus};

use super::volumes::{create_replica, delete_replica};
use crate::cluster::{replica_client, Cluster};
use crate::crd::{phase, StrataVolume};
use crate::error::{CsiError, CsiResult};
use crate::placement;

/// The controller's word for a replica that is in step with the others.
const HEALTHY: &str = "healthy";

/// One pass over every volume (see the module doc).
pub async fn repair_all(cluster: &Cluster, replace_after: Option<Duration>) -> CsiResult<()> {
    let volumes = cluster.list_volumes().await?;
    let nodes = Api::<Node>::all(cluster.client.clone())
        .list(&ListParams::default())
        .await
        .map_err(|e| CsiError::kube("listing nodes", e))?
        .items;
    remove_left_overs(cluster, &volumes, &nodes).await;
    for sv in &volumes {
        let Some(id) = sv.metadata.name.clone() else {
            continue;
        };
        if settling(sv) {
            continue;
        }
        if let Err(e) = repair(cluster, sv, &id, &nodes, &volumes, replace_after).await {
            tracing::warn!(volume = %id, error = %e, "repairing the volume's replicas");
        }
    }
    Ok(())
}

/// Being created or deleted: CreateVolume and DeleteVolume own it.
fn settling(sv: &StrataVolume) -> bool {
    sv.status
        .as_ref()
        .is_none_or(|s| s.phase == phase::CREATING || s.phase == phase::DELETING)
}

async fn repair(
    cluster: &Cluster,
    sv: &StrataVolume,
    id: &str,
    nodes: &[Node],
    volumes: &[StrataVolume],
    replace_after: Option<Duration>,
) -> CsiResult<()> {
    let Some((mut control, status)) = cluster.quick_controller(id).await else {
        // Nothing to do while no controller serves: it reads the list at
        // start.
        return Ok(());
    };
    let mut replica_nodes = sv.spec.replica_nodes.clone();
    if let Some(after) = replace_after {
        if let Some(new_nodes) =
            replace_one(cluster, sv, id, nodes, volumes, &status, after).await?
        {
            replica_nodes = new_nodes;
        }
    }
    let mut desired = Vec::new();
    for node in &replica_nodes {
        match find(nodes, node).and_then(|n| cluster.replica_addr_of_node(n)) {
            Some(addr) => desired.push(addr),
            // Gone or without an address: replaced first, reconciled later.
            None => return Ok(()),
        }
    }
    let list = crate::objects::replica_list(&desired);
    if cluster.replica_list(id).await?.as_deref() != Some(list.as_str()) {
        cluster.set_replica_list(sv, id, &desired).await?;
        tracing::info!(volume = %id, replicas = %list, "replica list written");
    }
    let live: BTreeSet<SocketAddr> = status
        .replicas
        .iter()
        .filter_map(|r| r.address.parse().ok())
        .collect();
    for addr in desired.iter().filter(|a| !live.contains(a)) {
        control
            .add_replica(ReplicaAddress {
                address: addr.to_string(),
            })
            .await
            .map_err(|s| CsiError::downstream(&format!("adding replica {addr} to {id}"), s))?;
        tracing::info!(volume = %id, replica = %addr, "replica added to the running controller");
    }
    for addr in live.iter().filter(|a| !desired.contains(a)) {
        control
            .remove_replica(ReplicaAddress {
                address: addr.to_string(),
            })
            .await
            .map_err(|s| CsiError::downstream(&format!("removing replica {addr} from {id}"), s))?;
        tracing::info!(volume = %id, replica = %addr, "replica removed from the running controller");
    }
    Ok(())
}

/// Swaps one lost replica node for a new one; the new node list when it
/// did.
async fn replace_one(
    cluster: &Cluster,
    sv: &StrataVolume,
    id: &str,
    nodes: &[Node],
    volumes: &[StrataVolume],
    status: &VolumeStatus,
    after: Duration,
) -> CsiResult<Option<Vec<String>>> {
    let lost = sv.spec.replica_nodes.iter().find(|name| {
        let Some(node) = find(nodes, name) else {
            return true;
        };
        let healthy = cluster.replica_addr_of_node(node).is_some_and(|addr| {
            status
                .replicas
                .iter()
                .any(|r| r.address == addr.to_string() && r.state == HEALTHY)
        });
        !healthy && not_ready_for(node).is_some_and(|d| d >= after)
    });
    let Some(lost) = lost.cloned() else {
        return Ok(None);
    };
    let candidates: Vec<_> = cluster
        .storage_nodes(volumes)
        .await?
        .into_iter()
        .filter(|n| !sv.spec.replica_nodes.contains(&n.name))
        .collect();
    let chosen = match placement::choose(&candidates, 1, sv.spec.size_bytes, &[]) {
        Ok(c) => c[0],
        Err(e) => {
            tracing::warn!(volume = %id, lost = %lost, error = %e,
                "a replica's node is lost and no other node can take its place");
            return Ok(None);
        }
    };
    let addr = chosen.replica_addr.ok_or_else(|| {
        CsiError::Unavailable(format!("node {} has no replica address", chosen.name))
    })?;
    tracing::info!(volume = %id, lost = %lost, new = %chosen.name, "replacing a lost replica");
    create_replica(addr, id, sv.spec.size_bytes).await?;
    let new_nodes: Vec<String> = sv
        .spec
        .replica_nodes
        .iter()
        .map(|n| {
            if *n == lost {
                chosen.name.clone()
            } else {
                n.clone()
            }
        })
        .collect();
    let patch = serde_json::json!({ "spec": { "replicaNodes": new_nodes } });
    cluster
        .volumes()
        .patch(id, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(|e| CsiError::kube(&format!("naming the new replica node of {id}"), e))?;
    Ok(Some(new_nodes))
}

/// Deletes replicas on Ready nodes that their volume's spec no longer
/// names. Errors are logged: one node's trouble does not stop the pass.
async fn remove_left_overs(cluster: &Cluster, volumes: &[StrataVolume], nodes: &[Node]) {
    for node in nodes {
        let name = node.metadata.name.clone().unwrap_or_default();
        if not_ready_for(node).is_some() {
            continue;
        }
        let Some(addr) = cluster.replica_addr_of_node(node) else {
            continue;
        };
        let Ok(mut c) = replica_client(addr).await else {
            continue;
        };
        let Ok(list) = c.list(strata_proto::replica::Empty {}).await else {
            continue;
        };
        for r in list.into_inner().replicas {
            let Some(sv) = volumes
                .iter()
                .find(|v| v.metadata.name.as_deref() == Some(r.volume.as_str()))
            else {
                continue;
            };
            if settling(sv) || sv.spec.replica_nodes.contains(&name) {
                continue;
            }
            match delete_replica(addr, &r.volume).await {
                Ok(()) => {
                    tracing::info!(volume = %r.volume, node = %name, "left-over replica deleted")
                }
                Err(e) => {
                    tracing::warn!(volume = %r.volume, node = %name, error = %e,
                        "deleting a left-over replica")
                }
            }
        }
    }
}

fn find<'a>(nodes: &'a [Node], name: &str) -> Option<&'a Node> {
    nodes
        .iter()
        .find(|n| n.metadata.name.as_deref() == Some(name))
}

/// How long the node has not been Ready (None: it is Ready, or it never
/// reported a Ready condition).
fn not_ready_for(node: &Node) -> Option<Duration> {
    let ready = node
        .status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready")?;
    if ready.status == "True" {
        return None;
    }
    let since = ready.last_transition_time.as_ref()?.0;
    Some(Duration::try_from(Timestamp::now().duration_since(since)).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{NodeCondition, NodeStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn node(status: &str, secs_ago: i64) -> Node {
        Node {
            status: Some(NodeStatus {
                conditions: Some(vec![NodeCondition {
                    type_: "Ready".into(),
                    status: status.into(),
                    last_transition_time: Some(Time(
                        Timestamp::now() - k8s_openapi::jiff::SignedDuration::from_secs(secs_ago),
                    )),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn not_ready_counts_from_the_transition() {
        assert_eq!(not_ready_for(&node("True", 900)), None);
        let d = not_ready_for(&node("Unknown", 700)).unwrap();
        assert!(
            d >= Duration::from_secs(699) && d < Duration::from_secs(760),
            "{d:?}"
        );
        let d = not_ready_for(&node("False", 5)).unwrap();
        assert!(d < Duration::from_secs(60), "{d:?}");
        // No Ready condition at all: not counted as lost.
        assert_eq!(not_ready_for(&Node::default()), None);
    }
}
