//! Records: the authenticated framing of a connection after its handshake.
//!
//! ```text
//! len u32 LE | payload (len ≤ MAX_RECORD bytes) | tag (16 bytes)
//! ```
//!
//! The tag depends on the [`RecordFormat`] the handshake agreed on:
//!
//! ```text
//! Gmac            tag = AES-256-GCM(direction key, nonce, aad = len | payload, plaintext = ∅)
//! Mac(Trailing)   tag = BLAKE3-keyed(direction key, payload | seq u64 LE | len u32 LE)[..16]
//! Mac(Leading)    tag = BLAKE3-keyed(direction key, seq u64 LE | len u32 LE | payload)[..16]
//! AesGcm          len | AES-256-GCM(direction key, nonce, aad = len, payload) | tag
//! nonce = 0u32 | seq u64 LE
//! ```
//!
//! `seq` is not sent: each side counts the records of a direction from 0.
//! The integrity formats leave the payload readable; the client asks for
//! every one it speaks in its hello and the server grants the fastest both
//! ends have: GMAC when both CPUs have AES and carry-less multiply
//! instructions (x86-64 since 2010, the arm64 servers, the Raspberry Pi
//! 5; not the Pi 4), else the trailing BLAKE3 tag, whose payload-first
//! input lets BLAKE3 use its SIMD code (2-3 times faster on 4 KiB records
//! than the leading layout, which strata's first keyed release speaks and
//! still gets). With [`WireMode::Encrypted`] the payload is encrypted
//! with AES-256-GCM.
//!
//! [`seal_record`] and [`open_record`] are the pure BLAKE3 functions;
//! [`RecordKey`] seals and opens every format, [`SealedRead`] and
//! [`SealedWrite`] run it under `AsyncRead`/`AsyncWrite`. A record that
//! fails its tag is an `InvalidData` error: the connection must close.
//!
//! The direction keys are fresh per connection (derived from both
//! handshake nonces and the format) and `seq` never repeats within a
//! direction, so an AES-GCM (key, nonce) pair is never used twice.
//! Sealing and opening work in place on the connection's buffers
//! ([`RecordKey::seal`], [`RecordKey::open`]): the payload is copied into
//! the output buffer once and checked (or decrypted) where it was read.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The largest payload of one record.
pub const MAX_RECORD: usize = 256 << 10;
pub const TAG_LEN: usize = 16;
const LEN_LEN: usize = 4;

/// Why bytes are not a valid record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("Record of {0} bytes exceeds the maximum")]
    TooLarge(usize),
    #[error("Record {0} failed its integrity check (forged, replayed, reordered or wrong key)")]
    BadTag(u64),
}

impl From<RecordError> for io::Error {
    fn from(e: RecordError) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }
}

/// Where a BLAKE3 record tag puts the record's sequence number and length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TagLayout {
    /// `seq | len | payload`: strata's first keyed release.
    Leading,
    /// `payload | seq | len`: the payload hashed from a chunk boundary.
    Trailing,
}

fn tag(key: &[u8; 32], layout: TagLayout, seq: u64, payload: &[u8]) -> [u8; TAG_LEN] {
    let mut h = blake3::Hasher::new_keyed(key);
    let mut suffix = [0u8; 12];
    suffix[..8].copy_from_slice(&seq.to_le_bytes());
    suffix[8..].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    match layout {
        TagLayout::Leading => {
            h.update(&suffix);
            h.update(payload);
        }
        TagLayout::Trailing => {
            h.update(payload);
            h.update(&suffix);
        }
    }
    h.finalize().as_bytes()[..TAG_LEN]
        .try_into()
        .expect("16 bytes")
}

/// Appends the integrity-only record of `parts` (concatenated, at most
/// [`MAX_RECORD`] bytes) with sequence number `seq` to `out`.
pub fn seal_record(
    key: &[u8; 32],
    layout: TagLayout,
    seq: u64,
    parts: &[&[u8]],
    out: &mut Vec<u8>,
) {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    debug_assert!(len <= MAX_RECORD);
    out.reserve(LEN_LEN + len + TAG_LEN);
    out.extend_from_slice(&(len as u32).to_le_bytes());
    let start = out.len();
    for p in parts {
        out.extend_from_slice(p);
    }
    let tag = tag(key, layout, seq, &out[start..]);
    out.extend_from_slice(&tag);
}

/// How a connection's records protect their payload. The client chooses
/// in its hello; the choice is bound into the handshake's proofs and
/// session keys, so it cannot be changed in transit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WireMode {
    /// Authenticated and integrity-checked (BLAKE3-keyed tag); the payload
    /// is readable on the network.
    #[default]
    Integrity,
    /// Authenticated and encrypted (AES-256-GCM).
    Encrypted,
}

