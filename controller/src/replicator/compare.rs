//! Comparing a replica with a healthy peer after a crash, without an
//! activity log: both replicas digest every region of the live volume
//! locally (BLAKE3 over the data they hold, holes by extent; only the
//! 32-byte digests cross the network), and the regions whose digests differ
//! are marked pending for the sync job to copy. Reading the whole allocated
//! volume on both sides is the cost; the transfer is only what differs.
//!
//! The comparison takes no lock: client writes reach both replicas in one
//! order, so two digests taken at different moments can only be equal if
//! the region ends up equal once both have applied the same writes; a
//! region caught mid-write just differs and is copied, under its range
//! lock, by the sync job.

use std::time::Instant;

use strata_replica::control::MAX_DIGEST_WINDOW;

use super::{control, Slot, SyncError, Volume, REGION};

/// Marks every region where `slot`'s replica differs from a healthy one.
/// Returns how many regions differ.
pub async fn mark_differences(volume: &Volume, slot: &Slot) -> Result<u64, SyncError> {
    let source = volume.healthy_addr()?;
    let timeout = volume.options.control_timeout * 12;
    let mut src = control::connect(source, timeout).await?;
    let mut dst = control::connect(slot.addr, timeout).await?;
    {
        let mut p = slot.progress.lock();
        p.verify = true;
        p.total_bytes = volume.size();
        p.done_bytes = 0;
        p.started = Some(Instant::now());
    }
    // The comparison reads both replicas' data: the resync bandwidth cap
    // applies to it too, a second's worth per call.
    let window = match volume.options.sync_rate {
        Some(rate) => (rate / REGION).max(1) * REGION,
        None => MAX_DIGEST_WINDOW,
    }
    .min(MAX_DIGEST_WINDOW);
    let started = Instant::now();
    let mut differing = 0;
    let mut offset = 0;
    while offset < volume.size() {
        if let Some(rate) = volume.options.sync_rate {
            let due = std::time::Duration::from_secs_f64(offset as f64 / rate.max(1) as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
        let len = window.min(volume.size() - offset);
        let (a, b) = tokio::join!(
            control::region_digests(&mut src, source, &volume.name, offset, len, REGION),
            control::region_digests(&mut dst, slot.addr, &volume.name, offset, len, REGION),
        );
        let (a, b) = (a?, b?);
        if a.len() != b.len() {
            return Err(SyncError::DigestCount {
                offset,
                source_count: a.len(),
                target_count: b.len(),
            });
        }
        for (i, (da, db)) in a.iter().zip(&b).enumerate() {
            if da != db {
                slot.mark_pending(offset + i as u64 * REGION, REGION);
                differing += 1;
            }
        }
        slot.progress.lock().done_bytes += len;
        offset += len;
    }
    tracing::info!(volume = %volume.name, replica = %slot.addr, differing, "replica compared with {source}");
    Ok(differing)
}
