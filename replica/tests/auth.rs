//! The cluster key on a replica node (data wire and gRPC control on one
//! port), end to end over loopback TCP: the right key works; no key, a
//! wrong key, a replayed handshake and garbage are refused, and the
//! replica's data and metadata are unchanged afterwards.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use strata_proto::replica::replica_control_client::ReplicaControlClient;
use strata_proto::replica::{CreateReplicaRequest, ReplicaRef, SetEpochRequest};
use strata_replica::auth::{self, AuthError, ClusterKey, ServerAuth};
use strata_replica::client::{ClientError, ReplicaClient};
use strata_replica::error_chain;
use strata_replica::node::{serve_node_with, NodeOptions};
use strata_replica::wire::{self, Status};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Mutex};

const T: Duration = Duration::from_secs(10);
const SIZE: u64 = 4 << 20;

struct Node {
    addr: SocketAddr,
    _stop: watch::Sender<bool>,
    _dir: tempfile::TempDir,
}

async fn node(key: Option<&ClusterKey>) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, rx) = watch::channel(false);
    let opts = NodeOptions {
        auth: key.map(|k| Arc::new(ServerAuth::new(k.clone()))),
        ..Default::default()
    };
    let path = dir.path().to_path_buf();
    tokio::spawn(async move { serve_node_with(&path, listener, rx, opts).await });
    Node {
        addr,
        _stop: stop,
        _dir: dir,
    }
}

async fn control(
    addr: SocketAddr,
    key: Option<&ClusterKey>,
) -> Result<ReplicaControlClient<tonic::transport::Channel>, tonic::transport::Error> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(T)
        .timeout(T);
    Ok(ReplicaControlClient::new(
        auth::control_channel(endpoint, addr, key).await?,
    ))
}

/// Creates the replica "vol" of [`SIZE`] bytes at epoch 1.
async fn create_vol(ctl: &mut ReplicaControlClient<tonic::transport::Channel>) {
    ctl.create_replica(CreateReplicaRequest {
        volume: "vol".into(),
        size: SIZE,
    })
    .await
    .unwrap();
    ctl.set_epoch(SetEpochRequest {
        volume: "vol".into(),
        epoch: 1,
        owner: "test".into(),
        ..Default::default()
    })
    .await
    .unwrap();
}

fn pattern(byte: u8) -> Bytes {
    Bytes::from(vec![byte; 4096])
}

