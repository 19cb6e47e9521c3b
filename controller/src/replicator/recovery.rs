//! Bringing replicas back: the recovery loop retries every faulted replica
//! with backoff; one that answers joins write-only ([`Health::Syncing`]) and
//! a sync job copies it the regions it still needs, then it is healthy
//! again. A replica that returns with the lineage and epoch it left with
//! needs only the regions written while it was out (delta resync); any
//! other (wiped, replaced, stale from before a restart) needs every region
//! (full rebuild). Either way, only allocated ranges are copied; holes are
//! trimmed on the target. A full rebuild starts from an empty replica and
//! first copies the snapshot chain, layer by layer (`chain_copy.rs`); a
//! replica whose chain differs from the volume's is always fully rebuilt.
//!
//! A job is resumable by construction: its work is the slot's set of
//! pending regions. A region is taken out of the set when it is copied and
//! put back if the copy fails, so a job interrupted by the source or the
//! target dying continues from where it got to.
//!
//! Each region is copied under the gate (shared) and the region's range
//! lock, so no client write to it can interleave with the copy; client
//! writes to other regions reach the target directly.

use std::sync::Arc;
use std::time::{Duration, Instant};

use strata_replica::client::ReplicaClient;
use tokio::sync::watch;

use std::sync::atomic::Ordering;

use super::copy::{self, Copied, CopyError};
use super::pace::SyncPace;
use super::{chain_copy, compare, control, Health, Slot, SyncError, Volume, REGION};

const MAX_BACKOFF: Duration = Duration::from_secs(5);
const MIN_BACKOFF: Duration = Duration::from_millis(250);
/// Copies a sync job runs at once.
pub const SYNC_PARALLEL: usize = 8;
/// Contiguous pending regions one copy takes (under one range lock): 8 MiB
/// transfers instead of 1 MiB ones.
pub const SYNC_RUN: u64 = 8;

/// Retries faulted replicas until `shutdown`. Replicas the volume was
/// assembled with as syncing (compared after a crash) get their sync job
/// first.
pub async fn recovery_loop(volume: Arc<Volume>, mut shutdown: watch::Receiver<bool>) {
    for slot in volume.slots() {
        if matches!(slot.health(), Health::Syncing(_)) {
            spawn_sync(volume.clone(), slot);
        }
    }
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = strata_net::stopped(&mut shutdown) => return,
        }
        for slot in volume.slots() {
            // A replica whose connection dropped while the volume was idle
            // is found here rather than by the next request.
            if let Some((client, _)) = slot.write_target() {
                if client.is_closed() {
                    let _gate = volume.gate().read().await;
                    volume.fault(&slot, "the data connection closed".into());
                }
                continue;
            }
            volume.bump_epoch_if_needed().await;
            if volume.healthy() == 0 {
                // Nothing to copy from. Joining now would mark the replica
                // incomplete with no way to complete it; the volume waits
                // for a controller restart, which assembles it from the
                // replicas' persisted epochs.
                continue;
            }
            let due = slot.retry.lock().0 <= Instant::now();
            if !due {
                continue;
            }
            match rejoin(&volume, &slot).await {
                Ok(()) => {
                    *slot.retry.lock() = (Instant::now(), MIN_BACKOFF);
                    spawn_sync(volume.clone(), slot.clone());
                }
                Err(e) => {
                    let mut r = slot.retry.lock();
                    tracing::debug!(volume = %volume.name, replica = %slot.addr, "rejoin failed: {e}; retry in {:?}", r.1);
                    *r = (Instant::now() + r.1, (r.1 * 2).min(MAX_BACKOFF));
                }
            }
        }
    }
}

/// How many times a join re-copies snapshots taken while it copied.
const CHAIN_ROUNDS: usize = 5;

