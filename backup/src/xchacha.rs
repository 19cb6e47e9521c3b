//! XChaCha20-Poly1305, the cipher of every encrypted object, computed with
//! aws-lc-rs's ChaCha20-Poly1305 (its assembly opened 1 MiB 1.9× faster
//! than the portable Rust implementation this format was first written
//! with: `open_speed` below, BENCHMARKS.md "Backups against restic").
//!
//! XChaCha20-Poly1305 (draft-irtf-cfrg-xchacha) is ChaCha20-Poly1305 under a
//! subkey: `HChaCha20(key, nonce[0..16])`, with the 12-byte nonce
//! `0000 || nonce[16..24]`. The output is the same bytes the `chacha20poly1305`
//! crate's `XChaCha20Poly1305` produces, so objects written by earlier
//! releases open unchanged (tested against it below).

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, Tag, UnboundKey, CHACHA20_POLY1305};
use chacha20::cipher::consts::U10;
use chacha20::hchacha;

/// Bytes of an XChaCha20 nonce.
pub const NONCE: usize = 24;
/// Bytes of the Poly1305 tag.
pub const TAG: usize = 16;

/// The authentication tag did not match: damaged or altered data, or the
/// wrong key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TagMismatch;

/// An XChaCha20-Poly1305 key.
pub struct XChaCha20Poly1305 {
    key: [u8; 32],
}

impl XChaCha20Poly1305 {
    pub fn new(key: [u8; 32]) -> Self {
        Self { key }
    }

    /// The ChaCha20-Poly1305 key and nonce this object's `nonce` selects.
    fn inner(&self, nonce: &[u8; NONCE]) -> (LessSafeKey, Nonce) {
        let sub = hchacha::<U10>(&self.key.into(), nonce[..16].into());
        let key = UnboundKey::new(&CHACHA20_POLY1305, &sub)
            .expect("ChaCha20-Poly1305 takes a 32-byte key");
        let mut n = [0u8; 12];
        n[4..].copy_from_slice(&nonce[16..]);
        (LessSafeKey::new(key), Nonce::assume_unique_for_key(n))
    }

