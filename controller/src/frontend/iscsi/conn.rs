//! The full feature phase of one connection (one session: this target
//! negotiates MaxConnections=1).
//!
//! One reader parses PDUs in order and dispatches them: SCSI commands go
//! through the command [`Window`], are parsed and checked, collect their
//! Data-Out ([`PendingWrite`], R2Ts), then run as spawned tasks
//! ([`task::run`]); NOP-Out, task management, text (SendTargets) and
//! logout are answered here. One writer task sends every target PDU in
//! queue order and stamps StatSN, ExpCmdSN and MaxCmdSN as it sends.
//! Memory is bounded: data segments by the declared
//! MaxRecvDataSegmentLength, a write's buffer by the LUN's maximum
//! transfer length (checked before it is allocated), the data of all
//! commands by [`BUDGET_BYTES`] (beyond it: TASK SET FULL), and the number
//! of commands by the window and [`MAX_TASKS`].
//!
//! When the initiator is silent for the ping interval, the target sends a
//! NOP-In ping; no PDU at all within another interval closes the
//! connection.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::dataout::PendingWrite;
use super::error::ConnError;
use super::login::{Params, SessionType, TargetConfig};
use super::pdu::*;
use super::task::{self, Refusal, TaskCtl, TaskCtx, Tasks, TASK_SET_FULL};
use super::text::{encode_text, parse_text};
use super::window::{Admit, Window};
use crate::frontend::scsi::cdb::{self, Command};
use crate::frontend::scsi::lun::Lun;
use crate::frontend::scsi::pages::BLOCK;
use crate::frontend::scsi::sense::Sense;
use crate::frontend::Backend;

/// Command window size (commands admitted and not yet answered).
pub const WINDOW: u32 = 32;
/// Tasks (running or waiting for data) at once, immediate ones included.
pub const MAX_TASKS: usize = 64;
/// Target PDUs queued for the writer.
const OUT_QUEUE: usize = 256;

/// Per-connection settings that are not negotiated.
#[derive(Debug, Clone, Copy)]
pub struct ConnOptions {
    /// Silence before the target pings; as long again without any PDU
    /// closes the connection.
    pub ping_interval: Duration,
}

impl Default for ConnOptions {
    fn default() -> Self {
        ConnOptions {
            ping_interval: Duration::from_secs(30),
        }
    }
}

/// One complete PDU read from the stream.
pub struct Frame {
    pub bhs: [u8; BHS_LEN],
    pub ahs: Vec<u8>,
    pub data: Bytes,
}

/// Reads the next PDU; `Ok(None)` on a clean EOF between PDUs.
pub async fn read_frame<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    digests: Digests,
    max_data: u32,
) -> Result<Option<Frame>, ConnError> {
    loop {
        match check_frame(buf, digests, max_data) {
            Ok(Some(f)) => {
                let pdu = buf.split_to(f.total).freeze();
                let mut bhs = [0u8; BHS_LEN];
                bhs.copy_from_slice(&pdu[..BHS_LEN]);
                let ahs = pdu[BHS_LEN..BHS_LEN + f.ahs_len].to_vec();
                let data = pdu.slice(f.data_start..f.data_start + f.data_len);
                return Ok(Some(Frame { bhs, ahs, data }));
            }
            Ok(None) => {}
            Err(PduError::DataDigest) => return Err(ConnError::DataDigest(buf[0] & 0x3f)),
            Err(e) => return Err(e.into()),
        }
        if buf.capacity() - buf.len() < 16 * 1024 {
            buf.reserve(64 * 1024);
        }
        if rd.read_buf(buf).await? == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(ConnError::Truncated)
            };
        }
    }
}

