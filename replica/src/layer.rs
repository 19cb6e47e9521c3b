//! One layer of the chain on disk: a sparse data file addressed by volume
//! offset (`layer-<id>.data`) and its block map (`layer-<id>.map`).
//!
//! The block map holds one 8-byte little-endian entry per 4 KiB block, at
//! `block * 8`; it is sparse too, so it costs disk only where the layer was
//! written. An entry is
//!
//! | bits | meaning |
//! |---|---|
//! | 0..32 | crc32 of the block's 4 KiB (data entries) |
//! | 32..48 | kind: 1 = data, 2 = zero (a trimmed block that must read as zeros even if a lower layer has data) |
//! | 48..64 | tag `0x5A17`, so garbage is told apart from an entry |
//!
//! An all-zero entry means "this layer holds nothing here; look below". The
//! in-memory extent map of a layer is rebuilt at open by scanning only the
//! allocated parts of the block map (`SEEK_DATA`/`SEEK_HOLE`).

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use crate::error::{Result, StoreError};
use crate::extent::RangeMap;

pub const ENTRY_LEN: u64 = 8;
const TAG: u64 = 0x5A17 << 48;
const KIND_DATA: u64 = 1 << 32;
const KIND_ZERO: u64 = 2 << 32;

/// What a layer holds for a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKind {
    /// Data in this layer's data file, checksummed.
    Data,
    /// Zeros that hide whatever lower layers hold.
    Zero,
}

/// A decoded block-map entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapEntry {
    Absent,
    Data { crc: u32 },
    Zero,
}

impl MapEntry {
    pub fn encode(self) -> u64 {
        match self {
            MapEntry::Absent => 0,
            MapEntry::Data { crc } => TAG | KIND_DATA | crc as u64,
            MapEntry::Zero => TAG | KIND_ZERO,
        }
    }

    pub fn decode(raw: u64) -> std::result::Result<Self, String> {
        if raw == 0 {
            return Ok(MapEntry::Absent);
        }
        if raw & (0xFFFF << 48) != TAG {
            return Err(format!("entry {raw:#018x} lacks the block-map tag"));
        }
        match raw & (0xFFFF << 32) {
            KIND_DATA => Ok(MapEntry::Data { crc: raw as u32 }),
            KIND_ZERO if raw as u32 == 0 => Ok(MapEntry::Zero),
            _ => Err(format!("entry {raw:#018x} has an unknown kind")),
        }
    }

    pub fn from_bytes(b: &[u8]) -> u64 {
        u64::from_le_bytes(b[..8].try_into().expect("8-byte entry"))
    }
}

pub fn data_file_name(id: u64) -> String {
    format!("layer-{id:06}.data")
}

pub fn map_file_name(id: u64) -> String {
    format!("layer-{id:06}.map")
}

/// Parses `layer-<id>.data` / `layer-<id>.map` back into an id.
pub fn parse_file_name(name: &str) -> Option<u64> {
    let rest = name.strip_prefix("layer-")?;
    let (id, ext) = rest.split_once('.')?;
    if ext != "data" && ext != "map" {
        return None;
    }
    id.parse().ok()
}

/// The open files of one layer.
#[derive(Debug)]
pub struct LayerFiles {
    pub id: u64,
    pub data: File,
    pub map: File,
    pub data_path: PathBuf,
    pub map_path: PathBuf,
}

