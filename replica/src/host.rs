//! [`ReplicaHost`]: the replicas of many volumes under one directory, as a
//! node's replica server hosts them.
//!
//! ```text
//! DIR/
//!   NAME/            one volume's replica: a `Store` directory (store/mod.rs)
//!     volume.meta
//!     ...
//! ```
//!
//! The host opens stores on demand (the data server's HELLO, the control
//! API) and shares each open one as an `Arc<Store>`. Opening, closing and
//! deleting are serialised per volume, never across volumes: opening a big
//! volume does not hold up another's HELLO. Every method is blocking; async
//! callers run them with `spawn_blocking`.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;

use crate::engine::IoEngine;
use crate::meta::META_FILE;
use crate::{CreateOptions, OpenReport, Store, StoreError, WritebackConfig};

/// Everything that can go wrong in [`ReplicaHost`].
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("Invalid volume name {0:?}: use 1 to 64 characters from A-Z a-z 0-9 . _ - (not \".\" or \"..\")")]
    InvalidName(String),

    /// Also how a missing volume (`StoreError::NotFound`) or an existing one
    /// (`StoreError::AlreadyExists`) is reported.
    #[error("Volume {volume:?}")]
    Store {
        volume: String,
        #[source]
        source: StoreError,
    },

    #[error("Volume {0:?} is not open")]
    NotOpen(String),

    #[error("Volume {volume:?} is in use ({users} other references, e.g. bound data connections)")]
    Busy { volume: String, users: usize },

    #[error("Refusing epoch {requested} for volume {volume:?}: it is at epoch {current}, set by another controller or newer")]
    EpochBackwards {
        volume: String,
        current: u64,
        requested: u64,
    },

    #[error("Refusing a request at epoch {requested} for volume {volume:?}: the replica is at epoch {current} (a newer controller owns it, or this one must set the epoch first)")]
    Fenced {
        volume: String,
        current: u64,
        requested: u64,
    },

    #[error("{op} failed on {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl HostError {
    fn store(volume: &str, source: StoreError) -> Self {
        HostError::Store {
            volume: volume.to_string(),
            source,
        }
    }

    /// True when the volume does not exist on this host.
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            HostError::Store {
                source: StoreError::NotFound(_),
                ..
            }
        )
    }
}

/// `[A-Za-z0-9._-]{1,64}`, and not `.` or `..`.
pub fn valid_volume_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

#[derive(Default)]
struct Slot {
    store: Option<Arc<Store>>,
    report: Option<OpenReport>,
}

/// The volumes' replicas on this node. See the module docs.
pub struct ReplicaHost {
    dir: PathBuf,
    engine: Arc<dyn IoEngine>,
    /// One slot per volume that is open or being opened/closed; the slot's
    /// own lock serialises those operations for that volume.
    slots: Mutex<HashMap<String, Arc<Mutex<Slot>>>>,
    /// Applied to every store this host opens or creates.
    writeback: Mutex<WritebackConfig>,
}

