//! Generic netlink messages for the kernel's nbd driver, encoded and parsed
//! as pure functions over bytes (no sockets here; [`crate::kernel`] sends
//! them).
//!
//! The attribute numbers are the kernel ABI of
//! `include/uapi/linux/nbd-netlink.h` (family "nbd", version 1, multicast
//! group "nbd_mc_group") and of the generic netlink controller
//! (`include/uapi/linux/genetlink.h`). Byte order is the host's, as netlink
//! requires.

/// `NETLINK_GENERIC` protocol number.
pub const NETLINK_GENERIC: i32 = 16;
pub const NLM_F_REQUEST: u16 = 0x1;
pub const NLM_F_ACK: u16 = 0x4;
pub const NLMSG_ERROR: u16 = 2;
pub const NLMSG_DONE: u16 = 3;
pub const NLA_F_NESTED: u16 = 1 << 15;
const NLA_TYPE_MASK: u16 = !(NLA_F_NESTED | (1 << 14));
const NLMSG_HDRLEN: usize = 16;
const GENL_HDRLEN: usize = 4;

// Generic netlink controller.
pub const GENL_ID_CTRL: u16 = 0x10;
pub const CTRL_CMD_GETFAMILY: u8 = 3;
pub const CTRL_ATTR_FAMILY_ID: u16 = 1;
pub const CTRL_ATTR_FAMILY_NAME: u16 = 2;
pub const CTRL_ATTR_MCAST_GROUPS: u16 = 7;
pub const CTRL_ATTR_MCAST_GRP_NAME: u16 = 1;
pub const CTRL_ATTR_MCAST_GRP_ID: u16 = 2;

// include/uapi/linux/nbd-netlink.h
pub const NBD_GENL_FAMILY_NAME: &str = "nbd";
pub const NBD_GENL_VERSION: u8 = 1;
pub const NBD_GENL_MCAST_GROUP_NAME: &str = "nbd_mc_group";
pub const NBD_ATTR_INDEX: u16 = 1;
pub const NBD_ATTR_SIZE_BYTES: u16 = 2;
pub const NBD_ATTR_BLOCK_SIZE_BYTES: u16 = 3;
pub const NBD_ATTR_TIMEOUT: u16 = 4;
pub const NBD_ATTR_SERVER_FLAGS: u16 = 5;
pub const NBD_ATTR_CLIENT_FLAGS: u16 = 6;
pub const NBD_ATTR_SOCKETS: u16 = 7;
pub const NBD_ATTR_DEAD_CONN_TIMEOUT: u16 = 8;
pub const NBD_ATTR_DEVICE_LIST: u16 = 9;
pub const NBD_DEVICE_ITEM: u16 = 1;
pub const NBD_DEVICE_INDEX: u16 = 1;
pub const NBD_DEVICE_CONNECTED: u16 = 2;
pub const NBD_SOCK_ITEM: u16 = 1;
pub const NBD_SOCK_FD: u16 = 1;
pub const NBD_CMD_CONNECT: u8 = 1;
pub const NBD_CMD_DISCONNECT: u8 = 2;
pub const NBD_CMD_RECONFIGURE: u8 = 3;
pub const NBD_CMD_LINK_DEAD: u8 = 4;
pub const NBD_CMD_STATUS: u8 = 5;