/// What the records of one connection are, as its handshake agreed:
/// the user's [`WireMode`] and, for integrity, the tag's layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordFormat {
    /// BLAKE3-keyed tag: fast everywhere (SIMD on x86 and on every arm64).
    Mac(TagLayout),
    /// GMAC: an AES-256-GCM tag over `len | payload` with nothing
    /// encrypted. Several times faster than BLAKE3 on CPUs with AES and
    /// carry-less multiply instructions, and much slower on those without
    /// (the Raspberry Pi 4), so the handshake grants it only when both
    /// ends have them ([`hardware_gmac`]).
    Gmac,
    AesGcm,
}

impl RecordFormat {
    pub fn mode(self) -> WireMode {
        match self {
            RecordFormat::Mac(_) | RecordFormat::Gmac => WireMode::Integrity,
            RecordFormat::AesGcm => WireMode::Encrypted,
        }
    }
}

/// Whether this CPU computes AES-GCM tags in hardware (AES and
/// carry-less multiply instructions), which makes [`RecordFormat::Gmac`]
/// the fastest integrity tag.
pub fn hardware_gmac() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("aes")
            && std::arch::is_aarch64_feature_detected!("pmull")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

/// The key of one direction of a connection, in its format.
pub struct RecordKey(Cipher);

enum Cipher {
    Mac([u8; 32], TagLayout),
    Gmac(LessSafeKey),
    Aead(LessSafeKey),
}

impl std::fmt::Debug for RecordKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RecordKey({:?})", self.format())
    }
}

fn aes_gcm(key: &[u8; 32]) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).expect("AES-256 takes a 32-byte key"))
}

fn gcm_nonce(seq: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&seq.to_le_bytes());
    Nonce::assume_unique_for_key(n)
}

impl RecordKey {
    pub fn new(format: RecordFormat, key: [u8; 32]) -> RecordKey {
        match format {
            RecordFormat::Mac(layout) => RecordKey(Cipher::Mac(key, layout)),
            RecordFormat::Gmac => RecordKey(Cipher::Gmac(aes_gcm(&key))),
            RecordFormat::AesGcm => RecordKey(Cipher::Aead(aes_gcm(&key))),
        }
    }

    /// The format this key seals and opens.
    pub fn format(&self) -> RecordFormat {
        match self.0 {
            Cipher::Mac(_, layout) => RecordFormat::Mac(layout),
            Cipher::Gmac(_) => RecordFormat::Gmac,
            Cipher::Aead(_) => RecordFormat::AesGcm,
        }
    }

    /// Appends the record of `parts` (concatenated, at most [`MAX_RECORD`]
    /// bytes) with sequence number `seq` to `out`; encrypted mode encrypts
    /// the appended payload in place.
    pub fn seal(&self, seq: u64, parts: &[&[u8]], out: &mut Vec<u8>) {
        let (key, gmac) = match &self.0 {
            Cipher::Mac(key, layout) => return seal_record(key, *layout, seq, parts, out),
            Cipher::Gmac(key) => (key, true),
            Cipher::Aead(key) => (key, false),
        };
        let len: usize = parts.iter().map(|p| p.len()).sum();
        debug_assert!(len <= MAX_RECORD);
        let len_bytes = (len as u32).to_le_bytes();
        out.reserve(LEN_LEN + len + TAG_LEN);
        let record = out.len();
        out.extend_from_slice(&len_bytes);
        let start = out.len();
        for p in parts {
            out.extend_from_slice(p);
        }
        if gmac {
            // Authenticated, not encrypted: the whole record so far is the
            // AEAD's associated data, the plaintext is empty.
            let tag = key
                .seal_in_place_separate_tag(gcm_nonce(seq), Aad::from(&out[record..]), &mut [])
                .expect("AES-GCM tags any record of at most MAX_RECORD bytes");
            out.extend_from_slice(tag.as_ref());
            return;
        }
        let tag = key
            .seal_in_place_separate_tag(gcm_nonce(seq), Aad::from(len_bytes), &mut out[start..])
            .expect("AES-GCM seals any record of at most MAX_RECORD bytes");
        out.extend_from_slice(tag.as_ref());
    }

