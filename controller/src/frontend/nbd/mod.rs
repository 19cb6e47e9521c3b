//! The NBD frontend (NetworkBlockDevice/nbd `doc/proto.md`): fixed
//! newstyle handshake with GO/INFO/EXPORT_NAME/LIST/ABORT, structured
//! replies and the base:allocation meta context; READ, WRITE (FUA), FLUSH,
//! TRIM, WRITE_ZEROES (NO_HOLE, FAST_ZERO), BLOCK_STATUS, DISC.
//!
//! - `proto.rs`: the wire format, pure parsers and encoders;
//! - `handshake.rs`: option negotiation;
//! - `transmission.rs`: pipelined request handling on one connection;
//! - this file: the accept loop.

pub mod handshake;
pub mod proto;
pub mod transmission;

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use crate::frontend::Backend;

/// Connections served at once; more wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 64;
/// A client must finish its handshake within this time.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves `backend` to every client of `listener` until `shutdown` turns
/// true; then stops accepting and waits for connections to finish their
/// in-flight requests.
pub async fn serve<B: Backend>(
    listener: TcpListener,
    backend: Arc<B>,
    mut shutdown: watch::Receiver<bool>,
) -> io::Result<()> {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut conns = JoinSet::new();
    loop {
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => p.expect("semaphore never closed"),
            _ = crate::stopped(&mut shutdown) => break,
        };
        let (mut sock, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("NBD accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = crate::stopped(&mut shutdown) => break,
        };
        while conns.try_join_next().is_some() {}
        let _ = sock.set_nodelay(true);
        let (backend, rx) = (backend.clone(), shutdown.clone());
        conns.spawn(async move {
            let session = match tokio::time::timeout(
                HANDSHAKE_TIMEOUT,
                handshake::handshake(&mut sock, &*backend),
            )
            .await
            {
                Ok(Ok(Some(s))) => s,
                Ok(Ok(None)) => return,
                Ok(Err(e)) => {
                    tracing::info!(%peer, "NBD handshake failed: {e}");
                    return;
                }
                Err(_) => {
                    tracing::info!(%peer, "NBD handshake timed out");
                    return;
                }
            };
            tracing::debug!(%peer, ?session, "NBD client connected");
            if let Err(e) = transmission::transmission(sock, backend, session, rx).await {
                tracing::info!(%peer, "NBD connection closed: {e}");
            }
            drop(permit);
        });
    }
    drop(listener);
    // In-flight requests finish; a stuck client does not hold shutdown forever.
    let _ = tokio::time::timeout(Duration::from_secs(30), async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    Ok(())
}
