//! Command-line definitions (clap) and dispatch to the roles.

mod attach;
mod backup;
mod csi;
mod nbd_tls;
mod schedule;
mod size;
mod snapshot;
mod up;
mod volume;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

pub use size::parse_size;

#[derive(Debug, Parser)]
#[command(
    name = "strata",
    version,
    about = "Replicated block storage for small Kubernetes clusters"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Async worker threads. Default: 1 for `replica serve` and
    /// `controller serve` (one thread hands requests between tasks without
    /// waking another core; blocking disk work has its own pool), the
    /// number of cores for everything else.
    #[arg(long, global = true, env = "STRATA_THREADS", value_parser = clap::value_parser!(u16).range(1..=256))]
    pub threads: Option<u16>,
    /// The cluster key file (`strata key init`): replica servers and
    /// controllers' management APIs then serve only peers that prove it,
    /// and clients prove it to them (and check them); controllers require
    /// iSCSI CHAP and offer NBD TLS with secrets derived from it. Without
    /// it everything is keyless. (Not `--key-file`:
    /// that is the backup encryption key of the backup commands.)
    #[arg(
        long,
        global = true,
        env = "STRATA_CLUSTER_KEY_FILE",
        value_name = "PATH"
    )]
    pub cluster_key_file: Option<PathBuf>,
}

