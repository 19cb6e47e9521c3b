//! The NBD wire format (NetworkBlockDevice/nbd `doc/proto.md`): constants,
//! pure parsers for what clients send, and encoders for what we send. No
//! IO here: everything takes `&[u8]` and returns typed values, `Incomplete`
//! when more bytes are needed, or an error; nothing panics on any input.

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
pub const FLAG_NO_ZEROES: u16 = 2;
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1;
pub const CLIENT_NO_ZEROES: u32 = 2;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

// Info types.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags.
pub const TF_HAS_FLAGS: u16 = 1;
pub const TF_READ_ONLY: u16 = 1 << 1;
pub const TF_SEND_FLUSH: u16 = 1 << 2;
pub const TF_SEND_FUA: u16 = 1 << 3;
pub const TF_SEND_TRIM: u16 = 1 << 5;
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TF_SEND_FAST_ZERO: u16 = 1 << 11;

// Command flags.
pub const CMD_FLAG_FUA: u16 = 1;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// Structured reply.
pub const REPLY_FLAG_DONE: u16 = 1;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

// Block status flags of base:allocation.
pub const STATE_HOLE: u32 = 1;
pub const STATE_ZERO: u32 = 2;

// Errors.
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// The only meta context we serve, and its id.
pub const BASE_ALLOCATION: &str = "base:allocation";
pub const BASE_ALLOCATION_ID: u32 = 1;

/// Largest option payload we accept; longer ones close the connection.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Largest READ/WRITE we accept (also advertised as the maximum block size).
pub const MAX_REQUEST_LEN: u32 = 32 << 20;
pub const REQUEST_HEADER_LEN: usize = 28;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("Need more bytes")]
    Incomplete,
    #[error("Bad magic {0:#x}")]
    BadMagic(u64),
    #[error("Option {option} carries {len} bytes, more than the {MAX_OPTION_LEN} allowed")]
    OptionTooLong { option: u32, len: u32 },
    #[error("Malformed payload of option {option}: {reason}")]
    BadOption { option: u32, reason: &'static str },
}

fn be16(b: &[u8], at: usize) -> Result<u16, ProtoError> {
    b.get(at..at + 2)
        .map(|s| u16::from_be_bytes([s[0], s[1]]))
        .ok_or(ProtoError::Incomplete)
}

fn be32(b: &[u8], at: usize) -> Result<u32, ProtoError> {
    b.get(at..at + 4)
        .map(|s| u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or(ProtoError::Incomplete)
}

fn be64(b: &[u8], at: usize) -> Result<u64, ProtoError> {
    b.get(at..at + 8)
        .map(|s| u64::from_be_bytes(s.try_into().expect("8 bytes")))
        .ok_or(ProtoError::Incomplete)
}

/// An option header: `IHAVEOPT`, option code, payload length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub len: u32,
}

/// Parses the 16-byte option header. An absurd length is an error before
/// anything is allocated for it.
pub fn parse_option_header(b: &[u8]) -> Result<OptionHeader, ProtoError> {
    let magic = be64(b, 0)?;
    if magic != IHAVEOPT {
        return Err(ProtoError::BadMagic(magic));
    }
    let option = be32(b, 8)?;
    let len = be32(b, 12)?;
    if len > MAX_OPTION_LEN {
        return Err(ProtoError::OptionTooLong { option, len });
    }
    Ok(OptionHeader { option, len })
}

/// Payload of NBD_OPT_INFO and NBD_OPT_GO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    pub requests: Vec<u16>,
}

