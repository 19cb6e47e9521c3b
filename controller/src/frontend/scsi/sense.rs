//! SCSI status codes and sense data (SPC-4 §4.5): what a failed command
//! tells the initiator, and how a [`BackendError`] becomes sense.

use crate::frontend::BackendError;

pub const GOOD: u8 = 0x00;
pub const CHECK_CONDITION: u8 = 0x02;

// Sense keys.
pub const NO_SENSE: u8 = 0x0;
pub const NOT_READY: u8 = 0x2;
pub const MEDIUM_ERROR: u8 = 0x3;
pub const HARDWARE_ERROR: u8 = 0x4;
pub const ILLEGAL_REQUEST: u8 = 0x5;
pub const UNIT_ATTENTION: u8 = 0x6;
pub const DATA_PROTECT: u8 = 0x7;
pub const ABORTED_COMMAND: u8 = 0xb;
pub const MISCOMPARE: u8 = 0xe;

/// Sense key, additional sense code and qualifier, and the INFORMATION
/// field when it applies (the byte offset of a miscompare).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sense {
    pub key: u8,
    pub asc: u8,
    pub ascq: u8,
    pub info: Option<u32>,
    /// Sense-key specific field pointer: the CDB byte at fault.
    pub field: Option<u16>,
}

const fn s(key: u8, asc: u8, ascq: u8) -> Sense {
    Sense {
        key,
        asc,
        ascq,
        info: None,
        field: None,
    }
}

impl Sense {
    pub const INVALID_OPCODE: Sense = s(ILLEGAL_REQUEST, 0x20, 0x00);
    pub const LBA_OUT_OF_RANGE: Sense = s(ILLEGAL_REQUEST, 0x21, 0x00);
    pub const INVALID_FIELD_IN_CDB: Sense = s(ILLEGAL_REQUEST, 0x24, 0x00);
    pub const LUN_NOT_SUPPORTED: Sense = s(ILLEGAL_REQUEST, 0x25, 0x00);
    pub const INVALID_FIELD_IN_PARAMETER_LIST: Sense = s(ILLEGAL_REQUEST, 0x26, 0x00);
    pub const PARAMETER_LIST_LENGTH_ERROR: Sense = s(ILLEGAL_REQUEST, 0x1a, 0x00);
    pub const SAVING_NOT_SUPPORTED: Sense = s(ILLEGAL_REQUEST, 0x39, 0x00);
    /// SPC-4: INVALID FIELD IN COMMAND INFORMATION UNIT (EDTL disagrees
    /// with the CDB on a write).
    pub const INVALID_FIELD_IN_IU: Sense = s(ILLEGAL_REQUEST, 0x0e, 0x03);
    pub const CAPACITY_CHANGED: Sense = s(UNIT_ATTENTION, 0x2a, 0x09);
    pub const READ_ERROR: Sense = s(MEDIUM_ERROR, 0x11, 0x00);
    pub const WRITE_ERROR: Sense = s(MEDIUM_ERROR, 0x0c, 0x00);
    pub const NOT_READY_CAUSE_UNKNOWN: Sense = s(NOT_READY, 0x04, 0x00);
    /// LOGICAL UNIT IS IN PROCESS OF BECOMING READY: Linux's SCSI layer
    /// requeues the command (scsi_error.c, ASC 04h ASCQ 01h).
    pub const NOT_READY_BECOMING_READY: Sense = s(NOT_READY, 0x04, 0x01);
    /// LOGICAL UNIT NOT ACCESSIBLE, TARGET PORT IN UNAVAILABLE STATE: this
    /// port will not serve the unit again; another path (a newer
    /// controller) may.
    pub const NOT_READY_PORT_UNAVAILABLE: Sense = s(NOT_READY, 0x04, 0x0c);
    pub const WRITE_PROTECTED: Sense = s(DATA_PROTECT, 0x27, 0x00);
    pub const SPACE_ALLOCATION_FAILED: Sense = s(DATA_PROTECT, 0x27, 0x07);
    pub const INTERNAL_TARGET_FAILURE: Sense = s(HARDWARE_ERROR, 0x44, 0x00);
    /// ABORTED COMMAND, DATA PHASE ERROR: Data-Out out of sequence.
    pub const DATA_PHASE_ERROR: Sense = s(ABORTED_COMMAND, 0x4b, 0x00);
    pub const NONE: Sense = s(NO_SENSE, 0, 0);

