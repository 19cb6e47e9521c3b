//! Crash safety: a simulated page cache (`CrashSimEngine`) loses or tears
//! everything not yet flushed, and fail points stop every chain operation at
//! every step. After the "crash" and a reopen, everything flushed reads back
//! and the metadata is consistent.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use proptest::prelude::*;
use strata_replica::failpoint;
use strata_replica::testing::{CrashMode, CrashSimEngine};
use strata_replica::{CreateOptions, Store, StoreError, View, BLOCK_SIZE};

const BS: usize = BLOCK_SIZE as usize;
const BLOCKS: u64 = 32;

fn block_pattern(seed: u32) -> Vec<u8> {
    (0..BS)
        .map(|i| (i as u32).wrapping_mul(2654435761).wrapping_add(seed) as u8)
        .collect()
}

fn create(dir: &Path, engine: Arc<CrashSimEngine>) -> Store {
    Store::create(
        dir,
        &CreateOptions {
            volume_id: "crash".into(),
            size: BLOCKS * BLOCK_SIZE,
        },
        engine,
    )
    .unwrap()
}

#[derive(Debug, Clone)]
enum Op {
    Write { block: u64, seed: u32 },
    Trim { block: u64, blocks: u64 },
    Flush,
    Snapshot,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..BLOCKS, any::<u32>()).prop_map(|(block, seed)| Op::Write { block, seed }),
        2 => (0..BLOCKS, 1u64..6).prop_map(|(block, blocks)| Op::Trim { block, blocks }),
        2 => Just(Op::Flush),
        1 => Just(Op::Snapshot),
    ]
}

