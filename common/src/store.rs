//! The object store behind every deployable: `file://`, `s3://` and `az://` URLs
//! through the `object_store` crate, rooted at a prefix, with errors that name the
//! object (full URL) they concern.
//!
//! Options for S3 and Azure use the `object_store` configuration keys
//! (`aws_endpoint`, `aws_access_key_id`, `aws_secret_access_key`, `aws_region`,
//! `aws_allow_http`, `azure_storage_account_name`, `azure_storage_account_key`,
//! `azure_storage_use_emulator`, `azure_endpoint`, `azure_allow_http`, ...). Values
//! from the environment (`AWS_*`, `AZURE_*`) apply unless the config sets them.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};
use thiserror::Error;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct StoreConfig {
    /// `file:///abs/dir`, `s3://bucket/prefix` or `az://container/prefix`.
    pub url: String,
    /// Backend options (see the module documentation).
    #[serde(default)]
    pub options: BTreeMap<String, String>,
}

impl StoreConfig {
    pub fn new(url: impl Into<String>) -> Self {
        StoreConfig {
            url: url.into(),
            options: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("invalid store URL {url:?}: {detail}")]
    Url { url: String, detail: String },
    #[error("{op} {object}: {source}")]
    Backend {
        op: &'static str,
        object: String,
        #[source]
        source: object_store::Error,
    },
}

impl StoreError {
    /// Whether retrying the same request may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Url { .. } => false,
            StoreError::Backend { source, .. } => !matches!(
                source,
                object_store::Error::NotFound { .. }
                    | object_store::Error::AlreadyExists { .. }
                    | object_store::Error::Precondition { .. }
                    | object_store::Error::NotSupported { .. }
                    | object_store::Error::NotImplemented { .. }
                    | object_store::Error::InvalidPath { .. }
                    | object_store::Error::PermissionDenied { .. }
                    | object_store::Error::Unauthenticated { .. }
            ),
        }
    }
}

/// An object store rooted at the URL's prefix.
#[derive(Clone)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    root: Path,
    url: String,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Store({})", self.url)
    }
}

impl Store {
    pub fn open(cfg: &StoreConfig) -> Result<Store, StoreError> {
        let bad = |detail: String| StoreError::Url {
            url: cfg.url.clone(),
            detail,
        };
        let url = url::Url::parse(&cfg.url).map_err(|e| bad(e.to_string()))?;
        let mut opts: BTreeMap<String, String> = std::env::vars()
            .filter(|(k, _)| k.starts_with("AWS_") || k.starts_with("AZURE_"))
            .map(|(k, v)| (k.to_ascii_lowercase(), v))
            .collect();
        opts.extend(cfg.options.clone());
        let (inner, root): (Arc<dyn ObjectStore>, Path) = match url.scheme() {
            "file" => {
                let dir = url
                    .to_file_path()
                    .map_err(|_| bad("not an absolute file path".into()))?;
                std::fs::create_dir_all(&dir)
                    .map_err(|e| bad(format!("creating {}: {e}", dir.display())))?;
                let fs = object_store::local::LocalFileSystem::new_with_prefix(&dir)
                    .map_err(|e| bad(e.to_string()))?
                    .with_automatic_cleanup(true);
                (Arc::new(fs), Path::default())
            }
            "s3" | "az" | "azure" | "abfs" => {
                let (s, p) =
                    object_store::parse_url_opts(&url, opts).map_err(|e| bad(e.to_string()))?;
                (Arc::from(s), p)
            }
            other => {
                return Err(bad(format!(
                    "unsupported scheme {other:?}; use file://, s3:// or az://"
                )))
            }
        };
        Ok(Store {
            inner,
            root,
            url: cfg.url.trim_end_matches('/').to_string(),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    fn path(&self, rel: &str) -> Path {
        let mut parts: Vec<String> = self.root.parts().map(|p| p.as_ref().to_string()).collect();
        parts.extend(rel.split('/').filter(|s| !s.is_empty()).map(String::from));
        Path::from_iter(parts)
    }

    /// The full name of an object, for messages.
    pub fn describe(&self, rel: &str) -> String {
        format!("{}/{}", self.url, rel)
    }

    fn err(&self, op: &'static str, rel: &str, source: object_store::Error) -> StoreError {
        StoreError::Backend {
            op,
            object: self.describe(rel),
            source,
        }
    }

    /// The object's bytes, or `None` if it does not exist.
    pub async fn get(&self, rel: &str) -> Result<Option<Bytes>, StoreError> {
        match self.inner.get(&self.path(rel)).await {
            Ok(r) => Ok(Some(
                r.bytes().await.map_err(|e| self.err("reading", rel, e))?,
            )),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.err("reading", rel, e)),
        }
    }

    pub async fn put(&self, rel: &str, data: Bytes) -> Result<(), StoreError> {
        self.inner
            .put(&self.path(rel), PutPayload::from(data))
            .await
            .map(|_| ())
            .map_err(|e| self.err("writing", rel, e))
    }

    /// Creates the object unless it exists; returns whether this call created it.
    pub async fn put_if_absent(&self, rel: &str, data: Bytes) -> Result<bool, StoreError> {
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match self
            .inner
            .put_opts(&self.path(rel), PutPayload::from(data.clone()), opts)
            .await
        {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. })
            | Err(object_store::Error::Precondition { .. }) => Ok(false),
            Err(object_store::Error::NotImplemented { .. }) => {
                if self.get(rel).await?.is_some() {
                    return Ok(false);
                }
                self.put(rel, data).await?;
                Ok(true)
            }
            Err(e) => Err(self.err("creating", rel, e)),
        }
    }

    /// Objects under `rel_prefix` (names relative to the store root), sorted.
    pub async fn list(&self, rel_prefix: &str) -> Result<Vec<(String, u64)>, StoreError> {
        let prefix = self.path(rel_prefix);
        let root_parts = self.root.parts().count();
        let metas: Vec<_> = match self.inner.list(Some(&prefix)).try_collect().await {
            Ok(m) => m,
            Err(object_store::Error::NotFound { .. }) => Vec::new(),
            Err(e) => return Err(self.err("listing", rel_prefix, e)),
        };
        let mut out: Vec<(String, u64)> = metas
            .into_iter()
            .map(|m| {
                let rel: Vec<String> = m
                    .location
                    .parts()
                    .skip(root_parts)
                    .map(|p| p.as_ref().to_string())
                    .collect();
                (rel.join("/"), m.size)
            })
            .collect();
        out.sort();
        Ok(out)
    }

    pub async fn delete(&self, rel: &str) -> Result<(), StoreError> {
        match self.inner.delete(&self.path(rel)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.err("deleting", rel, e)),
        }
    }
}
