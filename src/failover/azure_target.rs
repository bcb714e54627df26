//! A failover target in Azure Blob storage: each disk becomes a page-blob fixed VHD, the form
//! an Azure VM boots from.
//!
//! `[failover] target = "az://container/prefix"` with `target_options` (the same keys and
//! `AZURE_*` environment as `[vault] options`: account name and key, endpoint, emulator mode).
//! A disk of a failover is the page blob `prefix/VM/FAILOVER-ID/DISK.vhd`; a drill writes under
//! `prefix/drills/VM/FAILOVER-ID/`, and its cleanup deletes every blob there.
//!
//! Writing a disk ([`PageBlobDisk`]): Put Blob creates the page blob at its full size (the
//! virtual size, whole MiB, plus the 512-byte footer), all of it reading as zeros; Put Page
//! writes only the 512-byte pages that hold data (zero blocks and zero runs longer than
//! [`MAX_ZERO_GAP`] inside a block are skipped, so Get Page Ranges lists the data and no more
//! than those short gaps); the footer goes last, and is read back
//! and parsed as a VHD footer before the disk counts as written. A failover lists a disk only
//! after that check.
//!
//! Why REST and not an SDK: no maintained Azure SDK crate is in the dependency tree, object_store
//! (the vault's client) has no page blobs, and the official `azure_storage_blob` crate brings its
//! own HTTP and runtime stack (azure_core, typespec) for the six calls needed here (Put Blob, Put
//! Page, Get Page Ranges, ranged Get Blob, List Blobs, Delete Blob). They are signed with the
//! SharedKey code the vault's container creation already has (`store::azure`), sent with the
//! reqwest client the project uses everywhere else.
//!
//! Errors: transport failures, 5xx, 408, 429 and 409 are [`AzureTargetError::Unavailable`]
//! (recoverable: the same failover succeeds once the service answers); other 4xx (bad key,
//! missing permission) are [`AzureTargetError::Refused`]; a footer that does not read back as
//! written is [`AzureTargetError::FooterMismatch`].

use std::ops::Range;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use reqwest::Method;

use crate::error::Error;
use crate::store::azure as signing;
use crate::store::StoreError;

/// Largest Put Page body the service accepts.
pub const MAX_PUT_PAGE: usize = 4 * 1024 * 1024;
/// Page blobs are written in 512-byte pages.
pub const PAGE: u64 = 512;
const MAX_MESSAGE: usize = 512;

/// A request to the target's storage account that failed.
#[derive(Debug, thiserror::Error)]
pub enum AzureTargetError {
    #[error("azure target: {op} {blob}: {message}")]
    Unavailable {
        op: &'static str,
        blob: String,
        message: String,
    },
    #[error("azure target: {op} {blob} refused ({status} {code}): {message}")]
    Refused {
        op: &'static str,
        blob: String,
        status: u16,
        code: String,
        message: String,
    },
    #[error("azure target: the footer of {blob} does not read back as written: {reason}")]
    FooterMismatch { blob: String, reason: String },
    #[error("azure target: {0}")]
    Invalid(String),
}

impl From<AzureTargetError> for Error {
    fn from(e: AzureTargetError) -> Error {
        match &e {
            AzureTargetError::Unavailable { .. } => {
                Error::unavailable("target_unavailable", e.to_string())
            }
            AzureTargetError::Refused { .. } => Error::conflict("target_refused", e.to_string()),
            AzureTargetError::FooterMismatch { .. } => {
                Error::unavailable("target_footer_mismatch", e.to_string())
            }
            AzureTargetError::Invalid(_) => Error::internal(e.to_string()),
        }
    }
}

/// The container (and path inside it) failovers write their disks to.
#[derive(Clone)]
pub struct AzureTarget {
    /// The account's blob endpoint, e.g. `https://acct.blob.core.windows.net` or an emulator's
    /// `http://127.0.0.1:10000/devstoreaccount1`.
    endpoint: reqwest::Url,
    account: String,
    key: Vec<u8>,
    container: String,
    /// Path inside the container, without leading or trailing `/`; may be empty.
    prefix: String,
    client: reqwest::Client,
}

