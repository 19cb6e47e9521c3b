//! A target in an S3 bucket (`s3://bucket/prefix`), through the AWS SDK:
//! credentials and region from the standard AWS chain (environment,
//! profile, instance metadata), a custom endpoint and path-style addressing
//! for S3-compatible servers (MinIO, Garage, Ceph RGW, moto, s3s).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::DisplayErrorContext;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::Client;
use bytes::Bytes;

use super::ObjectInfo;
use crate::error::{BackupError, Result};

/// How to reach the S3 server.
#[derive(Debug, Clone, Default)]
pub struct S3Options {
    /// A custom endpoint (`http://127.0.0.1:9000`); None: AWS.
    pub endpoint: Option<String>,
    /// Path-style addressing (`endpoint/bucket/key`); S3-compatible servers
    /// usually need it. Always on when an endpoint is given.
    pub path_style: bool,
    /// Region; None: the AWS chain, else `us-east-1`.
    pub region: Option<String>,
    /// Static credentials (access key, secret); None: the AWS chain.
    pub credentials: Option<(String, String)>,
    /// Create the bucket if it does not exist.
    pub create_bucket: bool,
}

#[derive(Debug, Clone)]
pub struct S3Store {
    client: Client,
    bucket: Arc<str>,
    /// Empty, or ends with '/'.
    prefix: Arc<str>,
    url: Arc<str>,
}

impl S3Store {
    pub async fn new(bucket: &str, prefix: &str, url: &str, opts: &S3Options) -> Result<Self> {
        let mut loader = aws_config::defaults(BehaviorVersion::latest());
        if let Some(r) = &opts.region {
            loader = loader.region(Region::new(r.clone()));
        }
        if let Some((ak, sk)) = &opts.credentials {
            loader = loader.credentials_provider(Credentials::new(
                ak.clone(),
                sk.clone(),
                None,
                None,
                "strata-static",
            ));
        }
        let sdk = loader.load().await;
        let mut conf = aws_sdk_s3::config::Builder::from(&sdk)
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .timeout_config(
                aws_sdk_s3::config::timeout::TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(5))
                    .operation_attempt_timeout(Duration::from_secs(120))
                    .build(),
            );
        if sdk.region().is_none() {
            conf = conf.region(Region::new("us-east-1"));
        }
        if let Some(ep) = &opts.endpoint {
            conf = conf.endpoint_url(ep.clone()).force_path_style(true);
        } else if opts.path_style {
            conf = conf.force_path_style(true);
        }
        let client = Client::from_conf(conf.build());
        let prefix = if prefix.is_empty() || prefix.ends_with('/') {
            prefix.to_string()
        } else {
            format!("{prefix}/")
        };
        let store = Self {
            client,
            bucket: bucket.into(),
            prefix: prefix.into(),
            url: url.into(),
        };
        if opts.create_bucket {
            store.ensure_bucket().await?;
        }
        Ok(store)
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    fn err(&self, op: &'static str, key: &str, e: impl std::error::Error) -> BackupError {
        BackupError::Store {
            op,
            target: self.url.to_string(),
            key: key.to_string(),
            reason: DisplayErrorContext(e).to_string(),
        }
    }

