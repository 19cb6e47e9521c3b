//! `strata backup ...`: backups in a target (`s3://bucket/prefix` or
//! `file:///dir`), through the `strata-backup` crate. Commands that only
//! need the target run here; `create VOLUME` (from a live volume's
//! snapshot) and `restore --to VOLUME` go through the volume's controller.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use strata_backup::{
    BackupInfo, BackupOptions, FileSink, FileSource, GcOptions, Retention, S3Options, Target,
    TargetOptions,
};

/// Where the backups are and how to open them.
#[derive(Debug, Args)]
pub struct TargetArgs {
    /// Target URL: s3://bucket/prefix or file:///dir.
    #[arg(long, env = "STRATA_BACKUP_TARGET")]
    pub target: String,
    /// S3 endpoint of an S3-compatible server (MinIO, Garage, Ceph RGW...);
    /// implies path-style addressing. Credentials and region come from the
    /// standard AWS chain (AWS_ACCESS_KEY_ID, ~/.aws, instance metadata).
    #[arg(long, env = "STRATA_S3_ENDPOINT")]
    pub endpoint: Option<String>,
    /// S3 region (default: the AWS chain, else us-east-1).
    #[arg(long)]
    pub region: Option<String>,
    /// Path-style S3 addressing without a custom endpoint.
    #[arg(long)]
    pub path_style: bool,
    /// File holding the encryption key (else STRATA_BACKUP_KEY). A target
    /// created with a key is encrypted, and needs it from then on.
    #[arg(long, env = "STRATA_BACKUP_KEY_FILE")]
    pub key_file: Option<PathBuf>,
    /// Chunks in flight at once (memory ≈ 2 × this × chunk size).
    #[arg(long, default_value_t = 8)]
    pub parallel: usize,
    /// Print JSON for scripts instead of a table.
    #[arg(long)]
    pub json: bool,
}

impl TargetArgs {
    async fn open(&self) -> anyhow::Result<Target> {
        let opts = TargetOptions {
            s3: S3Options {
                endpoint: self.endpoint.clone(),
                path_style: self.path_style,
                region: self.region.clone(),
                credentials: None,
                create_bucket: false,
            },
            key: strata_backup::load_key(self.key_file.as_deref())?,
            parallel: self.parallel,
            ..Default::default()
        };
        Ok(Target::open(&self.target, &opts).await?)
    }
}

#[derive(Debug, Subcommand)]
pub enum BackupCommand {
    /// Back up a volume. Without --from-file this takes a snapshot through
    /// the volume's controller.
    Create {
        /// Volume name (as backups list it).
        volume: String,
        /// Back up this raw image file instead of a live volume (allocated
        /// ranges only; always a full backup, deduplicated against the target).
        #[arg(long)]
        from_file: Option<PathBuf>,
        /// The snapshot to back up (default: a new one, kept as the base of
        /// the next incremental backup to this target); with --from-file,
        /// the name recorded (default "file").
        #[arg(long)]
        snapshot: Option<String>,
        /// Read everything even if an earlier backup could be the base.
        #[arg(long)]
        full: bool,
        /// The volume's controller (management address).
        #[arg(long, default_value = "127.0.0.1:10810")]
        controller: std::net::SocketAddr,
        #[command(flatten)]
        t: TargetArgs,
    },
    /// List backups (oldest first).
    Ls {
        /// Only this volume's backups.
        #[arg(long)]
        volume: Option<String>,
        #[command(flatten)]
        t: TargetArgs,
    },
    /// Show one backup (ID or VOLUME/ID).
    Show {
        backup: String,
        #[command(flatten)]
        t: TargetArgs,
    },
    /// Delete one backup's manifest (its data goes at the next gc).
    Rm {
        backup: String,
        #[command(flatten)]
        t: TargetArgs,
    },
    /// Check that every object a backup needs is there; with --read also
    /// download, decrypt and hash them.
    Verify {
        backup: String,
        #[arg(long)]
        read: bool,
        #[command(flatten)]
        t: TargetArgs,
    },
    /// Apply a retention policy: drop the backups it does not keep.
    Forget {
        /// Only this volume's backups (default: every volume, each on its own).
        #[arg(long)]
        volume: Option<String>,
        #[arg(long, default_value_t = 0)]
        keep_last: u32,
        #[arg(long, default_value_t = 0)]
        keep_daily: u32,
        #[arg(long, default_value_t = 0)]
        keep_weekly: u32,
        /// Only say what would be removed.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        t: TargetArgs,
    },
    /// Delete packs, chunks and index pages no backup references, and
    /// repack packs that are partly unused (safe beside running backups:
    /// it then deletes nothing and says why).
    Gc {
        #[arg(long)]
        dry_run: bool,
        /// Repack a pack once this percentage of its bytes is unused
        /// (100: never repack; only wholly unused packs are deleted).
        #[arg(long, default_value_t = 25, value_parser = clap::value_parser!(u8).range(0..=100))]
        repack_unused_percent: u8,
        #[command(flatten)]
        t: TargetArgs,
    },
    /// Restore a backup to a new sparse file (or an existing block device),
    /// or with --to to a volume through its controller.
    Restore {
        backup: String,
        /// Write to this file (created; must not exist) or block device.
        #[arg(long, conflicts_with = "to")]
        to_file: Option<PathBuf>,
        /// Write to this volume (through its controller).
        #[arg(long)]
        to: Option<String>,
        /// The destination volume's controller (management address).
        #[arg(long, default_value = "127.0.0.1:10810")]
        controller: std::net::SocketAddr,
        /// Restore into the volume even with clients attached.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        t: TargetArgs,
    },
}

