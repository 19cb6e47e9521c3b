//! How one request reaches the replicas: a write, trim or zeroing to every
//! replica that takes writes, with the quorum rule, the per-request
//! timeout and the lag bound ([`Volume::fan_out`]); a read to one healthy
//! replica, moving on to the next if it fails ([`Volume::read_one`]).

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};
use strata_replica::client::{ClientError, ReplicaClient};
use strata_replica::wire::Status;

use super::{is_request_error, slot, LatencyClass, Slot, Volume, VolumeError, READ_STRIPE};

impl Volume {
    /// Runs `f` on every replica that takes writes (healthy and syncing),
    /// in parallel. Replicas that are out get the range marked as missed
    /// before anything is sent; those that fail are faulted (and get it
    /// marked too). Succeeds if at least a quorum of healthy replicas
    /// acknowledged. The caller holds the gate shared.
    ///
    /// Once a quorum answered, a healthy replica still silent after the lag
    /// bound is faulted as lagging instead of waited for (`lag.rs`).
    pub(super) async fn fan_out<F, Fut>(
        &self,
        op: &'static str,
        class: LatencyClass,
        offset: u64,
        len: u64,
        f: F,
    ) -> Result<(), VolumeError>
    where
        F: Fn(Arc<ReplicaClient>) -> Fut,
        Fut: Future<Output = Result<(), ClientError>>,
    {
        self.refuse_if_fenced(op, offset)?;
        let slots = self.slots();
        let quorum = slots.len() / 2 + 1;
        let mut targets = Vec::with_capacity(slots.len());
        // Which of `slots` the request went to (at most 5 replicas).
        let mut sent = 0u64;
        for (i, slot) in slots.iter().enumerate() {
            match slot.write_target() {
                Some((client, healthy)) => {
                    sent |= 1 << i;
                    targets.push((slot.clone(), client, healthy));
                }
                None if len > 0 => slot.mark_pending(offset, len),
                None => {}
            }
        }
        if targets.iter().filter(|t| t.2).count() < quorum {
            self.io.errors.fetch_add(1, Ordering::Relaxed);
            return Err(self.below_quorum(op, offset));
        }
        let started = tokio::time::Instant::now();
        let mut pending: FuturesUnordered<_> = targets
            .into_iter()
            .map(|(slot, client, healthy)| {
                let in_flight = slot::InFlight::new(slot.clone());
                let flush =
                    (class == LatencyClass::Durable).then(|| slot::FlushWaiting::new(slot.clone()));
                let fut = f(client);
                async move {
                    let sent_at = tokio::time::Instant::now();
                    let r = fut.await;
                    drop(in_flight);
                    drop(flush);
                    if r.is_ok() && op == "write" && class == LatencyClass::Cached {
                        slot.disk.write_done(len, sent_at.elapsed());
                    }
                    slot.record(r.is_ok());
                    (slot, healthy, r)
                }
            })
            .collect();
        let mut results: Vec<(Arc<Slot>, bool, Result<(), ClientError>)> =
            Vec::with_capacity(pending.len());
        let mut acked_so_far = 0;
        let mut lag_deadline = None;
        loop {
            let next = match lag_deadline {
                Some(deadline) => match tokio::time::timeout_at(deadline, pending.next()).await {
                    Ok(next) => next,
                    Err(_) => {
                        let late: Vec<&Arc<Slot>> = (slots.iter().enumerate())
                            .filter(|(i, _)| sent & (1 << i) != 0)
                            .map(|(_, s)| s)
                            .filter(|s| !results.iter().any(|r| Arc::ptr_eq(&r.0, s)))
                            .collect();
                        if self.fault_if_lagging(op, class, offset, len, &late, started) {
                            break;
                        }
                        lag_deadline = None;
                        continue;
                    }
                },
                None => pending.next().await,
            };
            let Some(done) = next else { break };
            if done.1 && done.2.is_ok() {
                acked_so_far += 1;
                if acked_so_far == quorum {
                    self.lag.observe(class, started.elapsed());
                    if !pending.is_empty() {
                        lag_deadline = self
                            .options
                            .lag
                            .bound(self.lag.typical(class), self.io_timeout(class))
                            .map(|b| tokio::time::Instant::now() + b);
                    }
                }
            }
            results.push(done);
        }
        drop(pending);
        let mut acked = 0;
        let mut invalid = None;
        let mut newer_epoch = None;
        for (slot, healthy, r) in results {
            match r {
                Ok(()) => acked += healthy as usize,
                Err(e) if is_request_error(&e) => invalid = Some(e.to_string()),
                Err(e) => {
                    newer_epoch = newer_epoch.max(self.newer_epoch_in(&e));
                    if len > 0 {
                        slot.mark_pending(offset, len);
                    }
                    self.fault(&slot, format!("{op} at offset {offset} failed: {e}"));
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
        if acked < quorum {
            self.io.errors.fetch_add(1, Ordering::Relaxed);
            if let Some(theirs) = newer_epoch {
                self.fenced_by.fetch_max(theirs, Ordering::AcqRel);
                return Err(self.fenced(op, offset));
            }
            return Err(self.below_quorum(op, offset));
        }
        Ok(())
    }

    /// The IO timeout of a request class: durable requests wait for the
    /// disk and get longer, as in the replica client.
    pub(super) fn io_timeout(&self, class: LatencyClass) -> Duration {
        match class {
            LatencyClass::Cached => self.options.io_timeout,
            LatencyClass::Durable => {
                self.options.io_timeout * strata_replica::client::DURABLE_TIMEOUT_FACTOR
            }
        }
    }

    /// Faults the one replica in `late` if the rule allows (see `lag.rs`):
    /// exactly one late, healthy, and no other replica out for lagging now.
    /// Returns true if it did (the request no longer waits for it).
    pub(super) fn fault_if_lagging(
        &self,
        op: &'static str,
        class: LatencyClass,
        offset: u64,
        len: u64,
        late: &[&Arc<Slot>],
        started: tokio::time::Instant,
    ) -> bool {
        let [slot] = late else {
            return false;
        };
        // Faulted meanwhile (by another request that found it lagging): it
        // is out, and the request no longer waits for it either.
        if slot.is_faulted() {
            if len > 0 {
                slot.mark_pending(offset, len);
            }
            return true;
        }
        let another_out = self.slots().iter().any(|s| {
            !Arc::ptr_eq(s, slot) && s.out_for_lag.load(Ordering::Acquire) && !s.is_healthy()
        });
        if !slot.is_healthy() || another_out {
            return false;
        }
        if len > 0 {
            slot.mark_pending(offset, len);
        }
        let peers = self.lag.typical(class);
        self.fault(
            slot,
            format!(
                "lagging: no answer to {op} at offset {offset} after {:.2} s, while its peers answer in {:.1} ms",
                started.elapsed().as_secs_f64(),
                peers.as_secs_f64() * 1e3
            ),
        );
        slot.out_for_lag.store(true, Ordering::Release);
        slot.back_off_after_lag();
        self.lag.faults.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// The epoch of a replica that refused a request because it moved to a
    /// newer epoch than ours (another controller bumped it), if `e` says so.
    pub(super) fn newer_epoch_in(&self, e: &ClientError) -> Option<u64> {
        match e {
            ClientError::Replica {
                status: Status::StaleEpoch,
                epoch,
                ..
            } if *epoch > self.epoch() => Some(*epoch),
            _ => None,
        }
    }

    pub(super) fn fenced(&self, op: &'static str, offset: u64) -> VolumeError {
        VolumeError::Fenced {
            volume: self.name.clone(),
            op,
            offset,
            ours: self.epoch(),
            theirs: self.fenced_by.load(Ordering::Acquire),
        }
    }

    /// Refuses every request once another controller took the volume over.
    pub(super) fn refuse_if_fenced(
        &self,
        op: &'static str,
        offset: u64,
    ) -> Result<(), VolumeError> {
        if self.fenced_by.load(Ordering::Acquire) != 0 {
            self.io.errors.fetch_add(1, Ordering::Relaxed);
            return Err(self.fenced(op, offset));
        }
        Ok(())
    }

    /// Runs `f` on one healthy replica, moving to the next one if it fails.
    /// Which replica is tried first depends on the offset's stripe (see
    /// [`READ_STRIPE`]).
    pub(super) async fn read_one<T, F, Fut>(
        &self,
        op: &'static str,
        offset: u64,
        f: F,
    ) -> Result<T, VolumeError>
    where
        F: Fn(Arc<ReplicaClient>) -> Fut,
        Fut: Future<Output = Result<T, ClientError>>,
    {
        self.refuse_if_fenced(op, offset)?;
        let slots = self.slots();
        let n = slots.len();
        let start = (offset / READ_STRIPE) as usize;
        let mut newer_epoch = None;
        let mut last = String::from("no healthy replica");
        // First the replicas on this host, in slot order; then the others,
        // by stripe. Each replica is tried once.
        for k in 0..2 * n {
            let (slot, local_pass) = if k < n {
                (&slots[k], true)
            } else {
                (&slots[(start + k - n) % n], false)
            };
            let Some(client) = slot.healthy_client() else {
                continue;
            };
            if client.is_local() != local_pass {
                continue;
            }
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
                    // Damaged data on that replica only: try a peer.
                    tracing::error!(volume = %self.name, replica = %slot.addr, "corrupt data: {message}");
                    last = message;
                }
                Err(e) => {
                    newer_epoch = newer_epoch.max(self.newer_epoch_in(&e));
                    last = e.to_string();
                    self.fault(slot, format!("{op} at offset {offset} failed: {e}"));
                }
            }
        }
        self.io.errors.fetch_add(1, Ordering::Relaxed);
        if let Some(theirs) = newer_epoch {
            self.fenced_by.fetch_max(theirs, Ordering::AcqRel);
            return Err(self.fenced(op, offset));
        }
        Err(VolumeError::NoReplica {
            volume: self.name.clone(),
            op,
            offset,
            last,
        })
    }
}
