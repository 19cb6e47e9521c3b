//! [`JobError`]: why a backup or a restore through this controller failed.

use strata_backup::BackupError;

use crate::replicator::VolumeError;

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The target could not be opened (bad URL, unreachable, no bucket).
    #[error("target {url}: {source}")]
    Target {
        url: String,
        #[source]
        source: BackupError,
    },
    /// The volume refused (below quorum, snapshot refused...).
    #[error(transparent)]
    Volume(#[from] VolumeError),
    #[error("volume {volume} has no snapshot {snapshot:?}")]
    NoSnapshot { volume: String, snapshot: String },
    /// The backup engine failed (an object, the network, the data).
    #[error(transparent)]
    Engine(#[from] BackupError),
    #[error("volume {volume}, snapshot {snapshot}: backup to {url} failed: {source}")]
    Backup {
        volume: String,
        snapshot: String,
        url: String,
        #[source]
        source: Box<JobError>,
    },
    #[error("restore of {id} from {url} into volume {volume} failed: {source}")]
    Restore {
        id: String,
        url: String,
        volume: String,
        #[source]
        source: Box<JobError>,
    },
}
