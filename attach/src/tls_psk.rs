//! NBD over TLS with a pre-shared key for the nbdfuse fallback: the key
//! file, the libnbd URI, and the nbdkit server nbdfuse runs to speak TLS.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::fallback::run_tool;
use crate::state::TlsState;
use crate::uri::{Endpoint, NbdUri};
use crate::AttachError;

/// NBD over TLS with a pre-shared key, for the nbdfuse fallback (libnbd
/// speaks TLS-PSK; the kernel's NBD client cannot). The caller derives the
/// key for the volume (strata: from the cluster key); this crate only
/// writes it where nbdfuse reads it. `Debug` hides the key.
#[derive(Clone, PartialEq, Eq)]
pub struct TlsPsk {
    /// The PSK identity the controller checks (its `--nbd-tls-username`,
    /// `strata` by default).
    pub username: String,
    /// The GnuTLS psktool file's text: `username:hexkey` and a newline.
    /// Holds the key.
    pub psk_file_text: String,
}

impl std::fmt::Debug for TlsPsk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "TlsPsk {{ username: {:?}, key: <hidden> }}",
            self.username
        )
    }
}

/// Percent-encodes everything but unreserved characters (and `/` when
/// `keep_slash`), for a libnbd URI.
fn pct(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric()
            || matches!(b, b'-' | b'.' | b'_' | b'~')
            || (keep_slash && b == b'/')
        {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The libnbd URI that reaches `uri`'s export over TLS with the PSK in
/// `psk_file` for `username`: `nbds://USER@HOST:PORT/EXPORT?tls-psk-file=
/// PATH` (`nbds+unix://` for a unix socket). `nbds` makes TLS mandatory:
/// libnbd fails rather than fall back to plaintext.
pub fn nbds_uri(uri: &NbdUri, username: &str, psk_file: &Path) -> String {
    let user = pct(username, false);
    let export = pct(&uri.export, false);
    let psk = pct(&psk_file.to_string_lossy(), true);
    match &uri.endpoint {
        Endpoint::Tcp { host, port } if host.contains(':') => {
            format!("nbds://{user}@[{host}]:{port}/{export}?tls-psk-file={psk}")
        }
        Endpoint::Tcp { host, port } => {
            format!("nbds://{user}@{host}:{port}/{export}?tls-psk-file={psk}")
        }
        Endpoint::Unix(p) => format!(
            "nbds+unix://{user}@/{export}?socket={}&tls-psk-file={psk}",
            pct(&p.to_string_lossy(), true)
        ),
    }
}

/// What nbdfuse is told to connect to (the arguments after its file).
///
/// Plaintext: the `nbd://` URI. Over TLS: nbdfuse cannot read a PSK file
/// itself (libnbd refuses `tls-psk-file` in a URI unless the program
/// allows local files, and nbdfuse does not, nor has it TLS options), so
/// it runs nbdkit's nbd plugin as its server, socket-activated on a
/// private unix socket (`[ nbdkit ... ]`), and nbdkit connects to the
/// controller with TLS required (`tls=require`: no plaintext fallback)
/// and the key file. nbdkit exits with nbdfuse (`--exit-with-parent`).
pub fn nbdfuse_source_args(uri: &NbdUri, tls: Option<&TlsState>) -> Vec<String> {
    let Some(t) = tls else {
        return vec![uri.to_string()];
    };
    let mut a: Vec<String> = ["[", "nbdkit", "--exit-with-parent", "nbd"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    match &uri.endpoint {
        Endpoint::Tcp { host, port } => {
            a.push(format!("hostname={host}"));
            a.push(format!("port={port}"));
        }
        Endpoint::Unix(p) => a.push(format!("socket={}", p.display())),
    }
    a.push(format!("export={}", uri.export));
    a.push("tls=require".into());
    a.push(format!("tls-psk={}", t.psk_file.display()));
    a.push(format!("tls-username={}", t.username));
    a.push("]".into());
    a
}

/// Writes `text` as `dir/keys.psk`: `dir` made anew with mode 0700 (a
/// stale one from a crashed attach is replaced), the file 0600. Returns
/// the file.
pub fn write_psk_file(dir: &Path, text: &str) -> Result<PathBuf, AttachError> {
    let err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| AttachError::PskFile { path, source }
    };
    if std::fs::symlink_metadata(dir).is_ok() {
        std::fs::remove_dir_all(dir).map_err(err(dir))?;
    }
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(dir)
        .map_err(err(dir))?;
    let path = dir.join("keys.psk");
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .and_then(|mut f| {
            f.write_all(text.as_bytes())?;
            f.sync_all()
        });
    if let Err(e) = written {
        remove_psk_dir(dir);
        return Err(err(&path)(e));
    }
    Ok(path)
}

/// Removes a directory [`write_psk_file`] made, with the key in it.
pub(crate) fn remove_psk_dir(dir: &Path) {
    let _ = std::fs::remove_file(dir.join("keys.psk"));
    let _ = std::fs::remove_dir(dir);
}

/// The export's size over TLS, as `nbdinfo --size` reads it.
pub fn tls_export_size(uri: &NbdUri, tls: &TlsState) -> Result<u64, AttachError> {
    let target = nbds_uri(uri, &tls.username, &tls.psk_file);
    let out = run_tool("nbdinfo", &["--size", &target], 30)?;
    out.trim().parse().map_err(|_| AttachError::Tool {
        tool: "nbdinfo --size".into(),
        status: "exit status: 0".into(),
        stderr: format!("not a size: {:?}", out.trim()),
    })
}
