//! The one error type of the backup layer. Every variant names what it was
//! doing: the target, the object key, the volume, the offset.

use crate::source::SourceError;

pub type Result<T, E = BackupError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// The target URL or an option is unusable.
    #[error("invalid target {url:?}: {reason}")]
    InvalidTarget { url: String, reason: String },
    /// A request to the object store failed (network, permissions, server).
    #[error("{op} {key:?} on {target}: {reason}")]
    Store {
        op: &'static str,
        target: String,
        key: String,
        reason: String,
    },
    /// An object the backup needs is absent.
    #[error("object {key:?} is missing from {target}")]
    Missing { target: String, key: String },
    /// An object exists but does not decode, decrypt or hash to its name.
    #[error("object {key:?} in {target} is corrupt: {reason}")]
    Corrupt {
        target: String,
        key: String,
        reason: String,
    },
    /// The target is encrypted and no key was given, a key was given for an
    /// unencrypted target, or the key is wrong.
    #[error("{0}")]
    Key(String),
    /// Reading the snapshot or writing the restore failed.
    #[error("volume {volume:?}: {op} failed: {source}")]
    Source {
        volume: String,
        op: &'static str,
        #[source]
        source: SourceError,
    },
    /// No backup with this id.
    #[error("no backup {id:?} in {target}")]
    NoSuchBackup { target: String, id: String },
    /// A backup with the id the caller chose is already there.
    #[error("backup {id:?} already exists in {target}")]
    Exists { target: String, id: String },
    /// The request itself is invalid (bad volume name, sink too small, ...).
    #[error("{0}")]
    Invalid(String),
    /// `verify` found problems: one line each.
    #[error("backup {id} failed verification: {} problem(s): {}", problems.len(), problems.join("; "))]
    Verify { id: String, problems: Vec<String> },
}
