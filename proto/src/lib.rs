//! `strata-proto`: the gRPC control APIs, generated from `proto/*.proto`.
//!
//! - [`replica`]: calls to a replica server (create, open, close, status,
//!   set epoch), made by controllers and operators;
//! - [`controller`]: a volume controller's management API (status), called
//!   by `strata volume ...`.
//!
//! Per-IO traffic never goes through here: it uses the binary data wire in
//! `strata-replica`. The CSI spec will be added here when the CSI driver is.

#![allow(clippy::all, missing_docs)]

pub mod replica {
    tonic::include_proto!("strata.replica.v1");
}

pub mod controller {
    tonic::include_proto!("strata.controller.v1");
}
