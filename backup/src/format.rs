//! The two metadata encodings: a backup's manifest and its chunk-index
//! pages. Pure functions over bytes, no IO; every decode checks lengths
//! before it allocates, so hostile input gets an error, never a panic or an
//! allocation larger than the input (see `backup/fuzz`).
//!
//! A volume is cut into fixed, aligned chunks of `chunk_size` bytes (the
//! last one may be shorter). Chunks are grouped `page_chunks` at a time into
//! index pages, one per window of the volume (1 GiB with the defaults). A
//! page lists, for each of its chunks, either "zero" (a hole or all zeros:
//! nothing stored) or the id of the chunk object. Pages are stored as
//! content-addressed objects like chunks, so an incremental backup shares
//! every page of a window that did not change. The manifest names the
//! pages, so it stays small (33 bytes per GiB of volume) and neither backup
//! nor restore ever holds more than one page per window in memory.
//!
//! Manifest (little-endian):
//! ```text
//! "STMF" version(1)
//! str id, str volume, str snapshot, u8 has_parent [str parent]
//! i64 created (Unix milliseconds)
//! u64 size, u32 chunk_size, u32 page_chunks
//! u64 data_bytes, bytes_read, bytes_uploaded, chunks_new, chunks_reused, duration_ms
//! u64 page count (must match size), then per page: u8 0 (all zero) | u8 1 + 32-byte id
//! ```
//! where `str` is a u16 length and UTF-8 bytes (at most 1024).
//!
//! Index page: `"STIX" version(1) u64 first_chunk u32 count`, then per
//! chunk `u8 0` (zero) or `u8 1` + 32-byte id.
//!
//! Pack index (where chunks lie inside packs, `pack.rs`):
//! `"STPX" version(1) u32 packs`, then per pack its 32-byte id, `u32
//! count` and per chunk its 32-byte id, `u32 offset` and `u32 length` of
//! its sealed blob in the pack.

use crate::envelope::ObjectId;

const MANIFEST_MAGIC: &[u8; 4] = b"STMF";
const PAGE_MAGIC: &[u8; 4] = b"STIX";
const PACK_INDEX_MAGIC: &[u8; 4] = b"STPX";
const VERSION: u8 = 1;
const MAX_STR: usize = 1024;
/// Most chunks one index page may list.
pub const MAX_PAGE_CHUNKS: u32 = 65536;
/// Smallest and largest chunk sizes a target may use.
pub const MIN_CHUNK: u32 = 64 << 10;
pub const MAX_CHUNK: u32 = 16 << 20;
/// Largest volume a manifest may describe (1 PiB).
pub const MAX_SIZE: u64 = 1 << 50;
/// Largest encoded index page.
pub const MAX_PAGE_BYTES: usize = 17 + MAX_PAGE_CHUNKS as usize * 33;
/// Most chunks one pack index object may list.
pub const MAX_PACK_INDEX_CHUNKS: usize = 1 << 16;
/// Largest encoded pack index object.
pub const MAX_PACK_INDEX_BYTES: usize = 9 + MAX_PACK_INDEX_CHUNKS * (36 + 40);
/// Largest encoded manifest (a 1 PiB volume with 1 GiB pages is 33 MiB).
pub const MAX_MANIFEST_BYTES: usize = 64 << 20;

/// One chunk of a page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// A hole or all zeros: no object.
    Zero,
    /// The chunk object with this id.
    Data(ObjectId),
}

/// The chunk map of one window of the volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexPage {
    /// Index (not offset) of the first chunk listed.
    pub first_chunk: u64,
    pub entries: Vec<Entry>,
}

/// Where one chunk's sealed blob lies in its pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackEntry {
    pub chunk: ObjectId,
    pub offset: u32,
    pub len: u32,
}

/// A pack index object: for each pack it covers, where its chunks lie.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PackIndex {
    pub packs: Vec<(ObjectId, Vec<PackEntry>)>,
}

/// Counters kept with each backup.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct BackupStats {
    /// Bytes of the volume held by data chunks (what a restore writes).
    pub data_bytes: u64,
    /// Bytes read from the snapshot.
    pub bytes_read: u64,
    /// Bytes of objects uploaded (after compression and encryption).
    pub bytes_uploaded: u64,
    /// Chunks uploaded by this backup.
    pub chunks_new: u64,
    /// Chunks read but already in the target (any volume's).
    pub chunks_reused: u64,
    pub duration_ms: u64,
}

