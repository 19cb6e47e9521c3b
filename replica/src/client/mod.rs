//! [`ReplicaClient`]: the controller's end of the data wire to one replica.
//!
//! One TCP connection carries many requests at once. A caller's task builds
//! the request header (computing the payload crc itself, so crcs run in
//! parallel), registers a oneshot under the request id and hands header and
//! payload to the connection task's writer through a bounded channel; the
//! writer batches whatever is queued into one vectored write, without
//! copying big payloads. The reader decodes replies (verifying their crc),
//! in whatever order they come, and completes the waiting oneshots by id.
//!
//! Failure is all or nothing: a request that passes its deadline, a replica
//! host that stops acknowledging anything at the TCP level (keepalive
//! keeps a live one talking), a broken or closed connection, or a reply
//! that cannot be framed kills the client.
//! Every pending request then fails (`Timeout` for the one that timed out,
//! `Disconnected` for the others), as does every later call; the controller
//! reconnects with a new client.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::task::AbortHandle;

use crate::auth::{self, AuthError, AuthReader, AuthWriter, ClusterKey, Purpose, WireMode};
use crate::wire::outbound::{OutBatch, BATCH_BYTES};
use crate::wire::{
    self, Command, FrameCrc, PieceList, PullPlan, Reply, Request, Status, MAX_NAME_LEN,
    MAX_PAYLOAD, REQUEST_HEADER_LEN,
};
use crate::AllocationExtent;

mod liveness;
use liveness::{keep_alive, watchdog, watchdog_tick};

/// Requests queued for the writer before callers wait.
const QUEUE: usize = 1024;

/// Everything a [`ReplicaClient`] call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("Connecting to replica {addr} failed")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },

    #[error("Replica request timed out; the connection is closed")]
    Timeout,

    /// The cluster-key handshake failed (wrong key, keyless replica).
    #[error("Replica {addr}: {source}")]
    Auth {
        addr: SocketAddr,
        #[source]
        source: AuthError,
    },

    #[error("The connection to the replica is closed")]
    Disconnected,

    /// The replica answered with an error status.
    #[error("Replica replied {status}: {message}")]
    Replica {
        status: Status,
        message: String,
        /// The replica's epoch when it replied.
        epoch: u64,
    },

    /// A reply that was framed correctly but is wrong (payload crc mismatch,
    /// wrong length, bad extents). Only this request fails.
    #[error("Malformed reply from the replica: {0}")]
    BadReply(String),

    /// The request cannot be sent (too long a payload or name).
    #[error("Invalid request: {0}")]
    Invalid(&'static str),
}

impl ClientError {
    /// The status of a replica error reply.
    pub fn status(&self) -> Option<Status> {
        match self {
            ClientError::Replica { status, .. } => Some(*status),
            _ => None,
        }
    }
}

type Waiter = oneshot::Sender<Result<Reply, ClientError>>;

struct Waiting {
    waiter: Waiter,
    sent: Instant,
    deadline: Instant,
}

#[derive(Default)]
struct Pending {
    /// Request id -> who waits for the reply, when it was sent, and until
    /// when it may take.
    waiters: HashMap<u64, Waiting>,
    closed: bool,
}

struct Shared {
    pending: Mutex<Pending>,
    /// For log lines.
    addr: SocketAddr,
    volume: String,
    /// The replica runs on this host (see [`ReplicaClient::is_local`]).
    local: bool,
    closed: AtomicBool,
    replica_epoch: AtomicU64,
    task: OnceLock<AbortHandle>,
    /// Whether this connection's frames carry their payload crc.
    crc: FrameCrc,
}

/// A write's payload crc32, computed at most once for all the replicas
/// the write goes to, and not at all when none of their connections
/// carries crcs ([`FrameCrc`]).
#[derive(Clone, Default)]
pub struct SharedCrc(Arc<OnceLock<u32>>);

impl SharedCrc {
    fn get(&self, data: &[u8]) -> u32 {
        *self.0.get_or_init(|| crc32fast::hash(data))
    }
}

impl Shared {
    /// Marks the client dead, fails every pending request with
    /// `Disconnected` and stops the connection task.
    fn kill(&self) {
        self.closed.store(true, Ordering::Release);
        let waiters = {
            let mut p = self.pending.lock();
            p.closed = true;
            std::mem::take(&mut p.waiters)
        };
        for (_, w) in waiters {
            let _ = w.waiter.send(Err(ClientError::Disconnected));
        }
        if let Some(task) = self.task.get() {
            task.abort();
        }
    }