pub fn parse_info_request(option: u32, b: &[u8]) -> Result<InfoRequest, ProtoError> {
    let bad = |reason| ProtoError::BadOption { option, reason };
    let name_len = be32(b, 0).map_err(|_| bad("too short for the name length"))? as usize;
    let name = b
        .get(4..4 + name_len)
        .ok_or_else(|| bad("name runs past the payload"))?;
    let name = String::from_utf8(name.to_vec()).map_err(|_| bad("name is not UTF-8"))?;
    let at = 4 + name_len;
    let n = be16(b, at).map_err(|_| bad("missing the information request count"))? as usize;
    if b.len() != at + 2 + 2 * n {
        return Err(bad("information request count does not match the payload"));
    }
    let requests = (0..n)
        .map(|i| be16(b, at + 2 + 2 * i).expect("length checked"))
        .collect();
    Ok(InfoRequest { name, requests })
}

/// Payload of NBD_OPT_LIST_META_CONTEXT / SET_META_CONTEXT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    pub export: String,
    pub queries: Vec<String>,
}

pub fn parse_meta_context_request(option: u32, b: &[u8]) -> Result<MetaContextRequest, ProtoError> {
    let bad = |reason| ProtoError::BadOption { option, reason };
    let name_len = be32(b, 0).map_err(|_| bad("too short for the export name length"))? as usize;
    let export = b
        .get(4..4 + name_len)
        .ok_or_else(|| bad("export name runs past the payload"))?;
    let export = String::from_utf8(export.to_vec()).map_err(|_| bad("export name is not UTF-8"))?;
    let mut at = 4 + name_len;
    let count = be32(b, at).map_err(|_| bad("missing the query count"))? as usize;
    at += 4;
    let mut queries = Vec::new();
    for _ in 0..count {
        let len = be32(b, at).map_err(|_| bad("query length runs past the payload"))? as usize;
        let q = b
            .get(at + 4..at + 4 + len)
            .ok_or_else(|| bad("query runs past the payload"))?;
        queries.push(String::from_utf8(q.to_vec()).map_err(|_| bad("query is not UTF-8"))?);
        at += 4 + len;
    }
    if at != b.len() {
        return Err(bad("trailing bytes after the queries"));
    }
    Ok(MetaContextRequest { export, queries })
}

/// A transmission-phase command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmd {
    Read,
    Write,
    Disc,
    Flush,
    Trim,
    Cache,
    WriteZeroes,
    BlockStatus,
    Unknown(u16),
}

impl Cmd {
    pub fn from_u16(v: u16) -> Cmd {
        match v {
            0 => Cmd::Read,
            1 => Cmd::Write,
            2 => Cmd::Disc,
            3 => Cmd::Flush,
            4 => Cmd::Trim,
            5 => Cmd::Cache,
            6 => Cmd::WriteZeroes,
            7 => Cmd::BlockStatus,
            other => Cmd::Unknown(other),
        }
    }

    pub fn to_u16(self) -> u16 {
        match self {
            Cmd::Read => 0,
            Cmd::Write => 1,
            Cmd::Disc => 2,
            Cmd::Flush => 3,
            Cmd::Trim => 4,
            Cmd::Cache => 5,
            Cmd::WriteZeroes => 6,
            Cmd::BlockStatus => 7,
            Cmd::Unknown(v) => v,
        }
    }
}

/// A 28-byte request header. A WRITE's payload (`len` bytes) follows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub cmd: Cmd,
    pub handle: u64,
    pub offset: u64,
    pub len: u32,
}

pub fn parse_request(b: &[u8]) -> Result<Request, ProtoError> {
    if b.len() < REQUEST_HEADER_LEN {
        return Err(ProtoError::Incomplete);
    }
    let magic = be32(b, 0)?;
    if magic != REQUEST_MAGIC {
        return Err(ProtoError::BadMagic(magic as u64));
    }
    Ok(Request {
        flags: be16(b, 4)?,
        cmd: Cmd::from_u16(be16(b, 6)?),
        handle: be64(b, 8)?,
        offset: be64(b, 16)?,
        len: be32(b, 24)?,
    })
}

