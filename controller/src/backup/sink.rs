//! [`VolumeSink`]: a restore written into the volume through the
//! replicator, exactly like client writes (every healthy replica, range
//! locked, quorum), then flushed.

use std::sync::Arc;

use bytes::Bytes;
use strata_backup::{RestoreSink, SourceError};
use strata_replica::Allocation;

use super::JobError;
use crate::replicator::Volume;

/// Largest range one zeroing call covers.
const ZERO_STEP: u64 = 1 << 30;

pub struct VolumeSink {
    volume: Arc<Volume>,
    zeroed: bool,
}

impl VolumeSink {
    /// A sink over the volume; finds out whether it holds any data (a new
    /// volume holds none: zero ranges are then skipped).
    pub async fn open(volume: &Arc<Volume>) -> Result<Self, JobError> {
        let mut zeroed = true;
        let mut at = 0;
        while at < volume.size() && zeroed {
            let n = ZERO_STEP.min(volume.size() - at);
            let extents = volume.block_status(at, n as u32).await?;
            zeroed = extents.iter().all(|e| e.kind == Allocation::Hole);
            at += n;
        }
        Ok(VolumeSink {
            volume: volume.clone(),
            zeroed,
        })
    }
}

fn err(e: impl std::fmt::Display) -> SourceError {
    SourceError::Other(e.to_string())
}

impl RestoreSink for VolumeSink {
    fn size(&self) -> u64 {
        self.volume.size()
    }

    fn starts_zeroed(&self) -> bool {
        self.zeroed
    }

    async fn write(&self, offset: u64, data: Bytes) -> Result<(), SourceError> {
        self.volume.write(offset, data, false).await.map_err(err)
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), SourceError> {
        let mut at = offset;
        while at < offset + len {
            let n = ZERO_STEP.min(offset + len - at);
            self.volume
                .write_zeroes(at, n as u32, true, false)
                .await
                .map_err(err)?;
            at += n;
        }
        Ok(())
    }

    async fn flush(&self) -> Result<(), SourceError> {
        self.volume.flush().await.map_err(err)
    }
}
