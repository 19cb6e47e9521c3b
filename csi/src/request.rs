//! Checks shared by the Controller and Node services: the size a
//! CapacityRange asks for, and the capabilities strata offers.

use strata_proto::csi::volume_capability::access_mode::Mode;
use strata_proto::csi::volume_capability::AccessType;
use strata_proto::csi::{CapacityRange, VolumeCapability};

use crate::error::CsiError;

/// Volumes are whole 4 KiB blocks.
pub const BLOCK: u64 = 4096;
/// The size of a volume whose request names none.
pub const DEFAULT_SIZE: u64 = 1 << 30;
/// Filesystems the node plugin makes and grows.
pub const FILESYSTEMS: [&str; 2] = ["ext4", "xfs"];
/// The filesystem of a `Mount` volume that names none.
pub const DEFAULT_FS: &str = "ext4";

/// The size to create for `range`, as the CSI spec reads it: at least
/// `required_bytes`, at most `limit_bytes` (0: unset), rounded up to whole
/// blocks; with neither, [`DEFAULT_SIZE`] (or less, under the limit).
pub fn size_for(range: Option<&CapacityRange>) -> Result<u64, CsiError> {
    let (required, limit) = range.map_or((0, 0), |r| (r.required_bytes, r.limit_bytes));
    if required < 0 || limit < 0 {
        return Err(CsiError::OutOfRange(format!(
            "capacity range required={required} limit={limit}: sizes cannot be negative"
        )));
    }
    let (required, limit) = (required as u64, limit as u64);
    if limit != 0 && required > limit {
        return Err(CsiError::OutOfRange(format!(
            "capacity range required={required} is above limit={limit}"
        )));
    }
    let size = if required == 0 {
        if limit == 0 {
            DEFAULT_SIZE
        } else {
            (limit / BLOCK * BLOCK).min(DEFAULT_SIZE)
        }
    } else {
        required
            .checked_next_multiple_of(BLOCK)
            .ok_or_else(|| CsiError::OutOfRange(format!("{required} bytes is too large")))?
    };
    if size == 0 || (limit != 0 && size > limit) {
        return Err(CsiError::OutOfRange(format!(
            "capacity range required={required} limit={limit}: no whole number of 4 KiB blocks fits"
        )));
    }
    Ok(size)
}

/// What a capability asks the node to make of the volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    Block,
    Mount { fs: String, flags: Vec<String> },
}

/// Checks one capability; strata serves one node at a time (single-node
/// writer, single-writer and multi-writer), as a block device or an ext4
/// or xfs filesystem.
pub fn check_capability(c: &VolumeCapability) -> Result<Access, CsiError> {
    let mode = c
        .access_mode
        .as_ref()
        .ok_or_else(|| CsiError::Invalid("a volume capability without an access mode".into()))?
        .mode;
    match Mode::try_from(mode) {
        Ok(Mode::SingleNodeWriter | Mode::SingleNodeSingleWriter | Mode::SingleNodeMultiWriter) => {
        }
        Ok(other) => {
            return Err(CsiError::Unsupported(format!(
                "access mode {}: strata volumes are attached to one node at a time \
                 (SINGLE_NODE_WRITER, SINGLE_NODE_SINGLE_WRITER, SINGLE_NODE_MULTI_WRITER)",
                other.as_str_name()
            )))
        }
        Err(_) => return Err(CsiError::Invalid(format!("unknown access mode {mode}"))),
    }
    match &c.access_type {
        Some(AccessType::Block(_)) => Ok(Access::Block),
        Some(AccessType::Mount(m)) => {
            let fs = if m.fs_type.is_empty() {
                DEFAULT_FS.to_string()
            } else {
                m.fs_type.clone()
            };
            if !FILESYSTEMS.contains(&fs.as_str()) {
                return Err(CsiError::Unsupported(format!(
                    "filesystem {fs:?}: strata makes ext4 or xfs"
                )));
            }
            Ok(Access::Mount {
                fs,
                flags: m.mount_flags.clone(),
            })
        }
        None => Err(CsiError::Invalid(
            "a volume capability without an access type (block or mount)".into(),
        )),
    }
}

/// Whether the capability allows one writer (one pod) only.
pub fn is_single_writer(c: &VolumeCapability) -> bool {
    c.access_mode.as_ref().map(|m| m.mode) == Some(Mode::SingleNodeSingleWriter as i32)
}

/// Checks every capability of a request (at least one).
pub fn check_capabilities(caps: &[VolumeCapability]) -> Result<Vec<Access>, CsiError> {
    if caps.is_empty() {
        return Err(CsiError::Invalid("volume capabilities are missing".into()));
    }
    caps.iter().map(check_capability).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(required: i64, limit: i64) -> Option<CapacityRange> {
        Some(CapacityRange {
            required_bytes: required,
            limit_bytes: limit,
        })
    }

    #[test]
    fn sizes_follow_the_spec() {
        assert_eq!(size_for(None).unwrap(), DEFAULT_SIZE);
        assert_eq!(size_for(range(1, 0).as_ref()).unwrap(), 4096);
        assert_eq!(size_for(range(4097, 0).as_ref()).unwrap(), 8192);
        assert_eq!(size_for(range(4097, 8192).as_ref()).unwrap(), 8192);
        assert_eq!(size_for(range(0, 10_000).as_ref()).unwrap(), 8192);
        assert!(matches!(
            size_for(range(4097, 5000).as_ref()),
            Err(CsiError::OutOfRange(_))
        ));
        assert!(matches!(
            size_for(range(10, 5).as_ref()),
            Err(CsiError::OutOfRange(_))
        ));
        assert!(matches!(
            size_for(range(0, 100).as_ref()),
            Err(CsiError::OutOfRange(_))
        ));
        assert!(matches!(
            size_for(range(-1, 0).as_ref()),
            Err(CsiError::OutOfRange(_))
        ));
        assert!(size_for(range(i64::MAX, 0).as_ref()).is_ok());
    }
}
