//! Real S3-protocol servers for the tests: moto (Python, no signature
//! checks) and s3s-fs (Rust, checks SigV4), started on loopback ports.
//! The binaries come from `STRATA_MOTO_BIN` / `STRATA_S3SFS_BIN`, else the
//! places `scripts/s3-servers.sh install` puts them (`.ci-venv/bin`,
//! `.ci-tools/bin`), else `PATH`. A test skips with a message when the
//! binary is absent.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use strata_backup::{S3Options, TargetOptions};

pub const ACCESS_KEY: &str = "strata-test-key";
pub const SECRET_KEY: &str = "strata-test-secret";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Moto,
    S3sFs,
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn find(env: &str, local: &str, name: &str) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        return Some(PathBuf::from(p)).filter(|p| p.exists());
    }
    let p = workspace().join(local);
    if p.exists() {
        return Some(p);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.exists())
    })
}

pub fn binary(kind: Kind) -> Option<PathBuf> {
    match kind {
        Kind::Moto => find("STRATA_MOTO_BIN", ".ci-venv/bin/moto_server", "moto_server"),
        Kind::S3sFs => find("STRATA_S3SFS_BIN", ".ci-tools/bin/s3s-fs", "s3s-fs"),
    }
}

/// A running server; killed on drop.
pub struct Server {
    pub kind: Kind,
    pub port: u16,
    pub dir: PathBuf,
    bin: PathBuf,
    child: Option<Child>,
}

/// A port below the kernel's ephemeral range, so no outgoing connection
/// takes it between this check and the server binding it (the backup
/// tests do not depend on the replica crate's `spare_loopback_addr`).
fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let base = 31_000 - 200 * (1 + (std::process::id() % 5) as u16);
    for _ in 0..200 {
        let port = base + NEXT.fetch_add(1, Ordering::Relaxed) % 200;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {base}-{}", base + 199);
}

impl Server {
    /// Starts a server, or None (with a message) when its binary is absent.
    pub fn start(kind: Kind, dir: &Path) -> Option<Server> {
        let Some(bin) = binary(kind) else {
            eprintln!(
                "SKIPPED: no {kind:?} binary (run `bash scripts/s3-servers.sh install` or set STRATA_MOTO_BIN/STRATA_S3SFS_BIN)"
            );
            return None;
        };
        let mut s = Server {
            kind,
            port: free_port(),
            dir: dir.to_path_buf(),
            bin,
            child: None,
        };
        s.restart();
        Some(s)
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn options(&self) -> TargetOptions {
        TargetOptions {
            s3: S3Options {
                endpoint: Some(self.endpoint()),
                path_style: true,
                region: Some("us-east-1".into()),
                credentials: Some((ACCESS_KEY.into(), SECRET_KEY.into())),
                create_bucket: true,
            },
            ..Default::default()
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// (Re)starts the server on the same port and data directory.
    pub fn restart(&mut self) {
        self.kill();
        std::fs::create_dir_all(&self.dir).unwrap();
        let port = self.port.to_string();
        let mut cmd = Command::new(&self.bin);
        match self.kind {
            Kind::Moto => {
                cmd.args(["-H", "127.0.0.1", "-p", &port]);
            }
            Kind::S3sFs => {
                cmd.args([
                    "--host",
                    "127.0.0.1",
                    "--port",
                    &port,
                    "--access-key",
                    ACCESS_KEY,
                    "--secret-key",
                    SECRET_KEY,
                ])
                .arg(&self.dir);
            }
        }
        let log = std::fs::File::create(self.dir.with_extension("log")).unwrap();
        cmd.stdout(Stdio::null()).stderr(log);
        self.child = Some(cmd.spawn().expect("start S3 server"));
        let start = Instant::now();
        loop {
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) {
                use std::io::{Read, Write};
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let req = "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
                let mut buf = [0u8; 12];
                if s.write_all(req.as_bytes()).is_ok()
                    && s.read_exact(&mut buf).is_ok()
                    && buf.starts_with(b"HTTP/1.1")
                {
                    return;
                }
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "{:?} did not start",
                self.kind
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}
