//! `strata-image`: the command `scripts/build-image.sh` runs to write
//! strata's multi-arch OCI archive from staged root filesystems (see the
//! library's docs).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Parser;
use strata_image::{layer, oci};

/// Writes an OCI archive (a tar of an OCI image layout) holding one image
/// index with one manifest per staged root filesystem.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// The image name, REPOSITORY:TAG (e.g. docker.io/strata/strata:0.1.0).
    #[arg(long)]
    name: String,
    /// ARCH=DIR: a staged root filesystem for amd64 or arm64 (repeat).
    #[arg(long = "rootfs", required = true)]
    rootfs: Vec<String>,
    /// Every timestamp in the image (seconds since 1970).
    #[arg(long, env = "SOURCE_DATE_EPOCH")]
    epoch: u64,
    /// The archive to write.
    #[arg(long)]
    out: PathBuf,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let mut platforms = Vec::new();
    for spec in &args.rootfs {
        let Some((arch, dir)) = spec.split_once('=') else {
            bail!("--rootfs {spec:?}: expected ARCH=DIR");
        };
        let layer = layer::build(dir.as_ref(), args.epoch)
            .with_context(|| format!("Building the {arch} layer from {dir}"))?;
        eprintln!(
            "{arch}: {} entries, {} bytes uncompressed, {} bytes gzip, layer {}",
            layer.entries,
            layer.tar_len,
            layer.gzip.len(),
            layer::sha256(&layer.gzip)
        );
        platforms.push(oci::Platform {
            arch: arch.to_string(),
            layer,
        });
    }
    let epoch = i64::try_from(args.epoch).context("--epoch is too large")?;
    let image = oci::image(&args.name, epoch, platforms)?;
    oci::write_archive(&image, args.epoch, &args.out)?;
    // Machine-readable lines for the build script.
    println!("index {}", image.index_digest);
    for (arch, digest, size) in &image.manifests {
        println!("manifest {arch} {digest} {size}");
    }
    Ok(())
}
