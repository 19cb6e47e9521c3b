//! Criterion benchmarks of the replica store's hot paths: 4 KiB random
//! writes, 4 KiB random reads through a 10-layer chain, index lookups, and
//! crc32 of a block. Run: `cargo bench --bench store`.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rand::{Rng, SeedableRng};
use strata_replica::engine::{IoEngine, PortableEngine, UringEngine};
use strata_replica::extent::RangeMap;
use strata_replica::{CreateOptions, Store, BLOCK_SIZE};

const VOLUME: u64 = 1 << 30;
const BLOCKS: u64 = VOLUME / BLOCK_SIZE;

fn engines() -> Vec<(&'static str, Arc<dyn IoEngine>)> {
    let mut v: Vec<(&'static str, Arc<dyn IoEngine>)> =
        vec![("portable", Arc::new(PortableEngine))];
    if let Ok(u) = UringEngine::probe() {
        v.push(("io_uring", Arc::new(u)));
    }
    v
}

fn random_write(c: &mut Criterion) {
    let mut group = c.benchmark_group("store_write_4k_random");
    group.throughput(Throughput::Bytes(BLOCK_SIZE));
    for (name, engine) in engines() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::create(
            dir.path(),
            &CreateOptions {
                volume_id: "bench".into(),
                size: VOLUME,
            },
            engine,
        )
        .unwrap();
        let buf = vec![0xa5u8; BLOCK_SIZE as usize];
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        group.bench_function(name, |b| {
            b.iter(|| {
                let block = rng.gen_range(0..BLOCKS);
                store.write(block * BLOCK_SIZE, black_box(&buf)).unwrap();
            })
        });
    }
    group.finish();
}

fn random_read_10_layers(c: &mut Criterion) {
    let mut group = c.benchmark_group("store_read_4k_random_10_layers");
    group.throughput(Throughput::Bytes(BLOCK_SIZE));
    for (name, engine) in engines() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::create(
            dir.path(),
            &CreateOptions {
                volume_id: "bench".into(),
                size: 64 << 20,
            },
            engine,
        )
        .unwrap();
        let blocks = (64 << 20) / BLOCK_SIZE;
        let buf = vec![0x5au8; BLOCK_SIZE as usize];
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        // Ten layers, each holding a random tenth of the blocks.
        for layer in 0..10 {
            for _ in 0..blocks / 10 {
                store
                    .write(rng.gen_range(0..blocks) * BLOCK_SIZE, &buf)
                    .unwrap();
            }
            if layer < 9 {
                store.snapshot(&format!("s{layer}")).unwrap();
            }
        }
        let mut out = vec![0u8; BLOCK_SIZE as usize];
        group.bench_function(name, |b| {
            b.iter(|| {
                let block = rng.gen_range(0..blocks);
                store.read(block * BLOCK_SIZE, black_box(&mut out)).unwrap();
            })
        });
    }
    group.finish();
}

fn index_lookup(c: &mut Criterion) {
    let mut map = RangeMap::new();
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    for _ in 0..100_000 {
        let s = rng.gen_range(0..(1u64 << 28));
        map.set(s, s + 1, 1u8);
    }
    c.bench_function("index_lookup_100k_extents", |b| {
        b.iter(|| {
            let s = rng.gen_range(0..(1u64 << 28));
            black_box(map.overlapping(s, s + 8).count())
        })
    });
}

fn crc32_block(c: &mut Criterion) {
    let buf = vec![7u8; BLOCK_SIZE as usize];
    let mut group = c.benchmark_group("crc32");
    group.throughput(Throughput::Bytes(BLOCK_SIZE));
    group.bench_function("4k", |b| b.iter(|| crc32fast::hash(black_box(&buf))));
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).warm_up_time(std::time::Duration::from_millis(500)).measurement_time(std::time::Duration::from_secs(2));
    targets = random_write, random_read_10_layers, index_lookup, crc32_block
}
criterion_main!(benches);