    /// A miscompare at byte `offset` of the compared data.
    pub fn miscompare(offset: u32) -> Sense {
        Sense {
            info: Some(offset),
            ..s(MISCOMPARE, 0x1d, 0x00)
        }
    }

    /// The same sense pointing at CDB byte `byte` (SKSV, C/D set).
    pub fn at_cdb_byte(self, byte: u16) -> Sense {
        Sense {
            field: Some(byte),
            ..self
        }
    }

    /// Fixed-format sense data (response code 0x70), 18 bytes.
    pub fn fixed(&self) -> [u8; 18] {
        let mut b = [0u8; 18];
        b[0] = 0x70;
        b[2] = self.key & 0x0f;
        if let Some(info) = self.info {
            b[0] |= 0x80; // VALID: INFORMATION holds something
            b[3..7].copy_from_slice(&info.to_be_bytes());
        }
        b[7] = 10; // additional sense length
        b[12] = self.asc;
        b[13] = self.ascq;
        if let Some(f) = self.field {
            b[15] = 0xc0; // SKSV, C/D: the field is in the CDB
            b[16..18].copy_from_slice(&f.to_be_bytes());
        }
        b
    }

    /// The sense for a backend failure during a read (`write == false`) or
    /// a write. A volume below its write quorum is NOT READY, becoming
    /// ready (an initiator retries; a replica may come back); a fenced
    /// volume is NOT READY, port unavailable (a newer controller serves
    /// it); an IO error is a MEDIUM ERROR.
    pub fn from_backend(e: &BackendError, write: bool) -> Sense {
        match e {
            BackendError::Io(_) if write => Sense::WRITE_ERROR,
            BackendError::Io(_) => Sense::READ_ERROR,
            BackendError::BelowQuorum(_) => Sense::NOT_READY_BECOMING_READY,
            BackendError::Fenced(_) => Sense::NOT_READY_PORT_UNAVAILABLE,
            BackendError::Invalid(_) => Sense::INVALID_FIELD_IN_CDB,
            BackendError::NotSupported(_) => Sense::INVALID_FIELD_IN_CDB,
            BackendError::NoSpace(_) => Sense::SPACE_ALLOCATION_FAILED,
            BackendError::ReadOnly => Sense::WRITE_PROTECTED,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_format() {
        let b = Sense::LBA_OUT_OF_RANGE.fixed();
        assert_eq!(
            b,
            [0x70, 0, 5, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x21, 0, 0, 0, 0, 0]
        );
        let m = Sense::miscompare(4099).fixed();
        assert_eq!(&m[..8], &[0xf0, 0, 0xe, 0, 0, 0x10, 0x03, 10]);
        assert_eq!((m[12], m[13]), (0x1d, 0));
        let f = Sense::INVALID_FIELD_IN_CDB.at_cdb_byte(2).fixed();
        assert_eq!(&f[15..18], &[0xc0, 0, 2]);
    }

    #[test]
    fn backend_errors() {
        let io = BackendError::Io("x".into());
        assert_eq!(Sense::from_backend(&io, false), Sense::READ_ERROR);
        assert_eq!(Sense::from_backend(&io, true), Sense::WRITE_ERROR);
        let f = BackendError::Fenced("q".into());
        assert_eq!(Sense::from_backend(&f, true).key, NOT_READY);
        assert_eq!(
            Sense::from_backend(&BackendError::ReadOnly, true).key,
            DATA_PROTECT
        );
    }
}
