//! The accept loop: [`serve`] hands every client of a listener to
//! [`serve_connection`] (handshake, then transmission) until shutdown.
//! A failing connection is logged and closed; it never affects others.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use super::backend::Backend;
use super::error::ConnError;
use super::handshake::handshake;
use super::ops::Export;
use super::transmission::transmission;

/// Connections served at once; more wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 256;
/// A client must finish its handshake within this time.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long shutdown waits for connections to finish in-flight requests.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// Resolves once `shutdown` holds `true` or its sender is gone.
pub(crate) async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|v| *v).await;
}

/// Serves `backend` to every client of `listener` until `shutdown` turns
/// true (or its sender is dropped); then stops accepting, lets each
/// connection finish its in-flight requests (at most [`SHUTDOWN_GRACE`])
/// and returns. Accept errors (out of file descriptors...) are logged and
/// retried, so this only returns on shutdown.
pub async fn serve<B: Backend>(
    listener: TcpListener,
    backend: Arc<B>,
    mut shutdown: watch::Receiver<bool>,
) -> io::Result<()> {
    let export = Export::new(backend);
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut conns = JoinSet::new();
    loop {
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = stopped(&mut shutdown) => break,
        };
        let (sock, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("NBD accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stopped(&mut shutdown) => break,
        };
        while conns.try_join_next().is_some() {}
        let _ = sock.set_nodelay(true);
        let (export, rx) = (export.clone(), shutdown.clone());
        conns.spawn(async move {
            match serve_connection(sock, export, rx).await {
                Ok(()) => tracing::debug!(%peer, "NBD client disconnected"),
                Err(e) => tracing::info!(%peer, "NBD connection closed: {e}"),
            }
            drop(permit);
        });
    }
    drop(listener);
    let drain = async { while conns.join_next().await.is_some() {} };
    if tokio::time::timeout(SHUTDOWN_GRACE, drain).await.is_err() {
        tracing::warn!("NBD connections still open after {SHUTDOWN_GRACE:?}; dropping them");
    }
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
    let facts = export.facts().clone();
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
