//! The replica data server and its client, end to end over loopback TCP:
//! concurrent pipelined IO, durability of FUA and FLUSH, trim and block
//! status, epoch fencing, bad input on one connection not hurting another,
//! and the client's failure modes (disconnect, timeout).

use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use rand::{Rng, SeedableRng};
use strata_replica::client::{ClientError, ReplicaClient};
use strata_replica::engine::{BatchError, IoEngine, IoOp, PortableEngine};
use strata_replica::host::{HostError, ReplicaHost};
use strata_replica::testing::{self, CrashMode, CrashSimEngine};
use strata_replica::wire::{
    Command, Op, Reply, Request, RequestHeader, Status, REQUEST_HEADER_LEN,
};
use strata_replica::{Allocation, AllocationExtent, Store};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

const MIB: u64 = 1 << 20;
const T: Duration = Duration::from_secs(10);

struct Server {
    addr: SocketAddr,
    host: Arc<ReplicaHost>,
    stop: watch::Sender<bool>,
    task: JoinHandle<std::io::Result<()>>,
    dir: tempfile::TempDir,
}

async fn start_with(size: u64, engine: Arc<dyn IoEngine>) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let host = Arc::new(ReplicaHost::new(dir.path(), engine));
    host.create("vol", size).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, rx) = watch::channel(false);
    let task = tokio::spawn(strata_replica::server::serve(listener, host.clone(), rx));
    Server {
        addr,
        host,
        stop,
        task,
        dir,
    }
}

async fn start(size: u64) -> Server {
    start_with(size, testing::portable()).await
}

async fn client(s: &Server, epoch: u64) -> ReplicaClient {
    ReplicaClient::connect(s.addr, "vol", epoch, T)
        .await
        .unwrap()
}

fn store(s: &Server) -> Arc<Store> {
    s.host.get("vol").unwrap()
}

fn pattern(seed: u64, len: usize) -> Bytes {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; len];
    rng.fill(&mut v[..]);
    Bytes::from(v)
}

