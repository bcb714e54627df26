//! `drvault bench failover --azure-endpoint URL`: failover into page blobs on an Azure Blob
//! endpoint (Azurite on loopback, or a real account), next to the Azure SDK for Python
//! (`azure-storage-blob` from PyPI) uploading a fixed VHD of the same image in the same run.
//!
//! The baseline is what an operator without drvault would run: `qemu-img convert` makes the
//! fixed VHD (untimed, it is the input), then `BlobClient.upload_blob(blob_type="PageBlob",
//! max_concurrency=8)` uploads it. The SDK skips 4 MiB chunks that are all zeros and writes the
//! others whole; drvault writes the data pages of each block (short zero gaps bridged), eight
//! blocks in flight. Both blobs' written bytes come from Get Page Ranges.

use std::path::Path;
use std::time::Duration;

use super::baselines::{self, Measured, Outcome};
use super::procstat::cpu_ticks;
use super::{io_err, BenchError};
use crate::failover::azure_target::AzureTarget;

/// The Azure Storage emulator's documented development account and key (public, fixed).
pub const EMULATOR_ACCOUNT: &str = "devstoreaccount1";
pub const EMULATOR_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// Where the bench writes: the endpoint, its credentials and a container of its own.
#[derive(Debug, Clone)]
pub struct BlobTarget {
    pub endpoint: String,
    pub account: String,
    pub key: String,
    pub container: String,
}

