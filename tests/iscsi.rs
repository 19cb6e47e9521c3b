//! End-to-end iSCSI tests: real `strata` processes (replicas and a
//! controller with `--iscsi`) and real initiators (libiscsi's iscsi-ls,
//! iscsi-inq, iscsi-readcapacity16, iscsi-test-cu; qemu-io and qemu-img
//! over `iscsi://`), every client run with a deadline. A test whose client
//! is not installed prints why and passes without running (scripts/test-all.sh
//! installs them, so CI runs everything).

mod common;

use std::io::Write;
use std::net::SocketAddr;
use std::process::Command;

use common::*;

const IQN: &str = "iqn.2026-11.io.strata:vol";

/// True if every tool is installed; otherwise says which is missing.
fn have(tools: &[&str]) -> bool {
    for t in tools {
        let found = Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {t}"))
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if !found {
            eprintln!("SKIPPED: {t} is not installed (scripts/test-all.sh installs it)");
            return false;
        }
    }
    true
}

/// qemu-io/qemu-img can open iscsi:// only with qemu-block-extra.
fn qemu_has_iscsi() -> bool {
    if !have(&["qemu-img", "qemu-io"]) {
        return false;
    }
    let out = Command::new("qemu-img").arg("--help").output();
    let ok = out
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("iscsi"))
        .unwrap_or(false);
    if !ok {
        eprintln!("SKIPPED: qemu has no iscsi block driver (install the pinned qemu-block-extra, see scripts/test-all.sh)");
    }
    ok
}

/// A cluster whose controller also serves iSCSI.
fn iscsi_cluster(replicas: usize, size: u64, extra: &[String]) -> (Cluster, SocketAddr) {
    let mut c = Cluster::without_processes(size);
    let iscsi = free_addr();
    c.controller_args = vec!["--iscsi".into(), iscsi.to_string()];
    c.controller_args.extend(extra.iter().cloned());
    for i in 0..replicas {
        let addr = free_addr();
        c.replica_addrs.push(addr);
        c.replicas.push(c.spawn_replica(i, addr));
    }
    c.start_controller();
    let ctl = c.controller.as_mut().unwrap();
    wait_listening(iscsi, ctl, 30);
    (c, iscsi)
}

fn url(addr: SocketAddr) -> String {
    format!("iscsi://{addr}/{IQN}/0")
}

#[test]
fn libiscsi_tools_see_the_volume() {
    if !have(&["iscsi-ls", "iscsi-inq", "iscsi-readcapacity16"]) {
        return;
    }
    let (_c, addr) = iscsi_cluster(1, 64 << 20, &[]);
    let ls = run_ok("iscsi-ls", &["-s", &format!("iscsi://{addr}")], 30);
    assert!(
        ls.contains(&format!("Target:{IQN} Portal:{addr},1")),
        "{ls}"
    );
    assert!(ls.contains("Lun:0") && ls.contains("DIRECT_ACCESS"), "{ls}");
    let inq = run_ok("iscsi-inq", &[&url(addr)], 30);
    assert!(
        inq.contains("Peripheral Device Type:DIRECT_ACCESS"),
        "{inq}"
    );
    assert!(inq.contains("Vendor:STRATA"), "{inq}");
    let serial = run_ok("iscsi-inq", &["-e", "1", "-c", "0x80", &url(addr)], 30);
    assert!(serial.to_lowercase().contains("serial"), "{serial}");
    let cap = run_ok("iscsi-readcapacity16", &[&url(addr)], 30);
    assert!(cap.contains("LOGICAL BLOCK LENGTH IN BYTES:4096"), "{cap}");
    assert!(
        cap.contains(&format!(
            "RETURNED LOGICAL BLOCK ADDRESS:{}",
            (64 << 20) / 4096 - 1
        )),
        "{cap}"
    );
    assert!(cap.contains("Total size:67108864"), "{cap}");
    assert!(cap.contains("LBPME:1"), "{cap}");
}

