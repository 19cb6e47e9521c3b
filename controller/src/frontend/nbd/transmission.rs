//! The transmission phase of one connection: requests are read in order,
//! validated, and handled concurrently (at most [`MAX_IN_FLIGHT`] at once);
//! replies go out through one writer in completion order.

use std::io;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use strata_replica::Allocation;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch, Semaphore};

use super::handshake::Session;
use super::proto::*;
use crate::frontend::{Backend, BackendError};

/// Requests handled at once per connection.
pub const MAX_IN_FLIGHT: usize = 128;

/// One reply: a header and, for reads, the data (not copied).
struct Reply {
    head: Vec<u8>,
    data: Option<Bytes>,
}

fn errno(e: &BackendError) -> u32 {
    match e {
        BackendError::Io(_) => EIO,
        BackendError::Invalid(_) => EINVAL,
        BackendError::NoSpace(_) => ENOSPC,
    }
}

/// Checks a request against the export before any IO; returns the NBD
/// error and a message if it must be refused.
fn validate(req: &Request, size: u64, session: Session) -> Result<(), (u32, String)> {
    let ranged = matches!(
        req.cmd,
        Cmd::Read | Cmd::Write | Cmd::Trim | Cmd::WriteZeroes | Cmd::BlockStatus | Cmd::Cache
    );
    if ranged {
        match req.offset.checked_add(req.len as u64) {
            Some(end) if end <= size => {}
            _ => {
                return Err((
                    EINVAL,
                    format!(
                        "offset {} + length {} is beyond the export size {size}",
                        req.offset, req.len
                    ),
                ))
            }
        }
        if req.len == 0 {
            return Err((EINVAL, "zero-length request".into()));
        }
    }
    match req.cmd {
        Cmd::Read | Cmd::Write if req.len > MAX_REQUEST_LEN => Err((
            EOVERFLOW,
            format!("length {} exceeds the maximum {MAX_REQUEST_LEN}", req.len),
        )),
        Cmd::BlockStatus if !session.block_status => {
            Err((EINVAL, "base:allocation was not negotiated".into()))
        }
        Cmd::WriteZeroes
            if req.flags & CMD_FLAG_FAST_ZERO != 0 && req.flags & CMD_FLAG_NO_HOLE != 0 =>
        {
            Err((
                ENOTSUP,
                "zeroing without holes writes data: not fast".into(),
            ))
        }
        Cmd::Unknown(c) => Err((EINVAL, format!("unknown command {c}"))),
        _ => Ok(()),
    }
}

fn error_reply(req: &Request, session: Session, error: u32, msg: &str) -> Reply {
    let structured_only = matches!(req.cmd, Cmd::Read | Cmd::BlockStatus);
    let head = if session.structured_replies && structured_only {
        structured_error(req.handle, error, msg)
    } else {
        simple_reply_header(req.handle, error).to_vec()
    };
    Reply { head, data: None }
}

fn ok_reply(handle: u64) -> Reply {
    Reply {
        head: simple_reply_header(handle, 0).to_vec(),
        data: None,
    }
}

async fn handle<B: Backend>(
    backend: &B,
    req: Request,
    payload: Option<Bytes>,
    session: Session,
) -> Reply {
    if let Err((e, msg)) = validate(&req, backend.size(), session) {
        tracing::debug!(handle = req.handle, ?req.cmd, "refused: {msg}");
        return error_reply(&req, session, e, &msg);
    }
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let result = match req.cmd {
        Cmd::Read => match backend.read(req.offset, req.len).await {
            Ok(data) => {
                let head = if session.structured_replies {
                    let mut h = structured_header(
                        req.handle,
                        REPLY_FLAG_DONE,
                        REPLY_TYPE_OFFSET_DATA,
                        8 + req.len,
                    )
                    .to_vec();
                    h.extend_from_slice(&req.offset.to_be_bytes());
                    h
                } else {
                    simple_reply_header(req.handle, 0).to_vec()
                };
                return Reply {
                    head,
                    data: Some(data),
                };
            }
            Err(e) => Err(e),
        },
        Cmd::Write => {
            backend
                .write(req.offset, payload.unwrap_or_default(), fua)
                .await
        }
        Cmd::Flush => backend.flush().await,
        Cmd::Trim => {
            let r = backend.trim(req.offset, req.len).await;
            match r {
                Ok(()) if fua => backend.flush().await,
                other => other,
            }
        }
        Cmd::WriteZeroes => {
            backend
                .write_zeroes(req.offset, req.len, req.flags & CMD_FLAG_NO_HOLE == 0, fua)
                .await
        }
        Cmd::Cache => Ok(()),
        Cmd::BlockStatus => match backend.block_status(req.offset, req.len).await {
            Ok(extents) => {
                let mut desc: Vec<(u32, u32)> = Vec::new();
                let end = req.offset + req.len as u64;
                for ext in extents {
                    let s = ext.offset.max(req.offset);
                    let e = (ext.offset + ext.len).min(end);
                    if s >= e {
                        continue;
                    }
                    let flags = match ext.kind {
                        Allocation::Data => 0,
                        Allocation::Hole => STATE_HOLE | STATE_ZERO,
                    };
                    desc.push(((e - s) as u32, flags));
                    if req.flags & CMD_FLAG_REQ_ONE != 0 {
                        break;
                    }
                }
                if desc.is_empty() {
                    desc.push((req.len, STATE_HOLE | STATE_ZERO));
                }
                return Reply {
                    head: block_status_reply(req.handle, &desc),
                    data: None,
                };
            }
            Err(e) => Err(e),
        },
        Cmd::Disc | Cmd::Unknown(_) => Ok(()),
    };
    match result {
        Ok(()) => ok_reply(req.handle),
        Err(e) => {
            tracing::warn!(handle = req.handle, cmd = ?req.cmd, offset = req.offset, len = req.len, "request failed: {e}");
            error_reply(&req, session, errno(&e), &e.to_string())
        }
    }
}

