//! The NBD wire format (NetworkBlockDevice/nbd `doc/proto.md`), pure: no IO.
//!
//! Parsers take the bytes received so far and return `Ok(None)` when more
//! are needed (Incomplete), `Ok(Some((value, consumed)))` when a message is
//! complete, or a typed [`ProtoError`] when the stream cannot be in sync any
//! more (bad magic, an option longer than [`MAX_OPTION_LEN`], unknown client
//! flags). A well-framed option whose payload is malformed is not an error
//! of the stream: it parses to [`Opt::Invalid`] so the server can answer
//! `NBD_REP_ERR_INVALID` and carry on. Nothing here panics on any input.
//!
//! Encoders append to a `Vec<u8>`; read data is not copied into them (the
//! server writes the header, then the data).

/// `NBDMAGIC`, first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`, in the greeting and at the start of every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags (server, 16 bits) and client flags (32 bits).
pub const NBD_FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const NBD_FLAG_NO_ZEROES: u16 = 1 << 1;
pub const NBD_FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const NBD_FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Option codes.
pub const NBD_OPT_EXPORT_NAME: u32 = 1;
pub const NBD_OPT_ABORT: u32 = 2;
pub const NBD_OPT_LIST: u32 = 3;
pub const NBD_OPT_STARTTLS: u32 = 5;
pub const NBD_OPT_INFO: u32 = 6;
pub const NBD_OPT_GO: u32 = 7;
pub const NBD_OPT_STRUCTURED_REPLY: u32 = 8;
pub const NBD_OPT_LIST_META_CONTEXT: u32 = 9;
pub const NBD_OPT_SET_META_CONTEXT: u32 = 10;
pub const NBD_OPT_EXTENDED_HEADERS: u32 = 11;

// Option reply types.
pub const NBD_REP_ACK: u32 = 1;
pub const NBD_REP_SERVER: u32 = 2;
pub const NBD_REP_INFO: u32 = 3;
pub const NBD_REP_META_CONTEXT: u32 = 4;
pub const NBD_REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const NBD_REP_ERR_POLICY: u32 = (1 << 31) + 2;
pub const NBD_REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const NBD_REP_ERR_PLATFORM: u32 = (1 << 31) + 4;
pub const NBD_REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;
pub const NBD_REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
pub const NBD_REP_ERR_SHUTDOWN: u32 = (1 << 31) + 7;
pub const NBD_REP_ERR_BLOCK_SIZE_REQD: u32 = (1 << 31) + 8;
pub const NBD_REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

// Info types (NBD_OPT_INFO / NBD_OPT_GO).
pub const NBD_INFO_EXPORT: u16 = 0;
pub const NBD_INFO_NAME: u16 = 1;
pub const NBD_INFO_DESCRIPTION: u16 = 2;
pub const NBD_INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags.
pub const NBD_FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const NBD_FLAG_READ_ONLY: u16 = 1 << 1;
pub const NBD_FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const NBD_FLAG_SEND_FUA: u16 = 1 << 3;
pub const NBD_FLAG_ROTATIONAL: u16 = 1 << 4;
pub const NBD_FLAG_SEND_TRIM: u16 = 1 << 5;
pub const NBD_FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const NBD_FLAG_SEND_DF: u16 = 1 << 7;
pub const NBD_FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const NBD_FLAG_SEND_RESIZE: u16 = 1 << 9;
pub const NBD_FLAG_SEND_CACHE: u16 = 1 << 10;
pub const NBD_FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// Commands.
pub const NBD_CMD_READ: u16 = 0;
pub const NBD_CMD_WRITE: u16 = 1;
pub const NBD_CMD_DISC: u16 = 2;
pub const NBD_CMD_FLUSH: u16 = 3;
pub const NBD_CMD_TRIM: u16 = 4;
pub const NBD_CMD_CACHE: u16 = 5;
pub const NBD_CMD_WRITE_ZEROES: u16 = 6;
pub const NBD_CMD_BLOCK_STATUS: u16 = 7;
pub const NBD_CMD_RESIZE: u16 = 8;

