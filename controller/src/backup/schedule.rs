//! The volume's backup schedules, run by the controller: each waits for its
//! next cron time (UTC), backs the volume up to its target, applies its
//! retention (`forget`) to this volume's backups there, and records the
//! run for `strata volume status` and `/metrics`. Runs of one schedule never
//! overlap; a run that fails is recorded and retried at the next time.

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use strata_backup::{forget, BackupSchedule, LogProgress, Target, TargetOptions};
use tokio::sync::watch;

use super::run_backup;
use crate::replicator::Volume;

/// What the last run of a schedule did.
#[derive(Debug, Clone, Default)]
pub struct LastRun {
    /// Unix seconds when it finished.
    pub finished: i64,
    pub ok: bool,
    /// The backup id, or the error.
    pub message: String,
    pub bytes_uploaded: u64,
    pub bytes_read: u64,
    pub duration_ms: u64,
}

/// A schedule with its last run and next time.
#[derive(Debug)]
pub struct ScheduleState {
    pub schedule: BackupSchedule,
    pub last: Mutex<Option<LastRun>>,
    /// Unix seconds of the next run (0: none).
    pub next: Mutex<i64>,
    pub runs_ok: std::sync::atomic::AtomicU64,
    pub runs_failed: std::sync::atomic::AtomicU64,
}

impl ScheduleState {
    pub fn new(schedule: BackupSchedule) -> Self {
        ScheduleState {
            schedule,
            last: Mutex::new(None),
            next: Mutex::new(0),
            runs_ok: Default::default(),
            runs_failed: Default::default(),
        }
    }
}

/// Runs every schedule until `shutdown`.
pub async fn run_schedules(
    volume: Arc<Volume>,
    opts: TargetOptions,
    schedules: Vec<Arc<ScheduleState>>,
    shutdown: watch::Receiver<bool>,
) {
    let mut tasks = Vec::new();
    for s in schedules {
        let (volume, opts, mut shutdown) = (volume.clone(), opts.clone(), shutdown.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let now = chrono::Utc::now();
                let next = match s.schedule.next_after(now) {
                    Ok(t) => t,
                    Err(e) => {
                        tracing::error!(volume = %volume.name, cron = %s.schedule.cron, "schedule stopped: {e}");
                        return;
                    }
                };
                *s.next.lock() = next.timestamp();
                let wait = (next - now).to_std().unwrap_or(Duration::ZERO);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = strata_net::stopped(&mut shutdown) => return,
                }
                run_once(&volume, &opts, &s).await;
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

async fn run_once(volume: &Arc<Volume>, opts: &TargetOptions, s: &ScheduleState) {
    use std::sync::atomic::Ordering;
    let t0 = Instant::now();
    let url = &s.schedule.target;
    tracing::info!(volume = %volume.name, target = %url, "scheduled backup starting");
    let progress = LogProgress::new(Duration::from_secs(10));
    let result = run_backup(volume, opts, url, None, &Default::default(), &progress).await;
    let mut run = LastRun {
        finished: 0,
        ok: result.is_ok(),
        duration_ms: t0.elapsed().as_millis() as u64,
        ..Default::default()
    };
    match result {
        Ok(summary) => {
            run.message = summary.id.clone();
            run.bytes_uploaded = summary.stats.bytes_uploaded;
            run.bytes_read = summary.stats.bytes_read;
            tracing::info!(volume = %volume.name, target = %url, backup = %summary.id, uploaded = summary.stats.bytes_uploaded, "scheduled backup done");
            if !s.schedule.retention.is_empty() {
                let forgot = async {
                    let target = Target::open(url, opts).await?;
                    forget(&target, Some(&volume.name), &s.schedule.retention, false).await
                }
                .await;
                if let Err(e) = forgot {
                    run.ok = false;
                    run.message = format!("{}; retention failed: {e}", summary.id);
                }
            }
        }
        Err(e) => {
            tracing::error!(volume = %volume.name, target = %url, "scheduled backup failed: {e}");
            run.message = e.to_string();
        }
    }
    if run.ok {
        s.runs_ok.fetch_add(1, Ordering::Relaxed);
    } else {
        s.runs_failed.fetch_add(1, Ordering::Relaxed);
    }
    run.finished = chrono::Utc::now().timestamp();
    *s.last.lock() = Some(run);
}
