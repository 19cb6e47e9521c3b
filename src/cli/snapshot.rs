//! `strata snapshot create|ls|rm|revert` and `strata volume clone`: ask a
//! volume's controller, print a table (or `--json`).

use std::net::SocketAddr;

use anyhow::Context;
use clap::{Args, Subcommand};
use strata_proto::controller::volume_control_client::VolumeControlClient;
use strata_proto::controller::{
    CloneRequest, RevertRequest, SnapshotList, SnapshotRef, StatusRequest, VolumeStatus,
};
use tonic::transport::Channel;

#[derive(Debug, Args)]
pub struct Target {
    /// The volume.
    pub volume: String,
    /// The volume's controller (management address).
    #[arg(long, default_value = "127.0.0.1:10810")]
    pub controller: SocketAddr,
    /// Print JSON for scripts instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Take a crash-consistent snapshot (named snap-YYYYMMDD-HHMMSS if no
    /// name is given). New writes wait while it is taken.
    Create {
        #[command(flatten)]
        target: Target,
        name: Option<String>,
    },
    /// List snapshots, oldest first.
    Ls {
        #[command(flatten)]
        target: Target,
    },
    /// Delete a snapshot (its data merges into the next one; the volume
    /// reads the same). Refused while a backup reads it.
    Rm {
        #[command(flatten)]
        target: Target,
        name: String,
    },
    /// Revert the volume to a snapshot: every write since is discarded.
    Revert {
        #[command(flatten)]
        target: Target,
        name: String,
        /// Revert even with clients attached.
        #[arg(long)]
        force: bool,
        /// Also delete the snapshots newer than NAME.
        #[arg(long)]
        discard_newer: bool,
    },
}

/// Connects to the controller and checks it serves `volume`.
pub async fn connect(
    volume: &str,
    controller: SocketAddr,
) -> anyhow::Result<VolumeControlClient<Channel>> {
    Ok(connect_with_status(volume, controller).await?.0)
}

/// [`connect`], also returning the status it read.
pub async fn connect_with_status(
    volume: &str,
    controller: SocketAddr,
) -> anyhow::Result<(VolumeControlClient<Channel>, VolumeStatus)> {
    let mut client = super::management_client(controller)
        .await
        .with_context(|| format!("volume {volume}"))?;
    let status = client
        .status(StatusRequest {})
        .await
        .with_context(|| format!("volume {volume}: status call to {controller} failed"))?
        .into_inner();
    if status.volume != volume {
        anyhow::bail!(
            "the controller at {controller} serves volume {:?}, not {volume:?}",
            status.volume
        );
    }
    Ok((client, status))
}

/// `snap-YYYYMMDD-HHMMSS` in UTC.
pub fn default_name(prefix: &str) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format!("{prefix}-{}", utc_compact(secs))
}

/// `YYYYMMDD-HHMMSS` of a Unix time, UTC.
fn utc_compact(secs: u64) -> String {
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    let t = secs % 86_400;
    format!(
        "{y:04}{m:02}{d:02}-{:02}{:02}{:02}",
        t / 3600,
        t / 60 % 60,
        t % 60
    )
}

