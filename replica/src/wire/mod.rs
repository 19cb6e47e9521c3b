//! The data wire between the controller and a replica: a pure codec over
//! byte slices, no IO, and (in `outbound`) the batched frame writer that
//! both the server's reply writer and the client's request writer use.
//! Everything is little-endian.
//!
//! ```text
//! request (40-byte header, then `length` payload bytes for HELLO, WRITE, SNAPSHOT, PULL,
//! READ_PIECES)
//!   0  magic u32 = 0x5354_5251 "STRQ"   4 version u8 = 1   5 op u8   6 flags u16
//!   8  request_id u64   16 epoch u64   24 offset u64   32 length u32   36 payload_crc u32
//! reply (32-byte header, then `length` payload bytes)
//!   0  magic u32 = 0x5354_5250 "STRP"   4 version u8 = 1   5 status u8   6 reserved u16
//!   8  request_id u64   16 epoch u64   24 length u32   28 payload_crc u32
//! ```
//!
//! PULL (a syncing replica copies a range from a peer itself) carries a
//! [`PullPlan`]; READ with [`FLAG_DROP_CACHE`] is a copy's read.
//! READ_PIECES reads several ranges in one request ([`PieceList`]; its
//! reply carries their bytes back to back), with or without that flag.
//! HELLO's payload names the volume, or `volume@snapshot` to bind the
//! connection to a snapshot read-only (READ and BLOCK_STATUS only).
//! For READ, TRIM, WRITE_ZEROES and BLOCK_STATUS `length` is the length of
//! the range and no payload follows; for FLUSH and PING offset and length are
//! 0. A READ reply carries the data, a BLOCK_STATUS reply 17-byte extents
//! (offset u64, len u64, kind u8: 0 data, 1 hole), an error reply a UTF-8
//! message.
//!
//! Decoding is done in two steps, as in mini-redis: [`RequestHeader::parse`]
//! (and [`Request::check`]) look at the fixed header only and say how long the
//! frame is, or that it cannot be framed at all (bad magic, version, unknown
//! op, a payload above [`MAX_PAYLOAD`]) — the stream is then unusable and the
//! connection must be closed. Then [`Request::decode`] (copying) or
//! [`Request::decode_from`] (zero-copy out of a `BytesMut`) validate the whole
//! frame. **The payload crc is verified at decode** (unless the connection's
//! records carry a MAC and both ends left the crc out: [`FrameCrc`]): a mismatch is
//! [`WireError::BadPayloadCrc`], like every content error ([`WireError::Invalid`])
//! it names the request id and the frame length so the caller can skip the
//! frame, send an error reply and go on. The same holds for [`Reply`].

pub(crate) mod outbound;
mod pieces;
mod pull;
mod reply;
mod request;

pub use pieces::{piece_slices, PieceList, MAX_PIECES};
pub use pull::PullPlan;
pub use reply::{decode_extents, encode_extents, Reply, ReplyHeader};
pub use request::{Command, Request, RequestHeader};

pub const REQUEST_MAGIC: u32 = 0x5354_5251;
pub const REPLY_MAGIC: u32 = 0x5354_5250;
pub const VERSION: u8 = 1;
pub const REQUEST_HEADER_LEN: usize = 40;
pub const REPLY_HEADER_LEN: usize = 32;
/// The largest payload of any frame, and the largest READ.
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// The longest volume or snapshot name in a HELLO or SNAPSHOT.
pub const MAX_NAME_LEN: usize = 255;
/// WRITE flag: durable before the reply.
pub const FLAG_FUA: u16 = 1;
/// WRITE_ZEROES flag: keep the range allocated (do not punch).
pub const FLAG_NO_HOLE: u16 = 2;
/// READ flag: a copy's read; the pages it brings into the replica's page
/// cache are dropped after it (pages cached before stay).
pub const FLAG_DROP_CACHE: u16 = 4;
/// Bytes of one BLOCK_STATUS extent in a reply payload.
pub const EXTENT_LEN: usize = 17;

/// Whether the frames of a connection carry their payload crc. A keyed
/// connection whose two ends agreed to ([`crate::auth::Session::frame_crc`])
/// leaves it out: its records' tags already cover every byte, and the
/// crc cost as much CPU as the tag. Such frames carry 0, and nothing
/// checks it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FrameCrc {
    #[default]
    Checked,
    Absent,
}

impl FrameCrc {
    pub fn of(carried: bool) -> FrameCrc {
        if carried {
            FrameCrc::Checked
        } else {
            FrameCrc::Absent
        }
    }

    /// The crc to put in a header for `payload`.
    pub fn compute(self, payload: &[u8]) -> u32 {
        match self {
            FrameCrc::Checked => crc32fast::hash(payload),
            FrameCrc::Absent => 0,
        }
    }

    /// Checks a received payload against its header's crc: `Err(actual)`
    /// on a mismatch.
    pub fn check(self, payload: &[u8], expected: u32) -> Result<(), u32> {
        match self {
            FrameCrc::Checked => {
                let actual = crc32fast::hash(payload);
                if actual == expected {
                    Ok(())
                } else {
                    Err(actual)
                }
            }
            FrameCrc::Absent => Ok(()),
        }
    }
}

/// Request op codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Op {
    Hello = 1,
    Read = 2,
    Write = 3,
    Flush = 4,
    Trim = 5,
    WriteZeroes = 6,
    BlockStatus = 7,
    Snapshot = 8,
    Ping = 9,
    /// Copy a range from a peer replica ([`PullPlan`]).
    Pull = 10,
    /// Read several ranges in one request ([`PieceList`]).
    ReadPieces = 11,
}

