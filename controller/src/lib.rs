//! `strata-controller`: one volume's controller.
//!
//! Data comes in from the application through a [`frontend`] (NBD and
//! iSCSI), becomes a typed request, and goes to the [`replicator`], which
//! fans writes out to every healthy replica over the data wire
//! (`strata_replica::client`) and reads from one; it also owns recovery
//! (resync, rebuild, comparison after a crash) and the snapshot chain.
//! [`assemble`] brings a volume up at start (majority check, epoch
//! fencing); [`mgmt`] exposes status, snapshots and backups over gRPC and
//! Prometheus `/metrics`; [`backup`] feeds the `strata-backup` engine from a
//! snapshot and runs schedules; [`run`] wires it together.

pub mod assemble;
pub mod backend;
pub mod backup;
pub mod frontend;
pub mod mgmt;
pub mod replicator;
pub mod run;
