//! READ_PIECES' payload: several ranges read in one request.
//!
//! A rebuild of data written by 4 KiB random writes is tens of thousands of
//! blocks a few dozen KiB apart. Reading each in its own request cost a
//! frame, a task and a reply per 4 KiB; reading the span around a few of
//! them sent the holes between them as zeros. READ_PIECES names the pieces
//! and the reply carries their bytes, back to back, in the same order.
//!
//! ```text
//! header: offset = the first piece's offset, length = the payload's length
//! payload: pieces × (offset u64, len u32): sorted, disjoint, 4 KiB aligned,
//!          at most MAX_PIECES of them, at most MAX_PAYLOAD bytes together
//! reply: the pieces' bytes, concatenated
//! ```
//!
//! The same checks hold the pieces of a [`super::PullPlan`]
//! ([`check_pieces`]).

use bytes::{BufMut, Bytes, BytesMut};

use super::{u32_at, u64_at, MAX_PAYLOAD};

/// Bytes of one piece in a payload.
pub(super) const PIECE_LEN: usize = 12;
/// The most pieces one request names (4 KiB pieces of a 32 MiB span would
/// be 8192; the controller sends at most a few hundred).
pub const MAX_PIECES: usize = 8192;
const ALIGN: u64 = 4096;

/// Validated pieces of a READ_PIECES request. Keeps its encoding, which is
/// the request's payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PieceList {
    pieces: Vec<(u64, u32)>,
    encoded: Bytes,
}

impl PieceList {
    /// A list of `pieces` (offset, length), or why a replica would refuse it.
    pub fn new(pieces: Vec<(u64, u32)>) -> Result<PieceList, &'static str> {
        let first = pieces.first().map_or(0, |&(at, _)| at);
        check_pieces(first, u64::MAX, &pieces)?;
        check_total(&pieces)?;
        let mut b = BytesMut::with_capacity(pieces.len() * PIECE_LEN);
        for &(at, len) in &pieces {
            b.put_u64_le(at);
            b.put_u32_le(len);
        }
        Ok(PieceList {
            pieces,
            encoded: b.freeze(),
        })
    }

    /// Parses and checks a READ_PIECES payload for a request at `offset`
    /// (which must be the first piece's).
    pub fn decode(offset: u64, payload: Bytes) -> Result<PieceList, &'static str> {
        if !payload.len().is_multiple_of(PIECE_LEN) {
            return Err("READ_PIECES payload is not a whole number of pieces");
        }
        let count = payload.len() / PIECE_LEN;
        if count > MAX_PIECES {
            return Err("READ_PIECES names too many pieces");
        }
        let pieces: Vec<(u64, u32)> = (0..count)
            .map(|i| {
                let at = i * PIECE_LEN;
                (u64_at(&payload, at), u32_at(&payload, at + 8))
            })
            .collect();
        if pieces.first().is_some_and(|&(at, _)| at != offset) {
            return Err("READ_PIECES offset is not its first piece's");
        }
        check_pieces(offset, u64::MAX, &pieces)?;
        check_total(&pieces)?;
        Ok(PieceList {
            pieces,
            encoded: payload,
        })
    }

    /// (offset, length) of each piece, in order.
    pub fn pieces(&self) -> &[(u64, u32)] {
        &self.pieces
    }

    /// Where the first piece starts.
    pub fn offset(&self) -> u64 {
        self.pieces[0].0
    }

    /// The bytes the pieces hold together: the reply's length.
    pub fn bytes(&self) -> u32 {
        // At most MAX_PAYLOAD (`check_total`).
        self.pieces.iter().map(|&(_, n)| n).sum()
    }

    /// The payload bytes.
    pub fn encoded(&self) -> &Bytes {
        &self.encoded
    }
}

