//! The replicator: every write fans out to every healthy replica; the
//! client's reply waits until all of them acked and a majority of the
//! configured replicas is still healthy. Reads go to one healthy replica:
//! one on this host if there is one, else the offset's stripe's
//! ([`READ_STRIPE`]). A replica that errors, times out or disconnects is
//! faulted with a reason and never used again until recovered.
//!
//! Ordering: writes, trims and zeroings take a [`RangeLock`] on their byte
//! range for the whole fan-out, so overlapping writes reach every replica
//! in one order; disjoint writes run in parallel.
//!
//! Membership: a replica that faults is remembered with the regions it
//! misses from then on (`slot.rs`). Before any write it missed is
//! acknowledged, the epoch is bumped on the replicas still in the volume
//! ([`Volume::bump_epoch`]), so a replica that missed acknowledged writes
//! always has an older persisted epoch than one that did not: that is how a
//! restarted controller tells them apart (`assemble.rs`). Recovery (rejoin,
//! delta resync, full rebuild) is in `recovery.rs`.

mod chain_copy;
mod compare;
pub mod control;
mod copy;
pub mod disk;
mod error;
mod expand;
mod fan_out;
pub mod lag;
mod pace;
mod range_lock;
pub mod recovery;
mod slot;
pub mod snapshot;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;

use bytes::Bytes;
use strata_replica::client::{ClientError, SharedCrc};
use strata_replica::wire::Status;
use strata_replica::AllocationExtent;

pub use error::{IoCounters, ResizeRefusal, SnapshotProblem, SyncError, VolumeError};
pub use expand::Expansion;
pub use lag::{LagPolicy, LagState, LatencyClass};
pub use range_lock::{RangeGuard, RangeLock};
pub use slot::{Departure, Health, Slot, SyncProgress, REGION};

/// Timeouts and limits of a volume's replicator.
#[derive(Debug, Clone)]
pub struct VolumeOptions {
    pub io_timeout: Duration,
    pub control_timeout: Duration,
    /// Resync/rebuild bandwidth cap in bytes per second (None: unlimited).
    pub sync_rate: Option<u64>,
    /// When a replica that answers late is faulted (`lag.rs`).
    pub lag: LagPolicy,
}

impl Default for VolumeOptions {
    fn default() -> Self {
        VolumeOptions {
            io_timeout: Duration::from_secs(10),
            control_timeout: Duration::from_secs(5),
            sync_rate: None,
            lag: LagPolicy::default(),
        }
    }
}

/// One volume as the controller sees it.
#[derive(Debug)]
pub struct Volume {
    pub name: String,
    /// Bytes; grows with [`Volume::expand`] (`expand.rs`).
    size: AtomicU64,
    epoch: AtomicU64,
    slots: RwLock<Vec<Arc<Slot>>>,
    range_lock: RangeLock,
    /// IO holds it shared; epoch changes and joins hold it exclusively, so
    /// no request is in flight with an epoch that is being replaced.
    gate: tokio::sync::RwLock<()>,
    /// A replica left since the last epoch bump.
    needs_bump: AtomicBool,
    /// The newer epoch a replica answered with once another controller took
    /// the volume over (0: never). From then on every request is refused.
    fenced_by: AtomicU64,
    /// Peers' recent latency and the replicas faulted for lagging.
    pub lag: LagState,
    pub options: VolumeOptions,
    /// This controller instance: the owner of the epochs it sets.
    pub owner: String,
    pub io: IoCounters,
    /// Serialises changes of the snapshot chain (create, delete, revert)
    /// with each other and with a rebuild copying snapshot layers.
    pub(crate) chain_lock: tokio::sync::Mutex<()>,
    /// Snapshots a running backup reads, with how many readers each.
    snapshots_in_use: parking_lot::Mutex<std::collections::HashMap<String, usize>>,
    /// Frontend connections (NBD, iSCSI) attached now.
    pub attached: AtomicUsize,
    /// How long the last snapshot held new writes, in microseconds.
    pub last_snapshot_pause_us: AtomicU64,
}

const BLOCK: u64 = strata_replica::BLOCK_SIZE;

