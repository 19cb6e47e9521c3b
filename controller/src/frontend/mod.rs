//! Frontends: how applications reach a volume. Each turns its protocol's
//! requests into calls on one [`Backend`] (implemented by the replicator in
//! `crate::backend`), so NBD and iSCSI share the data path.
//!
//! [`nbd`]: the NBD server (handshake, transmission, pure protocol codec).
//! [`iscsi`]: the iSCSI target (login, CHAP, PDUs, SCSI commands).

pub mod iscsi;
pub mod nbd;

pub use nbd::{Backend, BackendError};