/// Each of `pieces` with its bytes, cut from the reply `data` to a read
/// at `offset`: the reply holds the span from `offset` (a READ), or the
/// pieces back to back (`back_to_back`: a READ_PIECES). The caller checked
/// the reply's length.
pub fn piece_slices<'a>(
    data: &'a Bytes,
    offset: u64,
    pieces: &'a [(u64, u32)],
    back_to_back: bool,
) -> impl Iterator<Item = (u64, Bytes)> + 'a {
    pieces.iter().scan(0usize, move |next, &(at, len)| {
        let from = if back_to_back {
            *next
        } else {
            (at - offset) as usize
        };
        *next = from + len as usize;
        Some((at, data.slice(from..*next)))
    })
}

/// Checks that `pieces` are 1 to [`MAX_PIECES`] non-empty, 4 KiB aligned,
/// sorted, disjoint ranges inside `[from, end)`.
pub(super) fn check_pieces(from: u64, end: u64, pieces: &[(u64, u32)]) -> Result<(), &'static str> {
    if pieces.is_empty() || pieces.len() > MAX_PIECES {
        return Err("a request needs 1 to 8192 pieces");
    }
    let mut cursor = from;
    for &(at, len) in pieces {
        if len == 0 || !at.is_multiple_of(ALIGN) || !u64::from(len).is_multiple_of(ALIGN) {
            return Err("a piece is empty or not 4 KiB aligned");
        }
        let piece_end = at
            .checked_add(u64::from(len))
            .ok_or("a piece wraps past the end of the address space")?;
        if at < cursor || piece_end > end {
            return Err("pieces overlap, are out of order or leave their span");
        }
        cursor = piece_end;
    }
    Ok(())
}

fn check_total(pieces: &[(u64, u32)]) -> Result<(), &'static str> {
    let total: u64 = pieces.iter().map(|&(_, n)| u64::from(n)).sum();
    if total > u64::from(MAX_PAYLOAD) {
        return Err("READ_PIECES reads more than 32 MiB");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_list_round_trips() {
        let pieces = vec![(1 << 20, 8192), ((1 << 30) + 65536, 4096)];
        let list = PieceList::new(pieces.clone()).unwrap();
        assert_eq!(list.encoded().len(), 2 * PIECE_LEN);
        let back = PieceList::decode(1 << 20, list.encoded().clone()).unwrap();
        assert_eq!(back, list);
        assert_eq!(back.pieces(), &pieces[..]);
        assert_eq!(back.bytes(), 12288);
        assert_eq!(back.offset(), 1 << 20);
    }

    #[test]
    fn bad_lists_are_refused() {
        assert!(PieceList::new(vec![]).is_err(), "no pieces");
        assert!(
            PieceList::new(vec![(8192, 4096), (0, 4096)]).is_err(),
            "out of order"
        );
        assert!(
            PieceList::new(vec![(0, 8192), (4096, 4096)]).is_err(),
            "overlap"
        );
        assert!(PieceList::new(vec![(512, 4096)]).is_err(), "unaligned");
        assert!(PieceList::new(vec![(0, 0)]).is_err(), "empty piece");
        assert!(
            PieceList::new(vec![(u64::MAX - 4095, 8192)]).is_err(),
            "wraps"
        );
        let too_much: Vec<(u64, u32)> = (0..2).map(|i| (i << 30, MAX_PAYLOAD / 2 + 4096)).collect();
        assert!(PieceList::new(too_much).is_err(), "more than 32 MiB");
        let too_many: Vec<(u64, u32)> = (0..MAX_PIECES as u64 + 1)
            .map(|i| (i * 8192, 4096))
            .collect();
        assert!(PieceList::new(too_many).is_err(), "too many pieces");
        let good = PieceList::new(vec![(4096, 4096)]).unwrap();
        assert!(
            PieceList::decode(0, good.encoded().clone()).is_err(),
            "the header's offset is not the first piece's"
        );
        let mut bad = good.encoded().to_vec();
        bad.truncate(bad.len() - 1);
        assert!(PieceList::decode(4096, bad.into()).is_err(), "truncated");
        assert!(PieceList::decode(0, Bytes::new()).is_err(), "empty payload");
    }

    proptest! {
        /// No payload makes decode panic.
        #[test]
        fn decode_never_panics(offset in any::<u64>(), bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = PieceList::decode(offset, Bytes::from(bytes));
        }
    }
}
