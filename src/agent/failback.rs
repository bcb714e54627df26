//! `drvault agent failback`: bring the on-premises disk at PATH up to date with the failed-over
//! VM's disk in the target (see `failover::failback` for the server's side).
//!
//! PATH is the original disk or an alternate location: a raw image or a fixed VHD (the formats
//! whose data can be written in place). With `--full` every block is downloaded and PATH may be
//! missing: it is created (a fixed VHD when the name ends in `.vhd` or `--format vhd` says so, a
//! dynamic VHDX when it ends in `.vhdx` or `--format vhdx` says so, else raw). A new VHDX is
//! built under a temporary name (`.drvault-new`) with only the blocks that hold data allocated,
//! and renamed to PATH once complete; VHDX is never written in place. Otherwise only
//! blocks whose hash differs are compared by 4 KiB fine hashes and only differing ranges are
//! downloaded. A block is written only after the patched block's BLAKE3 equals the target's; a
//! mismatch fetches the whole block once, and fails if even that does not verify. A rerun after
//! an interruption compares again and downloads only what is still different.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::backoff::Backoff;
use super::sync::{Differing, Direction, SourceBlock, SyncCounts, SyncParams};
use super::AgentError;
use crate::chunk::PlainHash;
use crate::client::{Client, SyncFlow};
use crate::format::image::{ImageFormat, SourceFormat};
use crate::replica::patch;
use crate::wire::{DigestRequest, RangeRequest};

pub struct FailbackOptions {
    pub vm: String,
    pub disk: String,
    /// Download every block (the on-premises disk is lost or untrusted).
    pub full: bool,
    pub backoff: Backoff,
    pub progress: bool,
    /// What PATH is read and created as.
    pub format: SourceFormat,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FailbackSummary {
    pub vm: String,
    pub disk: String,
    pub failover: String,
    pub size: u64,
    pub created: bool,
    pub blocks_compared: u64,
    pub blocks_differing: u64,
    pub blocks_written: u64,
    /// Disk bytes downloaded (differing ranges, or whole blocks with --full).
    pub bytes_downloaded: u64,
    pub hash_bytes_downloaded: u64,
    pub seconds: f64,
}

/// Where a failback writes blocks: the disk file in place, or a new VHDX being built.
enum Target {
    File(File),
    Vhdx {
        writer: crate::format::vhdx::VhdxWriter,
        /// The temporary name it is built under; renamed to PATH when finished.
        tmp: std::path::PathBuf,
    },
}

impl Target {
    fn write_at(&self, data: &[u8], offset: u64) -> std::io::Result<()> {
        match self {
            Target::File(f) => f.write_all_at(data, offset),
            Target::Vhdx { writer, .. } => {
                writer.write_at(data, offset).map_err(std::io::Error::other)
            }
        }
    }

