//! Fallbacks for hosts whose kernel has no nbd module: the host's
//! open-iscsi initiator (`iscsiadm`), then nbdfuse + a loop device. Both
//! drive host tools with deadlines and undo what they did on any failure.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::handshake::ExportInfo;
use crate::state::{Attachment, FuseState, IscsiState, Method, TlsState};
use crate::tls_psk::remove_psk_dir;
pub use crate::tls_psk::{nbdfuse_source_args, nbds_uri, tls_export_size, write_psk_file, TlsPsk};
use crate::uri::NbdUri;
use crate::AttachError;

/// Whether `tool` is on PATH.
pub fn have(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
}

/// Runs `tool args`, killing it after `secs`; returns how it ended,
/// whatever its exit status (callers that read the status, like `blkid`'s
/// 2 for "nothing found", use this).
pub fn run_with_deadline(
    tool: &str,
    args: &[&str],
    secs: u64,
) -> Result<std::process::Output, AttachError> {
    let mut child = Command::new(tool)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| AttachError::Spawn {
            tool: tool.to_string(),
            source,
        })?;
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(AttachError::ToolTimeout {
                    tool: tool.to_string(),
                    secs,
                });
            }
        }
    }
    child
        .wait_with_output()
        .map_err(|source| AttachError::Spawn {
            tool: tool.to_string(),
            source,
        })
}

