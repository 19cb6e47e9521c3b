//! Backups and restores the CSI controller runs in the background: one
//! CreateBackup or RestoreBackup stream of a volume's controller each,
//! kept by key so that a retried CSI call joins the running one instead of
//! starting another (see `backups.rs` for why and how they are used).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use strata_proto::controller::{BackupEvent, TargetSpec};

use crate::error::{CsiError, CsiResult};

/// A background job's state.
enum JobState {
    Running { progress: String },
    Done(CsiResult<()>),
}

/// The backups and restores this CSI controller runs in the background, by
/// key (`backup/HANDLE`, `restore/VOLUME`). In memory only: after a
/// restart the StrataVolume records say what to start again.
#[derive(Clone, Default)]
pub struct Jobs(Arc<Mutex<HashMap<String, JobState>>>);

impl Jobs {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, JobState>> {
        // A panic elsewhere with the lock held leaves the map usable.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn is_running(&self, key: &str) -> bool {
        matches!(self.lock().get(key), Some(JobState::Running { .. }))
    }

    /// Starts `job` under `key` unless one runs; its result stays until
    /// [`Self::take_done`] takes it.
    pub(crate) fn start<F>(&self, key: &str, job: F) -> bool
    where
        F: FnOnce(Jobs, String),
    {
        {
            let mut m = self.lock();
            if m.contains_key(key) {
                return false;
            }
            m.insert(
                key.to_string(),
                JobState::Running {
                    progress: "starting".into(),
                },
            );
        }
        job(self.clone(), key.to_string());
        true
    }

    pub(crate) fn progress(&self, key: &str, text: String) {
        if let Some(JobState::Running { progress }) = self.lock().get_mut(key) {
            *progress = text;
        }
    }

    pub(crate) fn finish(&self, key: &str, result: CsiResult<()>) {
        self.lock().insert(key.to_string(), JobState::Done(result));
    }

    pub(crate) fn forget(&self, key: &str) {
        self.lock().remove(key);
    }

    /// Some(result) when the job ended (and forgets it); None while it
    /// runs or when there is none; the progress text while running.
    pub(crate) fn take_done(&self, key: &str) -> (Option<CsiResult<()>>, Option<String>) {
        let mut m = self.lock();
        match m.get(key) {
            Some(JobState::Running { progress }) => (None, Some(progress.clone())),
            Some(JobState::Done(_)) => match m.remove(key) {
                Some(JobState::Done(r)) => (Some(r), None),
                _ => (None, None),
            },
            None => (None, None),
        }
    }
}

pub(crate) fn target_spec(url: &str) -> Option<TargetSpec> {
    Some(TargetSpec {
        url: url.to_string(),
        ..Default::default()
    })
}

/// Reads a CreateBackup/RestoreBackup stream to its end, reporting
/// progress under `key`.
pub(crate) async fn drain(
    jobs: &Jobs,
    key: &str,
    what: &str,
    mut stream: tonic::Streaming<BackupEvent>,
) -> CsiResult<()> {
    loop {
        match stream.message().await {
            Ok(Some(ev)) if !ev.result_json.is_empty() => return Ok(()),
            Ok(Some(ev)) => {
                let unit = if ev.bytes { " bytes" } else { " objects" };
                jobs.progress(
                    key,
                    format!("{}: {} of {}{unit}", ev.phase, ev.done, ev.total),
                );
            }
            Ok(None) => {
                return Err(CsiError::Unavailable(format!(
                    "{what}: the controller's stream ended without a result"
                )))
            }
            Err(s) => return Err(CsiError::downstream(what, s)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_run_once_and_report_once() {
        let jobs = Jobs::default();
        let mut ran = 0;
        assert!(jobs.start("k", |_, _| ran += 1));
        assert!(!jobs.start("k", |_, _| ran += 1));
        assert_eq!(ran, 1);
        assert!(jobs.is_running("k"));
        jobs.progress("k", "half".into());
        assert!(matches!(jobs.take_done("k"), (None, Some(p)) if p == "half"));
        jobs.finish("k", Err(CsiError::Internal("boom".into())));
        assert!(!jobs.is_running("k"));
        assert!(matches!(
            jobs.take_done("k").0,
            Some(Err(CsiError::Internal(_)))
        ));
        assert!(matches!(jobs.take_done("k"), (None, None)));
    }
}
