//! The CSI Node service: attach, format, mount, publish, grow.
//!
//! - NodeStage attaches the volume with `strata-attach` (kernel NBD over
//!   netlink, else open-iscsi, else nbdfuse + loop), makes a filesystem
//!   only when the device is empty (never over data: a device holding
//!   another filesystem, a partition table or any other signature is
//!   refused), and mounts it at the staging path.
//! - NodePublish bind-mounts the staging mount (or, for `Block`, the
//!   device) at the pod's target path.
//! - NodeUnpublish and NodeUnstage undo that and are idempotent.
//! - NodeExpandVolume makes the attached device show the new size
//!   (strata's controller serves a grown volume on open connections) and
//!   grows the filesystem.
//!
//! The calls block on host tools, so they run on blocking threads.

pub mod fs;
pub mod mounts;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use strata_attach::{AttachOptions, NbdUri};
use strata_proto::csi::node_server::Node;
use strata_proto::csi::node_service_capability::{rpc, Rpc, Type};
use strata_proto::csi::*;
use tonic::{Request, Response, Status};

use crate::controller::volumes::CONTEXT_NBD_URI;
use crate::error::{CsiError, CsiResult};
use crate::request::{check_capability, Access};

/// The Node service of one node.
#[derive(Clone)]
pub struct NodeService {
    pub node_id: String,
    pub attach: AttachOptions,
    /// How long NodeStage waits for the volume's controller to answer (a
    /// new volume's pod may still be starting).
    pub controller_wait: std::time::Duration,
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> CsiResult<T> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("node task failed: {e}")))?
        .map_err(Status::from)
}

fn need(what: &str, v: &str) -> CsiResult<()> {
    if v.is_empty() {
        Err(CsiError::Invalid(format!("{what} is missing")))
    } else {
        Ok(())
    }
}

fn io(what: &str, e: std::io::Error) -> CsiError {
    CsiError::Internal(format!("{what}: {e}"))
}

impl NodeService {
    /// The device this node has attached for `volume_id`, if any.
    fn device_of(&self, volume_id: &str) -> CsiResult<Option<strata_attach::AttachmentStatus>> {
        let all = strata_attach::attachments(&self.attach.state_dir)
            .map_err(|e| CsiError::Internal(format!("reading attachments: {e}")))?;
        Ok(all
            .into_iter()
            .find(|a| NbdUri::parse(&a.attachment.uri).is_ok_and(|u| u.export == volume_id)))
    }

    fn stage(&self, req: NodeStageVolumeRequest) -> CsiResult<()> {
        need("volume ID", &req.volume_id)?;
        need("staging target path", &req.staging_target_path)?;
        let cap = req
            .volume_capability
            .as_ref()
            .ok_or_else(|| CsiError::Invalid("volume capability is missing".into()))?;
        let access = check_capability(cap)?;
        let uri = req.volume_context.get(CONTEXT_NBD_URI).ok_or_else(|| {
            CsiError::Invalid(format!(
                "volume context has no {CONTEXT_NBD_URI}: was volume {} made by strata's CreateVolume?",
                req.volume_id
            ))
        })?;
        let parsed =
            NbdUri::parse(uri).map_err(|e| CsiError::Invalid(format!("{CONTEXT_NBD_URI}: {e}")))?;
        if parsed.export != req.volume_id {
            return Err(CsiError::Invalid(format!(
                "{CONTEXT_NBD_URI} {uri} names another volume than {}",
                req.volume_id
            )));
        }
        let (device, attached_now) = match self.device_of(&req.volume_id)? {
            Some(a) if a.live => (a.attachment.device, false),
            stale => {
                if let Some(a) = stale {
                    let _ = strata_attach::detach(&a.attachment.device, &self.attach.state_dir);
                }
                let attached = self.attach_waiting(uri, &req.volume_id)?;
                for s in &attached.skipped {
                    tracing::info!(volume = %req.volume_id, "attach: {s}");
                }
                (attached.attachment.device, true)
            }
        };
        let result = self.make_and_mount(&req, access, &device);
        if result.is_err() && attached_now {
            // Nothing half-done stays behind: the device goes with the error.
            if let Err(e) = strata_attach::detach(&device, &self.attach.state_dir) {
                tracing::warn!(volume = %req.volume_id, %device, error = %e, "detach after a failed stage");
            }
        }
        result
    }

