//! Same-run baselines: what the machine does with the same image without our server in the way.
//!
//! * [`pipeline`]: the server's own block pipeline in-process (read → zero check → hash →
//!   compress → seal → fsynced create-only put into a fresh `file://` store) with a 2-thread
//!   CPU pool and 4 blocks in flight so fsync waits overlap CPU work. It is the ceiling for
//!   ingest on this machine: the gap to it is HTTP, TLS, the agent and the session bookkeeping.
//! * [`cp`]: `cp` of the image (source in the page cache) followed by `sync FILE` (an fsync of
//!   the copy), because our store fsyncs every object and a page-cache-only copy would compare
//!   durable writes with memory copies.
//! * [`restic`]: `restic backup` of the image file into a fresh local repository of format 2
//!   (compressed, encrypted, deduplicated: the closest widely used peer).
//! * [`borg`]: `borg create --compression zstd,3` of the image file into a fresh encrypted
//!   (repokey) local repository, the second such peer. Its cache and keys live under the
//!   repository's directory too (`BORG_BASE_DIR`), so a run starts cold as restic's
//!   `--no-cache` does and leaves nothing in the user's home.
//!
//! Rates are the image's logical size per second; CPU is per logical GB. For `cp` and `restic`
//! the CPU comes from this process's children counters, read around the wait.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures_util::StreamExt;
use serde::Serialize;

use super::procstat::{cpu_ticks, CpuTicks};
use super::{io_err, BenchError};
use crate::chunk::digest::is_zero;
use crate::chunk::{ChunkStore, CpuPool, KeyRing};
use crate::file_formats::DEFAULT_BLOCK_SIZE;
use crate::format::image::DiskImage;
use crate::store::Store;

/// One baseline measurement.
#[derive(Debug, Clone, Serialize)]
pub struct Measured {
    pub seconds: f64,
    /// Logical image bytes per second, in MB/s (10^6).
    pub mb_s: f64,
    /// CPU seconds per logical GB (10^9 bytes).
    pub cpu_s_per_gb: Option<f64>,
    /// Bytes the baseline wrote (pipeline: sealed chunks).
    pub written_bytes: Option<u64>,
}

/// A baseline that may not be available on this machine.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum Outcome {
    Ok(Measured),
    /// The tool is not installed.
    Missing {
        note: String,
    },
    Failed {
        note: String,
    },
}

impl Outcome {
    pub fn measured(&self) -> Option<&Measured> {
        match self {
            Outcome::Ok(m) => Some(m),
            _ => None,
        }
    }
}

fn measured(logical: u64, seconds: f64, cpu_s: Option<f64>, written: Option<u64>) -> Measured {
    let secs = seconds.max(1e-9);
    Measured {
        seconds,
        mb_s: logical as f64 / secs / 1e6,
        cpu_s_per_gb: cpu_s.map(|c| c / (logical as f64 / 1e9).max(1e-12)),
        written_bytes: written,
    }
}

fn cpu_seconds(a: CpuTicks, b: CpuTicks, tck: u64, children: bool) -> f64 {
    let (x, y) = if children {
        (a.children, b.children)
    } else {
        (a.own, b.own)
    };
    y.saturating_sub(x) as f64 / tck.max(1) as f64
}

/// The in-process pipeline over `image` into a fresh store under `dir` (removed afterwards).
pub async fn pipeline(
    image: Arc<dyn DiskImage>,
    dir: &Path,
    tck: u64,
) -> Result<Measured, BenchError> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).map_err(io_err("creating", dir))?;
    let abs = std::path::absolute(dir).map_err(io_err("resolving", dir))?;
    let store = Store::open(&format!("file://{}", abs.display()), &[])?;
    let cs = ChunkStore::new(store, Arc::new(KeyRing::random()), CpuPool::new(2), 1);
    let size = image.virtual_size();
    let block = u64::from(DEFAULT_BLOCK_SIZE);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, BenchError>>(4);
    let cpu0 = cpu_ticks("self")?;
    let start = Instant::now();
    // The reader thread does what the agent's does: read every block, drop zero ones.
    let reader = tokio::task::spawn_blocking(move || {
        let mut offset = 0u64;
        while offset < size {
            let len = block.min(size - offset);
            let mut buf = vec![0u8; usize::try_from(len).unwrap_or(0)];
            let item = match image.read_at(&mut buf, offset) {
                Ok(()) if is_zero(&buf) => None,
                Ok(()) => Some(Ok(Bytes::from(buf))),
                Err(e) => Some(Err(BenchError::from(e))),
            };
            if let Some(it) = item {
                let failed = it.is_err();
                if tx.blocking_send(it).is_err() || failed {
                    return;
                }
            }
            offset += len;
        }
    });
    let blocks =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|x| (x, rx)) });
    let puts = blocks
        .map(|b| {
            let cs = cs.clone();
            async move { Ok::<_, BenchError>(cs.put_block(b?, None).await?) }
        })
        .buffer_unordered(4);
    let mut puts = std::pin::pin!(puts);
    let mut written = 0u64;
    while let Some(r) = puts.next().await {
        written += r?.stored_bytes;
    }
    reader
        .await
        .map_err(|e| BenchError::Invalid(format!("pipeline reader stopped: {e}")))?;
    let secs = start.elapsed().as_secs_f64();
    let cpu1 = cpu_ticks("self")?;
    let _ = std::fs::remove_dir_all(dir);
    Ok(measured(
        size,
        secs,
        Some(cpu_seconds(cpu0, cpu1, tck, false)),
        Some(written),
    ))
}

