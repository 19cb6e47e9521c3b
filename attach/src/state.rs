//! One small JSON file per attached device under the state directory
//! (`/run/strata/attach/` by default): what `/dev/nbdN` (or the loop or
//! iSCSI device) is for, so `strata volume attachments` and a restarted
//! supervisor find attachments again. `/run` is a tmpfs: after a reboot
//! the files are gone, as are the attachments they describe.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::AttachError;

/// The default state directory.
pub const DEFAULT_STATE_DIR: &str = "/run/strata/attach";

/// How a device was attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// The kernel's nbd driver, configured over netlink; no process in the
    /// data path; survives controller restarts with a supervisor.
    KernelNbd,
    /// The host's open-iscsi initiator.
    Iscsi,
    /// nbdfuse exposes the export as a file, a loop device on top: every IO
    /// crosses FUSE and a userspace process. Slow; no reconnect.
    NbdfuseLoop,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::KernelNbd => "kernel-nbd",
            Method::Iscsi => "iscsi",
            Method::NbdfuseLoop => "nbdfuse+loop",
        }
    }

    /// A one-line note for status output.
    pub fn note(self) -> &'static str {
        match self {
            Method::KernelNbd => "kernel nbd driver (netlink)",
            Method::Iscsi => "open-iscsi initiator",
            Method::NbdfuseLoop => {
                "SLOW fallback: nbdfuse + loop device, every IO through FUSE, no reconnect"
            }
        }
    }
}

/// nbdfuse fallback details.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FuseState {
    /// The FUSE mount point; the export is the file `disk` inside.
    pub dir: PathBuf,
    pub pid: u32,
}

/// iSCSI fallback details.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IscsiState {
    pub target: String,
    pub portal: String,
}

/// NBD over TLS of an attachment (the nbdfuse fallback with a cluster
/// key). Holds where the key is, never the key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsState {
    /// The PSK identity (user name) nbdfuse names.
    pub username: String,
    /// The psktool file nbdfuse reads: mode 0600 in a 0700 directory of its
    /// own under the state directory; removed at detach.
    pub psk_file: PathBuf,
}

/// One attached device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    /// `/dev/nbd0`, `/dev/loop3`, `/dev/sdb`.
    pub device: String,
    pub uri: String,
    pub method: Method,
    pub size: u64,
    pub block_size: u32,
    /// Seconds IO waits for a reconnect (kernel-nbd only).
    pub dead_timeout_secs: u64,
    /// Seconds before the kernel requeues a request (kernel-nbd only).
    pub io_timeout_secs: u64,
    /// Unix seconds.
    pub attached_at: u64,
    #[serde(default)]
    pub nbd_index: Option<u32>,
    #[serde(default)]
    pub fuse: Option<FuseState>,
    #[serde(default)]
    pub iscsi: Option<IscsiState>,
    /// Set when the data path runs over TLS (absent in state files written
    /// before TLS: plaintext).
    #[serde(default)]
    pub tls: Option<TlsState>,
}

impl Attachment {
    /// Whether the device's data path to the controller is TLS.
    pub fn uses_tls(&self) -> bool {
        self.tls.is_some()
    }
}

/// The state file name for a device: `/dev/nbd0` → `nbd0.json`.
pub fn device_key(device: &str) -> String {
    device.trim_start_matches("/dev/").replace('/', "_")
}

pub fn state_path(dir: &Path, device: &str) -> PathBuf {
    dir.join(format!("{}.json", device_key(device)))
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> AttachError + '_ {
    move |source| AttachError::State {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `a`'s state file atomically (temp file + rename).
pub fn save(dir: &Path, a: &Attachment) -> Result<(), AttachError> {
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let path = state_path(dir, &a.device);
    let tmp = path.with_extension("json.tmp");
    let text = serde_json::to_vec_pretty(a).map_err(|source| AttachError::StateFormat {
        path: path.clone(),
        source,
    })?;
    let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
    f.write_all(&text).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    fs::rename(&tmp, &path).map_err(io_err(&path))?;
    Ok(())
}

pub fn load(dir: &Path, device: &str) -> Result<Option<Attachment>, AttachError> {
    let path = state_path(dir, device);
    match fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|source| AttachError::StateFormat { path, source }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(&path)(e)),
    }
}

pub fn remove(dir: &Path, device: &str) -> Result<(), AttachError> {
    let path = state_path(dir, device);
    match fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(&path)(e)),
    }
}

/// Every state file in `dir` (none when the directory does not exist).
/// A file that does not parse is skipped with a warning, not fatal: one
/// bad file must not hide the other attachments.
pub fn load_all(dir: &Path) -> Result<Vec<Attachment>, AttachError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(dir)(e)),
    };
    let mut v = Vec::new();
    for entry in entries {
        let path = entry.map_err(io_err(dir))?.path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        match fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice::<Attachment>(&b).map_err(|e| e.to_string()))
        {
            Ok(a) => v.push(a),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "skipping unreadable attach state file")
            }
        }
    }
    v.sort_by(|a, b| a.device.cmp(&b.device));
    Ok(v)
}

