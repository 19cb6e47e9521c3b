//! The replicator: every write fans out to every healthy replica; the
//! client's reply waits until all of them acked and a majority of the
//! configured replicas is still healthy. Reads go to one healthy replica,
//! round robin. A replica that errors, times out or disconnects is faulted
//! with a reason and never used again until recovered.
//!
//! Ordering: writes, trims and zeroings take a [`RangeLock`] on their byte
//! range for the whole fan-out, so overlapping writes reach every replica
//! in one order; disjoint writes run in parallel.

mod range_lock;
mod slot;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use strata_replica::client::{ClientError, ReplicaClient};
use strata_replica::wire::Status;
use strata_replica::AllocationExtent;

pub use range_lock::{RangeGuard, RangeLock};
pub use slot::{Health, Slot};

/// Why the replicator refused or failed a request.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("Volume {volume}: {op} at offset {offset} refused: only {healthy} of {configured} replicas are healthy, {quorum} are needed")]
    BelowQuorum {
        volume: String,
        op: &'static str,
        offset: u64,
        healthy: usize,
        configured: usize,
        quorum: usize,
    },
    #[error("Volume {volume}: {op} at offset {offset} failed on every replica: {last}")]
    NoReplica {
        volume: String,
        op: &'static str,
        offset: u64,
        last: String,
    },
    #[error("Volume {volume}: {op} at offset {offset} length {len} is invalid: {reason}")]
    Invalid {
        volume: String,
        op: &'static str,
        offset: u64,
        len: u64,
        reason: String,
    },
}

/// Client-visible IO counters.
#[derive(Debug, Default)]
pub struct IoCounters {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub flushes: AtomicU64,
    pub trims: AtomicU64,
    pub errors: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
}

/// One volume as the controller sees it.
#[derive(Debug)]
pub struct Volume {
    pub name: String,
    pub size: u64,
    pub epoch: u64,
    pub slots: Vec<Slot>,
    /// Healthy replicas needed to accept writes: a majority of `slots`.
    pub quorum: usize,
    range_lock: RangeLock,
    next_read: AtomicUsize,
    pub io: IoCounters,
}

const BLOCK: u64 = strata_replica::BLOCK_SIZE;

/// The smallest block-aligned range covering `[offset, offset + len)`.
fn align_out(offset: u64, len: u64) -> (u64, u64) {
    (
        offset / BLOCK * BLOCK,
        (offset + len).div_ceil(BLOCK) * BLOCK,
    )
}

/// The largest block-aligned range inside `[offset, offset + len)` (empty
/// when `start >= end`).
fn align_in(offset: u64, len: u64) -> (u64, u64) {
    (
        offset.div_ceil(BLOCK) * BLOCK,
        (offset + len) / BLOCK * BLOCK,
    )
}

fn is_request_error(e: &ClientError) -> bool {
    matches!(
        e,
        ClientError::Replica {
            status: Status::Invalid,
            ..
        }
    )
}

impl Volume {
    /// A volume over already-connected slots.
    pub fn new(name: String, size: u64, epoch: u64, slots: Vec<Slot>) -> Volume {
        let quorum = slots.len() / 2 + 1;
        Volume {
            name,
            size,
            epoch,
            slots,
            quorum,
            range_lock: RangeLock::new(),
            next_read: AtomicUsize::new(0),
            io: IoCounters::default(),
        }
    }

    pub fn healthy(&self) -> usize {
        self.slots.iter().filter(|s| s.is_healthy()).count()
    }