/// Which replica serves a read:
///
/// - a healthy replica on the controller's own host, if there is one (the
///   first in slot order): no network hop, and replicas on one host share
///   one page cache, so spreading reads over them would only wake more
///   processes (3 replicas on one host, 4K random reads QD32: about 23k
///   IOPS striped over the three, 35k from one);
/// - otherwise the stripe's replica: reads of one stripe of this many
///   bytes go to the same replica (the next healthy one in slot order if it
///   is out), consecutive stripes to consecutive replicas. Each node's page
///   cache then holds its share of the volume instead of all of it (round
///   robin made every replica cache every block read), and a cold block is
///   read from one disk, not three. Stripes of 4 MiB keep each replica's
///   reads sequential enough for its readahead.
pub const READ_STRIPE: u64 = 4 << 20;

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
    /// A volume over already-connected slots, at `epoch`.
    pub fn new(
        name: String,
        size: u64,
        epoch: u64,
        owner: String,
        slots: Vec<Slot>,
        options: VolumeOptions,
    ) -> Volume {
        Volume {
            name,
            size: AtomicU64::new(size),
            epoch: AtomicU64::new(epoch),
            slots: RwLock::new(slots.into_iter().map(Arc::new).collect()),
            range_lock: RangeLock::new(),
            gate: tokio::sync::RwLock::new(()),
            needs_bump: AtomicBool::new(false),
            fenced_by: AtomicU64::new(0),
            lag: LagState::default(),
            options,
            owner,
            io: IoCounters::default(),
            chain_lock: tokio::sync::Mutex::new(()),
            snapshots_in_use: parking_lot::Mutex::new(Default::default()),
            attached: AtomicUsize::new(0),
            last_snapshot_pause_us: AtomicU64::new(0),
        }
    }

    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// The volume's size in bytes now (it may grow, never shrinks).
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    pub fn slots(&self) -> Vec<Arc<Slot>> {
        self.slots.read().clone()
    }

    /// Healthy replicas needed to accept writes: a majority of the slots.
    pub fn quorum(&self) -> usize {
        self.slots.read().len() / 2 + 1
    }

    pub fn healthy(&self) -> usize {
        self.slots.read().iter().filter(|s| s.is_healthy()).count()
    }

    /// "healthy", "degraded" or "read-only".
    pub fn state(&self) -> &'static str {
        let slots = self.slots.read();
        let h = slots.iter().filter(|s| s.is_healthy()).count();
        if h == slots.len() {
            "healthy"
        } else if h > slots.len() / 2 {
            "degraded"
        } else {
            "read-only"
        }
    }

    pub(crate) fn below_quorum(&self, op: &'static str, offset: u64) -> VolumeError {
        VolumeError::BelowQuorum {
            volume: self.name.clone(),
            op,
            offset,
            healthy: self.healthy(),
            configured: self.slots.read().len(),
            quorum: self.quorum(),
        }
    }

    /// Takes `slot` out of the volume, remembering what it was so a return
    /// can be told from a replacement, and schedules an epoch bump.
    pub fn fault(&self, slot: &Slot, reason: String) {
        let lineage = slot.departure().map(|d| d.lineage).unwrap_or_default();
        if slot.fault(&self.name, reason) {
            slot.set_departure(Some(Departure {
                lineage,
                epoch: self.epoch(),
            }));
            self.needs_bump.store(true, Ordering::Release);
        }
    }

    /// Bumps the epoch on every replica still in the volume if one left
    /// since the last bump. Waits for requests in flight to finish first.
    pub async fn bump_epoch_if_needed(&self) {
        if !self.needs_bump.load(Ordering::Acquire) {
            return;
        }
        let _exclusive = self.gate.write().await;
        self.bump_epoch_locked().await;
    }

    /// The bump itself; the caller holds the gate exclusively.
    pub(crate) async fn bump_epoch_locked(&self) {
        while self.needs_bump.swap(false, Ordering::AcqRel) {
            let new = self.epoch() + 1;
            for slot in self.slots() {
                let Some((client, counts)) = slot.write_target() else {
                    continue;
                };
                match control::set_epoch(
                    slot.addr,
                    &self.name,
                    new,
                    &self.owner,
                    !counts,
                    slot.is_healthy(),
                    self.options.control_timeout,
                )
                .await
                {
                    Ok(()) => client.set_epoch(new),
                    Err(e) => self.fault(&slot, format!("could not move it to epoch {new}: {e}")),
                }
            }
            self.epoch.store(new, Ordering::Release);
            tracing::info!(volume = %self.name, epoch = new, healthy = self.healthy(), "epoch bumped after a membership change");
        }
    }

    async fn read_inner(&self, offset: u64, len: u32) -> Result<Bytes, VolumeError> {
        let (start, end) = align_out(offset, len as u64);
        // Reads take the range lock too: a read racing a write of the same
        // blocks on a replica could see new data beside an old checksum.
        let _range = self.range_lock.lock(start, end).await;
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
    async fn write_inner(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), VolumeError> {
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
        // One crc for every replica the write goes to (none when every
        // connection's records carry a MAC instead).
        let crc = SharedCrc::default();
        let class = if fua {
            LatencyClass::Durable
        } else {
            LatencyClass::Cached
        };
        self.fan_out("write", class, start, end - start, |c| {
            let data = data.clone();
            let crc = crc.clone();
            async move { c.write_shared(start, data, &crc, fua).await }
        })
        .await?;
        self.io.writes.fetch_add(1, Ordering::Relaxed);
        self.io.bytes_written.fetch_add(len, Ordering::Relaxed);
        Ok(())
    }

    async fn flush_inner(&self) -> Result<(), VolumeError> {
        self.fan_out("flush", LatencyClass::Durable, 0, 0, |c| async move {
            c.flush().await
        })
        .await?;
        self.io.flushes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Discards the whole blocks inside `[offset, offset + len)`; partial
    /// blocks at the edges are left alone (a trim is advisory).
    async fn trim_inner(&self, offset: u64, len: u32) -> Result<(), VolumeError> {
        let (start, end) = align_in(offset, len as u64);
        if start < end {
            let _range = self.range_lock.lock(start, end).await;
            let n = (end - start) as u32;
            self.fan_out(
                "trim",
                LatencyClass::Cached,
                start,
                end - start,
                |c| async move { c.trim(start, n).await },
            )
            .await?;
        }
        self.io.trims.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Makes `[offset, offset + len)` read as zeros: whole blocks through the
    /// replicas' zeroing (punching holes if `may_punch`), partial edge blocks
    /// by writing zeros into them.
    async fn write_zeroes_inner(
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
            let class = if fua {
                LatencyClass::Durable
            } else {
                LatencyClass::Cached
            };
            self.fan_out("write zeroes", class, start, end - start, |c| async move {
                c.write_zeroes(start, n, !may_punch).await?;
                if fua {
                    c.flush().await?;
                }
                Ok(())
            })
            .await?;
        }
        if fua && (offset < start || end < end_req) {
            self.flush_inner().await?;
        }
        self.io.writes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    async fn block_status_inner(
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

    // The public data operations: each holds the gate shared for its
    // duration and, if a replica left meanwhile, bumps the epoch before the
    // client hears back.

    pub async fn read(&self, offset: u64, len: u32) -> Result<Bytes, VolumeError> {
        let r = {
            let _gate = self.gate.read().await;
            self.read_inner(offset, len).await
        };
        self.bump_epoch_if_needed().await;
        r
    }

    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), VolumeError> {
        let r = {
            let _gate = self.gate.read().await;
            self.write_inner(offset, data, fua).await
        };
        self.bump_epoch_if_needed().await;
        r
    }

    pub async fn flush(&self) -> Result<(), VolumeError> {
        let r = {
            let _gate = self.gate.read().await;
            self.flush_inner().await
        };
        self.bump_epoch_if_needed().await;
        r
    }

    pub async fn trim(&self, offset: u64, len: u32) -> Result<(), VolumeError> {
        let r = {
            let _gate = self.gate.read().await;
            self.trim_inner(offset, len).await
        };
        self.bump_epoch_if_needed().await;
        r
    }

    pub async fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        may_punch: bool,
        fua: bool,
    ) -> Result<(), VolumeError> {
        let r = {
            let _gate = self.gate.read().await;
            self.write_zeroes_inner(offset, len, may_punch, fua).await
        };
        self.bump_epoch_if_needed().await;
        r
    }

    pub async fn block_status(
        &self,
        offset: u64,
        len: u32,
    ) -> Result<Vec<AllocationExtent>, VolumeError> {
        let r = {
            let _gate = self.gate.read().await;
            self.block_status_inner(offset, len).await
        };
        self.bump_epoch_if_needed().await;
        r
    }

    /// Adds a slot (a new replica, rebuilt by the recovery loop).
    pub fn push_slot(&self, slot: Slot) -> Arc<Slot> {
        let slot = Arc::new(slot);
        self.slots.write().push(slot.clone());
        slot
    }

    /// Removes the slot at `addr`; refused if the volume would fall below
    /// its write quorum.
    pub async fn remove_slot(&self, addr: SocketAddr) -> Result<(), VolumeError> {
        let _exclusive = self.gate.write().await;
        {
            let mut slots = self.slots.write();
            let Some(i) = slots.iter().position(|s| s.addr == addr) else {
                return Err(VolumeError::NotAReplica {
                    volume: self.name.clone(),
                    addr,
                });
            };
            let healthy_after = slots
                .iter()
                .enumerate()
                .filter(|(j, s)| *j != i && s.is_healthy())
                .count();
            let quorum_after = (slots.len() - 1) / 2 + 1;
            if slots.len() == 1 || healthy_after < quorum_after {
                return Err(VolumeError::WouldLoseQuorum {
                    volume: self.name.clone(),
                    addr,
                    healthy_after,
                    remaining: slots.len() - 1,
                    quorum_after,
                });
            }
            slots.remove(i);
        }
        // The removed replica keeps the old epoch: fenced from now on.
        self.needs_bump.store(true, Ordering::Release);
        self.bump_epoch_locked().await;
        Ok(())
    }

    pub(crate) fn range_lock(&self) -> &RangeLock {
        &self.range_lock
    }

    pub(crate) fn gate(&self) -> &tokio::sync::RwLock<()> {
        &self.gate
    }

    pub(crate) fn request_bump(&self) {
        self.needs_bump.store(true, Ordering::Release);
    }
}
