//! `strata-backup`: incremental, deduplicated, optionally encrypted backups
//! of strata volumes to S3 or a directory, and restores from them.
//!
//! Data comes from a [`SnapshotSource`] (the controller reads a replica's
//! snapshot and "ranges changed between two snapshots"; [`FileSource`]
//! reads a raw image) and goes to a [`Target`] (`s3://bucket/prefix` through
//! the AWS SDK, or `file:///dir`); restores write to a [`RestoreSink`] (a
//! volume through the controller, or a sparse [`FileSink`]).
//!
//! Design, in the order data flows (each module says more):
//! - **Chunks** (`backup.rs`): the volume is cut into fixed, aligned chunks
//!   (1 MiB by default, per target). Block devices do not shift data the way
//!   files in an archive do, so content-defined boundaries would find no
//!   more duplicates, would cost a rolling hash over every byte, and would
//!   not line up with the changed ranges a snapshot reports (an incremental
//!   backup would have to read around every change to find the boundaries
//!   again). Aligned chunks let an incremental backup read exactly the
//!   chunks a change touches. 1 MiB keeps the incremental overhead of small
//!   scattered writes low and the chunks in flight small (see the chunk size
//!   figures in `backup/README.md`).
//! - **Names and dedup** (`envelope.rs`, `target.rs`): a chunk is named by
//!   a keyed BLAKE3 hash of its plaintext; the key is per target (random in
//!   `config`, or derived from the user's key), so every volume backed up to
//!   one target deduplicates against every other, and names reveal nothing.
//! - **Objects** (`envelope.rs`, `xchacha.rs`): zstd, then XChaCha20-Poly1305 when a key
//!   is configured, or a keyed checksum when not; the object's name is
//!   authenticated with it.
//! - **Packs** (`pack.rs`): new chunks are stored about 8 MiB to an object,
//!   with pack indexes saying where each lies, so a backup and a restore
//!   make one request per several MiB, not one per chunk.
//! - **Manifests and index pages** (`format.rs`): one content-addressed
//!   page per 1 GiB window lists the window's chunks; the manifest (volume,
//!   size, snapshot, parent, page list) is written last.
//! - **Restore and verify** (`restore.rs`): every chunk's tag and hash are
//!   checked before it is written; zero ranges are skipped on a new file.
//! - **Retention and gc** (`admin.rs`, `locks.rs`, `schedule.rs`): forget
//!   drops manifests; gc marks from manifests and index pages and sweeps by
//!   listing; locks keep it from deleting beside a running backup.
//! - **Progress** (`progress.rs`): a bar on a terminal, log lines otherwise.
//!
//! Memory: about `parallel × 2 × chunk_size` for the chunks in flight, two
//! packs and two index pages (≈ 32 MiB with the defaults: 8 × 2 × 1 MiB +
//! 2 × 8 MiB), whatever the volume size, plus the chunk index of the target
//! (about 60 bytes per chunk stored, `pack.rs`).

mod admin;
mod backup;
mod envelope;
mod error;
mod file;
pub mod format;
mod locks;
mod malloc;
mod pack;
pub mod progress;
mod restore;
mod schedule;
pub mod source;
pub mod store;
mod target;
pub mod timing;
mod xchacha;

pub use admin::{forget, gc, list, remove, show, BackupInfo, ForgetReport, GcOptions, GcReport};
pub use backup::{create_backup, BackupOptions, BackupSummary};
pub use envelope::ObjectId;
pub use error::{BackupError, Result};
pub use file::{FileSink, FileSource};
pub use format::BackupStats;
pub use malloc::limit_malloc_arenas;
pub use progress::{LogProgress, NoProgress, Progress, TerminalProgress};
pub use restore::{restore, verify, RestoreSummary, VerifyReport};
pub use schedule::{BackupSchedule, Retention};
pub use source::{Extent, ExtentKind, RestoreSink, SnapshotSource, SourceError};
pub use store::S3Options;
pub use target::{load_key, Target, TargetConfig, TargetOptions, KEY_ENV};
