//! NBD over TLS end to end: real `strata` processes holding a cluster key
//! and the GnuTLS clients users have (libnbd's nbdinfo over `nbds://` with
//! a `tls-psk-file`, qemu-io with a `tls-creds-psk` object), given the key
//! `strata key psk` prints. A plaintext client where TLS is required, a
//! wrong key, a wrong user name, garbage before the handshake or after
//! STARTTLS, and a recorded TLS session replayed all get nothing, and the
//! data is unchanged afterwards (read back with the right key).

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use common::*;

/// A cluster whose replicas and controller hold a new cluster key;
/// `extra` goes to `controller serve`. Returns the key file.
fn keyed_cluster(replicas: usize, extra: &[&str]) -> (Cluster, PathBuf) {
    let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    Cluster::start_keyed(replicas, 64 << 20, &extra)
}

/// `strata key psk` for `user`, saved as `dir/keys.psk` (qemu's layout; the
/// same file is libnbd's tls-psk-file). Returns the file.
fn psk_dir(key: &Path, volume: &str, user: &str, dir: &Path) -> PathBuf {
    let k = key.display().to_string();
    let line = strata_ok(&[
        "--cluster-key-file",
        &k,
        "key",
        "psk",
        "--volume",
        volume,
        "--username",
        user,
    ]);
    let (name, hex) = line.trim().split_once(':').expect("username:hexkey");
    assert_eq!(name, user);
    assert_eq!(hex.len(), 64, "{line}");
    assert!(hex.bytes().all(|b| b.is_ascii_hexdigit()), "{line}");
    std::fs::create_dir_all(dir).unwrap();
    let file = dir.join("keys.psk");
    std::fs::write(&file, &line).unwrap();
    file
}

/// A psktool file with a random key for `user`.
fn wrong_psk_dir(user: &str, dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let hex: String = (0..32)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect();
    let file = dir.join("keys.psk");
    std::fs::write(&file, format!("{user}:{hex}\n")).unwrap();
    file
}

fn nbds(addr: SocketAddr, user: &str, volume: &str, psk: &Path) -> String {
    format!(
        "nbds://{user}@{addr}/{volume}?tls-psk-file={}",
        psk.display()
    )
}

/// qemu-io over TLS with the PSK in `dir` (keys.psk) for `user`.
fn qemu_io_tls(addr: SocketAddr, dir: &Path, user: &str, cmds: &[&str]) -> std::process::Output {
    let object = format!(
        "tls-creds-psk,id=tls0,endpoint=client,dir={},username={user}",
        dir.display()
    );
    let image = format!(
        "driver=nbd,host={},port={},export=vol,tls-creds=tls0",
        addr.ip(),
        addr.port()
    );
    let mut args = vec!["--object", &object, "--image-opts", &image];
    for c in cmds {
        args.extend(["-c", c]);
    }
    run("qemu-io", &args, 60)
}

fn assert_ok(out: &std::process::Output) -> String {
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && !text.contains("Pattern verification failed"),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

fn assert_refused(out: &std::process::Output, what: &str) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "{what} was served:\n{}\n{err}",
        String::from_utf8_lossy(&out.stdout)
    );
    err
}

/// The greeting, client flags and `NBD_OPT_STARTTLS`; waits for the ACK.
fn start_tls_raw(addr: SocketAddr) -> std::net::TcpStream {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting[..16], b"NBDMAGICIHAVEOPT");
    s.write_all(&STARTTLS_PREFIX).unwrap();
    let mut ack = [0u8; 20];
    s.read_exact(&mut ack).unwrap();
    assert_eq!(&ack[8..16], &[0, 0, 0, 5, 0, 0, 0, 1], "STARTTLS not acked");
    s
}

/// Client flags (fixed newstyle, no zeroes), then `NBD_OPT_STARTTLS`.
const STARTTLS_PREFIX: [u8; 20] = [
    0, 0, 0, 3, b'I', b'H', b'A', b'V', b'E', b'O', b'P', b'T', 0, 0, 0, 5, 0, 0, 0, 0,
];