/// Runs `ops`, crashes with `mode`, reopens, and checks every block against
/// what was durable and what was written since.
fn crash_and_check(ops: Vec<Op>, mode: CrashMode) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let engine = Arc::new(CrashSimEngine::new());
    let store = create(dir.path(), engine.clone());
    let zero = vec![0u8; BS];
    // durable[b]: contents as of the last flush. since[b]: contents written since.
    let mut durable: Vec<Vec<u8>> = vec![zero.clone(); BLOCKS as usize];
    let mut current = durable.clone();
    let mut since: Vec<HashSet<Vec<u8>>> = vec![HashSet::new(); BLOCKS as usize];
    let mut snaps = 0;
    for op in ops {
        match op {
            Op::Write { block, seed } => {
                let data = block_pattern(seed);
                store.write(block * BLOCK_SIZE, &data).unwrap();
                current[block as usize] = data.clone();
                since[block as usize].insert(data);
            }
            Op::Trim { block, blocks } => {
                let n = blocks.min(BLOCKS - block);
                store.trim(block * BLOCK_SIZE, n * BLOCK_SIZE).unwrap();
                for b in block..block + n {
                    current[b as usize] = zero.clone();
                    since[b as usize].insert(zero.clone());
                }
            }
            Op::Flush | Op::Snapshot => {
                if matches!(op, Op::Snapshot) {
                    store.snapshot(&format!("s{snaps}")).unwrap();
                    snaps += 1;
                } else {
                    store.flush().unwrap();
                }
                durable = current.clone();
                since.iter_mut().for_each(HashSet::clear);
            }
        }
    }
    drop(store);
    engine.crash(mode);
    let (store, report) = Store::open(dir.path(), Arc::new(CrashSimEngine::new())).unwrap();
    prop_assert!(!report.was_clean);
    prop_assert_eq!(store.snapshots().unwrap().len(), snaps);
    for b in 0..BLOCKS as usize {
        let mut buf = vec![0u8; BS];
        match store.read(b as u64 * BLOCK_SIZE, &mut buf) {
            Ok(()) => {
                let ok = buf == durable[b] || since[b].contains(&buf);
                prop_assert!(ok, "block {} holds data that was never written there", b);
                if since[b].is_empty() {
                    prop_assert!(
                        buf == durable[b],
                        "flushed block {} did not survive the crash",
                        b
                    );
                }
                if matches!(mode, CrashMode::DropAll) {
                    prop_assert!(
                        buf == durable[b],
                        "block {} is not its last flushed contents",
                        b
                    );
                }
            }
            Err(StoreError::Checksum { .. }) => {
                // A torn, never-flushed write: allowed only where a write was in flight.
                prop_assert!(
                    !since[b].is_empty(),
                    "flushed block {} reads with a checksum error",
                    b
                );
                prop_assert!(
                    matches!(mode, CrashMode::TornRandom { .. }),
                    "checksum error after a clean drop"
                );
            }
            Err(e) => return Err(TestCaseError::fail(format!("block {b}: {e}"))),
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn unflushed_writes_vanish_and_flushed_ones_survive(ops in proptest::collection::vec(op(), 1..60)) {
        crash_and_check(ops, CrashMode::DropAll)?;
    }

    #[test]
    fn torn_writeback_never_corrupts_flushed_data(ops in proptest::collection::vec(op(), 1..60), seed in any::<u64>()) {
        crash_and_check(ops, CrashMode::TornRandom { seed })?;
    }
}

/// Everything a chain operation may leave: the head and every snapshot view.
fn views(store: &Store) -> Vec<(String, Vec<u8>)> {
    let size = store.size() as usize;
    let mut out = Vec::new();
    let mut head = vec![0u8; size];
    store.read(0, &mut head).unwrap();
    out.push(("<head>".to_string(), head));
    for s in store.snapshots().unwrap() {
        // A snapshot keeps the size the volume had when it was taken.
        let mut buf = vec![0u8; s.size as usize];
        store
            .read_view(View::Snapshot(&s.name), 0, &mut buf)
            .unwrap();
        out.push((s.name, buf));
    }
    out
}

/// Builds a store with three snapshots and flushed data in every layer.
fn populated(dir: &Path, engine: Arc<CrashSimEngine>) -> Store {
    let store = create(dir, engine);
    for layer in 0..4u32 {
        for b in 0..BLOCKS {
            if (b + layer as u64).is_multiple_of(3) {
                store
                    .write(b * BLOCK_SIZE, &block_pattern(layer * 100 + b as u32))
                    .unwrap();
            }
        }
        store
            .trim((layer as u64 * 5) * BLOCK_SIZE, 2 * BLOCK_SIZE)
            .unwrap();
        if layer < 3 {
            store.snapshot(&format!("s{layer}")).unwrap();
        }
    }
    store.flush().unwrap();
    store
}

type ChainOp = fn(&Store) -> Result<(), StoreError>;

#[test]
fn every_fail_point_of_every_chain_operation_leaves_the_old_or_new_state() {
    let ops: &[(&str, ChainOp)] = &[
        ("snapshot", |s| s.snapshot("new")),
        ("revert", |s| s.revert("s1", true)),
        ("delete middle", |s| s.delete_snapshot("s1")),
        ("delete oldest", |s| s.delete_snapshot("s0")),
        ("delete newest", |s| s.delete_snapshot("s2")),
        ("expand", |s| s.expand((BLOCKS + 8) * BLOCK_SIZE)),
        ("set epoch", |s| s.set_epoch(9)),
    ];
    let mut fired = 0;
    for (name, op) in ops {
        // The states before and after the operation, computed without faults.
        let (before, after) = {
            let dir = tempfile::tempdir().unwrap();
            let store = populated(dir.path(), Arc::new(CrashSimEngine::new()));
            let before = views(&store);
            op(&store).unwrap();
            let after = views(&store);
            (before, after)
        };
        for &point in failpoint::ALL {
            for tear_tmp in [false, true] {
                let dir = tempfile::tempdir().unwrap();
                let engine = Arc::new(CrashSimEngine::new());
                let store = populated(dir.path(), engine.clone());
                store.failpoints().arm(point, 0);
                match op(&store) {
                    Err(StoreError::FailPoint(p)) => {
                        assert_eq!(p, point);
                        fired += 1;
                    }
                    Ok(()) => continue, // this operation never reaches that point
                    Err(e) => panic!("{name} at {point}: unexpected error {e}"),
                }
                // A poisoned store refuses further changes.
                assert!(
                    store.write(0, &[0u8; BS]).is_err(),
                    "{name}/{point}: store not poisoned"
                );
                drop(store);
                engine.crash(CrashMode::DropAll);
                let tmp = dir.path().join("volume.meta.tmp");
                if tear_tmp && tmp.exists() {
                    // An unsynced temp file may hold any prefix of its contents.
                    let len = std::fs::metadata(&tmp).unwrap().len();
                    let f = std::fs::OpenOptions::new().write(true).open(&tmp).unwrap();
                    f.set_len(len / 3).unwrap();
                }
                let (store, _) = Store::open(dir.path(), Arc::new(CrashSimEngine::new()))
                    .unwrap_or_else(|e| panic!("{name} at {point}: reopen failed: {e}"));
                let got = views(&store);
                assert!(
                    got == before || got == after,
                    "{name} crashed at {point} (tear_tmp={tear_tmp}) left a state that is neither before nor after: {:?}",
                    got.iter().map(|v| &v.0).collect::<Vec<_>>()
                );
                // Orphan layer files are gone: every layer file belongs to the chain.
                let files = std::fs::read_dir(dir.path()).unwrap().count();
                let layers = store.snapshots().unwrap().len() + 1;
                assert_eq!(
                    files,
                    layers * 2 + 2,
                    "{name}/{point}: stray files left behind"
                );
                // A deletion interrupted before its commit can be run again.
                if name.starts_with("delete") && got == before {
                    op(&store).unwrap();
                    assert_eq!(views(&store), after);
                }
            }
        }
    }
    assert!(
        fired >= 20,
        "only {fired} fail points fired; the test is not exercising the operations"
    );
}
