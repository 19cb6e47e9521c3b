//! iSCSI PDUs (RFC 7143 §11): framing, decoding of initiator PDUs and
//! encoding of target PDUs. Pure: bytes in, typed values out, no IO.
//!
//! A PDU is a 48-byte Basic Header Segment (BHS), optional Additional
//! Header Segments (AHS, in 4-byte words), an optional header digest, a
//! data segment padded to 4 bytes and an optional data digest (CRC32C).
//! [`check_frame`] finds where one PDU ends and checks its digests and its
//! data length against the negotiated limit *before* the caller buffers
//! the data; [`parse_request`] turns a BHS and its data into a
//! [`Request`]. Target PDUs are built as a [`OutPdu`] (a BHS and data);
//! sequence numbers are stamped by the connection's writer
//! ([`stamp_seq`]) because StatSN is assigned in sending order.

use bytes::Bytes;

/// Length of the Basic Header Segment.
pub const BHS_LEN: usize = 48;
/// The reserved tag value ("no task", "no reply wanted").
pub const RESERVED_TAG: u32 = 0xffff_ffff;

// Initiator opcodes.
pub const OP_NOP_OUT: u8 = 0x00;
pub const OP_SCSI_CMD: u8 = 0x01;
pub const OP_TASK_MGMT: u8 = 0x02;
pub const OP_LOGIN: u8 = 0x03;
pub const OP_TEXT: u8 = 0x04;
pub const OP_DATA_OUT: u8 = 0x05;
pub const OP_LOGOUT: u8 = 0x06;
pub const OP_SNACK: u8 = 0x10;
// Target opcodes.
pub const OP_NOP_IN: u8 = 0x20;
pub const OP_SCSI_RESP: u8 = 0x21;
pub const OP_TASK_MGMT_RESP: u8 = 0x22;
pub const OP_LOGIN_RESP: u8 = 0x23;
pub const OP_TEXT_RESP: u8 = 0x24;
pub const OP_DATA_IN: u8 = 0x25;
pub const OP_LOGOUT_RESP: u8 = 0x26;
pub const OP_R2T: u8 = 0x31;
pub const OP_ASYNC: u8 = 0x32;
pub const OP_REJECT: u8 = 0x3f;

// Reject reasons (§11.17.1).
pub const REJECT_DATA_DIGEST: u8 = 0x02;
pub const REJECT_SNACK: u8 = 0x03;
pub const REJECT_PROTOCOL: u8 = 0x04;
pub const REJECT_NOT_SUPPORTED: u8 = 0x05;
pub const REJECT_IMMEDIATE: u8 = 0x06;
pub const REJECT_INVALID_FIELD: u8 = 0x09;

// Task management functions (§11.5.1) and responses (§11.6.1).
pub const TMF_ABORT_TASK: u8 = 1;
pub const TMF_ABORT_TASK_SET: u8 = 2;
pub const TMF_LUN_RESET: u8 = 5;
pub const TMF_COMPLETE: u8 = 0;
pub const TMF_NO_TASK: u8 = 1;
pub const TMF_NO_LUN: u8 = 2;
pub const TMF_NOT_SUPPORTED: u8 = 5;

/// Which digests are in force on a connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Digests {
    pub header: bool,
    pub data: bool,
}

/// Why bytes are not a well-formed PDU. Each ends the connection: the
/// stream cannot be trusted to be in sync afterwards.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PduError {
    #[error("Data segment of {len} bytes is larger than the {max} negotiated")]
    DataTooLong { len: u32, max: u32 },
    #[error("Header digest mismatch")]
    HeaderDigest,
    #[error("Data digest mismatch")]
    DataDigest,
    #[error("Opcode {opcode:#04x}: {what}")]
    Invalid { opcode: u8, what: &'static str },
}

/// Where one complete PDU lies in a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameInfo {
    /// Bytes the whole PDU takes, digests and padding included.
    pub total: usize,
    /// AHS bytes after the BHS.
    pub ahs_len: usize,
    /// Offset of the data segment.
    pub data_start: usize,
    /// Data segment length (without padding).
    pub data_len: usize,
}

/// The data segment length a BHS announces.
pub fn data_segment_len(bhs: &[u8]) -> u32 {
    u32::from_be_bytes([0, bhs[5], bhs[6], bhs[7]])
}

fn pad4(n: usize) -> usize {
    (n + 3) & !3
}

