//! A replica node: one TCP port that carries both the binary data wire
//! and the gRPC control API. The first bytes of a connection decide: an
//! HTTP/2 preface (`PRI * HTTP/2.0`) goes to gRPC, anything else to the
//! data server, which checks the data-wire magic itself.
//!
//! With a cluster key ([`crate::auth`]) every connection starts with the
//! handshake, whose hello names the protocol: the data server runs it for
//! data connections, this router for gRPC ones, whose HTTP/2 then runs
//! inside the authenticated records. A plain HTTP/2 preface is refused.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use strata_proto::replica::replica_control_server::ReplicaControlServer;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

use crate::auth::{self, Purpose, Sealed, ServerAuth};
use crate::control::ReplicaControlService;
use crate::host::ReplicaHost;
use crate::WritebackConfig;

const PREFACE: &[u8; 4] = auth::HTTP2_PREFACE;
/// How long a new connection may stay silent before it is dropped.
const PEEK_TIMEOUT: Duration = Duration::from_secs(10);
/// At shutdown, how long a connection still being routed may take.
const ROUTE_GRACE: Duration = Duration::from_secs(1);
/// At shutdown, how long gRPC calls in flight may take after the data
/// connections drained.
const CONTROL_GRACE: Duration = Duration::from_secs(1);

/// How a node serves and stops.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// How every replica bounds its unflushed data.
    pub writeback: WritebackConfig,
    /// From the shutdown signal to the replicas closed: the data
    /// connections drain (at most [`crate::server::DRAIN_TIMEOUT`]), then
    /// every replica closes within what is left ([`crate::Store::close_within`]).
    /// Below Kubernetes' 10 s stop expectations by default.
    pub stop_budget: Duration,
    /// With a cluster key, every peer must prove it; `None` serves anyone.
    pub auth: Option<Arc<ServerAuth>>,
}

impl Default for NodeOptions {
    fn default() -> Self {
        NodeOptions {
            writeback: WritebackConfig::default(),
            stop_budget: Duration::from_secs(8),
            auth: None,
        }
    }
}

/// [`serve_node_with`] with the default [`NodeOptions`].
pub async fn serve_node(
    dir: &Path,
    listener: TcpListener,
    shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    serve_node_with(dir, listener, shutdown, NodeOptions::default()).await
}

