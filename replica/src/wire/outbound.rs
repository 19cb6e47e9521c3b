//! Outgoing frames, batched: many small frames become one `writev`, and big
//! payloads (WRITE data, READ replies) are sent from their own `Bytes`
//! without being copied. Shared by the server's reply writer and the
//! client's request writer.

use std::io::{self, IoSlice};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncWrite, AsyncWriteExt};

/// Payloads up to this size are copied next to their header; larger ones
/// are referenced.
const INLINE_MAX: usize = 16 * 1024;
/// `writev` segments per call (well under `IOV_MAX`).
const MAX_IOV: usize = 64;
/// A writer stops collecting frames into one batch at about this many bytes.
pub(crate) const BATCH_BYTES: usize = 1 << 20;

/// Frames queued for one vectored write.
pub(crate) struct OutBatch {
    /// Headers and small payloads not yet cut into `chunks`.
    buf: BytesMut,
    chunks: Vec<Bytes>,
    len: usize,
}

impl OutBatch {
    pub(crate) fn new() -> Self {
        OutBatch {
            buf: BytesMut::with_capacity(64 * 1024),
            chunks: Vec::with_capacity(MAX_IOV),
            len: 0,
        }
    }

    /// Bytes queued.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn push(&mut self, header: &[u8], payload: Bytes) {
        self.len += header.len() + payload.len();
        self.buf.extend_from_slice(header);
        if payload.len() <= INLINE_MAX {
            self.buf.extend_from_slice(&payload);
        } else {
            if !self.buf.is_empty() {
                self.chunks.push(self.buf.split().freeze());
            }
            self.chunks.push(payload);
        }
    }

    /// Writes everything queued, then empties the batch (also on error).
    pub(crate) async fn write_to<W: AsyncWrite + Unpin>(&mut self, w: &mut W) -> io::Result<()> {
        if !self.buf.is_empty() {
            self.chunks.push(self.buf.split().freeze());
        }
        let result = write_chunks(&self.chunks, w).await;
        self.chunks.clear();
        self.len = 0;
        result
    }
}

async fn write_chunks<W: AsyncWrite + Unpin>(chunks: &[Bytes], w: &mut W) -> io::Result<()> {
    let (mut first, mut skip) = (0usize, 0usize);
    while first < chunks.len() {
        let mut slices = [IoSlice::new(&[]); MAX_IOV];
        let mut n = 0;
        for (i, c) in chunks[first..].iter().take(MAX_IOV).enumerate() {
            slices[i] = IoSlice::new(if i == 0 { &c[skip..] } else { c });
            n = i + 1;
        }
        let mut written = w.write_vectored(&slices[..n]).await?;
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        while written > 0 {
            let rest = chunks[first].len() - skip;
            if written >= rest {
                written -= rest;
                first += 1;
                skip = 0;
            } else {
                skip += written;
                written = 0;
            }
        }
        // Skip empty chunks so the loop ends.
        while first < chunks.len() && chunks[first].len() == skip {
            first += 1;
            skip = 0;
        }
    }
    w.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn batches_inline_and_referenced_payloads_in_order() {
        let mut batch = OutBatch::new();
        let big = Bytes::from(vec![7u8; INLINE_MAX + 1]);
        batch.push(b"h1", Bytes::from_static(b"small"));
        batch.push(b"h2", big.clone());
        batch.push(b"h3", Bytes::new());
        assert_eq!(batch.len(), 2 + 5 + 2 + big.len() + 2);
        let mut out = Vec::new();
        batch.write_to(&mut out).await.unwrap();
        let mut want = b"h1smallh2".to_vec();
        want.extend_from_slice(&big);
        want.extend_from_slice(b"h3");
        assert_eq!(out, want);
        assert_eq!(batch.len(), 0);
        batch.push(b"again", Bytes::new());
        let mut out = Vec::new();
        batch.write_to(&mut out).await.unwrap();
        assert_eq!(out, b"again");
    }
}