// Command flags.
pub const NBD_CMD_FLAG_FUA: u16 = 1 << 0;
pub const NBD_CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const NBD_CMD_FLAG_DF: u16 = 1 << 2;
pub const NBD_CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const NBD_CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// Errors (sent in replies; values fixed by the protocol, not the host).
pub const NBD_EPERM: u32 = 1;
pub const NBD_EIO: u32 = 5;
pub const NBD_ENOMEM: u32 = 12;
pub const NBD_EINVAL: u32 = 22;
pub const NBD_ENOSPC: u32 = 28;
pub const NBD_EOVERFLOW: u32 = 75;
pub const NBD_ENOTSUP: u32 = 95;
pub const NBD_ESHUTDOWN: u32 = 108;

// Structured replies.
pub const NBD_REPLY_FLAG_DONE: u16 = 1 << 0;
pub const NBD_REPLY_TYPE_NONE: u16 = 0;
pub const NBD_REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const NBD_REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const NBD_REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const NBD_REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;
pub const NBD_REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) + 2;

// base:allocation flags.
pub const NBD_STATE_HOLE: u32 = 1 << 0;
pub const NBD_STATE_ZERO: u32 = 1 << 1;

/// The one metadata context served.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// Bytes of the server greeting.
pub const GREETING_LEN: usize = 18;
/// Bytes of an option header (magic, option, length).
pub const OPTION_HEADER_LEN: usize = 16;
/// Bytes of a transmission request header.
pub const REQUEST_HEADER_LEN: usize = 28;
/// Bytes of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Bytes of a structured reply chunk header.
pub const STRUCTURED_HEADER_LEN: usize = 20;
/// Largest option payload accepted: a hostile client cannot make the
/// server allocate more than this during the handshake.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Longest string (export name, query) the protocol allows.
pub const MAX_STRING_LEN: usize = 4096;

/// The byte stream is out of sync or hostile; the connection must close.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("Bad magic {got:#x}, expected {expected:#x}")]
    BadMagic { expected: u64, got: u64 },
    #[error("Option {option} carries {len} bytes, more than the {MAX_OPTION_LEN} accepted")]
    OptionTooLong { option: u32, len: u32 },
    #[error("Unknown client flags {0:#x}")]
    UnknownClientFlags(u32),
}

/// What `NBD_OPT_INFO` / `NBD_OPT_GO` ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    /// Requested `NBD_INFO_*` types, in order.
    pub infos: Vec<u16>,
}

/// The payload of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    pub export: String,
    pub queries: Vec<String>,
}

/// One handshake option, parsed and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Opt {
    ExportName(String),
    Abort,
    List,
    StartTls,
    Info(InfoRequest),
    Go(InfoRequest),
    StructuredReply,
    ListMetaContext(MetaContextRequest),
    SetMetaContext(MetaContextRequest),
    /// A known option whose payload is malformed: answer `NBD_REP_ERR_INVALID`.
    Invalid {
        code: u32,
        reason: &'static str,
    },
    /// An option this server does not know: answer `NBD_REP_ERR_UNSUP`.
    Unknown {
        code: u32,
    },
}

impl Opt {
    /// The option code to echo in replies.
    pub fn code(&self) -> u32 {
        match self {
            Opt::ExportName(_) => NBD_OPT_EXPORT_NAME,
            Opt::Abort => NBD_OPT_ABORT,
            Opt::List => NBD_OPT_LIST,
            Opt::StartTls => NBD_OPT_STARTTLS,
            Opt::Info(_) => NBD_OPT_INFO,
            Opt::Go(_) => NBD_OPT_GO,
            Opt::StructuredReply => NBD_OPT_STRUCTURED_REPLY,
            Opt::ListMetaContext(_) => NBD_OPT_LIST_META_CONTEXT,
            Opt::SetMetaContext(_) => NBD_OPT_SET_META_CONTEXT,
            Opt::Invalid { code, .. } | Opt::Unknown { code } => *code,
        }
    }
}

/// A transmission command.
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
    Resize,
    Unknown(u16),
}

impl Cmd {
    pub fn from_u16(v: u16) -> Cmd {
        match v {
            NBD_CMD_READ => Cmd::Read,
            NBD_CMD_WRITE => Cmd::Write,
            NBD_CMD_DISC => Cmd::Disc,
            NBD_CMD_FLUSH => Cmd::Flush,
            NBD_CMD_TRIM => Cmd::Trim,
            NBD_CMD_CACHE => Cmd::Cache,
            NBD_CMD_WRITE_ZEROES => Cmd::WriteZeroes,
            NBD_CMD_BLOCK_STATUS => Cmd::BlockStatus,
            NBD_CMD_RESIZE => Cmd::Resize,
            other => Cmd::Unknown(other),
        }
    }

