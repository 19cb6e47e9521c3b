//! The backup benchmark's driver (`scripts/bench-backup.sh`): backs up a
//! volume kept as a stack of sparse layer files, the way a replica keeps
//! its snapshots (each layer holds only what was written after the one
//! below), so an incremental backup reads only the top layers' allocated
//! ranges; and restores a backup to a sparse file. Prints one JSON line.
//!
//! ```text
//! bench_backup backup  TARGET VOLUME LAYER.img[,LAYER.img...]
//! bench_backup restore TARGET BACKUP-ID OUT.img
//! ```
//! S3 options come from the environment: STRATA_S3_ENDPOINT and the AWS
//! chain (AWS_ACCESS_KEY_ID, ...); STRATA_BACKUP_KEY encrypts;
//! STRATA_CHUNK_SIZE sets a new target's chunk size (bytes).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::time::Instant;

use bytes::Bytes;
use strata_backup::{
    create_backup, restore, BackupOptions, Extent, ExtentKind, FileSink, S3Options, SnapshotSource,
    SourceError, Target, TargetOptions,
};

struct Layers {
    volume: String,
    /// "snap-N" for N layers.
    snapshot: String,
    files: Vec<File>,
    size: u64,
}

fn data_ranges(f: &File, off: u64, end: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut pos = off;
    while pos < end {
        // SAFETY: lseek on an open descriptor, no memory passed.
        let d = unsafe { libc::lseek(f.as_raw_fd(), pos as i64, libc::SEEK_DATA) };
        if d < 0 || d as u64 >= end {
            break;
        }
        // SAFETY: as above.
        let h = unsafe { libc::lseek(f.as_raw_fd(), d, libc::SEEK_HOLE) };
        let h = if h < 0 { end } else { (h as u64).min(end) };
        out.push((
            (d as u64) & !4095,
            h.div_ceil(4096) * 4096 - ((d as u64) & !4095),
        ));
        pos = h;
    }
    out
}

impl Layers {
    fn top(&self) -> usize {
        self.files.len()
    }
}

impl SnapshotSource for Layers {
    fn volume(&self) -> &str {
        &self.volume
    }
    fn snapshot(&self) -> &str {
        &self.snapshot
    }
    fn size(&self) -> u64 {
        self.size
    }
    async fn has_snapshot(&self, name: &str) -> Result<bool, SourceError> {
        Ok(name
            .strip_prefix("snap-")
            .and_then(|n| n.parse::<usize>().ok())
            .is_some_and(|n| n >= 1 && n <= self.top()))
    }
    async fn changed(
        &self,
        base: Option<&str>,
        offset: u64,
        len: u64,
    ) -> Result<Vec<Extent>, SourceError> {
        let from = base
            .and_then(|b| b.strip_prefix("snap-"))
            .and_then(|n| n.parse::<usize>().ok())
            .unwrap_or(0);
        let mut v: Vec<(u64, u64)> = Vec::new();
        for f in &self.files[from..] {
            v.extend(data_ranges(f, offset, offset + len));
        }
        v.sort();
        Ok(v.into_iter()
            .map(|(offset, len)| Extent {
                offset,
                len,
                kind: ExtentKind::Data,
            })
            .collect())
    }
    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, SourceError> {
        let end = offset + len as u64;
        let mut buf = vec![0u8; len as usize];
        for f in &self.files {
            for (o, l) in data_ranges(f, offset, end) {
                let s = o.max(offset);
                let t = (o + l).min(end);
                f.read_exact_at(&mut buf[(s - offset) as usize..(t - offset) as usize], s)
                    .map_err(|source| SourceError::Io {
                        op: "read",
                        offset: s,
                        source,
                    })?;
            }
        }
        Ok(Bytes::from(buf))
    }
}

fn options() -> anyhow::Result<TargetOptions> {
    Ok(TargetOptions {
        s3: S3Options {
            endpoint: std::env::var("STRATA_S3_ENDPOINT").ok(),
            path_style: true,
            ..Default::default()
        },
        key: strata_backup::load_key(None)?,
        chunk_size: match std::env::var("STRATA_CHUNK_SIZE") {
            Ok(v) => v.parse()?,
            Err(_) => strata_backup::TargetOptions::default().chunk_size,
        },
        parallel: match std::env::var("STRATA_PARALLEL") {
            Ok(v) => v.parse()?,
            Err(_) => strata_backup::TargetOptions::default().parallel,
        },
        ..Default::default()
    })
}

fn main() -> anyhow::Result<()> {
    // As `strata` does for its operator commands (src/main.rs).
    strata_backup::limit_malloc_arenas();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let progress = strata_backup::progress::auto();
    match args.get(1).map(String::as_str) {
        Some("backup") if args.len() == 5 => {
            let target = Target::open(&args[2], &options()?).await?;
            let files = args[4]
                .split(',')
                .map(|p| File::open(PathBuf::from(p)))
                .collect::<Result<Vec<_>, _>>()?;
            let size = files[0].metadata()?.len();
            let src = Layers {
                volume: args[3].clone(),
                snapshot: format!("snap-{}", files.len()),
                files,
                size,
            };
            let t = Instant::now();
            let s =
                create_backup(&target, &src, &BackupOptions::default(), progress.as_ref()).await?;
            let mut v = serde_json::to_value(&s)?;
            v["seconds"] = serde_json::json!(t.elapsed().as_secs_f64());
            println!("{v}");
        }
        Some("restore") if args.len() == 5 => {
            let target = Target::open(&args[2], &options()?).await?;
            let info = strata_backup::show(&target, &args[3]).await?;
            let sink = FileSink::create(&PathBuf::from(&args[4]), info.size)?;
            let t = Instant::now();
            let r = restore(&target, &args[3], &sink, progress.as_ref()).await?;
            let mut v = serde_json::to_value(&r)?;
            v["seconds"] = serde_json::json!(t.elapsed().as_secs_f64());
            println!("{v}");
        }
        _ => anyhow::bail!(
            "usage: bench_backup backup TARGET VOLUME LAYER[,LAYER..] | restore TARGET ID OUT"
        ),
    }
    Ok(())
}
