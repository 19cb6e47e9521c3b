//! The logical unit: runs parsed SCSI commands ([`Command`]) against a
//! [`Backend`] and returns status, sense and Data-In.
//!
//! The LUN exports 4096-byte logical blocks ([`BLOCK`]), the backend's
//! alignment, so every READ/WRITE maps to one aligned backend call and no
//! read-modify-write is ever needed. [`Lun::check`] validates a command
//! against the device (capacity, transfer limits) before the connection
//! asks for its Data-Out; [`Lun::execute`] does the IO.
//!
//! COMPARE AND WRITE and ORWRITE hold a LUN-wide lock, so each is atomic
//! against the others of this controller; a plain WRITE to the same blocks
//! racing it is not excluded (the replicator orders the two writes, but
//! the compare may see the older data).

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use strata_replica::Allocation;

use super::cdb::Command;
use super::pages::{self, Identity, ModeState, BLOCK, LIMITS};
use super::sense::{Sense, CHECK_CONDITION, GOOD};
use crate::frontend::Backend;

/// Largest single backend call made for WRITE SAME, UNMAP and the like.
const CHUNK: u64 = 1 << 30;
/// Range looked at by one GET LBA STATUS.
const LBA_STATUS_SPAN: u64 = 1 << 30;

/// What a command produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub status: u8,
    pub sense: Option<Sense>,
    /// Data-In (already cut to the allocation length).
    pub data: Bytes,
}

impl Outcome {
    pub fn good(data: Bytes) -> Outcome {
        Outcome {
            status: GOOD,
            sense: None,
            data,
        }
    }

    pub fn check(sense: Sense) -> Outcome {
        Outcome {
            status: CHECK_CONDITION,
            sense: Some(sense),
            data: Bytes::new(),
        }
    }
}

fn cut(mut v: Vec<u8>, alloc: u32) -> Bytes {
    v.truncate(alloc as usize);
    Bytes::from(v)
}

/// One logical unit over a backend.
pub struct Lun<B> {
    backend: Arc<B>,
    pub id: Identity,
    mode: Mutex<ModeState>,
    caw: tokio::sync::Mutex<()>,
}

impl<B: Backend> Lun<B> {
    pub fn new(backend: Arc<B>, id: Identity) -> Lun<B> {
        Lun {
            backend,
            id,
            mode: Mutex::new(ModeState { wce: true }),
            caw: tokio::sync::Mutex::new(()),
        }
    }

    /// Capacity in logical blocks, read from the backend each time so a
    /// resized backend is seen at once.
    pub fn blocks(&self) -> u64 {
        self.backend.size() / BLOCK
    }

    /// A unit attention to report instead of running `cmd`: the capacity
    /// differs from `known` (the last capacity this I_T nexus saw).
    pub fn unit_attention(&self, cmd: &Command, known: &mut u64) -> Option<Sense> {
        if !cmd.reports_unit_attention() {
            return None;
        }
        let now = self.blocks();
        if now != *known {
            *known = now;
            return Some(Sense::CAPACITY_CHANGED);
        }
        None
    }

    fn range(&self, lba: u64, blocks: u64) -> Result<(u64, u64), Sense> {
        let cap = self.blocks();
        match lba.checked_add(blocks) {
            Some(end) if end <= cap && lba < cap.max(1) => Ok((lba * BLOCK, blocks * BLOCK)),
            _ => Err(Sense::LBA_OUT_OF_RANGE),
        }
    }

    fn transfer(&self, lba: u64, blocks: u32) -> Result<(u64, u64), Sense> {
        if blocks > LIMITS.max_transfer {
            return Err(Sense::INVALID_FIELD_IN_CDB);
        }
        self.range(lba, blocks as u64)
    }

