//! Fallbacks for hosts whose kernel has no nbd module: the host's
//! open-iscsi initiator (`iscsiadm`), then nbdfuse + a loop device. Both
//! drive host tools with deadlines and undo what they did on any failure.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::handshake::ExportInfo;
use crate::state::{Attachment, FuseState, IscsiState, Method};
use crate::uri::NbdUri;
use crate::AttachError;

/// Whether `tool` is on PATH.
pub fn have(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
}

/// Runs `tool args` with a deadline; returns stdout.
pub fn run_tool(tool: &str, args: &[&str], secs: u64) -> Result<String, AttachError> {
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
    let out = child
        .wait_with_output()
        .map_err(|source| AttachError::Spawn {
            tool: tool.to_string(),
            source,
        })?;
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

/// Why nbdfuse + loop cannot be used here, if it cannot.
pub fn nbdfuse_unavailable() -> Option<String> {
    if !have("nbdfuse") {
        return Some("nbdfuse is not installed (Debian: libnbd-bin)".into());
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
pub fn attach_nbdfuse(
    uri: &NbdUri,
    info: &ExportInfo,
    state_dir: &Path,
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
    let dir = state_dir.join(format!("fuse-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|source| AttachError::State {
        path: dir.clone(),
        source,
    })?;
    let log_path = state_dir.join(format!("fuse-{name}-{}.log", std::process::id()));
    let log = std::fs::File::create(&log_path).map_err(|source| AttachError::State {
        path: log_path.clone(),
        source,
    })?;
    let log2 = log.try_clone().map_err(|source| AttachError::State {
        path: log_path.clone(),
        source,
    })?;
    let file = dir.join("disk");
    let mut child = Command::new("nbdfuse")
        .arg(&file)
        .arg(uri.to_string())
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        // Its own process group: a Ctrl-C meant for the attach command must
        // not take the device's only data path with it.
        .process_group(0)
        .spawn()
        .map_err(|source| AttachError::Spawn {
            tool: "nbdfuse".into(),
            source,
        })?;
    let pid = child.id();
    let fail = |e: AttachError, dir: &Path| {
        stop_nbdfuse(dir, pid);
        e
    };
    // Wait for the file to show the export's size.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if std::fs::metadata(&file)
            .map(|m| m.len() == info.size)
            .unwrap_or(false)
        {
            break;
        }
        if let Ok(Some(status)) = child.try_wait() {
            let _ = std::fs::remove_dir(&dir);
            return Err(AttachError::Tool {
                tool: "nbdfuse".into(),
                status: status.to_string(),
                stderr: std::fs::read_to_string(&log_path)
                    .unwrap_or_default()
                    .trim()
                    .to_string(),
            });
        }
        if Instant::now() > deadline {
            return Err(fail(
                AttachError::NotReady {
                    what: format!("nbdfuse file {}", file.display()),
                    secs: 15,
                },
                &dir,
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
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
        Err(e) => return Err(fail(e, &dir)),
    };
    // The child handle is dropped without waiting: nbdfuse outlives us and
    // is reaped by init (or by detach's waitpid in a long-lived process).
    drop(child);
    Ok(Attachment {
        device: loopdev,
        uri: uri.to_string(),
        method: Method::NbdfuseLoop,
        size: info.size,
        block_size: 4096,
        dead_timeout_secs: 0,
        io_timeout_secs: 0,
        attached_at: now_secs(),
        nbd_index: None,
        fuse: Some(FuseState { dir, pid }),
        iscsi: None,
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
    Ok(())
}

/// The backing file of a loop device, if it is bound.
pub fn loop_backing(device: &str) -> Option<PathBuf> {
    let name = device.trim_start_matches("/dev/");
    std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file"))
        .ok()
        .map(|s| PathBuf::from(s.trim()))
}

/// iSCSI settings for the fallback.
#[derive(Debug, Clone, Default)]
pub struct IscsiOptions {
    /// `host:port` of the controller's iSCSI listener; default: the NBD
    /// URI's host, port 3260.
    pub portal: Option<String>,
    /// CHAP user name and secret, when the target requires them.
    pub chap: Option<(String, String)>,
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

/// Discovery, optional CHAP, login; waits for the LUN's device node.
pub fn attach_iscsi(
    uri: &NbdUri,
    info: &ExportInfo,
    opts: &IscsiOptions,
) -> Result<Attachment, AttachError> {
    let portal = match (&opts.portal, uri.tcp()) {
        (Some(p), _) => p.clone(),
        (None, Some((host, _))) if host.contains(':') => format!("[{host}]:3260"),
        (None, Some((host, _))) => format!("{host}:3260"),
        (None, None) => return Err(AttachError::NoMethod("iSCSI needs a TCP portal".into())),
    };
    let target = iqn(&uri.export);
    run_tool(
        "iscsiadm",
        &["-m", "discovery", "-t", "sendtargets", "-p", &portal],
        30,
    )?;
    let node = ["-m", "node", "-T", target.as_str(), "-p", portal.as_str()];
    let update = |name: &str, value: &str| {
        let mut a = node.to_vec();
        a.extend(["-o", "update", "-n", name, "-v", value]);
        run_tool("iscsiadm", &a, 30)
    };
    if let Some((user, secret)) = &opts.chap {
        update("node.session.auth.authmethod", "CHAP")?;
        update("node.session.auth.username", user)?;
        update("node.session.auth.password", secret)?;
    }
    let mut login = node.to_vec();
    login.push("--login");
    run_tool("iscsiadm", &login, 60)?;
    let by_path = format!("/dev/disk/by-path/ip-{portal}-iscsi-{target}-lun-0");
    let deadline = Instant::now() + Duration::from_secs(20);
    let device = loop {
        if let Ok(p) = std::fs::canonicalize(&by_path) {
            break p.to_string_lossy().into_owned();
        }
        if Instant::now() > deadline {
            let mut logout = node.to_vec();
            logout.push("--logout");
            let _ = run_tool("iscsiadm", &logout, 60);
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
    })
}

pub fn detach_iscsi(a: &Attachment) -> Result<(), AttachError> {
    let s = a
        .iscsi
        .as_ref()
        .ok_or_else(|| AttachError::NotAttached(a.device.clone()))?;
    run_tool(
        "iscsiadm",
        &["-m", "node", "-T", &s.target, "-p", &s.portal, "--logout"],
        60,
    )?;
    let _ = run_tool(
        "iscsiadm",
        &[
            "-m", "node", "-T", &s.target, "-p", &s.portal, "-o", "delete",
        ],
        30,
    );
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
    fn iqn_matches_the_controller() {
        assert_eq!(iqn("pg"), "iqn.2026-11.io.strata:pg");
    }
}
