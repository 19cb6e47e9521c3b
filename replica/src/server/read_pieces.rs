//! READ_PIECES on the serving replica: several ranges read into one reply
//! buffer, piece after piece ([`crate::wire::PieceList`]).
//!
//! The connection's task first reads the pieces from the page cache
//! ([`read_cached`]); at the first piece that is not cached, the blocking
//! pool carries on from there ([`read_rest`]) with what was read so far.
//! For a copy (`for_copy`) the pages the reads bring into the cache are
//! dropped after them, as [`Store::read_for_copy`] does for one range: the
//! first piece that missed the cache and every piece after it are read and
//! dropped, since the missed try's readahead may have brought them in.

use crate::{Store, StoreError};

/// Where each piece's bytes start in the reply: `pieces[i]` goes to
/// `buf[start(i)..start(i) + len]`.
fn starts(pieces: &[(u64, u32)]) -> impl Iterator<Item = (usize, (u64, u32))> + '_ {
    pieces.iter().scan(0usize, |at, &(offset, len)| {
        let start = *at;
        *at += len as usize;
        Some((start, (offset, len)))
    })
}

/// Reads `pieces` into `buf` (their bytes back to back) from the page
/// cache only: `Ok(None)` when every one was cached, `Ok(Some(i))` when
/// `pieces[i]` was not (the pieces before it are in `buf`).
pub(super) fn read_cached(
    store: &Store,
    pieces: &[(u64, u32)],
    buf: &mut [u8],
) -> Result<Option<usize>, StoreError> {
    for (i, (start, (offset, len))) in starts(pieces).enumerate() {
        if !store.read_cached(offset, &mut buf[start..start + len as usize])? {
            return Ok(Some(i));
        }
    }
    Ok(None)
}

/// Reads `pieces[from..]` into their places in `buf`, on a thread that may
/// wait. `declined`: [`read_cached`] stopped at `pieces[from]`.
pub(super) fn read_rest(
    store: &Store,
    pieces: &[(u64, u32)],
    buf: &mut [u8],
    from: usize,
    for_copy: bool,
    declined: bool,
) -> Result<(), StoreError> {
    let mut missed = declined;
    for (start, (offset, len)) in starts(pieces).skip(from) {
        let piece = &mut buf[start..start + len as usize];
        if !for_copy {
            store.read(offset, piece)?;
        } else if missed {
            store.read_for_copy_uncached(offset, piece)?;
        } else if !store.read_cached(offset, piece)? {
            missed = true;
            store.read_for_copy_uncached(offset, piece)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_land_back_to_back_in_order() {
        let pieces = [(8192, 4096), (1 << 20, 8192), (3 << 20, 4096)];
        let starts: Vec<usize> = starts(&pieces).map(|(s, _)| s).collect();
        assert_eq!(starts, vec![0, 4096, 12288]);
    }
}
