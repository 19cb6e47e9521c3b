//! The NBD server against the real clients users have: `nbdinfo`,
//! `nbdcopy` (libnbd-bin) and `qemu-io`, `qemu-img` (qemu-utils). Each test
//! serves a 64 MiB `MemBackend` on 127.0.0.1:0 from a tokio runtime on its
//! own thread and runs the clients under `timeout 60`. A missing client
//! fails the test with a clear message: CI installs them.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::Server;
use rand::{Rng, SeedableRng};
use serde_json::Value;

const SIZE: u64 = 64 << 20;

fn require(tool: &str, package: &str) {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path).any(|d| d.join(tool).is_file());
    assert!(
        found,
        "{tool} is not installed: install the Debian package {package} (CI does)"
    );
}

/// Runs `tool args` under `timeout 60`; returns its output, whatever the status.
fn run(tool: &str, args: &[&str]) -> Output {
    let package = if tool.starts_with("qemu") {
        "qemu-utils"
    } else {
        "libnbd-bin"
    };
    require(tool, package);
    require("timeout", "coreutils");
    let out = Command::new("timeout")
        .arg("60")
        .arg(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {tool}: {e}"));
    assert_ne!(out.status.code(), Some(124), "{tool} {args:?} timed out");
    out
}

/// Runs and requires success; returns stdout.
fn ok(tool: &str, args: &[&str]) -> String {
    let out = run(tool, args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{tool} {args:?} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// qemu-io with `-c` commands; every one must succeed (qemu-io exits
/// non-zero when a `read -P` pattern does not match).
fn qemu_io(uri: &str, cmds: &[&str]) -> Output {
    let mut args = vec!["-f", "raw", uri];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    run("qemu-io", &args)
}

fn qemu_io_ok(uri: &str, cmds: &[&str]) {
    let out = qemu_io(uri, cmds);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !text.contains("failed"),
        "qemu-io {cmds:?}:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `nbdinfo --map --json`: (offset, length, type) with type 0 = data, 3 = hole,zero.
fn nbd_map(uri: &str) -> Vec<(u64, u64, u64)> {
    let v: Value = serde_json::from_str(&ok("nbdinfo", &["--map", "--json", uri])).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["offset"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["type"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// The map type at `offset`.
fn kind_at(map: &[(u64, u64, u64)], offset: u64) -> u64 {
    map.iter()
        .find(|(o, l, _)| *o <= offset && offset < o + l)
        .unwrap_or_else(|| panic!("{offset} not in map {map:?}"))
        .2
}

#[test]
fn nbdinfo_reports_size_and_capabilities() {
    let s = Server::start(SIZE);
    let v: Value = serde_json::from_str(&ok("nbdinfo", &["--json", &s.uri()])).unwrap();
    assert_eq!(v["protocol"], "newstyle-fixed");
    assert_eq!(v["structured"], true);
    let e = &v["exports"][0];
    assert_eq!(e["export-name"], "test");
    assert_eq!(e["export-size"], SIZE);
    for cap in [
        "can_multi_conn",
        "can_trim",
        "can_zero",
        "can_fast_zero",
        "can_fua",
        "can_flush",
        "can_df",
    ] {
        assert_eq!(e[cap], true, "{cap}: {e}");
    }
    assert_eq!(e["is_read_only"], false);
    assert_eq!(e["block_size_minimum"], 4096);
    assert_eq!(e["block_size_preferred"], 4096);
    assert_eq!(e["block_size_maximum"], 32 << 20);
    assert!(
        e["contexts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c == "base:allocation"),
        "{e}"
    );
    // The default export (empty name) is the same device.
    let size = ok("nbdinfo", &["--size", &format!("nbd://{}", s.addr)]);
    assert_eq!(size.trim(), SIZE.to_string());
    // NBD_OPT_LIST names the export.
    assert!(ok("nbdinfo", &["--list", &s.uri()]).contains("export=\"test\""));
    // An unknown export is refused.
    let out = run("nbdinfo", &[&format!("nbd://{}/nope", s.addr)]);
    assert!(!out.status.success());
}

#[test]
fn qemu_io_patterns_at_aligned_and_unaligned_offsets() {
    let s = Server::start(SIZE);
    let uri = s.uri();
    qemu_io_ok(
        &uri,
        &[
            "write -P 0xab 0 64k",
            "write -P 0xcd 1536 512",
            "write -P 0xef 65535 2",
            "write -P 0x12 1048575 8193",
            "write -P 0x34 33554432 4m",
            "write -P 0x56 67108352 512",
        ],
    );
    // Read back on a new connection.
    qemu_io_ok(
        &uri,
        &[
            "read -P 0xab 0 1536",
            "read -P 0xcd 1536 512",
            "read -P 0xab 2048 63487",
            "read -P 0xef 65535 2",
            "read -P 0 65537 983038",
            "read -P 0x12 1048575 8193",
            "read -P 0x34 33554432 4m",
            "read -P 0x56 67108352 512",
        ],
    );
    // The check can fail: a wrong pattern is reported.
    let out = qemu_io(&uri, &["read -P 0x99 1536 512"]);
    assert!(!out.status.success() || String::from_utf8_lossy(&out.stdout).contains("failed"));
    // Out of range is refused.
    assert!(!qemu_io(&uri, &["read 67108864 512"]).status.success());
}

#[test]
fn qemu_io_zero_discard_flush_and_maps() {
    let s = Server::start(SIZE);
    let uri = s.uri();
    qemu_io_ok(
        &uri,
        &[
            "write -P 0x33 0 1m",
            "write -z 64k 64k",
            "write -z -u 256k 128k",
            "discard 512k 64k",
            "write -P 0x44 -f 768k 4k",
            "flush",
            "read -P 0 64k 64k",
            "read -P 0 256k 128k",
            "read -P 0x33 0 64k",
            "read -P 0x33 128k 128k",
            "read -P 0x33 384k 128k",
            "read -P 0x44 768k 4k",
        ],
    );
    let st = s.backend.stats();
    assert!(st.flushes >= 1, "{st:?}");
    assert!(st.fua_writes >= 1, "{st:?}");
    assert!(st.zeroes >= 2 && st.trims >= 1, "{st:?}");

    let map = nbd_map(&uri);
    assert_eq!(kind_at(&map, 0), 0);
    assert_eq!(kind_at(&map, 64 << 10), 0, "write -z without -u allocates");
    assert_eq!(kind_at(&map, 256 << 10), 3, "write -z -u punches");
    assert_eq!(kind_at(&map, (384 << 10) - 1), 3);
    assert_eq!(kind_at(&map, 384 << 10), 0);
    assert_eq!(kind_at(&map, 512 << 10), 3, "discard punches");
    assert_eq!(kind_at(&map, 576 << 10), 0);
    assert_eq!(kind_at(&map, 2 << 20), 3, "never written");
    assert_eq!(map.iter().map(|e| e.1).sum::<u64>(), SIZE);

    let out = ok("qemu-img", &["map", "-f", "raw", "--output=json", &uri]);
    let v: Value = serde_json::from_str(&out).unwrap();
    let at = |off: u64| {
        v.as_array()
            .unwrap()
            .iter()
            .find(|e| {
                e["start"].as_u64().unwrap() <= off
                    && off < e["start"].as_u64().unwrap() + e["length"].as_u64().unwrap()
            })
            .unwrap_or_else(|| panic!("{off} not in {out}"))
            .clone()
    };
    assert_eq!(
        (at(0)["data"].clone(), at(0)["zero"].clone()),
        (Value::Bool(true), Value::Bool(false))
    );
    assert_eq!(
        (at(300 << 10)["data"].clone(), at(300 << 10)["zero"].clone()),
        (Value::Bool(false), Value::Bool(true))
    );
    assert_eq!(at(10 << 20)["zero"], true);
    assert_eq!(at(10 << 20)["data"], false);
}

#[test]
fn nbdcopy_round_trip_of_8_mib() {
    let s = Server::start(SIZE);
    let uri = s.uri();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("in.bin");
    let dst = dir.path().join("out.bin");
    let mut data = vec![0u8; 8 << 20];
    rand::rngs::StdRng::seed_from_u64(42).fill(&mut data[..]);
    data[(3 << 20)..(5 << 20)].fill(0); // a zero run nbdcopy may send as zeroes
    std::fs::write(&src, &data).unwrap();

    ok("nbdcopy", &[path(&src), &uri]);
    ok("nbdcopy", &[&uri, path(&dst)]);
    let back = std::fs::read(&dst).unwrap();
    assert_eq!(back.len() as u64, SIZE);
    assert!(back[..data.len()] == data[..], "data read back differs");
    assert!(back[data.len()..].iter().all(|&b| b == 0));

    let map = nbd_map(&uri);
    assert_eq!(kind_at(&map, 1 << 20), 0);
    assert_eq!(kind_at(&map, 6 << 20), 0);
    assert_eq!(kind_at(&map, 20 << 20), 3);
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}
