//! A target in a directory (`file:///dir`): one file per object, written to
//! a temporary name, synced, then renamed, so a crash never leaves half an
//! object under its real name.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;

use super::ObjectInfo;
use crate::error::{BackupError, Result};

#[derive(Debug, Clone)]
pub struct FileStore {
    root: Arc<PathBuf>,
    url: Arc<str>,
}

impl FileStore {
    /// A store rooted at `root` (created if missing).
    pub fn new(root: PathBuf, url: &str) -> Result<Self> {
        std::fs::create_dir_all(&root).map_err(|e| BackupError::InvalidTarget {
            url: url.to_string(),
            reason: format!("cannot create {}: {e}", root.display()),
        })?;
        Ok(Self {
            root: Arc::new(root),
            url: url.into(),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    fn path(&self, key: &str) -> Result<PathBuf> {
        if key.is_empty()
            || key.starts_with('/')
            || key
                .split('/')
                .any(|c| c.is_empty() || c == "." || c == "..")
        {
            return Err(BackupError::Invalid(format!("invalid object key {key:?}")));
        }
        Ok(self.root.join(key))
    }

    fn err(&self, op: &'static str, key: &str, e: impl std::fmt::Display) -> BackupError {
        BackupError::Store {
            op,
            target: self.url.to_string(),
            key: key.to_string(),
            reason: e.to_string(),
        }
    }

    async fn blocking<T: Send + 'static>(
        &self,
        op: &'static str,
        key: &str,
        f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
    ) -> Result<T> {
        match tokio::task::spawn_blocking(f).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.err(op, key, e)),
            Err(e) => Err(self.err(op, key, e)),
        }
    }

    pub async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        let path = self.path(key)?;
        self.blocking("get", key, move || match std::fs::read(&path) {
            Ok(v) => Ok(Some(Bytes::from(v))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        })
        .await
    }

    /// See [`super::Store::get_parts`].
    pub async fn get_parts(&self, key: &str, parts: &[(u64, u64)]) -> Result<Option<Vec<Vec<u8>>>> {
        let path = self.path(key)?;
        let parts = parts.to_vec();
        self.blocking("get", key, move || {
            use std::os::unix::fs::FileExt;
            let f = match std::fs::File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e),
            };
            let size = f.metadata()?.len();
            let mut out = Vec::with_capacity(parts.len());
            for (offset, len) in parts {
                let mut buf = vec![0u8; len.min(size.saturating_sub(offset)) as usize];
                f.read_exact_at(&mut buf, offset)?;
                out.push(buf);
            }
            Ok(Some(out))
        })
        .await
    }

    pub async fn put(&self, key: &str, data: Bytes) -> Result<()> {
        let path = self.path(key)?;
        self.blocking("put", key, move || {
            let dir = path.parent().unwrap_or(Path::new("/")).to_path_buf();
            std::fs::create_dir_all(&dir)?;
            let tmp = dir.join(format!(
                ".tmp-{}-{:016x}",
                std::process::id(),
                rand::random::<u64>()
            ));
            let res = (|| {
                let mut f = std::fs::File::create(&tmp)?;
                f.write_all(&data)?;
                f.sync_data()?;
                std::fs::rename(&tmp, &path)
            })();
            if res.is_err() {
                let _ = std::fs::remove_file(&tmp);
            }
            res
        })
        .await
    }

    pub async fn exists(&self, key: &str) -> Result<bool> {
        let path = self.path(key)?;
        self.blocking("stat", key, move || match std::fs::metadata(&path) {
            Ok(m) => Ok(m.is_file()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        })
        .await
    }

    pub async fn delete(&self, key: &str) -> Result<()> {
        let path = self.path(key)?;
        self.blocking("delete", key, move || match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        })
        .await
    }

    pub async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        let root = self.root.clone();
        let prefix_owned = prefix.to_string();
        self.blocking("list", prefix, move || {
            // Walk only the directory the prefix names (up to its last '/').
            let dir_part = match prefix_owned.rfind('/') {
                Some(i) => &prefix_owned[..i],
                None => "",
            };
            let mut out = Vec::new();
            let mut stack = vec![(root.join(dir_part), dir_part.to_string())];
            while let Some((dir, rel)) = stack.pop() {
                let rd = match std::fs::read_dir(&dir) {
                    Ok(rd) => rd,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                };
                for ent in rd {
                    let ent = ent?;
                    let name = ent.file_name().to_string_lossy().into_owned();
                    if name.starts_with(".tmp-") {
                        continue;
                    }
                    let key = if rel.is_empty() {
                        name
                    } else {
                        format!("{rel}/{name}")
                    };
                    let meta = ent.metadata()?;
                    if meta.is_dir() {
                        if prefix_owned.starts_with(&key) || key.starts_with(&prefix_owned) {
                            stack.push((ent.path(), key));
                        }
                    } else if key.starts_with(&prefix_owned) {
                        out.push(ObjectInfo {
                            key,
                            size: meta.len(),
                            modified: meta.modified()?,
                        });
                    }
                }
            }
            Ok(out)
        })
        .await
    }
}
