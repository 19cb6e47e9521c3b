//! Test helpers: a layered volume whose snapshots are sparse files (the
//! same shape as a replica's layered store: each snapshot holds only what
//! was written after the previous one), a [`SnapshotSource`] over it with
//! fault injection, and byte-for-byte comparison of a restore.

#![allow(dead_code)]

pub mod servers;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use strata_backup::{Extent, ExtentKind, SnapshotSource, SourceError};

pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;

/// Fast deterministic bytes (xorshift64*), incompressible.
pub fn fill(seed: u64, buf: &mut [u8]) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for c in buf.chunks_mut(8) {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let v = x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
        c.copy_from_slice(&v[..c.len()]);
    }
}

struct Layer {
    name: String,
    file: File,
    /// Written ranges, sorted, merged.
    extents: Vec<(u64, u64)>,
}

/// A volume with a chain of snapshots.
pub struct Volume {
    pub name: String,
    pub size: u64,
    dir: PathBuf,
    layers: Vec<Layer>,
}

/// A simple PRNG for offsets.
pub struct Rng(u64);
impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

fn merge(mut v: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    v.sort();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (o, l) in v {
        match out.last_mut() {
            Some((lo, ll)) if *lo + *ll >= o => *ll = (*ll).max(o + l - *lo),
            _ => out.push((o, l)),
        }
    }
    out
}

impl Volume {
    pub fn new(dir: &Path, name: &str, size: u64) -> Self {
        Self {
            name: name.into(),
            size,
            dir: dir.to_path_buf(),
            layers: Vec::new(),
        }
    }

    /// Adds a snapshot holding `writes` (offset, len, seed) on top of the
    /// previous ones. Returns its index.
    pub fn snapshot(&mut self, name: &str, writes: &[(u64, u64, u64)]) -> usize {
        let path = self.dir.join(format!("{}-{name}.layer", self.name));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        file.set_len(self.size).unwrap();
        let mut buf = Vec::new();
        for &(o, l, seed) in writes {
            assert!(o + l <= self.size);
            buf.resize(l as usize, 0);
            fill(seed, &mut buf);
            file.write_all_at(&buf, o).unwrap();
        }
        self.layers.push(Layer {
            name: name.into(),
            file,
            extents: merge(writes.iter().map(|&(o, l, _)| (o, l)).collect()),
        });
        self.layers.len() - 1
    }

    /// Bytes written in snapshot `i` alone.
    pub fn layer_bytes(&self, i: usize) -> u64 {
        self.layers[i].extents.iter().map(|e| e.1).sum()
    }

    pub fn source(self: &Arc<Self>, i: usize) -> LayeredSource {
        LayeredSource {
            vol: self.clone(),
            top: i,
            reads: AtomicU64::new(0),
            fail_after_reads: None,
            read_delay: None,
        }
    }

    /// Reads `[off, off+len)` as of snapshot `top`.
    pub fn read_at(&self, top: usize, off: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        let end = off + len as u64;
        for layer in &self.layers[..=top] {
            for &(eo, el) in &layer.extents {
                let s = eo.max(off);
                let t = (eo + el).min(end);
                if s < t {
                    layer
                        .file
                        .read_exact_at(&mut buf[(s - off) as usize..(t - off) as usize], s)
                        .unwrap();
                }
            }
        }
        buf
    }
}

/// Snapshot `top` of a [`Volume`].
pub struct LayeredSource {
    vol: Arc<Volume>,
    top: usize,
    pub reads: AtomicU64,
    /// Fail every read after this many.
    pub fail_after_reads: Option<u64>,
    /// Sleep before each read (to keep a backup running).
    pub read_delay: Option<Duration>,
}

impl SnapshotSource for LayeredSource {
    fn volume(&self) -> &str {
        &self.vol.name
    }
    fn snapshot(&self) -> &str {
        &self.vol.layers[self.top].name
    }
    fn size(&self) -> u64 {
        self.vol.size
    }
    async fn has_snapshot(&self, name: &str) -> Result<bool, SourceError> {
        Ok(self.vol.layers[..=self.top].iter().any(|l| l.name == name))
    }
    async fn changed(
        &self,
        base: Option<&str>,
        offset: u64,
        len: u64,
    ) -> Result<Vec<Extent>, SourceError> {
        let from = match base {
            None => 0,
            Some(b) => {
                self.vol.layers[..=self.top]
                    .iter()
                    .position(|l| l.name == b)
                    .ok_or_else(|| SourceError::Other(format!("no snapshot {b}")))?
                    + 1
            }
        };
        let end = offset + len;
        let mut v = Vec::new();
        for layer in &self.vol.layers[from..=self.top] {
            for &(eo, el) in &layer.extents {
                let s = eo.max(offset) & !4095;
                let t = (eo + el).min(end).div_ceil(4096) * 4096;
                if s < t {
                    v.push((s, t.min(end) - s));
                }
            }
        }
        Ok(merge(v)
            .into_iter()
            .map(|(offset, len)| Extent {
                offset,
                len,
                kind: ExtentKind::Data,
            })
            .collect())
    }
    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, SourceError> {
        let n = self.reads.fetch_add(1, Ordering::Relaxed);
        if let Some(d) = self.read_delay {
            tokio::time::sleep(d).await;
        }
        if self.fail_after_reads.is_some_and(|f| n >= f) {
            return Err(SourceError::Other(format!(
                "injected read failure at offset {offset}"
            )));
        }
        let vol = self.vol.clone();
        let top = self.top;
        let len = (len as u64).min(vol.size - offset) as usize;
        Ok(
            tokio::task::spawn_blocking(move || Bytes::from(vol.read_at(top, offset, len)))
                .await
                .unwrap(),
        )
    }
}

