//! `strata volume attach|detach|attachments|supervise|refresh-size`: the
//! host side of a volume as a block device. The work is in the
//! `strata-attach` crate (blocking, so it runs on tokio's blocking pool);
//! this file parses flags and prints.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Subcommand, ValueEnum};
use strata_attach::fallback::Chap;
use strata_attach::supervisor::{self, SupervisorOptions};
use strata_attach::{AttachOptions, IscsiOptions, Method, MethodChoice, TlsPsk};
use strata_controller::frontend::iscsi::ChapConfig;
use strata_controller::frontend::nbd::Psk;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MethodArg {
    /// Kernel nbd if the module is there, else iSCSI (open-iscsi), else
    /// nbdfuse + loop.
    Auto,
    KernelNbd,
    Iscsi,
    Nbdfuse,
}

#[derive(Debug, Subcommand)]
pub enum AttachCommand {
    /// Attach a volume as a block device on this host and print the device
    /// (/dev/nbdN). Needs root.
    Attach {
        /// The volume's NBD URI, e.g. nbd://10.0.0.5:10809/pg-data.
        uri: String,
        /// Stay in the foreground and keep the device connected across
        /// controller restarts (reconnect + RECONFIGURE); exits when the
        /// device is detached.
        #[arg(long)]
        supervise: bool,
        /// How long IO waits in the kernel for the controller to come back
        /// before it fails with an IO error.
        #[arg(long, default_value_t = 120)]
        dead_timeout_secs: u64,
        /// Seconds without a reply before the kernel declares the connection
        /// dead and requeues the request.
        #[arg(long, default_value_t = 10)]
        io_timeout_secs: u64,
        /// Use /dev/nbdINDEX instead of the first free device.
        #[arg(long)]
        index: Option<u32>,
        #[arg(long, value_enum, default_value_t = MethodArg::Auto)]
        method: MethodArg,
        /// The controller's iSCSI address for the iSCSI fallback
        /// (default: the URI's host, port 3260).
        #[arg(long)]
        iscsi_portal: Option<String>,
        /// CHAP secrets for the iSCSI fallback (`username = ...`,
        /// `secret = ...`), the controller's --chap-file format. Default:
        /// STRATA_ISCSI_CHAP_*, else with a cluster key (--cluster-key-file)
        /// the volume's credentials derived from it.
        #[arg(long)]
        chap_file: Option<PathBuf>,
        /// The volume's controller (management address): when given, attach
        /// refuses a volume that already has NBD clients (attached on
        /// another host) unless --force.
        #[arg(long)]
        controller: Option<SocketAddr>,
        /// Attach even if the controller reports other clients.
        #[arg(long)]
        force: bool,
        /// The PSK identity (user name) of NBD over TLS: the controller's
        /// --nbd-tls-username. With a cluster key the nbdfuse fallback
        /// connects over TLS with the volume's key derived from it (and is
        /// the only way to attach a controller with --nbd-tls require).
        #[arg(long, env = "STRATA_NBD_TLS_USERNAME", default_value = strata_controller::frontend::nbd::psk::DEFAULT_USERNAME, value_name = "NAME")]
        nbd_tls_username: String,
        #[arg(long, env = "STRATA_ATTACH_DIR", default_value = strata_attach::state::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
    /// Detach a device attached with `strata volume attach`.
    Detach {
        /// /dev/nbdN (or the loop or iSCSI device attach printed).
        device: String,
        #[arg(long, env = "STRATA_ATTACH_DIR", default_value = strata_attach::state::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
    /// List the devices attached on this host.
    Attachments {
        #[arg(long)]
        json: bool,
        #[arg(long, env = "STRATA_ATTACH_DIR", default_value = strata_attach::state::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
    /// Keep attached kernel nbd devices connected (all recorded ones, or
    /// the ones named): what `attach --supervise` does, for devices
    /// attached earlier or after a supervisor restart.
    Supervise {
        devices: Vec<String>,
        /// Seconds between probes (state files, STATUS, handshake).
        #[arg(long, default_value_t = 5)]
        probe_interval_secs: u64,
        #[arg(long, env = "STRATA_ATTACH_DIR", default_value = strata_attach::state::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
    /// Make an attached device show the volume's current size (after the
    /// volume grew). Refused while the device's connection was negotiated
    /// at the old size (the supervisor applies the size on its next
    /// reconnect) unless the server serves the new size on existing
    /// connections.
    RefreshSize {
        device: String,
        #[arg(long)]
        server_serves_new_size: bool,
        #[arg(long, env = "STRATA_ATTACH_DIR", default_value = strata_attach::state::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, strata_attach::AttachError> + Send + 'static,
) -> anyhow::Result<T> {
    Ok(tokio::task::spawn_blocking(f).await??)
}

async fn supervise(opts: SupervisorOptions) -> anyhow::Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    tokio::spawn(async move {
        super::shutdown_signal().await;
        s.store(true, Ordering::Relaxed);
    });
    blocking(move || supervisor::supervise(&opts, &stop)).await
}

/// Asks the volume's controller whether other NBD clients are attached
/// (another host's kernel): two hosts mounting one ext4 corrupt it.
async fn refuse_if_attached_elsewhere(
    uri: &str,
    controller: SocketAddr,
    force: bool,
) -> anyhow::Result<()> {
    let parsed = strata_attach::NbdUri::parse(uri)?;
    let (_, s) = super::snapshot::connect_with_status(&parsed.export, controller).await?;
    if s.attached_clients > 0 {
        if !force {
            anyhow::bail!(
                "volume {} already has {} NBD client(s) attached (attached on another host?); \
                 --force attaches anyway",
                s.volume,
                s.attached_clients
            );
        }
        eprintln!(
            "warning: volume {} has {} other client(s) attached; attaching anyway (--force)",
            s.volume, s.attached_clients
        );
    }
    Ok(())
}

pub async fn run(cmd: AttachCommand) -> anyhow::Result<()> {
    match cmd {
        AttachCommand::Attach {
            uri,
            supervise: stay,
            dead_timeout_secs,
            io_timeout_secs,
            index,
            method,
            iscsi_portal,
            chap_file,
            controller,
            force,
            nbd_tls_username,
            state_dir,
        } => {
            if let Some(ctl) = controller {
                refuse_if_attached_elsewhere(&uri, ctl, force).await?;
            }
            let secret = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
            // --chap-file, else STRATA_ISCSI_CHAP_*, else with a cluster
            // key the volume's credentials derived from it (what its
            // controller requires by default).
            let chap = match super::load_chap(chap_file.as_deref())? {
                Some(c) => Some(c),
                None => match strata_replica::auth::process_key() {
                    Some(key) => {
                        let volume = strata_attach::NbdUri::parse(&uri)?.export;
                        Some(ChapConfig::derived(key, &volume))
                    }
                    None => None,
                },
            };
            let chap = chap.map(|c| Chap {
                user: c.initiator.user.clone(),
                secret: secret(&c.initiator.secret),
                mutual: c
                    .mutual
                    .as_ref()
                    .map(|m| (m.user.clone(), secret(&m.secret))),
            });
            // With a cluster key: the volume's NBD TLS key, for the nbdfuse
            // fallback (and a controller that requires TLS). Never printed.
            let tls = match strata_replica::auth::process_key() {
                Some(key) => {
                    let volume = strata_attach::NbdUri::parse(&uri)?.export;
                    let psk = Psk::derived(key, &volume, &nbd_tls_username)?;
                    Some(TlsPsk {
                        username: psk.identity.clone(),
                        psk_file_text: psk.file_text(),
                    })
                }
                None => None,
            };
            let opts = AttachOptions {
                state_dir: state_dir.clone(),
                dead_timeout: Duration::from_secs(dead_timeout_secs),
                io_timeout: Duration::from_secs(io_timeout_secs.max(1)),
                index,
                methods: match method {
                    MethodArg::Auto => MethodChoice::Auto,
                    MethodArg::KernelNbd => MethodChoice::Only(Method::KernelNbd),
                    MethodArg::Iscsi => MethodChoice::Only(Method::Iscsi),
                    MethodArg::Nbdfuse => MethodChoice::Only(Method::NbdfuseLoop),
                },
                iscsi: IscsiOptions {
                    portal: iscsi_portal,
                    chap,
                },
                tls,
                ..AttachOptions::default()
            };
            let target = uri.clone();
            let done = blocking(move || strata_attach::attach(&uri, &opts))
                .await
                .with_context(|| format!("cannot attach {target}"))?;
            let a = &done.attachment;
            for s in &done.skipped {
                eprintln!("skipped {s}");
            }
            eprintln!(
                "attached {} at {} via {} ({}){}, {} bytes",
                a.uri,
                a.device,
                a.method.name(),
                a.method.note(),
                if a.uses_tls() {
                    ", over TLS (pre-shared key)"
                } else {
                    ""
                },
                a.size
            );
            if a.method == Method::KernelNbd && !stay {
                eprintln!(
                    "note: without a supervisor (`strata volume supervise` or --supervise) a controller restart \
                     fails IO after {} s",
                    a.dead_timeout_secs
                );
            }
            println!("{}", a.device);
            use std::io::Write;
            std::io::stdout().flush().ok();
            if stay {
                if a.method != Method::KernelNbd {
                    eprintln!("--supervise: nothing to supervise for {}", a.method.name());
                    return Ok(());
                }
                supervise(SupervisorOptions {
                    state_dir,
                    only: Some(vec![a.device.clone()]),
                    exit_when_detached: true,
                    ..SupervisorOptions::default()
                })
                .await?;
            }
            Ok(())
        }
        AttachCommand::Detach { device, state_dir } => {
            let d = device.clone();
            let a = blocking(move || strata_attach::detach(&d, &state_dir))
                .await
                .with_context(|| format!("cannot detach {device}"))?;
            eprintln!("detached {} ({})", a.device, a.uri);
            Ok(())
        }
        AttachCommand::Attachments { json, state_dir } => {
            let list = blocking(move || strata_attach::attachments(&state_dir)).await?;
            if json {
                let v: Vec<_> = list
                    .iter()
                    .map(|s| {
                        let a = &s.attachment;
                        serde_json::json!({
                            "device": a.device, "uri": a.uri, "method": a.method,
                            "attached": s.live, "size": a.size, "block_size": a.block_size,
                            "dead_timeout_secs": a.dead_timeout_secs,
                            "io_timeout_secs": a.io_timeout_secs,
                            "attached_at": a.attached_at, "note": a.method.note(),
                            "tls": a.uses_tls(),
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "{:<12} {:<13} {:<9} {:>12} {:<4} URI",
                    "DEVICE", "METHOD", "STATE", "SIZE", "TLS"
                );
                for s in &list {
                    let a = &s.attachment;
                    println!(
                        "{:<12} {:<13} {:<9} {:>12} {:<4} {}",
                        a.device,
                        a.method.name(),
                        if s.live { "attached" } else { "gone" },
                        a.size,
                        if a.uses_tls() { "yes" } else { "no" },
                        a.uri
                    );
                }
            }
            Ok(())
        }
        AttachCommand::Supervise {
            devices,
            probe_interval_secs,
            state_dir,
        } => {
            supervise(SupervisorOptions {
                state_dir,
                probe_interval: Duration::from_secs(probe_interval_secs.max(1)),
                exit_when_detached: false,
                only: (!devices.is_empty()).then_some(devices),
                ..SupervisorOptions::default()
            })
            .await
        }
        AttachCommand::RefreshSize {
            device,
            server_serves_new_size,
            state_dir,
        } => {
            let d = device.clone();
            let size = blocking(move || {
                strata_attach::refresh_size(
                    &d,
                    &AttachOptions {
                        state_dir,
                        ..AttachOptions::default()
                    },
                    server_serves_new_size,
                )
            })
            .await
            .with_context(|| format!("cannot refresh the size of {device}"))?;
            println!("{device} {size}");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::super::volume::VolumeCommand;
    use super::super::{Cli, Command};
    use super::AttachCommand;

    fn parse(args: &[&str]) -> Result<AttachCommand, String> {
        let cli = Cli::try_parse_from(std::iter::once("strata").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        match cli.command {
            Command::Volume(VolumeCommand::Attach(c)) => Ok(c),
            other => Err(format!("parsed as {other:?}")),
        }
    }

    #[test]
    fn attach_commands_parse_under_volume() {
        let c = parse(&[
            "volume",
            "attach",
            "nbd://h:1/v",
            "--supervise",
            "--dead-timeout-secs",
            "30",
        ])
        .unwrap();
        assert!(matches!(
            c,
            AttachCommand::Attach { ref uri, supervise: true, dead_timeout_secs: 30, io_timeout_secs: 10, .. }
                if uri == "nbd://h:1/v"
        ));
        assert!(matches!(
            parse(&["volume", "detach", "/dev/nbd0"]).unwrap(),
            AttachCommand::Detach { ref device, .. } if device == "/dev/nbd0"
        ));
        assert!(matches!(
            parse(&["volume", "attachments", "--json"]).unwrap(),
            AttachCommand::Attachments { json: true, .. }
        ));
        assert!(matches!(
            parse(&["volume", "supervise"]).unwrap(),
            AttachCommand::Supervise { ref devices, probe_interval_secs: 5, .. } if devices.is_empty()
        ));
        assert!(matches!(
            parse(&["volume", "attach", "nbd://h:1/v"]).unwrap(),
            AttachCommand::Attach { ref nbd_tls_username, .. } if nbd_tls_username == "strata"
        ));
        assert!(matches!(
            parse(&["volume", "attach", "nbd://h:1/v", "--nbd-tls-username", "alice"]).unwrap(),
            AttachCommand::Attach { ref nbd_tls_username, .. } if nbd_tls_username == "alice"
        ));
        assert!(parse(&["volume", "attach"]).is_err(), "a URI is required");
        assert!(parse(&["volume", "attach", "u", "--method", "floppy"]).is_err());
        // The existing volume commands still parse beside the flattened ones.
        assert!(parse(&["volume", "status"]).unwrap_err().contains("Status"));
    }
}
