//! `strata-csi`: the Kubernetes CSI driver, `strata csi --mode controller|node`.
//!
//! - [`identity`]: the Identity service, served in both modes, and
//!   [`health`]: `/healthz` for the kubelet, which probes it.
//! - [`controller`]: provisioning. A volume is a [`crd::StrataVolume`]
//!   custom resource (the only state strata keeps outside the replicas'
//!   own metadata), replicas created on the nodes' replica servers
//!   ([`placement`] chooses the nodes, [`cluster`] reads them from the
//!   Kubernetes API), and a per-volume controller Deployment + Service
//!   ([`objects`]) that serves the volume over NBD. Snapshots, clones and
//!   expansion go through that controller's management gRPC. The same
//!   process does what the kubernetes-csi resizer and snapshotter sidecars
//!   would ([`controller::resizer`], [`controller::snapshotter`]).
//! - [`node`]: attaching a volume on a node with `strata-attach` (kernel
//!   NBD, with fallbacks), making a filesystem only on an empty device,
//!   mounting, bind-mounting into pods, growing the filesystem.
//!
//! Requests are checked before anything is created ([`params`],
//! [`request`]); every refusal is a [`error::CsiError`] with the gRPC code
//! the CSI spec asks for.

pub mod cluster;
pub mod cluster_key;
pub mod controller;
pub mod crd;
pub mod endpoint;
pub mod error;
pub mod health;
pub mod identity;
pub mod kube_api;
pub mod names;
pub mod node;
pub mod objects;
pub mod params;
pub mod placement;
pub mod quantity;
pub mod request;
pub mod serve;

pub use endpoint::Endpoint;
pub use error::CsiError;

/// The name this driver registers under (CSIDriver object, StorageClass
/// `provisioner`).
pub const DRIVER_NAME: &str = "csi.strata.io";

/// Topology key of the node a volume is reachable from.
pub const TOPOLOGY_HOSTNAME: &str = "kubernetes.io/hostname";
/// Topology key of the node's CPU architecture.
pub const TOPOLOGY_ARCH: &str = "kubernetes.io/arch";

/// The Kubernetes architecture name of this build (`amd64`, `arm64`).
pub fn kube_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "arm" => "arm",
        other => other,
    }
}