/// CRC32C as iSCSI puts it on the wire (little-endian bytes).
pub fn crc32c(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

/// Looks at the start of `buf`: `Ok(None)` when fewer bytes than the
/// header (or the whole PDU) are there yet, the frame's layout when it is
/// complete. The announced data length is checked against `max_data`
/// as soon as the BHS is there, so a caller can refuse to buffer a hostile
/// length before reading it.
pub fn check_frame(
    buf: &[u8],
    digests: Digests,
    max_data: u32,
) -> Result<Option<FrameInfo>, PduError> {
    if buf.len() < BHS_LEN {
        return Ok(None);
    }
    let ahs_len = buf[4] as usize * 4;
    let dsl = data_segment_len(buf);
    if dsl > max_data {
        return Err(PduError::DataTooLong {
            len: dsl,
            max: max_data,
        });
    }
    let data_len = dsl as usize;
    let hd = if digests.header { 4 } else { 0 };
    let data_start = BHS_LEN + ahs_len + hd;
    let dd = if digests.data && data_len > 0 { 4 } else { 0 };
    let total = data_start + pad4(data_len) + dd;
    if buf.len() < total {
        return Ok(None);
    }
    if digests.header {
        let want = u32::from_le_bytes(
            buf[BHS_LEN + ahs_len..data_start]
                .try_into()
                .unwrap_or([0; 4]),
        );
        if crc32c(&buf[..BHS_LEN + ahs_len]) != want {
            return Err(PduError::HeaderDigest);
        }
    }
    if dd != 0 {
        let end = data_start + pad4(data_len);
        let want = u32::from_le_bytes(buf[end..end + 4].try_into().unwrap_or([0; 4]));
        if crc32c(&buf[data_start..end]) != want {
            return Err(PduError::DataDigest);
        }
    }
    Ok(Some(FrameInfo {
        total,
        ahs_len,
        data_start,
        data_len,
    }))
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

/// A SCSI Command PDU (§11.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScsiCommand {
    pub immediate: bool,
    /// No unsolicited Data-Out follows.
    pub final_: bool,
    pub read: bool,
    pub write: bool,
    pub lun: [u8; 8],
    pub itt: u32,
    /// Expected Data Transfer Length.
    pub edtl: u32,
    pub cmdsn: u32,
    pub cdb: [u8; 16],
    /// Immediate data.
    pub data: Bytes,
}

/// A Data-Out PDU (§11.7).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataOut {
    pub final_: bool,
    pub itt: u32,
    pub ttt: u32,
    pub datasn: u32,
    pub offset: u32,
    pub data: Bytes,
}

/// A Login Request PDU (§11.12).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginRequest {
    pub transit: bool,
    pub continue_: bool,
    pub csg: u8,
    pub nsg: u8,
    pub version_max: u8,
    pub version_min: u8,
    pub isid: [u8; 6],
    pub tsih: u16,
    pub itt: u32,
    pub cid: u16,
    pub cmdsn: u32,
    pub exp_statsn: u32,
    pub data: Bytes,
}

/// A Text Request PDU (§11.10).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextRequest {
    pub immediate: bool,
    pub final_: bool,
    pub continue_: bool,
    pub itt: u32,
    pub ttt: u32,
    pub cmdsn: u32,
    pub data: Bytes,
}

/// An initiator PDU, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    NopOut {
        immediate: bool,
        lun: [u8; 8],
        itt: u32,
        ttt: u32,
        cmdsn: u32,
        data: Bytes,
    },
    Scsi(ScsiCommand),
    TaskMgmt {
        immediate: bool,
        function: u8,
        lun: [u8; 8],
        itt: u32,
        rtt: u32,
        cmdsn: u32,
        ref_cmdsn: u32,
    },
    Login(LoginRequest),
    Text(TextRequest),
    DataOut(DataOut),
    Logout {
        immediate: bool,
        reason: u8,
        itt: u32,
        cid: u16,
        cmdsn: u32,
    },
    Snack {
        itt: u32,
    },
    /// An opcode a target never receives or does not know.
    Unknown {
        opcode: u8,
        itt: u32,
    },
}