    /// Kills the client; request `id` fails with `Timeout`, every other one
    /// with `Disconnected`. The client is closed before anyone hears.
    fn time_out(&self, id: u64) {
        let timed_out = self.pending.lock().waiters.remove(&id);
        self.kill();
        if let Some(w) = timed_out {
            let _ = w.waiter.send(Err(ClientError::Timeout));
        }
    }

    fn complete(&self, id: u64, result: Result<Reply, ClientError>) -> bool {
        let waiter = self.pending.lock().waiters.remove(&id);
        match waiter {
            Some(w) => {
                let _ = w.waiter.send(result);
                true
            }
            None => false,
        }
    }
}

/// True if both ends of `sock` are on this host.
fn is_same_host(sock: &TcpStream) -> bool {
    match (sock.local_addr(), sock.peer_addr()) {
        (Ok(local), Ok(peer)) => peer.ip().is_loopback() || local.ip() == peer.ip(),
        _ => false,
    }
}

struct OutFrame {
    header: [u8; REQUEST_HEADER_LEN],
    payload: Bytes,
}

/// Flushes, FUA writes and snapshots get this many times the request
/// timeout (see `call`).
pub const DURABLE_TIMEOUT_FACTOR: u32 = 6;

/// A pipelined data connection to one replica, bound to one volume. Share
/// it between tasks behind an `Arc`; dropping it closes the connection.
pub struct ReplicaClient {
    shared: Arc<Shared>,
    tx: mpsc::Sender<OutFrame>,
    next_id: AtomicU64,
    epoch: AtomicU64,
    timeout: Duration,
}

impl std::fmt::Debug for ReplicaClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaClient")
            .field("addr", &self.shared.addr)
            .field("volume", &self.shared.volume)
            .field("closed", &self.is_closed())
            .finish_non_exhaustive()
    }
}

impl Drop for ReplicaClient {
    fn drop(&mut self) {
        self.shared.kill();
    }
}

impl ReplicaClient {
    /// Connects to the replica at `addr` and binds the connection to
    /// `volume` (HELLO). `epoch` is sent with every request; `timeout` is the
    /// deadline of the connect and of every request. The connection proves
    /// the process's cluster key ([`auth::process_key`]) if it has one.
    pub async fn connect(
        addr: SocketAddr,
        volume: &str,
        epoch: u64,
        timeout: Duration,
    ) -> Result<ReplicaClient, ClientError> {
        Self::connect_with(addr, volume, epoch, timeout, auth::process_key()).await
    }

    /// [`ReplicaClient::connect`] with an explicit key (`None`: keyless);
    /// a keyed connection asks for the process's record mode
    /// ([`auth::process_wire_mode`]).
    pub async fn connect_with(
        addr: SocketAddr,
        volume: &str,
        epoch: u64,
        timeout: Duration,
        key: Option<&ClusterKey>,
    ) -> Result<ReplicaClient, ClientError> {
        let key = key.map(|k| (k, auth::process_wire_mode()));
        Self::connect_with_mode(addr, volume, epoch, timeout, key).await
    }

