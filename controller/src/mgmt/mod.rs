//! The controller's management surface: the `VolumeControl` gRPC service
//! (what `strata volume status` calls) and Prometheus text on `/metrics`.
//! The snapshot calls are in `snapshots.rs`.

mod backups;
mod snapshots;
mod status;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use std::net::SocketAddr;
use strata_proto::controller::volume_control_server::VolumeControl;

use strata_proto::controller::{
    BackupRequest, CloneReply, CloneRequest, ExpandReply, ExpandRequest, IoCounters,
    ReplicaAddress, ReplicaInfo, RestoreRequest, RevertRequest, ScheduleStatus, SnapshotCreated,
    SnapshotList, SnapshotRef, StatusRequest, VolumeStatus,
};
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};

use crate::backup::ScheduleState;
use crate::replicator::{control, Health, LatencyClass, Slot, Volume};

/// gRPC handlers: thin, converting the volume's state to messages.
pub struct VolumeService {
    pub volume: Arc<Volume>,
    pub nbd_address: String,
    /// How backups asked for over this API open targets by default.
    pub backup_defaults: strata_backup::TargetOptions,
    pub schedules: Arc<Vec<Arc<ScheduleState>>>,
}

impl VolumeService {
    fn status_now(&self) -> VolumeStatus {
        let mut s = status_of(&self.volume, &self.nbd_address);
        s.schedules = self.schedules.iter().map(|s| schedule_status(s)).collect();
        s
    }
}

fn schedule_status(s: &ScheduleState) -> ScheduleStatus {
    let last = s.last.lock().clone().unwrap_or_default();
    let r = s.schedule.retention;
    ScheduleStatus {
        cron: s.schedule.cron.clone(),
        target: s.schedule.target.clone(),
        next_run: *s.next.lock(),
        last_finished: last.finished,
        last_ok: last.ok,
        last_message: last.message,
        last_bytes_uploaded: last.bytes_uploaded,
        last_duration_ms: last.duration_ms,
        keep_last: r.keep_last,
        keep_daily: r.keep_daily,
        keep_weekly: r.keep_weekly,
    }
}

pub fn status_of(volume: &Volume, nbd_address: &str) -> VolumeStatus {
    let io = &volume.io;
    VolumeStatus {
        volume: volume.name.clone(),
        size: volume.size(),
        epoch: volume.epoch(),
        state: volume.state().to_string(),
        replicas_configured: volume.slots().len() as u32,
        write_quorum: volume.quorum() as u32,
        replicas: volume
            .slots()
            .iter()
            .map(|s| {
                let (state, fault_reason) = match s.health() {
                    Health::Healthy(_) => ("healthy".to_string(), String::new()),
                    Health::Syncing(_) => ("syncing".to_string(), String::new()),
                    Health::Faulted { reason } => ("faulted".to_string(), reason),
                };
                let p = s.progress.lock().clone();
                let syncing = state == "syncing";
                let disk = s.disk.report(&volume.name, &s.addr.to_string());
                ReplicaInfo {
                    flush_latency_us: disk.flush_latency.as_micros() as u64,
                    flush_latency_max_us: disk.flush_latency_max.as_micros() as u64,
                    write_latency_us: disk.write_latency.as_micros() as u64,
                    write_bytes_per_sec: disk.write_bytes_per_sec,
                    slow_reason: disk.slow.unwrap_or_default(),
                    address: s.addr.to_string(),
                    state,
                    fault_reason,
                    in_flight: s.in_flight.load(Ordering::Relaxed),
                    ops_ok: s.ops_ok.load(Ordering::Relaxed),
                    ops_failed: s.ops_failed.load(Ordering::Relaxed),
                    sync_done_bytes: if syncing { p.done_bytes } else { 0 },
                    sync_total_bytes: if syncing { p.total_bytes } else { 0 },
                    sync_rate_mib: if syncing { p.rate_mib() } else { 0.0 },
                    sync_eta_secs: if syncing { p.eta_secs() } else { 0 },
                    index_bytes: s.index_bytes.load(Ordering::Relaxed),
                    sync_kind: match (syncing, p.full) {
                        (false, _) => String::new(),
                        (true, _) if p.verify => "verify".into(),
                        (true, true) => "full".into(),
                        (true, false) => "delta".into(),
                    },
                }
            })
            .collect(),
        io: Some(IoCounters {
            reads: io.reads.load(Ordering::Relaxed),
            writes: io.writes.load(Ordering::Relaxed),
            flushes: io.flushes.load(Ordering::Relaxed),
            trims: io.trims.load(Ordering::Relaxed),
            errors: io.errors.load(Ordering::Relaxed),
            bytes_read: io.bytes_read.load(Ordering::Relaxed),
            bytes_written: io.bytes_written.load(Ordering::Relaxed),
        }),
        nbd_address: nbd_address.to_string(),
        attached_clients: volume.attached.load(Ordering::Relaxed) as u32,
        last_snapshot_pause_us: volume.last_snapshot_pause_us.load(Ordering::Relaxed),
        lag_faults: volume.lag.faults.load(Ordering::Relaxed),
        write_quorum_latency_us: volume.lag.typical(LatencyClass::Cached).as_micros() as u64,
        flush_quorum_latency_us: volume.lag.typical(LatencyClass::Durable).as_micros() as u64,
        schedules: Vec::new(),
    }
}

