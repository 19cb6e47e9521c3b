//! A write command waiting for its data (RFC 7143 §4.2.4, §11.7, §11.8):
//! immediate data, then unsolicited Data-Out up to FirstBurstLength, then
//! Data-Out solicited by R2Ts of at most MaxBurstLength, at most
//! MaxOutstandingR2T at a time. Pure state: the connection feeds it PDUs
//! and sends the R2Ts it asks for.
//!
//! With DataPDUInOrder and DataSequenceInOrder (the only values this
//! target negotiates), data must arrive at increasing offsets without
//! gaps, and DataSN counts from 0 within each sequence (the unsolicited
//! one and each R2T's). A wrong offset or length is a protocol error that
//! drops the connection (error recovery level 0); a wrong DataSN with the
//! data where it belongs keeps the stream in sync, so the data is still
//! taken but the command fails ([`PendingWrite::sequence_error`]).
//!
//! Only the bytes the command needs (`want`) are solicited and kept: an
//! initiator whose Expected Data Transfer Length is larger may still send
//! up to FirstBurstLength unsolicited, and the excess is dropped. A command
//! that fails before its data is needed (a bad CDB) has `want` 0: it
//! takes its unsolicited data, so the stream stays in sync, but solicits
//! and buffers nothing.

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};

use super::login::Params;
use super::pdu::{DataOut, RESERVED_TAG};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DataOutError {
    #[error("Immediate data of {len} bytes exceeds {max}")]
    ImmediateTooLong { len: u32, max: u32 },
    #[error("Immediate data was not negotiated")]
    ImmediateNotAllowed,
    #[error("Unsolicited data is not allowed here")]
    Unsolicited,
    #[error("Target transfer tag {0:#x} matches no outstanding R2T")]
    UnknownTtt(u32),
    #[error("DataSN {got}, expected {want}")]
    DataSn { want: u32, got: u32 },
    #[error("Buffer offset {got}, expected {want}")]
    Offset { want: u32, got: u32 },
    #[error("Data-Out of {len} bytes at {offset} runs past {limit}")]
    TooMuch { offset: u32, len: u32, limit: u32 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Solicited {
    ttt: u32,
    end: u32,
    datasn: u32,
}

/// An R2T to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct R2tRequest {
    pub ttt: u32,
    pub r2tsn: u32,
    pub offset: u32,
    pub len: u32,
}

#[derive(Debug)]
pub struct PendingWrite {
    /// Bytes solicited and kept.
    want: u32,
    buf: BytesMut,
    received: u32,
    unsolicited_open: bool,
    unsolicited_limit: u32,
    unsolicited_datasn: u32,
    r2ts: VecDeque<Solicited>,
    next_offset: u32,
    r2tsn: u32,
    /// A Data-Out came with a wrong DataSN.
    datasn_error: Option<DataOutError>,
}

impl PendingWrite {
    /// Starts a write whose initiator expects to send `edtl` bytes, of
    /// which the command needs `want` (at most `edtl`; the caller checked
    /// it against the transfer limit), with its immediate data. `final_`
    /// is the SCSI Command's F bit (no unsolicited Data-Out follows).
    pub fn new(
        edtl: u32,
        want: u32,
        immediate: &[u8],
        final_: bool,
        params: &Params,
    ) -> Result<PendingWrite, DataOutError> {
        let want = want.min(edtl);
        let unsolicited_limit = edtl.min(params.first_burst);
        let len = immediate.len() as u32;
        if len > 0 && !params.immediate_data {
            return Err(DataOutError::ImmediateNotAllowed);
        }
        if len > unsolicited_limit {
            return Err(DataOutError::ImmediateTooLong {
                len,
                max: unsolicited_limit,
            });
        }
        if !final_ && params.initial_r2t {
            return Err(DataOutError::Unsolicited);
        }
        let mut buf = BytesMut::with_capacity(want as usize);
        buf.extend_from_slice(&immediate[..immediate.len().min(want as usize)]);
        Ok(PendingWrite {
            want,
            buf,
            received: len,
            unsolicited_open: !final_ && len < unsolicited_limit,
            unsolicited_limit,
            unsolicited_datasn: 0,
            r2ts: VecDeque::new(),
            next_offset: len,
            r2tsn: 0,
            datasn_error: None,
        })
    }

    /// Takes one Data-Out PDU.
    pub fn data_out(&mut self, d: &DataOut) -> Result<(), DataOutError> {
        let len = d.data.len() as u32;
        let (limit, datasn) = if d.ttt == RESERVED_TAG {
            if !self.unsolicited_open {
                return Err(DataOutError::Unsolicited);
            }
            (self.unsolicited_limit, &mut self.unsolicited_datasn)
        } else {
            match self.r2ts.front_mut() {
                Some(r) if r.ttt == d.ttt => (r.end, &mut r.datasn),
                _ => return Err(DataOutError::UnknownTtt(d.ttt)),
            }
        };
        if d.datasn != *datasn && self.datasn_error.is_none() {
            self.datasn_error = Some(DataOutError::DataSn {
                want: *datasn,
                got: d.datasn,
            });
        }
        if d.offset != self.received {
            return Err(DataOutError::Offset {
                want: self.received,
                got: d.offset,
            });
        }
        if d.offset as u64 + len as u64 > limit as u64 {
            return Err(DataOutError::TooMuch {
                offset: d.offset,
                len,
                limit,
            });
        }
        *datasn += 1;
        let room = (self.want as usize).saturating_sub(self.buf.len());
        self.buf
            .extend_from_slice(&d.data[..d.data.len().min(room)]);
        self.received += len;
        if d.ttt == RESERVED_TAG {
            if d.final_ || self.received == self.unsolicited_limit {
                self.unsolicited_open = false;
                self.next_offset = self.received;
            }
        } else if self.r2ts.front().is_some_and(|r| r.end == self.received) {
            self.r2ts.pop_front();
        }
        Ok(())
    }

    /// True once no more data will come: the unsolicited part is over and
    /// everything wanted is in.
    pub fn complete(&self) -> bool {
        !self.unsolicited_open && self.received >= self.want
    }

    /// R2Ts to send now (none while unsolicited data may still come, or
    /// for a dropped write). `ttt` hands out target transfer tags.
    pub fn solicit(&mut self, params: &Params, mut ttt: impl FnMut() -> u32) -> Vec<R2tRequest> {
        let mut out = Vec::new();
        if self.unsolicited_open {
            return out;
        }
        while (self.r2ts.len() as u32) < params.max_outstanding_r2t.max(1)
            && self.next_offset < self.want
        {
            let len = (self.want - self.next_offset).min(params.max_burst.max(512));
            let r = R2tRequest {
                ttt: ttt(),
                r2tsn: self.r2tsn,
                offset: self.next_offset,
                len,
            };
            self.r2tsn += 1;
            self.next_offset += len;
            self.r2ts.push_back(Solicited {
                ttt: r.ttt,
                end: self.next_offset,
                datasn: 0,
            });
            out.push(r);
        }
        out
    }

    /// The first DataSN error seen; the command must fail.
    pub fn sequence_error(&self) -> Option<&DataOutError> {
        self.datasn_error.as_ref()
    }

    /// R2Ts sent so far (the ExpDataSN of the final response).
    pub fn r2t_count(&self) -> u32 {
        self.r2tsn
    }

    /// The wanted data of a complete write.
    pub fn into_data(self) -> Bytes {
        self.buf.freeze()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(initial_r2t: bool, first_burst: u32, max_burst: u32, outstanding: u32) -> Params {
        Params {
            initial_r2t,
            first_burst,
            max_burst,
            max_outstanding_r2t: outstanding,
            ..Params::default()
        }
    }

    fn dout(ttt: u32, datasn: u32, offset: u32, len: usize, final_: bool) -> DataOut {
        DataOut {
            final_,
            itt: 1,
            ttt,
            datasn,
            offset,
            data: Bytes::from(vec![(offset / 512) as u8; len]),
        }
    }

    fn tags() -> impl FnMut() -> u32 {
        let mut n = 100;
        move || {
            n += 1;
            n
        }
    }

    #[test]
    fn immediate_then_unsolicited_then_r2t() {
        let p = params(false, 2048, 1024, 2);
        let mut w = PendingWrite::new(5120, 5120, &[0; 1024], false, &p).unwrap();
        let mut t = tags();
        assert!(
            w.solicit(&p, &mut t).is_empty(),
            "unsolicited data may still come"
        );
        w.data_out(&dout(RESERVED_TAG, 0, 1024, 1024, true))
            .unwrap();
        let r = w.solicit(&p, &mut t);
        assert_eq!(
            r,
            vec![
                R2tRequest {
                    ttt: 101,
                    r2tsn: 0,
                    offset: 2048,
                    len: 1024
                },
                R2tRequest {
                    ttt: 102,
                    r2tsn: 1,
                    offset: 3072,
                    len: 1024
                }
            ]
        );
        w.data_out(&dout(101, 0, 2048, 512, false)).unwrap();
        w.data_out(&dout(101, 1, 2560, 512, true)).unwrap();
        let r = w.solicit(&p, &mut t);
        assert_eq!(r.len(), 1);
        assert_eq!((r[0].offset, r[0].len, r[0].r2tsn), (4096, 1024, 2));
        w.data_out(&dout(102, 0, 3072, 1024, true)).unwrap();
        assert!(!w.complete());
        w.data_out(&dout(103, 0, 4096, 1024, true)).unwrap();
        assert!(w.complete());
        assert_eq!(w.r2t_count(), 3);
        assert_eq!(w.into_data().len(), 5120);
    }

    #[test]
    fn sequence_errors() {
        let p = params(true, 65536, 4096, 1);
        let mut t = tags();
        let fresh = |t: &mut dyn FnMut() -> u32| {
            let mut w = PendingWrite::new(8192, 8192, &[], true, &p).unwrap();
            let r = w.solicit(&p, t);
            assert_eq!(r.len(), 1);
            (w, r[0].ttt)
        };
        let (mut w, ttt) = fresh(&mut t);
        w.data_out(&dout(ttt, 1, 0, 512, false)).unwrap();
        assert_eq!(
            w.sequence_error(),
            Some(&DataOutError::DataSn { want: 0, got: 1 })
        );
        let (mut w, ttt) = fresh(&mut t);
        w.data_out(&dout(ttt, 0, 0, 512, false)).unwrap();
        assert_eq!(w.sequence_error(), None);
        w.data_out(&dout(ttt, 0, 512, 512, false)).unwrap();
        assert_eq!(
            w.sequence_error(),
            Some(&DataOutError::DataSn { want: 1, got: 0 }),
            "two PDUs with DataSN 0"
        );
        let (mut w, ttt) = fresh(&mut t);
        assert_eq!(
            w.data_out(&dout(ttt, 0, 512, 512, false)),
            Err(DataOutError::Offset { want: 0, got: 512 })
        );
        let (mut w, ttt) = fresh(&mut t);
        assert_eq!(
            w.data_out(&dout(ttt, 0, 0, 8192, true)),
            Err(DataOutError::TooMuch {
                offset: 0,
                len: 8192,
                limit: 4096
            })
        );
        let (mut w, ttt) = fresh(&mut t);
        assert_eq!(
            w.data_out(&dout(ttt + 7, 0, 0, 512, false)),
            Err(DataOutError::UnknownTtt(ttt + 7))
        );
        assert_eq!(
            w.data_out(&dout(RESERVED_TAG, 0, 0, 512, false)),
            Err(DataOutError::Unsolicited)
        );
        assert_eq!(
            PendingWrite::new(8192, 8192, &[], false, &p).err(),
            Some(DataOutError::Unsolicited),
            "F=0 with InitialR2T=Yes"
        );
        assert_eq!(
            PendingWrite::new(100, 100, &[0; 200], true, &p).err(),
            Some(DataOutError::ImmediateTooLong { len: 200, max: 100 })
        );
        let no_imm = Params {
            immediate_data: false,
            ..p
        };
        assert_eq!(
            PendingWrite::new(8192, 8192, &[0; 1], true, &no_imm).err(),
            Some(DataOutError::ImmediateNotAllowed)
        );
    }

    #[test]
    fn dropped_write_takes_only_unsolicited_data() {
        let p = params(false, 4096, 4096, 1);
        let mut w = PendingWrite::new(1 << 30, 0, &[0; 512], false, &p).unwrap();
        assert!(!w.complete());
        w.data_out(&dout(RESERVED_TAG, 0, 512, 512, true)).unwrap();
        assert!(w.complete());
        assert!(w.solicit(&p, tags()).is_empty());
        let w = PendingWrite::new(1 << 30, 0, &[], true, &p).unwrap();
        assert!(w.complete());
        assert!(w.into_data().is_empty());
    }

    #[test]
    fn residuals_solicit_only_what_the_command_needs() {
        // EDTL 8192 but the CDB needs 4096 (underflow): the extra
        // unsolicited bytes are taken and dropped.
        let p = params(false, 65536, 65536, 1);
        let mut w = PendingWrite::new(8192, 4096, &[1; 6000], false, &p).unwrap();
        w.data_out(&dout(RESERVED_TAG, 0, 6000, 2192, true))
            .unwrap();
        assert!(w.complete());
        assert_eq!(w.into_data().len(), 4096);
        // EDTL 200, the CDB says one block (overflow): 200 bytes are kept.
        let p = params(true, 65536, 65536, 1);
        let mut w = PendingWrite::new(200, 4096, &[], true, &p).unwrap();
        let r = w.solicit(&p, tags());
        assert_eq!((r[0].offset, r[0].len), (0, 200));
        w.data_out(&dout(r[0].ttt, 0, 0, 200, true)).unwrap();
        assert!(w.complete());
        assert_eq!(w.into_data().len(), 200);
    }

    #[test]
    fn zero_length_write_is_complete() {
        let p = params(true, 65536, 4096, 1);
        let mut w = PendingWrite::new(0, 0, &[], true, &p).unwrap();
        assert!(w.complete());
        assert!(w.solicit(&p, tags()).is_empty());
    }
}
