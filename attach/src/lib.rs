//! Attaching a strata volume to a Linux host as a block device.
//!
//! Owns the host side of the data path: the NBD handshake in userspace
//! ([`handshake`]), then one of three ways to make a block device of the
//! export, chosen automatically:
//!
//! 1. the kernel's nbd driver configured over generic netlink
//!    ([`netlink`] encodes, [`kernel`] sends): the negotiated socket is
//!    handed to the kernel and no process stays in the data path. A
//!    [`supervisor`] listens for LINK_DEAD and RECONFIGUREs the device with
//!    a fresh socket, so a controller restart within the dead-connection
//!    timeout is a pause for the application, not an IO error;
//! 2. the host's open-iscsi initiator ([`fallback::attach_iscsi`]);
//! 3. nbdfuse + a loop device ([`fallback::attach_nbdfuse`]), slow. Given
//!    a pre-shared key ([`AttachOptions::tls`]) it connects over TLS, and it
//!    is the only way to attach a controller that requires TLS (the kernel's
//!    NBD client cannot speak it).
//!
//! Each attachment is recorded in a small JSON file ([`state`]) under
//! `/run/strata/attach/`, read by `strata volume attachments`, `detach` and
//! a restarted supervisor. The CLI (`strata volume attach|detach|
//! attachments|supervise`) and the CSI node plugin call this crate; it is
//! synchronous (blocking syscalls and host tools), so async callers run it
//! on a blocking thread.

pub mod error;
pub mod fallback;
pub mod handshake;
pub mod kernel;
pub mod netlink;
pub mod state;
pub mod supervisor;
pub mod tls_psk;
pub mod uri;

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use error::AttachError;
pub use fallback::{IscsiOptions, TlsPsk};
pub use state::{Attachment, Method, TlsState};
pub use uri::NbdUri;

use crate::kernel::{Nbd, NetlinkError};

/// Which ways of attaching to consider.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MethodChoice {
    /// Kernel nbd, else iSCSI, else nbdfuse + loop.
    Auto,
    Only(Method),
}

/// Attach settings.
#[derive(Debug, Clone)]
pub struct AttachOptions {
    pub state_dir: PathBuf,
    /// How long IO waits in the kernel for a RECONFIGURE after the
    /// connection to the controller died, before it fails.
    pub dead_timeout: Duration,
    /// How long the kernel waits for a reply before it declares the
    /// connection dead and requeues the request (kernel nbd).
    pub io_timeout: Duration,
    /// Bound on dialing and on each handshake read or write.
    pub connect_timeout: Duration,
    /// A fixed /dev/nbdN index instead of the first free one.
    pub index: Option<u32>,
    pub methods: MethodChoice,
    pub iscsi: IscsiOptions,
    /// The volume's NBD TLS pre-shared key (strata: derived from the
    /// cluster key for this volume). With it the nbdfuse fallback connects
    /// over TLS only, and a controller that requires TLS is attached
    /// through that fallback; without it such a controller is refused with
    /// [`AttachError::TlsRequired`]. The kernel nbd path is plaintext
    /// either way (the kernel cannot speak TLS).
    pub tls: Option<TlsPsk>,
}

impl Default for AttachOptions {
    fn default() -> Self {
        AttachOptions {
            state_dir: PathBuf::from(state::DEFAULT_STATE_DIR),
            dead_timeout: Duration::from_secs(120),
            io_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            index: None,
            methods: MethodChoice::Auto,
            iscsi: IscsiOptions::default(),
            tls: None,
        }
    }
}

