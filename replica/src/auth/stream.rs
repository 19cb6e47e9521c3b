//! Sealed streams: the records of `record.rs` under `AsyncRead` and
//! `AsyncWrite`, for the data wire and the control gRPC of a keyed
//! connection.
//!
//! Big payloads are not copied where the record format allows it
//! ([`RecordKey::tag_detached`], [`RecordKey::open_detached`]):
//! - [`SealedWrite`] (`sealed_write.rs`) sends a slice of at least
//!   [`DIRECT_MIN`] bytes as records of their own (the length, the
//!   caller's bytes and the tag), several in one `writev`. Only what the
//!   socket did not take is copied, to go out first on the next call.
//! - [`SealedRead::poll_read_into`] (through [`AuthReader::read_into`])
//!   reads such a record's payload, with its tag and the next record's
//!   length, straight into the spare capacity of the caller's `BytesMut`
//!   and checks it there. The buffer's length grows
//!   only once the tag checked: nothing unchecked is ever visible to the
//!   caller. Plain `AsyncRead` reads copy every payload out of the
//!   connection's own buffer.

use std::io;
use std::mem::MaybeUninit;
use std::ops::Range;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::record::{announced_len, RecordKey, LEN_LEN, MAX_RECORD, TAG_LEN};
#[cfg(test)]
use super::record::{RecordFormat, TagLayout};
pub use super::sealed_write::SealedWrite;

/// Payloads of at least this many bytes travel as records of their own,
/// without being copied (the data wire copies smaller ones next to their
/// frame header anyway).
pub const DIRECT_MIN: usize = 16 << 10;

/// After a direct record, this many records are read into the
/// connection's own buffer exactly: to their end and the length of the
/// one after.
const EXACT_READS_AFTER_DIRECT: u8 = 2;

fn integrity_failed() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        "the connection failed its integrity check",
    )
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
    plain: Range<usize>,
    /// A record whose payload is being read into the caller's buffer.
    direct: Option<Direct>,
    failed: bool,
    /// Payload bytes copied out of `raw` (the rest went straight to the
    /// caller's buffer).
    copied: u64,
    /// Records still to be read exactly (to their end and the next
    /// record's length) since the last direct record ended: a big record
    /// behind a small one (a frame header) is then recognized before any
    /// of it is read into `raw`, and goes to the caller uncopied. Streams
    /// of small records go back to reads as large as `raw`.
    exact_reads: u8,
}

