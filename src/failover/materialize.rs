//! Step 2 of a failover: materializing the disks. Each disk at the chosen point becomes a
//! fixed VHD in the failover's folder (in parallel, every block verified as read, zero blocks
//! left as holes, fsynced), or with an Azure storage target a page-blob fixed VHD (only the
//! pages holding data written, the footer last and read back; see [`super::azure_target`]),
//! read only through the point reader. Each disk reports its progress (data bytes written of
//! its total, MB/s) in the job as it goes.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use futures_util::StreamExt;

use super::azure_target::{self, AzureTarget, AzureTargetError};
use super::definition::{DiskDefinition, Firmware};
use super::output::{output_error, AlignedBuf, DiskOutput};
use super::service::Failovers;
use crate::chunk::digest::is_zero;
use crate::error::{Error, Result};
use crate::jobs::JobState;
use crate::replica::point::ReadInto;
use crate::replica::points::PinnedReader;
use crate::wire::VmSpec;

const MIB: u64 = 1024 * 1024;

/// The disks a failover wrote: their definitions in boot order, and the files.
pub(super) struct Materialized {
    pub definitions: Vec<DiskDefinition>,
    pub files: Vec<String>,
}

impl Failovers {
    /// Step 2: every disk of `spec` (with its reader, in the same order) written into `dir`.
    pub(super) async fn materialize_disks(
        &self,
        spec: &VmSpec,
        readers: Vec<PinnedReader>,
        job: &str,
        dir: &Path,
        blob_folder: Option<&str>,
    ) -> Result<Materialized> {
        let firmware = Firmware::from_generation(spec.generation)?;
        std::fs::create_dir_all(dir)
            .map_err(|e| output_error(&e, format!("cannot create {}: {e}", dir.display())))?;
        let azure = match (&self.target, blob_folder) {
            (Some(t), Some(folder)) => {
                t.ensure_container().await?;
                Some((t.clone(), folder.to_string()))
            }
            _ => None,
        };
        let total_disks = spec.disks.len().max(1) as f64;
        let mut tasks = Vec::new();
        for (i, (d, reader)) in spec.disks.iter().zip(readers).enumerate() {
            let me = self.clone();
            let disk = d.id.clone();
            let file = format!("{}.vhd", d.id);
            // Where the disk goes: its page blob's az:// URL, or its file's path.
            let (path, blob) = match &azure {
                Some((t, folder)) => {
                    let blob = format!("{folder}/{file}");
                    (t.blob_url(&blob), Some((t.clone(), blob)))
                }
                None => (dir.join(&file).display().to_string(), None),
            };
            let job = job.to_string();
            let meter = DiskMeter::new(self.jobs.clone(), &job, &disk, &reader);
            tasks.push(tokio::spawn(async move {
                meter.report(false).await;
                let r = match blob {
                    Some((t, blob)) => me.materialize_blob(reader, &t, &blob, &meter).await,
                    None => me.materialize(reader, Path::new(&path), &meter).await,
                };
                if r.is_ok() {
                    meter.report(true).await;
                }
                if r.is_ok() {
                    let _ = me
                        .jobs
                        .step(
                            &job,
                            &format!("Materialize disk {disk}"),
                            JobState::Succeeded,
                        )
                        .await;
                }
                r.map(|(orig, virt)| (i, disk, path, orig, virt))
            }));
        }
        let mut disks = Vec::new();
        let mut tasks = std::collections::VecDeque::from(tasks);
        let mut n = 0;
        while let Some(t) = tasks.pop_front() {
            let r = t
                .await
                .map_err(|e| Error::internal(format!("materialize task: {e}")))
                .and_then(|r| r);
            let r = match r {
                Ok(r) => r,
                Err(e) => {
                    // The other disks stop before the caller removes what was written, so none
                    // of them writes (or creates a blob) after that.
                    for t in &tasks {
                        t.abort();
                    }
                    for t in tasks {
                        let _ = t.await;
                    }
                    return Err(e);
                }
            };
            n += 1;
            self.jobs
                .set_progress(job, 0.1 + 0.8 * n as f64 / total_disks)
                .await;
            disks.push(r);
        }
        disks.sort_by_key(|d| d.0);
        Ok(Materialized {
            definitions: disks
                .iter()
                .map(|(i, id, path, orig, virt)| {
                    DiskDefinition::new(firmware, *i, id, path, *orig, *virt)
                })
                .collect(),
            files: disks.iter().map(|d| d.2.clone()).collect(),
        })
    }

