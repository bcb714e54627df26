//! `drvault hrl …`: make, read and apply real MS-HRL logs without a Hyper-V host.

use std::io::BufWriter;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use serde::Serialize;

use crate::format::hrl::{self, Guid, HrlWriter, HrlWriterParams};
use crate::format::image;

/// What `hrl diff` wrote.
#[derive(Debug, Serialize)]
pub struct DiffSummary {
    pub unique_id: String,
    pub previous_unique_id: String,
    pub extents: u64,
    pub data_bytes: u64,
    pub log_bytes: u64,
}

/// Writes a log of the 512-byte sectors where `new` differs from `old` (raw, VHD or VHDX),
/// adjacent sectors merged into one write (split at 1 MiB).
pub fn diff(
    old: &Path,
    new: &Path,
    out: &Path,
    previous: Guid,
    unique: Guid,
    data_write: Guid,
) -> Result<DiffSummary> {
    // Image errors name their file.
    let a = image::open(old)?;
    let b = image::open(new)?;
    if a.virtual_size() != b.virtual_size() {
        bail!(
            "{} is {} bytes and {} is {}: a change log is between two states of the same disk",
            old.display(),
            a.virtual_size(),
            new.display(),
            b.virtual_size()
        );
    }
    let size = b.virtual_size();
    let file = std::fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let params = HrlWriterParams {
        unique_id: unique,
        previous_unique_id: previous,
        vhd2_data_write_guid: data_write,
        timestamp: hrl::hrl_timestamp(std::time::SystemTime::now()),
        ..Default::default()
    };
    let mut w = HrlWriter::new(params, BufWriter::with_capacity(1 << 20, file))?;
    const CHUNK: usize = 1 << 20;
    const RUN_MAX: usize = 1 << 20;
    let (mut ba, mut bb) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
    let mut run: Option<(u64, Vec<u8>)> = None;
    let (mut extents, mut data_bytes) = (0u64, 0u64);
    let mut flush = |run: &mut Option<(u64, Vec<u8>)>,
                     w: &mut HrlWriter<BufWriter<std::fs::File>>|
     -> Result<()> {
        if let Some((off, data)) = run.take() {
            w.add_write(off, &data)?;
            extents += 1;
            data_bytes += data.len() as u64;
        }
        Ok(())
    };
    let mut pos = 0u64;
    while pos < size {
        let n = ((size - pos) as usize).min(CHUNK);
        a.read_at(&mut ba[..n], pos)?;
        b.read_at(&mut bb[..n], pos)?;
        for s in (0..n).step_by(512) {
            let e = (s + 512).min(n);
            if ba[s..e] != bb[s..e] {
                let off = pos + s as u64;
                match &mut run {
                    Some((start, data))
                        if *start + data.len() as u64 == off && data.len() < RUN_MAX =>
                    {
                        data.extend_from_slice(&bb[s..e])
                    }
                    _ => {
                        flush(&mut run, &mut w)?;
                        run = Some((off, bb[s..e].to_vec()));
                    }
                }
            }
        }
        pos += n as u64;
    }
    flush(&mut run, &mut w)?;
    let out_file = w
        .finish()?
        .into_inner()
        .map_err(|e| anyhow::anyhow!("writing {}: {}", out.display(), e.error()))?;
    out_file.sync_all()?;
    let log_bytes = out_file.metadata()?.len();
    Ok(DiffSummary {
        unique_id: unique.to_string(),
        previous_unique_id: previous.to_string(),
        extents,
        data_bytes,
        log_bytes,
    })
}

/// What a log that follows the log file at `previous` carries over from it: the previous
/// log's UniqueId (the new PreviousUniqueId) and its Vhd2DataWriteGuid (the same along a
/// chain). The previous log is validated whole: chaining from a damaged one would only be
/// refused by the server later.
pub fn chain_after(previous: &Path) -> Result<(Guid, Guid)> {
    let f = std::fs::File::open(previous).with_context(|| {
        format!(
            "--after {}: cannot open the previous log",
            previous.display()
        )
    })?;
    let log = hrl::read_log(&f, u64::MAX).with_context(|| {
        format!(
            "--after {}: not a valid MS-HRL log (give the .hrl file `hrl diff` wrote for the previous cycle)",
            previous.display()
        )
    })?;
    Ok((log.header.unique_id, log.header.vhd2_data_write_guid))
}

