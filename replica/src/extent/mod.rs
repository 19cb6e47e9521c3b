//! [`RangeMap`]: non-overlapping block ranges with a value each. It is the
//! replica's only in-memory index (the per-layer maps and the merged read
//! index of `store/`), and the controller's set of regions a replica missed.
//!
//! # Memory: the smaller of two shapes, region by region
//!
//! The block space is cut into regions of [`REGION_BLOCKS`] blocks (1 MiB of
//! 4 KiB blocks). Each region is held in one of two shapes:
//!
//! - **runs**: extents `[start, end)` with a value, in one B-tree keyed by
//!   start (about 40 bytes each). An extent may span many regions, so
//!   contiguous data costs what it always did: one entry per extent,
//!   whatever its length.
//! - **dense**: a [`dense::DenseRegion`], one bitmap of 256 bits per
//!   distinct value in the region (40 bytes with its value), in a second
//!   B-tree keyed by region number. Fragmentation inside the region costs
//!   nothing more: a region written every other block costs the same 32
//!   bytes of bits as one written in 3 places.
//!
//! A region turns dense when [`DENSE_AT_RUNS`] or more extents intersect
//! it, and back to runs when its bitmaps hold [`SPARSE_AT_RUNS`] run or
//! fewer (the gap between the two keeps a region near the threshold from
//! flipping on every write). Only the regions at the edges of a `set` or
//! `clear` can change shape: regions strictly inside the range end up
//! holding one extent or none. Runs never overlap a dense region; an extent
//! that reaches into a region turning dense is cut at the region's edge.
//!
//! Worst case per region: two run entries (about 90 bytes) while it is
//! sparse, or one 40-byte plane per distinct value plus about 40 bytes of
//! B-tree entry once dense. A layer's map holds at most two values (data and
//! zero tombstones) and nearly always one, so it costs at most one bit per
//! block plus the region's overhead (about 72 bytes per MiB, 72 KiB per GiB
//! of fully fragmented range); the merged read index holds at most one
//! value per layer, so at most one bit per block per layer.
//!
//! The iterators merge the two B-trees and join adjacent extents of equal
//! value across shapes and regions, so callers see the same extents
//! whatever the shape: maximal, ordered, disjoint.

mod dense;

use std::collections::{btree_map, BTreeMap};
use std::iter::Peekable;
use std::ops::Range;

use dense::DenseRegion;

/// Blocks per region: 1 MiB of 4 KiB blocks; a dense region's bitmap per
/// value is 256 bits.
pub const REGION_BLOCKS: u64 = 256;
/// A sparse region with this many extents intersecting it turns dense.
pub const DENSE_AT_RUNS: usize = 3;
/// A dense region holding at most this many runs turns sparse again.
pub const SPARSE_AT_RUNS: usize = 1;

/// Maps disjoint half-open block ranges `[start, end)` to values. Adjacent
/// ranges with equal values are merged, so a sequentially written layer is
/// one entry. See the module docs for the memory layout.
#[derive(Debug, Clone)]
pub struct RangeMap<V: Copy> {
    /// Extents of the sparse regions, by start.
    runs: BTreeMap<u64, Span<V>>,
    /// Dense regions, by region number (`block / REGION_BLOCKS`).
    dense: BTreeMap<u64, DenseRegion<V>>,
}

/// An extent's end and value. Packed: as a `(u64, V)` tuple a one-byte
/// value is padded to 16 bytes, and the store holds one of these per
/// sparse extent written (two maps), so padding was a third of a B-tree
/// leaf.
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
            runs: BTreeMap::new(),
            dense: BTreeMap::new(),
        }
    }
}

/// Equal if they hold the same extents, whatever shape each region is in.
impl<V: Copy + Eq> PartialEq for RangeMap<V> {
    fn eq(&self, other: &Self) -> bool {
        self.iter().eq(other.iter())
    }
}

impl<V: Copy + Eq> Eq for RangeMap<V> {}

fn region_of(block: u64) -> u64 {
    block / REGION_BLOCKS
}

fn region_start(region: u64) -> u64 {
    region * REGION_BLOCKS
}

