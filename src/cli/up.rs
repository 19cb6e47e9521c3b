//! `strata up`: the embedded default. Replica servers and a controller in
//! one process, data under `./strata-data`, NBD on 127.0.0.1:10809.
//! Running it again reopens the same data; Ctrl-C flushes and closes every
//! replica cleanly.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use super::parse_size;

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Volume size (e.g. 10G): a new volume is created with it, an existing
    /// smaller one grows to it (volumes never shrink).
    #[arg(long, default_value = "10G", value_parser = parse_size)]
    pub size: u64,
    /// Number of replicas (1 to 5). 3 survives the loss of any one.
    #[arg(long, default_value_t = 3)]
    pub replicas: usize,
    /// Where the replicas keep their data (one sub-directory each).
    #[arg(long, default_value = "./strata-data")]
    pub data_dir: PathBuf,
    /// Volume (and NBD export) name.
    #[arg(long, default_value = "strata")]
    pub volume: String,
    /// NBD listen address.
    #[arg(long, default_value = "127.0.0.1:10809")]
    pub nbd: SocketAddr,
    /// gRPC management address.
    #[arg(long, default_value = "127.0.0.1:10810")]
    pub control: SocketAddr,
    /// Prometheus `/metrics` address.
    #[arg(long, default_value = "127.0.0.1:10811")]
    pub metrics: SocketAddr,
    /// First replica server port on 127.0.0.1 (replica i listens on base + i); 0 picks free ports.
    #[arg(long, default_value_t = 0)]
    pub replica_port_base: u16,
    #[command(flatten)]
    pub backup: super::schedule::BackupFlags,
    /// Also serve iSCSI (default address 127.0.0.1:3260 when given without one).
    #[arg(long, num_args = 0..=1, default_missing_value = "127.0.0.1:3260")]
    pub iscsi: Option<SocketAddr>,
    /// iSCSI CHAP secrets file (else STRATA_ISCSI_CHAP_* environment
    /// variables; else, with a cluster key, CHAP credentials derived from
    /// it for the volume: `strata key chap`).
    #[arg(long)]
    pub chap_file: Option<PathBuf>,
    /// Serve iSCSI without CHAP even with a cluster key.
    #[arg(long, conflicts_with = "chap_file")]
    pub iscsi_no_chap: bool,
    #[command(flatten)]
    pub nbd_tls: super::nbd_tls::NbdTlsArgs,
    /// Encrypt the volume data between the controller and the replicas
    /// (as `controller serve --encrypt-replica-wire`; needs
    /// --cluster-key-file). Mostly to measure its cost: here both ends are
    /// on loopback.
    #[arg(long, env = "STRATA_ENCRYPT_REPLICA_WIRE")]
    pub encrypt_replica_wire: bool,
}