    pub fn to_u16(self) -> u16 {
        match self {
            Cmd::Read => NBD_CMD_READ,
            Cmd::Write => NBD_CMD_WRITE,
            Cmd::Disc => NBD_CMD_DISC,
            Cmd::Flush => NBD_CMD_FLUSH,
            Cmd::Trim => NBD_CMD_TRIM,
            Cmd::Cache => NBD_CMD_CACHE,
            Cmd::WriteZeroes => NBD_CMD_WRITE_ZEROES,
            Cmd::BlockStatus => NBD_CMD_BLOCK_STATUS,
            Cmd::Resize => NBD_CMD_RESIZE,
            Cmd::Unknown(v) => v,
        }
    }
}

/// A transmission request header. For `Write`, `len` payload bytes follow
/// the header on the wire; the parser does not consume them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub handle: u64,
    pub cmd: Cmd,
    /// Raw `NBD_CMD_FLAG_*` bits.
    pub flags: u16,
    pub offset: u64,
    pub len: u32,
}

impl Request {
    pub fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }
}

/// One `base:allocation` extent descriptor of a block status reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockDescriptor {
    pub len: u32,
    /// `NBD_STATE_*` bits.
    pub flags: u32,
}

// ---------------------------------------------------------------- readers

fn be16(b: &[u8], at: usize) -> Option<u16> {
    let s = b.get(at..at.checked_add(2)?)?;
    Some(u16::from_be_bytes([s[0], s[1]]))
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

fn be64(b: &[u8], at: usize) -> Option<u64> {
    let s = b.get(at..at.checked_add(8)?)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(s);
    Some(u64::from_be_bytes(a))
}

/// A bounds-checked cursor over one option payload.
struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn u16(&mut self) -> Option<u16> {
        let v = be16(self.b, self.at)?;
        self.at += 2;
        Some(v)
    }

    fn u32(&mut self) -> Option<u32> {
        let v = be32(self.b, self.at)?;
        self.at += 4;
        Some(v)
    }

    /// A string of `len` bytes: valid UTF-8, no NUL, at most [`MAX_STRING_LEN`].
    fn string(&mut self, len: u32) -> Result<String, &'static str> {
        let len = len as usize;
        if len > MAX_STRING_LEN {
            return Err("string longer than 4096 bytes");
        }
        let end = self.at.checked_add(len).ok_or("length overflows")?;
        let s = self
            .b
            .get(self.at..end)
            .ok_or("string runs past the option")?;
        let s = std::str::from_utf8(s).map_err(|_| "string is not UTF-8")?;
        if s.contains('\0') {
            return Err("string contains NUL");
        }
        self.at = end;
        Ok(s.to_owned())
    }

    fn done(&self) -> bool {
        self.at == self.b.len()
    }
}

/// Parses the 4-byte client flags that follow the greeting. Flags the
/// server did not offer close the connection, as the protocol requires.
pub fn parse_client_flags(b: &[u8]) -> Result<Option<(u32, usize)>, ProtoError> {
    let Some(flags) = be32(b, 0) else {
        return Ok(None);
    };
    if flags & !(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES) != 0 {
        return Err(ProtoError::UnknownClientFlags(flags));
    }
    Ok(Some((flags, 4)))
}

/// Parses one option (header and payload). The payload length is checked
/// against [`MAX_OPTION_LEN`] from the header alone, before waiting for it.
pub fn parse_option(b: &[u8]) -> Result<Option<(Opt, usize)>, ProtoError> {
    let (Some(magic), Some(code), Some(len)) = (be64(b, 0), be32(b, 8), be32(b, 12)) else {
        // Check the magic as soon as 8 bytes are in, so garbage fails fast.
        if let Some(magic) = be64(b, 0) {
            if magic != IHAVEOPT {
                return Err(ProtoError::BadMagic {
                    expected: IHAVEOPT,
                    got: magic,
                });
            }
        }
        return Ok(None);
    };
    if magic != IHAVEOPT {
        return Err(ProtoError::BadMagic {
            expected: IHAVEOPT,
            got: magic,
        });
    }
    if len > MAX_OPTION_LEN {
        return Err(ProtoError::OptionTooLong { option: code, len });
    }
    let total = OPTION_HEADER_LEN + len as usize;
    let Some(data) = b.get(OPTION_HEADER_LEN..total) else {
        return Ok(None);
    };
    Ok(Some((parse_option_data(code, data), total)))
}

