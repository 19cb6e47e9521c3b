//! Replica wire encryption end to end: three keyed `replica serve`
//! processes, a relay in front of one of them that records every byte both
//! ways, and a keyed `controller serve` used by qemu-io over NBD. Without
//! `--encrypt-replica-wire` the written pattern crosses the relay as it is;
//! with it the pattern never appears, and the data reads back, also in
//! the copies that resync a returning replica. A replica with
//! `--require-wire-encryption` refuses a controller that does not
//! encrypt.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{free_addr, require, run, run_ok, strata_bin, wait_listening, Proc};

fn key_init(path: &Path) {
    let out = run(
        strata_bin().to_str().unwrap(),
        &["key", "init", "--out", path.to_str().unwrap()],
        30,
    );
    assert!(out.status.success(), "{out:?}");
}

fn replica(dir: &Path, i: usize, key: &Path, extra: &[&str]) -> (SocketAddr, Proc) {
    let addr = free_addr();
    (addr, replica_at(addr, dir, i, key, extra))
}

/// Replica `i` (its directory under `dir`) serving on `addr`.
fn replica_at(addr: SocketAddr, dir: &Path, i: usize, key: &Path, extra: &[&str]) -> Proc {
    let mut args: Vec<String> = vec![
        "replica".into(),
        "serve".into(),
        "--dir".into(),
        dir.join(format!("replica-{i}")).display().to_string(),
        "--listen".into(),
        addr.to_string(),
        "--cluster-key-file".into(),
        key.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let mut p = Proc::spawn(&format!("replica-{i}"), &args, dir);
    wait_listening(addr, &mut p, 20);
    p
}

fn controller(
    dir: &Path,
    name: &str,
    replicas: &[SocketAddr],
    key: &Path,
    encrypt: bool,
) -> (SocketAddr, Proc) {
    let (nbd, _, p) = controller_with_control(dir, name, replicas, key, encrypt);
    (nbd, p)
}

/// [`controller`], also returning its management address.
fn controller_with_control(
    dir: &Path,
    name: &str,
    replicas: &[SocketAddr],
    key: &Path,
    encrypt: bool,
) -> (SocketAddr, SocketAddr, Proc) {
    let (nbd, control) = (free_addr(), free_addr());
    let mut args: Vec<String> = vec![
        "controller".into(),
        "serve".into(),
        "--volume".into(),
        "vol".into(),
        "--nbd".into(),
        nbd.to_string(),
        "--control".into(),
        control.to_string(),
        "--metrics".into(),
        free_addr().to_string(),
        "--create-size".into(),
        (64u64 << 20).to_string(),
        "--io-timeout-secs".into(),
        "5".into(),
        "--cluster-key-file".into(),
        key.display().to_string(),
    ];
    for a in replicas {
        args.push("--replica".into());
        args.push(a.to_string());
    }
    if encrypt {
        args.push("--encrypt-replica-wire".into());
    }
    (nbd, control, Proc::spawn(name, &args, dir))
}

/// A TCP relay to `target` for any number of connections, recording the
/// bytes of both directions.
fn recording_relay(target: SocketAddr) -> (SocketAddr, Arc<Mutex<Vec<u8>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let recorded = Arc::new(Mutex::new(Vec::new()));
    let rec = recorded.clone();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { continue };
            let Ok(server) = TcpStream::connect(target) else {
                continue;
            };
            pipe(
                client.try_clone().unwrap(),
                server.try_clone().unwrap(),
                rec.clone(),
            );
            pipe(server, client, rec.clone());
        }
    });
    (addr, recorded)
}

fn pipe(mut from: TcpStream, mut to: TcpStream, rec: Arc<Mutex<Vec<u8>>>) {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    rec.lock().unwrap().extend_from_slice(&buf[..n]);
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}

/// The longest run of `byte` in `buf`.
fn longest_run(buf: &[u8], byte: u8) -> usize {
    let (mut best, mut run) = (0, 0);
    for &b in buf {
        run = if b == byte { run + 1 } else { 0 };
        best = best.max(run);
    }
    best
}

fn qemu_io(nbd: SocketAddr, cmd: &str) {
    let uri = format!("nbd://{nbd}/vol");
    let out = run_ok("qemu-io", &["-f", "raw", "-c", cmd, &uri], 60);
    assert!(!out.contains("verification failed"), "{cmd}: {out}");
}

