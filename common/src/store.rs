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
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion};
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
    /// A create-only object exists with other content: another writer (a
    /// second process server on this store) made it.
    #[error("{object} already exists with different content: another process server writes this machine's stream (fencing)")]
    Conflict { object: String },
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
            StoreError::Url { .. } | StoreError::Conflict { .. } => false,
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
    /// The directory of a file:// store (its compare-and-swap is done here).
    local_root: Option<std::path::PathBuf>,
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
        let mut local_root = None;
        let (inner, root): (Arc<dyn ObjectStore>, Path) = match url.scheme() {
            "file" => {
                let dir = url
                    .to_file_path()
                    .map_err(|_| bad("not an absolute file path".into()))?;
                std::fs::create_dir_all(&dir)
                    .map_err(|e| bad(format!("creating {}: {e}", dir.display())))?;
                // Durable puts: the file and every directory it created are
                // fsynced before the put returns (see the module header).
                let fs = object_store::local::LocalFileSystem::new_with_prefix(&dir)
                    .map_err(|e| bad(e.to_string()))?
                    .with_automatic_cleanup(true)
                    .with_fsync(true);
                local_root = Some(dir);
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
            local_root,
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

    /// Creates the object, never overwriting: an existing object with the same
    /// bytes (a retry after a lost response) is fine, one with other bytes is
    /// [`StoreError::Conflict`] unless `same` says the two are equivalent
    /// (e.g. a segment sealed twice with different nonces).
    pub async fn create(
        &self,
        rel: &str,
        data: Bytes,
        same: impl FnOnce(&[u8]) -> bool,
    ) -> Result<(), StoreError> {
        if self.put_if_absent(rel, data.clone()).await? {
            return Ok(());
        }
        match self.get(rel).await? {
            Some(existing) => {
                if existing == data || same(&existing[..]) {
                    Ok(())
                } else {
                    Err(StoreError::Conflict {
                        object: self.describe(rel),
                    })
                }
            }
            // Deleted between the two calls: try once more.
            None => {
                if self.put_if_absent(rel, data).await? {
                    Ok(())
                } else {
                    Err(StoreError::Conflict {
                        object: self.describe(rel),
                    })
                }
            }
        }
    }

    /// The object's bytes and ETag, or `None` if it does not exist.
    pub async fn get_versioned(&self, rel: &str) -> Result<Option<(Bytes, String)>, StoreError> {
        match self.inner.get(&self.path(rel)).await {
            Ok(r) => {
                let etag = r.meta.e_tag.clone().unwrap_or_default();
                let b = r.bytes().await.map_err(|e| self.err("reading", rel, e))?;
                Ok(Some((b, etag)))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.err("reading", rel, e)),
        }
    }

    /// The object's ETag, or `None` if it does not exist (one HEAD request).
    pub async fn etag(&self, rel: &str) -> Result<Option<String>, StoreError> {
        match self.inner.head(&self.path(rel)).await {
            Ok(m) => Ok(Some(m.e_tag.unwrap_or_default())),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.err("reading", rel, e)),
        }
    }

    /// Creates the object if absent; returns its ETag, or `None` if it exists.
    pub async fn create_versioned(
        &self,
        rel: &str,
        data: Bytes,
    ) -> Result<Option<String>, StoreError> {
        self.conditional_put(rel, data, PutMode::Create, "creating")
            .await
    }

    /// A put in `mode` (create-if-absent or ETag-matched update): the new
    /// ETag, or `None` when the condition failed (another writer won).
    async fn conditional_put(
        &self,
        rel: &str,
        data: Bytes,
        mode: PutMode,
        op: &'static str,
    ) -> Result<Option<String>, StoreError> {
        let opts = PutOptions {
            mode,
            ..Default::default()
        };
        match self
            .inner
            .put_opts(&self.path(rel), PutPayload::from(data), opts)
            .await
        {
            Ok(r) => match r.e_tag {
                Some(t) => Ok(Some(t)),
                None => Ok(Some(self.etag(rel).await?.unwrap_or_default())),
            },
            Err(object_store::Error::AlreadyExists { .. })
            | Err(object_store::Error::Precondition { .. })
            | Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.err(op, rel, e)),
        }
    }

    /// Replaces the object only if its ETag is still `expected` (compare and
    /// swap); returns the new ETag, or `None` if the object changed meanwhile.
    ///
    /// S3 and Azure do this with `If-Match` (`PutMode::Update`). The local
    /// filesystem backend has no conditional update, so for file:// stores
    /// the swap is done under an exclusive `flock` on
    /// `<store>/.lifeboat-locks/<object>.lock` held across "read the ETag,
    /// compare, atomically replace (fsynced rename)": every process that
    /// updates through a `Store` takes the same lock, so two swaps on the
    /// same object cannot interleave.
    pub async fn update_versioned(
        &self,
        rel: &str,
        data: Bytes,
        expected: &str,
    ) -> Result<Option<String>, StoreError> {
        if let Some(dir) = self.local_root.clone() {
            let lock_path = dir
                .join(".lifeboat-locks")
                .join(format!("{}.lock", rel.replace('/', "%")));
            let lock = tokio::task::spawn_blocking(move || lock_exclusive(&lock_path))
                .await
                .map_err(|e| StoreError::Url {
                    url: self.url.clone(),
                    detail: format!("lock task: {e}"),
                })?
                .map_err(|e| StoreError::Url {
                    url: self.url.clone(),
                    detail: format!("locking {rel} for a conditional update: {e}"),
                })?;
            let r = async {
                match self.etag(rel).await? {
                    Some(cur) if cur == expected => {}
                    _ => return Ok(None),
                }
                self.inner
                    .put(&self.path(rel), PutPayload::from(data))
                    .await
                    .map_err(|e| self.err("updating", rel, e))?;
                self.etag(rel).await
            }
            .await;
            drop(lock);
            return r;
        }
        let mode = PutMode::Update(UpdateVersion {
            e_tag: Some(expected.to_string()),
            version: None,
        });
        self.conditional_put(rel, data, mode, "updating").await
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

/// An exclusive `flock` on `path` (created 0600), released when the file is dropped.
fn lock_exclusive(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::io::AsRawFd;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(path)?;
    // SAFETY: flock on a descriptor this function owns.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `cachestat(2)` (Linux 6.5+): how many pages of `file` are still dirty
    /// or under writeback in the page cache; `None` where the kernel lacks it.
    fn unsynced_pages(file: &std::path::Path) -> Option<u64> {
        use std::os::unix::io::AsRawFd;
        #[repr(C)]
        struct Range {
            off: u64,
            len: u64,
        }
        #[repr(C)]
        #[derive(Default)]
        struct Stat {
            cache: u64,
            dirty: u64,
            writeback: u64,
            evicted: u64,
            recently_evicted: u64,
        }
        const SYS_CACHESTAT: libc::c_long = 451;
        let f = std::fs::File::open(file).unwrap();
        let range = Range { off: 0, len: 0 };
        let mut st = Stat::default();
        // SAFETY: cachestat reads `range` and writes `st`, both live and of the
        // layout the kernel defines; the descriptor is open.
        let r = unsafe {
            libc::syscall(
                SYS_CACHESTAT,
                f.as_raw_fd(),
                &range as *const Range,
                &mut st as *mut Stat,
                0u32,
            )
        };
        (r == 0).then_some(st.dirty + st.writeback)
    }

    /// Compare-and-swap on a file:// store: only the holder of the current
    /// ETag replaces the object, and of racing swappers exactly one wins.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn file_store_update_is_a_compare_and_swap() {
        let dir = std::env::temp_dir().join(format!(
            "lifeboat-store-cas-{}-{}",
            std::process::id(),
            chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0)
        ));
        let store = Store::open(&StoreConfig::new(format!("file://{}", dir.display()))).unwrap();
        let t0 = store
            .create_versioned("m/owner", Bytes::from_static(b"0"))
            .await
            .unwrap()
            .unwrap();
        assert!(store
            .create_versioned("m/owner", Bytes::from_static(b"x"))
            .await
            .unwrap()
            .is_none());
        let racers: Vec<_> = (0..8u8)
            .map(|i| {
                let (s, t) = (store.clone(), t0.clone());
                tokio::spawn(async move {
                    s.update_versioned("m/owner", Bytes::from(vec![b'a' + i]), &t)
                        .await
                        .unwrap()
                })
            })
            .collect();
        let mut won = Vec::new();
        for (i, r) in racers.into_iter().enumerate() {
            if let Some(t) = r.await.unwrap() {
                won.push((i as u8, t));
            }
        }
        assert_eq!(won.len(), 1, "exactly one swap wins");
        let (i, t1) = won.pop().unwrap();
        let (now, tag) = store.get_versioned("m/owner").await.unwrap().unwrap();
        assert_eq!(now, Bytes::from(vec![b'a' + i]));
        assert_eq!(tag, t1);
        // The stale ETag no longer swaps.
        assert!(store
            .update_versioned("m/owner", Bytes::from_static(b"z"), &t0)
            .await
            .unwrap()
            .is_none());
        // create(): same bytes fine, other bytes a conflict naming the object.
        store
            .create("m/seg", Bytes::from_static(b"s"), |_| false)
            .await
            .unwrap();
        store
            .create("m/seg", Bytes::from_static(b"s"), |_| false)
            .await
            .unwrap();
        let e = store
            .create("m/seg", Bytes::from_static(b"t"), |_| false)
            .await
            .unwrap_err();
        assert!(
            e.to_string().contains("m/seg") && e.to_string().contains("fencing"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A put to a file:// store returns only once the object's bytes are on
    /// stable storage: the page cache holds no dirty page of it afterwards.
    /// (The directory entries are fsynced by the same `with_fsync` contract of
    /// object_store's LocalFileSystem; the power-loss test of the harness
    /// branch checks them end to end.)
    #[tokio::test]
    async fn file_store_put_is_synced() {
        let dir = std::env::temp_dir().join(format!(
            "lifeboat-store-sync-{}-{}",
            std::process::id(),
            chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0)
        ));
        let store = Store::open(&StoreConfig::new(format!("file://{}", dir.display()))).unwrap();
        let data = Bytes::from(vec![0x5au8; 4 << 20]);
        for (i, rel) in ["machines/m/log/a.seg", "machines/m/points/b.json"]
            .iter()
            .enumerate()
        {
            if i == 0 {
                store.put(rel, data.clone()).await.unwrap();
            } else {
                assert!(store.put_if_absent(rel, data.clone()).await.unwrap());
            }
            match unsynced_pages(&dir.join(rel)) {
                Some(n) => assert_eq!(n, 0, "{rel}: {n} pages not yet on disk after the put"),
                None => eprintln!("cachestat(2) unavailable; durability not checked"),
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
