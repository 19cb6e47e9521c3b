//! The data wire codec: byte-exact tables, round trips of random valid
//! frames, and random bytes that must never panic.

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use strata_replica::wire::{
    decode_extents, encode_extents, Command, Op, PieceList, PullPlan, Reply, ReplyHeader, Request,
    RequestHeader, Status, WireError, MAX_PAYLOAD, REPLY_HEADER_LEN, REQUEST_HEADER_LEN,
};
use strata_replica::{Allocation, AllocationExtent};

/// A request header built field by field, independently of the encoder.
#[allow(clippy::too_many_arguments)]
fn raw_request(
    op: u8,
    flags: u16,
    id: u64,
    epoch: u64,
    offset: u64,
    length: u32,
    crc: u32,
    payload: &[u8],
) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&[0x51, 0x52, 0x54, 0x53]); // "QRTS": 0x5354_5251 little-endian
    b.push(1);
    b.push(op);
    b.extend_from_slice(&flags.to_le_bytes());
    b.extend_from_slice(&id.to_le_bytes());
    b.extend_from_slice(&epoch.to_le_bytes());
    b.extend_from_slice(&offset.to_le_bytes());
    b.extend_from_slice(&length.to_le_bytes());
    b.extend_from_slice(&crc.to_le_bytes());
    assert_eq!(b.len(), REQUEST_HEADER_LEN);
    b.extend_from_slice(payload);
    b
}

fn encode(req: &Request) -> Vec<u8> {
    let mut buf = BytesMut::new();
    req.encode_into(&mut buf);
    buf.to_vec()
}

fn req(id: u64, epoch: u64, command: Command) -> Request {
    Request { id, epoch, command }
}

#[test]
fn request_table_byte_by_byte() {
    let data = Bytes::from_static(b"0123456789abcdef");
    let crc = crc32fast::hash(&data);
    let hello_crc = crc32fast::hash(b"vol-1");
    let snap_crc = crc32fast::hash(b"s1");
    let table: Vec<(Request, Vec<u8>)> = vec![
        (
            req(
                1,
                7,
                Command::Hello {
                    volume: "vol-1".into(),
                },
            ),
            raw_request(1, 0, 1, 7, 0, 5, hello_crc, b"vol-1"),
        ),
        (
            req(
                2,
                7,
                Command::Read {
                    offset: 4096,
                    len: 8192,
                },
            ),
            raw_request(2, 0, 2, 7, 4096, 8192, 0, b""),
        ),
        (
            req(
                3,
                7,
                Command::Write {
                    offset: 1 << 40,
                    data: data.clone(),
                    fua: true,
                },
            ),
            raw_request(3, 1, 3, 7, 1 << 40, 16, crc, &data),
        ),
        (
            req(
                4,
                7,
                Command::Write {
                    offset: 0,
                    data: data.clone(),
                    fua: false,
                },
            ),
            raw_request(3, 0, 4, 7, 0, 16, crc, &data),
        ),
        (
            req(5, 0, Command::Flush),
            raw_request(4, 0, 5, 0, 0, 0, 0, b""),
        ),
        (
            req(
                6,
                1,
                Command::Trim {
                    offset: 8192,
                    len: u32::MAX,
                },
            ),
            raw_request(5, 0, 6, 1, 8192, u32::MAX, 0, b""),
        ),
        (
            req(
                7,
                1,
                Command::WriteZeroes {
                    offset: 0,
                    len: 4096,
                    no_hole: true,
                },
            ),
            raw_request(6, 2, 7, 1, 0, 4096, 0, b""),
        ),
        (
            req(
                8,
                1,
                Command::WriteZeroes {
                    offset: 0,
                    len: 4096,
                    no_hole: false,
                },
            ),
            raw_request(6, 0, 8, 1, 0, 4096, 0, b""),
        ),
        (
            req(
                9,
                1,
                Command::BlockStatus {
                    offset: 0,
                    len: 1 << 20,
                },
            ),
            raw_request(7, 0, 9, 1, 0, 1 << 20, 0, b""),
        ),
        (
            req(10, 1, Command::Snapshot { name: "s1".into() }),
            raw_request(8, 0, 10, 1, 0, 2, snap_crc, b"s1"),
        ),
        (
            req(u64::MAX, u64::MAX, Command::Ping),
            raw_request(9, 0, u64::MAX, u64::MAX, 0, 0, 0, b""),
        ),
    ];
    for (request, bytes) in table {
        assert_eq!(encode(&request), bytes, "encoding {request:?}");
        assert_eq!(Request::check(&bytes), Ok(Some(bytes.len())));
        assert_eq!(Request::decode(&bytes), Ok((request.clone(), bytes.len())));
        // Every strict prefix is incomplete, never an error.
        for cut in 0..bytes.len() {
            assert_eq!(
                Request::check(&bytes[..cut]),
                Ok(None),
                "{request:?} cut at {cut}"
            );
            assert_eq!(Request::decode(&bytes[..cut]), Err(WireError::Incomplete));
        }
        // A trailing frame does not change the result.
        let mut two = bytes.clone();
        two.extend_from_slice(&bytes);
        assert_eq!(Request::decode(&two), Ok((request.clone(), bytes.len())));
        let mut buf = BytesMut::from(&two[..]);
        assert_eq!(Request::decode_from(&mut buf), Ok(Some(request.clone())));
        assert_eq!(Request::decode_from(&mut buf), Ok(Some(request.clone())));
        assert!(buf.is_empty());
    }
}

