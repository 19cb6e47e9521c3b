//! A syncing replica copying from its peer itself (PULL), over loopback
//! TCP between two real replica servers: the pieces it is told land and
//! nothing else; an unreachable source, one without the volume and one at
//! another epoch write nothing and say PEER_FAILED; the target's own epoch
//! fences the request; a snapshot connection cannot pull; many small PULLs
//! land whether written on the connection's task or on the blocking pool;
//! a piecewise PULL carries only its pieces from the source. READ_PIECES
//! reads its pieces back to back. And a copy's read (READ with the drop-cache flag), in the store and over
//! the wire, leaves the source's page cache as it found it.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rand::{Rng, SeedableRng};
use strata_replica::client::{ClientError, ReplicaClient};
use strata_replica::host::ReplicaHost;
use strata_replica::testing;
use strata_replica::wire::{PieceList, PullPlan, Status};
use strata_replica::{Allocation, Store};
use tokio::net::TcpListener;
use tokio::sync::watch;

const MIB: u64 = 1 << 20;
const T: Duration = Duration::from_secs(10);

struct Server {
    addr: SocketAddr,
    host: Arc<ReplicaHost>,
    _stop: watch::Sender<bool>,
    _dir: tempfile::TempDir,
}

async fn start(volume: Option<&str>) -> Server {
    start_in(tempfile::tempdir().unwrap(), volume).await
}

async fn start_in(dir: tempfile::TempDir, volume: Option<&str>) -> Server {
    let host = Arc::new(ReplicaHost::new(dir.path(), testing::portable()));
    if let Some(v) = volume {
        host.create(v, 64 * MIB).unwrap();
    }
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, rx) = watch::channel(false);
    tokio::spawn(strata_replica::server::serve(listener, host.clone(), rx));
    Server {
        addr,
        host,
        _stop: stop,
        _dir: dir,
    }
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

fn plan(source: SocketAddr, offset: u64, span: u64, pieces: &[(u64, u64)]) -> PullPlan {
    PullPlan::new(
        offset,
        source,
        Duration::from_secs(3),
        true,
        false,
        span as u32,
        pieces.iter().map(|&(a, n)| (a, n as u32)).collect(),
    )
    .unwrap()
}

fn status_of(r: Result<(), ClientError>) -> Status {
    match r {
        Err(ClientError::Replica { status, .. }) => status,
        other => panic!("expected a replica error, got {other:?}"),
    }
}

