//! Frontends: how applications reach a volume. Each turns its protocol's
//! requests into calls on one [`Backend`] (implemented by the replicator in
//! `crate::backend`), so NBD and iSCSI share the data path and neither
//! depends on the other.
//!
//! - [`backend`]: the seam: the [`Backend`] trait, [`BackendError`] and
//!   [`BLOCK_SIZE`]. Each protocol maps a [`BackendError`] to its own
//!   error (NBD errno in [`nbd::nbd_errno`], SCSI sense in
//!   [`scsi::sense::Sense::from_backend`]).
//! - [`nbd`]: the NBD server (handshake, transmission, pure protocol codec).
//! - [`scsi`]: SCSI semantics over a backend (CDB parsing, INQUIRY/VPD and
//!   mode pages, sense data, the logical unit), independent of transport.
//! - [`iscsi`]: the iSCSI target (login, CHAP, PDUs, Data-Out) carrying
//!   [`scsi`] commands.
//! - `mem` (feature `test-support`): `MemBackend`, an in-memory sparse
//!   backend with fault injection for the frontends' tests.

pub mod backend;
pub mod iscsi;
#[cfg(any(test, feature = "test-support"))]
pub mod mem;
pub mod nbd;
pub mod scsi;

pub use backend::{Backend, BackendError, BLOCK_SIZE};
