//! Byte-by-byte table tests and property tests of the NBD wire format.

use super::*;
use proptest::prelude::*;

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

#[test]
fn greeting_bytes() {
    let mut out = Vec::new();
    encode_greeting(&mut out, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
    assert_eq!(out, b"NBDMAGICIHAVEOPT\x00\x03");
    assert_eq!(out.len(), GREETING_LEN);
}

#[test]
fn client_flags() {
    assert_eq!(parse_client_flags(&[0, 0, 0]), Ok(None));
    assert_eq!(parse_client_flags(&[0, 0, 0, 3, 9]), Ok(Some((3, 4))));
    assert_eq!(parse_client_flags(&[0, 0, 0, 1]), Ok(Some((1, 4))));
    assert_eq!(
        parse_client_flags(&[0, 0, 0, 4]),
        Err(ProtoError::UnknownClientFlags(4))
    );
    assert_eq!(
        parse_client_flags(&[0x80, 0, 0, 0]),
        Err(ProtoError::UnknownClientFlags(0x8000_0000))
    );
}

#[test]
fn option_go_bytes() {
    let wire = hex("49484156454f5054 00000007 0000000e
         00000004 74657374 0002 0003 0001");
    let want = Opt::Go(InfoRequest {
        name: "test".into(),
        infos: vec![3, 1],
    });
    assert_eq!(parse_option(&wire), Ok(Some((want.clone(), wire.len()))));
    // Every strict prefix is incomplete, never an error.
    for n in 0..wire.len() {
        assert_eq!(parse_option(&wire[..n]), Ok(None), "prefix {n}");
    }
    // Extra bytes after the option are left for the next one.
    let mut more = wire.clone();
    more.extend_from_slice(b"IHAVEOPT");
    assert_eq!(parse_option(&more), Ok(Some((want, wire.len()))));
}

#[test]
fn option_framing_errors() {
    let bad = hex("4e42444d41474943 00000001 00000000");
    assert_eq!(
        parse_option(&bad),
        Err(ProtoError::BadMagic {
            expected: IHAVEOPT,
            got: NBDMAGIC
        })
    );
    // Bad magic is caught from the first 8 bytes.
    assert!(parse_option(&bad[..8]).is_err());
    let huge = hex("49484156454f5054 00000007 00010001");
    assert_eq!(
        parse_option(&huge),
        Err(ProtoError::OptionTooLong {
            option: 7,
            len: 65537
        })
    );
    let max = hex("49484156454f5054 00000007 00010000");
    assert_eq!(parse_option(&max), Ok(None));
}

#[test]
fn option_payloads() {
    let cases: Vec<(u32, Vec<u8>, Opt)> = vec![
        (1, b"test".to_vec(), Opt::ExportName("test".into())),
        (1, vec![], Opt::ExportName(String::new())),
        (
            1,
            vec![0xff],
            Opt::Invalid {
                code: 1,
                reason: "string is not UTF-8",
            },
        ),
        (
            1,
            b"a\0b".to_vec(),
            Opt::Invalid {
                code: 1,
                reason: "string contains NUL",
            },
        ),
        (2, vec![], Opt::Abort),
        (2, vec![1], Opt::Abort),
        (3, vec![], Opt::List),
        (
            3,
            vec![0],
            Opt::Invalid {
                code: 3,
                reason: "option takes no data",
            },
        ),
        (5, vec![], Opt::StartTls),
        (8, vec![], Opt::StructuredReply),
        (
            8,
            vec![1, 2],
            Opt::Invalid {
                code: 8,
                reason: "option takes no data",
            },
        ),
        (
            6,
            hex("00000000 0000"),
            Opt::Info(InfoRequest {
                name: String::new(),
                infos: vec![],
            }),
        ),
        (
            6,
            hex("00000005 7465"),
            Opt::Invalid {
                code: 6,
                reason: "string runs past the option",
            },
        ),
        (
            7,
            hex("00000000 0001"),
            Opt::Invalid {
                code: 7,
                reason: "truncated info request",
            },
        ),
        (
            7,
            hex("00000000 0000 00"),
            Opt::Invalid {
                code: 7,
                reason: "trailing bytes after info requests",
            },
        ),
        (
            10,
            hex("00000004 74657374 00000001 0000000f") // "test", 1 query of 15 bytes
                .into_iter()
                .chain(b"base:allocation".iter().copied())
                .collect(),
            Opt::SetMetaContext(MetaContextRequest {
                export: "test".into(),
                queries: vec!["base:allocation".into()],
            }),
        ),
        (
            9,
            hex("00000000 00000000"),
            Opt::ListMetaContext(MetaContextRequest {
                export: String::new(),
                queries: vec![],
            }),
        ),
        (
            9,
            hex("00000000 ffffffff"),
            Opt::Invalid {
                code: 9,
                reason: "truncated query length",
            },
        ),
        (
            10,
            hex("00002000"),
            Opt::Invalid {
                code: 10,
                reason: "string longer than 4096 bytes",
            },
        ),
        (11, vec![], Opt::Unknown { code: 11 }),
        (
            0xdead_beef,
            vec![1, 2, 3],
            Opt::Unknown { code: 0xdead_beef },
        ),
    ];
    for (code, data, want) in cases {
        let mut wire = Vec::new();
        encode_option(&mut wire, code, &data);
        assert_eq!(
            parse_option(&wire),
            Ok(Some((want.clone(), wire.len()))),
            "option {code}"
        );
        assert_eq!(want.code(), code);
    }
}

#[test]
fn request_bytes() {
    let wire = hex("25609513 0001 0001 0102030405060708 0000000000100000 00001000");
    let want = Request {
        handle: 0x0102_0304_0506_0708,
        cmd: Cmd::Write,
        flags: NBD_CMD_FLAG_FUA,
        offset: 0x10_0000,
        len: 4096,
    };
    assert_eq!(parse_request(&wire), Ok(Some((want, 28))));
    assert!(want.has(NBD_CMD_FLAG_FUA));
    assert!(!want.has(NBD_CMD_FLAG_NO_HOLE));
    for n in 0..wire.len() {
        assert_eq!(parse_request(&wire[..n]), Ok(None), "prefix {n}");
    }
    let mut out = Vec::new();
    encode_request(&mut out, &want);
    assert_eq!(out, wire);

    let bad = hex("67446698 0000 0000 0000000000000000 0000000000000000 00000000");
    assert_eq!(
        parse_request(&bad),
        Err(ProtoError::BadMagic {
            expected: 0x2560_9513,
            got: 0x6744_6698
        })
    );
    let unknown = hex("25609513 0000 00ff 0000000000000001 0000000000000000 00000000");
    assert_eq!(
        parse_request(&unknown).unwrap().unwrap().0.cmd,
        Cmd::Unknown(255)
    );
}

#[test]
fn command_codes() {
    let all = [
        (Cmd::Read, 0),
        (Cmd::Write, 1),
        (Cmd::Disc, 2),
        (Cmd::Flush, 3),
        (Cmd::Trim, 4),
        (Cmd::Cache, 5),
        (Cmd::WriteZeroes, 6),
        (Cmd::BlockStatus, 7),
        (Cmd::Resize, 8),
        (Cmd::Unknown(9), 9),
    ];
    for (cmd, code) in all {
        assert_eq!(Cmd::from_u16(code), cmd);
        assert_eq!(cmd.to_u16(), code);
    }
}

#[test]
fn option_reply_bytes() {
    let mut out = Vec::new();
    encode_option_reply(&mut out, NBD_OPT_GO, NBD_REP_ACK, &[]);
    assert_eq!(out, hex("0003e889045565a9 00000007 00000001 00000000"));

    out.clear();
    encode_option_reply(&mut out, 99, NBD_REP_ERR_UNSUP, b"no");
    assert_eq!(out, hex("0003e889045565a9 00000063 80000001 00000002 6e6f"));

    out.clear();
    encode_rep_server(&mut out, NBD_OPT_LIST, "ab");
    assert_eq!(
        out,
        hex("0003e889045565a9 00000003 00000002 00000006 00000002 6162")
    );

    out.clear();
    encode_info_export(&mut out, NBD_OPT_GO, 0x0400_0000, 0x0d6d);
    assert_eq!(
        out,
        hex("0003e889045565a9 00000007 00000003 0000000c 0000 0000000004000000 0d6d")
    );

    out.clear();
    encode_info_block_size(&mut out, NBD_OPT_INFO, 4096, 4096, 32 << 20);
    assert_eq!(
        out,
        hex("0003e889045565a9 00000006 00000003 0000000e 0003 00001000 00001000 02000000")
    );

    out.clear();
    encode_info_name(&mut out, NBD_OPT_GO, "t");
    assert_eq!(
        out,
        hex("0003e889045565a9 00000007 00000003 00000003 0001 74")
    );

    out.clear();
    encode_rep_meta_context(&mut out, NBD_OPT_SET_META_CONTEXT, 1, "base:allocation");
    let mut want = hex("0003e889045565a9 0000000a 00000004 00000013 00000001");
    want.extend_from_slice(b"base:allocation");
    assert_eq!(out, want);
}

#[test]
fn export_name_reply_bytes() {
    let mut out = Vec::new();
    encode_export_name_reply(&mut out, 1 << 20, 0x0101, true);
    assert_eq!(out, hex("0000000000100000 0101"));
    out.clear();
    encode_export_name_reply(&mut out, 1 << 20, 0x0101, false);
    assert_eq!(out.len(), 10 + 124);
    assert!(out[10..].iter().all(|&b| b == 0));
}

#[test]
fn transmission_reply_bytes() {
    let mut out = Vec::new();
    encode_simple_reply(&mut out, 0x1122_3344_5566_7788, NBD_EINVAL);
    assert_eq!(out, hex("67446698 00000016 1122334455667788"));
    assert_eq!(out.len(), SIMPLE_REPLY_LEN);

    out.clear();
    encode_offset_data_header(&mut out, 7, 0x2000, 4096, true);
    assert_eq!(
        out,
        hex("668e33ef 0001 0001 0000000000000007 00001008 0000000000002000")
    );

    out.clear();
    encode_structured_done(&mut out, 7);
    assert_eq!(out, hex("668e33ef 0001 0000 0000000000000007 00000000"));
    assert_eq!(out.len(), STRUCTURED_HEADER_LEN);

    out.clear();
    encode_structured_error(&mut out, 7, NBD_EIO, "bad");
    assert_eq!(
        out,
        hex("668e33ef 0001 8001 0000000000000007 00000009 00000005 0003 626164")
    );

    out.clear();
    let ext = [
        BlockDescriptor {
            len: 8192,
            flags: 0,
        },
        BlockDescriptor {
            len: 4096,
            flags: NBD_STATE_HOLE | NBD_STATE_ZERO,
        },
    ];
    encode_block_status(&mut out, 7, 1, &ext);
    assert_eq!(
        out,
        hex("668e33ef 0001 0005 0000000000000007 00000014 00000001
             00002000 00000000 00001000 00000003")
    );
}

#[test]
fn structured_error_message_is_cut_on_a_char_boundary() {
    let long = "é".repeat(3000); // 6000 bytes
    let mut out = Vec::new();
    encode_structured_error(&mut out, 1, NBD_EIO, &long);
    let msg_len = u16::from_be_bytes([out[24], out[25]]) as usize;
    assert!(msg_len <= MAX_STRING_LEN);
    assert_eq!(out.len(), STRUCTURED_HEADER_LEN + 6 + msg_len);
    assert!(std::str::from_utf8(&out[26..]).is_ok());
}

fn any_cmd() -> impl Strategy<Value = Cmd> {
    any::<u16>().prop_map(Cmd::from_u16)
}

fn any_request() -> impl Strategy<Value = Request> {
    (
        any::<u64>(),
        any_cmd(),
        any::<u16>(),
        any::<u64>(),
        any::<u32>(),
    )
        .prop_map(|(handle, cmd, flags, offset, len)| Request {
            handle,
            cmd,
            flags,
            offset,
            len,
        })
}

fn name() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9:/._é-]{0,40}"
}

proptest! {
    #[test]
    fn request_round_trips(req in any_request(), tail in proptest::collection::vec(any::<u8>(), 0..40)) {
        let mut wire = Vec::new();
        encode_request(&mut wire, &req);
        let n = wire.len();
        for cut in 0..n {
            prop_assert_eq!(parse_request(&wire[..cut]), Ok(None));
        }
        wire.extend_from_slice(&tail);
        prop_assert_eq!(parse_request(&wire), Ok(Some((req, n))));
    }

    #[test]
    fn info_request_round_trips(
        name in name(),
        infos in proptest::collection::vec(any::<u16>(), 0..20),
        go in any::<bool>(),
    ) {
        let req = InfoRequest { name, infos };
        let mut data = Vec::new();
        encode_info_request(&mut data, &req);
        let code = if go { NBD_OPT_GO } else { NBD_OPT_INFO };
        let mut wire = Vec::new();
        encode_option(&mut wire, code, &data);
        let want = if go { Opt::Go(req) } else { Opt::Info(req) };
        prop_assert_eq!(parse_option(&wire), Ok(Some((want, wire.len()))));
    }

    #[test]
    fn meta_request_round_trips(
        export in name(),
        queries in proptest::collection::vec(name(), 0..10),
        set in any::<bool>(),
    ) {
        let req = MetaContextRequest { export, queries };
        let mut data = Vec::new();
        encode_meta_request(&mut data, &req);
        let code = if set { NBD_OPT_SET_META_CONTEXT } else { NBD_OPT_LIST_META_CONTEXT };
        let mut wire = Vec::new();
        encode_option(&mut wire, code, &data);
        let want = if set { Opt::SetMetaContext(req) } else { Opt::ListMetaContext(req) };
        prop_assert_eq!(parse_option(&wire), Ok(Some((want, wire.len()))));
    }

    #[test]
    fn random_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = parse_client_flags(&b);
        let _ = parse_option(&b);
        let _ = parse_request(&b);
        if let Ok(Some((_, n))) = parse_option(&b) {
            prop_assert!(n <= b.len());
        }
    }

    #[test]
    fn random_option_payloads_never_panic(
        code in 0u32..16,
        data in proptest::collection::vec(any::<u8>(), 0..300),
    ) {
        let mut wire = Vec::new();
        encode_option(&mut wire, code, &data);
        let (opt, n) = parse_option(&wire).unwrap().unwrap();
        prop_assert_eq!(n, wire.len());
        prop_assert_eq!(opt.code(), code);
    }

    #[test]
    fn option_payloads_with_valid_framing_but_random_lengths_never_panic(
        code in prop_oneof![Just(NBD_OPT_GO), Just(NBD_OPT_INFO), Just(NBD_OPT_SET_META_CONTEXT), Just(NBD_OPT_LIST_META_CONTEXT)],
        words in proptest::collection::vec(prop_oneof![Just(0u32), Just(1), Just(4), Just(u32::MAX), any::<u32>()], 0..8),
    ) {
        let data: Vec<u8> = words.iter().flat_map(|w| w.to_be_bytes()).collect();
        let opt = parse_option_data(code, &data);
        prop_assert_eq!(opt.code(), code);
    }
}
