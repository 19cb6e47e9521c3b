//! Assembling a volume at controller start.
//!
//! 1. Ask every replica server for its replica's persisted state over gRPC
//!    (creating missing replicas when asked to).
//! 2. Refuse to start with fewer than a majority reachable, unless the
//!    operator forces it.
//! 3. Choose the up-to-date set deterministically: reachable replicas not
//!    marked incomplete, with the highest persisted epoch. Because the
//!    epoch is bumped on the remaining replicas before any write a departed
//!    replica missed is acknowledged, this set holds every acknowledged
//!    write. Everything else is faulted and will be rebuilt by the recovery
//!    loop, never trusted. If the volume was not stopped cleanly (a
//!    replica has unflushed writes or was not closed cleanly), one of the
//!    up-to-date set is the source and the others join write-only and are
//!    compared with it region by region (digests), the differing regions
//!    copied, before they serve reads: writes in flight at a crash may
//!    have reached some replicas and not others.
//! 4. Fence off any older controller: set an epoch above every epoch seen
//!    on the up-to-date replicas, then open the data connections with it.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use strata_proto::replica::ReplicaStatus;
use strata_replica::client::ReplicaClient;

use crate::replicator::{control, Departure, Health, Slot, Volume, VolumeOptions};

/// What the controller is asked to serve.
#[derive(Debug, Clone)]
pub struct AssembleOptions {
    pub volume: String,
    pub replicas: Vec<SocketAddr>,
    /// Create missing replicas with this size (bytes).
    pub create_size: Option<u64>,
    /// Deadline for each data request to a replica.
    pub io_timeout: Duration,
    /// Deadline for connecting and control calls.
    pub connect_timeout: Duration,
    /// Start even without a majority of replicas reachable.
    pub force_degraded: bool,
    /// Resync bandwidth cap, bytes per second.
    pub sync_rate: Option<u64>,
    /// When a replica that answers late is faulted.
    pub lag: crate::replicator::LagPolicy,
}

#[derive(Debug, thiserror::Error)]
pub enum AssembleError {
    #[error("Volume {volume}: between 1 and 5 replicas are supported, {count} were given")]
    ReplicaCount { volume: String, count: usize },
    #[error("Volume {volume}: only {reachable} of {configured} replicas are reachable and up to date, {quorum} are needed to start safely (a missing replica may hold the newest writes). Bring them back, or start with --force-degraded if they are lost for good:\n{details}")]
    NoQuorum {
        volume: String,
        reachable: usize,
        configured: usize,
        quorum: usize,
        details: String,
    },
    #[error("Volume {volume}: no reachable replica is complete (all are marked as being resynced):\n{details}")]
    NoSource { volume: String, details: String },
}

