//! Arbitrary bytes as a stream of NBD transmission requests: headers are
//! parsed, validated against an export, and a WRITE's payload is skipped
//! as the server does. Must never panic, and must always make progress.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strata_controller::frontend::nbd::handshake::Session;
use strata_controller::frontend::nbd::proto::{parse_request, Cmd};
use strata_controller::frontend::nbd::transmission::validate;

fuzz_target!(|data: &[u8]| {
    let session = Session {
        structured: data.len() % 2 == 0,
        base_allocation: true,
        flags: 0,
    };
    let mut rest = data;
    while let Ok(Some((req, used))) = parse_request(rest) {
        assert_eq!(used, 28);
        rest = &rest[used..];
        let _ = validate(&req, 1 << 30, &session);
        if req.cmd == Cmd::Write {
            let skip = (req.len as usize).min(rest.len());
            rest = &rest[skip..];
        }
    }
});
