//! The CSI node service against a real 3-replica volume, on this host
//! (attach falls back to nbdfuse + loop here; the kernel NBD path is the VM
//! test's): NodeStage makes ext4 only on an empty device and keeps data
//! across unstage/stage, refuses a device that holds another filesystem
//! than the one asked for (FAILED_PRECONDITION, nothing formatted, nothing
//! left attached or mounted), and NodeUnstage is idempotent.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use common::{require, Cluster};
use strata_attach::AttachOptions;
use strata_csi::node::NodeService;
use strata_proto::csi::node_server::Node;
use strata_proto::csi::volume_capability::{access_mode, AccessMode, AccessType, MountVolume};
use strata_proto::csi::{NodeStageVolumeRequest, NodeUnstageVolumeRequest, VolumeCapability};
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
    let node = NodeService {
        node_id: "test-node".into(),
        attach: AttachOptions {
            state_dir: work.path().join("attach"),
            ..Default::default()
        },
        controller_wait: Duration::from_secs(10),
    };
    // The volume name is the export name; the context is what CreateVolume hands out.
    let volume = c.uri().rsplit('/').next().unwrap().to_string();
    let staging = work.path().join("staging");
    let stage = |fs: &str| NodeStageVolumeRequest {
        volume_id: volume.clone(),
        staging_target_path: staging.to_string_lossy().into(),
        volume_capability: Some(mount_cap(fs)),
        volume_context: HashMap::from([("strata.io/nbd-uri".to_string(), c.uri())]),
        ..Default::default()
    };
    let unstage = || NodeUnstageVolumeRequest {
        volume_id: volume.clone(),
        staging_target_path: staging.to_string_lossy().into(),
    };

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
