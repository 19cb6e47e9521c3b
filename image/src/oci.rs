//! The OCI image layout: configs, manifests, the platform index, the
//! top-level `index.json` with the image's name, and the archive.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use serde_json::{json, Value};

use crate::layer::{sha256, Layer};
use crate::ImageError;

pub const MEDIA_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MEDIA_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MEDIA_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// The annotation containerd's importer names an image by.
pub const ANNOTATION_CONTAINERD_NAME: &str = "io.containerd.image.name";
/// The OCI reference name: the tag alone, as containerd's exporter writes it.
pub const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";

/// What every platform's image runs with.
pub const PATH_ENV: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// One platform: its Debian/OCI architecture name and its layer.
pub struct Platform {
    pub arch: String,
    pub layer: Layer,
}

/// The blobs of a written image, by digest, and the top-level index.
pub struct Image {
    pub blobs: BTreeMap<String, Vec<u8>>,
    pub index_json: Vec<u8>,
    /// The digest of the platform index (`index.json`'s one entry).
    pub index_digest: String,
    /// Per platform: (arch, manifest digest, compressed layer size).
    pub manifests: Vec<(String, String, usize)>,
}

fn variant(arch: &str) -> Result<Option<&'static str>, ImageError> {
    match arch {
        "amd64" => Ok(None),
        "arm64" => Ok(Some("v8")),
        other => Err(ImageError::Architecture(other.into())),
    }
}

fn descriptor(media: &str, bytes: &[u8]) -> Value {
    json!({"mediaType": media, "digest": sha256(bytes), "size": bytes.len()})
}

fn to_vec(v: &Value) -> Vec<u8> {
    // serde_json writes object keys in a fixed order (sorted, or as
    // inserted with preserve_order): the same input gives the same bytes.
    serde_json::to_vec(v).expect("a JSON value always serialises")
}

/// `docker.io/strata/strata:0.1.0` -> its tag `0.1.0`.
pub fn tag_of(name: &str) -> Result<&str, ImageError> {
    let last = name.rsplit('/').next().unwrap_or(name);
    match last.split_once(':') {
        Some((repo, tag)) if !repo.is_empty() && !tag.is_empty() && !name.contains('@') => Ok(tag),
        _ => Err(ImageError::Reference(name.into())),
    }
}

/// Builds the image `name` (REPOSITORY:TAG) from one layer per platform,
/// created at `epoch` (seconds since 1970).
pub fn image(name: &str, epoch: i64, platforms: Vec<Platform>) -> Result<Image, ImageError> {
    let tag = tag_of(name)?;
    let created = chrono::DateTime::from_timestamp(epoch, 0)
        .ok_or_else(|| ImageError::Reference(format!("epoch {epoch} out of range")))?
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let mut blobs = BTreeMap::new();
    let mut entries = Vec::new();
    let mut manifests = Vec::new();
    for p in platforms {
        let variant = variant(&p.arch)?;
        let mut config = json!({
            "created": created,
            "architecture": p.arch,
            "os": "linux",
            "config": {
                "Env": [PATH_ENV],
                "Entrypoint": ["/usr/bin/strata"],
                "Cmd": ["--help"],
                "WorkingDir": "/",
                "Labels": {
                    "org.opencontainers.image.title": "strata",
                    "org.opencontainers.image.version": tag,
                },
            },
            "rootfs": {"type": "layers", "diff_ids": [p.layer.diff_id]},
            "history": [{"created": created, "created_by": "strata-image (scripts/build-image.sh)"}],
        });
        let mut platform = json!({"architecture": p.arch, "os": "linux"});
        if let Some(v) = variant {
            config["variant"] = json!(v);
            platform["variant"] = json!(v);
        }
        let config = to_vec(&config);
        let manifest = to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": MEDIA_MANIFEST,
            "config": descriptor(MEDIA_CONFIG, &config),
            "layers": [descriptor(MEDIA_LAYER_GZIP, &p.layer.gzip)],
        }));
        let mut entry = descriptor(MEDIA_MANIFEST, &manifest);
        entry["platform"] = platform;
        entries.push(entry);
        manifests.push((p.arch.clone(), sha256(&manifest), p.layer.gzip.len()));
        blobs.insert(sha256(&config), config);
        blobs.insert(sha256(&manifest), manifest);
        blobs.insert(sha256(&p.layer.gzip), p.layer.gzip);
    }
    let platform_index = to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_INDEX,
        "manifests": entries,
    }));
    let mut top = descriptor(MEDIA_INDEX, &platform_index);
    top["annotations"] = json!({ANNOTATION_CONTAINERD_NAME: name, ANNOTATION_REF_NAME: tag});
    let index_json = to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_INDEX,
        "manifests": [top],
    }));
    let index_digest = sha256(&platform_index);
    blobs.insert(index_digest.clone(), platform_index);
    Ok(Image {
        blobs,
        index_json,
        index_digest,
        manifests,
    })
}