/// True when the target holds no data anywhere in the volume.
async fn all_holes(target: &ReplicaClient) -> bool {
    let extents = target.block_status(0, (64 * MIB) as u32).await.unwrap();
    extents.iter().all(|e| e.kind == Allocation::Hole)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_pulls_the_pieces_it_is_told_from_its_peer() {
    let (a, b) = (start(Some("vol")).await, start(Some("vol")).await);
    let source = ReplicaClient::connect(a.addr, "vol", 0, T).await.unwrap();
    let data = pattern(1, 4 * MIB as usize);
    source.write(0, data.clone(), true).await.unwrap();
    let target = ReplicaClient::connect(b.addr, "vol", 0, T).await.unwrap();
    // Two pieces of a 2 MiB span: the gap between them is read, not written.
    target
        .pull(0, plan(a.addr, 0, 2 * MIB, &[(0, 65536), (MIB, MIB)]))
        .await
        .unwrap();
    let got = target.read(0, (2 * MIB) as u32).await.unwrap();
    assert_eq!(&got[..65536], &data[..65536]);
    assert!(got[65536..MIB as usize].iter().all(|&x| x == 0));
    assert_eq!(&got[MIB as usize..], &data[MIB as usize..2 * MIB as usize]);
    let extents = target.block_status(0, (4 * MIB) as u32).await.unwrap();
    let data_bytes: u64 = extents
        .iter()
        .filter(|e| e.kind == Allocation::Data)
        .map(|e| e.len)
        .sum();
    assert_eq!(data_bytes, 65536 + MIB, "{extents:?}");
    // Many pulls at once over the one kept connection to the source.
    let pulls = (2..4).map(|m| target.pull(m * MIB, plan(a.addr, m * MIB, MIB, &[(m * MIB, MIB)])));
    futures::future::try_join_all(pulls).await.unwrap();
    let got = target.read(2 * MIB, (2 * MIB) as u32).await.unwrap();
    assert_eq!(&got[..], &data[2 * MIB as usize..]);
}

/// A source holding `len` bytes of pattern `seed` at offset 0, and a
/// target whose bound on unflushed data is `fixed_limit` (the default's
/// when `None`).
async fn source_and_target(
    fixed_limit: Option<u64>,
    seed: u64,
    len: u64,
) -> (Server, Server, Bytes) {
    let (a, b) = (start(Some("vol")).await, start(Some("vol")).await);
    b.host.set_writeback(strata_replica::WritebackConfig {
        fixed_limit,
        ..Default::default()
    });
    let source = ReplicaClient::connect(a.addr, "vol", 0, T).await.unwrap();
    let data = pattern(seed, len as usize);
    source.write(0, data.clone(), true).await.unwrap();
    (a, b, data)
}

/// A rebuild of scattered 4 KiB blocks: many small PULLs at once, each
/// written on the connection's task unless the bound on unflushed data
/// (here a tiny fixed one, so that many of them wait on the blocking pool
/// instead) holds it. Every piece lands, and nothing between them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_pulls_land_whether_written_inline_or_on_the_pool() {
    for fixed_limit in [None, Some(16 << 10)] {
        let (a, b, data) = source_and_target(fixed_limit, 5, 8 * MIB).await;
        let target = ReplicaClient::connect(b.addr, "vol", 0, T).await.unwrap();
        // Every other 4 KiB block of 8 MiB, one PULL each (span 4 KiB); then
        // for every 64 KiB a PULL of the span naming its blocks 3 and 6-7.
        let singles = (0..1024u64).map(|i| {
            let at = i * 2 * 4096;
            target.pull(at, plan(a.addr, at, 4096, &[(at, 4096)]))
        });
        futures::future::try_join_all(singles).await.unwrap();
        let spans = (0..128u64).map(|i| {
            let at = i * 65536;
            let pieces = [(at + 3 * 4096, 4096), (at + 6 * 4096, 8192)];
            target.pull(at, plan(a.addr, at, 65536, &pieces))
        });
        futures::future::try_join_all(spans).await.unwrap();
        let got = target.read(0, (8 * MIB) as u32).await.unwrap();
        for block in 0..(8 * MIB / 4096) as usize {
            let written = block % 2 == 0 || matches!(block % 16, 3 | 7);
            let (want, have) = (
                &data[block * 4096..(block + 1) * 4096],
                &got[block * 4096..(block + 1) * 4096],
            );
            if written {
                assert_eq!(have, want, "block {block} (limit {fixed_limit:?})");
            } else {
                assert!(
                    have.iter().all(|&x| x == 0),
                    "block {block} written (limit {fixed_limit:?})"
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_from_a_source_it_cannot_use_writes_nothing() {
    let (a, b) = (start(Some("vol")).await, start(Some("vol")).await);
    let elsewhere = start(None).await;
    let source = ReplicaClient::connect(a.addr, "vol", 0, T).await.unwrap();
    source
        .write(0, pattern(2, MIB as usize), true)
        .await
        .unwrap();
    let target = ReplicaClient::connect(b.addr, "vol", 0, T).await.unwrap();
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    // Nothing listens; the source does not host the volume; the source is
    // at another epoch than the request.
    assert_eq!(
        status_of(target.pull(0, plan(closed, 0, MIB, &[(0, MIB)])).await),
        Status::PeerFailed
    );
    assert_eq!(
        status_of(
            target
                .pull(0, plan(elsewhere.addr, 0, MIB, &[(0, MIB)]))
                .await
        ),
        Status::PeerFailed
    );
    store(&a).set_epoch(3).unwrap();
    assert_eq!(
        status_of(target.pull(0, plan(a.addr, 0, MIB, &[(0, MIB)])).await),
        Status::PeerFailed
    );
    assert!(all_holes(&target).await, "a failed pull wrote");
    // The connection still serves, and a pull at the right epoch works.
    store(&b).set_epoch(3).unwrap();
    target.set_epoch(3);
    target
        .pull(0, plan(a.addr, 0, MIB, &[(0, MIB)]))
        .await
        .unwrap();
    assert_eq!(
        &target.read(0, MIB as u32).await.unwrap()[..],
        &pattern(2, MIB as usize)[..]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_targets_epoch_fences_a_pull() {
    let (a, b) = (start(Some("vol")).await, start(Some("vol")).await);
    let source = ReplicaClient::connect(a.addr, "vol", 0, T).await.unwrap();
    source
        .write(0, pattern(3, MIB as usize), true)
        .await
        .unwrap();
    let target = ReplicaClient::connect(b.addr, "vol", 0, T).await.unwrap();
    store(&b).set_epoch(2).unwrap();
    assert_eq!(
        status_of(target.pull(0, plan(a.addr, 0, MIB, &[(0, MIB)])).await),
        Status::StaleEpoch
    );
    let current = ReplicaClient::connect(b.addr, "vol", 2, T).await.unwrap();
    assert!(all_holes(&current).await, "a fenced pull wrote");
    // A read-only snapshot connection cannot pull.
    store(&b).snapshot("s1").unwrap();
    let snap = ReplicaClient::connect_snapshot(b.addr, "vol", "s1", 2, T)
        .await
        .unwrap();
    assert_eq!(
        status_of(snap.pull(0, plan(a.addr, 0, MIB, &[(0, MIB)])).await),
        Status::NotBound
    );
}

/// Drops every file of `dir` from the page cache (written back first).
fn evict(dir: &std::path::Path) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            let f = std::fs::File::open(&path).unwrap();
            f.sync_all().unwrap();
            // SAFETY: advice on a descriptor we own.
            unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        }
    }
}

/// On a disk-backed directory (the target dir, not a tmpfs /tmp): the page
/// cache is what this test looks at.
#[test]
fn a_copy_read_leaves_the_page_cache_as_it_found_it() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let host = ReplicaHost::new(dir.path(), testing::portable());
    let store = host.create("vol", 64 * MIB).unwrap();
    let data = pattern(4, 8 * MIB as usize);
    store.write(0, &data).unwrap();
    store.flush().unwrap();
    let vol_dir = store.dir().to_path_buf();
    let len = 8 * MIB as usize;
    let mut buf = vec![0u8; len];
    let cached = |store: &Store, buf: &mut Vec<u8>| store.read_cached(0, buf).unwrap();
    evict(&vol_dir);
    assert!(!cached(&store, &mut buf), "eviction did not evict");
    // A copy's read brings the pages in and drops them again.
    store.read_for_copy(0, &mut buf).unwrap();
    assert_eq!(&buf[..], &data[..]);
    assert!(!cached(&store, &mut buf), "the copy's read stayed cached");
    // A plain read keeps them; a copy's read of cached pages leaves them.
    store.read(0, &mut buf).unwrap();
    assert!(cached(&store, &mut buf), "a plain read did not cache");
    buf.fill(0);
    store.read_for_copy(0, &mut buf).unwrap();
    assert_eq!(&buf[..], &data[..]);
    assert!(
        cached(&store, &mut buf),
        "a copy's read dropped pages it found cached"
    );
}

/// The same over the wire, for reads short enough to be answered on the
/// connection's task when cached: a copy's read of uncached pages drops
/// them, of cached pages leaves them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_copy_read_over_the_wire_leaves_the_page_cache_as_it_found_it() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let a = start_in(dir, Some("vol")).await;
    let client = ReplicaClient::connect(a.addr, "vol", 0, T).await.unwrap();
    let data = pattern(6, 65536);
    client.write(0, data.clone(), true).await.unwrap();
    let store = store(&a);
    let mut buf = vec![0u8; 65536];
    evict(store.dir());
    assert!(
        !store.read_cached(0, &mut buf).unwrap(),
        "eviction did not evict"
    );
    assert_eq!(
        &client.read_for_copy(0, 65536).await.unwrap()[..],
        &data[..]
    );
    assert!(
        !store.read_cached(0, &mut buf).unwrap(),
        "the copy's read stayed cached"
    );
    assert_eq!(&client.read(0, 65536).await.unwrap()[..], &data[..]);
    assert!(
        store.read_cached(0, &mut buf).unwrap(),
        "a plain read did not cache"
    );
    assert_eq!(
        &client.read_for_copy(0, 65536).await.unwrap()[..],
        &data[..]
    );
    assert!(
        store.read_cached(0, &mut buf).unwrap(),
        "a copy's read dropped pages it found cached"
    );
}

/// A TCP relay to `to` that counts the bytes it carries back from it.
async fn counting_relay(to: SocketAddr) -> (SocketAddr, Arc<std::sync::atomic::AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let back = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counted = back.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let server = tokio::net::TcpStream::connect(to).await.unwrap();
            let counted = counted.clone();
            tokio::spawn(async move {
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let there = tokio::io::copy(&mut cr, &mut sw);
                let back = async {
                    let mut buf = vec![0u8; 64 << 10];
                    loop {
                        let n = tokio::io::AsyncReadExt::read(&mut sr, &mut buf).await?;
                        if n == 0 {
                            return Ok::<_, std::io::Error>(());
                        }
                        counted.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                        tokio::io::AsyncWriteExt::write_all(&mut cw, &buf[..n]).await?;
                    }
                };
                let _ = tokio::join!(there, back);
            });
        }
    });
    (addr, back)
}

