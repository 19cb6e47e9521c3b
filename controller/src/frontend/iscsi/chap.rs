//! CHAP authentication (RFC 1994 with MD5, as RFC 7143 §12.1.3 uses it):
//! the secrets, where they come from, and the two computations.
//!
//! One-way CHAP: the target sends `CHAP_I` and a random `CHAP_C`; the
//! initiator answers `CHAP_N` (its user name) and
//! `CHAP_R = MD5(I || secret || C)`, which the target checks. Mutual CHAP:
//! the initiator also sends its own `CHAP_I`/`CHAP_C` and the target
//! answers with its user name and response over the mutual secret. The
//! target refuses a mutual challenge equal to its own (a reflection).
//!
//! Secrets come from a file (`--chap-file`, see [`ChapConfig::parse`]),
//! from the environment ([`ChapConfig::from_env`]) or from the cluster key
//! ([`ChapConfig::derived`]: per volume, so credentials handed out for one
//! volume open no other); they are never logged.

use md5::{Digest, Md5};
use strata_replica::auth::ClusterKey;

/// RFC 7143 §12.1.3: CHAP secrets must be at least 96 bits.
pub const MIN_SECRET: usize = 12;
/// Length of the challenges the target sends.
pub const CHALLENGE_LEN: usize = 16;
/// Longest challenge accepted from an initiator.
pub const MAX_CHALLENGE: usize = 1024;

/// Environment variables read by [`ChapConfig::from_env`].
pub const ENV_USER: &str = "STRATA_ISCSI_CHAP_USER";
pub const ENV_SECRET: &str = "STRATA_ISCSI_CHAP_SECRET";
pub const ENV_MUTUAL_USER: &str = "STRATA_ISCSI_CHAP_MUTUAL_USER";
pub const ENV_MUTUAL_SECRET: &str = "STRATA_ISCSI_CHAP_MUTUAL_SECRET";

/// A user name and its secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Credential {
    pub user: String,
    pub secret: Vec<u8>,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Credential {{ user: {:?}, secret: <hidden> }}",
            self.user
        )
    }
}