/// Sends target PDUs in queue order, stamping sequence numbers.
pub async fn write_pdus<W: AsyncWrite + Unpin>(
    wr: W,
    mut rx: mpsc::Receiver<OutPdu>,
    window: Arc<Mutex<Window>>,
    mut statsn: u32,
    digests: Digests,
) -> std::io::Result<()> {
    let mut w = BufWriter::with_capacity(256 * 1024, wr);
    let mut out = Vec::with_capacity(64 * 1024);
    while let Some(mut p) = rx.recv().await {
        let stat = match p.seq {
            Seq::Status => {
                statsn = statsn.wrapping_add(1);
                Some(statsn.wrapping_sub(1))
            }
            Seq::Peek => Some(statsn),
            Seq::Window => None,
        };
        {
            let win = window.lock();
            stamp_seq(&mut p.bhs, stat, win.exp_cmdsn(), win.max_cmdsn());
        }
        out.clear();
        encode(&mut out, &p.bhs, &p.data, digests);
        w.write_all(&out).await?;
        if rx.is_empty() {
            w.flush().await?;
        }
    }
    w.flush().await?;
    w.shutdown().await
}

struct Conn<B> {
    lun: Arc<Lun<B>>,
    cfg: Arc<TargetConfig>,
    local: SocketAddr,
    session_type: SessionType,
    params: Params,
    window: Arc<Mutex<Window>>,
    tx: mpsc::Sender<OutPdu>,
    tasks: Tasks,
    /// Writes waiting for Data-Out, by ITT.
    pending: HashMap<u32, Waiting>,
    /// Recently aborted writes whose Data-Out may still arrive.
    aborted: VecDeque<u32>,
    slots: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
    running: JoinSet<()>,
    next_ttt: u32,
    known_blocks: u64,
}

/// A write command waiting for its Data-Out.
struct Waiting {
    write: PendingWrite,
    ctx: TaskCtx,
    /// The command to run, or why it fails once its data is taken.
    plan: Result<Command, Refusal>,
    permits: Permits,
}

/// A task slot and the data budget a command holds until it answers.
type Permits = (OwnedSemaphorePermit, Option<OwnedSemaphorePermit>);

/// Bytes of command data (Data-Out buffers and Data-In) held at once on
/// one connection; a command that does not fit gets TASK SET FULL.
pub const BUDGET_BYTES: u64 = 64 << 20;
const BUDGET_UNIT: usize = 4096;

/// Data a command holds while it runs.
fn cost(c: &Command) -> u64 {
    let b = |n: u32| n as u64 * BLOCK;
    match *c {
        Command::Read { blocks, .. } => b(blocks),
        Command::Write { blocks, .. } => b(blocks),
        Command::WriteVerify { blocks, .. } => 2 * b(blocks),
        Command::Verify { blocks, .. } => 2 * b(blocks),
        Command::CompareAndWrite { blocks, .. } => 3 * b(blocks),
        Command::OrWrite { blocks, .. } => 2 * b(blocks),
        Command::WriteSame { .. } => {
            b(crate::frontend::scsi::pages::LIMITS.optimal_transfer) + BLOCK
        }
        _ => 64 * 1024,
    }
}

/// What the reader does after a PDU.
enum Next {
    Go,
    /// Logout answered: stop.
    Stop,
}

