//! How every object but `config` is stored: compressed with zstd, then
//! either encrypted and authenticated with XChaCha20-Poly1305 (a target with
//! a key) or followed by a keyed BLAKE3 checksum (a target without one).
//! Chunks are named by a keyed BLAKE3 hash of their plaintext
//! ([`Keys::chunk_id`]), so the store never learns their content and two
//! volumes holding the same data produce the same names.
//!
//! Object layout (all integers little-endian):
//!
//! ```text
//! 0   4  magic "STRB"
//! 4   1  version (1)
//! 5   1  kind (1 chunk, 2 index page, 3 manifest, 4 pack index)
//! 6   1  flags (bit 0: zstd, bit 1: encrypted)
//! 7   1  reserved (0)
//! 8   4  plaintext length
//! 12     encrypted:   24-byte nonce, ciphertext, 16-byte tag
//!        unencrypted: payload, 32-byte keyed BLAKE3 of (name, header, payload)
//! ```
//!
//! The object's name (its key) is bound in: the associated data of the AEAD,
//! or the input of the checksum; an object copied under another name fails
//! to open. Opening never allocates more than the plaintext length, which
//! the caller bounds per kind.

use std::borrow::Cow;

use bytes::Bytes;

use crate::xchacha::{XChaCha20Poly1305, NONCE, TAG};

pub const MAGIC: &[u8; 4] = b"STRB";
const VERSION: u8 = 1;
const HEADER: usize = 12;
const SUM: usize = 32;
const FLAG_ZSTD: u8 = 1;
const FLAG_ENCRYPTED: u8 = 2;
/// Blocks sampled by the compressibility probe of [`Keys::compress`].
pub const PROBE_BLOCKS: usize = 32;
/// Bytes per sampled block.
pub const PROBE_BLOCK: usize = 1024;
/// The probe must save at least 1/this of the sample.
pub const PROBE_MIN_GAIN: usize = 32;

/// What an object holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Chunk = 1,
    IndexPage = 2,
    Manifest = 3,
    /// A list of where chunks lie in packs (`pack.rs`).
    PackIndex = 4,
}

/// A chunk's or index page's name: the keyed hash of its plaintext.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectId(pub [u8; 32]);

impl ObjectId {
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }
    pub fn from_hex(s: &str) -> Option<Self> {
        let mut b = [0u8; 32];
        hex::decode_to_slice(s, &mut b).ok()?;
        Some(Self(b))
    }
}

impl std::fmt::Debug for ObjectId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.hex()[..16])
    }
}

/// The keys of one target, derived from its `config` object (and the
/// user's key when the target is encrypted).
pub struct Keys {
    hash_key: [u8; 32],
    sum_key: [u8; 32],
    aead: Option<XChaCha20Poly1305>,
    level: i32,
}

impl Keys {
    /// `hash_key` names chunks; `enc_key` (encrypted targets) seals objects.
    pub fn new(hash_key: [u8; 32], enc_key: Option<[u8; 32]>) -> Self {
        Self {
            hash_key,
            sum_key: blake3::derive_key("strata-backup v1 object checksum", &hash_key),
            aead: enc_key.map(XChaCha20Poly1305::new),
            level: 3,
        }
    }

    /// The keyed hash naming `data`.
    pub fn chunk_id(&self, data: &[u8]) -> ObjectId {
        ObjectId(*blake3::keyed_hash(&self.hash_key, data).as_bytes())
    }