fn sha(path: &std::path::Path) -> Vec<u8> {
    let data = std::fs::read(path).unwrap();
    let mut h = crc32fast::Hasher::new();
    h.update(&data);
    let mut v = h.finalize().to_be_bytes().to_vec();
    v.extend_from_slice(&(data.len() as u64).to_be_bytes());
    v
}

#[test]
fn qemu_round_trip_256mib_over_iscsi_and_nbd_with_three_replicas() {
    if !qemu_has_iscsi() {
        return;
    }
    let size = 256u64 << 20;
    let (mut c, addr) = iscsi_cluster(3, size, &[]);
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    {
        let mut f = std::fs::File::create(&src).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        for _ in 0..256 {
            rand::Rng::fill(&mut rand::thread_rng(), &mut buf[..]);
            f.write_all(&buf).unwrap();
        }
    }
    // In over iSCSI, out over iSCSI and over NBD: identical.
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            src.to_str().unwrap(),
            &url(addr),
        ],
        300,
    );
    let back = dir.path().join("back.raw");
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &url(addr),
            back.to_str().unwrap(),
        ],
        300,
    );
    assert_eq!(sha(&src), sha(&back), "iSCSI read-back differs");
    run_ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            src.to_str().unwrap(),
            &c.uri(),
        ],
        300,
    );
    // The other way round: written over NBD, read over iSCSI.
    run_ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0xc3 8M 3M", &c.uri()],
        60,
    );
    run_ok(
        "qemu-io",
        &["-f", "raw", "-c", "read -P 0xc3 8M 3M", &url(addr)],
        60,
    );
    // And a small write over iSCSI seen over NBD.
    run_ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x3c 100k 12k", &url(addr)],
        60,
    );
    run_ok(
        "qemu-io",
        &["-f", "raw", "-c", "read -P 0x3c 100k 12k", &c.uri()],
        60,
    );
    c.stop_and_compare();
}

#[test]
fn idle_session_with_keep_alives_keeps_working() {
    if !qemu_has_iscsi() {
        return;
    }
    let (_c, addr) = iscsi_cluster(1, 64 << 20, &[]);
    // qemu's iscsi driver sends a NOP-Out every 5 s and drops the session
    // if they go unanswered; 60 s idle between a write and a read.
    let out = run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x77 0 64k",
            "-c",
            "sleep 60000",
            "-c",
            "read -P 0x77 0 64k",
            &url(addr),
        ],
        120,
    );
    assert!(out.contains("read 65536/65536"), "{out}");
}

#[test]
fn chap_from_a_file() {
    if !have(&["iscsi-inq"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("chap");
    std::fs::write(&file, "username = alice\nsecret = alice-secret-12\n").unwrap();
    let (_c, addr) = iscsi_cluster(
        1,
        64 << 20,
        &["--chap-file".into(), file.display().to_string()],
    );
    let good = format!("iscsi://alice%alice-secret-12@{addr}/{IQN}/0");
    let out = run_ok("iscsi-inq", &[&good], 30);
    assert!(out.contains("Vendor:STRATA"), "{out}");
    for bad in [
        format!("iscsi://alice%wrong-secret-1@{addr}/{IQN}/0"),
        url(addr),
    ] {
        let out = run("iscsi-inq", &[&bad], 30);
        assert!(
            !out.status.success(),
            "login without the right secret must fail: {bad}"
        );
    }
}

/// Per-test results of one iscsi-test-cu suite run in verbose mode: a test
/// that passed while printing [SKIPPED] is a skip.
fn parse_cu(suite: &str, log: &str) -> Vec<(String, &'static str)> {
    let mut out = Vec::new();
    let mut cur: Option<String> = None;
    let mut skip = false;
    let finish =
        |cur: &mut Option<String>, r: &'static str, out: &mut Vec<(String, &'static str)>| {
            if let Some(t) = cur.take() {
                out.push((format!("{suite}.{t}"), r));
            }
        };
    for line in log.lines() {
        let mut text = line;
        if let Some(rest) = line.strip_prefix("  Test: ") {
            finish(&mut cur, "fail", &mut out);
            let (name, after) = rest.split_once(" ...").unwrap_or((rest, ""));
            cur = Some(name.to_string());
            skip = false;
            text = after;
        }
        let text = text.trim_start_matches(' ');
        if text.starts_with("passed") {
            let r = if skip { "skip" } else { "pass" };
            finish(&mut cur, r, &mut out);
        } else if text.starts_with("FAILED") {
            finish(&mut cur, "fail", &mut out);
        } else if cur.is_some() && text.contains("[SKIPPED]") {
            skip = true;
        }
    }
    finish(&mut cur, "fail", &mut out);
    out
}

/// The strata figures recorded in docs/iscsi-conformance.md.
fn recorded() -> (usize, usize) {
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/iscsi-conformance.md"
    ))
    .unwrap();
    let line = doc
        .lines()
        .find(|l| l.starts_with("strata   pass"))
        .expect("docs/iscsi-conformance.md has no `strata   pass` line");
    let nums: Vec<usize> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    (nums[0], nums[2]) // pass, fail
}

