//! The replicator's error type and its client-visible IO counters.

use std::sync::atomic::AtomicU64;

/// Why the replicator refused or failed a request.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("Volume {volume}: {op} at offset {offset} refused: only {healthy} of {configured} replicas are healthy, {quorum} are needed")]
    BelowQuorum {
        volume: String,
        op: &'static str,
        offset: u64,
        healthy: usize,
        configured: usize,
        quorum: usize,
    },
    #[error("Volume {volume}: {op} at offset {offset} failed on every replica: {last}")]
    NoReplica {
        volume: String,
        op: &'static str,
        offset: u64,
        last: String,
    },
    #[error("Volume {volume}: {op} at offset {offset} length {len} is invalid: {reason}")]
    Invalid {
        volume: String,
        op: &'static str,
        offset: u64,
        len: u64,
        reason: String,
    },
    #[error("Volume {volume}, snapshot {snapshot:?}: {reason}")]
    Snapshot {
        volume: String,
        snapshot: String,
        reason: String,
    },
}

/// Client-visible IO counters.
#[derive(Debug, Default)]
pub struct IoCounters {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub flushes: AtomicU64,
    pub trims: AtomicU64,
    pub errors: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
}
