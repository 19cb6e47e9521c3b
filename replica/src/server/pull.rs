//! PULL on a syncing replica: read a range from a peer replica and write
//! the plan's pieces of it here ([`crate::wire::PullPlan`]).
//!
//! The controller plans the copy and holds the range's lock; this end only
//! moves the bytes. It connects to the source as a controller would (the
//! process's cluster key, the volume's name, the request's epoch), keeps
//! that connection for the next PULLs of the same data connection, and
//! reads with [`Command::ReadForCopy`](crate::wire::Command::ReadForCopy)
//! when the plan asks, so the source's page cache keeps what the
//! applications read. A piecewise plan reads only its pieces, in one
//! [`Command::ReadPieces`](crate::wire::Command::ReadPieces); otherwise
//! the whole span is read and the holes between the pieces dropped. Anything that goes wrong on the source's side is
//! [`Status::PeerFailed`] and writes nothing: the controller then copies
//! the range itself. A failed write here is the target's own error.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;

use crate::auth::{self, WireMode};
use crate::client::ReplicaClient;
use crate::store::WriteClass;
use crate::wire::{piece_slices, PieceList, PullPlan, Reply, Status};
use crate::{error_chain, Store};

/// The connections to source replicas of one data connection's PULLs.
#[derive(Default)]
pub(super) struct Peers {
    /// By source address and whether the connection is encrypted.
    clients: Mutex<HashMap<(SocketAddr, bool), Arc<ReplicaClient>>>,
}

impl Peers {
    /// A live connection to the plan's source for `volume` at `epoch`: the
    /// kept one, or a new one (proving the process's cluster key, if it has
    /// one; encrypted if the plan says so).
    async fn client(
        &self,
        plan: &PullPlan,
        volume: &str,
        epoch: u64,
    ) -> Result<Arc<ReplicaClient>, String> {
        let source = plan.source;
        let kept = self.clients.lock().get(&(source, plan.encrypt)).cloned();
        if let Some(client) = kept.filter(|c| !c.is_closed()) {
            client.set_epoch(epoch);
            return Ok(client);
        }
        let key = match (auth::process_key(), plan.encrypt) {
            (Some(key), true) => Some((key, WireMode::Encrypted)),
            (Some(key), false) => Some((key, auth::process_wire_mode())),
            (None, true) => {
                return Err("asked to encrypt the copy, but this replica has no cluster key".into())
            }
            (None, false) => None,
        };
        let client = ReplicaClient::connect_with_mode(source, volume, epoch, plan.timeout, key)
            .await
            .map(Arc::new)
            .map_err(|e| {
                format!(
                    "connecting to the source replica {source}: {}",
                    error_chain(&e)
                )
            })?;
        self.clients
            .lock()
            .insert((source, plan.encrypt), client.clone());
        Ok(client)
    }
}

/// PULLs that write at most this many bytes try to write on the connection's
/// task (as [`super::conn`]'s inline writes do) before the blocking pool:
/// a rebuild of scattered 4 KiB blocks is tens of thousands of them, and
/// the thread hand-off cost more than the write.
const INLINE_WRITE_MAX: usize = 128 << 10;

/// Runs one PULL for `volume` (the connection's store) at `epoch`; the
/// caller fenced the epoch already.
pub(super) async fn pull(
    store: Arc<Store>,
    peers: Arc<Peers>,
    volume: String,
    id: u64,
    epoch: u64,
    offset: u64,
    plan: PullPlan,
) -> Reply {
    let peer_failed =
        |message: String| Reply::error(id, store.epoch(), Status::PeerFailed, &message);
    let client = match peers.client(&plan, &volume, epoch).await {
        Ok(c) => c,
        Err(message) => return peer_failed(message),
    };
    let read = if plan.piecewise {
        // The plan's pieces passed the same checks (`PullPlan::decode`).
        match PieceList::new(plan.pieces.clone()) {
            Ok(list) => client.read_pieces(list, plan.drop_cache).await,
            Err(why) => return peer_failed(format!("the plan's pieces: {why}")),
        }
    } else if plan.drop_cache {
        client.read_for_copy(offset, plan.span).await
    } else {
        client.read(offset, plan.span).await
    };
    let data: Bytes = match read {
        Ok(data) => data,
        Err(e) => {
            return peer_failed(format!(
                "reading {} bytes at {offset} from the source replica {}: {}",
                plan.read_len(),
                plan.source,
                error_chain(&e)
            ))
        }
    };
    // The client checked the reply's length: the span, whose pieces lie
    // within it (`PullPlan::decode`), or the pieces back to back.
    // Small copies go into the page cache on this task, as the
    // connection's own writes do; whatever would wait (the bound on
    // unflushed data, a chain change) goes to the blocking pool.
    let mut pieces = piece_slices(&data, offset, &plan.pieces, plan.piecewise).peekable();
    if plan.bytes() <= INLINE_WRITE_MAX as u64 {
        let inline = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            // The epoch may have moved while the source was read.
            super::execute::fence(&store, id, epoch)?;
            while let Some((at, bytes)) = pieces.peek() {
                match store.write_unless_busy(WriteClass::Copy, *at, bytes) {
                    Ok(true) => drop(pieces.next()),
                    Ok(false) => return Ok(false),
                    Err(e) => return Err(super::execute::store_reply(&store, id, Err(e))),
                }
            }
            Ok(true)
        }));
        match inline {
            Ok(Ok(true)) => return super::execute::store_reply(&store, id, Ok(Bytes::new())),
            Ok(Ok(false)) => {}
            Ok(Err(reply)) => return reply,
            Err(_) => return super::execute::panicked(&store, id),
        }
    }
    let rest: Vec<(u64, Bytes)> = pieces.collect();
    let written = {
        let store = store.clone();
        tokio::task::spawn_blocking(move || {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                // The epoch may have moved while the source was read.
                if let Err(reply) = super::execute::fence(&store, id, epoch) {
                    return reply;
                }
                let result = rest
                    .iter()
                    .try_for_each(|(at, bytes)| store.write_as(WriteClass::Copy, *at, bytes));
                super::execute::store_reply(&store, id, result.map(|()| Bytes::new()))
            }))
            .unwrap_or_else(|_| super::execute::panicked(&store, id))
        })
        .await
    };
    written.unwrap_or_else(|_| {
        Reply::error(
            id,
            store.epoch(),
            Status::IoError,
            "Internal error: the pulled write's task failed",
        )
    })
}
