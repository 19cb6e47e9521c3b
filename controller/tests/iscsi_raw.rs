//! Protocol-level tests of the iSCSI target: raw PDUs over TCP against a
//! target on 127.0.0.1 port 0 serving a [`MemBackend`] (or a resizable
//! test backend). Covers login and negotiation, CHAP (one-way, mutual,
//! wrong secrets), the command window with immediate and non-immediate
//! NOP-Outs, R2T/immediate-data writes, digests, malformed and oversized
//! PDUs (a clean reject or close while other sessions keep working), task
//! management, target pings, logout and the capacity unit attention.
//! Every step is bounded by a timeout.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use strata_controller::frontend::iscsi::chap::{self, ChapConfig, Credential};
use strata_controller::frontend::iscsi::pdu::{check_frame, crc32c, Digests};
use strata_controller::frontend::iscsi::{serve, ConnOptions, IscsiOptions};
use strata_controller::frontend::mem::MemBackend;
use strata_controller::frontend::{Backend, BackendError};
use strata_replica::AllocationExtent;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::timeout;

const T: Duration = Duration::from_secs(10);
const TARGET: &str = "iqn.2026-11.io.strata:vol";
const BS: usize = 4096;

struct Server {
    addr: std::net::SocketAddr,
    _stop: watch::Sender<bool>,
}

async fn start<B: Backend>(backend: Arc<B>, opts: IscsiOptions) -> Server {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = watch::channel(false);
    tokio::spawn(serve(l, backend, opts, rx));
    Server { addr, _stop: tx }
}

async fn mem_server(opts: IscsiOptions) -> Server {
    start(Arc::new(MemBackend::new("vol", 16 << 20)), opts).await
}

#[derive(Debug)]
struct Pdu {
    bhs: [u8; 48],
    data: Vec<u8>,
}

impl Pdu {
    fn opcode(&self) -> u8 {
        self.bhs[0] & 0x3f
    }
    fn u32_at(&self, at: usize) -> u32 {
        u32::from_be_bytes(self.bhs[at..at + 4].try_into().unwrap())
    }
    fn text(&self) -> Vec<(String, String)> {
        String::from_utf8_lossy(&self.data)
            .split('\0')
            .filter(|s| !s.is_empty())
            .filter_map(|kv| {
                kv.split_once('=')
                    .map(|(k, v)| (k.to_string(), v.to_string()))
            })
            .collect()
    }
    fn key(&self, k: &str) -> Option<String> {
        self.text()
            .into_iter()
            .find(|(kk, _)| kk == k)
            .map(|(_, v)| v)
    }
}

struct Client {
    s: TcpStream,
    buf: Vec<u8>,
    cmdsn: u32,
    statsn: u32,
    itt: u32,
    digests: Digests,
    isid: [u8; 6],
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

fn text(pairs: &[(&str, &str)]) -> Vec<u8> {
    let mut v = Vec::new();
    for (k, val) in pairs {
        v.extend_from_slice(format!("{k}={val}\0").as_bytes());
    }
    v
}

/// A distinct ISID per client: two logins with the same initiator name and
/// ISID are a session reinstatement, which closes the older session (a random
/// byte collided often enough to fail a test that keeps one session open).
fn next_isid() -> [u8; 6] {
    static NEXT: AtomicU32 = AtomicU32::new(1);
    let n = NEXT.fetch_add(1, Ordering::Relaxed).to_be_bytes();
    [0x80, 0, n[0], n[1], n[2], n[3]]
}

impl Client {
    async fn connect(s: &Server) -> Client {
        Client {
            s: timeout(T, TcpStream::connect(s.addr))
                .await
                .unwrap()
                .unwrap(),
            buf: Vec::new(),
            cmdsn: 1,
            statsn: 0,
            itt: 0,
            digests: Digests::default(),
            isid: next_isid(),
        }
    }

