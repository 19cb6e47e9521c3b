//! Arbitrary bytes as a client's side of the NBD handshake: client flags,
//! then options one after another, each answered by the server's pure
//! option logic. Must never panic, and must always make progress.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strata_controller::frontend::nbd::handshake::{answer, ExportFacts, Negotiation, Next};
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
    let mut n = Negotiation::default();
    let mut out = Vec::new();
    while let Ok(Some((opt, used))) = parse_option(rest) {
        assert!(used >= 16 && used <= rest.len());
        rest = &rest[used..];
        out.clear();
        match answer(&opt, &mut n, &export, &mut out) {
            Next::Continue => {}
            Next::Transmit(_) | Next::Close | Next::Fail(_) => return,
        }
    }
});
