//! SCSI CDB parsing (SBC-3, SPC-4): 16 bytes in, a typed [`Command`]
//! out, or the sense an initiator gets for a CDB it should not have
//! sent. Pure; checks against the device (capacity, limits) happen in
//! `lun`.

use super::sense::Sense;

pub const TEST_UNIT_READY: u8 = 0x00;
pub const REQUEST_SENSE: u8 = 0x03;
pub const READ_6: u8 = 0x08;
pub const WRITE_6: u8 = 0x0a;
pub const INQUIRY: u8 = 0x12;
pub const MODE_SELECT_6: u8 = 0x15;
pub const MODE_SENSE_6: u8 = 0x1a;
pub const READ_CAPACITY_10: u8 = 0x25;
pub const READ_10: u8 = 0x28;
pub const WRITE_10: u8 = 0x2a;
pub const WRITE_VERIFY_10: u8 = 0x2e;
pub const VERIFY_10: u8 = 0x2f;
pub const SYNCHRONIZE_CACHE_10: u8 = 0x35;
pub const WRITE_SAME_10: u8 = 0x41;
pub const UNMAP: u8 = 0x42;
pub const MODE_SELECT_10: u8 = 0x55;
pub const MODE_SENSE_10: u8 = 0x5a;
pub const READ_16: u8 = 0x88;
pub const COMPARE_AND_WRITE: u8 = 0x89;
pub const WRITE_16: u8 = 0x8a;
pub const WRITE_VERIFY_16: u8 = 0x8e;
pub const VERIFY_16: u8 = 0x8f;
pub const SYNCHRONIZE_CACHE_16: u8 = 0x91;
pub const WRITE_SAME_16: u8 = 0x93;
pub const SERVICE_ACTION_IN_16: u8 = 0x9e;
pub const REPORT_LUNS: u8 = 0xa0;
pub const MAINTENANCE_IN: u8 = 0xa3;
pub const PRE_FETCH_10: u8 = 0x34;
pub const PRE_FETCH_16: u8 = 0x90;
pub const ORWRITE_16: u8 = 0x8b;
pub const READ_12: u8 = 0xa8;
pub const WRITE_12: u8 = 0xaa;
pub const WRITE_VERIFY_12: u8 = 0xae;
pub const VERIFY_12: u8 = 0xaf;

pub const SA_READ_CAPACITY_16: u16 = 0x10;
pub const SA_GET_LBA_STATUS: u16 = 0x12;
pub const SA_REPORT_SUPPORTED_OPCODES: u16 = 0x0c;

/// The length of the CDB of `opcode` (by its group code).
pub fn cdb_len(opcode: u8) -> usize {
    match opcode >> 5 {
        0 => 6,
        1 | 2 => 10,
        4 => 16,
        5 => 12,
        _ => 16,
    }
}

/// A parsed command. `lba` and `blocks` are in logical blocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    TestUnitReady,
    RequestSense {
        desc: bool,
        alloc: u32,
    },
    Inquiry {
        evpd: bool,
        page: u8,
        alloc: u32,
    },
    ReadCapacity10,
    ReadCapacity16 {
        alloc: u32,
    },
    Read {
        lba: u64,
        blocks: u32,
    },
    Write {
        lba: u64,
        blocks: u32,
        fua: bool,
    },
    /// WRITE AND VERIFY: write, then read back and compare (BYTCHK=1) or
    /// just read back (BYTCHK=0).
    WriteVerify {
        lba: u64,
        blocks: u32,
    },
    Verify {
        lba: u64,
        blocks: u32,
        bytchk: bool,
    },
    SyncCache {
        lba: u64,
        blocks: u32,
    },
    WriteSame {
        lba: u64,
        blocks: u32,
        unmap: bool,
        ndob: bool,
    },
    Unmap {
        param_len: u32,
    },
    ModeSense {
        ten: bool,
        dbd: bool,
        pc: u8,
        page: u8,
        subpage: u8,
        alloc: u32,
    },
    ModeSelect {
        ten: bool,
        param_len: u32,
    },
    CompareAndWrite {
        lba: u64,
        blocks: u32,
        fua: bool,
    },
    /// ORWRITE: OR the Data-Out into the blocks.
    OrWrite {
        lba: u64,
        blocks: u32,
        fua: bool,
    },
    /// PRE-FETCH: nothing is cached ahead, so the answer is GOOD (SBC-3:
    /// CONDITION MET would promise the blocks are in cache).
    PreFetch {
        lba: u64,
        blocks: u32,
    },
    GetLbaStatus {
        lba: u64,
        alloc: u32,
    },
    ReportLuns {
        alloc: u32,
    },
    ReportOpcodes {
        rctd: bool,
        options: u8,
        opcode: u8,
        sa: u16,
        alloc: u32,
    },
}

