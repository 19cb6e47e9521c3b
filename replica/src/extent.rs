//! [`RangeMap`]: non-overlapping block ranges with a value each, in a
//! `BTreeMap`. It is the store's only in-memory index, so its memory grows
//! with the number of extents written, never with the volume size.

use std::collections::BTreeMap;
use std::ops::Range;

/// Maps disjoint half-open block ranges `[start, end)` to values. Adjacent
/// ranges with equal values are merged, so a sequentially written layer is
/// one entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeMap<V: Copy> {
    map: BTreeMap<u64, Span<V>>,
}

/// An extent's end and value. Packed: as a `(u64, V)` tuple a one-byte
/// value is padded to 16 bytes, and the store holds one of these per
/// extent written (two maps), so padding was a third of a B-tree leaf.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C, packed)]
struct Span<V: Copy> {
    end: u64,
    value: V,
}

impl<V: Copy> Span<V> {
    fn new(end: u64, value: V) -> Self {
        Span { end, value }
    }

    /// By value: fields of a packed struct cannot be borrowed.
    fn get(self) -> (u64, V) {
        (self.end, self.value)
    }
}

impl<V: Copy> Default for RangeMap<V> {
    fn default() -> Self {
        RangeMap {
            map: BTreeMap::new(),
        }
    }
}

impl<V: Copy + Eq> RangeMap<V> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of extents held.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Approximate heap bytes used: a B-tree leaf holds up to 11 keys and
    /// values and is about 2/3 full on average; internal nodes add edge
    /// pointers.
    pub fn heap_bytes(&self) -> usize {
        let entry = std::mem::size_of::<u64>() + std::mem::size_of::<Span<V>>();
        self.map.len() * (entry * 3 / 2 + 8)
    }

    /// The extent starting before `start`, if any: `(its start, end, value)`.
    fn before(&self, start: u64) -> Option<(u64, u64, V)> {
        self.map.range(..start).next_back().map(|(&s, span)| {
            let (e, v) = span.get();
            (s, e, v)
        })
    }

    /// Removes everything in `[start, end)`, splitting extents that straddle
    /// its edges.
    pub fn clear(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        // An extent starting before `start` that reaches into the range.
        if let Some((s, e, v)) = self.before(start) {
            if e > start {
                self.map.insert(s, Span::new(start, v));
                if e > end {
                    self.map.insert(end, Span::new(e, v));
                    return;
                }
            }
        }
        // Extents starting inside the range.
        let inside: Vec<u64> = self.map.range(start..end).map(|(&s, _)| s).collect();
        for s in inside {
            let (e, v) = self.map.remove(&s).expect("key just listed").get();
            if e > end {
                self.map.insert(end, Span::new(e, v));
            }
        }
    }

    /// Sets `[start, end)` to `value`, replacing whatever was there.
    pub fn set(&mut self, start: u64, end: u64, value: V) {
        if start >= end {
            return;
        }
        self.clear(start, end);
        let mut start = start;
        let mut end = end;
        if let Some((s, e, v)) = self.before(start) {
            if e == start && v == value {
                self.map.remove(&s);
                start = s;
            }
        }
        if let Some((e, v)) = self.map.get(&end).map(|span| span.get()) {
            if v == value {
                self.map.remove(&end);
                end = e;
            }
        }
        self.map.insert(start, Span::new(end, value));
    }

    /// The extents overlapping `[start, end)`, clipped to it, in order.
    pub fn overlapping(&self, start: u64, end: u64) -> impl Iterator<Item = (u64, u64, V)> + '_ {
        let first = self.before(start).filter(|&(_, e, _)| e > start);
        first
            .into_iter()
            .chain(self.map.range(start..end).map(|(&s, span)| {
                let (e, v) = span.get();
                (s, e, v)
            }))
            .map(move |(s, e, v)| (s.max(start), e.min(end), v))
            .filter(|(s, e, _)| s < e)
    }

    /// True if any extent overlaps `[start, end)`.
    pub fn intersects(&self, start: u64, end: u64) -> bool {
        self.overlapping(start, end).next().is_some()
    }

    /// Every extent, in order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64, V)> + '_ {
        self.map.iter().map(|(&s, span)| {
            let (e, v) = span.get();
            (s, e, v)
        })
    }

    /// The sub-ranges of `[start, end)` that no extent covers.
    pub fn gaps(&self, start: u64, end: u64) -> Vec<Range<u64>> {
        let mut gaps = Vec::new();
        let mut cursor = start;
        for (s, e, _) in self.overlapping(start, end) {
            if s > cursor {
                gaps.push(cursor..s);
            }
            cursor = e;
        }
        if cursor < end {
            gaps.push(cursor..end);
        }
        gaps
    }
}

#[cfg(test)]
mod tests {
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
    }

    #[test]
    fn spans_are_packed() {
        // A padded (u64, u8) is 16 bytes; the maps hold one per extent.
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
}
