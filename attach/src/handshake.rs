//! The client side of the NBD fixed-newstyle handshake, up to `NBD_OPT_GO`.
//!
//! The encoders and parsers are pure functions over byte slices; [`negotiate`]
//! drives them over any `Read + Write` (a scripted stream in the tests, a
//! TCP or unix socket in [`connect`]). The socket that comes out is in the
//! transmission phase: the kernel's nbd driver (or nothing else) uses it next.

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use crate::uri::{Endpoint, NbdUri};

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const NBD_OPT_GO: u32 = 7;
pub const NBD_REP_ACK: u32 = 1;
pub const NBD_REP_INFO: u32 = 3;
/// The server requires TLS before this option (`--nbd-tls require`).
pub const NBD_REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;
pub const NBD_REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
pub const NBD_INFO_EXPORT: u16 = 0;
pub const NBD_INFO_BLOCK_SIZE: u16 = 3;
/// Transmission flag: the server sent flags (always set by a sane server).
pub const NBD_FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const NBD_FLAG_READ_ONLY: u16 = 1 << 1;
/// The block size the kernel device uses: strata's minimum NBD block size.
pub const DEVICE_BLOCK_SIZE: u32 = 4096;
/// Largest option reply accepted (the spec allows servers to send up to a
/// few KiB of description; anything beyond is a broken server).
const MAX_REPLY_LEN: u32 = 64 * 1024;

/// What the server said about the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportInfo {
    pub size: u64,
    /// Transmission flags (`NBD_FLAG_*`), handed to the kernel as is.
    pub flags: u16,
    pub min_block: u32,
    pub preferred_block: u32,
    pub max_block: u32,
}

impl ExportInfo {
    /// The logical block size for the device: 4096, or the server's
    /// minimum when that is larger (refused above the page size).
    pub fn device_block_size(&self) -> u32 {
        self.min_block.max(DEVICE_BLOCK_SIZE)
    }

    pub fn read_only(&self) -> bool {
        self.flags & NBD_FLAG_READ_ONLY != 0
    }
}

/// Why the handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("Connection lost during the NBD handshake")]
    Io(#[from] io::Error),
    #[error("The server is not an NBD server (magic {0:#018x})")]
    NotNbd(u64),
    #[error("The server does not speak fixed-newstyle NBD (handshake flags {0:#06x})")]
    NotFixedNewstyle(u16),
    #[error("The server has no export {export:?}: {message}")]
    ExportMissing { export: String, message: String },
    /// `NBD_REP_ERR_TLS_REQD`: the server serves only clients that start
    /// TLS (strata's `--nbd-tls require`); this plaintext handshake cannot.
    #[error("The server requires TLS for export {export:?}: {message}")]
    TlsRequired { export: String, message: String },
    #[error("The server refused export {export:?} (NBD error {code:#x}): {message}")]
    Refused {
        export: String,
        code: u32,
        message: String,
    },
    #[error("Malformed option reply: {0}")]
    BadReply(&'static str),
    #[error("The server did not send the export size")]
    NoSize,
    #[error("The server's minimum block size {0} is not usable by a kernel block device")]
    BlockSize(u32),
}

/// Parses the server's first 18 bytes; returns its handshake flags.
pub fn parse_greeting(b: &[u8; 18]) -> Result<u16, HandshakeError> {
    let magic = u64::from_be_bytes(b[0..8].try_into().expect("8 bytes"));
    if magic != NBDMAGIC {
        return Err(HandshakeError::NotNbd(magic));
    }
    let opt = u64::from_be_bytes(b[8..16].try_into().expect("8 bytes"));
    let flags = u16::from_be_bytes([b[16], b[17]]);
    if opt != IHAVEOPT || flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(HandshakeError::NotFixedNewstyle(flags));
    }
    Ok(flags)
}

/// The client flags answering `server_flags`.
pub fn client_flags(server_flags: u16) -> [u8; 4] {
    let f = u32::from(server_flags & (FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES));
    f.to_be_bytes()
}

/// `NBD_OPT_GO` for `export`, asking for the block sizes.
pub fn encode_opt_go(export: &str) -> Vec<u8> {
    let name = export.as_bytes();
    let data_len = 4 + name.len() + 2 + 2;
    let mut v = Vec::with_capacity(16 + data_len);
    v.extend_from_slice(&IHAVEOPT.to_be_bytes());
    v.extend_from_slice(&NBD_OPT_GO.to_be_bytes());
    v.extend_from_slice(&(data_len as u32).to_be_bytes());
    v.extend_from_slice(&(name.len() as u32).to_be_bytes());
    v.extend_from_slice(name);
    v.extend_from_slice(&1u16.to_be_bytes());
    v.extend_from_slice(&NBD_INFO_BLOCK_SIZE.to_be_bytes());
    v
}

