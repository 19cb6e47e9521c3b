//! Frontends: how applications reach a volume. Each turns its protocol's
//! requests into calls on one [`Backend`] (implemented by the replicator in
//! `crate::backend`), so NBD today and iSCSI later share the data path.
//!
//! [`nbd`]: the NBD server (handshake, transmission, pure protocol codec).

pub mod nbd;

pub use nbd::{Backend, BackendError};
