//! The NBD server against hand-made bytes: hostile or broken input closes
//! only that connection (and the server keeps serving others); errors come
//! back as NBD errors; unaligned, pipelined, out-of-order traffic keeps
//! data right. The server runs in a tokio runtime on its own thread; the
//! client is a blocking `std::net::TcpStream` with timeouts, so a hang
//! fails the test instead of stalling it.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::Server;
use strata_controller::frontend::mem::FailOn;
use strata_controller::frontend::nbd::proto::*;
use strata_controller::frontend::BackendError;

const SIZE: u64 = 16 << 20;

fn read_n(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    s.read_exact(&mut b).unwrap();
    b
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes(b[at..at + 2].try_into().unwrap())
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// True if the server closed the connection (EOF or reset) within the timeout.
fn closed(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 4096];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(e) => panic!("connection still open: {e}"),
        }
    }
}

/// Reads option replies until a final one; returns (type, data) of each.
fn option_replies(s: &mut TcpStream, option: u32) -> Vec<(u32, Vec<u8>)> {
    let mut v = Vec::new();
    loop {
        let h = read_n(s, 20);
        assert_eq!(u64_at(&h, 0), OPT_REPLY_MAGIC);
        assert_eq!(u32_at(&h, 8), option);
        let kind = u32_at(&h, 12);
        let data = read_n(s, u32_at(&h, 16) as usize);
        v.push((kind, data));
        if kind != NBD_REP_INFO && kind != NBD_REP_SERVER && kind != NBD_REP_META_CONTEXT {
            return v;
        }
    }
}

fn greet(s: &mut TcpStream) {
    let g = read_n(s, GREETING_LEN);
    assert_eq!(&g[..16], b"NBDMAGICIHAVEOPT");
    assert_eq!(u16_at(&g, 16), NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
    s.write_all(&(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES).to_be_bytes())
        .unwrap();
}

fn send_option(s: &mut TcpStream, code: u32, data: &[u8]) {
    let mut w = Vec::new();
    encode_option(&mut w, code, data);
    s.write_all(&w).unwrap();
}

/// A client in transmission: optionally with structured replies and base:allocation.
fn client(server: &Server, structured: bool, meta: bool) -> (TcpStream, u16) {
    let mut s = server.connect();
    greet(&mut s);
    if structured {
        send_option(&mut s, NBD_OPT_STRUCTURED_REPLY, &[]);
        assert_eq!(
            option_replies(&mut s, NBD_OPT_STRUCTURED_REPLY)[0].0,
            NBD_REP_ACK
        );
    }
    if meta {
        let mut d = Vec::new();
        let req = MetaContextRequest {
            export: "test".into(),
            queries: vec![BASE_ALLOCATION.into()],
        };
        encode_meta_request(&mut d, &req);
        send_option(&mut s, NBD_OPT_SET_META_CONTEXT, &d);
        let r = option_replies(&mut s, NBD_OPT_SET_META_CONTEXT);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].0, NBD_REP_META_CONTEXT);
    }
    let mut d = Vec::new();
    encode_info_request(
        &mut d,
        &InfoRequest {
            name: "test".into(),
            infos: vec![NBD_INFO_BLOCK_SIZE],
        },
    );
    send_option(&mut s, NBD_OPT_GO, &d);
    let r = option_replies(&mut s, NBD_OPT_GO);
    assert_eq!(r.last().unwrap().0, NBD_REP_ACK);
    let export = r
        .iter()
        .find(|(k, d)| *k == NBD_REP_INFO && u16_at(d, 0) == NBD_INFO_EXPORT)
        .unwrap();
    assert_eq!(u64_at(&export.1, 2), SIZE);
    let bs = r
        .iter()
        .find(|(k, d)| *k == NBD_REP_INFO && u16_at(d, 0) == NBD_INFO_BLOCK_SIZE)
        .unwrap();
    assert_eq!(
        (u32_at(&bs.1, 2), u32_at(&bs.1, 6), u32_at(&bs.1, 10)),
        (4096, 4096, 32 << 20)
    );
    (s, u16_at(&export.1, 10))
}

