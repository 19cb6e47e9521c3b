//! Criterion benchmarks of the replica's in-memory index (`RangeMap`) and
//! the store operations that lean on it, in the two shapes that matter:
//! contiguous data and fragmented data (every other 4 KiB block written).
//! Run: `cargo bench --bench index`. Figures before and after the per-region
//! index are in BENCHMARKS.md.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use rand::{Rng, SeedableRng};
use strata_replica::engine::PortableEngine;
use strata_replica::extent::RangeMap;
use strata_replica::{CreateOptions, Store, BLOCK_SIZE};

/// Blocks of the fragmented maps: 4 GiB of range, 524,288 extents.
const FRAGMENTED_BLOCKS: u64 = 1 << 20;

fn every_other_block(blocks: u64) -> RangeMap<u8> {
    let mut map = RangeMap::new();
    for b in (0..blocks).step_by(2) {
        map.set(b, b + 1, 1u8);
    }
    map
}

/// Building a map block by block, as the open-time rebuild does.
fn index_build(c: &mut Criterion) {
    let mut group = c.benchmark_group("index_build");
    let n = 1u64 << 16;
    group.throughput(Throughput::Elements(n));
    group.bench_function("every_other_block_64k", |b| {
        b.iter(|| black_box(every_other_block(2 * n)))
    });
    group.bench_function("contiguous_64k", |b| {
        b.iter(|| {
            let mut map = RangeMap::new();
            for blk in 0..n {
                map.set(blk, blk + 1, 1u8);
            }
            black_box(map)
        })
    });
    group.finish();
}

/// Lookups of 8 blocks at random places.
fn index_lookup_fragmented(c: &mut Criterion) {
    let map = every_other_block(FRAGMENTED_BLOCKS);
    let mut rng = rand::rngs::StdRng::seed_from_u64(4);
    c.bench_function("index_lookup_8_blocks_fragmented", |b| {
        b.iter(|| {
            let s = rng.gen_range(0..FRAGMENTED_BLOCKS - 8);
            black_box(map.overlapping(s, s + 8).count())
        })
    });
}

/// A trim of 16 blocks and the 8 writes that restore the pattern, at
/// random places of a fragmented map.
fn index_trim_and_rewrite(c: &mut Criterion) {
    let mut map = every_other_block(FRAGMENTED_BLOCKS);
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    c.bench_function("index_trim_16_rewrite_8_fragmented", |b| {
        b.iter(|| {
            let s = rng.gen_range(0..FRAGMENTED_BLOCKS / 2 - 8) * 2;
            map.clear(s, s + 16);
            for blk in (s..s + 16).step_by(2) {
                map.set(blk, blk + 1, 1u8);
            }
        })
    });
}

fn create_store(dir: &std::path::Path, size: u64) -> Store {
    Store::create(
        dir,
        &CreateOptions {
            volume_id: "bench".into(),
            size,
        },
        Arc::new(PortableEngine),
    )
    .unwrap()
}

/// Opening a 256 MiB volume written every other block (32,768 extents):
/// the rebuild of the index from the block map.
fn store_open_fragmented(c: &mut Criterion) {
    let size = 256u64 << 20;
    let dir = tempfile::tempdir().unwrap();
    let store = create_store(dir.path(), size);
    let block = vec![0x5au8; BLOCK_SIZE as usize];
    for b in (0..size / BLOCK_SIZE).step_by(2) {
        store.write(b * BLOCK_SIZE, &block).unwrap();
    }
    store.close().unwrap();
    let mut group = c.benchmark_group("store_open");
    group.throughput(Throughput::Elements(size / BLOCK_SIZE / 2));
    group.bench_function("fragmented_256mib", |b| {
        b.iter(|| {
            let (store, _) = Store::open(dir.path(), Arc::new(PortableEngine)).unwrap();
            black_box(store.index_heap_bytes());
        })
    });
    group.finish();
}

/// Deleting a snapshot of 8 MiB written every odd block into a head that
/// holds every even block: 1,024 ranges merged.
fn store_delete_snapshot_fragmented(c: &mut Criterion) {
    let size = 8u64 << 20;
    let blocks = size / BLOCK_SIZE;
    let block = vec![0x5au8; BLOCK_SIZE as usize];
    let mut group = c.benchmark_group("store_delete_snapshot");
    group.sample_size(10);
    group.throughput(Throughput::Elements(blocks / 2));
    group.bench_function("fragmented_8mib", |b| {
        b.iter_batched(
            || {
                let dir = tempfile::tempdir().unwrap();
                let store = create_store(dir.path(), size);
                for blk in (1..blocks).step_by(2) {
                    store.write(blk * BLOCK_SIZE, &block).unwrap();
                }
                store.snapshot("s").unwrap();
                for blk in (0..blocks).step_by(2) {
                    store.write(blk * BLOCK_SIZE, &block).unwrap();
                }
                (dir, store)
            },
            |(dir, store)| {
                store.delete_snapshot("s").unwrap();
                (dir, store)
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).warm_up_time(std::time::Duration::from_millis(500)).measurement_time(std::time::Duration::from_secs(2));
    targets = index_build, index_lookup_fragmented, index_trim_and_rewrite, store_open_fragmented, store_delete_snapshot_fragmented
}
criterion_main!(benches);