#[test]
fn iscsi_test_cu_pass_count_does_not_drop() {
    if !have(&["iscsi-test-cu"]) {
        return;
    }
    let (want_pass, want_fail) = recorded();
    let (_c, addr) = iscsi_cluster(3, 128 << 20, &[]);
    let list = run_ok("iscsi-test-cu", &["--list"], 30);
    let suites: Vec<&str> = list
        .lines()
        .filter(|l| l.starts_with("ALL.") && l.matches('.').count() == 1 && *l != "ALL.MultipathIO")
        .collect();
    let mut results = Vec::new();
    for s in &suites {
        let out = run(
            "iscsi-test-cu",
            &["--dataloss", "-v", "-t", s, &url(addr)],
            300,
        );
        let log = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        let got = parse_cu(s, &log);
        for t in list
            .lines()
            .filter(|l| l.starts_with(&format!("{s}.")) && l.matches('.').count() == 2)
        {
            let r = got
                .iter()
                .find(|(n, _)| n == t)
                .map(|(_, r)| *r)
                .unwrap_or("fail");
            results.push((t.to_string(), r));
        }
    }
    let count = |r| results.iter().filter(|(_, x)| *x == r).count();
    let (pass, skip, fail) = (count("pass"), count("skip"), count("fail"));
    let failed: Vec<&String> = results
        .iter()
        .filter(|(_, r)| *r == "fail")
        .map(|(n, _)| n)
        .collect();
    eprintln!("iscsi-test-cu: pass {pass} skip {skip} fail {fail}; failed: {failed:?}");
    assert!(
        pass >= want_pass,
        "pass count {pass} dropped below the recorded {want_pass}; failed: {failed:?}"
    );
    assert!(
        fail <= want_fail,
        "fail count {fail} is above the recorded {want_fail}: {failed:?}"
    );
}

#[test]
fn cu_parser() {
    let log = "    [SKIPPED] PERSISTENT RESERVE IN is not implemented.\n\
               Suite: X\n  Test: A ...passed\n  Test: B ...    [SKIPPED] nope\n    [SKIPPED] nope\npassed\n\
               \x20 Test: C ...    [FAILED] bad\nFAILED\n    1. x.c:1 - y\n  Test: D ...    noise\n\
               passed    [SKIPPED] PERSISTENT RESERVE IN is not implemented.\n  Test: E ...";
    let r = parse_cu("ALL.X", log);
    let want: Vec<(String, &str)> = [
        ("A", "pass"),
        ("B", "skip"),
        ("C", "fail"),
        ("D", "pass"),
        ("E", "fail"),
    ]
    .iter()
    .map(|(n, r)| (format!("ALL.X.{n}"), *r))
    .collect();
    assert_eq!(r, want);
}

