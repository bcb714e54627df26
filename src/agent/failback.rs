//! `drvault agent failback`: bring the on-premises disk at PATH up to date with the failed-over
//! VM's disk in the target (see `failover::failback` for the server's side).
//!
//! PATH is the original disk or an alternate location: a raw image or a fixed VHD (the formats
//! whose data can be written in place). With `--full` every block is downloaded and PATH may be
//! missing: it is created (a fixed VHD when the name ends in `.vhd` or `--format vhd` says so,
//! else raw; a name ending in `.vhdx` needs `--format raw`). Otherwise only
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
use super::resync::{fetch_block_hashes, read_blocks, SourceBlock};
use super::AgentError;
use crate::chunk::PlainHash;
use crate::client::Client;
use crate::failover::failback::{FailbackDiskView, FailbackRecord, RangeRequest};
use crate::format::image::{ImageFormat, SourceFormat};
use crate::replica::blockmap::block_len;
use crate::replica::patch;
use crate::replica::resync::{DigestRequest, FineRequest, MAX_FINE_BLOCKS};

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

/// Opens (or with `full`, creates) PATH for in-place writes; returns the file and whether it
/// was created.
fn open_target(
    path: &Path,
    size: u64,
    full: bool,
    format: SourceFormat,
) -> Result<(File, bool), AgentError> {
    let err = |m: String| AgentError::Disk {
        path: path.display().to_string(),
        message: m,
    };
    let format = format.for_path(path);
    if !path.exists() {
        if format == SourceFormat::Vhdx {
            return Err(err(
                "failback writes raw disks and fixed VHDs, not VHDX: name the new file .vhd or .raw, or pass --format raw".into(),
            ));
        }
        if !full {
            return Err(err(
                "does not exist: give --full to download the whole disk to a new file".into(),
            ));
        }
        // Sized and footed under a temporary name, then renamed: an agent killed here leaves
        // either nothing at PATH or a whole, well-formed empty disk that a rerun fills.
        let tmp = path.with_extension("drvault-new");
        let _ = std::fs::remove_file(&tmp);
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| err(format!("creating: {e}")))?;
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
        return Ok((f, true));
    }
    let image = crate::format::image::open_as(path, format)?;
    if !matches!(image.format(), ImageFormat::Raw | ImageFormat::VhdFixed) {
        return Err(err(format!(
            "is a {:?} image: failback writes raw images and fixed VHDs in place; convert it (qemu-img convert -O raw) or fail back to a new file with --full",
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
    Ok((f, false))
}

pub async fn failback(
    client: &Client,
    path: &Path,
    opts: &FailbackOptions,
) -> Result<FailbackSummary, AgentError> {
    let t0 = Instant::now();
    let base = format!("/v1/agent/vms/{}/disks/{}/failback", opts.vm, opts.disk);
    let view: FailbackDiskView = opts
        .backoff
        .retry("failback", || client.get_json(&base))
        .await?;
    let (file, created) = open_target(path, view.size, opts.full, opts.format)?;
    let file = Arc::new(file);
    let mut summary = FailbackSummary {
        vm: opts.vm.clone(),
        disk: opts.disk.clone(),
        failover: view.failover.clone(),
        size: view.size,
        created,
        ..Default::default()
    };
    let theirs = fetch_block_hashes(client, &opts.backoff, &base, view.blocks).await?;
    summary.hash_bytes_downloaded += theirs.len() as u64 * 32;

    // The local disk is read through the same image reader (raw or fixed VHD data region).
    let image: Arc<dyn crate::format::image::DiskImage> =
        Arc::from(crate::format::image::open_as(path, opts.format)?);
    let bar = super::protect::progress_bar(opts.progress, view.size, "failback");
    let mut rx = read_blocks(image, view.block_size, 8);
    let mut batch: Vec<SourceBlock> = Vec::new();
    while let Some(b) = rx.recv().await {
        let b = b.map_err(AgentError::image)?;
        bar.inc(b.data.len() as u64);
        summary.blocks_compared += 1;
        let want = theirs
            .get(b.index as usize)
            .copied()
            .ok_or_else(|| AgentError::Invalid("block past the hashes".into()))?;
        if !opts.full && b.hash.ct_eq(&want) {
            continue;
        }
        summary.blocks_differing += 1;
        if want.ct_eq(&PlainHash::of(&vec![0u8; b.data.len()])) {
            // The target block is all zeros: nothing to download.
            if !b.data.iter().all(|&x| x == 0) {
                write_block(
                    &file,
                    path,
                    b.index,
                    view.block_size,
                    &vec![0u8; b.data.len()],
                )?;
                summary.blocks_written += 1;
            }
            continue;
        }
        batch.push(b);
        if batch.len() >= MAX_FINE_BLOCKS.min(16) {
            fetch_batch(
                client,
                &base,
                opts,
                &file,
                path,
                &view,
                &theirs,
                std::mem::take(&mut batch),
                &mut summary,
            )
            .await?;
        }
    }
    if !batch.is_empty() {
        fetch_batch(
            client,
            &base,
            opts,
            &file,
            path,
            &view,
            &theirs,
            batch,
            &mut summary,
        )
        .await?;
    }
    bar.finish_and_clear();
    file.sync_all().map_err(|e| AgentError::Disk {
        path: path.display().to_string(),
        message: format!("flushing: {e}"),
    })?;
    // Now the local disk equals the target, block by block (each write was verified).
    let req = DigestRequest {
        digest: crate::replica::resync::digest_of(&theirs).to_hex(),
    };
    let url_complete = format!("{base}/complete");
    let _: FailbackRecord = opts
        .backoff
        .retry("complete failback", || {
            client.send_json(reqwest::Method::POST, &url_complete, &req)
        })
        .await?;
    summary.seconds = t0.elapsed().as_secs_f64();
    Ok(summary)
}

fn write_block(
    file: &File,
    path: &Path,
    index: u64,
    block_size: u32,
    data: &[u8],
) -> Result<(), AgentError> {
    file.write_all_at(data, index * block_size as u64)
        .map_err(|e| AgentError::Disk {
            path: path.display().to_string(),
            message: format!("writing block {index}: {e}"),
        })
}

#[allow(clippy::too_many_arguments)]
async fn fetch_batch(
    client: &Client,
    base: &str,
    opts: &FailbackOptions,
    file: &File,
    path: &Path,
    view: &FailbackDiskView,
    theirs: &[PlainHash],
    batch: Vec<SourceBlock>,
    summary: &mut FailbackSummary,
) -> Result<(), AgentError> {
    let fine = if opts.full {
        bytes::Bytes::new()
    } else {
        let req = FineRequest {
            blocks: batch.iter().map(|b| b.index).collect(),
        };
        let url_fine = format!("{base}/fine");
        let f = opts
            .backoff
            .retry("fine hashes", || client.post_json_bytes(&url_fine, &req))
            .await?;
        summary.hash_bytes_downloaded += f.len() as u64;
        f
    };
    let url_ranges = format!("{base}/ranges");
    let mut at = 0usize;
    for mut b in batch {
        let len = block_len(view.size, view.block_size, b.index) as usize;
        let n = len.div_ceil(patch::FINE) * patch::FINE_HASH_LEN;
        let their_fine = fine.get(at..at + n).unwrap_or(&[]);
        at += n;
        // Ranges where the target differs from the local block (whole block with --full).
        let ranges = if opts.full {
            vec![(0u32, len as u32)]
        } else {
            patch::differing_ranges(&b.data, their_fine)
        };
        let want = theirs[b.index as usize];
        let mut ok = false;
        for attempt in [ranges, vec![(0u32, len as u32)]] {
            let req = RangeRequest {
                block: b.index,
                ranges: attempt.clone(),
            };
            let bytes = opts
                .backoff
                .retry("download ranges", || {
                    client.post_json_bytes(&url_ranges, &req)
                })
                .await?;
            summary.bytes_downloaded += bytes.len() as u64;
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
        write_block(file, path, b.index, view.block_size, &b.data)?;
        summary.blocks_written += 1;
    }
    Ok(())
}