#[test]
fn encrypted_replica_wire_hides_the_data_and_reads_back() {
    require("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("cluster.key");
    key_init(&key);
    let (r0, _p0) = replica(dir.path(), 0, &key, &[]);
    let (r1, _p1) = replica(dir.path(), 1, &key, &[]);
    let (r2, _p2) = replica(dir.path(), 2, &key, &[]);
    let (relay, recorded) = recording_relay(r0);
    let replicas = [relay, r1, r2];

    // Integrity only: the pattern crosses the relay readable (so the
    // check below can fail).
    let (nbd, mut c) = controller(dir.path(), "plain-controller", &replicas, &key, false);
    wait_listening(nbd, &mut c, 30);
    qemu_io(nbd, "write -P 0x6d 4096 1M");
    assert!(
        c.terminate(30),
        "controller did not stop:\n{}",
        c.log_text()
    );
    let plain = std::mem::take(&mut *recorded.lock().unwrap());
    eprintln!(
        "integrity only: {} bytes relayed, longest run of 0x6d {}",
        plain.len(),
        longest_run(&plain, 0x6d)
    );
    assert!(
        longest_run(&plain, 0x6d) >= 64 << 10,
        "the integrity-only wire did not carry the pattern readable ({} bytes recorded)",
        plain.len()
    );

    // Encrypted: the same relay sees only ciphertext.
    let (nbd, mut c) = controller(dir.path(), "encrypted-controller", &replicas, &key, true);
    wait_listening(nbd, &mut c, 30);
    qemu_io(nbd, "write -P 0x3c 2M 1M");
    qemu_io(nbd, "read -P 0x3c 2M 1M");
    qemu_io(nbd, "read -P 0x6d 4096 1M");
    assert!(
        c.terminate(30),
        "controller did not stop:\n{}",
        c.log_text()
    );
    let sealed = std::mem::take(&mut *recorded.lock().unwrap());
    eprintln!(
        "encrypted: {} bytes relayed, longest runs of 0x3c {} and 0x6d {}",
        sealed.len(),
        longest_run(&sealed, 0x3c),
        longest_run(&sealed, 0x6d)
    );
    assert!(sealed.len() > 1 << 20, "{} bytes recorded", sealed.len());
    for byte in [0x3c, 0x6d] {
        let run = longest_run(&sealed, byte);
        assert!(
            run < 32,
            "a run of {run} bytes {byte:#x} crossed the encrypted wire"
        );
    }
    assert!(
        c.log_text().contains("encrypted"),
        "the controller did not say it encrypts:\n{}",
        c.log_text()
    );
}

#[test]
fn a_replica_requiring_encryption_refuses_a_plain_controller() {
    require("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("cluster.key");
    key_init(&key);
    let bin = strata_bin();

    // The flags need the key: refused at start, saying so.
    for args in [
        vec![
            "controller",
            "serve",
            "--volume",
            "v",
            "--replica",
            "127.0.0.1:1",
            "--encrypt-replica-wire",
        ],
        vec![
            "replica",
            "serve",
            "--dir",
            "/nonexistent",
            "--require-wire-encryption",
        ],
    ] {
        let out = run(bin.to_str().unwrap(), &args, 30);
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("needs the cluster key"), "{args:?}: {err}");
    }

    let (r0, p0) = replica(dir.path(), 0, &key, &["--require-wire-encryption"]);
    let (nbd, mut plain) = controller(dir.path(), "plain-controller", &[r0], &key, false);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !p0.log_text().contains("requires wire encryption") {
        assert!(
            Instant::now() < deadline,
            "no refusal logged:\n{}",
            p0.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        TcpStream::connect(nbd).is_err(),
        "a plain controller served the volume:\n{}",
        plain.log_text()
    );
    plain.kill9();

    let (nbd, mut c) = controller(dir.path(), "encrypted-controller", &[r0], &key, true);
    wait_listening(nbd, &mut c, 30);
    qemu_io(nbd, "write -P 0x5a 0 64k");
    qemu_io(nbd, "read -P 0x5a 0 64k");
    assert!(
        c.terminate(30),
        "controller did not stop:\n{}",
        c.log_text()
    );
}

/// The copies that bring a replica back (its resync after a restart) go
/// through encrypted records too, including the returning replica's own
/// connection to the peer it copies from (PULL): every replica is behind a
/// relay, replica 0 is stopped, the volume written without it, and the
/// relays, cleared, record its return until the volume is healthy.
#[test]
fn a_returning_replica_is_resynced_through_encrypted_records() {
    require("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("cluster.key");
    key_init(&key);
    let (r0, mut p0) = replica(dir.path(), 0, &key, &[]);
    let (r1, _p1) = replica(dir.path(), 1, &key, &[]);
    let (r2, _p2) = replica(dir.path(), 2, &key, &[]);
    let relays: Vec<_> = [r0, r1, r2].into_iter().map(recording_relay).collect();
    let addrs: Vec<_> = relays.iter().map(|r| r.0).collect();
    let (nbd, control, mut c) =
        controller_with_control(dir.path(), "controller", &addrs, &key, true);
    wait_listening(nbd, &mut c, 30);
    qemu_io(nbd, "write -P 0x11 0 1M");

    p0.kill9();
    qemu_io(nbd, "write -P 0x77 4M 4M");
    for (_, recorded) in &relays {
        recorded.lock().unwrap().clear();
    }
    let _p0 = replica_at(r0, dir.path(), 0, &key, &[]);

    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = run(
            strata_bin().to_str().unwrap(),
            &[
                "--cluster-key-file",
                key.to_str().unwrap(),
                "volume",
                "status",
                "--json",
                "--controller",
                &control.to_string(),
            ],
            30,
        );
        let status: serde_json::Value =
            serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
        if status["state"] == "healthy" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not healthy after 60 s: {status}\n{}",
            c.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let resync: Vec<u8> = relays
        .iter()
        .flat_map(|(_, recorded)| std::mem::take(&mut *recorded.lock().unwrap()))
        .collect();
    eprintln!(
        "resync: {} bytes relayed, longest run of 0x77 {}",
        resync.len(),
        longest_run(&resync, 0x77)
    );
    assert!(
        resync.len() >= 4 << 20,
        "the 4 MiB written without the replica did not cross the relay ({} bytes)",
        resync.len()
    );
    let run = longest_run(&resync, 0x77);
    assert!(run < 32, "a run of {run} bytes 0x77 crossed the wire");
    let log = c.log_text();
    assert!(
        !log.contains("relays its copies"),
        "replica 0 did not copy from its peer itself:\n{log}"
    );
    qemu_io(nbd, "read -P 0x77 4M 4M");
    qemu_io(nbd, "read -P 0x11 0 1M");
    assert!(
        c.terminate(30),
        "controller did not stop:\n{}",
        c.log_text()
    );
}
