//! Object stores a target lives in: an S3 bucket (any S3-protocol server) or
//! a directory. Both hold the same keys (`config`, `chunks/..`, `index/..`,
//! `packs/..`, `packidx/..`, `manifests/..`, `locks/..`, see `target.rs`) relative to the target's
//! prefix, and offer the same six calls: get, get_parts, put, exists, delete, list.
//! Nothing here knows about chunks or encryption.

mod file;
mod s3;

use std::time::SystemTime;

use bytes::Bytes;

pub use file::FileStore;
pub use s3::{S3Options, S3Store};

use crate::error::{BackupError, Result};

/// One listed object.
#[derive(Debug, Clone)]
pub struct ObjectInfo {
    /// Key relative to the target prefix.
    pub key: String,
    pub size: u64,
    /// The store's modification time (the server's clock for S3).
    pub modified: SystemTime,
}

/// A target's object store.
#[derive(Debug, Clone)]
pub enum Store {
    File(FileStore),
    S3(S3Store),
}

impl Store {
    /// The target URL, for messages.
    pub fn url(&self) -> &str {
        match self {
            Store::File(s) => s.url(),
            Store::S3(s) => s.url(),
        }
    }

    /// The object, or None if it does not exist.
    pub async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        match self {
            Store::File(s) => s.get(key).await,
            Store::S3(s) => s.get(key).await,
        }
    }

    /// The object, or a [`BackupError::Missing`] naming it.
    pub async fn get_required(&self, key: &str) -> Result<Bytes> {
        self.get(key).await?.ok_or_else(|| BackupError::Missing {
            target: self.url().to_string(),
            key: key.to_string(),
        })
    }

    /// Parts of the object, each (offset, length), in offset order and
    /// not overlapping, read with one request (the bytes between parts
    /// are read and dropped), each into a buffer of its own; parts are
    /// shorter or empty where the object ends first. None if the object
    /// does not exist.
    pub async fn get_parts(&self, key: &str, parts: &[(u64, u64)]) -> Result<Option<Vec<Vec<u8>>>> {
        if parts.windows(2).any(|w| w[0].0 + w[0].1 > w[1].0) {
            return Err(BackupError::Invalid(format!(
                "parts of {key} overlap or are out of order"
            )));
        }
        match self {
            Store::File(s) => s.get_parts(key, parts).await,
            Store::S3(s) => s.get_parts(key, parts).await,
        }
    }

    /// Writes the whole object (atomically: readers see the old or the new
    /// object, never a part).
    pub async fn put(&self, key: &str, data: Bytes) -> Result<()> {
        match self {
            Store::File(s) => s.put(key, data).await,
            Store::S3(s) => s.put(key, data).await,
        }
    }

    pub async fn exists(&self, key: &str) -> Result<bool> {
        match self {
            Store::File(s) => s.exists(key).await,
            Store::S3(s) => s.exists(key).await,
        }
    }

    /// Deletes the object; deleting an absent object is not an error.
    pub async fn delete(&self, key: &str) -> Result<()> {
        match self {
            Store::File(s) => s.delete(key).await,
            Store::S3(s) => s.delete(key).await,
        }
    }

    /// Every object whose key starts with `prefix`, in key order.
    pub async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        let mut v = match self {
            Store::File(s) => s.list(prefix).await?,
            Store::S3(s) => s.list(prefix).await?,
        };
        v.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(v)
    }

    /// The modification time of one object (None if absent).
    pub async fn modified(&self, key: &str) -> Result<Option<SystemTime>> {
        Ok(self
            .list(key)
            .await?
            .into_iter()
            .find(|o| o.key == key)
            .map(|o| o.modified))
    }
}