/// Reads until the server closes (EOF, or a reset: it closed with our
/// bytes unread); returns the byte count. Fails after 10 s.
fn drain(mut s: std::net::TcpStream) -> usize {
    use std::io::{ErrorKind, Read};
    let mut n = 0;
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return n,
            Ok(k) => n += k,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return n,
            Err(e) => panic!("the server kept the connection open: {e}"),
        }
    }
}

#[test]
fn tls_offered_with_a_key_serves_nbdinfo_and_qemu_io_over_nbds() {
    require("nbdinfo");
    require("qemu-io");
    let (c, key) = keyed_cluster(3, &[]);
    let dir = c.dir.path().join("psk");
    let file = psk_dir(&key, "vol", "strata", &dir);

    let info = run_ok("nbdinfo", &[&nbds(c.nbd, "strata", "vol", &file)], 30);
    assert!(info.contains("with TLS"), "{info}");
    assert!(info.contains("export-size: 67108864"), "{info}");

    let out = qemu_io_tls(
        c.nbd,
        &dir,
        "strata",
        &["write -P 0xab 0 1M", "read -P 0xab 0 1M", "read -P 0 1M 1M"],
    );
    let text = assert_ok(&out);
    assert!(text.contains("wrote 1048576/1048576"), "{text}");
    assert!(text.contains("read 1048576/1048576"), "{text}");

    // Offered, not required: the kernel NBD client's plaintext path still
    // works (a NetworkPolicy guards it), and sees what TLS wrote.
    let info = run_ok("nbdinfo", &[&c.uri()], 30);
    assert!(info.contains("without TLS"), "{info}");
    qemu_io(&c.uri(), &["read -P 0xab 0 1M"]);
}

