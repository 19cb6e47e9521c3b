//! Snapshots through the controller: create, list, delete, revert, clone,
//! and the guard a backup holds on the snapshot it reads.
//!
//! Every replica of a volume must hold the same chain. Create flushes
//! every replica while writes still flow, then holds new writes (the
//! gate, exclusively: requests in flight finish first), has
//! every healthy replica flush and freeze its head under the same name, and
//! lets writes go on: the snapshot holds every write acknowledged before the
//! call and none that started after it returned. Chain changes run one at
//! a time (`chain_lock`), also against a rebuild copying snapshot layers.
//!
//! Replicas that are out of the volume (faulted) or being resynced when the
//! chain changes do not get the change: they are marked for a full rebuild,
//! which copies the whole chain from a healthy replica (`recovery.rs`), so
//! no replica ever serves a chain that differs from its peers. A resync in
//! progress restarts as a full rebuild when a snapshot is taken.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use strata_proto::replica::SnapshotInfo;
use strata_replica::client::ClientError;

use super::control::{self, Refusal};
use super::error::SnapshotProblem;
use super::{is_request_error, Health, Slot, Volume, VolumeError};

/// Holds a snapshot against delete and revert while a backup reads it.
pub struct SnapshotInUse {
    volume: Arc<Volume>,
    name: String,
}

impl Drop for SnapshotInUse {
    fn drop(&mut self) {
        let mut used = self.volume.snapshots_in_use.lock();
        if let Some(n) = used.get_mut(&self.name) {
            *n -= 1;
            if *n == 0 {
                used.remove(&self.name);
            }
        }
    }
}

impl Volume {
    fn snapshot_error(
        &self,
        snapshot: &str,
        problem: SnapshotProblem,
        reason: impl Into<String>,
    ) -> VolumeError {
        VolumeError::Snapshot {
            volume: self.name.clone(),
            snapshot: snapshot.to_string(),
            problem,
            reason: reason.into(),
        }
    }

    fn check_snapshot_name(&self, name: &str) -> Result<(), VolumeError> {
        if strata_replica::valid_snapshot_name(name) {
            Ok(())
        } else {
            Err(self.snapshot_error(
                name,
                SnapshotProblem::InvalidName,
                "invalid name: use 1 to 64 characters from A-Z a-z 0-9 . _ -",
            ))
        }
    }

    /// Takes a replica out that missed a chain change: it comes back only
    /// through a full rebuild (its lineage is forgotten).
    fn fault_for_rebuild(&self, slot: &Slot, reason: String) {
        self.fault(slot, reason);
        if let Some(mut d) = slot.departure() {
            d.lineage.clear();
            slot.set_departure(Some(d));
        }
    }

    /// Refuses a chain change while replicas are compared after a crash:
    /// they hold every acknowledged write and count for the write quorum,
    /// but may differ in their heads, so they can neither take the change
    /// (a snapshot would freeze the difference) nor be dropped for a full
    /// rebuild (the volume could fall below quorum).
    /// Replicas being compared with the others after a crash (syncing, yet
    /// counted for the quorum).
    pub(crate) fn replicas_being_compared(&self) -> usize {
        self.slots()
            .iter()
            .filter(|s| matches!(s.health(), Health::Syncing(_)))
            .filter(|s| s.counts_for_quorum.load(Ordering::Acquire))
            .count()
    }

    fn refuse_while_comparing(&self, name: &str) -> Result<(), VolumeError> {
        let comparing = self.replicas_being_compared();
        if comparing > 0 {
            return Err(self.snapshot_error(
                name,
                SnapshotProblem::Busy,
                format!("{comparing} replica(s) are being compared with the others after a crash; snapshot changes wait until that is done (see `strata volume status`)"),
            ));
        }
        Ok(())
    }