    /// Checks a command against the device before any data moves.
    pub fn check(&self, cmd: &Command) -> Result<(), Sense> {
        match *cmd {
            Command::Read { lba, blocks }
            | Command::Write { lba, blocks, .. }
            | Command::WriteVerify { lba, blocks }
            | Command::Verify { lba, blocks, .. } => self.transfer(lba, blocks).map(|_| ()),
            Command::SyncCache { lba, blocks } | Command::PreFetch { lba, blocks } => {
                self.range(lba, blocks as u64).map(|_| ())
            }
            Command::OrWrite { lba, blocks, .. } => self.transfer(lba, blocks).map(|_| ()),
            Command::WriteSame { lba, blocks, .. } => {
                self.range(lba, blocks as u64)?;
                if self.write_same_blocks(lba, blocks) > LIMITS.max_write_same as u64 {
                    return Err(Sense::INVALID_FIELD_IN_CDB);
                }
                Ok(())
            }
            Command::CompareAndWrite { lba, blocks, .. } => {
                if blocks > LIMITS.max_compare_write as u32 {
                    return Err(Sense::INVALID_FIELD_IN_CDB);
                }
                self.range(lba, blocks as u64).map(|_| ())
            }
            Command::GetLbaStatus { lba, .. } => self.range(lba, 0).map(|_| ()),
            Command::Unmap { param_len } | Command::ModeSelect { param_len, .. } => {
                if param_len > 8 + 16 * LIMITS.max_unmap_descriptors.max(16) {
                    return Err(Sense::PARAMETER_LIST_LENGTH_ERROR);
                }
                Ok(())
            }
            Command::ModeSense { pc: 3, .. } => Err(Sense::SAVING_NOT_SUPPORTED),
            _ => Ok(()),
        }
    }

    /// Blocks a WRITE SAME covers: 0 means up to the end of the LUN.
    fn write_same_blocks(&self, lba: u64, blocks: u32) -> u64 {
        if blocks == 0 {
            self.blocks().saturating_sub(lba)
        } else {
            blocks as u64
        }
    }

    /// Runs a command that passed [`Lun::check`]; `data` is its Data-Out
    /// (exactly [`Command::data_out_len`] bytes).
    pub async fn execute(&self, cmd: &Command, data: Bytes) -> Outcome {
        match self.run(cmd, data).await {
            Ok(o) => o,
            Err(sense) => Outcome::check(sense),
        }
    }

    fn write_through(&self) -> bool {
        !self.mode.lock().wce
    }