/// Serves every replica under `dir` on `listener` until `shutdown` turns
/// true, then closes every replica (flushed, clean flag set) within
/// [`NodeOptions::stop_budget`] of the signal; a replica that cannot finish
/// its flush in time is logged and left for the next start.
pub async fn serve_node_with(
    dir: &Path,
    listener: TcpListener,
    shutdown: watch::Receiver<bool>,
    opts: NodeOptions,
) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let host = Arc::new(ReplicaHost::new(dir, crate::engine::detect()));
    host.set_writeback(opts.writeback);
    let stop_began = {
        let mut rx = shutdown.clone();
        tokio::spawn(async move {
            strata_net::stopped(&mut rx).await;
            std::time::Instant::now()
        })
    };
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, keyed = opts.auth.is_some(), "replica node listening");
        auth::warn_if_open(
            "The replica server",
            addr,
            opts.auth.as_ref().map(|a| &a.key),
        );
    }
    let (grpc_tx, grpc_rx) = mpsc::channel::<std::io::Result<Sealed<TcpStream>>>(16);
    let (data_tx, data_rx) = mpsc::channel::<(TcpStream, std::net::SocketAddr)>(16);

    let grpc = {
        let svc = ReplicaControlService::new(host.clone());
        let mut rx = shutdown.clone();
        let incoming =
            futures::stream::unfold(
                grpc_rx,
                |mut r| async move { r.recv().await.map(|s| (s, r)) },
            );
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(ReplicaControlServer::new(svc))
                .serve_with_incoming_shutdown(incoming, async move {
                    strata_net::stopped(&mut rx).await;
                })
                .await
        })
    };
    let data = tokio::spawn(crate::server::serve_streams_with(
        data_rx,
        host.clone(),
        opts.auth.clone(),
        shutdown.clone(),
    ));

    let limits = strata_net::Limits {
        name: "replica node",
        max_connections: crate::server::MAX_CONNECTIONS,
        // A connection still silent at shutdown is dropped.
        grace: ROUTE_GRACE,
    };
    let server_auth = opts.auth.clone();
    strata_net::serve(listener, limits, shutdown.clone(), move |sock, peer| {
        let (grpc_tx, data_tx) = (grpc_tx.clone(), data_tx.clone());
        let server_auth = server_auth.clone();
        async move {
            let mut first = [0u8; 6];
            // Keyless, 4 bytes route (as before keys existed); keyed, the
            // hello's purpose byte is needed too.
            let want = if server_auth.is_some() { 6 } else { 4 };
            // A client that sends nothing for PEEK_TIMEOUT is dropped.
            let peeked = tokio::time::timeout(PEEK_TIMEOUT, async {
                loop {
                    let n = sock.peek(&mut first[..want]).await?;
                    if n == 0 || n >= want {
                        return Ok::<usize, std::io::Error>(n);
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            })
            .await;
            let n = match peeked {
                Ok(Ok(n)) if n >= 4 => n,
                // Keyed, fewer than 6 bytes then EOF: the data server refuses them.
                Ok(Ok(n)) if n > 0 && server_auth.is_some() => n,
                _ => {
                    tracing::debug!(%peer, "connection closed before saying anything");
                    return;
                }
            };
            let hello = Purpose::of_hello(&first[..n])
                .or((first[..4] == auth::MAGIC_CLIENT[..]).then_some(Purpose::Data));
            // Keyed, gRPC (its hello, or a plain HTTP/2 preface to refuse)
            // goes through the handshake as on the controller's API.
            let grpc_bound = hello == Some(Purpose::Control)
                || (hello.is_none() && n >= 4 && first[..4] == PREFACE[..]);
            match (server_auth, hello) {
                (Some(a), _) if grpc_bound => {
                    let accepted = auth::accept_grpc(
                        sock,
                        peer,
                        Some(&a),
                        Purpose::Control,
                        "replica control",
                        auth::KEY_REQUIRED,
                    )
                    .await;
                    if let Some(stream) = accepted {
                        let _ = grpc_tx.send(Ok(stream)).await;
                    }
                }
                // The data server authenticates (or refuses) the rest.
                (Some(_), _) => {
                    let _ = data_tx.send((sock, peer)).await;
                }
                (None, Some(_)) => {
                    let mut sock = sock;
                    tracing::warn!(%peer, "refused a peer with a cluster key: this replica has none");
                    auth::refuse_keyed_client(&mut sock).await;
                }
                (None, None) if first[..4] == PREFACE[..] => {
                    let _ = grpc_tx.send(Ok(Sealed::Plain(sock))).await;
                }
                (None, None) => {
                    let _ = data_tx.send((sock, peer)).await;
                }
            }
        }
    })
    .await;
    let _ = data.await;
    let _ = tokio::time::timeout(CONTROL_GRACE, grpc).await;
    let began = stop_began
        .await
        .unwrap_or_else(|_| std::time::Instant::now());
    let deadline = began + opts.stop_budget;
    let closing = host.clone();
    let failed = tokio::task::spawn_blocking(move || closing.close_all_within(deadline))
        .await
        .unwrap_or_default();
    let secs = began.elapsed().as_secs_f64();
    if failed.is_empty() {
        tracing::info!(dir = %dir.display(), secs, "replica server stopped; replicas closed cleanly");
    } else {
        tracing::warn!(dir = %dir.display(), secs, unclean = failed.len(), "replica server stopped; some replicas were not closed cleanly (see above)");
    }
    Ok(())
}
