//! A backup target: an object store plus its `config` object (chunk size,
//! encryption, the per-target hash key), and the key layout inside it:
//!
//! ```text
//! config                              JSON, created by the first backup
//! packs/<2 hex>/<64 hex>              packs of sealed chunks (`pack.rs`)
//! packidx/<64 hex>                    where chunks lie in packs
//! chunks/<2 hex>/<64 hex>             chunk objects of targets written before packs
//! index/<2 hex>/<64 hex>              chunk-index pages, named by keyed hash
//! manifests/<volume>/<backup id>      one per complete backup, written last
//! locks/backup/<volume>/<backup id>   a backup in progress (heartbeat)
//! locks/gc                            a gc about to delete
//! ```
//!
//! Keys: an unencrypted target keeps a random 32-byte hash key in `config`
//! (chunk names are then stable per target, so every volume backed up to it
//! deduplicates against every other). An encrypted target keeps only a salt
//! and a key check; the user's key (a file or `STRATA_BACKUP_KEY`) and the
//! salt derive, with BLAKE3's key derivation, the encryption key, the hash
//! key and the check, so chunk names reveal nothing without the key.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::OnceCell;

use crate::envelope::{Keys, Kind, ObjectId};
use crate::error::{BackupError, Result};
use crate::format::{self, IndexPage, Manifest};
use crate::store::{FileStore, S3Options, S3Store, Store};
use crate::timing::{Stage, Timings};

/// The environment variable holding the key when no key file is given.
pub const KEY_ENV: &str = "STRATA_BACKUP_KEY";
/// Default chunk size of a new target.
pub const DEFAULT_CHUNK_SIZE: u32 = 1 << 20;
/// Default chunks per index page (1 GiB windows with 1 MiB chunks).
pub const DEFAULT_WINDOW: u64 = 1 << 30;

/// How to open a target.
#[derive(Debug, Clone)]
pub struct TargetOptions {
    pub s3: S3Options,
    /// Key material (the bytes of a key file or of `STRATA_BACKUP_KEY`);
    /// None: the target must be unencrypted (or new, and then stays so).
    pub key: Option<Vec<u8>>,
    /// Chunks in flight at once (reads, uploads, downloads).
    pub parallel: usize,
    /// Chunk size for a new target (a power of two, 64 KiB..16 MiB).
    pub chunk_size: u32,
    /// A lock not refreshed for this long belongs to a dead process.
    pub stale_after: Duration,
    /// How often a running backup refreshes its lock.
    pub heartbeat: Duration,
}

impl Default for TargetOptions {
    fn default() -> Self {
        Self {
            s3: S3Options::default(),
            key: None,
            parallel: 8,
            chunk_size: DEFAULT_CHUNK_SIZE,
            stale_after: Duration::from_secs(15 * 60),
            heartbeat: Duration::from_secs(60),
        }
    }
}

/// Reads key material from `file`, else from the environment variable
/// [`KEY_ENV`]; None if neither is set. Trailing whitespace is dropped.
pub fn load_key(file: Option<&Path>) -> Result<Option<Vec<u8>>> {
    let raw = match file {
        Some(p) => std::fs::read(p)
            .map_err(|e| BackupError::Key(format!("cannot read key file {}: {e}", p.display())))?,
        None => match std::env::var_os(KEY_ENV) {
            Some(v) => std::os::unix::ffi::OsStrExt::as_bytes(v.as_os_str()).to_vec(),
            None => return Ok(None),
        },
    };
    let mut key = raw;
    while key.last().is_some_and(|b| b.is_ascii_whitespace()) {
        key.pop();
    }
    if key.len() < 16 {
        return Err(BackupError::Key(
            "the key must be at least 16 bytes (make one with: head -c 32 /dev/urandom | base64)"
                .into(),
        ));
    }
    Ok(Some(key))
}

/// The `config` object.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TargetConfig {
    pub format: String,
    pub version: u32,
    pub chunk_size: u32,
    pub page_chunks: u32,
    /// "none" or "xchacha20poly1305".
    pub encryption: String,
    /// Unencrypted targets: the hash key (hex).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_key: Option<String>,
    /// Encrypted targets: salt and key check (hex).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub salt: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_check: Option<String>,
}