    fn checksum(&self, name: &str, header_and_payload: &[u8]) -> [u8; 32] {
        let mut h = blake3::Hasher::new_keyed(&self.sum_key);
        h.update(&(name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update(header_and_payload);
        *h.finalize().as_bytes()
    }

    /// Compresses and seals `plain` as object `name`.
    pub fn seal(&self, kind: Kind, name: &str, plain: &[u8]) -> Result<Vec<u8>, String> {
        let compressed = self.compress(plain)?;
        self.seal_compressed(kind, name, plain, compressed.as_deref())
    }

    /// The zstd form of `plain`, or None when it does not get smaller
    /// (random or encrypted data: the object then stores `plain` as is).
    ///
    /// A large `plain` is first probed: [`PROBE_BLOCKS`] blocks of
    /// [`PROBE_BLOCK`] bytes spread over it are compressed together, and if
    /// they save less than 1/[`PROBE_MIN_GAIN`] the whole is stored as is
    /// without being compressed. On incompressible data (the benchmark's,
    /// and any already compressed or encrypted file system content) the
    /// probe costs 1/32 of compressing the chunk; data that compresses
    /// anywhere in the probe is compressed whole as before.
    pub fn compress(&self, plain: &[u8]) -> Result<Option<Vec<u8>>, String> {
        let zstd = |data: &[u8]| {
            zstd::bulk::compress(data, self.level)
                .map_err(|e| format!("zstd compression failed: {e}"))
        };
        if plain.len() >= 4 * PROBE_BLOCKS * PROBE_BLOCK {
            let stride = plain.len() / PROBE_BLOCKS;
            let mut sample = Vec::with_capacity(PROBE_BLOCKS * PROBE_BLOCK);
            for i in 0..PROBE_BLOCKS {
                sample.extend_from_slice(&plain[i * stride..i * stride + PROBE_BLOCK]);
            }
            let probe = zstd(&sample)?;
            if probe.len() + sample.len() / PROBE_MIN_GAIN >= sample.len() {
                return Ok(None);
            }
        }
        let compressed = zstd(plain)?;
        Ok((compressed.len() < plain.len()).then_some(compressed))
    }

    /// Seals object `name` holding `plain`, stored as `compressed` when
    /// given (from [`Keys::compress`]).
    pub fn seal_compressed(
        &self,
        kind: Kind,
        name: &str,
        plain: &[u8],
        compressed: Option<&[u8]>,
    ) -> Result<Vec<u8>, String> {
        let raw_len = u32::try_from(plain.len()).map_err(|_| "object too large".to_string())?;
        let (flags, payload) = match compressed {
            Some(c) => (FLAG_ZSTD, c),
            None => (0, plain),
        };
        let mut out = Vec::with_capacity(HEADER + NONCE + payload.len() + SUM);
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        out.push(kind as u8);
        match &self.aead {
            Some(aead) => {
                out.push(flags | FLAG_ENCRYPTED);
                out.push(0);
                out.extend_from_slice(&raw_len.to_le_bytes());
                let nonce: [u8; NONCE] = rand::random();
                let mut aad = Vec::with_capacity(HEADER + name.len());
                aad.extend_from_slice(&out[..HEADER]);
                aad.extend_from_slice(name.as_bytes());
                out.extend_from_slice(&nonce);
                // Encrypted in place in the object being built: no second
                // buffer and no copy of the ciphertext.
                let at = out.len();
                out.extend_from_slice(payload);
                let tag = aead.seal_in_place(&nonce, &aad, &mut out[at..])?;
                out.extend_from_slice(&tag);
            }
            None => {
                out.push(flags);
                out.push(0);
                out.extend_from_slice(&raw_len.to_le_bytes());
                out.extend_from_slice(payload);
                let sum = self.checksum(name, &out);
                out.extend_from_slice(&sum);
            }
        }
        Ok(out)
    }

    /// Checks, decrypts and decompresses object `name`; its plaintext must
    /// be at most `max_len` bytes. The error says what is wrong, for a
    /// [`crate::BackupError::Corrupt`] naming the object.
    pub fn open(
        &self,
        kind: Kind,
        name: &str,
        obj: &[u8],
        max_len: usize,
    ) -> Result<Bytes, String> {
        let opened = self.authenticate(kind, name, Cow::Borrowed(obj), max_len)?;
        Self::decompress(opened)
    }

    /// The first half of [`Keys::open`]: checks the header and the tag (or
    /// checksum) and decrypts; nothing of the object is trusted before this
    /// returns Ok. An owned `obj` is decrypted in place (no copy).
    pub fn authenticate<'o>(
        &self,
        kind: Kind,
        name: &str,
        obj: Cow<'o, [u8]>,
        max_len: usize,
    ) -> Result<Opened<'o>, String> {
        if obj.len() < HEADER {
            return Err(format!("truncated: {} bytes", obj.len()));
        }
        if &obj[..4] != MAGIC {
            return Err("bad magic".into());
        }
        if obj[4] != VERSION {
            return Err(format!("unknown version {}", obj[4]));
        }
        if obj[5] != kind as u8 {
            return Err(format!("holds kind {}, expected {}", obj[5], kind as u8));
        }
        let flags = obj[6];
        if flags & !(FLAG_ZSTD | FLAG_ENCRYPTED) != 0 || obj[7] != 0 {
            return Err(format!("unknown flags {flags:#x}"));
        }
        let raw_len = u32::from_le_bytes([obj[8], obj[9], obj[10], obj[11]]) as usize;
        if raw_len > max_len {
            return Err(format!(
                "declares {raw_len} bytes, more than the {max_len} allowed"
            ));
        }
        let (buf, start, end) = match (&self.aead, flags & FLAG_ENCRYPTED != 0) {
            (Some(aead), true) => {
                if obj.len() < HEADER + NONCE + TAG {
                    return Err(format!("truncated: {} bytes", obj.len()));
                }
                let mut aad = Vec::with_capacity(HEADER + name.len());
                aad.extend_from_slice(&obj[..HEADER]);
                aad.extend_from_slice(name.as_bytes());
                let mut buf = obj.into_owned();
                let (start, end) = (HEADER + NONCE, buf.len() - TAG);
                let nonce: [u8; NONCE] = buf[HEADER..start].try_into().expect("NONCE bytes");
                let tag: [u8; TAG] = buf[end..].try_into().expect("TAG bytes");
                aead.open_in_place(&nonce, &aad, &mut buf[start..end], &tag)
                    .map_err(|_| "authentication tag mismatch (damaged or altered)".to_string())?;
                (Cow::Owned(buf), start, end)
            }
            (None, false) => {
                if obj.len() < HEADER + SUM {
                    return Err(format!("truncated: {} bytes", obj.len()));
                }
                let end = obj.len() - SUM;
                if self.checksum(name, &obj[..end]) != obj[end..] {
                    return Err("checksum mismatch (damaged or truncated)".into());
                }
                (obj, HEADER, end)
            }
            (None, true) => return Err("is encrypted but the target is not".into()),
            (Some(_), false) => return Err("is not encrypted but the target is".into()),
        };
        Ok(Opened {
            zstd: flags & FLAG_ZSTD != 0,
            raw_len,
            buf,
            start,
            end,
        })
    }