    /// The filesystem part of NodeStage, on an attached device.
    fn make_and_mount(
        &self,
        req: &NodeStageVolumeRequest,
        access: Access,
        device: &str,
    ) -> CsiResult<()> {
        let Access::Mount { fs: wanted, flags } = access else {
            return Ok(());
        };
        let staging = Path::new(&req.staging_target_path);
        std::fs::create_dir_all(staging).map_err(|e| io("creating the staging path", e))?;
        if let Some(m) = mounts::mounted_at(staging).map_err(|e| io("reading mounts", e))? {
            if m.source == device {
                return Ok(());
            }
            return Err(CsiError::Precondition(format!(
                "{} already has {} mounted on it",
                req.staging_target_path, m.source
            )));
        }
        match fs::probe(device)? {
            fs::Content::Empty => fs::mkfs(device, &wanted)?,
            fs::Content::Filesystem(found) if found == wanted => {}
            fs::Content::Filesystem(found) => {
                return Err(CsiError::Precondition(format!(
                    "volume {} holds a {found} filesystem, not the {wanted} asked for: strata does not format over data",
                    req.volume_id
                )))
            }
            fs::Content::Other(what) => {
                return Err(CsiError::Precondition(format!(
                    "volume {} holds {what}: strata does not format over data",
                    req.volume_id
                )))
            }
        }
        fs::mount(device, staging, Some(&wanted), &flags)
    }

