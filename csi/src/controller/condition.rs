//! A volume's health for VOLUME_CONDITION, from its controller's status.

use strata_proto::controller::VolumeStatus;
use strata_proto::csi::VolumeCondition;

use crate::crd::{phase, StrataVolumeStatus};

/// Abnormal when the volume is degraded, read-only, or rebuilding a
/// replica; the message says which replicas and why.
pub fn from_status(s: &VolumeStatus) -> VolumeCondition {
    let mut problems = Vec::new();
    if s.state != "healthy" {
        problems.push(format!(
            "volume is {} ({} of {} replicas healthy, write quorum {})",
            s.state,
            s.replicas.iter().filter(|r| r.state == "healthy").count(),
            s.replicas_configured,
            s.write_quorum
        ));
    }
    for r in &s.replicas {
        match r.state.as_str() {
            "healthy" => {}
            "syncing" => problems.push(format!(
                "replica {} is rebuilding ({} sync, {}% done)",
                r.address,
                r.sync_kind,
                percent(r.sync_done_bytes, r.sync_total_bytes)
            )),
            other => problems.push(format!(
                "replica {} is {other}: {}",
                r.address, r.fault_reason
            )),
        }
    }
    VolumeCondition {
        abnormal: !problems.is_empty(),
        message: if problems.is_empty() {
            format!("healthy: {} replicas, epoch {}", s.replicas.len(), s.epoch)
        } else {
            problems.join("; ")
        },
    }
}

/// The StrataVolume status for a controller's status.
pub fn to_resource_status(s: &VolumeStatus, controller_node: &str) -> StrataVolumeStatus {
    let healthy = s.replicas.iter().filter(|r| r.state == "healthy").count() as u32;
    let syncing: Vec<_> = s.replicas.iter().filter(|r| r.state == "syncing").collect();
    let (done, total) = syncing.iter().fold((0, 0), |(d, t), r| {
        (d + r.sync_done_bytes, t + r.sync_total_bytes)
    });
    let c = from_status(s);
    StrataVolumeStatus {
        phase: if !syncing.is_empty() {
            phase::REBUILDING
        } else if s.state == "healthy" {
            phase::READY
        } else {
            phase::DEGRADED
        }
        .to_string(),
        healthy_replicas: healthy,
        total_replicas: s.replicas_configured,
        rebuild_progress: if syncing.is_empty() {
            String::new()
        } else {
            format!("{}%", percent(done, total))
        },
        controller_node: controller_node.to_string(),
        epoch: s.epoch,
        last_backup: s
            .schedules
            .iter()
            .filter(|x| x.last_ok && x.last_finished > 0)
            .map(|x| x.last_finished)
            .max()
            .map(chrono_like)
            .unwrap_or_default(),
        message: if c.abnormal { c.message } else { String::new() },
    }
}

fn percent(done: u64, total: u64) -> u64 {
    done.saturating_mul(100).checked_div(total).unwrap_or(0)
}

/// Unix seconds as `YYYY-MM-DDTHH:MM:SSZ`.
fn chrono_like(t: i64) -> String {
    k8s_openapi::jiff::Timestamp::from_second(t)
        .map(|ts| ts.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use strata_proto::controller::ReplicaInfo;

    fn replica(state: &str) -> ReplicaInfo {
        ReplicaInfo {
            address: "127.0.0.1:1".into(),
            state: state.into(),
            fault_reason: if state == "faulted" {
                "io timeout".into()
            } else {
                String::new()
            },
            sync_done_bytes: 25,
            sync_total_bytes: 100,
            sync_kind: "full".into(),
            ..Default::default()
        }
    }

    #[test]
    fn degraded_and_rebuilding_are_abnormal() {
        let mut s = VolumeStatus {
            state: "healthy".into(),
            replicas_configured: 3,
            replicas: vec![replica("healthy"), replica("healthy"), replica("healthy")],
            ..Default::default()
        };
        assert!(!from_status(&s).abnormal);
        assert_eq!(to_resource_status(&s, "n1").phase, phase::READY);
        s.replicas[2] = replica("syncing");
        let c = from_status(&s);
        assert!(c.abnormal && c.message.contains("rebuilding") && c.message.contains("25%"));
        assert_eq!(to_resource_status(&s, "n1").rebuild_progress, "25%");
        s.state = "degraded".into();
        s.replicas[2] = replica("faulted");
        let c = from_status(&s);
        assert!(c.abnormal && c.message.contains("io timeout"));
        assert_eq!(to_resource_status(&s, "n1").phase, phase::DEGRADED);
    }
}