/// A cluster whose replicas and controller all hold a new cluster key
/// (`--cluster-key-file`); the controller also serves iSCSI, with no CHAP
/// configured: it requires the credentials derived from the key.
fn keyed_iscsi_cluster(
    replicas: usize,
    size: u64,
    extra: &[String],
) -> (Cluster, SocketAddr, String) {
    let iscsi = free_addr();
    let mut args = vec!["--iscsi".to_string(), iscsi.to_string()];
    args.extend(extra.iter().cloned());
    let (mut c, key) = Cluster::start_keyed(replicas, size, &args);
    wait_listening(iscsi, c.controller.as_mut().unwrap(), 30);
    (c, iscsi, key.display().to_string())
}

/// `strata key chap`'s output, parsed as the --chap-file it is:
/// (username, secret, mutual_username, mutual_secret).
fn key_chap(key: &str, volume: &str) -> (String, String, String, String) {
    let out = strata_ok(&["--cluster-key-file", key, "key", "chap", "--volume", volume]);
    let get = |k: &str| {
        out.lines()
            .filter_map(|l| l.split_once('='))
            .find(|(name, _)| name.trim() == k)
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_else(|| panic!("no {k} in `strata key chap` output:\n{out}"))
    };
    (
        get("username"),
        get("secret"),
        get("mutual_username"),
        get("mutual_secret"),
    )
}

fn chap_url(addr: SocketAddr, user: &str, secret: &str) -> String {
    format!("iscsi://{user}%{secret}@{addr}/{IQN}/0")
}

#[test]
fn cluster_key_requires_derived_chap() {
    if !have(&["iscsi-inq", "iscsi-ls"]) {
        return;
    }
    let (c, addr, key) = keyed_iscsi_cluster(1, 64 << 20, &[]);
    let (user, secret, tuser, tsecret) = key_chap(&key, "vol");
    assert_eq!(user, "strata-vol");
    assert_eq!(tuser, IQN);
    assert!(secret.len() >= 12 && tsecret.len() >= 12 && secret != tsecret);

    // (a) No credentials: login refused, discovery refused, nothing read.
    let out = run("iscsi-inq", &[&url(addr)], 30);
    assert!(
        !out.status.success(),
        "a keyed target served an initiator without CHAP"
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("Vendor"));
    let out = run("iscsi-ls", &["-s", &format!("iscsi://{addr}")], 30);
    let listed = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!out.status.success() || !listed.contains(IQN), "{listed}");

    // (b) Wrong credentials: a wrong secret, the right secret under
    // another user, another volume's credentials, another key's.
    let other_key = c.dir.path().join("other.key").display().to_string();
    strata_ok(&["key", "init", "--out", &other_key]);
    let (_, other_volume_secret, _, _) = key_chap(&key, "vol2");
    let (_, other_key_secret, _, _) = key_chap(&other_key, "vol");
    assert_ne!(other_volume_secret, secret);
    assert_ne!(other_key_secret, secret);
    for (u, s) in [
        (user.as_str(), "wrong-secret-123"),
        ("strata-vol2", secret.as_str()),
        (user.as_str(), other_volume_secret.as_str()),
        (user.as_str(), other_key_secret.as_str()),
        (user.as_str(), tsecret.as_str()),
    ] {
        let out = run("iscsi-inq", &[&chap_url(addr, u, s)], 30);
        assert!(
            !out.status.success(),
            "login with wrong credentials ({u}) succeeded"
        );
    }

    // (c) What `strata key chap` printed works: inquiry, discovery, and
    // mutual CHAP (libiscsi checks the target's answer).
    let good = chap_url(addr, &user, &secret);
    let out = run_ok("iscsi-inq", &[&good], 30);
    assert!(out.contains("Vendor:STRATA"), "{out}");
    let ls = run_ok(
        "iscsi-ls",
        &["-s", &format!("iscsi://{user}%{secret}@{addr}")],
        30,
    );
    assert!(ls.contains(&format!("Target:{IQN}")), "{ls}");
    let mutual = format!("{good}?target_user={tuser}&target_password={tsecret}");
    let out = run_ok("iscsi-inq", &[&mutual], 30);
    assert!(out.contains("Vendor:STRATA"), "{out}");
    let forged = format!("{good}?target_user={tuser}&target_password=not-the-target-1");
    let out = run("iscsi-inq", &[&forged], 30);
    assert!(
        !out.status.success(),
        "the initiator accepted a target that does not know the mutual secret"
    );

    // The controller says which CHAP it requires, and never a secret.
    let log = c.controller.as_ref().unwrap().log_text();
    assert!(log.contains("derived from the cluster key"), "{log}");
    assert!(!log.contains(&secret) && !log.contains(&tsecret), "{log}");
}

