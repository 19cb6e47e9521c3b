//! The CSI node service against a real 3-replica volume, on this host
//! (attach falls back to nbdfuse + loop here; the kernel NBD path is the VM
//! test's): NodeStage makes ext4 only on an empty device and keeps data
//! across unstage/stage, refuses a device that holds another filesystem
//! than the one asked for (FAILED_PRECONDITION, nothing formatted, nothing
//! left attached or mounted), and NodeUnstage is idempotent; xfs is made,
//! kept and grown by NodeExpandVolume.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use common::{require, Cluster};
use strata_attach::AttachOptions;
use strata_csi::node::NodeService;
use strata_proto::csi::node_server::Node;
use strata_proto::csi::volume_capability::{access_mode, AccessMode, AccessType, MountVolume};
use strata_proto::csi::{
    NodeExpandVolumeRequest, NodeStageVolumeRequest, NodeUnstageVolumeRequest, VolumeCapability,
};
use tonic::{Code, Request};

const MIB: u64 = 1 << 20;

fn mount_cap(fs: &str) -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode {
            mode: access_mode::Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: fs.into(),
            ..Default::default()
        })),
    }
}

/// A node service attaching with state under `work`.
fn node_service(work: &Path) -> NodeService {
    NodeService {
        node_id: "test-node".into(),
        attach: AttachOptions {
            state_dir: work.join("attach"),
            ..Default::default()
        },
        controller_wait: Duration::from_secs(10),
    }
}

/// NodeStage of the cluster's volume at `staging` as `fs`, with the context
/// CreateVolume hands out.
fn stage_request(c: &Cluster, volume: &str, staging: &Path, fs: &str) -> NodeStageVolumeRequest {
    NodeStageVolumeRequest {
        volume_id: volume.into(),
        staging_target_path: staging.to_string_lossy().into(),
        volume_capability: Some(mount_cap(fs)),
        volume_context: HashMap::from([("strata.io/nbd-uri".to_string(), c.uri())]),
        ..Default::default()
    }
}

fn unstage_request(volume: &str, staging: &Path) -> NodeUnstageVolumeRequest {
    NodeUnstageVolumeRequest {
        volume_id: volume.into(),
        staging_target_path: staging.to_string_lossy().into(),
    }
}

