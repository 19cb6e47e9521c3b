//! Volume and snapshot IDs from the names the CO chooses.
//!
//! A volume ID is also the StrataVolume's name, the replicas' volume name
//! and (prefixed) the Deployment and Service names, so it must be a
//! DNS-1035 label that leaves room for the prefix. Provisioned names
//! (`pvc-<uuid>`, 40 characters) are used as they are, so `kubectl get
//! stratavolumes` shows the PV's name; any other name becomes `v-` and a
//! hash of it (the same name always gives the same ID, which makes
//! CreateVolume idempotent; the original name is kept in the resource's
//! spec and checked, so two names can never share a volume).
//!
//! A snapshot ID is `VOLUME_ID/SNAPSHOT`: the volume it lives in, then the
//! strata snapshot name (the CO's name when it is a valid one, else `s-`
//! and a hash).
//!
//! A backup's snapshot ID ([`BackupHandle`]) is self-contained, so that a
//! pre-provisioned VolumeSnapshotContent holding it works in any cluster
//! that can reach the same target (disaster recovery):
//!
//! ```text
//! backup:SIZE:VOLUME/ID@TARGET
//! backup:67108864:pvc-0d8e5b2a-3f4c-4a57-9a0e-8f1c2b3d4e5f/20261205T010203.456Z-1a2b3c4d@s3://dr/cluster-a
//! ```
//!
//! `SIZE` is the volume's size in bytes when the backup was taken (the
//! smallest volume it restores into), `VOLUME/ID` the backup in the target
//! (as `strata backup list` shows it), `TARGET` the `s3://bucket/prefix` it
//! went to. The `backup:` prefix and the `:` cannot occur in an in-cluster
//! ID (whose volume part is a DNS label), so the two never mix; `VOLUME`
//! and `ID` hold no `@`, so the first `@` ends them and the target may
//! hold anything after it. The S3 endpoint and credentials are not in the
//! handle: they belong to the cluster that uses it (its Secret).

/// Longest volume ID: Service names are DNS-1035 labels of at most 63
/// characters, and they carry [`crate::objects::NAME_PREFIX`].
pub const MAX_VOLUME_ID: usize = 52;

/// The volume ID for a CreateVolume name.
pub fn volume_id(name: &str) -> String {
    if is_dns_label(name) && name.len() <= MAX_VOLUME_ID {
        name.to_string()
    } else {
        format!("v-{}", short_hash(name))
    }
}

/// Whether `id` could have come from [`volume_id`] (anything else cannot
/// name a strata volume, so lookups answer NOT_FOUND without asking).
pub fn is_volume_id(id: &str) -> bool {
    is_dns_label(id) && id.len() <= MAX_VOLUME_ID
}

/// The strata snapshot name for a CreateSnapshot name.
pub fn snapshot_name(name: &str) -> String {
    let valid = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if valid {
        name.to_string()
    } else {
        format!("s-{}", short_hash(name))
    }
}

/// `VOLUME_ID/SNAPSHOT`.
pub fn snapshot_id(volume_id: &str, snapshot: &str) -> String {
    format!("{volume_id}/{snapshot}")
}

/// The (volume ID, snapshot name) of a snapshot ID, if it is one.
pub fn parse_snapshot_id(id: &str) -> Option<(&str, &str)> {
    let (volume, snapshot) = id.split_once('/')?;
    (is_volume_id(volume) && !snapshot.is_empty() && !snapshot.contains('/'))
        .then_some((volume, snapshot))
}

/// Prefix of a backup's snapshot ID.
pub const BACKUP_PREFIX: &str = "backup:";

/// A backup in an S3 target, as its snapshot ID names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupHandle {
    /// Bytes the backed-up volume held.
    pub size_bytes: u64,
    /// The backed-up volume's name in the target.
    pub volume: String,
    /// The backup's id in the target.
    pub id: String,
    /// `s3://bucket/prefix`.
    pub target: String,
}

/// Why a snapshot ID that claims to be a backup's is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "snapshot ID {id:?} is not a backup handle (backup:SIZE:VOLUME/ID@s3://BUCKET/PREFIX): {why}"
)]
pub struct BadHandle {
    pub id: String,
    pub why: String,
}

impl BackupHandle {
    /// The `VOLUME/ID` form `strata backup` and RestoreBackup take.
    pub fn backup_ref(&self) -> String {
        format!("{}/{}", self.volume, self.id)
    }

    /// The snapshot ID.
    pub fn to_id(&self) -> String {
        format!(
            "{BACKUP_PREFIX}{}:{}/{}@{}",
            self.size_bytes, self.volume, self.id, self.target
        )
    }

