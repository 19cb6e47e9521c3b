//! The store's error type: one enum, each variant naming the volume offset,
//! layer or path it concerns so a caller can act on it (repair a block from a
//! peer, refuse a request, tell the operator which file is damaged).

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong in [`crate::Store`].
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("Request at offset {offset} with length {len} is not aligned to the {block}-byte block size")]
    Unaligned { offset: u64, len: u64, block: u64 },

    #[error("Request at offset {offset} with length {len} ends beyond the volume size {size}")]
    OutOfRange { offset: u64, len: u64, size: u64 },

    #[error("Checksum mismatch in layer {layer} at volume offset {offset}: stored {stored:#010x}, data hashes to {computed:#010x}")]
    Checksum {
        layer: u64,
        offset: u64,
        stored: u32,
        computed: u32,
    },

    #[error("Corrupt metadata in {path}: {reason}")]
    CorruptMeta { path: PathBuf, reason: String },

    #[error("Corrupt block map {path} at block {block}: {reason}")]
    CorruptMap {
        path: PathBuf,
        block: u64,
        reason: String,
    },

    #[error("{op} failed on {path} at offset {offset}")]
    Io {
        op: &'static str,
        path: PathBuf,
        offset: u64,
        #[source]
        source: io::Error,
    },

    #[error("No snapshot named {0:?}")]
    NoSuchSnapshot(String),

    #[error("A snapshot named {0:?} already exists")]
    SnapshotExists(String),

    #[error("Invalid snapshot name {0:?}: use 1 to 64 characters from A-Z a-z 0-9 . _ -")]
    InvalidName(String),

    #[error("Reverting to {name:?} would discard the newer snapshots {newer:?}; pass --discard-newer to do it")]
    NewerSnapshots { name: String, newer: Vec<String> },

    #[error("Cannot resize the volume from {current} to {requested} bytes: {reason}")]
    BadSize {
        current: u64,
        requested: u64,
        reason: &'static str,
    },

    #[error("Replica directory {0} already holds a volume")]
    AlreadyExists(PathBuf),

    #[error("Replica directory {0} holds no volume (no volume.meta)")]
    NotFound(PathBuf),

    #[error("Replica directory {0} is in use by another process")]
    Locked(PathBuf),

    #[error("The store stopped accepting changes after a failed {0}; reopen it to recover")]
    Poisoned(&'static str),

    #[error("Replica {dir}: the stop's flush did not finish within {waited:?}; the rest stays in the page cache and the next start on this boot finishes it (after a machine restart the replica is compared with its peers)")]
    StopUnflushed {
        dir: PathBuf,
        waited: std::time::Duration,
    },

    #[error("Injected fail point {0}")]
    FailPoint(&'static str),
}

impl StoreError {
    pub(crate) fn io(
        op: &'static str,
        path: impl Into<PathBuf>,
        offset: u64,
        source: io::Error,
    ) -> Self {
        StoreError::Io {
            op,
            path: path.into(),
            offset,
            source,
        }
    }

    /// True when the error says stored data is damaged (as opposed to a bad
    /// request or an IO failure), so the caller may repair it from a peer.
    pub fn is_corruption(&self) -> bool {
        matches!(
            self,
            StoreError::Checksum { .. }
                | StoreError::CorruptMap { .. }
                | StoreError::CorruptMeta { .. }
        )
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// An error and its sources, joined with ": " (what a user should read:
/// a handshake failure is often the source of a transport error).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