    async fn send(&mut self, bhs: [u8; 48], data: &[u8]) {
        let mut b = bhs;
        let n = data.len() as u32;
        b[5..8].copy_from_slice(&n.to_be_bytes()[1..]);
        let mut out = b.to_vec();
        if self.digests.header {
            out.extend_from_slice(&crc32c(&b).to_le_bytes());
        }
        out.extend_from_slice(data);
        out.resize(out.len() + (4 - data.len() % 4) % 4, 0);
        if self.digests.data && !data.is_empty() {
            let start = out.len() - data.len().div_ceil(4) * 4;
            let d = crc32c(&out[start..]);
            out.extend_from_slice(&d.to_le_bytes());
        }
        self.send_raw(&out).await;
    }

    async fn send_raw(&mut self, bytes: &[u8]) {
        let _ = timeout(T, self.s.write_all(bytes)).await.unwrap();
    }

    /// The next PDU, or `None` if the target closed the connection.
    async fn recv_within(&mut self, d: Duration) -> Option<Pdu> {
        let fut = async {
            loop {
                if let Ok(Some(f)) = check_frame(&self.buf, self.digests, 1 << 24) {
                    let mut bhs = [0u8; 48];
                    bhs.copy_from_slice(&self.buf[..48]);
                    let data = self.buf[f.data_start..f.data_start + f.data_len].to_vec();
                    self.buf.drain(..f.total);
                    return Some(Pdu { bhs, data });
                }
                let mut chunk = vec![0u8; 65536];
                match self.s.read(&mut chunk).await {
                    Ok(0) | Err(_) => return None,
                    Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                }
            }
        };
        timeout(d, fut).await.unwrap_or(None)
    }

    async fn recv(&mut self) -> Pdu {
        let p = self
            .recv_within(T)
            .await
            .expect("the target closed the connection");
        if matches!(p.opcode(), 0x21 | 0x20 | 0x22 | 0x23 | 0x24 | 0x26 | 0x3f)
            || (p.opcode() == 0x25 && p.bhs[1] & 1 != 0)
        {
            self.statsn = p.u32_at(24).wrapping_add(1);
        }
        p
    }

    /// True if the target closes the connection within the timeout
    /// (any PDUs before the close are read and dropped).
    async fn closed(&mut self) -> bool {
        for _ in 0..16 {
            if self.recv_within(T).await.is_none() {
                return true;
            }
        }
        false
    }

    fn next_itt(&mut self) -> u32 {
        self.itt += 1;
        self.itt
    }

    fn login_bhs(&mut self, transit: bool, csg: u8, nsg: u8) -> [u8; 48] {
        let mut b = [0u8; 48];
        b[0] = 0x43;
        b[1] = (if transit { 0x80 } else { 0 }) | csg << 2 | nsg;
        b[8..14].copy_from_slice(&self.isid);
        let itt = self.next_itt();
        put32(&mut b, 16, itt);
        put32(&mut b, 24, self.cmdsn);
        put32(&mut b, 28, self.statsn);
        b
    }

    async fn login_step(&mut self, transit: bool, csg: u8, nsg: u8, pairs: &[(&str, &str)]) -> Pdu {
        let b = self.login_bhs(transit, csg, nsg);
        self.send(b, &text(pairs)).await;
        let p = self.recv().await;
        assert_eq!(p.opcode(), 0x23, "login response");
        p
    }

    /// Login without authentication with extra operational keys.
    async fn login(&mut self, ops: &[(&str, &str)]) -> Pdu {
        let p = self
            .login_step(
                true,
                0,
                1,
                &[
                    ("InitiatorName", "iqn.test:raw"),
                    ("SessionType", "Normal"),
                    ("TargetName", TARGET),
                    ("AuthMethod", "None"),
                ],
            )
            .await;
        assert_eq!((p.bhs[36], p.bhs[37]), (0, 0), "{:?}", p.text());
        let p = self.login_step(true, 1, 3, ops).await;
        assert_eq!((p.bhs[36], p.bhs[37]), (0, 0), "{:?}", p.text());
        assert_eq!(p.bhs[1] & 0x83, 0x83, "transit to full feature");
        self.cmdsn = p.u32_at(28);
        if p.key("HeaderDigest").as_deref() == Some("CRC32C") {
            self.digests.header = true;
        }
        if p.key("DataDigest").as_deref() == Some("CRC32C") {
            self.digests.data = true;
        }
        p
    }