    async fn run(&self, cmd: &Command, data: Bytes) -> Result<Outcome, Sense> {
        self.check(cmd)?;
        let blocks = self.blocks();
        Ok(match *cmd {
            Command::TestUnitReady => Outcome::good(Bytes::new()),
            Command::RequestSense { desc, alloc } => {
                // No deferred errors are kept: the answer is NO SENSE.
                let v = if desc {
                    vec![0x72, 0, 0, 0, 0, 0, 0, 0]
                } else {
                    Sense::NONE.fixed().to_vec()
                };
                Outcome::good(cut(v, alloc))
            }
            Command::Inquiry { evpd, page, alloc } => {
                let v = if evpd {
                    pages::vpd_page(page, &self.id).ok_or(Sense::INVALID_FIELD_IN_CDB)?
                } else {
                    pages::standard_inquiry(true)
                };
                Outcome::good(cut(v, alloc))
            }
            Command::ReadCapacity10 => Outcome::good(Bytes::from(pages::read_capacity10(blocks))),
            Command::ReadCapacity16 { alloc } => {
                Outcome::good(cut(pages::read_capacity16(blocks), alloc))
            }
            Command::Read { lba, blocks: n } => {
                if n == 0 {
                    return Ok(Outcome::good(Bytes::new()));
                }
                let (off, len) = self.range(lba, n as u64)?;
                let d = self.read(off, len).await?;
                Outcome::good(d)
            }
            Command::Write {
                lba,
                blocks: n,
                fua,
            } => {
                if n > 0 && !data.is_empty() {
                    let (off, _) = self.range(lba, n as u64)?;
                    self.write_prefix(off, data, fua || self.write_through())
                        .await?;
                }
                Outcome::good(Bytes::new())
            }
            Command::WriteVerify { lba, blocks: n } => {
                if n > 0 && !data.is_empty() {
                    let (off, _) = self.range(lba, n as u64)?;
                    self.write_prefix(off, data.clone(), self.write_through())
                        .await?;
                    let len = (data.len() as u64).div_ceil(BLOCK) * BLOCK;
                    let back = self.read(off, len).await?;
                    if let Some(at) = first_difference(&back[..data.len()], &data) {
                        return Err(Sense::miscompare(at));
                    }
                }
                Outcome::good(Bytes::new())
            }
            Command::Verify {
                lba,
                blocks: n,
                bytchk,
            } => {
                if n > 0 {
                    let (off, len) = self.range(lba, n as u64)?;
                    let back = self.read(off, len).await?;
                    if bytchk {
                        if let Some(at) = first_difference(&back, &data) {
                            return Err(Sense::miscompare(at));
                        }
                    }
                }
                Outcome::good(Bytes::new())
            }
            Command::SyncCache { .. } => {
                self.backend
                    .flush()
                    .await
                    .map_err(|e| Sense::from_backend(&e, true))?;
                Outcome::good(Bytes::new())
            }
            Command::WriteSame {
                lba,
                blocks: n,
                unmap,
                ndob,
            } => {
                let (off, len) = self.range(lba, self.write_same_blocks(lba, n))?;
                let pattern = if ndob {
                    Bytes::from(vec![0u8; BLOCK as usize])
                } else {
                    data
                };
                self.write_same(off, len, pattern, unmap).await?;
                Outcome::good(Bytes::new())
            }
            Command::Unmap { .. } => {
                self.unmap(&data).await?;
                Outcome::good(Bytes::new())
            }
            Command::ModeSense {
                ten,
                dbd,
                pc,
                page,
                subpage,
                alloc,
            } => {
                let st = *self.mode.lock();
                let v = pages::mode_sense(ten, dbd, pc, page, subpage, blocks, st)
                    .ok_or(Sense::INVALID_FIELD_IN_CDB)?;
                Outcome::good(cut(v, alloc))
            }
            Command::ModeSelect { ten, .. } => {
                let mut st = self.mode.lock();
                pages::mode_select(ten, &data, &mut st)?;
                Outcome::good(Bytes::new())
            }
            Command::CompareAndWrite {
                lba,
                blocks: n,
                fua,
            } => {
                if n == 0 {
                    return Ok(Outcome::good(Bytes::new()));
                }
                let (off, len) = self.range(lba, n as u64)?;
                let _one_at_a_time = self.caw.lock().await;
                let current = self.read(off, len).await?;
                let (verify, new) = (data.slice(..len as usize), data.slice(len as usize..));
                if let Some(at) = first_difference(&current, &verify) {
                    return Err(Sense::miscompare(at));
                }
                self.write(off, new, fua || self.write_through()).await?;
                Outcome::good(Bytes::new())
            }
            Command::OrWrite {
                lba,
                blocks: n,
                fua,
            } => {
                if n == 0 {
                    return Ok(Outcome::good(Bytes::new()));
                }
                let (off, len) = self.range(lba, n as u64)?;
                let _one_at_a_time = self.caw.lock().await;
                let mut cur = self.read(off, len).await?.to_vec();
                for (c, d) in cur.iter_mut().zip(data.iter()) {
                    *c |= d;
                }
                self.write(off, Bytes::from(cur), fua || self.write_through())
                    .await?;
                Outcome::good(Bytes::new())
            }
            Command::PreFetch { .. } => Outcome::good(Bytes::new()),
            Command::GetLbaStatus { lba, alloc } => {
                Outcome::good(cut(self.lba_status(lba, alloc).await?, alloc))
            }
            Command::ReportLuns { alloc } => Outcome::good(cut(pages::report_luns(), alloc)),
            Command::ReportOpcodes {
                rctd,
                options,
                opcode,
                sa,
                alloc,
            } => {
                let v = pages::report_opcodes(rctd, options, opcode, sa)?;
                Outcome::good(cut(v, alloc))
            }
        })
    }

    async fn read(&self, off: u64, len: u64) -> Result<Bytes, Sense> {
        self.backend
            .read(off, len as u32)
            .await
            .map_err(|e| Sense::from_backend(&e, false))
    }

    async fn write(&self, off: u64, data: Bytes, fua: bool) -> Result<(), Sense> {
        self.backend
            .write(off, data, fua)
            .await
            .map_err(|e| Sense::from_backend(&e, true))
    }