/// Runs the sync job of a replica that is syncing, in the background.
pub fn spawn_sync(volume: Arc<Volume>, slot: Arc<Slot>) {
    tokio::spawn(async move {
        if let Err(e) = sync(&volume, &slot).await {
            tracing::warn!(volume = %volume.name, replica = %slot.addr, "sync stopped: {e}");
            // Never leave a replica syncing with no job: out it goes, and
            // the loop brings it back (its pending regions are kept, so
            // nothing is redone).
            if !slot.is_faulted() {
                volume.fault(&slot, format!("sync stopped: {e}"));
                volume.bump_epoch_if_needed().await;
            }
        }
    });
}

/// Opens the replica again and lets it join write-only. One that cannot be
/// resynced by delta is wiped and gets the volume's snapshot chain copied
/// first (`chain_copy.rs`), then joins with every region pending.
async fn rejoin(volume: &Volume, slot: &Slot) -> Result<(), SyncError> {
    let timeout = volume.options.control_timeout;
    let (mut status, mut created) =
        control::open_or_create(slot.addr, &volume.name, Some(volume.size()), timeout).await?;
    // It missed an expansion while it was out: grow it first, so it never
    // takes a write at the wrong size. (Fenced at its own epoch: only a
    // replica whose epoch is not above ours gets here, see below.)
    if status.size < volume.size() && status.epoch <= volume.epoch() {
        status = control::expand_replica(
            slot.addr,
            &volume.name,
            volume.size(),
            status.epoch,
            timeout,
        )
        .await?;
    }
    if status.size != volume.size() {
        return Err(SyncError::SizeMismatch {
            replica: status.size,
            volume: volume.size(),
        });
    }
    let source = volume.healthy_addr()?;
    let chain = control::status(source, &volume.name, timeout)
        .await?
        .snapshots;
    let departure = slot.departure();
    let delta = !created
        && status.snapshots == chain
        && departure.as_ref().is_some_and(|d| {
            !d.lineage.is_empty() && d.lineage == status.lineage && d.epoch == status.epoch
        });
    // Its machine restarted after an unclean stop: writes acknowledged
    // before its last flush may be gone with the page cache, anywhere.
    // Compare it with a peer, not only the regions it missed.
    if delta && status.page_cache_lost {
        tracing::warn!(volume = %volume.name, replica = %slot.addr, "replica lost its page cache (machine restart): comparing it region by region");
        slot.verify.store(true, Ordering::Release);
    }
    if !delta {
        slot.verify.store(false, Ordering::Release);
    }
    slot.counts_for_quorum.store(false, Ordering::Release);
    if !delta && !created {
        // Nothing on it can be trusted, and stale layers would show through
        // the snapshots copied next: start from an empty replica.
        tracing::info!(volume = %volume.name, replica = %slot.addr, "wiping a replica for a full rebuild");
        control::delete_replica(slot.addr, &volume.name, timeout).await?;
        (status, created) =
            control::open_or_create(slot.addr, &volume.name, Some(volume.size()), timeout).await?;
        if !created {
            return Err(SyncError::NotRecreated);
        }
    }
    slot.peer_copy
        .store(status.copies_from_peers, Ordering::Release);
    slot.reads_pieces
        .store(status.reads_pieces, Ordering::Release);
    let mut rounds = 0;
    let (_chain, chain) = loop {
        let have = control::status(slot.addr, &volume.name, timeout).await?;
        let chain_lock = volume.chain_lock.lock().await;
        let want = control::status(volume.healthy_addr()?, &volume.name, timeout)
            .await?
            .snapshots;
        if have.snapshots == want {
            break (chain_lock, want);
        }
        drop(chain_lock);
        rounds += 1;
        if delta || rounds > CHAIN_ROUNDS || !want.starts_with(&have.snapshots) {
            return Err(SyncError::ChainDiverged {
                have: have.snapshots,
                want,
            });
        }
        let missing = &want[have.snapshots.len()..];
        let base = have.snapshots.last().cloned();
        chain_copy::copy_snapshots(volume, slot.addr, have.epoch, base, missing).await?;
    };
    let _exclusive = volume.gate().write().await;
    let epoch = volume.epoch();
    if status.epoch > epoch {
        return Err(SyncError::NewerEpoch {
            theirs: status.epoch,
            ours: epoch,
        });
    }
    if let Err(e) = control::set_epoch(
        slot.addr,
        &volume.name,
        epoch,
        &volume.owner,
        true,
        false,
        timeout,
    )
    .await
    {
        // Its epoch may equal ours in number but belong to someone else:
        // move to a fresh epoch before the next try.
        volume.request_bump();
        return Err(e.into());
    }
    let client = ReplicaClient::connect(slot.addr, &volume.name, epoch, volume.options.io_timeout)
        .await
        .map_err(|e| SyncError::data("data connection", e))?;
    if !delta {
        // The target is empty (created or wiped above) and the layers below
        // are copied already: only what the live volume holds above the
        // newest snapshot (or at all, without snapshots) is left to copy;
        // holes stay holes. No write is in flight: the gate is held.
        mark_live_changes(volume, slot, chain.last().map(String::as_str)).await?;
    }
    {
        let mut p = slot.progress.lock();
        *p = super::SyncProgress {
            full: !delta,
            verify: slot.verify.load(Ordering::Acquire),
            total_bytes: slot.pending_regions() * REGION,
            done_bytes: 0,
            started: Some(Instant::now()),
        };
    }
    slot.set_departure(Some(super::Departure {
        lineage: status.lineage.clone(),
        epoch,
    }));
    slot.set_health(Health::Syncing(Arc::new(client)));
    tracing::info!(
        volume = %volume.name,
        replica = %slot.addr,
        kind = if delta { "delta resync" } else { "full rebuild" },
        regions = slot.pending_regions(),
        "replica rejoined write-only"
    );
    Ok(())
}