impl Cli {
    /// Worker threads for the async runtime, or `None` for tokio's default
    /// (one per core).
    pub fn worker_threads(&self) -> Option<usize> {
        match self.threads {
            Some(n) => Some(n as usize),
            None if self.command.is_single_role_server() => Some(1),
            None => None,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start a replicated volume on this machine: replicas and a controller
    /// in one process, NBD on 127.0.0.1:10809. Ctrl-C stops it cleanly.
    Up(up::UpArgs),
    /// Replica server commands.
    #[command(subcommand)]
    Replica(ReplicaCommand),
    /// Controller commands.
    #[command(subcommand)]
    Controller(ControllerCommand),
    /// Ask a volume's controller about the volume.
    #[command(subcommand)]
    Volume(volume::VolumeCommand),
    /// Snapshots of a volume, through its controller.
    #[command(subcommand)]
    Snapshot(snapshot::SnapshotCommand),
    /// Backups in S3 or a directory: list, verify, restore, retention, gc.
    #[command(subcommand)]
    Backup(backup::BackupCommand),
    /// The Kubernetes CSI driver: `strata csi --mode controller|node`.
    Csi(csi::CsiArgs),
    /// The cluster key, and what is derived from it for clients: a
    /// volume's iSCSI CHAP credentials, its NBD TLS pre-shared key.
    #[command(subcommand)]
    Key(KeyCommand),
}

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Write a new random cluster key (hex, mode 0600); never overwrites.
    Init {
        /// Where to write it.
        #[arg(long, default_value = "strata.key")]
        out: PathBuf,
    },
    /// Print a volume's iSCSI CHAP credentials derived from the cluster
    /// key (--cluster-key-file), in the --chap-file format: what a
    /// controller with the key requires of initiators (iscsiadm, libiscsi).
    Chap {
        /// The volume.
        #[arg(long)]
        volume: String,
    },
    /// Print a volume's NBD TLS pre-shared key derived from the cluster
    /// key (--cluster-key-file) as a psktool `username:hexkey` line: the
    /// key a controller with the cluster key offers (or, with --nbd-tls
    /// require, demands). Save it as the file of an `nbds://` URI's
    /// tls-psk-file (nbdinfo, nbdcopy, libnbd), or as keys.psk in the dir
    /// of qemu's tls-creds-psk object.
    Psk {
        /// The volume.
        #[arg(long)]
        volume: String,
        /// The user name (PSK identity) the line is for: the controller's
        /// --nbd-tls-username.
        #[arg(long, default_value = strata_controller::frontend::nbd::psk::DEFAULT_USERNAME)]
        username: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ReplicaCommand {
    /// Add a replica server to a running volume: the replica is created
    /// there and rebuilt in the background while IO continues.
    Add {
        volume: String,
        address: SocketAddr,
        /// The volume's controller (management address).
        #[arg(long, default_value = "127.0.0.1:10810")]
        controller: SocketAddr,
    },
    /// Remove a replica from a running volume (refused below write quorum).
    Rm {
        volume: String,
        address: SocketAddr,
        #[arg(long, default_value = "127.0.0.1:10810")]
        controller: SocketAddr,
    },
    /// Serve the replicas stored under a directory (data wire and gRPC
    /// control on one port).
    Serve {
        /// Directory holding one sub-directory per volume.
        #[arg(long)]
        dir: PathBuf,
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:10900")]
        listen: SocketAddr,
        #[command(flatten)]
        writeback: WritebackArgs,
        /// Refuse data-wire clients (controllers) that do not ask for
        /// encrypted records (`controller serve --encrypt-replica-wire`).
        /// Needs the cluster key. Without it both modes are served.
        #[arg(long, env = "STRATA_REQUIRE_WIRE_ENCRYPTION")]
        require_wire_encryption: bool,
    },
}

/// How a replica server bounds the data it holds unflushed.
#[derive(Debug, Clone, clap::Args)]
pub struct WritebackArgs {
    /// The longest a FLUSH (or a clean stop) should wait for the disk, in
    /// milliseconds: each replica keeps at most what its disk was measured
    /// to write back in that time unflushed, writing back continuously and
    /// making writes wait beyond that.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(50..=60_000))]
    pub flush_target_ms: u64,
    /// A fixed bound on each replica's unflushed data in MiB, instead of
    /// the measured one.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=65_536))]
    pub dirty_limit_mib: Option<u64>,
    /// Let the kernel's dirty limits decide (no bound, no early writeback).
    #[arg(long, conflicts_with_all = ["flush_target_ms", "dirty_limit_mib"])]
    pub no_writeback_bound: bool,
}

impl WritebackArgs {
    pub fn config(&self) -> strata_replica::WritebackConfig {
        strata_replica::WritebackConfig {
            flush_target: std::time::Duration::from_millis(self.flush_target_ms),
            fixed_limit: self.dirty_limit_mib.map(|m| m << 20),
            disabled: self.no_writeback_bound,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum ControllerCommand {
    /// Serve one volume over NBD, replicating to the given replicas.
    Serve(ControllerArgs),
}

#[derive(Debug, Args)]
pub struct ControllerArgs {
    /// Volume name.
    #[arg(long)]
    pub volume: String,
    /// A replica server address; repeat for each replica (1 to 5). Or
    /// STRATA_REPLICAS, the addresses separated by commas (what the CSI
    /// driver's controller pods use).
    #[arg(
        long = "replica",
        required = true,
        env = "STRATA_REPLICAS",
        value_delimiter = ','
    )]
    pub replicas: Vec<SocketAddr>,
    /// NBD listen address.
    #[arg(long, default_value = "127.0.0.1:10809")]
    pub nbd: SocketAddr,
    /// gRPC management address (`strata volume status` talks to it).
    #[arg(long, default_value = "127.0.0.1:10810")]
    pub control: SocketAddr,
    /// Prometheus `/metrics` address.
    #[arg(long, default_value = "127.0.0.1:10811")]
    pub metrics: SocketAddr,
    /// Create missing replicas with this size (e.g. 10G).
    #[arg(long, value_parser = parse_size)]
    pub create_size: Option<u64>,
    /// Seconds before a replica request is declared failed (and the replica faulted).
    #[arg(long, default_value_t = 10)]
    pub io_timeout_secs: u64,
    /// Start even if fewer than a majority of replicas are reachable. Writes
    /// acknowledged only by the missing replicas may be lost: use only when
    /// they are gone for good.
    #[arg(long)]
    pub force_degraded: bool,
    /// Cap on resync/rebuild bandwidth in MiB/s (0: unlimited).
    #[arg(long, default_value_t = 0)]
    pub sync_rate_mib: u64,
    /// A replica still silent this many times its peers' recent latency
    /// after they answered is faulted as lagging (and resynced when it
    /// answers again) instead of holding the request up to
    /// --io-timeout-secs. 0 turns this off.
    #[arg(long, default_value_t = 8)]
    pub lag_multiplier: u32,
    /// The least time a lagging replica is given after its peers answered,
    /// in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub lag_floor_ms: u64,
    #[command(flatten)]
    pub backup: schedule::BackupFlags,
    /// Also serve the volume over iSCSI on this address
    /// (target iqn.2026-11.io.strata:<volume>, LUN 0).
    #[arg(long)]
    pub iscsi: Option<SocketAddr>,
    /// iSCSI CHAP secrets file (`username = ...`, `secret = ...`, optional
    /// `mutual_username`/`mutual_secret`); else the STRATA_ISCSI_CHAP_*
    /// environment variables; else, with a cluster key, CHAP credentials
    /// derived from it for the volume (`strata key chap`); else none.
    #[arg(long)]
    pub chap_file: Option<PathBuf>,
    /// Serve iSCSI without CHAP even with a cluster key: any initiator
    /// that reaches the port can then read and change the volume.
    #[arg(long, conflicts_with = "chap_file")]
    pub iscsi_no_chap: bool,
    #[command(flatten)]
    pub nbd_tls: nbd_tls::NbdTlsArgs,
    /// Encrypt the volume data on the wire to the replicas (AES-256-GCM
    /// records instead of integrity-only ones): replication, rebuild,
    /// resync and snapshot copies. Needs the cluster key; a replica that
    /// does not offer encryption is refused.
    #[arg(long, env = "STRATA_ENCRYPT_REPLICA_WIRE")]
    pub encrypt_replica_wire: bool,
}

/// Why wire-encryption settings cannot be applied.
#[derive(Debug, thiserror::Error)]
pub enum WireEncryptionSetupError {
    #[error("{0} needs the cluster key: --cluster-key-file PATH or STRATA_CLUSTER_KEY_FILE (records are encrypted with keys derived from it)")]
    NoKey(&'static str),
}

/// Makes this process ask for encrypted data-wire records when `on`
/// (`--encrypt-replica-wire`); the cluster key must be loaded.
pub fn set_wire_encryption(on: bool) -> Result<(), WireEncryptionSetupError> {
    if on {
        if strata_replica::auth::process_key().is_none() {
            return Err(WireEncryptionSetupError::NoKey("--encrypt-replica-wire"));
        }
        strata_replica::auth::set_process_wire_encryption(true);
        tracing::info!("replica wire: volume data encrypted (AES-256-GCM records)");
    }
    Ok(())
}

/// A client of the controller's management API at `controller`, through
/// the cluster-key handshake when this process has the key.
pub async fn management_client(
    controller: std::net::SocketAddr,
) -> anyhow::Result<
    strata_proto::controller::volume_control_client::VolumeControlClient<tonic::transport::Channel>,
> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{controller}"))?
        .connect_timeout(Duration::from_secs(10));
    let channel = strata_replica::auth::grpc_channel(
        endpoint,
        controller,
        strata_replica::auth::process_key(),
        strata_replica::auth::Purpose::Manage,
    )
    .await
    .with_context(|| format!("cannot reach the controller at {controller}"))?;
    Ok(strata_proto::controller::volume_control_client::VolumeControlClient::new(channel))
}

/// CHAP secrets from `--chap-file`, else from the environment.
pub fn load_chap(
    file: Option<&std::path::Path>,
) -> anyhow::Result<Option<strata_controller::frontend::iscsi::ChapConfig>> {
    use strata_controller::frontend::iscsi::ChapConfig;
    match file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the CHAP file {}", path.display()))?;
            let chap = ChapConfig::parse(&text)
                .with_context(|| format!("bad CHAP file {}", path.display()))?;
            Ok(Some(chap))
        }
        None => ChapConfig::from_env().context("bad STRATA_ISCSI_CHAP_* environment"),
    }
}

/// Why CHAP settings cannot be worked out.
#[derive(Debug, thiserror::Error)]
pub enum ChapSetupError {
    #[error("--iscsi-no-chap contradicts the STRATA_ISCSI_CHAP_* environment variables")]
    NoChapWithEnv,
    #[error("`strata key chap` needs the cluster key: --cluster-key-file PATH or STRATA_CLUSTER_KEY_FILE")]
    NoKey,
    #[error("{0:?} is not a volume name (1 to 64 of A-Z a-z 0-9 . _ -)")]
    BadVolume(String),
}

/// Where the iSCSI target's CHAP settings come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChapSource {
    File,
    Env,
    /// Derived from the cluster key for the volume.
    ClusterKey,
    /// `--iscsi-no-chap`.
    OptedOut,
    /// No key, nothing configured.
    Off,
}

impl ChapSource {
    fn describe(self) -> &'static str {
        match self {
            ChapSource::File => "required, from --chap-file",
            ChapSource::Env => "required, from STRATA_ISCSI_CHAP_*",
            ChapSource::ClusterKey => "required, credentials derived from the cluster key for this volume (`strata key chap --volume NAME` prints them)",
            ChapSource::OptedOut => "off (--iscsi-no-chap): any initiator that reaches the port can read and change the volume",
            ChapSource::Off => "off (no cluster key, no --chap-file)",
        }
    }
}

