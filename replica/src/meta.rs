//! The replica's metadata file, `volume.meta`: what the volume is (id, size,
//! block size), which layers form its chain, the fencing epoch, and whether
//! the last stop was clean.
//!
//! On disk: a 24-byte header, then a JSON body.
//!
//! | bytes | field |
//! |---|---|
//! | 0..8 | magic `STRATAMD` |
//! | 8..12 | format version (u32 LE), currently 1 |
//! | 12..16 | body length (u32 LE) |
//! | 16..20 | crc32 of the body (u32 LE) |
//! | 20..24 | crc32 of bytes 0..20 (u32 LE) |
//!
//! Every update is crash-safe: the new file is written to `volume.meta.tmp`,
//! fsynced, renamed over `volume.meta`, and the directory is fsynced. A crash
//! at any point leaves either the old or the new file in place; a stray
//! `.tmp` is ignored and removed at open.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Result, StoreError};
use crate::failpoint::FailPoints;

pub const META_FILE: &str = "volume.meta";
pub const META_TMP: &str = "volume.meta.tmp";
const MAGIC: &[u8; 8] = b"STRATAMD";
const VERSION: u32 = 1;
const HEADER_LEN: usize = 24;
/// Metadata bodies are small (a layer chain); refuse anything absurd before
/// allocating for it.
const MAX_BODY: usize = 16 << 20;

/// The volume's persisted description.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeMeta {
    /// Identifies the volume across all its replicas.
    pub volume_id: String,
    /// Identifies this replica's history: a new one is drawn whenever the
    /// replica is created empty, so a wiped replica never passes for a
    /// returning one.
    pub lineage: String,
    pub size: u64,
    pub block_size: u32,
    /// Fencing epoch: data requests from an older epoch are refused.
    pub epoch: u64,
    /// True only after a clean close (everything flushed).
    pub clean: bool,
    /// The last stop drained every request but its flush did not finish in
    /// time; the rest was in the page cache (`Store::close_within`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stopped_unflushed: bool,
    /// Set by a controller while this replica is being resynced or rebuilt:
    /// its data is not complete, so it must never be chosen as a source.
    #[serde(default)]
    pub incomplete: bool,
    /// The controller instance that set `epoch`: an epoch value belongs to
    /// one controller, so two controllers can never share one.
    #[serde(default)]
    pub epoch_owner: String,
    /// The machine's boot id when the store was last opened: after an
    /// unclean stop, another boot id means the page cache was lost.
    #[serde(default)]
    pub boot_id: String,
    pub next_layer_id: u64,
    /// Oldest first; the last entry is the writable head.
    pub layers: Vec<LayerMeta>,
}

/// One layer of the chain. Snapshots carry a name; the head does not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerMeta {
    pub id: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<SnapshotMeta>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    pub name: String,
    /// Seconds since the Unix epoch.
    pub created: u64,
    /// The volume's size when the snapshot was taken. Absent in snapshots
    /// written before volumes could grow: those have the volume's size
    /// until its first expansion, which writes it in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
}

/// Serialises metadata with its header.
pub fn encode(meta: &VolumeMeta) -> Vec<u8> {
    let body = serde_json::to_vec_pretty(meta).expect("metadata always serialises");
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    let header_crc = crc32fast::hash(&out[..20]);
    out.extend_from_slice(&header_crc.to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// Parses and validates metadata bytes; `path` only names the file in errors.
pub fn decode(bytes: &[u8], path: &Path) -> Result<VolumeMeta> {
    let corrupt = |reason: String| StoreError::CorruptMeta {
        path: path.to_path_buf(),
        reason,
    };
    if bytes.len() < HEADER_LEN {
        return Err(corrupt(format!(
            "file is {} bytes, shorter than the header",
            bytes.len()
        )));
    }
    if &bytes[..8] != MAGIC {
        return Err(corrupt("bad magic (not a strata metadata file)".into()));
    }
    let u32_at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().expect("4 bytes"));
    if crc32fast::hash(&bytes[..20]) != u32_at(20) {
        return Err(corrupt("header checksum mismatch".into()));
    }
    let version = u32_at(8);
    if version != VERSION {
        return Err(corrupt(format!(
            "unsupported format version {version} (this build reads {VERSION})"
        )));
    }
    let len = u32_at(12) as usize;
    if len > MAX_BODY || bytes.len() != HEADER_LEN + len {
        return Err(corrupt(format!(
            "body length {len} does not match the file size {}",
            bytes.len()
        )));
    }
    let body = &bytes[HEADER_LEN..];
    if crc32fast::hash(body) != u32_at(16) {
        return Err(corrupt("body checksum mismatch".into()));
    }
    let meta: VolumeMeta =
        serde_json::from_slice(body).map_err(|e| corrupt(format!("body does not parse: {e}")))?;
    validate(&meta).map_err(corrupt)?;
    Ok(meta)
}

fn validate(meta: &VolumeMeta) -> std::result::Result<(), String> {
    if meta.block_size != crate::BLOCK_SIZE as u32 {
        return Err(format!(
            "block size {} is not {}",
            meta.block_size,
            crate::BLOCK_SIZE
        ));
    }
    if !meta.size.is_multiple_of(crate::BLOCK_SIZE) {
        return Err(format!(
            "size {} is not a multiple of the block size",
            meta.size
        ));
    }
    let Some(head) = meta.layers.last() else {
        return Err("the layer chain is empty".into());
    };
    if head.snapshot.is_some() {
        return Err("the head layer is named as a snapshot".into());
    }
    let mut ids = std::collections::HashSet::new();
    let mut names = std::collections::HashSet::new();
    for layer in &meta.layers {
        if layer.id >= meta.next_layer_id || !ids.insert(layer.id) {
            return Err(format!(
                "layer id {} is duplicated or not below next_layer_id",
                layer.id
            ));
        }
        if let Some(snap) = &layer.snapshot {
            if !names.insert(snap.name.clone()) {
                return Err(format!("snapshot name {:?} is duplicated", snap.name));
            }
        }
    }
    Ok(())
}

/// Reads `dir/volume.meta`.
pub fn read(dir: &Path) -> Result<VolumeMeta> {
    let path = dir.join(META_FILE);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(StoreError::NotFound(dir.to_path_buf()))
        }
        Err(e) => return Err(StoreError::io("read", path, 0, e)),
    };
    decode(&bytes, &path)
}