    /// Attaches, waiting up to `controller_wait` for an unreachable
    /// controller.
    fn attach_waiting(&self, uri: &str, volume_id: &str) -> CsiResult<strata_attach::Attached> {
        let deadline = std::time::Instant::now() + self.controller_wait;
        loop {
            match strata_attach::attach(uri, &self.attach) {
                Ok(a) => return Ok(a),
                Err(strata_attach::AttachError::Unreachable { .. })
                    if std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(250));
                }
                Err(e) => {
                    let mut msg = format!("attaching {volume_id}: {e}");
                    let mut cause = std::error::Error::source(&e);
                    while let Some(c) = cause {
                        msg.push_str(&format!(": {c}"));
                        cause = c.source();
                    }
                    return Err(CsiError::Unavailable(msg));
                }
            }
        }
    }

    fn unstage(&self, req: NodeUnstageVolumeRequest) -> CsiResult<()> {
        need("volume ID", &req.volume_id)?;
        need("staging target path", &req.staging_target_path)?;
        let staging = Path::new(&req.staging_target_path);
        while mounts::mounted_at(staging)
            .map_err(|e| io("reading mounts", e))?
            .is_some()
        {
            fs::umount(staging)?;
        }
        if let Some(a) = self.device_of(&req.volume_id)? {
            strata_attach::detach(&a.attachment.device, &self.attach.state_dir).map_err(|e| {
                CsiError::Internal(format!("detaching {}: {e}", a.attachment.device))
            })?;
        }
        Ok(())
    }

    fn publish(&self, req: NodePublishVolumeRequest) -> CsiResult<()> {
        need("volume ID", &req.volume_id)?;
        need("staging target path", &req.staging_target_path)?;
        need("target path", &req.target_path)?;
        let cap = req
            .volume_capability
            .as_ref()
            .ok_or_else(|| CsiError::Invalid("volume capability is missing".into()))?;
        let access = check_capability(cap)?;
        let target = PathBuf::from(&req.target_path);
        if mounts::mounted_at(&target)
            .map_err(|e| io("reading mounts", e))?
            .is_some()
        {
            return Ok(());
        }
        if crate::request::is_single_writer(cap) {
            let device = self
                .device_of(&req.volume_id)?
                .map(|a| a.attachment.device)
                .unwrap_or_default();
            let staging = Path::new(&req.staging_target_path);
            let others = mounts::mounts_of(&device, &[staging, &target])
                .map_err(|e| io("reading mounts", e))?;
            if !device.is_empty() && !others.is_empty() {
                return Err(CsiError::Precondition(format!(
                    "volume {} is single-writer (ReadWriteOncePod) and already published at {}",
                    req.volume_id,
                    others.join(", ")
                )));
            }
        }
        let source = match &access {
            Access::Block => {
                let a = self
                    .device_of(&req.volume_id)?
                    .filter(|a| a.live)
                    .ok_or_else(|| {
                        CsiError::Precondition(format!(
                            "volume {} is not staged on this node",
                            req.volume_id
                        ))
                    })?;
                if let Some(parent) = target.parent() {
                    std::fs::create_dir_all(parent)
                        .map_err(|e| io("creating the target's folder", e))?;
                }
                std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(&target)
                    .map_err(|e| io("creating the target file", e))?;
                a.attachment.device
            }
            Access::Mount { .. } => {
                let staging = Path::new(&req.staging_target_path);
                if mounts::mounted_at(staging)
                    .map_err(|e| io("reading mounts", e))?
                    .is_none()
                {
                    return Err(CsiError::Precondition(format!(
                        "volume {} is not staged at {}",
                        req.volume_id, req.staging_target_path
                    )));
                }
                std::fs::create_dir_all(&target).map_err(|e| io("creating the target path", e))?;
                req.staging_target_path.clone()
            }
        };
        let mut options = vec!["bind".to_string()];
        if let Access::Mount { flags, .. } = &access {
            options.extend(flags.iter().cloned());
        }
        fs::mount(&source, &target, None, &options)?;
        if req.readonly {
            fs::mount(
                &source,
                &target,
                None,
                &["remount".into(), "bind".into(), "ro".into()],
            )?;
        }
        Ok(())
    }

    fn unpublish(&self, req: NodeUnpublishVolumeRequest) -> CsiResult<()> {
        need("volume ID", &req.volume_id)?;
        need("target path", &req.target_path)?;
        let target = Path::new(&req.target_path);
        while mounts::mounted_at(target)
            .map_err(|e| io("reading mounts", e))?
            .is_some()
        {
            fs::umount(target)?;
        }
        match std::fs::symlink_metadata(target) {
            Ok(m) if m.is_dir() => {
                std::fs::remove_dir(target).map_err(|e| io("removing the target path", e))
            }
            Ok(_) => std::fs::remove_file(target).map_err(|e| io("removing the target file", e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io("reading the target path", e)),
        }
    }

    fn stats(&self, req: NodeGetVolumeStatsRequest) -> CsiResult<NodeGetVolumeStatsResponse> {
        need("volume ID", &req.volume_id)?;
        need("volume path", &req.volume_path)?;
        let path = Path::new(&req.volume_path);
        let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                CsiError::NotFound(format!("{} does not exist", req.volume_path))
            }
            _ => io("reading the volume path", e),
        })?;
        let attachment = self.device_of(&req.volume_id)?;
        let condition = match &attachment {
            Some(a) if a.live => VolumeCondition {
                abnormal: false,
                message: format!("attached at {}", a.attachment.device),
            },
            Some(a) => VolumeCondition {
                abnormal: true,
                message: format!(
                    "{} lost its connection to the volume's controller",
                    a.attachment.device
                ),
            },
            None => {
                return Err(CsiError::NotFound(format!(
                    "volume {} is not attached on this node",
                    req.volume_id
                )))
            }
        };
        let usage = if meta.is_dir() {
            let st = statvfs(path)?;
            vec![
                VolumeUsage {
                    available: st.0 as i64,
                    total: st.1 as i64,
                    used: st.1.saturating_sub(st.2) as i64,
                    unit: volume_usage::Unit::Bytes as i32,
                },
                VolumeUsage {
                    available: st.3 as i64,
                    total: st.4 as i64,
                    used: st.4.saturating_sub(st.3) as i64,
                    unit: volume_usage::Unit::Inodes as i32,
                },
            ]
        } else {
            let size = attachment.map_or(0, |a| a.attachment.size);
            vec![VolumeUsage {
                total: size as i64,
                unit: volume_usage::Unit::Bytes as i32,
                ..Default::default()
            }]
        };
        Ok(NodeGetVolumeStatsResponse {
            usage,
            volume_condition: Some(condition),
        })
    }

    fn expand(&self, req: NodeExpandVolumeRequest) -> CsiResult<NodeExpandVolumeResponse> {
        need("volume ID", &req.volume_id)?;
        need("volume path", &req.volume_path)?;
        let a = self
            .device_of(&req.volume_id)?
            .filter(|a| a.live)
            .ok_or_else(|| {
                CsiError::NotFound(format!("volume {} is not attached here", req.volume_id))
            })?;
        let device = a.attachment.device.clone();
        let size =
            strata_attach::refresh_size(&device, &self.attach, true).map_err(|e| match e {
                // The volume is fine and grown; this attachment cannot
                // show it until it is made again.
                strata_attach::AttachError::FallbackCannotGrow { .. } => {
                    CsiError::Precondition(e.to_string())
                }
                e => CsiError::Internal(format!("refreshing the size of {device}: {e}")),
            })?;
        // A filesystem volume is published as a directory, a block volume
        // as the device node itself.
        let path = Path::new(&req.volume_path);
        let is_dir = std::fs::metadata(path)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => {
                    CsiError::NotFound(format!("{} does not exist", req.volume_path))
                }
                _ => io("reading the volume path", e),
            })?
            .is_dir();
        let block = match req
            .volume_capability
            .as_ref()
            .map(check_capability)
            .transpose()?
        {
            Some(access) => access == Access::Block,
            None => !is_dir,
        };
        if !block {
            let m = mounts::mounts()
                .map_err(|e| io("reading mounts", e))?
                .into_iter()
                .rev()
                .find(|m| m.source == device)
                .ok_or_else(|| CsiError::Precondition(format!("{device} is not mounted")))?;
            fs::grow(&m.fs_type, &device, Path::new(&m.mount_point))?;
        }
        Ok(NodeExpandVolumeResponse {
            capacity_bytes: size as i64,
        })
    }
}

