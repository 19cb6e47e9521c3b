//! [`Backend`]: what the NBD server needs from a volume, and
//! [`BackendError`]: how a backend failure becomes an NBD error number.
//!
//! The server validates every request (range, length) before calling a
//! backend and only ever passes block-aligned ranges ([`BLOCK_SIZE`]):
//! unaligned client requests are turned into aligned ones by the server
//! (read of the covering range, read-modify-write at the edges, trim
//! rounded inward). A backend may still refuse a range with
//! [`BackendError::Invalid`].

use std::future::Future;

use bytes::Bytes;
use strata_replica::AllocationExtent;

use super::proto::{NBD_EINVAL, NBD_EIO, NBD_ENOSPC, NBD_ENOTSUP, NBD_EPERM};

/// Alignment of every offset and length the server passes to a backend.
pub const BLOCK_SIZE: u64 = 4096;

/// A block device served over NBD.
///
/// Consistency across connections: the server advertises
/// `NBD_FLAG_CAN_MULTI_CONN`, so a backend must make a completed `flush`
/// (or a write with `fua`) cover every write completed before it, whichever
/// connection sent it. One shared volume object does this naturally.
pub trait Backend: Send + Sync + 'static {
    /// Size in bytes; the server exports it rounded down to [`BLOCK_SIZE`].
    fn size(&self) -> u64;
    /// Export name clients must ask for (empty name "" is also accepted as the default export).
    fn export_name(&self) -> &str;
    /// True if the backend itself accepts writes and zeroing that are not
    /// block-aligned, ordering them against every other write (the
    /// replicator does, under its range lock). The frontend then passes
    /// them through instead of doing its own read-modify-write, whose edge
    /// locks do not cover aligned writes from other connections.
    fn handles_unaligned(&self) -> bool {
        false
    }
    /// Told when a client enters (true) or leaves (false) the transmission
    /// phase, so the volume knows whether it is attached.
    fn client_attached(&self, _attached: bool) {}
    /// Reads `len` bytes at `offset` (both aligned).
    fn read(
        &self,
        offset: u64,
        len: u32,
    ) -> impl Future<Output = Result<Bytes, BackendError>> + Send;
    /// Writes `data` at `offset` (both aligned); with `fua`, durable before
    /// it returns.
    fn write(
        &self,
        offset: u64,
        data: Bytes,
        fua: bool,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;
    /// Makes every completed write durable.
    fn flush(&self) -> impl Future<Output = Result<(), BackendError>> + Send;
    /// Discards whole blocks; afterwards they read as zeros.
    fn trim(&self, offset: u64, len: u32) -> impl Future<Output = Result<(), BackendError>> + Send;
    /// Zeroes the range; `may_punch` allows leaving holes instead of
    /// allocated zeros.
    fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        may_punch: bool,
        fua: bool,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;
    /// How `[offset, offset + len)` is allocated, in order from `offset`.
    /// May cover less than asked, never more.
    fn block_status(
        &self,
        offset: u64,
        len: u32,
    ) -> impl Future<Output = Result<Vec<AllocationExtent>, BackendError>> + Send;
}

/// Why a backend call failed.
///
/// Mapping to NBD errors ([`BackendError::nbd_errno`]): a volume that is
/// below its write quorum or fenced by a newer epoch answers `EIO`, not
/// `EPERM`: the condition is a failure of the device that may clear (a
/// replica returns), not a permission the client lacks, and Linux treats
/// both as an IO error anyway. `EPERM` is kept for a deliberately
/// read-only volume, as the protocol asks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    /// Reading or writing failed: `EIO`.
    #[error("IO error: {0}")]
    Io(String),
    /// The request is wrong for this device (range, alignment): `EINVAL`.
    #[error("Invalid request: {0}")]
    Invalid(String),
    /// No space left: `ENOSPC`.
    #[error("No space left: {0}")]
    NoSpace(String),
    /// The volume is read-only: `EPERM`.
    #[error("Volume is read-only")]
    ReadOnly,
    /// Below write quorum, or a newer controller took over: `EIO`.
    #[error("Volume is fenced: {0}")]
    Fenced(String),
    /// The operation cannot be done as asked (e.g. fast zero): `ENOTSUP`.
    #[error("Not supported: {0}")]
    NotSupported(String),
}

impl BackendError {
    /// The NBD error number sent to the client.
    pub fn nbd_errno(&self) -> u32 {
        match self {
            BackendError::Io(_) | BackendError::Fenced(_) => NBD_EIO,
            BackendError::Invalid(_) => NBD_EINVAL,
            BackendError::NoSpace(_) => NBD_ENOSPC,
            BackendError::ReadOnly => NBD_EPERM,
            BackendError::NotSupported(_) => NBD_ENOTSUP,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_mapping() {
        assert_eq!(BackendError::Io("x".into()).nbd_errno(), 5);
        assert_eq!(BackendError::Fenced("below quorum".into()).nbd_errno(), 5);
        assert_eq!(BackendError::Invalid("x".into()).nbd_errno(), 22);
        assert_eq!(BackendError::NoSpace("x".into()).nbd_errno(), 28);
        assert_eq!(BackendError::ReadOnly.nbd_errno(), 1);
        assert_eq!(BackendError::NotSupported("x".into()).nbd_errno(), 95);
    }
}