/// Replaces `dir/volume.meta` atomically and durably.
pub fn write(dir: &Path, meta: &VolumeMeta, fail: &FailPoints) -> Result<()> {
    let tmp: PathBuf = dir.join(META_TMP);
    let path = dir.join(META_FILE);
    let bytes = encode(meta);
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(|e| StoreError::io("create", &tmp, 0, e))?;
    f.write_all(&bytes)
        .map_err(|e| StoreError::io("write", &tmp, 0, e))?;
    fail.check("meta.tmp_written")?;
    f.sync_all()
        .map_err(|e| StoreError::io("fsync", &tmp, 0, e))?;
    drop(f);
    fail.check("meta.tmp_synced")?;
    fs::rename(&tmp, &path).map_err(|e| StoreError::io("rename", &tmp, 0, e))?;
    fail.check("meta.renamed")?;
    sync_dir(dir)
}

/// fsyncs a directory so a rename or create in it is durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StoreError::io("fsync directory", dir, 0, e))
}

/// This boot of the machine (`/proc/sys/kernel/random/boot_id`), or
/// `STRATA_BOOT_ID` when set (tests simulate a machine restart with it).
/// Empty if neither is available: every unclean stop then counts as a
/// restart, the safe side.
pub fn boot_id() -> String {
    if let Ok(id) = std::env::var("STRATA_BOOT_ID") {
        return id;
    }
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> VolumeMeta {
        VolumeMeta {
            volume_id: "vol-1".into(),
            lineage: "abc".into(),
            size: 1 << 30,
            block_size: 4096,
            epoch: 7,
            clean: true,
            stopped_unflushed: false,
            incomplete: false,
            boot_id: String::new(),
            epoch_owner: String::new(),
            next_layer_id: 3,
            layers: vec![
                LayerMeta {
                    id: 1,
                    snapshot: Some(SnapshotMeta {
                        name: "s1".into(),
                        created: 1,
                        size: None,
                    }),
                },
                LayerMeta {
                    id: 2,
                    snapshot: None,
                },
            ],
        }
    }

    #[test]
    fn round_trips() {
        let m = sample();
        assert_eq!(decode(&encode(&m), Path::new("x")).unwrap(), m);
    }

    #[test]
    fn every_flipped_byte_is_caught() {
        let bytes = encode(&sample());
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x40;
            let err = decode(&b, Path::new("x")).expect_err("a flipped byte must not decode");
            assert!(
                matches!(err, StoreError::CorruptMeta { .. }),
                "byte {i}: {err}"
            );
        }
    }

    #[test]
    fn every_truncation_is_caught() {
        let bytes = encode(&sample());
        for len in 0..bytes.len() {
            assert!(
                decode(&bytes[..len], Path::new("x")).is_err(),
                "truncated to {len}"
            );
        }
    }

    #[test]
    fn inconsistent_chains_are_refused() {
        let mut m = sample();
        m.layers[1].snapshot = m.layers[0].snapshot.clone();
        assert!(decode(&encode(&m), Path::new("x")).is_err());
        let mut m = sample();
        m.layers.clear();
        assert!(decode(&encode(&m), Path::new("x")).is_err());
        let mut m = sample();
        m.next_layer_id = 2;
        assert!(decode(&encode(&m), Path::new("x")).is_err());
    }
}
