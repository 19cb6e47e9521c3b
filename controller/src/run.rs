//! Running a controller: assemble the volume, then serve NBD (and iSCSI
//! when asked), the gRPC management API and `/metrics` until shutdown,
//! then flush every replica.

use std::net::SocketAddr;
use std::sync::Arc;

use strata_proto::controller::volume_control_server::VolumeControlServer;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};

use crate::assemble::{assemble, AssembleError, AssembleOptions};
use crate::backup::{run_schedules, ScheduleState};
use crate::mgmt::{serve_metrics, VolumeService};
use crate::replicator::Volume;

#[derive(Debug, Clone)]
pub struct ControllerOptions {
    pub assemble: AssembleOptions,
    pub nbd: SocketAddr,
    pub control: Option<SocketAddr>,
    pub metrics: Option<SocketAddr>,
    /// How backups open targets when a request (or a schedule) says
    /// nothing else: S3 endpoint, key.
    pub backup_defaults: strata_backup::TargetOptions,
    /// Backup schedules the controller runs.
    pub backup_schedules: Vec<strata_backup::BackupSchedule>,
    /// iSCSI listen address; `None` serves NBD only.
    pub iscsi: Option<SocketAddr>,
    /// iSCSI CHAP secrets; `None` accepts initiators without authentication.
    pub chap: Option<crate::frontend::iscsi::ChapConfig>,
    /// NBD over TLS with a pre-shared key, offered or required; `None`
    /// offers no TLS (STARTTLS gets `NBD_REP_ERR_POLICY`).
    pub nbd_tls: Option<Arc<crate::frontend::nbd::NbdTls>>,
    /// With the cluster key, the management API serves only clients that
    /// prove they hold it ([`strata_replica::auth`]); `None` serves anyone.
    pub auth: Option<Arc<strata_replica::auth::ServerAuth>>,
}

