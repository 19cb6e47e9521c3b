//! [`Backend`]: what a frontend (NBD, iSCSI) needs from a volume, and
//! [`BackendError`]: why a backend call failed, in terms each protocol
//! maps to its own error (NBD errno in `nbd::ops`, SCSI sense in
//! `scsi::sense`).
//!
//! A frontend validates every request (range, length) before calling a
//! backend and only ever passes block-aligned ranges ([`BLOCK_SIZE`]),
//! unless the backend [handles unaligned](Backend::handles_unaligned)
//! writes itself. A backend may still refuse a range with
//! [`BackendError::Invalid`].

use std::future::Future;

use bytes::Bytes;
use strata_replica::AllocationExtent;

/// Alignment of every offset and length the server passes to a backend.
pub const BLOCK_SIZE: u64 = 4096;

/// A block device served by the frontends.
///
/// Consistency across connections: the server advertises
/// `NBD_FLAG_CAN_MULTI_CONN`, so a backend must make a completed `flush`
/// (or a write with `fua`) cover every write completed before it, whichever
/// connection sent it. One shared volume object does this naturally.
pub trait Backend: Send + Sync + 'static {
    /// Size in bytes, rounded down to [`BLOCK_SIZE`] by the frontends. It
    /// may grow while clients are connected (an online expansion): NBD
    /// reads it at each handshake, iSCSI raises a unit attention.
    fn size(&self) -> u64;
    /// The volume's name: NBD's export name (the empty name "" is accepted
    /// as the default export too), the last part of the iSCSI target name.
    fn volume_name(&self) -> &str;
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
/// Each frontend maps a variant to its protocol: NBD picks an errno
/// (`nbd::ops::nbd_errno`), iSCSI a sense key and code
/// (`scsi::sense::Sense::from_backend`). A volume below its write quorum
/// and a fenced volume are told apart from a failed disk: an initiator may
/// retry the first; the second is served by a newer controller now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    /// Reading or writing failed on every replica.
    #[error("IO error: {0}")]
    Io(String),
    /// The request is wrong for this device (range, alignment).
    #[error("Invalid request: {0}")]
    Invalid(String),
    /// No space left.
    #[error("No space left: {0}")]
    NoSpace(String),
    /// The volume is read-only.
    #[error("Volume is read-only")]
    ReadOnly,
    /// Fewer replicas are healthy than a write needs; may clear when a
    /// replica returns.
    #[error("Volume below its write quorum: {0}")]
    BelowQuorum(String),
    /// A newer controller took the volume over (a newer epoch on a
    /// majority): this one will not serve it again.
    #[error("Volume is fenced: {0}")]
    Fenced(String),
    /// The operation cannot be done as asked (e.g. fast zero).
    #[error("Not supported: {0}")]
    NotSupported(String),
}
