//! The transmission phase of one connection.
//!
//! One reader parses request headers in order, [`validate`]s each before
//! any IO, reads a WRITE's payload, and spawns the request; up to
//! [`MAX_IN_FLIGHT`] requests and [`MAX_IN_FLIGHT_BYTES`] of READ/WRITE
//! data run at once per connection (the reader waits for room, so a client
//! cannot make the server buffer without bound). Replies go through one
//! writer task in completion order, which may differ from request order.
//! Every request gets exactly one reply, except after `NBD_CMD_DISC` (in
//! flight requests finish, then the connection closes) and after a stream
//! error (bad magic, a WRITE larger than the server will ever read), which
//! close the connection.

use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use super::error::{nbd_errno, ConnError};
use super::handshake::{fill, Session, BASE_ALLOCATION_ID, MAX_PAYLOAD};
use super::ops::Export;
use super::proto::*;
use crate::frontend::{Backend, BackendError};
use strata_net::stopped;

/// Requests handled at once on one connection.
pub const MAX_IN_FLIGHT: usize = 128;
/// READ/WRITE data held at once on one connection (requests and replies).
pub const MAX_IN_FLIGHT_BYTES: usize = 64 << 20;
/// Unit of the byte budget.
const BUDGET_UNIT: usize = 4096;

/// One reply: header bytes and, for reads, the data (not copied). The
/// permits are released once the writer has taken the reply.
struct Reply {
    head: Vec<u8>,
    data: Option<Bytes>,
    _permits: Option<(OwnedSemaphorePermit, Option<OwnedSemaphorePermit>)>,
}

/// Checks a request against the export and the session; `Err` carries
/// the NBD error and a message for the client.
pub fn validate(req: &Request, size: u64, session: &Session) -> Result<(), (u32, String)> {
    let ranged = match req.cmd {
        Cmd::Read | Cmd::Write => {
            if req.len > MAX_PAYLOAD {
                let msg = format!(
                    "Length {} is larger than the maximum {MAX_PAYLOAD}",
                    req.len
                );
                return Err((NBD_EINVAL, msg));
            }
            true
        }
        Cmd::Trim | Cmd::WriteZeroes => true,
        Cmd::BlockStatus => {
            if !session.base_allocation {
                return Err((NBD_EINVAL, "base:allocation was not negotiated".into()));
            }
            true
        }
        Cmd::Flush | Cmd::Disc => false,
        Cmd::Cache | Cmd::Resize | Cmd::Unknown(_) => {
            let msg = format!("Command {} is not supported", req.cmd.to_u16());
            return Err((NBD_EINVAL, msg));
        }
    };
    if ranged {
        if req.len == 0 {
            return Err((NBD_EINVAL, "Zero-length request".into()));
        }
        match req.offset.checked_add(req.len as u64) {
            Some(end) if end <= size => {}
            _ => {
                let msg = format!(
                    "Offset {} + length {} is beyond the export size {size}",
                    req.offset, req.len
                );
                return Err((NBD_EINVAL, msg));
            }
        }
    }
    if req.cmd == Cmd::WriteZeroes
        && req.has(NBD_CMD_FLAG_FAST_ZERO)
        && req.has(NBD_CMD_FLAG_NO_HOLE)
    {
        // Allocating zeros writes data: not faster than a write.
        return Err((NBD_ENOTSUP, "Fast zero without holes is not fast".into()));
    }
    Ok(())
}

fn error_reply(req: &Request, session: &Session, errno: u32, msg: &str) -> Reply {
    let mut head = Vec::with_capacity(32 + msg.len());
    if session.structured {
        encode_structured_error(&mut head, req.handle, errno, msg);
    } else {
        encode_simple_reply(&mut head, req.handle, errno);
    }
    Reply {
        head,
        data: None,
        _permits: None,
    }
}

fn ok_reply(handle: u64) -> Reply {
    let mut head = Vec::with_capacity(SIMPLE_REPLY_LEN);
    encode_simple_reply(&mut head, handle, 0);
    Reply {
        head,
        data: None,
        _permits: None,
    }
}

