//! [`ConnError`]: why the target closed one connection. Never returned
//! for what a SCSI status, a Reject or a login status can answer; only for
//! what ends the connection (IO, a stream out of sync, a failed login, a
//! protocol violation at error recovery level 0).

use std::io;

use super::dataout::DataOutError;
use super::pdu::PduError;

#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("Socket error")]
    Io(#[from] io::Error),
    #[error("Malformed PDU")]
    Pdu(#[from] PduError),
    #[error("Data digest error on opcode {0:#04x}")]
    DataDigest(u8),
    #[error("Data-Out out of sequence")]
    DataOut(#[from] DataOutError),
    #[error("Protocol violation: {0}")]
    Protocol(String),
    #[error("Login failed with status {0:#04x}/{1:#04x}")]
    LoginFailed(u8, u8),
    #[error("Login not finished within {0:?}")]
    LoginTimeout(std::time::Duration),
    #[error("Connection closed in the middle of a PDU")]
    Truncated,
    #[error("No answer to a NOP-In ping within {0:?}")]
    PingTimeout(std::time::Duration),
}