    /// Makes the written data durable (and a new VHDX complete, under its final name).
    fn finish(self, path: &Path) -> Result<(), AgentError> {
        let err = |m: String| AgentError::Disk {
            path: path.display().to_string(),
            message: m,
        };
        match self {
            Target::File(f) => f.sync_all().map_err(|e| err(format!("flushing: {e}"))),
            Target::Vhdx { writer, tmp } => {
                writer
                    .finish()
                    .map_err(|e| err(format!("finishing the VHDX: {e}")))?;
                std::fs::rename(&tmp, path).map_err(|e| err(format!("renaming into place: {e}")))
            }
        }
    }
}

/// The local disk of a failback into a new VHDX: nothing yet, every block reads as zeros.
struct Empty(u64);

impl crate::format::image::DiskImage for Empty {
    fn format(&self) -> ImageFormat {
        ImageFormat::VhdxDynamic
    }
    fn virtual_size(&self) -> u64 {
        self.0
    }
    fn read_at(
        &self,
        buf: &mut [u8],
        _offset: u64,
    ) -> Result<(), crate::format::image::ImageError> {
        buf.fill(0);
        Ok(())
    }
    fn allocated_ranges(
        &self,
    ) -> Result<Vec<std::ops::Range<u64>>, crate::format::image::ImageError> {
        Ok(Vec::new())
    }
}

/// Opens (or with `full`, creates) PATH for in-place writes; returns the target and whether it
/// was created.
fn open_target(
    path: &Path,
    size: u64,
    block_size: u32,
    full: bool,
    format: SourceFormat,
) -> Result<(Target, bool), AgentError> {
    let err = |m: String| AgentError::Disk {
        path: path.display().to_string(),
        message: m,
    };
    let format = format.for_path(path);
    if !path.exists() {
        if !full {
            let what = if format == SourceFormat::Vhdx {
                "VHDX"
            } else {
                "file"
            };
            return Err(err(format!(
                "does not exist: give --full to download the whole disk to a new {what}"
            )));
        }
        // Built under a temporary name, then renamed: an agent killed here leaves either
        // nothing at PATH or a whole, well-formed disk that a rerun fills.
        let tmp = path.with_extension("drvault-new");
        let _ = std::fs::remove_file(&tmp);
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| err(format!("creating: {e}")))?;
        if format == SourceFormat::Vhdx {
            let writer = crate::format::vhdx::VhdxWriter::new(
                f,
                size,
                crate::format::vhdx::write::block_size_for(block_size),
            )
            .map_err(|e| err(e.to_string()))?;
            return Ok((Target::Vhdx { writer, tmp }, true));
        }
        f.set_len(size).map_err(|e| err(format!("sizing: {e}")))?;
        if format == SourceFormat::Vhd {
            let footer = crate::format::vhd::fixed_footer(
                size,
                *uuid::Uuid::new_v4().as_bytes(),
                crate::format::vhd::vhd_timestamp(crate::util::unix_now()),
            )
            .map_err(|e| err(format!("VHD footer: {e}")))?;
            f.write_all_at(&footer, size)
                .map_err(|e| err(format!("writing the VHD footer: {e}")))?;
        }
        f.sync_all().map_err(|e| err(format!("syncing: {e}")))?;
        std::fs::rename(&tmp, path).map_err(|e| err(format!("renaming into place: {e}")))?;
        return Ok((Target::File(f), true));
    }
    let image = crate::format::image::open_as(path, format)?;
    if !matches!(image.format(), ImageFormat::Raw | ImageFormat::VhdFixed) {
        return Err(err(format!(
            "is a {:?} image: failback writes raw images and fixed VHDs in place; convert it (qemu-img convert -O raw) or fail back to a new file with --full (a new .vhdx name gives a dynamic VHDX)",
            image.format()
        )));
    }
    if image.virtual_size() != size {
        return Err(err(format!(
            "holds {} bytes, the failed-over disk {size}",
            image.virtual_size()
        )));
    }
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| err(format!("opening for writing: {e}")))?;
    Ok((Target::File(f), false))
}

pub async fn failback(
    client: &Client,
    path: &Path,
    opts: &FailbackOptions,
) -> Result<FailbackSummary, AgentError> {
    let t0 = Instant::now();
    let view = opts
        .backoff
        .retry("failback", || client.failback_view(&opts.vm, &opts.disk))
        .await?;
    let (target, created) = open_target(path, view.size, view.block_size, opts.full, opts.format)?;
    let mut summary = FailbackSummary {
        vm: opts.vm.clone(),
        disk: opts.disk.clone(),
        failover: view.failover.clone(),
        size: view.size,
        created,
        ..Default::default()
    };
    // The local disk is read through the same image reader (raw or fixed VHD data region).
    let image: Arc<dyn crate::format::image::DiskImage> = match &target {
        Target::Vhdx { .. } => Arc::new(Empty(view.size)),
        Target::File(_) => Arc::from(crate::format::image::open_as(path, opts.format)?),
    };
    let params = SyncParams {
        client,
        backoff: &opts.backoff,
        flow: SyncFlow::Failback,
        vm: &opts.vm,
        disk: &opts.disk,
        size: view.size,
        block_size: view.block_size,
        blocks: view.blocks,
        fine: !opts.full,
        every_block: opts.full,
        overlap: 1,
        progress: opts.progress,
        label: "failback",
    };
    let download = Download {
        client,
        opts,
        file: &target,
        path,
        block_size: view.block_size,
    };
    let outcome = super::sync::run(&params, image, &download).await?;
    let n = outcome.counts;
    summary.blocks_compared = n.compared;
    summary.blocks_differing = n.differing;
    summary.blocks_written = n.moved;
    summary.bytes_downloaded = n.bytes;
    summary.hash_bytes_downloaded = n.hash_bytes;
    target.finish(path)?;
    // Now the local disk equals the target, block by block (each write was verified).
    let req = DigestRequest {
        digest: crate::replica::sync::digest_of(&outcome.theirs).to_hex(),
    };
    opts.backoff
        .retry("complete failback", || {
            client.failback_complete(&opts.vm, &opts.disk, &req)
        })
        .await?;
    summary.seconds = t0.elapsed().as_secs_f64();
    Ok(summary)
}

