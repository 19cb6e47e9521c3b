//! The cluster key end to end: `strata key init`, three `replica serve`
//! processes and a `controller serve` all given `--cluster-key-file`, used by
//! qemu-io over NBD; a controller without the key cannot use the replicas;
//! the controller's management API refuses clients without the key.

mod common;

use std::net::SocketAddr;
use std::path::Path;

use common::{
    free_addr, recording_proxy, require, run, run_ok, send_raw, strata_bin, wait_listening, Proc,
};

fn key_init(path: &Path) -> std::process::Output {
    run(
        strata_bin().to_str().unwrap(),
        &["key", "init", "--out", path.to_str().unwrap()],
        30,
    )
}

fn replica(dir: &Path, i: usize, addr: SocketAddr, key: &Path) -> Proc {
    let args: Vec<String> = vec![
        "replica".into(),
        "serve".into(),
        "--dir".into(),
        dir.join(format!("replica-{i}")).display().to_string(),
        "--listen".into(),
        addr.to_string(),
        "--cluster-key-file".into(),
        key.display().to_string(),
    ];
    let mut p = Proc::spawn(&format!("replica-{i}"), &args, dir);
    wait_listening(addr, &mut p, 20);
    p
}

/// Three `replica serve` processes holding `key`.
fn keyed_replicas(dir: &Path, key: &Path) -> (Vec<SocketAddr>, Vec<Proc>) {
    let addrs: Vec<SocketAddr> = (0..3).map(|_| free_addr()).collect();
    let procs = addrs
        .iter()
        .enumerate()
        .map(|(i, a)| replica(dir, i, *a, key))
        .collect();
    (addrs, procs)
}

fn controller(
    dir: &Path,
    name: &str,
    replicas: &[SocketAddr],
    nbd: SocketAddr,
    key: Option<&Path>,
) -> Proc {
    controller_at(dir, name, replicas, nbd, free_addr(), key)
}

fn controller_at(
    dir: &Path,
    name: &str,
    replicas: &[SocketAddr],
    nbd: SocketAddr,
    control: SocketAddr,
    key: Option<&Path>,
) -> Proc {
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
    ];
    for a in replicas {
        args.push("--replica".into());
        args.push(a.to_string());
    }
    if let Some(key) = key {
        args.push("--cluster-key-file".into());
        args.push(key.display().to_string());
    }
    Proc::spawn(name, &args, dir)
}

#[test]
fn key_init_writes_a_private_key_once() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cluster.key");
    let out = key_init(&path);
    assert!(out.status.success(), "{out:?}");
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text.trim().len(), 64);
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    // Never printed, never overwritten.
    assert!(!String::from_utf8_lossy(&out.stdout).contains(text.trim()));
    let again = key_init(&path);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));
    assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
    // A malformed key file stops a server at start with a clear error.
    let bad = dir.path().join("bad.key");
    std::fs::write(&bad, "not a key").unwrap();
    let out = run(
        strata_bin().to_str().unwrap(),
        &[
            "replica",
            "serve",
            "--dir",
            dir.path().join("r").to_str().unwrap(),
            "--listen",
            &free_addr().to_string(),
            "--cluster-key-file",
            bad.to_str().unwrap(),
        ],
        30,
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("malformed"),
        "{out:?}"
    );
}

#[test]
fn keyed_replicas_serve_a_keyed_controller_and_refuse_a_keyless_one() {
    require("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("cluster.key");
    assert!(key_init(&key).status.success());
    let (addrs, _replicas) = keyed_replicas(dir.path(), &key);

    let nbd = free_addr();
    let mut c = controller(dir.path(), "controller", &addrs, nbd, Some(&key));
    wait_listening(nbd, &mut c, 30);
    let uri = format!("nbd://{nbd}/vol");
    run_ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x6d 4096 1M", &uri],
        60,
    );
    let out = run_ok(
        "qemu-io",
        &["-f", "raw", "-c", "read -P 0x6d 4096 1M", &uri],
        60,
    );
    assert!(!out.contains("verification failed"), "{out}");
    assert!(
        c.terminate(30),
        "controller did not stop:\n{}",
        c.log_text()
    );

    // Without the key, a controller cannot open the replicas: it never
    // serves NBD, and the replicas log the refusal.
    let nbd2 = free_addr();
    let mut keyless = controller(dir.path(), "keyless-controller", &addrs, nbd2, None);
    std::thread::sleep(std::time::Duration::from_secs(8));
    assert!(
        std::net::TcpStream::connect(nbd2).is_err(),
        "a keyless controller served the volume:\n{}",
        keyless.log_text()
    );
    keyless.kill9();
    let refused = (0..3).any(|i| {
        std::fs::read_to_string(dir.path().join(format!("replica-{i}.log")))
            .unwrap_or_default()
            .contains("without the cluster key")
    });
    assert!(refused, "no replica logged the refusal");

    // The keyed controller still sees the data.
    let nbd3 = free_addr();
    let mut c = controller(dir.path(), "controller-2", &addrs, nbd3, Some(&key));
    wait_listening(nbd3, &mut c, 30);
    let uri = format!("nbd://{nbd3}/vol");
    let out = run_ok(
        "qemu-io",
        &["-f", "raw", "-c", "read -P 0x6d 4096 1M", &uri],
        60,
    );
    assert!(!out.contains("verification failed"), "{out}");
    assert!(
        c.terminate(30),
        "controller did not stop:\n{}",
        c.log_text()
    );
}