/// Marks the regions where the live volume differs from snapshot `newest`
/// (`None`: from an empty volume, so every allocated region).
async fn mark_live_changes(
    volume: &Volume,
    slot: &Slot,
    newest: Option<&str>,
) -> Result<(), SyncError> {
    let source = volume.healthy_addr()?;
    let window = strata_replica::control::MAX_EXTENT_WINDOW;
    let mut offset = 0;
    while offset < volume.size() {
        let len = window.min(volume.size() - offset);
        let extents = control::changed_extents(
            source,
            &volume.name,
            newest,
            None,
            offset,
            len,
            volume.options.control_timeout,
        )
        .await?;
        for e in extents {
            slot.mark_pending(e.offset, e.length);
        }
        offset += len;
    }
    Ok(())
}

/// Copies `count` contiguous regions from `region` under the gate (shared)
/// and their range lock.
async fn copy_region(
    volume: &Volume,
    slot: &Slot,
    region: u64,
    count: u64,
) -> (u64, u64, Result<Copied, CopyError>) {
    let start = region * REGION;
    let end = ((region + count) * REGION).min(volume.size());
    let _gate = volume.gate().read().await;
    let _range = volume.range_lock().lock(start, end).await;
    let result = match slot.health() {
        Health::Syncing(target) => match copy::pick_source(volume, start) {
            Ok((source_slot, source)) => {
                let ends = copy::Ends {
                    source: (&source_slot, &source),
                    target: (slot, &target),
                    timeout: volume.options.io_timeout,
                };
                let result = copy::copy_range(&ends, start, end).await;
                if let Err(CopyError::Source(e)) = &result {
                    volume.fault(&source_slot, format!("resync from it failed: {e}"));
                }
                result
            }
            Err(e) => Err(e),
        },
        other => Err(CopyError::Target(SyncError::NotSyncing(format!(
            "{other:?}"
        )))),
    };
    (start, end, result)
}

/// True while the job is ahead of the bandwidth cap; the time to wait.
fn ahead_of_cap(volume: &Volume, slot: &Slot) -> Option<Duration> {
    let rate = volume.options.sync_rate?;
    let p = slot.progress.lock();
    let due = Duration::from_secs_f64(p.done_bytes as f64 / rate.max(1) as f64);
    let since = p.started.map(|t| t.elapsed()).unwrap_or_default();
    (due > since).then(|| due - since)
}

