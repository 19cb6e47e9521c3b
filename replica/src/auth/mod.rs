//! Cluster-key authentication of the replica's port (data wire and gRPC
//! control alike) and of the controller's management API.
//!
//! Every strata process of a cluster may hold the same 32-byte
//! [`ClusterKey`], read from a file (`--cluster-key-file`, `STRATA_CLUSTER_KEY_FILE`). A
//! replica with a key serves only peers that prove they hold it, and the
//! controller checks the replica the same way, so a rogue replica cannot
//! join a volume. Without a key everything is exactly as before.
//!
//! ```text
//! handshake.rs   4 messages at connect, before any request:
//!   C→S  hello     "STRA" v1 purpose modes 0 | client nonce (32)    40 bytes
//!   S→C  challenge "STRS" v1 status=0 mode 0 | server nonce (32)    40 bytes
//!   C→S  proof     MAC(key, ctx|"client"|purpose|nc|ns)             32 bytes
//!   S→C  verdict   "STRS" v1 status 0 0 | MAC(key, ctx|"server"|…)  40 bytes
//!   The server proves nothing until it has verified the client; a
//!   refusal is the verdict with status 1 (wrong key) and no proof.
//! record.rs      after the handshake every byte in each direction travels in
//!   records: len u32 | payload (≤ 256 KiB) | tag (16). The tag is a keyed
//!   MAC over the payload, the direction's record count `seq` and len:
//!   GMAC when both CPUs have AES instructions, else BLAKE3 (record.rs
//!   lists the formats and how the handshake picks one). A forged,
//!   replayed, reordered or dropped record fails. Direction keys are
//!   derived from the cluster key and both nonces (fresh per connection):
//!   a recorded handshake or record replayed on a new connection fails.
//! stream.rs      the records under AsyncRead/AsyncWrite; payloads of 16 KiB
//!   or more are tagged where they lie and read into the caller's buffer,
//!   not copied.
//! optional encryption (data wire, `--encrypt-replica-wire`):
//!   hello byte 6 bit 0 asks for encrypted records; challenge byte 6 says
//!   what the server grants (0 from servers older than this, which an
//!   encrypting client refuses: AuthError::EncryptionUnsupported); status 2
//!   = the server requires encryption (AuthError::EncryptionRequired). An
//!   encrypted session hashes the mode into both proofs and the direction
//!   keys, so flipping it in transit fails the handshake. Its records are
//!   len u32 | AES-256-GCM(direction key, nonce 0u32|seq u64, aad len) | tag.
//! ```
//!
//! The data-wire frames inside records have the same format. Their payload
//! crc is left out (sent as 0, not checked) when both ends offer it in the
//! handshake (hello and challenge byte 6, bit 4; [`Session::frame_crc`],
//! [`crate::wire::FrameCrc`]): the records' tags cover every byte, and the
//! crc cost as much CPU as the tag. Peers from before keep their crcs.
//! gRPC (HTTP/2) runs inside the same records (grpc.rs), always
//! integrity-only: it carries no volume data. Only the data wire
//! is ever encrypted; the choice is the client's ([`set_process_wire_encryption`]),
//! a server may insist ([`ServerAuth::requiring_encryption`]).

mod grpc;
mod handshake;
mod key;
mod record;
mod sealed_write;
mod stream;

pub use grpc::{
    accept_grpc, control_channel, grpc_channel, refuse_keyless_grpc, CONTROLLER_KEY_REQUIRED,
    HTTP2_PREFACE,
};

pub use handshake::refuse_keyed_client;
pub use handshake::{
    client_handshake, server_handshake, AuthError, Purpose, Session, CLIENT_HELLO_LEN,
    HANDSHAKE_TIMEOUT, MAGIC_CLIENT, MAGIC_KEYLESS, MAGIC_SERVER,
};
pub use key::{ClusterKey, KeyError};
pub use record::{
    open_record, seal_record, RecordError, RecordFormat, RecordKey, TagLayout, WireMode,
    MAX_RECORD, TAG_LEN,
};
pub use stream::{AuthReader, AuthWriter, Sealed, SealedRead, SealedWrite, DIRECT_MIN};

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Lets one log line through per `period`, counting the ones held back.
#[derive(Debug)]
pub struct RateLimit {
    period: Duration,
    last: AtomicU64,
    held: AtomicU64,
}

impl RateLimit {
    pub const fn new(period: Duration) -> Self {
        RateLimit {
            period,
            last: AtomicU64::new(0),
            held: AtomicU64::new(0),
        }
    }