/// `strata [--cluster-key-file KEY] snapshot ARGS --controller ADDR`.
fn snapshot_cmd(key: Option<&Path>, args: &[&str], controller: SocketAddr) -> std::process::Output {
    let mut all: Vec<String> = Vec::new();
    if let Some(k) = key {
        all.push("--cluster-key-file".into());
        all.push(k.display().to_string());
    }
    all.push("snapshot".into());
    all.extend(args.iter().map(|s| s.to_string()));
    all.push("--controller".into());
    all.push(controller.to_string());
    let refs: Vec<&str> = all.iter().map(|s| s.as_str()).collect();
    run(strata_bin().to_str().unwrap(), &refs, 60)
}

#[test]
fn keyed_controller_management_api_refuses_clients_without_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("cluster.key");
    let other = dir.path().join("other.key");
    assert!(key_init(&key).status.success());
    assert!(key_init(&other).status.success());
    let (addrs, _replicas) = keyed_replicas(dir.path(), &key);
    let (nbd, ctl) = (free_addr(), free_addr());
    let mut c = controller_at(dir.path(), "controller", &addrs, nbd, ctl, Some(&key));
    wait_listening(nbd, &mut c, 30);

    // With the key, through a relay that records the session: a snapshot
    // is taken. It is deleted again, so a replay that worked would show.
    let (relay, recorded) = recording_proxy(ctl);
    let out = snapshot_cmd(Some(&key), &["create", "vol", "recorded"], relay);
    assert!(out.status.success(), "{out:?}");
    let recorded = recorded.join().unwrap();
    assert!(recorded.len() > 100, "{} bytes recorded", recorded.len());
    let out = snapshot_cmd(Some(&key), &["rm", "vol", "recorded"], ctl);
    assert!(out.status.success(), "{out:?}");

    // Without the key: refused with the reason.
    let out = snapshot_cmd(None, &["create", "vol", "keyless"], ctl);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("requires the cluster key"), "{err}");
    // Every client of the API tells the user why (the refusal must not
    // race the first request into a bare "connection closed").
    for _ in 0..5 {
        let out = run(
            strata_bin().to_str().unwrap(),
            &["volume", "status", "--controller", &ctl.to_string()],
            60,
        );
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("requires the cluster key"), "{err}");
    }
    // With another cluster's key: refused, named.
    let out = snapshot_cmd(Some(&other), &["create", "vol", "wrong-key"], ctl);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("wrong cluster key"), "{err}");
    // The recorded session replayed on a new connection: the server's
    // challenge and its refusal, nothing more.
    let back = send_raw(ctl, &recorded);
    assert!(back.len() <= 80, "{} bytes came back", back.len());
    // Garbage before any handshake.
    for junk in [
        b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(),
        vec![0u8; 64],
        b"STRA\x01".to_vec(),
    ] {
        let back = send_raw(ctl, &junk);
        assert!(
            !String::from_utf8_lossy(&back).contains("recorded"),
            "junk got an answer"
        );
    }

    // Nothing changed; the keyed client is still served.
    let out = snapshot_cmd(Some(&key), &["ls", "vol", "--json"], ctl);
    assert!(out.status.success(), "{out:?}");
    let list = String::from_utf8_lossy(&out.stdout);
    for name in ["recorded", "keyless", "wrong-key"] {
        assert!(!list.contains(name), "snapshot {name} exists: {list}");
    }
    assert!(c.is_running(), "{}", c.log_text());
    assert!(
        c.log_text().contains("refused a peer"),
        "the controller logged no refusal:\n{}",
        c.log_text()
    );
    assert!(
        c.terminate(30),
        "controller did not stop:\n{}",
        c.log_text()
    );
}

#[test]
fn key_chap_prints_per_volume_credentials_only_with_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("cluster.key");
    assert!(key_init(&key).status.success());
    let bin = strata_bin();
    let chap = |volume: &str, key: Option<&Path>| {
        let mut args: Vec<&str> = Vec::new();
        if let Some(k) = key {
            args.extend(["--cluster-key-file", k.to_str().unwrap()]);
        }
        args.extend(["key", "chap", "--volume", volume]);
        run(bin.to_str().unwrap(), &args, 30)
    };
    // Without a key: refused, saying what is missing.
    let out = chap("vol", None);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("needs the cluster key"),
        "{out:?}"
    );
    // With it: the --chap-file format, the same every time, per volume.
    let a = chap("vol", Some(&key));
    assert!(a.status.success(), "{a:?}");
    let text = String::from_utf8_lossy(&a.stdout).into_owned();
    assert!(text.contains("username = strata-vol\n"), "{text}");
    assert!(
        text.contains("mutual_username = iqn.2026-11.io.strata:vol\n"),
        "{text}"
    );
    assert_eq!(chap("vol", Some(&key)).stdout, a.stdout);
    let b = chap("vol2", Some(&key));
    assert!(b.status.success());
    let secret = |t: &str| {
        t.lines()
            .find_map(|l| l.strip_prefix("secret = "))
            .map(str::to_string)
            .unwrap()
    };
    assert_ne!(secret(&text), secret(&String::from_utf8_lossy(&b.stdout)));
    // A name no volume can have is refused.
    let bad = chap("a b", Some(&key));
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not a volume name"));
}