    /// Every replica out of the volume or being resynced is marked for a
    /// full rebuild; the caller holds the gate exclusively.
    fn rebuild_the_absent(&self, change: &str) {
        for slot in self.slots() {
            match slot.health() {
                Health::Healthy(_) => {}
                Health::Syncing(_) => self.fault_for_rebuild(
                    &slot,
                    format!(
                        "{change} while it was being resynced; it is rebuilt with the new chain"
                    ),
                ),
                Health::Faulted { .. } => self.fault_for_rebuild(&slot, format!("missed {change}")),
            }
        }
    }

    /// Takes snapshot `name` of the volume on every healthy replica at the
    /// same point of the write stream. Returns how long new writes were held.
    pub async fn create_snapshot(&self, name: &str) -> Result<Duration, VolumeError> {
        self.check_snapshot_name(name)?;
        let _chain = self.chain_lock.lock().await;
        // Only this controller changes the chain, under the chain lock: a
        // name the chain holds now is taken.
        if self.list_snapshots().await?.iter().any(|s| s.name == name) {
            return Err(self.snapshot_error(
                name,
                SnapshotProblem::Exists,
                "a snapshot of that name already exists",
            ));
        }
        self.bump_epoch_if_needed().await;
        // Write back what is dirty now, while writes still flow: the flush
        // each replica does under the gate then has little left to do, so
        // writes are held for milliseconds, not for a whole writeback.
        if let Err(e) = self.flush().await {
            tracing::warn!(volume = %self.name, snapshot = name, "flush before the snapshot failed: {e}");
        }
        let held = Instant::now();
        let _exclusive = self.gate.write().await;
        self.refuse_while_comparing(name)?;
        self.rebuild_the_absent(&format!("snapshot {name}"));
        let targets: Vec<_> = self
            .slots()
            .into_iter()
            .filter_map(|s| s.healthy_client().map(|c| (s, c)))
            .collect();
        let results = futures::future::join_all(
            targets
                .iter()
                .map(|(_, client)| async move { client.snapshot(name).await }),
        )
        .await;
        let mut done = 0;
        let mut refused: Vec<(Arc<Slot>, ClientError)> = Vec::new();
        for ((slot, _), r) in targets.into_iter().zip(results) {
            match r {
                Ok(()) => done += 1,
                Err(e) if is_request_error(&e) => refused.push((slot, e)),
                Err(e) => self.fault_for_rebuild(&slot, format!("snapshot {name} failed: {e}")),
            }
        }
        if done == 0 {
            if let Some((_, e)) = refused.first() {
                let reason = e.to_string();
                drop(_exclusive);
                self.bump_epoch_if_needed().await;
                return Err(self.snapshot_error(name, SnapshotProblem::Failed, reason));
            }
        }
        // Some took it, some refused it: their chains differed; the ones
        // that refused are rebuilt from the ones that took it.
        for (slot, e) in refused {
            self.fault_for_rebuild(&slot, format!("snapshot {name} refused: {e}"));
        }
        self.bump_epoch_locked().await;
        let pause = held.elapsed();
        drop(_exclusive);
        self.last_snapshot_pause_us
            .store(pause.as_micros() as u64, Ordering::Relaxed);
        if self.healthy() < self.quorum() {
            return Err(self.below_quorum("snapshot", 0));
        }
        tracing::info!(volume = %self.name, snapshot = name, pause_ms = pause.as_secs_f64() * 1e3, "snapshot taken");
        Ok(pause)
    }

    /// A healthy replica's address, to ask about the chain.
    pub fn healthy_addr(&self) -> Result<SocketAddr, VolumeError> {
        self.slots()
            .into_iter()
            .find(|s| s.is_healthy())
            .map(|s| s.addr)
            .ok_or_else(|| self.below_quorum("snapshot list", 0))
    }

    /// Snapshots of the volume, oldest first, as a healthy replica holds them.
    pub async fn list_snapshots(&self) -> Result<Vec<SnapshotInfo>, VolumeError> {
        let mut last = String::from("no healthy replica");
        for slot in self.slots().into_iter().filter(|s| s.is_healthy()) {
            match control::list_snapshots(slot.addr, &self.name, self.options.control_timeout).await
            {
                Ok(list) => return Ok(list),
                Err(e) => last = e.to_string(),
            }
        }
        Err(VolumeError::NoReplica {
            volume: self.name.clone(),
            op: "snapshot list",
            offset: 0,
            last,
        })
    }