    /// Whether `id` claims to be a backup handle (then [`Self::parse`]
    /// says whether it is a valid one).
    pub fn claims(id: &str) -> bool {
        id.starts_with(BACKUP_PREFIX)
    }

    /// Parses a snapshot ID made by [`Self::to_id`].
    pub fn parse(id: &str) -> Result<BackupHandle, BadHandle> {
        let bad = |why: &str| BadHandle {
            id: id.chars().take(300).collect(),
            why: why.to_string(),
        };
        let rest = id
            .strip_prefix(BACKUP_PREFIX)
            .ok_or_else(|| bad("it does not start with \"backup:\""))?;
        let (size, rest) = rest
            .split_once(':')
            .ok_or_else(|| bad("no \":\" after the size"))?;
        let size_bytes: u64 = size
            .parse()
            .ok()
            .filter(|n: &u64| *n > 0 && n.is_multiple_of(4096))
            .ok_or_else(|| bad("the size is not a positive multiple of 4096"))?;
        let (backup, target) = rest
            .split_once('@')
            .ok_or_else(|| bad("no \"@\" before the target"))?;
        let (volume, backup_id) = backup
            .split_once('/')
            .ok_or_else(|| bad("the backup is not VOLUME/ID"))?;
        for (what, name) in [("volume", volume), ("backup id", backup_id)] {
            if !is_backup_name(name) {
                return Err(bad(&format!(
                    "the {what} {name:?} is not 1-200 of A-Z a-z 0-9 . _ - (not starting with '.')"
                )));
            }
        }
        check_target(target).map_err(|why| bad(&why))?;
        Ok(BackupHandle {
            size_bytes,
            volume: volume.to_string(),
            id: backup_id.to_string(),
            target: target.to_string(),
        })
    }
}

/// A backup id chosen before the backup runs: UTC time to the millisecond
/// (so it sorts with the ids `strata backup` makes, and the newest backup
/// stays the next one's base) and a hash of the CreateSnapshot name.
pub fn backup_id(csi_name: &str, now: chrono::DateTime<chrono::Utc>) -> String {
    format!(
        "{}-{}",
        now.format("%Y%m%dT%H%M%S%.3fZ"),
        &hex::encode(blake3::hash(csi_name.as_bytes()).as_bytes())[..8]
    )
}