    /// `Some(lines held back since the last one)` when a line may be logged now.
    pub fn allow(&self) -> Option<u64> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let last = self.last.load(Ordering::Relaxed);
        let period = self.period.as_millis() as u64;
        if (last == 0 || now.saturating_sub(last) >= period)
            && self
                .last
                .compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.held.swap(0, Ordering::Relaxed));
        }
        self.held.fetch_add(1, Ordering::Relaxed);
        None
    }
}

static PROCESS_KEY: std::sync::OnceLock<ClusterKey> = std::sync::OnceLock::new();

/// Sets the key this process proves when it dials replicas (data wire and
/// gRPC control): a process belongs to one cluster. Set once, at start,
/// from `--cluster-key-file`; a second call is ignored and returns false.
pub fn set_process_key(key: ClusterKey) -> bool {
    PROCESS_KEY.set(key).is_ok()
}

/// The key set by [`set_process_key`], if any.
pub fn process_key() -> Option<&'static ClusterKey> {
    PROCESS_KEY.get()
}

static ENCRYPT_DATA_WIRE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Makes this process ask for encrypted records ([`WireMode::Encrypted`])
/// on every data-wire connection it dials with a key (the controller's
/// `--encrypt-replica-wire`): replication, rebuild, resync and snapshot
/// copies all dial through [`crate::client::ReplicaClient`]. Set at start.
pub fn set_process_wire_encryption(on: bool) {
    ENCRYPT_DATA_WIRE.store(on, Ordering::Relaxed);
}

/// The record mode this process asks for on the data wire.
pub fn process_wire_mode() -> WireMode {
    if ENCRYPT_DATA_WIRE.load(Ordering::Relaxed) {
        WireMode::Encrypted
    } else {
        WireMode::Integrity
    }
}

/// What a server with a key answers a keyless data-wire client.
pub const KEY_REQUIRED: &str = "The replica requires the cluster key (--cluster-key-file)";

/// What a server needs to authenticate its peers: the key and the
/// listener's refusal-log limit.
#[derive(Debug)]
pub struct ServerAuth {
    pub key: ClusterKey,
    pub refusals: RateLimit,
    /// Refuse data-wire clients that do not ask for encrypted records
    /// (`replica serve --require-wire-encryption`).
    pub require_encryption: bool,
}

impl ServerAuth {
    pub fn new(key: ClusterKey) -> Self {
        ServerAuth {
            key,
            refusals: RateLimit::new(REFUSAL_LOG_PERIOD),
            require_encryption: false,
        }
    }

    /// The same, refusing data-wire clients without encryption when
    /// `require` is set.
    pub fn requiring_encryption(mut self, require: bool) -> Self {
        self.require_encryption = require;
        self
    }
}

/// How often a listener logs refused authentications.
pub const REFUSAL_LOG_PERIOD: Duration = Duration::from_secs(10);

/// Logs a refused peer at most once per [`REFUSAL_LOG_PERIOD`] per `limit`.
/// Never given key material: only the peer and the kind of failure.
pub fn log_refusal(limit: &RateLimit, listener: &str, peer: &str, why: &dyn std::fmt::Display) {
    if let Some(held) = limit.allow() {
        tracing::warn!(listener, %peer, suppressed = held, "refused a peer: {why}");
    }
}

/// Peeks until `buf` is full, the peer closes or [`HANDSHAKE_TIMEOUT`]
/// passes; returns how many bytes were seen.
pub async fn peek_up_to(sock: &tokio::net::TcpStream, buf: &mut [u8]) -> usize {
    let mut seen = 0;
    let _ = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        loop {
            match sock.peek(buf).await {
                Ok(n) if n > 0 && n < buf.len() => {
                    seen = n;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Ok(n) => {
                    seen = n;
                    return;
                }
                Err(_) => return,
            }
        }
    })
    .await;
    seen
}

/// Warns when a server listens beyond loopback without a cluster key.
pub fn warn_if_open(server: &str, addr: std::net::SocketAddr, key: Option<&ClusterKey>) {
    if key.is_none() && !addr.ip().is_loopback() {
        tracing::warn!(%addr, "{server} listens on a non-loopback address without a cluster key: anyone who can reach it can read and change volumes (see `strata key init` and --cluster-key-file)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_lets_one_line_per_period() {
        let limit = RateLimit::new(Duration::from_secs(60));
        assert_eq!(limit.allow(), Some(0));
        assert_eq!(limit.allow(), None);
        assert_eq!(limit.allow(), None);
    }
}
