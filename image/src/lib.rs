//! `strata-image`: writes strata's container image as an OCI archive
//! without a container engine or a registry.
//!
//! Input: one staged root filesystem per architecture (a directory that
//! `scripts/build-image.sh` fills from Debian's packages for that
//! architecture and the `strata` binary built for it). Output: a tar of an
//! OCI image layout (`oci-layout`, `index.json`, `blobs/sha256/...`) whose
//! `index.json` names one image index (`io.containerd.image.name` and
//! `org.opencontainers.image.ref.name`, the annotations containerd's
//! importer reads) that lists one manifest per platform, each with one
//! gzip layer and its config. That archive is what `ctr images import`
//! and k3s's `/var/lib/rancher/k3s/agent/images/` take.
//!
//! Everything is reproducible: entries are sorted, every mtime is the
//! given epoch (`SOURCE_DATE_EPOCH`), owners are 0:0 with no names, gzip
//! has no timestamp or file name and JSON is written in a fixed order, so
//! the same inputs give the same bytes and the same digests.
//! [`layer`] turns a directory into a layer; [`oci`] writes the blobs,
//! manifests, indexes and the archive.

pub mod layer;
pub mod oci;

use std::path::PathBuf;

/// Why an image could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("Cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is a {kind}; a layer holds only directories, regular files and symlinks")]
    Unsupported { path: PathBuf, kind: &'static str },
    #[error("Cannot write {what}: {source}")]
    Write {
        what: String,
        source: std::io::Error,
    },
    #[error("Bad image reference {0:?}: expected REPOSITORY:TAG")]
    Reference(String),
    #[error("Unknown architecture {0:?}: expected amd64 or arm64")]
    Architecture(String),
}
