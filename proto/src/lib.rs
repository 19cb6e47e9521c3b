//! `strata-proto`: the gRPC control APIs, generated from `proto/*.proto`.
//!
//! - [`replica`]: calls to a replica server (create, open, close, status,
//!   set epoch), made by controllers and operators;
//! - [`controller`]: a volume controller's management API (status), called
//!   by `strata volume ...`;
//! - [`csi`]: the Container Storage Interface, served by `strata csi`.
//!   `proto/csi.proto` is the spec's own file, unchanged, from
//!   <https://github.com/container-storage-interface/spec> tag v1.12.0.
//!
//! Per-IO traffic never goes through here: it uses the binary data wire in
//! `strata-replica`.

#![allow(clippy::all, missing_docs)]

pub mod replica {
    tonic::include_proto!("strata.replica.v1");
}

pub mod controller {
    tonic::include_proto!("strata.controller.v1");
}

pub mod csi {
    tonic::include_proto!("csi.v1");
}
