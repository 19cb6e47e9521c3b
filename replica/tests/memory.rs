//! Memory of the replica's index (issue 22), measured with a counting
//! allocator: a 1 TiB sparse volume with 10,000 scattered 4 KiB extents
//! costs what its extents cost, not what the volume's size would (a
//! per-4 KiB byte map would be 256 MiB); a 16 GiB volume written every
//! other block (2M extents) costs bits per block, under 1 MiB per GiB.
//! Each is measured after the writes and again after a reopen rebuilt the
//! index from the block maps, and the two are compared. The tests take
//! [`SERIAL`]: the allocator counts the whole process.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use strata_replica::engine::PortableEngine;
use strata_replica::layer::{self, MapEntry};
use strata_replica::{Allocation, CreateOptions, Store, BLOCK_SIZE};

static SERIAL: Mutex<()> = Mutex::new(());

struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator, only counting sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let now = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK.fetch_max(now, Ordering::Relaxed);
        // SAFETY: same layout contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: `ptr` came from `alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const TIB: u64 = 1 << 40;
const EXTENTS: u64 = 10_000;

#[test]
fn a_sparse_tebibyte_costs_kilobytes_per_thousand_extents() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let store = Store::create(
        dir.path(),
        &CreateOptions {
            volume_id: "big".into(),
            size: TIB,
        },
        Arc::new(PortableEngine),
    )
    .unwrap();
    let empty_index = store.index_heap_bytes();
    let block = vec![0x5au8; BLOCK_SIZE as usize];
    let blocks = TIB / BLOCK_SIZE;
    // Scattered and never adjacent: every write is its own extent.
    let stride = blocks / EXTENTS;
    for i in 0..EXTENTS {
        store
            .write(i * stride * BLOCK_SIZE + (i % 7) * BLOCK_SIZE, &block)
            .unwrap();
    }
    let written_index = store.index_heap_bytes() - empty_index;
    store.close().unwrap();

    let before = LIVE.load(Ordering::SeqCst);
    PEAK.store(before, Ordering::SeqCst);
    let started = Instant::now();
    let (store, _) = Store::open(dir.path(), Arc::new(PortableEngine)).unwrap();
    let open_time = started.elapsed();
    let retained = LIVE.load(Ordering::SeqCst) - before;
    let peak = PEAK.load(Ordering::SeqCst) - before;
    let estimate = store.index_heap_bytes();
    assert_eq!(store.index_extents() as u64, EXTENTS);
    println!(
        "1 TiB volume, {EXTENTS} scattered 4 KiB extents: open {:?}, index retained {} KiB (estimate {} KiB), peak during open {} KiB; a per-block byte map would be {} MiB",
        open_time,
        retained / 1024,
        estimate / 1024,
        peak / 1024,
        blocks / (1 << 20)
    );
    // Two maps (the head's extents and the merged index) of 10,000 entries:
    // about 85 bytes per extent for both with packed B-tree values, 112
    // with padded (end, value) tuples.
    assert!(
        retained < (100 * EXTENTS) as usize,
        "index retains {retained} bytes for {EXTENTS} extents"
    );
    assert!(peak < 4 << 20, "opening peaks at {peak} bytes");
    assert_eq!(
        store.index_heap_bytes() - empty_index,
        written_index,
        "the reopened index differs from the one the writes built"
    );
    let mut buf = vec![0u8; BLOCK_SIZE as usize];
    store
        .read(stride * BLOCK_SIZE + BLOCK_SIZE, &mut buf)
        .unwrap();
    assert_eq!(buf, block);
}

const GIB: u64 = 1 << 30;
const FRAGMENTED_SIZE: u64 = 16 * GIB;

/// Writes the block map of a volume of `size` bytes holding every other
/// block, as `size / 8 KiB` writes of zeros would leave it (their crc is
/// that of a zero block and the sparse data file reads zeros), without
/// writing gigabytes of data. The store reads it like any other map.
fn write_every_other_block_map(dir: &std::path::Path, size: u64) {
    use std::os::unix::fs::FileExt;
    let zero_crc = crc32fast::hash(&[0u8; BLOCK_SIZE as usize]);
    let entry = MapEntry::Data { crc: zero_crc }.encode().to_le_bytes();
    let map = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join(layer::map_file_name(1)))
        .unwrap();
    let mut chunk = vec![0u8; 1 << 20];
    for e in chunk.chunks_exact_mut(16) {
        e[..8].copy_from_slice(&entry);
    }
    let map_len = size / BLOCK_SIZE * layer::ENTRY_LEN;
    let mut off = 0;
    while off < map_len {
        map.write_all_at(&chunk, off).unwrap();
        off += chunk.len() as u64;
    }
    std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join(layer::data_file_name(1)))
        .unwrap()
        .set_len(size)
        .unwrap();
}

/// Opens the store in `dir` and returns it with the bytes the open left
/// allocated and the most it had allocated at once, beyond what was live
/// before.
fn open_measured(dir: &std::path::Path) -> (Store, usize, usize) {
    let before = LIVE.load(Ordering::SeqCst);
    PEAK.store(before, Ordering::SeqCst);
    let (store, _) = Store::open(dir, Arc::new(PortableEngine)).unwrap();
    let retained = LIVE.load(Ordering::SeqCst) - before;
    let peak = PEAK.load(Ordering::SeqCst) - before;
    (store, retained, peak)
}