    /// Encrypts `buf` in place; returns the tag. Fails only for a `buf`
    /// longer than ChaCha20's 256 GiB (objects are at most 16 MiB).
    pub fn seal_in_place(
        &self,
        nonce: &[u8; NONCE],
        aad: &[u8],
        buf: &mut [u8],
    ) -> Result<[u8; TAG], &'static str> {
        let (key, n) = self.inner(nonce);
        let tag: Tag = key
            .seal_in_place_separate_tag(n, Aad::from(aad), buf)
            .map_err(|_| "encryption failed")?;
        let mut out = [0u8; TAG];
        out.copy_from_slice(tag.as_ref());
        Ok(out)
    }

    /// Checks `tag` over `aad` and the ciphertext `buf`, decrypting `buf` in
    /// place. On a mismatch `buf` holds garbage: the caller discards it.
    pub fn open_in_place(
        &self,
        nonce: &[u8; NONCE],
        aad: &[u8],
        buf: &mut [u8],
        tag: &[u8; TAG],
    ) -> Result<(), TagMismatch> {
        let (key, n) = self.inner(nonce);
        key.open_in_place_separate_tag(n, Aad::from(aad), tag, buf)
            .map(|_| ())
            .map_err(|_| TagMismatch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chacha20poly1305::aead::{AeadInPlace, KeyInit};

    /// The reference: the `chacha20poly1305` crate, which wrote every
    /// encrypted object before this module.
    fn reference(key: &[u8; 32]) -> chacha20poly1305::XChaCha20Poly1305 {
        chacha20poly1305::XChaCha20Poly1305::new(key.into())
    }

    #[test]
    fn same_bytes_as_the_reference_both_ways() {
        for len in [0usize, 1, 15, 16, 63, 64, 65, 255, 4096, 100_000, 1 << 20] {
            let key: [u8; 32] = rand::random();
            let nonce: [u8; NONCE] = rand::random();
            let aad = format!("aad of {len}");
            let plain: Vec<u8> = (0..len).map(|i| (i * 31 + len) as u8).collect();

            let mut ours = plain.clone();
            let tag = XChaCha20Poly1305::new(key)
                .seal_in_place(&nonce, aad.as_bytes(), &mut ours)
                .unwrap();
            let mut theirs = plain.clone();
            let their_tag = reference(&key)
                .encrypt_in_place_detached((&nonce).into(), aad.as_bytes(), &mut theirs)
                .unwrap();
            assert_eq!(ours, theirs, "ciphertext, {len} bytes");
            assert_eq!(tag.as_slice(), their_tag.as_slice(), "tag, {len} bytes");

            // What the reference sealed, this opens, and the reverse.
            XChaCha20Poly1305::new(key)
                .open_in_place(&nonce, aad.as_bytes(), &mut theirs, &tag)
                .unwrap();
            assert_eq!(theirs, plain);
            reference(&key)
                .decrypt_in_place_detached(
                    (&nonce).into(),
                    aad.as_bytes(),
                    &mut ours,
                    (&tag).into(),
                )
                .unwrap();
            assert_eq!(ours, plain);
        }
    }

    #[test]
    fn a_changed_bit_anywhere_is_refused() {
        let key: [u8; 32] = rand::random();
        let nonce: [u8; NONCE] = rand::random();
        let c = XChaCha20Poly1305::new(key);
        let mut sealed = vec![7u8; 1000];
        let tag = c.seal_in_place(&nonce, b"name", &mut sealed).unwrap();
        let open = |n: &[u8; NONCE], aad: &[u8], data: &[u8], t: &[u8; TAG]| {
            c.open_in_place(n, aad, &mut data.to_vec(), t)
        };
        assert_eq!(open(&nonce, b"name", &sealed, &tag), Ok(()));
        let mut bad = sealed.clone();
        bad[500] ^= 1;
        assert_eq!(open(&nonce, b"name", &bad, &tag), Err(TagMismatch));
        let mut t = tag;
        t[0] ^= 1;
        assert_eq!(open(&nonce, b"name", &sealed, &t), Err(TagMismatch));
        let mut n = nonce;
        n[3] ^= 1; // in the HChaCha20 half
        assert_eq!(open(&n, b"name", &sealed, &tag), Err(TagMismatch));
        let mut n = nonce;
        n[20] ^= 1; // in the ChaCha20 half
        assert_eq!(open(&n, b"name", &sealed, &tag), Err(TagMismatch));
        assert_eq!(open(&nonce, b"nbme", &sealed, &tag), Err(TagMismatch));
        assert_eq!(
            XChaCha20Poly1305::new([1; 32]).open_in_place(
                &nonce,
                b"name",
                &mut sealed.clone(),
                &tag
            ),
            Err(TagMismatch)
        );
    }
}

/// Not a check: how fast each implementation opens a 1 MiB object
/// (`cargo test --release -p strata-backup --lib -- --ignored --nocapture
/// open_speed`; the figures are in BENCHMARKS.md).
#[cfg(test)]
#[test]
#[ignore]
fn open_speed() {
    use chacha20poly1305::aead::{AeadInPlace, KeyInit};
    let key: [u8; 32] = rand::random();
    let nonce: [u8; NONCE] = rand::random();
    let mut buf = vec![5u8; 1 << 20];
    let ours = XChaCha20Poly1305::new(key);
    let tag = ours.seal_in_place(&nonce, b"aad", &mut buf).unwrap();
    let reference = chacha20poly1305::XChaCha20Poly1305::new((&key).into());
    let rounds = 2000;
    for round in 0..2 {
        let t = std::time::Instant::now();
        for _ in 0..rounds {
            let mut b = buf.clone();
            ours.open_in_place(&nonce, b"aad", &mut b, &tag).unwrap();
        }
        let a = t.elapsed();
        let t = std::time::Instant::now();
        for _ in 0..rounds {
            let mut b = buf.clone();
            reference
                .decrypt_in_place_detached((&nonce).into(), b"aad", &mut b, (&tag).into())
                .unwrap();
        }
        let b = t.elapsed();
        let t = std::time::Instant::now();
        for _ in 0..rounds {
            std::hint::black_box(buf.clone());
        }
        let copy = t.elapsed();
        let rate = |d: std::time::Duration| rounds as f64 / (d - copy).as_secs_f64();
        println!(
            "round {round}: open 1 MiB: aws-lc-rs {:.0} MiB/s, chacha20poly1305 crate {:.0} MiB/s",
            rate(a),
            rate(b)
        );
    }
}