    /// Writes `data` at the block-aligned `off`; `data` may end inside a
    /// block (a write cut short by the initiator's EDTL): the rest of that
    /// block is kept, by the backend if it takes unaligned writes, else by
    /// a read-modify-write here.
    async fn write_prefix(&self, off: u64, data: Bytes, fua: bool) -> Result<(), Sense> {
        let whole = data.len() / BLOCK as usize * BLOCK as usize;
        if whole == data.len() || self.backend.handles_unaligned() {
            return self.write(off, data, fua).await;
        }
        if whole > 0 {
            self.write(off, data.slice(..whole), fua).await?;
        }
        let tail = off + whole as u64;
        let mut block = self.read(tail, BLOCK).await?.to_vec();
        let rest = &data[whole..];
        block[..rest.len()].copy_from_slice(rest);
        self.write(tail, Bytes::from(block), fua).await
    }

    async fn write_same(
        &self,
        off: u64,
        len: u64,
        pattern: Bytes,
        unmap: bool,
    ) -> Result<(), Sense> {
        if pattern.len() as u64 != BLOCK {
            return Err(Sense::INVALID_FIELD_IN_CDB);
        }
        let fua = self.write_through();
        let end = off + len;
        if unmap || pattern.iter().all(|b| *b == 0) {
            // Zeros: metadata only. With UNMAP the blocks are deallocated
            // whatever the pattern (SBC-3 lets the device server unmap
            // instead of writing), and read back as zeros (LBPRZ).
            let mut at = off;
            while at < end {
                let n = (end - at).min(CHUNK);
                self.backend
                    .write_zeroes(at, n as u32, unmap, fua)
                    .await
                    .map_err(|e| Sense::from_backend(&e, true))?;
                at += n;
            }
            return Ok(());
        }
        let per = (LIMITS.optimal_transfer as u64 * BLOCK).min(len);
        let mut buf = BytesMut::with_capacity(per as usize);
        while (buf.len() as u64) < per {
            buf.extend_from_slice(&pattern);
        }
        let buf = buf.freeze();
        let mut at = off;
        while at < end {
            let n = (end - at).min(per);
            self.write(at, buf.slice(..n as usize), fua).await?;
            at += n;
        }
        Ok(())
    }

    async fn unmap(&self, list: &[u8]) -> Result<(), Sense> {
        if list.is_empty() {
            return Ok(()); // parameter list length 0: nothing to do
        }
        if list.len() < 8 {
            return Err(Sense::PARAMETER_LIST_LENGTH_ERROR);
        }
        let desc_len = u16::from_be_bytes([list[2], list[3]]) as usize;
        let descs = list
            .get(8..8 + desc_len)
            .ok_or(Sense::PARAMETER_LIST_LENGTH_ERROR)?;
        if !desc_len.is_multiple_of(16) {
            return Err(Sense::PARAMETER_LIST_LENGTH_ERROR);
        }
        if descs.len() / 16 > LIMITS.max_unmap_descriptors as usize {
            return Err(Sense::INVALID_FIELD_IN_PARAMETER_LIST);
        }
        let mut ranges = Vec::with_capacity(descs.len() / 16);
        let mut total = 0u64;
        for d in descs.chunks(16) {
            let lba = u64::from_be_bytes(d[0..8].try_into().unwrap_or([0; 8]));
            let n = u32::from_be_bytes(d[8..12].try_into().unwrap_or([0; 4])) as u64;
            if n == 0 {
                continue;
            }
            total += n;
            if total > LIMITS.max_unmap_blocks as u64 {
                return Err(Sense::INVALID_FIELD_IN_PARAMETER_LIST);
            }
            ranges.push(self.range(lba, n)?);
        }
        for (off, len) in ranges {
            let end = off + len;
            let mut at = off;
            while at < end {
                let n = (end - at).min(CHUNK);
                self.backend
                    .trim(at, n as u32)
                    .await
                    .map_err(|e| Sense::from_backend(&e, true))?;
                at += n;
            }
        }
        Ok(())
    }

