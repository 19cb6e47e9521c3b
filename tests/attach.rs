//! End to end: `strata-attach` against a real 3-replica volume.
//!
//! - the userspace NBD handshake against the real controller (size, flags,
//!   block sizes; a missing export and an absent controller are typed
//!   errors);
//! - the nbdfuse + loop fallback on this host (whose kernel has no nbd
//!   module): `strata volume attach` picks it and says so, ext4 on it
//!   survives a write, detach, re-attach and `e2fsck -fn`, and nothing is
//!   left attached afterwards.
//! - NBD over TLS: a controller with `--nbd-tls require` is attached by a
//!   key holder through nbdfuse over `nbds://` (data written through the
//!   loop device reads back after a re-attach; the PSK file is private and
//!   goes at detach), and refused with a message naming TLS and the key to
//!   one without the key (or with another key), leaving nothing behind.
//!
//! The kernel nbd path needs a kernel with the nbd module: it is tested in a
//! VM by scripts/vm-attach-test.sh.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{require, run, run_ok, Cluster};
use strata_attach::handshake::{self, HandshakeError, NBD_FLAG_HAS_FLAGS};
use strata_attach::{AttachError, AttachOptions, Method, MethodChoice, NbdUri};

const MIB: u64 = 1 << 20;

#[test]
fn handshake_against_a_real_controller() {
    let c = Cluster::start(3, 64 * MIB);
    let uri = NbdUri::parse(&c.uri()).unwrap();
    let conn = handshake::connect(&uri, Duration::from_secs(10)).unwrap();
    assert_eq!(conn.info.size, 64 * MIB);
    assert_ne!(conn.info.flags & NBD_FLAG_HAS_FLAGS, 0);
    assert!(!conn.info.read_only());
    assert_eq!(conn.info.min_block, 4096);
    assert_eq!(conn.info.device_block_size(), 4096);
    // The socket is in transmission: an NBD_CMD_READ of block 0 answers.
    use std::io::{Read, Write};
    let mut s = conn.stream;
    let mut req = Vec::new();
    req.extend_from_slice(&0x2560_9513u32.to_be_bytes());
    req.extend_from_slice(&0u16.to_be_bytes()); // flags
    req.extend_from_slice(&0u16.to_be_bytes()); // NBD_CMD_READ
    req.extend_from_slice(&7u64.to_be_bytes()); // cookie
    req.extend_from_slice(&0u64.to_be_bytes()); // offset
    req.extend_from_slice(&4096u32.to_be_bytes());
    s.write_all(&req).unwrap();
    let mut reply = [0u8; 16 + 4096];
    s.read_exact(&mut reply).unwrap();
    assert_eq!(&reply[0..4], &0x6744_6698u32.to_be_bytes());
    assert_eq!(&reply[4..8], &[0, 0, 0, 0], "error field");
    assert_eq!(&reply[8..16], &7u64.to_be_bytes());

    // A volume this controller does not serve.
    let other = NbdUri::parse(&format!("nbd://{}/nope", c.nbd)).unwrap();
    let e = handshake::connect(&other, Duration::from_secs(10)).unwrap_err();
    assert!(
        matches!(
            &e,
            handshake::ConnectError::Handshake {
                source: HandshakeError::ExportMissing { export, .. },
                ..
            } if export == "nope"
        ),
        "{e:?}"
    );
    assert!(e.is_refusal());
    let dir = tempfile::tempdir().unwrap();
    let opts = AttachOptions {
        state_dir: dir.path().to_path_buf(),
        ..AttachOptions::default()
    };
    let e = strata_attach::attach(&format!("nbd://{}/nope", c.nbd), &opts).unwrap_err();
    assert!(matches!(e, AttachError::ExportMissing { .. }), "{e:?}");
    // Only the kernel path allowed: on a kernel without the nbd module
    // (this machine) that is a NoMethod error naming the missing module.
    let only_kernel = AttachOptions {
        methods: MethodChoice::Only(Method::KernelNbd),
        ..opts.clone()
    };
    match strata_attach::attach(&c.uri(), &only_kernel) {
        Err(AttachError::NoMethod(why)) => assert!(why.contains("no nbd kernel module"), "{why}"),
        Err(e) => panic!("{e:?}"),
        Ok(a) => {
            // A host whose kernel has the module (modprobe loaded it).
            strata_attach::detach(&a.attachment.device, dir.path()).unwrap();
        }
    }
    assert!(strata_attach::state::load_all(dir.path())
        .unwrap()
        .is_empty());
}