/// Validates a log and returns it (disk size bounds the extents when given).
pub fn inspect(path: &Path, disk_size: Option<u64>) -> Result<hrl::HrlLog> {
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    hrl::read_log(&f, disk_size.unwrap_or(u64::MAX))
        .with_context(|| format!("{} is not a valid MS-HRL log", path.display()))
}

/// Applies a log to a raw image in place.
pub fn apply(log_path: &Path, image_path: &Path) -> Result<(u64, u64)> {
    Ok(hrl::apply_to_raw(log_path, image_path)?)
}

/// Prints a log the way `hrl inspect` shows it.
pub fn print(log: &hrl::HrlLog, json: bool) -> Result<()> {
    let h = &log.header;
    if json {
        let v = serde_json::json!({
            "unique_id": h.unique_id.to_string(),
            "previous_unique_id": h.previous_unique_id.to_string(),
            "vhd2_data_write_guid": h.vhd2_data_write_guid.to_string(),
            "version": format!("{:#010x}", h.version),
            "timestamp": h.timestamp,
            "eol_location": h.eol_location,
            "metadata_size": h.metadata_size,
            "total_metadata_entries": h.total_metadata_entries,
            "current_size": h.current_size,
            "extents": log.extents.iter().map(|e| serde_json::json!({
                "disk_offset": e.disk_offset, "length": e.length, "log_offset": e.log_offset,
                "timestamp": e.timestamp, "data_checksum": e.data_checksum,
            })).collect::<Vec<_>>(),
        });
        super::print_json(&v)?;
        return Ok(());
    }
    println!("UniqueId              {}", h.unique_id);
    println!("PreviousUniqueId      {}", h.previous_unique_id);
    println!("Vhd2DataWriteGuid     {}", h.vhd2_data_write_guid);
    println!("LogFormatVersion      {:#010x}", h.version);
    println!("EOLLocation           {}", h.eol_location);
    println!("MetadataSize          {}", h.metadata_size);
    println!("TotalMetadataEntries  {}", h.total_metadata_entries);
    let total: u64 = log.extents.iter().map(|e| e.length as u64).sum();
    println!(
        "writes                {} ({} bytes)",
        log.extents.len(),
        total
    );
    println!(
        "{:>16} {:>10} {:>12}",
        "DISK OFFSET", "LENGTH", "LOG OFFSET"
    );
    for e in &log.extents {
        println!(
            "{:>16} {:>10} {:>12}",
            e.disk_offset, e.length, e.log_offset
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A raw image of 64 KiB with `fill` written at 4 KiB.
    fn image(dir: &Path, name: &str, fill: u8) -> std::path::PathBuf {
        let p = dir.join(name);
        let mut b = vec![0u8; 64 * 1024];
        if fill != 0 {
            b[4096..8192].fill(fill);
        }
        std::fs::write(&p, b).unwrap();
        p
    }

    #[test]
    fn a_log_made_after_the_previous_file_continues_its_chain() {
        let dir = tempfile::tempdir().unwrap();
        let (c0, c1, c2) = (
            image(dir.path(), "c0.raw", 0),
            image(dir.path(), "c1.raw", 1),
            image(dir.path(), "c2.raw", 2),
        );
        let dw: Guid = "11111111-2222-3333-4444-555555555555".parse().unwrap();
        let (l1, l2) = (dir.path().join("c1.hrl"), dir.path().join("c2.hrl"));
        let first = diff(&c0, &c1, &l1, Guid::NIL, Guid::new_random(), dw).unwrap();
        let (prev, kept) = chain_after(&l1).unwrap();
        assert_eq!(prev.to_string(), first.unique_id);
        assert_eq!(
            kept, dw,
            "the data-write GUID stays the same along the chain"
        );
        diff(&c1, &c2, &l2, prev, Guid::new_random(), kept).unwrap();
        let second = inspect(&l2, None).unwrap();
        assert_eq!(
            second.header.previous_unique_id.to_string(),
            first.unique_id
        );
        assert_eq!(second.header.vhd2_data_write_guid, dw);
        assert_eq!(second.extents.len(), 1);
    }

    #[test]
    fn a_missing_or_foreign_after_file_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("c1.hrl");
        let e = format!("{:#}", chain_after(&missing).unwrap_err());
        assert!(
            e.contains("--after") && e.contains("c1.hrl") && e.contains("cannot open"),
            "{e}"
        );
        let raw = image(dir.path(), "disk.raw", 1);
        let e = format!("{:#}", chain_after(&raw).unwrap_err());
        assert!(
            e.contains("disk.raw") && e.contains("not a valid MS-HRL log"),
            "{e}"
        );
    }
}

#[derive(Subcommand)]
pub(super) enum HrlCmd {
    /// Write a log of the sectors where NEW differs from OLD (raw, VHD or VHDX).
    Diff {
        old: PathBuf,
        new: PathBuf,
        #[arg(short = 'o', long)]
        output: PathBuf,
        /// UniqueId of the previous log of this disk (the chain); default all zeros, which
        /// only the first log after initial replication may use.
        #[arg(long)]
        previous_id: Option<String>,
        /// The previous log of this disk (its .hrl file): the new log follows it, taking its
        /// UniqueId as PreviousUniqueId and keeping its Vhd2DataWriteGuid. Use it for every
        /// log after the first, instead of --previous-id.
        #[arg(long, value_name = "PREVIOUS.hrl", conflicts_with_all = ["previous_id", "data_write_guid"])]
        after: Option<PathBuf>,
        /// UniqueId of this log; default random.
        #[arg(long)]
        unique_id: Option<String>,
        /// Vhd2DataWriteGuid of the disk (must stay the same along a chain); default all zeros.
        #[arg(long)]
        data_write_guid: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Validate a log and print its header and writes.
    Inspect {
        file: PathBuf,
        /// Check writes against this disk size.
        #[arg(long)]
        disk_size: Option<u64>,
        #[arg(long)]
        json: bool,
    },
    /// Apply a log to a raw image in place.
    Apply { file: PathBuf, image: PathBuf },
}

fn guid_arg(
    s: Option<String>,
    default: crate::format::hrl::Guid,
) -> Result<crate::format::hrl::Guid> {
    match s {
        Some(t) => t.parse().map_err(|_| {
            anyhow::anyhow!("{t:?} is not a GUID (xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx)")
        }),
        None => Ok(default),
    }
}

pub(super) async fn hrl_cmd(cmd: HrlCmd) -> Result<i32> {
    use crate::format::hrl::Guid;
    match cmd {
        HrlCmd::Diff {
            old,
            new,
            output,
            previous_id,
            after,
            unique_id,
            data_write_guid,
            json,
        } => {
            let (prev, dw) = match after {
                Some(path) => tokio::task::spawn_blocking(move || chain_after(&path)).await??,
                None => (
                    guid_arg(previous_id, Guid::NIL)?,
                    guid_arg(data_write_guid, Guid::NIL)?,
                ),
            };
            let uid = guid_arg(unique_id, Guid::new_random())?;
            let s = tokio::task::spawn_blocking(move || diff(&old, &new, &output, prev, uid, dw))
                .await??;
            if json {
                super::print_json(&s)?;
            } else {
                println!(
                    "log {} (after {}): {} writes, {} of data, {} log",
                    s.unique_id,
                    s.previous_unique_id,
                    s.extents,
                    crate::util::human_bytes(s.data_bytes),
                    crate::util::human_bytes(s.log_bytes)
                );
            }
        }
        HrlCmd::Inspect {
            file,
            disk_size,
            json,
        } => {
            let log = tokio::task::spawn_blocking(move || inspect(&file, disk_size)).await??;
            print(&log, json)?;
        }
        HrlCmd::Apply { file, image } => {
            let (n, bytes) = tokio::task::spawn_blocking(move || apply(&file, &image)).await??;
            println!("applied {n} writes ({})", crate::util::human_bytes(bytes));
        }
    }
    Ok(0)
}
