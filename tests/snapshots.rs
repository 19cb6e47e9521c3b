//! End to end: snapshots through the controller (`strata snapshot ...`,
//! `strata volume clone`) on a 3-way replicated volume, read by real NBD
//! clients; replicas that miss a snapshot get the whole chain when rebuilt.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{qemu_io, require, strata, strata_ok, Cluster, Proc};

const MIB: u64 = 1 << 20;

/// Runs `strata` expecting a failure; returns its stderr.
fn strata_err(args: &[&str]) -> String {
    let out = strata(args);
    assert!(
        !out.status.success(),
        "strata {args:?} should have failed:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn snapshot_names(c: &Cluster) -> Vec<String> {
    let out = strata_ok(&[
        "snapshot",
        "ls",
        &c.volume,
        "--json",
        "--controller",
        &c.control.to_string(),
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect()
}

fn wait_attached(c: &Cluster, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while c.status()["attached_clients"] != n {
        assert!(
            Instant::now() < deadline,
            "attached clients never became {n}: {}",
            c.status()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn create_list_revert_and_delete_through_the_cli() {
    require("qemu-io");
    let mut c = Cluster::start(3, 64 * MIB);
    let ctl = c.control.to_string();
    let uri = c.uri();
    qemu_io(&uri, &["write -P 0xa1 0 4M", "write -P 0xa2 8M 1M"]);
    let out = strata_ok(&[
        "snapshot",
        "create",
        "vol",
        "s1",
        "--json",
        "--controller",
        &ctl,
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["snapshot"], "s1", "{out}");
    assert!(v["pause_us"].as_u64().is_some(), "{out}");

    qemu_io(&uri, &["write -P 0xb1 0 4M", "discard 8M 1M"]);
    let out = strata_ok(&["snapshot", "create", "vol", "s2", "--controller", &ctl]);
    assert!(out.contains("snapshot s2 taken"), "{out}");
    assert_eq!(snapshot_names(&c), ["s1", "s2"]);

    // Errors name the volume and the snapshot.
    let err = strata_err(&["snapshot", "create", "vol", "s1", "--controller", &ctl]);
    assert!(
        err.contains("vol") && err.contains("s1") && err.contains("already exists"),
        "{err}"
    );
    let err = strata_err(&["snapshot", "rm", "vol", "nope", "--controller", &ctl]);
    assert!(
        err.contains("nope") && err.contains("No snapshot named"),
        "{err}"
    );
    let err = strata_err(&["snapshot", "ls", "other", "--controller", &ctl]);
    assert!(err.contains("serves volume \"vol\""), "{err}");
    let err = strata_err(&[
        "snapshot",
        "create",
        "vol",
        "bad/name",
        "--controller",
        &ctl,
    ]);
    assert!(err.contains("invalid name"), "{err}");

    // A client attached: revert is refused without --force.
    let mut held = Command::new("qemu-io")
        .args(["-f", "raw", &uri])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_attached(&c, 1);
    let err = strata_err(&["snapshot", "revert", "vol", "s1", "--controller", &ctl]);
    assert!(err.contains("attached"), "{err}");
    drop(held.stdin.take());
    let _ = held.kill();
    let _ = held.wait();
    wait_attached(&c, 0);

    // Newer snapshots are only discarded when asked.
    let err = strata_err(&["snapshot", "revert", "vol", "s1", "--controller", &ctl]);
    assert!(err.contains("discard-newer"), "{err}");
    strata_ok(&[
        "snapshot",
        "revert",
        "vol",
        "s1",
        "--discard-newer",
        "--controller",
        &ctl,
    ]);
    assert_eq!(snapshot_names(&c), ["s1"]);
    qemu_io(&uri, &["read -P 0xa1 0 4M", "read -P 0xa2 8M 1M"]);

    // Deleting a snapshot keeps what the volume reads.
    qemu_io(&uri, &["write -P 0xc1 1M 1M"]);
    strata_ok(&["snapshot", "rm", "vol", "s1", "--controller", &ctl]);
    assert!(snapshot_names(&c).is_empty());
    qemu_io(
        &uri,
        &[
            "read -P 0xa1 0 1M",
            "read -P 0xc1 1M 1M",
            "read -P 0xa1 2M 2M",
            "read -P 0xa2 8M 1M",
        ],
    );
    c.stop_and_compare();
}

#[test]
fn a_replica_out_during_snapshots_is_rebuilt_with_the_whole_chain() {
    require("qemu-io");
    let mut c = Cluster::without_processes(64 * MIB);
    c.controller_args = vec!["--sync-rate-mib".into(), "8".into()];
    for i in 0..3 {
        let addr = common::free_addr();
        c.replica_addrs.push(addr);
        c.replicas.push(c.spawn_replica(i, addr));
    }
    c.start_controller();
    let ctl = c.control.to_string();
    let uri = c.uri();
    qemu_io(&uri, &["write -P 0x01 0 2M", "flush"]);
    c.replicas[2].kill9();
    qemu_io(&uri, &["write -P 0x02 4M 2M"]);
    strata_ok(&["snapshot", "create", "vol", "s1", "--controller", &ctl]);
    qemu_io(&uri, &["write -P 0x03 0 1M", "discard 4M 1M"]);
    strata_ok(&["snapshot", "create", "vol", "s2", "--controller", &ctl]);
    qemu_io(&uri, &["write -P 0x04 10M 1M"]);
    c.restart_replica(2);
    c.wait_all_healthy(60);

    // A snapshot taken while a replica resyncs: it restarts as a full
    // rebuild with the new chain.
    c.replicas[1].kill9();
    qemu_io(&uri, &["write -P 0x05 16M 32M"]);
    c.restart_replica(1);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = c.status();
        if s["replicas"][1]["state"] == "syncing" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "replica 1 never started syncing: {s}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    strata_ok(&["snapshot", "create", "vol", "s3", "--controller", &ctl]);
    qemu_io(&uri, &["write -P 0x06 20M 1M"]);
    c.wait_all_healthy(90);
    assert_eq!(snapshot_names(&c), ["s1", "s2", "s3"]);
    let log = c.controller.as_ref().unwrap().log_text();
    assert!(log.contains("snapshot layer rebuilt"), "{log}");
    assert!(log.contains("rebuilt with the new chain"), "{log}");
    c.stop_and_compare();

    // Every replica's snapshots hold what they held when taken.
    for i in 0..3 {
        let store = c.open_store(i);
        let mut buf = vec![0u8; MIB as usize];
        let view = |name| strata_replica::View::Snapshot(name);
        for (snap, off, pat) in [
            ("s1", 0, 0x01u8),
            ("s1", 4 * MIB, 0x02),
            ("s2", 0, 0x03),
            ("s2", 4 * MIB, 0x00),
            ("s2", 5 * MIB, 0x02),
            ("s2", 10 * MIB, 0x00),
            ("s3", 10 * MIB, 0x04),
            ("s3", 16 * MIB, 0x05),
            ("s3", 20 * MIB, 0x05),
        ] {
            store.read_view(view(snap), off, &mut buf).unwrap();
            assert!(
                buf.iter().all(|b| *b == pat),
                "replica {i}, snapshot {snap}, offset {off}: expected {pat:#x}"
            );
        }
    }
}

#[test]
fn a_clone_is_an_independent_volume() {
    require("qemu-io");
    let mut c = Cluster::start(3, 32 * MIB);
    let ctl = c.control.to_string();
    let uri = c.uri();
    qemu_io(&uri, &["write -P 0x7e 0 3M"]);
    strata_ok(&["snapshot", "create", "vol", "gold", "--controller", &ctl]);
    qemu_io(&uri, &["write -P 0x11 0 1M"]);
    let out = strata_ok(&[
        "volume",
        "clone",
        "vol@gold",
        "copy",
        "--json",
        "--controller",
        &ctl,
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["replicas"].as_array().unwrap().len(), 3, "{out}");
    let err = strata_err(&["volume", "clone", "vol@gold", "copy", "--controller", &ctl]);
    assert!(err.contains("copy"), "{err}");

    // Serve the clone with its own controller on the same replica servers.
    let nbd = common::free_addr();
    let mut args = c.controller_command(nbd);
    let at = args.iter().position(|a| a == "vol").unwrap();
    args[at] = "copy".into();
    let mut ctl2 = Proc::spawn("clone-controller", &args, c.dir.path());
    common::wait_listening(nbd, &mut ctl2, 30);
    let clone_uri = format!("nbd://{nbd}/copy");
    qemu_io(&clone_uri, &["read -P 0x7e 0 3M", "read -P 0 3M 1M"]);
    qemu_io(&clone_uri, &["write -P 0x22 2M 1M"]);
    qemu_io(&uri, &["read -P 0x11 0 1M", "read -P 0x7e 1M 2M"]);
    assert!(ctl2.terminate(30), "{}", ctl2.log_text());
    c.stop_and_compare();
}
