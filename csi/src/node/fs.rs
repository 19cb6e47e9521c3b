//! Host tools the node plugin runs: blkid, mkfs, mount, resize, each with
//! a deadline.

use std::path::Path;

use crate::error::CsiError;

/// What ran and how it ended.
pub struct Ran {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `tool args`, killing it after `secs`.
pub fn run(tool: &str, args: &[&str], secs: u64) -> Result<Ran, CsiError> {
    let what = || format!("{tool} {}", args.join(" "));
    let out =
        strata_attach::fallback::run_with_deadline(tool, args, secs).map_err(|e| match e {
            strata_attach::AttachError::ToolTimeout { .. } => {
                CsiError::Unavailable(format!("{} did not finish within {secs} s", what()))
            }
            e => CsiError::Internal(format!("cannot run {}: {e}", what())),
        })?;
    Ok(Ran {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
    })
}

/// Runs and requires success.
pub fn run_ok(tool: &str, args: &[&str], secs: u64) -> Result<String, CsiError> {
    let r = run(tool, args, secs)?;
    if r.code != Some(0) {
        return Err(CsiError::Internal(format!(
            "{tool} {} failed ({:?}): {}",
            args.join(" "),
            r.code,
            r.stderr
        )));
    }
    Ok(r.stdout)
}

/// What a device holds, as `blkid -p` (a direct probe, no cache) sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    Empty,
    Filesystem(String),
    /// A partition table or something else that is not a filesystem.
    Other(String),
}

pub fn probe(device: &str) -> Result<Content, CsiError> {
    let r = run("blkid", &["-p", "-o", "export", device], 60)?;
    match r.code {
        // blkid: 2 means nothing was found.
        Some(2) => Ok(Content::Empty),
        Some(0) => Ok(parse_blkid(&r.stdout)),
        _ => Err(CsiError::Internal(format!(
            "blkid -p {device} failed: {}",
            r.stderr
        ))),
    }
}

/// Reads `blkid -o export` output.
pub fn parse_blkid(out: &str) -> Content {
    let get = |key: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
            .map(str::to_string)
    };
    match (get("TYPE"), get("PTTYPE")) {
        (Some(t), _) => Content::Filesystem(t),
        (None, Some(pt)) => Content::Other(format!("a {pt} partition table")),
        (None, None) => Content::Other("an unknown signature".into()),
    }
}

/// Makes `fs` on an empty device.
pub fn mkfs(device: &str, fs: &str) -> Result<(), CsiError> {
    let (tool, args): (&str, Vec<&str>) = match fs {
        // No discard pass: a new strata volume is already all zeroes.
        "ext4" => (
            "mkfs.ext4",
            vec!["-q", "-F", "-E", "nodiscard,lazy_itable_init=1", device],
        ),
        "xfs" => ("mkfs.xfs", vec!["-q", "-K", device]),
        other => return Err(CsiError::Unsupported(format!("filesystem {other:?}"))),
    };
    run_ok(tool, &args, 300).map(|_| ())
}

pub fn mount(
    source: &str,
    target: &Path,
    fs: Option<&str>,
    options: &[String],
) -> Result<(), CsiError> {
    let target = target.to_string_lossy();
    let opts = options.join(",");
    let mut args: Vec<&str> = Vec::new();
    if let Some(fs) = fs {
        args.extend(["-t", fs]);
    }
    if !opts.is_empty() {
        args.extend(["-o", &opts]);
    }
    args.extend([source, &target]);
    run_ok("mount", &args, 120).map(|_| ())
}

pub fn umount(target: &Path) -> Result<(), CsiError> {
    run_ok("umount", &[&target.to_string_lossy()], 120).map(|_| ())
}

/// Grows the filesystem on `device` (mounted at `mount_point`) to the
/// device's size.
pub fn grow(fs: &str, device: &str, mount_point: &Path) -> Result<(), CsiError> {
    match fs {
        "ext4" | "ext3" | "ext2" => run_ok("resize2fs", &[device], 600).map(|_| ()),
        "xfs" => run_ok("xfs_growfs", &[&mount_point.to_string_lossy()], 600).map(|_| ()),
        other => Err(CsiError::Unsupported(format!(
            "cannot grow a {other} filesystem"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_blkid_export() {
        assert_eq!(
            parse_blkid("DEVNAME=/dev/nbd0\nUUID=1\nTYPE=ext4\nUSAGE=filesystem\n"),
            Content::Filesystem("ext4".into())
        );
        assert_eq!(
            parse_blkid("DEVNAME=/dev/nbd0\nPTUUID=x\nPTTYPE=gpt\n"),
            Content::Other("a gpt partition table".into())
        );
    }
}
