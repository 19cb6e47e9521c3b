//! Growing a live volume (issue 14), end to end with real processes and
//! real clients: fio with verify while the volume grows, a replica out
//! during the expansion, the controller killed at each step, nbdinfo on a
//! new connection, iscsi-readcapacity16, snapshots and backups across the
//! size change, and bad input.

mod common;

use std::process::Command;

use common::*;

const MIB: u64 = 1 << 20;

fn expand(c: &Cluster, size: &str) -> serde_json::Value {
    let ctl = c.control.to_string();
    strata_json(&[
        "volume",
        "expand",
        "vol",
        size,
        "--controller",
        &ctl,
        "--json",
    ])
}

fn nbd_size(uri: &str) -> u64 {
    run_ok("nbdinfo", &["--size", uri], 30)
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn grows_while_fio_writes_with_verify() {
    require("fio");
    require("nbdinfo");
    let mut c = Cluster::start(3, 64 * MIB);
    let uri = c.uri();
    assert_eq!(nbd_size(&uri), 64 * MIB);
    // 4K random writes at QD32 over the first 48 MiB, verified at the end.
    let fio = Command::new("timeout")
        .args(["-k", "5", "120", "fio", "--name=grow", "--ioengine=nbd"])
        .arg(format!("--uri={uri}"))
        .args([
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=32",
            "--size=48M",
            "--loops=6",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--output-format=json",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_secs(2));
    let grown = expand(&c, "128M");
    let out = fio.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "fio failed while the volume grew:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let json = fio_json(&out.stdout);
    let job = &json["jobs"][0];
    assert_eq!(job["error"], 0, "{job}");
    let max_ms = job["write"]["clat_ns"]["max"].as_f64().unwrap_or(0.0) / 1e6;
    eprintln!(
        "expansion under 4K QD32 random writes: IO held {} us by the controller; fio's slowest write {max_ms:.1} ms",
        grown["pause_us"]
    );
    assert_eq!(grown["old_size"], 64 * MIB);
    assert_eq!(grown["new_size"], 128 * MIB);
    // A new connection sees the new size; the new range reads as zeros and
    // takes writes.
    assert_eq!(nbd_size(&uri), 128 * MIB);
    qemu_io(
        &uri,
        &[
            "read -P 0 64M 64M",
            "write -P 0x5a 100M 1M",
            "read -P 0x5a 100M 1M",
        ],
    );
    let status = c.status();
    assert_eq!(status["size"], 128 * MIB, "{status}");
    let metrics = run_ok(
        "curl",
        &["-s", &format!("http://{}/metrics", c.metrics)],
        10,
    );
    assert!(
        metrics.contains(&format!(
            "strata_volume_size_bytes{{volume=\"vol\"}} {}",
            128 * MIB
        )),
        "{metrics}"
    );
    // Growing to the same size again is a no-op (CSI retries expansions).
    let again = expand(&c, "128M");
    assert_eq!(again["old_size"], again["new_size"]);
    c.size = 128 * MIB;
    c.stop_and_compare();
}

#[test]
fn a_replica_out_during_the_expansion_grows_when_it_returns() {
    require("qemu-io");
    let mut c = Cluster::start(3, 32 * MIB);
    qemu_io(&c.uri(), &["write -P 0x11 0 4M"]);
    c.replicas[2].kill9();
    let grown = expand(&c, "64M");
    assert_eq!(grown["new_size"], 64 * MIB);
    qemu_io(&c.uri(), &["write -P 0x22 40M 4M"]);
    c.restart_replica(2);
    let status = c.wait_all_healthy(60);
    assert_eq!(status["size"], 64 * MIB, "{status}");
    qemu_io(&c.uri(), &["read -P 0x11 0 4M", "read -P 0x22 40M 4M"]);
    c.size = 64 * MIB;
    c.stop_and_compare();
}

/// Kills the controller at `point` of an expansion (STRATA_CRASH_AT), then
/// restarts it: the volume comes back at one size, the new one (see
/// ARCHITECTURE.md), with its data and every replica the same.
fn crash_during_expansion(point: &str) {
    let mut c = Cluster::start(3, 32 * MIB);
    qemu_io(&c.uri(), &["write -P 0x33 0 8M", "write -P 0x44 28M 4M"]);
    c.stop_clean();
    for i in 0..3 {
        c.restart_replica(i);
    }
    let nbd = c.nbd;
    let mut args = c.controller_command(nbd);
    let ctl_at = args.iter().position(|a| a == "--control").unwrap() + 1;
    args[ctl_at] = c.control.to_string();
    let mut ctl = Proc::spawn_with(
        "controller-crashing",
        &["env", &format!("STRATA_CRASH_AT={point}")],
        &args,
        c.dir.path(),
    );
    wait_listening(nbd, &mut ctl, 30);
    let ctl_addr = c.control.to_string();
    let out = strata(&["volume", "expand", "vol", "64M", "--controller", &ctl_addr]);
    assert!(
        !out.status.success(),
        "{point}: the controller was to die mid-way"
    );
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(!ctl.is_running(), "{point}: the controller did not abort");
    c.start_controller();
    let status = c.wait_all_healthy(60);
    assert_eq!(status["size"], 64 * MIB, "{point}: {status}");
    assert_eq!(nbd_size(&c.uri()), 64 * MIB, "{point}");
    qemu_io(
        &c.uri(),
        &[
            "read -P 0x33 0 8M",
            "read -P 0x44 28M 4M",
            "read -P 0 32M 32M",
            "write -P 0x55 60M 1M",
            "read -P 0x55 60M 1M",
        ],
    );
    c.size = 64 * MIB;
    c.stop_and_compare();
}

#[test]
fn controller_killed_after_the_first_replica_grew() {
    require("qemu-io");
    crash_during_expansion("expand.first_replica_grown");
}

#[test]
fn controller_killed_after_every_replica_grew() {
    require("qemu-io");
    crash_during_expansion("expand.replicas_grown");
}

#[test]
fn controller_killed_after_the_volume_took_the_size() {
    require("qemu-io");
    crash_during_expansion("expand.size_set");
}

#[test]
fn snapshots_keep_their_size_and_backups_follow_the_growth() {
    require("qemu-io");
    let mut c = Cluster::start(3, 32 * MIB);
    let ctl = c.control.to_string();
    let backups = tempfile::tempdir().unwrap();
    let url = format!("file://{}", backups.path().display());
    qemu_io(&c.uri(), &["write -P 0x61 0 8M"]);
    strata_ok(&["snapshot", "create", "vol", "small", "--controller", &ctl]);
    let backup = || {
        strata_json(&[
            "backup",
            "create",
            "vol",
            "--target",
            &url,
            "--controller",
            &ctl,
            "--json",
        ])
    };
    let b1 = backup();
    expand(&c, "64M");
    qemu_io(&c.uri(), &["write -P 0x62 48M 1M"]);
    strata_ok(&["snapshot", "create", "vol", "big", "--controller", &ctl]);
    let snaps = strata_json(&["snapshot", "ls", "vol", "--controller", &ctl, "--json"]);
    let size_of = |name: &str| {
        snaps["snapshots"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .unwrap_or_else(|| panic!("no {name} in {snaps}"))["size"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(size_of("small"), 32 * MIB, "{snaps}");
    assert_eq!(size_of("big"), 64 * MIB, "{snaps}");
    // Revert to a snapshot from before the expansion: refused, clearly.
    let out = strata(&[
        "snapshot",
        "revert",
        "vol",
        "small",
        "--controller",
        &ctl,
        "--force",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("grown"), "{err}");
    // An incremental backup after the expansion reads only what changed
    // and restores at the new size; the first still restores at the old.
    let b2 = backup();
    assert_eq!(b2["parent"], b1["id"], "{b2}");
    assert!(b2["bytes_read"].as_u64().unwrap() <= 2 * MIB, "{b2}");
    let dir = tempfile::tempdir().unwrap();
    for (b, size, extra) in [
        (&b1, 32 * MIB, None),
        (&b2, 64 * MIB, Some("read -P 0x62 48M 1M")),
    ] {
        let id = b["id"].as_str().unwrap();
        let file = dir.path().join(format!("{id}.raw"));
        strata_ok(&[
            "backup",
            "restore",
            id,
            "--to-file",
            file.to_str().unwrap(),
            "--target",
            &url,
        ]);
        assert_eq!(std::fs::metadata(&file).unwrap().len(), size, "{b}");
        let mut cmds = vec!["read -P 0x61 0 8M".to_string()];
        cmds.extend(extra.map(String::from));
        qemu_io(file.to_str().unwrap(), &cmds);
    }
    // A clone of the small snapshot has the small size.
    strata_ok(&[
        "volume",
        "clone",
        "vol@small",
        "smallclone",
        "--controller",
        &ctl,
    ]);
    c.stop_clean();
    let clone = strata_replica::Store::open(
        &c.replica_dir(0).join("smallclone"),
        std::sync::Arc::new(strata_replica::engine::PortableEngine),
    )
    .unwrap()
    .0;
    assert_eq!(clone.size(), 32 * MIB);
    for i in 0..3 {
        c.restart_replica(i);
    }
    c.start_controller();
    c.size = 64 * MIB;
    c.stop_and_compare();
}

#[test]
fn iscsi_reports_the_new_capacity_and_a_unit_attention() {
    require("iscsi-readcapacity16");
    require("qemu-io");
    let (mut c, iscsi) = Cluster::start_with_iscsi(3, 32 * MIB);
    let url = iscsi_url(iscsi, "vol");
    let capacity = || {
        let out = run_ok("iscsi-readcapacity16", &["-s", &url], 30);
        out.trim()
            .parse::<u64>()
            .unwrap_or_else(|_| panic!("{out}"))
    };
    assert_eq!(capacity(), 32 * MIB);
    // A session opened before the expansion (qemu-io reading its commands
    // from a pipe) sees CAPACITY DATA HAS CHANGED once, and its reads go on.
    let mut before = Command::new("timeout")
        .args(["-k", "5", "60", "qemu-io", "-f", "raw", &url])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = before.stdin.take().unwrap();
    use std::io::Write;
    writeln!(stdin, "read 0 4k").unwrap();
    std::thread::sleep(std::time::Duration::from_secs(1));
    expand(&c, "96M");
    writeln!(stdin, "read 0 4k\nread 4k 4k\nquit").unwrap();
    drop(stdin);
    let out = before.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        text.matches("CAPACITY_DATA_HAS_CHANGED").count(),
        1,
        "{text}"
    );
    assert_eq!(text.matches("read 4096/4096 bytes").count(), 3, "{text}");
    assert_eq!(capacity(), 96 * MIB);
    c.stop_clean();
}

#[test]
fn bad_sizes_are_refused_clearly() {
    let mut c = Cluster::start(1, 64 * MIB);
    let ctl = c.control.to_string();
    let refuse = |size: &str, says: &str| {
        let out = strata(&["volume", "expand", "vol", size, "--controller", &ctl]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{size}: accepted");
        assert!(err.contains(says), "{size}: {err}");
    };
    refuse("32M", "only grow");
    refuse("0", "positive");
    refuse("12Q", "unknown size unit");
    refuse("lots", "is not a size");
    refuse("1048576T", "larger than the whole filesystem");
    // Not a multiple of 4 KiB: rounded up, and said so.
    let out = strata_ok(&["volume", "expand", "vol", "67112961", "--controller", &ctl]);
    assert!(out.contains("rounded up to 67117056"), "{out}");
    let status = c.status();
    assert_eq!(status["size"], 67117056u64, "{status}");
    c.size = 67117056;
    c.stop_and_compare();
}