/// An option reply header: (option, reply type, payload length).
pub fn parse_reply_header(b: &[u8; 20]) -> Result<(u32, u32, u32), HandshakeError> {
    let magic = u64::from_be_bytes(b[0..8].try_into().expect("8 bytes"));
    if magic != OPT_REPLY_MAGIC {
        return Err(HandshakeError::BadReply("wrong option reply magic"));
    }
    let opt = u32::from_be_bytes(b[8..12].try_into().expect("4 bytes"));
    let kind = u32::from_be_bytes(b[12..16].try_into().expect("4 bytes"));
    let len = u32::from_be_bytes(b[16..20].try_into().expect("4 bytes"));
    if len > MAX_REPLY_LEN {
        return Err(HandshakeError::BadReply("option reply longer than 64 KiB"));
    }
    Ok((opt, kind, len))
}

/// Partial export facts gathered from `NBD_REP_INFO` replies.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct InfoAcc {
    pub size_flags: Option<(u64, u16)>,
    pub blocks: Option<(u32, u32, u32)>,
}

/// Folds one `NBD_REP_INFO` payload into `acc`; unknown info types are
/// ignored as the spec asks.
pub fn apply_info(acc: &mut InfoAcc, payload: &[u8]) -> Result<(), HandshakeError> {
    let Some((kind, rest)) = payload.split_first_chunk::<2>() else {
        return Err(HandshakeError::BadReply(
            "NBD_REP_INFO shorter than 2 bytes",
        ));
    };
    match u16::from_be_bytes(*kind) {
        NBD_INFO_EXPORT => {
            let b: &[u8; 10] = rest
                .try_into()
                .map_err(|_| HandshakeError::BadReply("NBD_INFO_EXPORT is not 12 bytes"))?;
            let size = u64::from_be_bytes(b[0..8].try_into().expect("8 bytes"));
            acc.size_flags = Some((size, u16::from_be_bytes([b[8], b[9]])));
        }
        NBD_INFO_BLOCK_SIZE => {
            let b: &[u8; 12] = rest
                .try_into()
                .map_err(|_| HandshakeError::BadReply("NBD_INFO_BLOCK_SIZE is not 14 bytes"))?;
            let n = |i: usize| u32::from_be_bytes(b[i..i + 4].try_into().expect("4 bytes"));
            acc.blocks = Some((n(0), n(4), n(8)));
        }
        _ => {}
    }
    Ok(())
}

/// Validates the gathered facts into an [`ExportInfo`].
pub fn finish(acc: InfoAcc) -> Result<ExportInfo, HandshakeError> {
    let (size, flags) = acc.size_flags.ok_or(HandshakeError::NoSize)?;
    let (min_block, preferred_block, max_block) = acc.blocks.unwrap_or((1, 4096, 32 << 20));
    if min_block == 0 || !min_block.is_power_of_two() || min_block > 4096 {
        return Err(HandshakeError::BlockSize(min_block));
    }
    Ok(ExportInfo {
        size,
        flags,
        min_block,
        preferred_block,
        max_block,
    })
}

/// The error an `NBD_REP_ERR_*` reply means.
pub fn reply_error(export: &str, code: u32, payload: &[u8]) -> HandshakeError {
    let message = String::from_utf8_lossy(payload).into_owned();
    if code == NBD_REP_ERR_UNKNOWN {
        HandshakeError::ExportMissing {
            export: export.to_string(),
            message,
        }
    } else if code == NBD_REP_ERR_TLS_REQD {
        HandshakeError::TlsRequired {
            export: export.to_string(),
            message,
        }
    } else {
        HandshakeError::Refused {
            export: export.to_string(),
            code,
            message,
        }
    }
}