fn send_req(
    s: &mut TcpStream,
    handle: u64,
    cmd: Cmd,
    flags: u16,
    offset: u64,
    len: u32,
    data: &[u8],
) {
    let mut w = Vec::new();
    encode_request(
        &mut w,
        &Request {
            handle,
            cmd,
            flags,
            offset,
            len,
        },
    );
    w.extend_from_slice(data);
    s.write_all(&w).unwrap();
}

/// Reads one simple reply: (handle, error).
fn simple_reply(s: &mut TcpStream) -> (u64, u32) {
    let h = read_n(s, SIMPLE_REPLY_LEN);
    assert_eq!(u32_at(&h, 0), SIMPLE_REPLY_MAGIC);
    (u64_at(&h, 8), u32_at(&h, 4))
}

/// One structured chunk: (flags, type, handle, payload).
fn chunk(s: &mut TcpStream) -> (u16, u16, u64, Vec<u8>) {
    let h = read_n(s, STRUCTURED_HEADER_LEN);
    assert_eq!(u32_at(&h, 0), STRUCTURED_REPLY_MAGIC);
    let payload = read_n(s, u32_at(&h, 16) as usize);
    (u16_at(&h, 4), u16_at(&h, 6), u64_at(&h, 8), payload)
}

/// A second, well-behaved client still works: write, read back.
fn still_serving(server: &Server) {
    let (mut s, _) = client(server, false, false);
    send_req(&mut s, 1, Cmd::Write, 0, 8192, 4096, &[0x5a; 4096]);
    assert_eq!(simple_reply(&mut s), (1, 0));
    send_req(&mut s, 2, Cmd::Read, 0, 8192, 4096, &[]);
    assert_eq!(simple_reply(&mut s), (2, 0));
    assert_eq!(read_n(&mut s, 4096), vec![0x5a; 4096]);
}

#[test]
fn garbage_and_broken_handshakes_close_only_that_connection() {
    let server = Server::start(SIZE);
    // Garbage instead of client flags + options.
    let mut s = server.connect();
    read_n(&mut s, GREETING_LEN);
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert!(closed(&mut s));
    // Unknown client flags.
    let mut s = server.connect();
    read_n(&mut s, GREETING_LEN);
    s.write_all(&[0, 0, 0, 0x80]).unwrap();
    assert!(closed(&mut s));
    // Truncated handshake: half the flags, then hang up.
    let mut s = server.connect();
    s.write_all(&[0, 0]).unwrap();
    drop(s);
    // An option claiming 1 GiB of data.
    let mut s = server.connect();
    greet(&mut s);
    let mut w = IHAVEOPT.to_be_bytes().to_vec();
    w.extend_from_slice(&NBD_OPT_GO.to_be_bytes());
    w.extend_from_slice(&(1u32 << 30).to_be_bytes());
    s.write_all(&w).unwrap();
    assert!(closed(&mut s));
    // EXPORT_NAME of an unknown export must close.
    let mut s = server.connect();
    greet(&mut s);
    send_option(&mut s, NBD_OPT_EXPORT_NAME, b"nope");
    assert!(closed(&mut s));
    still_serving(&server);
}

