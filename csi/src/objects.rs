//! The per-volume controller's Deployment, Service and replica list, as
//! CreateVolume makes them.
//!
//! The Deployment runs `strata controller serve` for one volume (one
//! replica, `Recreate`), listening on its pod IP; the Service gives it a
//! stable address, which the node plugin attaches to and the CSI
//! controller calls for snapshots, clones and expansion. The replicas'
//! addresses reach the pod as `STRATA_REPLICAS` from a ConfigMap (key
//! [`REPLICAS_KEY`]), not as arguments: when a replica is replaced
//! (`controller/repair.rs`) the ConfigMap changes and the running
//! controller is told, and no rollout restarts the pod (a rollout would
//! also wait forever for an old pod stuck on a dead node). All three are
//! owned by the volume's StrataVolume, so deleting that removes them too.
//!
//! Failover: the pod tolerates an unreachable or not-ready node for
//! [`FAILOVER_TOLERATION_SECS`] (not Kubernetes' default 300 s); then the
//! taint manager deletes it and the ReplicaSet starts a new one elsewhere,
//! which assembles the volume from a majority of its replicas at a higher
//! epoch. If the old pod still runs behind a partition, the replicas
//! refuse it from then on: the epoch, not Kubernetes, keeps two
//! controllers from both writing.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy};
use k8s_openapi::api::core::v1::{
    Affinity, ConfigMap, ConfigMapKeySelector, Container, ContainerPort, EnvFromSource, EnvVar,
    EnvVarSource, NodeAffinity, NodeSelectorRequirement, NodeSelectorTerm, ObjectFieldSelector,
    PodSpec, PodTemplateSpec, PreferredSchedulingTerm, Probe, ResourceRequirements,
    SecretEnvSource, SecretVolumeSource, Service, ServicePort, ServiceSpec, TCPSocketAction,
    Toleration, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::crd::StrataVolume;

/// Prefix of the Deployment and Service names (`strata-<volume id>`).
pub const NAME_PREFIX: &str = "strata-";
/// Label naming the volume on every object strata makes for it.
pub const VOLUME_LABEL: &str = "strata.io/volume";
/// Label marking objects made by the CSI controller.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "strata-csi");
pub const NBD_PORT: u16 = 10809;
pub const CONTROL_PORT: u16 = 10810;
pub const METRICS_PORT: u16 = 10811;
/// The replica list's key in the volume's ConfigMap.
pub const REPLICAS_KEY: &str = "replicas";
/// The environment variable `strata controller serve` reads replicas from.
pub const REPLICAS_ENV: &str = "STRATA_REPLICAS";
/// How long the controller pod stays on an unreachable node before it is
/// replaced.
pub const FAILOVER_TOLERATION_SECS: i64 = 15;

/// Everything the controller pod needs to know that is not in the
/// volume's spec.
#[derive(Debug, Clone)]
pub struct PodSettings {
    pub namespace: String,
    /// The image holding `strata` (the CSI driver's own).
    pub image: String,
    pub image_pull_policy: Option<String>,
    /// A ServiceAccount for the pod (none needed: it does not call the
    /// Kubernetes API).
    pub service_account: Option<String>,
    /// The Secret holding the cluster key ([`crate::cluster_key`]), mounted
    /// into the pod and given to `strata` as its key file; `None` runs the
    /// controller keyless.
    pub cluster_key_secret: Option<String>,
}

/// The pod volume holding the cluster key Secret.
const CLUSTER_KEY_VOLUME: &str = "cluster-key";

/// `strata-<volume id>`.
pub fn object_name(volume_id: &str) -> String {
    format!("{NAME_PREFIX}{volume_id}")
}

fn labels(volume_id: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (VOLUME_LABEL.to_string(), volume_id.to_string()),
        (MANAGED_BY.0.to_string(), MANAGED_BY.1.to_string()),
        (
            "app.kubernetes.io/name".to_string(),
            "strata-volume-controller".to_string(),
        ),
    ])
}

fn owner(sv: &StrataVolume) -> Option<Vec<OwnerReference>> {
    let uid = sv.metadata.uid.clone()?;
    Some(vec![OwnerReference {
        api_version: "strata.io/v1alpha1".into(),
        kind: "StrataVolume".into(),
        name: sv.metadata.name.clone().unwrap_or_default(),
        uid,
        controller: Some(true),
        block_owner_deletion: Some(true),
    }])
}

fn meta(sv: &StrataVolume, volume_id: &str, namespace: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(object_name(volume_id)),
        namespace: Some(namespace.to_string()),
        labels: Some(labels(volume_id)),
        owner_references: owner(sv),
        ..Default::default()
    }
}

