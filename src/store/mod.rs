//! The vault's object store: the only module that imports `object_store`.
//!
//! Everything above this module sees a [`Store`] with a handful of operations that every backend
//! (local directory, Azure Blob, S3) implements with the same semantics:
//!
//! | operation        | semantics                                                             |
//! |------------------|-----------------------------------------------------------------------|
//! | `put`            | atomic whole-object write (last writer wins)                          |
//! | `put_if_absent`  | create-only write: a second create of the same key is `Existed`       |
//! | `get`/`get_range`| whole object or byte range; missing key is [`StoreError::NotFound`]   |
//! | `list`           | every key under a prefix (recursive), with sizes                      |
//! | `delete`         | idempotent removal                                                    |
//!
//! `get_range` returns exactly the requested bytes or fails: object_store would silently return
//! a short read for a range running past the end, and reports empty or out-of-bounds ranges as
//! generic (retryable-looking) errors; here both are [`StoreError::BadRange`].
//!
//! Layout rule for callers: no object key may also be a prefix of other object keys (`a/b` and
//! `a/b/c`). Cloud stores allow it, but the local backend stores keys as files in directories
//! and cannot hold both: there a put of `a/b` fails (and a create-only put reports `Existed`)
//! while `a/b/c` exists. The tests in `tests/it/store_conformance.rs` pin these semantics.
//!
//! Every operation counts itself in the process's metrics (a counter increment, nothing
//! more): `drvault_store_requests_total{op}` per request sent to the backend (a `list` counts
//! once however many pages the backend returns; a `get_range` past the end and a refused
//! `delete` count the `head` they send to tell why), `drvault_store_errors_total{op}` per
//! failed request (a missing key is an answer, not an error), and
//! `drvault_store_bytes_written_total` / `drvault_store_bytes_read_total` for object bytes put
//! and got. They make a per-block store round trip show up as requests per block.
//!
//! The vault format needs nothing else (see the crate docs for the key layout), which is what lets
//! several servers share one bucket later. Keys are [`Key`]s: built only by server code from
//! validated components, never from a caller-supplied path.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures_util::TryStreamExt;
use object_store::path::Path as OsPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};

pub mod azure;
pub mod faulty;

/// A server-built object key such as `chunks/ab/ab12…` (segments separated by `/`).
///
/// Constructed only through [`Key::new`], which rejects empty segments, `.`/`..`, and any byte
/// outside `[A-Za-z0-9._-]`: callers format keys from ids the server generated or hashed.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key(String);

impl Key {
    /// Builds a key from segments; panics never, returns `None` for a segment that is not safe.
    pub fn new<S: AsRef<str>>(segments: &[S]) -> Option<Key> {
        let mut s = String::new();
        for (i, seg) in segments.iter().enumerate() {
            let seg = seg.as_ref();
            if !is_safe_segment(seg) {
                return None;
            }
            if i > 0 {
                s.push('/');
            }
            s.push_str(seg);
        }
        if s.is_empty() {
            return None;
        }
        Some(Key(s))
    }

    /// Parses a key as returned by `list` (trusted: it came from our own store).
    fn from_listed(s: &str) -> Option<Key> {
        let parts: Vec<&str> = s.split('/').collect();
        Key::new(&parts)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Last segment (the file name).
    pub fn name(&self) -> &str {
        self.0.rsplit('/').next().unwrap_or(&self.0)
    }

    fn os_path(&self) -> OsPath {
        OsPath::from(self.0.as_str())
    }
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn is_safe_segment(seg: &str) -> bool {
    !seg.is_empty()
        && seg.len() <= 128
        && seg != "."
        && seg != ".."
        // LocalFileSystem reserves names ending in `#<digits>` for staging files.
        && seg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

/// Errors of the store layer. `Unavailable` is transient (retry); the rest are definite.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("object {key} not found")]
    NotFound { key: String },
    #[error("store unavailable during {op} of {key}: {source}")]
    Unavailable {
        op: &'static str,
        key: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The backend has no space left (ENOSPC on the local backend). Transient from the
    /// caller's point of view: nothing was written, and a retry succeeds once space returns.
    #[error("store full during {op} of {key}: {source}")]
    Full {
        op: &'static str,
        key: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("store configuration: {0}")]
    Config(String),
    /// The requested byte range is empty or not entirely inside the object (a caller bug or a
    /// corrupt index: retrying cannot help). `size` is the object's size when it was learnt.
    #[error("byte range {range:?} of {key} is empty or outside the object (size {size:?})")]
    BadRange {
        key: String,
        range: Range<u64>,
        size: Option<u64>,
    },
}

impl StoreError {
    fn from_os(op: &'static str, key: &Key, e: object_store::Error) -> StoreError {
        match e {
            object_store::Error::NotFound { .. } => StoreError::NotFound {
                key: key.to_string(),
            },
            other if is_storage_full(&other) => StoreError::Full {
                op,
                key: key.to_string(),
                source: Box::new(other),
            },
            other => StoreError::Unavailable {
                op,
                key: key.to_string(),
                source: Box::new(other),
            },
        }
    }
}

/// Whether an I/O error of kind `StorageFull` (ENOSPC, EDQUOT) is anywhere in the chain: the
/// local backend wraps it in its own error types.
pub(crate) fn is_storage_full(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::StorageFull
                || io.kind() == std::io::ErrorKind::QuotaExceeded
            {
                return true;
            }
        }
        cur = err.source();
    }
    false
}

/// Outcome of a create-only put.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    Created,
    /// The key already held an object: for content-addressed keys, a deduplication hit.
    Existed,
}