#[test]
fn request_errors() {
    // Framing errors: the stream is unusable.
    let mut bad_magic = raw_request(9, 0, 1, 0, 0, 0, 0, b"");
    bad_magic[0] ^= 1;
    assert!(matches!(
        Request::decode(&bad_magic),
        Err(WireError::BadMagic(_))
    ));
    // Detected from the first 4 bytes already.
    assert!(matches!(
        Request::check(&bad_magic[..4]),
        Err(WireError::BadMagic(_))
    ));
    let mut bad_version = raw_request(9, 0, 1, 0, 0, 0, 0, b"");
    bad_version[4] = 2;
    assert_eq!(
        Request::check(&bad_version[..5]),
        Err(WireError::BadVersion(2))
    );
    for op in [0u8, 12, 255] {
        let e = Request::decode(&raw_request(op, 0, 42, 0, 0, 0, 0, b"")).unwrap_err();
        assert_eq!(e, WireError::UnknownOp { op, request_id: 42 });
        assert!(e.is_fatal());
    }
    let huge = raw_request(3, 0, 43, 0, 0, MAX_PAYLOAD + 1, 0, b"");
    let e = Request::check(&huge).unwrap_err();
    assert_eq!(
        e,
        WireError::TooLarge {
            len: MAX_PAYLOAD + 1,
            request_id: 43
        }
    );
    assert!(e.is_fatal());
    assert_eq!(e.request_id(), Some(43));
    // A READ may name a long range in the header; it is refused as content.
    let long_read = raw_request(2, 0, 44, 0, 0, MAX_PAYLOAD + 1, 0, b"");
    assert!(matches!(
        Request::decode(&long_read),
        Err(WireError::Invalid {
            request_id: 44,
            frame_len: 40,
            ..
        })
    ));

    // Content errors: the frame is skipped, the stream goes on.
    let data = b"abcd";
    let bad_crc = raw_request(3, 0, 50, 0, 0, 4, crc32fast::hash(data) ^ 1, data);
    let e = Request::decode(&bad_crc).unwrap_err();
    assert!(matches!(
        e,
        WireError::BadPayloadCrc {
            request_id: 50,
            frame_len: 44,
            ..
        }
    ));
    assert!(!e.is_fatal());
    let mut buf = BytesMut::from(&bad_crc[..]);
    buf.extend_from_slice(&raw_request(9, 0, 51, 0, 0, 0, 0, b""));
    assert!(Request::decode_from(&mut buf).is_err());
    assert_eq!(
        Request::decode_from(&mut buf),
        Ok(Some(req(51, 0, Command::Ping)))
    );

    let cases: Vec<(Vec<u8>, &str)> = vec![
        (raw_request(3, 2, 60, 0, 0, 0, 0, b""), "NO_HOLE on WRITE"),
        (
            raw_request(6, 1, 60, 0, 0, 4096, 0, b""),
            "FUA on WRITE_ZEROES",
        ),
        (
            raw_request(2, 0x8000, 60, 0, 0, 4096, 0, b""),
            "unknown flag",
        ),
        (
            raw_request(3, 4, 60, 0, 0, 0, 0, b""),
            "DROP_CACHE on WRITE",
        ),
        (
            raw_request(10, 0, 60, 0, 0, 3, crc32fast::hash(b"abc"), b"abc"),
            "a PULL plan too short",
        ),
        (
            raw_request(4, 0, 60, 0, 4096, 0, 0, b""),
            "FLUSH with an offset",
        ),
        (
            raw_request(9, 0, 60, 0, 0, 4096, 0, b""),
            "PING with a length",
        ),
        (
            raw_request(2, 0, 60, 0, 0, 4096, 1, b""),
            "crc without a payload",
        ),
        (
            raw_request(
                1,
                0,
                60,
                0,
                0,
                2,
                crc32fast::hash(&[0xff, 0xfe]),
                &[0xff, 0xfe],
            ),
            "non-UTF-8 name",
        ),
        (
            raw_request(
                8,
                0,
                60,
                0,
                0,
                256,
                crc32fast::hash(&[b'a'; 256]),
                &[b'a'; 256],
            ),
            "256-byte name",
        ),
        (
            raw_request(8, 0, 60, 0, 4096, 1, crc32fast::hash(b"a"), b"a"),
            "SNAPSHOT with an offset",
        ),
    ];
    for (bytes, what) in cases {
        let e = Request::decode(&bytes).unwrap_err();
        assert_eq!(e.request_id(), Some(60), "{what}");
        assert_eq!(e.frame_len(), Some(bytes.len()), "{what}");
    }
}

