//! Frontends: how applications reach a volume. Each turns its protocol's
//! requests into calls on one [`Backend`] (implemented by the replicator in
//! `crate::backend`), so NBD today and iSCSI later share the data path.

pub mod nbd;

use std::future::Future;

use bytes::Bytes;
use strata_replica::AllocationExtent;

/// Why a backend call failed, in terms every block protocol can express.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BackendError {
    /// The data could not be read or written (replicas failed, below
    /// quorum, fenced): EIO.
    #[error("IO error: {0}")]
    Io(String),
    /// The request itself is wrong (range, alignment): EINVAL.
    #[error("Invalid request: {0}")]
    Invalid(String),
    /// No space left on a replica: ENOSPC.
    #[error("No space: {0}")]
    NoSpace(String),
}

/// A block device as a frontend sees it. Offsets and lengths are bytes and
/// need not be block-aligned: the backend handles partial blocks.
pub trait Backend: Send + Sync + 'static {
    fn size(&self) -> u64;
    /// The export name clients ask for.
    fn export_name(&self) -> &str;
    fn read(
        &self,
        offset: u64,
        len: u32,
    ) -> impl Future<Output = Result<Bytes, BackendError>> + Send;
    fn write(
        &self,
        offset: u64,
        data: Bytes,
        fua: bool,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;
    fn flush(&self) -> impl Future<Output = Result<(), BackendError>> + Send;
    /// Advisory: may discard less than asked (whole blocks only).
    fn trim(&self, offset: u64, len: u32) -> impl Future<Output = Result<(), BackendError>> + Send;
    fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        may_punch: bool,
        fua: bool,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;
    fn block_status(
        &self,
        offset: u64,
        len: u32,
    ) -> impl Future<Output = Result<Vec<AllocationExtent>, BackendError>> + Send;
}
