//! `strata-backup`: backups of volumes to S3 or a directory (not built yet).
//!
//! It will own backup targets (`s3://bucket/prefix`, `file:///dir`), the
//! content-addressed chunk store (chunks named by a keyed hash, compressed,
//! optionally encrypted, deduplicated across every volume of a target),
//! per-backup manifests written last, restore with verification of every
//! chunk, retention and garbage collection, and schedules. Its data comes
//! from a replica's snapshot reader and "ranges changed between two
//! snapshots" (`strata_replica::Store::read_view` and `changed_ranges`,
//! already built) and goes to the target.