#[test]
fn reply_table_byte_by_byte() {
    let data = Bytes::from_static(b"some data");
    let reply = Reply::with_payload(9, 5, Status::Ok, data.clone());
    let mut want = vec![0x50, 0x52, 0x54, 0x53, 1, 0, 0, 0];
    want.extend_from_slice(&9u64.to_le_bytes());
    want.extend_from_slice(&5u64.to_le_bytes());
    want.extend_from_slice(&9u32.to_le_bytes());
    want.extend_from_slice(&crc32fast::hash(&data).to_le_bytes());
    assert_eq!(want.len(), REPLY_HEADER_LEN);
    want.extend_from_slice(&data);
    let mut buf = BytesMut::new();
    reply.encode_into(&mut buf);
    assert_eq!(&buf[..], &want[..]);
    assert_eq!(Reply::decode(&want), Ok((reply.clone(), want.len())));
    for cut in 0..want.len() {
        assert_eq!(Reply::check(&want[..cut]), Ok(None));
    }

    let statuses = [
        (Status::Ok, 0u8),
        (Status::IoError, 1),
        (Status::Invalid, 2),
        (Status::StaleEpoch, 3),
        (Status::EpochAhead, 4),
        (Status::NoVolume, 5),
        (Status::Corrupt, 6),
        (Status::BadPayload, 7),
        (Status::NotBound, 8),
        (Status::PeerFailed, 9),
    ];
    for (status, code) in statuses {
        let r = Reply::error(1, 2, status, "why");
        let bytes = r.header().encode();
        assert_eq!(bytes[5], code);
        assert_eq!(Status::from_u8(code), Some(status));
        let mut full = bytes.to_vec();
        full.extend_from_slice(b"why");
        let (back, _) = Reply::decode(&full).unwrap();
        assert_eq!(back.message(), "why");
        assert_eq!(back.status, status);
    }

    // Unknown status: skippable; bad crc: skippable; huge: fatal.
    let mut unknown = Reply::ok(3, 0).header().encode();
    unknown[5] = 99;
    let e = Reply::decode(&unknown).unwrap_err();
    assert_eq!((e.request_id(), e.frame_len()), (Some(3), Some(32)));
    let mut bad_crc = reply.header().encode().to_vec();
    bad_crc.extend_from_slice(b"some dat!");
    assert!(matches!(
        Reply::decode(&bad_crc),
        Err(WireError::BadPayloadCrc { request_id: 9, .. })
    ));
    let mut huge = ReplyHeader {
        status: Status::Ok,
        request_id: 4,
        epoch: 0,
        length: MAX_PAYLOAD + 1,
        payload_crc: 0,
    }
    .encode();
    assert!(Reply::check(&huge).unwrap_err().is_fatal());
    huge[0] = 0;
    assert!(matches!(Reply::check(&huge), Err(WireError::BadMagic(_))));
}