/// Runs `tool args` with a deadline; returns stdout, or an error when it
/// failed.
pub fn run_tool(tool: &str, args: &[&str], secs: u64) -> Result<String, AttachError> {
    let out = run_with_deadline(tool, args, secs)?;
    if !out.status.success() {
        return Err(AttachError::Tool {
            tool: format!("{tool} {}", args.join(" ")),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Why nbdfuse + loop cannot be used here, if it cannot; `tls`: over TLS
/// (which also needs nbdkit, see [`nbdfuse_source_args`]).
pub fn nbdfuse_unavailable(tls: bool) -> Option<String> {
    if !have("nbdfuse") {
        return Some("nbdfuse is not installed (Debian: libnbd-bin)".into());
    }
    if tls && !have("nbdkit") {
        return Some(
            "nbdkit is not installed (Debian: nbdkit): over TLS nbdfuse reaches the controller \
             through nbdkit's nbd plugin"
                .into(),
        );
    }
    if !have("losetup") {
        return Some("losetup is not installed".into());
    }
    if !Path::new("/dev/fuse").exists() {
        return Some("/dev/fuse is missing (no FUSE in this kernel)".into());
    }
    None
}

/// Whether `pid` runs (a zombie does not count; one that is our child is
/// reaped here).
pub fn pid_alive(pid: u32) -> bool {
    // SAFETY: waitpid with WNOHANG on a pid; ECHILD when it is not our child.
    unsafe {
        libc::waitpid(pid as i32, std::ptr::null_mut(), libc::WNOHANG);
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

fn stop_nbdfuse(dir: &Path, pid: u32) {
    let d = dir.to_string_lossy();
    for _ in 0..50 {
        if run_tool("fusermount3", &["-u", &d], 10).is_ok() || !pid_alive(pid) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while pid_alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    if pid_alive(pid) {
        // SAFETY: kill(2) on the nbdfuse pid recorded at attach.
        unsafe {
            libc::kill(pid as i32, libc::SIGTERM);
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// nbdfuse exposes the export as `DIR/disk`; a loop device with 4 KiB
/// sectors and direct IO goes on top.
///
/// `size` is the export's size from the plaintext handshake; `None` when
/// that was refused (a controller requiring TLS): the size is then what
/// nbdfuse's file shows once it connected. With `tls`, the PSK goes to a
/// psktool file in a 0700 directory of its own beside the mount point
/// (`fuse-VOLUME-PID.tls/keys.psk`, 0600) and nbdfuse connects over TLS
/// only ([`nbdfuse_source_args`]); the file stays for the attachment's
/// life and goes at detach or on any failure here.
pub fn attach_nbdfuse(
    uri: &NbdUri,
    size: Option<u64>,
    state_dir: &Path,
    tls: Option<&TlsPsk>,
) -> Result<Attachment, AttachError> {
    let name: String = uri
        .export
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let base = format!("fuse-{name}-{}", std::process::id());
    let dir = state_dir.join(&base);
    std::fs::create_dir_all(&dir).map_err(|source| AttachError::State {
        path: dir.clone(),
        source,
    })?;
    let log_path = state_dir.join(format!("{base}.log"));
    let tls_dir = state_dir.join(format!("{base}.tls"));
    // Undoes the files made so far (the mount point, the log, the key).
    let remove_files = |with_tls: bool| {
        let _ = std::fs::remove_dir(&dir);
        let _ = std::fs::remove_file(&log_path);
        if with_tls {
            remove_psk_dir(&tls_dir);
        }
    };
    let tls_state = match tls {
        None => None,
        Some(t) => match write_psk_file(&tls_dir, &t.psk_file_text) {
            Ok(psk_file) => Some(TlsState {
                username: t.username.clone(),
                psk_file,
            }),
            Err(e) => {
                remove_files(false);
                return Err(e);
            }
        },
    };
    let with_tls = tls_state.is_some();
    let logs = std::fs::File::create(&log_path).and_then(|l| Ok((l.try_clone()?, l)));
    let (log, log2) = match logs {
        Ok(l) => l,
        Err(source) => {
            remove_files(with_tls);
            return Err(AttachError::State {
                path: log_path.clone(),
                source,
            });
        }
    };
    let file = dir.join("disk");
    let mut command = Command::new("nbdfuse");
    command
        .arg(&file)
        .args(nbdfuse_source_args(uri, tls_state.as_ref()))
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        // Its own process group: a Ctrl-C meant for the attach command must
        // not take the device's only data path with it.
        .process_group(0);
    // nbdfuse outlives us: it must not inherit descriptors our caller left
    // open without close-on-exec (a lock file of a build tool held by
    // flock(1) was seen kept locked by a leftover nbdfuse).
    // SAFETY: the closure runs in the forked child before exec and only
    // makes one async-signal-safe syscall (close_range with
    // CLOSE_RANGE_CLOEXEC, Linux 5.11+; on older kernels it fails with
    // ENOSYS and the descriptors stay inherited, as before).
    unsafe {
        command.pre_exec(|| {
            const CLOSE_RANGE_CLOEXEC: u32 = 4;
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, CLOSE_RANGE_CLOEXEC);
            Ok(())
        });
    }
    let mut child = match command.spawn() {
        Ok(c) => c,
        Err(source) => {
            remove_files(with_tls);
            return Err(AttachError::Spawn {
                tool: "nbdfuse".into(),
                source,
            });
        }
    };
    let pid = child.id();
    let fail = |e: AttachError| {
        stop_nbdfuse(&dir, pid);
        remove_files(with_tls);
        e
    };
    // Wait for the file to show the export's size (any size when the
    // handshake could not tell it).
    let deadline = Instant::now() + Duration::from_secs(15);
    let size = loop {
        let shown = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
        match size {
            Some(s) if shown == s => break s,
            None if shown > 0 => break shown,
            _ => {}
        }
        if let Ok(Some(status)) = child.try_wait() {
            let stderr = std::fs::read_to_string(&log_path)
                .unwrap_or_default()
                .trim()
                .to_string();
            remove_files(with_tls);
            return Err(AttachError::Tool {
                tool: "nbdfuse".into(),
                status: status.to_string(),
                stderr,
            });
        }
        if Instant::now() > deadline {
            return Err(fail(AttachError::NotReady {
                what: format!("nbdfuse file {}", file.display()),
                secs: 15,
            }));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let f = file.to_string_lossy();
    let loopdev = match run_tool(
        "losetup",
        &[
            "-f",
            "--show",
            "--direct-io=on",
            "--sector-size",
            "4096",
            &f,
        ],
        30,
    ) {
        Ok(out) => out.trim().to_string(),
        Err(e) => return Err(fail(e)),
    };
    // The child handle is dropped without waiting: nbdfuse outlives us and
    // is reaped by init (or by detach's waitpid in a long-lived process).
    drop(child);
    Ok(Attachment {
        device: loopdev,
        uri: uri.to_string(),
        method: Method::NbdfuseLoop,
        size,
        block_size: 4096,
        dead_timeout_secs: 0,
        io_timeout_secs: 0,
        attached_at: now_secs(),
        nbd_index: None,
        fuse: Some(FuseState { dir, pid }),
        iscsi: None,
        tls: tls_state,
    })
}

pub fn detach_nbdfuse(a: &Attachment) -> Result<(), AttachError> {
    let fuse = a
        .fuse
        .as_ref()
        .ok_or_else(|| AttachError::NotAttached(a.device.clone()))?;
    if Path::new(&a.device).exists() && loop_backing(&a.device).is_some() {
        run_tool("losetup", &["-d", &a.device], 30)?;
    }
    stop_nbdfuse(&fuse.dir, fuse.pid);
    let log = fuse.dir.with_extension("log");
    let _ = std::fs::remove_file(log);
    if let Some(t) = &a.tls {
        let _ = std::fs::remove_file(&t.psk_file);
        // The key's own directory (fuse-VOLUME-PID.tls), nothing else.
        if let Some(parent) = t.psk_file.parent() {
            if parent.extension().is_some_and(|e| e == "tls") {
                let _ = std::fs::remove_dir(parent);
            }
        }
    }
    Ok(())
}

/// The backing file of a loop device, if it is bound.
pub fn loop_backing(device: &str) -> Option<PathBuf> {
    let name = device.trim_start_matches("/dev/");
    std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file"))
        .ok()
        .map(|s| PathBuf::from(s.trim()))
}

/// CHAP secrets for the iSCSI fallback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chap {
    pub user: String,
    pub secret: String,
    /// The target's credentials, for mutual CHAP.
    pub mutual: Option<(String, String)>,
}

/// iSCSI settings for the fallback.
#[derive(Debug, Clone, Default)]
pub struct IscsiOptions {
    /// `host:port` of the controller's iSCSI listener; default: the NBD
    /// URI's host, port 3260.
    pub portal: Option<String>,
    /// CHAP, when the target requires it.
    pub chap: Option<Chap>,
}

/// Why open-iscsi cannot be used here, if it cannot.
pub fn iscsi_unavailable() -> Option<String> {
    if !have("iscsiadm") {
        return Some("iscsiadm is not installed (Debian: open-iscsi)".into());
    }
    None
}

/// The target name strata's controller serves for a volume.
pub fn iqn(volume: &str) -> String {
    format!("iqn.2026-11.io.strata:{volume}")
}

/// The iSCSI portal: the one given, else the URI's host on port 3260.
pub fn iscsi_portal(uri: &NbdUri, given: Option<&str>) -> Option<String> {
    match (given, uri.tcp()) {
        (Some(p), _) => Some(p.to_string()),
        (None, Some((host, _))) if host.contains(':') => Some(format!("[{host}]:3260")),
        (None, Some((host, _))) => Some(format!("{host}:3260")),
        (None, None) => None,
    }
}

fn node_args(target: &str, portal: &str, rest: &[&str]) -> Vec<String> {
    ["-m", "node", "-T", target, "-p", portal]
        .iter()
        .chain(rest)
        .map(|s| s.to_string())
        .collect()
}

/// The `iscsiadm` argument lists that log in: discovery, CHAP settings on
/// the node record, login. With CHAP the target also requires it of the
/// discovery session, so discovery goes through a discovery record holding
/// the same credentials (as Kubernetes' iSCSI volume plugin does it).
pub fn iscsi_login_plan(target: &str, portal: &str, chap: Option<&Chap>) -> Vec<Vec<String>> {
    let strings = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let disc = |rest: &[&str]| {
        let mut a = strings(&["-m", "discoverydb", "-t", "sendtargets", "-p", portal]);
        a.extend(strings(rest));
        a
    };
    let set = |name: &str, value: &str| {
        node_args(target, portal, &["-o", "update", "-n", name, "-v", value])
    };
    let Some(c) = chap else {
        return vec![
            strings(&["-m", "discovery", "-t", "sendtargets", "-p", portal]),
            node_args(target, portal, &["--login"]),
        ];
    };
    let mut auth = vec![
        ("authmethod", "CHAP"),
        ("username", c.user.as_str()),
        ("password", c.secret.as_str()),
    ];
    if let Some((user, secret)) = &c.mutual {
        auth.push(("username_in", user));
        auth.push(("password_in", secret));
    }
    let mut plan = vec![disc(&["-o", "new"])];
    for (name, value) in &auth {
        let key = format!("discovery.sendtargets.auth.{name}");
        plan.push(disc(&["-o", "update", "-n", &key, "-v", value]));
    }
    plan.push(disc(&["--discover"]));
    for (name, value) in &auth {
        plan.push(set(&format!("node.session.auth.{name}"), value));
    }
    plan.push(node_args(target, portal, &["--login"]));
    plan
}

/// The `iscsiadm` argument lists that log out and forget the node record
/// and the portal's discovery record (which may hold CHAP secrets).
pub fn iscsi_logout_plan(target: &str, portal: &str) -> Vec<Vec<String>> {
    vec![
        node_args(target, portal, &["--logout"]),
        node_args(target, portal, &["-o", "delete"]),
        [
            "-m",
            "discoverydb",
            "-t",
            "sendtargets",
            "-p",
            portal,
            "-o",
            "delete",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
    ]
}

/// The udev link of the target's LUN 0.
pub fn iscsi_by_path(target: &str, portal: &str) -> String {
    format!("/dev/disk/by-path/ip-{portal}-iscsi-{target}-lun-0")
}

fn iscsiadm(args: &[String], secs: u64) -> Result<String, AttachError> {
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    run_tool("iscsiadm", &a, secs)
}

fn iscsi_logout(target: &str, portal: &str) {
    for args in iscsi_logout_plan(target, portal) {
        let _ = iscsiadm(&args, 60);
    }
}

/// Discovery, optional CHAP, login; waits for the LUN's device node. Any
/// failure after discovery logs out and deletes the node record again.
pub fn attach_iscsi(
    uri: &NbdUri,
    info: &ExportInfo,
    opts: &IscsiOptions,
) -> Result<Attachment, AttachError> {
    let portal = iscsi_portal(uri, opts.portal.as_deref())
        .ok_or_else(|| AttachError::NoMethod("iSCSI needs a TCP portal".into()))?;
    let target = iqn(&uri.export);
    for (i, args) in iscsi_login_plan(&target, &portal, opts.chap.as_ref())
        .iter()
        .enumerate()
    {
        if let Err(e) = iscsiadm(args, 60) {
            if i > 0 {
                iscsi_logout(&target, &portal);
            }
            return Err(e);
        }
    }
    let by_path = iscsi_by_path(&target, &portal);
    let deadline = Instant::now() + Duration::from_secs(20);
    let device = loop {
        if let Ok(p) = std::fs::canonicalize(&by_path) {
            break p.to_string_lossy().into_owned();
        }
        if Instant::now() > deadline {
            iscsi_logout(&target, &portal);
            return Err(AttachError::NotReady {
                what: by_path,
                secs: 20,
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    Ok(Attachment {
        device,
        uri: uri.to_string(),
        method: Method::Iscsi,
        size: info.size,
        block_size: 4096,
        dead_timeout_secs: 0,
        io_timeout_secs: 0,
        attached_at: now_secs(),
        nbd_index: None,
        fuse: None,
        iscsi: Some(IscsiState { target, portal }),
        tls: None,
    })
}

pub fn detach_iscsi(a: &Attachment) -> Result<(), AttachError> {
    let s = a
        .iscsi
        .as_ref()
        .ok_or_else(|| AttachError::NotAttached(a.device.clone()))?;
    let plan = iscsi_logout_plan(&s.target, &s.portal);
    iscsiadm(&plan[0], 60)?;
    for args in &plan[1..] {
        let _ = iscsiadm(args, 30);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tools_run_with_deadlines_and_typed_failures() {
        assert_eq!(run_tool("echo", &["hi"], 5).unwrap(), "hi\n");
        assert!(matches!(
            run_tool("false", &[], 5),
            Err(AttachError::Tool { .. })
        ));
        assert!(matches!(
            run_tool("sleep", &["5"], 1),
            Err(AttachError::ToolTimeout { secs: 1, .. })
        ));
        assert!(matches!(
            run_tool("/nonexistent/tool", &[], 1),
            Err(AttachError::Spawn { .. })
        ));
        assert!(have("sh"));
        assert!(!have("surely-not-a-tool-here"));
    }

    #[test]
    fn nbds_uris_for_libnbd() {
        let psk = Path::new("/run/strata/attach/fuse-pg-7.tls/keys.psk");
        let tcp = NbdUri::parse("nbd://10.0.0.5:10809/pg").unwrap();
        assert_eq!(
            nbds_uri(&tcp, "strata", psk),
            "nbds://strata@10.0.0.5:10809/pg?tls-psk-file=/run/strata/attach/fuse-pg-7.tls/keys.psk"
        );
        let v6 = NbdUri::parse("nbd://[fd00::5]:10809/pg").unwrap();
        assert_eq!(
            nbds_uri(&v6, "strata", Path::new("/k")),
            "nbds://strata@[fd00::5]:10809/pg?tls-psk-file=/k"
        );
        let unix = NbdUri::parse("nbd+unix:///pg?socket=/s/nbd.sock").unwrap();
        assert_eq!(
            nbds_uri(&unix, "strata", Path::new("/k")),
            "nbds+unix://strata@/pg?socket=/s/nbd.sock&tls-psk-file=/k"
        );
        // Characters that would end the query value are escaped.
        assert_eq!(
            nbds_uri(&tcp, "a b", Path::new("/x y&z=1/keys.psk")),
            "nbds://a%20b@10.0.0.5:10809/pg?tls-psk-file=/x%20y%26z%3D1/keys.psk"
        );
    }

    #[test]
    fn nbdfuse_goes_through_nbdkit_with_tls_required() {
        let tcp = NbdUri::parse("nbd://10.0.0.5:10809/pg").unwrap();
        assert_eq!(nbdfuse_source_args(&tcp, None), ["nbd://10.0.0.5:10809/pg"]);
        let t = TlsState {
            username: "strata".into(),
            psk_file: "/run/strata/attach/fuse-pg-7.tls/keys.psk".into(),
        };
        assert_eq!(
            nbdfuse_source_args(&tcp, Some(&t)).join(" "),
            "[ nbdkit --exit-with-parent nbd hostname=10.0.0.5 port=10809 export=pg \
             tls=require tls-psk=/run/strata/attach/fuse-pg-7.tls/keys.psk tls-username=strata ]"
        );
        let unix = NbdUri::parse("nbd+unix:///pg?socket=/s/nbd.sock").unwrap();
        let a = nbdfuse_source_args(&unix, Some(&t));
        assert!(a.contains(&"socket=/s/nbd.sock".to_string()), "{a:?}");
        assert!(!a.iter().any(|x| x.starts_with("hostname=")), "{a:?}");
    }

    #[test]
    fn psk_files_are_private_and_the_key_is_not_printed() {
        use std::os::unix::fs::PermissionsExt;
        let state = tempfile::tempdir().unwrap();
        let dir = state.path().join("fuse-v-1.tls");
        // A stale directory from a crashed attach is replaced.
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("keys.psk"), "old").unwrap();
        let text = format!("strata:{}\n", "ab".repeat(32));
        let file = write_psk_file(&dir, &text).unwrap();
        assert_eq!(file, dir.join("keys.psk"));
        assert_eq!(std::fs::read_to_string(&file).unwrap(), text);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&file), 0o600);
        remove_psk_dir(&dir);
        assert!(!dir.exists());
        let t = TlsPsk {
            username: "strata".into(),
            psk_file_text: text.clone(),
        };
        assert!(!format!("{t:?}").contains(&"ab".repeat(32)));
    }

    #[test]
    fn detach_removes_the_psk_file() {
        let state = tempfile::tempdir().unwrap();
        let tls_dir = state.path().join("fuse-v-1.tls");
        let psk_file = write_psk_file(&tls_dir, "strata:00\n").unwrap();
        let a = Attachment {
            device: "/dev/strata-test-no-such-loop".into(),
            uri: "nbd://127.0.0.1:1/v".into(),
            method: Method::NbdfuseLoop,
            size: 1,
            block_size: 4096,
            dead_timeout_secs: 0,
            io_timeout_secs: 0,
            attached_at: 0,
            nbd_index: None,
            // No such process: nothing to stop; the mount point is gone.
            fuse: Some(FuseState {
                dir: state.path().join("fuse-v-1"),
                pid: u32::MAX / 2,
            }),
            iscsi: None,
            tls: Some(TlsState {
                username: "strata".into(),
                psk_file: psk_file.clone(),
            }),
        };
        detach_nbdfuse(&a).unwrap();
        assert!(!psk_file.exists());
        assert!(!tls_dir.exists());
    }

    #[test]
    fn iqn_matches_the_controller() {
        assert_eq!(iqn("pg"), "iqn.2026-11.io.strata:pg");
    }

    #[test]
    fn iscsi_plans() {
        let uri = NbdUri::parse("nbd://10.0.0.5:10809/pg").unwrap();
        assert_eq!(iscsi_portal(&uri, None).unwrap(), "10.0.0.5:3260");
        assert_eq!(
            iscsi_portal(&uri, Some("10.0.0.5:3261")).unwrap(),
            "10.0.0.5:3261"
        );
        let v6 = NbdUri::parse("nbd://[fd00::5]/pg").unwrap();
        assert_eq!(iscsi_portal(&v6, None).unwrap(), "[fd00::5]:3260");
        let unix = NbdUri::parse("nbd+unix:///pg?socket=/s").unwrap();
        assert_eq!(iscsi_portal(&unix, None), None);

        let t = iqn("pg");
        let join = |plan: Vec<Vec<String>>| plan.iter().map(|a| a.join(" ")).collect::<Vec<_>>();
        assert_eq!(
            join(iscsi_login_plan(&t, "h:3260", None)),
            [
                "-m discovery -t sendtargets -p h:3260",
                "-m node -T iqn.2026-11.io.strata:pg -p h:3260 --login",
            ]
        );
        let chap = Chap {
            user: "u".into(),
            secret: "s3cret-s3cret".into(),
            mutual: Some(("t".into(), "tsecret-tsecret".into())),
        };
        let plan = join(iscsi_login_plan(&t, "h:3260", Some(&chap)));
        assert_eq!(plan.len(), 13);
        // Discovery with CHAP too: the target requires it of every session.
        assert_eq!(plan[0], "-m discoverydb -t sendtargets -p h:3260 -o new");
        assert_eq!(
            plan[1],
            "-m discoverydb -t sendtargets -p h:3260 -o update -n discovery.sendtargets.auth.authmethod -v CHAP"
        );
        assert!(plan[3].ends_with("-n discovery.sendtargets.auth.password -v s3cret-s3cret"));
        assert!(plan[5].ends_with("-n discovery.sendtargets.auth.password_in -v tsecret-tsecret"));
        assert_eq!(
            plan[6],
            "-m discoverydb -t sendtargets -p h:3260 --discover"
        );
        assert_eq!(
            plan[7],
            "-m node -T iqn.2026-11.io.strata:pg -p h:3260 -o update -n node.session.auth.authmethod -v CHAP"
        );
        assert!(plan[9].ends_with("-n node.session.auth.password -v s3cret-s3cret"));
        assert!(plan[11].ends_with("-n node.session.auth.password_in -v tsecret-tsecret"));
        assert!(plan[12].ends_with("--login"));
        let one_way = Chap {
            mutual: None,
            ..chap.clone()
        };
        let plan = join(iscsi_login_plan(&t, "h:3260", Some(&one_way)));
        assert_eq!(plan.len(), 9);
        assert!(!plan.iter().any(|a| a.contains("_in ")));
        assert_eq!(
            join(iscsi_logout_plan(&t, "h:3260")),
            [
                "-m node -T iqn.2026-11.io.strata:pg -p h:3260 --logout",
                "-m node -T iqn.2026-11.io.strata:pg -p h:3260 -o delete",
                "-m discoverydb -t sendtargets -p h:3260 -o delete",
            ]
        );
        assert_eq!(
            iscsi_by_path(&t, "h:3260"),
            "/dev/disk/by-path/ip-h:3260-iscsi-iqn.2026-11.io.strata:pg-lun-0"
        );
    }
}
