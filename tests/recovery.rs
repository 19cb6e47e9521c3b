//! Recovery with IO running: a replica killed and restarted is resynced
//! (delta), a wiped one is rebuilt (full), a rebuild survives losing its
//! source, a restarted controller never trusts a stale replica, and a
//! second controller fences the first.

mod common;

use std::time::Duration;

use common::{fio_json, free_addr, require, run, run_ok, Cluster};

const MIB: u64 = 1 << 20;

/// fio writing and verifying (crc32c) for `secs`, with periodic fsync.
fn fio_background(
    uri: String,
    secs: u64,
    size_mib: u64,
) -> std::thread::JoinHandle<std::process::Output> {
    std::thread::spawn(move || {
        run(
            "fio",
            &[
                "--name=recovery",
                "--ioengine=nbd",
                &format!("--uri={uri}"),
                "--rw=randwrite",
                "--bs=4k",
                "--iodepth=8",
                &format!("--size={size_mib}M"),
                "--time_based",
                &format!("--runtime={secs}"),
                "--fsync=64",
                "--verify=crc32c",
                "--verify_state_save=0",
                "--verify_fatal=1",
                "--verify_backlog=256",
                "--output-format=json",
            ],
            secs + 120,
        )
    })
}

fn assert_fio_ok(out: std::process::Output, c: &Cluster) {
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "fio failed: {text}\n{}\ncontroller log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        c.controller
            .as_ref()
            .map(|p| p.log_text())
            .unwrap_or_default()
    );
    let v = fio_json(&out.stdout);
    assert_eq!(v["jobs"][0]["error"], 0, "{text}");
}

#[test]
fn killed_and_restarted_replica_is_delta_resynced_while_fio_verifies() {
    require("fio");
    let mut c = Cluster::start(3, 256 * MIB);
    let fio = fio_background(c.uri(), 12, 64);
    std::thread::sleep(Duration::from_secs(2));
    c.replicas[0].kill9();
    std::thread::sleep(Duration::from_secs(3));
    c.restart_replica(0);
    c.wait_all_healthy(60);
    assert_fio_ok(fio.join().unwrap(), &c);
    let log = c.controller.as_ref().unwrap().log_text();
    assert!(
        log.contains("delta resync"),
        "expected a delta resync:\n{log}"
    );
    c.stop_and_compare();
}

#[test]
fn wiped_replica_is_rebuilt_fully_while_fio_verifies() {
    require("fio");
    let mut c = Cluster::start(3, 256 * MIB);
    run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x33 100M 16M",
            "-c",
            "flush",
            &c.uri(),
        ],
        60,
    );
    let fio = fio_background(c.uri(), 10, 64);
    std::thread::sleep(Duration::from_secs(2));
    c.replicas[1].kill9();
    std::fs::remove_dir_all(c.replica_dir(1)).unwrap();
    c.restart_replica(1);
    c.wait_all_healthy(90);
    assert_fio_ok(fio.join().unwrap(), &c);
    let log = c.controller.as_ref().unwrap().log_text();
    assert!(
        log.contains("full rebuild"),
        "expected a full rebuild:\n{log}"
    );
    // The rebuilt replica read its data from a peer itself; none of it
    // crossed the controller.
    let (pulled, relayed) = copied_mib(&log);
    assert!(
        pulled >= 16 && relayed == 0,
        "pulled {pulled} MiB, relayed {relayed} MiB:\n{log}"
    );
    c.stop_and_compare();
}

/// The MiB the last finished sync in a controller log had pulled by the
/// replica and relayed by the controller.
fn copied_mib(log: &str) -> (u64, u64) {
    let line = log
        .lines()
        .rfind(|l| l.contains("healthy again"))
        .expect("no sync finished");
    // Without the terminal colours (escape sequences hold digits too).
    let mut plain = String::new();
    let mut chars = line.chars();
    while let Some(ch) = chars.next() {
        if ch == '\x1b' {
            chars.by_ref().find(|&c| c == 'm');
        } else {
            plain.push(ch);
        }
    }
    let line = plain.as_str();
    let field = |name: &str| -> u64 {
        let at = line
            .find(name)
            .unwrap_or_else(|| panic!("{name} missing in {line}"));
        line[at + name.len()..]
            .chars()
            .skip_while(|c| !c.is_ascii_digit())
            .take_while(|c| c.is_ascii_digit())
            .collect::<String>()
            .parse()
            .unwrap()
    };
    (
        field("mib_pulled_by_the_replica"),
        field("mib_relayed_by_the_controller"),
    )
}