fn write_block(
    file: &Target,
    path: &Path,
    index: u64,
    block_size: u32,
    data: &[u8],
) -> Result<(), AgentError> {
    file.write_at(data, index * block_size as u64)
        .map_err(|e| AgentError::Disk {
            path: path.display().to_string(),
            message: format!("writing block {index}: {e}"),
        })
}

/// A failback's direction: each differing block is patched in place from the target's ranges
/// whose fine hashes differ (whole blocks with `--full`), verified against the target's block
/// hash before it is written.
struct Download<'a> {
    client: &'a Client,
    opts: &'a FailbackOptions,
    file: &'a Target,
    path: &'a Path,
    block_size: u32,
}

impl Direction for Download<'_> {
    fn differs(
        &self,
        b: &SourceBlock,
        theirs: &PlainHash,
        counts: &mut SyncCounts,
    ) -> Result<bool, AgentError> {
        if !theirs.ct_eq(&PlainHash::of(&vec![0u8; b.data.len()])) {
            return Ok(true);
        }
        // The target block is all zeros: nothing to download.
        if !b.data.iter().all(|&x| x == 0) {
            write_block(
                self.file,
                self.path,
                b.index,
                self.block_size,
                &vec![0u8; b.data.len()],
            )?;
            counts.moved += 1;
        }
        Ok(false)
    }

    async fn batch(&self, blocks: Vec<Differing>) -> Result<SyncCounts, AgentError> {
        let mut counts = SyncCounts::default();
        for d in blocks {
            let (mut b, want) = (d.block, d.theirs);
            let len = b.data.len();
            // Ranges where the target differs from the local block (whole block with --full).
            let ranges = if self.opts.full {
                vec![(0u32, len as u32)]
            } else {
                patch::differing_ranges(&b.data, &d.fine)
            };
            let mut ok = false;
            for attempt in [ranges, vec![(0u32, len as u32)]] {
                let req = RangeRequest {
                    block: b.index,
                    ranges: attempt.clone(),
                };
                let bytes = self
                    .opts
                    .backoff
                    .retry("download ranges", || {
                        self.client
                            .failback_ranges(&self.opts.vm, &self.opts.disk, &req)
                    })
                    .await?;
                counts.bytes += bytes.len() as u64;
                let mut pos = 0usize;
                for &(off, l) in &attempt {
                    let src = bytes.get(pos..pos + l as usize).ok_or_else(|| {
                        AgentError::Invalid(format!("short range download for block {}", b.index))
                    })?;
                    b.data[off as usize..off as usize + l as usize].copy_from_slice(src);
                    pos += l as usize;
                }
                if PlainHash::of(&b.data).ct_eq(&want) {
                    ok = true;
                    break;
                }
            }
            if !ok {
                return Err(AgentError::Invalid(format!(
                    "block {} does not match the target's hash even when downloaded whole: the target is changing (is the failed-over VM still running?)",
                    b.index
                )));
            }
            write_block(self.file, self.path, b.index, self.block_size, &b.data)?;
            counts.moved += 1;
        }
        Ok(counts)
    }
}