/// The iSCSI target's CHAP: `--chap-file`, else the STRATA_ISCSI_CHAP_*
/// environment, else with a cluster key the credentials derived from it
/// for `volume` (required, mutual offered) unless `no_chap`, else none.
/// When `iscsi` is served, logs which (never a secret).
pub fn target_chap(
    file: Option<&std::path::Path>,
    volume: &str,
    no_chap: bool,
    iscsi: Option<SocketAddr>,
) -> anyhow::Result<(
    Option<strata_controller::frontend::iscsi::ChapConfig>,
    ChapSource,
)> {
    use strata_controller::frontend::iscsi::ChapConfig;
    let given = load_chap(file)?;
    let key = strata_replica::auth::process_key();
    let (chap, source) = match (given, no_chap) {
        (Some(_), true) => return Err(ChapSetupError::NoChapWithEnv.into()),
        (Some(c), false) if file.is_some() => (Some(c), ChapSource::File),
        (Some(c), false) => (Some(c), ChapSource::Env),
        (None, true) => (None, ChapSource::OptedOut),
        (None, false) => match key {
            Some(key) => (
                Some(ChapConfig::derived(key, volume)),
                ChapSource::ClusterKey,
            ),
            None => (None, ChapSource::Off),
        },
    };
    if let Some(addr) = iscsi {
        let mode = match &chap {
            Some(c) if c.mutual.is_some() => "one-way, mutual offered",
            Some(_) => "one-way",
            None => "none",
        };
        tracing::info!(%addr, volume, chap = mode, "iSCSI CHAP {}", source.describe());
        if chap.is_none() && !addr.ip().is_loopback() {
            tracing::warn!(%addr, "iSCSI listens on a non-loopback address without CHAP: anyone who can reach it can read and change the volume");
        }
    }
    Ok((chap, source))
}

