//! Tests of [`RangeMap`]: a per-block model over one region (unchanged from
//! the B-tree-only map) and over several regions with the shape invariants
//! checked after every step, and the shape changes themselves.

use super::*;
use proptest::prelude::*;

fn model_apply(model: &mut [Option<u8>], op: &(bool, u64, u64, u8)) {
    let (is_set, s, e, v) = *op;
    for slot in &mut model[s as usize..e as usize] {
        *slot = if is_set { Some(v) } else { None };
    }
}

proptest! {
    #[test]
    fn matches_a_per_block_model(ops in proptest::collection::vec((any::<bool>(), 0u64..64, 0u64..64, 0u8..3), 1..60)) {
        let mut map = RangeMap::new();
        let mut model = vec![None; 64];
        for (is_set, a, b, v) in ops {
            let (s, e) = (a.min(b), a.max(b));
            if is_set { map.set(s, e, v) } else { map.clear(s, e) }
            model_apply(&mut model, &(is_set, s, e, v));
            let mut seen = vec![None; 64];
            let mut last_end = 0;
            let mut prev: Option<(u64, u8)> = None;
            for (s, e, v) in map.iter() {
                prop_assert!(s >= last_end && s < e, "extents must be ordered and disjoint");
                if let Some((pe, pv)) = prev { prop_assert!(!(pe == s && pv == v), "adjacent equal extents must merge"); }
                for slot in &mut seen[s as usize..e as usize] { *slot = Some(v); }
                last_end = e;
                prev = Some((e, v));
            }
            prop_assert_eq!(&seen, &model);
        }
    }

    /// Four regions; short writes make regions dense, long ones and clears
    /// make them sparse again; every query agrees with the model.
    #[test]
    fn matches_a_per_block_model_across_regions(
        ops in proptest::collection::vec(
            (any::<bool>(), 0u64..1024, prop_oneof![3 => 1u64..4, 1 => 1u64..600], 0u8..3),
            1..200,
        ),
        queries in proptest::collection::vec((0u64..1024, 1u64..300), 8),
    ) {
        const N: u64 = 1024;
        let mut map = RangeMap::new();
        let mut model = vec![None; N as usize];
        for (is_set, s, len, v) in ops {
            let e = (s + len).min(N);
            if is_set { map.set(s, e, v) } else { map.clear(s, e) }
            model_apply(&mut model, &(is_set, s, e, v));
            prop_assert_eq!(map.check_shapes(), Ok(()));
        }
        let mut seen = vec![None; N as usize];
        let mut prev: Option<(u64, u8)> = None;
        for (s, e, v) in map.iter() {
            prop_assert!(prev.is_none_or(|(pe, pv)| pe < s || (pe == s && pv != v)));
            for slot in &mut seen[s as usize..e as usize] { *slot = Some(v); }
            prev = Some((e, v));
        }
        prop_assert_eq!(&seen, &model);
        for (s, len) in queries {
            let e = (s + len).min(N);
            let mut expect: Vec<(u64, u64, u8)> = Vec::new();
            for b in s..e {
                if let Some(v) = model[b as usize] {
                    match expect.last_mut() {
                        Some(last) if last.1 == b && last.2 == v => last.1 += 1,
                        _ => expect.push((b, b + 1, v)),
                    }
                }
            }
            let got: Vec<_> = map.overlapping(s, e).collect();
            prop_assert_eq!(got, expect);
        }
    }
}

#[test]
fn spans_are_packed() {
    // A padded (u64, u8) is 16 bytes; the maps hold one per sparse extent.
    assert_eq!(std::mem::size_of::<Span<u8>>(), 9);
    assert_eq!(std::mem::size_of::<Span<()>>(), 8);
}

#[test]
fn overlapping_clips_and_gaps_complement() {
    let mut map = RangeMap::new();
    map.set(10, 20, 1u8);
    map.set(30, 40, 2u8);
    let got: Vec<_> = map.overlapping(15, 35).collect();
    assert_eq!(got, vec![(15, 20, 1), (30, 35, 2)]);
    assert_eq!(map.gaps(0, 50), vec![0..10, 20..30, 40..50]);
    assert!(map.intersects(19, 21));
    assert!(!map.intersects(20, 30));
}

#[test]
fn a_fragmented_region_turns_dense_and_back_when_it_coalesces() {
    let mut map = RangeMap::new();
    // A long extent across three regions, then holes punched into the
    // middle region.
    map.set(100, 700, 1u8);
    assert_eq!(map.dense_regions(), 0);
    map.clear(300, 301);
    map.clear(310, 311);
    assert_eq!(map.dense_regions(), 1, "three extents in region 1");
    assert_eq!(map.check_shapes(), Ok(()));
    assert_eq!(
        map.iter().collect::<Vec<_>>(),
        vec![(100, 300, 1), (301, 310, 1), (311, 700, 1)],
        "extents join across the dense region's edges"
    );
    map.set(300, 311, 1);
    assert_eq!(map.dense_regions(), 0, "one run left: sparse again");
    assert_eq!(map.iter().collect::<Vec<_>>(), vec![(100, 700, 1)]);
    assert_eq!(map.len(), 1);
}

#[test]
fn every_other_block_costs_bits_not_extents() {
    let blocks = 64 * REGION_BLOCKS;
    let mut map = RangeMap::new();
    for b in (0..blocks).step_by(2) {
        map.set(b, b + 1, 1u8);
    }
    assert_eq!(map.len() as u64, blocks / 2);
    assert_eq!(map.dense_regions() as u64, blocks / REGION_BLOCKS);
    // One 32-byte bitmap (plus value and B-tree entry) per region, against
    // about 40 bytes per extent as runs.
    let per_region = map.heap_bytes() as u64 / (blocks / REGION_BLOCKS);
    assert!(per_region <= 96, "{per_region} bytes per region");
    // Writing the holes coalesces everything back into one extent.
    for b in (1..blocks).step_by(2) {
        map.set(b, b + 1, 1u8);
    }
    assert_eq!(map.dense_regions(), 0);
    assert_eq!(map.iter().collect::<Vec<_>>(), vec![(0, blocks, 1)]);
}

#[test]
fn equality_ignores_the_shape() {
    let mut a = RangeMap::new();
    for b in [0u64, 2, 4] {
        a.set(b, b + 1, 1u8);
    }
    a.set(1, 2, 1);
    // Two runs left in a dense region: it stays dense (hysteresis).
    assert_eq!(a.dense_regions(), 1);
    let mut b = RangeMap::new();
    b.set(0, 3, 1u8);
    b.set(4, 5, 1u8);
    assert_eq!(b.dense_regions(), 0);
    assert_eq!(a, b);
}
