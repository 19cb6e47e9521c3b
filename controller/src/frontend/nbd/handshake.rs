//! The fixed newstyle handshake of one connection: greeting, client flags,
//! then options until the client enters transmission (`NBD_OPT_GO`,
//! `NBD_OPT_EXPORT_NAME`), starts TLS (`NBD_OPT_STARTTLS`, after which
//! option haggling goes on inside TLS) or leaves (`NBD_OPT_ABORT`, EOF).
//!
//! [`answer`] decides the reply to one option without IO (table-tested
//! below), TLS policy included ([`TlsPhase`]); [`greet`] and [`negotiate`]
//! move bytes ([`handshake`] is both, for a server without TLS). Bytes the
//! client sent after its final option stay in the buffer for the
//! transmission phase.

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::error::ConnError;
use super::proto::*;

/// Minimum and preferred block size advertised (`NBD_INFO_BLOCK_SIZE`).
pub const ADVERTISED_MIN_BLOCK: u32 = 4096;
/// Largest READ or WRITE accepted, advertised as the maximum block size.
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Options one client may send before the server gives up on it.
pub const MAX_OPTIONS: usize = 256;
/// Id of `base:allocation` in block status replies.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// What the export looks like to clients.
#[derive(Debug, Clone)]
pub struct ExportFacts {
    pub name: String,
    /// Bytes, a multiple of 4096.
    pub size: u64,
}

impl ExportFacts {
    fn matches(&self, name: &str) -> bool {
        name.is_empty() || name == self.name
    }
}

/// What the handshake agreed on, for the transmission phase.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Session {
    pub structured: bool,
    /// `base:allocation` was selected: `NBD_CMD_BLOCK_STATUS` is allowed.
    pub base_allocation: bool,
    pub flags: u16,
}

/// Where TLS stands on a connection (the NBD spec's server modes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TlsPhase {
    /// The server has no TLS (NOTLS): STARTTLS gets `NBD_REP_ERR_POLICY`.
    #[default]
    Unavailable,
    /// TLS is offered and not started (SELECTIVETLS, no TLS-only export).
    Offered,
    /// TLS is required and not started (FORCEDTLS): every option but
    /// STARTTLS and ABORT gets `NBD_REP_ERR_TLS_REQD`.
    Required,
    /// STARTTLS was acknowledged: everything from here runs inside TLS.
    Active,
}

/// Negotiation state while options go back and forth.
#[derive(Debug, Clone, Copy, Default)]
pub struct Negotiation {
    pub no_zeroes: bool,
    pub structured: bool,
    pub base_allocation: bool,
    pub tls: TlsPhase,
}

/// What to do after an option's reply is sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    Continue,
    /// Enter transmission.
    Transmit(Session),
    /// The client aborted: close cleanly.
    Close,
    /// The client must be disconnected.
    Fail(String),
    /// STARTTLS was acknowledged: the TLS handshake comes next, then the
    /// options go on inside TLS.
    StartTls,
    /// `NBD_OPT_EXPORT_NAME` before TLS when TLS is required: it cannot be
    /// answered with an error, so the connection closes.
    TlsRequired,
}

/// Transmission flags for a session (`SEND_DF` only with structured
/// replies: reads are always answered in one data chunk).
pub fn transmission_flags(structured: bool) -> u16 {
    let mut f = NBD_FLAG_HAS_FLAGS
        | NBD_FLAG_SEND_FLUSH
        | NBD_FLAG_SEND_FUA
        | NBD_FLAG_SEND_TRIM
        | NBD_FLAG_SEND_WRITE_ZEROES
        | NBD_FLAG_SEND_FAST_ZERO
        | NBD_FLAG_CAN_MULTI_CONN;
    if structured {
        f |= NBD_FLAG_SEND_DF;
    }
    f
}

fn error(out: &mut Vec<u8>, option: u32, kind: u32, msg: &str) -> Next {
    encode_option_reply(out, option, kind, msg.as_bytes());
    Next::Continue
}

fn session(n: &Negotiation) -> Session {
    Session {
        structured: n.structured,
        base_allocation: n.structured && n.base_allocation,
        flags: transmission_flags(n.structured),
    }
}

