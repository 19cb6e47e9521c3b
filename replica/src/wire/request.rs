//! Requests: the header, the typed command, and their codec.

use bytes::{BufMut, Bytes, BytesMut};

use super::{
    check_prefix, u16_at, u32_at, u64_at, FrameCrc, Op, PieceList, PullPlan, WireError,
    FLAG_DROP_CACHE, FLAG_FUA, FLAG_NO_HOLE, MAX_NAME_LEN, MAX_PAYLOAD, REQUEST_HEADER_LEN,
    REQUEST_MAGIC, VERSION,
};

/// The fixed part of a request, as on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub op: Op,
    pub flags: u16,
    pub request_id: u64,
    pub epoch: u64,
    pub offset: u64,
    pub length: u32,
    pub payload_crc: u32,
}

impl RequestHeader {
    /// Parses the header at the start of `buf`: `Ok(None)` if fewer than
    /// [`REQUEST_HEADER_LEN`] bytes are there, an error if the stream cannot
    /// be framed.
    pub fn parse(buf: &[u8]) -> Result<Option<RequestHeader>, WireError> {
        check_prefix(buf, REQUEST_MAGIC)?;
        if buf.len() < REQUEST_HEADER_LEN {
            return Ok(None);
        }
        let request_id = u64_at(buf, 8);
        let op = Op::from_u8(buf[5]).ok_or(WireError::UnknownOp {
            op: buf[5],
            request_id,
        })?;
        let length = u32_at(buf, 32);
        if op.has_payload() && length > MAX_PAYLOAD {
            return Err(WireError::TooLarge {
                len: length,
                request_id,
            });
        }
        Ok(Some(RequestHeader {
            op,
            flags: u16_at(buf, 6),
            request_id,
            epoch: u64_at(buf, 16),
            offset: u64_at(buf, 24),
            length,
            payload_crc: u32_at(buf, 36),
        }))
    }

    pub fn payload_len(&self) -> usize {
        if self.op.has_payload() {
            self.length as usize
        } else {
            0
        }
    }

    /// Header plus payload.
    pub fn frame_len(&self) -> usize {
        REQUEST_HEADER_LEN + self.payload_len()
    }

    pub fn encode(&self) -> [u8; REQUEST_HEADER_LEN] {
        let mut b = [0u8; REQUEST_HEADER_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_le_bytes());
        b[4] = VERSION;
        b[5] = self.op as u8;
        b[6..8].copy_from_slice(&self.flags.to_le_bytes());
        b[8..16].copy_from_slice(&self.request_id.to_le_bytes());
        b[16..24].copy_from_slice(&self.epoch.to_le_bytes());
        b[24..32].copy_from_slice(&self.offset.to_le_bytes());
        b[32..36].copy_from_slice(&self.length.to_le_bytes());
        b[36..40].copy_from_slice(&self.payload_crc.to_le_bytes());
        b
    }
}

/// What a request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Binds the connection to a volume.
    Hello {
        volume: String,
    },
    Read {
        offset: u64,
        len: u32,
    },
    /// A READ for a copy: the pages it brings into the replica's page
    /// cache are dropped after it, so a rebuild does not evict what the
    /// applications keep cached (READ with [`FLAG_DROP_CACHE`]).
    ReadForCopy {
        offset: u64,
        len: u32,
    },
    /// Several ranges in one request; the reply carries their bytes back
    /// to back. With `for_copy`, as [`Command::ReadForCopy`].
    ReadPieces {
        pieces: PieceList,
        for_copy: bool,
    },
    /// Read a range from a peer replica and write the plan's pieces of it
    /// here (a syncing replica's copy, [`PullPlan`]).
    Pull {
        offset: u64,
        plan: PullPlan,
    },
    Write {
        offset: u64,
        data: Bytes,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        len: u32,
    },
    WriteZeroes {
        offset: u64,
        len: u32,
        no_hole: bool,
    },
    BlockStatus {
        offset: u64,
        len: u32,
    },
    Snapshot {
        name: String,
    },
    Ping,
}