/// Runs the handshake on `s` (fresh from connect) for `export`.
pub fn negotiate<S: Read + Write>(s: &mut S, export: &str) -> Result<ExportInfo, HandshakeError> {
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting)?;
    let server_flags = parse_greeting(&greeting)?;
    let mut out = client_flags(server_flags).to_vec();
    out.extend_from_slice(&encode_opt_go(export));
    s.write_all(&out)?;
    s.flush()?;
    let mut acc = InfoAcc::default();
    loop {
        let mut hdr = [0u8; 20];
        s.read_exact(&mut hdr)?;
        let (opt, kind, len) = parse_reply_header(&hdr)?;
        let mut payload = vec![0u8; len as usize];
        s.read_exact(&mut payload)?;
        if opt != NBD_OPT_GO {
            return Err(HandshakeError::BadReply("reply to an option not sent"));
        }
        match kind {
            NBD_REP_ACK => return finish(acc),
            NBD_REP_INFO => apply_info(&mut acc, &payload)?,
            k if k & (1 << 31) != 0 => return Err(reply_error(export, k, &payload)),
            _ => {
                return Err(HandshakeError::BadReply(
                    "unexpected reply type to NBD_OPT_GO",
                ))
            }
        }
    }
}

/// A socket in the NBD transmission phase.
#[derive(Debug)]
pub enum NbdStream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl NbdStream {
    fn set_timeouts(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            NbdStream::Tcp(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
            NbdStream::Unix(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
        }
    }
}

impl Read for NbdStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            NbdStream::Tcp(s) => s.read(buf),
            NbdStream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for NbdStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            NbdStream::Tcp(s) => s.write(buf),
            NbdStream::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsFd for NbdStream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            NbdStream::Tcp(s) => s.as_fd(),
            NbdStream::Unix(s) => s.as_fd(),
        }
    }
}

impl AsRawFd for NbdStream {
    fn as_raw_fd(&self) -> RawFd {
        self.as_fd().as_raw_fd()
    }
}

/// A negotiated connection: the socket and what the server said.
#[derive(Debug)]
pub struct Connected {
    pub stream: NbdStream,
    pub info: ExportInfo,
}

/// Why [`connect`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("Cannot reach the NBD server at {uri}")]
    Unreachable {
        uri: String,
        #[source]
        source: io::Error,
    },
    #[error("NBD handshake with {uri} failed")]
    Handshake {
        uri: String,
        #[source]
        source: HandshakeError,
    },
}

impl ConnectError {
    /// True when the server answered but refused (no such export): retrying
    /// will not help.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            ConnectError::Handshake {
                source: HandshakeError::ExportMissing { .. }
                    | HandshakeError::TlsRequired { .. }
                    | HandshakeError::Refused { .. }
                    | HandshakeError::NotNbd(_)
                    | HandshakeError::NotFixedNewstyle(_)
                    | HandshakeError::BlockSize(_),
                ..
            }
        )
    }
}