/// `YYYY-MM-DD HH:MM:SS` of a Unix time, UTC.
pub fn utc_readable(secs: u64) -> String {
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    let t = secs % 86_400;
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        t / 3600,
        t / 60 % 60,
        t % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn fail(volume: &str, what: &str, e: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("volume {volume}: {what} failed: {}", e.message())
}

fn print_list(list: &SnapshotList, json: bool) -> anyhow::Result<()> {
    if json {
        let v = serde_json::json!({
            "volume": list.volume,
            "snapshots": list.snapshots.iter().map(|s| serde_json::json!({
                "name": s.name, "created": s.created, "allocated_bytes": s.allocated,
                "size": s.size,
            })).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "{:<32} {:<20} {:>12} {:>14}",
        "SNAPSHOT", "CREATED (UTC)", "OWN DATA", "VOLUME SIZE"
    );
    for s in &list.snapshots {
        println!(
            "{:<32} {:<20} {:>9} MiB {:>10} MiB",
            s.name,
            utc_readable(s.created),
            s.allocated >> 20,
            s.size >> 20
        );
    }
    if list.snapshots.is_empty() {
        println!("(volume {} has no snapshots)", list.volume);
    }
    Ok(())
}

pub async fn run(cmd: SnapshotCommand) -> anyhow::Result<()> {
    match cmd {
        SnapshotCommand::Create { target, name } => {
            let name = name.unwrap_or_else(|| default_name("snap"));
            let mut c = connect(&target.volume, target.controller).await?;
            let made = c
                .create_snapshot(SnapshotRef { name: name.clone() })
                .await
                .map_err(|e| fail(&target.volume, &format!("snapshot {name}"), e))?
                .into_inner();
            if target.json {
                let v = serde_json::json!({"volume": target.volume, "snapshot": made.name, "pause_us": made.pause_us});
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "volume {}: snapshot {} taken (writes held {:.2} ms)",
                    target.volume,
                    made.name,
                    made.pause_us as f64 / 1000.0
                );
            }
        }
        SnapshotCommand::Ls { target } => {
            let mut c = connect(&target.volume, target.controller).await?;
            let list = c
                .list_snapshots(StatusRequest {})
                .await
                .map_err(|e| fail(&target.volume, "listing snapshots", e))?
                .into_inner();
            print_list(&list, target.json)?;
        }
        SnapshotCommand::Rm { target, name } => {
            let mut c = connect(&target.volume, target.controller).await?;
            let list = c
                .delete_snapshot(SnapshotRef { name: name.clone() })
                .await
                .map_err(|e| fail(&target.volume, &format!("deleting snapshot {name}"), e))?
                .into_inner();
            if !target.json {
                println!("volume {}: snapshot {name} deleted", target.volume);
            }
            print_list(&list, target.json)?;
        }
        SnapshotCommand::Revert {
            target,
            name,
            force,
            discard_newer,
        } => {
            let mut c = connect(&target.volume, target.controller).await?;
            let list = c
                .revert_snapshot(RevertRequest {
                    name: name.clone(),
                    force,
                    discard_newer,
                })
                .await
                .map_err(|e| fail(&target.volume, &format!("revert to snapshot {name}"), e))?
                .into_inner();
            if !target.json {
                println!("volume {}: reverted to snapshot {name}", target.volume);
            }
            print_list(&list, target.json)?;
        }
    }
    Ok(())
}

/// `strata volume clone VOLUME@SNAPSHOT NEW`.
pub async fn clone(
    source: &str,
    new: &str,
    controller: SocketAddr,
    json: bool,
) -> anyhow::Result<()> {
    let Some((volume, snapshot)) = source.split_once('@') else {
        anyhow::bail!("give the source as VOLUME@SNAPSHOT, not {source:?}");
    };
    let mut c = connect(volume, controller).await?;
    let reply = c
        .clone_volume(CloneRequest {
            snapshot: snapshot.to_string(),
            new_volume: new.to_string(),
        })
        .await
        .map_err(|e| fail(volume, &format!("clone of snapshot {snapshot} to {new}"), e))?
        .into_inner();
    if json {
        let v = serde_json::json!({"volume": reply.volume, "source": source, "replicas": reply.replicas});
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "volume {} created from {source} on {} replica servers (a full copy on each).",
            reply.volume,
            reply.replicas.len()
        );
        let args: Vec<String> = reply
            .replicas
            .iter()
            .map(|r| format!("--replica {r}"))
            .collect();
        println!("serve it with: strata controller serve --volume {} {} --nbd ADDR --control ADDR --metrics ADDR", reply.volume, args.join(" "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_utc_calendar_dates() {
        assert_eq!(utc_readable(0), "1970-01-01 00:00:00");
        assert_eq!(utc_readable(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(utc_compact(1_795_435_200), "20261123-120000");
    }
}