    async fn lba_status(&self, lba: u64, alloc: u32) -> Result<Vec<u8>, Sense> {
        let (off, _) = self.range(lba, 0)?;
        let len = (self.blocks() * BLOCK - off).min(LBA_STATUS_SPAN);
        let max_desc = ((alloc as usize).saturating_sub(8) / 16).clamp(1, 1024);
        let extents = self
            .backend
            .block_status(off, len as u32)
            .await
            .map_err(|e| Sense::from_backend(&e, false))?;
        let mut descs: Vec<(u64, u64, u8)> = Vec::new();
        for e in extents {
            let status = match e.kind {
                Allocation::Data => 0,
                Allocation::Hole => 1,
            };
            let (start, n) = (e.offset / BLOCK, e.len / BLOCK);
            if n == 0 {
                continue;
            }
            match descs.last_mut() {
                Some(last) if last.2 == status && last.0 + last.1 == start => last.1 += n,
                _ => {
                    if descs.len() == max_desc {
                        break;
                    }
                    descs.push((start, n, status));
                }
            }
        }
        if descs.is_empty() {
            // The backend said nothing: report the first block as mapped.
            descs.push((lba, 1, 0));
        }
        let mut out = vec![0u8; 8];
        for (start, n, status) in descs {
            out.extend_from_slice(&start.to_be_bytes());
            out.extend_from_slice(&(n.min(u32::MAX as u64) as u32).to_be_bytes());
            out.extend_from_slice(&[status, 0, 0, 0]);
        }
        let n = (out.len() - 4) as u32;
        out[0..4].copy_from_slice(&n.to_be_bytes());
        Ok(out)
    }
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<u32> {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .or((a.len() != b.len()).then_some(a.len().min(b.len())))
        .map(|p| p as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frontend::mem::MemBackend;

    fn lun(blocks: u64) -> Lun<MemBackend> {
        Lun::new(
            Arc::new(MemBackend::new("v", blocks * BLOCK)),
            Identity {
                volume: "v".into(),
                target: "iqn.2026-11.io.strata:v".into(),
            },
        )
    }

    fn block(b: u8) -> Bytes {
        Bytes::from(vec![b; BLOCK as usize])
    }

    #[tokio::test]
    async fn read_write_and_range() {
        let l = lun(4096);
        let w = Command::Write {
            lba: 4095,
            blocks: 1,
            fua: true,
        };
        assert_eq!(l.execute(&w, block(7)).await, Outcome::good(Bytes::new()));
        let r = l
            .execute(
                &Command::Read {
                    lba: 4095,
                    blocks: 1,
                },
                Bytes::new(),
            )
            .await;
        assert_eq!(r.data, block(7));
        let beyond = Command::Read {
            lba: 4095,
            blocks: 2,
        };
        assert_eq!(l.check(&beyond), Err(Sense::LBA_OUT_OF_RANGE));
        let huge = Command::Read {
            lba: 0,
            blocks: 2049,
        };
        assert_eq!(l.check(&huge), Err(Sense::INVALID_FIELD_IN_CDB));
        let wrap = Command::Read {
            lba: u64::MAX,
            blocks: 2,
        };
        assert_eq!(l.check(&wrap), Err(Sense::LBA_OUT_OF_RANGE));
        assert_eq!(
            l.check(&Command::Read {
                lba: 4096,
                blocks: 0
            }),
            Err(Sense::LBA_OUT_OF_RANGE)
        );
    }

    #[tokio::test]
    async fn short_write_keeps_the_rest_of_the_block() {
        let l = lun(4);
        let w = Command::Write {
            lba: 1,
            blocks: 2,
            fua: false,
        };
        l.execute(&w, Bytes::from(vec![1u8; 8192])).await;
        let o = l.execute(&w, Bytes::from(vec![2u8; 4096 + 200])).await;
        assert_eq!(o.status, GOOD);
        let r = l
            .execute(&Command::Read { lba: 1, blocks: 2 }, Bytes::new())
            .await;
        assert!(r.data[..4296].iter().all(|b| *b == 2));
        assert!(r.data[4296..].iter().all(|b| *b == 1));
    }

    #[tokio::test]
    async fn compare_and_write() {
        let l = lun(4);
        let mut d = BytesMut::new();
        d.extend_from_slice(&block(0));
        d.extend_from_slice(&block(9));
        let caw = Command::CompareAndWrite {
            lba: 1,
            blocks: 1,
            fua: false,
        };
        assert_eq!(l.execute(&caw, d.freeze()).await.status, GOOD);
        let mut d = BytesMut::new();
        d.extend_from_slice(&block(0));
        d.extend_from_slice(&block(1));
        let o = l.execute(&caw, d.freeze()).await;
        assert_eq!(o.sense, Some(Sense::miscompare(0)));
        let r = l
            .execute(&Command::Read { lba: 1, blocks: 1 }, Bytes::new())
            .await;
        assert_eq!(r.data, block(9));
    }

    #[tokio::test]
    async fn write_same_unmap_and_status() {
        let l = lun(64);
        let ws = Command::WriteSame {
            lba: 0,
            blocks: 8,
            unmap: false,
            ndob: false,
        };
        assert_eq!(l.execute(&ws, block(3)).await.status, GOOD);
        let r = l
            .execute(&Command::Read { lba: 7, blocks: 1 }, Bytes::new())
            .await;
        assert_eq!(r.data, block(3));
        let st = l
            .execute(&Command::GetLbaStatus { lba: 0, alloc: 64 }, Bytes::new())
            .await;
        assert_eq!(st.data.len(), 8 + 2 * 16);
        assert_eq!(&st.data[8..16], &0u64.to_be_bytes());
        assert_eq!(&st.data[16..20], &8u32.to_be_bytes());
        assert_eq!(st.data[20], 0);
        assert_eq!(st.data[36], 1);
        let mut list = vec![0, 22, 0, 16, 0, 0, 0, 0];
        list.extend_from_slice(&2u64.to_be_bytes());
        list.extend_from_slice(&4u32.to_be_bytes());
        list.extend_from_slice(&[0; 4]);
        let o = l
            .execute(&Command::Unmap { param_len: 24 }, Bytes::from(list.clone()))
            .await;
        assert_eq!(o.status, GOOD);
        let r = l
            .execute(&Command::Read { lba: 2, blocks: 1 }, Bytes::new())
            .await;
        assert_eq!(r.data, block(0));
        list[8..16].copy_from_slice(&63u64.to_be_bytes());
        let o = l
            .execute(&Command::Unmap { param_len: 24 }, Bytes::from(list))
            .await;
        assert_eq!(o.sense, Some(Sense::LBA_OUT_OF_RANGE));
        // 0 blocks: to the end of the LUN.
        let to_end = Command::WriteSame {
            lba: 60,
            blocks: 0,
            unmap: false,
            ndob: false,
        };
        assert_eq!(l.execute(&to_end, block(4)).await.status, GOOD);
        let r = l
            .execute(&Command::Read { lba: 60, blocks: 4 }, Bytes::new())
            .await;
        assert!(r.data.iter().all(|b| *b == 4));
        let or = Command::OrWrite {
            lba: 60,
            blocks: 1,
            fua: false,
        };
        assert_eq!(l.execute(&or, block(1)).await.status, GOOD);
        let r = l
            .execute(&Command::Read { lba: 60, blocks: 1 }, Bytes::new())
            .await;
        assert_eq!(r.data, block(5));
    }

    #[tokio::test]
    async fn write_through_after_mode_select() {
        let l = lun(4);
        let ms = Command::ModeSense {
            ten: false,
            dbd: true,
            pc: 0,
            page: 8,
            subpage: 0,
            alloc: 255,
        };
        let mut list = l.execute(&ms, Bytes::new()).await.data.to_vec();
        list[0] = 0;
        list[4 + 2] &= !0x04;
        let sel = Command::ModeSelect {
            ten: false,
            param_len: list.len() as u32,
        };
        assert_eq!(l.execute(&sel, Bytes::from(list)).await.status, GOOD);
        assert!(l.write_through());
        let w = Command::Write {
            lba: 0,
            blocks: 1,
            fua: false,
        };
        l.execute(&w, block(1)).await;
        assert_eq!(l.backend.stats().fua_writes, 1);
    }

    #[test]
    fn capacity_unit_attention() {
        let l = lun(4);
        let mut known = 4;
        assert_eq!(l.unit_attention(&Command::TestUnitReady, &mut known), None);
        known = 2;
        let inq = Command::Inquiry {
            evpd: false,
            page: 0,
            alloc: 36,
        };
        assert_eq!(l.unit_attention(&inq, &mut known), None);
        assert_eq!(
            l.unit_attention(&Command::TestUnitReady, &mut known),
            Some(Sense::CAPACITY_CHANGED)
        );
        assert_eq!(known, 4);
        assert_eq!(l.unit_attention(&Command::TestUnitReady, &mut known), None);
    }

    #[test]
    fn differences() {
        assert_eq!(first_difference(b"abc", b"abc"), None);
        assert_eq!(first_difference(b"abc", b"abd"), Some(2));
        assert_eq!(first_difference(b"ab", b"abc"), Some(2));
    }
}