#[test]
fn tls_required_refuses_plaintext_wrong_keys_garbage_and_replays() {
    require("nbdinfo");
    require("qemu-io");
    let (mut c, key) = keyed_cluster(1, &["--nbd-tls", "require"]);
    let dir = c.dir.path().join("psk");
    let file = psk_dir(&key, "vol", "strata", &dir);
    let good = |cmds: &[&str]| assert_ok(&qemu_io_tls(c.nbd, &dir, "strata", cmds));
    good(&["write -P 0xcd 0 1M"]);

    // Plaintext: every option before STARTTLS is refused.
    let out = run("qemu-io", &["-f", "raw", "-c", "read 0 4k", &c.uri()], 30);
    let err = assert_refused(&out, "plaintext qemu-io");
    assert!(err.contains("TLS is required"), "{err}");
    let out = run("nbdinfo", &[&c.uri()], 30);
    assert_refused(&out, "plaintext nbdinfo");
    let out = run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0 0 1M", &c.uri()],
        30,
    );
    assert_refused(&out, "plaintext qemu-io write");

    // A wrong key, as nbdinfo and as a qemu-io write.
    let bad = c.dir.path().join("bad");
    let bad_file = wrong_psk_dir("strata", &bad);
    let out = run("nbdinfo", &[&nbds(c.nbd, "strata", "vol", &bad_file)], 30);
    let err = assert_refused(&out, "a wrong PSK");
    assert!(err.contains("TLS") || err.contains("tls"), "{err}");
    let out = qemu_io_tls(c.nbd, &bad, "strata", &["write -P 0 0 1M"]);
    let err = assert_refused(&out, "a qemu-io write with a wrong PSK");
    assert!(err.contains("TLS handshake failed"), "{err}");

    // The right key under another user name (another volume's key too).
    let alice = c.dir.path().join("alice");
    let alice_file = psk_dir(&key, "vol", "alice", &alice);
    let out = run("nbdinfo", &[&nbds(c.nbd, "alice", "vol", &alice_file)], 30);
    assert_refused(&out, "an unknown PSK identity");
    let other = c.dir.path().join("other");
    psk_dir(&key, "other-volume", "strata", &other);
    let out = qemu_io_tls(c.nbd, &other, "strata", &["write -P 0 0 1M"]);
    assert_refused(&out, "another volume's PSK");

    // Garbage instead of a ClientHello after STARTTLS, and instead of the
    // client flags: the connection closes, the server serves on.
    let mut s = start_tls_raw(c.nbd);
    std::io::Write::write_all(&mut s, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    drain(s);
    for junk in [b"GARBAGE!GARBAGE!GARBAGE!".to_vec(), vec![0u8; 64]] {
        let back = send_raw(c.nbd, &junk);
        assert!(back.len() <= 18, "{} bytes came back", back.len());
    }

    // A recorded TLS session that writes 0xee at 2M, replayed after the
    // area was overwritten with 0x11: the replay changes nothing.
    let (relay, recorded) = recording_proxy(c.nbd);
    assert_ok(&qemu_io_tls(
        relay,
        &dir,
        "strata",
        &["write -P 0xee 2M 64k"],
    ));
    let recorded = recorded.join().unwrap();
    assert_eq!(
        &recorded[..20],
        &STARTTLS_PREFIX,
        "qemu starts with STARTTLS"
    );
    assert!(recorded.len() > 65536, "{} bytes recorded", recorded.len());
    good(&["write -P 0x11 2M 64k"]);
    // Replayed at once: plaintext after STARTTLS, refused before any TLS.
    let back = send_raw(c.nbd, &recorded);
    assert!(back.len() <= 18 + 20, "{} bytes came back", back.len());
    // Replayed as a client would, the TLS part after the ACK: the
    // handshake fails (the server's fresh random and key share).
    let mut s = start_tls_raw(c.nbd);
    let _ = std::io::Write::write_all(&mut s, &recorded[20..]);
    let back = drain(s);
    assert!(back > 0 && back < 4096, "{back} bytes came back");

    good(&[
        "read -P 0xcd 0 1M",
        "read -P 0x11 2M 64k",
        "read -P 0 1M 1M",
    ]);
    let ctl = c.controller.as_mut().unwrap();
    assert!(ctl.is_running());
    let log = ctl.log_text();
    assert!(log.contains("refused a peer"), "no refusal logged:\n{log}");
    let hex = std::fs::read_to_string(&file).unwrap();
    let hex = hex.trim().split_once(':').unwrap().1;
    assert!(!log.contains(hex), "the PSK is in the log");
    c.stop_clean();
}

#[test]
fn keyless_controller_refuses_starttls_and_nbds() {
    require("nbdinfo");
    require("qemu-io");
    if std::env::var_os("STRATA_CLUSTER_KEY_FILE").is_some() {
        eprintln!(
            "SKIPPED: the environment gives a cluster key; this test needs a keyless controller"
        );
        return;
    }
    let c = Cluster::start(1, 64 << 20);
    let dir = c.dir.path().join("psk");
    let file = wrong_psk_dir("strata", &dir);
    let out = run("nbdinfo", &[&nbds(c.nbd, "strata", "vol", &file)], 30);
    assert_refused(&out, "nbds:// on a keyless controller");
    let out = qemu_io_tls(c.nbd, &dir, "strata", &["read 0 4k"]);
    let err = assert_refused(&out, "qemu-io with TLS on a keyless controller");
    assert!(err.contains("TLS is not offered"), "{err}");
    // Plaintext as before.
    qemu_io(&c.uri(), &["write -P 0x5a 0 64k", "read -P 0x5a 0 64k"]);

    // `--nbd-tls require` without a key: a clear startup error.
    let out = strata(&[
        "controller",
        "serve",
        "--volume",
        "v",
        "--replica",
        "127.0.0.1:1",
        "--nbd-tls",
        "require",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--nbd-tls require needs the cluster key"),
        "{err}"
    );
    let out = strata(&["key", "psk", "--volume", "vol"]);
    assert!(!out.status.success());
}