/// What [`attach`] did: the attachment, and why faster ways were skipped.
#[derive(Debug, Clone)]
pub struct Attached {
    pub attachment: Attachment,
    /// One line per method tried before the one taken.
    pub skipped: Vec<String>,
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Why the kernel nbd path cannot be used here, if it cannot.
pub fn kernel_nbd_unavailable() -> Option<String> {
    if !kernel::ensure_module() {
        return Some("no nbd kernel module (/sys/module/nbd missing, modprobe nbd failed)".into());
    }
    match Nbd::open() {
        Ok(_) => None,
        Err(e) => Some(format!("nbd netlink unusable: {e}")),
    }
}

/// Attaches the export at `uri`: handshake first (so an unreachable
/// controller or a missing export is reported as such), then the first
/// usable method. On any failure nothing stays attached.
pub fn attach(uri: &str, opts: &AttachOptions) -> Result<Attached, AttachError> {
    let uri = NbdUri::parse(uri)?;
    let canonical = uri.to_string();
    for a in state::load_all(&opts.state_dir)? {
        if a.uri == canonical && is_live(&a) {
            return Err(AttachError::AlreadyAttached {
                uri: canonical,
                device: a.device,
            });
        }
    }
    // The probe: a controller requiring TLS refuses it with a typed error;
    // with a key only the nbdfuse fallback (TLS) can attach it, without one
    // the error says a key is needed.
    let (conn, tls_required) = match handshake::connect(&uri, opts.connect_timeout) {
        Ok(c) => (Some(c), false),
        Err(e) => match AttachError::from(e) {
            AttachError::TlsRequired { .. } if opts.tls.is_some() => (None, true),
            e => return Err(e),
        },
    };
    let info = conn.as_ref().map(|c| c.info);
    let mut skipped = Vec::new();
    let wants =
        |m: Method| opts.methods == MethodChoice::Auto || opts.methods == MethodChoice::Only(m);

    let mut conn = conn;
    let attachment = 'found: {
        if wants(Method::KernelNbd) {
            if tls_required {
                skipped.push(
                    "kernel-nbd: the controller requires NBD over TLS (--nbd-tls require), \
                     which the kernel's NBD client cannot speak"
                        .to_string(),
                );
            } else {
                match kernel_nbd_unavailable() {
                    None => {
                        let c = conn.take().expect("first use");
                        break 'found attach_kernel(&uri, c, opts)?;
                    }
                    Some(why) => skipped.push(format!("kernel-nbd: {why}")),
                }
            }
        }
        drop(conn.take());
        if wants(Method::Iscsi) {
            match (info, fallback::iscsi_unavailable()) {
                (None, _) => skipped.push(
                    "iscsi: not tried: the controller requires NBD over TLS, which only the \
                     nbdfuse fallback speaks"
                        .to_string(),
                ),
                (Some(info), None) => match fallback::attach_iscsi(&uri, &info, &opts.iscsi) {
                    Ok(a) => break 'found a,
                    Err(e) => skipped.push(format!("iscsi: {e}")),
                },
                (Some(_), Some(why)) => skipped.push(format!("iscsi: {why}")),
            }
        }
        if wants(Method::NbdfuseLoop) {
            match fallback::nbdfuse_unavailable(opts.tls.is_some()) {
                None => match fallback::attach_nbdfuse(
                    &uri,
                    info.map(|i| i.size),
                    &opts.state_dir,
                    opts.tls.as_ref(),
                ) {
                    Ok(a) => break 'found a,
                    Err(e) => skipped.push(format!("nbdfuse+loop: {}", error_chain(&e))),
                },
                Some(why) => skipped.push(format!("nbdfuse+loop: {why}")),
            }
        }
        return Err(AttachError::NoMethod(skipped.join("; ")));
    };
    if let Err(e) = state::save(&opts.state_dir, &attachment) {
        // Without its state file nobody could find this device again.
        let _ = detach_attachment(&attachment);
        return Err(e);
    }
    Ok(Attached {
        attachment,
        skipped,
    })
}

/// `e` and its sources, `: `-separated.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(&format!(": {c}"));
        cause = c.source();
    }
    s
}

fn attach_kernel(
    uri: &NbdUri,
    conn: handshake::Connected,
    opts: &AttachOptions,
) -> Result<Attachment, AttachError> {
    let mut nbd = Nbd::open()?;
    let block = conn.info.device_block_size();
    let req = netlink::Connect {
        index: opts.index,
        size: conn.info.size,
        block_size: u64::from(block),
        server_flags: u64::from(conn.info.flags),
        timeout_secs: opts.io_timeout.as_secs().max(1),
        dead_conn_timeout_secs: opts.dead_timeout.as_secs(),
        fds: vec![conn.stream.as_raw_fd()],
    };
    let index = nbd.connect(&req).map_err(|e| classify(e, opts.index))?;
    // The kernel holds its own reference to the socket now.
    drop(conn);
    Ok(Attachment {
        device: format!("/dev/nbd{index}"),
        uri: uri.to_string(),
        method: Method::KernelNbd,
        size: req.size,
        block_size: block,
        dead_timeout_secs: req.dead_conn_timeout_secs,
        io_timeout_secs: req.timeout_secs,
        attached_at: now_secs(),
        nbd_index: Some(index),
        fuse: None,
        iscsi: None,
        tls: None,
    })
}