fn region_end(region: u64) -> u64 {
    region_start(region).saturating_add(REGION_BLOCKS)
}

/// `block` relative to the start of `region`, clamped into it.
fn local(region: u64, block: u64) -> u32 {
    block
        .saturating_sub(region_start(region))
        .min(REGION_BLOCKS) as u32
}

/// Approximate heap bytes per B-tree entry of `entry` bytes: a leaf holds
/// up to 11 keys and values and is about 2/3 full on average; internal
/// nodes add edge pointers.
fn btree_entry_bytes(entry: usize) -> usize {
    entry * 3 / 2 + 8
}

impl<V: Copy + Eq> RangeMap<V> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of extents held. Walks the map: O(extents).
    pub fn len(&self) -> usize {
        self.iter().count()
    }

    pub fn is_empty(&self) -> bool {
        // A dense region is never empty: it turns sparse first.
        self.runs.is_empty() && self.dense.is_empty()
    }

    /// Regions held as bitmaps (for status and tests).
    pub fn dense_regions(&self) -> usize {
        self.dense.len()
    }

    /// Approximate heap bytes used.
    pub fn heap_bytes(&self) -> usize {
        let run = std::mem::size_of::<u64>() + std::mem::size_of::<Span<V>>();
        let region = std::mem::size_of::<u64>() + std::mem::size_of::<DenseRegion<V>>();
        self.runs.len() * btree_entry_bytes(run)
            + self.dense.len() * btree_entry_bytes(region)
            + self.dense.values().map(|d| d.heap_bytes()).sum::<usize>()
    }

    /// The sparse extent starting before `start`, if any: `(its start, end,
    /// value)`.
    fn run_before(&self, start: u64) -> Option<(u64, u64, V)> {
        self.runs.range(..start).next_back().map(|(&s, span)| {
            let (e, v) = span.get();
            (s, e, v)
        })
    }

    /// Removes every sparse extent in `[start, end)`, splitting extents that
    /// straddle its edges. Dense regions are left alone.
    fn clear_runs(&mut self, start: u64, end: u64) {
        if let Some((s, e, v)) = self.run_before(start) {
            if e > start {
                self.runs.insert(s, Span::new(start, v));
                if e > end {
                    self.runs.insert(end, Span::new(e, v));
                    return;
                }
            }
        }
        let inside: Vec<u64> = self.runs.range(start..end).map(|(&s, _)| s).collect();
        for s in inside {
            let (e, v) = self.runs.remove(&s).expect("key just listed").get();
            if e > end {
                self.runs.insert(end, Span::new(e, v));
            }
        }
    }

    /// Sets `[start, end)` to `value` as a sparse extent, merging with equal
    /// neighbours. The range must not overlap a dense region.
    fn set_run(&mut self, start: u64, end: u64, value: V) {
        self.clear_runs(start, end);
        let mut start = start;
        let mut end = end;
        if let Some((s, e, v)) = self.run_before(start) {
            if e == start && v == value {
                self.runs.remove(&s);
                start = s;
            }
        }
        if let Some((e, v)) = self.runs.get(&end).map(|span| span.get()) {
            if v == value {
                self.runs.remove(&end);
                end = e;
            }
        }
        self.runs.insert(start, Span::new(end, value));
    }

    /// Removes everything in `[start, end)`, splitting extents that straddle
    /// its edges.
    pub fn clear(&mut self, start: u64, end: u64) {
        self.apply(start, end, None);
    }

    /// Sets `[start, end)` to `value`, replacing whatever was there.
    pub fn set(&mut self, start: u64, end: u64, value: V) {
        self.apply(start, end, Some(value));
    }

    /// `set` (Some) or `clear` (None): dense regions the range covers only
    /// in part take the change in their bitmaps, the rest of the range is
    /// changed as runs (dropping dense regions it covers whole), then the
    /// two edge regions take the shape that suits them.
    fn apply(&mut self, start: u64, end: u64, value: Option<V>) {
        if start >= end {
            return;
        }
        let (first, last) = (region_of(start), region_of(end - 1));
        let mut runs_start = start;
        let mut runs_end = end;
        if self.dense.contains_key(&first)
            && (start > region_start(first) || end < region_end(first))
        {
            let to = end.min(region_end(first));
            self.change_dense(first, start, to, value);
            runs_start = to;
        }
        if last != first && self.dense.contains_key(&last) && end < region_end(last) {
            self.change_dense(last, region_start(last), end, value);
            runs_end = region_start(last);
        }
        if runs_start < runs_end {
            let covered: Vec<u64> = self
                .dense
                .range(region_of(runs_start)..=region_of(runs_end - 1))
                .map(|(&r, _)| r)
                .collect();
            for r in covered {
                debug_assert!(runs_start <= region_start(r) && region_end(r) <= runs_end);
                self.dense.remove(&r);
            }
            match value {
                Some(v) => self.set_run(runs_start, runs_end, v),
                None => self.clear_runs(runs_start, runs_end),
            }
        }
        self.reshape(first);
        if last != first {
            self.reshape(last);
        }
    }

    /// Sets (Some) or clears (None) `[from, to)` inside dense `region`.
    fn change_dense(&mut self, region: u64, from: u64, to: u64, value: Option<V>) {
        let d = self.dense.get_mut(&region).expect("dense region checked");
        let (a, b) = (local(region, from), local(region, to));
        match value {
            Some(v) => d.set(a, b, v),
            None => d.clear(a, b),
        }
    }

    /// Gives `region` the shape that suits what it holds now.
    fn reshape(&mut self, region: u64) {
        match self.dense.get(&region) {
            Some(d) if d.run_count() <= SPARSE_AT_RUNS => self.make_sparse(region),
            Some(_) => {}
            None => {
                if self.runs_intersecting(region).take(DENSE_AT_RUNS).count() >= DENSE_AT_RUNS {
                    self.make_dense(region);
                }
            }
        }
    }

    /// The sparse extents intersecting `region`, unclipped.
    fn runs_intersecting(&self, region: u64) -> impl Iterator<Item = (u64, u64, V)> + '_ {
        let (rs, re) = (region_start(region), region_end(region));
        self.run_before(rs)
            .filter(|&(_, e, _)| e > rs)
            .into_iter()
            .chain(self.runs.range(rs..re).map(|(&s, span)| {
                let (e, v) = span.get();
                (s, e, v)
            }))
    }

    fn make_dense(&mut self, region: u64) {
        let (rs, re) = (region_start(region), region_end(region));
        let inside: Vec<(u32, u32, V)> = self
            .runs_intersecting(region)
            .map(|(s, e, v)| (local(region, s), local(region, e), v))
            .collect();
        self.clear_runs(rs, re);
        self.dense.insert(region, DenseRegion::from_runs(inside));
    }

    fn make_sparse(&mut self, region: u64) {
        let d = self.dense.remove(&region).expect("dense region checked");
        let base = region_start(region);
        let mut at = 0;
        while let Some((a, b, v)) = d.next_run(at, REGION_BLOCKS as u32) {
            self.set_run(base + a as u64, base + b as u64, v);
            at = b;
        }
    }

    /// The extents overlapping `[start, end)`, clipped to it, in order.
    pub fn overlapping(&self, start: u64, end: u64) -> Overlapping<'_, V> {
        Overlapping {
            pieces: Pieces::new(self, start, end).peekable(),
        }
    }

    /// True if any extent overlaps `[start, end)`.
    pub fn intersects(&self, start: u64, end: u64) -> bool {
        self.overlapping(start, end).next().is_some()
    }

    /// Every extent, in order.
    pub fn iter(&self) -> Overlapping<'_, V> {
        self.overlapping(0, u64::MAX)
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

    /// Checks the shape invariants the module docs state (tests only).
    #[cfg(test)]
    fn check_shapes(&self) -> Result<(), String> {
        for (&r, d) in &self.dense {
            if d.is_empty() || d.run_count() <= SPARSE_AT_RUNS {
                return Err(format!("dense region {r} holds {} runs", d.run_count()));
            }
            if self.runs_intersecting(r).next().is_some() {
                return Err(format!("a run overlaps dense region {r}"));
            }
        }
        let mut regions: Vec<u64> = Vec::new();
        for (&s, span) in &self.runs {
            let (e, _) = span.get();
            regions.extend([region_of(s), region_of(e - 1)]);
        }
        for r in regions {
            let n = self.runs_intersecting(r).count();
            if n >= DENSE_AT_RUNS {
                return Err(format!("sparse region {r} has {n} extents"));
            }
        }
        Ok(())
    }
}