    async fn ensure_bucket(&self) -> Result<()> {
        let head = self.client.head_bucket().bucket(&*self.bucket).send().await;
        if head.is_ok() {
            return Ok(());
        }
        match self
            .client
            .create_bucket()
            .bucket(&*self.bucket)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => {
                let exists = e.as_service_error().is_some_and(|s| {
                    s.is_bucket_already_owned_by_you() || s.is_bucket_already_exists()
                });
                if exists {
                    Ok(())
                } else {
                    Err(self.err("create bucket", "", e))
                }
            }
        }
    }

    pub async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        let full = format!("{}{key}", self.prefix);
        match self
            .client
            .get_object()
            .bucket(&*self.bucket)
            .key(&full)
            .send()
            .await
        {
            Ok(out) => {
                let data = out
                    .body
                    .collect()
                    .await
                    .map_err(|e| self.err("get", key, e))?;
                Ok(Some(data.into_bytes()))
            }
            Err(e) => {
                if e.as_service_error().is_some_and(|s| s.is_no_such_key()) {
                    Ok(None)
                } else {
                    Err(self.err("get", key, e))
                }
            }
        }
    }

    /// See [`super::Store::get_parts`]: one ranged GET from the first
    /// part's start to the last part's end, its body copied into each
    /// part's buffer as it arrives.
    pub async fn get_parts(&self, key: &str, parts: &[(u64, u64)]) -> Result<Option<Vec<Vec<u8>>>> {
        let (Some(first), Some(last)) = (parts.first(), parts.last()) else {
            return Ok(Some(Vec::new()));
        };
        let (start, end) = (first.0, last.0 + last.1);
        if end == start {
            return Ok(Some(vec![Vec::new(); parts.len()]));
        }
        let full = format!("{}{key}", self.prefix);
        let mut out = match self
            .client
            .get_object()
            .bucket(&*self.bucket)
            .key(&full)
            .range(format!("bytes={start}-{}", end - 1))
            .send()
            .await
        {
            Ok(out) => out,
            Err(e) => {
                return if e.as_service_error().is_some_and(|s| s.is_no_such_key()) {
                    Ok(None)
                } else if e.raw_response().map(|r| r.status().as_u16()) == Some(416) {
                    // The range starts past the object's end.
                    Ok(Some(vec![Vec::new(); parts.len()]))
                } else {
                    Err(self.err("get", key, e))
                };
            }
        };
        let mut bufs: Vec<Vec<u8>> = parts
            .iter()
            .map(|&(_, len)| Vec::with_capacity(len.min(64 << 20) as usize))
            .collect();
        // Where the next byte of the body lies in the object, and the part
        // it may belong to.
        let (mut at, mut i) = (start, 0);
        while let Some(data) = out
            .body
            .try_next()
            .await
            .map_err(|e| self.err("get", key, e))?
        {
            let mut data = &data[..];
            while !data.is_empty() && i < parts.len() {
                let (p_off, p_len) = parts[i];
                if at < p_off {
                    // Between parts: dropped.
                    let skip = ((p_off - at) as usize).min(data.len());
                    data = &data[skip..];
                    at += skip as u64;
                    continue;
                }
                let take = ((p_off + p_len - at) as usize).min(data.len());
                bufs[i].extend_from_slice(&data[..take]);
                data = &data[take..];
                at += take as u64;
                if at == p_off + p_len {
                    i += 1;
                }
            }
        }
        Ok(Some(bufs))
    }

    pub async fn put(&self, key: &str, data: Bytes) -> Result<()> {
        let full = format!("{}{key}", self.prefix);
        self.client
            .put_object()
            .bucket(&*self.bucket)
            .key(&full)
            .body(ByteStream::from(data))
            // No SHA-256 of the body for the signature (UNSIGNED-PAYLOAD):
            // it was the largest item of a full backup's CPU profile
            // (BENCHMARKS.md), and every object already carries its own
            // tag or keyed checksum over its name and content, which
            // restore and `verify --read` check end to end.
            .customize()
            .disable_payload_signing()
            .send()
            .await
            .map_err(|e| self.err("put", key, e))?;
        Ok(())
    }

    pub async fn exists(&self, key: &str) -> Result<bool> {
        let full = format!("{}{key}", self.prefix);
        match self
            .client
            .head_object()
            .bucket(&*self.bucket)
            .key(&full)
            .send()
            .await
        {
            Ok(_) => Ok(true),
            Err(e) => {
                if e.as_service_error().is_some_and(|s| s.is_not_found()) {
                    Ok(false)
                } else {
                    Err(self.err("head", key, e))
                }
            }
        }
    }

    pub async fn delete(&self, key: &str) -> Result<()> {
        let full = format!("{}{key}", self.prefix);
        self.client
            .delete_object()
            .bucket(&*self.bucket)
            .key(&full)
            .send()
            .await
            .map_err(|e| self.err("delete", key, e))?;
        Ok(())
    }

    pub async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        let full = format!("{}{prefix}", self.prefix);
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&*self.bucket)
            .prefix(&full)
            .into_paginator()
            .send();
        let mut out = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| self.err("list", prefix, e))?;
            for obj in page.contents() {
                let Some(k) = obj.key() else { continue };
                let Some(rel) = k.strip_prefix(&*self.prefix) else {
                    continue;
                };
                let modified = obj
                    .last_modified()
                    .and_then(|t| SystemTime::try_from(*t).ok())
                    .unwrap_or(SystemTime::UNIX_EPOCH);
                out.push(ObjectInfo {
                    key: rel.to_string(),
                    size: obj.size().unwrap_or(0).max(0) as u64,
                    modified,
                });
            }
        }
        Ok(out)
    }
}