impl std::fmt::Debug for AzureTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AzureTarget({})", self.url())
    }
}

impl AzureTarget {
    /// Parses `az://container[/prefix]` (or `azure://`) and resolves account, key and endpoint
    /// from `options` and the environment the way the vault's Azure store does.
    pub fn open(url: &str, options: &[(String, String)]) -> Result<AzureTarget, StoreError> {
        let rest = url
            .strip_prefix("az://")
            .or_else(|| url.strip_prefix("azure://"))
            .ok_or_else(|| {
                StoreError::Config(format!(
                    "failover.target {url:?}: only az://container[/path] targets are supported"
                ))
            })?;
        let (container, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        signing::check_container_name(container)?;
        let prefix = prefix.trim_matches('/').to_string();
        if prefix.split('/').any(|p| p == "." || p == "..")
            || prefix.contains("//")
            || prefix
                .chars()
                .any(|c| c.is_control() || c == '?' || c == '#' || c == '\\')
        {
            return Err(StoreError::Config(format!(
                "failover.target {url:?}: the path inside the container must be plain names separated by /"
            )));
        }
        let t = signing::target(container, options).map_err(|e| match e {
            StoreError::Config(m) => StoreError::Config(format!("failover.target {url}: {m}")),
            other => other,
        })?;
        signing::check_account_name(&t.account)?;
        let key = signing::decode_key(&t.account, &t.key)?;
        let endpoint = reqwest::Url::parse(t.endpoint.trim_end_matches('/'))
            .map_err(|e| StoreError::Config(format!("azure endpoint {:?}: {e}", t.endpoint)))?;
        if !matches!(endpoint.scheme(), "http" | "https") || endpoint.query().is_some() {
            return Err(StoreError::Config(format!(
                "azure endpoint {:?}: must be http(s) without a query",
                t.endpoint
            )));
        }
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(300))
            .connect_timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| StoreError::Config(format!("cannot build an HTTP client: {e}")))?;
        Ok(AzureTarget {
            endpoint,
            account: t.account,
            key,
            container: container.to_string(),
            prefix,
            client,
        })
    }

    /// `az://container/prefix`, for messages and records.
    pub fn url(&self) -> String {
        match self.prefix.as_str() {
            "" => format!("az://{}", self.container),
            p => format!("az://{}/{p}", self.container),
        }
    }

    /// The blob name of `parts` joined under the prefix.
    pub fn blob_name(&self, parts: &[&str]) -> String {
        let mut all: Vec<&str> = Vec::with_capacity(parts.len() + 1);
        if !self.prefix.is_empty() {
            all.push(&self.prefix);
        }
        all.extend(parts.iter().copied());
        all.join("/")
    }

    /// `az://container/blob`: how a written disk is named in the failover's record.
    pub fn blob_url(&self, blob: &str) -> String {
        format!("az://{}/{blob}", self.container)
    }

    /// The blob name of an `az://container/blob` URL of this target's container.
    pub fn blob_of_url<'a>(&self, url: &'a str) -> Option<&'a str> {
        url.strip_prefix("az://")?
            .strip_prefix(self.container.as_str())?
            .strip_prefix('/')
    }

    /// Creates the container unless it exists.
    pub async fn ensure_container(&self) -> Result<(), Error> {
        signing::ensure_container(
            self.endpoint.as_str(),
            &self.account,
            &signing_key_b64(&self.key),
            &self.container,
        )
        .await?;
        Ok(())
    }

    /// One signed request; `ok` lists the statuses that mean success.
    #[allow(clippy::too_many_arguments)]
    async fn request(
        &self,
        op: &'static str,
        method: Method,
        blob: Option<&str>,
        query: &[(&str, &str)],
        mut headers: Vec<(String, String)>,
        body: Option<Bytes>,
        ok: &[u16],
    ) -> Result<reqwest::Response, AzureTargetError> {
        let name = blob.unwrap_or("").to_string();
        let mut url = self.endpoint.clone();
        {
            let mut segments = url.path_segments_mut().map_err(|_| {
                AzureTargetError::Invalid(format!("endpoint {} cannot take a path", self.endpoint))
            })?;
            segments.pop_if_empty().push(&self.container);
            if let Some(b) = blob {
                segments.extend(b.split('/'));
            }
        }
        if !query.is_empty() {
            let mut q = url.query_pairs_mut();
            for (k, v) in query {
                q.append_pair(k, v);
            }
        }
        let len = body.as_ref().map_or(0, |b| b.len() as u64);
        headers.push((
            "x-ms-date".into(),
            httpdate::fmt_http_date(SystemTime::now()),
        ));
        headers.push(("x-ms-version".into(), signing::version().into()));
        let query_owned: Vec<(String, String)> = query
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let to_sign = signing::shared_key_string(
            method.as_str(),
            len,
            &headers,
            &self.account,
            url.path(),
            &query_owned,
        );
        let signature = signing::sign(&self.key, &to_sign);
        let mut req = self.client.request(method, url.clone());
        for (k, v) in &headers {
            req = req.header(k, v);
        }
        req = req.header(
            "authorization",
            format!("SharedKey {}:{signature}", self.account),
        );
        // A body sets its own Content-Length; an empty request states 0 (signed as empty).
        req = match body {
            Some(b) => req.body(b),
            None => req.header("content-length", "0"),
        };
        let response = req
            .send()
            .await
            .map_err(|e| AzureTargetError::Unavailable {
                op,
                blob: name.clone(),
                message: format!("request to {url} failed: {e}"),
            })?;
        let status = response.status().as_u16();
        if ok.contains(&status) {
            return Ok(response);
        }
        let code = response
            .headers()
            .get("x-ms-error-code")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        // The body only explains the failure; a failure to read it must not hide the status.
        let body = response.text().await.unwrap_or_default();
        let message: String = body.chars().take(MAX_MESSAGE).collect();
        if matches!(status, 408 | 409 | 429) || status >= 500 {
            Err(AzureTargetError::Unavailable {
                op,
                blob: name,
                message: format!("{status} {code}: {message}"),
            })
        } else {
            Err(AzureTargetError::Refused {
                op,
                blob: name,
                status,
                code,
                message,
            })
        }
    }

    /// Put Blob: a page blob of `size` bytes (a multiple of 512), reading as zeros. Replaces a
    /// blob of the same name.
    pub async fn create_page_blob(&self, blob: &str, size: u64) -> Result<(), AzureTargetError> {
        if size % PAGE != 0 {
            return Err(AzureTargetError::Invalid(format!(
                "page blob {blob}: {size} bytes is not a multiple of 512"
            )));
        }
        let headers = vec![
            ("x-ms-blob-type".into(), "PageBlob".into()),
            ("x-ms-blob-content-length".into(), size.to_string()),
        ];
        self.request(
            "create page blob",
            Method::PUT,
            Some(blob),
            &[],
            headers,
            None,
            &[201],
        )
        .await?;
        Ok(())
    }

    /// Put Page: `data` (a multiple of 512 bytes, at most 4 MiB) at `offset` (512-aligned).
    pub async fn put_pages(
        &self,
        blob: &str,
        offset: u64,
        data: Bytes,
    ) -> Result<(), AzureTargetError> {
        let len = data.len() as u64;
        if offset % PAGE != 0 || len % PAGE != 0 || len == 0 || data.len() > MAX_PUT_PAGE {
            return Err(AzureTargetError::Invalid(format!(
                "page write of {len} bytes at {offset} to {blob} is not whole pages of at most 4 MiB"
            )));
        }
        let headers = vec![
            ("x-ms-page-write".into(), "update".into()),
            (
                "x-ms-range".into(),
                format!("bytes={offset}-{}", offset + len - 1),
            ),
        ];
        self.request(
            "put page",
            Method::PUT,
            Some(blob),
            &[("comp", "page")],
            headers,
            Some(data),
            &[201],
        )
        .await?;
        Ok(())
    }

    /// Get Page Ranges: the byte ranges of the blob that were written, sorted and merged.
    pub async fn page_ranges(&self, blob: &str) -> Result<Vec<Range<u64>>, AzureTargetError> {
        let r = self
            .request(
                "get page ranges",
                Method::GET,
                Some(blob),
                &[("comp", "pagelist")],
                Vec::new(),
                None,
                &[200],
            )
            .await?;
        let xml = r.text().await.map_err(|e| AzureTargetError::Unavailable {
            op: "get page ranges",
            blob: blob.to_string(),
            message: format!("reading the answer: {e}"),
        })?;
        parse_page_list(&xml)
            .map_err(|reason| AzureTargetError::Invalid(format!("page list of {blob}: {reason}")))
    }

    /// Get Blob of `len` bytes at `offset` (ranged).
    pub async fn read_range(
        &self,
        blob: &str,
        offset: u64,
        len: u64,
    ) -> Result<Bytes, AzureTargetError> {
        if len == 0 {
            return Ok(Bytes::new());
        }
        let headers = vec![(
            "x-ms-range".into(),
            format!("bytes={offset}-{}", offset + len - 1),
        )];
        let r = self
            .request(
                "read",
                Method::GET,
                Some(blob),
                &[],
                headers,
                None,
                &[200, 206],
            )
            .await?;
        let bytes = r.bytes().await.map_err(|e| AzureTargetError::Unavailable {
            op: "read",
            blob: blob.to_string(),
            message: format!("reading the answer: {e}"),
        })?;
        if bytes.len() as u64 != len {
            return Err(AzureTargetError::Unavailable {
                op: "read",
                blob: blob.to_string(),
                message: format!("asked for {len} bytes at {offset}, got {}", bytes.len()),
            });
        }
        Ok(bytes)
    }

    /// The size and ETag of a blob (Get Blob Properties); the ETag changes with every write.
    pub async fn properties(&self, blob: &str) -> Result<(u64, String), AzureTargetError> {
        let r = self
            .request(
                "properties",
                Method::HEAD,
                Some(blob),
                &[],
                Vec::new(),
                None,
                &[200],
            )
            .await?;
        let header = |name: &str| {
            r.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let size = header("content-length")
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| AzureTargetError::Invalid(format!("{blob}: no Content-Length")))?;
        Ok((size, header("etag").unwrap_or_default()))
    }

    /// The names of the blobs under `prefix` (List Blobs, every page of the listing).
    pub async fn list(&self, prefix: &str) -> Result<Vec<String>, AzureTargetError> {
        let mut names = Vec::new();
        let mut marker = String::new();
        loop {
            let mut query = vec![
                ("restype", "container"),
                ("comp", "list"),
                ("prefix", prefix),
            ];
            if !marker.is_empty() {
                query.push(("marker", marker.as_str()));
            }
            let r = self
                .request("list", Method::GET, None, &query, Vec::new(), None, &[200])
                .await?;
            let xml = r.text().await.map_err(|e| AzureTargetError::Unavailable {
                op: "list",
                blob: prefix.to_string(),
                message: format!("reading the answer: {e}"),
            })?;
            names.extend(xml_values(&xml, "Name"));
            marker = xml_values(&xml, "NextMarker")
                .into_iter()
                .next()
                .unwrap_or_default();
            if marker.is_empty() {
                return Ok(names);
            }
        }
    }

    /// Deletes a blob; one that is not there counts as deleted.
    pub async fn delete(&self, blob: &str) -> Result<(), AzureTargetError> {
        self.request(
            "delete",
            Method::DELETE,
            Some(blob),
            &[],
            Vec::new(),
            None,
            &[202, 404],
        )
        .await?;
        Ok(())
    }

    /// Deletes every blob under `prefix` (a failover's folder); returns how many.
    pub async fn delete_under(&self, prefix: &str) -> Result<usize, AzureTargetError> {
        let dir = format!("{}/", prefix.trim_end_matches('/'));
        let names = self.list(&dir).await?;
        for n in &names {
            self.delete(n).await?;
        }
        Ok(names.len())
    }
}

