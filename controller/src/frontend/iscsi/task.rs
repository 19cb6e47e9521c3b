//! One SCSI task after its data is in: run it on the [`Lun`], then send
//! Data-In (split at the initiator's MaxRecvDataSegmentLength, a sequence
//! per MaxBurstLength, status collapsed into the last PDU) or a SCSI
//! Response with sense. A task can be aborted (ABORT TASK, LUN RESET):
//! the backend call still finishes, so the effect on the volume is whole,
//! but no response is sent.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::{mpsc, watch};

use super::login::Params;
use super::pdu::{data_in, scsi_response, OutPdu, Residual};
use super::window::Window;
use crate::frontend::scsi::cdb::Command;
use crate::frontend::scsi::lun::{Lun, Outcome};
use crate::frontend::scsi::sense::{Sense, GOOD};
use crate::frontend::Backend;

/// SCSI status TASK SET FULL: the initiator should retry later.
pub const TASK_SET_FULL: u8 = 0x28;

/// Why a command is answered without running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// CHECK CONDITION with this sense (and a write's residual).
    Check(Sense, Residual),
    /// TASK SET FULL.
    Busy,
}

const RUNNING: u8 = 0;
const ABORTED: u8 = 1;
const ANSWERED: u8 = 2;

/// Shared between a running task and task management.
pub struct TaskCtl {
    state: AtomicU8,
    done: watch::Receiver<bool>,
}

impl TaskCtl {
    /// A control and the sender the task drops (or sets) when it ends.
    pub fn new() -> (Arc<TaskCtl>, watch::Sender<bool>) {
        let (tx, rx) = watch::channel(false);
        (
            Arc::new(TaskCtl {
                state: AtomicU8::new(RUNNING),
                done: rx,
            }),
            tx,
        )
    }

