//! `strata-controller`: one volume's controller.
//!
//! Data comes in from the application through a [`frontend`] (NBD and
//! iSCSI, both over the one `frontend::Backend` seam; their accept loops
//! are `strata_net::serve`), becomes a typed request, and goes to the
//! [`replicator`], which fans writes out to every healthy replica over the
//! data wire (`strata_replica::client`) and reads from one; it also owns recovery
//! (resync, rebuild, comparison after a crash), online expansion, the
//! lag rule for silent replicas, and the snapshot chain.
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

/// Crash-test hook: when the environment variable `STRATA_CRASH_AT` names
/// `point`, the process aborts there (as a `kill -9` would stop it), so a
/// test can stop a controller at each step of a multi-step change (the
/// expansion's steps: `expand.first_replica_grown`, `expand.replicas_grown`,
/// `expand.size_set`). Unset, it is one cached environment lookup.
pub fn crash_point(point: &str) {
    static ARMED: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let armed = ARMED.get_or_init(|| std::env::var("STRATA_CRASH_AT").ok());
    if armed.as_deref() == Some(point) {
        tracing::error!(point, "STRATA_CRASH_AT: aborting here");
        std::process::abort();
    }
}