/// Runs a command to completion, timing it and reading the CPU it used from the children
/// counters. Callers must not have other children exiting meanwhile.
async fn timed(
    cmd: &mut tokio::process::Command,
    tool: &str,
    tck: u64,
) -> Result<(f64, f64), BenchError> {
    let c0 = cpu_ticks("self")?;
    let start = Instant::now();
    let out = cmd.output().await.map_err(|e| BenchError::Tool {
        tool: tool.into(),
        message: e.to_string(),
    })?;
    let secs = start.elapsed().as_secs_f64();
    let c1 = cpu_ticks("self")?;
    if !out.status.success() {
        return Err(BenchError::Tool {
            tool: tool.into(),
            message: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok((secs, cpu_seconds(c0, c1, tck, true)))
}

/// `cp IMAGE DIR/copy && sync DIR/copy`, the copy removed afterwards.
pub async fn cp(image: &Path, dir: &Path, tck: u64) -> Outcome {
    let run = async {
        std::fs::create_dir_all(dir).map_err(io_err("creating", dir))?;
        let dest = dir.join("cp-copy.img");
        let _ = std::fs::remove_file(&dest);
        let size = std::fs::metadata(image)
            .map_err(io_err("reading", image))?
            .len();
        let (s1, c1) = timed(
            tokio::process::Command::new("cp").arg(image).arg(&dest),
            "cp",
            tck,
        )
        .await?;
        let (s2, c2) = timed(tokio::process::Command::new("sync").arg(&dest), "sync", tck).await?;
        let _ = std::fs::remove_file(&dest);
        Ok::<_, BenchError>(measured(size, s1 + s2, Some(c1 + c2), Some(size)))
    };
    match run.await {
        Ok(m) => Outcome::Ok(m),
        Err(e) => Outcome::Failed {
            note: e.to_string(),
        },
    }
}

/// Whether `program args…` runs and exits 0: how a baseline finds out its tool is installed.
pub async fn runs(program: &str, args: &[&str]) -> bool {
    tokio::process::Command::new(program)
        .args(args)
        .output()
        .await
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Whether `restic` can be run.
pub async fn restic_present() -> bool {
    runs("restic", &["version"]).await
}

/// `restic backup IMAGE` into a fresh repository under `dir` (removed afterwards).
pub async fn restic(image: &Path, dir: &Path, tck: u64) -> Outcome {
    if !restic_present().await {
        return Outcome::Missing {
            note: "restic is not installed (apt-get install restic)".into(),
        };
    }
    let repo: PathBuf = dir.join("restic-repo");
    let run = async {
        let _ = std::fs::remove_dir_all(&repo);
        std::fs::create_dir_all(dir).map_err(io_err("creating", dir))?;
        let size = std::fs::metadata(image)
            .map_err(io_err("reading", image))?
            .len();
        let base = |args: &[&str]| {
            let mut c = tokio::process::Command::new("restic");
            c.env("RESTIC_PASSWORD", "drvault-bench")
                .arg("--repo")
                .arg(&repo)
                .arg("--no-cache")
                .arg("--quiet")
                .args(args);
            c
        };
        timed(
            &mut base(&["init", "--repository-version", "2"]),
            "restic init",
            tck,
        )
        .await?;
        let mut backup = base(&["backup"]);
        backup.arg(image);
        let (secs, cpu) = timed(&mut backup, "restic backup", tck).await?;
        let written = dir_size(&repo);
        let _ = std::fs::remove_dir_all(&repo);
        Ok::<_, BenchError>(measured(size, secs, Some(cpu), Some(written)))
    };
    match run.await {
        Ok(m) => Outcome::Ok(m),
        Err(e) => {
            let _ = std::fs::remove_dir_all(&repo);
            Outcome::Failed {
                note: e.to_string(),
            }
        }
    }
}

/// Whether `borg` can be run.
pub async fn borg_present() -> bool {
    runs("borg", &["--version"]).await
}

/// `borg create --compression zstd,3 REPO::bench IMAGE` into a fresh repokey-encrypted
/// repository under `dir` (removed afterwards); `borg init` is not timed.
pub async fn borg(image: &Path, dir: &Path, tck: u64) -> Outcome {
    if !borg_present().await {
        return Outcome::Missing {
            note: "borg is not installed (apt-get install borgbackup)".into(),
        };
    }
    let root: PathBuf = dir.join("borg");
    let repo = root.join("repo");
    let run = async {
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).map_err(io_err("creating", &root))?;
        let size = std::fs::metadata(image)
            .map_err(io_err("reading", image))?
            .len();
        let base = |args: &[&str]| {
            let mut c = tokio::process::Command::new("borg");
            c.env("BORG_PASSPHRASE", "drvault-bench")
                .env("BORG_DISPLAY_PASSPHRASE", "no")
                .env("BORG_BASE_DIR", root.join("base"))
                .stdin(std::process::Stdio::null())
                .args(args);
            c
        };
        let mut init = base(&["init", "--encryption", "repokey"]);
        init.arg(&repo);
        timed(&mut init, "borg init", tck).await?;
        let mut create = base(&["create", "--compression", "zstd,3"]);
        create.arg(format!("{}::bench", repo.display())).arg(image);
        let (secs, cpu) = timed(&mut create, "borg create", tck).await?;
        let written = dir_size(&repo);
        Ok::<_, BenchError>(measured(size, secs, Some(cpu), Some(written)))
    };
    let r = run.await;
    let _ = std::fs::remove_dir_all(&root);
    match r {
        Ok(m) => Outcome::Ok(m),
        Err(e) => Outcome::Failed {
            note: e.to_string(),
        },
    }
}

/// `qemu-img convert -f raw -O vpc -o subformat=fixed,force_size=on RAW DIR/qemu.vhd`, then
/// `sync` of the output: the materialization peer. Returns (convert alone, convert + sync):
/// qemu-img's convert does not flush by default, our failover fsyncs before it says done.
pub async fn qemu_img_vpc(raw: &Path, dir: &Path, tck: u64) -> (Outcome, Outcome) {
    if !runs("qemu-img", &["--version"]).await {
        let m = Outcome::Missing {
            note: "qemu-img is not installed (apt-get install qemu-utils)".into(),
        };
        return (m.clone(), m);
    }
    let out = dir.join("qemu.vhd");
    let run = async {
        std::fs::create_dir_all(dir).map_err(io_err("creating", dir))?;
        let _ = std::fs::remove_file(&out);
        let size = std::fs::metadata(raw)
            .map_err(io_err("reading", raw))?
            .len();
        let (s1, c1) = timed(
            tokio::process::Command::new("qemu-img")
                .args(["convert", "-f", "raw", "-O", "vpc", "-o"])
                .arg("subformat=fixed,force_size=on")
                .arg(raw)
                .arg(&out),
            "qemu-img convert",
            tck,
        )
        .await?;
        let (s2, c2) = timed(tokio::process::Command::new("sync").arg(&out), "sync", tck).await?;
        let written = std::fs::metadata(&out).map(|m| m.len()).ok();
        Ok::<_, BenchError>((
            measured(size, s1, Some(c1), written),
            measured(size, s1 + s2, Some(c1 + c2), written),
        ))
    };
    let r = run.await;
    let _ = std::fs::remove_file(&out);
    match r {
        Ok((a, b)) => (Outcome::Ok(a), Outcome::Ok(b)),
        Err(e) => {
            let f = Outcome::Failed {
                note: e.to_string(),
            };
            (f.clone(), f)
        }
    }
}

/// `rsync --no-whole-file --inplace --ignore-times --stats SRC DEST` (`--ignore-times`: the
/// two files may share size and modification second, which rsync would take as unchanged), then
/// `sync DEST`: the delta-transfer peer of resync. DEST must already hold the old content. Returns the outcome (over `size`
/// logical bytes) and rsync's "Total bytes sent".
pub async fn rsync(src: &Path, dest: &Path, size: u64, tck: u64) -> (Outcome, Option<u64>) {
    if !runs("rsync", &["--version"]).await {
        return (
            Outcome::Missing {
                note: "rsync is not installed (apt-get install rsync)".into(),
            },
            None,
        );
    }
    let run = async {
        let c0 = cpu_ticks("self")?;
        let start = Instant::now();
        let out = tokio::process::Command::new("rsync")
            .args(["--no-whole-file", "--inplace", "--ignore-times", "--stats"])
            .arg(src)
            .arg(dest)
            .output()
            .await
            .map_err(|e| BenchError::Tool {
                tool: "rsync".into(),
                message: e.to_string(),
            })?;
        if !out.status.success() {
            return Err(BenchError::Tool {
                tool: "rsync".into(),
                message: format!(
                    "{}: {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            });
        }
        let s1 = start.elapsed().as_secs_f64();
        let c1 = cpu_ticks("self")?;
        let (s2, c2) = timed(tokio::process::Command::new("sync").arg(dest), "sync", tck).await?;
        let sent = rsync_bytes_sent(&String::from_utf8_lossy(&out.stdout));
        Ok::<_, BenchError>((
            measured(
                size,
                s1 + s2,
                Some(cpu_seconds(c0, c1, tck, true) + c2),
                None,
            ),
            sent,
        ))
    };
    match run.await {
        Ok((m, sent)) => (Outcome::Ok(m), sent),
        Err(e) => (
            Outcome::Failed {
                note: e.to_string(),
            },
            None,
        ),
    }
}

/// "Total bytes sent: 1,234,567" from `rsync --stats` (thousands separators vary by version).
fn rsync_bytes_sent(stats: &str) -> Option<u64> {
    let line = stats
        .lines()
        .find_map(|l| l.trim().strip_prefix("Total bytes sent:"))?;
    let digits: String = line.chars().filter(|c| c.is_ascii_digit()).collect();
    digits.parse().ok()
}

/// Total size of the files under `dir` (0 where unreadable).
pub fn dir_size(dir: &Path) -> u64 {
    super::images::walk_files(dir).iter().map(|(_, l)| l).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rsync_stats_bytes_sent_with_or_without_separators() {
        let out =
            "Number of files: 1 (reg: 1)\nTotal bytes sent: 1,234,567\nTotal bytes received: 12\n";
        assert_eq!(rsync_bytes_sent(out), Some(1_234_567));
        assert_eq!(rsync_bytes_sent("Total bytes sent: 42\n"), Some(42));
        assert_eq!(rsync_bytes_sent("nothing here"), None);
    }

    #[test]
    fn rates_and_cpu_per_gb() {
        let m = measured(2_000_000_000, 4.0, Some(3.0), None);
        assert_eq!(m.mb_s, 500.0);
        assert_eq!(m.cpu_s_per_gb, Some(1.5));
        let a = CpuTicks {
            own: 100,
            children: 10,
        };
        let b = CpuTicks {
            own: 350,
            children: 60,
        };
        assert_eq!(cpu_seconds(a, b, 100, false), 2.5);
        assert_eq!(cpu_seconds(a, b, 100, true), 0.5);
        // A counter that went backwards (another process's numbers) never gives negative CPU.
        assert_eq!(cpu_seconds(b, a, 100, false), 0.0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pipeline_stores_data_blocks_only() {
        let dir = tempfile::tempdir().unwrap();
        // Two 4 MiB blocks: one compressible data block, one zero block.
        let mut data = vec![0u8; 8 << 20];
        for (i, b) in data.iter_mut().take(4 << 20).enumerate() {
            *b = (i % 7) as u8;
        }
        let img: Arc<dyn DiskImage> =
            Arc::from(crate::format::image::open_reader(Arc::new(data), None).unwrap());
        let m = pipeline(img, &dir.path().join("p"), 100).await.unwrap();
        let w = m.written_bytes.unwrap();
        assert!(w > 0 && w < 1 << 20, "one compressed block stored: {w}");
        assert!(!dir.path().join("p").exists(), "store removed afterwards");
    }

    #[tokio::test]
    async fn borg_backs_up_an_image_or_says_it_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("img.raw");
        let data: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 251) as u8).collect();
        std::fs::write(&image, &data).unwrap();
        let work = dir.path().join("w");
        match borg(&image, &work, 100).await {
            Outcome::Ok(m) => {
                // Compressed: far less than the 1 MiB image, and some bytes.
                let w = m.written_bytes.unwrap();
                assert!(w > 0 && w < 1 << 20, "{m:?}");
                assert!(m.mb_s > 0.0);
            }
            Outcome::Missing { note } => {
                assert!(!borg_present().await);
                assert!(note.contains("borgbackup"), "{note}");
            }
            Outcome::Failed { note } => panic!("borg failed: {note}"),
        }
        assert!(!work.join("borg").exists(), "repository removed afterwards");
    }

    #[tokio::test]
    async fn cp_of_a_missing_file_is_a_failure_not_a_figure() {
        let dir = tempfile::tempdir().unwrap();
        let o = cp(&dir.path().join("nope.img"), dir.path(), 100).await;
        assert!(matches!(o, Outcome::Failed { .. }));
    }
}
