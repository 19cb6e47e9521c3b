//! Arbitrary bytes as a client's side of the NBD handshake: client flags,
//! then options one after another, each answered by the server's pure
//! option logic. Must never panic, and must always make progress.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strata_controller::frontend::nbd::handshake::{
    answer, ExportFacts, Negotiation, Next, TlsPhase,
};
use strata_controller::frontend::nbd::proto::{parse_client_flags, parse_option};

fuzz_target!(|data: &[u8]| {
    let mut rest = match parse_client_flags(data) {
        Ok(Some((_, used))) => &data[used..],
        _ => return,
    };
    let export = ExportFacts {
        name: "test".into(),
        size: 1 << 30,
    };
    // The last byte picks the server's TLS mode.
    let mut n = Negotiation {
        tls: match data.last().map(|b| b % 3) {
            Some(1) => TlsPhase::Offered,
            Some(2) => TlsPhase::Required,
            _ => TlsPhase::Unavailable,
        },
        ..Negotiation::default()
    };
    let mut out = Vec::new();
    while let Ok(Some((opt, used))) = parse_option(rest) {
        assert!(used >= 16 && used <= rest.len());
        rest = &rest[used..];
        out.clear();
        match answer(&opt, &mut n, &export, &mut out) {
            Next::Continue => {}
            Next::Transmit(_) | Next::Close | Next::Fail(_) | Next::TlsRequired => return,
            // The TLS handshake would come next; the options after it
            // are answered as inside TLS (`n.tls` is now Active).
            Next::StartTls => {}
        }
    }
});
