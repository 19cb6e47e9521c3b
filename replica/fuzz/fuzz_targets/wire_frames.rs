//! Arbitrary bytes through the data wire decoders (`cargo fuzz run
//! wire_frames` from `replica/`): no panic, no over-long frame, and every
//! frame that decodes encodes back to the same value.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use strata_replica::wire::{Reply, Request, WireError};

fuzz_target!(|data: &[u8]| {
    if let Ok((req, len)) = Request::decode(data) {
        assert!(len <= data.len());
        let mut out = BytesMut::new();
        req.encode_into(&mut out);
        assert_eq!(Request::decode(&out), Ok((req, out.len())));
    }
    if let Ok((reply, len)) = Reply::decode(data) {
        assert!(len <= data.len());
        let mut out = BytesMut::new();
        reply.encode_into(&mut out);
        assert_eq!(Reply::decode(&out), Ok((reply, out.len())));
    }
    let _ = Request::check(data);
    let _ = Reply::check(data);
    // The zero-copy decoders over the whole stream, skipping bad frames as
    // the server and client do.
    let mut buf = BytesMut::from(data);
    while let Ok(Some(_)) | Err(WireError::Invalid { .. } | WireError::BadPayloadCrc { .. }) =
        Request::decode_from(&mut buf)
    {}
    let mut buf = BytesMut::from(data);
    while let Ok(Some(_)) | Err(WireError::Invalid { .. } | WireError::BadPayloadCrc { .. }) =
        Reply::decode_from(&mut buf)
    {}
});