#[test]
fn extents_byte_by_byte() {
    let extents = vec![
        AllocationExtent {
            offset: 0,
            len: 4096,
            kind: Allocation::Data,
        },
        AllocationExtent {
            offset: 4096,
            len: 1 << 33,
            kind: Allocation::Hole,
        },
    ];
    let bytes = encode_extents(&extents);
    let mut want = Vec::new();
    want.extend_from_slice(&0u64.to_le_bytes());
    want.extend_from_slice(&4096u64.to_le_bytes());
    want.push(0);
    want.extend_from_slice(&4096u64.to_le_bytes());
    want.extend_from_slice(&(1u64 << 33).to_le_bytes());
    want.push(1);
    assert_eq!(&bytes[..], &want[..]);
    assert_eq!(decode_extents(&bytes), Some(extents));
    assert_eq!(decode_extents(&bytes[..20]), None);
    want[16] = 2;
    assert_eq!(decode_extents(&want), None);
}

#[test]
fn op_codes_are_stable() {
    for (op, code) in [
        (Op::Hello, 1u8),
        (Op::Read, 2),
        (Op::Write, 3),
        (Op::Flush, 4),
        (Op::Trim, 5),
        (Op::WriteZeroes, 6),
        (Op::BlockStatus, 7),
        (Op::Snapshot, 8),
        (Op::Ping, 9),
        (Op::Pull, 10),
        (Op::ReadPieces, 11),
    ] {
        assert_eq!(op as u8, code);
        assert_eq!(Op::from_u8(code), Some(op));
    }
}

fn name() -> impl Strategy<Value = String> {
    proptest::string::string_regex("[a-zA-Zé0-9._-]{0,80}").unwrap()
}

fn command() -> impl Strategy<Value = Command> {
    prop_oneof![
        name().prop_map(|volume| Command::Hello { volume }),
        (any::<u64>(), 0..=MAX_PAYLOAD).prop_map(|(offset, len)| Command::Read { offset, len }),
        (any::<u64>(), 0..=MAX_PAYLOAD)
            .prop_map(|(offset, len)| Command::ReadForCopy { offset, len }),
        (
            0u64..1 << 30,
            1u32..64,
            any::<[bool; 3]>(),
            any::<[u8; 4]>(),
            1u16..
        )
            .prop_map(
                |(block, blocks, [drop_cache, encrypt, piecewise], ip, port)| {
                    let offset = block * 4096;
                    let span = blocks * 4096;
                    // Every other block of the span.
                    let pieces = (0..blocks)
                        .step_by(2)
                        .map(|b| (offset + u64::from(b) * 4096, 4096))
                        .collect();
                    let source = std::net::SocketAddr::from((ip.map(|b| b | 1), port));
                    let plan = PullPlan::new(
                        offset,
                        source,
                        std::time::Duration::from_millis(u64::from(port)),
                        drop_cache,
                        encrypt,
                        span,
                        pieces,
                    )
                    .unwrap();
                    let plan = if piecewise {
                        plan.read_as_pieces()
                    } else {
                        plan
                    };
                    Command::Pull { offset, plan }
                }
            ),
        (
            proptest::collection::vec((1u64..64, 1u32..16), 1..40),
            any::<bool>()
        )
            .prop_map(|(steps, for_copy)| {
                // Each piece a few blocks past the end of the one before.
                let mut at = 0u64;
                let pieces = steps
                    .into_iter()
                    .map(|(gap, blocks)| {
                        at += gap * 4096;
                        let piece = (at, blocks * 4096);
                        at += u64::from(blocks) * 4096;
                        piece
                    })
                    .collect();
                Command::ReadPieces {
                    pieces: PieceList::new(pieces).unwrap(),
                    for_copy,
                }
            }),
        (
            any::<u64>(),
            proptest::collection::vec(any::<u8>(), 0..3000),
            any::<bool>()
        )
            .prop_map(|(offset, data, fua)| Command::Write {
                offset,
                data: Bytes::from(data),
                fua
            }),
        Just(Command::Flush),
        (any::<u64>(), any::<u32>()).prop_map(|(offset, len)| Command::Trim { offset, len }),
        (any::<u64>(), any::<u32>(), any::<bool>()).prop_map(|(offset, len, no_hole)| {
            Command::WriteZeroes {
                offset,
                len,
                no_hole,
            }
        }),
        (any::<u64>(), any::<u32>()).prop_map(|(offset, len)| Command::BlockStatus { offset, len }),
        name().prop_map(|name| Command::Snapshot { name }),
        Just(Command::Ping),
    ]
}