#[test]
fn options_get_replies_and_negotiation_continues() {
    let server = Server::start(SIZE);
    let mut s = server.connect();
    greet(&mut s);
    send_option(&mut s, 0x4242, b"whatever");
    assert_eq!(
        option_replies(&mut s, 0x4242),
        [(NBD_REP_ERR_UNSUP, b"Option not supported".to_vec())]
    );
    send_option(&mut s, NBD_OPT_LIST, &[]);
    let r = option_replies(&mut s, NBD_OPT_LIST);
    assert_eq!(r[0], (NBD_REP_SERVER, b"\0\0\0\x04test".to_vec()));
    assert_eq!(r[1].0, NBD_REP_ACK);
    send_option(&mut s, NBD_OPT_LIST, b"x");
    assert_eq!(
        option_replies(&mut s, NBD_OPT_LIST)[0].0,
        NBD_REP_ERR_INVALID
    );
    let mut d = Vec::new();
    encode_info_request(
        &mut d,
        &InfoRequest {
            name: "other".into(),
            infos: vec![],
        },
    );
    send_option(&mut s, NBD_OPT_INFO, &d);
    assert_eq!(
        option_replies(&mut s, NBD_OPT_INFO)[0].0,
        NBD_REP_ERR_UNKNOWN
    );
    send_option(&mut s, NBD_OPT_STARTTLS, &[]);
    assert_eq!(
        option_replies(&mut s, NBD_OPT_STARTTLS)[0].0,
        NBD_REP_ERR_POLICY
    );
    // EXPORT_NAME with the default (empty) name enters transmission.
    send_option(&mut s, NBD_OPT_EXPORT_NAME, b"");
    let r = read_n(&mut s, 10);
    assert_eq!(u64_at(&r, 0), SIZE);
    let flags = u16_at(&r, 8);
    assert_ne!(flags & NBD_FLAG_CAN_MULTI_CONN, 0);
    send_req(&mut s, 9, Cmd::Flush, 0, 0, 0, &[]);
    assert_eq!(simple_reply(&mut s), (9, 0));
    // ABORT gets an ACK and the server closes.
    let mut s = server.connect();
    greet(&mut s);
    send_option(&mut s, NBD_OPT_ABORT, &[]);
    assert_eq!(option_replies(&mut s, NBD_OPT_ABORT)[0].0, NBD_REP_ACK);
    assert!(closed(&mut s));
}

#[test]
fn bad_requests_get_errors_and_the_connection_goes_on() {
    let server = Server::start(SIZE);
    let (mut s, flags) = client(&server, false, false);
    assert_eq!(
        flags & NBD_FLAG_SEND_DF,
        0,
        "DF only with structured replies"
    );
    send_req(&mut s, 1, Cmd::Unknown(0x77), 0, 0, 4096, &[]);
    assert_eq!(simple_reply(&mut s), (1, NBD_EINVAL));
    send_req(&mut s, 2, Cmd::Read, 0, SIZE - 4096, 8192, &[]);
    assert_eq!(simple_reply(&mut s), (2, NBD_EINVAL));
    send_req(&mut s, 3, Cmd::Read, 0, 0, 0, &[]);
    assert_eq!(simple_reply(&mut s), (3, NBD_EINVAL));
    // A write past the end: refused, and its payload is skipped.
    send_req(&mut s, 4, Cmd::Write, 0, SIZE, 4096, &[0xee; 4096]);
    assert_eq!(simple_reply(&mut s), (4, NBD_EINVAL));
    send_req(&mut s, 5, Cmd::Write, 0, u64::MAX - 10, 100, &[0xee; 100]);
    assert_eq!(simple_reply(&mut s), (5, NBD_EINVAL));
    send_req(&mut s, 6, Cmd::BlockStatus, 0, 0, 4096, &[]);
    assert_eq!(
        simple_reply(&mut s),
        (6, NBD_EINVAL),
        "base:allocation not negotiated"
    );
    send_req(&mut s, 7, Cmd::Read, 0, 0, 4096, &[]);
    assert_eq!(simple_reply(&mut s), (7, 0));
    assert_eq!(read_n(&mut s, 4096), vec![0; 4096]);
    assert_eq!(server.backend.allocated_blocks(), 0);
    // Backend failures come back as NBD errors.
    server.backend.fail_with(Some((
        FailOn::Writes,
        BackendError::BelowQuorum("1 of 3 healthy".into()),
    )));
    send_req(&mut s, 8, Cmd::Write, 0, 0, 4096, &[1; 4096]);
    assert_eq!(simple_reply(&mut s), (8, NBD_EIO));
    server.backend.fail_with(Some((
        FailOn::Writes,
        BackendError::Fenced("epoch 7 is newer".into()),
    )));
    send_req(&mut s, 8, Cmd::Write, 0, 0, 4096, &[1; 4096]);
    assert_eq!(simple_reply(&mut s), (8, NBD_ESHUTDOWN));
    server
        .backend
        .fail_with(Some((FailOn::Writes, BackendError::ReadOnly)));
    send_req(&mut s, 9, Cmd::WriteZeroes, 0, 0, 4096, &[]);
    assert_eq!(simple_reply(&mut s), (9, NBD_EPERM));
    server.backend.fail_with(None);
    // FAST_ZERO with NO_HOLE cannot be fast.
    let fz = NBD_CMD_FLAG_FAST_ZERO | NBD_CMD_FLAG_NO_HOLE;
    send_req(&mut s, 10, Cmd::WriteZeroes, fz, 0, 4096, &[]);
    assert_eq!(simple_reply(&mut s), (10, NBD_ENOTSUP));
    // A write too large to ever read: EINVAL, then the server hangs up.
    send_req(&mut s, 11, Cmd::Write, 0, 0, 0x8000_0000, &[]);
    assert_eq!(simple_reply(&mut s), (11, NBD_EINVAL));
    assert!(closed(&mut s));
    // Bad request magic closes too.
    let (mut s, _) = client(&server, false, false);
    s.write_all(&[0xde; 28]).unwrap();
    assert!(closed(&mut s));
    still_serving(&server);
}