/// Dials `uri` and negotiates; `timeout` bounds the dial and each read and
/// write of the handshake. The socket comes back blocking, with no
/// timeouts (the kernel would inherit them) and TCP_NODELAY set.
pub fn connect(uri: &NbdUri, timeout: Duration) -> Result<Connected, ConnectError> {
    let unreachable = |source| ConnectError::Unreachable {
        uri: uri.to_string(),
        source,
    };
    let mut stream = match &uri.endpoint {
        Endpoint::Tcp { host, port } => {
            let addrs: Vec<_> = (host.as_str(), *port)
                .to_socket_addrs()
                .map_err(unreachable)?
                .collect();
            let mut last = io::Error::new(io::ErrorKind::NotFound, "name resolved to no address");
            let mut found = None;
            for a in addrs {
                match TcpStream::connect_timeout(&a, timeout) {
                    Ok(s) => {
                        found = Some(s);
                        break;
                    }
                    Err(e) => last = e,
                }
            }
            let s = found.ok_or_else(|| unreachable(last))?;
            s.set_nodelay(true).map_err(unreachable)?;
            NbdStream::Tcp(s)
        }
        Endpoint::Unix(path) => NbdStream::Unix(UnixStream::connect(path).map_err(unreachable)?),
    };
    stream.set_timeouts(Some(timeout)).map_err(unreachable)?;
    let info = negotiate(&mut stream, &uri.export).map_err(|source| ConnectError::Handshake {
        uri: uri.to_string(),
        source,
    })?;
    stream.set_timeouts(None).map_err(unreachable)?;
    Ok(Connected { stream, info })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream that replays `input` and records what the client wrote.
    struct Script {
        input: io::Cursor<Vec<u8>>,
        written: Vec<u8>,
    }

    impl Read for Script {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.input.read(buf)
        }
    }
    impl Write for Script {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.written.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn greeting(flags: u16) -> Vec<u8> {
        let mut v = NBDMAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&IHAVEOPT.to_be_bytes());
        v.extend_from_slice(&flags.to_be_bytes());
        v
    }

    fn reply(opt: u32, kind: u32, payload: &[u8]) -> Vec<u8> {
        let mut v = OPT_REPLY_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&opt.to_be_bytes());
        v.extend_from_slice(&kind.to_be_bytes());
        v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    fn info_export(size: u64, flags: u16) -> Vec<u8> {
        let mut v = NBD_INFO_EXPORT.to_be_bytes().to_vec();
        v.extend_from_slice(&size.to_be_bytes());
        v.extend_from_slice(&flags.to_be_bytes());
        v
    }

    fn info_blocks(min: u32, pref: u32, max: u32) -> Vec<u8> {
        let mut v = NBD_INFO_BLOCK_SIZE.to_be_bytes().to_vec();
        for n in [min, pref, max] {
            v.extend_from_slice(&n.to_be_bytes());
        }
        v
    }

    fn run(input: Vec<u8>, export: &str) -> (Result<ExportInfo, HandshakeError>, Vec<u8>) {
        let mut s = Script {
            input: io::Cursor::new(input),
            written: Vec::new(),
        };
        let r = negotiate(&mut s, export);
        (r, s.written)
    }

    #[test]
    fn go_with_size_flags_and_block_sizes() {
        let mut input = greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        input.extend(reply(
            NBD_OPT_GO,
            NBD_REP_INFO,
            &info_export(64 << 20, 0x1ed),
        ));
        // An info type this client never asked for is skipped.
        input.extend(reply(NBD_OPT_GO, NBD_REP_INFO, &[0, 2, b'h', b'i']));
        input.extend(reply(
            NBD_OPT_GO,
            NBD_REP_INFO,
            &info_blocks(4096, 4096, 1 << 25),
        ));
        input.extend(reply(NBD_OPT_GO, NBD_REP_ACK, &[]));
        let (r, written) = run(input, "vol");
        let info = r.unwrap();
        assert_eq!(
            info,
            ExportInfo {
                size: 64 << 20,
                flags: 0x1ed,
                min_block: 4096,
                preferred_block: 4096,
                max_block: 1 << 25
            }
        );
        assert_eq!(info.device_block_size(), 4096);
        // The exact bytes the client sent: flags, then NBD_OPT_GO "vol" with
        // one info request (NBD_INFO_BLOCK_SIZE).
        let want: Vec<u8> = [
            &[0, 0, 0, 3][..],
            &IHAVEOPT.to_be_bytes(),
            &[0, 0, 0, 7],
            &[0, 0, 0, 11],
            &[0, 0, 0, 3],
            b"vol",
            &[0, 1, 0, 3],
        ]
        .concat();
        assert_eq!(written, want);
    }

    #[test]
    fn client_flags_echo_only_known_server_flags() {
        assert_eq!(client_flags(FLAG_FIXED_NEWSTYLE), [0, 0, 0, 1]);
        assert_eq!(client_flags(0xffff), [0, 0, 0, 3]);
    }

    #[test]
    fn failures_are_typed() {
        type Check = fn(&HandshakeError) -> bool;
        let mut not_nbd = greeting(1);
        not_nbd[0] = b'X';
        let mut oldstyle = NBDMAGIC.to_be_bytes().to_vec();
        oldstyle.extend_from_slice(&0x0000_4202_8186_1253u64.to_be_bytes());
        oldstyle.extend_from_slice(&[0, 0]);
        let with = |replies: Vec<Vec<u8>>| {
            let mut v = greeting(3);
            for r in replies {
                v.extend(r);
            }
            v
        };
        let cases: Vec<(&str, Vec<u8>, Check)> = vec![
            ("bad magic", not_nbd, |e| {
                matches!(e, HandshakeError::NotNbd(_))
            }),
            ("oldstyle", oldstyle, |e| {
                matches!(e, HandshakeError::NotFixedNewstyle(_))
            }),
            ("not fixed", greeting(0), |e| {
                matches!(e, HandshakeError::NotFixedNewstyle(0))
            }),
            ("eof in greeting", greeting(1)[..10].to_vec(), |e| {
                matches!(e, HandshakeError::Io(_))
            }),
            (
                "unknown export",
                with(vec![reply(
                    NBD_OPT_GO,
                    NBD_REP_ERR_UNKNOWN,
                    b"no such volume",
                )]),
                |e| matches!(e, HandshakeError::ExportMissing { message, .. } if message == "no such volume"),
            ),
            (
                "TLS required",
                with(vec![reply(
                    NBD_OPT_GO,
                    NBD_REP_ERR_TLS_REQD,
                    b"TLS is required: start it with NBD_OPT_STARTTLS",
                )]),
                |e| matches!(e, HandshakeError::TlsRequired { export, .. } if export == "vol"),
            ),
            (
                "policy",
                with(vec![reply(NBD_OPT_GO, (1 << 31) + 2, b"")]),
                |e| matches!(e, HandshakeError::Refused { code, .. } if *code == (1 << 31) + 2),
            ),
            (
                "ack without size",
                with(vec![reply(NBD_OPT_GO, NBD_REP_ACK, &[])]),
                |e| matches!(e, HandshakeError::NoSize),
            ),
            (
                "short export info",
                with(vec![reply(
                    NBD_OPT_GO,
                    NBD_REP_INFO,
                    &info_export(1, 1)[..8],
                )]),
                |e| matches!(e, HandshakeError::BadReply(_)),
            ),
            (
                "empty info",
                with(vec![reply(NBD_OPT_GO, NBD_REP_INFO, &[])]),
                |e| matches!(e, HandshakeError::BadReply(_)),
            ),
            (
                "wrong option echoed",
                with(vec![reply(1, NBD_REP_ACK, &[])]),
                |e| matches!(e, HandshakeError::BadReply(_)),
            ),
            (
                "bad reply magic",
                {
                    let mut v = with(vec![reply(NBD_OPT_GO, NBD_REP_ACK, &[])]);
                    v[18] ^= 0xff;
                    v
                },
                |e| matches!(e, HandshakeError::BadReply(_)),
            ),
            (
                "huge reply",
                {
                    let mut r = reply(NBD_OPT_GO, NBD_REP_INFO, &[]);
                    r[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
                    with(vec![r])
                },
                |e| matches!(e, HandshakeError::BadReply(_)),
            ),
            (
                "block size too large",
                with(vec![
                    reply(NBD_OPT_GO, NBD_REP_INFO, &info_export(1 << 20, 1)),
                    reply(
                        NBD_OPT_GO,
                        NBD_REP_INFO,
                        &info_blocks(65536, 65536, 1 << 25),
                    ),
                    reply(NBD_OPT_GO, NBD_REP_ACK, &[]),
                ]),
                |e| matches!(e, HandshakeError::BlockSize(65536)),
            ),
            (
                "block size not a power of two",
                with(vec![
                    reply(NBD_OPT_GO, NBD_REP_INFO, &info_export(1 << 20, 1)),
                    reply(NBD_OPT_GO, NBD_REP_INFO, &info_blocks(3000, 4096, 1 << 25)),
                    reply(NBD_OPT_GO, NBD_REP_ACK, &[]),
                ]),
                |e| matches!(e, HandshakeError::BlockSize(3000)),
            ),
            (
                "eof before ack",
                with(vec![reply(NBD_OPT_GO, NBD_REP_INFO, &info_export(1, 1))]),
                |e| matches!(e, HandshakeError::Io(_)),
            ),
        ];
        for (name, input, check) in cases {
            let (r, _) = run(input, "vol");
            let e = r.expect_err(name);
            assert!(check(&e), "{name}: {e:?}");
        }
    }

    #[test]
    fn a_server_without_block_size_info_gets_4k_devices() {
        let mut input = greeting(1);
        input.extend(reply(NBD_OPT_GO, NBD_REP_INFO, &info_export(1 << 30, 1)));
        input.extend(reply(NBD_OPT_GO, NBD_REP_ACK, &[]));
        let info = run(input, "").0.unwrap();
        assert_eq!(info.min_block, 1);
        assert_eq!(info.device_block_size(), 4096);
        assert!(!info.read_only());
    }

    #[test]
    fn truncated_input_never_panics() {
        let mut full = greeting(3);
        full.extend(reply(NBD_OPT_GO, NBD_REP_INFO, &info_export(1 << 20, 1)));
        full.extend(reply(
            NBD_OPT_GO,
            NBD_REP_INFO,
            &info_blocks(512, 4096, 1 << 20),
        ));
        full.extend(reply(NBD_OPT_GO, NBD_REP_ACK, &[]));
        assert!(run(full.clone(), "v").0.is_ok());
        for cut in 0..full.len() {
            assert!(run(full[..cut].to_vec(), "v").0.is_err(), "cut at {cut}");
        }
    }
}
