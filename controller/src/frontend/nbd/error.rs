//! [`ConnError`]: why the server closed one client connection. Never
//! returned for a request the server could answer with an NBD error; only
//! for what ends the connection (IO, a stream out of sync, a hostile size).

use std::io;

use super::proto::{
    ProtoError, NBD_EINVAL, NBD_EIO, NBD_ENOSPC, NBD_ENOTSUP, NBD_EPERM, NBD_ESHUTDOWN,
};
use crate::frontend::BackendError;

/// The NBD error number sent to the client for a failed backend call.
///
/// A volume below its write quorum answers `EIO`: a failure of the device
/// that may clear when a replica returns (Linux treats every NBD error as
/// an IO error anyway). A fenced volume answers `ESHUTDOWN`, the error the
/// protocol gives a server that is going away: a newer controller serves
/// the volume now, and a client that reconnects reaches it. `EPERM` is
/// kept for a deliberately read-only volume, as the protocol asks.
pub fn nbd_errno(e: &BackendError) -> u32 {
    match e {
        BackendError::Io(_) | BackendError::BelowQuorum(_) => NBD_EIO,
        BackendError::Fenced(_) => NBD_ESHUTDOWN,
        BackendError::Invalid(_) => NBD_EINVAL,
        BackendError::NoSpace(_) => NBD_ENOSPC,
        BackendError::ReadOnly => NBD_EPERM,
        BackendError::NotSupported(_) => NBD_ENOTSUP,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("Socket error")]
    Io(#[from] io::Error),
    #[error("Protocol violation")]
    Proto(#[from] ProtoError),
    #[error("Client asked for unknown export {0:?} with NBD_OPT_EXPORT_NAME")]
    UnknownExport(String),
    #[error("Client sent more than {0} options")]
    TooManyOptions(usize),
    #[error("Handshake not finished within {0:?}")]
    HandshakeTimeout(std::time::Duration),
    #[error("Connection closed in the middle of a message")]
    Truncated,
    #[error("Write of {len} bytes is larger than the {max} accepted")]
    PayloadTooLarge { len: u32, max: u32 },
    #[error("Client asked for an export with NBD_OPT_EXPORT_NAME before starting the TLS this server requires")]
    TlsRequired,
    #[error(transparent)]
    Tls(#[from] super::tls::TlsRefusal),
}

impl ConnError {
    /// True when the client was refused for want of the key or of TLS
    /// (logged as a refusal, rate-limited), not for a fault of its own.
    pub fn is_tls_refusal(&self) -> bool {
        matches!(self, ConnError::TlsRequired | ConnError::Tls(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_mapping() {
        assert_eq!(nbd_errno(&BackendError::Io("x".into())), 5);
        assert_eq!(nbd_errno(&BackendError::BelowQuorum("x".into())), 5);
        assert_eq!(nbd_errno(&BackendError::Fenced("newer epoch".into())), 108);
        assert_eq!(nbd_errno(&BackendError::Invalid("x".into())), 22);
        assert_eq!(nbd_errno(&BackendError::NoSpace("x".into())), 28);
        assert_eq!(nbd_errno(&BackendError::ReadOnly), 1);
        assert_eq!(nbd_errno(&BackendError::NotSupported("x".into())), 95);
    }
}
