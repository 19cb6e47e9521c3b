//! The backup calls of the management API: run a backup or a restore in
//! this controller and stream its progress to the caller; the last event
//! carries the summary (or the stream ends with an error status).

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use strata_backup::{BackupOptions, LogProgress, Progress, S3Options, TargetOptions};
use strata_proto::controller::{BackupEvent, BackupRequest, RestoreRequest, TargetSpec};
use tokio::sync::mpsc;
use tonic::Status;

use crate::backup::{run_backup, run_restore, JobError};
use crate::replicator::Volume;

pub type EventStream = Pin<Box<dyn Stream<Item = Result<BackupEvent, Status>> + Send>>;

/// Progress sent to the caller (and logged here).
struct StreamProgress {
    tx: mpsc::UnboundedSender<Result<BackupEvent, Status>>,
    log: LogProgress,
    phase: parking_lot::Mutex<(String, u64, bool)>,
    done: AtomicU64,
}

impl Progress for StreamProgress {
    fn start(&self, what: &str, total: u64, bytes: bool) {
        self.log.start(what, total, bytes);
        *self.phase.lock() = (what.to_string(), total, bytes);
        self.done.store(0, Ordering::Relaxed);
        self.send();
    }

    fn advance(&self, n: u64) {
        self.log.advance(n);
        self.done.fetch_add(n, Ordering::Relaxed);
        self.send();
    }

    fn finish(&self) {
        self.log.finish();
    }
}

impl StreamProgress {
    fn send(&self) {
        let (phase, total, bytes) = self.phase.lock().clone();
        let _ = self.tx.send(Ok(BackupEvent {
            phase,
            done: self.done.load(Ordering::Relaxed),
            total,
            bytes,
            result_json: String::new(),
        }));
    }
}

/// The request's target options over the controller's defaults.
fn options(defaults: &TargetOptions, spec: &TargetSpec) -> TargetOptions {
    let mut o = defaults.clone();
    if !spec.endpoint.is_empty() {
        o.s3 = S3Options {
            endpoint: Some(spec.endpoint.clone()),
            path_style: true,
            ..o.s3
        };
    }
    if !spec.region.is_empty() {
        o.s3.region = Some(spec.region.clone());
    }
    o.s3.path_style |= spec.path_style;
    if !spec.key.is_empty() {
        o.key = Some(spec.key.clone());
    }
    if spec.parallel > 0 {
        o.parallel = spec.parallel as usize;
    }
    o
}

/// Runs `job` in the background, streaming its progress and then its
/// result as JSON.
fn stream<F, Fut, T>(job: F) -> EventStream
where
    F: FnOnce(Arc<StreamProgress>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T, JobError>> + Send,
    T: serde::Serialize,
{
    let (tx, rx) = mpsc::unbounded_channel();
    let progress = Arc::new(StreamProgress {
        tx: tx.clone(),
        log: LogProgress::new(Duration::from_secs(10)),
        phase: parking_lot::Mutex::new((String::new(), 0, true)),
        done: AtomicU64::new(0),
    });
    tokio::spawn(async move {
        let result = job(progress).await;
        let _ = tx.send(match result {
            Ok(summary) => Ok(BackupEvent {
                result_json: serde_json::to_string(&summary).unwrap_or_default(),
                ..Default::default()
            }),
            Err(e) => Err(Status::from(e)),
        });
    });
    Box::pin(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    }))
}

pub fn create(
    volume: Arc<Volume>,
    defaults: &TargetOptions,
    req: BackupRequest,
) -> Result<EventStream, Status> {
    let spec = req.target.unwrap_or_default();
    if spec.url.is_empty() {
        return Err(Status::invalid_argument(format!(
            "volume {}: a backup needs a target URL",
            volume.name
        )));
    }
    let opts = options(defaults, &spec);
    let snapshot = (!req.snapshot.is_empty()).then_some(req.snapshot);
    Ok(stream(move |progress| async move {
        run_backup(
            &volume,
            &opts,
            &spec.url,
            snapshot.as_deref(),
            &BackupOptions {
                full: req.full,
                id: (!req.id.is_empty()).then_some(req.id),
            },
            progress.as_ref(),
        )
        .await
    }))
}

pub fn restore(
    volume: Arc<Volume>,
    defaults: &TargetOptions,
    req: RestoreRequest,
) -> Result<EventStream, Status> {
    let spec = req.target.unwrap_or_default();
    let attached = volume.attached.load(Ordering::Relaxed);
    if attached > 0 && !req.force {
        return Err(Status::failed_precondition(format!(
            "volume {}: {attached} client(s) attached; detach them before a restore or pass --force",
            volume.name
        )));
    }
    if spec.url.is_empty() || req.backup.is_empty() {
        return Err(Status::invalid_argument(format!(
            "volume {}: a restore needs a target URL and a backup id",
            volume.name
        )));
    }
    let opts = options(defaults, &spec);
    Ok(stream(move |progress| async move {
        run_restore(&volume, &opts, &spec.url, &req.backup, progress.as_ref()).await
    }))
}
