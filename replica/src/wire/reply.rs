//! Replies: the header, the reply, BLOCK_STATUS extents, and their codec.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::{
    check_prefix, u32_at, u64_at, FrameCrc, Status, WireError, EXTENT_LEN, MAX_PAYLOAD,
    REPLY_HEADER_LEN, REPLY_MAGIC, VERSION,
};
use crate::{Allocation, AllocationExtent};

/// The fixed part of a reply, as on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyHeader {
    pub status: Status,
    pub request_id: u64,
    pub epoch: u64,
    pub length: u32,
    pub payload_crc: u32,
}

impl ReplyHeader {
    /// Parses the header at the start of `buf`; see [`RequestHeader::parse`].
    /// An unknown status is a content error of a well-delimited frame.
    pub fn parse(buf: &[u8]) -> Result<Option<(ReplyHeader, Option<u8>)>, WireError> {
        check_prefix(buf, REPLY_MAGIC)?;
        if buf.len() < REPLY_HEADER_LEN {
            return Ok(None);
        }
        let request_id = u64_at(buf, 8);
        let length = u32_at(buf, 24);
        if length > MAX_PAYLOAD {
            return Err(WireError::TooLarge {
                len: length,
                request_id,
            });
        }
        let (status, unknown) = match Status::from_u8(buf[5]) {
            Some(s) => (s, None),
            None => (Status::Invalid, Some(buf[5])),
        };
        let h = ReplyHeader {
            status,
            request_id,
            epoch: u64_at(buf, 16),
            length,
            payload_crc: u32_at(buf, 28),
        };
        Ok(Some((h, unknown)))
    }

    pub fn frame_len(&self) -> usize {
        REPLY_HEADER_LEN + self.length as usize
    }

    pub fn encode(&self) -> [u8; REPLY_HEADER_LEN] {
        let mut b = [0u8; REPLY_HEADER_LEN];
        b[0..4].copy_from_slice(&REPLY_MAGIC.to_le_bytes());
        b[4] = VERSION;
        b[5] = self.status as u8;
        b[8..16].copy_from_slice(&self.request_id.to_le_bytes());
        b[16..24].copy_from_slice(&self.epoch.to_le_bytes());
        b[24..28].copy_from_slice(&self.length.to_le_bytes());
        b[28..32].copy_from_slice(&self.payload_crc.to_le_bytes());
        b
    }
}

/// One decoded reply. What the payload means depends on the request it
/// answers: data for READ, extents for BLOCK_STATUS ([`decode_extents`]), a
/// message for errors ([`Reply::message`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub id: u64,
    /// The replica's current persisted epoch.
    pub epoch: u64,
    pub status: Status,
    pub payload: Bytes,
}

impl Reply {
    pub fn ok(id: u64, epoch: u64) -> Reply {
        Reply::with_payload(id, epoch, Status::Ok, Bytes::new())
    }

    pub fn with_payload(id: u64, epoch: u64, status: Status, payload: Bytes) -> Reply {
        Reply {
            id,
            epoch,
            status,
            payload,
        }
    }

    /// An error reply carrying `message` (cut to 4 KiB at a char boundary).
    pub fn error(id: u64, epoch: u64, status: Status, message: &str) -> Reply {
        let mut end = message.len().min(4096);
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        Reply::with_payload(
            id,
            epoch,
            status,
            Bytes::copy_from_slice(&message.as_bytes()[..end]),
        )
    }

    /// The payload as text (for error replies).
    pub fn message(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }

    /// Checks whether `buf` starts with a whole reply frame; see
    /// [`Request::check`].
    pub fn check(buf: &[u8]) -> Result<Option<usize>, WireError> {
        Ok(ReplyHeader::parse(buf)?
            .map(|(h, _)| h.frame_len())
            .filter(|&len| buf.len() >= len))
    }

    /// Decodes the reply at the start of `buf`, copying the payload.
    pub fn decode(buf: &[u8]) -> Result<(Reply, usize), WireError> {
        let (h, unknown) = ReplyHeader::parse(buf)?.ok_or(WireError::Incomplete)?;
        let len = h.frame_len();
        if buf.len() < len {
            return Err(WireError::Incomplete);
        }
        let payload = &buf[REPLY_HEADER_LEN..len];
        let reply = Self::validate(&h, unknown, FrameCrc::Checked, payload, || {
            Bytes::copy_from_slice(payload)
        })?;
        Ok((reply, len))
    }