impl Command {
    pub fn op(&self) -> Op {
        match self {
            Command::Hello { .. } => Op::Hello,
            Command::Read { .. } | Command::ReadForCopy { .. } => Op::Read,
            Command::Pull { .. } => Op::Pull,
            Command::ReadPieces { .. } => Op::ReadPieces,
            Command::Write { .. } => Op::Write,
            Command::Flush => Op::Flush,
            Command::Trim { .. } => Op::Trim,
            Command::WriteZeroes { .. } => Op::WriteZeroes,
            Command::BlockStatus { .. } => Op::BlockStatus,
            Command::Snapshot { .. } => Op::Snapshot,
            Command::Ping => Op::Ping,
        }
    }

    /// The payload bytes sent after the header (empty for most ops).
    pub fn payload(&self) -> &[u8] {
        match self {
            Command::Hello { volume } => volume.as_bytes(),
            Command::Write { data, .. } => data,
            Command::Snapshot { name } => name.as_bytes(),
            Command::Pull { plan, .. } => plan.encoded(),
            Command::ReadPieces { pieces, .. } => pieces.encoded(),
            _ => &[],
        }
    }
}

/// One decoded, validated request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub id: u64,
    pub epoch: u64,
    pub command: Command,
}

impl Request {
    /// Checks whether `buf` starts with a whole frame: `Ok(Some(len))` if so,
    /// `Ok(None)` if more bytes are needed, an error if the stream cannot be
    /// framed (the content is validated by [`Request::decode`]).
    pub fn check(buf: &[u8]) -> Result<Option<usize>, WireError> {
        Ok(RequestHeader::parse(buf)?
            .map(|h| h.frame_len())
            .filter(|&len| buf.len() >= len))
    }

    /// Decodes the frame at the start of `buf`, copying the payload. Returns
    /// the request and the frame length, or [`WireError::Incomplete`].
    pub fn decode(buf: &[u8]) -> Result<(Request, usize), WireError> {
        let h = RequestHeader::parse(buf)?.ok_or(WireError::Incomplete)?;
        let len = h.frame_len();
        if buf.len() < len {
            return Err(WireError::Incomplete);
        }
        let req = Self::validate(&h, FrameCrc::Checked, &buf[REQUEST_HEADER_LEN..len], || {
            Bytes::copy_from_slice(&buf[REQUEST_HEADER_LEN..len])
        })?;
        Ok((req, len))
    }

    /// Decodes the frame at the start of `buf` without copying its payload,
    /// and removes it from `buf`: `Ok(None)` while it is incomplete. A content
    /// error (one with [`WireError::frame_len`]) removes the frame too. When
    /// the header is known but the frame incomplete, room for it is reserved.
    pub fn decode_from(buf: &mut BytesMut) -> Result<Option<Request>, WireError> {
        Self::decode_from_with(buf, FrameCrc::Checked)
    }

    /// [`Request::decode_from`] on a connection whose frames carry their
    /// crc or not (`crc`).
    pub fn decode_from_with(
        buf: &mut BytesMut,
        crc: FrameCrc,
    ) -> Result<Option<Request>, WireError> {
        let Some(h) = RequestHeader::parse(buf)? else {
            return Ok(None);
        };
        let len = h.frame_len();
        if buf.len() < len {
            buf.reserve(len - buf.len());
            return Ok(None);
        }
        let frame = buf.split_to(len).freeze();
        let payload = &frame[REQUEST_HEADER_LEN..];
        Self::validate(&h, crc, payload, || frame.slice(REQUEST_HEADER_LEN..)).map(Some)
    }