impl LayerFiles {
    pub fn open(dir: &Path, id: u64, create: bool) -> Result<Self> {
        let data_path = dir.join(data_file_name(id));
        let map_path = dir.join(map_file_name(id));
        let open = |p: &Path| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(create)
                .truncate(create)
                .open(p)
                .map_err(|e| StoreError::io(if create { "create" } else { "open" }, p, 0, e))
        };
        Ok(LayerFiles {
            id,
            data: open(&data_path)?,
            map: open(&map_path)?,
            data_path,
            map_path,
        })
    }

    /// Bytes the data and map files actually occupy on disk.
    pub fn allocated_bytes(&self) -> Result<u64> {
        use std::os::unix::fs::MetadataExt;
        let mut total = 0;
        for (f, p) in [(&self.data, &self.data_path), (&self.map, &self.map_path)] {
            let m = f.metadata().map_err(|e| StoreError::io("stat", p, 0, e))?;
            total += m.blocks() * 512;
        }
        Ok(total)
    }

    /// Rebuilds this layer's extents from its block map, reading only the
    /// map's allocated regions. `blocks` bounds the scan (the volume size).
    pub fn scan_extents(&self, blocks: u64) -> Result<RangeMap<BlockKind>> {
        let mut extents = RangeMap::new();
        let map_len = self
            .map
            .metadata()
            .map_err(|e| StoreError::io("stat", &self.map_path, 0, e))?
            .len()
            .min(blocks * ENTRY_LEN);
        let mut buf = vec![0u8; 1 << 20];
        let mut pos = 0u64;
        // Open run being accumulated: (start block, end block, kind).
        let mut run: Option<(u64, u64, BlockKind)> = None;
        while pos < map_len {
            let (data_start, data_end) = match next_data_region(&self.map, pos, map_len) {
                Some(r) => r,
                None => break,
            };
            let mut off = data_start - data_start % ENTRY_LEN;
            while off < data_end {
                let n = ((data_end - off) as usize).min(buf.len());
                let n = n - n % ENTRY_LEN as usize;
                let n = n.max(ENTRY_LEN as usize);
                crate::engine::read_full_at(&self.map, &mut buf[..n], off)
                    .map_err(|e| StoreError::io("read", &self.map_path, off, e))?;
                for (i, chunk) in buf[..n].chunks_exact(ENTRY_LEN as usize).enumerate() {
                    let block = off / ENTRY_LEN + i as u64;
                    if block >= blocks {
                        break;
                    }
                    let entry =
                        MapEntry::decode(MapEntry::from_bytes(chunk)).map_err(|reason| {
                            StoreError::CorruptMap {
                                path: self.map_path.clone(),
                                block,
                                reason,
                            }
                        })?;
                    let kind = match entry {
                        MapEntry::Absent => None,
                        MapEntry::Data { .. } => Some(BlockKind::Data),
                        MapEntry::Zero => Some(BlockKind::Zero),
                    };
                    match (run, kind) {
                        (Some((s, e, k)), Some(kind)) if e == block && k == kind => {
                            run = Some((s, e + 1, k))
                        }
                        (prev, kind) => {
                            if let Some((s, e, k)) = prev {
                                extents.set(s, e, k);
                            }
                            run = kind.map(|k| (block, block + 1, k));
                        }
                    }
                }
                off += n as u64;
            }
            pos = data_end;
        }
        if let Some((s, e, k)) = run {
            extents.set(s, e, k);
        }
        Ok(extents)
    }
}

/// The next allocated region of `file` at or after `pos`, as `[start, end)`
/// clipped to `limit`. Filesystems without SEEK_DATA report the whole file.
fn next_data_region(file: &File, pos: u64, limit: u64) -> Option<(u64, u64)> {
    let fd = file.as_raw_fd();
    // SAFETY: lseek only reads its integer arguments.
    let start = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
    if start < 0 {
        let err = std::io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::ENXIO) => None, // no data after pos
            _ => Some((pos, limit)),   // SEEK_DATA unsupported: scan everything
        };
    }
    let start = start as u64;
    if start >= limit {
        return None;
    }
    // SAFETY: as above.
    let end = unsafe { libc::lseek(fd, start as libc::off_t, libc::SEEK_HOLE) };
    let end = if end < 0 {
        limit
    } else {
        (end as u64).min(limit)
    };
    Some((start, end.max(start + 1).min(limit)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_garbage_is_refused() {
        for e in [
            MapEntry::Absent,
            MapEntry::Zero,
            MapEntry::Data { crc: 0 },
            MapEntry::Data { crc: u32::MAX },
        ] {
            assert_eq!(MapEntry::decode(e.encode()).unwrap(), e);
        }
        assert!(MapEntry::decode(0x1234).is_err());
        assert!(MapEntry::decode(TAG | (7 << 32)).is_err());
        assert!(MapEntry::decode(TAG | KIND_ZERO | 5).is_err());
    }

    #[test]
    fn file_names_parse_back() {
        assert_eq!(parse_file_name(&data_file_name(42)), Some(42));
        assert_eq!(parse_file_name(&map_file_name(7)), Some(7));
        assert_eq!(parse_file_name("volume.meta"), None);
        assert_eq!(parse_file_name("layer-x.data"), None);
    }
}