type RunIter<'a, V> =
    std::iter::Map<btree_map::Range<'a, u64, Span<V>>, fn((&'a u64, &'a Span<V>)) -> (u64, u64, V)>;

/// The sparse extents overlapping a range: the one starting before it, if
/// it reaches in, then those starting inside.
type RunsFrom<'a, V> =
    Peekable<std::iter::Chain<std::option::IntoIter<(u64, u64, V)>, RunIter<'a, V>>>;

fn run_item<V: Copy>((&s, span): (&u64, &Span<V>)) -> (u64, u64, V) {
    let (e, v) = span.get();
    (s, e, v)
}

/// Extent pieces overlapping a range, clipped, in order, from both shapes;
/// neighbours of equal value are not joined yet (see [`Overlapping`]).
struct Pieces<'a, V: Copy + Eq> {
    start: u64,
    end: u64,
    runs: RunsFrom<'a, V>,
    regions: btree_map::Range<'a, u64, DenseRegion<V>>,
    /// The dense region being read: its number, bitmaps, and the next
    /// region-relative block to look at.
    region: Option<(u64, &'a DenseRegion<V>, u32)>,
    dense_next: Option<(u64, u64, V)>,
}

impl<'a, V: Copy + Eq> Pieces<'a, V> {
    fn new(map: &'a RangeMap<V>, start: u64, end: u64) -> Self {
        let end = end.max(start);
        let first = map.run_before(start).filter(|&(_, e, _)| e > start);
        let runs = first
            .into_iter()
            .chain(map.runs.range(start..end).map(run_item::<V> as fn(_) -> _))
            .peekable();
        let regions = if start < end {
            map.dense.range(region_of(start)..=region_of(end - 1))
        } else {
            map.dense.range(1..1)
        };
        let mut pieces = Pieces {
            start,
            end,
            runs,
            regions,
            region: None,
            dense_next: None,
        };
        pieces.dense_next = pieces.next_dense();
        pieces
    }