    /// Marks the task aborted; false if it has already answered.
    pub fn abort(&self) -> bool {
        self.state
            .compare_exchange(RUNNING, ABORTED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
            || self.state.load(Ordering::Acquire) == ABORTED
    }

    /// Claims the right to answer; false if the task was aborted.
    pub fn answer(&self) -> bool {
        self.state
            .compare_exchange(RUNNING, ANSWERED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Resolves once the task has ended.
    pub async fn finished(&self) {
        let mut rx = self.done.clone();
        let _ = rx.wait_for(|d| *d).await;
    }
}

/// Tasks of one connection by initiator task tag.
pub type Tasks = Arc<Mutex<HashMap<u32, Arc<TaskCtl>>>>;

/// Everything a task needs to answer.
pub struct TaskCtx {
    pub itt: u32,
    pub lun: [u8; 8],
    pub edtl: u32,
    /// The initiator set R: it takes Data-In.
    pub read: bool,
    /// The task holds a command window slot.
    pub slot: bool,
    /// R2Ts sent for it (ExpDataSN of a write's response).
    pub r2ts: u32,
    /// A write's residual (EDTL against the CDB's transfer length).
    pub residual: Residual,
    pub params: Params,
    pub tx: mpsc::Sender<OutPdu>,
    pub window: Arc<Mutex<Window>>,
    pub ctl: Arc<TaskCtl>,
    pub done: watch::Sender<bool>,
    pub tasks: Tasks,
}

impl TaskCtx {
    /// Sends the outcome (unless aborted) and releases the task.
    pub async fn finish(self, out: Outcome, write: bool) {
        if let Some(sense) = &out.sense {
            tracing::debug!(itt = self.itt, ?sense, "SCSI command failed");
        }
        // Reopen the window before the answer goes out, so the answer
        // carries the new MaxCmdSN.
        if self.slot {
            self.window.lock().done();
        }
        if self.ctl.answer() {
            for pdu in response_pdus(&self, out, write) {
                if self.tx.send(pdu).await.is_err() {
                    break;
                }
            }
        }
        self.tasks.lock().remove(&self.itt);
        let _ = self.done.send(true);
    }

    /// Answers a command that is refused before running.
    pub async fn fail(self, why: Refusal) {
        tracing::debug!(itt = self.itt, ?why, "SCSI command refused");
        if self.slot {
            self.window.lock().done();
        }
        if self.ctl.answer() {
            let pdu = match why {
                Refusal::Check(sense, residual) => {
                    let s = sense.fixed();
                    scsi_response(
                        self.itt,
                        crate::frontend::scsi::sense::CHECK_CONDITION,
                        Some(&s),
                        residual,
                        self.r2ts,
                    )
                }
                Refusal::Busy => scsi_response(
                    self.itt,
                    TASK_SET_FULL,
                    None,
                    Residual::default(),
                    self.r2ts,
                ),
            };
            let _ = self.tx.send(pdu).await;
        }
        self.tasks.lock().remove(&self.itt);
        let _ = self.done.send(true);
    }
}

/// Runs `cmd` and answers.
pub async fn run<B: Backend>(lun: Arc<Lun<B>>, cmd: Command, data: Bytes, ctx: TaskCtx) {
    let write = cmd.data_out_len(crate::frontend::scsi::pages::BLOCK) > 0;
    let out = lun.execute(&cmd, data).await;
    ctx.finish(out, write).await;
}

/// The PDUs that answer a task: Data-In with collapsed status for data,
/// else one SCSI Response.
pub fn response_pdus(ctx: &TaskCtx, out: Outcome, write: bool) -> Vec<OutPdu> {
    if out.status != GOOD {
        let sense = out.sense.map(|s| s.fixed());
        let residual = if write {
            ctx.residual
        } else {
            Residual::default()
        };
        return vec![scsi_response(
            ctx.itt,
            out.status,
            sense.as_ref().map(|s| &s[..]),
            residual,
            ctx.r2ts,
        )];
    }
    if write {
        return vec![scsi_response(ctx.itt, GOOD, None, ctx.residual, ctx.r2ts)];
    }
    if !ctx.read {
        // Data the initiator did not ask to read is not sent.
        let residual = Residual::of(0, out.data.len() as u64);
        return vec![scsi_response(ctx.itt, GOOD, None, residual, 0)];
    }
    let residual = Residual::of(ctx.edtl, out.data.len() as u64);
    let data = out.data.slice(..out.data.len().min(ctx.edtl as usize));
    if data.is_empty() {
        return vec![scsi_response(ctx.itt, GOOD, None, residual, 0)];
    }
    let seg = ctx.params.send_max.max(512) as usize;
    let burst = ctx.params.max_burst.max(512) as usize;
    let mut pdus = Vec::with_capacity(data.len().div_ceil(seg));
    let (mut off, mut in_burst, mut datasn) = (0usize, 0usize, 0u32);
    while off < data.len() {
        let n = seg.min(data.len() - off).min(burst - in_burst);
        let last = off + n == data.len();
        in_burst += n;
        let end_of_burst = in_burst == burst || last;
        if end_of_burst {
            in_burst = 0;
        }
        let status = last.then_some((GOOD, residual));
        pdus.push(data_in(
            ctx.itt,
            ctx.lun,
            datasn,
            off as u32,
            data.slice(off..off + n),
            end_of_burst,
            status,
        ));
        datasn += 1;
        off += n;
    }
    pdus
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frontend::iscsi::pdu::Seq;

    fn ctx(edtl: u32, send_max: u32, max_burst: u32) -> TaskCtx {
        let (ctl, done) = TaskCtl::new();
        let (tx, _rx) = mpsc::channel(1);
        TaskCtx {
            itt: 7,
            lun: [0; 8],
            edtl,
            read: true,
            slot: true,
            r2ts: 0,
            residual: Residual::default(),
            params: Params {
                send_max,
                max_burst,
                ..Params::default()
            },
            tx,
            window: Arc::new(Mutex::new(Window::new(0, 4))),
            ctl,
            done,
            tasks: Tasks::default(),
        }
    }

    #[test]
    fn data_in_split_into_segments_and_bursts() {
        let c = ctx(10_000, 1024, 2048);
        let out = Outcome::good(Bytes::from(vec![1u8; 4096]));
        let p = response_pdus(&c, out, false);
        assert_eq!(p.len(), 4);
        let flags: Vec<u8> = p.iter().map(|x| x.bhs[1]).collect();
        // F at each 2048-byte burst; the last has S and underflow (U).
        assert_eq!(flags, vec![0x00, 0x80, 0x00, 0x80 | 0x01 | 0x02]);
        assert_eq!(p[3].seq, Seq::Status);
        assert_eq!(&p[3].bhs[44..48], &(10_000u32 - 4096).to_be_bytes());
        assert_eq!(&p[2].bhs[36..40], &2u32.to_be_bytes(), "DataSN");
        assert_eq!(&p[2].bhs[40..44], &2048u32.to_be_bytes(), "offset");
    }

    #[test]
    fn overflow_and_zero_edtl() {
        let c = ctx(200, 8192, 1 << 20);
        let p = response_pdus(&c, Outcome::good(Bytes::from(vec![1u8; 4096])), false);
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].data.len(), 200);
        assert_eq!(p[0].bhs[1], 0x80 | 0x01 | 0x04);
        let c = ctx(0, 8192, 1 << 20);
        let p = response_pdus(&c, Outcome::good(Bytes::from(vec![1u8; 4096])), false);
        assert_eq!(p[0].bhs[0], crate::frontend::iscsi::pdu::OP_SCSI_RESP);
        assert_eq!(&p[0].bhs[44..48], &4096u32.to_be_bytes());
    }

    #[test]
    fn check_condition_carries_sense() {
        let c = ctx(4096, 8192, 1 << 20);
        let p = response_pdus(&c, Outcome::check(Sense::LBA_OUT_OF_RANGE), false);
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].bhs[3], 0x02);
        assert_eq!(&p[0].data[..2], &18u16.to_be_bytes());
        assert_eq!(p[0].data[2 + 12], 0x21);
    }

    #[test]
    fn abort_wins_or_loses_once() {
        let (ctl, _done) = TaskCtl::new();
        assert!(ctl.abort());
        assert!(!ctl.answer());
        assert!(ctl.abort(), "aborting twice is fine");
        let (ctl, _done) = TaskCtl::new();
        assert!(ctl.answer());
        assert!(!ctl.abort());
    }
}
