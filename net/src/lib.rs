//! `strata-net`: what every strata server shares around its sockets.
//!
//! - [`stopped`]: the one "wait for shutdown" future. Every server gets a
//!   `tokio::sync::watch::Receiver<bool>` that turns `true` (or loses its
//!   sender) when the process stops.
//! - [`serve`]: the one accept loop (NBD, iSCSI, the replica data wire, the
//!   replica node's shared port, `/metrics`), after tokio's mini-redis: a
//!   semaphore caps the connections served at once, accept errors (out of
//!   file descriptors...) back off exponentially instead of spinning, and
//!   on shutdown the loop stops accepting and gives the open connections
//!   one grace period to finish what they have read before dropping them.
//!
//! - [`memory::return_freed_memory`]: gives the heap memory a burst freed
//!   back to the system every 10 s (glibc keeps it otherwise).
//! - [`http::serve_get`]: the minimal HTTP/1.1 `GET` server on top of it
//!   (`/metrics` of a volume controller, `/healthz` of `strata csi`).
//!
//! Connections come from a [`Incoming`] source: a `TcpListener`, or a
//! channel of streams accepted elsewhere (the replica node routes one port
//! to two protocols).

pub mod http;
mod listener;
pub mod memory;

pub use listener::{serve, Incoming, Limits};

/// Resolves once `shutdown` holds `true` or its sender is gone. Holds no
/// lock across an await, so it can sit in a `select!` of a spawned task.
pub async fn stopped(shutdown: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}