/// A netlink attribute to encode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attr {
    U8(u16, u8),
    U16(u16, u16),
    U32(u16, u32),
    U64(u16, u64),
    /// A NUL-terminated string.
    Str(u16, String),
    Nested(u16, Vec<Attr>),
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Appends `attrs` in netlink attribute format (each padded to 4 bytes).
pub fn encode_attrs(attrs: &[Attr], out: &mut Vec<u8>) {
    for a in attrs {
        let start = out.len();
        out.extend_from_slice(&[0; 4]);
        let kind = match a {
            Attr::U8(k, v) => {
                out.push(*v);
                *k
            }
            Attr::U16(k, v) => {
                out.extend_from_slice(&v.to_ne_bytes());
                *k
            }
            Attr::U32(k, v) => {
                out.extend_from_slice(&v.to_ne_bytes());
                *k
            }
            Attr::U64(k, v) => {
                out.extend_from_slice(&v.to_ne_bytes());
                *k
            }
            Attr::Str(k, s) => {
                out.extend_from_slice(s.as_bytes());
                out.push(0);
                *k
            }
            Attr::Nested(k, inner) => {
                encode_attrs(inner, out);
                *k | NLA_F_NESTED
            }
        };
        let len = (out.len() - start) as u16;
        out[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        out[start + 2..start + 4].copy_from_slice(&kind.to_ne_bytes());
        out.resize(start + align4(len as usize), 0);
    }
}

/// A whole generic netlink request: netlink header, genl header, attributes.
pub fn encode_request(family: u16, seq: u32, cmd: u8, version: u8, attrs: &[Attr]) -> Vec<u8> {
    let mut out = vec![0u8; NLMSG_HDRLEN];
    out.extend_from_slice(&[cmd, version, 0, 0]);
    encode_attrs(attrs, &mut out);
    let len = out.len() as u32;
    out[0..4].copy_from_slice(&len.to_ne_bytes());
    out[4..6].copy_from_slice(&family.to_ne_bytes());
    out[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    out[8..12].copy_from_slice(&seq.to_ne_bytes());
    // nlmsg_pid 0: the kernel fills in the sender.
    out
}

/// What is wrong with bytes the kernel sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("Truncated netlink {0}")]
    Truncated(&'static str),
    #[error("Netlink attribute {attr} has {len} bytes, expected {want}")]
    AttrSize { attr: u16, len: usize, want: usize },
    #[error("Netlink reply lacks attribute {0}")]
    Missing(&'static str),
}

/// One netlink message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Message<'a> {
    pub kind: u16,
    pub flags: u16,
    pub seq: u32,
    pub payload: &'a [u8],
}

/// Splits a datagram into its netlink messages.
pub fn messages(mut buf: &[u8]) -> Result<Vec<Message<'_>>, ParseError> {
    let mut v = Vec::new();
    while !buf.is_empty() {
        if buf.len() < NLMSG_HDRLEN {
            return Err(ParseError::Truncated("message header"));
        }
        let len = u32::from_ne_bytes(buf[0..4].try_into().expect("4 bytes")) as usize;
        if len < NLMSG_HDRLEN || len > buf.len() {
            return Err(ParseError::Truncated("message"));
        }
        v.push(Message {
            kind: u16::from_ne_bytes([buf[4], buf[5]]),
            flags: u16::from_ne_bytes([buf[6], buf[7]]),
            seq: u32::from_ne_bytes(buf[8..12].try_into().expect("4 bytes")),
            payload: &buf[NLMSG_HDRLEN..len],
        });
        buf = &buf[align4(len).min(buf.len())..];
    }
    Ok(v)
}

/// The errno of an `NLMSG_ERROR` payload (0 is an ACK; negative errno).
pub fn error_code(payload: &[u8]) -> Result<i32, ParseError> {
    let b: [u8; 4] = payload
        .get(0..4)
        .and_then(|b| b.try_into().ok())
        .ok_or(ParseError::Truncated("error message"))?;
    Ok(i32::from_ne_bytes(b))
}

/// A generic netlink payload: command and attribute bytes.
pub fn genl(payload: &[u8]) -> Result<(u8, &[u8]), ParseError> {
    if payload.len() < GENL_HDRLEN {
        return Err(ParseError::Truncated("genl header"));
    }
    Ok((payload[0], &payload[GENL_HDRLEN..]))
}

/// Iterates attributes: (type without flag bits, payload).
pub fn attrs(mut buf: &[u8]) -> impl Iterator<Item = Result<(u16, &[u8]), ParseError>> {
    std::iter::from_fn(move || {
        if buf.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let kind = u16::from_ne_bytes([buf[2], buf[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > buf.len() {
            buf = &[];
            return Some(Err(ParseError::Truncated("attribute")));
        }
        let value = &buf[4..len];
        buf = &buf[align4(len).min(buf.len())..];
        Some(Ok((kind, value)))
    })
}

fn fixed<const N: usize>(attr: u16, v: &[u8]) -> Result<[u8; N], ParseError> {
    v.try_into().map_err(|_| ParseError::AttrSize {
        attr,
        len: v.len(),
        want: N,
    })
}

/// A generic netlink family's id and multicast groups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Family {
    pub id: u16,
    pub groups: Vec<(String, u32)>,
}

/// `CTRL_CMD_GETFAMILY` by name.
pub fn encode_get_family(seq: u32, name: &str) -> Vec<u8> {
    encode_request(
        GENL_ID_CTRL,
        seq,
        CTRL_CMD_GETFAMILY,
        1,
        &[Attr::Str(CTRL_ATTR_FAMILY_NAME, name.to_string())],
    )
}

/// Parses a `CTRL_CMD_NEWFAMILY` reply's attributes.
pub fn parse_family(buf: &[u8]) -> Result<Family, ParseError> {
    let mut id = None;
    let mut groups = Vec::new();
    for a in attrs(buf) {
        let (kind, v) = a?;
        match kind {
            CTRL_ATTR_FAMILY_ID => id = Some(u16::from_ne_bytes(fixed(kind, v)?)),
            CTRL_ATTR_MCAST_GROUPS => {
                for g in attrs(v) {
                    let (_, gv) = g?;
                    let mut name = None;
                    let mut gid = None;
                    for f in attrs(gv) {
                        let (fk, fv) = f?;
                        match fk {
                            CTRL_ATTR_MCAST_GRP_NAME => {
                                let s = fv.split(|b| *b == 0).next().unwrap_or(&[]);
                                name = Some(String::from_utf8_lossy(s).into_owned());
                            }
                            CTRL_ATTR_MCAST_GRP_ID => {
                                gid = Some(u32::from_ne_bytes(fixed(fk, fv)?))
                            }
                            _ => {}
                        }
                    }
                    if let (Some(n), Some(i)) = (name, gid) {
                        groups.push((n, i));
                    }
                }
            }
            _ => {}
        }
    }
    Ok(Family {
        id: id.ok_or(ParseError::Missing("CTRL_ATTR_FAMILY_ID"))?,
        groups,
    })
}

/// NBD_CMD_CONNECT parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    /// A device index, or `None` for the first free one (the kernel adds a
    /// device when all are busy).
    pub index: Option<u32>,
    pub size: u64,
    pub block_size: u64,
    /// The transmission flags from the handshake.
    pub server_flags: u64,
    /// Seconds before a request is declared lost and requeued (0: kernel default).
    pub timeout_secs: u64,
    /// Seconds IO waits for a RECONFIGURE after the connection died.
    pub dead_conn_timeout_secs: u64,
    pub fds: Vec<i32>,
}

fn sockets(fds: &[i32]) -> Attr {
    Attr::Nested(
        NBD_ATTR_SOCKETS,
        fds.iter()
            .map(|fd| Attr::Nested(NBD_SOCK_ITEM, vec![Attr::U32(NBD_SOCK_FD, *fd as u32)]))
            .collect(),
    )
}

impl Connect {
    pub fn attrs(&self) -> Vec<Attr> {
        let mut v = Vec::new();
        if let Some(i) = self.index {
            v.push(Attr::U32(NBD_ATTR_INDEX, i));
        }
        v.push(Attr::U64(NBD_ATTR_SIZE_BYTES, self.size));
        v.push(Attr::U64(NBD_ATTR_BLOCK_SIZE_BYTES, self.block_size));
        v.push(Attr::U64(NBD_ATTR_SERVER_FLAGS, self.server_flags));
        if self.timeout_secs > 0 {
            v.push(Attr::U64(NBD_ATTR_TIMEOUT, self.timeout_secs));
        }
        v.push(Attr::U64(
            NBD_ATTR_DEAD_CONN_TIMEOUT,
            self.dead_conn_timeout_secs,
        ));
        v.push(sockets(&self.fds));
        v
    }
}

/// NBD_CMD_RECONFIGURE parameters: a fresh socket for a dead connection,
/// and optionally a new size (the kernel applies NBD_ATTR_SIZE_BYTES on
/// RECONFIGURE since 5.3, "nbd: add netlink reconfigure resize support").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reconfigure {
    pub index: u32,
    pub fds: Vec<i32>,
    /// New size and block size.
    pub size: Option<(u64, u64)>,
}

impl Reconfigure {
    pub fn attrs(&self) -> Vec<Attr> {
        let mut v = vec![Attr::U32(NBD_ATTR_INDEX, self.index)];
        if let Some((size, block)) = self.size {
            v.push(Attr::U64(NBD_ATTR_SIZE_BYTES, size));
            v.push(Attr::U64(NBD_ATTR_BLOCK_SIZE_BYTES, block));
        }
        if !self.fds.is_empty() {
            v.push(sockets(&self.fds));
        }
        v
    }
}

/// One device in an NBD_CMD_STATUS reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceStatus {
    pub index: u32,
    /// The device has a configuration (it is attached).
    pub connected: bool,
}

