//! The pre-shared key of NBD over TLS: where it comes from and the file
//! clients read it from.
//!
//! With a cluster key, every volume has its own 32-byte PSK derived from
//! it ([`derive_psk`]): a PSK handed out for one volume opens no other, and
//! reveals nothing about the cluster key. The identity the client names is
//! a user name (default [`DEFAULT_USERNAME`]), checked by the server.
//!
//! Clients read the key from a GnuTLS `psktool` file, one `username:hexkey`
//! line per user ([`psk_file_text`]): qemu's `tls-creds-psk` object reads
//! `keys.psk` in its `dir`, libnbd's `tls-psk-file=` (and `nbds://` URIs)
//! the file itself. The key is never logged.

use strata_replica::auth::ClusterKey;

/// [`ClusterKey::derive`] context of a volume's NBD TLS PSK.
pub const DERIVE_PSK: &str = "strata 2026-11 NBD TLS pre-shared key of a volume v1";
/// The PSK identity the server accepts unless told otherwise.
pub const DEFAULT_USERNAME: &str = "strata";
/// Length of the key in bytes.
pub const PSK_LEN: usize = 32;

/// A TLS pre-shared key and the identity it belongs to. `Debug` hides the
/// key.
#[derive(Clone, PartialEq, Eq)]
pub struct Psk {
    pub identity: String,
    pub key: [u8; PSK_LEN],
}

impl std::fmt::Debug for Psk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Psk {{ identity: {:?}, key: <hidden> }}", self.identity)
    }
}

/// Why a PSK identity cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PskError {
    #[error("The TLS PSK user name {0:?} is not usable: 1 to 64 of A-Z a-z 0-9 . _ - (a psktool file line is `name:hexkey`)")]
    BadUsername(String),
}

/// True for a user name that fits a psktool line and a URI's user part.
pub fn valid_username(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The 32-byte NBD TLS key of `volume`, derived from the cluster key. The
/// same key and volume always give the same PSK; another volume or key
/// gives an unrelated one.
pub fn derive_psk(key: &ClusterKey, volume: &str) -> [u8; PSK_LEN] {
    key.derive(DERIVE_PSK, volume.as_bytes())
}

impl Psk {
    /// The PSK of `volume` for `username`.
    pub fn derived(key: &ClusterKey, volume: &str, username: &str) -> Result<Psk, PskError> {
        if !valid_username(username) {
            return Err(PskError::BadUsername(username.to_string()));
        }
        Ok(Psk {
            identity: username.to_string(),
            key: derive_psk(key, volume),
        })
    }

    /// The psktool line `identity:hexkey` (with a newline). Holds the key:
    /// only for a user who asked.
    pub fn file_text(&self) -> String {
        let mut s = String::with_capacity(self.identity.len() + 2 + 2 * PSK_LEN);
        s.push_str(&self.identity);
        s.push(':');
        for b in self.key {
            s.push_str(&format!("{b:02x}"));
        }
        s.push('\n');
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_psk_is_per_volume_and_per_key() {
        let key = ClusterKey::from_bytes([7; 32]);
        let a = Psk::derived(&key, "pg-data", "strata").unwrap();
        assert_eq!(a, Psk::derived(&key, "pg-data", "strata").unwrap());
        assert_ne!(a.key, derive_psk(&key, "pg-logs"));
        assert_ne!(
            a.key,
            derive_psk(&ClusterKey::from_bytes([8; 32]), "pg-data")
        );
        // Not the CHAP secrets' derivation.
        let chap = crate::frontend::iscsi::ChapConfig::derived(&key, "pg-data");
        let hex = a.file_text();
        assert!(!hex.contains(&String::from_utf8_lossy(&chap.initiator.secret).to_string()));
        assert!(!format!("{a:?}").contains(&hex[7..20]));
    }

    #[test]
    fn file_text_is_a_psktool_line() {
        let psk = Psk {
            identity: "alice".into(),
            key: [0xab; 32],
        };
        let line = psk.file_text();
        assert_eq!(line, format!("alice:{}\n", "ab".repeat(32)));
    }

    #[test]
    fn usernames() {
        for ok in ["strata", "a", "node-1.x_y"] {
            assert!(valid_username(ok), "{ok}");
        }
        let long = "x".repeat(65);
        for bad in ["", "a:b", "a b", "é", long.as_str(), "a\nb"] {
            assert!(!valid_username(bad), "{bad:?}");
            let key = ClusterKey::from_bytes([1; 32]);
            assert!(Psk::derived(&key, "v", bad).is_err());
        }
    }
}