    fn validate(
        h: &RequestHeader,
        crc: FrameCrc,
        payload: &[u8],
        data: impl FnOnce() -> Bytes,
    ) -> Result<Request, WireError> {
        let invalid = |reason| WireError::Invalid {
            request_id: h.request_id,
            frame_len: h.frame_len(),
            reason,
        };
        if h.flags & !h.op.allowed_flags() != 0 {
            return Err(invalid("flags not defined for this op"));
        }
        if let Err(actual) = crc.check(payload, h.payload_crc) {
            return Err(WireError::BadPayloadCrc {
                request_id: h.request_id,
                frame_len: h.frame_len(),
                expected: h.payload_crc,
                actual,
            });
        }
        let name = || -> Result<String, WireError> {
            if h.offset != 0 {
                return Err(invalid("offset must be 0 for HELLO and SNAPSHOT"));
            }
            if payload.len() > MAX_NAME_LEN {
                return Err(invalid("name longer than 255 bytes"));
            }
            std::str::from_utf8(payload)
                .map(str::to_owned)
                .map_err(|_| invalid("name is not UTF-8"))
        };
        let (offset, len) = (h.offset, h.length);
        let command = match h.op {
            Op::Hello => Command::Hello { volume: name()? },
            Op::Snapshot => Command::Snapshot { name: name()? },
            Op::Read if len > MAX_PAYLOAD => return Err(invalid("READ longer than 32 MiB")),
            Op::Read if h.flags & FLAG_DROP_CACHE != 0 => Command::ReadForCopy { offset, len },
            Op::Read => Command::Read { offset, len },
            Op::Pull => Command::Pull {
                offset,
                plan: PullPlan::decode(offset, data()).map_err(invalid)?,
            },
            Op::ReadPieces => Command::ReadPieces {
                pieces: PieceList::decode(offset, data()).map_err(invalid)?,
                for_copy: h.flags & FLAG_DROP_CACHE != 0,
            },
            Op::Write => Command::Write {
                offset,
                data: data(),
                fua: h.flags & FLAG_FUA != 0,
            },
            Op::Flush | Op::Ping if offset != 0 || len != 0 => {
                return Err(invalid("offset and length must be 0 for FLUSH and PING"))
            }
            Op::Flush => Command::Flush,
            Op::Ping => Command::Ping,
            Op::Trim => Command::Trim { offset, len },
            Op::WriteZeroes => Command::WriteZeroes {
                offset,
                len,
                no_hole: h.flags & FLAG_NO_HOLE != 0,
            },
            Op::BlockStatus => Command::BlockStatus { offset, len },
        };
        Ok(Request {
            id: h.request_id,
            epoch: h.epoch,
            command,
        })
    }

    /// The header of this request, with the payload crc computed. A payload
    /// longer than [`MAX_PAYLOAD`] (or a name longer than [`MAX_NAME_LEN`])
    /// encodes into a frame the decoder refuses; callers check first.
    pub fn header(&self) -> RequestHeader {
        self.header_with_crc(crc32fast::hash(self.command.payload()))
    }

    /// [`Request::header`] with the payload's crc32 given by the caller.
    pub fn header_with_crc(&self, payload_crc: u32) -> RequestHeader {
        let payload = self.command.payload();
        let (offset, length, flags) = match self.command {
            Command::Hello { .. } | Command::Snapshot { .. } => (0, payload.len() as u32, 0),
            Command::Write {
                offset,
                ref data,
                fua,
            } => (offset, data.len() as u32, if fua { FLAG_FUA } else { 0 }),
            Command::ReadForCopy { offset, len } => (offset, len, FLAG_DROP_CACHE),
            Command::Pull { offset, .. } => (offset, payload.len() as u32, 0),
            Command::ReadPieces {
                ref pieces,
                for_copy,
            } => (
                pieces.offset(),
                payload.len() as u32,
                if for_copy { FLAG_DROP_CACHE } else { 0 },
            ),
            Command::Read { offset, len }
            | Command::Trim { offset, len }
            | Command::BlockStatus { offset, len } => (offset, len, 0),
            Command::WriteZeroes {
                offset,
                len,
                no_hole,
            } => (offset, len, if no_hole { FLAG_NO_HOLE } else { 0 }),
            Command::Flush | Command::Ping => (0, 0, 0),
        };
        RequestHeader {
            op: self.command.op(),
            flags,
            request_id: self.id,
            epoch: self.epoch,
            offset,
            length,
            payload_crc,
        }
    }

    /// Appends the whole frame (header and payload) to `dst`.
    pub fn encode_into(&self, dst: &mut BytesMut) {
        let payload = self.command.payload();
        dst.reserve(REQUEST_HEADER_LEN + payload.len());
        dst.put_slice(&self.header().encode());
        dst.put_slice(payload);
    }
}