impl Request {
    /// The initiator task tag, for Reject PDUs and logs.
    pub fn itt(&self) -> u32 {
        match self {
            Request::NopOut { itt, .. }
            | Request::TaskMgmt { itt, .. }
            | Request::Logout { itt, .. }
            | Request::Snack { itt }
            | Request::Unknown { itt, .. } => *itt,
            Request::Scsi(c) => c.itt,
            Request::Login(l) => l.itt,
            Request::Text(t) => t.itt,
            Request::DataOut(d) => d.itt,
        }
    }
}

/// Decodes an initiator PDU from its BHS, AHS and data segment.
pub fn parse_request(bhs: &[u8; BHS_LEN], ahs: &[u8], data: Bytes) -> Result<Request, PduError> {
    let immediate = bhs[0] & 0x40 != 0;
    let opcode = bhs[0] & 0x3f;
    let f = bhs[1] & 0x80 != 0;
    let mut lun = [0u8; 8];
    lun.copy_from_slice(&bhs[8..16]);
    let itt = be32(bhs, 16);
    let invalid = |what| PduError::Invalid { opcode, what };
    Ok(match opcode {
        OP_NOP_OUT => {
            let ttt = be32(bhs, 20);
            if itt == RESERVED_TAG && !immediate {
                return Err(invalid("NOP-Out without a reply must be immediate"));
            }
            Request::NopOut {
                immediate,
                lun,
                itt,
                ttt,
                cmdsn: be32(bhs, 24),
                data,
            }
        }
        OP_SCSI_CMD => {
            if !ahs.is_empty() {
                return Err(invalid("additional header segments are not supported"));
            }
            let mut cdb = [0u8; 16];
            cdb.copy_from_slice(&bhs[32..48]);
            Request::Scsi(ScsiCommand {
                immediate,
                final_: f,
                read: bhs[1] & 0x40 != 0,
                write: bhs[1] & 0x20 != 0,
                lun,
                itt,
                edtl: be32(bhs, 20),
                cmdsn: be32(bhs, 24),
                cdb,
                data,
            })
        }
        OP_TASK_MGMT => Request::TaskMgmt {
            immediate,
            function: bhs[1] & 0x7f,
            lun,
            itt,
            rtt: be32(bhs, 20),
            cmdsn: be32(bhs, 24),
            ref_cmdsn: be32(bhs, 32),
        },
        OP_LOGIN => {
            let mut isid = [0u8; 6];
            isid.copy_from_slice(&bhs[8..14]);
            let transit = f;
            let continue_ = bhs[1] & 0x40 != 0;
            if transit && continue_ {
                return Err(invalid("login with both T and C bits"));
            }
            Request::Login(LoginRequest {
                transit,
                continue_,
                csg: (bhs[1] >> 2) & 3,
                nsg: bhs[1] & 3,
                version_max: bhs[2],
                version_min: bhs[3],
                isid,
                tsih: be16(bhs, 14),
                itt,
                cid: be16(bhs, 20),
                cmdsn: be32(bhs, 24),
                exp_statsn: be32(bhs, 28),
                data,
            })
        }
        OP_TEXT => {
            let continue_ = bhs[1] & 0x40 != 0;
            if f && continue_ {
                return Err(invalid("text request with both F and C bits"));
            }
            Request::Text(TextRequest {
                immediate,
                final_: f,
                continue_,
                itt,
                ttt: be32(bhs, 20),
                cmdsn: be32(bhs, 24),
                data,
            })
        }
        OP_DATA_OUT => Request::DataOut(DataOut {
            final_: f,
            itt,
            ttt: be32(bhs, 20),
            datasn: be32(bhs, 36),
            offset: be32(bhs, 40),
            data,
        }),
        OP_LOGOUT => Request::Logout {
            immediate,
            reason: bhs[1] & 0x7f,
            itt,
            cid: be16(bhs, 20),
            cmdsn: be32(bhs, 24),
        },
        OP_SNACK => Request::Snack { itt },
        _ => Request::Unknown { opcode, itt },
    })
}

/// How the writer fills the sequence number fields of a target PDU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seq {
    /// Carries a status: StatSN is assigned and advanced.
    Status,
    /// Carries the next StatSN without advancing it (R2T, unsolicited NOP-In).
    Peek,
    /// No StatSN (Data-In without status); ExpCmdSN/MaxCmdSN still set.
    Window,
}

/// A target PDU ready to send, except for its sequence numbers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutPdu {
    pub bhs: [u8; BHS_LEN],
    pub data: Bytes,
    pub seq: Seq,
}

