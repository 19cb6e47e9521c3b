//! PULL's payload: what a syncing replica copies from a peer itself.
//!
//! A rebuild used to carry every byte source replica → controller → target
//! replica. With PULL the controller still plans the copy (from both
//! replicas' block status, under the range's lock) but hands each read to
//! the target: "read `[offset, offset + span)` from the replica at
//! `source` and write these pieces of it". The bytes cross the network
//! once and the controller's CPU not at all.
//!
//! ```text
//! 0  flags u8 (bit 0: the source drops what the read brought into its page cache;
//!    bit 1: the target encrypts its connection to the source, as the controller's are;
//!    bit 2: the target reads only the pieces, in one READ_PIECES, not the whole span)
//! 1  family u8 (4 or 6)   2 address [u8; 16] (IPv4 in the first 4)   18 port u16
//! 20 timeout_ms u32 (the target's deadline for connecting to and reading from the source)
//! 24 span u32 (bytes read from the source at the header's offset)
//! 28 pieces u32, then `pieces` × (offset u64, len u32): the parts of the span
//!    written on the target; sorted, disjoint, 4 KiB aligned, inside the span.
//! ```

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};

use super::pieces::{check_pieces, MAX_PIECES, PIECE_LEN};
use super::{u16_at, u32_at, u64_at, MAX_PAYLOAD};

/// Bytes before the pieces.
const FIXED_LEN: usize = 32;
const FLAG_DROP_CACHE: u8 = 1;
const FLAG_ENCRYPT: u8 = 2;
const FLAG_PIECEWISE: u8 = 4;
const ALIGN: u64 = 4096;

/// A validated PULL: where to read, what to write. Keeps its encoding, which
/// is the request's payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullPlan {
    pub source: SocketAddr,
    /// The target's deadline for each step against the source.
    pub timeout: Duration,
    /// Ask the source to drop the pages its read brought into its cache
    /// (READ's [`super::FLAG_DROP_CACHE`]; a source that does not know the
    /// flag refuses the read).
    pub drop_cache: bool,
    /// Encrypt the connection to the source (the controller encrypts its
    /// own: `--encrypt-replica-wire`); a target without the cluster key
    /// cannot, and says PEER_FAILED.
    pub encrypt: bool,
    /// Read only the pieces from the source, in one
    /// [`Command::ReadPieces`](super::Command::ReadPieces), rather than
    /// the whole span with the holes between them (set by
    /// [`PullPlan::read_as_pieces`]; both replicas must know READ_PIECES).
    pub piecewise: bool,
    /// Bytes from the request's offset to the end of the last piece: read
    /// from the source whole unless `piecewise`.
    pub span: u32,
    /// (offset, len) written on the target.
    pub pieces: Vec<(u64, u32)>,
    encoded: Bytes,
}

impl PullPlan {
    /// A plan for a read of `span` bytes at `offset`, or why it is not one
    /// a replica accepts.
    pub fn new(
        offset: u64,
        source: SocketAddr,
        timeout: Duration,
        drop_cache: bool,
        encrypt: bool,
        span: u32,
        pieces: Vec<(u64, u32)>,
    ) -> Result<PullPlan, &'static str> {
        check(offset, span, &pieces)?;
        let mut b = BytesMut::with_capacity(FIXED_LEN + pieces.len() * PIECE_LEN);
        let flags =
            if drop_cache { FLAG_DROP_CACHE } else { 0 } | if encrypt { FLAG_ENCRYPT } else { 0 };
        b.put_u8(flags);
        let mut ip = [0u8; 16];
        match source.ip() {
            IpAddr::V4(v4) => {
                b.put_u8(4);
                ip[..4].copy_from_slice(&v4.octets());
            }
            IpAddr::V6(v6) => {
                b.put_u8(6);
                ip.copy_from_slice(&v6.octets());
            }
        }
        b.put_slice(&ip);
        b.put_u16_le(source.port());
        b.put_u32_le(u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX));
        b.put_u32_le(span);
        b.put_u32_le(pieces.len() as u32);
        for &(at, len) in &pieces {
            b.put_u64_le(at);
            b.put_u32_le(len);
        }
        Ok(PullPlan {
            source,
            timeout,
            drop_cache,
            encrypt,
            piecewise: false,
            span,
            pieces,
            encoded: b.freeze(),
        })
    }

    /// This plan, with the target reading only the pieces from the source.
    pub fn read_as_pieces(mut self) -> PullPlan {
        let mut b = BytesMut::from(&self.encoded[..]);
        b[0] |= FLAG_PIECEWISE;
        self.encoded = b.freeze();
        self.piecewise = true;
        self
    }

    /// Parses and checks a PULL payload for a request at `offset`.
    pub fn decode(offset: u64, payload: Bytes) -> Result<PullPlan, &'static str> {
        if payload.len() < FIXED_LEN {
            return Err("PULL payload shorter than its fixed part");
        }
        let flags = payload[0];
        if flags & !(FLAG_DROP_CACHE | FLAG_ENCRYPT | FLAG_PIECEWISE) != 0 {
            return Err("PULL flags not defined");
        }
        let raw: [u8; 16] = payload[2..18].try_into().expect("16 bytes");
        let ip = match payload[1] {
            4 => IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3])),
            6 => IpAddr::V6(Ipv6Addr::from(raw)),
            _ => return Err("PULL source address family is not 4 or 6"),
        };
        let source = SocketAddr::new(ip, u16_at(&payload, 18));
        let timeout = Duration::from_millis(u64::from(u32_at(&payload, 20)));
        let span = u32_at(&payload, 24);
        let count = u32_at(&payload, 28) as usize;
        if count > MAX_PIECES {
            return Err("PULL names too many pieces");
        }
        if payload.len() != FIXED_LEN + count * PIECE_LEN {
            return Err("PULL payload length does not match its piece count");
        }
        let pieces: Vec<(u64, u32)> = (0..count)
            .map(|i| {
                let at = FIXED_LEN + i * PIECE_LEN;
                (u64_at(&payload, at), u32_at(&payload, at + 8))
            })
            .collect();
        check(offset, span, &pieces)?;
        if source.port() == 0 || source.ip().is_unspecified() {
            return Err("PULL source address is not an address to connect to");
        }
        Ok(PullPlan {
            source,
            timeout,
            drop_cache: flags & FLAG_DROP_CACHE != 0,
            encrypt: flags & FLAG_ENCRYPT != 0,
            piecewise: flags & FLAG_PIECEWISE != 0,
            span,
            pieces,
            encoded: payload,
        })
    }

    /// The payload bytes.
    pub fn encoded(&self) -> &Bytes {
        &self.encoded
    }

    /// Bytes the pieces write.
    pub fn bytes(&self) -> u64 {
        self.pieces.iter().map(|&(_, n)| u64::from(n)).sum()
    }

    /// Bytes the target reads from the source: the pieces' if
    /// `piecewise`, else the whole span.
    pub fn read_len(&self) -> u64 {
        if self.piecewise {
            self.bytes()
        } else {
            u64::from(self.span)
        }
    }
}