impl Op {
    pub fn from_u8(v: u8) -> Option<Op> {
        Some(match v {
            1 => Op::Hello,
            2 => Op::Read,
            3 => Op::Write,
            4 => Op::Flush,
            5 => Op::Trim,
            6 => Op::WriteZeroes,
            7 => Op::BlockStatus,
            8 => Op::Snapshot,
            9 => Op::Ping,
            10 => Op::Pull,
            11 => Op::ReadPieces,
            _ => return None,
        })
    }

    /// True when `length` counts payload bytes that follow the header.
    pub fn has_payload(self) -> bool {
        matches!(
            self,
            Op::Hello | Op::Write | Op::Snapshot | Op::Pull | Op::ReadPieces
        )
    }

    pub(crate) fn allowed_flags(self) -> u16 {
        match self {
            Op::Write => FLAG_FUA,
            Op::WriteZeroes => FLAG_NO_HOLE,
            Op::Read | Op::ReadPieces => FLAG_DROP_CACHE,
            _ => 0,
        }
    }
}

/// Reply status codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Status {
    Ok = 0,
    /// The replica failed to do the IO.
    IoError = 1,
    /// Bad range, alignment, flags or name.
    Invalid = 2,
    /// The request's epoch is older than the replica's.
    StaleEpoch = 3,
    /// The request's epoch is newer: set it through the control API first.
    EpochAhead = 4,
    /// HELLO named a volume this replica does not host.
    NoVolume = 5,
    /// Stored data failed its checksum; repair it from a peer.
    Corrupt = 6,
    /// The request payload did not match its crc; nothing was done.
    BadPayload = 7,
    /// A data request before HELLO.
    NotBound = 8,
    /// A PULL's source could not be reached or read; nothing was written.
    PeerFailed = 9,
}

impl Status {
    pub fn from_u8(v: u8) -> Option<Status> {
        Some(match v {
            0 => Status::Ok,
            1 => Status::IoError,
            2 => Status::Invalid,
            3 => Status::StaleEpoch,
            4 => Status::EpochAhead,
            5 => Status::NoVolume,
            6 => Status::Corrupt,
            7 => Status::BadPayload,
            8 => Status::NotBound,
            9 => Status::PeerFailed,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Status::Ok => "OK",
            Status::IoError => "IO_ERROR",
            Status::Invalid => "INVALID",
            Status::StaleEpoch => "STALE_EPOCH",
            Status::EpochAhead => "EPOCH_AHEAD",
            Status::NoVolume => "NO_VOLUME",
            Status::Corrupt => "CORRUPT",
            Status::BadPayload => "BAD_PAYLOAD",
            Status::NotBound => "NOT_BOUND",
            Status::PeerFailed => "PEER_FAILED",
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Why bytes are not (yet) a valid frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("Incomplete frame")]
    Incomplete,
    #[error("Bad frame magic {0:#010x}")]
    BadMagic(u32),
    #[error("Unsupported protocol version {0}")]
    BadVersion(u8),
    #[error("Request {request_id}: unknown op {op}")]
    UnknownOp { op: u8, request_id: u64 },
    #[error("Request {request_id}: payload of {len} bytes exceeds the maximum of {MAX_PAYLOAD}")]
    TooLarge { len: u32, request_id: u64 },
    #[error("Request {request_id}: {reason}")]
    Invalid {
        request_id: u64,
        frame_len: usize,
        reason: &'static str,
    },
    #[error("Request {request_id}: payload crc {actual:#010x} does not match the header's {expected:#010x}")]
    BadPayloadCrc {
        request_id: u64,
        frame_len: usize,
        expected: u32,
        actual: u32,
    },
}

impl WireError {
    /// The request id, when the header was readable.
    pub fn request_id(&self) -> Option<u64> {
        match *self {
            WireError::UnknownOp { request_id, .. }
            | WireError::TooLarge { request_id, .. }
            | WireError::Invalid { request_id, .. }
            | WireError::BadPayloadCrc { request_id, .. } => Some(request_id),
            _ => None,
        }
    }

    /// For an error in a well-delimited frame, its length: the stream goes on
    /// after it. `None` means the stream cannot be framed any more (or, for
    /// `Incomplete`, more bytes are needed).
    pub fn frame_len(&self) -> Option<usize> {
        match *self {
            WireError::Invalid { frame_len, .. } | WireError::BadPayloadCrc { frame_len, .. } => {
                Some(frame_len)
            }
            _ => None,
        }
    }

    /// True when the connection must be closed.
    pub fn is_fatal(&self) -> bool {
        !matches!(self, WireError::Incomplete) && self.frame_len().is_none()
    }
}

pub(crate) fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

pub(crate) fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

pub(crate) fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Checks the magic and version as soon as their bytes are there, so garbage
/// is refused without waiting for a whole header.
pub(crate) fn check_prefix(buf: &[u8], magic: u32) -> Result<(), WireError> {
    if buf.len() >= 4 && u32_at(buf, 0) != magic {
        return Err(WireError::BadMagic(u32_at(buf, 0)));
    }
    if buf.len() >= 5 && buf[4] != VERSION {
        return Err(WireError::BadVersion(buf[4]));
    }
    Ok(())
}
