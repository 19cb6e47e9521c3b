//! Flags of a controller (`controller serve`, `up`) about backups: the
//! schedules it runs and how it opens backup targets by default.

use std::path::PathBuf;

use clap::Args;
use strata_backup::{BackupSchedule, S3Options, TargetOptions};

#[derive(Debug, Args)]
pub struct BackupFlags {
    /// A backup schedule this controller runs, as JSON, e.g.
    /// '{"cron":"0 3 * * *","target":"file:///var/backups/strata","retention":{"keep_last":7,"keep_daily":7}}'
    /// (cron in UTC; five fields, or six with seconds first). Repeat for
    /// several. Each run takes a snapshot, backs up what changed since the
    /// last run, then applies the retention.
    #[arg(long = "backup-schedule", value_parser = parse_schedule)]
    pub schedules: Vec<BackupSchedule>,
    /// Key file for encrypted backups (else the STRATA_BACKUP_KEY
    /// environment variable; neither: backups are not encrypted).
    #[arg(long = "backup-key-file", env = "STRATA_BACKUP_KEY_FILE")]
    pub key_file: Option<PathBuf>,
    /// S3 endpoint of an S3-compatible server (path-style addressing).
    /// Credentials and region come from the standard AWS chain.
    #[arg(long = "s3-endpoint", env = "STRATA_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,
}

fn parse_schedule(s: &str) -> Result<BackupSchedule, String> {
    let schedule: BackupSchedule =
        serde_json::from_str(s).map_err(|e| format!("not a schedule ({e}): {s}"))?;
    schedule.validate().map_err(|e| e.to_string())?;
    Ok(schedule)
}

impl BackupFlags {
    /// How the controller opens targets when a request says nothing else.
    pub fn target_options(&self) -> anyhow::Result<TargetOptions> {
        Ok(TargetOptions {
            s3: S3Options {
                path_style: self.s3_endpoint.is_some(),
                endpoint: self.s3_endpoint.clone(),
                ..Default::default()
            },
            key: strata_backup::load_key(self.key_file.as_deref())?,
            ..Default::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_parse_from_json_and_bad_ones_are_refused() {
        let s = parse_schedule(
            r#"{"cron":"*/5 * * * *","target":"file:///b","retention":{"keep_last":3}}"#,
        )
        .unwrap();
        assert_eq!(s.retention.keep_last, 3);
        assert!(parse_schedule(r#"{"cron":"nope","target":"file:///b"}"#).is_err());
        assert!(parse_schedule(r#"{"cron":"0 3 * * *","target":"http://x"}"#).is_err());
        assert!(parse_schedule("0 3 * * *").is_err());
    }
}
