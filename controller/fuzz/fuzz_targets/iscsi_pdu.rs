//! Arbitrary bytes as a stream of iSCSI PDUs: frames are checked (with and
//! without digests, against a data limit), decoded, SCSI CDBs parsed, and
//! Data-Out fed to a pending write, as the target does. Must never panic
//! and must always make progress.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use strata_controller::frontend::scsi::cdb;
use strata_controller::frontend::iscsi::dataout::PendingWrite;
use strata_controller::frontend::iscsi::login::Params;
use strata_controller::frontend::iscsi::pdu::{check_frame, parse_request, Digests, Request};
use strata_controller::frontend::iscsi::text::parse_text;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, mut rest)) = data.split_first() else {
        return;
    };
    let digests = Digests {
        header: mode & 1 != 0,
        data: mode & 2 != 0,
    };
    let params = Params {
        initial_r2t: mode & 4 != 0,
        immediate_data: mode & 8 != 0,
        ..Params::default()
    };
    let mut pending: Option<PendingWrite> = None;
    while let Ok(Some(f)) = check_frame(rest, digests, 8192) {
        assert!(f.total >= 48 && f.total <= rest.len());
        let mut bhs = [0u8; 48];
        bhs.copy_from_slice(&rest[..48]);
        let ahs = &rest[48..48 + f.ahs_len];
        let payload = Bytes::copy_from_slice(&rest[f.data_start..f.data_start + f.data_len]);
        rest = &rest[f.total..];
        match parse_request(&bhs, ahs, payload) {
            Ok(Request::Scsi(c)) => {
                let want = cdb::parse(&c.cdb)
                    .map(|cmd| cmd.data_out_len(4096).min(c.edtl as u64) as u32)
                    .unwrap_or(0)
                    .min(1 << 20);
                pending = PendingWrite::new(c.edtl, want, &c.data, c.final_, &params).ok();
                if let Some(w) = &mut pending {
                    let mut n = 0;
                    let _ = w.solicit(&params, || {
                        n += 1;
                        n
                    });
                }
            }
            Ok(Request::DataOut(d)) => {
                if let Some(w) = &mut pending {
                    if w.data_out(&d).is_err() {
                        pending = None;
                    }
                }
            }
            Ok(Request::Login(l)) => {
                let _ = parse_text(&l.data);
            }
            Ok(Request::Text(t)) => {
                let _ = parse_text(&t.data);
            }
            _ => {}
        }
    }
});
