//! A directory as one reproducible tar layer, gzip-compressed.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use flate2::{Compression, GzBuilder};
use sha2::{Digest, Sha256};

use crate::ImageError;

/// A finished layer: the gzip bytes and the two digests an image needs.
pub struct Layer {
    /// The compressed layer, the blob the manifest points to.
    pub gzip: Vec<u8>,
    /// `sha256:` of the uncompressed tar (the config's `diff_ids`).
    pub diff_id: String,
    /// How many entries (directories, files, symlinks) the tar holds.
    pub entries: usize,
    /// Bytes of the uncompressed tar.
    pub tar_len: usize,
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Every path under `root`, relative to it, sorted bytewise (so the order
/// never depends on the filesystem's directory order).
fn walk(root: &Path) -> Result<Vec<PathBuf>, ImageError> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        let rd = fs::read_dir(&dir).map_err(|source| ImageError::Read {
            path: dir.clone(),
            source,
        })?;
        for entry in rd {
            let entry = entry.map_err(|source| ImageError::Read {
                path: dir.clone(),
                source,
            })?;
            let child = rel.join(entry.file_name());
            let ft = entry.file_type().map_err(|source| ImageError::Read {
                path: root.join(&child),
                source,
            })?;
            if ft.is_dir() {
                stack.push(child.clone());
            }
            out.push(child);
        }
    }
    out.sort_by(|a, b| {
        a.as_os_str()
            .as_encoded_bytes()
            .cmp(b.as_os_str().as_encoded_bytes())
    });
    Ok(out)
}

fn header(kind: tar::EntryType, mode: u32, size: u64, epoch: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode & 0o7777);
    h.set_size(size);
    h.set_mtime(epoch);
    h.set_uid(0);
    h.set_gid(0);
    // Empty owner names: nothing of the build machine ends up in the layer.
    let _ = h.set_username("");
    let _ = h.set_groupname("");
    h
}

/// The uncompressed tar of `root`: sorted entries, mtime `epoch`, owner
/// 0:0, modes as staged (setuid bits kept), hard links stored as files.
pub fn tar_of(root: &Path, epoch: u64) -> Result<(Vec<u8>, usize), ImageError> {
    let paths = walk(root)?;
    let mut b = tar::Builder::new(Vec::new());
    b.mode(tar::HeaderMode::Deterministic);
    let werr = |source| ImageError::Write {
        what: "the layer tar".into(),
        source,
    };
    for rel in &paths {
        let full = root.join(rel);
        let rerr = |source| ImageError::Read {
            path: full.clone(),
            source,
        };
        let meta = fs::symlink_metadata(&full).map_err(rerr)?;
        let ft = meta.file_type();
        let mode = meta.permissions().mode();
        if ft.is_dir() {
            let mut h = header(tar::EntryType::Directory, mode, 0, epoch);
            let mut name = rel.as_os_str().to_owned();
            name.push("/");
            b.append_data(&mut h, Path::new(&name), std::io::empty())
                .map_err(werr)?;
        } else if ft.is_symlink() {
            let target = fs::read_link(&full).map_err(rerr)?;
            let mut h = header(tar::EntryType::Symlink, 0o777, 0, epoch);
            b.append_link(&mut h, rel, &target).map_err(werr)?;
        } else if ft.is_file() {
            let data = fs::read(&full).map_err(rerr)?;
            debug_assert_eq!(data.len() as u64, meta.size());
            let mut h = header(tar::EntryType::Regular, mode, data.len() as u64, epoch);
            b.append_data(&mut h, rel, data.as_slice()).map_err(werr)?;
        } else {
            return Err(ImageError::Unsupported {
                path: full,
                kind: "special file",
            });
        }
    }
    let tar = b.into_inner().map_err(werr)?;
    Ok((tar, paths.len()))
}

/// gzip with no file name, mtime 0 and a fixed level: the same input
/// always gives the same bytes.
pub fn gzip(data: &[u8]) -> Result<Vec<u8>, ImageError> {
    let werr = |source| ImageError::Write {
        what: "the gzip stream".into(),
        source,
    };
    let mut gz = GzBuilder::new()
        .mtime(0)
        .operating_system(255)
        .write(Vec::new(), Compression::best());
    gz.write_all(data).map_err(werr)?;
    gz.finish().map_err(werr)
}