/// Brings the volume up; see the module docs.
pub async fn assemble(opts: &AssembleOptions) -> Result<Volume, AssembleError> {
    let configured = opts.replicas.len();
    if !(1..=5).contains(&configured) {
        return Err(AssembleError::ReplicaCount {
            volume: opts.volume.clone(),
            count: configured,
        });
    }
    let quorum = configured / 2 + 1;
    let statuses: Vec<Result<ReplicaStatus, control::ControlError>> =
        futures::future::join_all(opts.replicas.iter().map(|&a| async move {
            control::open_or_create(a, &opts.volume, opts.create_size, opts.connect_timeout)
                .await
                .map(|r| r.0)
        }))
        .await;
    let details = || {
        opts.replicas
            .iter()
            .zip(&statuses)
            .map(|(a, s)| match s {
                Ok(s) => format!(
                    "  {a}: epoch {}, lineage {}{}{}",
                    s.epoch,
                    s.lineage,
                    if s.incomplete {
                        ", incomplete (was being resynced)"
                    } else {
                        ""
                    },
                    if s.page_cache_lost {
                        ", not closed cleanly and its machine restarted"
                    } else if !s.was_clean {
                        ", not closed cleanly"
                    } else if s.unflushed {
                        ", has unflushed writes"
                    } else {
                        ""
                    }
                ),
                Err(e) => format!("  {a}: {e}"),
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    let reachable = statuses.iter().filter(|s| s.is_ok()).count();
    if reachable < quorum && !opts.force_degraded {
        return Err(AssembleError::NoQuorum {
            volume: opts.volume.clone(),
            reachable,
            configured,
            quorum,
            details: details(),
        });
    }
    let complete: Vec<&ReplicaStatus> = statuses
        .iter()
        .filter_map(|s| s.as_ref().ok())
        .filter(|s| !s.incomplete)
        .collect();
    let Some(max_epoch) = complete.iter().map(|s| s.epoch).max() else {
        return Err(AssembleError::NoSource {
            volume: opts.volume.clone(),
            details: details(),
        });
    };
    // Up-to-date replicas of different sizes: an expansion stopped half-way
    // (`replicator/expand.rs`). No write reached the grown range (the new
    // size is used only after the epoch bump that ends an expansion), so
    // the volume takes the largest size and the others grow to it below.
    let size = complete
        .iter()
        .filter(|s| s.epoch == max_epoch)
        .map(|s| s.size)
        .max()
        .unwrap_or_default();
    if reachable < quorum {
        tracing::warn!(
            volume = %opts.volume,
            "starting with only {reachable} of {configured} replicas reachable (--force-degraded): writes acknowledged by the missing ones only may be lost"
        );
    }
    tracing::info!(volume = %opts.volume, "replicas at start (up-to-date epoch {max_epoch}):\n{}", details());
    let epoch = max_epoch + 1;
    let owner = format!("{:032x}", rand::random::<u128>());
    // The up-to-date replicas hold the same acknowledged writes, but after
    // a crash (of the controller, a replica or a machine) they may differ
    // where writes were in flight or not yet flushed. Then one is the
    // source, read alone, and the others are compared with it by region
    // digests before they serve reads (`replicator/compare.rs`).
    let up_to_date = |s: &ReplicaStatus| !s.incomplete && s.epoch == max_epoch;
    let members: Vec<(usize, &ReplicaStatus)> = statuses
        .iter()
        .enumerate()
        .filter_map(|(i, s)| s.as_ref().ok().filter(|s| up_to_date(s)).map(|s| (i, s)))
        .collect();
    let crashed = members
        .iter()
        .any(|(_, s)| s.unflushed || !s.was_clean || s.page_cache_lost);
    let source = members
        .iter()
        .find(|(_, s)| !s.page_cache_lost)
        .or(members.first())
        .map(|(i, _)| *i);
    if crashed && members.len() > 1 {
        tracing::warn!(volume = %opts.volume, "the volume was not stopped cleanly: replicas are compared with {} before they serve reads", opts.replicas[source.unwrap_or(0)]);
    }
    let mut slots = Vec::with_capacity(configured);
    for (i, &addr) in opts.replicas.iter().enumerate() {
        let slot = match &statuses[i] {
            Err(e) => Slot::new(
                addr,
                Health::Faulted {
                    reason: format!("unreachable at start: {e}"),
                },
                None,
            ),
            Ok(s) if s.incomplete || s.epoch < max_epoch => Slot::new(
                addr,
                Health::Faulted {
                    reason: format!(
                        "out of date at start (epoch {} < {max_epoch}{}): rebuilding",
                        s.epoch,
                        if s.incomplete { ", incomplete" } else { "" }
                    ),
                },
                None,
            ),
            Ok(s) => {
                let departure = Some(Departure {
                    lineage: s.lineage.clone(),
                    epoch,
                });
                let verify = crashed && Some(i) != source;
                // A replica that lost its page cache may lack acknowledged
                // writes: it is incomplete until compared.
                let incomplete = verify && s.page_cache_lost;
                let grown = if s.size < size {
                    tracing::warn!(volume = %opts.volume, replica = %addr, from = s.size, to = size, "finishing an interrupted expansion");
                    control::expand_replica(addr, &opts.volume, size, s.epoch, opts.connect_timeout)
                        .await
                        .map(|_| ())
                } else {
                    Ok(())
                };
                let health = match async {
                    grown?;
                    control::set_epoch(
                        addr,
                        &opts.volume,
                        epoch,
                        &owner,
                        incomplete,
                        !verify,
                        opts.connect_timeout,
                    )
                    .await
                }
                .await
                {
                    Err(e) => Health::Faulted {
                        reason: e.to_string(),
                    },
                    Ok(()) => {
                        match ReplicaClient::connect(addr, &opts.volume, epoch, opts.io_timeout)
                            .await
                        {
                            Ok(c) if verify => Health::Syncing(std::sync::Arc::new(c)),
                            Ok(c) => Health::Healthy(std::sync::Arc::new(c)),
                            Err(e) => Health::Faulted {
                                reason: format!("data connection failed: {e}"),
                            },
                        }
                    }
                };
                let slot = Slot::new(addr, health, departure);
                slot.peer_copy.store(s.copies_from_peers, Ordering::Release);
                slot.reads_pieces.store(s.reads_pieces, Ordering::Release);
                if verify {
                    slot.verify.store(true, Ordering::Release);
                    slot.counts_for_quorum
                        .store(!s.page_cache_lost, Ordering::Release);
                    slot.progress.lock().verify = true;
                }
                slot
            }
        };
        slots.push(slot);
    }
    let options = VolumeOptions {
        io_timeout: opts.io_timeout,
        control_timeout: opts.connect_timeout,
        sync_rate: opts.sync_rate,
        lag: opts.lag,
    };
    for slot in &slots {
        if let Health::Faulted { reason } = slot.health() {
            tracing::warn!(volume = %opts.volume, replica = %slot.addr, "not trusted at start: {reason}");
        }
    }
    let volume = Volume::new(opts.volume.clone(), size, epoch, owner, slots, options);
    let healthy = volume.healthy();
    // A majority was reachable (checked above), so the highest complete
    // epoch among them holds every acknowledged write even when few
    // replicas carry it: start, serve reads, and rebuild the rest (writes
    // wait for a healthy majority).
    if healthy == 0 {
        return Err(AssembleError::NoQuorum {
            volume: opts.volume.clone(),
            reachable: healthy,
            configured,
            quorum,
            details: volume
                .slots()
                .iter()
                .map(|s| format!("  {}: {:?}", s.addr, s.health()))
                .collect::<Vec<_>>()
                .join("\n"),
        });
    }
    tracing::info!(volume = %opts.volume, epoch, size, healthy, configured, "volume assembled");
    Ok(volume)
}