fn size(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn print_table(backups: &[BackupInfo]) {
    println!(
        "{:<31} {:<20} {:<36} {:<20} {:>10} {:>10} {:>10}  PARENT",
        "ID", "VOLUME", "SNAPSHOT", "CREATED", "SIZE", "DATA", "UPLOADED"
    );
    for b in backups {
        println!(
            "{:<31} {:<20} {:<36} {:<20} {:>10} {:>10} {:>10}  {}",
            b.id,
            b.volume,
            b.snapshot,
            b.created,
            size(b.size),
            size(b.stats.data_bytes),
            size(b.stats.bytes_uploaded),
            b.parent.as_deref().unwrap_or("-")
        );
    }
}

fn print_one(b: &BackupInfo) {
    println!("backup     {}/{}", b.volume, b.id);
    println!("snapshot   {}", b.snapshot);
    println!("created    {}", b.created);
    println!("parent     {}", b.parent.as_deref().unwrap_or("- (full)"));
    println!(
        "size       {} ({} in data chunks)",
        size(b.size),
        size(b.stats.data_bytes)
    );
    println!(
        "took       {:.1}s: read {}, uploaded {}, {} new chunks, {} reused",
        b.stats.duration_ms as f64 / 1000.0,
        size(b.stats.bytes_read),
        size(b.stats.bytes_uploaded),
        b.stats.chunks_new,
        b.stats.chunks_reused
    );
    println!(
        "chunks     {} each, {} index pages",
        size(b.chunk_size as u64),
        b.pages
    );
}

fn json(v: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

pub async fn run(cmd: BackupCommand) -> anyhow::Result<()> {
    let progress = strata_backup::progress::auto();
    match cmd {
        BackupCommand::Create {
            volume,
            from_file,
            snapshot,
            full,
            controller,
            t,
        } => {
            let Some(path) = from_file else {
                return through_controller::backup(
                    &volume,
                    controller,
                    snapshot,
                    full,
                    &t,
                    progress.as_ref(),
                )
                .await;
            };
            let snapshot = snapshot.unwrap_or_else(|| "file".into());
            let target = t.open().await?;
            let src = FileSource::open(&path, &volume, &snapshot)
                .with_context(|| format!("cannot open {}", path.display()))?;
            let s = strata_backup::create_backup(
                &target,
                &src,
                &BackupOptions { full, id: None },
                progress.as_ref(),
            )
            .await?;
            if t.json {
                return json(&s);
            }
            println!(
                "backup {}/{} of {} done: read {}, uploaded {} ({} new chunks, {} reused) in {:.1}s",
                s.volume,
                s.id,
                path.display(),
                size(s.stats.bytes_read),
                size(s.stats.bytes_uploaded),
                s.stats.chunks_new,
                s.stats.chunks_reused,
                s.stats.duration_ms as f64 / 1000.0
            );
            Ok(())
        }
        BackupCommand::Ls { volume, t } => {
            let target = t.open().await?;
            let v = strata_backup::list(&target, volume.as_deref()).await?;
            if t.json {
                return json(&v);
            }
            print_table(&v);
            Ok(())
        }
        BackupCommand::Show { backup, t } => {
            let target = t.open().await?;
            let b = strata_backup::show(&target, &backup).await?;
            if t.json {
                return json(&b);
            }
            print_one(&b);
            Ok(())
        }
        BackupCommand::Rm { backup, t } => {
            let target = t.open().await?;
            let b = strata_backup::remove(&target, &backup).await?;
            if t.json {
                return json(&b);
            }
            println!(
                "removed backup {}/{} (its data is freed by the next `strata backup gc`)",
                b.volume, b.id
            );
            Ok(())
        }
        BackupCommand::Verify { backup, read, t } => {
            let target = t.open().await?;
            let r = strata_backup::verify(&target, &backup, read, progress.as_ref()).await?;
            if t.json {
                return json(&r);
            }
            println!(
                "backup {}/{} is complete: {} index pages, {} chunks{}",
                r.volume,
                r.id,
                r.pages,
                r.chunks,
                if read {
                    format!(", {} read and checked", size(r.bytes_read))
                } else {
                    " present (--read also checks their content)".into()
                }
            );
            Ok(())
        }
        BackupCommand::Forget {
            volume,
            keep_last,
            keep_daily,
            keep_weekly,
            dry_run,
            t,
        } => {
            let target = t.open().await?;
            let policy = Retention {
                keep_last,
                keep_daily,
                keep_weekly,
            };
            let r = strata_backup::forget(&target, volume.as_deref(), &policy, dry_run).await?;
            if t.json {
                return json(&r);
            }
            println!(
                "{} (kept {}):",
                if dry_run { "would remove" } else { "removed" },
                r.kept.len()
            );
            print_table(&r.removed);
            Ok(())
        }
        BackupCommand::Gc {
            dry_run,
            repack_unused_percent,
            t,
        } => {
            let target = t.open().await?;
            let opts = GcOptions {
                dry_run,
                repack_unused_percent,
            };
            let r = strata_backup::gc(&target, &opts, progress.as_ref()).await?;
            if t.json {
                return json(&r);
            }
            println!(
                "{} backups reference {} chunks in {} index pages; {} objects listed, {} unreferenced ({})",
                r.manifests,
                r.chunks_referenced,
                r.pages_referenced,
                r.objects_listed,
                r.unreferenced,
                size(r.unreferenced_bytes)
            );
            if !r.deferred_by.is_empty() {
                println!(
                    "deleted nothing: in use by {} (run gc again when they finish)",
                    r.deferred_by.join(", ")
                );
            } else if dry_run {
                println!("dry run: deleted nothing");
            } else {
                println!("deleted {} objects ({})", r.deleted, size(r.deleted_bytes));
                if r.packs_repacked > 0 {
                    println!(
                        "repacked {} packs ({} of chunks still in use copied)",
                        r.packs_repacked,
                        size(r.repacked_bytes)
                    );
                }
            }
            if r.unused_in_packs_bytes > 0 {
                println!(
                    "{} of unused chunks left in packs below the repack threshold",
                    size(r.unused_in_packs_bytes)
                );
            }
            if r.stale_locks_removed > 0 {
                println!(
                    "removed {} stale locks of dead backups",
                    r.stale_locks_removed
                );
            }
            Ok(())
        }
        BackupCommand::Restore {
            backup,
            to_file,
            to,
            controller,
            force,
            t,
        } => {
            if let Some(volume) = to {
                return through_controller::restore(
                    &volume,
                    controller,
                    &backup,
                    force,
                    &t,
                    progress.as_ref(),
                )
                .await;
            }
            let Some(path) = to_file else {
                anyhow::bail!("say where to restore: --to-file PATH (or --to VOLUME)");
            };
            let target = t.open().await?;
            let info = strata_backup::show(&target, &backup).await?;
            let is_dev = std::fs::metadata(&path)
                .map(|m| std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type()))
                .unwrap_or(false);
            let sink = if is_dev {
                FileSink::open_existing(&path)
            } else {
                FileSink::create(&path, info.size)
            }
            .with_context(|| format!("cannot open {} for the restore", path.display()))?;
            let r = match strata_backup::restore(&target, &backup, &sink, progress.as_ref()).await {
                Ok(r) => r,
                Err(e) => {
                    if !is_dev {
                        let _ = std::fs::remove_file(&path);
                    }
                    return Err(e.into());
                }
            };
            if t.json {
                return json(&r);
            }
            println!(
                "restored {}/{} (snapshot {}) to {}: {}, {} written, {:.1}s",
                r.volume,
                r.id,
                r.snapshot,
                path.display(),
                size(r.size),
                size(r.bytes_written),
                r.duration_ms as f64 / 1000.0
            );
            Ok(())
        }
    }
}

/// `backup create VOLUME` and `restore --to VOLUME`: the volume's controller
/// runs them (it reads the snapshot from a replica, or writes through the
/// replicator) and streams progress back.
mod through_controller {
    use std::net::SocketAddr;

    use strata_backup::Progress;
    use strata_proto::controller::{BackupEvent, BackupRequest, RestoreRequest, TargetSpec};
    use tonic::Streaming;

    use super::{size, TargetArgs};

    fn spec(t: &TargetArgs) -> anyhow::Result<TargetSpec> {
        Ok(TargetSpec {
            url: t.target.clone(),
            endpoint: t.endpoint.clone().unwrap_or_default(),
            region: t.region.clone().unwrap_or_default(),
            path_style: t.path_style,
            key: strata_backup::load_key(t.key_file.as_deref())?.unwrap_or_default(),
            parallel: t.parallel as u32,
        })
    }

    /// Drives `progress` from the controller's events; returns the result.
    async fn follow(
        mut events: Streaming<BackupEvent>,
        progress: &dyn Progress,
        volume: &str,
    ) -> anyhow::Result<serde_json::Value> {
        let mut phase = String::new();
        let mut done = 0;
        loop {
            let ev = events
                .message()
                .await
                .map_err(|e| anyhow::anyhow!("volume {volume}: {}", e.message()))?;
            let Some(ev) = ev else {
                anyhow::bail!("volume {volume}: the controller ended the stream without a result");
            };
            if !ev.result_json.is_empty() {
                if !phase.is_empty() {
                    progress.finish();
                }
                return Ok(serde_json::from_str(&ev.result_json)?);
            }
            if ev.phase != phase {
                if !phase.is_empty() {
                    progress.finish();
                }
                progress.start(&ev.phase, ev.total, ev.bytes);
                phase = ev.phase;
                done = 0;
            }
            if ev.done > done {
                progress.advance(ev.done - done);
                done = ev.done;
            }
        }
    }

    pub async fn backup(
        volume: &str,
        controller: SocketAddr,
        snapshot: Option<String>,
        full: bool,
        t: &TargetArgs,
        progress: &dyn Progress,
    ) -> anyhow::Result<()> {
        let mut c = crate::cli::snapshot::connect(volume, controller).await?;
        let events = c
            .create_backup(BackupRequest {
                target: Some(spec(t)?),
                snapshot: snapshot.unwrap_or_default(),
                full,
                id: String::new(),
            })
            .await
            .map_err(|e| anyhow::anyhow!("volume {volume}: backup refused: {}", e.message()))?
            .into_inner();
        let s = follow(events, progress, volume).await?;
        if t.json {
            println!("{}", serde_json::to_string_pretty(&s)?);
            return Ok(());
        }
        let n = |k: &str| s[k].as_u64().unwrap_or(0);
        println!(
            "backup {}/{} of snapshot {} done{}: read {}, uploaded {} ({} new chunks, {} reused) in {:.1}s",
            s["volume"].as_str().unwrap_or(volume),
            s["id"].as_str().unwrap_or("?"),
            s["snapshot"].as_str().unwrap_or("?"),
            match s["parent"].as_str() {
                Some(p) => format!(" (incremental to {p})"),
                None => " (full)".into(),
            },
            size(n("bytes_read")),
            size(n("bytes_uploaded")),
            n("chunks_new"),
            n("chunks_reused"),
            n("duration_ms") as f64 / 1000.0
        );
        Ok(())
    }

    pub async fn restore(
        volume: &str,
        controller: SocketAddr,
        backup: &str,
        force: bool,
        t: &TargetArgs,
        progress: &dyn Progress,
    ) -> anyhow::Result<()> {
        let mut c = crate::cli::snapshot::connect(volume, controller).await?;
        let events = c
            .restore_backup(RestoreRequest {
                target: Some(spec(t)?),
                backup: backup.to_string(),
                force,
            })
            .await
            .map_err(|e| anyhow::anyhow!("volume {volume}: restore refused: {}", e.message()))?
            .into_inner();
        let s = follow(events, progress, volume).await?;
        if t.json {
            println!("{}", serde_json::to_string_pretty(&s)?);
            return Ok(());
        }
        println!(
            "restored {}/{} (snapshot {}) into volume {volume}: {} written in {:.1}s",
            s["volume"].as_str().unwrap_or("?"),
            s["id"].as_str().unwrap_or("?"),
            s["snapshot"].as_str().unwrap_or("?"),
            size(s["bytes_written"].as_u64().unwrap_or(0)),
            s["duration_ms"].as_u64().unwrap_or(0) as f64 / 1000.0
        );
        Ok(())
    }
}