/// An exclusive `flock` on a device's lock file: one supervisor per device.
/// Released when dropped (or when the holder dies).
pub struct DeviceLock {
    _file: File,
}

impl DeviceLock {
    /// Takes the lock without waiting; `Ok(None)` when another process holds it.
    pub fn try_take(dir: &Path, device: &str) -> Result<Option<DeviceLock>, AttachError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let path = dir.join(format!("{}.lock", device_key(device)));
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err(&path))?;
        // SAFETY: flock(2) on a descriptor this File owns.
        let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if r == 0 {
            return Ok(Some(DeviceLock { _file: file }));
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            Ok(None)
        } else {
            Err(io_err(&path)(e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(device: &str) -> Attachment {
        Attachment {
            device: device.into(),
            uri: "nbd://127.0.0.1:10809/vol".into(),
            method: Method::KernelNbd,
            size: 64 << 20,
            block_size: 4096,
            dead_timeout_secs: 120,
            io_timeout_secs: 10,
            attached_at: 1,
            nbd_index: Some(0),
            fuse: None,
            iscsi: None,
            tls: None,
        }
    }

    #[test]
    fn save_load_list_remove() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("attach");
        assert!(load_all(&d).unwrap().is_empty());
        save(&d, &sample("/dev/nbd1")).unwrap();
        save(&d, &sample("/dev/nbd0")).unwrap();
        std::fs::write(d.join("junk.json"), b"{").unwrap();
        assert_eq!(load(&d, "/dev/nbd1").unwrap(), Some(sample("/dev/nbd1")));
        let all = load_all(&d).unwrap();
        assert_eq!(
            all.iter().map(|a| a.device.as_str()).collect::<Vec<_>>(),
            ["/dev/nbd0", "/dev/nbd1"]
        );
        remove(&d, "/dev/nbd1").unwrap();
        remove(&d, "/dev/nbd1").unwrap();
        assert_eq!(load(&d, "/dev/nbd1").unwrap(), None);
        assert!(matches!(
            load(&d, "junk"),
            Err(AttachError::StateFormat { .. })
        ));
        assert_eq!(device_key("/dev/mapper/x"), "mapper_x");
    }

    #[test]
    fn state_files_from_before_tls_still_load() {
        let dir = tempfile::tempdir().unwrap();
        // A state file as strata wrote it before attachments recorded TLS.
        let old = r#"{"device":"/dev/loop3","uri":"nbd://127.0.0.1:10809/vol",
            "method":"nbdfuse-loop","size":67108864,"block_size":4096,
            "dead_timeout_secs":0,"io_timeout_secs":0,"attached_at":1,
            "fuse":{"dir":"/run/strata/attach/fuse-vol-1","pid":42}}"#;
        std::fs::write(dir.path().join("loop3.json"), old).unwrap();
        let a = load(dir.path(), "/dev/loop3").unwrap().unwrap();
        assert_eq!(a.method, Method::NbdfuseLoop);
        assert!(!a.uses_tls());
        assert_eq!(a.fuse.as_ref().unwrap().pid, 42);
        // And one with TLS round-trips.
        let mut t = sample("/dev/loop4");
        t.tls = Some(TlsState {
            username: "strata".into(),
            psk_file: "/run/strata/attach/fuse-vol-1.tls/keys.psk".into(),
        });
        save(dir.path(), &t).unwrap();
        let back = load(dir.path(), "/dev/loop4").unwrap().unwrap();
        assert!(back.uses_tls());
        assert_eq!(back, t);
    }

    #[test]
    fn method_names_are_stable_json() {
        let j = serde_json::to_string(&Method::NbdfuseLoop).unwrap();
        assert_eq!(j, "\"nbdfuse-loop\"");
        assert_eq!(
            serde_json::to_string(&Method::KernelNbd).unwrap(),
            "\"kernel-nbd\""
        );
    }

    #[test]
    fn one_lock_holder_per_device() {
        let dir = tempfile::tempdir().unwrap();
        let a = DeviceLock::try_take(dir.path(), "/dev/nbd0").unwrap();
        assert!(a.is_some());
        // flock locks belong to the open file description: a second open in
        // the same process conflicts like another process would.
        assert!(DeviceLock::try_take(dir.path(), "/dev/nbd0")
            .unwrap()
            .is_none());
        assert!(DeviceLock::try_take(dir.path(), "/dev/nbd1")
            .unwrap()
            .is_some());
        drop(a);
        assert!(DeviceLock::try_take(dir.path(), "/dev/nbd0")
            .unwrap()
            .is_some());
    }
}
