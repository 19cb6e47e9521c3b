//! End to end: `strata-attach` against a real 3-replica volume.
//!
//! - the userspace NBD handshake against the real controller (size, flags,
//!   block sizes; a missing export and an absent controller are typed
//!   errors);
//! - the nbdfuse + loop fallback on this host (whose kernel has no nbd
//!   module): `strata volume attach` picks it and says so, ext4 on it
//!   survives a write, detach, re-attach and `e2fsck -fn`, and nothing is
//!   left attached afterwards.
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
