//! The kernel's nbd driver over generic netlink: a small blocking client
//! that sends [`crate::netlink`] messages on an `AF_NETLINK` socket.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

use crate::netlink::{self as nl, Attr, DeviceStatus, ParseError};

/// A failed netlink exchange with the nbd driver.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("Cannot use a generic netlink socket")]
    Socket(#[source] io::Error),
    #[error("The kernel has no generic netlink family \"nbd\" (nbd module not loaded)")]
    NoFamily,
    #[error("The nbd driver has no multicast group {0:?}")]
    NoGroup(&'static str),
    #[error("The nbd driver refused {op}")]
    Kernel {
        op: &'static str,
        #[source]
        errno: io::Error,
    },
    #[error("Bad netlink reply to {op}")]
    Parse {
        op: &'static str,
        #[source]
        source: ParseError,
    },
}

impl NetlinkError {
    /// The errno the kernel answered with, if it did.
    pub fn errno(&self) -> Option<i32> {
        match self {
            NetlinkError::Kernel { errno, .. } => errno.raw_os_error(),
            _ => None,
        }
    }
}

/// Whether the nbd module is loaded; when not, tries `modprobe nbd` once
/// (quietly: a host without the module or without modprobe says no).
pub fn ensure_module() -> bool {
    if Path::new("/sys/module/nbd").exists() {
        return true;
    }
    let tried = std::process::Command::new("modprobe")
        .arg("nbd")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
    matches!(tried, Ok(s) if s.success()) && Path::new("/sys/module/nbd").exists()
}

/// A raw generic netlink socket.
struct Socket {
    fd: OwnedFd,
}

impl Socket {
    fn open() -> io::Result<Socket> {
        // SAFETY: socket(2) with constant arguments; the result is checked
        // and owned by OwnedFd from here on.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                nl::NETLINK_GENERIC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_nl is plain data; all-zero is a valid value
        // (pid 0 lets the kernel assign one, no groups).
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: addr is a valid sockaddr_nl and the length matches it.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &addr as *const libc::sockaddr_nl as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Socket { fd })
    }

    fn send(&self, buf: &[u8]) -> io::Result<()> {
        // SAFETY: buf is a valid slice for its length; the kernel is the
        // destination (the socket is bound, default peer is pid 0).
        let n = unsafe {
            libc::send(
                self.fd.as_raw_fd(),
                buf.as_ptr() as *const libc::c_void,
                buf.len(),
                0,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            // SAFETY: buf is a valid writable slice for its length.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                    0,
                )
            };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    fn set_recv_timeout(&self, t: Duration) -> io::Result<()> {
        let tv = libc::timeval {
            tv_sec: t.as_secs() as libc::time_t,
            tv_usec: t.subsec_micros() as libc::suseconds_t,
        };
        // SAFETY: tv is a valid timeval and the length matches it.
        let r = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const libc::timeval as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn join_group(&self, group: u32) -> io::Result<()> {
        // SAFETY: group is a valid u32 and the length matches it.
        let r = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_NETLINK,
                libc::NETLINK_ADD_MEMBERSHIP,
                &group as *const u32 as *const libc::c_void,
                std::mem::size_of::<u32>() as u32,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Sends one request and collects its reply attributes until the ACK.
fn transact(
    sock: &Socket,
    seq: u32,
    family: u16,
    cmd: u8,
    version: u8,
    attrs: &[Attr],
    op: &'static str,
) -> Result<Option<Vec<u8>>, NetlinkError> {
    let msg = nl::encode_request(family, seq, cmd, version, attrs);
    sock.send(&msg).map_err(NetlinkError::Socket)?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut reply = None;
    loop {
        let n = sock.recv(&mut buf).map_err(NetlinkError::Socket)?;
        let parse = |source| NetlinkError::Parse { op, source };
        for m in nl::messages(&buf[..n]).map_err(parse)? {
            if m.seq != seq {
                continue;
            }
            match m.kind {
                nl::NLMSG_ERROR => {
                    let code = nl::error_code(m.payload).map_err(parse)?;
                    if code == 0 {
                        return Ok(reply);
                    }
                    return Err(NetlinkError::Kernel {
                        op,
                        errno: io::Error::from_raw_os_error(-code),
                    });
                }
                nl::NLMSG_DONE => return Ok(reply),
                _ => {
                    let (_, body) = nl::genl(m.payload).map_err(parse)?;
                    reply = Some(body.to_vec());
                }
            }
        }
    }
}

/// A client of the kernel's nbd netlink family.
pub struct Nbd {
    sock: Socket,
    family: nl::Family,
    seq: u32,
}

impl Nbd {
    /// Opens a socket and resolves the "nbd" family.
    pub fn open() -> Result<Nbd, NetlinkError> {
        let sock = Socket::open().map_err(NetlinkError::Socket)?;
        // A kernel that does not answer within seconds is broken; do not hang.
        sock.set_recv_timeout(Duration::from_secs(30))
            .map_err(NetlinkError::Socket)?;
        let reply = match transact(
            &sock,
            1,
            nl::GENL_ID_CTRL,
            nl::CTRL_CMD_GETFAMILY,
            1,
            &[Attr::Str(
                nl::CTRL_ATTR_FAMILY_NAME,
                nl::NBD_GENL_FAMILY_NAME.into(),
            )],
            "CTRL_CMD_GETFAMILY",
        ) {
            Ok(r) => r,
            Err(e) if e.errno() == Some(libc::ENOENT) => return Err(NetlinkError::NoFamily),
            Err(e) => return Err(e),
        };
        let family = nl::parse_family(reply.as_deref().unwrap_or(&[])).map_err(|source| {
            NetlinkError::Parse {
                op: "CTRL_CMD_GETFAMILY",
                source,
            }
        })?;
        Ok(Nbd {
            sock,
            family,
            seq: 1,
        })
    }

    fn call(
        &mut self,
        cmd: u8,
        attrs: &[Attr],
        op: &'static str,
    ) -> Result<Option<Vec<u8>>, NetlinkError> {
        self.seq = self.seq.wrapping_add(1);
        transact(
            &self.sock,
            self.seq,
            self.family.id,
            cmd,
            nl::NBD_GENL_VERSION,
            attrs,
            op,
        )
    }

    /// NBD_CMD_CONNECT; returns the device index.
    pub fn connect(&mut self, c: &nl::Connect) -> Result<u32, NetlinkError> {
        let reply = self.call(nl::NBD_CMD_CONNECT, &c.attrs(), "NBD_CMD_CONNECT")?;
        nl::parse_index(reply.as_deref().unwrap_or(&[])).map_err(|source| NetlinkError::Parse {
            op: "NBD_CMD_CONNECT",
            source,
        })
    }

    /// NBD_CMD_RECONFIGURE. The kernel takes the socket only in place of a
    /// dead one; on a live device it drops the socket and still answers 0.
    pub fn reconfigure(&mut self, r: &nl::Reconfigure) -> Result<(), NetlinkError> {
        self.call(nl::NBD_CMD_RECONFIGURE, &r.attrs(), "NBD_CMD_RECONFIGURE")
            .map(|_| ())
    }

    /// NBD_CMD_DISCONNECT: the device fails outstanding IO and detaches.
    pub fn disconnect(&mut self, index: u32) -> Result<(), NetlinkError> {
        self.call(
            nl::NBD_CMD_DISCONNECT,
            &[Attr::U32(nl::NBD_ATTR_INDEX, index)],
            "NBD_CMD_DISCONNECT",
        )
        .map(|_| ())
    }

    /// NBD_CMD_STATUS for every device.
    pub fn status(&mut self) -> Result<Vec<DeviceStatus>, NetlinkError> {
        let reply = self.call(nl::NBD_CMD_STATUS, &[], "NBD_CMD_STATUS")?;
        nl::parse_status(reply.as_deref().unwrap_or(&[])).map_err(|source| NetlinkError::Parse {
            op: "NBD_CMD_STATUS",
            source,
        })
    }

    /// Whether device `index` is attached.
    pub fn is_connected(&mut self, index: u32) -> Result<bool, NetlinkError> {
        Ok(self
            .status()?
            .iter()
            .any(|d| d.index == index && d.connected))
    }

    /// A second socket subscribed to the nbd multicast group (LINK_DEAD).
    pub fn subscribe(&self) -> Result<Events, NetlinkError> {
        let group = self
            .family
            .groups
            .iter()
            .find(|(n, _)| n == nl::NBD_GENL_MCAST_GROUP_NAME)
            .map(|(_, id)| *id)
            .ok_or(NetlinkError::NoGroup(nl::NBD_GENL_MCAST_GROUP_NAME))?;
        let sock = Socket::open().map_err(NetlinkError::Socket)?;
        sock.join_group(group).map_err(NetlinkError::Socket)?;
        Ok(Events {
            sock,
            family: self.family.id,
        })
    }
}

/// Notifications from the nbd driver.
pub struct Events {
    sock: Socket,
    family: u16,
}

impl Events {
    /// Waits up to `timeout` for LINK_DEAD notifications; returns the
    /// indexes whose connection died (empty on timeout).
    pub fn wait_link_dead(&self, timeout: Duration) -> Result<Vec<u32>, NetlinkError> {
        self.sock
            .set_recv_timeout(timeout.max(Duration::from_millis(1)))
            .map_err(NetlinkError::Socket)?;
        let mut buf = vec![0u8; 16 * 1024];
        let n = match self.sock.recv(&mut buf) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(Vec::new())
            }
            // The socket buffer overflowed: events were lost. The caller's
            // periodic check covers them; report none.
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => return Ok(Vec::new()),
            Err(e) => return Err(NetlinkError::Socket(e)),
        };
        let mut dead = Vec::new();
        let parse = |source| NetlinkError::Parse {
            op: "NBD_CMD_LINK_DEAD",
            source,
        };
        for m in nl::messages(&buf[..n]).map_err(parse)? {
            if m.kind != self.family {
                continue;
            }
            let (cmd, body) = nl::genl(m.payload).map_err(parse)?;
            if cmd == nl::NBD_CMD_LINK_DEAD {
                dead.push(nl::parse_index(body).map_err(parse)?);
            }
        }
        Ok(dead)
    }
}
