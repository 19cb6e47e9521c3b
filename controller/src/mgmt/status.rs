//! Errors of the controller as gRPC statuses, the code chosen by variant
//! in one place; the message is the error's text (it names the volume and
//! the snapshot or target).

use tonic::{Code, Status};

use crate::backup::JobError;
use crate::replicator::{ResizeRefusal, SnapshotProblem, VolumeError};

fn volume_code(e: &VolumeError) -> Code {
    match e {
        VolumeError::Snapshot { problem, .. } => match problem {
            SnapshotProblem::NotFound => Code::NotFound,
            SnapshotProblem::Exists => Code::AlreadyExists,
            SnapshotProblem::InvalidName => Code::InvalidArgument,
            SnapshotProblem::Busy | SnapshotProblem::SizeChanged | SnapshotProblem::Failed => {
                Code::FailedPrecondition
            }
        },
        VolumeError::Invalid { .. } => Code::InvalidArgument,
        VolumeError::Resize { refusal, .. } => match refusal {
            ResizeRefusal::Shrink | ResizeRefusal::Invalid => Code::InvalidArgument,
            ResizeRefusal::Busy => Code::FailedPrecondition,
        },
        VolumeError::NotAReplica { .. } => Code::NotFound,
        VolumeError::WouldLoseQuorum { .. } => Code::FailedPrecondition,
        VolumeError::BelowQuorum { .. } | VolumeError::NoReplica { .. } => Code::Unavailable,
        // A newer controller serves the volume: this one never will again.
        VolumeError::Fenced { .. } => Code::Aborted,
    }
}

fn job_code(e: &JobError) -> Code {
    match e {
        JobError::Volume(v) => volume_code(v),
        JobError::NoSnapshot { .. } => Code::NotFound,
        JobError::Target { .. } => Code::FailedPrecondition,
        JobError::Backup { source, .. } | JobError::Restore { source, .. } => job_code(source),
        JobError::Engine(strata_backup::BackupError::Exists { .. }) => Code::AlreadyExists,
        JobError::Engine(_) => Code::Aborted,
    }
}

impl From<VolumeError> for Status {
    fn from(e: VolumeError) -> Status {
        Status::new(volume_code(&e), e.to_string())
    }
}

impl From<JobError> for Status {
    fn from(e: JobError) -> Status {
        Status::new(job_code(&e), e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(problem: SnapshotProblem) -> VolumeError {
        VolumeError::Snapshot {
            volume: "v".into(),
            snapshot: "s".into(),
            problem,
            reason: "r".into(),
        }
    }

    #[test]
    fn codes_follow_the_variant_not_the_text() {
        assert_eq!(
            Status::from(snapshot(SnapshotProblem::NotFound)).code(),
            Code::NotFound
        );
        assert_eq!(
            Status::from(snapshot(SnapshotProblem::Exists)).code(),
            Code::AlreadyExists
        );
        assert_eq!(
            Status::from(snapshot(SnapshotProblem::Busy)).code(),
            Code::FailedPrecondition
        );
        let fenced = VolumeError::Fenced {
            volume: "v".into(),
            op: "write",
            offset: 0,
            ours: 3,
            theirs: 4,
        };
        assert_eq!(Status::from(fenced).code(), Code::Aborted);
        let nested = JobError::Backup {
            volume: "v".into(),
            snapshot: "s".into(),
            url: "file:///x".into(),
            source: Box::new(JobError::NoSnapshot {
                volume: "v".into(),
                snapshot: "s".into(),
            }),
        };
        assert_eq!(Status::from(nested).code(), Code::NotFound);
    }
}
