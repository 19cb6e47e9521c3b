//! What the CSI controller reads and writes: the Kubernetes API (through
//! `kube`) and the strata gRPC servers behind it (replica servers on the
//! nodes, the per-volume controllers behind their Services).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, Service};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use strata_proto::controller::volume_control_client::VolumeControlClient;
use strata_proto::controller::{StatusRequest, VolumeStatus};
use strata_proto::replica::replica_control_client::ReplicaControlClient;
use strata_proto::replica::Empty;
use tonic::transport::Channel;

use crate::crd::StrataVolume;
use crate::error::{CsiError, CsiResult};
use crate::objects::{self, PodSettings};
use crate::placement::StorageNode;

/// Nodes labelled `strata.io/storage=false` never get replicas.
pub const STORAGE_LABEL: &str = "strata.io/storage";
/// Bound on a call to a replica server while placing or deleting.
const REPLICA_CALL: Duration = Duration::from_secs(5);

/// The CSI controller's view of the cluster.
#[derive(Clone)]
pub struct Cluster {
    pub client: kube::Client,
    /// strata's namespace: StrataVolumes, Deployments, Services.
    pub namespace: String,
    /// The port every node's replica server listens on (host network).
    pub replica_port: u16,
    pub pod: PodSettings,
    /// How long a call waits for a volume's controller pod to answer
    /// (it may just have been created).
    pub controller_wait: Duration,
    /// Backups and restores running in the background.
    pub jobs: crate::controller::jobs::Jobs,
}

impl Cluster {
    pub fn volumes(&self) -> Api<StrataVolume> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    fn deployments(&self) -> Api<Deployment> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    fn services(&self) -> Api<Service> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    fn config_maps(&self) -> Api<ConfigMap> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    pub async fn get_volume(&self, id: &str) -> CsiResult<Option<StrataVolume>> {
        if !crate::names::is_volume_id(id) {
            return Ok(None);
        }
        self.volumes()
            .get_opt(id)
            .await
            .map_err(|e| CsiError::kube(&format!("reading StrataVolume {id}"), e))
    }

    pub async fn list_volumes(&self) -> CsiResult<Vec<StrataVolume>> {
        let mut v = self
            .volumes()
            .list(&ListParams::default())
            .await
            .map_err(|e| CsiError::kube("listing StrataVolumes", e))?
            .items;
        v.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        Ok(v)
    }

    /// Every node, with what placement needs to know (asks each node's
    /// replica server for its free space).
    pub async fn storage_nodes(&self, volumes: &[StrataVolume]) -> CsiResult<Vec<StorageNode>> {
        let nodes = Api::<Node>::all(self.client.clone())
            .list(&ListParams::default())
            .await
            .map_err(|e| CsiError::kube("listing nodes", e))?;
        let mut out = Vec::new();
        for node in nodes.items {
            let name = node.metadata.name.clone().unwrap_or_default();
            let replicas = volumes
                .iter()
                .filter(|v| v.spec.replica_nodes.contains(&name))
                .count();
            let mut n = StorageNode {
                name,
                replica_addr: self.replica_addr_of_node(&node),
                unusable: node_unusable(&node),
                replicas,
                filesystem_bytes: 0,
                available_bytes: 0,
            };
            if let (None, Some(addr)) = (&n.unusable, n.replica_addr) {
                match replica_space(addr).await {
                    Ok((fs, avail)) => {
                        n.filesystem_bytes = fs;
                        n.available_bytes = avail;
                    }
                    Err(e) => n.unusable = Some(format!("replica server {addr}: {e}")),
                }
            }
            out.push(n);
        }
        Ok(out)
    }

    /// A node's replica server (its InternalIP, the replica port).
    pub fn replica_addr_of_node(&self, node: &Node) -> Option<SocketAddr> {
        let ip: IpAddr = node
            .status
            .as_ref()?
            .addresses
            .as_ref()?
            .iter()
            .find(|a| a.type_ == "InternalIP")?
            .address
            .parse()
            .ok()?;
        Some(SocketAddr::new(ip, self.replica_port))
    }

    /// The replica server of a node named in a volume's spec; None when
    /// the node object is gone.
    pub async fn replica_addr_of(&self, node: &str) -> CsiResult<Option<SocketAddr>> {
        let Some(n) = Api::<Node>::all(self.client.clone())
            .get_opt(node)
            .await
            .map_err(|e| CsiError::kube(&format!("reading node {node}"), e))?
        else {
            return Ok(None);
        };
        self.replica_addr_of_node(&n)
            .map(Some)
            .ok_or_else(|| CsiError::Unavailable(format!("node {node} has no InternalIP")))
    }

