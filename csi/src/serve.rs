//! `strata csi`: serving Identity plus the Controller or Node service on
//! the CSI endpoint until shutdown.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use strata_attach::supervisor::SupervisorOptions;
use strata_attach::AttachOptions;
use strata_proto::csi::controller_server::ControllerServer;
use strata_proto::csi::identity_server::IdentityServer;
use strata_proto::csi::node_server::NodeServer;
use tonic::transport::Server;

use crate::cluster::Cluster;
use crate::controller::ControllerService;
use crate::endpoint::Endpoint;
use crate::identity::IdentityService;
use crate::node::NodeService;
use crate::objects::PodSettings;

/// Which services this process serves beside Identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Controller,
    Node,
    /// Both in one process: a single-node cluster, and csi-sanity's
    /// whole-lifecycle specs (they need one endpoint serving both).
    All,
}

impl Mode {
    fn controller(self) -> bool {
        matches!(self, Mode::Controller | Mode::All)
    }

    fn node(self) -> bool {
        matches!(self, Mode::Node | Mode::All)
    }
}

/// Settings of the controller mode.
#[derive(Debug, Clone)]
pub struct ControllerSettings {
    pub namespace: String,
    pub image: String,
    pub image_pull_policy: Option<String>,
    pub replica_port: u16,
    pub controller_wait: Duration,
    /// Replace a replica whose node has been gone or NotReady this long
    /// (None: never).
    pub replace_replica_after: Option<Duration>,
    /// The Secret holding the cluster key, created when missing
    /// ([`crate::cluster_key`]); `None`: keyless.
    pub cluster_key_secret: Option<String>,
}

/// Settings of the node mode.
#[derive(Debug, Clone)]
pub struct NodeSettings {
    pub node_id: String,
    pub attach_state_dir: PathBuf,
    pub controller_wait: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {endpoint:?}: {source}")]
    Listen {
        endpoint: Endpoint,
        source: std::io::Error,
    },
    #[error("cannot reach the Kubernetes API (in-cluster config or KUBECONFIG): {0}")]
    Kube(#[from] kube::Error),
    #[error("gRPC server failed: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error(transparent)]
    ClusterKey(#[from] crate::cluster_key::ClusterKeyError),
    #[error("cannot listen for /healthz on {addr}: {source}")]
    Health {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// Serves until `shutdown` resolves; with `health`, also `/healthz` on
/// that address ([`crate::health`]).
pub async fn serve(
    endpoint: Endpoint,
    mode: Mode,
    controller: Option<ControllerSettings>,
    node: Option<NodeSettings>,
    health: Option<std::net::SocketAddr>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    // Bound before the CSI endpoint serves, so a wrong address fails the start.
    let health = match health {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| ServeError::Health { addr, source })?,
        ),
        None => None,
    };
    let identity = IdentityServer::new(IdentityService {
        controller: mode.controller(),
    });
    let mut router = Server::builder().add_service(identity);
    let mut supervisor_stop = None;
    if mode.controller() {
        let s = controller.expect("controller settings");
        // The binary links two rustls providers (ring through kube,
        // aws-lc-rs through the S3 client): choose one for the process.
        // An error means one is installed already, which is as good.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = kube::Client::try_default().await?;
        if let Some(name) = &s.cluster_key_secret {
            let (key, source) =
                crate::cluster_key::ensure_cluster_key(&client, &s.namespace, name).await?;
            strata_replica::auth::set_process_key(key);
            tracing::info!(secret = %format!("{}/{name}", s.namespace), ?source, "cluster key");
        }
        let cluster = Cluster {
            client,
            namespace: s.namespace.clone(),
            replica_port: s.replica_port,
            pod: PodSettings {
                namespace: s.namespace,
                image: s.image,
                image_pull_policy: s.image_pull_policy,
                service_account: None,
                cluster_key_secret: s.cluster_key_secret.clone(),
            },
            controller_wait: s.controller_wait,
            jobs: Default::default(),
        };
        tokio::spawn(crate::controller::status::keep_current(
            cluster.clone(),
            s.replace_replica_after,
        ));
        tokio::spawn(crate::controller::resizer::run(cluster.clone()));
        tokio::spawn(crate::controller::snapshotter::run(cluster.clone()));
        router = router.add_service(ControllerServer::new(ControllerService { cluster }));
    }
    if mode.node() {
        let s = node.expect("node settings");
        let attach = AttachOptions {
            state_dir: s.attach_state_dir.clone(),
            ..Default::default()
        };
        // Kernel NBD devices reconnect after a controller restart only
        // with a supervisor: run one for every attachment of this node.
        if strata_attach::kernel_nbd_unavailable().is_none() {
            let stop = Arc::new(AtomicBool::new(false));
            let opts = SupervisorOptions {
                state_dir: s.attach_state_dir.clone(),
                probe_interval: Duration::from_secs(2),
                connect_timeout: Duration::from_secs(10),
                only: None,
                exit_when_detached: false,
                max_backoff: Duration::from_secs(5),
            };
            let flag = stop.clone();
            std::thread::Builder::new()
                .name("nbd-supervisor".into())
                .spawn(move || {
                    if let Err(e) = strata_attach::supervisor::supervise(&opts, &flag) {
                        tracing::error!(error = %e, "the NBD supervisor stopped");
                    }
                })
                .ok();
            supervisor_stop = Some(stop);
        }
        router = router.add_service(NodeServer::new(NodeService {
            node_id: s.node_id,
            attach,
            controller_wait: s.controller_wait,
        }));
    }
    let (health_stop, health_stopped) = tokio::sync::watch::channel(false);
    if let Some(listener) = health {
        tokio::spawn(crate::health::serve(
            listener,
            endpoint.clone(),
            health_stopped,
        ));
    }
    tracing::info!(?endpoint, ?mode, "strata csi serving");
    let result = match &endpoint {
        Endpoint::Unix(path) => {
            if let Some(dir) = path.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            // A socket left by an earlier run.
            let _ = std::fs::remove_file(path);
            let listener =
                tokio::net::UnixListener::bind(path).map_err(|source| ServeError::Listen {
                    endpoint: endpoint.clone(),
                    source,
                })?;
            let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
            let r = router
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await;
            let _ = std::fs::remove_file(path);
            r
        }
        Endpoint::Tcp(addr) => router.serve_with_shutdown(*addr, shutdown).await,
    };
    let _ = health_stop.send(true);
    if let Some(stop) = supervisor_stop {
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    Ok(result?)
}