/// One listed object.
#[derive(Debug, Clone)]
pub struct Listed {
    pub key: Key,
    pub size: u64,
    /// Last write, milliseconds since the Unix epoch (the store's clock: garbage collection
    /// compares it with its own start time and grace period).
    pub modified_ms: u64,
}

/// Store operations as the metrics label them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Put,
    PutIfAbsent,
    Get,
    GetRange,
    Head,
    Delete,
    List,
}

impl Op {
    fn label(self) -> &'static str {
        match self {
            Op::Put => "put",
            Op::PutIfAbsent => "put_if_absent",
            Op::Get => "get",
            Op::GetRange => "get_range",
            Op::Head => "head",
            Op::Delete => "delete",
            Op::List => "list",
        }
    }

    fn requested(self) {
        metrics::counter!("drvault_store_requests_total", "op" => self.label()).increment(1);
    }

    fn failed(self) {
        metrics::counter!("drvault_store_errors_total", "op" => self.label()).increment(1);
    }
}

/// Exports every operation's request and error counters at 0, so an alert on store errors
/// reads 0 (not "no data") on a server that has had none.
pub fn register_metrics() {
    for op in [
        Op::Put,
        Op::PutIfAbsent,
        Op::Get,
        Op::GetRange,
        Op::Head,
        Op::Delete,
        Op::List,
    ] {
        metrics::counter!("drvault_store_requests_total", "op" => op.label()).increment(0);
        metrics::counter!("drvault_store_errors_total", "op" => op.label()).increment(0);
    }
    count_written(0);
    count_read(0);
}

fn count_written(bytes: usize) {
    metrics::counter!("drvault_store_bytes_written_total").increment(bytes as u64);
}

fn count_read(bytes: usize) {
    metrics::counter!("drvault_store_bytes_read_total").increment(bytes as u64);
}

fn local_root(url: &str) -> Option<PathBuf> {
    url.strip_prefix("file://").map(PathBuf::from)
}

/// A handle on the vault's object store. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    url: String,
    /// The vault directory of a local (`file://`) vault: its staging files are cleaned up here.
    local_root: Option<PathBuf>,
}

/// Staging files of interrupted local writes that a cleanup found (and removed, unless it was a
/// dry run).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Leftovers {
    pub files: u64,
    pub bytes: u64,
}

/// Whether a file name is one of LocalFileSystem's staging names, `<name>#<digits>`: a put
/// writes there, fsyncs and renames, so a process killed in between leaves it behind. Keys
/// never contain `#` (see [`Key::new`]), and `list` skips such names, so nothing else sees them.
fn is_staging_name(name: &str) -> bool {
    match name.split_once('#') {
        Some((_, n)) => !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()),
        None => false,
    }
}

