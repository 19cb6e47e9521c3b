//! Why a CSI call failed, and the gRPC code the CSI spec gives each case.

use tonic::{Code, Status};

/// A refused or failed CSI call. The variant chooses the gRPC code; the
/// text is for the operator (it ends up in the PVC's events).
#[derive(Debug, thiserror::Error)]
pub enum CsiError {
    /// A field is missing or malformed (`INVALID_ARGUMENT`).
    #[error("{0}")]
    Invalid(String),
    /// No such volume, snapshot or path (`NOT_FOUND`).
    #[error("{0}")]
    NotFound(String),
    /// The name is taken by something incompatible (`ALREADY_EXISTS`).
    #[error("{0}")]
    AlreadyExists(String),
    /// The size cannot be satisfied (`OUT_OF_RANGE`).
    #[error("{0}")]
    OutOfRange(String),
    /// Not enough nodes or space (`RESOURCE_EXHAUSTED`).
    #[error("{0}")]
    Exhausted(String),
    /// The state forbids it now, for example a device holding another
    /// filesystem (`FAILED_PRECONDITION`).
    #[error("{0}")]
    Precondition(String),
    /// A paging token this driver did not hand out (`ABORTED`).
    #[error("{0}")]
    Aborted(String),
    /// A capability strata does not offer (`INVALID_ARGUMENT` per spec for
    /// unsupported capabilities; kept apart for clarity).
    #[error("{0}")]
    Unsupported(String),
    /// A part strata needs is not reachable yet: the volume's controller
    /// pod, a replica server, the Kubernetes API (`UNAVAILABLE`; the
    /// sidecars retry).
    #[error("{0}")]
    Unavailable(String),
    /// Anything else (`INTERNAL`).
    #[error("{0}")]
    Internal(String),
}

impl CsiError {
    /// Worth trying again as it is (a part not reachable yet, a conflict,
    /// no room now), as the kubernetes-csi sidecars class UNAVAILABLE,
    /// ABORTED and RESOURCE_EXHAUSTED: the built-in resizer and snapshotter
    /// record only the other errors on the object.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            CsiError::Unavailable(_) | CsiError::Aborted(_) | CsiError::Exhausted(_)
        )
    }

    pub fn code(&self) -> Code {
        match self {
            CsiError::Invalid(_) | CsiError::Unsupported(_) => Code::InvalidArgument,
            CsiError::NotFound(_) => Code::NotFound,
            CsiError::AlreadyExists(_) => Code::AlreadyExists,
            CsiError::OutOfRange(_) => Code::OutOfRange,
            CsiError::Exhausted(_) => Code::ResourceExhausted,
            CsiError::Precondition(_) => Code::FailedPrecondition,
            CsiError::Aborted(_) => Code::Aborted,
            CsiError::Unavailable(_) => Code::Unavailable,
            CsiError::Internal(_) => Code::Internal,
        }
    }

    /// A Kubernetes API error, as the caller should see it.
    pub fn kube(what: &str, e: kube::Error) -> CsiError {
        match &e {
            kube::Error::Api(s) if s.code == 404 => CsiError::NotFound(format!("{what}: {e}")),
            kube::Error::Api(s) if s.code == 409 => CsiError::Aborted(format!("{what}: {e}")),
            kube::Error::Api(s) if s.code == 422 || s.code == 400 => {
                CsiError::Invalid(format!("{what}: {e}"))
            }
            kube::Error::Api(s) if s.code == 403 || s.code == 401 => {
                CsiError::Internal(format!("{what}: not permitted (check the RBAC): {e}"))
            }
            _ => CsiError::Unavailable(format!("{what}: {e}")),
        }
    }

    /// An answer from a strata gRPC server (replica or volume controller),
    /// keeping its code where it means the same to the CSI caller.
    pub fn downstream(what: &str, s: Status) -> CsiError {
        let text = format!("{what}: {}", s.message());
        match s.code() {
            Code::NotFound => CsiError::NotFound(text),
            Code::AlreadyExists => CsiError::AlreadyExists(text),
            Code::InvalidArgument => CsiError::Invalid(text),
            Code::OutOfRange => CsiError::OutOfRange(text),
            Code::ResourceExhausted => CsiError::Exhausted(text),
            Code::FailedPrecondition => CsiError::Precondition(text),
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Aborted => {
                CsiError::Unavailable(text)
            }
            _ => CsiError::Internal(text),
        }
    }
}

impl From<CsiError> for Status {
    fn from(e: CsiError) -> Status {
        Status::new(e.code(), e.to_string())
    }
}

/// Shorthand for results of CSI handlers.
pub type CsiResult<T> = Result<T, CsiError>;
