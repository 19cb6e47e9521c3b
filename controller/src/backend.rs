//! [`VolumeBackend`]: the NBD frontend's [`Backend`] trait implemented by
//! the replicator, mapping replicator errors to protocol errors.

use std::future::Future;
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
        VolumeError::Invalid { .. } => BackendError::Invalid(e.to_string()),
        VolumeError::BelowQuorum { .. } | VolumeError::NoReplica { .. } => BackendError::Io(e.to_string()),
    }
}

impl Backend for VolumeBackend {
    fn size(&self) -> u64 {
        self.volume.size
    }

    fn export_name(&self) -> &str {
        &self.volume.name
    }

    fn read(&self, offset: u64, len: u32) -> impl Future<Output = Result<Bytes, BackendError>> + Send {
        async move { self.volume.read(offset, len).await.map_err(map_err) }
    }

    fn write(&self, offset: u64, data: Bytes, fua: bool) -> impl Future<Output = Result<(), BackendError>> + Send {
        async move { self.volume.write(offset, data, fua).await.map_err(map_err) }
    }

    fn flush(&self) -> impl Future<Output = Result<(), BackendError>> + Send {
        async move { self.volume.flush().await.map_err(map_err) }
    }

    fn trim(&self, offset: u64, len: u32) -> impl Future<Output = Result<(), BackendError>> + Send {
        async move { self.volume.trim(offset, len).await.map_err(map_err) }
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        may_punch: bool,
        fua: bool,
    ) -> impl Future<Output = Result<(), BackendError>> + Send {
        async move { self.volume.write_zeroes(offset, len, may_punch, fua).await.map_err(map_err) }
    }

    fn block_status(&self, offset: u64, len: u32) -> impl Future<Output = Result<Vec<AllocationExtent>, BackendError>> + Send {
        async move { self.volume.block_status(offset, len).await.map_err(map_err) }
    }
}
