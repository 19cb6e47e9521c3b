//! Backups of the volume this controller serves, and restores into it.
//!
//! The backup engine is the `strata-backup` crate; this module feeds it:
//! - `source.rs`: a snapshot read from a healthy replica over the data wire
//!   (`volume@snapshot` connections) and its changed ranges over gRPC;
//! - `sink.rs`: a restore written through the replicator, like client IO;
//! - `job.rs`: one backup (take a snapshot, hold it against delete, back it
//!   up, keep it as the next backup's base and drop the one before) and one
//!   restore;
//! - `error.rs`: [`JobError`], why one of them failed;
//! - `schedule.rs`: the volume's schedules, run in the background, with the
//!   last run of each kept for `strata volume status` and `/metrics`.

mod error;
mod job;
mod schedule;
mod sink;
mod source;

pub use error::JobError;
pub use job::{run_backup, run_restore};
pub use schedule::{run_schedules, LastRun, ScheduleState};
pub use sink::VolumeSink;
pub use source::ReplicaSnapshotSource;
