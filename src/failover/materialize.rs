//! Step 2 of a failover: materializing the disks. Each disk at the chosen point becomes a
//! fixed VHD in the failover's folder (in parallel, every block verified as read, zero blocks
//! left as holes, fsynced), read only through the point reader.

use std::path::Path;
use std::sync::Arc;

use futures_util::StreamExt;

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
    ) -> Result<Materialized> {
        let firmware = Firmware::from_generation(spec.generation)?;
        std::fs::create_dir_all(dir)
            .map_err(|e| output_error(&e, format!("cannot create {}: {e}", dir.display())))?;
        let total_disks = spec.disks.len().max(1) as f64;
        let mut tasks = Vec::new();
        for (i, (d, reader)) in spec.disks.iter().zip(readers).enumerate() {
            let me = self.clone();
            let disk = d.id.clone();
            let path = dir.join(format!("{}.vhd", d.id));
            let job = job.to_string();
            tasks.push(tokio::spawn(async move {
                let r = me.materialize(reader, &path).await;
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
        for (n, t) in tasks.into_iter().enumerate() {
            let r = t
                .await
                .map_err(|e| Error::internal(format!("materialize task: {e}")))??;
            self.jobs
                .set_progress(job, 0.1 + 0.8 * (n + 1) as f64 / total_disks)
                .await;
            disks.push(r);
        }
        disks.sort_by_key(|d| d.0);
        Ok(Materialized {
            definitions: disks
                .iter()
                .map(|(i, id, path, orig, virt)| {
                    DiskDefinition::new(firmware, *i, id, &path.display().to_string(), *orig, *virt)
                })
                .collect(),
            files: disks.iter().map(|d| d.2.display().to_string()).collect(),
        })
    }

    /// Writes one disk at a point as a fixed VHD: size rounded up to whole MiB (Azure's rule),
    /// zero blocks left as holes, every block verified, fsynced. Returns (original, virtual) size.
    async fn materialize(&self, reader: PinnedReader, path: &Path) -> Result<(u64, u64)> {
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
                match reader.read_block_into(i, buf.into_vec(), at).await? {
                    ReadInto::Filled { buf, len } => {
                        let buf = AlignedBuf::from_vec(buf);
                        let buf = tokio::task::spawn_blocking(move || {
                            out.write_at(buf.window(len), i * bs).map(|()| buf)
                        })
                        .await
                        .map_err(joined)?
                        .map_err(write_err)?;
                        give_back(buf);
                    }
                    ReadInto::Copied { buf, data } => {
                        give_back(AlignedBuf::from_vec(buf));
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
                    }
                }
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