#[test]
fn a_rebuild_whose_source_dies_resumes_from_another_source() {
    require("qemu-io");
    let mut c = Cluster::start(3, 256 * MIB);
    // Throttled so the rebuild is still running when its source dies.
    c.controller_args = vec!["--sync-rate-mib".into(), "40".into()];
    c.controller.take().unwrap().terminate(30);
    c.start_controller();
    run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x44 0 128M",
            "-c",
            "flush",
            &c.uri(),
        ],
        120,
    );
    c.replicas[0].kill9();
    std::fs::remove_dir_all(c.replica_dir(0)).unwrap();
    c.restart_replica(0);
    // Wait until the rebuild is under way, then kill the replica it reads from.
    let mut started = false;
    for _ in 0..100 {
        let s = c.status();
        if s["replicas"][0]["state"] == "syncing"
            && s["replicas"][0]["sync"]["done_bytes"].as_u64().unwrap_or(0) > 0
        {
            started = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(started, "the rebuild never started: {}", c.status());
    c.replicas[1].kill9();
    // Replica 0 finishes from replica 2 and is healthy again (1 of 3 is dead).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let s = c.status();
        if s["replicas"][0]["state"] == "healthy" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "rebuild did not resume: {s}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = run_ok(
        "qemu-io",
        &["-f", "raw", "-c", "read -P 0x44 0 128M", &c.uri()],
        120,
    );
    assert!(!out.contains("verification failed"), "{out}");
    // Replica 0 holds the data itself, not just through its peers.
    c.controller.take().unwrap().terminate(30);
    c.replicas[0].terminate(30);
    let store = c.open_store(0);
    let mut buf = vec![0u8; MIB as usize];
    for off in (0..128 * MIB).step_by(16 * MIB as usize) {
        store.read(off, &mut buf).unwrap();
        assert!(
            buf.iter().all(|&b| b == 0x44),
            "rebuilt replica lacks data at {off}"
        );
    }
}

#[test]
fn a_restarted_controller_rebuilds_a_stale_replica_and_keeps_flushed_writes() {
    require("qemu-io");
    let mut c = Cluster::start(3, 64 * MIB);
    let uri = c.uri();
    run_ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 1 0 8M", "-c", "flush", &uri],
        60,
    );
    // Replica 2 misses the next writes.
    c.replicas[2].kill9();
    run_ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 2 0 8M", "-c", "flush", &uri],
        60,
    );
    // The controller crashes; replica 2 comes back; the controller restarts.
    c.controller.take().unwrap().kill9();
    c.restart_replica(2);
    c.start_controller();
    let out = run_ok("qemu-io", &["-f", "raw", "-c", "read -P 2 0 8M", &uri], 60);
    assert!(
        !out.contains("verification failed"),
        "a stale replica was trusted: {out}"
    );
    c.wait_all_healthy(60);
    let log = c.controller.as_ref().unwrap().log_text();
    assert!(
        log.contains("out of date at start"),
        "replica 2 should have been found stale:\n{log}"
    );
    c.stop_and_compare();
    let store = c.open_store(2);
    let mut buf = vec![0u8; (8 * MIB) as usize];
    store.read(0, &mut buf).unwrap();
    assert!(
        buf.iter().all(|&b| b == 2),
        "replica 2 was not brought up to date"
    );
}

#[test]
fn refuses_to_start_without_a_majority_unless_forced() {
    let mut c = Cluster::start(3, 16 * MIB);
    c.controller.take().unwrap().terminate(30);
    c.replicas[0].kill9();
    c.replicas[1].kill9();
    let args = c.controller_command(free_addr());
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run(common::strata_bin().to_str().unwrap(), &refs, 60);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started without a majority");
    assert!(
        err.contains("--force-degraded") && err.contains("1 of 3"),
        "{err}"
    );
    c.controller_args = vec!["--force-degraded".into()];
    c.start_controller();
    run_ok("nbdinfo", &[&c.uri()], 30);
}

#[test]
fn a_second_controller_fences_the_first() {
    require("qemu-io");
    let a = Cluster::start(3, 16 * MIB);
    let uri_a = a.uri();
    run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x0a 0 1M",
            "-c",
            "flush",
            &uri_a,
        ],
        60,
    );
    // A second controller on the same replicas (a duplicate pod).
    let nbd_b = free_addr();
    let args = a.controller_command(nbd_b);
    let mut b = common::Proc::spawn("controller-b", &args, a.dir.path());
    common::wait_listening(nbd_b, &mut b, 30);
    let uri_b = format!("nbd://{nbd_b}/{}", a.volume);
    // B's NBD port is bound before B has assembled the volume (and moved
    // the replicas to its epoch); a connection is accepted by the kernel
    // before that. B answers NBD only once it has: read through it first.
    run_ok(
        "qemu-io",
        &["-f", "raw", "-c", "read -P 0x0a 0 1M", &uri_b],
        60,
    );
    // The fenced controller can neither write nor read.
    let out = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xbb 0 1M",
            "-c",
            "flush",
            &uri_a,
        ],
        60,
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("error") || text.contains("failed") || !out.status.success(),
        "fenced write succeeded: {text}"
    );
    let out = run(
        "qemu-io",
        &["-f", "raw", "-c", "read -P 0x0a 0 1M", &uri_a],
        60,
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("error") || text.contains("failed") || !out.status.success(),
        "fenced read succeeded: {text}"
    );
    // The new controller sees the old data, never the fenced write.
    let out = run_ok(
        "qemu-io",
        &["-f", "raw", "-c", "read -P 0x0a 0 1M", &uri_b],
        60,
    );
    assert!(
        !out.contains("verification failed"),
        "the fenced write is visible: {out}"
    );
    b.terminate(30);
}
