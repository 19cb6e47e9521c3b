//! `strata csi`: the Kubernetes CSI driver (controller or node plugin),
//! and `strata csi crd` (the StrataVolume CRD, for `deploy/`).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use strata_csi::serve::{self, ControllerSettings, Mode, NodeSettings};
use strata_csi::Endpoint;

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct CsiArgs {
    #[command(subcommand)]
    pub command: Option<CsiCommand>,
    #[command(flatten)]
    pub serve: CsiServeArgs,
}

#[derive(Debug, Subcommand)]
pub enum CsiCommand {
    /// Print the StrataVolume CustomResourceDefinition (JSON, for
    /// `kubectl apply -f -`).
    Crd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CsiMode {
    /// Identity + Controller: provisioning, snapshots, expansion (one per
    /// cluster, beside the provisioner sidecar; it does the resizer's and
    /// snapshotter's work itself).
    Controller,
    /// Identity + Node: attach, format, mount (one per node).
    Node,
    /// Identity + Controller + Node in one process (a single-node cluster;
    /// csi-sanity's whole-lifecycle specs).
    All,
}

#[derive(Debug, Args)]
pub struct CsiServeArgs {
    /// Where to serve CSI: unix:///path/csi.sock or tcp://IP:PORT.
    #[arg(long, env = "CSI_ENDPOINT", default_value = "unix:///csi/csi.sock")]
    pub endpoint: String,
    #[arg(long, value_enum)]
    pub mode: Option<CsiMode>,
    /// Node mode: this node's name (the Downward API's spec.nodeName).
    #[arg(long, env = "NODE_NAME")]
    pub node_id: Option<String>,
    /// Controller mode: the namespace of StrataVolumes and the volume
    /// controllers' Deployments and Services.
    #[arg(long, env = "POD_NAMESPACE", default_value = "strata-system")]
    pub namespace: String,
    /// Controller mode: the image the volume controller pods run (this
    /// driver's own image, as scripts/build-image.sh names it).
    #[arg(
        long,
        env = "STRATA_IMAGE",
        default_value = concat!("docker.io/strata/strata:", env!("CARGO_PKG_VERSION"))
    )]
    pub image: String,
    /// Controller mode: imagePullPolicy of the volume controller pods.
    #[arg(long, env = "STRATA_IMAGE_PULL_POLICY")]
    pub image_pull_policy: Option<String>,
    /// Controller mode: the port every node's replica server listens on.
    #[arg(long, default_value_t = 10900)]
    pub replica_port: u16,
    /// How long a call waits for a new volume's controller pod to answer,
    /// in seconds (controller: snapshots, expansion; node: NodeStage).
    #[arg(long, default_value_t = 60)]
    pub controller_wait_secs: u64,
    /// Controller mode: replace a replica whose node has been gone or
    /// NotReady this many seconds (0: never replace). A node back sooner
    /// catches up by delta resync; a replacement is a full copy.
    #[arg(long, default_value_t = 600)]
    pub replace_replica_after_secs: u64,
    /// Controller mode: the Secret (in --namespace) holding the cluster key,
    /// created with a new random key when missing; the volume controller
    /// pods mount it. Without it the volume controller pods get no key.
    #[arg(long, env = "STRATA_CLUSTER_KEY_SECRET")]
    pub cluster_key_secret: Option<String>,
    /// Serve `GET /healthz` on this address for the kubelet's liveness
    /// probe (200 when this process's CSI endpoint answers Probe); none
    /// when unset.
    #[arg(long)]
    pub health_listen: Option<std::net::SocketAddr>,
    /// Node mode: where attachments are recorded.
    #[arg(long, default_value = strata_attach::state::DEFAULT_STATE_DIR)]
    pub attach_state_dir: PathBuf,
}

pub async fn run(args: CsiArgs) -> anyhow::Result<()> {
    if let Some(CsiCommand::Crd) = args.command {
        println!("{}", strata_csi::crd::crd_json());
        return Ok(());
    }
    let a = args.serve;
    let endpoint = Endpoint::parse(&a.endpoint)?;
    let mode = match a.mode {
        Some(CsiMode::Controller) => Mode::Controller,
        Some(CsiMode::Node) => Mode::Node,
        Some(CsiMode::All) => Mode::All,
        None => anyhow::bail!("--mode controller|node|all is required"),
    };
    let node = match mode {
        Mode::Node | Mode::All => Some(NodeSettings {
            node_id: a
                .node_id
                .filter(|n| !n.is_empty())
                .ok_or_else(|| anyhow::anyhow!("node mode needs --node-id (or NODE_NAME)"))?,
            attach_state_dir: a.attach_state_dir,
            controller_wait: Duration::from_secs(a.controller_wait_secs),
        }),
        Mode::Controller => None,
    };
    if a.cluster_key_secret.is_some() && strata_replica::auth::process_key().is_some() {
        anyhow::bail!(
            "give the cluster key either as --cluster-key-file or as --cluster-key-secret, not both"
        );
    }
    let controller = (mode != Mode::Node).then(|| ControllerSettings {
        namespace: a.namespace,
        image: a.image,
        image_pull_policy: a.image_pull_policy,
        replica_port: a.replica_port,
        controller_wait: Duration::from_secs(a.controller_wait_secs),
        replace_replica_after: (a.replace_replica_after_secs > 0)
            .then(|| Duration::from_secs(a.replace_replica_after_secs)),
        cluster_key_secret: a.cluster_key_secret,
    });
    serve::serve(
        endpoint,
        mode,
        controller,
        node,
        a.health_listen,
        super::shutdown_signal(),
    )
    .await?;
    Ok(())
}
