//! `strata-csi`: the Kubernetes CSI driver (not built yet).
//!
//! It will own the CSI Identity, Controller and Node services (spec in
//! `proto/`): provisioning a volume from a StorageClass means creating its
//! replicas on the nodes' replica DaemonSet pods and starting a per-volume
//! controller Deployment + Service; node attach connects the kernel NBD
//! client (or open-iscsi) to that controller and mounts the filesystem.
//! Its data comes from the Kubernetes API (through `kube`) and goes to the
//! controller and replica gRPC APIs; it never touches volume data itself.
