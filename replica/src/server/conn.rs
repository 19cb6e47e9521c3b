//! One data connection: a reader that decodes requests and runs them, and a
//! writer that sends replies in completion order. Writes into the page
//! cache and reads of cached pages run right on the reader's task
//! ([`execute::run_inline`](super::execute::run_inline)); a read that misses
//! the cache waits for the disk on the server's io_uring
//! ([`AsyncReads`]) where the kernel offers one; whatever else may wait for
//! the disk (flush, FUA, trim, reads without the ring) runs on the blocking
//! pool.
//!
//! Every request holds permits from the moment it is decoded until its
//! reply has been written to the socket: one of [`MAX_IN_FLIGHT`], and a
//! share of [`MAX_IN_FLIGHT_BYTES`] for its data (a WRITE's payload, a
//! READ's or READ_PIECES' reply, what a PULL reads), so a connection never holds more than that
//! many requests or bytes: when either runs out the reader stops reading
//! and TCP pushes back on the client. (A replica that falls behind its
//! peers keeps receiving the volume's writes; without the byte bound 64
//! writes of 1 MiB each piled up in it.)

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};

use super::execute::{
    execute, fence, panicked, run_inline, store_reply, store_status, Inline, Tried,
};
use super::pull::{self, Peers};
use super::read_buffers;
use crate::auth::{self, AuthReader, AuthWriter, Purpose, ServerAuth};
use crate::engine::AsyncReads;
use crate::host::{HostError, ReplicaHost};
use crate::wire::outbound::{OutBatch, BATCH_BYTES};
use crate::wire::{self, Command, FrameCrc, Reply, Request, Status, WireError, REPLY_HEADER_LEN};
use crate::{error_chain, Store};
use strata_net::stopped;

/// Requests per connection decoded but not yet answered on the socket.
pub const MAX_IN_FLIGHT: u32 = 64;
/// Data per connection held by requests not yet answered on the socket.
pub const MAX_IN_FLIGHT_BYTES: usize = 8 << 20;
/// Unit of the byte budget.
const BUDGET_UNIT: usize = 4096;

/// Budget units for `bytes` of data; a request larger than the whole budget
/// takes all of it (and runs alone).
pub(super) fn budget_units(bytes: usize) -> u32 {
    bytes.div_ceil(BUDGET_UNIT).min(BUDGET_UNITS as usize) as u32
}

/// The whole budget, in units.
const BUDGET_UNITS: u32 = (MAX_IN_FLIGHT_BYTES / BUDGET_UNIT) as u32;

/// What a request holds until its reply is on the socket: its place among
/// the requests in flight and its share of the byte budget.
pub(super) struct Permit {
    _request: OwnedSemaphorePermit,
    _bytes: Option<OwnedSemaphorePermit>,
}

impl Permit {
    /// Adds `bytes` to the share this request holds.
    fn hold(&mut self, bytes: OwnedSemaphorePermit) {
        match &mut self._bytes {
            Some(held) => held.merge(bytes),
            None => self._bytes = Some(bytes),
        }
    }
}

/// A reply ready for the writer: its header (crc computed by whoever built
/// it, off the writer's task), its payload, and the request's permit.
struct OutFrame {
    header: [u8; REPLY_HEADER_LEN],
    payload: Bytes,
    _permit: Option<Permit>,
}

impl OutFrame {
    fn new(reply: Reply, crc: FrameCrc, permit: Option<Permit>) -> Self {
        OutFrame {
            header: reply.header_for(crc).encode(),
            payload: reply.payload,
            _permit: permit,
        }
    }
}

/// What a request needs to run on the blocking pool and send its reply.
struct Blocking {
    store: Arc<Store>,
    view: Option<Arc<str>>,
    tx: mpsc::UnboundedSender<OutFrame>,
    crc: FrameCrc,
}

