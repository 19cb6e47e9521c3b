//! The replica data server: accepts controller connections speaking the
//! data wire ([`crate::wire`]) and runs their requests against the volumes
//! of a [`ReplicaHost`].
//!
//! ```text
//! serve (accept loop, connection cap, graceful shutdown)
//! serve_streams (the same, for connections accepted elsewhere)
//!   └─ conn::handle, one per connection
//!        reader: bytes → Request (wire.rs) → HELLO binds a Store via host.open
//!                data requests → epoch fence → Store call: cached reads and
//!                page-cache writes inline, the rest on the blocking pool
//!                (READ buffers recycled: read_buffers.rs)
//!        writer: replies in completion order, batched (outbound.rs)
//! ```

mod conn;
pub(crate) mod outbound;
mod read_buffers;

use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use crate::host::ReplicaHost;

pub use conn::MAX_IN_FLIGHT;

/// Connections served at once; further ones wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 1024;
/// How long shutdown waits for connections to finish their requests in
/// flight before dropping them.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Resolves when `shutdown` holds `true` or its sender is gone.
pub(crate) async fn wait_shutdown(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|&stop| stop).await;
}

/// Serves the data wire on `listener` until `shutdown` becomes `true` (or its
/// sender is dropped). Then it stops accepting, lets every connection finish
/// the requests it has read (up to [`DRAIN_TIMEOUT`]) and returns. A broken
/// or misbehaving connection only ever closes itself.
pub async fn serve(
    listener: TcpListener,
    host: Arc<ReplicaHost>,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let mut conns = Connections::new(host, shutdown.clone());
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "replica data server listening");
    }
    loop {
        let permit = tokio::select! {
            biased;
            _ = wait_shutdown(&mut shutdown) => break,
            p = conns.permit() => p,
        };
        let sock = tokio::select! {
            biased;
            _ = wait_shutdown(&mut shutdown) => break,
            r = listener.accept() => match r {
                Ok((sock, _)) => sock,
                Err(e) => {
                    // Out of file descriptors and the like: back off, go on.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        conns.spawn(sock, permit);
    }
    drop(listener);
    conns.drain().await;
    Ok(())
}

/// [`serve`] for connections accepted elsewhere (a port shared with the
/// gRPC control API): serves every stream received on `streams`. When the
/// channel closes, no new connection is taken; the function returns once
/// the served ones have ended, or after shutdown and their drain.
pub async fn serve_streams(
    mut streams: mpsc::Receiver<TcpStream>,
    host: Arc<ReplicaHost>,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let mut conns = Connections::new(host, shutdown.clone());
    let mut stopped = false;
    loop {
        let permit = tokio::select! {
            biased;
            _ = wait_shutdown(&mut shutdown) => { stopped = true; break }
            p = conns.permit() => p,
        };
        let sock = tokio::select! {
            biased;
            _ = wait_shutdown(&mut shutdown) => { stopped = true; break }
            s = streams.recv() => match s {
                Some(sock) => sock,
                None => break,
            },
        };
        conns.spawn(sock, permit);
    }
    drop(streams);
    if !stopped {
        tokio::select! {
            _ = wait_shutdown(&mut shutdown) => {}
            _ = conns.join_all() => {}
        }
    }
    conns.drain().await;
    Ok(())
}

/// The connections being served: a cap on their number and their tasks.
struct Connections {
    host: Arc<ReplicaHost>,
    shutdown: watch::Receiver<bool>,
    limit: Arc<Semaphore>,
    tasks: JoinSet<()>,
}

impl Connections {
    fn new(host: Arc<ReplicaHost>, shutdown: watch::Receiver<bool>) -> Self {
        Connections {
            host,
            shutdown,
            limit: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
            tasks: JoinSet::new(),
        }
    }

    async fn permit(&self) -> OwnedSemaphorePermit {
        self.limit
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed")
    }

    fn spawn(&mut self, sock: TcpStream, permit: OwnedSemaphorePermit) {
        let (host, shutdown) = (self.host.clone(), self.shutdown.clone());
        self.tasks.spawn(async move {
            conn::handle(sock, host, shutdown).await;
            drop(permit);
        });
        while let Some(done) = self.tasks.try_join_next() {
            log_join(done);
        }
    }

    async fn join_all(&mut self) {
        while let Some(done) = self.tasks.join_next().await {
            log_join(done);
        }
    }

    /// After shutdown: waits up to [`DRAIN_TIMEOUT`] for the connections to
    /// finish their requests in flight, then drops the rest.
    async fn drain(mut self) {
        if tokio::time::timeout(DRAIN_TIMEOUT, self.join_all())
            .await
            .is_err()
        {
            tracing::warn!(
                left = self.tasks.len(),
                "shutdown: dropping connections that did not drain in time"
            );
            self.tasks.shutdown().await;
        }
    }
}

fn log_join(done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done {
        if e.is_panic() {
            tracing::error!(error = %e, "a data connection task panicked");
        }
    }
}
