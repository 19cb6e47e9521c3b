//! `--endpoint`: where `strata csi` listens, and serving on it.

use std::net::SocketAddr;
use std::path::PathBuf;

/// A CSI endpoint: `unix:///csi/csi.sock` (what the sidecars and the
/// kubelet use) or `tcp://127.0.0.1:10000` (tests, debugging).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("endpoint {given:?}: {problem} (expected unix:///path/to/csi.sock or tcp://HOST:PORT)")]
pub struct EndpointError {
    pub given: String,
    pub problem: &'static str,
}

impl Endpoint {
    pub fn parse(s: &str) -> Result<Endpoint, EndpointError> {
        let err = |problem| EndpointError {
            given: s.to_string(),
            problem,
        };
        if let Some(path) = s.strip_prefix("unix://") {
            if !path.starts_with('/') {
                return Err(err("the socket path must be absolute"));
            }
            return Ok(Endpoint::Unix(PathBuf::from(path)));
        }
        if let Some(addr) = s.strip_prefix("tcp://") {
            return addr
                .parse()
                .map(Endpoint::Tcp)
                .map_err(|_| err("not an IP:PORT address"));
        }
        if s.starts_with('/') {
            return Ok(Endpoint::Unix(PathBuf::from(s)));
        }
        Err(err("unknown scheme"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_forms_sidecars_use() {
        assert_eq!(
            Endpoint::parse("unix:///csi/csi.sock").unwrap(),
            Endpoint::Unix("/csi/csi.sock".into())
        );
        assert_eq!(
            Endpoint::parse("/var/lib/kubelet/plugins/csi.strata.io/csi.sock").unwrap(),
            Endpoint::Unix("/var/lib/kubelet/plugins/csi.strata.io/csi.sock".into())
        );
        assert_eq!(
            Endpoint::parse("tcp://127.0.0.1:10000").unwrap(),
            Endpoint::Tcp("127.0.0.1:10000".parse().unwrap())
        );
        assert!(Endpoint::parse("unix://relative.sock").is_err());
        assert!(Endpoint::parse("http://x").is_err());
        assert!(Endpoint::parse("tcp://nohost").is_err());
    }
}