/// One complete backup: written last, so a backup exists only once all its
/// chunks and pages do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub id: String,
    pub volume: String,
    pub snapshot: String,
    /// The backup whose chunk map this one started from (incremental).
    pub parent: Option<String>,
    /// Unix milliseconds.
    pub created: i64,
    pub size: u64,
    pub chunk_size: u32,
    pub page_chunks: u32,
    pub stats: BackupStats,
    /// One per window; None: the window is all zero.
    pub pages: Vec<Option<ObjectId>>,
}

/// Why bytes do not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct FormatError(pub String);

fn err<T>(s: impl Into<String>) -> Result<T, FormatError> {
    Err(FormatError(s.into()))
}

/// Checks chunk geometry and returns (chunks, pages) for a volume size.
pub fn geometry(size: u64, chunk_size: u32, page_chunks: u32) -> Result<(u64, u64), FormatError> {
    if !chunk_size.is_power_of_two() || !(MIN_CHUNK..=MAX_CHUNK).contains(&chunk_size) {
        return err(format!(
            "chunk size {chunk_size} is not a power of two in 64 KiB..16 MiB"
        ));
    }
    if page_chunks == 0 || page_chunks > MAX_PAGE_CHUNKS {
        return err(format!("{page_chunks} chunks per page is out of range"));
    }
    if size > MAX_SIZE {
        return err(format!("volume size {size} is larger than 1 PiB"));
    }
    let chunks = size.div_ceil(chunk_size as u64);
    Ok((chunks, chunks.div_ceil(page_chunks as u64)))
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FormatError> {
        if self.buf.len() < n {
            return err(format!(
                "truncated: needed {n} more bytes, {} left",
                self.buf.len()
            ));
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, FormatError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, FormatError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, FormatError> {
        let mut a = [0; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(a))
    }
    fn u64(&mut self) -> Result<u64, FormatError> {
        let mut a = [0; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
    fn str(&mut self) -> Result<String, FormatError> {
        let n = self.u16()? as usize;
        if n > MAX_STR {
            return err(format!("string of {n} bytes is too long"));
        }
        match std::str::from_utf8(self.take(n)?) {
            Ok(s) => Ok(s.to_string()),
            Err(_) => err("string is not UTF-8"),
        }
    }
    fn id(&mut self) -> Result<ObjectId, FormatError> {
        let mut a = [0; 32];
        a.copy_from_slice(self.take(32)?);
        Ok(ObjectId(a))
    }
    /// Tag 0 (None) or tag 1 followed by an id.
    fn opt_id(&mut self) -> Result<Option<ObjectId>, FormatError> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(self.id()?)),
            t => err(format!("unknown entry tag {t}")),
        }
    }
    fn magic(&mut self, m: &[u8; 4], what: &str) -> Result<(), FormatError> {
        if self.take(4)? != m {
            return err(format!("not a {what} (bad magic)"));
        }
        let v = self.u8()?;
        if v != VERSION {
            return err(format!("{what} version {v} is not supported"));
        }
        Ok(())
    }
    fn end(&self) -> Result<(), FormatError> {
        if !self.buf.is_empty() {
            return err(format!("{} trailing bytes", self.buf.len()));
        }
        Ok(())
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) -> Result<(), FormatError> {
    if s.len() > MAX_STR {
        return err(format!("string of {} bytes is too long", s.len()));
    }
    out.extend_from_slice(&(s.len() as u16).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

fn put_opt_id(out: &mut Vec<u8>, id: Option<&ObjectId>) {
    match id {
        None => out.push(0),
        Some(id) => {
            out.push(1);
            out.extend_from_slice(&id.0);
        }
    }
}

impl IndexPage {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(17 + self.entries.len() * 33);
        out.extend_from_slice(PAGE_MAGIC);
        out.push(VERSION);
        out.extend_from_slice(&self.first_chunk.to_le_bytes());
        out.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        for e in &self.entries {
            match e {
                Entry::Zero => put_opt_id(&mut out, None),
                Entry::Data(id) => put_opt_id(&mut out, Some(id)),
            }
        }
        out
    }

    pub fn decode(buf: &[u8]) -> Result<Self, FormatError> {
        let mut r = Reader { buf };
        r.magic(PAGE_MAGIC, "chunk index page")?;
        let first_chunk = r.u64()?;
        let count = r.u32()?;
        if count > MAX_PAGE_CHUNKS || count as usize > r.buf.len() {
            return err(format!("page lists {count} chunks, more than it can hold"));
        }
        let mut entries = Vec::with_capacity(count as usize);
        for _ in 0..count {
            entries.push(match r.opt_id()? {
                None => Entry::Zero,
                Some(id) => Entry::Data(id),
            });
        }
        r.end()?;
        Ok(Self {
            first_chunk,
            entries,
        })
    }

    /// True if every chunk is zero.
    pub fn is_zero(&self) -> bool {
        self.entries.iter().all(|e| *e == Entry::Zero)
    }
}

impl PackIndex {
    /// Chunks listed, over all packs.
    pub fn chunks(&self) -> usize {
        self.packs.iter().map(|(_, e)| e.len()).sum()
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(9 + self.packs.len() * 36 + self.chunks() * 40);
        out.extend_from_slice(PACK_INDEX_MAGIC);
        out.push(VERSION);
        out.extend_from_slice(&(self.packs.len() as u32).to_le_bytes());
        for (pack, entries) in &self.packs {
            out.extend_from_slice(&pack.0);
            out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
            for e in entries {
                out.extend_from_slice(&e.chunk.0);
                out.extend_from_slice(&e.offset.to_le_bytes());
                out.extend_from_slice(&e.len.to_le_bytes());
            }
        }
        out
    }

    pub fn decode(buf: &[u8]) -> Result<Self, FormatError> {
        let mut r = Reader { buf };
        r.magic(PACK_INDEX_MAGIC, "pack index")?;
        let n_packs = r.u32()? as usize;
        if n_packs > r.buf.len() / 36 {
            return err(format!("lists {n_packs} packs, more than it can hold"));
        }
        let mut packs = Vec::with_capacity(n_packs);
        let mut total = 0usize;
        for _ in 0..n_packs {
            let pack = r.id()?;
            let n = r.u32()? as usize;
            total += n;
            if n > r.buf.len() / 40 || total > MAX_PACK_INDEX_CHUNKS {
                return err(format!("pack lists {n} chunks, more than it can hold"));
            }
            let mut entries = Vec::with_capacity(n);
            for _ in 0..n {
                let chunk = r.id()?;
                let offset = r.u32()?;
                let len = r.u32()?;
                if offset.checked_add(len).is_none() {
                    return err(format!("chunk at {offset}+{len} overflows the pack"));
                }
                entries.push(PackEntry { chunk, offset, len });
            }
            packs.push((pack, entries));
        }
        r.end()?;
        Ok(Self { packs })
    }
}

impl Manifest {
    pub fn encode(&self) -> Result<Vec<u8>, FormatError> {
        let (_, pages) = geometry(self.size, self.chunk_size, self.page_chunks)?;
        if pages != self.pages.len() as u64 {
            return err(format!("{} pages for {pages} windows", self.pages.len()));
        }
        let mut out = Vec::with_capacity(128 + self.pages.len() * 33);
        out.extend_from_slice(MANIFEST_MAGIC);
        out.push(VERSION);
        put_str(&mut out, &self.id)?;
        put_str(&mut out, &self.volume)?;
        put_str(&mut out, &self.snapshot)?;
        match &self.parent {
            None => out.push(0),
            Some(p) => {
                out.push(1);
                put_str(&mut out, p)?;
            }
        }
        out.extend_from_slice(&self.created.to_le_bytes());
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&self.chunk_size.to_le_bytes());
        out.extend_from_slice(&self.page_chunks.to_le_bytes());
        let s = &self.stats;
        for v in [
            s.data_bytes,
            s.bytes_read,
            s.bytes_uploaded,
            s.chunks_new,
            s.chunks_reused,
            s.duration_ms,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&(self.pages.len() as u64).to_le_bytes());
        for p in &self.pages {
            put_opt_id(&mut out, p.as_ref());
        }
        Ok(out)
    }

    pub fn decode(buf: &[u8]) -> Result<Self, FormatError> {
        let mut r = Reader { buf };
        r.magic(MANIFEST_MAGIC, "manifest")?;
        let id = r.str()?;
        let volume = r.str()?;
        let snapshot = r.str()?;
        let parent = match r.u8()? {
            0 => None,
            1 => Some(r.str()?),
            t => return err(format!("unknown parent tag {t}")),
        };
        let created = r.u64()? as i64;
        let size = r.u64()?;
        let chunk_size = r.u32()?;
        let page_chunks = r.u32()?;
        let (_, want_pages) = geometry(size, chunk_size, page_chunks)?;
        let stats = BackupStats {
            data_bytes: r.u64()?,
            bytes_read: r.u64()?,
            bytes_uploaded: r.u64()?,
            chunks_new: r.u64()?,
            chunks_reused: r.u64()?,
            duration_ms: r.u64()?,
        };
        let count = r.u64()?;
        if count != want_pages {
            return err(format!(
                "{count} pages, but a volume of {size} bytes has {want_pages}"
            ));
        }
        if count > r.buf.len() as u64 {
            return err(format!("{count} pages cannot fit in {} bytes", r.buf.len()));
        }
        let mut pages = Vec::with_capacity(count as usize);
        for _ in 0..count {
            pages.push(r.opt_id()?);
        }
        r.end()?;
        Ok(Self {
            id,
            volume,
            snapshot,
            parent,
            created,
            size,
            chunk_size,
            page_chunks,
            stats,
            pages,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry() -> impl Strategy<Value = Entry> {
        prop_oneof![
            Just(Entry::Zero),
            any::<[u8; 32]>().prop_map(|b| Entry::Data(ObjectId(b)))
        ]
    }

    fn manifest() -> impl Strategy<Value = Manifest> {
        (
            "[a-z0-9-]{1,40}",
            "[a-z0-9.-]{1,60}",
            ".{0,30}",
            proptest::option::of("[a-z0-9-]{1,40}"),
            any::<i64>(),
            0u64..(1 << 36),
            16u32..=24,
            1u32..=4096,
            any::<[u64; 6]>(),
        )
            .prop_flat_map(
                |(id, volume, snapshot, parent, created, size, shift, pc, st)| {
                    let chunk_size = 1u32 << shift;
                    let (_, pages) = geometry(size, chunk_size, pc).unwrap();
                    proptest::collection::vec(
                        proptest::option::of(any::<[u8; 32]>()),
                        pages as usize,
                    )
                    .prop_map(move |pages| Manifest {
                        id: id.clone(),
                        volume: volume.clone(),
                        snapshot: snapshot.clone(),
                        parent: parent.clone(),
                        created,
                        size,
                        chunk_size,
                        page_chunks: pc,
                        stats: BackupStats {
                            data_bytes: st[0],
                            bytes_read: st[1],
                            bytes_uploaded: st[2],
                            chunks_new: st[3],
                            chunks_reused: st[4],
                            duration_ms: st[5],
                        },
                        pages: pages.into_iter().map(|p| p.map(ObjectId)).collect(),
                    })
                },
            )
    }

    proptest! {
        #[test]
        fn page_round_trip(first in any::<u64>(), entries in proptest::collection::vec(entry(), 0..600)) {
            let p = IndexPage { first_chunk: first, entries };
            let enc = p.encode();
            prop_assert_eq!(IndexPage::decode(&enc).unwrap(), p);
            // Every strict prefix fails; so does a trailing byte.
            for n in [0, enc.len() / 2, enc.len() - 1] {
                prop_assert!(IndexPage::decode(&enc[..n]).is_err());
            }
            let mut longer = enc.clone();
            longer.push(0);
            prop_assert!(IndexPage::decode(&longer).is_err());
        }

        #[test]
        fn manifest_round_trip(m in manifest()) {
            let enc = m.encode().unwrap();
            prop_assert_eq!(Manifest::decode(&enc).unwrap(), m);
            for n in [0, enc.len() / 3, enc.len() - 1] {
                prop_assert!(Manifest::decode(&enc[..n]).is_err());
            }
        }

        #[test]
        fn manifest_decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = Manifest::decode(&bytes);
            let _ = IndexPage::decode(&bytes);
        }
    }

    fn pack_index() -> impl Strategy<Value = PackIndex> {
        proptest::collection::vec(
            (
                any::<[u8; 32]>(),
                proptest::collection::vec((any::<[u8; 32]>(), any::<u32>(), any::<u32>()), 0..20),
            ),
            0..8,
        )
        .prop_map(|packs| PackIndex {
            packs: packs
                .into_iter()
                .map(|(p, es)| {
                    let entries = es
                        .into_iter()
                        .map(|(c, o, l)| PackEntry {
                            chunk: ObjectId(c),
                            offset: o / 2,
                            len: l / 2,
                        })
                        .collect();
                    (ObjectId(p), entries)
                })
                .collect(),
        })
    }

    proptest! {
        #[test]
        fn pack_index_round_trip(ix in pack_index()) {
            let enc = ix.encode();
            prop_assert_eq!(PackIndex::decode(&enc).unwrap(), ix);
            for n in [0, enc.len() / 2, enc.len() - 1] {
                prop_assert!(PackIndex::decode(&enc[..n]).is_err());
            }
        }

        #[test]
        fn pack_index_decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = PackIndex::decode(&bytes);
        }
    }

    #[test]
    fn huge_counts_are_rejected_before_allocating() {
        let mut b = PAGE_MAGIC.to_vec();
        b.push(VERSION);
        b.extend_from_slice(&0u64.to_le_bytes());
        b.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(IndexPage::decode(&b).is_err());
        let m = Manifest {
            id: "a".into(),
            volume: "v".into(),
            snapshot: "s".into(),
            parent: None,
            created: 0,
            size: MAX_SIZE,
            chunk_size: MIN_CHUNK,
            page_chunks: 1,
            stats: BackupStats::default(),
            pages: vec![],
        };
        assert!(m.encode().is_err());
    }
}