fn be16(b: &[u8], at: usize) -> u32 {
    u16::from_be_bytes([b[at], b[at + 1]]) as u32
}
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap_or([0; 8]))
}

/// Parses a CDB. Unknown opcodes are INVALID COMMAND OPERATION CODE;
/// fields we cannot honour (protection information, NACA, saving mode
/// pages) are INVALID FIELD IN CDB.
pub fn parse(cdb: &[u8; 16]) -> Result<Command, Sense> {
    let op = cdb[0];
    let control = cdb[cdb_len(op) - 1];
    if control & 0x04 != 0 {
        return Err(Sense::INVALID_FIELD_IN_CDB); // NACA is not supported
    }
    let protect = cdb[1] >> 5;
    let fua = cdb[1] & 0x08 != 0;
    let bad = Err(Sense::INVALID_FIELD_IN_CDB);
    Ok(match op {
        TEST_UNIT_READY => Command::TestUnitReady,
        REQUEST_SENSE => Command::RequestSense {
            desc: cdb[1] & 1 != 0,
            alloc: cdb[4] as u32,
        },
        INQUIRY => {
            if cdb[1] & 0x02 != 0 {
                return bad; // CMDDT (obsolete)
            }
            let evpd = cdb[1] & 1 != 0;
            if !evpd && cdb[2] != 0 {
                return bad;
            }
            Command::Inquiry {
                evpd,
                page: cdb[2],
                alloc: be16(cdb, 3),
            }
        }
        READ_CAPACITY_10 => Command::ReadCapacity10,
        READ_6 | WRITE_6 => {
            let lba = ((cdb[1] & 0x1f) as u64) << 16 | (cdb[2] as u64) << 8 | cdb[3] as u64;
            let blocks = if cdb[4] == 0 { 256 } else { cdb[4] as u32 };
            if op == READ_6 {
                Command::Read { lba, blocks }
            } else {
                Command::Write {
                    lba,
                    blocks,
                    fua: false,
                }
            }
        }
        READ_10 | READ_12 | READ_16 | WRITE_10 | WRITE_12 | WRITE_16 | WRITE_VERIFY_10
        | WRITE_VERIFY_12 | WRITE_VERIFY_16 => {
            if protect != 0 {
                return bad;
            }
            let (lba, blocks) = lba_len(cdb);
            match op {
                READ_10 | READ_12 | READ_16 => Command::Read { lba, blocks },
                WRITE_10 | WRITE_12 | WRITE_16 => Command::Write { lba, blocks, fua },
                _ => Command::WriteVerify { lba, blocks },
            }
        }
        VERIFY_10 | VERIFY_12 | VERIFY_16 => {
            if protect != 0 {
                return bad;
            }
            let bytchk = (cdb[1] >> 1) & 3;
            if bytchk > 1 {
                return bad;
            }
            let (lba, blocks) = lba_len(cdb);
            Command::Verify {
                lba,
                blocks,
                bytchk: bytchk == 1,
            }
        }
        SYNCHRONIZE_CACHE_10 | SYNCHRONIZE_CACHE_16 => {
            let (lba, blocks) = lba_len(cdb);
            Command::SyncCache { lba, blocks }
        }
        WRITE_SAME_10 | WRITE_SAME_16 => {
            if protect != 0 || cdb[1] & 0x10 != 0 {
                return bad; // protection information, ANCHOR
            }
            let (lba, blocks) = lba_len(cdb);
            Command::WriteSame {
                lba,
                blocks,
                unmap: cdb[1] & 0x08 != 0,
                ndob: op == WRITE_SAME_16 && cdb[1] & 0x01 != 0,
            }
        }
        UNMAP => {
            if cdb[1] & 1 != 0 {
                return bad; // ANCHOR
            }
            Command::Unmap {
                param_len: be16(cdb, 7),
            }
        }
        MODE_SENSE_6 | MODE_SENSE_10 => {
            let ten = op == MODE_SENSE_10;
            Command::ModeSense {
                ten,
                dbd: cdb[1] & 0x08 != 0,
                pc: cdb[2] >> 6,
                page: cdb[2] & 0x3f,
                subpage: cdb[3],
                alloc: if ten { be16(cdb, 7) } else { cdb[4] as u32 },
            }
        }
        MODE_SELECT_6 | MODE_SELECT_10 => {
            let ten = op == MODE_SELECT_10;
            if cdb[1] & 0x01 != 0 {
                return bad; // SP: saving pages is not supported
            }
            if cdb[1] & 0x10 == 0 {
                return bad; // PF=0: vendor-specific pages
            }
            Command::ModeSelect {
                ten,
                param_len: if ten { be16(cdb, 7) } else { cdb[4] as u32 },
            }
        }
        COMPARE_AND_WRITE => {
            if protect != 0 {
                return bad;
            }
            Command::CompareAndWrite {
                lba: be64(cdb, 2),
                blocks: cdb[13] as u32,
                fua,
            }
        }
        ORWRITE_16 => {
            if protect != 0 {
                return bad;
            }
            let (lba, blocks) = lba_len(cdb);
            Command::OrWrite { lba, blocks, fua }
        }
        PRE_FETCH_10 | PRE_FETCH_16 => {
            let (lba, blocks) = lba_len(cdb);
            Command::PreFetch { lba, blocks }
        }
        SERVICE_ACTION_IN_16 => match (cdb[1] & 0x1f) as u16 {
            SA_READ_CAPACITY_16 => Command::ReadCapacity16 {
                alloc: be32(cdb, 10),
            },
            SA_GET_LBA_STATUS => Command::GetLbaStatus {
                lba: be64(cdb, 2),
                alloc: be32(cdb, 10),
            },
            _ => return Err(Sense::INVALID_FIELD_IN_CDB.at_cdb_byte(1)),
        },
        REPORT_LUNS => {
            if cdb[2] > 2 {
                return bad;
            }
            Command::ReportLuns {
                alloc: be32(cdb, 6),
            }
        }
        MAINTENANCE_IN => match (cdb[1] & 0x1f) as u16 {
            SA_REPORT_SUPPORTED_OPCODES => Command::ReportOpcodes {
                rctd: cdb[2] & 0x80 != 0,
                options: cdb[2] & 0x07,
                opcode: cdb[3],
                sa: be16(cdb, 4) as u16,
                alloc: be32(cdb, 6),
            },
            _ => return Err(Sense::INVALID_FIELD_IN_CDB.at_cdb_byte(1)),
        },
        _ => return Err(Sense::INVALID_OPCODE),
    })
}