/// A piecewise PULL (the controller's plan when both replicas know
/// READ_PIECES) writes exactly its pieces, short ones on the connection's
/// task and long ones on the pool, and carries only their bytes from the
/// source, not the holes between them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_piecewise_pull_moves_only_the_pieces() {
    for fixed_limit in [None, Some(16 << 10)] {
        let (a, b, data) = source_and_target(fixed_limit, 7, 16 * MIB).await;
        let (relay, carried) = counting_relay(a.addr).await;
        let target = ReplicaClient::connect(b.addr, "vol", 0, T).await.unwrap();
        // 32 blocks of 4 KiB, 256 KiB apart, in one PULL of an 8 MiB span;
        // then one PULL of two 1 MiB pieces 6 MiB apart.
        let small: Vec<(u64, u64)> = (0..32).map(|i| (i * 256 * 1024, 4096)).collect();
        let last = small.last().unwrap();
        let span = last.0 + last.1;
        target
            .pull(0, plan(relay, 0, span, &small).read_as_pieces())
            .await
            .unwrap();
        let large = [(8 * MIB, MIB), (15 * MIB, MIB)];
        target
            .pull(
                8 * MIB,
                plan(relay, 8 * MIB, 8 * MIB, &large).read_as_pieces(),
            )
            .await
            .unwrap();
        let moved = carried.load(std::sync::atomic::Ordering::Relaxed);
        let pieces = 32 * 4096 + 2 * MIB;
        // A span read longer than the connection's byte budget (8 MiB)
        // runs alone rather than waiting for budget its plan holds; its
        // one piece, the last 4 KiB, was written above already.
        let whole = plan(a.addr, 0, 16 * MIB, &[(16 * MIB - 4096, 4096)]);
        tokio::time::timeout(T, target.pull(0, whole))
            .await
            .expect("a 16 MiB span did not finish")
            .unwrap();
        assert!(
            moved >= pieces && moved < pieces + 64 * 1024,
            "{moved} bytes came from the source for {pieces} bytes of pieces"
        );
        let got = target.read(0, (16 * MIB) as u32).await.unwrap();
        let written = |at: u64| {
            small
                .iter()
                .chain(&large)
                .any(|&(o, n)| o <= at && at < o + n)
        };
        for block in 0..16 * MIB / 4096 {
            let range = (block * 4096) as usize..((block + 1) * 4096) as usize;
            if written(block * 4096) {
                assert_eq!(&got[range.clone()], &data[range], "block {block}");
            } else {
                assert!(got[range].iter().all(|&x| x == 0), "block {block} written");
            }
        }
    }
}

