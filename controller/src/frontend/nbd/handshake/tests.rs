//! Tests of the option logic ([`answer`]) and of the handshake over a pipe.

use super::*;

fn facts() -> ExportFacts {
    ExportFacts {
        name: "test".into(),
        size: 1 << 20,
    }
}

/// Splits option replies into (option, type, data).
fn replies(mut b: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
    let mut v = Vec::new();
    while !b.is_empty() {
        assert_eq!(&b[..8], &OPT_REPLY_MAGIC.to_be_bytes());
        let opt = u32::from_be_bytes(b[8..12].try_into().unwrap());
        let kind = u32::from_be_bytes(b[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(b[16..20].try_into().unwrap()) as usize;
        v.push((opt, kind, b[20..20 + len].to_vec()));
        b = &b[20 + len..];
    }
    v
}

fn meta(export: &str, queries: &[&str]) -> MetaContextRequest {
    MetaContextRequest {
        export: export.into(),
        queries: queries.iter().map(|q| q.to_string()).collect(),
    }
}

#[test]
fn go_sends_export_block_size_name_ack() {
    let mut n = Negotiation::default();
    let mut out = Vec::new();
    let go = Opt::Go(InfoRequest {
        name: "".into(),
        infos: vec![NBD_INFO_NAME],
    });
    let next = answer(&go, &mut n, &facts(), &mut out);
    let flags = transmission_flags(false);
    assert_eq!(
        next,
        Next::Transmit(Session {
            structured: false,
            base_allocation: false,
            flags
        })
    );
    let r = replies(&out);
    let kinds: Vec<u32> = r.iter().map(|x| x.1).collect();
    assert_eq!(
        kinds,
        [NBD_REP_INFO, NBD_REP_INFO, NBD_REP_INFO, NBD_REP_ACK]
    );
    let mut export = vec![0, 0];
    export.extend_from_slice(&(1u64 << 20).to_be_bytes());
    export.extend_from_slice(&flags.to_be_bytes());
    assert_eq!(r[0].2, export);
    assert_eq!(r[1].2, [0, 3, 0, 0, 0x10, 0, 0, 0, 0x10, 0, 2, 0, 0, 0]);
    assert_eq!(r[2].2, b"\0\x01test");
    assert!(r.iter().all(|x| x.0 == NBD_OPT_GO));
}

#[test]
fn flags_advertise_multi_conn_and_zeroes() {
    let f = transmission_flags(false);
    for bit in [
        NBD_FLAG_HAS_FLAGS,
        NBD_FLAG_SEND_FLUSH,
        NBD_FLAG_SEND_FUA,
        NBD_FLAG_SEND_TRIM,
        NBD_FLAG_SEND_WRITE_ZEROES,
        NBD_FLAG_SEND_FAST_ZERO,
        NBD_FLAG_CAN_MULTI_CONN,
    ] {
        assert_ne!(f & bit, 0, "bit {bit:#x}");
    }
    assert_eq!(f & (NBD_FLAG_READ_ONLY | NBD_FLAG_SEND_DF), 0);
    assert_ne!(transmission_flags(true) & NBD_FLAG_SEND_DF, 0);
}

#[test]
fn unknown_export_is_an_error_reply_for_go_and_a_close_for_export_name() {
    let mut n = Negotiation::default();
    let mut out = Vec::new();
    let info = Opt::Info(InfoRequest {
        name: "nope".into(),
        infos: vec![],
    });
    assert_eq!(answer(&info, &mut n, &facts(), &mut out), Next::Continue);
    assert_eq!(replies(&out)[0].1, NBD_REP_ERR_UNKNOWN);
    out.clear();
    let next = answer(&Opt::ExportName("nope".into()), &mut n, &facts(), &mut out);
    assert_eq!(next, Next::Fail("nope".into()));
    assert!(out.is_empty());
}

#[test]
fn export_name_reply_honours_no_zeroes() {
    for (no_zeroes, len) in [(true, 10), (false, 134)] {
        let mut n = Negotiation {
            no_zeroes,
            ..Default::default()
        };
        let mut out = Vec::new();
        let next = answer(&Opt::ExportName("test".into()), &mut n, &facts(), &mut out);
        assert!(matches!(next, Next::Transmit(_)));
        assert_eq!(out.len(), len);
    }
}

#[test]
fn meta_context_needs_structured_replies_and_selects_base_allocation() {
    let mut n = Negotiation::default();
    let mut out = Vec::new();
    let set = Opt::SetMetaContext(meta("test", &[BASE_ALLOCATION]));
    answer(&set, &mut n, &facts(), &mut out);
    assert_eq!(replies(&out)[0].1, NBD_REP_ERR_INVALID);
    assert!(!n.base_allocation);

    out.clear();
    answer(&Opt::StructuredReply, &mut n, &facts(), &mut out);
    assert_eq!(
        replies(&out),
        [(NBD_OPT_STRUCTURED_REPLY, NBD_REP_ACK, vec![])]
    );

    out.clear();
    answer(&set, &mut n, &facts(), &mut out);
    let r = replies(&out);
    assert_eq!(r.len(), 2);
    assert_eq!(r[0].1, NBD_REP_META_CONTEXT);
    assert_eq!(&r[0].2[..4], &BASE_ALLOCATION_ID.to_be_bytes());
    assert_eq!(&r[0].2[4..], BASE_ALLOCATION.as_bytes());
    assert_eq!(r[1].1, NBD_REP_ACK);
    assert!(n.base_allocation);

    // A later SET without base:allocation deselects it.
    out.clear();
    answer(
        &Opt::SetMetaContext(meta("", &["qemu:dirty-bitmap:x"])),
        &mut n,
        &facts(),
        &mut out,
    );
    assert_eq!(replies(&out).len(), 1);
    assert!(!n.base_allocation);

    // LIST with no query lists everything; with a foreign one, nothing.
    for (queries, count) in [(&[][..], 2), (&["base:"][..], 2), (&["x-foo:"][..], 1)] {
        out.clear();
        answer(
            &Opt::ListMetaContext(meta("test", queries)),
            &mut n,
            &facts(),
            &mut out,
        );
        assert_eq!(replies(&out).len(), count, "{queries:?}");
    }
    assert!(!n.base_allocation, "LIST selects nothing");
}

#[test]
fn other_options() {
    let mut n = Negotiation::default();
    let cases = [
        (Opt::List, vec![NBD_REP_SERVER, NBD_REP_ACK], Next::Continue),
        (Opt::Abort, vec![NBD_REP_ACK], Next::Close),
        (Opt::StartTls, vec![NBD_REP_ERR_POLICY], Next::Continue),
        (
            Opt::Unknown { code: 42 },
            vec![NBD_REP_ERR_UNSUP],
            Next::Continue,
        ),
        (
            Opt::Invalid {
                code: 3,
                reason: "x",
            },
            vec![NBD_REP_ERR_INVALID],
            Next::Continue,
        ),
    ];
    for (opt, kinds, next) in cases {
        let mut out = Vec::new();
        assert_eq!(answer(&opt, &mut n, &facts(), &mut out), next);
        let r = replies(&out);
        assert_eq!(r.iter().map(|x| x.1).collect::<Vec<_>>(), kinds, "{opt:?}");
        assert!(r.iter().all(|x| x.0 == opt.code()));
    }
}

#[tokio::test]
async fn handshake_over_a_pipe_leaves_trailing_bytes() {
    let (mut client, mut server) = tokio::io::duplex(64 * 1024);
    let mut wire = vec![0, 0, 0, 3];
    encode_option(&mut wire, NBD_OPT_STRUCTURED_REPLY, &[]);
    let mut go = Vec::new();
    encode_info_request(
        &mut go,
        &InfoRequest {
            name: "test".into(),
            infos: vec![],
        },
    );
    encode_option(&mut wire, NBD_OPT_GO, &go);
    wire.extend_from_slice(b"next");
    client.write_all(&wire).await.unwrap();
    let mut buf = BytesMut::new();
    let s = handshake(&mut server, &mut buf, &facts())
        .await
        .unwrap()
        .unwrap();
    assert!(s.structured && !s.base_allocation);
    assert_eq!(&buf[..], b"next");
    let mut greeting = [0u8; GREETING_LEN];
    client.read_exact(&mut greeting).await.unwrap();
    assert_eq!(&greeting[..16], b"NBDMAGICIHAVEOPT");
}

#[tokio::test]
async fn handshake_rejects_bad_flags_and_garbage() {
    for wire in [
        vec![0, 0, 0, 8],
        [0, 0, 0, 1]
            .into_iter()
            .chain(*b"GARBAGE!GARBAGE!")
            .collect(),
    ] {
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        client.write_all(&wire).await.unwrap();
        let mut buf = BytesMut::new();
        let r = handshake(&mut server, &mut buf, &facts()).await;
        assert!(matches!(r, Err(ConnError::Proto(_))), "{r:?}");
    }
}

fn go(name: &str) -> Opt {
    Opt::Go(InfoRequest {
        name: name.into(),
        infos: vec![],
    })
}

fn kinds(out: &[u8]) -> Vec<u32> {
    replies(out).iter().map(|x| x.1).collect()
}

#[test]
fn tls_required_refuses_every_option_but_starttls_and_abort() {
    let refused = [
        Opt::List,
        go("test"),
        Opt::Info(InfoRequest {
            name: "test".into(),
            infos: vec![],
        }),
        Opt::StructuredReply,
        Opt::SetMetaContext(meta("test", &[BASE_ALLOCATION])),
        Opt::ListMetaContext(meta("test", &[])),
        Opt::Unknown { code: 42 },
        Opt::Invalid {
            code: NBD_OPT_GO,
            reason: "x",
        },
    ];
    for opt in refused {
        let mut n = Negotiation {
            tls: TlsPhase::Required,
            ..Default::default()
        };
        let mut out = Vec::new();
        assert_eq!(answer(&opt, &mut n, &facts(), &mut out), Next::Continue);
        let r = replies(&out);
        assert_eq!(r.len(), 1, "{opt:?}");
        assert_eq!((r[0].0, r[0].1), (opt.code(), NBD_REP_ERR_TLS_REQD));
        assert_eq!(r[0].2, TLS_REQUIRED_MSG.as_bytes());
        assert!(!n.structured && !n.base_allocation, "{opt:?} changed state");
        assert_eq!(n.tls, TlsPhase::Required);
    }
    // EXPORT_NAME cannot be answered with an error: the connection closes.
    let mut n = Negotiation {
        tls: TlsPhase::Required,
        ..Default::default()
    };
    let mut out = Vec::new();
    let next = answer(&Opt::ExportName("test".into()), &mut n, &facts(), &mut out);
    assert_eq!(next, Next::TlsRequired);
    assert!(out.is_empty(), "no export size may leak");
    // ABORT is honoured.
    assert_eq!(answer(&Opt::Abort, &mut n, &facts(), &mut out), Next::Close);
    assert_eq!(kinds(&out), [NBD_REP_ACK]);
}

#[test]
fn starttls_is_acked_once_and_forgets_plaintext_state() {
    for phase in [TlsPhase::Offered, TlsPhase::Required] {
        let mut n = Negotiation {
            no_zeroes: true,
            tls: phase,
            ..Default::default()
        };
        let mut out = Vec::new();
        if phase == TlsPhase::Offered {
            // Offered: plaintext options work, and are forgotten at STARTTLS.
            answer(&Opt::StructuredReply, &mut n, &facts(), &mut out);
            let set = Opt::SetMetaContext(meta("test", &[BASE_ALLOCATION]));
            answer(&set, &mut n, &facts(), &mut out);
            assert!(n.structured && n.base_allocation);
        }
        out.clear();
        assert_eq!(
            answer(&Opt::StartTls, &mut n, &facts(), &mut out),
            Next::StartTls
        );
        assert_eq!(replies(&out), [(NBD_OPT_STARTTLS, NBD_REP_ACK, vec![])]);
        assert_eq!(n.tls, TlsPhase::Active);
        assert!(n.no_zeroes && !n.structured && !n.base_allocation);

        // A second STARTTLS inside TLS is invalid; nothing is TLS_REQD now.
        out.clear();
        assert_eq!(
            answer(&Opt::StartTls, &mut n, &facts(), &mut out),
            Next::Continue
        );
        assert_eq!(kinds(&out), [NBD_REP_ERR_INVALID]);
        out.clear();
        assert_eq!(
            answer(&Opt::List, &mut n, &facts(), &mut out),
            Next::Continue
        );
        assert_eq!(kinds(&out), [NBD_REP_SERVER, NBD_REP_ACK]);
        out.clear();
        assert!(matches!(
            answer(&go("test"), &mut n, &facts(), &mut out),
            Next::Transmit(s) if !s.structured
        ));
    }
}

#[test]
fn starttls_without_tls_and_with_data() {
    let mut n = Negotiation::default();
    let mut out = Vec::new();
    assert_eq!(
        answer(&Opt::StartTls, &mut n, &facts(), &mut out),
        Next::Continue
    );
    assert_eq!(kinds(&out), [NBD_REP_ERR_POLICY]);
    assert_eq!(n.tls, TlsPhase::Unavailable);
    // Offered and plaintext GO: served (SELECTIVETLS without TLS-only exports).
    let mut n = Negotiation {
        tls: TlsPhase::Offered,
        ..Default::default()
    };
    out.clear();
    assert!(matches!(
        answer(&go("test"), &mut n, &facts(), &mut out),
        Next::Transmit(_)
    ));
    // STARTTLS carrying data is malformed, whatever the mode.
    let (opt, _) = parse_option(&{
        let mut w = Vec::new();
        encode_option(&mut w, NBD_OPT_STARTTLS, b"x");
        w
    })
    .unwrap()
    .unwrap();
    let mut n = Negotiation {
        tls: TlsPhase::Offered,
        ..Default::default()
    };
    out.clear();
    assert_eq!(answer(&opt, &mut n, &facts(), &mut out), Next::Continue);
    assert_eq!(kinds(&out), [NBD_REP_ERR_INVALID]);
    assert_eq!(n.tls, TlsPhase::Offered);
}

#[tokio::test]
async fn negotiate_stops_at_starttls_and_counts_options_across_phases() {
    let (mut client, mut server) = tokio::io::duplex(64 * 1024);
    let mut wire = Vec::new();
    encode_option(&mut wire, NBD_OPT_LIST, &[]);
    encode_option(&mut wire, NBD_OPT_STARTTLS, &[]);
    client.write_all(&wire).await.unwrap();
    let mut buf = BytesMut::new();
    let mut n = Negotiation {
        tls: TlsPhase::Required,
        ..Default::default()
    };
    let mut left = 5;
    let r = negotiate(&mut server, &mut buf, &mut n, &facts(), &mut left).await;
    assert_eq!(r.unwrap(), Negotiated::StartTls);
    assert_eq!(left, 3);
    assert!(buf.is_empty());
    let mut got = vec![0u8; 2 * 20 + TLS_REQUIRED_MSG.len()];
    client.read_exact(&mut got).await.unwrap();
    assert_eq!(kinds(&got), [NBD_REP_ERR_TLS_REQD, NBD_REP_ACK]);

    // EXPORT_NAME before TLS when required: an error, no reply.
    let (mut client, mut server) = tokio::io::duplex(64 * 1024);
    let mut wire = Vec::new();
    encode_option(&mut wire, NBD_OPT_EXPORT_NAME, b"test");
    client.write_all(&wire).await.unwrap();
    let mut n = Negotiation {
        tls: TlsPhase::Required,
        ..Default::default()
    };
    let mut left = MAX_OPTIONS;
    let r = negotiate(&mut server, &mut buf, &mut n, &facts(), &mut left).await;
    assert!(matches!(r, Err(ConnError::TlsRequired)), "{r:?}");
}