impl OutPdu {
    fn new(opcode: u8, flags: u8, seq: Seq) -> OutPdu {
        let mut bhs = [0u8; BHS_LEN];
        bhs[0] = opcode;
        bhs[1] = flags;
        OutPdu {
            bhs,
            data: Bytes::new(),
            seq,
        }
    }

    fn with_data(mut self, data: Bytes) -> OutPdu {
        let n = data.len() as u32;
        self.bhs[5..8].copy_from_slice(&n.to_be_bytes()[1..]);
        self.data = data;
        self
    }

    fn itt(mut self, itt: u32) -> OutPdu {
        put32(&mut self.bhs, 16, itt);
        self
    }

    fn lun(mut self, lun: [u8; 8]) -> OutPdu {
        self.bhs[8..16].copy_from_slice(&lun);
        self
    }

    fn u32_at(mut self, at: usize, v: u32) -> OutPdu {
        put32(&mut self.bhs, at, v);
        self
    }
}

/// Writes StatSN (when the PDU carries one), ExpCmdSN and MaxCmdSN.
pub fn stamp_seq(bhs: &mut [u8; BHS_LEN], statsn: Option<u32>, exp_cmdsn: u32, max_cmdsn: u32) {
    if let Some(s) = statsn {
        put32(bhs, 24, s);
    }
    put32(bhs, 28, exp_cmdsn);
    put32(bhs, 32, max_cmdsn);
}

/// Appends `pdu` as it goes on the wire: BHS, header digest, data,
/// padding, data digest.
pub fn encode(out: &mut Vec<u8>, bhs: &[u8; BHS_LEN], data: &[u8], digests: Digests) {
    out.extend_from_slice(bhs);
    if digests.header {
        out.extend_from_slice(&crc32c(bhs).to_le_bytes());
    }
    if !data.is_empty() {
        let start = out.len();
        out.extend_from_slice(data);
        out.resize(start + pad4(data.len()), 0);
        if digests.data {
            let d = crc32c(&out[start..]);
            out.extend_from_slice(&d.to_le_bytes());
        }
    }
}

/// Residual flags and count of a response (§11.4.5).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Residual {
    pub overflow: bool,
    pub underflow: bool,
    pub count: u32,
}

impl Residual {
    /// From the expected (EDTL) and the actual transfer length.
    pub fn of(expected: u32, actual: u64) -> Residual {
        let e = expected as u64;
        if actual > e {
            Residual {
                overflow: true,
                underflow: false,
                count: (actual - e).min(u32::MAX as u64) as u32,
            }
        } else if actual < e {
            Residual {
                overflow: false,
                underflow: true,
                count: (e - actual) as u32,
            }
        } else {
            Residual::default()
        }
    }

    fn flags(&self) -> u8 {
        (if self.overflow { 0x04 } else { 0 }) | (if self.underflow { 0x02 } else { 0 })
    }
}

/// SCSI Response (§11.4) with a status and, for CHECK CONDITION, sense
/// data (sent as a 2-byte length followed by the sense bytes).
pub fn scsi_response(
    itt: u32,
    status: u8,
    sense: Option<&[u8]>,
    residual: Residual,
    exp_datasn: u32,
) -> OutPdu {
    let mut p = OutPdu::new(OP_SCSI_RESP, 0x80 | residual.flags(), Seq::Status).itt(itt);
    p.bhs[3] = status;
    p = p.u32_at(36, exp_datasn).u32_at(44, residual.count);
    if let Some(s) = sense {
        let mut d = Vec::with_capacity(2 + s.len());
        d.extend_from_slice(&(s.len() as u16).to_be_bytes());
        d.extend_from_slice(s);
        p = p.with_data(Bytes::from(d));
    }
    p
}

/// One Data-In PDU (§11.7). With `status`, the status is collapsed into
/// it (S bit) and it advances StatSN.
pub fn data_in(
    itt: u32,
    lun: [u8; 8],
    datasn: u32,
    offset: u32,
    data: Bytes,
    final_: bool,
    status: Option<(u8, Residual)>,
) -> OutPdu {
    let mut flags = if final_ { 0x80 } else { 0 };
    let mut seq = Seq::Window;
    let mut count = 0;
    if let Some((_, r)) = status {
        flags |= 0x01 | r.flags();
        seq = Seq::Status;
        count = r.count;
    }
    let mut p = OutPdu::new(OP_DATA_IN, flags, seq)
        .itt(itt)
        .lun(lun)
        .u32_at(20, RESERVED_TAG)
        .u32_at(36, datasn)
        .u32_at(40, offset)
        .u32_at(44, count)
        .with_data(data);
    if let Some((s, _)) = status {
        p.bhs[3] = s;
    }
    p
}