/// READ_PIECES over the wire: the pieces' bytes back to back, from the
/// volume or a snapshot of it; for a copy, pieces found cached stay
/// cached and the ones it brought in are dropped, whether the read is
/// short enough to start on the connection's task or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_pieces_reads_the_pieces_and_leaves_the_cache_as_it_found_it() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let a = start_in(dir, Some("vol")).await;
    let client = ReplicaClient::connect(a.addr, "vol", 0, T).await.unwrap();
    let data = pattern(8, 32 * MIB as usize);
    for half in [0, 16 * MIB] {
        let part = data.slice(half as usize..(half + 16 * MIB) as usize);
        client.write(half, part, true).await.unwrap();
    }
    let store = store(&a);
    let cached = |at: u64, len: u64| {
        let mut buf = vec![0u8; len as usize];
        store.read_cached(at, &mut buf).unwrap()
    };
    let want = |pieces: &[(u64, u32)]| -> Vec<u8> {
        pieces
            .iter()
            .flat_map(|&(o, n)| data[o as usize..(o + u64::from(n)) as usize].to_vec())
            .collect()
    };
    // Pieces 4 MiB apart (beyond any readahead): 16 KiB each (48 KiB, tried
    // on the connection's task first) and 64 KiB each (192 KiB, on the pool).
    for (base, len) in [(0, 16 << 10), (16 * MIB, 64 << 10)] {
        let pieces: Vec<(u64, u32)> = (0..3).map(|i| (base + i * 4 * MIB, len)).collect();
        evict(store.dir());
        // The first piece is cached before the copy, the others are not.
        client.read(pieces[0].0, len).await.unwrap();
        let list = PieceList::new(pieces.clone()).unwrap();
        let got = client.read_pieces(list, true).await.unwrap();
        assert_eq!(&got[..], &want(&pieces)[..], "pieces of {len} bytes");
        let len = u64::from(len);
        assert!(
            cached(pieces[0].0, len),
            "a piece found cached was dropped ({len})"
        );
        assert!(
            !cached(pieces[1].0, len),
            "a piece the copy read stayed cached ({len})"
        );
        assert!(
            !cached(pieces[2].0, len),
            "a piece the copy read stayed cached ({len})"
        );
        // A plain READ_PIECES keeps what it reads.
        let list = PieceList::new(pieces.clone()).unwrap();
        let got = client.read_pieces(list, false).await.unwrap();
        assert_eq!(&got[..], &want(&pieces)[..]);
        assert!(cached(pieces[2].0, len), "a plain read did not cache");
    }
    // Longer than the connection's whole byte budget (8 MiB): it runs
    // alone rather than waiting forever for budget it holds itself.
    let big: Vec<(u64, u32)> = (0..3).map(|i| (i * 8 * MIB, (4 * MIB) as u32)).collect();
    let list = PieceList::new(big.clone()).unwrap();
    let got = tokio::time::timeout(T, client.read_pieces(list, true))
        .await
        .expect("a 12 MiB READ_PIECES did not finish")
        .unwrap();
    assert_eq!(&got[..], &want(&big)[..]);
    // On a snapshot connection, the snapshot's bytes.
    store.snapshot("s1").unwrap();
    client
        .write(0, pattern(9, MIB as usize), true)
        .await
        .unwrap();
    let snap = ReplicaClient::connect_snapshot(a.addr, "vol", "s1", 0, T)
        .await
        .unwrap();
    let pieces = vec![(4096, 4096), (MIB - 8192, 8192)];
    let list = PieceList::new(pieces.clone()).unwrap();
    assert_eq!(
        &snap.read_pieces(list, true).await.unwrap()[..],
        &want(&pieces)[..]
    );
}
