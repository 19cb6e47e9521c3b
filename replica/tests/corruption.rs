//! Corruption: a flipped byte in a layer's data, its block map or the
//! metadata gives a clear error naming what is damaged; nothing panics and
//! the undamaged blocks still read.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use strata_replica::engine::PortableEngine;
use strata_replica::{CreateOptions, Store, StoreError, BLOCK_SIZE};

const BLOCKS: u64 = 16;

fn make(dir: &Path) {
    let store = Store::create(
        dir,
        &CreateOptions {
            volume_id: "c".into(),
            size: BLOCKS * BLOCK_SIZE,
        },
        Arc::new(PortableEngine),
    )
    .unwrap();
    for b in 0..BLOCKS {
        store
            .write(b * BLOCK_SIZE, &vec![b as u8 + 1; BLOCK_SIZE as usize])
            .unwrap();
    }
    store.close().unwrap();
}

fn flip(path: &Path, offset: u64) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).unwrap();
    b[0] ^= 0x10;
    f.write_all_at(&b, offset).unwrap();
}

#[test]
fn a_flipped_data_byte_fails_that_block_only() {
    let dir = tempfile::tempdir().unwrap();
    make(dir.path());
    flip(&dir.path().join("layer-000001.data"), 5 * BLOCK_SIZE + 100);
    let (store, _) = Store::open(dir.path(), Arc::new(PortableEngine)).unwrap();
    let mut buf = vec![0u8; BLOCK_SIZE as usize];
    match store.read(5 * BLOCK_SIZE, &mut buf) {
        Err(
            e @ StoreError::Checksum {
                layer: 1, offset, ..
            },
        ) => {
            assert_eq!(offset, 5 * BLOCK_SIZE);
            assert!(e.is_corruption());
            assert!(e.to_string().contains("offset 20480"), "{e}");
        }
        other => panic!("expected a checksum error, got {other:?}"),
    }
    // A read spanning the bad block fails too: never silently bad data.
    let mut big = vec![0u8; (BLOCKS * BLOCK_SIZE) as usize];
    assert!(store.read(0, &mut big).is_err());
    for b in (0..BLOCKS).filter(|&b| b != 5) {
        store.read(b * BLOCK_SIZE, &mut buf).unwrap();
        assert!(buf.iter().all(|&x| x == b as u8 + 1));
    }
    // Deleting a snapshot never copies the bad block into its child.
    store.snapshot("s").unwrap();
    assert!(store.delete_snapshot("s").is_err());
}

#[test]
fn a_flipped_map_byte_is_caught_at_open_or_read() {
    for byte_in_entry in 0..8u64 {
        let dir = tempfile::tempdir().unwrap();
        make(dir.path());
        flip(&dir.path().join("layer-000001.map"), 3 * 8 + byte_in_entry);
        match Store::open(dir.path(), Arc::new(PortableEngine)) {
            Err(e @ StoreError::CorruptMap { block: 3, .. }) => {
                assert!(e.to_string().contains("layer-000001.map"))
            }
            Err(e) => panic!("byte {byte_in_entry}: unexpected error {e}"),
            Ok((store, _)) => {
                let mut buf = vec![0u8; BLOCK_SIZE as usize];
                let err = store
                    .read(3 * BLOCK_SIZE, &mut buf)
                    .expect_err("a damaged checksum must not pass");
                assert!(err.is_corruption(), "byte {byte_in_entry}: {err}");
            }
        }
    }
}

#[test]
fn damaged_metadata_refuses_to_open_with_the_reason() {
    let len = {
        let dir = tempfile::tempdir().unwrap();
        make(dir.path());
        std::fs::metadata(dir.path().join("volume.meta"))
            .unwrap()
            .len()
    };
    for offset in [0, 9, 14, 18, 22, 30, len - 2] {
        let dir = tempfile::tempdir().unwrap();
        make(dir.path());
        flip(&dir.path().join("volume.meta"), offset);
        match Store::open(dir.path(), Arc::new(PortableEngine)) {
            Err(e @ StoreError::CorruptMeta { .. }) => {
                assert!(e.to_string().contains("volume.meta"), "{e}")
            }
            Err(e) => panic!("offset {offset}: unexpected error {e}"),
            Ok(_) => panic!("offset {offset}: damaged metadata opened"),
        }
    }
    // Truncated and missing files too.
    let dir = tempfile::tempdir().unwrap();
    make(dir.path());
    std::fs::OpenOptions::new()
        .write(true)
        .open(dir.path().join("volume.meta"))
        .unwrap()
        .set_len(10)
        .unwrap();
    assert!(matches!(
        Store::open(dir.path(), Arc::new(PortableEngine)),
        Err(StoreError::CorruptMeta { .. })
    ));
    std::fs::remove_file(dir.path().join("layer-000001.map")).unwrap();
    std::fs::remove_file(dir.path().join("volume.meta")).unwrap();
    assert!(matches!(
        Store::open(dir.path(), Arc::new(PortableEngine)),
        Err(StoreError::NotFound(_))
    ));
}

#[test]
fn a_missing_layer_file_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    make(dir.path());
    std::fs::remove_file(dir.path().join("layer-000001.data")).unwrap();
    let err = Store::open(dir.path(), Arc::new(PortableEngine)).unwrap_err();
    assert!(err.to_string().contains("layer-000001.data"), "{err}");
}
