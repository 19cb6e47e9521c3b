//! The accept loop: [`serve`] hands every client of a listener to
//! [`serve_connection`] (handshake, then transmission) until shutdown.
//! A failing connection is logged and closed; it never affects others.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use strata_net::stopped;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::error::ConnError;
use super::handshake::handshake;
use super::ops::Export;
use super::transmission::transmission;
use crate::frontend::Backend;

/// Connections served at once; more wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 256;
/// A client must finish its handshake within this time.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long shutdown waits for connections to finish in-flight requests: the
/// replicas bound their unflushed data to about a second of disk time, and
/// the final flush and the whole stop must fit a pod's grace period
/// (`crate::run::STOP_BUDGET`).
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// Serves `backend` to every client of `listener` until `shutdown` turns
/// true (or its sender is dropped); then stops accepting, lets each
/// connection finish its in-flight requests (at most [`SHUTDOWN_GRACE`])
/// and returns (the accept loop is [`strata_net::serve`]).
pub async fn serve<B: Backend>(
    listener: TcpListener,
    backend: Arc<B>,
    shutdown: watch::Receiver<bool>,
) -> io::Result<()> {
    let export = Export::new(backend);
    let limits = strata_net::Limits {
        name: "NBD",
        max_connections: MAX_CONNECTIONS,
        grace: SHUTDOWN_GRACE,
    };
    let rx = shutdown.clone();
    strata_net::serve(listener, limits, shutdown, move |sock, peer| {
        let (export, rx) = (export.clone(), rx.clone());
        async move {
            match serve_connection(sock, export, rx).await {
                Ok(()) => tracing::debug!(%peer, "NBD client disconnected"),
                Err(e) => tracing::info!(%peer, "NBD connection closed: {e}"),
            }
        }
    })
    .await;
    Ok(())
}

/// Serves one client on any byte stream (a TCP socket, or an in-memory
/// pipe in tests): handshake within [`HANDSHAKE_TIMEOUT`], then requests
/// until the client disconnects or `shutdown` turns true.
pub async fn serve_connection<S, B>(
    mut stream: S,
    export: Arc<Export<B>>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), ConnError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    B: Backend,
{
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let facts = export.facts();
    let session = tokio::select! {
        r = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&mut stream, &mut buf, &facts)) => match r {
            Ok(Ok(Some(s))) => s,
            Ok(Ok(None)) => return Ok(()),
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(ConnError::HandshakeTimeout(HANDSHAKE_TIMEOUT)),
        },
        _ = stopped(&mut shutdown) => return Ok(()),
    };
    tracing::debug!(?session, "NBD client entered transmission");
    let backend = export.backend().clone();
    backend.client_attached(true);
    let (rd, wr) = tokio::io::split(stream);
    let result = transmission(rd, wr, buf, export, session, shutdown).await;
    backend.client_attached(false);
    result
}