/// A record read straight into the spare capacity of a caller's
/// `BytesMut` ([`SealedRead::poll_read_into`]).
struct Direct {
    /// The payload's length.
    len: usize,
    /// Bytes already there: the payload's, then the tag's, then at most
    /// [`LEN_LEN`] of the next record (its length).
    got: usize,
    /// The address of the spare capacity: the caller must hand the same
    /// buffer back until the record is complete.
    at: usize,
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
            direct: None,
            failed: false,
            copied: 0,
            exact_reads: 0,
        }
    }

    /// Payload bytes this reader copied (rather than read in place).
    pub fn copied_bytes(&self) -> u64 {
        self.copied
    }

    /// Bytes to read to have the pending record whole and the length of
    /// the one after it.
    fn to_next_length(&self) -> usize {
        let pending = self.end - self.start;
        match announced_len(&self.raw[self.start..self.end]) {
            Ok(Some(len)) => (LEN_LEN + len + TAG_LEN + LEN_LEN).saturating_sub(pending),
            _ => LEN_LEN.saturating_sub(pending).max(1),
        }
    }

    fn fail(&mut self, e: impl Into<io::Error>) -> Poll<io::Result<usize>> {
        self.failed = true;
        self.direct = None;
        Poll::Ready(Err(e.into()))
    }

    /// Opens the next record in `raw` if it is all there: `Ok(true)` when
    /// `plain` now holds its payload.
    fn open_next(&mut self) -> io::Result<bool> {
        match self.key.open(self.seq, &mut self.raw[self.start..self.end]) {
            Ok(Some((total, payload))) => {
                self.plain = self.start + payload.start..self.start + payload.end;
                self.start += total;
                self.seq += 1;
                Ok(true)
            }
            Ok(None) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Reads more of the connection into `raw`, at most `limit` bytes:
    /// `Ok(false)` at a clean end of stream.
    fn fill_raw<R: AsyncRead + Unpin>(
        &mut self,
        mut inner: Pin<&mut R>,
        cx: &mut Context<'_>,
        limit: usize,
    ) -> Poll<io::Result<bool>> {
        // Make room: move the partial record to the front, grow if a whole
        // record cannot fit.
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
        let to = self.raw.len().min(self.end.saturating_add(limit));
        let mut rb = ReadBuf::new(&mut self.raw[self.end..to]);
        ready!(inner.as_mut().poll_read(cx, &mut rb))?;
        let n = rb.filled().len();
        if n == 0 {
            if self.start == self.end && self.direct.is_none() {
                return Poll::Ready(Ok(false));
            }
            return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
        }
        self.end += n;
        Poll::Ready(Ok(true))
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
                self.copied += n as u64;
                return Poll::Ready(Ok(()));
            }
            if self.failed || self.direct.is_some() {
                // A direct read left inside a record: its bytes are gone.
                self.failed = true;
                return Poll::Ready(Err(integrity_failed()));
            }
            match self.open_next() {
                Ok(true) => continue,
                Ok(false) => {}
                Err(e) => {
                    self.failed = true;
                    return Poll::Ready(Err(e));
                }
            }
            if !ready!(self.fill_raw(inner.as_mut(), cx, usize::MAX))? {
                return Poll::Ready(Ok(())); // a clean end of stream
            }
        }
    }

    /// Like `read_buf`: appends at least one byte of checked payload to
    /// `buf` and returns how many (0 at a clean end of stream). Payloads
    /// of at least [`DIRECT_MIN`] bytes that fit in `buf`'s spare capacity
    /// are read there and checked there, without a copy. Until it returns, the
    /// caller must give the same `buf`, untouched, to every call: a call
    /// abandoned inside such a record (its future dropped) fails the
    /// connection.
    pub fn poll_read_into<R: AsyncRead + Unpin>(
        &mut self,
        mut inner: Pin<&mut R>,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
    ) -> Poll<io::Result<usize>> {
        loop {
            if let Some(d) = &mut self.direct {
                let spare = buf.spare_capacity_mut();
                if spare.as_ptr() as usize != d.at || spare.len() < d.got.max(d.len + TAG_LEN) {
                    return self.fail(io::Error::other(
                        "a read of the connection was abandoned inside a record",
                    ));
                }
                let record_end = d.len + TAG_LEN;
                if d.got < record_end {
                    // The payload, its tag and, where the caller's room
                    // allows, the next record's length, in one read: the
                    // tag and the length cost a read of their own before.
                    let to = (record_end + LEN_LEN).min(spare.len());
                    let mut rb = ReadBuf::uninit(&mut spare[d.got..to]);
                    ready!(inner.as_mut().poll_read(cx, &mut rb))?;
                    let n = rb.filled().len();
                    if n == 0 {
                        return self.fail(io::ErrorKind::UnexpectedEof);
                    }
                    d.got += n;
                    continue;
                }
                let (len, got, seq) = (d.len, d.got, self.seq);
                // SAFETY: the first `got` spare bytes were read into
                // (above; the payload's first bytes at the record's
                // start), so they are initialized.
                let region =
                    unsafe { std::slice::from_raw_parts_mut(spare.as_mut_ptr().cast::<u8>(), got) };
                // Bytes read past the tag begin the next record: to `raw`
                // (empty while a record is read directly).
                let next = &region[record_end..];
                self.raw[..next.len()].copy_from_slice(next);
                self.start = 0;
                self.end = next.len();
                if let Err(e) = self.key.open_detached(seq, &mut region[..record_end]) {
                    return self.fail(e);
                }
                // SAFETY: the first `len` spare bytes are initialized
                // (above) and now checked.
                unsafe { buf.advance_mut(len) };
                self.seq += 1;
                self.direct = None;
                self.exact_reads = EXACT_READS_AFTER_DIRECT;
                return Poll::Ready(Ok(len));
            }
            if !self.plain.is_empty() {
                // No more than the room the caller made (as `read_buf`):
                // growing `buf` here would reallocate it for every big
                // record of small frames.
                if buf.capacity() == buf.len() {
                    buf.reserve(self.plain.len().min(64 << 10));
                }
                let n = self.plain.len().min(buf.capacity() - buf.len());
                let end = self.plain.start + n;
                buf.extend_from_slice(&self.raw[self.plain.start..end]);
                self.plain.start = end;
                self.copied += n as u64;
                return Poll::Ready(Ok(n));
            }
            if self.failed {
                return Poll::Ready(Err(integrity_failed()));
            }
            match self.open_next() {
                Ok(true) => {
                    self.exact_reads = self.exact_reads.saturating_sub(1);
                    continue;
                }
                Ok(false) => {}
                Err(e) => return self.fail(e),
            }
            if self.key.opens_detached() {
                let pending = &self.raw[self.start..self.end];
                let len = match announced_len(pending) {
                    Ok(len) => len,
                    Err(e) => return self.fail(e),
                };
                let have = pending.len().saturating_sub(LEN_LEN);
                // Only into room the caller made: a frame decoder reserves
                // a big frame's length once it has its header. Growing the
                // buffer here for a record of many small frames would
                // allocate (and fault in) fresh memory for each.
                let room = buf.capacity() - buf.len();
                let fits = |len: &usize| *len >= DIRECT_MIN && have < *len && len + TAG_LEN <= room;
                if let Some(len) = len.filter(fits) {
                    let spare = buf.spare_capacity_mut();
                    write_uninit(&mut spare[..have], &pending[LEN_LEN..]);
                    self.copied += have as u64;
                    self.direct = Some(Direct {
                        len,
                        got: have,
                        at: spare.as_ptr() as usize,
                    });
                    self.start = 0;
                    self.end = 0;
                    continue;
                }
            }
            let limit = if self.exact_reads > 0 {
                self.to_next_length()
            } else {
                usize::MAX
            };
            if !ready!(self.fill_raw(inner.as_mut(), cx, limit))? {
                return Poll::Ready(Ok(0)); // a clean end of stream
            }
        }
    }
}