/// Ready To Transfer (§11.8): asks for `len` bytes at `offset`.
pub fn r2t(itt: u32, lun: [u8; 8], ttt: u32, r2tsn: u32, offset: u32, len: u32) -> OutPdu {
    OutPdu::new(OP_R2T, 0x80, Seq::Peek)
        .itt(itt)
        .lun(lun)
        .u32_at(20, ttt)
        .u32_at(36, r2tsn)
        .u32_at(40, offset)
        .u32_at(44, len)
}

/// NOP-In (§11.19): an answer to a NOP-Out (`itt` set, `ttt` reserved,
/// advances StatSN) or a ping of our own (`itt` reserved, `ttt` set).
pub fn nop_in(itt: u32, ttt: u32, lun: [u8; 8], data: Bytes) -> OutPdu {
    let seq = if itt == RESERVED_TAG {
        Seq::Peek
    } else {
        Seq::Status
    };
    OutPdu::new(OP_NOP_IN, 0x80, seq)
        .itt(itt)
        .lun(lun)
        .u32_at(20, ttt)
        .with_data(data)
}

/// Task Management Function Response (§11.6).
pub fn task_mgmt_response(itt: u32, response: u8) -> OutPdu {
    let mut p = OutPdu::new(OP_TASK_MGMT_RESP, 0x80, Seq::Status).itt(itt);
    p.bhs[2] = response;
    p
}

/// Text Response (§11.11), always final.
pub fn text_response(itt: u32, data: Bytes) -> OutPdu {
    OutPdu::new(OP_TEXT_RESP, 0x80, Seq::Status)
        .itt(itt)
        .u32_at(20, RESERVED_TAG)
        .with_data(data)
}

/// Logout Response (§11.15).
pub fn logout_response(itt: u32, response: u8) -> OutPdu {
    let mut p = OutPdu::new(OP_LOGOUT_RESP, 0x80, Seq::Status).itt(itt);
    p.bhs[2] = response;
    p
}

/// Reject (§11.17): carries the rejected PDU's BHS.
pub fn reject(reason: u8, rejected: &[u8; BHS_LEN]) -> OutPdu {
    let mut p = OutPdu::new(OP_REJECT, 0x80, Seq::Status)
        .itt(RESERVED_TAG)
        .with_data(Bytes::copy_from_slice(rejected));
    p.bhs[2] = reason;
    p
}

