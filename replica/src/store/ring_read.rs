//! A head read through the data server's io_uring ([`AsyncReads`]): the
//! same ranges and checks as [`Store::read`], without a thread waiting for
//! the disk.

use super::data::head_segments;
use super::verify::check_blocks;
use super::{Source, Store};
use crate::engine::{AsyncReads, ReadOp};
use crate::layer::ENTRY_LEN;
use crate::BLOCK_SIZE;

const BS: usize = BLOCK_SIZE as usize;

impl Store {
    /// [`Store::read`] through `reads`, without a thread: the ranges are
    /// resolved and submitted now, and `done` gets the filled `buf` once
    /// the disk has answered and every block matched its checksum. `done`
    /// gets `Err(buf)` when that is not possible: a chain change holds the
    /// store, a read failed or came back short, a checksum disagreed (it may
    /// have raced a write), or the ring is full. The caller then reads with
    /// [`Store::read`], which retries and reports errors.
    ///
    /// The files stay right even if a chain change closes them meanwhile:
    /// the kernel holds every file it reads from submission on, and a
    /// submission happens under the state lock, as a blocking read does.
    pub fn submit_read(
        &self,
        reads: &AsyncReads,
        offset: u64,
        mut buf: Vec<u8>,
        done: impl FnOnce(std::result::Result<Vec<u8>, Vec<u8>>) + Send + 'static,
    ) {
        use std::os::fd::AsRawFd;
        let Some(st) = self.state.try_read() else {
            return done(Err(buf));
        };
        let Ok((b0, b1)) = self.check_range(st.meta.size, offset, buf.len() as u64) else {
            return done(Err(buf));
        };
        let segments = {
            let maps = st.maps.lock();
            head_segments(&maps, b0, b1)
        };
        let mut ops = Vec::with_capacity(segments.len() * 2);
        let mut entries_len = 0usize;
        for &(s, e, src) in &segments {
            let at = ((s - b0) as usize) * BS;
            let len = ((e - s) as usize) * BS;
            match src {
                Some(Source::Layer(pos)) => {
                    let layer = &st.layers[pos as usize];
                    let ents = ((e - s) * ENTRY_LEN) as usize;
                    ops.push(ReadOp {
                        fd: layer.data.as_raw_fd(),
                        offset: s * BLOCK_SIZE,
                        buf: 0,
                        at,
                        len,
                    });
                    ops.push(ReadOp {
                        fd: layer.map.as_raw_fd(),
                        offset: s * ENTRY_LEN,
                        buf: 1,
                        at: entries_len,
                        len: ents,
                    });
                    entries_len += ents;
                }
                _ => buf[at..at + len].fill(0),
            }
        }
        if ops.is_empty() {
            return done(Ok(buf));
        }
        let entries = vec![0u8; entries_len];
        reads.submit([buf, entries], &ops, move |outcome| match outcome {
            Ok([buf, entries]) if check_blocks(&segments, b0, &buf, &entries).is_none() => {
                done(Ok(buf))
            }
            Ok([buf, _]) | Err([buf, _]) => done(Err(buf)),
        });
        drop(st);
    }
}
