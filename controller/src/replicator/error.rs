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
    #[error("Volume {volume}: {op} at offset {offset} refused: another controller owns the volume now (its replicas are at epoch {theirs}, this controller at {ours})")]
    Fenced {
        volume: String,
        op: &'static str,
        offset: u64,
        ours: u64,
        theirs: u64,
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
    #[error("Volume {volume}: {addr} is not one of its replicas")]
    NotAReplica {
        volume: String,
        addr: std::net::SocketAddr,
    },
    #[error("Volume {volume}: removing {addr} would leave {healthy_after} healthy of {remaining} replicas, below the write quorum of {quorum_after}")]
    WouldLoseQuorum {
        volume: String,
        addr: std::net::SocketAddr,
        healthy_after: usize,
        remaining: usize,
        quorum_after: usize,
    },
    #[error("Volume {volume}: cannot grow from {current} to {requested} bytes: {reason}")]
    Resize {
        volume: String,
        current: u64,
        requested: u64,
        refusal: ResizeRefusal,
        reason: String,
    },
    #[error("Volume {volume}, snapshot {snapshot:?}: {reason}")]
    Snapshot {
        volume: String,
        snapshot: String,
        problem: SnapshotProblem,
        reason: String,
    },
}

/// Why an expansion was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResizeRefusal {
    /// Smaller than the volume: volumes only grow.
    Shrink,
    /// Zero, too large for a replica's filesystem, or refused by every replica.
    Invalid,
    /// Replicas are being compared after a crash: retry later.
    Busy,
}

/// What kind of snapshot request a [`VolumeError::Snapshot`] refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotProblem {
    /// No snapshot of that name.
    NotFound,
    /// The name is taken (by a snapshot, or by a volume for a clone).
    Exists,
    /// The name is not a valid snapshot or volume name.
    InvalidName,
    /// A running backup reads it, or replicas are being compared after a
    /// crash: retry later.
    Busy,
    /// Revert to a snapshot taken before the volume grew (refused).
    SizeChanged,
    /// The replicas refused or failed it for another reason.
    Failed,
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

/// Why bringing a replica back (rejoin, snapshot chain copy, resync,
/// rebuild, comparison) stopped. The replica stays out and the recovery
/// loop tries again with backoff; nothing matches on the text.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Control(#[from] super::control::ControlError),
    /// No healthy replica to copy or compare from.
    #[error("no healthy replica to copy from: {0}")]
    NoSource(#[source] Box<VolumeError>),
    /// A data-wire request of the sync failed (`what` says which, on which side).
    #[error("{what} failed: {source}")]
    Data {
        what: String,
        #[source]
        source: strata_replica::client::ClientError,
    },
    #[error("its size {replica} differs from the volume's {volume}")]
    SizeMismatch { replica: u64, volume: u64 },
    #[error("the wiped replica was not recreated")]
    NotRecreated,
    #[error("its snapshots {have:?} are not a start of the volume's {want:?}; it is rebuilt on the next try")]
    ChainDiverged {
        have: Vec<String>,
        want: Vec<String>,
    },
    #[error("it has epoch {theirs} above ours ({ours}): another controller owns this volume")]
    NewerEpoch { theirs: u64, ours: u64 },
    #[error("digest counts differ ({source_count} vs {target_count}) at offset {offset}")]
    DigestCount {
        offset: u64,
        source_count: usize,
        target_count: usize,
    },
    #[error("the replica is no longer syncing ({0})")]
    NotSyncing(String),
    #[error("regions were added during promotion")]
    RegionsAdded,
}

impl SyncError {
    pub(crate) fn data(
        what: impl Into<String>,
        source: strata_replica::client::ClientError,
    ) -> Self {
        SyncError::Data {
            what: what.into(),
            source,
        }
    }
}

impl From<VolumeError> for SyncError {
    fn from(e: VolumeError) -> Self {
        SyncError::NoSource(Box::new(e))
    }
}