#[tonic::async_trait]
impl VolumeControl for VolumeService {
    async fn status(&self, _req: Request<StatusRequest>) -> Result<Response<VolumeStatus>, Status> {
        refresh_index_bytes(&self.volume).await;
        Ok(Response::new(self.status_now()))
    }

    async fn add_replica(
        &self,
        req: Request<ReplicaAddress>,
    ) -> Result<Response<VolumeStatus>, Status> {
        let addr: SocketAddr = req
            .into_inner()
            .address
            .parse()
            .map_err(|e| Status::invalid_argument(format!("not an address: {e}")))?;
        if self.volume.slots().iter().any(|s| s.addr == addr) {
            return Err(Status::already_exists(format!(
                "{addr} is already a replica of {}",
                self.volume.name
            )));
        }
        if self.volume.slots().len() >= 5 {
            return Err(Status::failed_precondition(
                "a volume has at most 5 replicas",
            ));
        }
        // A new slot is faulted with no history: the recovery loop creates
        // the replica there and rebuilds it fully while IO continues.
        self.volume.push_slot(Slot::new(
            addr,
            Health::Faulted {
                reason: "added; waiting to be rebuilt".into(),
            },
            None,
        ));
        tracing::info!(volume = %self.volume.name, replica = %addr, "replica added");
        Ok(Response::new(self.status_now()))
    }

    async fn remove_replica(
        &self,
        req: Request<ReplicaAddress>,
    ) -> Result<Response<VolumeStatus>, Status> {
        let addr: SocketAddr = req
            .into_inner()
            .address
            .parse()
            .map_err(|e| Status::invalid_argument(format!("not an address: {e}")))?;
        self.volume.remove_slot(addr).await?;
        tracing::info!(volume = %self.volume.name, replica = %addr, "replica removed");
        Ok(Response::new(self.status_now()))
    }