fn write_uninit(to: &mut [MaybeUninit<u8>], from: &[u8]) {
    for (t, f) in to.iter_mut().zip(from) {
        t.write(*f);
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

impl<R: AsyncRead + Unpin> AuthReader<R> {
    /// Like `read_buf` into `buf`, without copying big payloads on a
    /// sealed connection ([`SealedRead::poll_read_into`]). Keep calling it
    /// with the same buffer: it is not cancel-safe inside a record.
    pub async fn read_into(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        match self {
            AuthReader::Plain(r) => tokio::io::AsyncReadExt::read_buf(r, buf).await,
            AuthReader::Sealed(r, st) => {
                std::future::poll_fn(|cx| st.poll_read_into(Pin::new(&mut *r), cx, buf)).await
            }
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
    use crate::wire::outbound::OutBatch;
    use bytes::Bytes;
    use proptest::prelude::*;
    use tokio::io::AsyncWriteExt;
    use RecordFormat::*;

    const K: [u8; 32] = [9; 32];
    const FORMATS: [RecordFormat; 5] = [
        Mac(TagLayout::Leading),
        Mac(TagLayout::Trailing),
        Gmac,
        PayloadGmac,
        AesGcm,
    ];

    fn pair<T>(format: RecordFormat, a: T, b: T) -> (AuthWriter<T>, AuthReader<T>) {
        (
            AuthWriter::Sealed(
                a,
                Box::new(SealedWrite::with_key(RecordKey::new(format, K))),
            ),
            AuthReader::Sealed(b, Box::new(SealedRead::with_key(RecordKey::new(format, K)))),
        )
    }

    fn copied<T>(w: &AuthWriter<T>, r: &AuthReader<T>) -> (u64, u64) {
        match (w, r) {
            (AuthWriter::Sealed(_, w), AuthReader::Sealed(_, r)) => {
                (w.copied_bytes(), r.copied_bytes())
            }
            _ => unreachable!(),
        }
    }

    /// Reads everything with `read_into` the way the data wire's read
    /// loops do, with at least `room` bytes free in the buffer at each call
    /// (a frame decoder reserves a big frame's length); checks that `buf`
    /// grows by exactly what each call says.
    async fn read_all<T: AsyncRead + Unpin>(
        r: &mut AuthReader<T>,
        room: usize,
    ) -> io::Result<Vec<u8>> {
        let mut buf = BytesMut::with_capacity(64 << 10);
        let mut got = Vec::new();
        loop {
            if buf.capacity() - buf.len() < room {
                buf.reserve(room);
            }
            let before = buf.len();
            let n = r.read_into(&mut buf).await?;
            assert_eq!(buf.len(), before + n);
            if n == 0 {
                got.extend_from_slice(&buf);
                return Ok(got);
            }
            // Keep a little in `buf` at times, as a frame decoder does.
            let keep = n % 7;
            got.extend_from_slice(&buf.split_to(buf.len() - keep));
        }
    }

    struct Trip {
        sent: Vec<u8>,
        got: Vec<u8>,
        /// (writer, reader) payload bytes copied.
        copied: (u64, u64),
    }

    /// Sends `frames` (header, payload) the way the data wire does (an
    /// `OutBatch`'s `writev`s) through a pipe of `pipe` bytes and reads
    /// them back.
    async fn round_trip(
        format: RecordFormat,
        frames: &[(Vec<u8>, Vec<u8>)],
        pipe: usize,
        room: usize,
    ) -> Trip {
        let (a, b) = tokio::io::duplex(pipe);
        let (mut w, mut r) = pair(format, a, b);
        let mut batch = OutBatch::new();
        let mut sent = Vec::new();
        for (h, p) in frames {
            batch.push(h, Bytes::from(p.clone()));
            sent.extend_from_slice(h);
            sent.extend_from_slice(p);
        }
        let writer = async {
            batch.write_to(&mut w).await.unwrap();
            w.shutdown().await.unwrap();
        };
        let ((), got) = tokio::join!(writer, read_all(&mut r, room));
        Trip {
            sent,
            got: got.unwrap(),
            copied: copied(&w, &r),
        }
    }

    fn frames(sizes: &[usize]) -> Vec<(Vec<u8>, Vec<u8>)> {
        sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let header = vec![i as u8; 40];
                let payload = (0..n).map(|j| (j * 31 + i) as u8).collect();
                (header, payload)
            })
            .collect()
    }

    /// Big payloads go from the writer's buffers to the reader's without a
    /// copy in the formats that allow it, and arrive whole in every
    /// format.
    #[tokio::test]
    async fn big_payloads_travel_without_copies() {
        let sizes = [1 << 20, 4096, 1 << 20, 100, MAX_RECORD + 5, 1 << 20];
        let big: u64 = sizes.iter().map(|&n| n as u64).sum();
        for format in FORMATS {
            // A reader without room for a big record copies it.
            let t = round_trip(format, &frames(&sizes), 8 << 20, 4096).await;
            assert!(t.got == t.sent, "{format:?}");
            assert_eq!(t.copied.1, t.sent.len() as u64, "{format:?}");
            let t = round_trip(format, &frames(&sizes), 8 << 20, MAX_RECORD + TAG_LEN).await;
            assert!(t.got == t.sent, "{format:?}");
            let total = t.sent.len() as u64;
            let (w, r) = t.copied;
            let writes_direct = RecordKey::new(format, K).seals_detached();
            let reads_direct = RecordKey::new(format, K).opens_detached();
            if writes_direct {
                // Headers, the 4 KiB and 100-byte payloads, 5 bytes, and a
                // record now and then that the pipe refused (tokio's
                // cooperative budget makes a write wait at times): then it
                // is copied, to go out before the next.
                assert!(w < total / 4, "{format:?} writer copied {w} of {total}");
            } else {
                assert_eq!(w, total, "{format:?}");
            }
            if reads_direct {
                // The first read (64 KiB), then at most 4 KiB of each big
                // payload behind a header.
                assert!(r < 96 << 10, "{format:?} reader copied {r} of {big}");
            } else {
                assert_eq!(r, total, "{format:?}");
            }
        }
    }

    /// What the direct writer sends is byte for byte what sealing a copy
    /// sends, so a peer that copies (an older release) reads it; a slice
    /// of several records goes in one write.
    #[tokio::test]
    async fn direct_records_are_the_records_a_copy_makes() {
        for format in [
            Mac(TagLayout::Leading),
            Mac(TagLayout::Trailing),
            PayloadGmac,
        ] {
            let payload: Vec<u8> = (0..(2 * MAX_RECORD + DIRECT_MIN * 3))
                .map(|i| i as u8)
                .collect();
            let key = RecordKey::new(format, K);
            let mut want = Vec::new();
            key.seal(0, &[b"head"], &mut want);
            for (seq, record) in (1..).zip(payload.chunks(MAX_RECORD)) {
                key.seal(seq, &[record], &mut want);
            }
            let mut w = AuthWriter::Sealed(Vec::new(), Box::new(SealedWrite::with_key(key)));
            let slices = [io::IoSlice::new(b"head"), io::IoSlice::new(&payload)];
            let n = w.write_vectored(&slices).await.unwrap();
            assert_eq!(n, 4 + payload.len());
            w.flush().await.unwrap();
            let AuthWriter::Sealed(got, st) = w else {
                unreachable!()
            };
            assert!(got == want, "{format:?}");
            assert_eq!(st.copied_bytes(), 4, "{format:?}");
        }
    }

    /// Counts the reads that returned bytes.
    struct CountReads<R> {
        inner: R,
        reads: usize,
    }

    impl<R: AsyncRead + Unpin> AsyncRead for CountReads<R> {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let me = self.get_mut();
            let before = buf.filled().len();
            let polled = Pin::new(&mut me.inner).poll_read(cx, buf);
            me.reads += usize::from(buf.filled().len() > before);
            polled
        }
    }

    /// A big record read in place costs one read when the connection has
    /// it all: its payload, its tag and the next record's length come
    /// together (the tag and the length took a read of their own before).
    #[tokio::test]
    async fn a_big_record_is_one_read() {
        let key = RecordKey::new(PayloadGmac, K);
        let (frames, records_per_frame) = (3, 4);
        let payload = vec![5u8; records_per_frame * MAX_RECORD];
        let mut stream = Vec::new();
        let mut seq = 0;
        for _ in 0..frames {
            key.seal(seq, &[&[1u8; 40]], &mut stream);
            seq += 1;
            for record in payload.chunks(MAX_RECORD) {
                key.seal(seq, &[record], &mut stream);
                seq += 1;
            }
        }
        let counted = CountReads {
            inner: &stream[..],
            reads: 0,
        };
        let mut r = AuthReader::Sealed(
            counted,
            Box::new(SealedRead::with_key(RecordKey::new(PayloadGmac, K))),
        );
        let got = read_all(&mut r, payload.len() + 64).await.unwrap();
        assert_eq!(got.len(), frames * (40 + payload.len()));
        let AuthReader::Sealed(counted, st) = &r else {
            unreachable!()
        };
        assert!(st.copied_bytes() < 96 << 10, "read in place");
        let big = frames * records_per_frame;
        // Each big record, each header's record, and the first read.
        assert!(
            counted.reads <= big + frames + 1,
            "{} reads for {big} big records in {frames} frames",
            counted.reads
        );
    }

    /// A big record with one bit flipped anywhere is refused and nothing
    /// of it reaches the caller's buffer.
    #[tokio::test]
    async fn a_forged_big_record_never_reaches_the_buffer() {
        for format in FORMATS.into_iter().filter(|f| *f != Gmac) {
            let key = RecordKey::new(format, K);
            // Longer than a first read (64 KiB): most of it is read in
            // place.
            let payload = vec![0xabu8; 128 << 10];
            let mut rec = Vec::new();
            key.seal(0, &[b"small"], &mut rec);
            let second = rec.len();
            key.seal(1, &[&payload], &mut rec);
            for at in [
                second + 2,
                second + 4 + 1000,
                second + 4 + (100 << 10),
                rec.len() - 3,
            ] {
                let mut bad = rec.clone();
                bad[at] ^= 0x10;
                let mut r = AuthReader::Sealed(
                    &bad[..],
                    Box::new(SealedRead::with_key(RecordKey::new(format, K))),
                );
                let mut buf = BytesMut::with_capacity(1 << 20);
                assert_eq!(r.read_into(&mut buf).await.unwrap(), 5);
                assert_eq!(&buf[..], b"small");
                let e = r.read_into(&mut buf).await.unwrap_err();
                assert!(
                    matches!(e.kind(), io::ErrorKind::InvalidData),
                    "{format:?} at {at}: {e}"
                );
                assert_eq!(&buf[..], b"small", "{format:?} at {at}");
                let AuthReader::Sealed(_, st) = &r else {
                    unreachable!()
                };
                assert!(
                    st.copied_bytes() < payload.len() as u64 / 2,
                    "{format:?}: read in place"
                );
                // The connection stays failed.
                assert!(r.read_into(&mut buf).await.is_err());
            }
        }
    }

    /// A read abandoned inside a big record (its future dropped) and
    /// taken up with another buffer fails instead of losing the record's
    /// start.
    #[tokio::test]
    async fn an_abandoned_read_fails_the_connection() {
        let key = RecordKey::new(PayloadGmac, K);
        let payload = vec![7u8; DIRECT_MIN * 4];
        let mut rec = Vec::new();
        key.seal(0, &[&payload], &mut rec);
        let (mut a, b) = tokio::io::duplex(1 << 20);
        let mut r = AuthReader::Sealed(
            b,
            Box::new(SealedRead::with_key(RecordKey::new(PayloadGmac, K))),
        );
        a.write_all(&rec[..rec.len() / 2]).await.unwrap();
        let mut buf = BytesMut::with_capacity(1 << 20);
        let first =
            tokio::time::timeout(std::time::Duration::from_millis(50), r.read_into(&mut buf)).await;
        assert!(first.is_err(), "half a record is not a read");
        assert!(buf.is_empty());
        a.write_all(&rec[rec.len() / 2..]).await.unwrap();
        let mut other = BytesMut::with_capacity(1 << 20);
        assert!(r.read_into(&mut other).await.is_err());
        assert!(other.is_empty());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// Any mix of frame sizes, through pipes small enough that most
        /// writes are partial and most reads stop inside a record, arrives
        /// whole and in order in every format.
        #[test]
        fn any_frames_arrive_whole(
            sizes in proptest::collection::vec(prop_oneof![0usize..100, 4000usize..20000, 60000usize..300000], 1..12),
            pipe in prop_oneof![Just(977usize), Just(64 << 10), Just(4 << 20)],
            room in prop_oneof![Just(4096usize), Just(64 << 10), Just(MAX_RECORD + TAG_LEN)],
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            for format in FORMATS {
                let t = rt.block_on(round_trip(format, &frames(&sizes), pipe, room));
                prop_assert!(t.got == t.sent, "{:?} pipe {}", format, pipe);
            }
        }
    }
}
