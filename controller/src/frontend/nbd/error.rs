//! [`ConnError`]: why the server closed one client connection. Never
//! returned for a request the server could answer with an NBD error; only
//! for what ends the connection (IO, a stream out of sync, a hostile size).

use std::io;

use super::proto::ProtoError;

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
}