async fn write_replies(
    wr: tokio::net::tcp::OwnedWriteHalf,
    mut rx: mpsc::Receiver<Reply>,
) -> io::Result<()> {
    let mut wr = BufWriter::with_capacity(64 * 1024, wr);
    while let Some(r) = rx.recv().await {
        let mut next = Some(r);
        // Write everything already queued, then flush once.
        while let Some(r) = next {
            wr.write_all(&r.head).await?;
            if let Some(d) = r.data {
                wr.write_all(&d).await?;
            }
            next = rx.try_recv().ok();
        }
        wr.flush().await?;
    }
    wr.shutdown().await
}

/// Serves requests on a connection that finished its handshake, until the
/// client disconnects, sends NBD_CMD_DISC, breaks the protocol, or
/// `shutdown` turns true. In-flight requests always get their replies.
pub async fn transmission<B: Backend>(
    sock: TcpStream,
    backend: Arc<B>,
    session: Session,
    mut shutdown: watch::Receiver<bool>,
) -> io::Result<()> {
    let (rd, wr) = sock.into_split();
    let mut rd = BufReader::with_capacity(256 * 1024, rd);
    let (tx, rx) = mpsc::channel::<Reply>(MAX_IN_FLIGHT * 2);
    let writer = tokio::spawn(write_replies(wr, rx));
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut head = [0u8; REQUEST_HEADER_LEN];
    let result: io::Result<()> = loop {
        let read = tokio::select! {
            r = rd.read_exact(&mut head) => r,
            _ = crate::stopped(&mut shutdown) => break Ok(()),
        };
        match read {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break Ok(()),
            Err(e) => break Err(e),
        }
        let req = match parse_request(&head) {
            Ok(r) => r,
            Err(e) => break Err(io::Error::new(io::ErrorKind::InvalidData, e.to_string())),
        };
        if req.cmd == Cmd::Disc {
            break Ok(());
        }
        let mut payload = None;
        if req.cmd == Cmd::Write {
            if req.len > MAX_REQUEST_LEN {
                // The stream cannot be trusted to carry that much: refuse and close.
                let _ = tx
                    .send(error_reply(&req, session, EOVERFLOW, "write too large"))
                    .await;
                break Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "write payload too large",
                ));
            }
            let mut buf = BytesMut::zeroed(req.len as usize);
            if let Err(e) = rd.read_exact(&mut buf).await {
                break Err(e);
            }
            payload = Some(buf.freeze());
        }
        let permit = slots
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore never closed");
        let (backend, tx) = (backend.clone(), tx.clone());
        tokio::spawn(async move {
            let reply = handle(&*backend, req, payload, session).await;
            let _ = tx.send(reply).await;
            drop(permit);
        });
    };
    // Let every request in flight finish and reply before closing.
    let _ = slots.acquire_many(MAX_IN_FLIGHT as u32).await;
    drop(tx);
    let _ = writer.await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(cmd: Cmd, offset: u64, len: u32, flags: u16) -> Request {
        Request {
            flags,
            cmd,
            handle: 1,
            offset,
            len,
        }
    }

    #[test]
    fn validation_refuses_before_io() {
        let s = Session {
            structured_replies: true,
            block_status: false,
        };
        assert!(validate(&req(Cmd::Read, 0, 4096, 0), 8192, s).is_ok());
        assert_eq!(
            validate(&req(Cmd::Read, 8192, 1, 0), 8192, s)
                .unwrap_err()
                .0,
            EINVAL
        );
        assert_eq!(
            validate(&req(Cmd::Write, u64::MAX, 4096, 0), 8192, s)
                .unwrap_err()
                .0,
            EINVAL
        );
        assert_eq!(
            validate(&req(Cmd::Read, 0, 0, 0), 8192, s).unwrap_err().0,
            EINVAL
        );
        assert_eq!(
            validate(&req(Cmd::BlockStatus, 0, 4096, 0), 8192, s)
                .unwrap_err()
                .0,
            EINVAL
        );
        assert_eq!(
            validate(&req(Cmd::Unknown(99), 0, 0, 0), 8192, s)
                .unwrap_err()
                .0,
            EINVAL
        );
        assert_eq!(
            validate(
                &req(
                    Cmd::WriteZeroes,
                    0,
                    4096,
                    CMD_FLAG_FAST_ZERO | CMD_FLAG_NO_HOLE
                ),
                8192,
                s
            )
            .unwrap_err()
            .0,
            ENOTSUP
        );
        assert_eq!(
            validate(&req(Cmd::Read, 0, MAX_REQUEST_LEN + 1, 0), u64::MAX, s)
                .unwrap_err()
                .0,
            EOVERFLOW
        );
        assert!(validate(&req(Cmd::Flush, 0, 0, 0), 8192, s).is_ok());
    }
}