fn mounted(path: &Path) -> bool {
    let p = path.to_string_lossy().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(p.as_str()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stage_formats_only_empty_devices() {
    for tool in ["nbdfuse", "mkfs.ext4", "blkid", "losetup"] {
        require(tool);
    }
    let c = Cluster::start(3, 64 * MIB);
    let work = tempfile::tempdir().unwrap();
    let node = node_service(work.path());
    // The volume name is the export name; the context is what CreateVolume hands out.
    let volume = c.uri().rsplit('/').next().unwrap().to_string();
    let staging = work.path().join("staging");
    let stage = |fs: &str| stage_request(&c, &volume, &staging, fs);
    let unstage = || unstage_request(&volume, &staging);

    node.node_stage_volume(Request::new(stage("ext4")))
        .await
        .unwrap();
    assert!(mounted(&staging));
    std::fs::write(staging.join("row.txt"), b"committed row").unwrap();
    node.node_unstage_volume(Request::new(unstage()))
        .await
        .unwrap();
    assert!(!mounted(&staging));
    assert!(strata_attach::attachments(&node.attach.state_dir)
        .unwrap()
        .is_empty());
    // Idempotent.
    node.node_unstage_volume(Request::new(unstage()))
        .await
        .unwrap();

    // Asked for xfs on a device holding ext4: refused, not formatted, nothing left.
    let e = node
        .node_stage_volume(Request::new(stage("xfs")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("ext4"), "{}", e.message());
    assert!(!mounted(&staging));
    assert!(strata_attach::attachments(&node.attach.state_dir)
        .unwrap()
        .is_empty());

    // The data is still there.
    node.node_stage_volume(Request::new(stage("ext4")))
        .await
        .unwrap();
    assert_eq!(
        std::fs::read(staging.join("row.txt")).unwrap(),
        b"committed row"
    );
    node.node_unstage_volume(Request::new(unstage()))
        .await
        .unwrap();
    assert!(strata_attach::attachments(&node.attach.state_dir)
        .unwrap()
        .is_empty());
}

/// xfs end to end on the node: made on an empty device, data kept across
/// unstage/stage, and NodeExpandVolume grows it (xfs_growfs) after the
/// volume grew (on the nbdfuse fallback, once the volume is staged again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xfs_is_made_kept_and_grown() {
    for tool in ["nbdfuse", "mkfs.xfs", "xfs_growfs", "blkid", "losetup"] {
        require(tool);
    }
    // mkfs.xfs wants at least 300 MiB.
    let c = Cluster::start(3, 320 * MIB);
    let work = tempfile::tempdir().unwrap();
    let node = node_service(work.path());
    let volume = c.uri().rsplit('/').next().unwrap().to_string();
    let staging = work.path().join("staging");
    let stage = stage_request(&c, &volume, &staging, "xfs");
    let unstage = unstage_request(&volume, &staging);
    node.node_stage_volume(Request::new(stage.clone()))
        .await
        .unwrap();
    assert_eq!(fs_type_at(&staging).as_deref(), Some("xfs"));
    std::fs::write(staging.join("row.txt"), b"committed row").unwrap();
    node.node_unstage_volume(Request::new(unstage.clone()))
        .await
        .unwrap();
    node.node_stage_volume(Request::new(stage.clone()))
        .await
        .unwrap();
    assert_eq!(
        std::fs::read(staging.join("row.txt")).unwrap(),
        b"committed row"
    );

    let before = fs_bytes(&staging);
    common::strata_ok(&[
        "volume",
        "expand",
        &volume,
        "512M",
        "--controller",
        &c.control.to_string(),
    ]);
    let expand = || {
        node.node_expand_volume(Request::new(NodeExpandVolumeRequest {
            volume_id: volume.clone(),
            volume_path: staging.to_string_lossy().into(),
            volume_capability: Some(mount_cap("xfs")),
            ..Default::default()
        }))
    };
    let method = strata_attach::attachments(&node.attach.state_dir).unwrap()[0]
        .attachment
        .method;
    if method == strata_attach::Method::NbdfuseLoop {
        // This host's fallback keeps the size it attached at: a clear
        // FAILED_PRECONDITION, the filesystem untouched; staged again, the
        // device comes up at the new size.
        let e = expand().await.unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        assert!(e.message().contains("attach it again"), "{}", e.message());
        assert_eq!(fs_bytes(&staging), before);
        node.node_unstage_volume(Request::new(unstage.clone()))
            .await
            .unwrap();
        node.node_stage_volume(Request::new(stage.clone()))
            .await
            .unwrap();
    }
    let grown = expand().await.unwrap().into_inner();
    assert_eq!(grown.capacity_bytes as u64, 512 * MIB);
    let after = fs_bytes(&staging);
    assert!(
        after > before + 150 * MIB,
        "xfs did not grow: {before} -> {after} bytes"
    );
    assert_eq!(
        std::fs::read(staging.join("row.txt")).unwrap(),
        b"committed row"
    );
    node.node_unstage_volume(Request::new(unstage))
        .await
        .unwrap();
    assert!(strata_attach::attachments(&node.attach.state_dir)
        .unwrap()
        .is_empty());
}

/// The filesystem type mounted at `path`.
fn fs_type_at(path: &Path) -> Option<String> {
    let p = path.to_string_lossy().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(p.as_str()))
        .and_then(|l| l.split(" - ").nth(1))
        .and_then(|rest| rest.split(' ').next())
        .map(str::to_string)
}

/// The filesystem's size in bytes, as `df` reports it.
fn fs_bytes(path: &Path) -> u64 {
    let out = common::run_ok("df", &["-B1", "--output=size", path.to_str().unwrap()], 10);
    out.lines().nth(1).unwrap().trim().parse().unwrap()
}