    /// The second half of [`Keys::open`]: the plaintext of an authenticated
    /// object.
    pub fn decompress(opened: Opened<'_>) -> Result<Bytes, String> {
        let raw_len = opened.raw_len;
        let (start, end) = (opened.start, opened.end);
        let plain = if opened.zstd {
            Bytes::from(
                zstd::bulk::decompress(&opened.buf[start..end], raw_len)
                    .map_err(|e| format!("zstd decompression failed: {e}"))?,
            )
        } else {
            match opened.buf {
                // Stored as is: the plaintext is the payload, a view of the
                // buffer it was decrypted in (no copy).
                Cow::Owned(buf) => Bytes::from(buf).slice(start..end),
                Cow::Borrowed(b) => Bytes::copy_from_slice(&b[start..end]),
            }
        };
        if plain.len() != raw_len {
            return Err(format!(
                "holds {} bytes, header says {raw_len}",
                plain.len()
            ));
        }
        Ok(plain)
    }
}

/// An authenticated (and decrypted) object: its payload is
/// `buf[start..end]`, still compressed when `zstd`.
pub struct Opened<'o> {
    zstd: bool,
    raw_len: usize,
    buf: Cow<'o, [u8]>,
    start: usize,
    end: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn both() -> [Keys; 2] {
        [Keys::new([7; 32], None), Keys::new([7; 32], Some([9; 32]))]
    }

    #[test]
    fn round_trip_and_tamper() {
        for k in both() {
            for data in [
                vec![0u8; 5000],
                (0..5000u32).map(|i| (i * 7919) as u8).collect(),
            ] {
                let obj = k.seal(Kind::Chunk, "chunks/x", &data).unwrap();
                assert_eq!(
                    k.open(Kind::Chunk, "chunks/x", &obj, 1 << 20).unwrap(),
                    data
                );
                assert!(
                    k.open(Kind::Chunk, "chunks/y", &obj, 1 << 20).is_err(),
                    "name bound"
                );
                assert!(k.open(Kind::Manifest, "chunks/x", &obj, 1 << 20).is_err());
                assert!(
                    k.open(Kind::Chunk, "chunks/x", &obj, 100).is_err(),
                    "length bound"
                );
                for i in [0, 5, 9, HEADER + 1, obj.len() / 2, obj.len() - 1] {
                    let mut bad = obj.clone();
                    bad[i] ^= 0x10;
                    assert!(
                        k.open(Kind::Chunk, "chunks/x", &bad, 1 << 20).is_err(),
                        "flip at {i}"
                    );
                }
                for n in [0, 3, HEADER, obj.len() - 1] {
                    assert!(k.open(Kind::Chunk, "chunks/x", &obj[..n], 1 << 20).is_err());
                }
            }
        }
    }

    #[test]
    fn probe_stores_random_chunks_as_is_and_compresses_the_rest() {
        let k = Keys::new([7; 32], Some([9; 32]));
        let mut random = vec![0u8; 1 << 20];
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for b in random.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b.copy_from_slice(&x.to_le_bytes());
        }
        assert!(k.compress(&random).unwrap().is_none());
        // Text in 1/16 of the chunk (two probed blocks): the probe saves
        // more than 1/32, so the whole is compressed, and it round-trips.
        let mut mixed = random.clone();
        let stride = mixed.len() / PROBE_BLOCKS;
        for (i, b) in mixed[3 * stride..5 * stride].iter_mut().enumerate() {
            *b = b"strata block storage "[i % 21];
        }
        let c = k
            .compress(&mixed)
            .unwrap()
            .expect("compressible part found");
        assert!(c.len() < mixed.len() - stride);
        let obj = k.seal(Kind::Chunk, "c", &mixed).unwrap();
        assert!(obj.len() < mixed.len());
        assert_eq!(k.open(Kind::Chunk, "c", &obj, 1 << 20).unwrap(), mixed);
        // Small objects are not probed.
        assert!(k.compress(&[0u8; 4096]).unwrap().is_some());
    }

    /// Objects sealed before issue 20 (by the `chacha20poly1305` crate's
    /// `Aead::encrypt` in its own buffer, zstd without a probe) still open.
    #[test]
    fn opens_objects_sealed_the_old_way() {
        use chacha20poly1305::aead::{Aead, KeyInit, Payload};
        use chacha20poly1305::{XChaCha20Poly1305, XNonce};
        let (hash_key, enc_key) = ([7u8; 32], [9u8; 32]);
        let k = Keys::new(hash_key, Some(enc_key));
        let plain: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let compressed = zstd::bulk::compress(&plain, 3).unwrap();
        let mut obj = Vec::new();
        obj.extend_from_slice(MAGIC);
        obj.extend_from_slice(&[VERSION, Kind::Chunk as u8, FLAG_ZSTD | FLAG_ENCRYPTED, 0]);
        obj.extend_from_slice(&(plain.len() as u32).to_le_bytes());
        let nonce = [5u8; NONCE];
        let mut aad = obj.clone();
        aad.extend_from_slice(b"chunks/ab/old");
        let ct = XChaCha20Poly1305::new(&enc_key.into())
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: &compressed,
                    aad: &aad,
                },
            )
            .unwrap();
        obj.extend_from_slice(&nonce);
        obj.extend_from_slice(&ct);
        assert_eq!(
            k.open(Kind::Chunk, "chunks/ab/old", &obj, 1 << 20).unwrap(),
            plain
        );
        let opened = k
            .authenticate(Kind::Chunk, "chunks/ab/old", Cow::Owned(obj), 1 << 20)
            .unwrap();
        assert_eq!(Keys::decompress(opened).unwrap(), plain);
    }

    #[test]
    fn wrong_key_fails() {
        let a = Keys::new([1; 32], Some([2; 32]));
        let b = Keys::new([1; 32], Some([3; 32]));
        let obj = a.seal(Kind::Chunk, "c", b"hello").unwrap();
        assert!(b.open(Kind::Chunk, "c", &obj, 100).is_err());
        let plain = Keys::new([1; 32], None);
        assert!(plain.open(Kind::Chunk, "c", &obj, 100).is_err());
    }
}
