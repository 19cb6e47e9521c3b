//! [`VolumeBackend`]: the NBD frontend's [`Backend`] trait implemented by
//! the replicator, mapping replicator errors to protocol errors.

use std::sync::Arc;

use bytes::Bytes;
use strata_replica::AllocationExtent;

use crate::frontend::{Backend, BackendError};
use crate::replicator::{Volume, VolumeError};

pub struct VolumeBackend {
    volume: Arc<Volume>,
}

impl VolumeBackend {
    pub fn new(volume: Arc<Volume>) -> Self {
        VolumeBackend { volume }
    }
}

fn map_err(e: VolumeError) -> BackendError {
    tracing::debug!("request failed: {e}");
    match e {
        VolumeError::Invalid { .. }
        | VolumeError::Snapshot { .. }
        | VolumeError::NotAReplica { .. }
        | VolumeError::WouldLoseQuorum { .. }
        | VolumeError::Resize { .. } => BackendError::Invalid(e.to_string()),
        VolumeError::BelowQuorum { .. } => BackendError::BelowQuorum(e.to_string()),
        VolumeError::Fenced { .. } => BackendError::Fenced(e.to_string()),
        VolumeError::NoReplica { .. } => BackendError::Io(e.to_string()),
    }
}

impl Backend for VolumeBackend {
    fn size(&self) -> u64 {
        self.volume.size()
    }

    fn volume_name(&self) -> &str {
        &self.volume.name
    }

    fn handles_unaligned(&self) -> bool {
        true
    }

    fn client_attached(&self, attached: bool) {
        use std::sync::atomic::Ordering;
        if attached {
            self.volume.attached.fetch_add(1, Ordering::Relaxed);
        } else {
            self.volume.attached.fetch_sub(1, Ordering::Relaxed);
        }
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, BackendError> {
        self.volume.read(offset, len).await.map_err(map_err)
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), BackendError> {
        self.volume.write(offset, data, fua).await.map_err(map_err)
    }

    async fn flush(&self) -> Result<(), BackendError> {
        self.volume.flush().await.map_err(map_err)
    }

    async fn trim(&self, offset: u64, len: u32) -> Result<(), BackendError> {
        self.volume.trim(offset, len).await.map_err(map_err)
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        may_punch: bool,
        fua: bool,
    ) -> Result<(), BackendError> {
        self.volume
            .write_zeroes(offset, len, may_punch, fua)
            .await
            .map_err(map_err)
    }

    async fn block_status(
        &self,
        offset: u64,
        len: u32,
    ) -> Result<Vec<AllocationExtent>, BackendError> {
        self.volume.block_status(offset, len).await.map_err(map_err)
    }
}