/// Writes `image` as a tar of an OCI image layout to `out`: regular files
/// only (containerd's importer skips links), sorted, mtime `epoch`, 0:0.
pub fn write_archive(image: &Image, epoch: u64, out: &Path) -> Result<(), ImageError> {
    let werr = |source| ImageError::Write {
        what: out.display().to_string(),
        source,
    };
    let mut files: Vec<(String, &[u8])> = vec![
        ("index.json".into(), &image.index_json),
        ("oci-layout".into(), br#"{"imageLayoutVersion":"1.0.0"}"#),
    ];
    for (digest, bytes) in &image.blobs {
        let hex = digest.trim_start_matches("sha256:");
        files.push((format!("blobs/sha256/{hex}"), bytes));
    }
    files.sort();
    let tmp = out.with_extension("partial");
    let f = std::fs::File::create(&tmp).map_err(werr)?;
    let mut b = tar::Builder::new(std::io::BufWriter::new(f));
    for dir in ["blobs/", "blobs/sha256/"] {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_mtime(epoch);
        h.set_size(0);
        b.append_data(&mut h, dir, std::io::empty()).map_err(werr)?;
    }
    for (name, bytes) in files {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_mtime(epoch);
        h.set_size(bytes.len() as u64);
        b.append_data(&mut h, &name, bytes).map_err(werr)?;
    }
    let mut w = b.into_inner().map_err(werr)?;
    w.flush().map_err(werr)?;
    w.into_inner()
        .map_err(|e| werr(e.into_error()))?
        .sync_all()
        .map_err(werr)?;
    std::fs::rename(&tmp, out).map_err(werr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(bytes: &[u8]) -> Layer {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("f"), bytes).unwrap();
        crate::layer::build(d.path(), 0).unwrap()
    }

    fn two() -> Vec<Platform> {
        vec![
            Platform {
                arch: "amd64".into(),
                layer: layer(b"x86"),
            },
            Platform {
                arch: "arm64".into(),
                layer: layer(b"arm"),
            },
        ]
    }

    #[test]
    fn the_index_names_the_image_for_containerd_and_lists_both_platforms() {
        let img = image("docker.io/strata/strata:0.1.0", 0, two()).unwrap();
        let top: Value = serde_json::from_slice(&img.index_json).unwrap();
        let entry = &top["manifests"][0];
        assert_eq!(top["manifests"].as_array().unwrap().len(), 1);
        assert_eq!(entry["mediaType"], MEDIA_INDEX);
        assert_eq!(
            entry["annotations"][ANNOTATION_CONTAINERD_NAME],
            "docker.io/strata/strata:0.1.0"
        );
        assert_eq!(entry["annotations"][ANNOTATION_REF_NAME], "0.1.0");
        let digest = entry["digest"].as_str().unwrap();
        let idx: Value = serde_json::from_slice(&img.blobs[digest]).unwrap();
        assert_eq!(entry["size"], img.blobs[digest].len());
        let plats: Vec<_> = idx["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                (
                    m["platform"]["architecture"].as_str().unwrap(),
                    m["platform"]["variant"].as_str(),
                )
            })
            .collect();
        assert_eq!(plats, [("amd64", None), ("arm64", Some("v8"))]);
        // Every descriptor points to a blob with that digest and size.
        for m in idx["manifests"].as_array().unwrap() {
            let mb = &img.blobs[m["digest"].as_str().unwrap()];
            assert_eq!(m["size"], mb.len());
            let man: Value = serde_json::from_slice(mb).unwrap();
            for d in std::iter::once(&man["config"]).chain(man["layers"].as_array().unwrap()) {
                let b = &img.blobs[d["digest"].as_str().unwrap()];
                assert_eq!(sha256(b), d["digest"]);
                assert_eq!(d["size"], b.len());
            }
            let cfg: Value =
                serde_json::from_slice(&img.blobs[man["config"]["digest"].as_str().unwrap()])
                    .unwrap();
            assert_eq!(cfg["architecture"], m["platform"]["architecture"]);
            assert_eq!(cfg["created"], "1970-01-01T00:00:00Z");
        }
    }

    #[test]
    fn the_archive_is_the_same_bytes_twice_and_holds_only_regular_files() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a.tar"), d.path().join("b.tar"));
        write_archive(&image("strata:1", 7, two()).unwrap(), 7, &a).unwrap();
        write_archive(&image("strata:1", 7, two()).unwrap(), 7, &b).unwrap();
        let (ba, bb) = (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        assert_eq!(sha256(&ba), sha256(&bb));
        let mut ar = tar::Archive::new(ba.as_slice());
        let names: Vec<String> = ar
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let t = e.header().entry_type();
                assert!(t == tar::EntryType::Regular || t == tar::EntryType::Directory);
                assert_eq!(e.header().mtime().unwrap(), 7);
                e.path().unwrap().to_string_lossy().into_owned()
            })
            .collect();
        assert_eq!(names[..2], ["blobs/", "blobs/sha256/"]);
        assert_eq!(names.last().map(String::as_str), Some("oci-layout"));
        // 3 blobs per platform + the platform index.
        assert_eq!(
            names
                .iter()
                .filter(|n| n.starts_with("blobs/sha256/") && n.len() > 13)
                .count(),
            7
        );
    }

    #[test]
    fn bad_names_and_architectures_are_refused() {
        for bad in [
            "strata",
            "strata:",
            "docker.io/strata/strata",
            "x@sha256:ab:1",
        ] {
            assert!(
                matches!(image(bad, 0, vec![]), Err(ImageError::Reference(_))),
                "{bad}"
            );
        }
        assert_eq!(tag_of("localhost:5000/strata:0.1.0").unwrap(), "0.1.0");
        let p = vec![Platform {
            arch: "riscv64".into(),
            layer: layer(b""),
        }];
        assert!(matches!(
            image("strata:1", 0, p),
            Err(ImageError::Architecture(_))
        ));
    }
}