    /// The next run out of the dense regions, clipped.
    fn next_dense(&mut self) -> Option<(u64, u64, V)> {
        loop {
            if let Some((r, d, at)) = self.region {
                let to = local(r, self.end);
                if let Some((a, b, v)) = d.next_run(at, to) {
                    self.region = Some((r, d, b));
                    let base = region_start(r);
                    return Some((base + a as u64, base + b as u64, v));
                }
                self.region = None;
            }
            let (&r, d) = self.regions.next()?;
            self.region = Some((r, d, local(r, self.start)));
        }
    }
}

impl<V: Copy + Eq> Iterator for Pieces<'_, V> {
    type Item = (u64, u64, V);

    fn next(&mut self) -> Option<Self::Item> {
        let run_first = match (self.runs.peek(), &self.dense_next) {
            (Some(r), Some(d)) => r.0 < d.0,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (None, None) => return None,
        };
        let (s, e, v) = if run_first {
            self.runs.next().expect("peeked")
        } else {
            let piece = self.dense_next.take().expect("checked");
            self.dense_next = self.next_dense();
            piece
        };
        Some((s.max(self.start), e.min(self.end), v))
    }
}

/// The extents of a [`RangeMap`] overlapping a range, clipped to it, in
/// order, neighbours of equal value joined (across regions and shapes).
pub struct Overlapping<'a, V: Copy + Eq> {
    pieces: Peekable<Pieces<'a, V>>,
}

impl<V: Copy + Eq> Iterator for Overlapping<'_, V> {
    type Item = (u64, u64, V);

    fn next(&mut self) -> Option<Self::Item> {
        let (s, mut e, v) = self.pieces.next()?;
        while let Some(&(ns, ne, nv)) = self.pieces.peek() {
            if ns != e || nv != v {
                break;
            }
            e = ne;
            self.pieces.next();
        }
        Some((s, e, v))
    }
}

#[cfg(test)]
mod tests;