struct Derived {
    enc: [u8; 32],
    hash: [u8; 32],
    check: [u8; 32],
}

fn derive(material: &[u8], salt: &[u8; 32]) -> Derived {
    let mut input = Vec::with_capacity(32 + material.len());
    input.extend_from_slice(salt);
    input.extend_from_slice(material);
    let master = blake3::derive_key("strata-backup v1 master key", &input);
    Derived {
        enc: blake3::derive_key("strata-backup v1 encryption key", &master),
        hash: blake3::derive_key("strata-backup v1 chunk naming key", &master),
        check: blake3::derive_key("strata-backup v1 key check", &master),
    }
}

fn hex32(s: Option<&str>) -> Option<[u8; 32]> {
    let mut b = [0u8; 32];
    hex::decode_to_slice(s?, &mut b).ok()?;
    Some(b)
}

pub(crate) struct Loaded {
    pub config: TargetConfig,
    pub keys: Keys,
}

/// An opened target.
pub struct Target {
    pub(crate) store: Store,
    pub(crate) opts: TargetOptions,
    loaded: OnceCell<Arc<Loaded>>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target").field("url", &self.url()).finish()
    }
}

impl Target {
    /// Opens `s3://bucket[/prefix]` or `file:///dir` (a plain path is taken
    /// as a directory too). Nothing is created until the first backup.
    pub async fn open(url: &str, opts: &TargetOptions) -> Result<Self> {
        let invalid = |reason: &str| BackupError::InvalidTarget {
            url: url.to_string(),
            reason: reason.to_string(),
        };
        let store = if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.len() < 3
                || !bucket
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || ".-_".contains(c))
            {
                return Err(invalid(
                    "the bucket name must be 3+ characters of a-z, 0-9, '.', '-'",
                ));
            }
            Store::S3(S3Store::new(bucket, prefix.trim_matches('/'), url, &opts.s3).await?)
        } else if let Some(path) = url.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Err(invalid("a file target needs an absolute path: file:///dir"));
            }
            Store::File(FileStore::new(PathBuf::from(path), url)?)
        } else if url.starts_with('/') {
            Store::File(FileStore::new(PathBuf::from(url), url)?)
        } else {
            return Err(invalid("use s3://bucket/prefix or file:///dir"));
        };
        if opts.parallel == 0 {
            return Err(invalid("parallelism must be at least 1"));
        }
        Ok(Self {
            store,
            opts: opts.clone(),
            loaded: OnceCell::new(),
        })
    }

    pub fn url(&self) -> &str {
        self.store.url()
    }

    /// The store under the target (for tests and tools).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The target's configuration; None if no backup was ever made to it.
    pub async fn config(&self) -> Result<Option<TargetConfig>> {
        Ok(self.loaded(false).await?.map(|l| l.config.clone()))
    }

    /// Reads `config` and derives the keys; with `create`, writes a new
    /// `config` when there is none.
    pub(crate) async fn loaded(&self, create: bool) -> Result<Option<Arc<Loaded>>> {
        if let Some(l) = self.loaded.get() {
            return Ok(Some(l.clone()));
        }
        let raw = match self.store.get("config").await? {
            Some(raw) => raw,
            None if !create => return Ok(None),
            None => {
                let cfg = self.new_config()?;
                let bytes = serde_json::to_vec_pretty(&cfg)
                    .map_err(|e| BackupError::Invalid(format!("cannot encode config: {e}")))?;
                self.store.put("config", Bytes::from(bytes)).await?;
                // Read back: if another process created it at the same
                // moment, both go on with the one that stayed.
                self.store.get_required("config").await?
            }
        };
        let loaded = Arc::new(self.parse_config(&raw)?);
        let _ = self.loaded.set(loaded.clone());
        Ok(Some(loaded))
    }

    /// Like [`Self::loaded`] without create, but a missing config is an error.
    pub(crate) async fn require(&self) -> Result<Arc<Loaded>> {
        self.loaded(false).await?.ok_or_else(|| {
            BackupError::Invalid(format!(
                "{} holds no backups (no config object)",
                self.url()
            ))
        })
    }

    fn new_config(&self) -> Result<TargetConfig> {
        format::geometry(0, self.opts.chunk_size, 1).map_err(|e| BackupError::Invalid(e.0))?;
        let page_chunks = (DEFAULT_WINDOW / self.opts.chunk_size as u64) as u32;
        let mut cfg = TargetConfig {
            format: "strata-backup".into(),
            version: 1,
            chunk_size: self.opts.chunk_size,
            page_chunks,
            encryption: "none".into(),
            hash_key: None,
            salt: None,
            key_check: None,
        };
        match &self.opts.key {
            None => cfg.hash_key = Some(hex::encode(rand::random::<[u8; 32]>())),
            Some(material) => {
                let salt: [u8; 32] = rand::random();
                let d = derive(material, &salt);
                cfg.encryption = "xchacha20poly1305".into();
                cfg.salt = Some(hex::encode(salt));
                cfg.key_check = Some(hex::encode(d.check));
            }
        }
        Ok(cfg)
    }

    fn parse_config(&self, raw: &[u8]) -> Result<Loaded> {
        let corrupt = |reason: String| BackupError::Corrupt {
            target: self.url().to_string(),
            key: "config".into(),
            reason,
        };
        if raw.len() > 64 << 10 {
            return Err(corrupt("larger than 64 KiB".into()));
        }
        let cfg: TargetConfig =
            serde_json::from_slice(raw).map_err(|e| corrupt(format!("not valid JSON: {e}")))?;
        if cfg.format != "strata-backup" || cfg.version != 1 {
            return Err(corrupt(format!(
                "format {:?} version {} is not supported",
                cfg.format, cfg.version
            )));
        }
        format::geometry(0, cfg.chunk_size, cfg.page_chunks).map_err(|e| corrupt(e.0))?;
        let keys = match cfg.encryption.as_str() {
            "none" => {
                if self.opts.key.is_some() {
                    return Err(BackupError::Key(format!(
                        "{} is not encrypted, but a key was given (unset {KEY_ENV} or drop --key-file)",
                        self.url()
                    )));
                }
                let hk = hex32(cfg.hash_key.as_deref())
                    .ok_or_else(|| corrupt("bad or missing hash_key".into()))?;
                Keys::new(hk, None)
            }
            "xchacha20poly1305" => {
                let Some(material) = &self.opts.key else {
                    return Err(BackupError::Key(format!(
                        "{} is encrypted: give its key with --key-file or {KEY_ENV}",
                        self.url()
                    )));
                };
                let salt = hex32(cfg.salt.as_deref())
                    .ok_or_else(|| corrupt("bad or missing salt".into()))?;
                let check = hex32(cfg.key_check.as_deref())
                    .ok_or_else(|| corrupt("bad or missing key_check".into()))?;
                let d = derive(material, &salt);
                if d.check != check {
                    return Err(BackupError::Key(format!(
                        "wrong key for {}: it does not match the key this target was created with",
                        self.url()
                    )));
                }
                Keys::new(d.hash, Some(d.enc))
            }
            other => return Err(corrupt(format!("unknown encryption {other:?}"))),
        };
        Ok(Loaded { config: cfg, keys })
    }

    /// Reads and opens one object.
    pub(crate) async fn get_object(
        &self,
        keys: &Keys,
        kind: Kind,
        key: &str,
        max_len: usize,
    ) -> Result<Bytes> {
        let obj = self.store.get_required(key).await?;
        keys.open(kind, key, &obj, max_len)
            .map_err(|reason| BackupError::Corrupt {
                target: self.url().to_string(),
                key: key.to_string(),
                reason,
            })
    }

    /// Reads a chunk stored as an object of its own (targets written
    /// before packs) and checks its plaintext hashes to its name.
    pub(crate) async fn get_loose_chunk(
        &self,
        l: &Arc<Loaded>,
        id: ObjectId,
        timings: &Arc<Timings>,
    ) -> Result<Bytes> {
        let key = chunk_key(&id);
        let obj = timings
            .time_async(Stage::Download, self.store.get_required(&key))
            .await?;
        let (l2, t2) = (l.clone(), timings.clone());
        let key2 = key.clone();
        let max = l.config.chunk_size as usize;
        let res = tokio::task::spawn_blocking(move || {
            let opened = t2.time(Stage::Decrypt, || {
                l2.keys
                    .authenticate(Kind::Chunk, &key2, Cow::Owned(Vec::from(obj)), max)
            })?;
            let plain = t2.time(Stage::Decompress, || Keys::decompress(opened))?;
            if t2.time(Stage::Verify, || l2.keys.chunk_id(&plain)) != id {
                return Err("content does not hash to the object's name".to_string());
            }
            Ok(plain)
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r);
        res.map_err(|reason| BackupError::Corrupt {
            target: self.url().to_string(),
            key,
            reason,
        })
    }

    pub(crate) async fn get_page(&self, l: &Loaded, id: ObjectId) -> Result<IndexPage> {
        let key = page_key(&id);
        let plain = self
            .get_object(&l.keys, Kind::IndexPage, &key, format::MAX_PAGE_BYTES)
            .await?;
        let corrupt = |reason: String| BackupError::Corrupt {
            target: self.url().to_string(),
            key: key.clone(),
            reason,
        };
        if l.keys.chunk_id(&plain) != id {
            return Err(corrupt("content does not hash to the object's name".into()));
        }
        IndexPage::decode(&plain).map_err(|e| corrupt(e.0))
    }

    pub(crate) async fn get_manifest(&self, l: &Loaded, key: &str) -> Result<Manifest> {
        let plain = self
            .get_object(&l.keys, Kind::Manifest, key, format::MAX_MANIFEST_BYTES)
            .await?;
        Manifest::decode(&plain).map_err(|e| BackupError::Corrupt {
            target: self.url().to_string(),
            key: key.to_string(),
            reason: e.0,
        })
    }

    /// Finds a backup by `ID` or `VOLUME/ID`; returns its manifest key.
    pub(crate) async fn find_backup(&self, id: &str) -> Result<String> {
        let none = || BackupError::NoSuchBackup {
            target: self.url().to_string(),
            id: id.to_string(),
        };
        if id.contains('/') {
            let (vol, bid) = id.split_once('/').ok_or_else(none)?;
            check_name(vol)?;
            check_name(bid)?;
            let key = manifest_key(vol, bid);
            return if self.store.exists(&key).await? {
                Ok(key)
            } else {
                Err(none())
            };
        }
        let suffix = format!("/{id}");
        let hits: Vec<_> = self
            .store
            .list("manifests/")
            .await?
            .into_iter()
            .filter(|o| o.key.ends_with(&suffix))
            .collect();
        match hits.len() {
            0 => Err(none()),
            1 => Ok(hits[0].key.clone()),
            _ => Err(BackupError::Invalid(format!(
                "backup id {id:?} is ambiguous: use VOLUME/ID"
            ))),
        }
    }
}

/// A volume or backup id usable in an object key.
pub fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 200
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(BackupError::Invalid(format!(
            "{name:?} is not a valid volume or backup name (1-200 of A-Z a-z 0-9 . _ -)"
        )))
    }
}

pub fn chunk_key(id: &ObjectId) -> String {
    let h = id.hex();
    format!("chunks/{}/{h}", &h[..2])
}

pub fn pack_key(id: &ObjectId) -> String {
    let h = id.hex();
    format!("packs/{}/{h}", &h[..2])
}

pub fn pack_index_key(id: &ObjectId) -> String {
    format!("packidx/{}", id.hex())
}

pub fn page_key(id: &ObjectId) -> String {
    let h = id.hex();
    format!("index/{}/{h}", &h[..2])
}

pub fn manifest_key(volume: &str, id: &str) -> String {
    format!("manifests/{volume}/{id}")
}

pub const GC_LOCK: &str = "locks/gc";