fn classify(e: NetlinkError, index: Option<u32>) -> AttachError {
    match (e.errno(), index) {
        (Some(libc::EPERM), _) => AttachError::NotPermitted(e),
        (Some(libc::EBUSY), Some(i)) => AttachError::DeviceBusy(i),
        (Some(libc::EBUSY | libc::ENOSPC | libc::ENOMEM | libc::ENODEV), None) => {
            AttachError::NoFreeDevice(e)
        }
        _ => AttachError::Netlink(e),
    }
}

/// The nbd index of `/dev/nbdN`.
pub fn nbd_index(device: &str) -> Option<u32> {
    device.strip_prefix("/dev/nbd")?.parse().ok()
}

/// Whether an attachment's device is still attached (best effort).
pub fn is_live(a: &Attachment) -> bool {
    match a.method {
        Method::KernelNbd => {
            let Some(i) = a.nbd_index else { return false };
            Nbd::open()
                .and_then(|mut n| n.is_connected(i))
                .unwrap_or(false)
        }
        Method::NbdfuseLoop => {
            fallback::loop_backing(&a.device).is_some()
                && a.fuse.as_ref().is_some_and(|f| fallback::pid_alive(f.pid))
        }
        Method::Iscsi => Path::new(&a.device).exists(),
    }
}

fn detach_attachment(a: &Attachment) -> Result<(), AttachError> {
    match a.method {
        Method::KernelNbd => {
            let i = a
                .nbd_index
                .ok_or_else(|| AttachError::NotAttached(a.device.clone()))?;
            let mut nbd = Nbd::open()?;
            if nbd.is_connected(i)? {
                nbd.disconnect(i).map_err(|e| classify(e, Some(i)))?;
            }
            Ok(())
        }
        Method::Iscsi => fallback::detach_iscsi(a),
        Method::NbdfuseLoop => fallback::detach_nbdfuse(a),
    }
}

/// Detaches `device` (`/dev/nbd0`, `/dev/loop3`, ...) and forgets it. A
/// kernel nbd device without a state file is detached too (an attachment
/// made by a lost state directory); anything else unknown is refused.
pub fn detach(device: &str, state_dir: &Path) -> Result<Attachment, AttachError> {
    let a = match state::load(state_dir, device)? {
        Some(a) => a,
        None => {
            let index = nbd_index(device).ok_or_else(|| AttachError::NotAttached(device.into()))?;
            let mut nbd = Nbd::open()?;
            if !nbd.is_connected(index)? {
                return Err(AttachError::NotAttached(device.into()));
            }
            Attachment {
                device: device.to_string(),
                uri: String::new(),
                method: Method::KernelNbd,
                size: 0,
                block_size: 0,
                dead_timeout_secs: 0,
                io_timeout_secs: 0,
                attached_at: 0,
                nbd_index: Some(index),
                fuse: None,
                iscsi: None,
                tls: None,
            }
        }
    };
    detach_attachment(&a)?;
    state::remove(state_dir, device)?;
    Ok(a)
}

/// An attachment and whether its device is still attached.
#[derive(Debug, Clone)]
pub struct AttachmentStatus {
    pub attachment: Attachment,
    pub live: bool,
}

/// Every recorded attachment with its liveness.
pub fn attachments(state_dir: &Path) -> Result<Vec<AttachmentStatus>, AttachError> {
    Ok(state::load_all(state_dir)?
        .into_iter()
        .map(|a| AttachmentStatus {
            live: is_live(&a),
            attachment: a,
        })
        .collect())
}

