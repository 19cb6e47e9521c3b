//! Recycled buffers for READ replies.
//!
//! A 1 MiB READ used to allocate a fresh zeroed buffer: glibc serves that
//! size with `mmap`, so every read paid a page fault per 4 KiB page, the
//! zeroing, and an `munmap` when the reply had been sent (a quarter of the
//! replica's CPU in a sequential-read profile). Buffers of
//! [`MIN_POOLED`] bytes and more now come back here when their reply is
//! dropped and serve the next READ of the same size class.
//!
//! The pool keeps at most [`MAX_KEPT_BYTES`] of idle buffers, so it costs a
//! bounded amount of memory on top of the requests in flight. A recycled
//! buffer still holds the previous reply's bytes: the store's read fills
//! every byte of the buffer it is given (data, or zeros for holes), and a
//! READ that fails never sends its buffer.

use bytes::Bytes;
use parking_lot::Mutex;

/// Smaller buffers come from the allocator, which serves them well.
pub const MIN_POOLED: usize = 64 * 1024;
/// Idle bytes the pool keeps at most.
pub const MAX_KEPT_BYTES: usize = 16 << 20;

static POOL: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// A buffer of exactly `len` bytes whose contents are unspecified (zeros or
/// an earlier read's data): the caller overwrites all of it.
pub fn take(len: usize) -> Vec<u8> {
    if len >= MIN_POOLED {
        let mut pool = POOL.lock();
        // Same size class: at least `len`, at most twice as large.
        if let Some(i) = pool
            .iter()
            .position(|b| b.capacity() >= len && b.capacity() <= 2 * len)
        {
            let mut buf = pool.swap_remove(i);
            drop(pool);
            buf.resize(len, 0);
            return buf;
        }
    }
    vec![0u8; len]
}

/// Turns a filled buffer into a reply payload that goes back to the pool
/// when the last reference to it is dropped.
pub fn into_bytes(buf: Vec<u8>) -> Bytes {
    if buf.capacity() < MIN_POOLED {
        return Bytes::from(buf);
    }
    Bytes::from_owner(Recycled(buf))
}

/// Returns a buffer that was taken but not sent (a read that will be done
/// elsewhere), so the next READ can use it.
pub fn give_back(buf: Vec<u8>) {
    if buf.capacity() >= MIN_POOLED {
        drop(Recycled(buf));
    }
}

struct Recycled(Vec<u8>);

impl AsRef<[u8]> for Recycled {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Recycled {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.0);
        let mut pool = POOL.lock();
        let kept: usize = pool.iter().map(Vec::capacity).sum();
        if kept + buf.capacity() <= MAX_KEPT_BYTES {
            pool.push(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dropped_reply_buffer_serves_the_next_read_of_its_size() {
        let len = 1 << 20;
        let mut buf = take(len);
        buf.fill(7);
        let ptr = buf.as_ptr();
        let bytes = into_bytes(buf);
        assert_eq!(bytes.len(), len);
        assert!(bytes.iter().all(|&b| b == 7));
        drop(bytes);
        // Other tests may use the pool at the same time: look for ours.
        let mut taken = Vec::new();
        let mut found = false;
        for _ in 0..(MAX_KEPT_BYTES / len + 1) {
            let b = take(len);
            assert_eq!(b.len(), len);
            found |= b.as_ptr() == ptr;
            taken.push(b);
        }
        assert!(found, "the recycled buffer was not reused");
    }

    #[test]
    fn small_buffers_are_not_pooled_and_the_pool_is_bounded() {
        let small = into_bytes(vec![1u8; 4096]);
        assert_eq!(small.len(), 4096);
        let bufs: Vec<Bytes> = (0..40).map(|_| into_bytes(take(1 << 20))).collect();
        drop(bufs);
        let kept: usize = POOL.lock().iter().map(Vec::capacity).sum();
        assert!(kept <= MAX_KEPT_BYTES, "pool keeps {kept} bytes");
    }
}
