//! [`ReplicaSnapshotSource`]: one snapshot of the volume as the backup
//! engine reads it. Data comes from a healthy replica through a read-only
//! `volume@snapshot` data connection; changed ranges from the replica's
//! gRPC `ChangedExtents`. Snapshots are the same on every healthy replica,
//! so when the replica fails (or the epoch moves on) the next request goes
//! to another one. The snapshot is held against delete and revert for as
//! long as the source lives.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use strata_backup::{Extent, ExtentKind, SnapshotSource, SourceError};
use strata_replica::client::ReplicaClient;
use strata_replica::control::MAX_EXTENT_WINDOW;
use tokio::sync::Mutex;

use super::JobError;
use crate::replicator::snapshot::SnapshotInUse;
use crate::replicator::{control, Volume};

/// Tries per request, each on the then-first healthy replica.
const ATTEMPTS: usize = 3;

pub struct ReplicaSnapshotSource {
    volume: Arc<Volume>,
    snapshot: String,
    /// The volume's size when the snapshot was taken.
    size: u64,
    reader: Mutex<Option<Arc<ReplicaClient>>>,
    _hold: SnapshotInUse,
}

impl ReplicaSnapshotSource {
    /// A source over snapshot `snapshot`, which must exist.
    pub async fn open(volume: &Arc<Volume>, snapshot: &str) -> Result<Self, JobError> {
        let hold = volume.hold_snapshot(snapshot);
        let chain = volume.list_snapshots().await?;
        let Some(info) = chain.iter().find(|s| s.name == snapshot) else {
            return Err(JobError::NoSnapshot {
                volume: volume.name.clone(),
                snapshot: snapshot.to_string(),
            });
        };
        Ok(ReplicaSnapshotSource {
            volume: volume.clone(),
            snapshot: snapshot.to_string(),
            size: info.size,
            reader: Mutex::new(None),
            _hold: hold,
        })
    }

    fn source_addr(&self) -> Result<SocketAddr, SourceError> {
        self.volume
            .healthy_addr()
            .map_err(|e| SourceError::Other(e.to_string()))
    }

    async fn reader(&self) -> Result<Arc<ReplicaClient>, SourceError> {
        let mut r = self.reader.lock().await;
        if let Some(c) = r.as_ref().filter(|c| !c.is_closed()) {
            return Ok(c.clone());
        }
        let addr = self.source_addr()?;
        let client = ReplicaClient::connect_snapshot(
            addr,
            &self.volume.name,
            &self.snapshot,
            self.volume.epoch(),
            self.volume.options.io_timeout,
        )
        .await
        .map_err(|e| SourceError::Other(format!("snapshot connection to {addr}: {e}")))?;
        let client = Arc::new(client);
        *r = Some(client.clone());
        Ok(client)
    }
}

impl SnapshotSource for ReplicaSnapshotSource {
    fn volume(&self) -> &str {
        &self.volume.name
    }

    fn snapshot(&self) -> &str {
        &self.snapshot
    }

    fn size(&self) -> u64 {
        self.size
    }

    async fn has_snapshot(&self, name: &str) -> Result<bool, SourceError> {
        let chain = self
            .volume
            .list_snapshots()
            .await
            .map_err(|e| SourceError::Other(e.to_string()))?;
        let pos = |n: &str| chain.iter().position(|s| s.name == n);
        Ok(matches!((pos(name), pos(&self.snapshot)), (Some(a), Some(b)) if a <= b))
    }

    async fn changed(
        &self,
        base: Option<&str>,
        offset: u64,
        len: u64,
    ) -> Result<Vec<Extent>, SourceError> {
        let mut out = Vec::new();
        let end = offset + len;
        let mut at = offset;
        while at < end {
            let n = MAX_EXTENT_WINDOW.min(end - at);
            let mut last = String::new();
            let mut got = None;
            for _ in 0..ATTEMPTS {
                let addr = self.source_addr()?;
                match control::changed_extents(
                    addr,
                    &self.volume.name,
                    base,
                    Some(&self.snapshot),
                    at,
                    n,
                    self.volume.options.control_timeout * 6,
                )
                .await
                {
                    Ok(e) => {
                        got = Some(e);
                        break;
                    }
                    Err(e) => last = format!("{addr}: {e}"),
                }
            }
            let extents = got.ok_or(SourceError::Other(last))?;
            out.extend(extents.into_iter().map(|e| Extent {
                offset: e.offset,
                len: e.length,
                kind: if e.data {
                    ExtentKind::Data
                } else {
                    ExtentKind::Zero
                },
            }));
            at += n;
        }
        Ok(out)
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, SourceError> {
        let mut last = String::new();
        for _ in 0..ATTEMPTS {
            let client = self.reader().await?;
            match client.read(offset, len).await {
                Ok(data) => return Ok(data),
                Err(e) => {
                    last = format!("{}: {e}", client.addr());
                    // Next try on a fresh connection, at the current epoch,
                    // to whichever replica is healthy then.
                    *self.reader.lock().await = None;
                }
            }
        }
        Err(SourceError::Other(format!(
            "reading snapshot {} at offset {offset}: {last}",
            self.snapshot
        )))
    }
}