/// Walks `root` (not following symbolic links) for staging files last modified before
/// `cutoff_ms`, removing them unless `dry_run`. A file or directory that vanishes during the
/// walk (a write renaming its staging file) is skipped.
fn sweep_staging(root: &Path, cutoff_ms: u64, dry_run: bool) -> Result<Leftovers, StoreError> {
    let io = |path: &Path, e: std::io::Error| StoreError::Unavailable {
        op: "staging cleanup",
        key: path.display().to_string(),
        source: Box::new(e),
    };
    let gone = |e: &std::io::Error| e.kind() == std::io::ErrorKind::NotFound;
    let mut found = Leftovers::default();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if gone(&e) => continue,
            Err(e) => return Err(io(&dir, e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| io(&dir, e))?;
            let path = entry.path();
            let meta = match std::fs::symlink_metadata(&path) {
                Ok(m) => m,
                Err(e) if gone(&e) => continue,
                Err(e) => return Err(io(&path, e)),
            };
            if meta.is_dir() {
                dirs.push(path);
                continue;
            }
            if !meta.is_file() || !entry.file_name().to_str().is_some_and(is_staging_name) {
                continue;
            }
            let modified_ms = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
                .unwrap_or(u64::MAX);
            if modified_ms >= cutoff_ms {
                continue;
            }
            if !dry_run {
                match std::fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if gone(&e) => continue,
                    Err(e) => return Err(io(&path, e)),
                }
                tracing::debug!(file = %path.display(), "removed a staging file of an interrupted write");
            }
            found.files += 1;
            found.bytes += meta.len();
        }
    }
    Ok(found)
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("url", &self.url).finish()
    }
}

/// The Azure builder of an `az://{container}` vault: `AZURE_*` environment variables first, the
/// configured options over them. Shared by [`Store::open`] and container creation, so both talk
/// to the same account with the same credentials.
pub(crate) fn azure_builder(
    container: &str,
    options: &[(String, String)],
) -> Result<object_store::azure::MicrosoftAzureBuilder, StoreError> {
    let mut b = object_store::azure::MicrosoftAzureBuilder::from_env()
        .with_container_name(container.trim_end_matches('/'));
    for (k, v) in options {
        let key: object_store::azure::AzureConfigKey = k
            .parse()
            .map_err(|e| StoreError::Config(format!("azure option {k}: {e}")))?;
        b = b.with_config(key, v);
    }
    Ok(b)
}

impl Store {
    /// Opens the store named by `url`: `file:///abs/dir` (fsync on), `memory://`,
    /// `az://container` / `azure://container`, `s3://bucket`. Cloud credentials and endpoints
    /// come from `options` (object_store's config keys, e.g. `azure_storage_account_name`)
    /// and from the environment.
    pub fn open(url: &str, options: &[(String, String)]) -> Result<Store, StoreError> {
        let inner: Arc<dyn ObjectStore> = if let Some(path) = url.strip_prefix("file://") {
            std::fs::create_dir_all(path).map_err(|e| {
                StoreError::Config(format!("cannot create vault directory {path}: {e}"))
            })?;
            let fs = object_store::local::LocalFileSystem::new_with_prefix(path)
                .map_err(|e| StoreError::Config(format!("local vault {path}: {e}")))?
                .with_fsync(true)
                .with_automatic_cleanup(true);
            Arc::new(fs)
        } else if url == "memory://" {
            Arc::new(object_store::memory::InMemory::new())
        } else if let Some(container) = url
            .strip_prefix("az://")
            .or_else(|| url.strip_prefix("azure://"))
        {
            let b = azure_builder(container, options)?;
            Arc::new(
                b.build()
                    .map_err(|e| StoreError::Config(format!("azure store {url}: {e}")))?,
            )
        } else if let Some(bucket) = url.strip_prefix("s3://") {
            let mut b = object_store::aws::AmazonS3Builder::from_env()
                .with_bucket_name(bucket.trim_end_matches('/'));
            for (k, v) in options {
                let key: object_store::aws::AmazonS3ConfigKey = k
                    .parse()
                    .map_err(|e| StoreError::Config(format!("s3 option {k}: {e}")))?;
                b = b.with_config(key, v);
            }
            Arc::new(
                b.build()
                    .map_err(|e| StoreError::Config(format!("s3 store {url}: {e}")))?,
            )
        } else {
            return Err(StoreError::Config(format!(
                "unsupported vault URL {url:?}: use file:///dir, az://container, s3://bucket or memory://"
            )));
        };
        Ok(Store {
            inner,
            url: url.to_string(),
            local_root: local_root(url),
        })
    }

    /// Wraps an already-built object store (used by wrappers such as fault injection). A
    /// `file://` URL names the directory the wrapped local store writes to.
    pub fn from_object_store(inner: Arc<dyn ObjectStore>, url: &str) -> Store {
        Store {
            inner,
            url: url.to_string(),
            local_root: local_root(url),
        }
    }