/// Sent once the controller serves.
#[derive(Debug, Clone)]
pub struct RunningInfo {
    pub nbd: SocketAddr,
    /// The iSCSI address, when served.
    pub iscsi: Option<SocketAddr>,
    pub size: u64,
    pub volume: Arc<Volume>,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Assemble(#[from] AssembleError),
    #[error("Cannot listen on {addr} for {what}")]
    Listen {
        addr: SocketAddr,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("The NBD server failed")]
    Nbd(#[source] std::io::Error),
    #[error("The iSCSI server failed")]
    Iscsi(#[source] std::io::Error),
    #[error("Volume {volume}: the final flush failed: {reason}")]
    FinalFlush { volume: String, reason: String },
    #[error("Volume {volume}: the final flush did not finish within {waited:?} of the stop signal; the replicas finish it on their own, and a controller started before they have compares the replicas still holding unflushed writes")]
    FinalFlushTimedOut {
        volume: String,
        waited: std::time::Duration,
    },
}

/// From the stop signal to the end of the final flush: the frontends drain
/// (at most their `SHUTDOWN_GRACE`), then the flush gets what is left.
/// Kubernetes waits 30 s by default; strata aims at 10 s.
pub const STOP_BUDGET: std::time::Duration = std::time::Duration::from_secs(8);

async fn bind(addr: SocketAddr, what: &'static str) -> Result<TcpListener, RunError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| RunError::Listen { addr, what, source })
}

/// The management API's limits: few clients (the operator CLI, the CSI
/// controller), each idle connection dropped at shutdown.
const MANAGEMENT_LIMITS: strata_net::Limits = strata_net::Limits {
    name: "management API",
    max_connections: 64,
    grace: std::time::Duration::from_secs(1),
};

/// Serves the management API on `listener` until `shutdown`: every
/// connection passes [`strata_replica::auth::accept_grpc`] (the cluster-key
/// handshake when the controller has a key) before tonic sees it.
async fn serve_management(
    listener: TcpListener,
    svc: VolumeService,
    auth: Option<Arc<strata_replica::auth::ServerAuth>>,
    shutdown: watch::Receiver<bool>,
) {
    use strata_replica::auth::{self, Purpose, Sealed};
    if let Ok(addr) = listener.local_addr() {
        auth::warn_if_open(
            "The controller's management API",
            addr,
            auth.as_ref().map(|a| &a.key),
        );
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Sealed<tokio::net::TcpStream>>>(16);
    let mut rx_stop = shutdown.clone();
    let grpc = tokio::spawn(async move {
        let incoming =
            futures::stream::unfold(rx, |mut r| async move { r.recv().await.map(|s| (s, r)) });
        tonic::transport::Server::builder()
            .add_service(VolumeControlServer::new(svc))
            .serve_with_incoming_shutdown(incoming, async move {
                strata_net::stopped(&mut rx_stop).await;
            })
            .await
    });
    strata_net::serve(listener, MANAGEMENT_LIMITS, shutdown, move |sock, peer| {
        let (tx, auth) = (tx.clone(), auth.clone());
        async move {
            let _ = sock.set_nodelay(true);
            let accepted = auth::accept_grpc(
                sock,
                peer,
                auth.as_deref(),
                Purpose::Manage,
                "management API",
                auth::CONTROLLER_KEY_REQUIRED,
            )
            .await;
            if let Some(stream) = accepted {
                let _ = tx.send(Ok(stream)).await;
            }
        }
    })
    .await;
    match grpc.await {
        Ok(Err(e)) => tracing::error!("management API stopped: {e}"),
        Err(e) => tracing::error!("management API stopped: {e}"),
        Ok(Ok(())) => {}
    }
}

/// Serves until `shutdown` turns true; see the module docs.
pub async fn run_controller(
    opts: ControllerOptions,
    shutdown: watch::Receiver<bool>,
    ready: Option<oneshot::Sender<RunningInfo>>,
) -> Result<(), RunError> {
    let stop_began = {
        let mut rx = shutdown.clone();
        tokio::spawn(async move {
            strata_net::stopped(&mut rx).await;
            tokio::time::Instant::now()
        })
    };
    let nbd_listener = bind(opts.nbd, "NBD").await?;
    let control_listener = match opts.control {
        Some(a) => Some(bind(a, "the management API").await?),
        None => None,
    };
    let iscsi_listener = match opts.iscsi {
        Some(a) => Some(bind(a, "iSCSI").await?),
        None => None,
    };
    let metrics_listener = match opts.metrics {
        Some(a) => Some(bind(a, "metrics").await?),
        None => None,
    };
    let volume = Arc::new(assemble(&opts.assemble).await?);
    let schedules: Arc<Vec<Arc<ScheduleState>>> = Arc::new(
        opts.backup_schedules
            .iter()
            .map(|s| Arc::new(ScheduleState::new(s.clone())))
            .collect(),
    );
    let nbd_addr = nbd_listener.local_addr().map_err(RunError::Nbd)?;
    let iscsi_addr = match &iscsi_listener {
        Some(l) => Some(l.local_addr().map_err(RunError::Iscsi)?),
        None => None,
    };

    if let Some(listener) = control_listener {
        let svc = VolumeService {
            volume: volume.clone(),
            nbd_address: nbd_addr.to_string(),
            backup_defaults: opts.backup_defaults.clone(),
            schedules: schedules.clone(),
        };
        tokio::spawn(serve_management(
            listener,
            svc,
            opts.auth.clone(),
            shutdown.clone(),
        ));
    }
    if let Some(listener) = metrics_listener {
        tokio::spawn(serve_metrics(
            listener,
            volume.clone(),
            schedules.clone(),
            shutdown.clone(),
        ));
    }
    if let Some(ready) = ready {
        let _ = ready.send(RunningInfo {
            nbd: nbd_addr,
            iscsi: iscsi_addr,
            size: volume.size(),
            volume: volume.clone(),
        });
    }
    if !schedules.is_empty() {
        tokio::spawn(run_schedules(
            volume.clone(),
            opts.backup_defaults.clone(),
            schedules.to_vec(),
            shutdown.clone(),
        ));
    }
    tokio::spawn(crate::replicator::recovery::recovery_loop(
        volume.clone(),
        shutdown.clone(),
    ));
    tracing::info!(volume = %volume.name, nbd = %nbd_addr, "serving");
    let backend = Arc::new(crate::backend::VolumeBackend::new(volume.clone()));
    let iscsi = iscsi_listener.map(|l| {
        let opts = crate::frontend::iscsi::IscsiOptions {
            chap: opts.chap.clone(),
            ..Default::default()
        };
        tracing::info!(volume = %volume.name, iscsi = ?iscsi_addr, target = %crate::frontend::iscsi::target_name(&volume.name), "serving iSCSI");
        tokio::spawn(crate::frontend::iscsi::serve(l, backend.clone(), opts, shutdown.clone()))
    });
    if let Some(tls) = &opts.nbd_tls {
        tracing::info!(volume = %volume.name, nbd = %nbd_addr, mode = %tls.mode(), identity = tls.identity(), "NBD TLS with the volume's pre-shared key");
    }
    let served =
        crate::frontend::nbd::serve(nbd_listener, backend, opts.nbd_tls.clone(), shutdown).await;
    let iscsi_served = match iscsi {
        Some(t) => t.await.unwrap_or_else(|e| Err(std::io::Error::other(e))),
        None => Ok(()),
    };
    // Clean stop: make everything acknowledged durable on every replica,
    // within what is left of the stop budget.
    let began = stop_began
        .await
        .unwrap_or_else(|_| tokio::time::Instant::now());
    let flushed = tokio::time::timeout_at(began + STOP_BUDGET, volume.flush()).await;
    served.map_err(RunError::Nbd)?;
    iscsi_served.map_err(RunError::Iscsi)?;
    let Ok(flushed) = flushed else {
        return Err(RunError::FinalFlushTimedOut {
            volume: volume.name.clone(),
            waited: began.elapsed(),
        });
    };
    if let Err(e) = flushed {
        return Err(RunError::FinalFlush {
            volume: volume.name.clone(),
            reason: e.to_string(),
        });
    }
    tracing::info!(volume = %volume.name, secs = began.elapsed().as_secs_f64(), "stopped cleanly");
    Ok(())
}
