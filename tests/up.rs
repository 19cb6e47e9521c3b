//! `strata up`: starts, serves a volume, stops cleanly on Ctrl-C (SIGINT),
//! and reopens the same data when run again.

mod common;

use std::sync::Arc;

use common::{free_addr, require, run_ok, wait_listening, Proc};

fn up(dir: &std::path::Path, nbd: std::net::SocketAddr) -> Proc {
    up_sized(dir, nbd, "64M")
}

fn up_sized(dir: &std::path::Path, nbd: std::net::SocketAddr, size: &str) -> Proc {
    let args: Vec<String> = [
        "up",
        "--size",
        size,
        "--data-dir",
        dir.join("data").to_str().unwrap(),
        "--nbd",
        &nbd.to_string(),
        "--control",
        &free_addr().to_string(),
        "--metrics",
        &free_addr().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut p = Proc::spawn("up", &args, dir);
    wait_listening(nbd, &mut p, 30);
    p
}

fn interrupt(p: &mut Proc) {
    // SAFETY: kill(2) on our own child with a valid signal.
    unsafe {
        libc::kill(p.child.id() as i32, libc::SIGINT);
    }
    for _ in 0..300 {
        if let Ok(Some(status)) = p.child.try_wait() {
            assert!(
                status.success(),
                "strata up exited with {status}:\n{}",
                p.log_text()
            );
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!(
        "strata up did not stop within 30 s of Ctrl-C:\n{}",
        p.log_text()
    );
}

#[test]
fn up_serves_stops_cleanly_and_reopens_the_same_data() {
    require("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let nbd = free_addr();
    let uri = format!("nbd://{nbd}/strata");
    let mut p = up(dir.path(), nbd);
    let printed = (0..100).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(100));
        p.log_text().contains("nbdinfo nbd://")
    });
    assert!(printed, "up must print how to connect:\n{}", p.log_text());
    run_ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x5c 4096 1M", &uri],
        60,
    );
    interrupt(&mut p);
    // Every replica was closed cleanly: the flag is set and the data is there.
    for i in 0..3 {
        let replica = dir
            .path()
            .join("data")
            .join(format!("replica-{i}"))
            .join("strata");
        let (store, report) =
            strata_replica::Store::open(&replica, Arc::new(strata_replica::engine::PortableEngine))
                .unwrap();
        assert!(report.was_clean, "replica {i} was not closed cleanly");
        let mut buf = vec![0u8; 1 << 20];
        store.read(4096, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0x5c), "replica {i} lacks the data");
        store.close().unwrap();
    }
    let mut p = up(dir.path(), nbd);
    let out = run_ok(
        "qemu-io",
        &["-f", "raw", "-c", "read -P 0x5c 4096 1M", &uri],
        60,
    );
    assert!(!out.contains("verification failed"), "{out}");
    interrupt(&mut p);
}

#[test]
fn up_with_a_larger_size_grows_the_existing_volume() {
    require("qemu-io");
    require("nbdinfo");
    let dir = tempfile::tempdir().unwrap();
    let nbd = free_addr();
    let uri = format!("nbd://{nbd}/strata");
    let mut p = up(dir.path(), nbd);
    run_ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x3c 0 1M", &uri],
        60,
    );
    interrupt(&mut p);
    let mut p = up_sized(dir.path(), nbd, "128M");
    let size = |uri: &str| -> u64 {
        run_ok("nbdinfo", &["--size", uri], 30)
            .trim()
            .parse()
            .unwrap()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while size(&uri) != 128 << 20 {
        assert!(
            std::time::Instant::now() < deadline,
            "the volume did not grow to --size:\n{}",
            p.log_text()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read -P 0x3c 0 1M",
            "-c",
            "read -P 0 64M 64M",
            &uri,
        ],
        60,
    );
    interrupt(&mut p);
    // A smaller --size keeps the volume as it is (volumes never shrink).
    let mut p = up_sized(dir.path(), nbd, "64M");
    assert_eq!(size(&uri), 128 << 20);
    interrupt(&mut p);
}
