//! The replica data server: accepts controller connections speaking the
//! data wire ([`crate::wire`]) and runs their requests against the volumes
//! of a [`ReplicaHost`].
//!
//! ```text
//! serve (accept loop, connection cap, graceful shutdown)
//! serve_streams (the same, for connections accepted elsewhere)
//!   └─ conn::handle, one per connection
//!        reader: bytes → Request (wire.rs) → HELLO binds a Store via host.open
//!                data requests → epoch fence → Store call (execute.rs):
//!                cached reads and page-cache writes inline, reads that
//!                miss the cache on the server's io_uring (engine/
//!                async_reads.rs), the rest on the blocking pool
//!                (READ buffers recycled: read_buffers.rs; READ_PIECES:
//!                read_pieces.rs; PULL, a copy from a peer: pull.rs)
//!        writer: replies in completion order, batched (wire/outbound.rs)
//! ```

mod conn;
mod execute;
mod pull;
mod read_buffers;
mod read_pieces;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

use crate::auth::ServerAuth;
use crate::engine::AsyncReads;
use crate::host::ReplicaHost;

pub use conn::MAX_IN_FLIGHT;

/// Connections served at once; further ones wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 1024;
/// How long shutdown waits for connections to finish their requests in
/// flight before dropping them. Unflushed data is bounded to about a second
/// of disk time (`store/writeback.rs`), so a flush in flight fits; the
/// whole stop must stay within a pod's grace period.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(3);

const LIMITS: strata_net::Limits = strata_net::Limits {
    name: "replica data",
    max_connections: MAX_CONNECTIONS,
    grace: DRAIN_TIMEOUT,
};

/// Serves the data wire on `listener` until `shutdown` becomes `true` (or its
/// sender is dropped). Then it stops accepting, lets every connection finish
/// the requests it has read (up to [`DRAIN_TIMEOUT`]) and returns. A broken
/// or misbehaving connection only ever closes itself.
pub async fn serve(
    listener: TcpListener,
    host: Arc<ReplicaHost>,
    shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    serve_with(listener, host, None, shutdown).await
}

/// [`serve`], with `auth` requiring every peer to prove the cluster key
/// ([`crate::auth`]).
pub async fn serve_with(
    listener: TcpListener,
    host: Arc<ReplicaHost>,
    auth: Option<Arc<ServerAuth>>,
    shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, keyed = auth.is_some(), "replica data server listening");
        crate::auth::warn_if_open(
            "The replica data server",
            addr,
            auth.as_ref().map(|a| &a.key),
        );
    }
    serve_from(listener, host, auth, shutdown).await;
    Ok(())
}

/// [`serve`] for connections accepted elsewhere (a port shared with the
/// gRPC control API): serves every stream received on `streams`. When the
/// channel closes, no new connection is taken; the function returns once
/// the served ones have ended, or after shutdown and their drain.
pub async fn serve_streams(
    streams: mpsc::Receiver<(TcpStream, SocketAddr)>,
    host: Arc<ReplicaHost>,
    shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    serve_streams_with(streams, host, None, shutdown).await
}

/// [`serve_streams`], with `auth` requiring the cluster key.
pub async fn serve_streams_with(
    streams: mpsc::Receiver<(TcpStream, SocketAddr)>,
    host: Arc<ReplicaHost>,
    auth: Option<Arc<ServerAuth>>,
    shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    serve_from(streams, host, auth, shutdown).await;
    Ok(())
}

async fn serve_from(
    incoming: impl strata_net::Incoming,
    host: Arc<ReplicaHost>,
    auth: Option<Arc<ServerAuth>>,
    shutdown: watch::Receiver<bool>,
) {
    let rx = shutdown.clone();
    let reads = AsyncReads::start();
    let ring = reads.clone();
    strata_net::serve(incoming, LIMITS, shutdown, move |sock, _peer| {
        conn::handle(sock, host.clone(), auth.clone(), ring.clone(), rx.clone())
    })
    .await;
    if let Some(reads) = reads {
        reads.stop();
    }
}