/// LBA and transfer length at the places the 10/12/16-byte forms keep them.
fn lba_len(cdb: &[u8; 16]) -> (u64, u32) {
    match cdb_len(cdb[0]) {
        10 => (be32(cdb, 2) as u64, be16(cdb, 7)),
        12 => (be32(cdb, 2) as u64, be32(cdb, 6)),
        _ => (be64(cdb, 2), be32(cdb, 10)),
    }
}

impl Command {
    /// Bytes of Data-Out the command carries, for a logical block size.
    pub fn data_out_len(&self, block: u64) -> u64 {
        match *self {
            Command::Write { blocks, .. }
            | Command::WriteVerify { blocks, .. }
            | Command::OrWrite { blocks, .. } => blocks as u64 * block,
            Command::Verify {
                blocks,
                bytchk: true,
                ..
            } => blocks as u64 * block,
            Command::WriteSame { ndob: false, .. } => block,
            Command::CompareAndWrite { blocks, .. } => 2 * blocks as u64 * block,
            Command::Unmap { param_len } | Command::ModeSelect { param_len, .. } => {
                param_len as u64
            }
            _ => 0,
        }
    }

    /// Whether a pending unit attention is reported instead of running
    /// this command (SPC-4 §5.14: not for INQUIRY, REPORT LUNS, REQUEST SENSE).
    pub fn reports_unit_attention(&self) -> bool {
        !matches!(
            self,
            Command::Inquiry { .. } | Command::ReportLuns { .. } | Command::RequestSense { .. }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cdb(bytes: &[u8]) -> [u8; 16] {
        let mut c = [0u8; 16];
        c[..bytes.len()].copy_from_slice(bytes);
        c
    }

    #[test]
    fn table() {
        let cases: Vec<(&[u8], Result<Command, Sense>)> = vec![
            (&[0x00, 0, 0, 0, 0, 0], Ok(Command::TestUnitReady)),
            (&[0x00, 0, 0, 0, 0, 0x04], Err(Sense::INVALID_FIELD_IN_CDB)),
            (
                &[0x12, 0, 0, 0, 96, 0],
                Ok(Command::Inquiry {
                    evpd: false,
                    page: 0,
                    alloc: 96,
                }),
            ),
            (&[0x12, 0, 0x80, 0, 96, 0], Err(Sense::INVALID_FIELD_IN_CDB)),
            (
                &[0x12, 1, 0x83, 1, 0, 0],
                Ok(Command::Inquiry {
                    evpd: true,
                    page: 0x83,
                    alloc: 256,
                }),
            ),
            (
                &[0x08, 0x1f, 0xff, 0xff, 0, 0],
                Ok(Command::Read {
                    lba: 0x1f_ffff,
                    blocks: 256,
                }),
            ),
            (
                &[0x28, 0, 0, 0, 1, 0, 0, 0, 8, 0],
                Ok(Command::Read {
                    lba: 256,
                    blocks: 8,
                }),
            ),
            (
                &[0x28, 0x20, 0, 0, 1, 0, 0, 0, 8, 0],
                Err(Sense::INVALID_FIELD_IN_CDB),
            ),
            (
                &[0x2a, 0x08, 0, 0, 0, 9, 0, 0, 1, 0],
                Ok(Command::Write {
                    lba: 9,
                    blocks: 1,
                    fua: true,
                }),
            ),
            (
                &[0xaa, 0, 0, 0, 0, 1, 0, 0, 1, 0, 0, 0],
                Ok(Command::Write {
                    lba: 1,
                    blocks: 256,
                    fua: false,
                }),
            ),
            (
                &[0x8a, 0, 0, 0, 0, 0, 0, 0, 0, 7, 0, 0, 0, 2, 0, 0],
                Ok(Command::Write {
                    lba: 7,
                    blocks: 2,
                    fua: false,
                }),
            ),
            (
                &[0x2f, 0x02, 0, 0, 0, 3, 0, 0, 1, 0],
                Ok(Command::Verify {
                    lba: 3,
                    blocks: 1,
                    bytchk: true,
                }),
            ),
            (
                &[0x2f, 0x04, 0, 0, 0, 3, 0, 0, 1, 0],
                Err(Sense::INVALID_FIELD_IN_CDB),
            ),
            (
                &[0x93, 0x09, 0, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0, 4, 0, 0],
                Ok(Command::WriteSame {
                    lba: 5,
                    blocks: 4,
                    unmap: true,
                    ndob: true,
                }),
            ),
            (
                &[0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0],
                Ok(Command::Unmap { param_len: 24 }),
            ),
            (
                &[0x9e, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0],
                Ok(Command::ReadCapacity16 { alloc: 32 }),
            ),
            (
                &[0x9e, 0x11, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0],
                Err(Sense::INVALID_FIELD_IN_CDB.at_cdb_byte(1)),
            ),
            (
                &[0x89, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0],
                Ok(Command::CompareAndWrite {
                    lba: 1,
                    blocks: 1,
                    fua: false,
                }),
            ),
            (
                &[0x1a, 0x08, 0x3f, 0, 255, 0],
                Ok(Command::ModeSense {
                    ten: false,
                    dbd: true,
                    pc: 0,
                    page: 0x3f,
                    subpage: 0,
                    alloc: 255,
                }),
            ),
            (&[0x15, 0x11, 0, 0, 24, 0], Err(Sense::INVALID_FIELD_IN_CDB)),
            (
                &[0x15, 0x10, 0, 0, 24, 0],
                Ok(Command::ModeSelect {
                    ten: false,
                    param_len: 24,
                }),
            ),
            (
                &[0xa3, 0x0c, 0x81, 0x28, 0, 0, 0, 0, 2, 0, 0, 0],
                Ok(Command::ReportOpcodes {
                    rctd: true,
                    options: 1,
                    opcode: 0x28,
                    sa: 0,
                    alloc: 512,
                }),
            ),
            (
                &[0xa0, 0, 3, 0, 0, 0, 0, 0, 0, 16, 0, 0],
                Err(Sense::INVALID_FIELD_IN_CDB),
            ),
            (&[0x1b, 0, 0, 0, 1, 0], Err(Sense::INVALID_OPCODE)),
            (&[0xff; 16], Err(Sense::INVALID_FIELD_IN_CDB)),
            (
                &[0xc0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                Err(Sense::INVALID_OPCODE),
            ),
        ];
        for (bytes, want) in cases {
            assert_eq!(parse(&cdb(bytes)), want, "{bytes:02x?}");
        }
    }

    #[test]
    fn data_out_lengths() {
        let w = Command::Write {
            lba: 0,
            blocks: 3,
            fua: false,
        };
        assert_eq!(w.data_out_len(4096), 3 * 4096);
        let ws = Command::WriteSame {
            lba: 0,
            blocks: 100,
            unmap: false,
            ndob: false,
        };
        assert_eq!(ws.data_out_len(4096), 4096);
        let caw = Command::CompareAndWrite {
            lba: 0,
            blocks: 2,
            fua: false,
        };
        assert_eq!(caw.data_out_len(4096), 4 * 4096);
        assert_eq!(Command::Read { lba: 0, blocks: 9 }.data_out_len(4096), 0);
        assert!(!Command::ReportLuns { alloc: 16 }.reports_unit_attention());
        assert!(Command::TestUnitReady.reports_unit_attention());
    }
}
