//! Mount points, read from `/proc/self/mountinfo`.

use std::path::Path;

/// A mount: what is mounted (the source device) where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// The path inside the source that is mounted (`/` for a whole
    /// filesystem; `/nbd0` for a device node bind-mounted from /dev).
    pub root: String,
    pub mount_point: String,
    pub source: String,
    pub fs_type: String,
}

/// Parses mountinfo text (`man 5 proc`): the mount point is field 5, the
/// filesystem type and source follow the ` - ` separator.
pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mut fields = left.split(' ');
            let root = unescape(fields.nth(3)?);
            let mount_point = unescape(fields.next()?);
            let mut r = right.split(' ');
            let fs_type = r.next()?.to_string();
            let source = unescape(r.next()?);
            Some(Mount {
                root,
                mount_point,
                source,
                fs_type,
            })
        })
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The mounts of this process's mount namespace.
pub fn mounts() -> std::io::Result<Vec<Mount>> {
    Ok(parse_mountinfo(&std::fs::read_to_string(
        "/proc/self/mountinfo",
    )?))
}

/// Where `device` is mounted or bind-mounted, other than at `except`:
/// mounts of its filesystem (source is the device), and the device node
/// itself bind-mounted from /dev (root is its path there).
pub fn mounts_of(device: &str, except: &[&Path]) -> std::io::Result<Vec<String>> {
    let node = device.strip_prefix("/dev").unwrap_or(device);
    let except: Vec<String> = except
        .iter()
        .map(|p| p.to_string_lossy().trim_end_matches('/').to_string())
        .collect();
    Ok(mounts()?
        .into_iter()
        .filter(|m| m.source == device || (m.root == node && m.fs_type == "devtmpfs"))
        .map(|m| m.mount_point)
        .filter(|p| !except.contains(p))
        .collect())
}

/// The last mount on `path` (the one visible there), if any.
pub fn mounted_at(path: &Path) -> std::io::Result<Option<Mount>> {
    let p = path.to_string_lossy();
    let p = p.trim_end_matches('/');
    Ok(mounts()?.into_iter().rev().find(|m| m.mount_point == p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mountinfo_lines() {
        let text = "36 35 98:0 /mnt1 /mnt/with\\040space rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n\
                    40 36 0:5 / /var/lib/kubelet/pods/x/volumes/kubernetes.io~csi/pvc/mount rw shared:3 - ext4 /dev/nbd0 rw\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].mount_point, "/mnt/with space");
        assert_eq!(m[0].root, "/mnt1");
        assert_eq!(m[0].source, "/dev/root");
        assert_eq!(m[1].fs_type, "ext4");
        assert_eq!(m[1].source, "/dev/nbd0");
    }
}
