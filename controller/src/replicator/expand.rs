//! Growing a live volume ([`Volume::expand`]).
//!
//! Under the chain lock (no snapshot change meanwhile) and the gate held
//! exclusively (no request in flight: the IO pause), every replica that
//! takes writes (healthy and syncing) is grown at the current epoch over
//! gRPC (`ExpandReplica`, fenced like every chain change). Only when a
//! write quorum of healthy replicas has grown does the volume take the new
//! size; the replicas that failed are faulted, and the epoch is bumped on
//! the others before the gate opens, so no write reaches the new range
//! until every member holds it. A faulted replica grows when it rejoins
//! (`recovery.rs`, `rejoin`).
//!
//! A controller that dies half-way leaves some replicas grown and some
//! not, all at the same epoch (the bump comes last), and no write in the
//! new range. Assembly (`assemble.rs`) then takes the largest size among
//! the up-to-date replicas and grows the others to it: the volume comes
//! back at the new size, never at a mix, and the grown range reads as
//! zeros everywhere.

use std::sync::atomic::Ordering;

use super::control;
use super::error::{ResizeRefusal, VolumeError};
use super::Volume;
use crate::crash_point;

const BLOCK: u64 = strata_replica::BLOCK_SIZE;

/// What an expansion did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expansion {
    pub old_size: u64,
    pub new_size: u64,
    /// The requested size was not a multiple of 4 KiB and was rounded up.
    pub rounded: bool,
    /// How long requests were held (zero when nothing changed).
    pub pause: std::time::Duration,
}

impl Volume {
    fn resize_error(&self, requested: u64, refusal: ResizeRefusal, reason: String) -> VolumeError {
        VolumeError::Resize {
            volume: self.name.clone(),
            current: self.size(),
            requested,
            refusal,
            reason,
        }
    }

    /// Grows the volume to `requested` bytes (rounded up to 4 KiB) while IO
    /// goes on; the same size is a no-op. See the module docs.
    pub async fn expand(&self, requested: u64) -> Result<Expansion, VolumeError> {
        if requested == 0 {
            return Err(self.resize_error(
                requested,
                ResizeRefusal::Invalid,
                "a volume cannot be empty".into(),
            ));
        }
        let Some(new_size) = requested.checked_next_multiple_of(BLOCK) else {
            return Err(self.resize_error(
                requested,
                ResizeRefusal::Invalid,
                "the size is too large".into(),
            ));
        };
        let rounded = new_size != requested;
        let _chain = self.chain_lock.lock().await;
        let old_size = self.size();
        let outcome = |pause| Expansion {
            old_size,
            new_size,
            rounded,
            pause,
        };
        if new_size < old_size {
            return Err(self.resize_error(
                requested,
                ResizeRefusal::Shrink,
                format!("volumes only grow (it has {old_size} bytes); copy the data to a smaller new volume instead"),
            ));
        }
        if new_size == old_size {
            return Ok(outcome(std::time::Duration::ZERO));
        }
        self.bump_epoch_if_needed().await;
        let held = std::time::Instant::now();
        let _exclusive = self.gate.write().await;
        if self.replicas_being_compared() > 0 {
            return Err(self.resize_error(
                requested,
                ResizeRefusal::Busy,
                "replicas are being compared after a crash; expand when `strata volume status` shows them healthy".into(),
            ));
        }
        let epoch = self.epoch();
        let targets: Vec<_> = self
            .slots()
            .into_iter()
            .filter(|s| s.write_target().is_some())
            .collect();
        let timeout = self.options.control_timeout;
        let (mut grown, mut grown_healthy) = (0, 0);
        let mut failed = Vec::new();
        for slot in &targets {
            match control::expand_replica(slot.addr, &self.name, new_size, epoch, timeout).await {
                Ok(_) => {
                    grown += 1;
                    grown_healthy += slot.is_healthy() as usize;
                    if grown == 1 {
                        crash_point("expand.first_replica_grown");
                    }
                }
                Err(e) => failed.push((slot, e)),
            }
        }
        crash_point("expand.replicas_grown");
        // Refused everywhere (a size no replica can hold): nothing changed,
        // nobody is at fault.
        if grown == 0 && failed.iter().all(|(_, e)| e.refusal().is_some()) {
            if let Some((_, e)) = failed.first() {
                return Err(self.resize_error(requested, ResizeRefusal::Invalid, e.to_string()));
            }
        }
        // A replica that did not grow cannot take writes at the new size.
        let refused = failed
            .iter()
            .find(|(_, e)| e.refusal().is_some())
            .map(|(_, e)| e.to_string());
        for (slot, e) in &failed {
            self.fault(slot, format!("expansion to {new_size} bytes failed: {e}"));
        }
        if grown_healthy < self.quorum() {
            // The volume keeps its size; replicas that did grow hold a
            // range nobody writes, and a retry (or the next assembly)
            // grows the rest.
            self.bump_epoch_locked().await;
            return Err(match refused {
                Some(reason) => self.resize_error(requested, ResizeRefusal::Invalid, reason),
                None => self.below_quorum("expand", old_size),
            });
        }
        self.size.store(new_size, Ordering::Release);
        crash_point("expand.size_set");
        // A membership change: replicas that did not grow are fenced off.
        self.request_bump();
        self.bump_epoch_locked().await;
        let pause = held.elapsed();
        tracing::info!(volume = %self.name, old_size, new_size, pause_ms = pause.as_secs_f64() * 1e3, "volume expanded");
        Ok(outcome(pause))
    }
}