/// Interprets the payload of option `code`.
pub fn parse_option_data(code: u32, data: &[u8]) -> Opt {
    let invalid = |reason| Opt::Invalid { code, reason };
    let empty = |opt: Opt| {
        if data.is_empty() {
            opt
        } else {
            invalid("option takes no data")
        }
    };
    match code {
        NBD_OPT_EXPORT_NAME => {
            let mut c = Cursor { b: data, at: 0 };
            match c.string(data.len().min(u32::MAX as usize) as u32) {
                Ok(name) => Opt::ExportName(name),
                Err(reason) => invalid(reason),
            }
        }
        // Abort is honoured whatever it carries.
        NBD_OPT_ABORT => Opt::Abort,
        NBD_OPT_LIST => empty(Opt::List),
        NBD_OPT_STARTTLS => empty(Opt::StartTls),
        NBD_OPT_STRUCTURED_REPLY => empty(Opt::StructuredReply),
        NBD_OPT_INFO | NBD_OPT_GO => match parse_info_request(data) {
            Ok(r) if code == NBD_OPT_GO => Opt::Go(r),
            Ok(r) => Opt::Info(r),
            Err(reason) => invalid(reason),
        },
        NBD_OPT_LIST_META_CONTEXT | NBD_OPT_SET_META_CONTEXT => match parse_meta_request(data) {
            Ok(r) if code == NBD_OPT_SET_META_CONTEXT => Opt::SetMetaContext(r),
            Ok(r) => Opt::ListMetaContext(r),
            Err(reason) => invalid(reason),
        },
        _ => Opt::Unknown { code },
    }
}

fn parse_info_request(data: &[u8]) -> Result<InfoRequest, &'static str> {
    let mut c = Cursor { b: data, at: 0 };
    let name_len = c.u32().ok_or("truncated name length")?;
    let name = c.string(name_len)?;
    let n = c.u16().ok_or("truncated info request count")?;
    let mut infos = Vec::with_capacity((n as usize).min(data.len() / 2));
    for _ in 0..n {
        infos.push(c.u16().ok_or("truncated info request")?);
    }
    if !c.done() {
        return Err("trailing bytes after info requests");
    }
    Ok(InfoRequest { name, infos })
}

fn parse_meta_request(data: &[u8]) -> Result<MetaContextRequest, &'static str> {
    let mut c = Cursor { b: data, at: 0 };
    let name_len = c.u32().ok_or("truncated name length")?;
    let export = c.string(name_len)?;
    let n = c.u32().ok_or("truncated query count")?;
    let mut queries = Vec::with_capacity((n as usize).min(data.len() / 4));
    for _ in 0..n {
        let len = c.u32().ok_or("truncated query length")?;
        queries.push(c.string(len)?);
    }
    if !c.done() {
        return Err("trailing bytes after queries");
    }
    Ok(MetaContextRequest { export, queries })
}

/// Parses a 28-byte request header. Any magic but `NBD_REQUEST_MAGIC` is
/// an error (the stream is out of sync).
pub fn parse_request(b: &[u8]) -> Result<Option<(Request, usize)>, ProtoError> {
    let Some(magic) = be32(b, 0) else {
        return Ok(None);
    };
    if magic != REQUEST_MAGIC {
        return Err(ProtoError::BadMagic {
            expected: REQUEST_MAGIC as u64,
            got: magic as u64,
        });
    }
    let (Some(flags), Some(cmd), Some(handle), Some(offset), Some(len)) =
        (be16(b, 4), be16(b, 6), be64(b, 8), be64(b, 16), be32(b, 24))
    else {
        return Ok(None);
    };
    let req = Request {
        handle,
        cmd: Cmd::from_u16(cmd),
        flags,
        offset,
        len,
    };
    Ok(Some((req, REQUEST_HEADER_LEN)))
}

mod encode;
pub use encode::*;

#[cfg(test)]
mod tests;