    /// [`ReplicaClient::connect_with`] with an explicit record mode: with
    /// [`WireMode::Encrypted`] a replica that does not grant it is refused
    /// ([`auth::AuthError::EncryptionUnsupported`]).
    pub async fn connect_with_mode(
        addr: SocketAddr,
        volume: &str,
        epoch: u64,
        timeout: Duration,
        key: Option<(&ClusterKey, WireMode)>,
    ) -> Result<ReplicaClient, ClientError> {
        if volume.len() > MAX_NAME_LEN {
            return Err(ClientError::Invalid("volume name longer than 255 bytes"));
        }
        let sock = tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| ClientError::Timeout)?
            .map_err(|source| ClientError::Connect { addr, source })?;
        let _ = sock.set_nodelay(true);
        if let Err(e) = keep_alive(&sock, timeout) {
            tracing::warn!(%addr, "cannot set TCP keepalive on a replica connection: {e}");
        }
        let local = is_same_host(&sock);
        let mut sock = sock;
        let (rd, wr, crc) = match key {
            None => {
                let (rd, wr) = sock.into_split();
                (
                    AuthReader::Plain(rd),
                    AuthWriter::Plain(wr),
                    FrameCrc::Checked,
                )
            }
            Some((key, mode)) => {
                let session = auth::client_handshake(&mut sock, key, Purpose::Data, mode)
                    .await
                    .map_err(|source| ClientError::Auth { addr, source })?;
                let (rst, wst) = session.client();
                let (rd, wr) = sock.into_split();
                (
                    AuthReader::Sealed(rd, Box::new(rst)),
                    AuthWriter::Sealed(wr, Box::new(wst)),
                    FrameCrc::of(session.frame_crc()),
                )
            }
        };
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending::default()),
            addr,
            volume: volume.to_string(),
            local,
            closed: AtomicBool::new(false),
            replica_epoch: AtomicU64::new(0),
            task: OnceLock::new(),
            crc,
        });
        let (tx, rx) = mpsc::channel(QUEUE);
        let task = tokio::spawn({
            let shared = shared.clone();
            let tick = watchdog_tick(timeout);
            // Valid while `rd` and `wr` live, which is as long as the
            // watchdog runs (all three in this task).
            let fd = match &rd {
                AuthReader::Plain(r) | AuthReader::Sealed(r, _) => {
                    std::os::fd::AsRawFd::as_raw_fd(r.as_ref())
                }
            };
            async move {
                tokio::join!(
                    read_loop(&shared, rd),
                    write_loop(&shared, rx, wr),
                    watchdog(&shared, tick, timeout, fd)
                );
            }
        });
        let _ = shared.task.set(task.abort_handle());
        let client = ReplicaClient {
            shared,
            tx,
            next_id: AtomicU64::new(1),
            epoch: AtomicU64::new(epoch),
            timeout,
        };
        client
            .call(Command::Hello {
                volume: volume.to_string(),
            })
            .await?;
        Ok(client)
    }

    /// Connects to snapshot `snapshot` of `volume`, read-only: READ and
    /// BLOCK_STATUS see the snapshot, every change is refused.
    pub async fn connect_snapshot(
        addr: SocketAddr,
        volume: &str,
        snapshot: &str,
        epoch: u64,
        timeout: Duration,
    ) -> Result<ReplicaClient, ClientError> {
        Self::connect(addr, &format!("{volume}@{snapshot}"), epoch, timeout).await
    }

    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    pub fn volume(&self) -> &str {
        &self.shared.volume
    }

    /// True if the replica runs on this host: the connection is over
    /// loopback, or its two ends have the same address. (Pods with their own
    /// network namespace on one node look remote.)
    pub fn is_local(&self) -> bool {
        self.shared.local
    }

    /// True once the client is dead (timeout, disconnect); every call fails.
    pub fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::Acquire)
    }

    /// The epoch sent with requests.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Relaxed)
    }

    /// Changes the epoch sent with later requests (after the controller set
    /// a new one on the replica through the control API).
    pub fn set_epoch(&self, epoch: u64) {
        self.epoch.store(epoch, Ordering::Relaxed);
    }

    /// The replica's epoch as of the latest reply.
    pub fn replica_epoch(&self) -> u64 {
        self.shared.replica_epoch.load(Ordering::Relaxed)
    }

    /// Reads `len` bytes at `offset` (both multiples of 4096; `len` at most
    /// 32 MiB). The reply's payload crc is verified.
    pub async fn read(&self, offset: u64, len: u32) -> Result<Bytes, ClientError> {
        self.read_as(Command::Read { offset, len }, offset, len)
            .await
    }

    /// [`ReplicaClient::read`] for a copy: the replica drops the pages the
    /// read brought into its page cache ([`Command::ReadForCopy`]). A
    /// replica older than the flag refuses it as INVALID.
    pub async fn read_for_copy(&self, offset: u64, len: u32) -> Result<Bytes, ClientError> {
        self.read_as(Command::ReadForCopy { offset, len }, offset, len)
            .await
    }

    /// Reads several ranges in one request ([`Command::ReadPieces`]): their
    /// bytes back to back, in the list's order. With `for_copy`, as
    /// [`ReplicaClient::read_for_copy`]. A replica older than READ_PIECES
    /// cannot frame the request and closes the connection; ask only one
    /// whose status says `reads_pieces`.
    pub async fn read_pieces(
        &self,
        pieces: PieceList,
        for_copy: bool,
    ) -> Result<Bytes, ClientError> {
        let (offset, len) = (pieces.offset(), pieces.bytes());
        self.read_as(Command::ReadPieces { pieces, for_copy }, offset, len)
            .await
    }

    /// Sends `command`, a read of `len` bytes at `offset`, and checks the
    /// reply's length.
    async fn read_as(&self, command: Command, offset: u64, len: u32) -> Result<Bytes, ClientError> {
        if len > MAX_PAYLOAD {
            return Err(ClientError::Invalid("READ longer than 32 MiB"));
        }
        let reply = self.call(command).await?;
        if reply.payload.len() != len as usize {
            return Err(ClientError::BadReply(format!(
                "READ of {len} bytes at offset {offset} returned {} bytes",
                reply.payload.len()
            )));
        }
        Ok(reply.payload)
    }

    /// Asks this (syncing) replica to copy a range from a peer itself
    /// ([`PullPlan`]; `offset` is where the plan's span starts). Returns
    /// when the pieces are written here. A source the replica could not
    /// reach or read is [`Status::PeerFailed`], with nothing written.
    pub async fn pull(&self, offset: u64, plan: PullPlan) -> Result<(), ClientError> {
        self.call(Command::Pull { offset, plan }).await.map(drop)
    }

    /// Writes `data` at `offset`; with `fua` it is durable before the reply.
    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), ClientError> {
        let crc = self.shared.crc.compute(&data);
        self.write_with_crc(offset, data, crc, fua).await
    }

    /// [`ReplicaClient::write`] of a payload that goes to several replicas:
    /// its crc is computed once, by the first whose connection carries
    /// crcs.
    pub async fn write_shared(
        &self,
        offset: u64,
        data: Bytes,
        crc: &SharedCrc,
        fua: bool,
    ) -> Result<(), ClientError> {
        let crc = match self.shared.crc {
            FrameCrc::Checked => crc.get(&data),
            FrameCrc::Absent => 0,
        };
        self.write_with_crc(offset, data, crc, fua).await
    }

    /// [`ReplicaClient::write`] with the payload's crc32 given. A wrong
    /// `crc` makes the replica refuse the write as corrupt in transit
    /// (unless the connection's frames carry no crc, [`FrameCrc`]).
    pub async fn write_with_crc(
        &self,
        offset: u64,
        data: Bytes,
        crc: u32,
        fua: bool,
    ) -> Result<(), ClientError> {
        if data.len() > MAX_PAYLOAD as usize {
            return Err(ClientError::Invalid("WRITE longer than 32 MiB"));
        }
        self.call_with_crc(Command::Write { offset, data, fua }, Some(crc))
            .await
            .map(drop)
    }

    /// Makes every write acknowledged before the call durable.
    pub async fn flush(&self) -> Result<(), ClientError> {
        self.call(Command::Flush).await.map(drop)
    }

    pub async fn trim(&self, offset: u64, len: u32) -> Result<(), ClientError> {
        self.call(Command::Trim { offset, len }).await.map(drop)
    }

    /// Zeroes a range; with `no_hole` it stays allocated.
    pub async fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        no_hole: bool,
    ) -> Result<(), ClientError> {
        self.call(Command::WriteZeroes {
            offset,
            len,
            no_hole,
        })
        .await
        .map(drop)
    }

    /// Data and hole extents covering `[offset, offset + len)`.
    pub async fn block_status(
        &self,
        offset: u64,
        len: u32,
    ) -> Result<Vec<AllocationExtent>, ClientError> {
        let reply = self.call(Command::BlockStatus { offset, len }).await?;
        wire::decode_extents(&reply.payload).ok_or_else(|| {
            ClientError::BadReply(format!(
                "malformed BLOCK_STATUS payload of {} bytes",
                reply.payload.len()
            ))
        })
    }

    pub async fn snapshot(&self, name: &str) -> Result<(), ClientError> {
        if name.len() > MAX_NAME_LEN {
            return Err(ClientError::Invalid("snapshot name longer than 255 bytes"));
        }
        self.call(Command::Snapshot {
            name: name.to_string(),
        })
        .await
        .map(drop)
    }

    pub async fn ping(&self) -> Result<(), ClientError> {
        self.call(Command::Ping).await.map(drop)
    }

    /// Sends one request and waits for its reply; an error status becomes
    /// [`ClientError::Replica`].
    async fn call(&self, command: Command) -> Result<Reply, ClientError> {
        self.call_with_crc(command, None).await
    }

    /// [`ReplicaClient::call`]; `crc`, when given, is the payload's crc32
    /// (else it is computed here).
    async fn call_with_crc(
        &self,
        command: Command,
        crc: Option<u32>,
    ) -> Result<Reply, ClientError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let request = Request {
            id,
            epoch: self.epoch(),
            command,
        };
        // A flush (or a FUA write, or a snapshot, which flushes) waits for
        // the replica's fdatasync of everything written since the last
        // one: under a heavy write load that takes far longer than one
        // request, and must not fault a healthy replica.
        let durable = matches!(
            request.command,
            Command::Flush | Command::Snapshot { .. } | Command::Write { fua: true, .. }
        );
        let deadline = if durable {
            self.timeout * DURABLE_TIMEOUT_FACTOR
        } else {
            self.timeout
        };
        let crc = crc.unwrap_or_else(|| self.shared.crc.compute(request.command.payload()));
        let header = request.header_with_crc(crc).encode();
        let payload = match request.command {
            Command::Write { data, .. } => data,
            Command::Hello { volume: name } | Command::Snapshot { name } => Bytes::from(name),
            Command::Pull { plan, .. } => plan.encoded().clone(),
            Command::ReadPieces { pieces, .. } => pieces.encoded().clone(),
            _ => Bytes::new(),
        };
        let (waiter, done) = oneshot::channel();
        {
            let mut p = self.shared.pending.lock();
            if p.closed {
                return Err(ClientError::Disconnected);
            }
            let sent = Instant::now();
            p.waiters.insert(
                id,
                Waiting {
                    waiter,
                    sent,
                    deadline: sent + deadline,
                },
            );
        }
        // No timer per request: the connection's watchdog fails whatever
        // passes its deadline (see `watchdog`).
        self.tx
            .send(OutFrame { header, payload })
            .await
            .map_err(|_| ClientError::Disconnected)?;
        let reply = done.await.map_err(|_| ClientError::Disconnected)??;
        if reply.status == Status::Ok {
            Ok(reply)
        } else {
            Err(ClientError::Replica {
                status: reply.status,
                message: reply.message(),
                epoch: reply.epoch,
            })
        }
    }
}