/// (available bytes, total bytes, free bytes, free inodes, total inodes)
fn statvfs(path: &Path) -> CsiResult<(u64, u64, u64, u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| CsiError::Invalid("a path with a NUL byte".into()))?;
    // SAFETY: all-zero bytes are a valid statvfs.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is NUL-terminated and `st` outlives the call.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io("statvfs", std::io::Error::last_os_error()));
    }
    let f = st.f_frsize as u64;
    Ok((
        st.f_bavail as u64 * f,
        st.f_blocks as u64 * f,
        st.f_bfree as u64 * f,
        st.f_favail as u64,
        st.f_files as u64,
    ))
}

#[tonic::async_trait]
impl Node for NodeService {
    async fn node_stage_volume(
        &self,
        req: Request<NodeStageVolumeRequest>,
    ) -> Result<Response<NodeStageVolumeResponse>, Status> {
        let me = self.clone();
        blocking(move || me.stage(req.into_inner())).await?;
        Ok(Response::new(NodeStageVolumeResponse {}))
    }

    async fn node_unstage_volume(
        &self,
        req: Request<NodeUnstageVolumeRequest>,
    ) -> Result<Response<NodeUnstageVolumeResponse>, Status> {
        let me = self.clone();
        blocking(move || me.unstage(req.into_inner())).await?;
        Ok(Response::new(NodeUnstageVolumeResponse {}))
    }

    async fn node_publish_volume(
        &self,
        req: Request<NodePublishVolumeRequest>,
    ) -> Result<Response<NodePublishVolumeResponse>, Status> {
        let me = self.clone();
        blocking(move || me.publish(req.into_inner())).await?;
        Ok(Response::new(NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        req: Request<NodeUnpublishVolumeRequest>,
    ) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        let me = self.clone();
        blocking(move || me.unpublish(req.into_inner())).await?;
        Ok(Response::new(NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_volume_stats(
        &self,
        req: Request<NodeGetVolumeStatsRequest>,
    ) -> Result<Response<NodeGetVolumeStatsResponse>, Status> {
        let me = self.clone();
        Ok(Response::new(
            blocking(move || me.stats(req.into_inner())).await?,
        ))
    }

    async fn node_expand_volume(
        &self,
        req: Request<NodeExpandVolumeRequest>,
    ) -> Result<Response<NodeExpandVolumeResponse>, Status> {
        let me = self.clone();
        Ok(Response::new(
            blocking(move || me.expand(req.into_inner())).await?,
        ))
    }

    async fn node_get_capabilities(
        &self,
        _req: Request<NodeGetCapabilitiesRequest>,
    ) -> Result<Response<NodeGetCapabilitiesResponse>, Status> {
        let capabilities = [
            rpc::Type::StageUnstageVolume,
            rpc::Type::GetVolumeStats,
            rpc::Type::ExpandVolume,
            rpc::Type::VolumeCondition,
            rpc::Type::SingleNodeMultiWriter,
        ]
        .into_iter()
        .map(|t| NodeServiceCapability {
            r#type: Some(Type::Rpc(Rpc { r#type: t as i32 })),
        })
        .collect();
        Ok(Response::new(NodeGetCapabilitiesResponse { capabilities }))
    }

    async fn node_get_info(
        &self,
        _req: Request<NodeGetInfoRequest>,
    ) -> Result<Response<NodeGetInfoResponse>, Status> {
        Ok(Response::new(NodeGetInfoResponse {
            node_id: self.node_id.clone(),
            max_volumes_per_node: 0,
            accessible_topology: Some(Topology {
                segments: HashMap::from([
                    (crate::TOPOLOGY_HOSTNAME.to_string(), self.node_id.clone()),
                    (
                        crate::TOPOLOGY_ARCH.to_string(),
                        crate::kube_arch().to_string(),
                    ),
                ]),
            }),
        }))
    }
}
