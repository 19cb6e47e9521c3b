//! The cluster key in Kubernetes: a Secret in the driver's namespace
//! (`strata-cluster-key` in `deploy/`), key [`SECRET_DATA_KEY`], holding
//! the key file's text (64 hex digits, `strata key init`'s format).
//!
//! The CSI controller creates it with a fresh random key when it is
//! missing, so that `kubectl apply -k deploy/` is the whole install; a
//! user who wants their own key creates the Secret first. The replica
//! DaemonSet, the node plugin and every volume controller mount it
//! (`objects::deployment`) and read it with `--cluster-key-file`; their
//! pods wait until it exists. The controller holds it in memory for its
//! own calls to replicas and volume controllers.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;
use kube::api::{ObjectMeta, PostParams};
use kube::Api;
use strata_replica::auth::ClusterKey;

/// The Secret's data key: the file name the pods read.
pub const SECRET_DATA_KEY: &str = "cluster.key";
/// Where the pods mount the Secret.
pub const MOUNT_DIR: &str = "/etc/strata/cluster-key";

/// The key file's path inside a pod.
pub fn key_file_in_pod() -> String {
    format!("{MOUNT_DIR}/{SECRET_DATA_KEY}")
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterKeyError {
    #[error("cannot {what} the cluster key Secret {namespace}/{name}")]
    Kube {
        what: &'static str,
        namespace: String,
        name: String,
        #[source]
        source: Box<kube::Error>,
    },
    #[error("the cluster key Secret {namespace}/{name} has no {SECRET_DATA_KEY:?} entry of 64 hex digits (see `strata key init`); fix or delete it (volumes made with it then need the old key)")]
    Malformed { namespace: String, name: String },
}

/// Whether [`ensure_cluster_key`] found the Secret or made it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySource {
    Existing,
    Created,
}

/// Reads the cluster key from Secret `namespace/name`, creating the Secret
/// with a new random key when there is none. Two controllers racing both
/// end with the key that was stored first.
pub async fn ensure_cluster_key(
    client: &kube::Client,
    namespace: &str,
    name: &str,
) -> Result<(ClusterKey, KeySource), ClusterKeyError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let err = |what: &'static str| {
        move |source| ClusterKeyError::Kube {
            what,
            namespace: namespace.to_string(),
            name: name.to_string(),
            source: Box::new(source),
        }
    };
    for _ in 0..2 {
        if let Some(secret) = api.get_opt(name).await.map_err(err("read"))? {
            return parse(&secret, namespace, name).map(|k| (k, KeySource::Existing));
        }
        let key = ClusterKey::generate();
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                namespace: Some(namespace.to_string()),
                labels: Some(BTreeMap::from([(
                    "app.kubernetes.io/part-of".to_string(),
                    "strata".to_string(),
                )])),
                ..Default::default()
            },
            type_: Some("Opaque".into()),
            data: Some(BTreeMap::from([(
                SECRET_DATA_KEY.to_string(),
                ByteString(key.file_text().into_bytes()),
            )])),
            ..Default::default()
        };
        match api.create(&PostParams::default(), &secret).await {
            Ok(_) => return Ok((key, KeySource::Created)),
            // Someone else stored one first: use theirs.
            Err(kube::Error::Api(s)) if s.code == 409 => continue,
            Err(e) => return Err(err("create")(e)),
        }
    }
    match api.get_opt(name).await.map_err(err("read"))? {
        Some(secret) => parse(&secret, namespace, name).map(|k| (k, KeySource::Existing)),
        None => Err(ClusterKeyError::Malformed {
            namespace: namespace.to_string(),
            name: name.to_string(),
        }),
    }
}

fn parse(secret: &Secret, namespace: &str, name: &str) -> Result<ClusterKey, ClusterKeyError> {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(SECRET_DATA_KEY))
        .and_then(|b| std::str::from_utf8(&b.0).ok())
        .and_then(ClusterKey::parse_hex)
        .ok_or_else(|| ClusterKeyError::Malformed {
            namespace: namespace.to_string(),
            name: name.to_string(),
        })
}