/// Makes an attached device show the export's current size; returns it.
///
/// Kernel nbd: a handshake learns the size, and NBD_CMD_RECONFIGURE
/// carries it (NBD_ATTR_SIZE_BYTES, applied to a live device since Linux
/// 5.3) with the fresh socket. The kernel swaps a socket in only for a
/// dead one, so a live device keeps its connection, negotiated at the old
/// size. A server that bounds each connection by its handshake size
/// (strata's controller does) would then fail IO past the old end, so a
/// grown export is refused with [`AttachError::ResizeNeedsReconnect`]
/// unless `server_serves_new_size` says the server accepts the new size on
/// existing connections. The supervisor applies the size safely on its
/// next reconnect. iSCSI: `iscsiadm -m session -R` (rescan); loop:
/// `losetup -c` (nbdfuse keeps its connection's size, so the same caveat).
pub fn refresh_size(
    device: &str,
    opts: &AttachOptions,
    server_serves_new_size: bool,
) -> Result<u64, AttachError> {
    let mut a = state::load(&opts.state_dir, device)?
        .ok_or_else(|| AttachError::NotAttached(device.into()))?;
    let uri = NbdUri::parse(&a.uri)?;
    // A TLS attachment asks over TLS with the key it attached with (its
    // controller may refuse plaintext); the others handshake (kernel nbd
    // needs the socket).
    let (conn, size) = match (&a.method, &a.tls) {
        (Method::NbdfuseLoop, Some(t)) => (None, fallback::tls_export_size(&uri, t)?),
        _ => {
            let c = handshake::connect(&uri, opts.connect_timeout)?;
            let size = c.info.size;
            (Some(c), size)
        }
    };
    if size == a.size {
        return Ok(size);
    }
    if !server_serves_new_size && a.method != Method::Iscsi {
        return Err(AttachError::ResizeNeedsReconnect {
            device: device.into(),
            device_size: a.size,
            export_size: size,
        });
    }
    match a.method {
        Method::KernelNbd => {
            let index = a
                .nbd_index
                .ok_or_else(|| AttachError::NotAttached(device.into()))?;
            let conn = conn
                .as_ref()
                .ok_or_else(|| AttachError::NotAttached(device.into()))?;
            let mut nbd = Nbd::open()?;
            nbd.reconfigure(&netlink::Reconfigure {
                index,
                fds: vec![conn.stream.as_raw_fd()],
                size: Some((size, u64::from(a.block_size))),
            })?;
        }
        Method::Iscsi => {
            fallback::run_tool("iscsiadm", &["-m", "session", "-R"], 60)?;
        }
        Method::NbdfuseLoop => {
            fallback::run_tool("losetup", &["-c", &a.device], 30)?;
            // nbdfuse's file keeps the size it had at connect: the loop
            // device cannot grow past it.
            let device_size = device_bytes(&a.device)?;
            if device_size < size {
                return Err(AttachError::FallbackCannotGrow {
                    device: device.into(),
                    device_size,
                    export_size: size,
                });
            }
        }
    }
    drop(conn);
    a.size = size;
    state::save(&opts.state_dir, &a)?;
    Ok(size)
}

