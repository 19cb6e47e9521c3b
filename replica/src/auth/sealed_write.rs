//! The writing half of a sealed stream (`stream.rs` has the reading half
//! and the `AsyncRead`/`AsyncWrite` types around both): every write is
//! sealed into records at once; a big slice ([`DIRECT_MIN`] bytes or more)
//! is tagged where it lies and sent from there, up to
//! [`RECORDS_PER_WRITE`] records in one `writev`, and only what the socket
//! did not take is copied, to go out first on the next call.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::AsyncWrite;

#[cfg(test)]
use super::record::{RecordFormat, TagLayout};
use super::record::{RecordKey, LEN_LEN, MAX_RECORD, TAG_LEN};
use super::stream::DIRECT_MIN;

/// Records of one big slice that a single `writev` sends at most (a MiB
/// in four records: one system call where there were four).
const RECORDS_PER_WRITE: usize = 4;

/// The writing state of one direction. A write is sealed at once and
/// reported written; what the socket does not take goes out first on the
/// next write or on [`SealedWrite::poll_flush_to`].
pub struct SealedWrite {
    key: RecordKey,
    seq: u64,
    out: Vec<u8>,
    pos: usize,
    /// Payload bytes copied into `out` (the rest went from the caller's
    /// buffers to the socket).
    copied: u64,
    /// The last `writev` of a big slice left some of it unsent.
    socket_full: bool,
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
            copied: 0,
            socket_full: false,
        }
    }

    /// Payload bytes this writer copied (rather than sent in place).
    pub fn copied_bytes(&self) -> u64 {
        self.copied
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

    /// Seals the start of `bufs`: the small slices copied into one record,
    /// then a big one ([`DIRECT_MIN`]) right after them sent from where it
    /// lies. Returns the bytes of `bufs` taken.
    pub fn poll_write_vectored_to<W: AsyncWrite + Unpin>(
        &mut self,
        mut inner: Pin<&mut W>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        ready!(self.poll_drain(inner.as_mut(), cx))?;
        let direct = |b: &[u8]| b.len() >= DIRECT_MIN && self.key.seals_detached();
        let mut parts: Vec<&[u8]> = Vec::with_capacity(bufs.len());
        let mut taken = 0;
        let mut next = bufs.iter().map(|b| &**b).filter(|b| !b.is_empty());
        let mut big = None;
        for b in next.by_ref() {
            if direct(b) {
                big = Some(b);
                break;
            }
            let n = b.len().min(MAX_RECORD - taken);
            parts.push(&b[..n]);
            taken += n;
            if taken == MAX_RECORD {
                break;
            }
        }
        if taken > 0 {
            self.key.seal(self.seq, &parts, &mut self.out);
            self.seq += 1;
            self.copied += taken as u64;
        }
        let Some(big) = big else {
            if taken == 0 {
                return Poll::Ready(Ok(0));
            }
            if let Poll::Ready(Err(e)) = self.poll_drain(inner, cx) {
                return Poll::Ready(Err(e));
            }
            return Poll::Ready(Ok(taken));
        };
        // Up to RECORDS_PER_WRITE records of the big slice in one `writev`;
        // one while the socket refuses some (the tags of records it would
        // not take are work thrown away).
        let batch = if self.socket_full {
            1
        } else {
            RECORDS_PER_WRITE
        };
        let mut records: [[&[u8]; 3]; RECORDS_PER_WRITE] = [[&[]; 3]; RECORDS_PER_WRITE];
        let mut lens = [[0u8; LEN_LEN]; RECORDS_PER_WRITE];
        let mut tags = [[0u8; TAG_LEN]; RECORDS_PER_WRITE];
        let mut payloads: [&[u8]; RECORDS_PER_WRITE] = [&[]; RECORDS_PER_WRITE];
        let mut count = 0;
        for (i, payload) in big.chunks(MAX_RECORD).take(batch).enumerate() {
            let Some(tag) = self.key.tag_detached(self.seq + i as u64, payload) else {
                return Poll::Ready(Err(io::Error::other("record tag failed")));
            };
            payloads[i] = payload;
            tags[i] = tag;
            lens[i] = (payload.len() as u32).to_le_bytes();
            count += 1;
        }
        for (i, payload) in payloads[..count].iter().enumerate() {
            records[i] = [&lens[i], payload, &tags[i]];
        }
        let mut slices = [io::IoSlice::new(&[]); 1 + 3 * RECORDS_PER_WRITE];
        slices[0] = io::IoSlice::new(&self.out[self.pos..]);
        for (i, record) in records[..count].iter().enumerate() {
            for (j, piece) in record.iter().enumerate() {
                slices[1 + 3 * i + j] = io::IoSlice::new(piece);
            }
        }
        let written = match inner
            .as_mut()
            .poll_write_vectored(cx, &slices[..1 + 3 * count])
        {
            Poll::Ready(Ok(n)) => n,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => 0,
        };
        let whole: usize = slices[..1 + 3 * count].iter().map(|s| s.len()).sum();
        self.socket_full = written < whole;
        let sealed = self.keep_unsent(written, &records[..count]);
        self.seq += sealed as u64;
        let sent: usize = payloads[..sealed].iter().map(|p| p.len()).sum();
        Poll::Ready(Ok(taken + sent))
    }

    /// After a `writev` of `out`'s unsent bytes and then `records` (each a
    /// length, a payload and a tag) took `written` bytes: keeps the rest of
    /// the record it stopped in (or of the first, if it took none of them)
    /// in `out`, to go out first. Returns how many records went out or
    /// were kept: the ones after are not sent, and their sequence numbers
    /// are the next records'.
    fn keep_unsent(&mut self, written: usize, records: &[[&[u8]; 3]]) -> usize {
        let queued = self.out.len() - self.pos;
        let mut skip = if written <= queued {
            self.pos += written;
            0
        } else {
            self.out.clear();
            self.pos = 0;
            written - queued
        };
        let mut sealed = 0;
        for record in records {
            let size: usize = record.iter().map(|p| p.len()).sum();
            if skip >= size {
                skip -= size;
                sealed += 1;
                continue;
            }
            if skip == 0 && sealed > 0 {
                break;
            }
            for (i, piece) in record.iter().enumerate() {
                if skip >= piece.len() {
                    skip -= piece.len();
                    continue;
                }
                self.out.extend_from_slice(&piece[skip..]);
                if i == 1 {
                    self.copied += (piece.len() - skip) as u64;
                }
                skip = 0;
            }
            sealed += 1;
            break;
        }
        if self.pos == self.out.len() {
            self.out.clear();
            self.pos = 0;
        }
        sealed
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
