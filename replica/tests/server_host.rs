//! `ReplicaHost`: many volumes under one directory, opened once, closed
//! only when nobody uses them.

use std::sync::Arc;

use strata_replica::host::{HostError, ReplicaHost};
use strata_replica::{testing, StoreError};

fn host() -> (tempfile::TempDir, ReplicaHost) {
    let dir = tempfile::tempdir().unwrap();
    let host = ReplicaHost::new(dir.path().join("replicas"), testing::portable());
    (dir, host)
}

#[test]
fn create_open_list_close_delete() {
    let (_dir, host) = host();
    // The directory does not exist yet.
    assert!(host.list().unwrap().is_empty());
    let a = host.create("a", 1 << 20).unwrap();
    host.create("b.2_x-y", 1 << 20).unwrap();
    assert!(matches!(
        host.create("a", 1 << 20),
        Err(HostError::Store {
            source: StoreError::AlreadyExists(_),
            ..
        })
    ));
    assert_eq!(host.list().unwrap(), vec!["a", "b.2_x-y"]);
    assert_eq!(a.info().volume_id, "a");
    a.write(0, &[7u8; 4096]).unwrap();
    // open returns the open store, not a second one.
    assert!(Arc::ptr_eq(&a, &host.open("a").unwrap()));
    assert!(Arc::ptr_eq(&a, &host.get("a").unwrap()));
    assert!(host.open_report("a").unwrap().was_clean);
    // Busy while someone holds it.
    assert!(matches!(
        host.close("a"),
        Err(HostError::Busy { users: 1, .. })
    ));
    assert!(
        host.get("a").is_some(),
        "a refused close keeps the volume open"
    );
    drop(a);
    host.close("a").unwrap();
    assert!(host.get("a").is_none());
    assert!(matches!(host.close("a"), Err(HostError::NotOpen(_))));
    // Reopen: the clean close is reported, the data is there.
    let a = host.open("a").unwrap();
    assert!(host.open_with_report("a").unwrap().1.was_clean);
    let mut buf = [0u8; 4096];
    a.read(0, &mut buf).unwrap();
    assert_eq!(buf, [7u8; 4096]);
    assert_eq!(host.open_volumes(), vec!["a", "b.2_x-y"]);
    assert!(matches!(host.delete("a"), Err(HostError::Busy { .. })));
    drop(a);
    host.delete("a").unwrap();
    assert_eq!(host.list().unwrap(), vec!["b.2_x-y"]);
    assert!(host.open("a").unwrap_err().is_not_found());
    assert!(host.delete("a").unwrap_err().is_not_found());
    assert!(host.close_all().is_empty());
    assert!(host.open_volumes().is_empty());
}

#[test]
fn an_unclean_stop_is_reported() {
    let (dir, host) = host();
    host.create("v", 1 << 20).unwrap();
    // Another host over the same directory stands for the restarted process;
    // the first one "crashes" by being dropped without close.
    drop(host);
    let host = ReplicaHost::new(dir.path().join("replicas"), testing::portable());
    let (_, report) = host.open_with_report("v").unwrap();
    assert!(!report.was_clean);
    // Same machine, same boot: the page cache survived the crash.
    assert!(!report.page_cache_lost);
    assert!(!host.open_report("v").unwrap().was_clean);
    // Once a controller found it equal to its peers, the unclean stop is
    // forgotten.
    host.mark_reconciled("v");
    assert!(host.open_report("v").unwrap().was_clean);
}

#[test]
fn names_are_checked() {
    let (dir, host) = host();
    let long = "x".repeat(65);
    for bad in ["", ".", "..", "a/b", "../etc", "a b", "ü", long.as_str()] {
        assert!(
            matches!(host.create(bad, 4096), Err(HostError::InvalidName(_))),
            "{bad:?}"
        );
        assert!(
            matches!(host.open(bad), Err(HostError::InvalidName(_))),
            "{bad:?}"
        );
        assert!(
            matches!(host.delete(bad), Err(HostError::InvalidName(_))),
            "{bad:?}"
        );
    }
    host.create(&"x".repeat(64), 4096).unwrap();
    // Directories without a volume are not listed.
    std::fs::create_dir(dir.path().join("replicas").join("empty")).unwrap();
    assert_eq!(host.list().unwrap(), vec!["x".repeat(64)]);
    assert!(host.open("empty").unwrap_err().is_not_found());
    // A store error names the volume.
    let e = host.create("bad-size", 1000).unwrap_err();
    assert!(
        matches!(e, HostError::Store { ref volume, .. } if volume == "bad-size"),
        "{e:?}"
    );
    assert!(e.to_string().contains("bad-size"), "{e}");
}

#[test]
fn concurrent_opens_share_one_store() {
    let (_dir, host) = host();
    host.create("v", 1 << 20).unwrap();
    host.close("v").unwrap();
    let host = Arc::new(host);
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let host = host.clone();
            std::thread::spawn(move || host.open("v").unwrap())
        })
        .collect();
    let stores: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    for s in &stores[1..] {
        assert!(Arc::ptr_eq(&stores[0], s));
    }
}