fn signing_key_b64(key: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(key)
}

/// The text of every `<tag>…</tag>` element, XML entities decoded. The Blob service's answers
/// used here are flat lists of such elements, so a full XML parser would add nothing.
fn xml_values(xml: &str, tag: &str) -> Vec<String> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some(at) = rest.find(&open) {
        rest = &rest[at + open.len()..];
        let Some(end) = rest.find(&close) else { break };
        out.push(
            rest[..end]
                .replace("&lt;", "<")
                .replace("&gt;", ">")
                .replace("&quot;", "\"")
                .replace("&apos;", "'")
                .replace("&amp;", "&"),
        );
        rest = &rest[end + close.len()..];
    }
    out
}

/// `<PageList><PageRange><Start>a</Start><End>b</End></PageRange>…` → sorted, merged `a..b+1`.
pub fn parse_page_list(xml: &str) -> Result<Vec<Range<u64>>, String> {
    // Only written ranges: a plain page list has no ClearRange, a diff list would.
    let body = xml.split("<ClearRange>").next().unwrap_or("");
    let starts = xml_values(body, "Start");
    let ends = xml_values(body, "End");
    if starts.len() != ends.len() {
        return Err(format!("{} starts and {} ends", starts.len(), ends.len()));
    }
    let mut ranges = Vec::with_capacity(starts.len());
    for (s, e) in starts.iter().zip(&ends) {
        let s: u64 = s.trim().parse().map_err(|_| format!("start {s:?}"))?;
        let e: u64 = e.trim().parse().map_err(|_| format!("end {e:?}"))?;
        if e < s {
            return Err(format!("range {s}-{e} ends before it starts"));
        }
        ranges.push(s..e + 1);
    }
    ranges.sort_by_key(|r| r.start);
    let mut merged: Vec<Range<u64>> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match merged.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => merged.push(r),
        }
    }
    Ok(merged)
}