    fn cmd_bhs(&mut self, opcode: u8, immediate: bool) -> [u8; 48] {
        let mut b = [0u8; 48];
        b[0] = opcode | if immediate { 0x40 } else { 0 };
        b[1] = 0x80;
        let itt = self.next_itt();
        put32(&mut b, 16, itt);
        put32(&mut b, 24, self.cmdsn);
        put32(&mut b, 28, self.statsn);
        if !immediate {
            self.cmdsn = self.cmdsn.wrapping_add(1);
        }
        b
    }

    /// A SCSI command with its data; returns (status, data-in, response
    /// PDU). Answers R2Ts; sends immediate data when `immediate`.
    async fn scsi(
        &mut self,
        cdb: &[u8],
        edtl: u32,
        out: Option<&[u8]>,
        immediate_data: usize,
    ) -> (u8, Vec<u8>, Pdu) {
        let mut b = self.cmd_bhs(0x01, false);
        let (read, write) = (out.is_none() && edtl > 0, out.is_some());
        b[1] = 0x80 | if read { 0x40 } else { 0 } | if write { 0x20 } else { 0 } | 1;
        put32(&mut b, 20, edtl);
        b[32..32 + cdb.len()].copy_from_slice(cdb);
        let itt = u32::from_be_bytes(b[16..20].try_into().unwrap());
        let imm = out
            .map(|d| &d[..immediate_data.min(d.len())])
            .unwrap_or(&[]);
        self.send(b, imm).await;
        let mut data_in = Vec::new();
        loop {
            let p = self.recv().await;
            match p.opcode() {
                0x31 => {
                    let (ttt, off, len) =
                        (p.u32_at(20), p.u32_at(40) as usize, p.u32_at(44) as usize);
                    let src = out.expect("R2T for a read");
                    let mut d = [0u8; 48];
                    d[0] = 0x05;
                    d[1] = 0x80;
                    put32(&mut d, 16, itt);
                    put32(&mut d, 20, ttt);
                    put32(&mut d, 28, self.statsn);
                    put32(&mut d, 40, off as u32);
                    self.send(d, &src[off..off + len]).await;
                }
                0x25 => {
                    data_in.extend_from_slice(&p.data);
                    if p.bhs[1] & 1 != 0 {
                        return (p.bhs[3], data_in, p);
                    }
                }
                0x21 => return (p.bhs[3], data_in, p),
                op => panic!("unexpected opcode {op:#x}"),
            }
        }
    }

    async fn nop(&mut self, immediate: bool, payload: &[u8]) -> Pdu {
        let mut b = self.cmd_bhs(0x00, immediate);
        put32(&mut b, 20, 0xffff_ffff);
        self.send(b, payload).await;
        let p = self.recv().await;
        assert_eq!(p.opcode(), 0x20);
        p
    }

