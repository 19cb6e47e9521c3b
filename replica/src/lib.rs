//! `strata-replica`: one node's copy of a volume, and (later) the server
//! that hosts many of them.
//!
//! Data comes in from the controller over the data wire and lands in a
//! [`Store`]: a directory of layered sparse files (a writable head over
//! read-only snapshots), a per-4 KiB-block crc32 beside each layer, and
//! crash-safe metadata. Data goes out to the controller (reads, rebuild
//! sources) and to the backup module (snapshot readers, changed ranges).
//!
//! Where to start reading:
//! - [`store`]: the operations (`data.rs` for IO, `chain.rs` for snapshots);
//! - [`layer`]: the on-disk format of one layer; [`meta`]: `volume.meta`;
//! - [`extent`]: the in-memory index (memory O(extents));
//! - [`engine`]: pread/pwrite and io_uring behind one trait;
//! - [`auth`]: the cluster key, the handshake and the authenticated
//!   records that the replica port (data wire and gRPC) runs in when a key
//!   is set.

pub mod auth;
pub mod client;
pub mod control;
pub mod engine;
pub mod error;
pub mod extent;
pub mod failpoint;
pub mod host;
pub mod layer;
pub mod meta;
pub mod node;
pub mod server;
pub mod store;
#[cfg(any(test, feature = "test-support"))]
pub mod testing;
pub mod wire;

pub use error::{error_chain, Result, StoreError};
pub use store::{
    valid_snapshot_name, Allocation, AllocationExtent, CreateOptions, OpenReport, SnapshotInfo,
    Store, StoreInfo, View, WritebackConfig, WritebackStats,
};

/// The block size of every volume: the unit of checksums, alignment and
/// extent maps.
pub const BLOCK_SIZE: u64 = 4096;