pub async fn run(
    args: UpArgs,
    auth: Option<std::sync::Arc<strata_replica::auth::ServerAuth>>,
) -> anyhow::Result<()> {
    if !(1..=5).contains(&args.replicas) {
        anyhow::bail!("--replicas must be between 1 and 5, not {}", args.replicas);
    }
    // Before anything starts: `--nbd-tls require` without a key fails here.
    let nbd_tls = args.nbd_tls.setup(&args.volume)?;
    super::set_wire_encryption(args.encrypt_replica_wire)?;
    std::fs::create_dir_all(&args.data_dir).with_context(|| {
        format!(
            "cannot create the data directory {}",
            args.data_dir.display()
        )
    })?;
    // Two stop signals: the controller stops (and flushes) first, the
    // replicas only after it, so the final flush still reaches them.
    let (tx, rx) = tokio::sync::watch::channel(false);
    let (replicas_tx, replicas_rx) = tokio::sync::watch::channel(false);
    let mut replica_tasks = Vec::new();
    let mut addrs = Vec::new();
    if auth.is_some() {
        tracing::info!("replicas require the cluster key (--cluster-key-file)");
    } else {
        tracing::info!("keyless: the replicas listen on loopback only and serve any local process (--cluster-key-file to require a cluster key)");
    }
    for i in 0..args.replicas {
        let dir = args.data_dir.join(format!("replica-{i}"));
        let port = if args.replica_port_base == 0 {
            0
        } else {
            args.replica_port_base + i as u16
        };
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .with_context(|| format!("cannot listen for replica {i} on 127.0.0.1:{port}"))?;
        addrs.push(listener.local_addr()?);
        let rx = replicas_rx.clone();
        let opts = strata_replica::node::NodeOptions {
            auth: auth.clone(),
            ..Default::default()
        };
        replica_tasks.push(tokio::spawn(async move {
            strata_replica::node::serve_node_with(&dir, listener, rx, opts).await
        }));
    }
    let (chap, chap_source) = super::target_chap(
        args.chap_file.as_deref(),
        &args.volume,
        args.iscsi_no_chap,
        args.iscsi,
    )?;
    let opts = strata_controller::run::ControllerOptions {
        assemble: strata_controller::assemble::AssembleOptions {
            volume: args.volume.clone(),
            replicas: addrs,
            create_size: Some(args.size),
            io_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            force_degraded: false,
            sync_rate: None,
            lag: strata_controller::replicator::LagPolicy::default(),
        },
        nbd: args.nbd,
        control: Some(args.control),
        metrics: Some(args.metrics),
        backup_defaults: args.backup.target_options()?,
        backup_schedules: args.backup.schedules.clone(),
        iscsi: args.iscsi,
        chap,
        nbd_tls: nbd_tls.clone(),
        auth: auth.clone(),
    };
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let controller = tokio::spawn(strata_controller::run::run_controller(
        opts,
        rx.clone(),
        Some(ready_tx),
    ));
    let signal_tx = tx.clone();
    tokio::spawn(async move {
        super::shutdown_signal().await;
        eprintln!("\nstopping: flushing and closing every replica...");
        let _ = signal_tx.send(true);
    });
    if let Ok(info) = ready_rx.await {
        if args.size > info.volume.size() {
            let e = info
                .volume
                .expand(args.size)
                .await
                .with_context(|| format!("volume {}: growing to --size failed", args.volume))?;
            println!(
                "volume {:?} grew from {} to {} bytes (--size)",
                args.volume, e.old_size, e.new_size
            );
        }
        let uri = format!("nbd://{}/{}", info.nbd, args.volume);
        println!(
            "strata is up: volume {:?}, {} GiB, {} replica(s) under {}",
            args.volume,
            info.volume.size() as f64 / (1u64 << 30) as f64,
            args.replicas,
            args.data_dir.display()
        );
        println!();
        println!("  NBD URI      {uri}");
        if let Some(t) = &nbd_tls {
            println!(
                "  NBD TLS      {}: nbds://{}@{}/{}?tls-psk-file=FILE with what \
                 `strata --cluster-key-file KEY key psk --volume {}` prints",
                t.mode(),
                t.identity(),
                info.nbd,
                args.volume,
                args.volume
            );
        }
        println!("  inspect      nbdinfo {uri}");
        println!(
            "  write+read   qemu-io -f raw -c 'write -P 0xab 0 1M' -c 'read -P 0xab 0 1M' {uri}"
        );
        println!("  as a file    mkdir -p /tmp/strata && nbdfuse /tmp/strata/disk {uri} &");
        println!(
            "  status       strata volume status --controller {}",
            args.control
        );
        println!("  metrics      curl http://{}/metrics", args.metrics);
        if let Some(a) = info.iscsi {
            let iqn = strata_controller::frontend::iscsi::target_name(&args.volume);
            println!("  iSCSI        iscsi://{a}/{iqn}/0   (iscsi-inq, qemu-io, iscsiadm -m discovery -t st -p {a})");
            match chap_source {
                super::ChapSource::ClusterKey => println!(
                    "  iSCSI CHAP   required: iscsi://USER%SECRET@{a}/{iqn}/0 with what \
                     `strata --cluster-key-file KEY key chap --volume {}` prints",
                    args.volume
                ),
                super::ChapSource::File | super::ChapSource::Env => println!(
                    "  iSCSI CHAP   required: iscsi://USER%SECRET@{a}/{iqn}/0 with the configured credentials"
                ),
                super::ChapSource::OptedOut | super::ChapSource::Off => {}
            }
        }
        println!();
        println!("Ctrl-C stops it cleanly; running `strata up` again reopens the same data.");
    }
    let result = controller.await.context("the controller task panicked")?;
    // Whatever ended the controller, stop the replicas cleanly too.
    let _ = replicas_tx.send(true);
    for t in replica_tasks {
        match t.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!("replica server stopped with an error: {e}"),
            Err(e) => tracing::error!("replica server task failed: {e}"),
        }
    }
    result?;
    Ok(())
}
