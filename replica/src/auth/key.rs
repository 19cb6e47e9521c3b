//! The cluster key: 32 random bytes, stored as 64 hex digits in a file of
//! mode 0600. Its `Debug` prints `ClusterKey(..)`; nothing prints its bytes.

use std::io::Write;
use std::path::{Path, PathBuf};

/// The shared secret of a cluster.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterKey([u8; 32]);

impl std::fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterKey(..)")
    }
}

/// Why a key file cannot be used or written.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("Cannot read the cluster key file {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "The cluster key file {path} is malformed: expected 64 hex digits (see `strata key init`)"
    )]
    Malformed { path: PathBuf },
    #[error("The cluster key file {path} already exists; not overwriting it")]
    Exists { path: PathBuf },
    #[error("Cannot write the cluster key file {path}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl ClusterKey {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        ClusterKey(bytes)
    }

    /// A new random key.
    pub fn generate() -> Self {
        ClusterKey(rand::random())
    }

    pub(crate) fn bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// A 32-byte secret for one purpose, derived from the key (BLAKE3
    /// `derive_key` over the key and `input`). `context` names the purpose
    /// and must be a fixed string unique to it (e.g. "strata 2026 iSCSI
    /// CHAP initiator secret v1"); different contexts or inputs give
    /// unrelated secrets, and none of them reveals the key.
    pub fn derive(&self, context: &'static str, input: &[u8]) -> [u8; 32] {
        let mut h = blake3::Hasher::new_derive_key(context);
        h.update(&self.0);
        h.update(input);
        *h.finalize().as_bytes()
    }

    /// Parses 64 hex digits (surrounding whitespace allowed).
    pub fn parse_hex(text: &str) -> Option<Self> {
        let text = text.trim();
        if text.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(ClusterKey(out))
    }

    fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The key as its file holds it: 64 hex digits and a newline (also
    /// the content of the Kubernetes Secret `deploy/` uses).
    pub fn file_text(&self) -> String {
        format!("{}\n", self.to_hex())
    }

    /// Reads the key file at `path`.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse_hex(&text).ok_or_else(|| KeyError::Malformed {
            path: path.to_path_buf(),
        })
    }

    /// Writes a new key file at `path` (mode 0600); refuses to overwrite.
    pub fn write_new(&self, path: &Path) -> Result<(), KeyError> {
        use std::os::unix::fs::OpenOptionsExt;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|source| {
                if source.kind() == std::io::ErrorKind::AlreadyExists {
                    KeyError::Exists {
                        path: path.to_path_buf(),
                    }
                } else {
                    KeyError::Write {
                        path: path.to_path_buf(),
                        source,
                    }
                }
            })?;
        writeln!(file, "{}", self.to_hex())
            .and_then(|()| file.sync_all())
            .map_err(|source| KeyError::Write {
                path: path.to_path_buf(),
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn key_file_round_trips_with_mode_0600_and_is_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        let key = ClusterKey::generate();
        key.write_new(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(ClusterKey::load(&path).unwrap(), key);
        assert!(matches!(
            ClusterKey::generate().write_new(&path),
            Err(KeyError::Exists { .. })
        ));
        assert_eq!(ClusterKey::load(&path).unwrap(), key);
    }

    #[test]
    fn malformed_or_missing_key_files_are_typed_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        assert!(matches!(
            ClusterKey::load(&path),
            Err(KeyError::Read { .. })
        ));
        std::fs::write(&path, "abcd").unwrap();
        assert!(matches!(
            ClusterKey::load(&path),
            Err(KeyError::Malformed { .. })
        ));
        std::fs::write(&path, "zz".repeat(32)).unwrap();
        assert!(matches!(
            ClusterKey::load(&path),
            Err(KeyError::Malformed { .. })
        ));
    }

    #[test]
    fn derived_secrets_depend_on_key_context_and_input() {
        let a = ClusterKey::from_bytes([1; 32]);
        let b = ClusterKey::from_bytes([2; 32]);
        let d = a.derive("strata test context one", b"vol");
        assert_eq!(d, a.derive("strata test context one", b"vol"));
        assert_ne!(d, b.derive("strata test context one", b"vol"));
        assert_ne!(d, a.derive("strata test context two", b"vol"));
        assert_ne!(d, a.derive("strata test context one", b"vol2"));
        assert_ne!(&d, a.bytes());
    }

    #[test]
    fn debug_never_shows_the_key() {
        let key = ClusterKey::from_bytes([0xab; 32]);
        let shown = format!("{key:?}");
        assert_eq!(shown, "ClusterKey(..)");
        assert!(!shown.contains("ab"));
    }
}