fn status() -> impl Strategy<Value = Status> {
    (0u8..=9).prop_map(|s| Status::from_u8(s).unwrap())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn request_round_trip(id in any::<u64>(), epoch in any::<u64>(), command in command()) {
        let request = Request { id, epoch, command };
        let bytes = encode(&request);
        prop_assert_eq!(bytes.len(), request.header().frame_len());
        prop_assert_eq!(Request::decode(&bytes), Ok((request.clone(), bytes.len())));
        let mut buf = BytesMut::from(&bytes[..]);
        prop_assert_eq!(Request::decode_from(&mut buf), Ok(Some(request)));
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn reply_round_trip(id in any::<u64>(), epoch in any::<u64>(), status in status(),
                        payload in proptest::collection::vec(any::<u8>(), 0..3000)) {
        let reply = Reply::with_payload(id, epoch, status, Bytes::from(payload));
        let mut buf = BytesMut::new();
        reply.encode_into(&mut buf);
        prop_assert_eq!(Reply::decode(&buf), Ok((reply.clone(), buf.len())));
        prop_assert_eq!(Reply::decode_from(&mut buf), Ok(Some(reply)));
        prop_assert!(buf.is_empty());
    }

    /// Random bytes, and valid frames with random bytes flipped, never
    /// panic; whatever decodes consumes no more than it was given.
    #[test]
    fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200),
                            command in command(), flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..4)) {
        for input in [bytes.clone(), {
            let mut b = encode(&Request { id: 1, epoch: 2, command });
            for (at, x) in &flips {
                let n = b.len();
                b[at % n] ^= x;
            }
            b
        }] {
            if let Ok((_, n)) = Request::decode(&input) {
                prop_assert!(n <= input.len());
            }
            if let Ok((_, n)) = Reply::decode(&input) {
                prop_assert!(n <= input.len());
            }
            let _ = Request::check(&input);
            let _ = Reply::check(&input);
            let mut buf = BytesMut::from(&input[..]);
            while let Ok(Some(_)) | Err(WireError::Invalid { .. } | WireError::BadPayloadCrc { .. }) = Request::decode_from(&mut buf) {}
            let mut buf = BytesMut::from(&input[..]);
            while let Ok(Some(_)) | Err(WireError::Invalid { .. } | WireError::BadPayloadCrc { .. }) = Reply::decode_from(&mut buf) {}
        }
    }

    /// The header parser agrees with the frame length of the encoder.
    #[test]
    fn header_frame_len(command in command()) {
        let request = Request { id: 1, epoch: 1, command };
        let bytes = encode(&request);
        let h = RequestHeader::parse(&bytes).unwrap().unwrap();
        prop_assert_eq!(h.frame_len(), bytes.len());
    }
}