impl BlobTarget {
    fn options(&self) -> Vec<(String, String)> {
        let mut o = vec![
            ("azure_storage_account_name", self.account.as_str()),
            ("azure_storage_account_key", self.key.as_str()),
            ("azure_storage_endpoint", self.endpoint.as_str()),
        ];
        if self.endpoint.starts_with("http://") {
            o.push(("azure_allow_http", "true"));
        }
        o.into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// The `[failover]` section of the spawned server's config.
    pub fn server_config(&self) -> String {
        let mut s = format!(
            "[failover]\ntarget = \"az://{}/drvault\"\n\n[failover.target_options]\n",
            self.container
        );
        for (k, v) in self.options() {
            s.push_str(&format!("{k} = {}\n", toml_string(&v)));
        }
        s
    }

    /// Bytes of the blob at `url` (`az://container/blob`) that Get Page Ranges lists as written.
    pub async fn written_bytes(&self, url: &str) -> Result<u64, BenchError> {
        let t = AzureTarget::open(&format!("az://{}", self.container), &self.options())
            .map_err(|e| BenchError::Invalid(format!("azure target: {e}")))?;
        let blob = t
            .blob_of_url(url)
            .ok_or_else(|| BenchError::Server(format!("{url} is not in {}", self.container)))?;
        let ranges = t
            .page_ranges(blob)
            .await
            .map_err(|e| BenchError::Server(e.to_string()))?;
        Ok(ranges.iter().map(|r| r.end - r.start).sum())
    }
}

fn toml_string(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// The SDK upload: container creation (untimed), `upload_blob` as a page blob (timed by the
/// script around that one call), Get Page Ranges, delete. Prints one JSON line.
const SDK_UPLOAD: &str = r#"
import json, sys, time, warnings
from azure.core.exceptions import ResourceExistsError
from azure.storage.blob import BlobServiceClient
endpoint, account, key, container, name, path, conc = sys.argv[1:8]
scheme = "https" if endpoint.startswith("https") else "http"
svc = BlobServiceClient.from_connection_string(
    f"DefaultEndpointsProtocol={scheme};AccountName={account};AccountKey={key};BlobEndpoint={endpoint};")
try:
    svc.create_container(container)
except ResourceExistsError:
    pass
blob = svc.get_blob_client(container, name)
t0 = time.monotonic()
with open(path, "rb") as f:
    blob.upload_blob(f, blob_type="PageBlob", overwrite=True, max_concurrency=int(conc))
t1 = time.monotonic()
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    written = sum(r["end"] - r["start"] + 1 for r in blob.get_page_ranges()[0])
blob.delete_blob()
print(json.dumps({"seconds": t1 - t0, "written": written}))
"#;

/// Uploads a fixed VHD of `raw` with the Azure SDK for Python, 8 requests in flight. Returns
/// the outcome over `raw`'s size and the bytes the blob's page ranges hold.
pub async fn sdk_upload(
    raw: &Path,
    dir: &Path,
    target: &BlobTarget,
    tck: u64,
) -> (Outcome, Option<u64>) {
    if !baselines::runs("python3", &["-c", "import azure.storage.blob"]).await {
        return (
            Outcome::Missing {
                note: "azure-storage-blob is not installed (python3 -m pip install azure-storage-blob==12.23.1)".into(),
            },
            None,
        );
    }
    let vhd = dir.join("sdk.vhd");
    let run = async {
        std::fs::create_dir_all(dir).map_err(io_err("creating", dir))?;
        let size = std::fs::metadata(raw)
            .map_err(io_err("reading", raw))?
            .len();
        let convert = tokio::process::Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "vpc", "-o"])
            .arg("subformat=fixed,force_size=on")
            .arg(raw)
            .arg(&vhd)
            .output()
            .await
            .map_err(|e| tool("qemu-img", e.to_string()))?;
        if !convert.status.success() {
            return Err(tool(
                "qemu-img",
                String::from_utf8_lossy(&convert.stderr).trim().to_string(),
            ));
        }
        let c0 = cpu_ticks("self")?;
        let out = tokio::process::Command::new("python3")
            .arg("-c")
            .arg(SDK_UPLOAD)
            .args([
                &target.endpoint,
                &target.account,
                &target.key,
                &target.container,
                "sdk-baseline.vhd",
            ])
            .arg(&vhd)
            .arg("8")
            .output()
            .await
            .map_err(|e| tool("python3", e.to_string()))?;
        let c1 = cpu_ticks("self")?;
        if !out.status.success() {
            return Err(tool(
                "azure-storage-blob",
                last_lines(&String::from_utf8_lossy(&out.stderr), 5),
            ));
        }
        let answer: serde_json::Value = serde_json::from_slice(&out.stdout)
            .map_err(|e| tool("azure-storage-blob", e.to_string()))?;
        let seconds = answer["seconds"]
            .as_f64()
            .ok_or_else(|| tool("azure-storage-blob", format!("no seconds in {answer}")))?;
        let written = answer["written"].as_u64();
        // The interpreter's start and the page-range listing are in the CPU figure too: it is
        // the whole child's, an upper bound.
        let cpu = c1.children.saturating_sub(c0.children) as f64 / tck as f64;
        let secs = seconds.max(1e-9);
        Ok::<_, BenchError>((
            Measured {
                seconds,
                mb_s: size as f64 / secs / 1e6,
                cpu_s_per_gb: Some(cpu / (size as f64 / 1e9).max(1e-12)),
                written_bytes: written,
            },
            written,
        ))
    };
    let r = tokio::time::timeout(Duration::from_secs(3600), run).await;
    let _ = std::fs::remove_file(&vhd);
    match r {
        Ok(Ok((m, w))) => (Outcome::Ok(m), w),
        Ok(Err(e)) => (
            Outcome::Failed {
                note: e.to_string(),
            },
            None,
        ),
        Err(_) => (
            Outcome::Failed {
                note: "the upload did not finish within an hour".into(),
            },
            None,
        ),
    }
}

fn tool(name: &str, message: String) -> BenchError {
    BenchError::Tool {
        tool: name.into(),
        message,
    }
}

fn last_lines(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.trim().lines().collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_config_names_the_container_and_quotes_the_options() {
        let t = BlobTarget {
            endpoint: "http://127.0.0.1:10000/devstoreaccount1".into(),
            account: EMULATOR_ACCOUNT.into(),
            key: EMULATOR_KEY.into(),
            container: "bench-7".into(),
        };
        let c: toml::Value = toml::from_str(&t.server_config()).unwrap();
        assert_eq!(
            c["failover"]["target"].as_str(),
            Some("az://bench-7/drvault")
        );
        let o = &c["failover"]["target_options"];
        assert_eq!(o["azure_allow_http"].as_str(), Some("true"));
        assert_eq!(o["azure_storage_account_key"].as_str(), Some(EMULATOR_KEY));
    }
}