/// Tiny deterministic generator (no external state in the test).
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
}

#[test]
fn pipelined_unaligned_writes_and_reads_match_a_model() {
    let server = Server::start(SIZE);
    let (mut s, _) = client(&server, false, false);
    let span = 256 * 1024u64;
    let mut model = vec![0u8; span as usize];
    let mut rng = Lcg(7);
    // Round after round: many writes in flight at once, at odd offsets and
    // lengths (some within one block, some spanning several), on
    // non-overlapping ranges so their order does not matter.
    for round in 0..20u64 {
        let mut sent = HashMap::new();
        let slot = span / 32;
        for i in 0..32u64 {
            let off = i * slot + rng.next() % 1000;
            let len = 1 + rng.next() % (slot - 1000);
            let byte = (round * 32 + i) as u8 | 1;
            let data = vec![byte; len as usize];
            model[off as usize..(off + len) as usize].copy_from_slice(&data);
            let flags = if i % 5 == 0 { NBD_CMD_FLAG_FUA } else { 0 };
            send_req(
                &mut s,
                1000 * round + i,
                Cmd::Write,
                flags,
                off,
                len as u32,
                &data,
            );
            sent.insert(1000 * round + i, ());
        }
        for _ in 0..32 {
            let (h, e) = simple_reply(&mut s);
            assert_eq!(e, 0);
            assert!(sent.remove(&h).is_some(), "unexpected handle {h}");
        }
        // Unaligned zeroing and trimming of one slot.
        let off = (rng.next() % (span - 20000)) & !1;
        send_req(&mut s, 1, Cmd::WriteZeroes, 0, off + 1, 12345, &[]);
        assert_eq!(simple_reply(&mut s), (1, 0));
        model[(off + 1) as usize..(off + 1 + 12345) as usize].fill(0);
    }
    // Read everything back in odd-sized pieces, pipelined.
    let mut pieces = Vec::new();
    let mut at = 3u64;
    while at < span {
        let len = (1 + rng.next() % 9000).min(span - at);
        pieces.push((at, len));
        at += len;
    }
    for (i, &(off, len)) in pieces.iter().enumerate() {
        send_req(&mut s, i as u64, Cmd::Read, 0, off, len as u32, &[]);
    }
    for _ in &pieces {
        let (h, e) = simple_reply(&mut s);
        assert_eq!(e, 0);
        let (off, len) = pieces[h as usize];
        let got = read_n(&mut s, len as usize);
        assert!(
            got == model[off as usize..(off + len) as usize],
            "read at {off}+{len} differs"
        );
    }
    // Only aligned requests ever reached the backend (it refuses others).
    assert!(server.backend.stats().fua_writes > 0);
}