/// What a client that must start TLS first is told.
pub const TLS_REQUIRED_MSG: &str = "TLS is required: start it with NBD_OPT_STARTTLS";

/// Appends the reply to `opt` to `out` and says what comes next.
pub fn answer(opt: &Opt, n: &mut Negotiation, export: &ExportFacts, out: &mut Vec<u8>) -> Next {
    let code = opt.code();
    if n.tls == TlsPhase::Required && !matches!(opt, Opt::StartTls | Opt::Abort) {
        if matches!(opt, Opt::ExportName(_)) {
            return Next::TlsRequired;
        }
        return error(out, code, NBD_REP_ERR_TLS_REQD, TLS_REQUIRED_MSG);
    }
    match opt {
        Opt::ExportName(name) => {
            if !export.matches(name) {
                return Next::Fail(name.clone());
            }
            let s = session(n);
            encode_export_name_reply(out, export.size, s.flags, n.no_zeroes);
            Next::Transmit(s)
        }
        Opt::Abort => {
            encode_option_reply(out, code, NBD_REP_ACK, &[]);
            Next::Close
        }
        Opt::List => {
            encode_rep_server(out, code, &export.name);
            encode_option_reply(out, code, NBD_REP_ACK, &[]);
            Next::Continue
        }
        Opt::StartTls => match n.tls {
            TlsPhase::Unavailable => error(
                out,
                code,
                NBD_REP_ERR_POLICY,
                "TLS is not offered by this server",
            ),
            TlsPhase::Active => error(out, code, NBD_REP_ERR_INVALID, "TLS is already active"),
            TlsPhase::Offered | TlsPhase::Required => {
                encode_option_reply(out, code, NBD_REP_ACK, &[]);
                // Nothing agreed in plaintext carries over into TLS: a
                // man in the middle could have sent it.
                *n = Negotiation {
                    no_zeroes: n.no_zeroes,
                    tls: TlsPhase::Active,
                    ..Negotiation::default()
                };
                Next::StartTls
            }
        },
        Opt::Info(req) | Opt::Go(req) => {
            if !export.matches(&req.name) {
                let msg = format!("No export named {:?}", req.name);
                return error(out, code, NBD_REP_ERR_UNKNOWN, &msg);
            }
            let s = session(n);
            encode_info_export(out, code, export.size, s.flags);
            let (min, max) = (ADVERTISED_MIN_BLOCK, MAX_PAYLOAD);
            encode_info_block_size(out, code, min, min, max);
            if req.infos.contains(&NBD_INFO_NAME) {
                encode_info_name(out, code, &export.name);
            }
            encode_option_reply(out, code, NBD_REP_ACK, &[]);
            if matches!(opt, Opt::Go(_)) {
                Next::Transmit(s)
            } else {
                Next::Continue
            }
        }
        Opt::StructuredReply => {
            n.structured = true;
            encode_option_reply(out, code, NBD_REP_ACK, &[]);
            Next::Continue
        }
        Opt::ListMetaContext(req) | Opt::SetMetaContext(req) => {
            let set = matches!(opt, Opt::SetMetaContext(_));
            if set {
                // SET replaces the selection, even when it fails.
                n.base_allocation = false;
            }
            if !n.structured {
                let msg = "Structured replies must be negotiated first";
                return error(out, code, NBD_REP_ERR_INVALID, msg);
            }
            if !export.matches(&req.export) {
                let msg = format!("No export named {:?}", req.export);
                return error(out, code, NBD_REP_ERR_UNKNOWN, &msg);
            }
            let wanted = |q: &String| q == BASE_ALLOCATION || (!set && q == "base:");
            let hit = if set {
                req.queries.iter().any(wanted)
            } else {
                req.queries.is_empty() || req.queries.iter().any(wanted)
            };
            if hit {
                let id = if set { BASE_ALLOCATION_ID } else { 0 };
                encode_rep_meta_context(out, code, id, BASE_ALLOCATION);
                n.base_allocation |= set;
            }
            encode_option_reply(out, code, NBD_REP_ACK, &[]);
            Next::Continue
        }
        Opt::Invalid { reason, .. } => error(out, code, NBD_REP_ERR_INVALID, reason),
        Opt::Unknown { .. } => error(out, code, NBD_REP_ERR_UNSUP, "Option not supported"),
    }
}