/// Copies every pending region to a syncing replica ([`SYNC_PARALLEL`]
/// runs of up to [`SYNC_RUN`] regions at a time, fewer and shorter on a
/// slow disk: `pace.rs`), then makes it healthy.
pub async fn sync(volume: &Volume, slot: &Slot) -> Result<(), SyncError> {
    use futures::stream::{FuturesUnordered, StreamExt};
    let started = Instant::now();
    if slot.verify.load(Ordering::Acquire) {
        compare::mark_differences(volume, slot).await?;
        let mut p = slot.progress.lock();
        p.total_bytes = slot.pending_regions() * REGION;
        p.done_bytes = 0;
        p.started = Some(Instant::now());
    }
    let mut transferred = Copied::default();
    let mut pace = SyncPace::new(Instant::now());
    loop {
        let mut in_flight = FuturesUnordered::new();
        // Bytes of the runs in flight, which hold their range locks.
        let mut locked = 0;
        let mut source_trouble = None;
        let mut target_trouble = None;
        loop {
            while source_trouble.is_none()
                && target_trouble.is_none()
                && in_flight.len() < SYNC_PARALLEL
            {
                if let Some(wait) = ahead_of_cap(volume, slot) {
                    if in_flight.is_empty() {
                        tokio::time::sleep(wait).await;
                    } else {
                        break;
                    }
                }
                let Some(regions) = pace.next_run(locked) else {
                    break;
                };
                let Some((region, count)) = slot.take_pending_run(regions) else {
                    break;
                };
                let run = count * REGION;
                locked += run;
                in_flight
                    .push(async move { (run, copy_region(volume, slot, region, count).await) });
            }
            // Other copies hold the gate shared: nothing here may wait for
            // it exclusively until they are all done.
            let Some((run, (start, end, result))) = in_flight.next().await else {
                break;
            };
            locked -= run;
            match result {
                Ok(bytes) => {
                    transferred += bytes;
                    pace.completed(Instant::now(), run);
                    slot.progress.lock().done_bytes += end - start;
                }
                Err(CopyError::Source(e)) => {
                    slot.mark_pending(start, end - start);
                    source_trouble = Some(e);
                }
                Err(CopyError::Target(e)) => {
                    slot.mark_pending(start, end - start);
                    target_trouble = Some(e);
                }
            }
        }
        if let Some(e) = target_trouble {
            volume.fault(slot, format!("resync write failed: {e}"));
            volume.bump_epoch_if_needed().await;
            return Err(e);
        }
        match source_trouble {
            Some(e) => {
                volume.bump_epoch_if_needed().await;
                if volume.healthy() == 0 {
                    return Err(e);
                }
            }
            None => break,
        }
    }
    // Durable on the target, then healthy at a new epoch.
    let _exclusive = volume.gate().write().await;
    let Health::Syncing(target) = slot.health() else {
        return Err(SyncError::NotSyncing(
            "it left before the sync finished".into(),
        ));
    };
    if slot.pending_regions() > 0 {
        return Err(SyncError::RegionsAdded);
    }
    if let Err(e) = target.flush().await {
        drop(_exclusive);
        volume.fault(slot, format!("flush after resync failed: {e}"));
        volume.bump_epoch_if_needed().await;
        return Err(SyncError::data("flush after resync", e));
    }
    slot.set_health(Health::Healthy(target));
    slot.verify.store(false, Ordering::Release);
    slot.counts_for_quorum.store(false, Ordering::Release);
    slot.progress.lock().verify = false;
    volume.request_bump();
    volume.bump_epoch_locked().await;
    let secs = started.elapsed().as_secs_f64();
    tracing::info!(
        volume = %volume.name,
        replica = %slot.addr,
        seconds = format!("{secs:.2}"),
        mib_copied = transferred.total() >> 20,
        mib_pulled_by_the_replica = transferred.pulled >> 20,
        mib_relayed_by_the_controller = transferred.relayed >> 20,
        "replica in sync and healthy again"
    );
    Ok(())
}