impl std::fmt::Debug for ReplicaHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaHost")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl ReplicaHost {
    /// A host over `dir`. Opens nothing yet; `dir` is created with the first
    /// volume.
    pub fn new(dir: impl Into<PathBuf>, engine: Arc<dyn IoEngine>) -> ReplicaHost {
        ReplicaHost {
            dir: dir.into(),
            engine,
            slots: Mutex::new(HashMap::new()),
            writeback: Mutex::new(WritebackConfig::default()),
        }
    }

    /// Sets how every store of this host bounds its unflushed data
    /// (`--flush-target-ms`, `--dirty-limit-mib`), for the open ones too.
    pub fn set_writeback(&self, config: WritebackConfig) {
        *self.writeback.lock() = config;
        for name in self.open_volumes() {
            if let Some(store) = self.get(&name) {
                store.configure_writeback(config);
            }
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn volume_dir(&self, name: &str) -> Result<PathBuf, HostError> {
        if !valid_volume_name(name) {
            return Err(HostError::InvalidName(name.to_string()));
        }
        Ok(self.dir.join(name))
    }

    fn slot(&self, name: &str) -> Arc<Mutex<Slot>> {
        self.slots
            .lock()
            .entry(name.to_string())
            .or_default()
            .clone()
    }

    /// Drops `name`'s slot if it is still `slot` and empty.
    fn forget_if_empty(&self, name: &str, slot: &Arc<Mutex<Slot>>) {
        let mut slots = self.slots.lock();
        if let Some(s) = slots.get(name) {
            // try_lock: a slot someone holds is in use; never wait on it
            // while holding the map.
            if Arc::ptr_eq(s, slot) && s.try_lock().is_some_and(|s| s.store.is_none()) {
                slots.remove(name);
            }
        }
    }

    /// Creates volume `name` of `size` bytes (its volume id is its name) and
    /// keeps it open.
    pub fn create(&self, name: &str, size: u64) -> Result<Arc<Store>, HostError> {
        self.create_with(
            name,
            &CreateOptions {
                volume_id: name.to_string(),
                size,
            },
        )
    }

    /// Creates volume `name` with explicit options and keeps it open.
    pub fn create_with(&self, name: &str, opts: &CreateOptions) -> Result<Arc<Store>, HostError> {
        let dir = self.volume_dir(name)?;
        let slot = self.slot(name);
        let result = {
            let mut s = slot.lock();
            if s.store.is_some() || dir.join(META_FILE).exists() {
                Err(HostError::store(
                    name,
                    StoreError::AlreadyExists(dir.clone()),
                ))
            } else {
                match Store::create(&dir, opts, self.engine.clone()) {
                    Ok(store) => {
                        store.configure_writeback(*self.writeback.lock());
                        let store = Arc::new(store);
                        s.store = Some(store.clone());
                        s.report = Some(OpenReport {
                            was_clean: true,
                            page_cache_lost: false,
                        });
                        Ok(store)
                    }
                    Err(e) => Err(HostError::store(name, e)),
                }
            }
        };
        if result.is_err() {
            self.forget_if_empty(name, &slot);
        }
        result
    }

    /// Creates volume `new` holding what snapshot `snapshot` of volume
    /// `source` holds, by copying the snapshot's allocated ranges (holes stay
    /// holes). The new volume is independent: it shares no file with the
    /// source. On failure the partial copy is deleted.
    pub fn clone_snapshot(
        &self,
        source: &str,
        snapshot: &str,
        new: &str,
    ) -> Result<Arc<Store>, HostError> {
        const STEP: u64 = 8 << 20;
        let src = self.open(source)?;
        if !src.has_snapshot(snapshot) {
            return Err(HostError::store(
                source,
                StoreError::NoSuchSnapshot(snapshot.to_string()),
            ));
        }
        let view = crate::View::Snapshot(snapshot);
        let size = src
            .view_size(view)
            .map_err(|e| HostError::store(source, e))?;
        let dst = self.create(new, size)?;
        let copy = || -> Result<(), StoreError> {
            let mut buf = vec![0u8; STEP as usize];
            let mut offset = 0;
            while offset < size {
                let len = STEP.min(size - offset);
                for ext in src.allocation_view(view, offset, len)? {
                    if ext.kind != crate::Allocation::Data {
                        continue;
                    }
                    let data = &mut buf[..ext.len as usize];
                    src.read_view(view, ext.offset, data)?;
                    dst.write(ext.offset, data)?;
                }
                offset += len;
            }
            dst.flush()
        };
        match copy() {
            Ok(()) => Ok(dst),
            Err(e) => {
                drop(dst);
                if let Err(d) = self.delete(new) {
                    tracing::warn!(volume = new, "could not remove a failed clone: {d}");
                }
                Err(HostError::store(new, e))
            }
        }
    }

    /// Returns volume `name`, opening it if it is not open yet.
    pub fn open(&self, name: &str) -> Result<Arc<Store>, HostError> {
        let dir = self.volume_dir(name)?;
        let slot = self.slot(name);
        let result = {
            let mut s = slot.lock();
            if let Some(store) = &s.store {
                Ok(store.clone())
            } else if !dir.join(META_FILE).exists() {
                Err(HostError::store(name, StoreError::NotFound(dir.clone())))
            } else {
                match Store::open(&dir, self.engine.clone()) {
                    Ok((store, report)) => {
                        if !report.was_clean {
                            tracing::warn!(
                                volume = name,
                                "replica was not closed cleanly; unflushed writes may be lost"
                            );
                        }
                        store.configure_writeback(*self.writeback.lock());
                        let store = Arc::new(store);
                        s.store = Some(store.clone());
                        s.report = Some(report);
                        Ok(store)
                    }
                    Err(e) => Err(HostError::store(name, e)),
                }
            }
        };
        if result.is_err() {
            self.forget_if_empty(name, &slot);
        }
        result
    }

    /// [`ReplicaHost::open`], with what the open found: whether the volume
    /// was closed cleanly before this process opened it (`true` for one
    /// created by this host) and whether the machine restarted since.
    pub fn open_with_report(&self, name: &str) -> Result<(Arc<Store>, OpenReport), HostError> {
        let store = self.open(name)?;
        let report = self.open_report(name).unwrap_or(OpenReport {
            was_clean: true,
            page_cache_lost: false,
        });
        Ok((store, report))
    }

    /// Forgets that `name` was not closed cleanly before this process opened
    /// it: a controller compared it with its peers (or it is their source).
    pub fn mark_reconciled(&self, name: &str) {
        let slot = self.slot(name);
        let mut s = slot.lock();
        if s.report.is_some() {
            s.report = Some(OpenReport {
                was_clean: true,
                page_cache_lost: false,
            });
        }
    }

    /// The open volume `name`, if it is open. Waits for an open or close of
    /// that volume in progress.
    pub fn get(&self, name: &str) -> Option<Arc<Store>> {
        let slot = self.slots.lock().get(name)?.clone();
        let s = slot.lock();
        s.store.clone()
    }

    /// What opening volume `name` found (`was_clean: true` for one created
    /// by this host), while it is open.
    pub fn open_report(&self, name: &str) -> Option<OpenReport> {
        let slot = self.slots.lock().get(name)?.clone();
        let s = slot.lock();
        s.store.as_ref().and(s.report)
    }

    /// Names of the open volumes, sorted.
    pub fn open_volumes(&self) -> Vec<String> {
        let slots: Vec<(String, Arc<Mutex<Slot>>)> = self
            .slots
            .lock()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut names: Vec<String> = slots
            .into_iter()
            .filter(|(_, s)| s.lock().store.is_some())
            .map(|(k, _)| k)
            .collect();
        names.sort();
        names
    }

    /// Flushes and cleanly closes volume `name`. Refused with
    /// [`HostError::Busy`] while anyone else holds its `Arc<Store>` (a data
    /// connection bound to it, a request in flight): the volume stays open.
    /// Closing a volume that is not open is [`HostError::NotOpen`].
    pub fn close(&self, name: &str) -> Result<(), HostError> {
        self.close_inner(name, None)
    }

    /// [`ReplicaHost::close`] within a deadline ([`Store::close_within`]).
    pub fn close_within(&self, name: &str, deadline: Instant) -> Result<(), HostError> {
        self.close_inner(name, Some(deadline))
    }

    fn close_inner(&self, name: &str, deadline: Option<Instant>) -> Result<(), HostError> {
        let not_open = || HostError::NotOpen(name.to_string());
        let slot = self.slots.lock().get(name).cloned().ok_or_else(not_open)?;
        let mut s = slot.lock();
        let store = s.store.take().ok_or_else(not_open)?;
        match Arc::try_unwrap(store) {
            Ok(store) => {
                // Closed under the slot lock, so a concurrent open waits for
                // the directory lock to be released. A failed close leaves
                // the store unclean: the next open reports it, as after a
                // crash.
                let closed = match deadline {
                    Some(d) => store.close_within(d),
                    None => store.close(),
                };
                let result = closed.map_err(|e| HostError::store(name, e));
                s.report = None;
                drop(s);
                self.forget_if_empty(name, &slot);
                result
            }
            Err(store) => {
                let users = Arc::strong_count(&store) - 1;
                s.store = Some(store);
                Err(HostError::Busy {
                    volume: name.to_string(),
                    users,
                })
            }
        }
    }

    /// Closes every open volume (for a clean shutdown, after the servers
    /// have stopped). Tries all of them; returns (and logs) the failures, so
    /// an empty list means every volume was closed cleanly.
    pub fn close_all(&self) -> Vec<HostError> {
        self.close_all_inner(None)
    }

    /// [`ReplicaHost::close_all`] for a stop with a deadline: each volume
    /// closes with [`Store::close_within`]; one that cannot finish its
    /// flush by then says so (the error) and is left for the next start.
    pub fn close_all_within(&self, deadline: Instant) -> Vec<HostError> {
        self.close_all_inner(Some(deadline))
    }

    fn close_all_inner(&self, deadline: Option<Instant>) -> Vec<HostError> {
        let mut failed = Vec::new();
        for name in self.open_volumes() {
            match self.close_inner(&name, deadline) {
                Ok(()) | Err(HostError::NotOpen(_)) => {}
                Err(e) => {
                    let reason = std::error::Error::source(&e)
                        .map(|s| s.to_string())
                        .unwrap_or_default();
                    tracing::error!(volume = %name, error = %e, %reason, "closing volume failed");
                    failed.push(e);
                }
            }
        }
        failed
    }

    /// Names of the volumes on disk (directories holding a `volume.meta`),
    /// sorted.
    pub fn list(&self) -> Result<Vec<String>, HostError> {
        let io_err = |source| HostError::Io {
            op: "read directory",
            path: self.dir.clone(),
            source,
        };
        let mut names = Vec::new();
        let entries = match fs::read_dir(&self.dir) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(names),
            other => other.map_err(io_err)?,
        };
        for entry in entries {
            let entry = entry.map_err(io_err)?;
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if valid_volume_name(&name) && entry.path().join(META_FILE).is_file() {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }

    /// Closes volume `name` (refused while busy, see [`ReplicaHost::close`])
    /// and removes its directory.
    pub fn delete(&self, name: &str) -> Result<(), HostError> {
        let dir = self.volume_dir(name)?;
        let slot = self.slot(name);
        let result = {
            let mut s = slot.lock();
            match s.store.take().map(Arc::try_unwrap) {
                Some(Err(store)) => {
                    let users = Arc::strong_count(&store) - 1;
                    s.store = Some(store);
                    Err(HostError::Busy {
                        volume: name.to_string(),
                        users,
                    })
                }
                open => {
                    s.report = None;
                    // Closing first releases the directory lock; the data is
                    // going away, so a failed close does not stop the delete.
                    if let Some(Ok(store)) = open {
                        if let Err(e) = store.close() {
                            tracing::warn!(volume = name, error = %e, "close before delete failed");
                        }
                    }
                    if !dir.exists() {
                        Err(HostError::store(name, StoreError::NotFound(dir.clone())))
                    } else {
                        fs::remove_dir_all(&dir).map_err(|source| HostError::Io {
                            op: "remove directory",
                            path: dir.clone(),
                            source,
                        })
                    }
                }
            }
        };
        self.forget_if_empty(name, &slot);
        result
    }
}