/// Runs one validated request and builds its reply.
async fn execute<B: Backend>(
    export: &Export<B>,
    req: Request,
    payload: Option<Bytes>,
    session: &Session,
) -> Reply {
    let fua = req.has(NBD_CMD_FLAG_FUA);
    let done: Result<Reply, BackendError> = match req.cmd {
        Cmd::Read => export.read(req.offset, req.len).await.map(|data| {
            let mut head = Vec::with_capacity(STRUCTURED_HEADER_LEN + 8);
            if session.structured {
                // One chunk for the whole read: NBD_CMD_FLAG_DF always holds.
                encode_offset_data_header(&mut head, req.handle, req.offset, req.len, true);
            } else {
                encode_simple_reply(&mut head, req.handle, 0);
            }
            Reply {
                head,
                data: Some(data),
                _permits: None,
            }
        }),
        Cmd::Write => {
            let data = payload.unwrap_or_default();
            export
                .write(req.offset, data, fua)
                .await
                .map(|()| ok_reply(req.handle))
        }
        Cmd::Flush => export.flush().await.map(|()| ok_reply(req.handle)),
        Cmd::Trim => export
            .trim(req.offset, req.len, fua)
            .await
            .map(|()| ok_reply(req.handle)),
        Cmd::WriteZeroes => {
            let may_punch = !req.has(NBD_CMD_FLAG_NO_HOLE);
            let r = export
                .write_zeroes(req.offset, req.len, may_punch, fua)
                .await;
            r.map(|()| ok_reply(req.handle))
        }
        Cmd::BlockStatus => {
            let one = req.has(NBD_CMD_FLAG_REQ_ONE);
            export
                .block_status(req.offset, req.len, one)
                .await
                .map(|d| {
                    let mut head = Vec::with_capacity(STRUCTURED_HEADER_LEN + 4 + 8 * d.len());
                    encode_block_status(&mut head, req.handle, BASE_ALLOCATION_ID, &d);
                    Reply {
                        head,
                        data: None,
                        _permits: None,
                    }
                })
        }
        Cmd::Disc | Cmd::Cache | Cmd::Resize | Cmd::Unknown(_) => {
            Err(BackendError::Invalid("Command not supported".into()))
        }
    };
    match done {
        Ok(reply) => reply,
        Err(e) => {
            tracing::debug!(handle = req.handle, cmd = ?req.cmd, offset = req.offset, len = req.len, "NBD request failed: {e}");
            error_reply(&req, session, nbd_errno(&e), &e.to_string())
        }
    }
}

/// Writes replies as they come; flushes when no more are queued.
async fn write_replies<W: AsyncWrite + Unpin>(
    wr: W,
    mut rx: mpsc::Receiver<Reply>,
) -> std::io::Result<()> {
    let mut w = BufWriter::with_capacity(256 * 1024, wr);
    while let Some(r) = rx.recv().await {
        w.write_all(&r.head).await?;
        if let Some(d) = &r.data {
            w.write_all(d).await?;
        }
        drop(r);
        if rx.is_empty() {
            w.flush().await?;
        }
    }
    w.flush().await?;
    w.shutdown().await
}

/// Reads the next request header; `Ok(None)` on a clean EOF or shutdown.
async fn next_request<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<Option<Request>, ConnError> {
    loop {
        if let Some((req, used)) = parse_request(buf)? {
            buf.advance(used);
            return Ok(Some(req));
        }
        let more = tokio::select! {
            r = fill(rd, buf) => r?,
            _ = stopped(shutdown) => return Ok(None),
        };
        if !more {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(ConnError::Truncated)
            };
        }
    }
}

/// Takes `len` payload bytes from `buf` and the socket.
async fn read_payload<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    len: usize,
) -> Result<Bytes, ConnError> {
    while buf.len() < len {
        buf.reserve(len - buf.len());
        if !fill(rd, buf).await? {
            return Err(ConnError::Truncated);
        }
    }
    Ok(buf.split_to(len).freeze())
}

/// Drops `len` payload bytes of a refused write.
async fn discard_payload<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    mut len: usize,
) -> Result<(), ConnError> {
    loop {
        let n = len.min(buf.len());
        buf.advance(n);
        len -= n;
        if len == 0 {
            return Ok(());
        }
        if !fill(rd, buf).await? {
            return Err(ConnError::Truncated);
        }
    }
}