fn status_of<T: std::fmt::Debug>(r: Result<T, ClientError>) -> Status {
    match r {
        Err(ClientError::Replica { status, .. }) => status,
        other => panic!("expected a replica error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writes_read_back() {
    const TASKS: u64 = 64;
    const SLOT: u64 = 256 * 1024;
    let s = start(TASKS * SLOT).await;
    let c = Arc::new(client(&s, 0).await);
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let sizes: Vec<usize> = (0..TASKS)
        .map(|_| rng.gen_range(1..=64usize) * 4096)
        .collect();
    let writes: Vec<_> = (0..TASKS)
        .map(|i| {
            let (c, len) = (c.clone(), sizes[i as usize]);
            tokio::spawn(async move { c.write(i * SLOT, pattern(i, len), i % 8 == 0).await })
        })
        .collect();
    for w in writes {
        w.await.unwrap().unwrap();
    }
    let reads: Vec<_> = (0..TASKS)
        .map(|i| {
            let (c, len) = (c.clone(), sizes[i as usize]);
            tokio::spawn(async move { (i, len, c.read(i * SLOT, SLOT as u32).await.unwrap()) })
        })
        .collect();
    for r in reads {
        let (i, len, data) = r.await.unwrap();
        assert_eq!(&data[..len], &pattern(i, len)[..], "slot {i}");
        assert!(data[len..].iter().all(|&b| b == 0), "slot {i} tail");
    }
    // The data really is in the store, not only echoed by the server.
    let mut buf = vec![0u8; sizes[3]];
    store(&s).read(3 * SLOT, &mut buf).unwrap();
    assert_eq!(&buf[..], &pattern(3, sizes[3])[..]);
    assert!(!c.is_closed());
    c.ping().await.unwrap();
}

/// Writes through a simulated page cache: what FUA or FLUSH covered
/// survives a power cut, the last unflushed write does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fua_and_flush_are_durable() {
    let engine = Arc::new(CrashSimEngine::new());
    let s = start_with(MIB, engine.clone()).await;
    let c = client(&s, 0).await;
    c.write(4096, pattern(2, 4096), false).await.unwrap();
    c.flush().await.unwrap(); // covers block 1
    c.write(0, pattern(1, 4096), true).await.unwrap(); // FUA
    c.write(8192, pattern(3, 4096), false).await.unwrap(); // never flushed
    engine.crash(CrashMode::DropAll);
    drop(c);
    close_when_free(&s.host).await;
    let (reopened, _) = Store::open(&s.dir.path().join("vol"), testing::portable()).unwrap();
    let mut buf = vec![0u8; 3 * 4096];
    reopened.read(0, &mut buf).unwrap();
    assert_eq!(&buf[..4096], &pattern(1, 4096)[..], "FUA write lost");
    assert_eq!(
        &buf[4096..8192],
        &pattern(2, 4096)[..],
        "flushed write lost"
    );
    assert!(
        buf[8192..].iter().all(|&b| b == 0),
        "the crash simulation kept an unflushed write"
    );
}

/// `close` is refused while the connection still holds the store; the
/// server releases it shortly after the client is gone.
async fn close_when_free(host: &ReplicaHost) {
    let deadline = Instant::now() + T;
    loop {
        match host.close("vol") {
            Ok(()) => return,
            Err(HostError::Busy { .. }) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(10)).await
            }
            Err(e) => panic!("close: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trim_zeroes_and_block_status() {
    let s = start(4 * MIB).await;
    let c = client(&s, 0).await;
    c.write(0, pattern(9, MIB as usize), false).await.unwrap();
    c.trim(256 * 1024, 256 * 1024).await.unwrap();
    let data = c.read(0, MIB as u32).await.unwrap();
    assert!(data[256 * 1024..512 * 1024].iter().all(|&b| b == 0));
    assert_eq!(&data[..256 * 1024], &pattern(9, MIB as usize)[..256 * 1024]);
    let ext = |offset: u64, len: u64, kind| AllocationExtent { offset, len, kind };
    let kib = 1024;
    assert_eq!(
        c.block_status(0, 2 * MIB as u32).await.unwrap(),
        vec![
            ext(0, 256 * kib, Allocation::Data),
            ext(256 * kib, 256 * kib, Allocation::Hole),
            ext(512 * kib, 512 * kib, Allocation::Data),
            ext(MIB, MIB, Allocation::Hole),
        ]
    );
    // WRITE_ZEROES: NO_HOLE keeps data extents, without it the range is punched.
    c.write_zeroes(512 * kib, 4096, true).await.unwrap();
    c.write_zeroes(768 * kib, 4096, false).await.unwrap();
    let st = c.block_status(512 * kib, 512 * kib as u32).await.unwrap();
    assert_eq!(
        st,
        vec![
            ext(512 * kib, 256 * kib, Allocation::Data),
            ext(768 * kib, 4096, Allocation::Hole),
            ext(768 * kib + 4096, 256 * kib - 4096, Allocation::Data),
        ]
    );
    let z = c.read(512 * kib, 4096).await.unwrap();
    assert!(z.iter().all(|&b| b == 0));
    // Snapshots through the wire; a duplicate name is a request error.
    c.snapshot("s1").await.unwrap();
    assert_eq!(store(&s).info().chain, vec!["s1".to_string()]);
    assert_eq!(status_of(c.snapshot("s1").await), Status::Invalid);
    // Bad ranges are INVALID and leave the connection usable.
    assert_eq!(status_of(c.read(100, 4096).await), Status::Invalid);
    assert_eq!(
        status_of(c.write(4 * MIB, pattern(1, 4096), false).await),
        Status::Invalid
    );
    assert_eq!(status_of(c.trim(0, 4097).await), Status::Invalid);
    c.ping().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn epochs_fence_requests() {
    let s = start(MIB).await;
    store(&s).set_epoch(5).unwrap();
    // HELLO binds at any epoch and reports the replica's.
    let old = client(&s, 4).await;
    assert_eq!(old.replica_epoch(), 5);
    match old.write(0, pattern(1, 4096), false).await {
        Err(ClientError::Replica {
            status: Status::StaleEpoch,
            epoch: 5,
            message,
        }) => {
            assert!(message.contains("older"), "{message}")
        }
        other => panic!("expected STALE_EPOCH, got {other:?}"),
    }
    assert_eq!(status_of(old.flush().await), Status::StaleEpoch);
    assert_eq!(status_of(old.read(0, 4096).await), Status::StaleEpoch);
    let current = client(&s, 5).await;
    assert!(
        current.read(0, 4096).await.unwrap().iter().all(|&b| b == 0),
        "a fenced write landed"
    );
    let ahead = client(&s, 6).await;
    assert_eq!(
        status_of(ahead.write(0, pattern(2, 4096), false).await),
        Status::EpochAhead
    );
    assert!(current.read(0, 4096).await.unwrap().iter().all(|&b| b == 0));
    // After the control API moves the replica on, the old client follows.
    store(&s).set_epoch(6).unwrap();
    ahead.write(0, pattern(2, 4096), false).await.unwrap();
    assert_eq!(status_of(current.read(0, 4096).await), Status::StaleEpoch);
    current.set_epoch(6);
    assert_eq!(
        &current.read(0, 4096).await.unwrap()[..],
        &pattern(2, 4096)[..]
    );
    assert_eq!(current.replica_epoch(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_errors() {
    let s = start(MIB).await;
    match ReplicaClient::connect(s.addr, "nope", 0, T).await {
        Err(ClientError::Replica {
            status: Status::NoVolume,
            message,
            ..
        }) => {
            assert!(message.contains("nope"), "{message}")
        }
        other => panic!("expected NO_VOLUME, got {other:?}"),
    }
    for bad in ["..", "a/b", ""] {
        let r = ReplicaClient::connect(s.addr, bad, 0, T).await;
        assert_eq!(status_of(r), Status::Invalid, "{bad:?}");
    }
    // Data before HELLO.
    let mut raw = Raw::connect(s.addr).await;
    send(
        &mut raw,
        &req(
            7,
            0,
            Command::Read {
                offset: 0,
                len: 4096,
            },
        ),
    )
    .await;
    let reply = recv(&mut raw).await.unwrap();
    assert_eq!((reply.id, reply.status), (7, Status::NotBound));
    send(&mut raw, &req(8, 0, Command::Ping)).await;
    assert_eq!(recv(&mut raw).await.unwrap().status, Status::Ok);
    // A second HELLO on a bound connection.
    send(
        &mut raw,
        &req(
            9,
            0,
            Command::Hello {
                volume: "vol".into(),
            },
        ),
    )
    .await;
    assert_eq!(recv(&mut raw).await.unwrap().status, Status::Ok);
    send(
        &mut raw,
        &req(
            10,
            0,
            Command::Hello {
                volume: "vol".into(),
            },
        ),
    )
    .await;
    assert_eq!(recv(&mut raw).await.unwrap().status, Status::Invalid);
}

fn req(id: u64, epoch: u64, command: Command) -> Request {
    Request { id, epoch, command }
}

/// A connection spoken to in raw frames.
struct Raw {
    sock: TcpStream,
    buf: BytesMut,
}

impl Raw {
    async fn connect(addr: SocketAddr) -> Raw {
        let sock = TcpStream::connect(addr).await.unwrap();
        Raw {
            sock,
            buf: BytesMut::new(),
        }
    }

    async fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.sock.write_all(bytes).await
    }

    async fn shutdown(&mut self) -> std::io::Result<()> {
        self.sock.shutdown().await
    }
}

async fn send(raw: &mut Raw, r: &Request) {
    let mut buf = BytesMut::new();
    r.encode_into(&mut buf);
    raw.sock.write_all(&buf).await.unwrap();
}

/// The next reply, or `None` once the server closed the connection.
async fn recv(raw: &mut Raw) -> Option<Reply> {
    tokio::time::timeout(T, async {
        loop {
            if let Some(reply) = Reply::decode_from(&mut raw.buf).unwrap() {
                return Some(reply);
            }
            match raw.sock.read_buf(&mut raw.buf).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    })
    .await
    .expect("the server neither replied nor closed the connection")
}

/// Reads replies until the server closes the connection; returns them.
async fn until_closed(sock: &mut Raw) -> Vec<Reply> {
    let mut out = Vec::new();
    while let Some(r) = recv(sock).await {
        out.push(r);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_payload_crc_is_refused_and_nothing_written() {
    let s = start(MIB).await;
    let mut raw = Raw::connect(s.addr).await;
    send(
        &mut raw,
        &req(
            1,
            0,
            Command::Hello {
                volume: "vol".into(),
            },
        ),
    )
    .await;
    assert_eq!(recv(&mut raw).await.unwrap().status, Status::Ok);
    let data = pattern(5, 8192);
    let mut header = req(
        2,
        0,
        Command::Write {
            offset: 0,
            data: data.clone(),
            fua: false,
        },
    )
    .header();
    header.payload_crc ^= 0xdead_beef;
    let mut frame = header.encode().to_vec();
    frame.extend_from_slice(&data);
    raw.write_all(&frame).await.unwrap();
    let reply = recv(&mut raw).await.unwrap();
    assert_eq!(
        (reply.id, reply.status),
        (2, Status::BadPayload),
        "{}",
        reply.message()
    );
    // The connection goes on; nothing was written.
    send(
        &mut raw,
        &req(
            3,
            0,
            Command::Read {
                offset: 0,
                len: 8192,
            },
        ),
    )
    .await;
    let reply = recv(&mut raw).await.unwrap();
    assert_eq!((reply.id, reply.status), (3, Status::Ok));
    assert!(reply.payload.iter().all(|&b| b == 0));
    // Unknown flags: INVALID, connection goes on.
    let mut h = req(4, 0, Command::Flush).header();
    h.flags = 0x100;
    raw.write_all(&h.encode()).await.unwrap();
    assert_eq!(recv(&mut raw).await.unwrap().status, Status::Invalid);
    send(&mut raw, &req(5, 0, Command::Ping)).await;
    assert_eq!(recv(&mut raw).await.unwrap().status, Status::Ok);

    // The client's precomputed crc (one per write fanned out to several
    // replicas) is the one checked: a wrong one is refused, a right one
    // writes.
    let c = client(&s, 0).await;
    let crc = crc32fast::hash(&data);
    let wrong = c.write_with_crc(0, data.clone(), crc ^ 1, false).await;
    assert_eq!(status_of(wrong), Status::BadPayload);
    assert!(c.read(0, 8192).await.unwrap().iter().all(|&b| b == 0));
    c.write_with_crc(0, data.clone(), crc, false).await.unwrap();
    assert_eq!(c.read(0, 8192).await.unwrap(), data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_connections_do_not_hurt_others() {
    let s = start(MIB).await;
    let good = client(&s, 0).await;
    let check_good = |seed: u64| {
        let good = &good;
        async move {
            good.write(0, pattern(seed, 4096), false).await.unwrap();
            assert_eq!(
                &good.read(0, 4096).await.unwrap()[..],
                &pattern(seed, 4096)[..]
            );
        }
    };

    // Garbage: closed without a reply (no request id is known).
    let mut raw = Raw::connect(s.addr).await;
    raw.write_all(b"GET / HTTP/1.1\r\nHost: replica\r\n\r\n")
        .await
        .unwrap();
    assert!(until_closed(&mut raw).await.is_empty());
    check_good(1).await;

    // A truncated frame followed by EOF.
    let mut raw = Raw::connect(s.addr).await;
    send(
        &mut raw,
        &req(
            1,
            0,
            Command::Hello {
                volume: "vol".into(),
            },
        ),
    )
    .await;
    let mut w = BytesMut::new();
    req(
        2,
        0,
        Command::Write {
            offset: 0,
            data: pattern(2, 4096),
            fua: false,
        },
    )
    .encode_into(&mut w);
    raw.write_all(&w[..REQUEST_HEADER_LEN + 100]).await.unwrap();
    raw.shutdown().await.unwrap();
    let replies = until_closed(&mut raw).await;
    assert_eq!(replies.len(), 1, "only the HELLO is answered");
    check_good(3).await;
    assert_eq!(
        &good.read(0, 4096).await.unwrap()[..],
        &pattern(3, 4096)[..],
        "truncated write landed"
    );

    // A huge length: an INVALID reply naming the request, then close.
    let mut raw = Raw::connect(s.addr).await;
    send(
        &mut raw,
        &req(
            1,
            0,
            Command::Hello {
                volume: "vol".into(),
            },
        ),
    )
    .await;
    let h = RequestHeader {
        op: Op::Write,
        flags: 0,
        request_id: 77,
        epoch: 0,
        offset: 0,
        length: u32::MAX,
        payload_crc: 0,
    };
    raw.write_all(&h.encode()).await.unwrap();
    raw.write_all(&[0u8; 4096]).await.unwrap();
    let replies = until_closed(&mut raw).await;
    assert_eq!(replies.len(), 2);
    assert_eq!((replies[1].id, replies[1].status), (77, Status::Invalid));
    assert!(
        replies[1].message().contains("exceeds"),
        "{}",
        replies[1].message()
    );

    // An unknown op: the same.
    let mut raw = Raw::connect(s.addr).await;
    let mut bytes = req(78, 0, Command::Ping).header().encode();
    bytes[5] = 200;
    raw.write_all(&bytes).await.unwrap();
    let replies = until_closed(&mut raw).await;
    assert_eq!(replies.len(), 1);
    assert_eq!((replies[0].id, replies[0].status), (78, Status::Invalid));

    check_good(4).await;
    assert!(!good.is_closed());
}

/// A fake replica that answers HELLO and then reads requests without ever
/// replying; it drops the connection when `hang_up` fires.
async fn silent_replica() -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (hang_up, mut rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let (mut sock, _) = listener.accept().await.unwrap();
        let mut buf = BytesMut::new();
        let hello = loop {
            if let Some(r) = Request::decode_from(&mut buf).unwrap() {
                break r;
            }
            sock.read_buf(&mut buf).await.unwrap();
        };
        let mut out = BytesMut::new();
        Reply::ok(hello.id, 0).encode_into(&mut out);
        sock.write_all(&out).await.unwrap();
        let mut sink = vec![0u8; 65536];
        loop {
            tokio::select! {
                _ = &mut rx => return,
                r = sock.read(&mut sink) => if matches!(r, Ok(0) | Err(_)) { return },
            }
        }
    });
    (addr, hang_up)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_connection_fails_pending_requests_promptly() {
    let (addr, hang_up) = silent_replica().await;
    let c = Arc::new(
        ReplicaClient::connect(addr, "vol", 0, Duration::from_secs(60))
            .await
            .unwrap(),
    );
    let pending: Vec<_> = (0..16)
        .map(|i| {
            let c = c.clone();
            tokio::spawn(async move { c.read(i * 4096, 4096).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t0 = Instant::now();
    hang_up.send(()).unwrap();
    for p in pending {
        let r = tokio::time::timeout(Duration::from_secs(5), p)
            .await
            .expect("hung")
            .unwrap();
        assert!(matches!(r, Err(ClientError::Disconnected)), "{r:?}");
    }
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "took {:?}",
        t0.elapsed()
    );
    assert!(c.is_closed());
    assert!(matches!(c.ping().await, Err(ClientError::Disconnected)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_server_mid_load_fails_requests_with_disconnected() {
    let s = start(16 * MIB).await;
    let c = Arc::new(client(&s, 0).await);
    let done = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..32u64)
        .map(|i| {
            let (c, done) = (c.clone(), done.clone());
            let data = pattern(i, 256 * 1024);
            tokio::spawn(async move {
                loop {
                    match c.write(i * 512 * 1024, data.clone(), false).await {
                        Ok(()) => done.fetch_add(1, Ordering::SeqCst),
                        Err(e) => return e,
                    };
                }
            })
        })
        .collect();
    // Under full load (every worker has a write in flight), kill the server.
    while done.load(Ordering::SeqCst) < 64 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    s.task.abort(); // drops every connection mid-request
    let t0 = Instant::now();
    for w in workers {
        let e = tokio::time::timeout(Duration::from_secs(5), w)
            .await
            .expect("hung")
            .unwrap();
        assert!(matches!(e, ClientError::Disconnected), "{e:?}");
    }
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "took {:?}",
        t0.elapsed()
    );
    assert!(c.is_closed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_timeout_kills_the_client() {
    let (addr, _hang_up) = silent_replica().await;
    let c = Arc::new(
        ReplicaClient::connect(addr, "vol", 0, Duration::from_millis(300))
            .await
            .unwrap(),
    );
    let other = {
        let c = c.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            c.flush().await
        })
    };
    let t0 = Instant::now();
    assert!(matches!(c.ping().await, Err(ClientError::Timeout)));
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_secs(2),
        "{waited:?}"
    );
    assert!(c.is_closed());
    // The request still pending when the client died fails at once.
    let r = tokio::time::timeout(Duration::from_secs(1), other)
        .await
        .expect("hung")
        .unwrap();
    assert!(matches!(r, Err(ClientError::Disconnected)), "{r:?}");
    assert!(matches!(
        c.read(0, 4096).await,
        Err(ClientError::Disconnected)
    ));

    // A replica that never answers HELLO: connect times out.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let _keep = tokio::spawn(async move {
        let (sock, _) = listener.accept().await.unwrap();
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(sock);
    });
    let r = ReplicaClient::connect(addr, "vol", 0, Duration::from_millis(200)).await;
    assert!(matches!(r, Err(ClientError::Timeout)), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_data_is_reported_as_corrupt() {
    let s = start(MIB).await;
    let c = client(&s, 0).await;
    c.write(0, pattern(1, 8192), false).await.unwrap();
    c.flush().await.unwrap();
    let data = s.dir.path().join("vol").join("layer-000001.data");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(data)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, 4096 + 10).unwrap();
    f.write_all_at(&[b[0] ^ 0x40], 4096 + 10).unwrap();
    match c.read(0, 8192).await {
        Err(ClientError::Replica {
            status: Status::Corrupt,
            message,
            ..
        }) => {
            assert!(message.contains("4096"), "{message}")
        }
        other => panic!("expected CORRUPT, got {other:?}"),
    }
    assert_eq!(
        &c.read(0, 4096).await.unwrap()[..],
        &pattern(1, 8192)[..4096]
    );
}

/// An engine whose writes take `delay`: requests stay in flight long
/// enough to shut down under them.
#[derive(Debug)]
struct SlowEngine {
    delay: Duration,
    /// Write batches started.
    started: AtomicUsize,
    /// Write batches done.
    finished: AtomicUsize,
}

impl IoEngine for SlowEngine {
    fn name(&self) -> &'static str {
        "slow"
    }

    fn submit(&self, ops: &mut [IoOp<'_>]) -> Result<(), BatchError> {
        let writes = ops.iter().any(|op| matches!(op, IoOp::Write { .. }));
        if writes {
            self.started.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(self.delay);
        }
        let r = PortableEngine.submit(ops);
        if writes {
            self.finished.fetch_add(1, Ordering::SeqCst);
        }
        r
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn graceful_shutdown_finishes_requests_in_flight() {
    let engine = Arc::new(SlowEngine {
        delay: Duration::from_millis(300),
        started: AtomicUsize::new(0),
        finished: AtomicUsize::new(0),
    });
    let s = start_with(16 * MIB, engine.clone()).await;
    let c = Arc::new(client(&s, 0).await);
    let writes: Vec<_> = (0..16u64)
        .map(|i| {
            let c = c.clone();
            tokio::spawn(async move {
                (
                    i,
                    c.write(i * 256 * 1024, pattern(i, 256 * 1024), false).await,
                )
            })
        })
        .collect();
    // Shut down once every write sits in the slow engine.
    while engine.started.load(Ordering::SeqCst) < 16 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    s.stop.send(true).unwrap();
    tokio::time::timeout(T, s.task)
        .await
        .expect("serve did not return")
        .unwrap()
        .unwrap();
    // Counted, not timed: a busy machine may wake this task late.
    assert_eq!(
        engine.finished.load(Ordering::SeqCst),
        16,
        "serve returned before the requests finished"
    );
    for w in writes {
        let (i, r) = w.await.unwrap();
        r.unwrap_or_else(|e| panic!("write {i} in flight at shutdown: {e}"));
    }
    // Every write is in the store, and the connection let go of it.
    let st = s.host.get("vol").unwrap();
    for i in 0..16 {
        let mut buf = vec![0u8; 256 * 1024];
        st.read(i * 256 * 1024, &mut buf).unwrap();
        assert_eq!(&buf[..], &pattern(i, 256 * 1024)[..], "write {i}");
    }
    drop(st);
    assert!(s.host.close_all().is_empty());
    // The client sees the connection closed; new connections are refused.
    let r = tokio::time::timeout(T, async {
        while !c.is_closed() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(
        r.is_ok(),
        "the server kept the connection open after shutdown"
    );
    assert!(ReplicaClient::connect(s.addr, "vol", 0, T).await.is_err());
}

/// Connections accepted elsewhere (a port shared with gRPC) are served the
/// same way; closing the channel ends `serve_streams` once they are done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_streams_serves_handed_over_connections() {
    let dir = tempfile::tempdir().unwrap();
    let host = Arc::new(ReplicaHost::new(dir.path(), testing::portable()));
    host.create("vol", MIB).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let (_stop, stop_rx) = watch::channel(false);
    let served = tokio::spawn(strata_replica::server::serve_streams(
        rx,
        host.clone(),
        stop_rx,
    ));
    let accept = tokio::spawn(async move {
        let accepted = listener.accept().await.unwrap();
        tx.send(accepted).await.unwrap();
        // `tx` dropped: no more connections.
    });
    let c = ReplicaClient::connect(addr, "vol", 0, T).await.unwrap();
    accept.await.unwrap();
    c.write(0, pattern(1, 4096), true).await.unwrap();
    assert_eq!(&c.read(0, 4096).await.unwrap()[..], &pattern(1, 4096)[..]);
    assert!(
        !served.is_finished(),
        "returned while a connection was open"
    );
    drop(c);
    tokio::time::timeout(T, served)
        .await
        .expect("serve_streams did not return")
        .unwrap()
        .unwrap();
    assert!(host.close_all().is_empty());
}

/// Reads that miss the page cache wait for the disk on the server's
/// io_uring, not on a thread, and return the data that was written; a
/// block corrupted on disk still reads as CORRUPT (the ring's read fails
/// its checksum and the blocking read reports it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_that_miss_the_cache_go_through_the_ring() {
    const SIZE: u64 = 16 * MIB;
    let s = start(SIZE).await;
    let c = Arc::new(client(&s, 0).await);
    let data = pattern(11, SIZE as usize);
    for off in (0..SIZE).step_by(MIB as usize) {
        let chunk = data.slice(off as usize..(off + MIB) as usize);
        c.write(off, chunk, false).await.unwrap();
    }
    c.flush().await.unwrap();
    let path = s.dir.path().join("vol").join("layer-000001.data");
    let file = std::fs::File::open(&path).unwrap();
    let drop_cache = || {
        use std::os::fd::AsRawFd;
        // SAFETY: posix_fadvise on a file this test opened.
        let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        assert_eq!(rc, 0);
    };
    drop_cache();
    let before = strata_replica::engine::reads_through_ring();
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let offsets: Vec<u64> = (0..256)
        .map(|_| rng.gen_range(0..SIZE / 4096) * 4096)
        .collect();
    let reads: Vec<_> = offsets
        .iter()
        .map(|&off| {
            let c = c.clone();
            tokio::spawn(async move { (off, c.read(off, 4096).await.unwrap()) })
        })
        .collect();
    for r in reads {
        let (off, got) = r.await.unwrap();
        assert_eq!(
            &got[..],
            &data[off as usize..off as usize + 4096],
            "at {off}"
        );
    }
    let through_ring = strata_replica::engine::reads_through_ring() - before;
    if std::env::var_os("STRATA_TEST_NO_IO_URING").is_none() {
        assert!(through_ring > 0, "no read went through the ring");
    }
    // A block corrupted on disk, out of the cache: still CORRUPT.
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(&[0x5a; 16], 3 * MIB + 100).unwrap();
    f.sync_all().unwrap();
    drop_cache();
    match c.read(3 * MIB, 4096).await {
        Err(ClientError::Replica {
            status: Status::Corrupt,
            ..
        }) => {}
        other => panic!("expected CORRUPT, got {other:?}"),
    }
}
