//! The fixed-newstyle handshake: greeting, client flags, then options until
//! NBD_OPT_GO or NBD_OPT_EXPORT_NAME moves the connection to transmission.
//! A client that breaks the protocol gets its connection closed; an option
//! we do not serve gets NBD_REP_ERR_UNSUP and the handshake goes on.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::proto::*;
use crate::frontend::Backend;

/// What the client negotiated.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Session {
    pub structured_replies: bool,
    /// base:allocation was selected: BLOCK_STATUS is allowed.
    pub block_status: bool,
}

/// Transmission flags every export advertises. CAN_MULTI_CONN holds because
/// all connections share one replicator: a FLUSH on any connection makes
/// every write completed on any connection durable.
pub const TRANSMISSION_FLAGS: u16 = TF_HAS_FLAGS
    | TF_SEND_FLUSH
    | TF_SEND_FUA
    | TF_SEND_TRIM
    | TF_SEND_WRITE_ZEROES
    | TF_CAN_MULTI_CONN
    | TF_SEND_FAST_ZERO;

pub const MIN_BLOCK: u32 = 4096;
pub const PREFERRED_BLOCK: u32 = 4096;

fn protocol_error(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn export_matches<B: Backend>(backend: &B, name: &str) -> bool {
    name.is_empty() || name == backend.export_name()
}

/// Runs the handshake. `Ok(None)`: the client aborted or went away.
pub async fn handshake<S, B>(sock: &mut S, backend: &B) -> io::Result<Option<Session>>
where
    S: AsyncRead + AsyncWrite + Unpin,
    B: Backend,
{
    sock.write_all(&server_greeting()).await?;
    let client_flags = sock.read_u32().await?;
    if client_flags & CLIENT_FIXED_NEWSTYLE == 0 {
        return Err(protocol_error("client does not speak fixed newstyle"));
    }
    if client_flags & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0 {
        return Err(protocol_error(format!(
            "unknown client flags {client_flags:#x}"
        )));
    }
    let no_zeroes = client_flags & CLIENT_NO_ZEROES != 0;
    let mut session = Session::default();
    let mut head = [0u8; 16];
    loop {
        sock.read_exact(&mut head).await?;
        let h = parse_option_header(&head).map_err(|e| protocol_error(e.to_string()))?;
        let mut data = vec![0u8; h.len as usize];
        sock.read_exact(&mut data).await?;
        let reply = |kind: u32, d: &[u8]| option_reply(h.option, kind, d);
        match h.option {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data);
                if !export_matches(backend, &name) {
                    return Err(protocol_error(format!("unknown export {name:?}")));
                }
                sock.write_all(&export_name_reply(
                    backend.size(),
                    TRANSMISSION_FLAGS,
                    no_zeroes,
                ))
                .await?;
                return Ok(Some(session));
            }
            OPT_ABORT => {
                let _ = sock.write_all(&reply(REP_ACK, &[])).await;
                return Ok(None);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    sock.write_all(&reply(REP_ERR_INVALID, b"NBD_OPT_LIST takes no data"))
                        .await?;
                    continue;
                }
                let name = backend.export_name().as_bytes();
                let mut d = Vec::with_capacity(4 + name.len());
                d.extend_from_slice(&(name.len() as u32).to_be_bytes());
                d.extend_from_slice(name);
                sock.write_all(&reply(REP_SERVER, &d)).await?;
                sock.write_all(&reply(REP_ACK, &[])).await?;
            }
            OPT_INFO | OPT_GO => {
                let req = match parse_info_request(h.option, &data) {
                    Ok(r) => r,
                    Err(e) => {
                        sock.write_all(&reply(REP_ERR_INVALID, e.to_string().as_bytes()))
                            .await?;
                        continue;
                    }
                };
                if !export_matches(backend, &req.name) {
                    let msg = format!(
                        "no export named {:?}; this server exports {:?}",
                        req.name,
                        backend.export_name()
                    );
                    sock.write_all(&reply(REP_ERR_UNKNOWN, msg.as_bytes()))
                        .await?;
                    continue;
                }
                let mut out = reply(REP_INFO, &info_export(backend.size(), TRANSMISSION_FLAGS));
                out.extend(reply(
                    REP_INFO,
                    &info_block_size(MIN_BLOCK, PREFERRED_BLOCK, MAX_REQUEST_LEN),
                ));
                if req.requests.contains(&INFO_NAME) {
                    out.extend(reply(REP_INFO, &info_name(backend.export_name())));
                }
                out.extend(reply(REP_ACK, &[]));
                sock.write_all(&out).await?;
                if h.option == OPT_GO {
                    return Ok(Some(session));
                }
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    sock.write_all(&reply(
                        REP_ERR_INVALID,
                        b"NBD_OPT_STRUCTURED_REPLY takes no data",
                    ))
                    .await?;
                } else {
                    session.structured_replies = true;
                    sock.write_all(&reply(REP_ACK, &[])).await?;
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let set = h.option == OPT_SET_META_CONTEXT;
                if !session.structured_replies {
                    sock.write_all(&reply(
                        REP_ERR_INVALID,
                        b"negotiate NBD_OPT_STRUCTURED_REPLY first",
                    ))
                    .await?;
                    continue;
                }
                let req = match parse_meta_context_request(h.option, &data) {
                    Ok(r) => r,
                    Err(e) => {
                        sock.write_all(&reply(REP_ERR_INVALID, e.to_string().as_bytes()))
                            .await?;
                        continue;
                    }
                };
                if !export_matches(backend, &req.export) {
                    sock.write_all(&reply(REP_ERR_UNKNOWN, b"unknown export"))
                        .await?;
                    continue;
                }
                // LIST with no queries lists everything; "base:" matches our one context.
                let wanted = if req.queries.is_empty() {
                    !set
                } else {
                    req.queries
                        .iter()
                        .any(|q| q == BASE_ALLOCATION || (!set && q == "base:"))
                };
                if set {
                    session.block_status = wanted;
                }
                let mut out = Vec::new();
                if wanted {
                    let mut d = Vec::with_capacity(4 + BASE_ALLOCATION.len());
                    d.extend_from_slice(&BASE_ALLOCATION_ID.to_be_bytes());
                    d.extend_from_slice(BASE_ALLOCATION.as_bytes());
                    out.extend(reply(REP_META_CONTEXT, &d));
                }
                out.extend(reply(REP_ACK, &[]));
                sock.write_all(&out).await?;
            }
            OPT_STARTTLS => {
                sock.write_all(&reply(REP_ERR_POLICY, b"TLS is not offered on this port"))
                    .await?;
            }
            other => {
                let msg = format!("option {other} is not supported");
                sock.write_all(&reply(REP_ERR_UNSUP, msg.as_bytes()))
                    .await?;
            }
        }
    }
}
