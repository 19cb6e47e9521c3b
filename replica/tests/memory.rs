//! Memory: the index of a 1 TiB sparse volume with 10,000 scattered 4 KiB
//! extents costs what its extents cost, not what the volume's size would
//! (a per-4 KiB byte map would be 256 MiB). Measured with a counting
//! allocator around the open that rebuilds the index from the block maps.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use strata_replica::engine::PortableEngine;
use strata_replica::{CreateOptions, Store, BLOCK_SIZE};

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
    let block = vec![0x5au8; BLOCK_SIZE as usize];
    let blocks = TIB / BLOCK_SIZE;
    // Scattered and never adjacent: every write is its own extent.
    let stride = blocks / EXTENTS;
    for i in 0..EXTENTS {
        store
            .write(i * stride * BLOCK_SIZE + (i % 7) * BLOCK_SIZE, &block)
            .unwrap();
    }
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
    let mut buf = vec![0u8; BLOCK_SIZE as usize];
    store
        .read(stride * BLOCK_SIZE + BLOCK_SIZE, &mut buf)
        .unwrap();
    assert_eq!(buf, block);
}