    /// Checks (and in encrypted mode decrypts in place) the record at the
    /// start of `buf` against `seq`: `Ok(None)` when more bytes are needed,
    /// else `(record length, payload range)`.
    pub fn open(
        &self,
        seq: u64,
        buf: &mut [u8],
    ) -> Result<Option<(usize, std::ops::Range<usize>)>, RecordError> {
        let (key, gmac) = match &self.0 {
            Cipher::Mac(key, layout) => return open_record(key, *layout, seq, buf),
            Cipher::Gmac(key) => (key, true),
            Cipher::Aead(key) => (key, false),
        };
        let Some((len, total)) = record_len(buf)? else {
            return Ok(None);
        };
        if gmac {
            let (record, tag) = buf[..total].split_at_mut(LEN_LEN + len);
            key.open_in_place(gcm_nonce(seq), Aad::from(&*record), tag)
                .map_err(|_| RecordError::BadTag(seq))?;
            return Ok(Some((total, LEN_LEN..LEN_LEN + len)));
        }
        let len_bytes = (len as u32).to_le_bytes();
        key.open_in_place(
            gcm_nonce(seq),
            Aad::from(len_bytes),
            &mut buf[LEN_LEN..total],
        )
        .map_err(|_| RecordError::BadTag(seq))?;
        Ok(Some((total, LEN_LEN..LEN_LEN + len)))
    }
}

/// `(payload length, record length)` of the record at the start of `buf`,
/// `None` when it is not all there yet.
fn record_len(buf: &[u8]) -> Result<Option<(usize, usize)>, RecordError> {
    if buf.len() < LEN_LEN {
        return Ok(None);
    }
    let len = u32::from_le_bytes(buf[..LEN_LEN].try_into().expect("4 bytes")) as usize;
    if len > MAX_RECORD {
        return Err(RecordError::TooLarge(len));
    }
    let total = LEN_LEN + len + TAG_LEN;
    if buf.len() < total {
        return Ok(None);
    }
    Ok(Some((len, total)))
}

/// Checks the record at the start of `buf` against `seq`: `Ok(None)` when
/// more bytes are needed, else `(record length, payload range)`.
pub fn open_record(
    key: &[u8; 32],
    layout: TagLayout,
    seq: u64,
    buf: &[u8],
) -> Result<Option<(usize, std::ops::Range<usize>)>, RecordError> {
    let Some((len, total)) = record_len(buf)? else {
        return Ok(None);
    };
    let payload = LEN_LEN..LEN_LEN + len;
    let expected = tag(key, layout, seq, &buf[payload.clone()]);
    let got = &buf[LEN_LEN + len..total];
    // Constant time: no early exit on the first differing byte.
    let diff = expected
        .iter()
        .zip(got)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b));
    if diff != 0 {
        return Err(RecordError::BadTag(seq));
    }
    Ok(Some((total, payload)))
}

/// The reading state of one direction.
pub struct SealedRead {
    key: RecordKey,
    seq: u64,
    raw: Vec<u8>,
    /// Bytes of `raw` not yet opened: `start..end`.
    start: usize,
    end: usize,
    /// The opened payload not yet given to the reader.
    plain: std::ops::Range<usize>,
    failed: bool,
}

impl SealedRead {
    /// An integrity-only reader.
    #[cfg(test)]
    pub(crate) fn new(key: [u8; 32]) -> Self {
        Self::with_key(RecordKey::new(RecordFormat::Mac(TagLayout::Trailing), key))
    }

    pub(crate) fn with_key(key: RecordKey) -> Self {
        SealedRead {
            key,
            seq: 0,
            raw: vec![0; 64 << 10],
            start: 0,
            end: 0,
            plain: 0..0,
            failed: false,
        }
    }

    pub fn poll_read_from<R: AsyncRead + Unpin>(
        &mut self,
        mut inner: Pin<&mut R>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if !self.plain.is_empty() {
                let n = self.plain.len().min(buf.remaining());
                buf.put_slice(&self.raw[self.plain.start..self.plain.start + n]);
                self.plain.start += n;
                return Poll::Ready(Ok(()));
            }
            if self.failed {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "the connection failed its integrity check",
                )));
            }
            match self.key.open(self.seq, &mut self.raw[self.start..self.end]) {
                Ok(Some((total, payload))) => {
                    self.plain = self.start + payload.start..self.start + payload.end;
                    self.start += total;
                    self.seq += 1;
                    continue;
                }
                Ok(None) => {}
                Err(e) => {
                    self.failed = true;
                    return Poll::Ready(Err(e.into()));
                }
            }
            // Make room: move the partial record to the front, grow if a
            // whole record cannot fit.
            if self.start == self.end {
                self.start = 0;
                self.end = 0;
            } else if self.end == self.raw.len() {
                self.raw.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
                if self.end == self.raw.len() {
                    let want = (self.raw.len() * 2).min(LEN_LEN + MAX_RECORD + TAG_LEN);
                    self.raw.resize(want, 0);
                }
            }
            let mut rb = ReadBuf::new(&mut self.raw[self.end..]);
            ready!(inner.as_mut().poll_read(cx, &mut rb))?;
            let n = rb.filled().len();
            if n == 0 {
                if self.start == self.end {
                    return Poll::Ready(Ok(())); // a clean end of stream
                }
                return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
            }
            self.end += n;
        }
    }
}