/// Serves requests on an established session until DISC, EOF, shutdown or
/// an error; waits for in-flight requests and their replies before
/// returning. `buf` holds bytes already read past the handshake.
pub async fn transmission<R, W, B>(
    mut rd: R,
    wr: W,
    mut buf: BytesMut,
    export: Arc<Export<B>>,
    session: Session,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), ConnError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
    B: Backend,
{
    let (tx, rx) = mpsc::channel::<Reply>(MAX_IN_FLIGHT);
    let writer = tokio::spawn(write_replies(wr, rx));
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let bytes = Arc::new(Semaphore::new(MAX_IN_FLIGHT_BYTES / BUDGET_UNIT));
    let mut tasks = JoinSet::new();

    let result = loop {
        if tx.is_closed() {
            break Ok(()); // The writer failed: the client is gone.
        }
        let req = match next_request(&mut rd, &mut buf, &mut shutdown).await {
            Ok(Some(req)) => req,
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        };
        while tasks.try_join_next().is_some() {}
        if req.cmd == Cmd::Disc {
            break Ok(());
        }
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break Ok(());
        };
        // The live size, not the one negotiated: a client that learnt of
        // an expansion (the kernel after a RECONFIGURE with the new size)
        // may use the grown range on the connection it has.
        if let Err((errno, msg)) = validate(&req, export.size(), &session) {
            let mut reply = error_reply(&req, &session, errno, &msg);
            reply._permits = Some((slot, None));
            let _ = tx.send(reply).await;
            if req.cmd == Cmd::Write {
                if req.len > MAX_PAYLOAD {
                    // We will not read that much: the stream cannot be resynced.
                    break Err(ConnError::PayloadTooLarge {
                        len: req.len,
                        max: MAX_PAYLOAD,
                    });
                }
                if let Err(e) = discard_payload(&mut rd, &mut buf, req.len as usize).await {
                    break Err(e);
                }
            }
            continue;
        }
        let budget = if matches!(req.cmd, Cmd::Read | Cmd::Write) {
            let units = (req.len as usize).div_ceil(BUDGET_UNIT) as u32;
            match bytes.clone().acquire_many_owned(units).await {
                Ok(p) => Some(p),
                Err(_) => break Ok(()),
            }
        } else {
            None
        };
        let payload = if req.cmd == Cmd::Write {
            match read_payload(&mut rd, &mut buf, req.len as usize).await {
                Ok(p) => Some(p),
                Err(e) => break Err(e),
            }
        } else {
            None
        };
        let (export, tx) = (export.clone(), tx.clone());
        tasks.spawn(async move {
            let mut reply = execute(&export, req, payload, &session).await;
            reply._permits = Some((slot, budget));
            let _ = tx.send(reply).await;
        });
    };

    while tasks.join_next().await.is_some() {}
    drop(tx);
    let written = writer.await;
    result?;
    match written {
        Ok(r) => r.map_err(ConnError::Io),
        Err(e) => Err(ConnError::Io(std::io::Error::other(e))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(cmd: Cmd, flags: u16, offset: u64, len: u32) -> Request {
        Request {
            handle: 1,
            cmd,
            flags,
            offset,
            len,
        }
    }

    #[test]
    fn validation_table() {
        let plain = Session {
            structured: false,
            base_allocation: false,
            flags: 0,
        };
        let meta = Session {
            structured: true,
            base_allocation: true,
            flags: 0,
        };
        let size = 1 << 20;
        let ok = |r: Request, s: &Session| validate(&r, size, s).map_err(|e| e.0);
        use Cmd::*;
        let table = [
            (req(Read, 0, 0, 4096), &plain, Ok(())),
            (req(Read, 0, 1, 511), &plain, Ok(())),
            (req(Read, 0, 0, 0), &plain, Err(NBD_EINVAL)),
            (req(Read, 0, size - 4096, 4097), &plain, Err(NBD_EINVAL)),
            (req(Read, 0, u64::MAX, 2), &plain, Err(NBD_EINVAL)),
            (req(Read, 0, 0, MAX_PAYLOAD + 1), &plain, Err(NBD_EINVAL)),
            (
                req(Write, NBD_CMD_FLAG_FUA, size - 512, 512),
                &plain,
                Ok(()),
            ),
            (req(Write, 0, size, 1), &plain, Err(NBD_EINVAL)),
            (req(Trim, 0, 0, size as u32), &plain, Ok(())),
            (req(Trim, 0, 0, 0), &plain, Err(NBD_EINVAL)),
            (req(WriteZeroes, 0, 4096, u32::MAX), &plain, Err(NBD_EINVAL)),
            (
                req(WriteZeroes, NBD_CMD_FLAG_FAST_ZERO, 0, 4096),
                &plain,
                Ok(()),
            ),
            (
                req(
                    WriteZeroes,
                    NBD_CMD_FLAG_FAST_ZERO | NBD_CMD_FLAG_NO_HOLE,
                    0,
                    4096,
                ),
                &plain,
                Err(NBD_ENOTSUP),
            ),
            (req(Flush, 0, 0, 0), &plain, Ok(())),
            (req(BlockStatus, 0, 0, 4096), &plain, Err(NBD_EINVAL)),
            (req(BlockStatus, 0, 0, 4096), &meta, Ok(())),
            (req(BlockStatus, 0, 0, 0), &meta, Err(NBD_EINVAL)),
            (req(Cache, 0, 0, 4096), &plain, Err(NBD_EINVAL)),
            (req(Unknown(77), 0, 0, 4096), &plain, Err(NBD_EINVAL)),
        ];
        for (r, s, want) in table {
            assert_eq!(ok(r, s), want, "{r:?}");
        }
    }

    #[test]
    fn error_replies_follow_the_session() {
        let r = req(Cmd::Read, 0, 0, 1);
        let simple = error_reply(&r, &Session::default(), NBD_EIO, "x");
        assert_eq!(
            simple.head,
            [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 1]
        );
        let s = Session {
            structured: true,
            ..Default::default()
        };
        let structured = error_reply(&r, &s, NBD_EIO, "x");
        assert_eq!(
            &structured.head[..8],
            &[0x66, 0x8e, 0x33, 0xef, 0, 1, 0x80, 1]
        );
    }
}