/// Login Response (§11.13).
#[allow(clippy::too_many_arguments)]
pub fn login_response(
    req: &LoginRequest,
    transit: bool,
    csg: u8,
    nsg: u8,
    tsih: u16,
    status: (u8, u8),
    data: Bytes,
) -> OutPdu {
    let flags =
        (if transit { 0x80 } else { 0 }) | (csg & 3) << 2 | if transit { nsg & 3 } else { 0 };
    let mut p = OutPdu::new(OP_LOGIN_RESP, flags, Seq::Status)
        .itt(req.itt)
        .with_data(data);
    p.bhs[2] = 0; // VersionMax
    p.bhs[3] = 0; // VersionActive
    p.bhs[8..14].copy_from_slice(&req.isid);
    p.bhs[14..16].copy_from_slice(&tsih.to_be_bytes());
    p.bhs[36] = status.0;
    p.bhs[37] = status.1;
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bhs(opcode: u8, flags: u8) -> [u8; BHS_LEN] {
        let mut b = [0u8; BHS_LEN];
        b[0] = opcode;
        b[1] = flags;
        b
    }

    #[test]
    fn frame_needs_whole_pdu() {
        let mut b = bhs(OP_NOP_OUT | 0x40, 0x80).to_vec();
        b[7] = 5; // 5 data bytes, padded to 8
        let none = Digests::default();
        assert_eq!(check_frame(&b[..47], none, 8192), Ok(None));
        assert_eq!(check_frame(&b, none, 8192), Ok(None));
        b.extend_from_slice(&[1, 2, 3, 4, 5, 0, 0]);
        assert_eq!(check_frame(&b, none, 8192), Ok(None));
        b.push(0);
        let f = check_frame(&b, none, 8192).unwrap().unwrap();
        assert_eq!(
            (f.total, f.data_start, f.data_len, f.ahs_len),
            (56, 48, 5, 0)
        );
    }

    #[test]
    fn frame_rejects_long_data_before_it_arrives() {
        let mut b = bhs(OP_SCSI_CMD, 0x80).to_vec();
        b[5..8].copy_from_slice(&[0xff, 0xff, 0xff]);
        assert_eq!(
            check_frame(&b, Digests::default(), 262144),
            Err(PduError::DataTooLong {
                len: 0xff_ffff,
                max: 262144
            })
        );
    }

    #[test]
    fn frame_with_ahs_and_digests() {
        let d = Digests {
            header: true,
            data: true,
        };
        let mut h = bhs(OP_NOP_OUT | 0x40, 0x80);
        h[4] = 1; // one AHS word
        h[7] = 3;
        let mut b = h.to_vec();
        b.extend_from_slice(&[9, 9, 9, 9]); // AHS
        let hd = crc32c(&b);
        b.extend_from_slice(&hd.to_le_bytes());
        b.extend_from_slice(&[7, 7, 7, 0]);
        let dd = crc32c(&[7, 7, 7, 0]);
        b.extend_from_slice(&dd.to_le_bytes());
        let f = check_frame(&b, d, 8192).unwrap().unwrap();
        assert_eq!(
            (f.total, f.ahs_len, f.data_start, f.data_len),
            (64, 4, 56, 3)
        );
        let mut bad = b.clone();
        bad[10] ^= 1;
        assert_eq!(check_frame(&bad, d, 8192), Err(PduError::HeaderDigest));
        let mut bad = b.clone();
        bad[57] ^= 1;
        assert_eq!(check_frame(&bad, d, 8192), Err(PduError::DataDigest));
    }

    #[test]
    fn crc32c_known_value() {
        // RFC 7143 appendix / iSCSI test vector: 32 bytes of zeros.
        assert_eq!(crc32c(&[0u8; 32]), 0x8a91_36aa);
        assert_eq!(crc32c(&[0xffu8; 32]), 0x62a8_ab43);
    }

    #[test]
    fn parse_scsi_command() {
        let mut b = bhs(OP_SCSI_CMD | 0x40, 0x80 | 0x20 | 1);
        b[8..16].copy_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
        b[16..20].copy_from_slice(&7u32.to_be_bytes());
        b[20..24].copy_from_slice(&4096u32.to_be_bytes());
        b[24..28].copy_from_slice(&9u32.to_be_bytes());
        b[32] = 0x2a;
        let r = parse_request(&b, &[], Bytes::from_static(b"x")).unwrap();
        let Request::Scsi(c) = r else { panic!() };
        assert!(c.immediate && c.final_ && c.write && !c.read);
        assert_eq!((c.itt, c.edtl, c.cmdsn, c.cdb[0]), (7, 4096, 9, 0x2a));
        assert_eq!(c.lun, [0, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(
            parse_request(&b, &[0; 4], Bytes::new()),
            Err(PduError::Invalid {
                opcode: 1,
                what: "additional header segments are not supported"
            })
        );
    }

    #[test]
    fn parse_table() {
        let mut login = bhs(OP_LOGIN | 0x40, 0x80 | 0x04 | 0x03);
        login[8..14].copy_from_slice(&[0x80, 1, 2, 3, 4, 5]);
        login[14..16].copy_from_slice(&0x1234u16.to_be_bytes());
        login[20..22].copy_from_slice(&1u16.to_be_bytes());
        let r = parse_request(&login, &[], Bytes::new()).unwrap();
        let Request::Login(l) = r else { panic!() };
        assert!(l.transit && !l.continue_);
        assert_eq!((l.csg, l.nsg, l.tsih, l.cid), (1, 3, 0x1234, 1));
        assert_eq!(l.isid, [0x80, 1, 2, 3, 4, 5]);

        let both = bhs(OP_LOGIN | 0x40, 0xc0);
        assert!(parse_request(&both, &[], Bytes::new()).is_err());

        let mut nop = bhs(OP_NOP_OUT, 0x80);
        nop[16..20].copy_from_slice(&RESERVED_TAG.to_be_bytes());
        assert!(
            parse_request(&nop, &[], Bytes::new()).is_err(),
            "reply-less NOP-Out must be immediate"
        );
        nop[0] |= 0x40;
        assert!(matches!(
            parse_request(&nop, &[], Bytes::new()),
            Ok(Request::NopOut {
                immediate: true,
                ..
            })
        ));

        let mut dout = bhs(OP_DATA_OUT, 0x80);
        dout[16..20].copy_from_slice(&3u32.to_be_bytes());
        dout[20..24].copy_from_slice(&4u32.to_be_bytes());
        dout[36..40].copy_from_slice(&5u32.to_be_bytes());
        dout[40..44].copy_from_slice(&8192u32.to_be_bytes());
        assert_eq!(
            parse_request(&dout, &[], Bytes::new()).unwrap(),
            Request::DataOut(DataOut {
                final_: true,
                itt: 3,
                ttt: 4,
                datasn: 5,
                offset: 8192,
                data: Bytes::new()
            })
        );

        let mut tmf = bhs(OP_TASK_MGMT | 0x40, 0x80 | TMF_ABORT_TASK);
        tmf[20..24].copy_from_slice(&11u32.to_be_bytes());
        tmf[32..36].copy_from_slice(&12u32.to_be_bytes());
        assert!(matches!(
            parse_request(&tmf, &[], Bytes::new()).unwrap(),
            Request::TaskMgmt {
                function: TMF_ABORT_TASK,
                rtt: 11,
                ref_cmdsn: 12,
                ..
            }
        ));
        let lo = bhs(OP_LOGOUT | 0x40, 0x80);
        assert!(matches!(
            parse_request(&lo, &[], Bytes::new()).unwrap(),
            Request::Logout { reason: 0, .. }
        ));
        let odd = bhs(0x1c, 0);
        assert_eq!(
            parse_request(&odd, &[], Bytes::new()).unwrap(),
            Request::Unknown {
                opcode: 0x1c,
                itt: 0
            }
        );
    }

    #[test]
    fn encode_pads_and_digests() {
        let p = nop_in(5, RESERVED_TAG, [0; 8], Bytes::from_static(b"abc"));
        let mut out = Vec::new();
        encode(&mut out, &p.bhs, &p.data, Digests::default());
        assert_eq!(out.len(), 52);
        assert_eq!(&out[48..], b"abc\0");
        assert_eq!(&out[5..8], &[0, 0, 3]);
        let mut out2 = Vec::new();
        let d = Digests {
            header: true,
            data: true,
        };
        encode(&mut out2, &p.bhs, &p.data, d);
        assert_eq!(out2.len(), 48 + 4 + 4 + 4);
        let f = check_frame(&out2, d, 8192).unwrap().unwrap();
        assert_eq!(f.total, out2.len());
    }

    #[test]
    fn response_fields() {
        let r = scsi_response(9, 0x02, Some(&[0x70, 0, 5]), Residual::of(4096, 8192), 3);
        assert_eq!(r.bhs[0], OP_SCSI_RESP);
        assert_eq!(r.bhs[1], 0x80 | 0x04);
        assert_eq!(r.bhs[3], 0x02);
        assert_eq!(&r.bhs[44..48], &4096u32.to_be_bytes());
        assert_eq!(&r.data[..], &[0, 3, 0x70, 0, 5]);
        assert_eq!(Residual::of(10000, 4096).count, 10000 - 4096);
        assert!(Residual::of(10000, 4096).underflow);

        let d = data_in(
            1,
            [0; 8],
            2,
            4096,
            Bytes::from_static(&[1; 8]),
            true,
            Some((0, Residual::default())),
        );
        assert_eq!(d.bhs[1], 0x81);
        assert_eq!(d.seq, Seq::Status);
        assert_eq!(&d.bhs[36..40], &2u32.to_be_bytes());
        assert_eq!(&d.bhs[40..44], &4096u32.to_be_bytes());
        let d = data_in(1, [0; 8], 0, 0, Bytes::new(), false, None);
        assert_eq!((d.bhs[1], d.seq), (0, Seq::Window));

        let mut b = d.bhs;
        stamp_seq(&mut b, Some(7), 8, 9);
        assert_eq!(&b[24..36], &[0, 0, 0, 7, 0, 0, 0, 8, 0, 0, 0, 9]);
    }
}
