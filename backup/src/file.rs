//! A raw image file as a [`SnapshotSource`] (allocated ranges found with
//! `SEEK_DATA`/`SEEK_HOLE`, so holes are never read) and as a sparse
//! [`RestoreSink`] (`restore --to-file`). A file has no snapshots: a file
//! source only offers full backups (`changed` with no base).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;

use crate::source::{Extent, ExtentKind, RestoreSink, SnapshotSource, SourceError};

fn io(op: &'static str, offset: u64) -> impl FnOnce(std::io::Error) -> SourceError {
    move |source| SourceError::Io { op, offset, source }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, SourceError> + Send + 'static,
) -> Result<T, SourceError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| SourceError::Other(format!("IO task failed: {e}")))?
}

/// A raw image file read as one snapshot of a volume.
pub struct FileSource {
    file: Arc<File>,
    path: PathBuf,
    volume: String,
    snapshot: String,
    size: u64,
}

impl FileSource {
    /// Opens `path` as snapshot `snapshot` of volume `volume`.
    pub fn open(path: &Path, volume: &str, snapshot: &str) -> Result<Self, SourceError> {
        let file = File::open(path).map_err(io("open", 0))?;
        let size = file.metadata().map_err(io("stat", 0))?.len();
        Ok(Self {
            file: Arc::new(file),
            path: path.to_path_buf(),
            volume: volume.to_string(),
            snapshot: snapshot.to_string(),
            size,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// `lseek(fd, offset, whence)`; None when there is no data/hole at or
/// after `offset` (ENXIO).
fn seek(file: &File, offset: u64, whence: libc::c_int) -> Result<Option<u64>, SourceError> {
    let off = libc::off_t::try_from(offset)
        .map_err(|_| SourceError::Other(format!("offset {offset} too large")))?;
    // SAFETY: lseek on a file descriptor we own; no memory is passed.
    let r = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        return Err(SourceError::Io {
            op: "seek",
            offset,
            source: e,
        });
    }
    Ok(Some(r as u64))
}

/// Allocated ranges of `[offset, end)`, widened to 4 KiB.
fn data_ranges(file: &File, offset: u64, end: u64, size: u64) -> Result<Vec<Extent>, SourceError> {
    let mut out: Vec<Extent> = Vec::new();
    let mut pos = offset;
    while pos < end {
        let Some(d) = seek(file, pos, libc::SEEK_DATA)? else {
            break;
        };
        if d >= end {
            break;
        }
        let h = seek(file, d, libc::SEEK_HOLE)?.unwrap_or(size).min(end);
        let s = d & !4095;
        let t = h.div_ceil(4096).saturating_mul(4096).min(end);
        match out.last_mut() {
            Some(last) if last.offset + last.len >= s => {
                last.len = t.max(last.offset + last.len) - last.offset
            }
            _ => out.push(Extent {
                offset: s.max(offset),
                len: t - s.max(offset),
                kind: ExtentKind::Data,
            }),
        }
        if h <= pos {
            break;
        }
        pos = h;
    }
    Ok(out)
}

impl SnapshotSource for FileSource {
    fn volume(&self) -> &str {
        &self.volume
    }
    fn snapshot(&self) -> &str {
        &self.snapshot
    }
    fn size(&self) -> u64 {
        self.size
    }
    async fn has_snapshot(&self, _name: &str) -> Result<bool, SourceError> {
        Ok(false)
    }
    async fn changed(
        &self,
        base: Option<&str>,
        offset: u64,
        len: u64,
    ) -> Result<Vec<Extent>, SourceError> {
        if let Some(b) = base {
            return Err(SourceError::Unsupported(format!(
                "{} is a plain file: it has no snapshot {b:?} to compare with",
                self.path.display()
            )));
        }
        let file = self.file.clone();
        let size = self.size;
        let end = offset.saturating_add(len).min(size);
        blocking(move || data_ranges(&file, offset, end, size)).await
    }
    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, SourceError> {
        let file = self.file.clone();
        let len = (len as u64).min(self.size.saturating_sub(offset)) as usize;
        blocking(move || {
            let mut buf = vec![0u8; len];
            file.read_exact_at(&mut buf, offset)
                .map_err(io("read", offset))?;
            Ok(Bytes::from(buf))
        })
        .await
    }
}

/// Starts writing `[offset, offset+len)` back to the disk without waiting
/// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`), so the disk works while the
/// restore downloads and the final `fsync` finds little left to do. Only a
/// hint: on a file system or device that refuses it the `fsync` does all.
fn start_writeback(file: &File, offset: u64, len: u64) {
    // SAFETY: sync_file_range on an open descriptor; no memory is passed.
    let _ = unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        )
    };
}

/// A file restored into: created new (and so sparse and zeroed) with the
/// backup's size, or an existing file or block device written in place.
pub struct FileSink {
    file: Arc<File>,
    size: u64,
    zeroed: bool,
}

impl FileSink {
    /// Creates `path`, which must not exist, with `size` bytes (a hole).
    pub fn create(path: &Path, size: u64) -> Result<Self, SourceError> {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(io("create", 0))?;
        file.set_len(size).map_err(io("truncate", size))?;
        Ok(Self {
            file: Arc::new(file),
            size,
            zeroed: true,
        })
    }

    /// Opens an existing file or block device; every byte is written.
    pub fn open_existing(path: &Path) -> Result<Self, SourceError> {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(io("open", 0))?;
        let size = seek(&file, 0, libc::SEEK_END)?.unwrap_or(0);
        Ok(Self {
            file: Arc::new(file),
            size,
            zeroed: false,
        })
    }
}

impl RestoreSink for FileSink {
    fn size(&self) -> u64 {
        self.size
    }
    fn starts_zeroed(&self) -> bool {
        self.zeroed
    }
    async fn write(&self, offset: u64, data: Bytes) -> Result<(), SourceError> {
        let file = self.file.clone();
        blocking(move || {
            file.write_all_at(&data, offset)
                .map_err(io("write", offset))?;
            start_writeback(&file, offset, data.len() as u64);
            Ok(())
        })
        .await
    }
    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), SourceError> {
        let file = self.file.clone();
        blocking(move || {
            let zero = vec![0u8; 1 << 20];
            let mut pos = offset;
            let end = offset + len;
            while pos < end {
                let n = ((end - pos) as usize).min(zero.len());
                file.write_all_at(&zero[..n], pos)
                    .map_err(io("write zeroes", pos))?;
                pos += n as u64;
            }
            Ok(())
        })
        .await
    }
    async fn flush(&self) -> Result<(), SourceError> {
        let file = self.file.clone();
        blocking(move || file.sync_all().map_err(io("sync", 0))).await
    }
}