    async fn tur(&mut self) -> u8 {
        self.scsi(&[0; 6], 0, None, 0).await.0
    }
}

fn rw10(op: u8, lba: u32, blocks: u16) -> [u8; 10] {
    let mut c = [0u8; 10];
    c[0] = op;
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[7..9].copy_from_slice(&blocks.to_be_bytes());
    c
}

#[tokio::test]
async fn login_inquiry_capacity_and_data() {
    let srv = mem_server(IscsiOptions::default()).await;
    let mut c = Client::connect(&srv).await;
    let p = c
        .login(&[
            ("MaxRecvDataSegmentLength", "8192"),
            ("InitialR2T", "Yes"),
            ("ImmediateData", "Yes"),
            ("MaxBurstLength", "16384"),
            ("FirstBurstLength", "8192"),
            ("MaxOutstandingR2T", "2"),
            ("ErrorRecoveryLevel", "0"),
        ])
        .await;
    assert_eq!(p.key("MaxRecvDataSegmentLength").as_deref(), Some("262144"));
    assert_eq!(p.key("MaxBurstLength").as_deref(), Some("16384"));
    assert_ne!(&p.bhs[14..16], &[0, 0], "a TSIH");
    assert_eq!(c.tur().await, 0);
    let (st, inq, _) = c.scsi(&[0x12, 0, 0, 0, 96, 0], 96, None, 0).await;
    assert_eq!(st, 0);
    assert_eq!(&inq[8..14], b"STRATA");
    let (st, cap, _) = c.scsi(&[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], 8, None, 0).await;
    assert_eq!(st, 0);
    assert_eq!(cap, [0, 0, 0x0f, 0xff, 0, 0, 0x10, 0]);
    // 64 KiB write: 8 KiB immediate, the rest by 16 KiB R2Ts, two at a time.
    let data: Vec<u8> = (0..16 * BS).map(|i| (i * 7 % 251) as u8).collect();
    let (st, _, resp) = c
        .scsi(&rw10(0x2a, 3, 16), data.len() as u32, Some(&data), 8192)
        .await;
    assert_eq!(st, 0);
    assert_eq!(resp.u32_at(36), 4, "ExpDataSN counts the R2Ts");
    // Read it back in Data-In PDUs of at most 8 KiB.
    let (st, back, resp) = c.scsi(&rw10(0x28, 3, 16), data.len() as u32, None, 0).await;
    assert_eq!(st, 0);
    assert!(back == data, "read back differs");
    assert_eq!(
        resp.bhs[1] & 0x81,
        0x81,
        "status collapsed into the last Data-In"
    );
    // Beyond the end: CHECK CONDITION, ILLEGAL REQUEST, LBA OUT OF RANGE.
    let (st, _, resp) = c.scsi(&rw10(0x28, 4095, 2), 2 * BS as u32, None, 0).await;
    assert_eq!(st, 2);
    assert_eq!((resp.data[2 + 2], resp.data[2 + 12]), (5, 0x21));
    // An unsupported opcode: INVALID COMMAND OPERATION CODE, no hang.
    let (st, _, resp) = c
        .scsi(
            &[0xc1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            0,
            None,
            0,
        )
        .await;
    assert_eq!(st, 2);
    assert_eq!(resp.data[2 + 12], 0x20);
    // Logout.
    let b = c.cmd_bhs(0x06, true);
    c.send(b, &[]).await;
    let p = c.recv().await;
    assert_eq!((p.opcode(), p.bhs[2]), (0x26, 0));
    assert!(c.closed().await);
}

#[tokio::test]
async fn non_immediate_nop_outs_advance_the_window() {
    let srv = mem_server(IscsiOptions::default()).await;
    let mut c = Client::connect(&srv).await;
    c.login(&[]).await;
    // Far more non-immediate NOP-Outs than the window holds: each must
    // consume a CmdSN and the window must keep moving (gotgt stalls here).
    for i in 0..200u32 {
        let sent = c.cmdsn;
        let p = c.nop(false, b"ping").await;
        assert_eq!(p.data, b"ping");
        assert_eq!(p.u32_at(28), sent.wrapping_add(1), "ExpCmdSN after NOP {i}");
        assert!(
            p.u32_at(32).wrapping_sub(p.u32_at(28)) < 1 << 31,
            "MaxCmdSN >= ExpCmdSN"
        );
    }
    // Immediate NOP-Outs do not consume one.
    let before = c.cmdsn;
    for _ in 0..10 {
        let p = c.nop(true, b"").await;
        assert_eq!(p.u32_at(28), before);
    }
    assert_eq!(c.tur().await, 0);
}

#[tokio::test]
async fn commands_outside_the_window_are_ignored() {
    let srv = mem_server(IscsiOptions::default()).await;
    let mut c = Client::connect(&srv).await;
    c.login(&[]).await;
    let good = c.cmdsn;
    for bad in [good.wrapping_sub(1), good.wrapping_add(1000)] {
        c.cmdsn = bad;
        let mut b = c.cmd_bhs(0x01, false);
        b[1] = 0x80;
        c.send(b, &[]).await;
        assert!(
            c.recv_within(Duration::from_millis(500)).await.is_none(),
            "CmdSN {bad} must get no answer"
        );
    }
    c.cmdsn = good;
    assert_eq!(c.tur().await, 0);
}

#[tokio::test]
async fn malformed_pdus_close_only_their_connection() {
    let srv = mem_server(IscsiOptions::default()).await;
    let mut healthy = Client::connect(&srv).await;
    healthy.login(&[]).await;

    // Garbage instead of a login.
    let mut c = Client::connect(&srv).await;
    c.send_raw(&[0xff; 48]).await;
    assert!(c.closed().await);
    // A login whose data segment is larger than 8192.
    let mut c = Client::connect(&srv).await;
    let mut b = c.login_bhs(true, 0, 1);
    b[5..8].copy_from_slice(&[0x10, 0, 0]);
    c.send_raw(&b).await;
    assert!(c.closed().await);
    // A data segment above the declared MaxRecvDataSegmentLength in the
    // full feature phase: closed before the target buffers it.
    let mut c = Client::connect(&srv).await;
    c.login(&[]).await;
    let mut b = c.cmd_bhs(0x00, true);
    b[5..8].copy_from_slice(&[0x10, 0, 0]); // 1 MiB
    c.send_raw(&b).await;
    assert!(c.closed().await);
    // An additional header segment on a SCSI command.
    let mut c = Client::connect(&srv).await;
    c.login(&[]).await;
    let mut b = c.cmd_bhs(0x01, false);
    b[4] = 1;
    c.send_raw(&b).await;
    c.send_raw(&[0; 4]).await;
    assert!(c.closed().await);
    // A truncated PDU then EOF.
    let mut c = Client::connect(&srv).await;
    c.login(&[]).await;
    c.send_raw(&[0x01, 0x80, 0, 0]).await;
    c.s.shutdown().await.unwrap();
    assert!(c.closed().await);
    // An unknown opcode gets a Reject and the session goes on.
    let mut c = Client::connect(&srv).await;
    c.login(&[]).await;
    let mut b = c.cmd_bhs(0x1c, true);
    b[0] = 0x1c | 0x40;
    c.send(b, &[]).await;
    let p = c.recv().await;
    assert_eq!(
        (p.opcode(), p.bhs[2]),
        (0x3f, 0x05),
        "Reject: command not supported"
    );
    assert_eq!(&p.data[..1], &[0x1c | 0x40]);
    assert_eq!(c.tur().await, 0);
    // A Data-Out for a task that does not exist: Reject, session goes on.
    let mut d = [0u8; 48];
    d[0] = 0x05;
    d[1] = 0x80;
    put32(&mut d, 16, 0xdead);
    c.send(d, &[0; 512]).await;
    assert_eq!(c.recv().await.opcode(), 0x3f);
    assert_eq!(c.tur().await, 0);

    // Through all this, the first session kept working.
    let data = vec![0x5a; BS];
    assert_eq!(
        healthy
            .scsi(&rw10(0x2a, 0, 1), BS as u32, Some(&data), BS)
            .await
            .0,
        0
    );
    assert_eq!(
        healthy.scsi(&rw10(0x28, 0, 1), BS as u32, None, 0).await.1,
        data
    );
}

#[tokio::test]
async fn login_errors() {
    let srv = mem_server(IscsiOptions::default()).await;
    let mut c = Client::connect(&srv).await;
    let p = c
        .login_step(
            true,
            0,
            1,
            &[
                ("InitiatorName", "iqn.test:raw"),
                ("TargetName", "iqn.nope:x"),
                ("AuthMethod", "None"),
            ],
        )
        .await;
    assert_eq!((p.bhs[36], p.bhs[37]), (2, 3), "target not found");
    assert!(c.closed().await);
    let mut c = Client::connect(&srv).await;
    let p = c.login_step(true, 0, 1, &[("TargetName", TARGET)]).await;
    assert_eq!((p.bhs[36], p.bhs[37]), (2, 7), "missing InitiatorName");
    // A TSIH this target never gave out.
    let mut c = Client::connect(&srv).await;
    let mut b = c.login_bhs(true, 0, 1);
    b[14..16].copy_from_slice(&77u16.to_be_bytes());
    c.send(b, &text(&[("InitiatorName", "i"), ("TargetName", TARGET)]))
        .await;
    let p = c.recv().await;
    assert_eq!((p.bhs[36], p.bhs[37]), (2, 0x0a));
}

fn chap_opts(mutual: bool) -> IscsiOptions {
    IscsiOptions {
        chap: Some(ChapConfig {
            initiator: Credential {
                user: "alice".into(),
                secret: b"alice-secret-12".to_vec(),
            },
            mutual: mutual.then(|| Credential {
                user: "target".into(),
                secret: b"target-secret-1".to_vec(),
            }),
        }),
        ..Default::default()
    }
}

/// Runs CHAP with `secret`; returns the final security-stage response.
async fn chap_login(
    c: &mut Client,
    user: &str,
    secret: &[u8],
    mutual: Option<(u8, [u8; 16])>,
) -> Pdu {
    let p = c
        .login_step(
            false,
            0,
            1,
            &[
                ("InitiatorName", "iqn.test:chap"),
                ("TargetName", TARGET),
                ("AuthMethod", "CHAP,None"),
            ],
        )
        .await;
    assert_eq!(p.key("AuthMethod").as_deref(), Some("CHAP"));
    let p = c.login_step(false, 0, 1, &[("CHAP_A", "5")]).await;
    let id: u8 = p.key("CHAP_I").unwrap().parse().unwrap();
    let ch = chap::decode_binary(&p.key("CHAP_C").unwrap(), 1024).unwrap();
    let r = chap::encode_hex(&chap::response(id, secret, &ch));
    match mutual {
        None => {
            c.login_step(true, 0, 1, &[("CHAP_N", user), ("CHAP_R", &r)])
                .await
        }
        Some((i, mc)) => {
            let (i, mc) = (i.to_string(), chap::encode_hex(&mc));
            c.login_step(
                true,
                0,
                1,
                &[
                    ("CHAP_N", user),
                    ("CHAP_R", &r),
                    ("CHAP_I", &i),
                    ("CHAP_C", &mc),
                ],
            )
            .await
        }
    }
}

#[tokio::test]
async fn chap_one_way_mutual_and_wrong() {
    let srv = mem_server(chap_opts(true)).await;
    // Wrong secret, wrong user, no CHAP at all: authentication failure.
    for (user, secret) in [
        ("alice", &b"wrong-secret-12"[..]),
        ("mallory", b"alice-secret-12"),
    ] {
        let mut c = Client::connect(&srv).await;
        let p = chap_login(&mut c, user, secret, None).await;
        assert_eq!((p.bhs[36], p.bhs[37]), (2, 1), "{user}");
        assert!(c.closed().await);
    }
    let mut c = Client::connect(&srv).await;
    let p = c
        .login_step(
            true,
            0,
            1,
            &[
                ("InitiatorName", "i"),
                ("TargetName", TARGET),
                ("AuthMethod", "None"),
            ],
        )
        .await;
    assert_eq!((p.bhs[36], p.bhs[37]), (2, 1));
    // Right secret, one-way.
    let mut c = Client::connect(&srv).await;
    let p = chap_login(&mut c, "alice", b"alice-secret-12", None).await;
    assert_eq!((p.bhs[36], p.bhs[1] & 0x80), (0, 0x80));
    let p = c.login_step(true, 1, 3, &[]).await;
    assert_eq!(p.bhs[36], 0);
    c.cmdsn = p.u32_at(28);
    assert_eq!(c.tur().await, 0);
    // Mutual: the target proves it knows the mutual secret.
    let mut c = Client::connect(&srv).await;
    let mc = [0x42u8; 16];
    let p = chap_login(&mut c, "alice", b"alice-secret-12", Some((9, mc))).await;
    assert_eq!(p.bhs[36], 0);
    assert_eq!(p.key("CHAP_N").as_deref(), Some("target"));
    let want = chap::encode_hex(&chap::response(9, b"target-secret-1", &mc));
    assert_eq!(p.key("CHAP_R"), Some(want));
}

#[tokio::test]
async fn digests_and_a_corrupt_header() {
    let srv = mem_server(IscsiOptions::default()).await;
    let mut c = Client::connect(&srv).await;
    let p = c
        .login(&[("HeaderDigest", "CRC32C,None"), ("DataDigest", "CRC32C")])
        .await;
    assert_eq!(p.key("HeaderDigest").as_deref(), Some("CRC32C"));
    let data = vec![7u8; 2 * BS];
    assert_eq!(
        c.scsi(&rw10(0x2a, 1, 2), 2 * BS as u32, Some(&data), 0)
            .await
            .0,
        0
    );
    assert_eq!(
        c.scsi(&rw10(0x28, 1, 2), 2 * BS as u32, None, 0).await.1,
        data
    );
    // A header whose digest does not match: the connection is dropped.
    let mut b = c.cmd_bhs(0x00, true);
    put32(&mut b, 20, 0xffff_ffff);
    let mut raw = b.to_vec();
    raw.extend_from_slice(&(crc32c(&b) ^ 1).to_le_bytes());
    c.send_raw(&raw).await;
    assert!(c.closed().await);
}

#[tokio::test]
async fn task_management_and_reinstatement() {
    let srv = mem_server(IscsiOptions::default()).await;
    let mut c = Client::connect(&srv).await;
    c.login(&[("InitialR2T", "Yes")]).await;
    // A write waiting for its R2T data, aborted.
    let mut b = c.cmd_bhs(0x01, false);
    b[1] = 0x80 | 0x20;
    put32(&mut b, 20, BS as u32);
    b[32..42].copy_from_slice(&rw10(0x2a, 0, 1));
    let itt = u32::from_be_bytes(b[16..20].try_into().unwrap());
    c.send(b, &[]).await;
    assert_eq!(c.recv().await.opcode(), 0x31, "R2T");
    let mut t = c.cmd_bhs(0x02, true);
    t[1] = 0x80 | 1; // ABORT TASK
    put32(&mut t, 20, itt);
    c.send(t, &[]).await;
    let p = c.recv().await;
    assert_eq!((p.opcode(), p.bhs[2]), (0x22, 0), "function complete");
    // An unknown task, then a LUN reset.
    put32(&mut t, 16, 999);
    put32(&mut t, 20, 12345);
    c.send(t, &[]).await;
    assert_eq!(c.recv().await.bhs[2], 1, "task does not exist");
    let mut r = c.cmd_bhs(0x02, true);
    r[1] = 0x80 | 5;
    c.send(r, &[]).await;
    assert_eq!(c.recv().await.bhs[2], 0);
    assert_eq!(c.tur().await, 0);
    // The same initiator and ISID logging in again ends the old session.
    let mut again = Client::connect(&srv).await;
    again.isid = c.isid;
    again.login(&[]).await;
    assert!(c.closed().await, "the reinstated session is closed");
    assert_eq!(again.tur().await, 0);
}

#[tokio::test]
async fn target_pings_an_idle_initiator() {
    let opts = IscsiOptions {
        conn: ConnOptions {
            ping_interval: Duration::from_millis(300),
        },
        ..Default::default()
    };
    let srv = mem_server(opts).await;
    let mut c = Client::connect(&srv).await;
    c.login(&[]).await;
    // Answer three pings: the connection stays.
    for _ in 0..3 {
        let p = c.recv().await;
        assert_eq!(
            (p.opcode(), p.u32_at(16)),
            (0x20, 0xffff_ffff),
            "NOP-In ping"
        );
        let ttt = p.u32_at(20);
        assert_ne!(ttt, 0xffff_ffff);
        let mut b = [0u8; 48];
        b[0] = 0x40;
        b[1] = 0x80;
        put32(&mut b, 16, 0xffff_ffff);
        put32(&mut b, 20, ttt);
        put32(&mut b, 24, c.cmdsn);
        c.send(b, &[]).await;
    }
    assert_eq!(c.tur().await, 0);
    // Stop answering: the target gives up on the connection.
    assert!(c.closed().await);
}

/// A backend whose size can change (a volume expand).
struct Resizable {
    inner: MemBackend,
    size: AtomicU64,
}

impl Backend for Resizable {
    fn size(&self) -> u64 {
        self.size.load(Ordering::Relaxed)
    }
    fn volume_name(&self) -> &str {
        "vol"
    }
    async fn read(&self, o: u64, l: u32) -> Result<Bytes, BackendError> {
        self.inner.read(o, l).await
    }
    async fn write(&self, o: u64, d: Bytes, f: bool) -> Result<(), BackendError> {
        self.inner.write(o, d, f).await
    }
    async fn flush(&self) -> Result<(), BackendError> {
        self.inner.flush().await
    }
    async fn trim(&self, o: u64, l: u32) -> Result<(), BackendError> {
        self.inner.trim(o, l).await
    }
    async fn write_zeroes(&self, o: u64, l: u32, p: bool, f: bool) -> Result<(), BackendError> {
        self.inner.write_zeroes(o, l, p, f).await
    }
    async fn block_status(&self, o: u64, l: u32) -> Result<Vec<AllocationExtent>, BackendError> {
        self.inner.block_status(o, l).await
    }
}

#[tokio::test]
async fn capacity_change_raises_a_unit_attention() {
    let b = Arc::new(Resizable {
        inner: MemBackend::new("vol", 32 << 20),
        size: AtomicU64::new(16 << 20),
    });
    let srv = start(b.clone(), IscsiOptions::default()).await;
    let mut c = Client::connect(&srv).await;
    c.login(&[]).await;
    assert_eq!(c.tur().await, 0);
    b.size.store(32 << 20, Ordering::Relaxed);
    // INQUIRY does not report it; the next TUR does, once.
    assert_eq!(c.scsi(&[0x12, 0, 0, 0, 36, 0], 36, None, 0).await.0, 0);
    let (st, _, resp) = c.scsi(&[0; 6], 0, None, 0).await;
    assert_eq!(st, 2);
    assert_eq!(
        (resp.data[2 + 2], resp.data[2 + 12], resp.data[2 + 13]),
        (6, 0x2a, 0x09)
    );
    assert_eq!(c.tur().await, 0);
    let (_, cap, _) = c.scsi(&[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], 8, None, 0).await;
    assert_eq!(cap[..4], 8191u32.to_be_bytes());
}

#[tokio::test]
async fn discovery_send_targets() {
    let srv = mem_server(IscsiOptions::default()).await;
    let mut c = Client::connect(&srv).await;
    let p = c
        .login_step(
            true,
            0,
            1,
            &[
                ("InitiatorName", "iqn.test:d"),
                ("SessionType", "Discovery"),
                ("AuthMethod", "None"),
            ],
        )
        .await;
    assert_eq!(p.bhs[36], 0);
    let p = c.login_step(true, 1, 3, &[]).await;
    c.cmdsn = p.u32_at(28);
    let mut b = c.cmd_bhs(0x04, false);
    put32(&mut b, 20, 0xffff_ffff);
    c.send(b, b"SendTargets=All\0").await;
    let p = c.recv().await;
    assert_eq!(p.opcode(), 0x24);
    assert_eq!(p.key("TargetName").as_deref(), Some(TARGET));
    assert_eq!(p.key("TargetAddress"), Some(format!("{},1", srv.addr)));
    // SCSI commands have no place in a discovery session.
    let mut b = c.cmd_bhs(0x01, false);
    b[1] = 0x80;
    c.send(b, &[]).await;
    assert_eq!(c.recv().await.opcode(), 0x3f);
}