async fn write_loop<W: AsyncWrite + Unpin>(
    shared: &Shared,
    mut rx: mpsc::Receiver<OutFrame>,
    mut wr: W,
) {
    let mut batch = OutBatch::new();
    while let Some(frame) = rx.recv().await {
        batch.push(&frame.header, frame.payload);
        while batch.len() < BATCH_BYTES {
            let Ok(frame) = rx.try_recv() else { break };
            batch.push(&frame.header, frame.payload);
        }
        if let Err(e) = batch.write_to(&mut wr).await {
            tracing::debug!(error = %e, "replica connection: write failed");
            shared.kill();
            return;
        }
    }
    let _ = wr.shutdown().await;
}

async fn read_loop<R: AsyncRead + Unpin>(shared: &Shared, mut rd: AuthReader<R>) {
    let mut buf = BytesMut::with_capacity(64 * 1024);
    loop {
        loop {
            match Reply::decode_from_with(&mut buf, shared.crc) {
                Ok(Some(reply)) => {
                    shared.replica_epoch.store(reply.epoch, Ordering::Relaxed);
                    let id = reply.id;
                    if !shared.complete(id, Ok(reply)) {
                        tracing::warn!(
                            request = id,
                            "reply to no pending request; closing the connection"
                        );
                        return shared.kill();
                    }
                }
                Ok(None) => break,
                Err(e) if e.frame_len().is_some() => {
                    let id = e.request_id().unwrap_or(0);
                    shared.complete(id, Err(ClientError::BadReply(e.to_string())));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "unframeable reply; closing the connection");
                    return shared.kill();
                }
            }
        }
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(64 * 1024);
        }
        match rd.read_into(&mut buf).await {
            Ok(0) => return shared.kill(),
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(error = %e, "replica connection: read failed");
                return shared.kill();
            }
        }
    }
}