/// Runs the full feature phase until logout, EOF, an error, `shutdown` or
/// `kill` (session reinstatement). `buf` holds bytes read past login.
#[allow(clippy::too_many_arguments)]
pub async fn full_feature<R, W, B>(
    mut rd: R,
    wr: W,
    mut buf: BytesMut,
    lun: Arc<Lun<B>>,
    cfg: Arc<TargetConfig>,
    local: SocketAddr,
    session_type: SessionType,
    params: Params,
    first_cmdsn: u32,
    statsn: u32,
    opts: ConnOptions,
    mut shutdown: watch::Receiver<bool>,
    mut kill: watch::Receiver<bool>,
) -> Result<(), ConnError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
    B: Backend,
{
    let digests = Digests {
        header: params.header_digest,
        data: params.data_digest,
    };
    let window = Arc::new(Mutex::new(Window::new(first_cmdsn, WINDOW)));
    let (tx, rx) = mpsc::channel(OUT_QUEUE);
    let writer = tokio::spawn(write_pdus(wr, rx, window.clone(), statsn, digests));
    let known_blocks = lun.blocks();
    let mut c = Conn {
        lun,
        cfg,
        local,
        session_type,
        params,
        window,
        tx,
        tasks: Tasks::default(),
        pending: HashMap::new(),
        aborted: VecDeque::new(),
        slots: Arc::new(Semaphore::new(MAX_TASKS)),
        bytes: Arc::new(Semaphore::new(BUDGET_BYTES as usize / BUDGET_UNIT)),
        running: JoinSet::new(),
        next_ttt: 0,
        known_blocks,
    };
    let mut last_rx = Instant::now();
    let mut pinged = false;
    let result = loop {
        let deadline = last_rx + opts.ping_interval * if pinged { 2 } else { 1 };
        let frame = tokio::select! {
            r = read_frame(&mut rd, &mut buf, digests, params.recv_max) => r,
            _ = tokio::time::sleep_until(deadline) => {
                if pinged {
                    break Err(ConnError::PingTimeout(opts.ping_interval));
                }
                pinged = true;
                let ttt = c.ttt();
                let _ = c.tx.send(nop_in(RESERVED_TAG, ttt, [0; 8], Bytes::new())).await;
                continue;
            }
            _ = strata_net::stopped(&mut shutdown) => break Ok(()),
            _ = strata_net::stopped(&mut kill) => break Ok(()),
        };
        let frame = match frame {
            Ok(Some(f)) => f,
            Ok(None) => break Ok(()),
            Err(ConnError::DataDigest(op)) => {
                // ERL 0: reject what we cannot trust and drop the connection.
                let mut bhs = [0u8; BHS_LEN];
                bhs[0] = op;
                let _ = c.tx.send(reject(REJECT_DATA_DIGEST, &bhs)).await;
                break Err(ConnError::DataDigest(op));
            }
            Err(e) => break Err(e),
        };
        last_rx = Instant::now();
        pinged = false;
        while c.running.try_join_next().is_some() {}
        match c.dispatch(frame).await {
            Ok(Next::Go) => {}
            Ok(Next::Stop) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    // Writes still waiting for data will not get it: drop them.
    for (_, Waiting { ctx, .. }) in c.pending.drain() {
        ctx.ctl.abort();
        if ctx.slot {
            c.window.lock().done();
        }
        c.tasks.lock().remove(&ctx.itt);
    }
    while c.running.join_next().await.is_some() {}
    drop(c);
    let written = writer.await;
    result?;
    match written {
        Ok(r) => r.map_err(ConnError::Io),
        Err(e) => Err(ConnError::Io(std::io::Error::other(e))),
    }
}

impl<B: Backend> Conn<B> {
    fn ttt(&mut self) -> u32 {
        self.next_ttt = self.next_ttt.wrapping_add(1);
        if self.next_ttt == RESERVED_TAG {
            self.next_ttt = 1;
        }
        self.next_ttt
    }

    fn admit(&self, cmdsn: u32, immediate: bool) -> Admit {
        self.window.lock().admit(cmdsn, immediate)
    }

    fn release(&self, admit: Admit) {
        if admit == Admit::Slot {
            self.window.lock().done();
        }
    }

    async fn send(&self, pdu: OutPdu) {
        let _ = self.tx.send(pdu).await;
    }

    async fn dispatch(&mut self, f: Frame) -> Result<Next, ConnError> {
        let req = parse_request(&f.bhs, &f.ahs, f.data)?;
        match req {
            Request::Scsi(cmd) => self.scsi(cmd, &f.bhs).await?,
            Request::DataOut(d) => self.data_out(d, &f.bhs).await?,
            Request::NopOut {
                immediate,
                lun,
                itt,
                cmdsn,
                data,
                ..
            } => {
                let admit = self.admit(cmdsn, immediate);
                if admit == Admit::Ignore {
                    return Ok(Next::Go);
                }
                self.release(admit);
                if itt != RESERVED_TAG {
                    let n = data.len().min(self.params.send_max as usize);
                    self.send(nop_in(itt, RESERVED_TAG, lun, data.slice(..n)))
                        .await;
                }
            }
            Request::TaskMgmt {
                immediate,
                function,
                lun,
                itt,
                rtt,
                cmdsn,
                ..
            } => {
                let admit = self.admit(cmdsn, immediate);
                if admit != Admit::Ignore {
                    self.task_mgmt(admit, function, lun, itt, rtt).await;
                }
            }
            Request::Text(t) => {
                let admit = self.admit(t.cmdsn, t.immediate);
                if admit != Admit::Ignore {
                    self.release(admit);
                    let data = self.text_answer(&t);
                    self.send(text_response(t.itt, data)).await;
                }
            }
            Request::Logout {
                immediate,
                reason,
                itt,
                cmdsn,
                ..
            } => {
                let admit = self.admit(cmdsn, immediate);
                if admit == Admit::Ignore {
                    return Ok(Next::Go);
                }
                // Let running commands answer first.
                while self.running.join_next().await.is_some() {}
                self.release(admit);
                // Reason 2 (remove the connection for recovery) needs ERL 2.
                let response = if reason == 2 { 2 } else { 0 };
                self.send(logout_response(itt, response)).await;
                return Ok(Next::Stop);
            }
            Request::Login(_) => {
                self.send(reject(REJECT_PROTOCOL, &f.bhs)).await;
                return Err(ConnError::Protocol(
                    "Login request in the full feature phase".into(),
                ));
            }
            Request::Snack { .. } => self.send(reject(REJECT_SNACK, &f.bhs)).await,
            Request::Unknown { .. } => self.send(reject(REJECT_NOT_SUPPORTED, &f.bhs)).await,
        }
        Ok(Next::Go)
    }

    fn text_answer(&self, t: &TextRequest) -> Bytes {
        let pairs = match parse_text(&t.data) {
            Ok(p) => p,
            Err(_) => return Bytes::new(),
        };
        let mut out = Vec::new();
        for (k, v) in &pairs {
            if k == "SendTargets" {
                let name = &self.cfg.target_name;
                let wanted = v == "All" || v.is_empty() || v == name;
                if wanted {
                    out.push(("TargetName".to_string(), name.clone()));
                    let addr = match self.local {
                        SocketAddr::V4(a) => format!("{}:{},1", a.ip(), a.port()),
                        SocketAddr::V6(a) => format!("[{}]:{},1", a.ip(), a.port()),
                    };
                    out.push(("TargetAddress".to_string(), addr));
                }
            } else {
                out.push((k.clone(), "NotUnderstood".to_string()));
            }
        }
        Bytes::from(encode_text(&out))
    }

    /// A task context for a command; registers it so TMFs find it.
    fn new_task(&self, itt: u32, lun: [u8; 8], edtl: u32, read: bool, admit: Admit) -> TaskCtx {
        let (ctl, done) = TaskCtl::new();
        self.tasks.lock().insert(itt, ctl.clone());
        TaskCtx {
            itt,
            lun,
            edtl,
            read,
            slot: admit == Admit::Slot,
            r2ts: 0,
            residual: Residual::default(),
            params: self.params,
            tx: self.tx.clone(),
            window: self.window.clone(),
            ctl,
            done,
            tasks: self.tasks.clone(),
        }
    }

    /// Parses and checks a command; `Err` is the sense to answer with.
    fn plan(&mut self, cmd: &ScsiCommand) -> Result<Command, Sense> {
        let parsed = cdb::parse(&cmd.cdb);
        if cmd.lun != [0; 8] {
            return match parsed {
                Ok(Command::ReportLuns { alloc }) => Ok(Command::ReportLuns { alloc }),
                _ => Err(Sense::LUN_NOT_SUPPORTED),
            };
        }
        let c = parsed?;
        if let Some(ua) = self.lun.unit_attention(&c, &mut self.known_blocks) {
            return Err(ua);
        }
        self.lun.check(&c)?;
        Ok(c)
    }

    async fn scsi(&mut self, cmd: ScsiCommand, bhs: &[u8; BHS_LEN]) -> Result<(), ConnError> {
        let admit = self.admit(cmd.cmdsn, cmd.immediate);
        if admit == Admit::Ignore {
            return Ok(());
        }
        if self.session_type == SessionType::Discovery {
            self.release(admit);
            self.send(reject(REJECT_PROTOCOL, bhs)).await;
            return Ok(());
        }
        if self.tasks.lock().contains_key(&cmd.itt) {
            self.release(admit);
            self.send(reject(REJECT_INVALID_FIELD, bhs)).await;
            return Ok(());
        }
        let Ok(slot) = self.slots.clone().try_acquire_owned() else {
            // More tasks than MAX_TASKS: only immediate commands can get here.
            self.release(admit);
            self.send(scsi_response(
                cmd.itt,
                TASK_SET_FULL,
                None,
                Residual::default(),
                0,
            ))
            .await;
            return Ok(());
        };
        let mut plan = self
            .plan(&cmd)
            .map_err(|s| Refusal::Check(s, Residual::default()));
        let out_len = plan.as_ref().map(|c| c.data_out_len(BLOCK)).unwrap_or(0);
        // Data held for the command (its Data-Out and Data-In); refused
        // with TASK SET FULL rather than waited for, since waiting here
        // would stop the Data-Out that lets other writes finish.
        let mut bytes = None;
        if let Ok(c) = &plan {
            let units = (cost(c).min(BUDGET_BYTES) as usize).div_ceil(BUDGET_UNIT) as u32;
            match self.bytes.clone().try_acquire_many_owned(units) {
                Ok(p) => bytes = Some(p),
                Err(_) => plan = Err(Refusal::Busy),
            }
        }
        let permits = (slot, bytes);
        let mut ctx = self.new_task(cmd.itt, cmd.lun, cmd.edtl, cmd.read, admit);
        if !cmd.write && out_len == 0 {
            if !cmd.data.is_empty() {
                return Err(ConnError::Protocol(
                    "immediate data on a command without W".into(),
                ));
            }
            match plan {
                Ok(c) => {
                    let lun = self.lun.clone();
                    self.running.spawn(async move {
                        task::run(lun, c, Bytes::new(), ctx).await;
                        drop(permits);
                    });
                }
                Err(r) => ctx.fail(r).await,
            }
            return Ok(());
        }
        // A command with Data-Out. A READ/WRITE whose EDTL differs from
        // the CDB runs on the smaller of the two, with a residual (SAM-5
        // §5.4: data beyond EDTL is neither requested nor transferred);
        // other commands are refused.
        let residual = Residual::of(cmd.edtl, out_len);
        let plan = match plan {
            Ok(c @ (Command::Write { .. } | Command::WriteVerify { .. })) => Ok(c),
            // No Data-Out wanted (a READ flagged as a write): the data is
            // taken and dropped, the command runs.
            Ok(Command::CompareAndWrite { .. }) if out_len != cmd.edtl as u64 => {
                Err(Refusal::Check(Sense::INVALID_FIELD_IN_CDB, residual))
            }
            Ok(c) if out_len == 0 => Ok(c),
            Ok(_) if out_len != cmd.edtl as u64 => {
                Err(Refusal::Check(Sense::INVALID_FIELD_IN_IU, residual))
            }
            other => other,
        };
        let want = if plan.is_ok() {
            out_len.min(cmd.edtl as u64) as u32
        } else {
            0
        };
        ctx.residual = residual;
        let write = match PendingWrite::new(cmd.edtl, want, &cmd.data, cmd.final_, &self.params) {
            Ok(w) => w,
            Err(e) => {
                ctx.ctl.abort();
                self.tasks.lock().remove(&cmd.itt);
                self.release(admit);
                self.send(reject(REJECT_PROTOCOL, bhs)).await;
                return Err(e.into());
            }
        };
        let waiting = Waiting {
            write,
            ctx,
            plan,
            permits,
        };
        self.pending.insert(cmd.itt, waiting);
        self.advance_write(cmd.itt).await;
        Ok(())
    }

    /// After data arrived for `itt`: run it when complete, else solicit more.
    async fn advance_write(&mut self, itt: u32) {
        let params = self.params;
        let mut next = self.next_ttt;
        let Some(wt) = self.pending.get_mut(&itt) else {
            return;
        };
        if !wt.write.complete() {
            let reqs = wt.write.solicit(&params, || {
                next = next.wrapping_add(1);
                if next == RESERVED_TAG {
                    next = 1;
                }
                next
            });
            let lun = wt.ctx.lun;
            self.next_ttt = next;
            for r in reqs {
                self.send(r2t(itt, lun, r.ttt, r.r2tsn, r.offset, r.len))
                    .await;
            }
            return;
        }
        let Some(Waiting {
            write,
            mut ctx,
            plan,
            permits,
        }) = self.pending.remove(&itt)
        else {
            return;
        };
        ctx.r2ts = write.r2t_count();
        let plan = match write.sequence_error() {
            Some(e) => {
                tracing::debug!(itt, "write failed: {e}");
                Err(Refusal::Check(Sense::DATA_PHASE_ERROR, Residual::default()))
            }
            None => plan,
        };
        match plan {
            Ok(c) => {
                let data = write.into_data();
                let lun = self.lun.clone();
                self.running.spawn(async move {
                    task::run(lun, c, data, ctx).await;
                    drop(permits);
                });
            }
            Err(r) => ctx.fail(r).await,
        }
    }

    async fn data_out(&mut self, d: DataOut, bhs: &[u8; BHS_LEN]) -> Result<(), ConnError> {
        let Some(wt) = self.pending.get_mut(&d.itt) else {
            if !self.aborted.contains(&d.itt) {
                self.send(reject(REJECT_INVALID_FIELD, bhs)).await;
            }
            return Ok(());
        };
        if let Err(e) = wt.write.data_out(&d) {
            self.send(reject(REJECT_PROTOCOL, bhs)).await;
            return Err(e.into());
        }
        self.advance_write(d.itt).await;
        Ok(())
    }

    async fn task_mgmt(&mut self, admit: Admit, function: u8, lun: [u8; 8], itt: u32, rtt: u32) {
        let response = if lun != [0; 8] && function != TMF_ABORT_TASK {
            TMF_NO_LUN
        } else {
            match function {
                TMF_ABORT_TASK => {
                    let waiting = self.abort_one(rtt);
                    match waiting {
                        Some(Some(ctl)) => {
                            // Answer once the task's backend call has ended.
                            let (tx, window) = (self.tx.clone(), self.window.clone());
                            self.running.spawn(async move {
                                ctl.finished().await;
                                if admit == Admit::Slot {
                                    window.lock().done();
                                }
                                let _ = tx.send(task_mgmt_response(itt, TMF_COMPLETE)).await;
                            });
                            return;
                        }
                        Some(None) => TMF_COMPLETE,
                        None => TMF_NO_TASK,
                    }
                }
                TMF_ABORT_TASK_SET | 3 /* CLEAR TASK SET */ | TMF_LUN_RESET => {
                    let itts: Vec<u32> = self
                        .pending
                        .keys()
                        .copied()
                        .chain(self.tasks.lock().keys().copied())
                        .collect();
                    let mut wait = Vec::new();
                    for t in itts {
                        if let Some(Some(ctl)) = self.abort_one(t) {
                            wait.push(ctl);
                        }
                    }
                    let (tx, window) = (self.tx.clone(), self.window.clone());
                    self.running.spawn(async move {
                        for ctl in wait {
                            ctl.finished().await;
                        }
                        if admit == Admit::Slot {
                            window.lock().done();
                        }
                        let _ = tx.send(task_mgmt_response(itt, TMF_COMPLETE)).await;
                    });
                    return;
                }
                _ => TMF_NOT_SUPPORTED,
            }
        };
        self.release(admit);
        self.send(task_mgmt_response(itt, response)).await;
    }

    /// Aborts task `itt`: `Some(None)` if it was waiting for data (now
    /// gone), `Some(Some(ctl))` if it is running (wait on `ctl`), `None`
    /// if there is no such task or it has already answered.
    fn abort_one(&mut self, itt: u32) -> Option<Option<Arc<TaskCtl>>> {
        if let Some(Waiting { ctx, .. }) = self.pending.remove(&itt) {
            ctx.ctl.abort();
            if ctx.slot {
                self.window.lock().done();
            }
            self.tasks.lock().remove(&itt);
            if self.aborted.len() == 64 {
                self.aborted.pop_front();
            }
            self.aborted.push_back(itt);
            let _ = ctx.done.send(true);
            return Some(None);
        }
        let ctl = self.tasks.lock().get(&itt).cloned()?;
        ctl.abort().then_some(Some(ctl))
    }
}