    /// The volume's Service address (ClusterIP) for `port`.
    pub async fn service_addr(&self, volume_id: &str, port: u16) -> CsiResult<SocketAddr> {
        let name = objects::object_name(volume_id);
        let svc = self
            .services()
            .get_opt(&name)
            .await
            .map_err(|e| CsiError::kube(&format!("reading Service {name}"), e))?
            .ok_or_else(|| {
                CsiError::Unavailable(format!("volume {volume_id}: its Service {name} is missing"))
            })?;
        let ip: IpAddr = svc
            .spec
            .and_then(|s| s.cluster_ip)
            .and_then(|ip| ip.parse().ok())
            .ok_or_else(|| {
                CsiError::Unavailable(format!("Service {name} has no cluster IP yet"))
            })?;
        Ok(SocketAddr::new(ip, port))
    }

    /// A client of the volume's controller, waiting up to
    /// `controller_wait` for its pod to answer and checking it serves
    /// this volume.
    pub async fn volume_controller(
        &self,
        volume_id: &str,
    ) -> CsiResult<VolumeControlClient<Channel>> {
        let addr = self.service_addr(volume_id, objects::CONTROL_PORT).await?;
        let deadline = tokio::time::Instant::now() + self.controller_wait;
        let mut last;
        loop {
            match try_controller(addr, volume_id).await {
                Ok((c, _)) => return Ok(c),
                Err(e) => last = e,
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(CsiError::Unavailable(format!(
                    "volume {volume_id}: its controller at {addr} did not answer within {:?}: {last}",
                    self.controller_wait
                )));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The volume controller's status if it answers within 2 s (and
    /// serves this volume); None otherwise. For reports, never for
    /// decisions.
    pub async fn quick_status(&self, volume_id: &str) -> Option<VolumeStatus> {
        self.quick_controller(volume_id).await.map(|(_, s)| s)
    }

    /// A client of the volume's controller and its status, if it answers
    /// within 2 s (and serves this volume).
    pub async fn quick_controller(
        &self,
        volume_id: &str,
    ) -> Option<(VolumeControlClient<Channel>, VolumeStatus)> {
        let addr = self
            .service_addr(volume_id, objects::CONTROL_PORT)
            .await
            .ok()?;
        tokio::time::timeout(Duration::from_secs(2), try_controller(addr, volume_id))
            .await
            .ok()?
            .ok()
    }

    /// Creates the volume's Service (or keeps the one there).
    pub async fn ensure_service(&self, sv: &StrataVolume, volume_id: &str) -> CsiResult<()> {
        let svc = objects::service(sv, volume_id, &self.namespace);
        match self.services().create(&PostParams::default(), &svc).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
            Err(e) => Err(CsiError::kube("creating the volume's Service", e)),
        }
    }

    /// Writes the volume's replica list (its ConfigMap), creating it or
    /// replacing the list there.
    pub async fn set_replica_list(
        &self,
        sv: &StrataVolume,
        volume_id: &str,
        replicas: &[SocketAddr],
    ) -> CsiResult<()> {
        let cm = objects::replicas_config_map(sv, volume_id, replicas, &self.namespace);
        let name = objects::object_name(volume_id);
        self.config_maps()
            .patch(
                &name,
                &PatchParams::apply("strata-csi").force(),
                &Patch::Apply(&cm),
            )
            .await
            .map_err(|e| CsiError::kube(&format!("writing ConfigMap {name}"), e))?;
        Ok(())
    }

    /// The volume's replica list as its ConfigMap holds it (None: no
    /// ConfigMap yet).
    pub async fn replica_list(&self, volume_id: &str) -> CsiResult<Option<String>> {
        let name = objects::object_name(volume_id);
        Ok(self
            .config_maps()
            .get_opt(&name)
            .await
            .map_err(|e| CsiError::kube(&format!("reading ConfigMap {name}"), e))?
            .and_then(|cm| cm.data?.remove(objects::REPLICAS_KEY)))
    }

    /// Creates the volume's controller Deployment (or keeps the one there).
    pub async fn ensure_deployment(&self, sv: &StrataVolume, volume_id: &str) -> CsiResult<()> {
        let d = objects::deployment(sv, volume_id, &self.pod);
        match self.deployments().create(&PostParams::default(), &d).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
            Err(e) => Err(CsiError::kube(
                "creating the volume's controller Deployment",
                e,
            )),
        }
    }

    /// Deletes the volume's Deployment and Service (absent is fine) and
    /// waits until no controller pod of it is left.
    pub async fn remove_controller(&self, volume_id: &str) -> CsiResult<()> {
        let name = objects::object_name(volume_id);
        let dp = DeleteParams::foreground();
        match self.deployments().delete(&name, &dp).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(CsiError::kube(&format!("deleting Deployment {name}"), e)),
        }
        match self
            .services()
            .delete(&name, &DeleteParams::default())
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(CsiError::kube(&format!("deleting Service {name}"), e)),
        }
        match self
            .config_maps()
            .delete(&name, &DeleteParams::default())
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(CsiError::kube(&format!("deleting ConfigMap {name}"), e)),
        }
        Ok(())
    }

    /// The node the volume's controller pod runs on ("" when none runs).
    pub async fn controller_node(&self, volume_id: &str) -> CsiResult<String> {
        let pods = Api::<Pod>::namespaced(self.client.clone(), &self.namespace)
            .list(&ListParams::default().labels(&format!("{}={volume_id}", objects::VOLUME_LABEL)))
            .await
            .map_err(|e| CsiError::kube("listing controller pods", e))?;
        Ok(pods
            .items
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .find_map(|p| p.spec.as_ref()?.node_name.clone())
            .unwrap_or_default())
    }

    /// Whether the volume's Deployment is still there (being deleted
    /// counts).
    pub async fn deployment_exists(&self, volume_id: &str) -> CsiResult<bool> {
        let name = objects::object_name(volume_id);
        Ok(self
            .deployments()
            .get_opt(&name)
            .await
            .map_err(|e| CsiError::kube(&format!("reading Deployment {name}"), e))?
            .is_some())
    }
}