pub fn encode_request(r: &Request) -> [u8; REQUEST_HEADER_LEN] {
    let mut out = [0u8; REQUEST_HEADER_LEN];
    out[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&r.flags.to_be_bytes());
    out[6..8].copy_from_slice(&r.cmd.to_u16().to_be_bytes());
    out[8..16].copy_from_slice(&r.handle.to_be_bytes());
    out[16..24].copy_from_slice(&r.offset.to_be_bytes());
    out[24..28].copy_from_slice(&r.len.to_be_bytes());
    out
}

/// The server's first 18 bytes.
pub fn server_greeting() -> Vec<u8> {
    let mut out = Vec::with_capacity(18);
    out.extend_from_slice(&NBDMAGIC.to_be_bytes());
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    out
}

/// An option reply with `data`.
pub fn option_reply(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(20 + data.len());
    out.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out
}

pub fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut d = Vec::with_capacity(12);
    d.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    d.extend_from_slice(&size.to_be_bytes());
    d.extend_from_slice(&flags.to_be_bytes());
    d
}

pub fn info_block_size(min: u32, preferred: u32, max: u32) -> Vec<u8> {
    let mut d = Vec::with_capacity(14);
    d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    d.extend_from_slice(&min.to_be_bytes());
    d.extend_from_slice(&preferred.to_be_bytes());
    d.extend_from_slice(&max.to_be_bytes());
    d
}

pub fn info_name(name: &str) -> Vec<u8> {
    let mut d = Vec::with_capacity(2 + name.len());
    d.extend_from_slice(&INFO_NAME.to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d
}

/// The old-style reply to NBD_OPT_EXPORT_NAME: size, flags (no zero padding
/// when the client agreed to NO_ZEROES).
pub fn export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(134);
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        out.extend_from_slice(&[0u8; 124]);
    }
    out
}

pub fn simple_reply_header(handle: u64, error: u32) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..16].copy_from_slice(&handle.to_be_bytes());
    out
}

pub fn structured_header(handle: u64, flags: u16, kind: u16, len: u32) -> [u8; 20] {
    let mut out = [0u8; 20];
    out[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&flags.to_be_bytes());
    out[6..8].copy_from_slice(&kind.to_be_bytes());
    out[8..16].copy_from_slice(&handle.to_be_bytes());
    out[16..20].copy_from_slice(&len.to_be_bytes());
    out
}

/// A structured error chunk (final) with a message.
pub fn structured_error(handle: u64, error: u32, message: &str) -> Vec<u8> {
    let msg = &message.as_bytes()[..message.len().min(4096)];
    let mut out = Vec::with_capacity(26 + msg.len());
    out.extend_from_slice(&structured_header(
        handle,
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        6 + msg.len() as u32,
    ));
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg);
    out
}