/// Reads more bytes into `buf`; `false` on EOF.
pub(crate) async fn fill<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
) -> Result<bool, ConnError> {
    if buf.capacity() - buf.len() < 4096 {
        buf.reserve(64 * 1024);
    }
    Ok(rd.read_buf(buf).await? > 0)
}

/// How option haggling ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Negotiated {
    /// Enter transmission on the same stream.
    Transmit(Session),
    /// STARTTLS was acknowledged: run the TLS handshake, then
    /// [`negotiate`] again inside TLS.
    StartTls,
    /// The client left (abort or EOF).
    Closed,
}

/// Sends the greeting and reads the client flags: `Some(no_zeroes)`, or
/// `None` when the client left.
pub async fn greet<S>(stream: &mut S, buf: &mut BytesMut) -> Result<Option<bool>, ConnError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut out = Vec::with_capacity(GREETING_LEN);
    encode_greeting(&mut out, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
    stream.write_all(&out).await?;
    stream.flush().await?;
    loop {
        if let Some((flags, used)) = parse_client_flags(buf)? {
            buf.advance(used);
            return Ok(Some(flags & NBD_FLAG_C_NO_ZEROES != 0));
        }
        if !fill(stream, buf).await? {
            return Ok(None);
        }
    }
}

/// Answers options on `stream` until the client enters transmission,
/// starts TLS or leaves; `options_left` counts down over the whole
/// connection (plaintext and TLS alike).
pub async fn negotiate<S>(
    stream: &mut S,
    buf: &mut BytesMut,
    n: &mut Negotiation,
    export: &ExportFacts,
    options_left: &mut usize,
) -> Result<Negotiated, ConnError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut out = Vec::with_capacity(256);
    while *options_left > 0 {
        *options_left -= 1;
        let opt = loop {
            if let Some((opt, used)) = parse_option(buf)? {
                buf.advance(used);
                break opt;
            }
            if !fill(stream, buf).await? {
                return if buf.is_empty() {
                    Ok(Negotiated::Closed)
                } else {
                    Err(ConnError::Truncated)
                };
            }
        };
        out.clear();
        let next = answer(&opt, n, export, &mut out);
        if !out.is_empty() {
            // A client that hangs up right after NBD_OPT_ABORT is fine.
            let sent = stream.write_all(&out).await.and(stream.flush().await);
            if next != Next::Close {
                sent?;
            }
        }
        match next {
            Next::Continue => {}
            Next::Transmit(s) => return Ok(Negotiated::Transmit(s)),
            Next::StartTls => return Ok(Negotiated::StartTls),
            Next::Close => return Ok(Negotiated::Closed),
            Next::Fail(name) => return Err(ConnError::UnknownExport(name)),
            Next::TlsRequired => return Err(ConnError::TlsRequired),
        }
    }
    Err(ConnError::TooManyOptions(MAX_OPTIONS))
}

/// Runs the whole handshake of a server without TLS on `stream`.
/// `Ok(None)`: the client left before transmission (abort or EOF).
pub async fn handshake<S>(
    stream: &mut S,
    buf: &mut BytesMut,
    export: &ExportFacts,
) -> Result<Option<Session>, ConnError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let Some(no_zeroes) = greet(stream, buf).await? else {
        return Ok(None);
    };
    let mut n = Negotiation {
        no_zeroes,
        ..Negotiation::default()
    };
    let mut left = MAX_OPTIONS;
    match negotiate(stream, buf, &mut n, export, &mut left).await? {
        Negotiated::Transmit(s) => Ok(Some(s)),
        Negotiated::Closed => Ok(None),
        // Unreachable: without TLS, STARTTLS gets an error reply.
        Negotiated::StartTls => Err(ConnError::TlsRequired),
    }
}

#[cfg(test)]
mod tests;