/// Dials a volume's controller and asks its status; an error when it does
/// not answer or serves another volume.
async fn try_controller(
    addr: SocketAddr,
    volume_id: &str,
) -> Result<(VolumeControlClient<Channel>, VolumeStatus), String> {
    let endpoint = Channel::from_shared(format!("http://{addr}"))
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(120));
    let channel = strata_replica::auth::grpc_channel(
        endpoint,
        addr,
        strata_replica::auth::process_key(),
        strata_replica::auth::Purpose::Manage,
    )
    .await
    .map_err(|e| strata_replica::error_chain(&e))?;
    let mut client = VolumeControlClient::new(channel);
    let status = client
        .status(StatusRequest {})
        .await
        .map_err(|e| e.message().to_string())?
        .into_inner();
    if status.volume != volume_id {
        return Err(format!(
            "it serves volume {:?}, not {volume_id:?}",
            status.volume
        ));
    }
    Ok((client, status))
}

/// A client of a replica server.
pub async fn replica_client(addr: SocketAddr) -> CsiResult<ReplicaControlClient<Channel>> {
    let endpoint = Channel::from_shared(format!("http://{addr}"))
        .map_err(|e| CsiError::Internal(e.to_string()))?
        .connect_timeout(REPLICA_CALL)
        .timeout(Duration::from_secs(60));
    let channel =
        strata_replica::auth::control_channel(endpoint, addr, strata_replica::auth::process_key())
            .await
            .map_err(|e| {
                CsiError::Unavailable(format!("replica server {addr}: cannot connect: {e}"))
            })?;
    Ok(ReplicaControlClient::new(channel))
}

async fn replica_space(addr: SocketAddr) -> Result<(u64, u64), String> {
    let fut = async {
        let mut c = replica_client(addr).await.map_err(|e| e.to_string())?;
        let list = c
            .list(Empty {})
            .await
            .map_err(|e| e.message().to_string())?
            .into_inner();
        Ok((list.filesystem_bytes, list.available_bytes))
    };
    tokio::time::timeout(REPLICA_CALL, fut)
        .await
        .map_err(|_| "did not answer within 5 s".to_string())?
}

/// Why a node cannot take a new replica, if it cannot.
fn node_unusable(node: &Node) -> Option<String> {
    let labels = node.metadata.labels.as_ref();
    if labels
        .and_then(|l| l.get(STORAGE_LABEL))
        .map(String::as_str)
        == Some("false")
    {
        return Some(format!("labelled {STORAGE_LABEL}=false"));
    }
    if node.spec.as_ref().and_then(|s| s.unschedulable) == Some(true) {
        return Some("cordoned".into());
    }
    let ready = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
        .map(|c| c.status == "True");
    if ready != Some(true) {
        return Some("not Ready".into());
    }
    None
}
