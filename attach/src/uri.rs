//! `nbd://host[:port]/export` and `nbd+unix:///export?socket=PATH` parsing.
//!
//! Pure: no name resolution here; [`NbdUri::connect`](crate::handshake)
//! resolves the host when it dials.

use std::fmt;
use std::path::PathBuf;

/// The standard NBD port.
pub const DEFAULT_PORT: u16 = 10809;

/// Where the NBD server is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A TCP server: host name or address (IPv6 without brackets) and port.
    Tcp { host: String, port: u16 },
    /// A unix socket path.
    Unix(PathBuf),
}

/// A parsed NBD URI (the subset of the NBD URI spec strata uses).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    pub endpoint: Endpoint,
    /// The export name (strata: the volume name). May be empty.
    pub export: String,
}

/// Why a URI was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UriError {
    #[error("Unsupported scheme in {0:?} (expected nbd:// or nbd+unix://)")]
    Scheme(String),
    #[error("No host in {0:?}")]
    NoHost(String),
    #[error("Bad port in {0:?}")]
    Port(String),
    #[error("nbd+unix URI {0:?} needs ?socket=PATH")]
    NoSocket(String),
    #[error("Bad percent-encoding in {0:?}")]
    Encoding(String),
}

impl NbdUri {
    pub fn parse(uri: &str) -> Result<NbdUri, UriError> {
        if let Some(rest) = uri.strip_prefix("nbd+unix://") {
            // nbd+unix:///export?socket=/path
            let (path_part, query) = match rest.split_once('?') {
                Some((p, q)) => (p, Some(q)),
                None => (rest, None),
            };
            let export_raw = path_part.strip_prefix('/').unwrap_or(path_part);
            let socket = query
                .into_iter()
                .flat_map(|q| q.split('&'))
                .find_map(|kv| kv.strip_prefix("socket="))
                .ok_or_else(|| UriError::NoSocket(uri.to_string()))?;
            let socket = percent_decode(socket).ok_or_else(|| UriError::Encoding(uri.into()))?;
            let export =
                percent_decode(export_raw).ok_or_else(|| UriError::Encoding(uri.into()))?;
            return Ok(NbdUri {
                endpoint: Endpoint::Unix(PathBuf::from(socket)),
                export,
            });
        }
        let rest = uri
            .strip_prefix("nbd://")
            .ok_or_else(|| UriError::Scheme(uri.to_string()))?;
        let rest = rest.split_once('?').map_or(rest, |(p, _)| p);
        let (authority, export_raw) = rest.split_once('/').unwrap_or((rest, ""));
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6
                .split_once(']')
                .ok_or_else(|| UriError::NoHost(uri.to_string()))?;
            let port = match after {
                "" => None,
                p => Some(
                    p.strip_prefix(':')
                        .ok_or_else(|| UriError::Port(uri.to_string()))?,
                ),
            };
            (h, port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(UriError::NoHost(uri.to_string()));
        }
        let port = match port {
            None => DEFAULT_PORT,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| UriError::Port(uri.to_string()))?,
        };
        let export = percent_decode(export_raw).ok_or_else(|| UriError::Encoding(uri.into()))?;
        Ok(NbdUri {
            endpoint: Endpoint::Tcp {
                host: host.to_string(),
                port,
            },
            export,
        })
    }

    /// The TCP host and port, if this is a TCP URI.
    pub fn tcp(&self) -> Option<(&str, u16)> {
        match &self.endpoint {
            Endpoint::Tcp { host, port } => Some((host, *port)),
            Endpoint::Unix(_) => None,
        }
    }
}

impl fmt::Display for NbdUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.endpoint {
            Endpoint::Tcp { host, port } if host.contains(':') => {
                write!(f, "nbd://[{host}]:{port}/{}", self.export)
            }
            Endpoint::Tcp { host, port } => write!(f, "nbd://{host}:{port}/{}", self.export),
            Endpoint::Unix(p) => write!(f, "nbd+unix:///{}?socket={}", self.export, p.display()),
        }
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(host: &str, port: u16, export: &str) -> NbdUri {
        NbdUri {
            endpoint: Endpoint::Tcp {
                host: host.into(),
                port,
            },
            export: export.into(),
        }
    }

    #[test]
    fn parses_the_uris_strata_prints() {
        let cases: &[(&str, NbdUri)] = &[
            ("nbd://127.0.0.1:10809/vol", tcp("127.0.0.1", 10809, "vol")),
            (
                "nbd://10.0.2.2:4000/pg-data",
                tcp("10.0.2.2", 4000, "pg-data"),
            ),
            ("nbd://node1/vol", tcp("node1", DEFAULT_PORT, "vol")),
            ("nbd://node1:1/", tcp("node1", 1, "")),
            ("nbd://node1:1", tcp("node1", 1, "")),
            ("nbd://[::1]:9000/v", tcp("::1", 9000, "v")),
            ("nbd://[fe80::1]/v", tcp("fe80::1", DEFAULT_PORT, "v")),
            ("nbd://h:2/a%20b", tcp("h", 2, "a b")),
            ("nbd://h:2/v?tls=off", tcp("h", 2, "v")),
            (
                "nbd+unix:///vol?socket=/run/s.sock",
                NbdUri {
                    endpoint: Endpoint::Unix("/run/s.sock".into()),
                    export: "vol".into(),
                },
            ),
        ];
        for (s, want) in cases {
            assert_eq!(&NbdUri::parse(s).unwrap(), want, "{s}");
        }
    }

    #[test]
    fn refuses_bad_uris_with_a_reason() {
        type Check = fn(&UriError) -> bool;
        let cases: &[(&str, Check)] = &[
            ("http://h/v", |e| matches!(e, UriError::Scheme(_))),
            ("h:1/v", |e| matches!(e, UriError::Scheme(_))),
            ("nbd:///v", |e| matches!(e, UriError::NoHost(_))),
            ("nbd://:1/v", |e| matches!(e, UriError::NoHost(_))),
            ("nbd://h:0/v", |e| matches!(e, UriError::Port(_))),
            ("nbd://h:70000/v", |e| matches!(e, UriError::Port(_))),
            ("nbd://h:x/v", |e| matches!(e, UriError::Port(_))),
            ("nbd://[::1]x/v", |e| matches!(e, UriError::Port(_))),
            ("nbd://[::1/v", |e| matches!(e, UriError::NoHost(_))),
            ("nbd://h/%zz", |e| matches!(e, UriError::Encoding(_))),
            ("nbd://h/%4", |e| matches!(e, UriError::Encoding(_))),
            ("nbd+unix:///v", |e| matches!(e, UriError::NoSocket(_))),
        ];
        for (s, check) in cases {
            let e = NbdUri::parse(s).unwrap_err();
            assert!(check(&e), "{s}: {e:?}");
        }
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "nbd://127.0.0.1:10809/vol",
            "nbd://[::1]:9000/v",
            "nbd+unix:///vol?socket=/run/s.sock",
        ] {
            let u = NbdUri::parse(s).unwrap();
            assert_eq!(u.to_string(), s);
            assert_eq!(NbdUri::parse(&u.to_string()).unwrap(), u);
        }
    }
}
