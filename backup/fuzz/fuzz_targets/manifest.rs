//! Hostile bytes into the manifest and chunk-index page decoders: an error
//! or a value, never a panic, never an allocation beyond the input's size;
//! whatever decodes must encode back to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strata_backup::format::{IndexPage, Manifest};

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Manifest::decode(data) {
        assert!(m.pages.len() <= data.len());
        let enc = m.encode().expect("a decoded manifest encodes");
        assert_eq!(enc, data);
    }
    if let Ok(p) = IndexPage::decode(data) {
        assert!(p.entries.len() <= data.len());
        assert_eq!(p.encode(), data);
    }
});