#[test]
fn structured_reads_errors_and_block_status() {
    let server = Server::start(SIZE);
    let (mut s, flags) = client(&server, true, true);
    assert_ne!(flags & NBD_FLAG_SEND_DF, 0);
    send_req(&mut s, 1, Cmd::Write, 0, 65536, 8192, &[7; 8192]);
    assert_eq!(simple_reply(&mut s), (1, 0));

    send_req(&mut s, 2, Cmd::Read, NBD_CMD_FLAG_DF, 65536 + 100, 300, &[]);
    let (f, t, h, p) = chunk(&mut s);
    assert_eq!(
        (f, t, h),
        (NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_DATA, 2)
    );
    assert_eq!(u64_at(&p, 0), 65636);
    assert_eq!(&p[8..], &[7; 300][..]);

    send_req(&mut s, 3, Cmd::Read, 0, SIZE, 4096, &[]);
    let (f, t, h, p) = chunk(&mut s);
    assert_eq!((f, t, h), (NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR, 3));
    assert_eq!(u32_at(&p, 0), NBD_EINVAL);
    assert_eq!(u16_at(&p, 4) as usize, p.len() - 6);

    send_req(&mut s, 4, Cmd::BlockStatus, 0, 0, 1 << 20, &[]);
    let (f, t, h, p) = chunk(&mut s);
    assert_eq!(
        (f, t, h),
        (NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_BLOCK_STATUS, 4)
    );
    assert_eq!(u32_at(&p, 0), 1, "context id of base:allocation");
    let desc: Vec<(u32, u32)> = p[4..]
        .chunks(8)
        .map(|c| (u32_at(c, 0), u32_at(c, 4)))
        .collect();
    let hz = NBD_STATE_HOLE | NBD_STATE_ZERO;
    assert_eq!(
        desc,
        [(65536, hz), (8192, 0), ((1 << 20) - 65536 - 8192, hz)]
    );

    send_req(
        &mut s,
        5,
        Cmd::BlockStatus,
        NBD_CMD_FLAG_REQ_ONE,
        4096,
        1 << 20,
        &[],
    );
    let (_, _, _, p) = chunk(&mut s);
    assert_eq!(p.len(), 12, "one extent with REQ_ONE");
    assert_eq!((u32_at(&p, 4), u32_at(&p, 8)), (61440, hz));

    // Trim punches the whole blocks; the map shows it.
    send_req(&mut s, 6, Cmd::Trim, 0, 65536, 4096, &[]);
    assert_eq!(simple_reply(&mut s), (6, 0));
    send_req(&mut s, 7, Cmd::BlockStatus, 0, 65536, 8192, &[]);
    let (_, _, _, p) = chunk(&mut s);
    let desc: Vec<(u32, u32)> = p[4..]
        .chunks(8)
        .map(|c| (u32_at(c, 0), u32_at(c, 4)))
        .collect();
    assert_eq!(desc, [(4096, hz), (4096, 0)]);

    // Errors of non-read commands are structured too.
    send_req(&mut s, 8, Cmd::Trim, 0, SIZE, 1, &[]);
    let (_, t, h, _) = chunk(&mut s);
    assert_eq!((t, h), (NBD_REPLY_TYPE_ERROR, 8));
}

#[test]
fn disconnect_finishes_in_flight_requests_first() {
    let server = Server::start(SIZE);
    let (mut s, _) = client(&server, false, false);
    for i in 0..64u64 {
        send_req(
            &mut s,
            i,
            Cmd::Write,
            0,
            i * 4096,
            4096,
            &[i as u8 + 1; 4096],
        );
    }
    send_req(&mut s, 99, Cmd::Disc, 0, 0, 0, &[]);
    let mut seen = 0;
    for _ in 0..64 {
        let (_, e) = simple_reply(&mut s);
        assert_eq!(e, 0);
        seen += 1;
    }
    assert_eq!(seen, 64);
    assert!(closed(&mut s));
    assert_eq!(server.backend.allocated_blocks(), 64);
}

#[test]
fn shutdown_stops_serve_with_a_client_connected() {
    let server = Server::start(SIZE);
    let (_s, _) = client(&server, false, false);
    let t = std::time::Instant::now();
    drop(server);
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "serve did not stop promptly"
    );
}