    /// "healthy", "degraded" or "read-only".
    pub fn state(&self) -> &'static str {
        let h = self.healthy();
        if h == self.slots.len() {
            "healthy"
        } else if h >= self.quorum {
            "degraded"
        } else {
            "read-only"
        }
    }

    pub fn replica_addrs(&self) -> Vec<SocketAddr> {
        self.slots.iter().map(|s| s.addr).collect()
    }

    fn below_quorum(&self, op: &'static str, offset: u64) -> VolumeError {
        VolumeError::BelowQuorum {
            volume: self.name.clone(),
            op,
            offset,
            healthy: self.healthy(),
            configured: self.slots.len(),
            quorum: self.quorum,
        }
    }

    /// Runs `f` on every healthy replica in parallel; faults those that
    /// fail; succeeds if at least a quorum acknowledged.
    async fn fan_out<F, Fut>(
        &self,
        op: &'static str,
        offset: u64,
        len: u64,
        f: F,
    ) -> Result<(), VolumeError>
    where
        F: Fn(Arc<ReplicaClient>) -> Fut,
        Fut: Future<Output = Result<(), ClientError>>,
    {
        let targets: Vec<(usize, Arc<ReplicaClient>)> = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.client().map(|c| (i, c)))
            .collect();
        if targets.len() < self.quorum {
            self.io.errors.fetch_add(1, Ordering::Relaxed);
            return Err(self.below_quorum(op, offset));
        }
        let results = futures::future::join_all(targets.into_iter().map(|(i, client)| {
            let slot = &self.slots[i];
            slot.in_flight.fetch_add(1, Ordering::Relaxed);
            let fut = f(client);
            async move {
                let r = fut.await;
                slot.in_flight.fetch_sub(1, Ordering::Relaxed);
                slot.record(r.is_ok());
                (i, r)
            }
        }))
        .await;
        let mut acked = 0;
        let mut invalid = None;
        for (i, r) in results {
            match r {
                Ok(()) => acked += 1,
                Err(e) if is_request_error(&e) => invalid = Some(e.to_string()),
                Err(e) => {
                    self.slots[i].fault(&self.name, format!("{op} at offset {offset} failed: {e}"));
                }
            }
        }
        if let Some(reason) = invalid {
            self.io.errors.fetch_add(1, Ordering::Relaxed);
            return Err(VolumeError::Invalid {
                volume: self.name.clone(),
                op,
                offset,
                len,
                reason,
            });
        }
        if acked < self.quorum {
            self.io.errors.fetch_add(1, Ordering::Relaxed);
            return Err(self.below_quorum(op, offset));
        }
        Ok(())
    }

    /// Runs `f` on one healthy replica, moving to the next one if it fails.
    async fn read_one<T, F, Fut>(
        &self,
        op: &'static str,
        offset: u64,
        f: F,
    ) -> Result<T, VolumeError>
    where
        F: Fn(Arc<ReplicaClient>) -> Fut,
        Fut: Future<Output = Result<T, ClientError>>,
    {
        let n = self.slots.len();
        let start = self.next_read.fetch_add(1, Ordering::Relaxed);
        let mut last = String::from("no healthy replica");
        for k in 0..n {
            let slot = &self.slots[(start + k) % n];
            let Some(client) = slot.client() else {
                continue;
            };
            slot.in_flight.fetch_add(1, Ordering::Relaxed);
            let r = f(client).await;
            slot.in_flight.fetch_sub(1, Ordering::Relaxed);
            slot.record(r.is_ok());
            match r {
                Ok(v) => return Ok(v),
                Err(e) if is_request_error(&e) => {
                    return Err(VolumeError::Invalid {
                        volume: self.name.clone(),
                        op,
                        offset,
                        len: 0,
                        reason: e.to_string(),
                    })
                }
                Err(ClientError::Replica {
                    status: Status::Corrupt,
                    message,
                    ..
                }) => {
                    // Damaged data on that replica only: try a peer. Repair
                    // from the peer is part of recovery (not done here).
                    tracing::error!(volume = %self.name, replica = %slot.addr, "corrupt data: {message}");
                    last = message;
                }
                Err(e) => {
                    last = e.to_string();
                    slot.fault(&self.name, format!("{op} at offset {offset} failed: {e}"));
                }
            }
        }
        self.io.errors.fetch_add(1, Ordering::Relaxed);
        Err(VolumeError::NoReplica {
            volume: self.name.clone(),
            op,
            offset,
            last,
        })
    }

    pub async fn read(&self, offset: u64, len: u32) -> Result<Bytes, VolumeError> {
        let (start, end) = align_out(offset, len as u64);
        let data = self
            .read_one("read", start, |c| async move {
                c.read(start, (end - start) as u32).await
            })
            .await?;
        self.io.reads.fetch_add(1, Ordering::Relaxed);
        self.io.bytes_read.fetch_add(len as u64, Ordering::Relaxed);
        if start == offset && end == offset + len as u64 {
            Ok(data)
        } else {
            let at = (offset - start) as usize;
            Ok(data.slice(at..at + len as usize))
        }
    }

    /// Writes `data` at `offset`. A write that does not cover whole blocks
    /// becomes a read-modify-write of the blocks it touches, under the range
    /// lock of those blocks so no other write can interleave.
    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), VolumeError> {
        let len = data.len() as u64;
        let (start, end) = align_out(offset, len);
        let _range = self.range_lock.lock(start, end).await;
        let data = if start == offset && end == offset + len {
            data
        } else {
            let old = self
                .read_one("read-modify-write", start, |c| async move {
                    c.read(start, (end - start) as u32).await
                })
                .await?;
            let mut buf = bytes::BytesMut::from(&old[..]);
            let at = (offset - start) as usize;
            buf[at..at + len as usize].copy_from_slice(&data);
            buf.freeze()
        };
        self.fan_out("write", start, end - start, |c| {
            let data = data.clone();
            async move { c.write(start, data, fua).await }
        })
        .await?;
        self.io.writes.fetch_add(1, Ordering::Relaxed);
        self.io.bytes_written.fetch_add(len, Ordering::Relaxed);
        Ok(())
    }

    pub async fn flush(&self) -> Result<(), VolumeError> {
        self.fan_out("flush", 0, 0, |c| async move { c.flush().await })
            .await?;
        self.io.flushes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Discards the whole blocks inside `[offset, offset + len)`; partial
    /// blocks at the edges are left alone (a trim is advisory).
    pub async fn trim(&self, offset: u64, len: u32) -> Result<(), VolumeError> {
        let (start, end) = align_in(offset, len as u64);
        if start < end {
            let _range = self.range_lock.lock(start, end).await;
            let n = (end - start) as u32;
            self.fan_out("trim", start, end - start, |c| async move {
                c.trim(start, n).await
            })
            .await?;
        }
        self.io.trims.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Makes `[offset, offset + len)` read as zeros: whole blocks through the
    /// replicas' zeroing (punching holes if `may_punch`), partial edge blocks
    /// by writing zeros into them.
    pub async fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        may_punch: bool,
        fua: bool,
    ) -> Result<(), VolumeError> {
        let end_req = offset + len as u64;
        let (start, end) = align_in(offset, len as u64);
        if start >= end {
            return self
                .write(offset, Bytes::from(vec![0u8; len as usize]), fua)
                .await;
        }
        if offset < start {
            self.write(
                offset,
                Bytes::from(vec![0u8; (start - offset) as usize]),
                false,
            )
            .await?;
        }
        if end < end_req {
            self.write(end, Bytes::from(vec![0u8; (end_req - end) as usize]), false)
                .await?;
        }
        {
            let _range = self.range_lock.lock(start, end).await;
            let n = (end - start) as u32;
            self.fan_out("write zeroes", start, end - start, |c| async move {
                c.write_zeroes(start, n, !may_punch).await?;
                if fua {
                    c.flush().await?;
                }
                Ok(())
            })
            .await?;
        }
        if fua && (offset < start || end < end_req) {
            self.flush().await?;
        }
        self.io.writes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    pub async fn block_status(
        &self,
        offset: u64,
        len: u32,
    ) -> Result<Vec<AllocationExtent>, VolumeError> {
        let (start, end) = align_out(offset, len as u64);
        let n = (end - start).min(u32::MAX as u64 / BLOCK * BLOCK) as u32;
        self.read_one("block status", start, |c| async move {
            c.block_status(start, n).await
        })
        .await
    }
}