impl Blocking {
    /// Runs `command` on the blocking pool, carrying on from what
    /// [`run_inline`] `tried`, and sends its reply.
    fn run(self, id: u64, epoch: u64, command: Command, tried: Tried, permit: Permit) {
        let Blocking {
            store,
            view,
            tx,
            crc,
        } = self;
        tokio::task::spawn_blocking(move || {
            let reply = std::panic::catch_unwind(AssertUnwindSafe(|| {
                execute(&store, view.as_deref(), id, epoch, command, tried)
            }))
            .unwrap_or_else(|_| panicked(&store, id));
            let _ = tx.send(OutFrame::new(reply, crc, Some(permit)));
        });
    }
}

struct Conn {
    host: Arc<ReplicaHost>,
    peer: String,
    /// Whether this connection's frames carry their payload crc.
    crc: FrameCrc,
    tx: mpsc::UnboundedSender<OutFrame>,
    permits: Arc<Semaphore>,
    /// The byte budget, in [`BUDGET_UNIT`]s.
    bytes: Arc<Semaphore>,
    /// The volume bound by HELLO.
    store: Option<Arc<Store>>,
    /// The snapshot a `volume@snapshot` HELLO bound: the connection then
    /// reads that snapshot and refuses every change.
    view: Option<Arc<str>>,
    /// The volume's name, once bound (a PULL's source is asked for it).
    volume: String,
    /// Connections to the sources of this connection's PULLs.
    peers: Arc<Peers>,
    /// The server's ring for reads that miss the page cache; `None`: they
    /// run on the blocking pool.
    reads: Option<Arc<AsyncReads>>,
}

/// Serves one connection until the peer closes it, it breaks the framing,
/// or shutdown is signalled; then lets the requests in flight finish.
/// With `auth`, the peer must first pass the handshake ([`crate::auth`]);
/// a peer that does not is refused before anything is read or changed.
pub(super) async fn handle(
    mut sock: TcpStream,
    host: Arc<ReplicaHost>,
    auth: Option<Arc<ServerAuth>>,
    reads: Option<Arc<AsyncReads>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let _ = sock.set_nodelay(true);
    let peer = sock.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    let (rd, wr, crc) = match auth {
        None => {
            let (rd, wr) = sock.into_split();
            (
                AuthReader::Plain(rd),
                AuthWriter::Plain(wr),
                FrameCrc::Checked,
            )
        }
        Some(auth) => match authenticate(&mut sock, &auth, &peer).await {
            Some(session) => {
                let (rst, wst) = session.server();
                let (rd, wr) = sock.into_split();
                (
                    AuthReader::Sealed(rd, Box::new(rst)),
                    AuthWriter::Sealed(wr, Box::new(wst)),
                    FrameCrc::of(session.frame_crc()),
                )
            }
            None => return,
        },
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let conn = Conn {
        host,
        peer,
        crc,
        tx,
        permits: Arc::new(Semaphore::new(MAX_IN_FLIGHT as usize)),
        bytes: Arc::new(Semaphore::new(MAX_IN_FLIGHT_BYTES / BUDGET_UNIT)),
        store: None,
        view: None,
        volume: String::new(),
        peers: Arc::default(),
        reads,
    };
    tokio::join!(conn.run(rd, &mut shutdown), write_loop(rx, wr));
}

/// Runs the server handshake, or refuses a peer without the key: a
/// keyless data-wire client gets an error reply to its first request (read
/// only to learn its id, never run), anything else is closed.
async fn authenticate(
    sock: &mut TcpStream,
    auth: &ServerAuth,
    peer: &str,
) -> Option<auth::Session> {
    let mut first = [0u8; wire::REQUEST_HEADER_LEN];
    let n = auth::peek_up_to(sock, &mut first[..6]).await;
    let is_hello = n == 6 && Purpose::of_hello(&first[..6]).is_some();
    if !is_hello {
        let keyless = n >= 4 && wire::u32_at(&first, 0) == wire::REQUEST_MAGIC;
        if keyless {
            let header =
                tokio::time::timeout(auth::HANDSHAKE_TIMEOUT, sock.read_exact(&mut first)).await;
            let id = match header {
                Ok(Ok(_)) => wire::u64_at(&first, 8),
                _ => 0,
            };
            let reply = Reply::error(id, 0, Status::Invalid, auth::KEY_REQUIRED);
            let mut batch = crate::wire::outbound::OutBatch::new();
            batch.push(&reply.header().encode(), reply.payload);
            if batch.write_to(sock).await.is_ok() {
                // Drain what the client sent (its payload), so closing
                // does not reset the connection before it read the reply.
                let _ = sock.shutdown().await;
                let mut sink = [0u8; 4096];
                let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
                    while matches!(sock.read(&mut sink).await, Ok(n) if n > 0) {}
                })
                .await;
            }
            auth::log_refusal(
                &auth.refusals,
                "replica data",
                peer,
                &"a data-wire client without the cluster key",
            );
        } else {
            auth::log_refusal(
                &auth.refusals,
                "replica data",
                peer,
                &"not an authentication handshake",
            );
        }
        return None;
    }
    match auth::server_handshake(sock, &auth.key, Purpose::Data, auth.require_encryption).await {
        Ok(session) => Some(session),
        Err(e) => {
            auth::log_refusal(&auth.refusals, "replica data", peer, &e);
            None
        }
    }
}