/// `count` writes of `len` bytes at random 4 KiB-aligned offsets.
pub fn scattered(seed: u64, size: u64, count: usize, len: u64) -> Vec<(u64, u64, u64)> {
    let mut rng = Rng::new(seed);
    (0..count)
        .map(|i| {
            let o = (rng.next() % ((size - len) / 4096)) * 4096;
            (o, len, seed * 1_000_003 + i as u64)
        })
        .collect()
}

/// Asserts the file at `path` equals snapshot `top` of `vol`.
pub fn assert_same(vol: &Volume, top: usize, path: &Path) {
    let f = File::open(path).unwrap();
    assert_eq!(f.metadata().unwrap().len(), vol.size, "restored size");
    let step = 8 * MIB;
    let mut got = vec![0u8; step as usize];
    let mut off = 0;
    while off < vol.size {
        let n = step.min(vol.size - off) as usize;
        f.read_exact_at(&mut got[..n], off).unwrap();
        let want = vol.read_at(top, off, n);
        if got[..n] != want[..] {
            let i = got[..n]
                .iter()
                .zip(&want)
                .position(|(a, b)| a != b)
                .unwrap();
            panic!(
                "restore differs from snapshot {top} at offset {}",
                off + i as u64
            );
        }
        off += n as u64;
    }
}

/// Bytes allocated on disk for `path`.
pub fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// Objects under `prefix` in a file target.
pub fn count_files(root: &Path, prefix: &str) -> usize {
    fn walk(p: &Path, n: &mut usize) {
        if let Ok(rd) = std::fs::read_dir(p) {
            for e in rd.flatten() {
                if e.file_type().unwrap().is_dir() {
                    walk(&e.path(), n);
                } else if !e.file_name().to_string_lossy().starts_with(".tmp-") {
                    // A `.tmp-` file is an object still being written (the
                    // file store renames it into place), not an object.
                    *n += 1;
                }
            }
        }
    }
    let mut n = 0;
    walk(&root.join(prefix), &mut n);
    n
}

/// All object files under `prefix` in a file target.
pub fn files(root: &Path, prefix: &str) -> Vec<PathBuf> {
    fn walk(p: &Path, out: &mut Vec<PathBuf>) {
        if let Ok(rd) = std::fs::read_dir(p) {
            for e in rd.flatten() {
                if e.file_type().unwrap().is_dir() {
                    walk(&e.path(), out);
                } else {
                    out.push(e.path());
                }
            }
        }
    }
    let mut out = Vec::new();
    walk(&root.join(prefix), &mut out);
    out.sort();
    out
}

use strata_backup::{
    create_backup, restore, verify, BackupOptions, FileSink, NoProgress, Target, TargetOptions,
};

/// The round trip, at `data` bytes written then `change` bytes
/// changed in a volume of `size`: full backup, incremental backup (asserts
/// it uploads about `change`, not `data`), restore of both compared byte
/// for byte with their snapshots, verify --read.
pub async fn round_trip(
    url: &str,
    opts: &TargetOptions,
    work: &Path,
    size: u64,
    data: u64,
    change: u64,
) {
    let target = Target::open(url, opts).await.unwrap();
    let mut vol = Volume::new(work, "vol-a", size);
    let w1 = scattered(1, size, (data / (4 * MIB)) as usize, 4 * MIB);
    vol.snapshot("snap-1", &w1);
    let w2 = scattered(2, size, (change / (4 * MIB)) as usize, 4 * MIB);
    vol.snapshot("snap-2", &w2);
    let vol = Arc::new(vol);

    let t = std::time::Instant::now();
    let full = create_backup(
        &target,
        &vol.source(0),
        &BackupOptions::default(),
        &NoProgress,
    )
    .await
    .unwrap();
    eprintln!("full backup: {:?} in {:?}", full.stats, t.elapsed());
    assert!(full.parent.is_none());
    let written = vol.layer_bytes(0);
    assert!(full.stats.bytes_read >= written && full.stats.bytes_read <= written * 2 + 8 * MIB);
    assert!(
        full.stats.bytes_read < size / 2,
        "a full backup reads allocated ranges only"
    );

    let t = std::time::Instant::now();
    let inc = create_backup(
        &target,
        &vol.source(1),
        &BackupOptions::default(),
        &NoProgress,
    )
    .await
    .unwrap();
    eprintln!("incremental backup: {:?} in {:?}", inc.stats, t.elapsed());
    assert_eq!(inc.parent.as_deref(), Some(full.id.as_str()));
    let changed = vol.layer_bytes(1);
    // 4 MiB writes at 4 KiB-aligned offsets touch five 1 MiB chunks.
    assert!(
        inc.stats.bytes_uploaded >= changed
            && inc.stats.bytes_uploaded <= changed * 3 / 2 + 2 * MIB,
        "incremental uploaded {} for {changed} changed",
        inc.stats.bytes_uploaded
    );
    assert!(inc.stats.bytes_read <= changed * 3 / 2 + 2 * MIB);

    for (id, top) in [(&full.id, 0), (&inc.id, 1)] {
        let out = work.join(format!("restore-{top}.img"));
        let sink = FileSink::create(&out, size).unwrap();
        let t = std::time::Instant::now();
        let r = restore(&target, id, &sink, &NoProgress).await.unwrap();
        eprintln!("restore {top}: {r:?} in {:?}", t.elapsed());
        drop(sink);
        assert_same(&vol, top, &out);
        assert!(
            allocated(&out) <= (written + changed) * 2,
            "restore stays sparse"
        );
        std::fs::remove_file(&out).unwrap();
    }
    let v = verify(&target, &inc.id, true, &NoProgress).await.unwrap();
    assert!(v.chunks > 0);
}