/// Zero gaps up to this long between data pages of one block are written with the data rather
/// than skipped. Each Put Page is a round trip the service serializes per blob; an ext4 disk of
/// 1 GiB holds ~5,000 runs of data pages in 4 MiB blocks, but only ~170 once gaps of 16 KiB or
/// less are bridged, at the price of ~1% more bytes (measured on `drvault bench`'s image). A
/// written zero page reads as zero like an unwritten one, so the disk is the same.
pub const MAX_ZERO_GAP: usize = 16 * 1024;

/// The runs of 512-byte pages of `data` to put, as (offset in `data`, length): every page that is
/// not all zeros, joined across zero gaps of at most [`MAX_ZERO_GAP`], each run at most
/// [`MAX_PUT_PAGE`] bytes and beginning and ending with a data page; a short last page counts
/// whole (the caller pads it).
pub fn data_runs(data: &[u8]) -> Vec<(usize, usize)> {
    let page = PAGE as usize;
    let mut runs: Vec<(usize, usize)> = Vec::new();
    let mut current: Option<(usize, usize)> = None;
    for (n, chunk) in data.chunks(page).enumerate() {
        if crate::chunk::digest::is_zero(chunk) {
            continue;
        }
        let at = n * page;
        current = match current {
            // `len` ends at the last data page, so `at - (start + len)` is the zero gap.
            Some((start, len))
                if at - (start + len) <= MAX_ZERO_GAP && at + page - start <= MAX_PUT_PAGE =>
            {
                Some((start, at + page - start))
            }
            Some(r) => {
                runs.push(r);
                Some((at, page))
            }
            None => Some((at, page)),
        };
    }
    runs.extend(current);
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_runs_skip_zero_pages_bridge_short_gaps_and_split_at_the_put_page_limit() {
        let mut d = vec![0u8; 10 * 1024 * 1024];
        d[0] = 1; // page 0
        d[1024 + 511] = 2; // page 2: a one-page gap after page 0, bridged
        d[1536] = 3; // page 3
        let far = 1536 + 512 + MAX_ZERO_GAP; // exactly the longest gap bridged
        d[far] = 4;
        let alone = 64 * 1024; // a gap one page longer than that: a new run
        d[alone] = 5;
        for b in &mut d[2 * 1024 * 1024..7 * 1024 * 1024] {
            *b = 9;
        }
        let runs = data_runs(&d);
        assert_eq!(
            runs,
            vec![
                (0, far + 512),
                (alone, 512),
                (2 * 1024 * 1024, MAX_PUT_PAGE),
                (6 * 1024 * 1024, 1024 * 1024)
            ]
        );
        let mut e = vec![0u8; 2 * MAX_ZERO_GAP];
        e[0] = 1;
        e[MAX_ZERO_GAP + 1024] = 1; // gap MAX_ZERO_GAP + 512: not bridged
        assert_eq!(data_runs(&e), vec![(0, 512), (MAX_ZERO_GAP + 1024, 512)]);
        // A short tail page with data counts whole.
        let tail = [0u8, 0, 7];
        assert_eq!(data_runs(&tail), vec![(0, 512)]);
        assert!(data_runs(&[0u8; 4096]).is_empty());
    }

    #[test]
    fn page_lists_parse_sorted_and_merged() {
        let xml = "<?xml version=\"1.0\"?><PageList><PageRange><Start>1024</Start><End>2047</End></PageRange><PageRange><Start>0</Start><End>511</End></PageRange><PageRange><Start>2048</Start><End>4095</End></PageRange></PageList>";
        assert_eq!(parse_page_list(xml).unwrap(), vec![0..512, 1024..4096]);
        assert_eq!(parse_page_list("<PageList />").unwrap(), vec![]);
        assert!(parse_page_list("<PageRange><Start>9</Start><End>1</End></PageRange>").is_err());
        assert!(parse_page_list("<PageRange><Start>x</Start><End>1</End></PageRange>").is_err());
    }

    #[test]
    fn target_urls_name_container_and_prefix() {
        let opts = vec![("azure_storage_use_emulator".to_string(), "true".to_string())];
        let t = AzureTarget::open("az://dr-target/site-a/", &opts).unwrap();
        assert_eq!(t.url(), "az://dr-target/site-a");
        let b = t.blob_name(&["drills", "web01", "f1", "os.vhd"]);
        assert_eq!(b, "site-a/drills/web01/f1/os.vhd");
        assert_eq!(t.blob_of_url(&t.blob_url(&b)), Some(b.as_str()));
        let t = AzureTarget::open("azure://dr-target", &opts).unwrap();
        assert_eq!(t.blob_name(&["x.vhd"]), "x.vhd");
        for bad in [
            "s3://b",
            "az://Bad_Name",
            "az://ok-name/a/../b",
            "az://ok-name/a?b",
        ] {
            assert!(AzureTarget::open(bad, &opts).is_err(), "{bad}");
        }
    }

    #[test]
    fn xml_values_decode_entities() {
        assert_eq!(
            xml_values("<Name>a&amp;b</Name><Name>c&lt;</Name>", "Name"),
            vec!["a&b".to_string(), "c<".to_string()]
        );
    }
}