/// A final block-status chunk for base:allocation: (length, flags) pairs.
pub fn block_status_reply(handle: u64, descriptors: &[(u32, u32)]) -> Vec<u8> {
    let len = 4 + 8 * descriptors.len() as u32;
    let mut out = Vec::with_capacity(20 + len as usize);
    out.extend_from_slice(&structured_header(
        handle,
        REPLY_FLAG_DONE,
        REPLY_TYPE_BLOCK_STATUS,
        len,
    ));
    out.extend_from_slice(&BASE_ALLOCATION_ID.to_be_bytes());
    for (l, f) in descriptors {
        out.extend_from_slice(&l.to_be_bytes());
        out.extend_from_slice(&f.to_be_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn request_header_byte_layout() {
        let bytes: [u8; 28] = [
            0x25, 0x60, 0x95, 0x13, // magic
            0x00, 0x01, // flags: FUA
            0x00, 0x01, // WRITE
            1, 2, 3, 4, 5, 6, 7, 8, // handle
            0, 0, 0, 0, 0, 0, 0x10, 0x00, // offset 4096
            0, 0, 0x02, 0x00, // length 512
        ];
        let r = parse_request(&bytes).unwrap();
        assert_eq!(
            r,
            Request {
                flags: CMD_FLAG_FUA,
                cmd: Cmd::Write,
                handle: 0x0102030405060708,
                offset: 4096,
                len: 512
            }
        );
        assert_eq!(encode_request(&r), bytes);
        for cut in 0..28 {
            assert_eq!(parse_request(&bytes[..cut]), Err(ProtoError::Incomplete));
        }
        let mut bad = bytes;
        bad[0] = 0;
        assert!(matches!(parse_request(&bad), Err(ProtoError::BadMagic(_))));
    }

    #[test]
    fn option_header_refuses_huge_lengths() {
        let mut b = Vec::new();
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&OPT_GO.to_be_bytes());
        b.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            parse_option_header(&b),
            Err(ProtoError::OptionTooLong { .. })
        ));
        assert_eq!(parse_option_header(&b[..15]), Err(ProtoError::Incomplete));
    }

    #[test]
    fn info_request_parses_and_rejects_mismatched_counts() {
        let mut b = Vec::new();
        b.extend_from_slice(&4u32.to_be_bytes());
        b.extend_from_slice(b"test");
        b.extend_from_slice(&2u16.to_be_bytes());
        b.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        b.extend_from_slice(&INFO_NAME.to_be_bytes());
        let r = parse_info_request(OPT_GO, &b).unwrap();
        assert_eq!(r.name, "test");
        assert_eq!(r.requests, vec![INFO_BLOCK_SIZE, INFO_NAME]);
        assert!(parse_info_request(OPT_GO, &b[..b.len() - 1]).is_err());
        let mut long = b.clone();
        long[3] = 200;
        assert!(parse_info_request(OPT_GO, &long).is_err());
    }

    #[test]
    fn meta_context_request_parses() {
        let mut b = Vec::new();
        b.extend_from_slice(&0u32.to_be_bytes());
        b.extend_from_slice(&1u32.to_be_bytes());
        b.extend_from_slice(&(BASE_ALLOCATION.len() as u32).to_be_bytes());
        b.extend_from_slice(BASE_ALLOCATION.as_bytes());
        let r = parse_meta_context_request(OPT_SET_META_CONTEXT, &b).unwrap();
        assert_eq!(r.queries, vec![BASE_ALLOCATION.to_string()]);
        assert!(parse_meta_context_request(OPT_SET_META_CONTEXT, &b[..b.len() - 2]).is_err());
    }

    #[test]
    fn replies_have_the_documented_layout() {
        let r = simple_reply_header(7, EIO);
        assert_eq!(&r[0..4], &[0x67, 0x44, 0x66, 0x98]);
        assert_eq!(&r[4..8], &[0, 0, 0, 5]);
        let e = structured_error(9, EINVAL, "bad");
        assert_eq!(&e[0..4], &[0x66, 0x8e, 0x33, 0xef]);
        assert_eq!(u16::from_be_bytes([e[6], e[7]]), REPLY_TYPE_ERROR);
        assert_eq!(u32::from_be_bytes([e[16], e[17], e[18], e[19]]), 9);
        let o = option_reply(OPT_GO, REP_ACK, &[]);
        assert_eq!(o.len(), 20);
        assert_eq!(&o[0..8], &OPT_REPLY_MAGIC.to_be_bytes());
    }

    proptest! {
        #[test]
        fn requests_round_trip(flags in any::<u16>(), cmd in any::<u16>(), handle in any::<u64>(), offset in any::<u64>(), len in any::<u32>()) {
            let r = Request { flags, cmd: Cmd::from_u16(cmd), handle, offset, len };
            prop_assert_eq!(parse_request(&encode_request(&r)).unwrap(), r);
        }

        #[test]
        fn random_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..200), opt in any::<u32>()) {
            let _ = parse_request(&b);
            let _ = parse_option_header(&b);
            let _ = parse_info_request(opt, &b);
            let _ = parse_meta_context_request(opt, &b);
        }
    }
}
