//! The attach layer's error type.

use std::io;
use std::path::PathBuf;

use crate::handshake::{ConnectError, HandshakeError};
use crate::kernel::NetlinkError;
use crate::uri::UriError;

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("Bad NBD URI")]
    Uri(#[from] UriError),
    #[error("Cannot reach the controller at {uri}")]
    Unreachable {
        uri: String,
        #[source]
        source: io::Error,
    },
    #[error("The controller at {uri} has no export {export:?}: {message}")]
    ExportMissing {
        uri: String,
        export: String,
        message: String,
    },
    /// The controller answered `NBD_REP_ERR_TLS_REQD` (`--nbd-tls
    /// require`) and no TLS key was given to attach with.
    #[error(
        "The controller at {uri} requires NBD over TLS (--nbd-tls require): attaching needs the \
         cluster key (--cluster-key-file PATH or STRATA_CLUSTER_KEY_FILE), from which the volume's \
         TLS pre-shared key is derived, and then goes through the nbdfuse fallback (the kernel's \
         NBD client cannot speak TLS)"
    )]
    TlsRequired { uri: String },
    #[error("NBD handshake with {uri} failed")]
    Handshake {
        uri: String,
        #[source]
        source: HandshakeError,
    },
    #[error("No way to attach a block device on this host: {0}")]
    NoMethod(String),
    #[error("No free nbd device")]
    NoFreeDevice(#[source] NetlinkError),
    #[error("/dev/nbd{0} is already in use")]
    DeviceBusy(u32),
    #[error("Attaching and detaching need root (CAP_SYS_ADMIN)")]
    NotPermitted(#[source] NetlinkError),
    #[error("{uri} is already attached at {device}")]
    AlreadyAttached { uri: String, device: String },
    #[error("Kernel nbd request failed")]
    Netlink(#[from] NetlinkError),
    #[error("{tool} failed ({status}): {stderr}")]
    Tool {
        tool: String,
        status: String,
        stderr: String,
    },
    #[error("{tool} did not finish within {secs} s")]
    ToolTimeout { tool: String, secs: u64 },
    #[error("Cannot run {tool}")]
    Spawn {
        tool: String,
        #[source]
        source: io::Error,
    },
    #[error("{what} did not appear within {secs} s")]
    NotReady { what: String, secs: u64 },
    #[error(
        "{device} shows {device_size} bytes, the export {export_size}: the kernel keeps its connection, \
         negotiated at the old size; the device grows when that connection is replaced (the supervisor \
         applies the size on its next reconnect), or now if the server serves the new size on existing \
         connections (--server-serves-new-size)"
    )]
    ResizeNeedsReconnect {
        device: String,
        device_size: u64,
        export_size: u64,
    },
    #[error(
        "{device} shows {device_size} bytes, the export {export_size}: the nbdfuse + loop fallback \
         cannot grow an attached device; detach and attach it again (for the CSI driver: restart the \
         pod so the volume is unstaged and staged) and it comes up at the new size"
    )]
    FallbackCannotGrow {
        device: String,
        device_size: u64,
        export_size: u64,
    },
    #[error("Cannot read the size of {device}")]
    DeviceSize {
        device: String,
        #[source]
        source: io::Error,
    },
    #[error("{0} is not a device strata attached")]
    NotAttached(String),
    #[error("Cannot use the attach state file {path}")]
    State {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Cannot write the TLS pre-shared key file {path}")]
    PskFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Bad attach state file {path}")]
    StateFormat {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

impl From<ConnectError> for AttachError {
    fn from(e: ConnectError) -> AttachError {
        match e {
            ConnectError::Unreachable { uri, source } => AttachError::Unreachable { uri, source },
            ConnectError::Handshake {
                uri,
                source: HandshakeError::ExportMissing { export, message },
            } => AttachError::ExportMissing {
                uri,
                export,
                message,
            },
            ConnectError::Handshake {
                uri,
                source: HandshakeError::TlsRequired { .. },
            } => AttachError::TlsRequired { uri },
            ConnectError::Handshake { uri, source } => AttachError::Handshake { uri, source },
        }
    }
}