    /// Removes the staging files interrupted writes left in a local vault (see
    /// [`is_staging_name`]) that were last modified before `cutoff_ms` (Unix milliseconds), or
    /// with `dry_run` only counts them. A write in flight keeps its staging file younger than
    /// any cutoff in the past it has been writing through, so callers pick a cutoff older than
    /// any write can last. Other backends write atomically and leave none: nothing to do.
    pub async fn remove_staging_leftovers(
        &self,
        cutoff_ms: u64,
        dry_run: bool,
    ) -> Result<Leftovers, StoreError> {
        let Some(root) = self.local_root.clone() else {
            return Ok(Leftovers::default());
        };
        tokio::task::spawn_blocking(move || sweep_staging(&root, cutoff_ms, dry_run))
            .await
            .map_err(|e| StoreError::Unavailable {
                op: "staging cleanup",
                key: String::new(),
                source: Box::new(e),
            })?
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Atomic whole-object write.
    pub async fn put(&self, key: &Key, data: Bytes) -> Result<(), StoreError> {
        Op::Put.requested();
        let len = data.len();
        match self
            .inner
            .put(&key.os_path(), PutPayload::from_bytes(data))
            .await
        {
            Ok(_) => {
                count_written(len);
                Ok(())
            }
            Err(e) => {
                Op::Put.failed();
                Err(StoreError::from_os("put", key, e))
            }
        }
    }

    /// Create-only write. `Existed` when the key already holds an object.
    pub async fn put_if_absent(&self, key: &Key, data: Bytes) -> Result<PutOutcome, StoreError> {
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        Op::PutIfAbsent.requested();
        let len = data.len();
        match self
            .inner
            .put_opts(&key.os_path(), PutPayload::from_bytes(data), opts)
            .await
        {
            Ok(_) => {
                count_written(len);
                Ok(PutOutcome::Created)
            }
            Err(object_store::Error::AlreadyExists { .. }) => Ok(PutOutcome::Existed),
            Err(e) => {
                Op::PutIfAbsent.failed();
                Err(StoreError::from_os("put_if_absent", key, e))
            }
        }
    }

    pub async fn get(&self, key: &Key) -> Result<Bytes, StoreError> {
        Op::Get.requested();
        let got = match self.inner.get(&key.os_path()).await {
            Ok(r) => r.bytes().await,
            Err(e) => Err(e),
        };
        match got {
            Ok(bytes) => {
                count_read(bytes.len());
                Ok(bytes)
            }
            Err(e) => {
                if !matches!(e, object_store::Error::NotFound { .. }) {
                    Op::Get.failed();
                }
                Err(StoreError::from_os("get", key, e))
            }
        }
    }

    /// Exactly the bytes `range` of the object; see the module docs for the range rules.
    pub async fn get_range(&self, key: &Key, range: Range<u64>) -> Result<Bytes, StoreError> {
        let bad = |size| StoreError::BadRange {
            key: key.to_string(),
            range: range.clone(),
            size,
        };
        if range.start >= range.end {
            return Err(bad(None));
        }
        Op::GetRange.requested();
        let bytes = match self.inner.get_range(&key.os_path(), range.clone()).await {
            Ok(bytes) => bytes,
            Err(e @ object_store::Error::NotFound { .. }) => {
                return Err(StoreError::from_os("get_range", key, e))
            }
            Err(e) => {
                Op::GetRange.failed();
                // Backends report a start past the end as a generic error (or HTTP 416); only
                // the object's size tells it apart from an outage. Costs a request on errors only.
                return match self.head(key).await {
                    Ok(Some(size)) if size < range.end => Err(bad(Some(size))),
                    Ok(None) => Err(StoreError::NotFound {
                        key: key.to_string(),
                    }),
                    _ => Err(StoreError::from_os("get_range", key, e)),
                };
            }
        };
        count_read(bytes.len());
        // A range running past the end comes back short instead of failing.
        if bytes.len() as u64 != range.end - range.start {
            Op::GetRange.failed();
            let size = range.start.checked_add(bytes.len() as u64);
            return Err(bad(size));
        }
        Ok(bytes)
    }

    /// Size of the object, or `None` when it does not exist.
    pub async fn head(&self, key: &Key) -> Result<Option<u64>, StoreError> {
        Op::Head.requested();
        match self.inner.head(&key.os_path()).await {
            Ok(m) => Ok(Some(m.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => {
                Op::Head.failed();
                Err(StoreError::from_os("head", key, e))
            }
        }
    }

    /// Idempotent delete: deleting a missing key succeeds.
    pub async fn delete(&self, key: &Key) -> Result<(), StoreError> {
        Op::Delete.requested();
        match self.inner.delete(&key.os_path()).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => {
                Op::Head.requested();
                match self.inner.head(&key.os_path()).await {
                    // The local backend refuses to delete a key that is only a prefix of other
                    // keys (a directory) where cloud stores succeed: no object there, nothing
                    // to do.
                    Err(object_store::Error::NotFound { .. }) => Ok(()),
                    _ => {
                        Op::Delete.failed();
                        Err(StoreError::from_os("delete", key, e))
                    }
                }
            }
        }
    }

    /// Every object under `prefix` (recursive). Keys that are not ours (foreign files in a
    /// shared bucket, staging files of the local backend) are skipped.
    pub async fn list(&self, prefix: &Key) -> Result<Vec<Listed>, StoreError> {
        let p = prefix.os_path();
        Op::List.requested();
        let items: Vec<object_store::ObjectMeta> =
            self.inner.list(Some(&p)).try_collect().await.map_err(|e| {
                Op::List.failed();
                StoreError::from_os("list", prefix, e)
            })?;
        Ok(items
            .into_iter()
            .filter_map(|m| {
                Key::from_listed(m.location.as_ref()).map(|key| Listed {
                    key,
                    size: m.size,
                    modified_ms: u64::try_from(m.last_modified.timestamp_millis()).unwrap_or(0),
                })
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_reject_unsafe_segments() {
        assert!(Key::new(&["chunks", "ab", "abcdef"]).is_some());
        for bad in ["..", ".", "", "a/b", "a%2e", "x\0y", "名前", "a b"] {
            assert!(Key::new(&["vms", bad]).is_none(), "{bad:?} accepted");
        }
        assert!(Key::new(&["a".repeat(129)]).is_none());
    }

    #[tokio::test]
    async fn create_only_put_reports_existing() {
        let s = Store::open("memory://", &[]).unwrap();
        let k = Key::new(&["t", "x"]).unwrap();
        assert_eq!(
            s.put_if_absent(&k, Bytes::from_static(b"1")).await.unwrap(),
            PutOutcome::Created
        );
        assert_eq!(
            s.put_if_absent(&k, Bytes::from_static(b"2")).await.unwrap(),
            PutOutcome::Existed
        );
        assert_eq!(s.get(&k).await.unwrap(), Bytes::from_static(b"1"));
    }

    #[tokio::test]
    async fn get_range_is_exact_or_bad_range() {
        let s = Store::open("memory://", &[]).unwrap();
        let k = Key::new(&["t", "r"]).unwrap();
        s.put(&k, Bytes::from_static(b"0123456789")).await.unwrap();
        assert_eq!(
            s.get_range(&k, 2..5).await.unwrap(),
            Bytes::from_static(b"234")
        );
        for (r, size) in [(5..11, Some(10)), (10..12, Some(10)), (3..3, None)] {
            match s.get_range(&k, r.clone()).await {
                Err(StoreError::BadRange { size: got, .. }) => assert_eq!(got, size, "{r:?}"),
                other => panic!("{r:?}: {other:?}"),
            }
        }
    }

    /// The value of one counter in Prometheus text (0 when the series was never touched).
    fn counter(text: &str, series: &str) -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .map_or(0, |v| v.trim().parse().unwrap())
    }

    #[tokio::test]
    async fn every_operation_counts_its_requests_errors_and_bytes() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        // Only this test's operations reach this recorder: the test runs on one thread.
        let _guard = metrics::set_default_local_recorder(&recorder);
        let s = Store::open("memory://", &[]).unwrap();
        let a = Key::new(&["m", "a"]).unwrap();
        let b = Key::new(&["m", "b"]).unwrap();
        let missing = Key::new(&["m", "missing"]).unwrap();
        s.put(&a, Bytes::from_static(b"0123456789")).await.unwrap();
        assert_eq!(
            s.put_if_absent(&b, Bytes::from_static(b"xyz"))
                .await
                .unwrap(),
            PutOutcome::Created
        );
        // A deduplication hit writes nothing.
        assert_eq!(
            s.put_if_absent(&b, Bytes::from_static(b"other"))
                .await
                .unwrap(),
            PutOutcome::Existed
        );
        assert_eq!(s.get(&a).await.unwrap().len(), 10);
        assert_eq!(s.get_range(&a, 2..6).await.unwrap().len(), 4);
        // A missing key is an answer, not a store error.
        assert!(matches!(
            s.get(&missing).await,
            Err(StoreError::NotFound { .. })
        ));
        assert_eq!(s.head(&missing).await.unwrap(), None);
        assert_eq!(s.head(&a).await.unwrap(), Some(10));
        // A range past the end is refused: an error, and the head that told why.
        assert!(matches!(
            s.get_range(&a, 8..20).await,
            Err(StoreError::BadRange { .. })
        ));
        assert_eq!(s.list(&Key::new(&["m"]).unwrap()).await.unwrap().len(), 2);
        s.delete(&b).await.unwrap();
        // An empty range never reaches the backend.
        assert!(s.get_range(&a, 3..3).await.is_err());

        let text = handle.render();
        let requests = |op: &str| {
            counter(
                &text,
                &format!("drvault_store_requests_total{{op=\"{op}\"}}"),
            )
        };
        let errors =
            |op: &str| counter(&text, &format!("drvault_store_errors_total{{op=\"{op}\"}}"));
        assert_eq!(requests("put"), 1, "{text}");
        assert_eq!(requests("put_if_absent"), 2, "{text}");
        assert_eq!(requests("get"), 2, "{text}");
        assert_eq!(requests("get_range"), 2, "{text}");
        assert_eq!(requests("head"), 2, "{text}");
        assert_eq!(requests("list"), 1, "{text}");
        assert_eq!(requests("delete"), 1, "{text}");
        assert_eq!(errors("get"), 0, "{text}");
        assert_eq!(errors("get_range"), 1, "{text}");
        assert_eq!(errors("put_if_absent"), 0, "{text}");
        assert_eq!(
            counter(&text, "drvault_store_bytes_written_total"),
            10 + 3,
            "{text}"
        );
        // The whole object, the 4-byte range and what the short range returned (8..10).
        assert_eq!(
            counter(&text, "drvault_store_bytes_read_total"),
            10 + 4 + 2,
            "{text}"
        );
    }

    #[tokio::test]
    async fn delete_of_a_prefix_is_a_no_op_on_local_files() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&format!("file://{}", dir.path().display()), &[]).unwrap();
        let inner = Key::new(&["d", "x", "y"]).unwrap();
        s.put(&inner, Bytes::from_static(b"y")).await.unwrap();
        s.delete(&Key::new(&["d", "x"]).unwrap()).await.unwrap();
        assert_eq!(s.head(&inner).await.unwrap(), Some(1));
    }

    #[tokio::test]
    async fn staging_leftovers_older_than_the_cutoff_are_removed_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&format!("file://{}", dir.path().display()), &[]).unwrap();
        let k = Key::new(&["chunks", "abc", "abcd"]).unwrap();
        s.put(&k, Bytes::from_static(b"object")).await.unwrap();
        let now = std::time::SystemTime::now();
        let hour_ago = now - std::time::Duration::from_secs(3600);
        let file = |rel: &str, len: usize, mtime: std::time::SystemTime| {
            let p = dir.path().join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, vec![7u8; len]).unwrap();
            std::fs::File::options()
                .write(true)
                .open(&p)
                .unwrap()
                .set_modified(mtime)
                .unwrap();
            p
        };
        let old = [
            file("chunks/abc/abcd#1", 100, hour_ago),
            file("stage/v/d/s/17#12", 20, hour_ago),
        ];
        // Not staging names, or too young: kept.
        let kept = [
            file("chunks/abc/abce#2", 5, now),
            file("chunks/abc/x#y1", 5, hour_ago),
            file("chunks/abc/x#", 5, hour_ago),
        ];
        let cutoff = crate::util::unix_now_ms() - 60_000;
        let dry = s.remove_staging_leftovers(cutoff, true).await.unwrap();
        assert_eq!(
            dry,
            Leftovers {
                files: 2,
                bytes: 120
            }
        );
        assert!(old.iter().all(|p| p.exists()), "a dry run removed files");
        let done = s.remove_staging_leftovers(cutoff, false).await.unwrap();
        assert_eq!(done, dry);
        assert!(old.iter().all(|p| !p.exists()));
        assert!(kept.iter().all(|p| p.exists()));
        assert_eq!(s.get(&k).await.unwrap(), Bytes::from_static(b"object"));
        let memory = Store::open("memory://", &[]).unwrap();
        assert_eq!(
            memory
                .remove_staging_leftovers(u64::MAX, false)
                .await
                .unwrap(),
            Leftovers::default()
        );
    }
}