/// The replica's content at offset 0 and its metadata, read with the key.
async fn snapshot_state(addr: SocketAddr, key: &ClusterKey) -> (Bytes, String) {
    let mut ctl = control(addr, Some(key)).await.unwrap();
    let status = ctl
        .status(ReplicaRef {
            volume: "vol".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let client = ReplicaClient::connect_with(addr, "vol", status.epoch, T, Some(key))
        .await
        .unwrap();
    let data = client.read(0, 8192).await.unwrap();
    let meta = format!(
        "{} {} {} {:?}",
        status.size, status.epoch, status.lineage, status.snapshots
    );
    (data, meta)
}

/// Sends `bytes` on a new connection and returns what came back before the
/// server closed it.
async fn send_raw(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut sock = TcpStream::connect(addr).await.unwrap();
    let _ = sock.write_all(bytes).await;
    let _ = sock.shutdown().await;
    let mut back = Vec::new();
    let read = tokio::time::timeout(T * 2, sock.read_to_end(&mut back)).await;
    assert!(read.is_ok(), "the server did not close the connection");
    back
}

#[tokio::test]
async fn a_keyed_replica_serves_only_the_right_key() {
    let key = ClusterKey::generate();
    let wrong = ClusterKey::generate();
    let n = node(Some(&key)).await;

    // The right key: create, bind, write and read back.
    let mut ctl = control(n.addr, Some(&key)).await.unwrap();
    create_vol(&mut ctl).await;
    let client = ReplicaClient::connect_with(n.addr, "vol", 1, T, Some(&key))
        .await
        .unwrap();
    client.write(0, pattern(0xa1), true).await.unwrap();
    assert_eq!(client.read(0, 4096).await.unwrap(), pattern(0xa1));

    // Record a real authenticated session that writes 0xb2 at 4096...
    let (proxy, recorded) = relay(n.addr, false).await;
    let proxied = ReplicaClient::connect_with(proxy, "vol", 1, T, Some(&key))
        .await
        .unwrap();
    proxied.write(4096, pattern(0xb2), true).await.unwrap();
    drop(proxied);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let recorded = recorded.lock().await.clone();
    assert!(
        recorded.len() > 4096 + 40,
        "recorded {} bytes",
        recorded.len()
    );
    // ...then overwrite it, so a successful replay would show.
    client.write(4096, pattern(0xc3), true).await.unwrap();
    let before = snapshot_state(n.addr, &key).await;
    assert_eq!(&before.0[4096..], &pattern(0xc3)[..]);

    // No key: the data client gets a clear refusal, the gRPC client fails.
    let keyless = ReplicaClient::connect_with(n.addr, "vol", 1, T, None).await;
    match keyless {
        Err(ClientError::Replica {
            status: Status::Invalid,
            message,
            ..
        }) => assert!(message.contains("requires the cluster key"), "{message}"),
        other => panic!("a keyless data client was not refused: {other:?}"),
    }
    let deleted = match control(n.addr, None).await {
        Ok(mut ctl) => ctl
            .delete_replica(ReplicaRef {
                volume: "vol".into(),
            })
            .await
            .map(|_| ())
            .map_err(|e| error_chain(&e)),
        Err(e) => Err(error_chain(&e)),
    };
    let e = deleted.expect_err("a keyless gRPC client deleted the replica");
    assert!(e.contains("requires the cluster key"), "{e}");

    // A wrong key: refused on both protocols, with a typed error.
    let wrong_data = ReplicaClient::connect_with(n.addr, "vol", 1, T, Some(&wrong)).await;
    assert!(
        matches!(
            wrong_data,
            Err(ClientError::Auth {
                source: AuthError::WrongKey,
                ..
            })
        ),
        "{wrong_data:?}"
    );
    let wrong_ctl = control(n.addr, Some(&wrong)).await;
    let e = wrong_ctl.expect_err("a wrong-key gRPC client connected");
    assert!(
        error_chain(&e).contains("wrong cluster key"),
        "the error names the wrong key: {e:?}"
    );

    // A replayed handshake (and the session behind it): refused at the
    // proof, the recorded write never runs again.
    let back = send_raw(n.addr, &recorded).await;
    // The server's challenge (40 bytes) and a refusal verdict, nothing more.
    assert!(back.len() <= 80, "the server answered {} bytes", back.len());

    // Garbage before the handshake, on its own and shaped like the
    // protocols' first bytes.
    for garbage in [
        &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..],
        &[0u8; 300][..],
        &b"STRA\x01\x00\x00\x00short"[..],
    ] {
        let back = send_raw(n.addr, garbage).await;
        // At most a challenge, or for the HTTP/2 preface the GOAWAY that
        // names the key.
        let goaway = String::from_utf8_lossy(&back).contains("requires the cluster key");
        assert!(
            back.len() <= 40 || (goaway && back.len() < 120),
            "answered garbage with {} bytes",
            back.len()
        );
    }

    // Nothing was read or changed.
    let after = snapshot_state(n.addr, &key).await;
    assert_eq!(after, before);
    assert_eq!(&after.0[..4096], &pattern(0xa1)[..]);
}

#[tokio::test]
async fn keyed_clients_refuse_keyless_replicas() {
    let key = ClusterKey::generate();
    let n = node(None).await;
    let r = ReplicaClient::connect_with(n.addr, "vol", 0, T, Some(&key)).await;
    assert!(
        matches!(
            r,
            Err(ClientError::Auth {
                source: AuthError::PeerKeyless,
                ..
            })
        ),
        "{r:?}"
    );
    let e = control(n.addr, Some(&key)).await.expect_err("connected");
    assert!(error_chain(&e).contains("no cluster key"), "{e:?}");
    // Keyless on both sides works as before.
    let mut ctl = control(n.addr, None).await.unwrap();
    ctl.create_replica(CreateReplicaRequest {
        volume: "vol".into(),
        size: SIZE,
    })
    .await
    .unwrap();
    let c = ReplicaClient::connect_with(n.addr, "vol", 0, T, None)
        .await
        .unwrap();
    c.write(0, pattern(7), false).await.unwrap();
    assert_eq!(c.read(0, 4096).await.unwrap(), pattern(7));
}

/// CPU time of this process (user + system).
fn cpu_time() -> Duration {
    // SAFETY: an all-zero rusage is valid; getrusage fills the struct we
    // pass, and RUSAGE_SELF is a valid target.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// The CPU cost of the key per 4 KiB write: client and server in this
/// process, 32 writes in flight, keyless then keyed. Run with
/// `cargo test --release -p strata-replica --test auth -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a check"]
async fn cpu_cost_per_4k_write() {
    const WRITES: u64 = 200_000;
    let key = ClusterKey::generate();
    for round in 0..2 {
        for keyed in [false, true] {
            let k = keyed.then_some(&key);
            let n = node(k).await;
            let mut ctl = control(n.addr, k).await.unwrap();
            ctl.create_replica(CreateReplicaRequest {
                volume: "vol".into(),
                size: 256 << 20,
            })
            .await
            .unwrap();
            let client = Arc::new(
                ReplicaClient::connect_with(n.addr, "vol", 0, T, k)
                    .await
                    .unwrap(),
            );
            let (cpu0, wall0) = (cpu_time(), std::time::Instant::now());
            let mut tasks = Vec::new();
            for t in 0..32u64 {
                let client = client.clone();
                tasks.push(tokio::spawn(async move {
                    let data = pattern(t as u8);
                    for i in 0..WRITES / 32 {
                        let off = ((t * 1000 + i) % 65536) * 4096;
                        client.write(off, data.clone(), false).await.unwrap();
                    }
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
            let (cpu, wall) = (cpu_time() - cpu0, wall0.elapsed());
            println!(
                "round {round} {:8}: {:.2} µs CPU per 4 KiB write, {:.0} writes/s",
                if keyed { "keyed" } else { "keyless" },
                cpu.as_secs_f64() * 1e6 / WRITES as f64,
                WRITES as f64 / wall.as_secs_f64()
            );
        }
    }
}

/// A node that refuses data-wire clients without encrypted records.
async fn node_requiring_encryption(key: &ClusterKey) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, rx) = watch::channel(false);
    let opts = NodeOptions {
        auth: Some(Arc::new(
            ServerAuth::new(key.clone()).requiring_encryption(true),
        )),
        ..Default::default()
    };
    let path = dir.path().to_path_buf();
    tokio::spawn(async move { serve_node_with(&path, listener, rx, opts).await });
    Node {
        addr,
        _stop: stop,
        _dir: dir,
    }
}

#[tokio::test]
async fn encrypted_data_wire_works_and_a_requiring_node_refuses_plain_clients() {
    use strata_replica::auth::WireMode;
    let key = ClusterKey::generate();
    for require in [false, true] {
        let n = if require {
            node_requiring_encryption(&key).await
        } else {
            node(Some(&key)).await
        };
        let mut ctl = control(n.addr, Some(&key)).await.unwrap();
        ctl.create_replica(CreateReplicaRequest {
            volume: "vol".into(),
            size: SIZE,
        })
        .await
        .unwrap();
        let enc = Some((&key, WireMode::Encrypted));
        let client = ReplicaClient::connect_with_mode(n.addr, "vol", 0, T, enc)
            .await
            .unwrap();
        client.write(8192, pattern(0xd4), true).await.unwrap();
        assert_eq!(client.read(8192, 4096).await.unwrap(), pattern(0xd4));
        let plain = Some((&key, WireMode::Integrity));
        let r = ReplicaClient::connect_with_mode(n.addr, "vol", 0, T, plain).await;
        if require {
            assert!(
                matches!(
                    r,
                    Err(ClientError::Auth {
                        source: AuthError::EncryptionRequired,
                        ..
                    })
                ),
                "{r:?}"
            );
        } else {
            assert_eq!(r.unwrap().read(8192, 4096).await.unwrap(), pattern(0xd4));
        }
    }
}

/// The payload crc field of the first WRITE frame (magic "STRQ", op 2) in
/// what a relay recorded; integrity-only records carry frames as they
/// are.
fn first_write_crc(recorded: &[u8], payload: &[u8]) -> Option<u32> {
    let magic = wire::REQUEST_MAGIC.to_le_bytes();
    (0..recorded.len().saturating_sub(40)).find_map(|i| {
        let h = &recorded[i..i + 40];
        let is_write = h[..4] == magic && h[5] == wire::Op::Write as u8;
        let followed = recorded[i + 40..].starts_with(&payload[..64]);
        (is_write && followed).then(|| u32::from_le_bytes(h[36..40].try_into().unwrap()))
    })
}

/// On a keyed connection both ends leave the frames' payload crc out
/// (their records' tags cover every byte): the WRITE goes out with crc 0,
/// a wrong crc is not refused, and the data arrives. A client that keeps
/// crcs (its hello's flags zeroed in transit, as strata before this
/// change sends them) still sends and has checked the real crc.
#[tokio::test]
async fn keyed_frames_leave_the_crc_to_the_records() {
    let key = ClusterKey::generate();
    let n = node(Some(&key)).await;
    let mut ctl = control(n.addr, Some(&key)).await.unwrap();
    create_vol(&mut ctl).await;

    let (proxy, recorded) = relay(n.addr, false).await;
    let c = ReplicaClient::connect_with(proxy, "vol", 1, T, Some(&key))
        .await
        .unwrap();
    c.write(0, pattern(0xc1), true).await.unwrap();
    c.write_with_crc(4096, pattern(0xc2), 0xdead_beef, true)
        .await
        .unwrap();
    assert_eq!(
        c.read(0, 8192).await.unwrap(),
        [pattern(0xc1), pattern(0xc2)].concat()
    );
    drop(c);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let sent = recorded.lock().await.clone();
    assert_eq!(first_write_crc(&sent, &pattern(0xc1)), Some(0));

    let (proxy, recorded) = relay(n.addr, true).await;
    let old = ReplicaClient::connect_with(proxy, "vol", 1, T, Some(&key))
        .await
        .unwrap();
    old.write(8192, pattern(0xc3), true).await.unwrap();
    let wrong = old
        .write_with_crc(12288, pattern(0xc4), 0xdead_beef, true)
        .await;
    assert!(
        matches!(
            wrong,
            Err(ClientError::Replica {
                status: Status::BadPayload,
                ..
            })
        ),
        "{wrong:?}"
    );
    assert_eq!(
        old.read(8192, 8192).await.unwrap(),
        [pattern(0xc3), Bytes::from(vec![0u8; 4096])].concat()
    );
    drop(old);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let sent = recorded.lock().await.clone();
    let crc = crc32fast::hash(&pattern(0xc3));
    assert_eq!(first_write_crc(&sent, &pattern(0xc3)), Some(crc));
}

/// A TCP relay for every connection to `target` that records what clients
/// send; with `strip_request` it zeroes the flags byte of each client
/// hello, as a server older than the record formats (or a meddling relay)
/// would leave it: no encryption asked for.
async fn relay(target: SocketAddr, strip_request: bool) -> (SocketAddr, Arc<Mutex<Vec<u8>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let sent = Arc::new(Mutex::new(Vec::new()));
    let record = sent.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let record = record.clone();
            tokio::spawn(async move {
                let server = TcpStream::connect(target).await.unwrap();
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let up = async {
                    let mut buf = [0u8; 65536];
                    let mut first = true;
                    loop {
                        let n = cr.read(&mut buf).await.unwrap_or(0);
                        if n == 0 {
                            let _ = sw.shutdown().await;
                            return;
                        }
                        if first && strip_request && n > 6 && buf[..4] == auth::MAGIC_CLIENT[..] {
                            buf[6] = 0;
                        }
                        first = false;
                        record.lock().await.extend_from_slice(&buf[..n]);
                        if sw.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                };
                let down = async {
                    let _ = tokio::io::copy(&mut sr, &mut cw).await;
                };
                tokio::join!(up, down);
            });
        }
    });
    (addr, sent)
}

/// gRPC over the key (the replica's control API here; the controller's
/// management API dials the same way) is encrypted: a name the client
/// sends never crosses the network in the clear. With a server that does
/// not grant encryption (the request stripped in transit, as an older
/// strata answers) the client dials again for integrity-only records and
/// the call still works: the name is then readable, as before.
#[tokio::test]
async fn keyed_grpc_sessions_are_encrypted_and_fall_back_for_older_servers() {
    let key = ClusterKey::generate();
    let n = node(Some(&key)).await;
    let name = "a-distinctive-volume-name-4711";
    for strip in [false, true] {
        let (addr, sent) = relay(n.addr, strip).await;
        let mut ctl = control(addr, Some(&key)).await.unwrap();
        let err = ctl
            .status(ReplicaRef {
                volume: name.into(),
            })
            .await
            .expect_err("no such volume");
        assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
        assert!(err.message().contains(name), "{err:?}");
        let sent = sent.lock().await;
        let seen = sent.windows(name.len()).any(|w| w == name.as_bytes());
        assert_eq!(
            seen, strip,
            "name on the wire with the request stripped: {strip}"
        );
    }
}
