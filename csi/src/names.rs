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

    proptest! {
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