#[test]
fn a_volume_written_every_other_block_costs_bits_per_block() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    Store::create(
        dir.path(),
        &CreateOptions {
            volume_id: "fragmented".into(),
            size: FRAGMENTED_SIZE,
        },
        Arc::new(PortableEngine),
    )
    .unwrap()
    .close()
    .unwrap();
    write_every_other_block_map(dir.path(), FRAGMENTED_SIZE);
    let extents = FRAGMENTED_SIZE / BLOCK_SIZE / 2;

    let started = Instant::now();
    let (store, retained, peak) = open_measured(dir.path());
    let open_time = started.elapsed();
    assert_eq!(store.index_extents() as u64, extents);
    let gib = FRAGMENTED_SIZE / GIB;
    println!(
        "16 GiB volume, every other block ({extents} extents): open {open_time:?}, index retained {} KiB ({} KiB per GiB, estimate {} KiB), peak during open {} KiB",
        retained / 1024,
        retained as u64 / gib / 1024,
        store.index_heap_bytes() / 1024,
        peak / 1024,
    );
    // The bound: under 1 MiB per GiB of range (the extent B-trees
    // took 11 MiB per GiB).
    assert!(
        (retained as u64) < gib << 20,
        "index retains {retained} bytes for {gib} GiB"
    );
    // The design's: a bit per block in each of the two maps (the layer's
    // and the read index) plus about 64 bytes of overhead per region and
    // map: 2 x (32 + 64) bytes per 1 MiB region.
    let regions = FRAGMENTED_SIZE / (1 << 20);
    assert!(
        (retained as u64) < regions * 2 * (32 + 64),
        "index retains {retained} bytes for {regions} regions"
    );
    // The rebuild's scratch (a 1 MiB read buffer of the block map) is
    // all it holds beyond the index.
    assert!(
        peak < retained + (3 << 20) / 2,
        "opening peaks at {peak} bytes for an index of {retained}"
    );
    let mut buf = vec![0xffu8; 2 * BLOCK_SIZE as usize];
    store.read(8 * GIB, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    let allocation = store.allocation(8 * GIB, 4 * BLOCK_SIZE).unwrap();
    assert_eq!(allocation.len(), 4);
    assert_eq!(allocation[0].kind, Allocation::Data);
    assert_eq!(allocation[1].kind, Allocation::Hole);

    // Writes through the store keep the shape: filling the holes of the
    // first 64 MiB turns those regions into one extent.
    let block = vec![0u8; BLOCK_SIZE as usize];
    for b in (1..(64 << 20) / BLOCK_SIZE).step_by(2) {
        store.write(b * BLOCK_SIZE, &block).unwrap();
    }
    let filled = (32 << 20) / BLOCK_SIZE;
    assert_eq!(store.index_extents() as u64, extents - filled);
    let written_index = store.index_heap_bytes();
    store.close().unwrap();

    let (store, reopened, _) = open_measured(dir.path());
    assert_eq!(store.index_extents() as u64, extents - filled);
    assert_eq!(
        store.index_heap_bytes(),
        written_index,
        "the reopened index differs from the one the writes built"
    );
    assert!(
        reopened <= retained,
        "{reopened} > {retained} after filling holes"
    );
}

/// A client that sends 64 READs of 1 MiB and reads no reply: the replica
/// server holds at most its per-connection byte budget of replies
/// (`server::MAX_IN_FLIGHT_BYTES`), not the 64 MiB the request count alone
/// would let it (a replica that fell behind its peers held that much).
#[test]
fn a_connection_holds_no_more_than_its_byte_budget() {
    use std::io::Write;
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let host = Arc::new(strata_replica::host::ReplicaHost::new(
        dir.path(),
        Arc::new(PortableEngine),
    ));
    host.create("vol", 256 << 20).unwrap();
    let (stop, rx) = tokio::sync::watch::channel(false);
    let addr = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(strata_replica::server::serve(listener, host.clone(), rx));
        addr
    });
    let mut frames = bytes::BytesMut::new();
    let request = |id, command| strata_replica::wire::Request {
        id,
        epoch: 0,
        command,
    };
    request(
        1,
        strata_replica::wire::Command::Hello {
            volume: "vol".into(),
        },
    )
    .encode_into(&mut frames);
    for id in 0..64u64 {
        let command = strata_replica::wire::Command::Read {
            offset: id << 20,
            len: 1 << 20,
        };
        request(id + 2, command).encode_into(&mut frames);
    }
    let mut sock = std::net::TcpStream::connect(addr).unwrap();
    // Small kernel buffers on our side, so little of the replies leaves
    // the server's heap for the socket.
    let fd = std::os::fd::AsRawFd::as_raw_fd(&sock);
    let small: libc::c_int = 64 << 10;
    // SAFETY: setsockopt on a socket we own with a c_int option value.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&small as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    sock.write_all(&frames).unwrap();
    std::thread::sleep(std::time::Duration::from_secs(2));
    let held = PEAK.load(Ordering::Relaxed).saturating_sub(before);
    eprintln!(
        "a connection with 64 unread 1 MiB replies: {} KiB held",
        held >> 10
    );
    assert!(
        held < 16 << 20,
        "the server held {} MiB for one connection's unread replies",
        held >> 20
    );
    drop(sock);
    let _ = stop.send(true);
}