/// Parses NBD_CMD_STATUS reply attributes.
pub fn parse_status(buf: &[u8]) -> Result<Vec<DeviceStatus>, ParseError> {
    let mut out = Vec::new();
    for a in attrs(buf) {
        let (kind, list) = a?;
        if kind != NBD_ATTR_DEVICE_LIST {
            continue;
        }
        for item in attrs(list) {
            let (ik, iv) = item?;
            if ik != NBD_DEVICE_ITEM {
                continue;
            }
            let mut index = None;
            let mut connected = false;
            for f in attrs(iv) {
                let (fk, fv) = f?;
                match fk {
                    NBD_DEVICE_INDEX => index = Some(u32::from_ne_bytes(fixed(fk, fv)?)),
                    NBD_DEVICE_CONNECTED => connected = fixed::<1>(fk, fv)?[0] != 0,
                    _ => {}
                }
            }
            out.push(DeviceStatus {
                index: index.ok_or(ParseError::Missing("NBD_DEVICE_INDEX"))?,
                connected,
            });
        }
    }
    Ok(out)
}

/// The NBD_ATTR_INDEX of a CONNECT reply or a LINK_DEAD notification.
pub fn parse_index(buf: &[u8]) -> Result<u32, ParseError> {
    for a in attrs(buf) {
        let (kind, v) = a?;
        if kind == NBD_ATTR_INDEX {
            return Ok(u32::from_ne_bytes(fixed(kind, v)?));
        }
    }
    Err(ParseError::Missing("NBD_ATTR_INDEX"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ne16(v: u16) -> [u8; 2] {
        v.to_ne_bytes()
    }
    fn ne32(v: u32) -> [u8; 4] {
        v.to_ne_bytes()
    }

    #[test]
    fn attributes_are_length_prefixed_and_padded() {
        let cases: Vec<(Attr, Vec<u8>)> = vec![
            (
                Attr::U8(2, 1),
                [&ne16(5)[..], &ne16(2), &[1, 0, 0, 0]].concat(),
            ),
            (
                Attr::U16(1, 0x1234),
                [&ne16(6)[..], &ne16(1), &ne16(0x1234), &[0, 0]].concat(),
            ),
            (Attr::U32(1, 7), [&ne16(8)[..], &ne16(1), &ne32(7)].concat()),
            (
                Attr::U64(2, 1 << 33),
                [&ne16(12)[..], &ne16(2), &(1u64 << 33).to_ne_bytes()].concat(),
            ),
            (
                Attr::Str(2, "nbd".into()),
                [&ne16(8)[..], &ne16(2), b"nbd\0"].concat(),
            ),
            (
                Attr::Str(2, "nbd_x".into()),
                [&ne16(10)[..], &ne16(2), b"nbd_x\0", &[0, 0]].concat(),
            ),
            (
                Attr::Nested(7, vec![Attr::Nested(1, vec![Attr::U32(1, 5)])]),
                [
                    &ne16(16)[..],
                    &ne16(7 | NLA_F_NESTED),
                    &ne16(12),
                    &ne16(1 | NLA_F_NESTED),
                    &ne16(8),
                    &ne16(1),
                    &ne32(5),
                ]
                .concat(),
            ),
        ];
        for (attr, want) in cases {
            let mut out = Vec::new();
            encode_attrs(std::slice::from_ref(&attr), &mut out);
            assert_eq!(out, want, "{attr:?}");
        }
    }

    #[test]
    fn connect_request_bytes() {
        let c = Connect {
            index: None,
            size: 64 << 20,
            block_size: 4096,
            server_flags: 0x1ed,
            timeout_secs: 5,
            dead_conn_timeout_secs: 120,
            fds: vec![9],
        };
        let msg = encode_request(0x20, 77, NBD_CMD_CONNECT, NBD_GENL_VERSION, &c.attrs());
        let m = messages(&msg).unwrap();
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].kind, 0x20);
        assert_eq!(m[0].flags, NLM_F_REQUEST | NLM_F_ACK);
        assert_eq!(m[0].seq, 77);
        assert_eq!(
            u32::from_ne_bytes(msg[0..4].try_into().unwrap()) as usize,
            msg.len()
        );
        let (cmd, body) = genl(m[0].payload).unwrap();
        assert_eq!(cmd, NBD_CMD_CONNECT);
        assert_eq!(&m[0].payload[1..4], &[1, 0, 0]);
        let got: Vec<(u16, Vec<u8>)> = attrs(body)
            .map(|a| a.map(|(k, v)| (k, v.to_vec())).unwrap())
            .collect();
        let kinds: Vec<u16> = got.iter().map(|g| g.0).collect();
        assert_eq!(
            kinds,
            [
                NBD_ATTR_SIZE_BYTES,
                NBD_ATTR_BLOCK_SIZE_BYTES,
                NBD_ATTR_SERVER_FLAGS,
                NBD_ATTR_TIMEOUT,
                NBD_ATTR_DEAD_CONN_TIMEOUT,
                NBD_ATTR_SOCKETS
            ]
        );
        assert_eq!(got[0].1, (64u64 << 20).to_ne_bytes());
        assert_eq!(got[4].1, 120u64.to_ne_bytes());
        // SOCKETS > SOCK_ITEM > SOCK_FD = 9
        let item: Vec<_> = attrs(&got[5].1).map(Result::unwrap).collect();
        assert_eq!(item.len(), 1);
        assert_eq!(item[0].0, NBD_SOCK_ITEM);
        let fd: Vec<_> = attrs(item[0].1).map(Result::unwrap).collect();
        assert_eq!(fd, vec![(NBD_SOCK_FD, &ne32(9)[..])]);
        // A fixed index is sent first.
        let c2 = Connect {
            index: Some(3),
            ..c
        };
        assert_eq!(c2.attrs()[0], Attr::U32(NBD_ATTR_INDEX, 3));
    }

    #[test]
    fn reconfigure_carries_index_socket_and_optional_size() {
        let r = Reconfigure {
            index: 2,
            fds: vec![4],
            size: None,
        };
        assert_eq!(
            r.attrs(),
            vec![
                Attr::U32(NBD_ATTR_INDEX, 2),
                Attr::Nested(
                    NBD_ATTR_SOCKETS,
                    vec![Attr::Nested(NBD_SOCK_ITEM, vec![Attr::U32(NBD_SOCK_FD, 4)])]
                )
            ]
        );
        let grow = Reconfigure {
            index: 2,
            fds: vec![],
            size: Some((128 << 20, 4096)),
        };
        assert_eq!(
            grow.attrs(),
            vec![
                Attr::U32(NBD_ATTR_INDEX, 2),
                Attr::U64(NBD_ATTR_SIZE_BYTES, 128 << 20),
                Attr::U64(NBD_ATTR_BLOCK_SIZE_BYTES, 4096),
            ]
        );
    }

    /// Builds a reply the way the kernel does (nested without the flag, as
    /// `nla_nest_start_noflag` writes them).
    fn raw_attr(kind: u16, value: &[u8]) -> Vec<u8> {
        let mut v = ne16(4 + value.len() as u16).to_vec();
        v.extend_from_slice(&ne16(kind));
        v.extend_from_slice(value);
        v.resize(align4(v.len()), 0);
        v
    }

    #[test]
    fn status_reply_lists_devices() {
        let dev = |i: u32, c: u8| {
            raw_attr(
                NBD_DEVICE_ITEM,
                &[
                    raw_attr(NBD_DEVICE_INDEX, &ne32(i)),
                    raw_attr(NBD_DEVICE_CONNECTED, &[c]),
                ]
                .concat(),
            )
        };
        let list = raw_attr(
            NBD_ATTR_DEVICE_LIST,
            &[dev(0, 1), dev(1, 0), dev(7, 1)].concat(),
        );
        assert_eq!(
            parse_status(&list).unwrap(),
            vec![
                DeviceStatus {
                    index: 0,
                    connected: true
                },
                DeviceStatus {
                    index: 1,
                    connected: false
                },
                DeviceStatus {
                    index: 7,
                    connected: true
                },
            ]
        );
        assert_eq!(
            parse_status(&raw_attr(NBD_ATTR_DEVICE_LIST, &[])).unwrap(),
            vec![]
        );
        let bad = raw_attr(
            NBD_ATTR_DEVICE_LIST,
            &raw_attr(NBD_DEVICE_ITEM, &raw_attr(NBD_DEVICE_INDEX, &[1, 2])),
        );
        assert!(matches!(
            parse_status(&bad),
            Err(ParseError::AttrSize { want: 4, .. })
        ));
        let no_index = raw_attr(
            NBD_ATTR_DEVICE_LIST,
            &raw_attr(NBD_DEVICE_ITEM, &raw_attr(NBD_DEVICE_CONNECTED, &[1])),
        );
        assert_eq!(
            parse_status(&no_index),
            Err(ParseError::Missing("NBD_DEVICE_INDEX"))
        );
    }

    #[test]
    fn family_reply_gives_id_and_groups() {
        let group = |n: u16, name: &str, id: u32| {
            let mut s = name.as_bytes().to_vec();
            s.push(0);
            raw_attr(
                n,
                &[
                    raw_attr(CTRL_ATTR_MCAST_GRP_ID, &ne32(id)),
                    raw_attr(CTRL_ATTR_MCAST_GRP_NAME, &s),
                ]
                .concat(),
            )
        };
        let buf = [
            raw_attr(CTRL_ATTR_FAMILY_NAME, b"nbd\0"),
            raw_attr(CTRL_ATTR_FAMILY_ID, &ne16(0x1b)),
            raw_attr(5, &ne32(0)),
            raw_attr(
                CTRL_ATTR_MCAST_GROUPS,
                &group(1, NBD_GENL_MCAST_GROUP_NAME, 9),
            ),
        ]
        .concat();
        assert_eq!(
            parse_family(&buf).unwrap(),
            Family {
                id: 0x1b,
                groups: vec![("nbd_mc_group".into(), 9)]
            }
        );
        assert_eq!(
            parse_family(&raw_attr(CTRL_ATTR_FAMILY_NAME, b"x\0")),
            Err(ParseError::Missing("CTRL_ATTR_FAMILY_ID"))
        );
    }

    #[test]
    fn messages_and_errors_split_and_never_panic() {
        // Two messages in one datagram: a reply and an ACK.
        let reply = encode_request(0x1b, 5, NBD_CMD_CONNECT, 1, &[Attr::U32(NBD_ATTR_INDEX, 3)]);
        let mut ack = vec![0u8; 16];
        ack[0..4].copy_from_slice(&ne32(36));
        ack[4..6].copy_from_slice(&ne16(NLMSG_ERROR));
        ack[8..12].copy_from_slice(&ne32(5));
        ack.extend_from_slice(&0i32.to_ne_bytes());
        ack.extend_from_slice(&[0u8; 16]);
        let dgram = [reply.clone(), ack].concat();
        let m = messages(&dgram).unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!(parse_index(genl(m[0].payload).unwrap().1).unwrap(), 3);
        assert_eq!(m[1].kind, NLMSG_ERROR);
        assert_eq!(error_code(m[1].payload).unwrap(), 0);
        assert_eq!(error_code(&(-16i32).to_ne_bytes()).unwrap(), -16);
        assert!(error_code(&[1, 2]).is_err());
        // Every truncation of the datagram parses to an error or to fewer
        // messages, never a panic.
        for cut in 0..dgram.len() {
            if let Ok(ms) = messages(&dgram[..cut]) {
                for m in ms {
                    if let Ok((_, body)) = genl(m.payload) {
                        let _ = parse_index(body);
                        let _ = parse_status(body);
                        let _ = parse_family(body);
                    }
                }
            }
        }
        // An attribute claiming more bytes than there are.
        let mut bad = raw_attr(NBD_ATTR_INDEX, &ne32(1));
        bad[0] = 200;
        assert_eq!(parse_index(&bad), Err(ParseError::Truncated("attribute")));
        assert_eq!(
            messages(&[0u8; 10]),
            Err(ParseError::Truncated("message header"))
        );
    }

    /// Decodes encoded attributes back into a tree, reading nested ones by
    /// their flag bit (as this test encodes them) and scalars by length.
    fn decode(buf: &[u8]) -> Vec<Attr> {
        let mut out = Vec::new();
        let mut rest = buf;
        while rest.len() >= 4 {
            let len = u16::from_ne_bytes([rest[0], rest[1]]) as usize;
            let raw = u16::from_ne_bytes([rest[2], rest[3]]);
            let kind = raw & NLA_TYPE_MASK;
            let v = &rest[4..len];
            out.push(if raw & NLA_F_NESTED != 0 {
                Attr::Nested(kind, decode(v))
            } else {
                match v.len() {
                    1 => Attr::U8(kind, v[0]),
                    2 => Attr::U16(kind, u16::from_ne_bytes([v[0], v[1]])),
                    4 => Attr::U32(kind, u32::from_ne_bytes(v.try_into().unwrap())),
                    8 => Attr::U64(kind, u64::from_ne_bytes(v.try_into().unwrap())),
                    _ => Attr::Str(kind, String::from_utf8(v[..v.len() - 1].to_vec()).unwrap()),
                }
            });
            rest = &rest[align4(len).min(rest.len())..];
        }
        out
    }

    fn attr_tree() -> impl proptest::strategy::Strategy<Value = Attr> {
        use proptest::prelude::*;
        let kind = 1u16..0x3fff;
        let leaf = prop_oneof![
            (kind.clone(), any::<u8>()).prop_map(|(k, v)| Attr::U8(k, v)),
            (kind.clone(), any::<u16>()).prop_map(|(k, v)| Attr::U16(k, v)),
            (kind.clone(), any::<u32>()).prop_map(|(k, v)| Attr::U32(k, v)),
            (kind.clone(), any::<u64>()).prop_map(|(k, v)| Attr::U64(k, v)),
            // Lengths 1, 2, 4 and 8 (with the NUL) would decode as integers.
            (kind.clone(), "[a-z_]{4,6}|[a-z_]{8,20}").prop_map(|(k, v)| Attr::Str(k, v)),
        ];
        leaf.prop_recursive(3, 24, 4, move |inner| {
            (1u16..0x3fff, proptest::collection::vec(inner, 0..4))
                .prop_map(|(k, v)| Attr::Nested(k, v))
        })
    }

    proptest::proptest! {
        /// Any attribute tree encodes to bytes that the attribute walker
        /// splits back into the same tree, and wrapped in a request the
        /// message splitter finds exactly one message of the right length.
        #[test]
        fn attribute_trees_round_trip(attrs in proptest::collection::vec(attr_tree(), 0..6), seq: u32) {
            let mut buf = Vec::new();
            encode_attrs(&attrs, &mut buf);
            proptest::prop_assert_eq!(buf.len() % 4, 0);
            proptest::prop_assert!(attrs_ok(&buf));
            proptest::prop_assert_eq!(&decode(&buf), &attrs);
            let msg = encode_request(0x22, seq, NBD_CMD_STATUS, 1, &attrs);
            let m = messages(&msg).unwrap();
            proptest::prop_assert_eq!(m.len(), 1);
            proptest::prop_assert_eq!(m[0].seq, seq);
            proptest::prop_assert_eq!(genl(m[0].payload).unwrap().1, &buf[..]);
        }

        /// Random bytes never panic the parsers.
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            let _ = messages(&bytes);
            let _ = parse_status(&bytes);
            let _ = parse_family(&bytes);
            let _ = parse_index(&bytes);
            let _ = error_code(&bytes);
        }
    }

    fn attrs_ok(buf: &[u8]) -> bool {
        attrs(buf).all(|a| a.is_ok())
    }
}