/// A block device's size in bytes (its end, as a seek finds it).
fn device_bytes(device: &str) -> Result<u64, AttachError> {
    use std::io::{Seek, SeekFrom};
    std::fs::File::open(device)
        .and_then(|mut f| f.seek(SeekFrom::End(0)))
        .map_err(|source| AttachError::DeviceSize {
            device: device.into(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nbd_index_from_device() {
        assert_eq!(nbd_index("/dev/nbd0"), Some(0));
        assert_eq!(nbd_index("/dev/nbd15"), Some(15));
        assert_eq!(nbd_index("/dev/nbd0p1"), None);
        assert_eq!(nbd_index("/dev/loop0"), None);
    }

    #[test]
    fn netlink_errors_become_attach_errors() {
        let k = |errno| NetlinkError::Kernel {
            op: "NBD_CMD_CONNECT",
            errno: std::io::Error::from_raw_os_error(errno),
        };
        assert!(matches!(
            classify(k(libc::EPERM), None),
            AttachError::NotPermitted(_)
        ));
        assert!(matches!(
            classify(k(libc::EBUSY), Some(2)),
            AttachError::DeviceBusy(2)
        ));
        assert!(matches!(
            classify(k(libc::EBUSY), None),
            AttachError::NoFreeDevice(_)
        ));
        assert!(matches!(
            classify(k(libc::EINVAL), None),
            AttachError::Netlink(_)
        ));
    }

    #[test]
    fn unreachable_controller_is_reported_before_any_method() {
        // A port nothing listens on (bound then dropped).
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = tempfile::tempdir().unwrap();
        let opts = AttachOptions {
            state_dir: dir.path().to_path_buf(),
            connect_timeout: Duration::from_secs(2),
            ..AttachOptions::default()
        };
        let e = attach(&format!("nbd://127.0.0.1:{port}/v"), &opts).unwrap_err();
        assert!(matches!(e, AttachError::Unreachable { .. }), "{e:?}");
        assert!(matches!(
            attach("http://x/v", &opts),
            Err(AttachError::Uri(_))
        ));
        assert!(state::load_all(dir.path()).unwrap().is_empty());
        assert!(matches!(
            detach("/dev/loop99", dir.path()),
            Err(AttachError::NotAttached(_))
        ));
    }

    /// A server that greets, reads the client flags and `NBD_OPT_GO`, and
    /// answers `NBD_REP_ERR_TLS_REQD` as strata's controller does under
    /// `--nbd-tls require`; serves `n` connections.
    fn tls_requiring_server(n: usize) -> std::net::SocketAddr {
        use std::io::{Read, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for _ in 0..n {
                let Ok((mut s, _)) = l.accept() else { return };
                let mut g = handshake::NBDMAGIC.to_be_bytes().to_vec();
                g.extend_from_slice(&handshake::IHAVEOPT.to_be_bytes());
                g.extend_from_slice(&3u16.to_be_bytes());
                s.write_all(&g).unwrap();
                let mut head = [0u8; 4 + 16];
                s.read_exact(&mut head).unwrap();
                let len = u32::from_be_bytes(head[16..20].try_into().unwrap());
                let mut data = vec![0u8; len as usize];
                s.read_exact(&mut data).unwrap();
                let msg = b"TLS is required: start it with NBD_OPT_STARTTLS";
                let mut r = handshake::OPT_REPLY_MAGIC.to_be_bytes().to_vec();
                r.extend_from_slice(&handshake::NBD_OPT_GO.to_be_bytes());
                r.extend_from_slice(&handshake::NBD_REP_ERR_TLS_REQD.to_be_bytes());
                r.extend_from_slice(&(msg.len() as u32).to_be_bytes());
                r.extend_from_slice(msg);
                s.write_all(&r).unwrap();
            }
        });
        addr
    }

    #[test]
    fn a_controller_requiring_tls_needs_a_key_and_takes_only_nbdfuse() {
        let addr = tls_requiring_server(2);
        let dir = tempfile::tempdir().unwrap();
        let opts = AttachOptions {
            state_dir: dir.path().to_path_buf(),
            connect_timeout: Duration::from_secs(5),
            ..AttachOptions::default()
        };
        let uri = format!("nbd://{addr}/vol");
        // No key: a typed error that says TLS and the key.
        let e = attach(&uri, &opts).unwrap_err();
        assert!(matches!(e, AttachError::TlsRequired { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(msg.contains("requires NBD over TLS"), "{msg}");
        assert!(msg.contains("cluster key"), "{msg}");
        // A key, but only the kernel path allowed: it cannot speak TLS.
        let keyed = AttachOptions {
            methods: MethodChoice::Only(Method::KernelNbd),
            tls: Some(TlsPsk {
                username: "strata".into(),
                psk_file_text: format!("strata:{}\n", "00".repeat(32)),
            }),
            ..opts.clone()
        };
        match attach(&uri, &keyed).unwrap_err() {
            AttachError::NoMethod(why) => {
                assert!(
                    why.contains("kernel-nbd: the controller requires NBD over TLS"),
                    "{why}"
                )
            }
            e => panic!("{e:?}"),
        }
        // Nothing left behind: no state, no key file.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
