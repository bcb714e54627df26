//! `drvault export`: a disk of a VM at a recovery point (the newest unless one is named) written to a local
//! fixed VHD, dynamic VHDX or raw file through the API, every block checked against its hash.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use futures_util::StreamExt;

use super::{BlockDownload, Client};
use crate::chunk::PlainHash;

/// What `drvault export` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportFormat {
    Raw,
    /// Fixed VHD: the raw bytes and a footer.
    Vhd,
    /// Dynamic VHDX (what a Hyper-V host takes back): only blocks holding data are allocated.
    Vhdx,
}

impl ExportFormat {
    pub fn parse(name: &str) -> Option<ExportFormat> {
        match name {
            "raw" => Some(ExportFormat::Raw),
            "vhd" => Some(ExportFormat::Vhd),
            "vhdx" => Some(ExportFormat::Vhdx),
            _ => None,
        }
    }
}

/// Writes a disk of a VM as a fixed VHD or raw file; see [`export_as`].
#[allow(clippy::too_many_arguments)] // one per `drvault export` flag
pub async fn export(
    client: &Client,
    vm: &str,
    disk: &str,
    point: Option<&str>,
    vhd: bool,
    out: &Path,
    parallel: usize,
    progress: bool,
) -> Result<(u64, u64)> {
    let format = if vhd {
        ExportFormat::Vhd
    } else {
        ExportFormat::Raw
    };
    export_as(client, vm, disk, point, format, out, parallel, progress).await
}

/// Where export writes block data: the plain file (raw and fixed VHD) or a VHDX being built.
enum Sink {
    File(Arc<std::fs::File>),
    Vhdx(Arc<crate::format::vhdx::VhdxWriter>),
}

impl Sink {
    fn write_at(&self, data: &[u8], offset: u64) -> std::io::Result<()> {
        match self {
            Sink::File(f) => f.write_all_at(data, offset),
            Sink::Vhdx(w) => w.write_at(data, offset).map_err(std::io::Error::other),
        }
    }
}

/// Writes a disk of a VM as a fixed VHD, a dynamic VHDX or a raw file, fetching data blocks in
/// parallel, checking each block's hash, leaving zero blocks as holes (VHDX: not allocated).
/// Returns (bytes written, data blocks).
#[allow(clippy::too_many_arguments)] // one per `drvault export` flag
pub async fn export_as(
    client: &Client,
    vm: &str,
    disk: &str,
    point: Option<&str>,
    format: ExportFormat,
    out: &Path,
    parallel: usize,
    progress: bool,
) -> Result<(u64, u64)> {
    let map = client.map(vm, disk, point).await?;
    // Blocks are read at the point the map resolved to (`latest` or no point at all names
    // whatever is newest when asked): a log accepted meanwhile must not mix two points.
    let point = map.point.as_deref().or(point);
    // Errors name the file the operator asked for, not the temporary one it is built under.
    let writing = || format!("writing {}", out.display());
    let tmp = out.with_extension("partial");
    let file = std::fs::File::create(&tmp).with_context(writing)?;
    let sink = match format {
        ExportFormat::Vhdx => crate::format::vhdx::VhdxWriter::new(
            file,
            map.size,
            crate::format::vhdx::write::block_size_for(map.block_size),
        )
        .map(|w| Sink::Vhdx(Arc::new(w)))
        .map_err(anyhow::Error::from),
        _ => file
            .set_len(map.size)
            .map(|()| Sink::File(Arc::new(file)))
            .map_err(anyhow::Error::from),
    };
    let sink = match sink {
        Ok(s) => Arc::new(s),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e).with_context(writing);
        }
    };
    let bar = crate::progress::progress_bar(
        progress,
        map.data.len() as u64 * map.block_size as u64,
        disk,
    );
    let mut fetches = futures_util::stream::iter(map.data.iter().map(|(index, hash)| {
        let sink = sink.clone();
        let (index, hash) = (*index, hash.clone());
        let offset = index * map.block_size as u64;
        async move {
            let BlockDownload { bytes, blake3 } = client.block(vm, disk, index, point).await?;
            // The block's header carries the hash the server computed from verified sources;
            // the map carries it too except for blocks that logs write at a recovery point.
            let header = blake3.as_deref().and_then(PlainHash::from_hex);
            let got = PlainHash::of(&bytes);
            let from_map = if hash.is_empty() { None } else { Some(PlainHash::from_hex(&hash).ok_or_else(|| anyhow!("server sent a malformed hash for block {index}"))?) };
            let ok = header.map(|h| h.ct_eq(&got)).unwrap_or(false) && from_map.map(|m| m.ct_eq(&got)).unwrap_or(true);
            if !ok {
                bail!("block {index} of disk {disk} failed verification: content does not match its hash");
            }
            let n = bytes.len() as u64;
            tokio::task::spawn_blocking(move || sink.write_at(&bytes, offset)).await?.with_context(writing)?;
            Ok::<u64, anyhow::Error>(n)
        }
    }))
    .buffer_unordered(parallel.max(1));
    let mut written = 0u64;
    while let Some(r) = fetches.next().await {
        let n = match r {
            Ok(n) => n,
            Err(e) => {
                // Nothing half-written is left behind: a damaged block fails the whole export.
                drop(fetches);
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        written += n;
        bar.inc(n);
    }
    drop(fetches);
    bar.finish_and_clear();
    let finished = finish(sink, format, map.size);
    if let Err(e) = finished {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(writing);
    }
    std::fs::rename(&tmp, out).with_context(writing)?;
    Ok((written, map.data.len() as u64))
}

/// Completes the file once every block is in: the VHD footer, or the VHDX's structures; synced.
fn finish(sink: Arc<Sink>, format: ExportFormat, size: u64) -> Result<()> {
    let sink =
        Arc::try_unwrap(sink).map_err(|_| anyhow!("export: a block write is still running"))?;
    match sink {
        Sink::File(file) => {
            if format == ExportFormat::Vhd {
                let mut uid = [0u8; 16];
                crate::util::fill_random(&mut uid);
                let footer = crate::format::vhd::fixed_footer(
                    size,
                    uid,
                    crate::format::vhd::vhd_timestamp(crate::util::unix_now()),
                )
                .map_err(|e| anyhow!("VHD footer: {e}"))?;
                file.write_all_at(&footer, size)?;
            }
            file.sync_all()?;
        }
        Sink::Vhdx(w) => {
            let w = Arc::try_unwrap(w)
                .map_err(|_| anyhow!("export: a block write is still running"))?;
            w.finish()?;
        }
    }
    Ok(())
}