#[test]
fn attach_to_an_absent_controller_fails_cleanly() {
    let addr = common::free_addr();
    let dir = tempfile::tempdir().unwrap();
    let out = run(
        common::strata_bin().to_str().unwrap(),
        &[
            "volume",
            "attach",
            &format!("nbd://{addr}/vol"),
            "--state-dir",
            dir.path().to_str().unwrap(),
        ],
        30,
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Cannot reach the controller"), "{err}");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

fn strata(args: &[&str], state: &Path) -> std::process::Output {
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--state-dir", state.to_str().unwrap()]);
    run(common::strata_bin().to_str().unwrap(), &all, 60)
}

fn ok(out: std::process::Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn nbdfuse_fallback_carries_ext4() {
    require("nbdfuse");
    require("losetup");
    require("mkfs.ext4");
    require("fusermount3");
    assert!(
        nix_is_root(),
        "the nbdfuse fallback test needs root (loop devices, mount)"
    );
    let c = Cluster::start(3, 64 * MIB);
    let state = tempfile::tempdir().unwrap();
    let mnt = tempfile::tempdir().unwrap();
    // Whatever happens below, nothing stays mounted or attached.
    let _cleanup = Cleanup {
        mnt: mnt.path().to_path_buf(),
        state: state.path().to_path_buf(),
    };
    let kernel_nbd = Path::new("/sys/module/nbd").exists();
    // On this machine (no nbd module, no iscsiadm) `auto` must pick the
    // fallback by itself; elsewhere ask for it.
    let method = if kernel_nbd { "nbdfuse" } else { "auto" };
    let control = c.control.to_string();
    let with_controller = [
        "volume",
        "attach",
        &c.uri(),
        "--method",
        method,
        "--controller",
        &control,
    ];
    let out = strata(&with_controller, state.path());
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let dev = ok(out, "attach").trim().to_string();
    assert!(dev.starts_with("/dev/loop"), "{dev}");
    assert!(stderr.contains("via nbdfuse+loop"), "{stderr}");
    assert!(
        stderr.contains("SLOW"),
        "the slow path must say so: {stderr}"
    );
    if !kernel_nbd {
        assert!(stderr.contains("skipped kernel-nbd"), "{stderr}");
    }
    // A second attach of the same volume is refused.
    let again = strata(
        &["volume", "attach", &c.uri(), "--method", method],
        state.path(),
    );
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("already attached"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    // Attached "elsewhere" (another state directory stands for another
    // host): the controller reports the client, attach refuses.
    let other_host = tempfile::tempdir().unwrap();
    let elsewhere = strata(&with_controller, other_host.path());
    assert!(!elsewhere.status.success());
    let why = String::from_utf8_lossy(&elsewhere.stderr);
    // nbdfuse opens several connections (the export allows multi-conn).
    assert!(
        why.contains("NBD client(s) attached (attached on another host?)"),
        "{why}"
    );
    assert!(strata_attach::state::load_all(other_host.path())
        .unwrap()
        .is_empty());
    let list = ok(
        strata(&["volume", "attachments", "--json"], state.path()),
        "attachments",
    );
    let v: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(v[0]["device"], dev.as_str(), "{list}");
    assert_eq!(v[0]["method"], "nbdfuse-loop", "{list}");
    assert_eq!(v[0]["attached"], true, "{list}");
    assert_eq!(v[0]["size"], 64 * MIB, "{list}");

    let m = mnt.path().to_str().unwrap();
    run_ok("mkfs.ext4", &["-q", "-F", &dev], 120);
    run_ok("mount", &[&dev, m], 30);
    let data: Vec<u8> = (0..8 * MIB as usize).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(mnt.path().join("file"), &data).unwrap();
    run_ok("sync", &[], 60);
    run_ok("umount", &[m], 60);
    ok(strata(&["volume", "detach", &dev], state.path()), "detach");
    // Nothing left: no state file, no fuse mount, no loop binding.
    assert!(strata_attach::state::load_all(state.path())
        .unwrap()
        .is_empty());
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    assert!(!mounts.contains(state.path().to_str().unwrap()), "{mounts}");
    assert!(strata_attach::fallback::loop_backing(&dev)
        .map(|b| !b.starts_with(state.path()))
        .unwrap_or(true));

    // Attach again: fsck is clean and the file reads back.
    let dev2 = ok(
        strata(
            &["volume", "attach", &c.uri(), "--method", method],
            state.path(),
        ),
        "attach again",
    )
    .trim()
    .to_string();
    run_ok("e2fsck", &["-fn", &dev2], 120);
    run_ok("mount", &[&dev2, m], 30);
    let back = std::fs::read(mnt.path().join("file")).unwrap();
    assert!(back == data, "the file read back differs");
    run_ok("umount", &[m], 60);
    ok(
        strata(&["volume", "detach", &dev2], state.path()),
        "detach again",
    );
    let out = strata(&["volume", "detach", &dev2], state.path());
    assert!(!out.status.success(), "a second detach must fail");
}

/// `strata ARGS --state-dir STATE`, with the cluster key `key` or with no
/// key at all (whatever this process's environment says).
fn strata_with_key(args: &[&str], state: &Path, key: Option<&Path>) -> std::process::Output {
    let mut cmd = std::process::Command::new("timeout");
    cmd.args(["-k", "5", "60"])
        .arg(common::strata_bin())
        .env_remove("STRATA_CLUSTER_KEY_FILE")
        .args(args)
        .arg("--state-dir")
        .arg(state)
        .stdin(std::process::Stdio::null());
    if let Some(k) = key {
        cmd.arg("--cluster-key-file").arg(k);
    }
    cmd.output().unwrap()
}

/// The volume's PSK as hex, as `strata key psk` prints it.
fn psk_hex(key: &Path, volume: &str) -> String {
    let line = common::strata_ok(&[
        "--cluster-key-file",
        key.to_str().unwrap(),
        "key",
        "psk",
        "--volume",
        volume,
    ]);
    line.trim().split_once(':').unwrap().1.to_string()
}

/// Nothing of `state` is mounted or bound to a loop device.
fn assert_nothing_attached_from(state: &Path) {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    assert!(!mounts.contains(state.to_str().unwrap()), "{mounts}");
    let loops = run_ok("losetup", &["-a"], 30);
    assert!(!loops.contains(state.to_str().unwrap()), "{loops}");
}

fn require_nbdfuse_root() {
    require("nbdfuse");
    require("nbdkit");
    require("losetup");
    require("fusermount3");
    assert!(
        nix_is_root(),
        "the nbdfuse fallback tests need root (loop devices, FUSE)"
    );
}

#[test]
fn nbdfuse_over_tls_attaches_a_controller_that_requires_tls() {
    use std::io::{Read, Seek, SeekFrom, Write};
    use std::os::unix::fs::PermissionsExt;
    require_nbdfuse_root();
    let (c, key) = Cluster::start_keyed(1, 64 * MIB, &["--nbd-tls".into(), "require".into()]);
    let state = tempfile::tempdir().unwrap();
    let mnt = tempfile::tempdir().unwrap();
    let _cleanup = Cleanup {
        mnt: mnt.path().to_path_buf(),
        state: state.path().to_path_buf(),
    };
    let hex = psk_hex(&key, "vol");
    // `auto` on this host (no nbd module) and `nbdfuse` elsewhere: either
    // way the plaintext probe is refused and nbdfuse over TLS attaches.
    let method = if Path::new("/sys/module/nbd").exists() {
        "nbdfuse"
    } else {
        "auto"
    };
    let attach = ["volume", "attach", &c.uri(), "--method", method];
    let out = strata_with_key(&attach, state.path(), Some(&key));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let dev = ok(out, "attach over TLS").trim().to_string();
    assert!(dev.starts_with("/dev/loop"), "{dev}");
    assert!(stderr.contains("via nbdfuse+loop"), "{stderr}");
    assert!(stderr.contains("over TLS"), "{stderr}");
    assert!(!stderr.contains(&hex), "the key is printed: {stderr}");

    // Recorded as TLS; the key file is private and nbdfuse was told to
    // use it (the key itself is on no command line).
    let a = strata_attach::state::load(state.path(), &dev)
        .unwrap()
        .expect("state file");
    assert_eq!(a.method, Method::NbdfuseLoop);
    assert_eq!(a.size, 64 * MIB);
    let tls = a.tls.clone().expect("TLS recorded");
    assert_eq!(tls.username, "strata");
    assert!(tls.psk_file.starts_with(state.path()), "{tls:?}");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&tls.psk_file), 0o600);
    assert_eq!(mode(tls.psk_file.parent().unwrap()), 0o700);
    assert_eq!(
        std::fs::read_to_string(&tls.psk_file).unwrap().trim(),
        format!("strata:{hex}")
    );
    let pid = a.fuse.as_ref().unwrap().pid;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    // nbdfuse reads no PSK file itself: nbdkit's nbd plugin connects for
    // it, with TLS required.
    assert!(cmdline.contains("[ nbdkit "), "{cmdline}");
    assert!(cmdline.contains(" tls=require "), "{cmdline}");
    assert!(
        cmdline.contains(&format!(" tls-psk={} ", tls.psk_file.display())),
        "{cmdline}"
    );
    assert!(!cmdline.contains(&hex), "{cmdline}");
    let list = ok(
        strata_with_key(&["volume", "attachments", "--json"], state.path(), None),
        "attachments",
    );
    let v: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(v[0]["device"], dev.as_str(), "{list}");
    assert_eq!(v[0]["tls"], true, "{list}");
    assert_eq!(v[0]["attached"], true, "{list}");
    let table = ok(
        strata_with_key(&["volume", "attachments"], state.path(), None),
        "attachments",
    );
    assert!(table.lines().next().unwrap().contains("TLS"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with(&dev) && l.contains(" yes ")),
        "{table}"
    );

    // A data pattern through the loop device, then detach.
    let data: Vec<u8> = (0..4 * MIB as usize)
        .map(|i| (i * 13 % 251) as u8)
        .collect();
    {
        let mut f = std::fs::OpenOptions::new().write(true).open(&dev).unwrap();
        f.seek(SeekFrom::Start(MIB)).unwrap();
        f.write_all(&data).unwrap();
        f.sync_all().unwrap();
    }
    ok(
        strata_with_key(&["volume", "detach", &dev], state.path(), None),
        "detach",
    );
    assert!(!tls.psk_file.exists(), "the PSK file outlived detach");
    assert!(!tls.psk_file.parent().unwrap().exists());
    assert!(strata_attach::state::load_all(state.path())
        .unwrap()
        .is_empty());
    assert_nothing_attached_from(state.path());

    // Attached again, the pattern reads back (it went to the volume).
    let dev2 = ok(
        strata_with_key(&attach, state.path(), Some(&key)),
        "attach again",
    )
    .trim()
    .to_string();
    let mut back = vec![0u8; data.len()];
    {
        let mut f = std::fs::File::open(&dev2).unwrap();
        f.seek(SeekFrom::Start(MIB)).unwrap();
        f.read_exact(&mut back).unwrap();
    }
    assert!(back == data, "the pattern read back differs");
    ok(
        strata_with_key(&["volume", "detach", &dev2], state.path(), None),
        "detach again",
    );
    assert_eq!(std::fs::read_dir(state.path()).unwrap().count(), 0);
    assert_nothing_attached_from(state.path());
}

#[test]
fn a_controller_requiring_tls_refuses_attach_without_the_key() {
    require_nbdfuse_root();
    let (c, _key) = Cluster::start_keyed(1, 64 * MIB, &["--nbd-tls".into(), "require".into()]);
    let state = tempfile::tempdir().unwrap();
    let mnt = tempfile::tempdir().unwrap();
    let _cleanup = Cleanup {
        mnt: mnt.path().to_path_buf(),
        state: state.path().to_path_buf(),
    };
    for method in ["auto", "nbdfuse"] {
        let out = strata_with_key(
            &["volume", "attach", &c.uri(), "--method", method],
            state.path(),
            None,
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "attached without the key: {err}");
        assert!(err.contains("requires NBD over TLS"), "{err}");
        assert!(err.contains("cluster key"), "{err}");
        assert_eq!(std::fs::read_dir(state.path()).unwrap().count(), 0);
        assert_nothing_attached_from(state.path());
    }

    // Another cluster's key: nbdfuse's TLS handshake fails; the key file it
    // was given is gone with everything else.
    let other_dir = tempfile::tempdir().unwrap();
    let other = other_dir.path().join("other.key");
    common::strata_ok(&["key", "init", "--out", other.to_str().unwrap()]);
    let out = strata_with_key(
        &["volume", "attach", &c.uri(), "--method", "nbdfuse"],
        state.path(),
        Some(&other),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "attached with another key: {err}");
    assert!(err.contains("nbdfuse"), "{err}");
    assert_eq!(
        std::fs::read_dir(state.path()).unwrap().count(),
        0,
        "left behind: {:?}",
        std::fs::read_dir(state.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect::<Vec<_>>()
    );
    assert_nothing_attached_from(state.path());
}

/// Unmounts and detaches everything a failed test left (on drop).
struct Cleanup {
    mnt: std::path::PathBuf,
    state: std::path::PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = run("umount", &[self.mnt.to_str().unwrap_or("/nonexistent")], 30);
        for a in strata_attach::state::load_all(&self.state).unwrap_or_default() {
            let _ = strata(&["volume", "detach", &a.device], &self.state);
        }
    }
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid(2) has no preconditions.
    unsafe { libc::geteuid() == 0 }
}