    /// Writes one disk at a point as a page-blob fixed VHD: the blob created at the full size
    /// (whole MiB + footer, reading as zeros), only the 512-byte pages holding data put, the
    /// footer last, then read back and parsed. Returns (original, virtual) size. On error the
    /// caller deletes the failover's blobs.
    async fn materialize_blob(
        &self,
        reader: PinnedReader,
        target: &AzureTarget,
        blob: &str,
        meter: &DiskMeter,
    ) -> Result<(u64, u64)> {
        let blocks = reader.data_blocks();
        let size = reader.size();
        let virt = size.div_ceil(MIB) * MIB;
        target.create_page_blob(blob, virt + 512).await?;
        let bs = reader.base().block_size() as u64;
        let mut writes = futures_util::stream::iter(blocks.into_iter().map(|(i, _)| {
            let reader = reader.clone();
            async move {
                let (data, _) = reader.read_block(i).await?;
                let len = data.len() as u64;
                // Pages of data only; the page blob reads every page never put as zeros.
                let runs = tokio::task::spawn_blocking({
                    let data = data.clone();
                    move || azure_target::data_runs(&data)
                })
                .await
                .map_err(|e| Error::internal(e.to_string()))?;
                for (at, n) in runs {
                    let end = (at + n).min(data.len());
                    let mut page = data.slice(at..end);
                    if page.len() < n {
                        // The disk's short last page: padded with the zeros it reads as.
                        let mut padded = page.to_vec();
                        padded.resize(n, 0);
                        page = padded.into();
                    }
                    target.put_pages(blob, i * bs + at as u64, page).await?;
                }
                meter.add(len).await;
                Ok::<(), Error>(())
            }
        }))
        .buffer_unordered(MATERIALIZE_IN_FLIGHT);
        while let Some(r) = writes.next().await {
            r?;
        }
        drop(writes);
        let mut uid = [0u8; 16];
        crate::util::fill_random(&mut uid);
        let footer = crate::format::vhd::fixed_footer(
            virt,
            uid,
            crate::format::vhd::vhd_timestamp(crate::util::unix_now()),
        )
        .map_err(|e| Error::internal(format!("VHD footer: {e}")))?;
        target
            .put_pages(blob, virt, bytes::Bytes::copy_from_slice(&footer))
            .await?;
        let back = target.read_range(blob, virt, 512).await?;
        let mismatch = |reason: String| AzureTargetError::FooterMismatch {
            blob: blob.to_string(),
            reason,
        };
        if back[..] != footer[..] {
            return Err(mismatch("the bytes differ".into()).into());
        }
        let raw: [u8; 512] = back[..]
            .try_into()
            .map_err(|_| mismatch(format!("{} bytes read back", back.len())))?;
        let parsed =
            crate::format::vhd::Footer::parse(&raw).map_err(|e| mismatch(e.to_string()))?;
        if parsed.current_size != virt {
            return Err(mismatch(format!("size {} instead of {virt}", parsed.current_size)).into());
        }
        Ok((size, virt))
    }