    /// Marks snapshot `name` as read by a backup until the guard drops:
    /// delete and revert refuse to touch it meanwhile.
    pub fn hold_snapshot(self: &Arc<Self>, name: &str) -> SnapshotInUse {
        *self
            .snapshots_in_use
            .lock()
            .entry(name.to_string())
            .or_default() += 1;
        SnapshotInUse {
            volume: self.clone(),
            name: name.to_string(),
        }
    }

    fn refuse_if_in_use(&self, names: &[String], op: &str) -> Result<(), VolumeError> {
        let used = self.snapshots_in_use.lock();
        match names.iter().find(|n| used.contains_key(*n)) {
            Some(n) => Err(self.snapshot_error(
                n,
                SnapshotProblem::Busy,
                format!("a running backup reads it; {op} refused (retry when the backup is done)"),
            )),
            None => Ok(()),
        }
    }

    /// Runs a chain change on every healthy replica at the current epoch,
    /// holding the gate exclusively. A replica that fails is rebuilt later.
    async fn change_chain<F, Fut>(
        &self,
        op: &'static str,
        name: &str,
        what: &str,
        f: F,
    ) -> Result<(), VolumeError>
    where
        F: Fn(SocketAddr, u64) -> Fut,
        Fut: std::future::Future<Output = Result<(), control::ControlError>>,
    {
        self.bump_epoch_if_needed().await;
        let _exclusive = self.gate.write().await;
        self.refuse_while_comparing(name)?;
        self.rebuild_the_absent(what);
        let epoch = self.epoch();
        let targets: Vec<_> = self
            .slots()
            .into_iter()
            .filter(|s| s.is_healthy())
            .collect();
        let results = futures::future::join_all(targets.iter().map(|s| f(s.addr, epoch))).await;
        let mut done = 0;
        let mut refused = Vec::new();
        for (slot, r) in targets.into_iter().zip(results) {
            match r {
                Ok(()) => done += 1,
                Err(e) if e.refusal().is_some() => refused.push((slot, e)),
                Err(e) => self.fault_for_rebuild(&slot, format!("{what} failed: {e}")),
            }
        }
        if done == 0 {
            if let Some((_, e)) = refused.first() {
                let problem = match e.refusal() {
                    Some(Refusal::NotFound) => SnapshotProblem::NotFound,
                    Some(Refusal::AlreadyExists) => SnapshotProblem::Exists,
                    Some(Refusal::Invalid) => SnapshotProblem::InvalidName,
                    _ => SnapshotProblem::Failed,
                };
                let reason = e.to_string();
                self.bump_epoch_locked().await;
                return Err(self.snapshot_error(name, problem, reason));
            }
        }
        for (slot, e) in refused {
            self.fault_for_rebuild(&slot, format!("{what} refused: {e}"));
        }
        self.bump_epoch_locked().await;
        if self.healthy() < self.quorum() {
            return Err(self.below_quorum(op, 0));
        }
        Ok(())
    }

    /// Deletes snapshot `name` everywhere (its data merges into the next
    /// layer; the volume reads the same). Refused while a backup reads it.
    pub async fn delete_snapshot(&self, name: &str) -> Result<(), VolumeError> {
        self.check_snapshot_name(name)?;
        let _chain = self.chain_lock.lock().await;
        self.refuse_if_in_use(&[name.to_string()], "delete")?;
        let (volume, timeout) = (self.name.clone(), self.options.control_timeout);
        self.change_chain(
            "snapshot delete",
            name,
            &format!("delete of snapshot {name}"),
            |addr, epoch| {
                let volume = volume.clone();
                async move { control::delete_snapshot(addr, &volume, name, epoch, timeout).await }
            },
        )
        .await?;
        tracing::info!(volume = %self.name, snapshot = name, "snapshot deleted");
        Ok(())
    }