/// The writing state of one direction. A write is sealed into one record
/// at once and reported written; [`SealedWrite::poll_flush_to`] (or the
/// next write) pushes it out.
pub struct SealedWrite {
    key: RecordKey,
    seq: u64,
    out: Vec<u8>,
    pos: usize,
}

impl SealedWrite {
    /// An integrity-only writer.
    #[cfg(test)]
    pub(crate) fn new(key: [u8; 32]) -> Self {
        Self::with_key(RecordKey::new(RecordFormat::Mac(TagLayout::Trailing), key))
    }

    pub(crate) fn with_key(key: RecordKey) -> Self {
        SealedWrite {
            key,
            seq: 0,
            out: Vec::with_capacity(64 << 10),
            pos: 0,
        }
    }

    fn poll_drain<W: AsyncWrite + Unpin>(
        &mut self,
        mut inner: Pin<&mut W>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        while self.pos < self.out.len() {
            let n = ready!(inner.as_mut().poll_write(cx, &self.out[self.pos..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.pos += n;
        }
        self.out.clear();
        self.pos = 0;
        Poll::Ready(Ok(()))
    }

    pub fn poll_write_vectored_to<W: AsyncWrite + Unpin>(
        &mut self,
        mut inner: Pin<&mut W>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        ready!(self.poll_drain(inner.as_mut(), cx))?;
        let mut parts: Vec<&[u8]> = Vec::with_capacity(bufs.len());
        let mut taken = 0;
        for b in bufs {
            let n = b.len().min(MAX_RECORD - taken);
            if n == 0 {
                continue;
            }
            parts.push(&b[..n]);
            taken += n;
            if taken == MAX_RECORD {
                break;
            }
        }
        if taken == 0 {
            return Poll::Ready(Ok(0));
        }
        self.key.seal(self.seq, &parts, &mut self.out);
        self.seq += 1;
        if let Poll::Ready(Err(e)) = self.poll_drain(inner, cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(taken))
    }

    pub fn poll_flush_to<W: AsyncWrite + Unpin>(
        &mut self,
        mut inner: Pin<&mut W>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(inner.as_mut(), cx))?;
        inner.poll_flush(cx)
    }

    pub fn poll_shutdown_to<W: AsyncWrite + Unpin>(
        &mut self,
        mut inner: Pin<&mut W>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(inner.as_mut(), cx))?;
        inner.poll_shutdown(cx)
    }
}

/// The read half of a connection: plain (keyless) or sealed.
pub enum AuthReader<R> {
    Plain(R),
    Sealed(R, Box<SealedRead>),
}

/// The write half of a connection: plain (keyless) or sealed.
pub enum AuthWriter<W> {
    Plain(W),
    Sealed(W, Box<SealedWrite>),
}

/// A whole connection (both directions): plain (keyless) or sealed.
pub enum Sealed<S> {
    Plain(S),
    Sealed(S, Box<SealedRead>, Box<SealedWrite>),
}

impl<R: AsyncRead + Unpin> AsyncRead for AuthReader<R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            AuthReader::Plain(r) => Pin::new(r).poll_read(cx, buf),
            AuthReader::Sealed(r, st) => st.poll_read_from(Pin::new(r), cx, buf),
        }
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for AuthWriter<W> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            AuthWriter::Plain(w) => Pin::new(w).poll_write(cx, buf),
            AuthWriter::Sealed(w, st) => {
                st.poll_write_vectored_to(Pin::new(w), cx, &[io::IoSlice::new(buf)])
            }
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            AuthWriter::Plain(w) => Pin::new(w).poll_write_vectored(cx, bufs),
            AuthWriter::Sealed(w, st) => st.poll_write_vectored_to(Pin::new(w), cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            AuthWriter::Plain(w) => w.is_write_vectored(),
            AuthWriter::Sealed(..) => true,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            AuthWriter::Plain(w) => Pin::new(w).poll_flush(cx),
            AuthWriter::Sealed(w, st) => st.poll_flush_to(Pin::new(w), cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            AuthWriter::Plain(w) => Pin::new(w).poll_shutdown(cx),
            AuthWriter::Sealed(w, st) => st.poll_shutdown_to(Pin::new(w), cx),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Sealed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Sealed::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Sealed::Sealed(s, rd, _) => rd.poll_read_from(Pin::new(s), cx, buf),
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Sealed<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Sealed::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Sealed::Sealed(s, _, wr) => {
                wr.poll_write_vectored_to(Pin::new(s), cx, &[io::IoSlice::new(buf)])
            }
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Sealed::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Sealed::Sealed(s, _, wr) => wr.poll_write_vectored_to(Pin::new(s), cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Sealed::Plain(s) => s.is_write_vectored(),
            Sealed::Sealed(..) => true,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Sealed::Plain(s) => Pin::new(s).poll_flush(cx),
            Sealed::Sealed(s, _, wr) => wr.poll_flush_to(Pin::new(s), cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Sealed::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Sealed::Sealed(s, _, wr) => wr.poll_shutdown_to(Pin::new(s), cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const K: [u8; 32] = [5; 32];
    const L: TagLayout = TagLayout::Trailing;

    fn sealed(seq: u64, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        seal_record(&K, L, seq, &[payload], &mut out);
        out
    }

    #[test]
    fn a_record_opens_only_at_its_sequence_number_with_its_key() {
        let rec = sealed(3, b"hello");
        assert_eq!(open_record(&K, L, 3, &rec), Ok(Some((rec.len(), 4..9))));
        assert_eq!(open_record(&K, L, 4, &rec), Err(RecordError::BadTag(4)));
        assert_eq!(open_record(&K, L, 2, &rec), Err(RecordError::BadTag(2)));
        assert!(open_record(&[6; 32], L, 3, &rec).is_err());
        assert_eq!(open_record(&K, L, 3, &rec[..rec.len() - 1]), Ok(None));
        let mut huge = rec.clone();
        huge[..4].copy_from_slice(&((MAX_RECORD + 1) as u32).to_le_bytes());
        assert!(matches!(
            open_record(&K, L, 3, &huge),
            Err(RecordError::TooLarge(_))
        ));
    }

    /// The leading layout is byte for byte what strata's first keyed
    /// release sends (its tag written out here from its definition), so a
    /// new controller and an old replica, or the reverse, still agree.
    #[test]
    fn the_leading_layout_is_the_first_releases_records() {
        let payload = b"frame header and data";
        let mut old = blake3::Hasher::new_keyed(&K);
        old.update(&9u64.to_le_bytes());
        old.update(&(payload.len() as u32).to_le_bytes());
        old.update(payload);
        let mut want = (payload.len() as u32).to_le_bytes().to_vec();
        want.extend_from_slice(payload);
        want.extend_from_slice(&old.finalize().as_bytes()[..TAG_LEN]);

        let mut rec = Vec::new();
        seal_record(
            &K,
            TagLayout::Leading,
            9,
            &[b"frame header", b" and data"],
            &mut rec,
        );
        assert_eq!(rec, want);
        assert!(open_record(&K, TagLayout::Leading, 9, &want)
            .unwrap()
            .is_some());
    }

    /// A record of one layout never opens under the other: the two sides
    /// of a connection must have agreed on it in the handshake. (An empty
    /// payload is the one input on which the two layouts coincide.)
    #[test]
    fn a_record_opens_only_in_its_layout() {
        for payload in [&b"x"[..], &[7u8; 1021][..], &[7u8; 5000][..]] {
            let mut trailing = Vec::new();
            seal_record(&K, TagLayout::Trailing, 1, &[payload], &mut trailing);
            let mut leading = Vec::new();
            seal_record(&K, TagLayout::Leading, 1, &[payload], &mut leading);
            assert_ne!(trailing, leading);
            assert!(open_record(&K, TagLayout::Trailing, 1, &trailing)
                .unwrap()
                .is_some());
            assert_eq!(
                open_record(&K, TagLayout::Leading, 1, &trailing),
                Err(RecordError::BadTag(1))
            );
            assert_eq!(
                open_record(&K, TagLayout::Trailing, 1, &leading),
                Err(RecordError::BadTag(1))
            );
        }
    }

    proptest! {
        #[test]
        fn any_flipped_byte_is_refused(payload in proptest::collection::vec(any::<u8>(), 0..600), at in any::<prop::sample::Index>(), bit in 0u8..8) {
            let mut rec = sealed(0, &payload);
            let i = at.index(rec.len());
            rec[i] ^= 1 << bit;
            // A flipped length byte may make the record look incomplete or too
            // large; it is never accepted.
            prop_assert!(!matches!(open_record(&K, L, 0, &rec), Ok(Some(_))));
        }

        #[test]
        fn split_writes_arrive_whole_and_in_order(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..3000), 1..20)) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let (a, b) = tokio::io::duplex(1000);
                let mut w = AuthWriter::Sealed(a, Box::new(SealedWrite::new(K)));
                let mut r = AuthReader::Sealed(b, Box::new(SealedRead::new(K)));
                let expected: Vec<u8> = chunks.concat();
                let writer = async {
                    for c in &chunks {
                        w.write_all(c).await.unwrap();
                    }
                    w.shutdown().await.unwrap();
                };
                let mut got = Vec::new();
                let reader = r.read_to_end(&mut got);
                let ((), n) = tokio::join!(writer, reader);
                assert_eq!(n.unwrap(), expected.len());
                assert_eq!(got, expected);
            });
        }
    }

    async fn read_all(bytes: Vec<u8>) -> io::Result<Vec<u8>> {
        let mut r = AuthReader::Sealed(&bytes[..], Box::new(SealedRead::new(K)));
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.map(|_| got)
    }

    #[tokio::test]
    async fn replayed_reordered_or_truncated_records_are_refused() {
        let (r0, r1) = (sealed(0, b"first"), sealed(1, b"second"));
        assert_eq!(
            read_all([r0.clone(), r1.clone()].concat()).await.unwrap(),
            b"firstsecond"
        );
        let replayed = read_all([r0.clone(), r0.clone()].concat()).await;
        assert_eq!(replayed.unwrap_err().kind(), io::ErrorKind::InvalidData);
        let reordered = read_all([r1.clone(), r0.clone()].concat()).await;
        assert_eq!(reordered.unwrap_err().kind(), io::ErrorKind::InvalidData);
        let truncated = read_all([r0.clone(), r1[..5].to_vec()].concat()).await;
        assert_eq!(truncated.unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
        let dropped = read_all([r0, sealed(2, b"third")].concat()).await;
        assert_eq!(dropped.unwrap_err().kind(), io::ErrorKind::InvalidData);
    }

    #[tokio::test]
    async fn large_vectored_writes_are_split_into_records() {
        let (a, b) = tokio::io::duplex(64 << 10);
        let mut w = AuthWriter::Sealed(a, Box::new(SealedWrite::new(K)));
        let mut r = AuthReader::Sealed(b, Box::new(SealedRead::new(K)));
        let big: Vec<u8> = (0..(MAX_RECORD * 2 + 77)).map(|i| i as u8).collect();
        let writer = async {
            w.write_all(&big).await.unwrap();
            w.flush().await.unwrap();
            w.shutdown().await.unwrap();
        };
        let mut got = Vec::new();
        let ((), n) = tokio::join!(writer, r.read_to_end(&mut got));
        assert_eq!(n.unwrap(), big.len());
        assert!(got == big);
    }

    fn gmac_sealed(seq: u64, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        RecordKey::new(RecordFormat::Gmac, K).seal(seq, &[payload], &mut out);
        out
    }

    /// A GMAC record carries its payload as it is, and opens only at its
    /// sequence number, with its key, in its format.
    #[test]
    fn a_gmac_record_opens_only_at_its_sequence_number_with_its_key() {
        let gmac = RecordKey::new(RecordFormat::Gmac, K);
        let mut rec = gmac_sealed(3, b"hello");
        assert_eq!(&rec[4..9], b"hello");
        assert_eq!(rec.len(), 4 + 5 + TAG_LEN);
        for (key, seq) in [(&gmac, 4), (&gmac, 2)] {
            assert_eq!(
                key.open(seq, &mut rec.clone()),
                Err(RecordError::BadTag(seq))
            );
        }
        for other in [
            RecordKey::new(RecordFormat::Gmac, [6; 32]),
            RecordKey::new(RecordFormat::AesGcm, K),
            RecordKey::new(RecordFormat::Mac(TagLayout::Trailing), K),
        ] {
            assert!(other.open(3, &mut rec.clone()).is_err(), "{other:?}");
        }
        assert_eq!(gmac.open(3, &mut rec[..12]), Ok(None));
        assert_eq!(gmac.open(3, &mut rec), Ok(Some((4 + 5 + TAG_LEN, 4..9))));
        assert_eq!(&rec[4..9], b"hello");
    }

    proptest! {
        #[test]
        fn any_flipped_bit_of_a_gmac_record_is_refused(payload in proptest::collection::vec(any::<u8>(), 0..600), at in any::<prop::sample::Index>(), bit in 0u8..8) {
            let mut rec = gmac_sealed(0, &payload);
            let i = at.index(rec.len());
            rec[i] ^= 1 << bit;
            let opened = RecordKey::new(RecordFormat::Gmac, K).open(0, &mut rec);
            prop_assert!(!matches!(opened, Ok(Some(_))));
        }
    }

    fn enc_key() -> RecordKey {
        RecordKey::new(RecordFormat::AesGcm, K)
    }

    fn enc_sealed(seq: u64, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        enc_key().seal(seq, &[payload], &mut out);
        out
    }

    #[test]
    fn an_encrypted_record_round_trips_and_hides_its_payload() {
        let payload: Vec<u8> = b"STRATA-PLAINTEXT-PATTERN-".repeat(200);
        let mut rec = enc_sealed(7, &payload);
        assert_eq!(rec.len(), LEN_LEN + payload.len() + TAG_LEN);
        assert_eq!(&rec[..LEN_LEN], &(payload.len() as u32).to_le_bytes());
        assert!(!rec.windows(16).any(|w| payload.windows(16).any(|p| p == w)));
        // The same payload under the integrity mode travels as it is.
        let plain = sealed(7, &payload);
        assert_eq!(&plain[LEN_LEN..LEN_LEN + payload.len()], &payload[..]);
        let (total, range) = enc_key().open(7, &mut rec).unwrap().unwrap();
        assert_eq!(total, rec.len());
        assert_eq!(&rec[range], &payload[..]);
        // Empty records too (a zero-length write never makes one, but the
        // format allows it).
        let mut empty = enc_sealed(0, b"");
        assert_eq!(enc_key().open(0, &mut empty), Ok(Some((20, 4..4))));
    }

    #[test]
    fn an_encrypted_record_opens_only_at_its_sequence_number_with_its_key() {
        let rec = enc_sealed(3, b"hello");
        assert!(enc_key().open(3, &mut rec.clone()).unwrap().is_some());
        assert_eq!(
            enc_key().open(4, &mut rec.clone()),
            Err(RecordError::BadTag(4))
        );
        assert_eq!(
            enc_key().open(2, &mut rec.clone()),
            Err(RecordError::BadTag(2))
        );
        let other = RecordKey::new(RecordFormat::AesGcm, [6; 32]);
        assert!(other.open(3, &mut rec.clone()).is_err());
        // An integrity-mode reader with the same key refuses it as well.
        assert!(RecordKey::new(RecordFormat::Mac(TagLayout::Trailing), K)
            .open(3, &mut rec.clone())
            .is_err());
        assert_eq!(
            enc_key().open(3, &mut rec[..rec.len() - 1].to_vec()),
            Ok(None)
        );
    }

    proptest! {
        #[test]
        fn any_flipped_bit_of_an_encrypted_record_is_refused(payload in proptest::collection::vec(any::<u8>(), 0..600), at in any::<prop::sample::Index>(), bit in 0u8..8) {
            let mut rec = enc_sealed(0, &payload);
            let i = at.index(rec.len());
            rec[i] ^= 1 << bit;
            prop_assert!(!matches!(enc_key().open(0, &mut rec), Ok(Some(_))));
        }

        #[test]
        fn encrypted_split_writes_arrive_whole_and_in_order(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..3000), 1..20)) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let (a, b) = tokio::io::duplex(1000);
                let mut w = AuthWriter::Sealed(a, Box::new(SealedWrite::with_key(enc_key())));
                let mut r = AuthReader::Sealed(b, Box::new(SealedRead::with_key(enc_key())));
                let expected: Vec<u8> = chunks.concat();
                let writer = async {
                    for c in &chunks {
                        w.write_all(c).await.unwrap();
                    }
                    w.shutdown().await.unwrap();
                };
                let mut got = Vec::new();
                let reader = r.read_to_end(&mut got);
                let ((), n) = tokio::join!(writer, reader);
                assert_eq!(n.unwrap(), expected.len());
                assert_eq!(got, expected);
            });
        }
    }

    #[tokio::test]
    async fn replayed_reordered_or_dropped_encrypted_records_are_refused() {
        async fn read_enc(bytes: Vec<u8>) -> io::Result<Vec<u8>> {
            let mut r = AuthReader::Sealed(&bytes[..], Box::new(SealedRead::with_key(enc_key())));
            let mut got = Vec::new();
            r.read_to_end(&mut got).await.map(|_| got)
        }
        let (r0, r1) = (enc_sealed(0, b"first"), enc_sealed(1, b"second"));
        assert_eq!(
            read_enc([r0.clone(), r1.clone()].concat()).await.unwrap(),
            b"firstsecond"
        );
        for bad in [
            [r0.clone(), r0.clone()].concat(),
            [r1.clone(), r0.clone()].concat(),
            [r0.clone(), enc_sealed(2, b"third")].concat(),
        ] {
            let e = read_enc(bad).await.unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        }
    }

    #[tokio::test]
    async fn large_encrypted_writes_are_split_into_records() {
        let (a, b) = tokio::io::duplex(64 << 10);
        let mut w = AuthWriter::Sealed(a, Box::new(SealedWrite::with_key(enc_key())));
        let mut r = AuthReader::Sealed(b, Box::new(SealedRead::with_key(enc_key())));
        let big: Vec<u8> = (0..(MAX_RECORD * 2 + 77)).map(|i| i as u8).collect();
        let writer = async {
            w.write_all(&big).await.unwrap();
            w.shutdown().await.unwrap();
        };
        let mut got = Vec::new();
        let ((), n) = tokio::join!(writer, r.read_to_end(&mut got));
        assert_eq!(n.unwrap(), big.len());
        assert!(got == big);
    }

    /// Seal + open throughput of one record size in MiB/s. Meaningful only
    /// in a release build (`--release`): in a dev build parts of the
    /// RustCrypto stack are not optimised.
    fn throughput(name: &str, size: usize, mut round: impl FnMut(&mut Vec<u8>)) -> f64 {
        let mut buf = Vec::with_capacity(size + 64);
        for _ in 0..8 {
            round(&mut buf);
        }
        // At least 64 rounds, then until a second has passed.
        let t = std::time::Instant::now();
        let mut n = 0;
        while n < 64 || t.elapsed() < std::time::Duration::from_secs(1) {
            round(&mut buf);
            n += 1;
        }
        let mibs = (n * size) as f64 / (1 << 20) as f64 / t.elapsed().as_secs_f64();
        println!("{name:<34} {:>4} KiB  {mibs:>8.0} MiB/s", size >> 10);
        mibs
    }

    /// Run: `cargo test --release -p strata-replica --lib record_throughput -- --ignored --nocapture`.
    /// Seal and open of one record, per size: integrity-only BLAKE3
    /// (the default, in both tag layouts), AES-256-GCM (aws-lc-rs, what encryption uses) and
    /// ChaCha20-Poly1305 (RustCrypto, the alternative measured).
    #[test]
    #[ignore = "a measurement, not a check"]
    fn record_throughput() {
        use chacha20poly1305::aead::{AeadInPlace, KeyInit};
        for size in [4 << 10, 256 << 10] {
            let payload = vec![0x5au8; size];
            for (name, layout) in [
                ("BLAKE3 tag, seq trailing", TagLayout::Trailing),
                ("BLAKE3 tag, seq leading (1st release)", TagLayout::Leading),
            ] {
                let mac = RecordKey::new(RecordFormat::Mac(layout), K);
                throughput(name, size, |buf| {
                    buf.clear();
                    mac.seal(1, &[&payload], buf);
                    assert!(mac.open(1, buf).unwrap().is_some());
                });
            }
            let gmac = RecordKey::new(RecordFormat::Gmac, K);
            throughput("GMAC tag (aws-lc-rs, AES CPUs)", size, |buf| {
                buf.clear();
                gmac.seal(1, &[&payload], buf);
                assert!(gmac.open(1, buf).unwrap().is_some());
            });
            let gcm = enc_key();
            throughput("AES-256-GCM (aws-lc-rs)", size, |buf| {
                buf.clear();
                gcm.seal(1, &[&payload], buf);
                assert!(gcm.open(1, buf).unwrap().is_some());
            });
            let chacha = chacha20poly1305::ChaCha20Poly1305::new(&K.into());
            throughput("ChaCha20-Poly1305 (RustCrypto)", size, |buf| {
                buf.clear();
                let aad = (size as u32).to_le_bytes();
                buf.extend_from_slice(&aad);
                buf.extend_from_slice(&payload);
                let nonce = [0u8; 12];
                let tag = chacha
                    .encrypt_in_place_detached(&nonce.into(), &aad, &mut buf[4..])
                    .unwrap();
                buf.extend_from_slice(&tag);
                let (body, tag) = buf.split_at_mut(4 + size);
                chacha
                    .decrypt_in_place_detached(&nonce.into(), &aad, &mut body[4..], (&*tag).into())
                    .unwrap();
            });
        }
    }
}