    /// Decodes and removes the reply at the start of `buf` without copying
    /// its payload; see [`Request::decode_from`].
    pub fn decode_from(buf: &mut BytesMut) -> Result<Option<Reply>, WireError> {
        Self::decode_from_with(buf, FrameCrc::Checked)
    }

    /// [`Reply::decode_from`] on a connection whose frames carry their crc
    /// or not (`crc`).
    pub fn decode_from_with(buf: &mut BytesMut, crc: FrameCrc) -> Result<Option<Reply>, WireError> {
        let Some((h, unknown)) = ReplyHeader::parse(buf)? else {
            return Ok(None);
        };
        let len = h.frame_len();
        if buf.len() < len {
            buf.reserve(len - buf.len());
            return Ok(None);
        }
        let frame = buf.split_to(len).freeze();
        Self::validate(&h, unknown, crc, &frame[REPLY_HEADER_LEN..], || {
            frame.slice(REPLY_HEADER_LEN..)
        })
        .map(Some)
    }

    fn validate(
        h: &ReplyHeader,
        unknown: Option<u8>,
        crc: FrameCrc,
        payload: &[u8],
        data: impl FnOnce() -> Bytes,
    ) -> Result<Reply, WireError> {
        if unknown.is_some() {
            return Err(WireError::Invalid {
                request_id: h.request_id,
                frame_len: h.frame_len(),
                reason: "unknown reply status",
            });
        }
        if let Err(actual) = crc.check(payload, h.payload_crc) {
            return Err(WireError::BadPayloadCrc {
                request_id: h.request_id,
                frame_len: h.frame_len(),
                expected: h.payload_crc,
                actual,
            });
        }
        Ok(Reply {
            id: h.request_id,
            epoch: h.epoch,
            status: h.status,
            payload: if payload.is_empty() {
                Bytes::new()
            } else {
                data()
            },
        })
    }

    /// The header of this reply, with the payload crc computed.
    pub fn header(&self) -> ReplyHeader {
        self.header_for(FrameCrc::Checked)
    }

    /// The header of this reply on a connection whose frames carry their
    /// crc or not (`crc`).
    pub fn header_for(&self, crc: FrameCrc) -> ReplyHeader {
        ReplyHeader {
            status: self.status,
            request_id: self.id,
            epoch: self.epoch,
            length: self.payload.len() as u32,
            payload_crc: crc.compute(&self.payload),
        }
    }

    /// Appends the whole frame to `dst`.
    pub fn encode_into(&self, dst: &mut BytesMut) {
        dst.reserve(REPLY_HEADER_LEN + self.payload.len());
        dst.put_slice(&self.header().encode());
        dst.put_slice(&self.payload);
    }
}

/// Encodes BLOCK_STATUS extents as a reply payload.
pub fn encode_extents(extents: &[AllocationExtent]) -> Bytes {
    let mut out = BytesMut::with_capacity(extents.len() * EXTENT_LEN);
    for e in extents {
        out.put_u64_le(e.offset);
        out.put_u64_le(e.len);
        out.put_u8(match e.kind {
            Allocation::Data => 0,
            Allocation::Hole => 1,
        });
    }
    out.freeze()
}

/// Decodes a BLOCK_STATUS reply payload; `None` if it is malformed.
pub fn decode_extents(mut payload: &[u8]) -> Option<Vec<AllocationExtent>> {
    if !payload.len().is_multiple_of(EXTENT_LEN) {
        return None;
    }
    let mut out = Vec::with_capacity(payload.len() / EXTENT_LEN);
    while payload.has_remaining() {
        let offset = payload.get_u64_le();
        let len = payload.get_u64_le();
        let kind = match payload.get_u8() {
            0 => Allocation::Data,
            1 => Allocation::Hole,
            _ => return None,
        };
        out.push(AllocationExtent { offset, len, kind });
    }
    Some(out)
}