/// The replica addresses as the ConfigMap holds them (`A,B,C`).
pub fn replica_list(replicas: &[SocketAddr]) -> String {
    replicas
        .iter()
        .map(|r| r.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// The volume's replica list, read by its controller pod at start.
pub fn replicas_config_map(
    sv: &StrataVolume,
    volume_id: &str,
    replicas: &[SocketAddr],
    namespace: &str,
) -> ConfigMap {
    ConfigMap {
        metadata: meta(sv, volume_id, namespace),
        data: Some(BTreeMap::from([(
            REPLICAS_KEY.to_string(),
            replica_list(replicas),
        )])),
        ..Default::default()
    }
}

/// The controller's command line: `strata controller serve ...` (the
/// replicas come from [`REPLICAS_ENV`]).
pub fn controller_args(sv: &StrataVolume, volume_id: &str) -> Vec<String> {
    let mut args: Vec<String> = ["controller", "serve", "--volume", volume_id]
        .iter()
        .map(|s| s.to_string())
        .collect();
    for (flag, port) in [
        ("--nbd", NBD_PORT),
        ("--control", CONTROL_PORT),
        ("--metrics", METRICS_PORT),
    ] {
        args.push(flag.into());
        args.push(format!("$(POD_IP):{port}"));
    }
    if sv.spec.sync_rate_mib > 0 {
        args.push("--sync-rate-mib".into());
        args.push(sv.spec.sync_rate_mib.to_string());
    }
    for s in &sv.spec.schedules {
        args.push("--backup-schedule".into());
        args.push(s.clone());
    }
    if sv.spec.wire_encryption {
        args.push("--encrypt-replica-wire".into());
    }
    args
}

/// The volume's controller Deployment.
pub fn deployment(sv: &StrataVolume, volume_id: &str, pod: &PodSettings) -> Deployment {
    let labels = labels(volume_id);
    let tcp = |port: u16| TCPSocketAction {
        port: IntOrString::Int(port.into()),
        ..Default::default()
    };
    let node_term = |nodes: &[String], weight: i32| PreferredSchedulingTerm {
        weight,
        preference: NodeSelectorTerm {
            match_expressions: Some(vec![NodeSelectorRequirement {
                key: crate::TOPOLOGY_HOSTNAME.into(),
                operator: "In".into(),
                values: Some(nodes.to_vec()),
            }]),
            ..Default::default()
        },
    };
    let mut preferred = Vec::new();
    if !sv.spec.preferred_nodes.is_empty() {
        preferred.push(node_term(&sv.spec.preferred_nodes, 100));
    }
    if !sv.spec.replica_nodes.is_empty() {
        preferred.push(node_term(&sv.spec.replica_nodes, 10));
    }
    let toleration = |key: &str| Toleration {
        key: Some(key.into()),
        operator: Some("Exists".into()),
        effect: Some("NoExecute".into()),
        toleration_seconds: Some(FAILOVER_TOLERATION_SECS),
        ..Default::default()
    };
    let container = Container {
        name: "controller".into(),
        image: Some(pod.image.clone()),
        image_pull_policy: pod.image_pull_policy.clone(),
        command: Some(vec!["strata".into()]),
        args: Some(controller_args(sv, volume_id)),
        env: Some(
            vec![
                EnvVar {
                    name: "POD_IP".into(),
                    value_from: Some(EnvVarSource {
                        field_ref: Some(ObjectFieldSelector {
                            field_path: "status.podIP".into(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                EnvVar {
                    name: REPLICAS_ENV.into(),
                    value_from: Some(EnvVarSource {
                        config_map_key_ref: Some(ConfigMapKeySelector {
                            name: object_name(volume_id),
                            key: REPLICAS_KEY.into(),
                            optional: Some(false),
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            ]
            .into_iter()
            .chain(pod.cluster_key_secret.as_ref().map(|_| EnvVar {
                name: "STRATA_CLUSTER_KEY_FILE".into(),
                value: Some(crate::cluster_key::key_file_in_pod()),
                ..Default::default()
            }))
            .collect(),
        ),
        volume_mounts: pod.cluster_key_secret.as_ref().map(|_| {
            vec![VolumeMount {
                name: CLUSTER_KEY_VOLUME.into(),
                mount_path: crate::cluster_key::MOUNT_DIR.into(),
                read_only: Some(true),
                ..Default::default()
            }]
        }),
        env_from: sv.spec.backup_secret.as_ref().map(|name| {
            vec![EnvFromSource {
                secret_ref: Some(SecretEnvSource {
                    name: name.clone(),
                    optional: Some(false),
                }),
                ..Default::default()
            }]
        }),
        ports: Some(
            [
                ("nbd", NBD_PORT),
                ("control", CONTROL_PORT),
                ("metrics", METRICS_PORT),
            ]
            .iter()
            .map(|(name, port)| ContainerPort {
                name: Some(name.to_string()),
                container_port: (*port).into(),
                ..Default::default()
            })
            .collect(),
        ),
        readiness_probe: Some(Probe {
            tcp_socket: Some(tcp(NBD_PORT)),
            period_seconds: Some(5),
            ..Default::default()
        }),
        liveness_probe: Some(Probe {
            tcp_socket: Some(tcp(CONTROL_PORT)),
            initial_delay_seconds: Some(10),
            period_seconds: Some(10),
            failure_threshold: Some(6),
            ..Default::default()
        }),
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".to_string(), Quantity("50m".into())),
                ("memory".to_string(), Quantity("32Mi".into())),
            ])),
            limits: Some(BTreeMap::from([(
                "memory".to_string(),
                Quantity("128Mi".into()),
            )])),
            ..Default::default()
        }),
        ..Default::default()
    };
    Deployment {
        metadata: meta(sv, volume_id, &pod.namespace),
        spec: Some(DeploymentSpec {
            replicas: Some(1),
            selector: LabelSelector {
                match_labels: Some(BTreeMap::from([(
                    VOLUME_LABEL.to_string(),
                    volume_id.to_string(),
                )])),
                ..Default::default()
            },
            strategy: Some(DeploymentStrategy {
                type_: Some("Recreate".into()),
                ..Default::default()
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![container],
                    service_account_name: pod.service_account.clone(),
                    automount_service_account_token: Some(false),
                    termination_grace_period_seconds: Some(30),
                    node_selector: Some(BTreeMap::from([(
                        "kubernetes.io/os".to_string(),
                        "linux".to_string(),
                    )])),
                    affinity: (!preferred.is_empty()).then(|| Affinity {
                        node_affinity: Some(NodeAffinity {
                            preferred_during_scheduling_ignored_during_execution: Some(preferred),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    tolerations: Some(vec![
                        toleration("node.kubernetes.io/unreachable"),
                        toleration("node.kubernetes.io/not-ready"),
                    ]),
                    volumes: pod.cluster_key_secret.as_ref().map(|name| {
                        vec![Volume {
                            name: CLUSTER_KEY_VOLUME.into(),
                            secret: Some(SecretVolumeSource {
                                secret_name: Some(name.clone()),
                                default_mode: Some(0o400),
                                optional: Some(false),
                                ..Default::default()
                            }),
                            ..Default::default()
                        }]
                    }),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The volume's Service (the address clients attach to).
pub fn service(sv: &StrataVolume, volume_id: &str, namespace: &str) -> Service {
    Service {
        metadata: meta(sv, volume_id, namespace),
        spec: Some(ServiceSpec {
            selector: Some(BTreeMap::from([(
                VOLUME_LABEL.to_string(),
                volume_id.to_string(),
            )])),
            ports: Some(
                [
                    ("nbd", NBD_PORT),
                    ("control", CONTROL_PORT),
                    ("metrics", METRICS_PORT),
                ]
                .iter()
                .map(|(name, port)| ServicePort {
                    name: Some(name.to_string()),
                    port: (*port).into(),
                    target_port: Some(IntOrString::Int((*port).into())),
                    protocol: Some("TCP".into()),
                    ..Default::default()
                })
                .collect(),
            ),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::StrataVolumeSpec;

    fn volume(wire_encryption: bool) -> StrataVolume {
        StrataVolume::new(
            "pvc-1",
            StrataVolumeSpec {
                csi_name: "pvc-1".into(),
                size_bytes: 1 << 30,
                replicas: 3,
                replica_nodes: vec!["a".into(), "b".into(), "c".into()],
                schedules: Vec::new(),
                backup_secret: None,
                sync_rate_mib: 0,
                wire_encryption,
                source: None,
                preferred_nodes: Vec::new(),
                snapshots: Vec::new(),
                backups: Vec::new(),
            },
        )
    }

    #[test]
    fn wire_encryption_becomes_the_controller_flag() {
        let flag = "--encrypt-replica-wire".to_string();
        assert!(controller_args(&volume(true), "pvc-1").contains(&flag));
        assert!(!controller_args(&volume(false), "pvc-1").contains(&flag));
    }
}
