//! Backup schedules and retention: plain serde data that a volume carries
//! (the controller runs it; the CSI driver can fill it from a StorageClass
//! or VolumeSnapshotClass parameter), and the retention policy `forget`
//! applies.

use chrono::{DateTime, Datelike, Utc};
use serde::{Deserialize, Serialize};

use crate::error::{BackupError, Result};

/// Which backups of a volume `forget` keeps: the union of the newest
/// `keep_last`, the newest of each of the last `keep_daily` days (UTC) that
/// have a backup, and the newest of each of the last `keep_weekly` ISO
/// weeks that have one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retention {
    #[serde(default)]
    pub keep_last: u32,
    #[serde(default)]
    pub keep_daily: u32,
    #[serde(default)]
    pub keep_weekly: u32,
}

impl Retention {
    /// True if the policy keeps nothing (forget refuses such a policy).
    pub fn is_empty(&self) -> bool {
        self.keep_last == 0 && self.keep_daily == 0 && self.keep_weekly == 0
    }

    /// Given backup times sorted newest first, which to keep.
    pub fn select(&self, newest_first: &[DateTime<Utc>]) -> Vec<bool> {
        let mut keep = vec![false; newest_first.len()];
        for k in keep.iter_mut().take(self.keep_last as usize) {
            *k = true;
        }
        let mut bucket = |n: u32, key: &dyn Fn(&DateTime<Utc>) -> (i32, u32)| {
            let mut last = None;
            let mut kept = 0;
            for (i, t) in newest_first.iter().enumerate() {
                if kept >= n {
                    break;
                }
                let k = key(t);
                if last != Some(k) {
                    keep[i] = true;
                    kept += 1;
                    last = Some(k);
                }
            }
        };
        bucket(self.keep_daily, &|t| (t.year(), t.ordinal()));
        bucket(self.keep_weekly, &|t| {
            let w = t.iso_week();
            (w.year(), w.week())
        });
        keep
    }
}

/// One schedule of a volume: when (a cron expression, UTC: `0 3 * * *` is
/// 03:00 every day; five fields, or six with seconds first), where to, and
/// what to keep after each run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupSchedule {
    pub cron: String,
    /// Target URL (`s3://bucket/prefix`, `file:///dir`).
    pub target: String,
    #[serde(default)]
    pub retention: Retention,
}

impl BackupSchedule {
    fn parsed(&self) -> Result<croner::Cron> {
        self.cron
            .parse::<croner::Cron>()
            .map_err(|e| BackupError::Invalid(format!("bad cron expression {:?}: {e}", self.cron)))
    }

    /// Checks the expression and the target URL's form.
    pub fn validate(&self) -> Result<()> {
        self.parsed()?;
        if !(self.target.starts_with("s3://") || self.target.starts_with("file:///")) {
            return Err(BackupError::Invalid(format!(
                "schedule target {:?} must be s3://bucket/prefix or file:///dir",
                self.target
            )));
        }
        Ok(())
    }

    /// The first run strictly after `t`.
    pub fn next_after(&self, t: DateTime<Utc>) -> Result<DateTime<Utc>> {
        self.parsed()?
            .find_next_occurrence(&t, false)
            .map_err(|e| BackupError::Invalid(format!("cron {:?} has no next run: {e}", self.cron)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn next_run() {
        let s = BackupSchedule {
            cron: "0 3 * * *".into(),
            target: "file:///b".into(),
            retention: Retention::default(),
        };
        s.validate().unwrap();
        let t = Utc.with_ymd_and_hms(2025, 1, 1, 3, 0, 0).unwrap();
        assert_eq!(
            s.next_after(t).unwrap(),
            Utc.with_ymd_and_hms(2025, 1, 2, 3, 0, 0).unwrap()
        );
        let t = Utc.with_ymd_and_hms(2025, 1, 1, 2, 59, 0).unwrap();
        assert_eq!(
            s.next_after(t).unwrap(),
            Utc.with_ymd_and_hms(2025, 1, 1, 3, 0, 0).unwrap()
        );
        let bad = BackupSchedule {
            cron: "every day".into(),
            ..s.clone()
        };
        assert!(bad.validate().is_err());
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<BackupSchedule>(&json).unwrap(), s);
    }

    #[test]
    fn retention_buckets() {
        // Newest first: two per day over 10 days.
        let times: Vec<_> = (0..20)
            .map(|i| {
                Utc.with_ymd_and_hms(2025, 3, 20, 12, 0, 0).unwrap()
                    - chrono::Duration::hours(12 * i)
            })
            .collect();
        let r = Retention {
            keep_last: 3,
            keep_daily: 4,
            keep_weekly: 2,
        };
        let keep = r.select(&times);
        let kept: Vec<usize> = keep
            .iter()
            .enumerate()
            .filter(|(_, k)| **k)
            .map(|(i, _)| i)
            .collect();
        // The newest 3, plus the newest of each day.
        assert!(kept.starts_with(&[0, 1, 2]));
        assert_eq!(r.select(&times).len(), 20);
        let daily_only = Retention {
            keep_daily: 4,
            ..Default::default()
        };
        let k: Vec<usize> = daily_only
            .select(&times)
            .iter()
            .enumerate()
            .filter(|(_, k)| **k)
            .map(|(i, _)| i)
            .collect();
        assert_eq!(k, vec![0, 2, 4, 6]);
        assert!(Retention::default().is_empty());
    }
}