#[test]
fn iscsi_test_cu_with_chap_from_the_cluster_key() {
    if !have(&["iscsi-test-cu"]) {
        return;
    }
    let (_c, addr, key) = keyed_iscsi_cluster(3, 64 << 20, &[]);
    let (user, secret, _, _) = key_chap(&key, "vol");
    let good = chap_url(addr, &user, &secret);
    // A few suites, each test logging in anew with CHAP; strata fails none
    // of them without CHAP (docs/iscsi-conformance.md).
    let mut passed = 0;
    for s in [
        "ALL.Inquiry",
        "ALL.Read10",
        "ALL.Write10",
        "ALL.CompareAndWrite",
    ] {
        let out = run("iscsi-test-cu", &["--dataloss", "-v", "-t", s, &good], 120);
        let log = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        let results = parse_cu(s, &log);
        assert!(!results.is_empty(), "{s}: no results:\n{log}");
        let failed: Vec<&String> = results
            .iter()
            .filter(|(_, r)| *r == "fail")
            .map(|(n, _)| n)
            .collect();
        assert!(failed.is_empty(), "{s} with CHAP: failed {failed:?}\n{log}");
        passed += results.iter().filter(|(_, r)| *r == "pass").count();
    }
    assert!(passed >= 10, "only {passed} tests passed");
    // Without credentials iscsi-test-cu cannot even log in.
    let out = run(
        "iscsi-test-cu",
        &["--dataloss", "-v", "-t", "ALL.Inquiry.Standard", &url(addr)],
        60,
    );
    let log =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && parse_cu("ALL.Inquiry", &log)
                .iter()
                .all(|(_, r)| *r != "pass"),
        "iscsi-test-cu ran without CHAP:\n{log}"
    );
}

#[test]
fn with_a_cluster_key_a_chap_file_still_wins_and_no_chap_opts_out() {
    if !have(&["iscsi-inq"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("chap");
    std::fs::write(&file, "username = alice\nsecret = alice-secret-12\n").unwrap();
    let (first, addr, key) = keyed_iscsi_cluster(
        1,
        64 << 20,
        &["--chap-file".into(), file.display().to_string()],
    );
    let out = run_ok(
        "iscsi-inq",
        &[&chap_url(addr, "alice", "alice-secret-12")],
        30,
    );
    assert!(out.contains("Vendor:STRATA"), "{out}");
    let (user, secret, _, _) = key_chap(&key, "vol");
    let out = run("iscsi-inq", &[&chap_url(addr, &user, &secret)], 30);
    assert!(
        !out.status.success(),
        "derived credentials beat --chap-file"
    );
    drop(first);

    let (c, addr, _) = keyed_iscsi_cluster(1, 64 << 20, &["--iscsi-no-chap".into()]);
    let out = run_ok("iscsi-inq", &[&url(addr)], 30);
    assert!(out.contains("Vendor:STRATA"), "{out}");
    let log = c.controller.as_ref().unwrap().log_text();
    assert!(log.contains("--iscsi-no-chap"), "{log}");
}