/// The layer of `root` (see [`tar_of`] and [`gzip`]).
pub fn build(root: &Path, epoch: u64) -> Result<Layer, ImageError> {
    let (tar, entries) = tar_of(root, epoch)?;
    Ok(Layer {
        diff_id: sha256(&tar),
        gzip: gzip(&tar)?,
        entries,
        tar_len: tar.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn tree(dir: &Path, content: &[u8]) {
        fs::create_dir_all(dir.join("usr/bin")).unwrap();
        fs::create_dir_all(dir.join("lib")).unwrap();
        fs::write(dir.join("usr/bin/tool"), content).unwrap();
        fs::set_permissions(dir.join("usr/bin/tool"), fs::Permissions::from_mode(0o4755)).unwrap();
        fs::write(dir.join("lib/libz.so.1.2"), b"lib").unwrap();
        symlink("libz.so.1.2", dir.join("lib/libz.so.1")).unwrap();
        let long = "d".repeat(120);
        fs::create_dir_all(dir.join(&long)).unwrap();
        fs::write(dir.join(&long).join("f"), b"long").unwrap();
    }

    #[test]
    fn entries_are_sorted_owned_by_root_and_dated_at_the_epoch() {
        let d = tempfile::tempdir().unwrap();
        tree(d.path(), b"#!/bin/sh\n");
        let (tar, n) = tar_of(d.path(), 1_700_000_000).unwrap();
        assert_eq!(n, 8);
        let mut a = tar::Archive::new(tar.as_slice());
        let mut names = Vec::new();
        for e in a.entries().unwrap() {
            let e = e.unwrap();
            let h = e.header();
            assert_eq!(h.mtime().unwrap(), 1_700_000_000);
            assert_eq!((h.uid().unwrap(), h.gid().unwrap()), (0, 0));
            assert_eq!(h.username().unwrap(), Some(""));
            let name = e.path().unwrap().to_string_lossy().into_owned();
            if name == "usr/bin/tool" {
                assert_eq!(h.mode().unwrap(), 0o4755);
            }
            if name == "lib/libz.so.1" {
                assert_eq!(h.entry_type(), tar::EntryType::Symlink);
                assert_eq!(
                    e.link_name().unwrap().unwrap().to_str(),
                    Some("libz.so.1.2")
                );
            }
            names.push(name);
        }
        let long = format!("{}/", "d".repeat(120));
        let want = [
            long.clone(),
            format!("{long}f"),
            "lib/".into(),
            "lib/libz.so.1".into(),
            "lib/libz.so.1.2".into(),
            "usr/".into(),
            "usr/bin/".into(),
            "usr/bin/tool".into(),
        ];
        assert_eq!(names, want);
    }

    #[test]
    fn two_trees_with_the_same_content_give_the_same_layer() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        tree(a.path(), b"same");
        tree(b.path(), b"same");
        // Different mtimes on disk must not matter.
        let f = fs::File::options()
            .write(true)
            .open(b.path().join("lib/libz.so.1.2"))
            .unwrap();
        f.set_modified(std::time::SystemTime::UNIX_EPOCH).unwrap();
        let (la, lb) = (build(a.path(), 5).unwrap(), build(b.path(), 5).unwrap());
        assert_eq!(la.diff_id, lb.diff_id);
        assert_eq!(sha256(&la.gzip), sha256(&lb.gzip));
        // The gzip header: no mtime (bytes 4..8), no FNAME flag (bit 3).
        assert_eq!(&la.gzip[4..8], &[0, 0, 0, 0]);
        assert_eq!(la.gzip[3] & 0x08, 0);
        // A changed byte changes both digests.
        let c = tempfile::tempdir().unwrap();
        tree(c.path(), b"diff");
        let lc = build(c.path(), 5).unwrap();
        assert_ne!(lc.diff_id, la.diff_id);
        // Another epoch changes the layer too.
        assert_ne!(build(a.path(), 6).unwrap().diff_id, la.diff_id);
    }

    #[test]
    fn a_fifo_is_refused_with_its_path() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("pipe");
        let ok = std::process::Command::new("mkfifo")
            .arg(&p)
            .status()
            .unwrap();
        assert!(ok.success());
        let e = tar_of(d.path(), 0).unwrap_err();
        assert!(e.to_string().contains("pipe"), "{e}");
    }
}