    /// Reverts the volume to snapshot `name`: every write since is
    /// discarded. With `discard_newer`, the snapshots taken after `name` go
    /// too (otherwise their existence refuses the revert). The caller
    /// checks that no client is attached.
    pub async fn revert_snapshot(
        &self,
        name: &str,
        discard_newer: bool,
    ) -> Result<(), VolumeError> {
        self.check_snapshot_name(name)?;
        let _chain = self.chain_lock.lock().await;
        let infos = self.list_snapshots().await?;
        let chain: Vec<String> = infos.iter().map(|s| s.name.clone()).collect();
        let Some(pos) = chain.iter().position(|n| n == name) else {
            return Err(self.snapshot_error(name, SnapshotProblem::NotFound, "no such snapshot"));
        };
        // Volumes only grow: a snapshot from before an expansion cannot
        // become the volume again. Its data stays reachable by a clone.
        let taken_at = infos[pos].size;
        if taken_at != 0 && taken_at < self.size() {
            return Err(self.snapshot_error(
                name,
                SnapshotProblem::SizeChanged,
                format!(
                    "it was taken at {taken_at} bytes and the volume has grown to {} since; reverting would shrink it: clone the snapshot to a new volume instead (strata volume clone)",
                    self.size()
                ),
            ));
        }
        if discard_newer {
            self.refuse_if_in_use(&chain[pos + 1..], "revert")?;
        }
        let (volume, timeout) = (self.name.clone(), self.options.control_timeout);
        self.change_chain(
            "revert",
            name,
            &format!("revert to snapshot {name}"),
            |addr, epoch| {
                let volume = volume.clone();
                async move {
                    control::revert_snapshot(addr, &volume, name, epoch, discard_newer, timeout)
                        .await
                }
            },
        )
        .await?;
        tracing::warn!(volume = %self.name, snapshot = name, discard_newer, "volume reverted");
        Ok(())
    }

    /// Creates volume `new` from snapshot `name` on the server of every
    /// healthy replica (a local copy on each), returning their addresses.
    /// The new volume is independent and served by its own controller.
    pub async fn clone_snapshot(
        &self,
        name: &str,
        new: &str,
    ) -> Result<Vec<SocketAddr>, VolumeError> {
        self.check_snapshot_name(name)?;
        if !strata_replica::host::valid_volume_name(new) || new == self.name {
            return Err(self.snapshot_error(
                name,
                SnapshotProblem::InvalidName,
                format!("invalid name for the clone: {new:?}"),
            ));
        }
        let _chain = self.chain_lock.lock().await;
        let addrs: Vec<SocketAddr> = self
            .slots()
            .into_iter()
            .filter(|s| s.is_healthy())
            .map(|s| s.addr)
            .collect();
        if addrs.len() < self.quorum() {
            return Err(self.below_quorum("clone", 0));
        }
        // Copying may take a while: generous timeout, one server at a time
        // would be slow, so all at once.
        let timeout = self.options.control_timeout * 120;
        let results = futures::future::join_all(
            addrs
                .iter()
                .map(|a| control::clone_replica(*a, &self.name, name, new, timeout)),
        )
        .await;
        let mut failed = Vec::new();
        let mut problem = None;
        for r in &results {
            if let Err(e) = r {
                failed.push(e.to_string());
                problem = problem.or(match e.refusal() {
                    Some(Refusal::NotFound) => Some(SnapshotProblem::NotFound),
                    Some(Refusal::AlreadyExists) => Some(SnapshotProblem::Exists),
                    Some(Refusal::Invalid) => Some(SnapshotProblem::InvalidName),
                    _ => None,
                });
            }
        }
        if !failed.is_empty() {
            for (a, r) in addrs.iter().zip(&results) {
                if r.is_ok() {
                    let _ = control::delete_replica(*a, new, self.options.control_timeout).await;
                }
            }
            return Err(self.snapshot_error(
                name,
                problem.unwrap_or(SnapshotProblem::Failed),
                format!("clone to {new} failed: {}", failed.join("; ")),
            ));
        }
        tracing::info!(volume = %self.name, snapshot = name, clone = new, "volume cloned");
        Ok(addrs)
    }
}
