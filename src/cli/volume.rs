//! `strata volume ...`: operator commands that talk to a controller's gRPC
//! management API.

use std::net::SocketAddr;

use anyhow::Context;
use clap::Subcommand;
use strata_proto::controller::{ExpandRequest, ReplicaAddress, StatusRequest, VolumeStatus};

#[derive(Debug, Subcommand)]
pub enum VolumeCommand {
    /// Health, replicas and IO counters of the volume a controller serves.
    Status {
        /// The controller's management address.
        #[arg(long, default_value = "127.0.0.1:10810")]
        controller: SocketAddr,
        /// Print JSON for scripts instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Grow a volume while it serves IO (every replica, then the volume).
    /// A size that is not a multiple of 4 KiB is rounded up; the same size
    /// is a no-op; volumes never shrink. Grow the filesystem on it after
    /// (resize2fs, xfs_growfs).
    Expand {
        /// The volume.
        volume: String,
        /// The new size: 20G, 512M, 4096...
        #[arg(value_parser = super::size::parse_bytes)]
        size: u64,
        /// The volume's controller (management address).
        #[arg(long, default_value = "127.0.0.1:10810")]
        controller: SocketAddr,
        #[arg(long)]
        json: bool,
    },
    /// Create a new, independent volume from a snapshot: each replica server
    /// of the source copies the snapshot's allocated ranges locally. Serve
    /// the new volume with its own controller.
    Clone {
        /// The source, as VOLUME@SNAPSHOT.
        source: String,
        /// The new volume's name.
        new: String,
        /// The source volume's controller (management address).
        #[arg(long, default_value = "127.0.0.1:10810")]
        controller: SocketAddr,
        #[arg(long)]
        json: bool,
    },
    #[command(flatten)]
    Attach(super::attach::AttachCommand),
}

pub async fn run(cmd: VolumeCommand) -> anyhow::Result<()> {
    match cmd {
        VolumeCommand::Attach(cmd) => super::attach::run(cmd).await,
        VolumeCommand::Expand {
            volume,
            size,
            controller,
            json,
        } => expand(&volume, size, controller, json).await,
        VolumeCommand::Clone {
            source,
            new,
            controller,
            json,
        } => super::snapshot::clone(&source, &new, controller, json).await,
        VolumeCommand::Status { controller, json } => {
            let mut client = super::management_client(controller).await?;
            let s = client
                .status(StatusRequest {})
                .await
                .with_context(|| format!("status call to {controller} failed"))?
                .into_inner();
            if json {
                let io = s.io.unwrap_or_default();
                let v = serde_json::json!({
                    "volume": s.volume, "size": s.size, "epoch": s.epoch, "state": s.state,
                    "replicas_configured": s.replicas_configured, "write_quorum": s.write_quorum,
                    "nbd_address": s.nbd_address,
                    "attached_clients": s.attached_clients,
                    "last_snapshot_pause_us": s.last_snapshot_pause_us,
                    "lag_faults": s.lag_faults,
                    "write_quorum_latency_us": s.write_quorum_latency_us,
                    "flush_quorum_latency_us": s.flush_quorum_latency_us,
                    "schedules": s.schedules.iter().map(|b| serde_json::json!({
                        "cron": b.cron, "target": b.target, "next_run": b.next_run,
                        "last_finished": b.last_finished, "last_ok": b.last_ok,
                        "last_message": b.last_message, "last_bytes_uploaded": b.last_bytes_uploaded,
                        "last_duration_ms": b.last_duration_ms,
                        "retention": {"keep_last": b.keep_last, "keep_daily": b.keep_daily, "keep_weekly": b.keep_weekly},
                    })).collect::<Vec<_>>(),
                    "replicas": s.replicas.iter().map(|r| serde_json::json!({
                        "address": r.address, "state": r.state, "fault_reason": r.fault_reason,
                        "in_flight": r.in_flight, "ops_ok": r.ops_ok, "ops_failed": r.ops_failed,
                        "index_bytes": r.index_bytes,
                        "sync": {"kind": r.sync_kind, "done_bytes": r.sync_done_bytes, "total_bytes": r.sync_total_bytes,
                                 "rate_mib_s": r.sync_rate_mib, "eta_secs": r.sync_eta_secs},
                        "disk": {"flush_latency_us": r.flush_latency_us, "flush_latency_max_us": r.flush_latency_max_us,
                                 "write_latency_us": r.write_latency_us, "write_bytes_per_sec": r.write_bytes_per_sec,
                                 "slow": !r.slow_reason.is_empty(), "slow_reason": r.slow_reason},
                    })).collect::<Vec<_>>(),
                    "io": {"reads": io.reads, "writes": io.writes, "flushes": io.flushes, "trims": io.trims,
                           "errors": io.errors, "bytes_read": io.bytes_read, "bytes_written": io.bytes_written},
                });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("volume   {}", s.volume);
                println!(
                    "size     {} bytes ({:.1} GiB)",
                    s.size,
                    s.size as f64 / (1u64 << 30) as f64
                );
                println!(
                    "state    {} (write quorum {} of {})",
                    s.state, s.write_quorum, s.replicas_configured
                );
                println!("epoch    {}", s.epoch);
                println!("nbd      nbd://{}/{}", s.nbd_address, s.volume);
                println!("clients  {} attached", s.attached_clients);
                for b in &s.schedules {
                    let last = if b.last_finished == 0 {
                        "not run yet".to_string()
                    } else {
                        format!(
                            "last {} {}: {} ({} uploaded)",
                            super::snapshot::utc_readable(b.last_finished.max(0) as u64),
                            if b.last_ok { "ok" } else { "FAILED" },
                            b.last_message,
                            b.last_bytes_uploaded
                        )
                    };
                    println!(
                        "backup   \"{}\" to {}, next {}; {last}",
                        b.cron,
                        b.target,
                        super::snapshot::utc_readable(b.next_run.max(0) as u64)
                    );
                }
                println!();
                println!(
                    "{:<22} {:<8} {:>9} {:>12} {:>10} {:>9} {:>9} {:>9} {:>8}  reason",
                    "REPLICA",
                    "STATE",
                    "IN-FLIGHT",
                    "OPS-OK",
                    "OPS-FAILED",
                    "INDEX-KIB",
                    "FLUSH-MS",
                    "WRITE-US",
                    "MIB/S"
                );
                for r in &s.replicas {
                    let state = if r.slow_reason.is_empty() {
                        r.state.clone()
                    } else {
                        format!("{}*", r.state)
                    };
                    let reason = match (r.fault_reason.as_str(), r.slow_reason.as_str()) {
                        ("", "") => String::new(),
                        (f, "") => f.to_string(),
                        ("", slow) => format!("slow: {slow}"),
                        (f, slow) => format!("{f}; slow: {slow}"),
                    };
                    println!(
                        "{:<22} {:<8} {:>9} {:>12} {:>10} {:>9} {:>9.1} {:>9} {:>8.1}  {}",
                        r.address,
                        state,
                        r.in_flight,
                        r.ops_ok,
                        r.ops_failed,
                        r.index_bytes.div_ceil(1024),
                        r.flush_latency_us as f64 / 1000.0,
                        r.write_latency_us,
                        r.write_bytes_per_sec as f64 / (1u64 << 20) as f64,
                        reason
                    );
                }
                if let Some(io) = s.io {
                    println!();
                    println!(
                        "io       reads {}  writes {}  flushes {}  trims {}  errors {}  read {} MiB  written {} MiB",
                        io.reads,
                        io.writes,
                        io.flushes,
                        io.trims,
                        io.errors,
                        io.bytes_read >> 20,
                        io.bytes_written >> 20
                    );
                }
            }
            Ok(())
        }
    }
}

fn print_replicas(s: &VolumeStatus) {
    println!(
        "{:<22} {:<8} {:>9} {:>12} {:>10}  detail",
        "REPLICA", "STATE", "IN-FLIGHT", "OPS-OK", "OPS-FAILED"
    );
    for r in &s.replicas {
        let detail = if r.state == "syncing" {
            format!(
                "{} resync {}/{} MiB, {:.1} MiB/s, ETA {}s",
                r.sync_kind,
                r.sync_done_bytes >> 20,
                r.sync_total_bytes >> 20,
                r.sync_rate_mib,
                r.sync_eta_secs
            )
        } else {
            r.fault_reason.clone()
        };
        println!(
            "{:<22} {:<8} {:>9} {:>12} {:>10}  {}",
            r.address, r.state, r.in_flight, r.ops_ok, r.ops_failed, detail
        );
    }
}

/// `strata replica add|rm VOLUME ADDR`: asks the volume's controller.
pub async fn change_replicas(
    volume: &str,
    address: SocketAddr,
    controller: SocketAddr,
    add: bool,
) -> anyhow::Result<()> {
    let mut client = super::management_client(controller).await?;
    let current = client.status(StatusRequest {}).await?.into_inner();
    if current.volume != volume {
        anyhow::bail!(
            "the controller at {controller} serves volume {:?}, not {volume:?}",
            current.volume
        );
    }
    let req = ReplicaAddress {
        address: address.to_string(),
    };
    let s = if add {
        client.add_replica(req).await
    } else {
        client.remove_replica(req).await
    }
    .map_err(|e| {
        anyhow::anyhow!(
            "volume {volume}: {} {address} refused: {}",
            if add { "adding" } else { "removing" },
            e.message()
        )
    })?
    .into_inner();
    println!(
        "volume {volume}: {} {address}",
        if add { "added" } else { "removed" }
    );
    print_replicas(&s);
    Ok(())
}

async fn expand(volume: &str, size: u64, controller: SocketAddr, json: bool) -> anyhow::Result<()> {
    let mut client = super::snapshot::connect(volume, controller).await?;
    let r = client
        .expand_volume(ExpandRequest { size })
        .await
        .map_err(|e| anyhow::anyhow!("volume {volume}: expand failed: {}", e.message()))?
        .into_inner();
    if json {
        let v = serde_json::json!({
            "volume": volume, "old_size": r.old_size, "new_size": r.new_size,
            "rounded": r.rounded, "pause_us": r.pause_us,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    if r.rounded {
        println!(
            "{size} bytes is not a multiple of 4096: rounded up to {}",
            r.new_size
        );
    }
    if r.old_size == r.new_size {
        println!(
            "volume {volume} already has {} bytes: nothing to do",
            r.new_size
        );
    } else {
        println!(
            "volume {volume} grew from {} to {} bytes (IO held {:.1} ms); grow its filesystem now (resize2fs, xfs_growfs)",
            r.old_size,
            r.new_size,
            r.pause_us as f64 / 1e3
        );
    }
    Ok(())
}