/// CHAP settings of the target: `initiator` is what an initiator must
/// prove; `mutual`, when set, is how the target proves itself to an
/// initiator that asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChapConfig {
    pub initiator: Credential,
    pub mutual: Option<Credential>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChapConfigError {
    #[error("Line {line}: expected `key = value`")]
    Syntax { line: usize },
    #[error("Line {line}: unknown key {key:?} (expected username, secret, mutual_username, mutual_secret)")]
    UnknownKey { line: usize, key: String },
    #[error("{0} is missing")]
    Missing(&'static str),
    #[error("The {0} is shorter than {MIN_SECRET} bytes")]
    ShortSecret(&'static str),
    #[error("mutual_username and mutual_secret go together")]
    HalfMutual,
    #[error("The mutual secret must differ from the initiator secret")]
    SameSecrets,
}

/// [`ClusterKey::derive`] contexts of the derived secrets: the one an
/// initiator proves, and the one the target proves back (mutual CHAP).
pub const DERIVE_INITIATOR: &str = "strata 2026-11 iSCSI CHAP initiator secret of a volume v1";
pub const DERIVE_TARGET: &str = "strata 2026-11 iSCSI CHAP target (mutual) secret of a volume v1";
/// Length of a derived secret: 16 characters of URL-safe base64 holding 96
/// bits, RFC 7143's minimum, and the longest secret the Microsoft
/// initiator accepts.
pub const DERIVED_SECRET_LEN: usize = 16;

/// The initiator user name of a volume's derived credentials.
pub fn derived_user(volume: &str) -> String {
    format!("strata-{volume}")
}

impl ChapConfig {
    /// The CHAP credentials of `volume` derived from the cluster key:
    /// initiator `strata-<volume>`, and mutual CHAP offered with the
    /// target's name as user. The same key and volume always give the same
    /// credentials; another volume or key gives unrelated ones.
    pub fn derived(key: &ClusterKey, volume: &str) -> ChapConfig {
        let secret = |context| {
            let d = key.derive(context, volume.as_bytes());
            encode_base64url(&d[..DERIVED_SECRET_LEN * 3 / 4]).into_bytes()
        };
        ChapConfig {
            initiator: Credential {
                user: derived_user(volume),
                secret: secret(DERIVE_INITIATOR),
            },
            mutual: Some(Credential {
                user: super::target_name(volume),
                secret: secret(DERIVE_TARGET),
            }),
        }
    }

    /// These settings in the `--chap-file` format ([`ChapConfig::parse`]
    /// reads it back). Holds the secrets: only for a user who asked.
    pub fn file_text(&self) -> String {
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        let mut out = format!(
            "username = {}\nsecret = {}\n",
            self.initiator.user,
            text(&self.initiator.secret)
        );
        if let Some(m) = &self.mutual {
            out.push_str(&format!(
                "mutual_username = {}\nmutual_secret = {}\n",
                m.user,
                text(&m.secret)
            ));
        }
        out
    }

    /// Parses a CHAP file:
    ///
    /// ```text
    /// # comments and blank lines are ignored
    /// username = initiator-user
    /// secret = at-least-12-bytes
    /// mutual_username = target-user        # optional, with mutual_secret
    /// mutual_secret = another-12-bytes
    /// ```
    pub fn parse(text: &str) -> Result<ChapConfig, ChapConfigError> {
        let (mut user, mut secret, mut muser, mut msecret) = (None, None, None, None);
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (k, v) = line
                .split_once('=')
                .ok_or(ChapConfigError::Syntax { line: i + 1 })?;
            let v = v.trim().to_string();
            match k.trim() {
                "username" => user = Some(v),
                "secret" => secret = Some(v),
                "mutual_username" => muser = Some(v),
                "mutual_secret" => msecret = Some(v),
                other => {
                    return Err(ChapConfigError::UnknownKey {
                        line: i + 1,
                        key: other.to_string(),
                    })
                }
            }
        }
        ChapConfig::from_parts(user, secret, muser, msecret)
    }

    /// Reads [`ENV_USER`], [`ENV_SECRET`] and optionally
    /// [`ENV_MUTUAL_USER`], [`ENV_MUTUAL_SECRET`]; `Ok(None)` when neither
    /// user nor secret is set.
    pub fn from_env() -> Result<Option<ChapConfig>, ChapConfigError> {
        let get = |k| std::env::var(k).ok().filter(|v: &String| !v.is_empty());
        let (user, secret) = (get(ENV_USER), get(ENV_SECRET));
        if user.is_none() && secret.is_none() {
            return Ok(None);
        }
        ChapConfig::from_parts(user, secret, get(ENV_MUTUAL_USER), get(ENV_MUTUAL_SECRET)).map(Some)
    }

    fn from_parts(
        user: Option<String>,
        secret: Option<String>,
        muser: Option<String>,
        msecret: Option<String>,
    ) -> Result<ChapConfig, ChapConfigError> {
        let user = user.ok_or(ChapConfigError::Missing("username"))?;
        let secret = secret.ok_or(ChapConfigError::Missing("secret"))?;
        if secret.len() < MIN_SECRET {
            return Err(ChapConfigError::ShortSecret("secret"));
        }
        let mutual = match (muser, msecret) {
            (None, None) => None,
            (Some(u), Some(s)) => {
                if s.len() < MIN_SECRET {
                    return Err(ChapConfigError::ShortSecret("mutual secret"));
                }
                if s == secret {
                    return Err(ChapConfigError::SameSecrets);
                }
                Some(Credential {
                    user: u,
                    secret: s.into_bytes(),
                })
            }
            _ => return Err(ChapConfigError::HalfMutual),
        };
        Ok(ChapConfig {
            initiator: Credential {
                user,
                secret: secret.into_bytes(),
            },
            mutual,
        })
    }
}

/// `MD5(id || secret || challenge)`.
pub fn response(id: u8, secret: &[u8], challenge: &[u8]) -> [u8; 16] {
    let mut h = Md5::new();
    h.update([id]);
    h.update(secret);
    h.update(challenge);
    h.finalize().into()
}

/// Compares without an early exit on the first differing byte.
pub fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Encodes binary as `0x` + hex (RFC 7143 §6.1 binary-value).
pub fn encode_hex(b: &[u8]) -> String {
    let mut s = String::with_capacity(2 + 2 * b.len());
    s.push_str("0x");
    for x in b {
        s.push_str(&format!("{x:02x}"));
    }
    s
}

/// RFC 4648 §5 base64 (URL- and file-safe alphabet), no padding.
fn encode_base64url(b: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(b.len().div_ceil(3) * 4);
    for chunk in b.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, x)| acc | (*x as u32) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

/// Decodes a binary value: `0x`/`0X` hex or `0b`/`0B` base64; `None` if
/// malformed or longer than `max` bytes.
pub fn decode_binary(s: &str, max: usize) -> Option<Vec<u8>> {
    let (prefix, body) = (s.get(..2)?, s.get(2..)?);
    match prefix {
        "0x" | "0X" => {
            let body = body.as_bytes();
            // An odd number of digits has an implied leading zero.
            let odd = body.len() % 2;
            let n = body.len().div_ceil(2);
            if n == 0 || n > max {
                return None;
            }
            let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
            let mut out = Vec::with_capacity(n);
            if odd == 1 {
                out.push(digit(body[0])?);
            }
            for pair in body[odd..].chunks(2) {
                out.push(digit(pair[0])? << 4 | digit(pair[1])?);
            }
            Some(out)
        }
        "0b" | "0B" => decode_base64(body, max),
        _ => None,
    }
}

fn decode_base64(s: &str, max: usize) -> Option<Vec<u8>> {
    let s = s.trim_end_matches('=');
    if s.is_empty() || s.len() / 4 * 3 > max + 3 {
        return None;
    }
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes() {
        acc = acc << 6 | val(c)?;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    (out.len() <= max && !out.is_empty()).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn md5_response_known_value() {
        // MD5 of the empty string, as a sanity check of the primitive.
        let h: [u8; 16] = Md5::new().finalize().into();
        assert_eq!(encode_hex(&h), "0xd41d8cd98f00b204e9800998ecf8427e");
        let r = response(1, b"secretsecret", &[1, 2, 3]);
        let mut h = Md5::new();
        h.update([
            1u8, b's', b'e', b'c', b'r', b'e', b't', b's', b'e', b'c', b'r', b'e', b't', 1, 2, 3,
        ]);
        let want: [u8; 16] = h.finalize().into();
        assert_eq!(r, want);
    }

    #[test]
    fn binary_values() {
        assert_eq!(decode_binary("0x0a0B", 16), Some(vec![0x0a, 0x0b]));
        assert_eq!(decode_binary("0xabc", 16), Some(vec![0x0a, 0xbc]));
        assert_eq!(decode_binary("0x", 16), None);
        assert_eq!(decode_binary("0xzz", 16), None);
        assert_eq!(decode_binary("0x0102", 1), None);
        assert_eq!(decode_binary("0bAQID", 16), Some(vec![1, 2, 3]));
        assert_eq!(decode_binary("0bAQI=", 16), Some(vec![1, 2]));
        assert_eq!(decode_binary("0b!!", 16), None);
        assert_eq!(decode_binary("12", 16), None);
        assert_eq!(decode_binary("", 16), None);
        assert_eq!(decode_binary("é", 16), None);
        assert!(same(b"abc", b"abc") && !same(b"abc", b"abd") && !same(b"ab", b"abc"));
    }

    #[test]
    fn base64url() {
        assert_eq!(encode_base64url(b""), "");
        assert_eq!(encode_base64url(b"f"), "Zg");
        assert_eq!(encode_base64url(b"fo"), "Zm8");
        assert_eq!(encode_base64url(b"foo"), "Zm9v");
        assert_eq!(encode_base64url(b"foobar"), "Zm9vYmFy");
        assert_eq!(encode_base64url(&[0xfb, 0xff, 0xbf]), "-_-_");
        // The standard alphabet agrees except for the last two characters.
        let enc = encode_base64url(&[1, 2, 3, 4]);
        assert_eq!(enc, "AQIDBA");
        assert_eq!(
            decode_binary(&format!("0b{enc}"), 16),
            Some(vec![1, 2, 3, 4])
        );
    }

    #[test]
    fn derived_credentials() {
        let key = ClusterKey::from_bytes([7; 32]);
        let other = ClusterKey::from_bytes([8; 32]);
        let c = ChapConfig::derived(&key, "pg-data");
        // Deterministic: every process with the key derives the same.
        assert_eq!(c, ChapConfig::derived(&key, "pg-data"));
        assert_eq!(c.initiator.user, "strata-pg-data");
        let m = c.mutual.clone().expect("mutual CHAP is offered");
        assert_eq!(m.user, "iqn.2026-11.io.strata:pg-data");
        for s in [&c.initiator.secret, &m.secret] {
            assert_eq!(s.len(), DERIVED_SECRET_LEN);
            assert!(s.len() >= MIN_SECRET);
            assert!(s
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_'));
        }
        assert_ne!(c.initiator.secret, m.secret);
        // Per volume and per key.
        for d in [
            ChapConfig::derived(&key, "pg-data2"),
            ChapConfig::derived(&key, "PG-data"),
            ChapConfig::derived(&other, "pg-data"),
        ] {
            assert_ne!(d.initiator.secret, c.initiator.secret);
            assert_ne!(d.mutual.unwrap().secret, m.secret);
        }
        // Valid by the file rules, and the file text reads back the same.
        assert_eq!(ChapConfig::parse(&c.file_text()), Ok(c.clone()));
        // Never in Debug.
        let shown = format!("{c:?}");
        assert!(!shown.contains(&String::from_utf8_lossy(&c.initiator.secret).into_owned()));
        assert!(!shown.contains(&String::from_utf8_lossy(&m.secret).into_owned()));
    }

    #[test]
    fn derived_secret_known_value() {
        const PINNED: &str = "6BjM9UYayjHHY4rP";
        // Pins the derivation: a change would lock out every initiator
        // configured with printed credentials.
        let key = ClusterKey::from_bytes([0x42; 32]);
        let d = key.derive(DERIVE_INITIATOR, b"vol");
        let want = encode_base64url(&d[..12]);
        let c = ChapConfig::derived(&key, "vol");
        assert_eq!(c.initiator.secret, want.as_bytes());
        assert_eq!(String::from_utf8_lossy(&c.initiator.secret), PINNED);
    }

    #[test]
    fn config_file() {
        let ok = "# c\nusername = alice\nsecret = 0123456789ab\n\n";
        let c = ChapConfig::parse(ok).unwrap();
        assert_eq!(c.initiator.user, "alice");
        assert_eq!(c.initiator.secret, b"0123456789ab");
        assert!(c.mutual.is_none());
        assert!(!format!("{c:?}").contains("0123456789ab"));
        let m = format!("{ok}mutual_username = tgt\nmutual_secret = ba9876543210\n");
        assert_eq!(ChapConfig::parse(&m).unwrap().mutual.unwrap().user, "tgt");
        let cases = [
            ("username = a\n", ChapConfigError::Missing("secret")),
            ("username = a\nsecret = short\n", ChapConfigError::ShortSecret("secret")),
            ("nonsense\n", ChapConfigError::Syntax { line: 1 }),
            (
                "user = a\n",
                ChapConfigError::UnknownKey {
                    line: 1,
                    key: "user".into(),
                },
            ),
            (
                "username = a\nsecret = 0123456789ab\nmutual_username = b\n",
                ChapConfigError::HalfMutual,
            ),
            (
                "username = a\nsecret = 0123456789ab\nmutual_username = b\nmutual_secret = 0123456789ab\n",
                ChapConfigError::SameSecrets,
            ),
        ];
        for (text, want) in cases {
            assert_eq!(ChapConfig::parse(text), Err(want), "{text}");
        }
    }
}
