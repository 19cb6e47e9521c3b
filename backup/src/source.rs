//! Where backups read from and restores write to: the [`SnapshotSource`] and
//! [`RestoreSink`] traits.
//!
//! The controller implements both over the network (a replica's snapshot
//! reader and "ranges changed between two snapshots"; a volume being
//! filled); `file.rs` implements them over a raw image file, and the tests
//! over layered in-memory snapshots. The backup engine only ever sees these
//! traits, so it never knows whether data comes from a replica or a file.

use std::future::Future;

use bytes::Bytes;

/// What a changed range holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentKind {
    /// Bytes to read with [`SnapshotSource::read`].
    Data,
    /// Reads as zeros (trimmed or written with zeros); no need to read it.
    Zero,
}

/// One changed range of a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
    pub kind: ExtentKind,
}

/// An error from a source or a sink, with its own words (the backup layer
/// adds the volume, offset and operation).
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{op} at offset {offset}: {source}")]
    Io {
        op: &'static str,
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    /// The source cannot do what was asked (e.g. a file has no snapshots).
    #[error("{0}")]
    Unsupported(String),
    /// Any other failure (e.g. a gRPC status from the controller).
    #[error("{0}")]
    Other(String),
}

/// One snapshot of a volume, readable. Implemented by the controller (reading
/// a replica's snapshot over the network) and by a file/in-memory source in
/// tests.
pub trait SnapshotSource: Send + Sync {
    fn volume(&self) -> &str;
    fn snapshot(&self) -> &str;
    fn size(&self) -> u64;
    /// True if `name` is still a snapshot of this volume below/at this one
    /// (an incremental backup can use it as a base).
    fn has_snapshot(&self, name: &str) -> impl Future<Output = Result<bool, SourceError>> + Send;
    /// Extents of `[offset, offset+len)` that may differ between snapshot
    /// `base` (None: an empty volume) and this snapshot; Data extents hold
    /// data to read, Zero extents read as zeros. Ranges not returned are
    /// unchanged since `base` (or holes when base is None). The caller walks
    /// the volume in windows (1 GiB by default), so one reply stays small.
    fn changed(
        &self,
        base: Option<&str>,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = Result<Vec<Extent>, SourceError>> + Send;
    /// Reads `[offset, offset+len)` of this snapshot (len ≤ 32 MiB, 4 KiB
    /// aligned; the last read of a volume whose size is not a multiple of
    /// 4 KiB ends at the size).
    fn read(
        &self,
        offset: u64,
        len: u32,
    ) -> impl Future<Output = Result<Bytes, SourceError>> + Send;
}

/// Where a restore writes. A file (sparse) or a volume (through the
/// controller).
pub trait RestoreSink: Send + Sync {
    fn size(&self) -> u64;
    /// True if the sink is known to read all zeros (a new file/volume): zero
    /// ranges are then skipped, keeping the result sparse.
    fn starts_zeroed(&self) -> bool;
    fn write(
        &self,
        offset: u64,
        data: Bytes,
    ) -> impl Future<Output = Result<(), SourceError>> + Send;
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = Result<(), SourceError>> + Send;
    fn flush(&self) -> impl Future<Output = Result<(), SourceError>> + Send;
}