    /// Writes one disk at a point as a fixed VHD: size rounded up to whole MiB (Azure's rule),
    /// zero blocks left as holes, every block verified, fsynced. Returns (original, virtual) size.
    async fn materialize(
        &self,
        reader: PinnedReader,
        path: &Path,
        meter: &DiskMeter,
    ) -> Result<(u64, u64)> {
        let blocks = reader.data_blocks();
        let size = reader.size();
        let virt = size.div_ceil(MIB) * MIB;
        let out = DiskOutput::create(path, virt + 512)
            .map_err(|e| output_error(&e, format!("creating {}: {e}", path.display())))?;
        let out = Arc::new(out);
        let bs = reader.base().block_size() as u64;
        // One aligned buffer per block in flight, reused: a fresh 4 MiB buffer per block costs
        // its page faults and zeroing every time.
        let buffers = Arc::new(std::sync::Mutex::new(Vec::<AlignedBuf>::new()));
        let mut writes = futures_util::stream::iter(blocks.into_iter().map(|(i, _)| {
            let (reader, out) = (reader.clone(), out.clone());
            let buffers = buffers.clone();
            async move {
                let write_err = |e: std::io::Error| output_error(&e, format!("writing disk: {e}"));
                let joined = |e: tokio::task::JoinError| Error::internal(e.to_string());
                let give_back = |buf: AlignedBuf| {
                    if let Ok(mut b) = buffers.lock() {
                        b.push(buf);
                    }
                };
                let buf = buffers
                    .lock()
                    .ok()
                    .and_then(|mut b| b.pop())
                    .unwrap_or_else(|| AlignedBuf::new(bs as usize));
                let at = buf.start();
                let written = match reader.read_block_into(i, buf.into_vec(), at).await? {
                    ReadInto::Filled { buf, len } => {
                        let buf = AlignedBuf::from_vec(buf);
                        let buf = tokio::task::spawn_blocking(move || {
                            out.write_at(buf.window(len), i * bs).map(|()| buf)
                        })
                        .await
                        .map_err(joined)?
                        .map_err(write_err)?;
                        give_back(buf);
                        len as u64
                    }
                    ReadInto::Copied { buf, data } => {
                        give_back(AlignedBuf::from_vec(buf));
                        let len = data.len() as u64;
                        // A block logs zeroed stays a hole (checked off the runtime: 4 MiB).
                        tokio::task::spawn_blocking(move || {
                            if is_zero(&data) {
                                return Ok(());
                            }
                            out.write_at(&data, i * bs)
                        })
                        .await
                        .map_err(joined)?
                        .map_err(write_err)?;
                        len
                    }
                };
                meter.add(written).await;
                Ok::<(), Error>(())
            }
        }))
        .buffer_unordered(MATERIALIZE_IN_FLIGHT);
        while let Some(r) = writes.next().await {
            r?;
        }
        let mut uid = [0u8; 16];
        crate::util::fill_random(&mut uid);
        let footer = crate::format::vhd::fixed_footer(
            virt,
            uid,
            crate::format::vhd::vhd_timestamp(crate::util::unix_now()),
        )
        .map_err(|e| Error::internal(format!("VHD footer: {e}")))?;
        drop(writes);
        tokio::task::spawn_blocking(move || out.finish(&footer, virt))
            .await
            .map_err(|e| Error::internal(e.to_string()))?
            .map_err(|e| output_error(&e, format!("finishing disk: {e}")))?;
        Ok((size, virt))
    }
}

/// Blocks read, verified and written at once per disk being materialized: enough to keep every
/// CPU thread decrypting and decompressing while other blocks are read from the store or
/// copied into the output file.
const MATERIALIZE_IN_FLIGHT: usize = 8;

/// One disk's progress in its job: data bytes written of the disk's data, and the rate.
pub(super) struct DiskMeter {
    jobs: crate::jobs::Jobs,
    job: String,
    disk: String,
    total: u64,
    written: AtomicU64,
    started: Instant,
}

impl DiskMeter {
    fn new(jobs: crate::jobs::Jobs, job: &str, disk: &str, reader: &PinnedReader) -> DiskMeter {
        let size = reader.size();
        let bs = reader.base().block_size() as u64;
        let total = reader
            .data_blocks()
            .iter()
            .map(|(i, _)| bs.min(size.saturating_sub(i * bs)))
            .sum();
        DiskMeter {
            jobs,
            job: job.to_string(),
            disk: disk.to_string(),
            total,
            written: AtomicU64::new(0),
            started: Instant::now(),
        }
    }

    async fn add(&self, bytes: u64) {
        self.written.fetch_add(bytes, Ordering::AcqRel);
        self.report(false).await;
    }

    async fn report(&self, done: bool) {
        let written = self.written.load(Ordering::Acquire);
        let secs = self.started.elapsed().as_secs_f64();
        let mb_s = if secs > 0.0 {
            written as f64 / 1e6 / secs
        } else {
            0.0
        };
        self.jobs
            .set_disk_progress(
                &self.job,
                crate::wire::DiskProgress {
                    disk: self.disk.clone(),
                    bytes_written: written,
                    bytes_total: self.total,
                    mb_s,
                    done,
                },
            )
            .await;
    }
}
