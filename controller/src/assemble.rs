//! Assembling a volume at controller start: ask every replica server for
//! its replica's persisted state over gRPC (creating it if asked to), check
//! that a majority is reachable, fence off any older controller by bumping
//! the epoch on every reachable replica, then open the data connections.

use std::net::SocketAddr;
use std::time::Duration;

use strata_proto::replica::replica_control_client::ReplicaControlClient;
use strata_proto::replica::{CreateReplicaRequest, ReplicaRef, ReplicaStatus, SetEpochRequest};
use strata_replica::client::ReplicaClient;
use tonic::Code;

use crate::replicator::{Health, Slot, Volume};

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
}

#[derive(Debug, thiserror::Error)]
pub enum AssembleError {
    #[error("Volume {volume}: between 1 and 5 replicas are supported, {count} were given")]
    ReplicaCount { volume: String, count: usize },
    #[error("Volume {volume}: only {reachable} of {configured} replicas are reachable, {quorum} are needed to start safely:\n{details}")]
    NoQuorum {
        volume: String,
        reachable: usize,
        configured: usize,
        quorum: usize,
        details: String,
    },
    #[error("Volume {volume}: replicas disagree on the size ({sizes}); refusing to start")]
    SizeMismatch { volume: String, sizes: String },
}

async fn control(
    addr: SocketAddr,
    timeout: Duration,
) -> Result<ReplicaControlClient<tonic::transport::Channel>, String> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| e.to_string())?
        .connect_timeout(timeout)
        .timeout(timeout);
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    Ok(ReplicaControlClient::new(channel))
}

/// Opens (or creates) the replica at `addr` and returns its status.
async fn open_replica(addr: SocketAddr, opts: &AssembleOptions) -> Result<ReplicaStatus, String> {
    let mut c = control(addr, opts.connect_timeout).await?;
    let r = ReplicaRef {
        volume: opts.volume.clone(),
    };
    match c.open_replica(r).await {
        Ok(s) => Ok(s.into_inner()),
        Err(s) if s.code() == Code::NotFound => match opts.create_size {
            Some(size) => c
                .create_replica(CreateReplicaRequest {
                    volume: opts.volume.clone(),
                    size,
                })
                .await
                .map(|s| s.into_inner())
                .map_err(|s| format!("create failed: {}", s.message())),
            None => Err(format!(
                "no replica of {} there: {}",
                opts.volume,
                s.message()
            )),
        },
        Err(s) => Err(format!("open failed: {}", s.message())),
    }
}

async fn set_epoch(addr: SocketAddr, opts: &AssembleOptions, epoch: u64) -> Result<(), String> {
    let mut c = control(addr, opts.connect_timeout).await?;
    c.set_epoch(SetEpochRequest {
        volume: opts.volume.clone(),
        epoch,
    })
    .await
    .map(|_| ())
    .map_err(|s| format!("set epoch failed: {}", s.message()))
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
    let statuses =
        futures::future::join_all(opts.replicas.iter().map(|&a| open_replica(a, opts))).await;
    let reachable: Vec<(usize, &ReplicaStatus)> = statuses
        .iter()
        .enumerate()
        .filter_map(|(i, s)| s.as_ref().ok().map(|s| (i, s)))
        .collect();
    let details = || {
        opts.replicas
            .iter()
            .zip(&statuses)
            .map(|(a, s)| match s {
                Ok(s) => format!("  {a}: ok (epoch {}, lineage {})", s.epoch, s.lineage),
                Err(e) => format!("  {a}: {e}"),
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    if reachable.len() < quorum {
        return Err(AssembleError::NoQuorum {
            volume: opts.volume.clone(),
            reachable: reachable.len(),
            configured,
            quorum,
            details: details(),
        });
    }
    let mut sizes: Vec<u64> = reachable.iter().map(|(_, s)| s.size).collect();
    sizes.dedup();
    if sizes.len() > 1 {
        return Err(AssembleError::SizeMismatch {
            volume: opts.volume.clone(),
            sizes: details(),
        });
    }
    let size = sizes[0];
    // A new epoch above every one seen fences any older controller.
    let epoch = reachable.iter().map(|(_, s)| s.epoch).max().unwrap_or(0) + 1;
    let mut slots = Vec::with_capacity(configured);
    for (i, &addr) in opts.replicas.iter().enumerate() {
        let health = match &statuses[i] {
            Err(e) => Health::Faulted {
                reason: format!("unreachable at start: {e}"),
            },
            Ok(_) => match set_epoch(addr, opts, epoch).await {
                Err(e) => Health::Faulted { reason: e },
                Ok(()) => {
                    match ReplicaClient::connect(addr, &opts.volume, epoch, opts.io_timeout).await {
                        Ok(c) => Health::Healthy(std::sync::Arc::new(c)),
                        Err(e) => Health::Faulted {
                            reason: format!("data connection failed: {e}"),
                        },
                    }
                }
            },
        };
        slots.push(Slot::new(addr, health));
    }
    let volume = Volume::new(opts.volume.clone(), size, epoch, slots);
    if volume.healthy() < quorum {
        return Err(AssembleError::NoQuorum {
            volume: opts.volume.clone(),
            reachable: volume.healthy(),
            configured,
            quorum,
            details: volume
                .slots
                .iter()
                .map(|s| format!("  {}: {:?}", s.addr, s.health()))
                .collect::<Vec<_>>()
                .join("\n"),
        });
    }
    tracing::info!(volume = %opts.volume, epoch, size, healthy = volume.healthy(), configured, "volume assembled");
    Ok(volume)
}