/// The most spare capacity a connection's read buffer keeps between
/// frames.
const RETAINED_READ_BUFFER: usize = 1 << 20;

async fn write_loop<W: AsyncWrite + Unpin>(mut rx: mpsc::UnboundedReceiver<OutFrame>, mut wr: W) {
    let mut batch = OutBatch::new();
    let mut held = Vec::with_capacity(MAX_IN_FLIGHT as usize);
    while let Some(frame) = rx.recv().await {
        batch.push(&frame.header, frame.payload);
        held.push(frame._permit);
        while batch.len() < BATCH_BYTES {
            let Ok(frame) = rx.try_recv() else { break };
            batch.push(&frame.header, frame.payload);
            held.push(frame._permit);
        }
        if let Err(e) = batch.write_to(&mut wr).await {
            tracing::debug!(error = %e, "replica data connection: write failed");
            return; // dropping `rx` stops the reader
        }
        held.clear();
    }
    let _ = wr.shutdown().await;
}

impl Conn {
    async fn run<R: AsyncRead + Unpin>(
        mut self,
        mut rd: AuthReader<R>,
        shutdown: &mut watch::Receiver<bool>,
    ) {
        let mut buf = BytesMut::with_capacity(64 * 1024);
        'conn: loop {
            loop {
                // Permits before decoding: a full pipeline stops the reading.
                // The data's share is known once the header is in.
                let data = match wire::RequestHeader::parse(&buf) {
                    Ok(Some(h)) if h.op == wire::Op::Read => h.length as usize,
                    Ok(Some(h)) => h.payload_len(),
                    _ => 0,
                };
                let Ok(request) = self.permits.clone().acquire_owned().await else {
                    break 'conn;
                };
                let bytes = match data {
                    0 => None,
                    n => match self.bytes.clone().acquire_many_owned(budget_units(n)).await {
                        Ok(p) => Some(p),
                        Err(_) => break 'conn,
                    },
                };
                let permit = Permit {
                    _request: request,
                    _bytes: bytes,
                };
                match Request::decode_from_with(&mut buf, self.crc) {
                    Ok(Some(req)) => self.dispatch(req, permit).await,
                    Ok(None) => break,
                    Err(e) if e.frame_len().is_some() => {
                        tracing::debug!(peer = %self.peer, error = %e, "refusing a malformed request");
                        let status = match e {
                            WireError::BadPayloadCrc { .. } => Status::BadPayload,
                            _ => Status::Invalid,
                        };
                        self.reply_error(
                            e.request_id().unwrap_or(0),
                            status,
                            &e.to_string(),
                            permit,
                        );
                    }
                    Err(e) => {
                        tracing::info!(peer = %self.peer, error = %e, "closing a data connection that broke the framing");
                        if let Some(id) = e.request_id() {
                            self.reply_error(id, Status::Invalid, &e.to_string(), permit);
                        }
                        break 'conn;
                    }
                }
            }
            // A large frame grew `buf`; once it is consumed, let the big
            // allocation go (it is freed when the frame's payload is) rather
            // than keeping it for the connection's life.
            if buf.is_empty() && buf.capacity() > RETAINED_READ_BUFFER {
                buf = BytesMut::with_capacity(64 * 1024);
            }
            if buf.capacity() - buf.len() < 4096 {
                buf.reserve(64 * 1024);
            }
            tokio::select! {
                r = rd.read_into(&mut buf) => match r {
                    Ok(0) => {
                        if !buf.is_empty() {
                            tracing::info!(peer = %self.peer, bytes = buf.len(), "data connection closed inside a frame");
                        }
                        break;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::debug!(peer = %self.peer, error = %e, "data connection read failed");
                        break;
                    }
                },
                _ = stopped(shutdown) => break,
                _ = self.tx.closed() => break,
            }
        }
        // Returning drops `self.tx`; the requests in flight hold the other
        // senders, so the writer ends only after their replies went out.
    }

    fn epoch(&self) -> u64 {
        self.store.as_ref().map_or(0, |s| s.epoch())
    }

    fn reply_error(&self, id: u64, status: Status, message: &str, permit: Permit) {
        let reply = Reply::error(id, self.epoch(), status, message);
        let _ = self.tx.send(OutFrame::new(reply, self.crc, Some(permit)));
    }

    async fn dispatch(&mut self, req: Request, permit: Permit) {
        let Request { id, epoch, command } = req;
        match command {
            Command::Hello { volume } => self.hello(id, volume, permit).await,
            // PING needs no volume and does no IO: it is answered at any time
            // and not fenced; the reply carries the replica's epoch (0 before
            // HELLO).
            Command::Ping => {
                let _ = self.tx.send(OutFrame::new(
                    Reply::ok(id, self.epoch()),
                    self.crc,
                    Some(permit),
                ));
            }
            Command::Pull { offset, plan } => {
                let Some(store) = self.store.clone().filter(|_| self.view.is_none()) else {
                    return self.reply_error(
                        id,
                        Status::NotBound,
                        "PULL needs a connection bound to a volume (not a snapshot)",
                        permit,
                    );
                };
                if let Err(reply) = fence(&store, id, epoch) {
                    let _ = self.tx.send(OutFrame::new(reply, self.crc, Some(permit)));
                    return;
                }
                let (tx, crc) = (self.tx.clone(), self.crc);
                let (peers, volume) = (self.peers.clone(), self.volume.clone());
                let budget = self.bytes.clone();
                tokio::spawn(async move {
                    // What it reads from the source is this request's data
                    // (with its plan's, at most the whole budget).
                    let held = budget_units(plan.encoded().len());
                    let units = budget_units(plan.read_len() as usize).min(BUDGET_UNITS - held);
                    let span = budget.acquire_many_owned(units).await;
                    let reply = pull::pull(store, peers, volume, id, epoch, offset, plan).await;
                    drop(span);
                    let _ = tx.send(OutFrame::new(reply, crc, Some(permit)));
                });
            }
            command => {
                let Some(store) = self.store.clone() else {
                    return self.reply_error(
                        id,
                        Status::NotBound,
                        "Send HELLO before data requests",
                        permit,
                    );
                };
                let mut permit = permit;
                if let Command::ReadPieces { pieces, .. } = &command {
                    // Its header told only the list's length; its reply
                    // counts against the budget as a READ's does. Together
                    // with what the list holds, at most the whole budget,
                    // or a read longer than it would wait forever.
                    let held = budget_units(pieces.encoded().len());
                    let units = budget_units(pieces.bytes() as usize).min(BUDGET_UNITS - held);
                    match self.bytes.clone().acquire_many_owned(units).await {
                        Ok(bytes) => permit.hold(bytes),
                        Err(_) => return,
                    }
                }
                let inline = std::panic::catch_unwind(AssertUnwindSafe(|| {
                    run_inline(&store, self.view.as_deref(), id, epoch, command)
                }));
                let (command, tried) = match inline {
                    Ok(Inline::Blocking(command, tried)) => (command, tried),
                    Ok(Inline::Done(reply)) => {
                        let _ = self.tx.send(OutFrame::new(reply, self.crc, Some(permit)));
                        return;
                    }
                    Err(_) => {
                        let reply = panicked(&store, id);
                        let _ = self.tx.send(OutFrame::new(reply, self.crc, Some(permit)));
                        return;
                    }
                };
                let (tx, crc) = (self.tx.clone(), self.crc);
                if let (Some(reads), None, Command::Read { offset, len }, Tried::CacheMissed) =
                    (&self.reads, &self.view, &command, &tried)
                {
                    // Waits for the disk on the ring, not on a thread. Only
                    // reads short enough to try the cache inline: 1 MiB
                    // sequential reads measured 10% slower through the ring
                    // than with a thread's `pread` (BENCHMARKS.md, session 24).
                    let (offset, len) = (*offset, *len);
                    let data = read_buffers::take(len as usize);
                    let reading = store.clone();
                    reading.submit_read(reads, offset, data, move |outcome| match outcome {
                        Ok(data) => {
                            let reply = store_reply(&store, id, Ok(read_buffers::into_bytes(data)));
                            let _ = tx.send(OutFrame::new(reply, crc, Some(permit)));
                        }
                        Err(data) => {
                            read_buffers::give_back(data);
                            let blocking = Blocking {
                                store,
                                view: None,
                                tx,
                                crc,
                            };
                            blocking.run(id, epoch, command, tried, permit);
                        }
                    });
                    return;
                }
                let blocking = Blocking {
                    store,
                    view: self.view.clone(),
                    tx,
                    crc,
                };
                blocking.run(id, epoch, command, tried, permit);
            }
        }
    }

    /// Binds the connection to a volume, or with `volume@snapshot` to a
    /// snapshot of it, read-only. HELLO is not fenced: it binds at any epoch
    /// and its reply tells the controller the replica's epoch; every later
    /// data request is fenced.
    async fn hello(&mut self, id: u64, name: String, permit: Permit) {
        if self.store.is_some() {
            return self.reply_error(
                id,
                Status::Invalid,
                "The connection is already bound to a volume",
                permit,
            );
        }
        let (volume, view) = match name.split_once('@') {
            Some((volume, snapshot)) => (volume.to_string(), Some(snapshot.to_string())),
            None => (name, None),
        };
        let host = self.host.clone();
        let opened = {
            let volume = volume.clone();
            tokio::task::spawn_blocking(move || host.open(&volume)).await
        };
        let reply = match opened {
            Ok(Ok(store)) => match &view {
                Some(snap) if !store.has_snapshot(snap) => Reply::error(
                    id,
                    store.epoch(),
                    Status::Invalid,
                    &format!("No snapshot {snap:?} in this replica"),
                ),
                _ => {
                    let reply = Reply::ok(id, store.epoch());
                    self.store = Some(store);
                    self.volume = volume;
                    self.view = view.map(Arc::from);
                    reply
                }
            },
            Ok(Err(e)) => {
                let status = match &e {
                    e if e.is_not_found() => Status::NoVolume,
                    HostError::InvalidName(_) => Status::Invalid,
                    HostError::Store { source, .. } => store_status(source),
                    _ => Status::IoError,
                };
                Reply::error(id, 0, status, &error_chain(&e))
            }
            Err(_) => Reply::error(
                id,
                0,
                Status::IoError,
                "Internal error: opening the volume panicked",
            ),
        };
        let _ = self.tx.send(OutFrame::new(reply, self.crc, Some(permit)));
    }
}