/// A name the backup store accepts as a volume or backup id.
fn is_backup_name(s: &str) -> bool {
    (1..=200).contains(&s.len())
        && !s.starts_with('.')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Checks a backup target: `s3://BUCKET[/PREFIX]`, the bucket 3-63 of
/// a-z 0-9 . - and the prefix of A-Z a-z 0-9 . _ - / (at most 200 bytes
/// in all: the target is part of every handle).
pub fn check_target(url: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("s3://")
        .ok_or_else(|| format!("target {url:?}: only s3://BUCKET/PREFIX targets are supported"))?;
    if url.len() > 200 {
        return Err(format!("target {url:?}: longer than 200 bytes"));
    }
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let bucket_ok = (3..=63).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-'));
    if !bucket_ok {
        return Err(format!(
            "target {url:?}: the bucket name must be 3-63 of a-z 0-9 . -"
        ));
    }
    let prefix_ok = prefix
        .split('/')
        .filter(|p| !p.is_empty())
        .all(is_backup_name);
    if !prefix_ok {
        return Err(format!(
            "target {url:?}: the prefix must be /-separated parts of A-Z a-z 0-9 . _ -"
        ));
    }
    Ok(())
}

/// A lowercase letter, then lowercase letters, digits and inner dashes.
fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_lowercase()
        && b[b.len() - 1] != b'-'
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

fn short_hash(s: &str) -> String {
    hex::encode(&blake3::hash(s.as_bytes()).as_bytes()[..12])
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn pvc_names_are_kept() {
        let pvc = "pvc-0d8e5b2a-3f4c-4a57-9a0e-8f1c2b3d4e5f";
        assert_eq!(volume_id(pvc), pvc);
        assert!(volume_id("sanity-Node-Volume-ABC").starts_with("v-"));
        assert_ne!(volume_id("a-b-C"), volume_id("a-b-D"));
    }

    #[test]
    fn snapshot_ids_round_trip() {
        let id = snapshot_id("pvc-1", "snapshot-7");
        assert_eq!(parse_snapshot_id(&id), Some(("pvc-1", "snapshot-7")));
        assert_eq!(parse_snapshot_id("no-slash"), None);
        assert_eq!(parse_snapshot_id("Bad_Volume/x"), None);
        assert_eq!(parse_snapshot_id("v/a/b"), None);
        assert_eq!(snapshot_name("snap 1").len(), 26);
    }

    #[test]
    fn backup_handles_round_trip() {
        let h = BackupHandle {
            size_bytes: 64 << 20,
            volume: "pvc-0d8e5b2a-3f4c-4a57-9a0e-8f1c2b3d4e5f".into(),
            id: backup_id("snapshot-1", chrono::DateTime::UNIX_EPOCH),
            target: "s3://strata-dr/cluster-a".into(),
        };
        assert_eq!(h.id, "19700101T000000.000Z-".to_string() + &h.id[21..]);
        let id = h.to_id();
        assert!(BackupHandle::claims(&id));
        assert_eq!(BackupHandle::parse(&id), Ok(h.clone()));
        assert_eq!(h.backup_ref(), format!("{}/{}", h.volume, h.id));
        // Never an in-cluster ID, and the other way round.
        assert_eq!(parse_snapshot_id(&id), None);
        assert!(!BackupHandle::claims("pvc-1/snap-1"));
        // A target may hold '@' and ':' after the first '@'.
        let odd = "backup:4096:v/1@s3://bkt/a@b";
        assert!(
            BackupHandle::parse(odd).is_err(),
            "'@' is not a prefix character"
        );
        let ok = BackupHandle::parse("backup:4096:v/1@s3://bkt").unwrap();
        assert_eq!(
            (ok.volume.as_str(), ok.id.as_str(), ok.target.as_str()),
            ("v", "1", "s3://bkt")
        );
    }

    #[test]
    fn bad_backup_handles_say_why() {
        for (id, why) in [
            ("backup:", "no \":\" after the size"),
            ("backup:x:v/1@s3://bkt", "size"),
            ("backup:0:v/1@s3://bkt", "size"),
            ("backup:4097:v/1@s3://bkt", "size"),
            ("backup:-4096:v/1@s3://bkt", "size"),
            ("backup:99999999999999999999999:v/1@s3://bkt", "size"),
            ("backup:4096:v/1", "no \"@\""),
            ("backup:4096:v1@s3://bkt", "not VOLUME/ID"),
            ("backup:4096:/1@s3://bkt", "volume"),
            ("backup:4096:v/@s3://bkt", "backup id"),
            ("backup:4096:v/a/b@s3://bkt", "backup id"),
            ("backup:4096:.v/1@s3://bkt", "volume"),
            ("backup:4096:v/1@http://bkt", "only s3://"),
            ("backup:4096:v/1@file:///tmp/x", "only s3://"),
            ("backup:4096:v/1@s3://b", "bucket"),
            ("backup:4096:v/1@s3://Bucket", "bucket"),
            ("backup:4096:v/1@s3://bkt/../x", "prefix"),
            ("backup:4096:v/1@s3://bkt/a b", "prefix"),
            ("backup:4096:v/1@", "only s3://"),
        ] {
            let e = BackupHandle::parse(id).unwrap_err();
            assert!(e.to_string().contains(why), "{id}: {e}");
        }
        assert!(BackupHandle::parse("pvc-1/snap").is_err());
    }

    #[test]
    fn targets() {
        for ok in [
            "s3://bkt",
            "s3://bkt/",
            "s3://my.bucket-1/a/b_c/d.e",
            "s3://bkt/x//y",
        ] {
            assert_eq!(check_target(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "s3://",
            "S3://bkt",
            "s3:/bkt",
            "gs://bkt/p",
            "s3://bk",
            "s3://bkt/.hidden",
            "s3://bkt/p?q",
        ] {
            assert!(check_target(bad).is_err(), "{bad}");
        }
        assert!(check_target(&format!("s3://bkt/{}", "a".repeat(200))).is_err());
    }

    proptest! {
        #[test]
        fn backup_handle_parser_never_panics(s in "backup:.{0,120}") {
            if let Ok(h) = BackupHandle::parse(&s) {
                prop_assert_eq!(BackupHandle::parse(&h.to_id()), Ok(h));
            }
        }

        #[test]
        fn backup_handles_from_any_csi_name_parse(name in ".{1,200}", size in 1u64..1 << 40) {
            let h = BackupHandle {
                size_bytes: size * 4096,
                volume: volume_id(&name),
                id: backup_id(&name, chrono::Utc::now()),
                target: "s3://bkt/p".into(),
            };
            prop_assert_eq!(BackupHandle::parse(&h.to_id()), Ok(h));
        }

        #[test]
        fn every_name_gives_a_valid_stable_id(name in ".{1,200}") {
            let id = volume_id(&name);
            prop_assert!(is_volume_id(&id));
            prop_assert_eq!(&id, &volume_id(&name));
            let snap = snapshot_name(&name);
            prop_assert!(parse_snapshot_id(&snapshot_id(&id, &snap)).is_some());
        }
    }
}
