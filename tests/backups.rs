//! End to end: backups of a live 3-way replicated volume through its
//! controller (`strata backup create VOLUME`), incremental by snapshot,
//! restored to a file and into another volume and read back by real
//! clients; a snapshot taken while fio writes restores to data fio's verify
//! accepts; schedules run in the controller with retention.

mod common;

use std::time::{Duration, Instant};

use common::{qemu_io, require, run, run_ok, strata, strata_json, Cluster};

const MIB: u64 = 1 << 20;

/// Writes of (pattern, offset, length) as qemu-io commands; reads checking them.
fn writes(list: &[(u8, u64, u64)]) -> Vec<String> {
    list.iter()
        .map(|(p, o, l)| format!("write -P {p} {o} {l}"))
        .collect()
}

fn reads(list: &[(u8, u64, u64)]) -> Vec<String> {
    list.iter()
        .map(|(p, o, l)| format!("read -P {p} {o} {l}"))
        .collect()
}

#[test]
fn incremental_backups_of_a_live_volume_restore_to_a_file_and_a_volume() {
    require("qemu-io");
    let mut c = Cluster::start(3, 256 * MIB);
    let ctl = c.control.to_string();
    let backups = tempfile::tempdir().unwrap();
    let url = format!("file://{}", backups.path().display());
    // 24 MiB in scattered places.
    let first: Vec<(u8, u64, u64)> = (0..24u64)
        .map(|i| (0x10 + i as u8, (i * 10 + 3) * MIB, MIB))
        .collect();
    qemu_io(&c.uri(), &writes(&first));
    let b1 = strata_json(&[
        "backup",
        "create",
        "vol",
        "--target",
        &url,
        "--controller",
        &ctl,
        "--json",
    ]);
    assert!(b1["parent"].is_null(), "{b1}");
    let read1 = b1["bytes_read"].as_u64().unwrap();
    assert!(
        (24 * MIB..=26 * MIB).contains(&read1),
        "a first backup reads the allocated ranges only: {b1}"
    );

    // Change 2 MiB: the next backup reads about that much.
    let change = [(0xe1u8, 33 * MIB, MIB), (0xe2u8, 200 * MIB, MIB)];
    qemu_io(&c.uri(), &writes(&change));
    let b2 = strata_json(&[
        "backup",
        "create",
        "vol",
        "--target",
        &url,
        "--controller",
        &ctl,
        "--json",
    ]);
    assert_eq!(b2["parent"], b1["id"], "{b2}");
    let read2 = b2["bytes_read"].as_u64().unwrap();
    assert!(
        read2 <= 4 * MIB,
        "an incremental backup reads what changed: {b2}"
    );
    let up2 = b2["bytes_uploaded"].as_u64().unwrap();
    assert!(up2 <= 4 * MIB, "and uploads about that: {b2}");

    // Only the newest backup snapshot is kept, as the next base (the older
    // one is deleted in the background).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let snaps = strata_json(&["snapshot", "ls", "vol", "--controller", &ctl, "--json"]);
        let names: Vec<String> = snaps["snapshots"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap().to_string())
            .collect();
        if names == [b2["snapshot"].as_str().unwrap()] {
            break;
        }
        assert!(Instant::now() < deadline, "{snaps}");
        std::thread::sleep(Duration::from_millis(200));
    }

    // The first backup restores to a sparse file holding the first state.
    let file = backups.path().join("restored-1.raw");
    let id1 = b1["id"].as_str().unwrap();
    strata_json(&[
        "backup",
        "restore",
        id1,
        "--to-file",
        file.to_str().unwrap(),
        "--target",
        &url,
        "--json",
    ]);
    qemu_io(file.to_str().unwrap(), &reads(&first));
    qemu_io(file.to_str().unwrap(), &["read -P 0 0 3M".to_string()]);

    // The second restores into another volume, through its controller.
    let mut other = Cluster::start(3, 256 * MIB);
    let octl = other.control.to_string();
    let id2 = b2["id"].as_str().unwrap();
    let r = strata_json(&[
        "backup",
        "restore",
        id2,
        "--to",
        "vol",
        "--target",
        &url,
        "--controller",
        &octl,
        "--json",
    ]);
    assert!(r["bytes_written"].as_u64().unwrap() <= 26 * MIB, "{r}");
    let mut expected: Vec<(u8, u64, u64)> = first
        .iter()
        .copied()
        .filter(|(_, o, _)| *o != 33 * MIB)
        .collect();
    expected.extend(change);
    qemu_io(&other.uri(), &reads(&expected));
    qemu_io(&other.uri(), &["read -P 0 0 3M".to_string()]);

    // A restore into a volume with a client attached is refused.
    let mut held = std::process::Command::new("qemu-io")
        .args(["-f", "raw", &other.uri()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while other.status()["attached_clients"] != 1 {
        assert!(Instant::now() < deadline, "{}", other.status());
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = strata(&[
        "backup",
        "restore",
        id2,
        "--to",
        "vol",
        "--target",
        &url,
        "--controller",
        &octl,
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("attached"), "{err}");
    drop(held.stdin.take());
    let _ = held.kill();
    let _ = held.wait();
    other.stop_and_compare();
    c.stop_and_compare();
}

#[test]
fn a_snapshot_taken_while_fio_writes_restores_to_data_fio_verifies() {
    require("fio");
    let mut c = Cluster::start(3, 256 * MIB);
    let ctl = c.control.to_string();
    let backups = tempfile::tempdir().unwrap();
    let url = format!("file://{}", backups.path().display());
    // Sequential writes, one at a time, each with a fio verify header:
    // what the snapshot holds is a prefix of them.
    let job = |extra: &[&str], target: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = vec![
            "--name=snap".into(),
            "--rw=write".into(),
            "--bs=64k".into(),
            "--iodepth=1".into(),
            "--verify=crc32c".into(),
            "--do_verify=0".into(),
            "--randrepeat=1".into(),
        ];
        a.extend(target.iter().map(|s| s.to_string()));
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let uri = format!("--uri={}", c.uri());
    let args = job(&["--size=128M", "--rate=24m"], &["--ioengine=nbd", &uri]);
    let writer = std::thread::spawn(move || {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        run("fio", &a, 120)
    });
    std::thread::sleep(Duration::from_secs(3));
    let b = strata_json(&[
        "backup",
        "create",
        "vol",
        "--target",
        &url,
        "--controller",
        &ctl,
        "--json",
    ]);
    let out = writer.join().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let file = backups.path().join("snap.raw");
    strata_json(&[
        "backup",
        "restore",
        b["id"].as_str().unwrap(),
        "--to-file",
        file.to_str().unwrap(),
        "--target",
        &url,
        "--json",
    ]);
    // The prefix fio had written when the snapshot was taken.
    let data = std::fs::read(&file).unwrap();
    let blocks = data.len() / (64 << 10);
    let written = (0..blocks)
        .rev()
        .find(|&i| {
            data[i * (64 << 10)..(i + 1) * (64 << 10)]
                .iter()
                .any(|b| *b != 0)
        })
        .map_or(0, |i| i + 1);
    assert!(
        (16..2048).contains(&written),
        "the snapshot should hold part of fio's run, not {written} blocks"
    );
    let size = format!("--size={}k", written * 64);
    let filename = format!("--filename={}", file.display());
    let verify = job(
        &[&size, "--verify_only=1", "--verify_fatal=1"],
        &["--ioengine=psync", &filename],
    );
    let a: Vec<&str> = verify.iter().map(String::as_str).collect();
    let out = run("fio", &a, 120);
    assert!(
        out.status.success(),
        "fio verify of the restored snapshot failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    c.stop_and_compare();
}

#[test]
fn schedules_run_in_the_controller_and_apply_retention() {
    require("qemu-io");
    let backups = tempfile::tempdir().unwrap();
    let url = format!("file://{}", backups.path().display());
    let schedule =
        format!(r#"{{"cron":"*/2 * * * * *","target":"{url}","retention":{{"keep_last":2}}}}"#);
    let mut c = Cluster::without_processes(64 * MIB);
    c.controller_args = vec!["--backup-schedule".into(), schedule];
    for i in 0..3 {
        let addr = common::free_addr();
        c.replica_addrs.push(addr);
        c.replicas.push(c.spawn_replica(i, addr));
    }
    c.start_controller();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut round = 0u8;
    loop {
        round = round.wrapping_add(1);
        qemu_io(&c.uri(), &[format!("write -P {round} 0 1M")]);
        let s = c.status();
        let runs: Vec<serde_json::Value> = (0..1).map(|i| s["schedules"][i].clone()).collect();
        if runs[0]["last_ok"] == true && round > 4 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no successful scheduled backup: {s}"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    // Let a few more runs happen, then check retention kept two.
    std::thread::sleep(Duration::from_secs(5));
    let list = strata_json(&["backup", "ls", "--target", &url, "--json"]);
    let n = list.as_array().map_or(0, |a| a.len());
    assert!(
        (1..=3).contains(&n),
        "retention keep_last=2 (a run may be between backup and forget): {list}"
    );
    let metrics = run_ok(
        "curl",
        &["-s", &format!("http://{}/metrics", c.metrics)],
        10,
    );
    assert!(
        metrics.contains("strata_backup_last_success{volume=\"vol\""),
        "{metrics}"
    );
    assert!(metrics.contains("strata_backup_runs_total"), "{metrics}");
    c.stop_and_compare();
}
