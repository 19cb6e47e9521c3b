//! [`DenseRegion`]: the contents of one fragmented region of a
//! [`RangeMap`](super::RangeMap) as bitmaps, one [`Plane`] of
//! [`REGION_BLOCKS`] bits per distinct value the region holds. A block is in
//! at most one plane; a block in none is unset. A region holding one value
//! costs one bit per block, however it is fragmented.

use super::REGION_BLOCKS;

const WORDS: usize = (REGION_BLOCKS / 64) as usize;
const BITS: u32 = REGION_BLOCKS as u32;

/// The blocks of one region that hold `value`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Plane<V> {
    bits: [u64; WORDS],
    value: V,
}

/// One region's blocks, by value. Offsets are region-relative, `0..256`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct DenseRegion<V> {
    /// Boxed slice, not `Vec`: the B-tree holds one per dense region, and a
    /// region rarely gains a value after it turned dense.
    planes: Box<[Plane<V>]>,
}

/// Bits `[a, b)` of word `w` (of a region's bitmap) as a mask.
fn word_mask(w: usize, a: u32, b: u32) -> u64 {
    let lo = (w as u32) * 64;
    let from = a.max(lo);
    let to = b.min(lo + 64);
    if from >= to {
        return 0;
    }
    let width = to - from;
    let ones = if width == 64 {
        u64::MAX
    } else {
        (1u64 << width) - 1
    };
    ones << (from - lo)
}

/// The first set bit at or after `from`.
fn next_set(bits: &[u64; WORDS], from: u32) -> Option<u32> {
    if from >= BITS {
        return None;
    }
    let mut w = (from / 64) as usize;
    let mut word = bits[w] & (u64::MAX << (from % 64));
    loop {
        if word != 0 {
            return Some(w as u32 * 64 + word.trailing_zeros());
        }
        w += 1;
        if w == WORDS {
            return None;
        }
        word = bits[w];
    }
}

/// The first clear bit at or after `from` (`BITS` if none).
fn next_clear(bits: &[u64; WORDS], from: u32) -> u32 {
    if from >= BITS {
        return BITS;
    }
    let mut w = (from / 64) as usize;
    let mut word = !bits[w] & (u64::MAX << (from % 64));
    loop {
        if word != 0 {
            return w as u32 * 64 + word.trailing_zeros();
        }
        w += 1;
        if w == WORDS {
            return BITS;
        }
        word = !bits[w];
    }
}

/// Number of maximal runs of set bits.
fn run_count(bits: &[u64; WORDS]) -> usize {
    let mut carry = 0u64;
    let mut runs = 0;
    for &word in bits {
        // A run starts where a bit is set and the bit below it is not.
        let starts = word & !((word << 1) | carry);
        runs += starts.count_ones() as usize;
        carry = word >> 63;
    }
    runs
}

impl<V: Copy + Eq> Plane<V> {
    fn is_empty(&self) -> bool {
        self.bits.iter().all(|&w| w == 0)
    }

    fn apply(&mut self, a: u32, b: u32, set: bool) {
        for (w, word) in self.bits.iter_mut().enumerate() {
            let mask = word_mask(w, a, b);
            if set {
                *word |= mask;
            } else {
                *word &= !mask;
            }
        }
    }
}

impl<V: Copy + Eq> DenseRegion<V> {
    /// A region holding `runs` (region-relative, disjoint).
    pub(super) fn from_runs(runs: impl IntoIterator<Item = (u32, u32, V)>) -> Self {
        let mut region = DenseRegion {
            planes: Box::new([]),
        };
        for (a, b, v) in runs {
            region.set(a, b, v);
        }
        region
    }

    #[cfg(test)]
    pub(super) fn is_empty(&self) -> bool {
        self.planes.is_empty()
    }

    /// Sets blocks `[a, b)` to `value`.
    pub(super) fn set(&mut self, a: u32, b: u32, value: V) {
        let mut found = false;
        for plane in self.planes.iter_mut() {
            let mine = plane.value == value;
            plane.apply(a, b, mine);
            found |= mine;
        }
        if !found {
            let mut plane = Plane {
                bits: [0; WORDS],
                value,
            };
            plane.apply(a, b, true);
            let mut planes = std::mem::take(&mut self.planes).into_vec();
            planes.push(plane);
            self.planes = planes.into_boxed_slice();
        }
        self.drop_empty_planes();
    }

    /// Unsets blocks `[a, b)`.
    pub(super) fn clear(&mut self, a: u32, b: u32) {
        for plane in self.planes.iter_mut() {
            plane.apply(a, b, false);
        }
        self.drop_empty_planes();
    }

    fn drop_empty_planes(&mut self) {
        if self.planes.iter().any(Plane::is_empty) {
            let mut planes = std::mem::take(&mut self.planes).into_vec();
            planes.retain(|p| !p.is_empty());
            self.planes = planes.into_boxed_slice();
        }
    }

    /// Runs of equal value the region holds (an upper bound on the extents
    /// it contributes to the map: runs at its edges may join neighbours').
    pub(super) fn run_count(&self) -> usize {
        self.planes.iter().map(|p| run_count(&p.bits)).sum()
    }

    /// The first run overlapping `[from, to)`, clipped to it.
    pub(super) fn next_run(&self, from: u32, to: u32) -> Option<(u32, u32, V)> {
        let mut best: Option<(u32, &Plane<V>)> = None;
        for plane in self.planes.iter() {
            if let Some(at) = next_set(&plane.bits, from) {
                if at < to && best.is_none_or(|(b, _)| at < b) {
                    best = Some((at, plane));
                }
            }
        }
        let (start, plane) = best?;
        Some((start, next_clear(&plane.bits, start).min(to), plane.value))
    }

    /// Heap bytes of the planes.
    pub(super) fn heap_bytes(&self) -> usize {
        std::mem::size_of_val::<[Plane<V>]>(&self.planes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runs(region: &DenseRegion<u8>) -> Vec<(u32, u32, u8)> {
        let mut out = Vec::new();
        let mut at = 0;
        while let Some((a, b, v)) = region.next_run(at, BITS) {
            out.push((a, b, v));
            at = b;
        }
        out
    }

    #[test]
    fn runs_cross_word_edges_and_planes_stay_disjoint() {
        let mut r = DenseRegion::from_runs([(0, 1, 1u8), (60, 70, 1), (130, 256, 2)]);
        assert_eq!(runs(&r), vec![(0, 1, 1), (60, 70, 1), (130, 256, 2)]);
        assert_eq!(r.run_count(), 3);
        r.set(65, 140, 2);
        assert_eq!(runs(&r), vec![(0, 1, 1), (60, 65, 1), (65, 256, 2)]);
        r.clear(0, 256);
        assert!(r.is_empty());
    }

    #[test]
    fn next_run_clips_to_the_window() {
        let r = DenseRegion::from_runs([(10, 100, 7u8)]);
        assert_eq!(r.next_run(20, 30), Some((20, 30, 7)));
        assert_eq!(r.next_run(100, 256), None);
        assert_eq!(r.next_run(0, 10), None);
    }

    #[test]
    fn one_value_costs_one_bit_per_block() {
        let r = DenseRegion::from_runs((0..128).map(|i| (2 * i, 2 * i + 1, 1u8)));
        assert_eq!(r.run_count(), 128);
        assert_eq!(r.heap_bytes(), std::mem::size_of::<Plane<u8>>());
        assert!(std::mem::size_of::<Plane<u8>>() <= REGION_BLOCKS as usize / 8 + 8);
    }
}