fn check(offset: u64, span: u32, pieces: &[(u64, u32)]) -> Result<(), &'static str> {
    if span == 0 || span > MAX_PAYLOAD {
        return Err("PULL span is empty or longer than 32 MiB");
    }
    if !offset.is_multiple_of(ALIGN) || !u64::from(span).is_multiple_of(ALIGN) {
        return Err("PULL span is not 4 KiB aligned");
    }
    let end = offset
        .checked_add(u64::from(span))
        .ok_or("PULL span wraps")?;
    check_pieces(offset, end, pieces)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn addr() -> SocketAddr {
        "10.1.2.3:10810".parse().unwrap()
    }

    #[test]
    fn a_plan_round_trips() {
        let pieces = vec![(1 << 20, 8192), ((1 << 20) + 65536, 4096)];
        let plan = PullPlan::new(
            1 << 20,
            addr(),
            Duration::from_secs(9),
            true,
            true,
            69632,
            pieces.clone(),
        )
        .unwrap();
        let back = PullPlan::decode(1 << 20, plan.encoded().clone()).unwrap();
        assert_eq!(back, plan);
        assert_eq!(back.pieces, pieces);
        assert_eq!(back.bytes(), 12288);
        assert!(!back.piecewise);
        assert_eq!(back.read_len(), 69632, "the whole span is read");
        let piecewise = plan.read_as_pieces();
        let back = PullPlan::decode(1 << 20, piecewise.encoded().clone()).unwrap();
        assert_eq!(back, piecewise);
        assert!(back.piecewise && back.drop_cache && back.encrypt);
        assert_eq!(back.read_len(), 12288, "only the pieces are read");
        let v6: SocketAddr = "[fd00::7]:10810".parse().unwrap();
        let plan = PullPlan::new(
            0,
            v6,
            Duration::from_millis(1),
            false,
            false,
            4096,
            vec![(0, 4096)],
        )
        .unwrap();
        assert_eq!(
            PullPlan::decode(0, plan.encoded().clone()).unwrap().source,
            v6
        );
    }

    #[test]
    fn bad_plans_are_refused() {
        let t = Duration::from_secs(1);
        let new =
            |offset, span, pieces| PullPlan::new(offset, addr(), t, false, false, span, pieces);
        assert!(new(0, 8192, vec![(4096, 8192)]).is_err(), "leaves the span");
        assert!(
            new(0, 8192, vec![(4096, 4096), (0, 4096)]).is_err(),
            "out of order"
        );
        assert!(new(0, 8192, vec![(0, 4096), (0, 4096)]).is_err(), "overlap");
        assert!(new(0, 8192, vec![(512, 4096)]).is_err(), "unaligned");
        assert!(new(0, 8192, vec![]).is_err(), "no pieces");
        assert!(
            new(100, 8192, vec![(100, 4096)]).is_err(),
            "unaligned offset"
        );
        assert!(
            new(0, MAX_PAYLOAD + 4096, vec![(0, 4096)]).is_err(),
            "too long"
        );
        let good = new(0, 8192, vec![(0, 8192)]).unwrap();
        // The same payload at another offset leaves the span.
        assert!(PullPlan::decode(1 << 20, good.encoded().clone()).is_err());
        let mut bad = good.encoded().to_vec();
        bad[1] = 5;
        assert!(PullPlan::decode(0, bad.into()).is_err(), "family");
        let mut bad = good.encoded().to_vec();
        bad[2..6].fill(0);
        assert!(PullPlan::decode(0, bad.into()).is_err(), "0.0.0.0");
        let mut bad = good.encoded().to_vec();
        bad.truncate(bad.len() - 1);
        assert!(PullPlan::decode(0, bad.into()).is_err(), "truncated");
    }

    proptest! {
        /// No payload makes decode panic.
        #[test]
        fn decode_never_panics(offset in any::<u64>(), bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = PullPlan::decode(offset, Bytes::from(bytes));
        }
    }
}
