//! The check every read makes before its data leaves the store: each
//! block read from a layer against the crc32 its block map holds.

use super::data::Segment;
use super::{Source, State};
use crate::error::StoreError;
use crate::layer::MapEntry;

const BS: usize = crate::BLOCK_SIZE as usize;

/// A block whose data does not match its block map.
pub(super) struct BadBlock {
    /// The layer's position in the chain.
    pub pos: usize,
    pub block: u64,
    pub fault: BlockFault,
}

impl BadBlock {
    /// The error a read reports for it.
    pub fn into_error(self, st: &State) -> StoreError {
        match self.fault {
            BlockFault::Corrupt(reason) => StoreError::CorruptMap {
                path: st.layers[self.pos].map_path.clone(),
                block: self.block,
                reason,
            },
            BlockFault::Mismatch { stored, computed } => StoreError::Checksum {
                layer: st.layers[self.pos].id,
                offset: self.block * crate::BLOCK_SIZE,
                stored,
                computed,
            },
        }
    }
}

pub(super) enum BlockFault {
    /// The map entry does not decode.
    Corrupt(String),
    /// The data's crc32 is not the one the map holds.
    Mismatch { stored: u32, computed: u32 },
}

/// Checks every block read from a layer (`buf` covers `segments` from
/// block `b0`) against its map entry (`entries`, the layers' entries for
/// those blocks in order): the first that fails, or `None`.
pub(super) fn check_blocks(
    segments: &[Segment],
    b0: u64,
    buf: &[u8],
    entries: &[u8],
) -> Option<BadBlock> {
    let mut ent_off = 0usize;
    for &(s, e, src) in segments {
        let Some(Source::Layer(pos)) = src else {
            continue;
        };
        let pos = pos as usize;
        for block in s..e {
            let raw = MapEntry::from_bytes(&entries[ent_off..ent_off + 8]);
            ent_off += 8;
            let at = ((block - b0) as usize) * BS;
            let computed = crc32fast::hash(&buf[at..at + BS]);
            let stored = match MapEntry::decode(raw) {
                Ok(MapEntry::Data { crc }) => crc,
                Ok(_) => !computed, // the map no longer says data: raced a trim
                Err(reason) => {
                    return Some(BadBlock {
                        pos,
                        block,
                        fault: BlockFault::Corrupt(reason),
                    })
                }
            };
            if stored != computed {
                return Some(BadBlock {
                    pos,
                    block,
                    fault: BlockFault::Mismatch { stored, computed },
                });
            }
        }
    }
    None
}