    async fn create_snapshot(
        &self,
        req: Request<SnapshotRef>,
    ) -> Result<Response<SnapshotCreated>, Status> {
        snapshots::create(&self.volume, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn list_snapshots(
        &self,
        _req: Request<StatusRequest>,
    ) -> Result<Response<SnapshotList>, Status> {
        snapshots::list(&self.volume).await.map(Response::new)
    }

    async fn delete_snapshot(
        &self,
        req: Request<SnapshotRef>,
    ) -> Result<Response<SnapshotList>, Status> {
        snapshots::delete(&self.volume, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn revert_snapshot(
        &self,
        req: Request<RevertRequest>,
    ) -> Result<Response<SnapshotList>, Status> {
        snapshots::revert(&self.volume, req.into_inner())
            .await
            .map(Response::new)
    }

    type CreateBackupStream = backups::EventStream;

    async fn create_backup(
        &self,
        req: Request<BackupRequest>,
    ) -> Result<Response<Self::CreateBackupStream>, Status> {
        backups::create(self.volume.clone(), &self.backup_defaults, req.into_inner())
            .map(Response::new)
    }

    type RestoreBackupStream = backups::EventStream;

    async fn restore_backup(
        &self,
        req: Request<RestoreRequest>,
    ) -> Result<Response<Self::RestoreBackupStream>, Status> {
        backups::restore(self.volume.clone(), &self.backup_defaults, req.into_inner())
            .map(Response::new)
    }

    async fn clone_volume(
        &self,
        req: Request<CloneRequest>,
    ) -> Result<Response<CloneReply>, Status> {
        snapshots::clone(&self.volume, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn expand_volume(
        &self,
        req: Request<ExpandRequest>,
    ) -> Result<Response<ExpandReply>, Status> {
        let e = self.volume.expand(req.into_inner().size).await?;
        Ok(Response::new(ExpandReply {
            old_size: e.old_size,
            new_size: e.new_size,
            rounded: e.rounded,
            pause_us: e.pause.as_micros() as u64,
        }))
    }
}

/// Prometheus text exposition of one volume.
/// How long a status or metrics request waits for a replica's index size.
const INDEX_BYTES_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// Asks every replica that is not faulted for the size of its in-memory
/// index (`ReplicaStatus.index_bytes`) and keeps it on its slot for
/// [`status_of`] and [`metrics_text`]. The replicas are asked in parallel;
/// one that does not answer in [`INDEX_BYTES_TIMEOUT`] keeps its last figure.
pub async fn refresh_index_bytes(volume: &Volume) {
    let asks = volume
        .slots()
        .into_iter()
        .filter(|s| !matches!(s.health(), Health::Faulted { .. }))
        .map(|slot| async move {
            match control::status(slot.addr, &volume.name, INDEX_BYTES_TIMEOUT).await {
                Ok(st) => slot.index_bytes.store(st.index_bytes, Ordering::Relaxed),
                Err(e) => tracing::debug!(replica = %slot.addr, "index size not refreshed: {e}"),
            }
        });
    futures::future::join_all(asks).await;
}

pub fn metrics_text(volume: &Volume, schedules: &[Arc<ScheduleState>]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let v = &volume.name;
    let io = &volume.io;
    let volume_metrics = [
        (
            "strata_volume_reads_total",
            "counter",
            "Client reads served.",
            io.reads.load(Ordering::Relaxed),
        ),
        (
            "strata_volume_writes_total",
            "counter",
            "Client writes acknowledged.",
            io.writes.load(Ordering::Relaxed),
        ),
        (
            "strata_volume_flushes_total",
            "counter",
            "Client flushes acknowledged.",
            io.flushes.load(Ordering::Relaxed),
        ),
        (
            "strata_volume_trims_total",
            "counter",
            "Client trims acknowledged.",
            io.trims.load(Ordering::Relaxed),
        ),
        (
            "strata_volume_errors_total",
            "counter",
            "Client requests that failed.",
            io.errors.load(Ordering::Relaxed),
        ),
        (
            "strata_volume_read_bytes_total",
            "counter",
            "Bytes read by clients.",
            io.bytes_read.load(Ordering::Relaxed),
        ),
        (
            "strata_volume_written_bytes_total",
            "counter",
            "Bytes written by clients.",
            io.bytes_written.load(Ordering::Relaxed),
        ),
        (
            "strata_volume_size_bytes",
            "gauge",
            "Volume size.",
            volume.size(),
        ),
        (
            "strata_volume_lag_faults_total",
            "counter",
            "Replicas faulted for lagging their peers (not for an error).",
            volume.lag.faults.load(Ordering::Relaxed),
        ),
        (
            "strata_volume_write_quorum_latency_microseconds",
            "gauge",
            "Recent time to write quorum of page-cache requests (moving average).",
            volume.lag.typical(LatencyClass::Cached).as_micros() as u64,
        ),
        (
            "strata_volume_flush_quorum_latency_microseconds",
            "gauge",
            "Recent time to write quorum of flushes and FUA writes (moving average).",
            volume.lag.typical(LatencyClass::Durable).as_micros() as u64,
        ),
        (
            "strata_volume_epoch",
            "gauge",
            "Fencing epoch of this controller.",
            volume.epoch(),
        ),
        (
            "strata_volume_healthy_replicas",
            "gauge",
            "Replicas up to date (healthy).",
            volume.healthy() as u64,
        ),
        (
            "strata_volume_write_quorum",
            "gauge",
            "Healthy replicas needed to accept writes.",
            volume.quorum() as u64,
        ),
    ];
    for (name, kind, help, value) in volume_metrics {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{volume=\"{v}\"}} {value}"
        );
    }
    let _ = writeln!(out, "# HELP strata_replica_healthy 1 if the replica is healthy, 0 if faulted.\n# TYPE strata_replica_healthy gauge");
    for s in &volume.slots() {
        let _ = writeln!(
            out,
            "strata_replica_healthy{{volume=\"{v}\",replica=\"{}\"}} {}",
            s.addr,
            s.is_healthy() as u8
        );
    }
    let _ = writeln!(out, "# HELP strata_replica_ops_total Replica requests by result.\n# TYPE strata_replica_ops_total counter");
    for s in &volume.slots() {
        let _ = writeln!(
            out,
            "strata_replica_ops_total{{volume=\"{v}\",replica=\"{}\",result=\"ok\"}} {}",
            s.addr,
            s.ops_ok.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "strata_replica_ops_total{{volume=\"{v}\",replica=\"{}\",result=\"failed\"}} {}",
            s.addr,
            s.ops_failed.load(Ordering::Relaxed)
        );
    }
    let _ = writeln!(
        out,
        "# HELP strata_replica_sync_bytes Resync/rebuild progress of a syncing replica.\n# TYPE strata_replica_sync_bytes gauge"
    );
    for s in &volume.slots() {
        if let Health::Syncing(_) = s.health() {
            let p = s.progress.lock().clone();
            let _ = writeln!(
                out,
                "strata_replica_sync_bytes{{volume=\"{v}\",replica=\"{}\",kind=\"done\"}} {}",
                s.addr, p.done_bytes
            );
            let _ = writeln!(
                out,
                "strata_replica_sync_bytes{{volume=\"{v}\",replica=\"{}\",kind=\"total\"}} {}",
                s.addr, p.total_bytes
            );
        }
    }
    let _ = writeln!(out, "# HELP strata_replica_in_flight Requests in flight to the replica.\n# TYPE strata_replica_in_flight gauge");
    for s in &volume.slots() {
        let _ = writeln!(
            out,
            "strata_replica_in_flight{{volume=\"{v}\",replica=\"{}\"}} {}",
            s.addr,
            s.in_flight.load(Ordering::Relaxed)
        );
    }
    let _ = writeln!(out, "# HELP strata_replica_index_bytes Heap bytes of the replica's in-memory index, as it last reported them.\n# TYPE strata_replica_index_bytes gauge");
    for s in &volume.slots() {
        let _ = writeln!(
            out,
            "strata_replica_index_bytes{{volume=\"{v}\",replica=\"{}\"}} {}",
            s.addr,
            s.index_bytes.load(Ordering::Relaxed)
        );
    }
    let _ = writeln!(
        out,
        "# HELP strata_replica_flush_latency_seconds Moving average of the replica's flush latency.\n# TYPE strata_replica_flush_latency_seconds gauge\n\
         # HELP strata_replica_flush_latency_max_seconds The replica's longest flush.\n# TYPE strata_replica_flush_latency_max_seconds gauge\n\
         # HELP strata_replica_write_latency_seconds Moving average of the replica's page-cache write latency.\n# TYPE strata_replica_write_latency_seconds gauge\n\
         # HELP strata_replica_write_bytes_per_second Bytes written to the replica per second over the last 5 s.\n# TYPE strata_replica_write_bytes_per_second gauge\n\
         # HELP strata_replica_written_bytes_total Bytes written to the replica.\n# TYPE strata_replica_written_bytes_total counter\n\
         # HELP strata_replica_slow 1 if the replica's flushes take longer than the slow threshold.\n# TYPE strata_replica_slow gauge"
    );
    for s in &volume.slots() {
        let d = s.disk.report(v, &s.addr.to_string());
        let r = s.addr;
        let _ = writeln!(
            out,
            "strata_replica_flush_latency_seconds{{volume=\"{v}\",replica=\"{r}\"}} {}\n\
             strata_replica_flush_latency_max_seconds{{volume=\"{v}\",replica=\"{r}\"}} {}\n\
             strata_replica_write_latency_seconds{{volume=\"{v}\",replica=\"{r}\"}} {}\n\
             strata_replica_write_bytes_per_second{{volume=\"{v}\",replica=\"{r}\"}} {}\n\
             strata_replica_written_bytes_total{{volume=\"{v}\",replica=\"{r}\"}} {}\n\
             strata_replica_slow{{volume=\"{v}\",replica=\"{r}\"}} {}",
            d.flush_latency.as_secs_f64(),
            d.flush_latency_max.as_secs_f64(),
            d.write_latency.as_secs_f64(),
            d.write_bytes_per_sec,
            d.bytes_written,
            d.slow.is_some() as u8
        );
    }
    if !schedules.is_empty() {
        let _ = writeln!(out, "# HELP strata_backup_runs_total Scheduled backup runs by result.\n# TYPE strata_backup_runs_total counter");
        for s in schedules {
            let t = &s.schedule.target;
            let _ = writeln!(
                out,
                "strata_backup_runs_total{{volume=\"{v}\",target=\"{t}\",result=\"ok\"}} {}",
                s.runs_ok.load(Ordering::Relaxed)
            );
            let _ = writeln!(
                out,
                "strata_backup_runs_total{{volume=\"{v}\",target=\"{t}\",result=\"failed\"}} {}",
                s.runs_failed.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(out, "# HELP strata_backup_last_run_timestamp_seconds When the last scheduled backup finished.\n# TYPE strata_backup_last_run_timestamp_seconds gauge");
        let _ = writeln!(out, "# HELP strata_backup_last_success 1 if the last scheduled backup succeeded.\n# TYPE strata_backup_last_success gauge");
        let _ = writeln!(out, "# HELP strata_backup_last_uploaded_bytes Bytes the last scheduled backup uploaded.\n# TYPE strata_backup_last_uploaded_bytes gauge");
        for s in schedules {
            let t = &s.schedule.target;
            if let Some(last) = s.last.lock().clone() {
                let _ = writeln!(
                    out,
                    "strata_backup_last_run_timestamp_seconds{{volume=\"{v}\",target=\"{t}\"}} {}",
                    last.finished
                );
                let _ = writeln!(
                    out,
                    "strata_backup_last_success{{volume=\"{v}\",target=\"{t}\"}} {}",
                    last.ok as u8
                );
                let _ = writeln!(
                    out,
                    "strata_backup_last_uploaded_bytes{{volume=\"{v}\",target=\"{t}\"}} {}",
                    last.bytes_uploaded
                );
            }
        }
    }
    out
}

/// `GET /metrics` returns [`metrics_text`], anything else 404
/// ([`strata_net::http::serve_get`]). One request per connection.
pub async fn serve_metrics(
    listener: TcpListener,
    volume: Arc<Volume>,
    schedules: Arc<Vec<Arc<ScheduleState>>>,
    shutdown: tokio::sync::watch::Receiver<bool>,
) {
    use strata_net::http::Reply;
    let limits = strata_net::Limits {
        name: "metrics",
        max_connections: 16,
        grace: std::time::Duration::from_secs(1),
    };
    strata_net::http::serve_get(listener, limits, shutdown, move |path: String| {
        let volume = volume.clone();
        let schedules = schedules.clone();
        async move {
            if path == "/metrics" || path.starts_with("/metrics?") {
                refresh_index_bytes(&volume).await;
                Reply {
                    status: "200 OK",
                    content_type: "text/plain; version=0.0.4",
                    body: metrics_text(&volume, &schedules),
                }
            } else {
                Reply::text("404 Not Found", "try /metrics\n")
            }
        }
    })
    .await;
}