/// `strata key chap`: the derived CHAP credentials of `volume` in the
/// `--chap-file` format.
fn print_derived_chap(volume: &str) -> anyhow::Result<()> {
    use strata_controller::frontend::iscsi::{target_name, ChapConfig};
    if !strata_replica::host::valid_volume_name(volume) {
        return Err(ChapSetupError::BadVolume(volume.to_string()).into());
    }
    let key = strata_replica::auth::process_key().ok_or(ChapSetupError::NoKey)?;
    let chap = ChapConfig::derived(key, volume);
    println!(
        "# iSCSI CHAP credentials of volume {volume} (target {}),",
        target_name(volume)
    );
    println!("# derived from the cluster key. Keep them secret: they open the volume.");
    println!("# strata volume attach --chap-file FILE reads this file; for iscsiadm set");
    println!("# node.session.auth.username/password (and username_in/password_in to");
    println!("# check the target: mutual CHAP).");
    print!("{}", chap.file_text());
    Ok(())
}

impl ControllerArgs {
    /// The controller's options; `auth` is the process's cluster key as
    /// servers hold it (what `run` loaded from --cluster-key-file).
    pub fn options(
        &self,
        auth: Option<std::sync::Arc<strata_replica::auth::ServerAuth>>,
    ) -> anyhow::Result<strata_controller::run::ControllerOptions> {
        Ok(strata_controller::run::ControllerOptions {
            assemble: strata_controller::assemble::AssembleOptions {
                volume: self.volume.clone(),
                replicas: self.replicas.clone(),
                create_size: self.create_size,
                io_timeout: Duration::from_secs(self.io_timeout_secs.max(1)),
                connect_timeout: Duration::from_secs(5),
                force_degraded: self.force_degraded,
                sync_rate: (self.sync_rate_mib > 0).then_some(self.sync_rate_mib << 20),
                lag: strata_controller::replicator::LagPolicy {
                    floor: Duration::from_millis(self.lag_floor_ms),
                    multiplier: self.lag_multiplier,
                },
            },
            nbd: self.nbd,
            control: Some(self.control),
            metrics: Some(self.metrics),
            backup_defaults: self.backup.target_options()?,
            backup_schedules: self.backup.schedules.clone(),
            iscsi: self.iscsi,
            chap: target_chap(
                self.chap_file.as_deref(),
                &self.volume,
                self.iscsi_no_chap,
                self.iscsi,
            )?
            .0,
            nbd_tls: self.nbd_tls.setup(&self.volume)?,
            auth,
        })
    }
}

impl Command {
    /// True for the long-running roles (they serve sockets).
    /// A server playing one role, one process per node or per volume:
    /// `replica serve` and `controller serve`.
    fn is_single_role_server(&self) -> bool {
        matches!(
            self,
            Command::Replica(ReplicaCommand::Serve { .. })
                | Command::Controller(ControllerCommand::Serve(_))
        )
    }

    pub fn is_server(&self) -> bool {
        matches!(
            self,
            Command::Up(_)
                | Command::Replica(ReplicaCommand::Serve { .. })
                | Command::Controller(_)
                | Command::Csi(_)
        )
    }
}

/// Resolves when Ctrl-C or SIGTERM arrives.
pub async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending::<()>().await } } => {},
    }
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let require_encryption = matches!(
        cli.command,
        Command::Replica(ReplicaCommand::Serve {
            require_wire_encryption: true,
            ..
        })
    );
    let auth = match &cli.cluster_key_file {
        Some(path) => {
            let key = strata_replica::auth::ClusterKey::load(path)?;
            strata_replica::auth::set_process_key(key.clone());
            tracing::info!(path = %path.display(), "cluster key loaded");
            Some(std::sync::Arc::new(
                strata_replica::auth::ServerAuth::new(key).requiring_encryption(require_encryption),
            ))
        }
        None if require_encryption => {
            return Err(WireEncryptionSetupError::NoKey("--require-wire-encryption").into())
        }
        None => None,
    };
    match cli.command {
        Command::Key(KeyCommand::Init { out }) => {
            strata_replica::auth::ClusterKey::generate().write_new(&out)?;
            println!("wrote a new cluster key to {}", out.display());
            Ok(())
        }
        Command::Key(KeyCommand::Chap { volume }) => print_derived_chap(&volume),
        Command::Key(KeyCommand::Psk { volume, username }) => {
            nbd_tls::print_psk(&volume, &username)
        }
        Command::Up(args) => up::run(args, auth).await,
        Command::Replica(ReplicaCommand::Serve {
            dir,
            listen,
            writeback,
            require_wire_encryption,
        }) => {
            if require_wire_encryption {
                tracing::info!(
                    "data wire: refusing clients that do not encrypt (--require-wire-encryption)"
                );
            }
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("cannot listen on {listen}"))?;
            let (tx, rx) = tokio::sync::watch::channel(false);
            tokio::spawn(async move {
                shutdown_signal().await;
                let _ = tx.send(true);
            });
            tracing::info!(dir = %dir.display(), %listen, "replica server starting");
            let opts = strata_replica::node::NodeOptions {
                writeback: writeback.config(),
                auth,
                ..Default::default()
            };
            strata_replica::node::serve_node_with(&dir, listener, rx, opts).await?;
            Ok(())
        }
        Command::Replica(ReplicaCommand::Add {
            volume,
            address,
            controller,
        }) => volume::change_replicas(&volume, address, controller, true).await,
        Command::Replica(ReplicaCommand::Rm {
            volume,
            address,
            controller,
        }) => volume::change_replicas(&volume, address, controller, false).await,
        Command::Controller(ControllerCommand::Serve(args)) => {
            set_wire_encryption(args.encrypt_replica_wire)?;
            let (tx, rx) = tokio::sync::watch::channel(false);
            tokio::spawn(async move {
                shutdown_signal().await;
                let _ = tx.send(true);
            });
            strata_controller::run::run_controller(args.options(auth)?, rx, None).await?;
            Ok(())
        }
        Command::Volume(cmd) => volume::run(cmd).await,
        Command::Snapshot(cmd) => snapshot::run(cmd).await,
        Command::Backup(cmd) => backup::run(cmd).await,
        Command::Csi(args) => csi::run(args).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn threads(args: &[&str]) -> Result<Option<usize>, clap::Error> {
        let args = std::iter::once("strata").chain(args.iter().copied());
        Cli::try_parse_from(args).map(|c| c.worker_threads())
    }

    #[test]
    fn iscsi_no_chap_conflicts_with_a_chap_file() {
        let base = [
            "strata",
            "controller",
            "serve",
            "--volume",
            "v",
            "--replica",
            "127.0.0.1:1",
        ];
        let with = |extra: &[&str]| Cli::try_parse_from(base.iter().chain(extra.iter()));
        assert!(with(&["--iscsi-no-chap"]).is_ok());
        assert!(with(&["--chap-file", "f"]).is_ok());
        assert!(with(&["--chap-file", "f", "--iscsi-no-chap"]).is_err());
        assert!(
            Cli::try_parse_from(["strata", "up", "--chap-file", "f", "--iscsi-no-chap"]).is_err()
        );
        assert!(Cli::try_parse_from(["strata", "key", "chap"]).is_err());
    }

    #[test]
    fn servers_default_to_one_worker_thread() {
        let replica = ["replica", "serve", "--dir", "/d"];
        let controller = [
            "controller",
            "serve",
            "--volume",
            "v",
            "--replica",
            "127.0.0.1:1",
        ];
        assert_eq!(threads(&replica).unwrap(), Some(1));
        assert_eq!(threads(&controller).unwrap(), Some(1));
        // `up` runs every role in one process: one worker per core.
        assert_eq!(threads(&["up"]).unwrap(), None);
        assert_eq!(threads(&["volume", "status"]).unwrap(), None);
        let mut more = replica.to_vec();
        more.extend(["--threads", "3"]);
        assert_eq!(threads(&more).unwrap(), Some(3));
        assert_eq!(threads(&["--threads", "2", "up"]).unwrap(), Some(2));
        for bad in ["0", "-1", "many", "257"] {
            let mut args = replica.to_vec();
            args.extend(["--threads", bad]);
            assert!(threads(&args).is_err(), "--threads {bad} accepted");
        }
    }
}
