//! Change patterns for `bench deltas`: real MS-HRL logs, written with the crate's
//! [`HrlWriter`], of writes a guest could make to the benchmark image.
//!
//! * [`Pattern::Scattered`]: 4 KiB writes at random 4 KiB-aligned offsets (a database or a busy
//!   file system's metadata): one log entry per write, the worst case for entry handling.
//! * [`Pattern::Extents`]: 256 KiB writes at random 256 KiB-aligned offsets (file copies).
//! * [`Pattern::Mixed`]: half the bytes of each kind, for the long-journal logs.
//!
//! Offsets are drawn independently, so a log may write a place twice (guests do); the last write
//! wins, as in the reader's order. What is written comes from the image itself: a reservoir
//! sample of its non-zero 4 KiB pages ([`DonorPages`]), so a log compresses like the disk's data
//! and not like random or constant bytes; the first 8 bytes of each written page are XORed with
//! a running counter so no two written pages are equal. An image without data (all zero) falls
//! back to random pages. Everything is seeded, so one seed gives the same logs on every machine
//! with the same image.

use std::io::BufWriter;
use std::path::{Path, PathBuf};

use super::images::WyRand;
use super::{io_err, BenchError};
use crate::chunk::digest::is_zero;
use crate::format::hrl::{self, Guid, HrlWriter, HrlWriterParams};
use crate::format::image::DiskImage;

/// Page size of writes and of the donor sample.
pub const PAGE: u64 = 4096;
/// Size of one write of [`Pattern::Extents`].
pub const EXTENT: u64 = 256 * 1024;

/// How a log's writes are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Pattern {
    Scattered,
    Extents,
    Mixed,
}

impl Pattern {
    pub fn describe(self) -> &'static str {
        match self {
            Pattern::Scattered => "scattered 4 KiB writes",
            Pattern::Extents => "256 KiB extents",
            Pattern::Mixed => "half 4 KiB, half 256 KiB writes",
        }
    }
}

/// A sample of the image's non-zero pages, concatenated.
pub struct DonorPages {
    pages: Vec<u8>,
}

impl DonorPages {
    /// Reads the whole image once and keeps a uniform sample (reservoir sampling, algorithm R)
    /// of at most `max_pages` of its non-zero 4 KiB pages; random pages when it has none.
    pub fn sample(
        image: &dyn DiskImage,
        max_pages: usize,
        seed: u64,
    ) -> Result<DonorPages, BenchError> {
        let max_pages = max_pages.max(1);
        let page = PAGE as usize;
        let mut rng = WyRand::new(seed);
        let mut pages: Vec<u8> = Vec::with_capacity(max_pages * page);
        let mut seen = 0u64;
        let size = image.virtual_size();
        let mut buf = vec![0u8; 4 << 20];
        let mut pos = 0u64;
        while pos < size {
            let n = usize::try_from((size - pos).min(buf.len() as u64)).unwrap_or(buf.len());
            let chunk = buf.get_mut(..n).unwrap_or(&mut []);
            image.read_at(chunk, pos)?;
            for p in chunk.chunks_exact(page) {
                if is_zero(p) {
                    continue;
                }
                seen += 1;
                if pages.len() < max_pages * page {
                    pages.extend_from_slice(p);
                } else {
                    // Keep this page with probability max_pages / seen, in a random slot.
                    let j = rng.next_u64() % seen;
                    if let Ok(j) = usize::try_from(j) {
                        if let Some(slot) = pages.get_mut(j * page..(j + 1) * page) {
                            slot.copy_from_slice(p);
                        }
                    }
                }
            }
            pos += n as u64;
        }
        if pages.is_empty() {
            pages.resize(max_pages * page, 0);
            rng.fill(&mut pages);
        }
        Ok(DonorPages { pages })
    }

    pub fn count(&self) -> usize {
        self.pages.len() / PAGE as usize
    }

    /// Fills `buf` (a whole number of pages) with random donor pages, each stamped with the
    /// next value of `counter`.
    fn fill(&self, buf: &mut [u8], rng: &mut WyRand, counter: &mut u64) {
        let page = PAGE as usize;
        let count = self.count().max(1) as u64;
        for out in buf.chunks_mut(page) {
            let j = usize::try_from(rng.next_u64() % count).unwrap_or(0);
            if let Some(src) = self.pages.get(j * page..(j + 1) * page) {
                let n = out.len().min(src.len());
                out[..n].copy_from_slice(&src[..n]);
            }
            *counter += 1;
            for (b, c) in out.iter_mut().zip(counter.to_le_bytes()) {
                *b ^= c;
            }
        }
    }
}

/// One log written to a file.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LogFile {
    pub path: PathBuf,
    pub unique_id: String,
    pub pattern: Pattern,
    pub writes: u64,
    /// Disk bytes the log writes.
    pub data_bytes: u64,
    /// Size of the log file (data, header and metadata blocks).
    pub log_bytes: u64,
}

/// What one log is made of.
pub struct LogSpec<'a> {
    pub pattern: Pattern,
    /// Disk bytes to write; rounded down to whole writes (at least one write).
    pub bytes: u64,
    pub disk_size: u64,
    pub previous: Guid,
    pub unique: Guid,
    /// Must stay the same for every log of a disk (a change means the disk was modified
    /// offline, and the server marks it resync-required).
    pub data_write: Guid,
    pub donor: &'a DonorPages,
}

/// The (offset, length) writes of a log, in the order they are logged.
pub fn plan_writes(
    pattern: Pattern,
    bytes: u64,
    disk_size: u64,
    rng: &mut WyRand,
) -> Result<Vec<(u64, u64)>, BenchError> {
    let (extent_bytes, page_bytes) = match pattern {
        Pattern::Scattered => (0, bytes),
        Pattern::Extents => (bytes, 0),
        Pattern::Mixed => {
            let e = bytes / 2 / EXTENT * EXTENT;
            (e, bytes - e)
        }
    };
    let mut out = Vec::new();
    for (total, len) in [(extent_bytes, EXTENT), (page_bytes, PAGE)] {
        let slots = disk_size / len;
        let n = total / len;
        if n == 0 {
            continue;
        }
        if slots == 0 {
            return Err(BenchError::Invalid(format!(
                "a {disk_size}-byte disk has no room for a {len}-byte write"
            )));
        }
        out.extend((0..n).map(|_| ((rng.next_u64() % slots) * len, len)));
    }
    if out.is_empty() {
        return Err(BenchError::Invalid(format!(
            "{bytes} bytes of {} make no write: give at least {} bytes",
            pattern.describe(),
            if pattern == Pattern::Scattered {
                PAGE
            } else {
                EXTENT
            }
        )));
    }
    Ok(out)
}

/// Writes one log to `path` and fsyncs it.
pub fn write_log(path: &Path, spec: &LogSpec<'_>, seed: u64) -> Result<LogFile, BenchError> {
    let mut rng = WyRand::new(seed);
    let writes = plan_writes(spec.pattern, spec.bytes, spec.disk_size, &mut rng)?;
    let file = std::fs::File::create(path).map_err(io_err("creating", path))?;
    let params = HrlWriterParams {
        unique_id: spec.unique,
        previous_unique_id: spec.previous,
        vhd2_data_write_guid: spec.data_write,
        timestamp: hrl::hrl_timestamp(std::time::SystemTime::now()),
        ..Default::default()
    };
    let mut w = HrlWriter::new(params, BufWriter::with_capacity(1 << 20, file))?;
    let mut buf = vec![0u8; EXTENT as usize];
    let mut counter = seed;
    let mut data_bytes = 0u64;
    for &(offset, len) in &writes {
        let n = usize::try_from(len).unwrap_or(buf.len()).min(buf.len());
        let data = buf.get_mut(..n).unwrap_or(&mut []);
        spec.donor.fill(data, &mut rng, &mut counter);
        w.add_write(offset, data)?;
        data_bytes += n as u64;
    }
    let file = w.finish()?.into_inner().map_err(|e| BenchError::Io {
        what: "writing",
        path: path.display().to_string(),
        source: e.into_error(),
    })?;
    file.sync_all().map_err(io_err("syncing", path))?;
    let log_bytes = file.metadata().map_err(io_err("reading", path))?.len();
    Ok(LogFile {
        path: path.to_path_buf(),
        unique_id: spec.unique.to_string(),
        pattern: spec.pattern,
        writes: writes.len() as u64,
        data_bytes,
        log_bytes,
    })
}

/// Makes the same kind of writes as [`write_log`] directly in a raw image file (for `bench
/// resync`, where the source changed without a log); returns the bytes written.
pub fn write_in_place(
    path: &Path,
    pattern: Pattern,
    bytes: u64,
    disk_size: u64,
    donor: &DonorPages,
    seed: u64,
) -> Result<u64, BenchError> {
    use std::os::unix::fs::FileExt;
    let mut rng = WyRand::new(seed);
    let writes = plan_writes(pattern, bytes, disk_size, &mut rng)?;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io_err("opening", path))?;
    let mut buf = vec![0u8; EXTENT as usize];
    let mut counter = seed;
    let mut written = 0u64;
    for &(offset, len) in &writes {
        let n = usize::try_from(len).unwrap_or(buf.len()).min(buf.len());
        let data = buf.get_mut(..n).unwrap_or(&mut []);
        donor.fill(data, &mut rng, &mut counter);
        file.write_all_at(data, offset)
            .map_err(io_err("writing", path))?;
        written += n as u64;
    }
    file.sync_all().map_err(io_err("syncing", path))?;
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn mem(data: Vec<u8>) -> Arc<dyn DiskImage> {
        Arc::from(crate::format::image::open_reader(Arc::new(data), None).unwrap())
    }

    #[test]
    fn donor_sample_keeps_only_data_pages() {
        let mut data = vec![0u8; 64 * 4096];
        for p in [3usize, 10, 40] {
            data[p * 4096 + 7] = p as u8;
        }
        let d = DonorPages::sample(mem(data).as_ref(), 16, 1).unwrap();
        assert_eq!(d.count(), 3, "three data pages, no zero page");
        assert!(d.pages.chunks(4096).all(|p| !is_zero(p)));
        // More data pages than room: the sample is full and holds data pages only.
        let full = DonorPages::sample(mem(vec![9u8; 64 * 4096]).as_ref(), 8, 1).unwrap();
        assert_eq!(full.count(), 8);
        // No data at all: random pages instead.
        let z = DonorPages::sample(mem(vec![0u8; 8 * 4096]).as_ref(), 4, 1).unwrap();
        assert_eq!(z.count(), 4);
        assert!(!is_zero(&z.pages));
    }

    #[test]
    fn write_plans_have_the_pattern_sizes_and_stay_inside_the_disk() {
        let mut rng = WyRand::new(5);
        let disk = 64 << 20;
        let s = plan_writes(Pattern::Scattered, 1 << 20, disk, &mut rng).unwrap();
        assert_eq!(s.len(), 256);
        assert!(s
            .iter()
            .all(|&(o, l)| l == PAGE && o % PAGE == 0 && o + l <= disk));
        let e = plan_writes(Pattern::Extents, 1 << 20, disk, &mut rng).unwrap();
        assert_eq!(e.len(), 4);
        assert!(e
            .iter()
            .all(|&(o, l)| l == EXTENT && o % EXTENT == 0 && o + l <= disk));
        let m = plan_writes(Pattern::Mixed, 1 << 20, disk, &mut rng).unwrap();
        let total: u64 = m.iter().map(|w| w.1).sum();
        assert_eq!(total, 1 << 20);
        assert_eq!(m.iter().filter(|w| w.1 == EXTENT).count(), 2);
        assert!(matches!(
            plan_writes(Pattern::Extents, 1000, disk, &mut rng),
            Err(BenchError::Invalid(m)) if m.contains("make no write")
        ));
        assert!(matches!(
            plan_writes(Pattern::Extents, 1 << 20, 4096, &mut rng),
            Err(BenchError::Invalid(m)) if m.contains("no room")
        ));
    }

    #[test]
    fn written_logs_read_back_with_the_planned_writes() {
        let dir = tempfile::tempdir().unwrap();
        let donor = DonorPages::sample(mem(vec![3u8; 16 * 4096]).as_ref(), 16, 2).unwrap();
        let disk = 16 << 20;
        let spec = LogSpec {
            pattern: Pattern::Mixed,
            bytes: 1 << 20,
            disk_size: disk,
            previous: Guid::NIL,
            unique: Guid::new_random(),
            data_write: Guid::new_random(),
            donor: &donor,
        };
        let p = dir.path().join("a.hrl");
        let lf = write_log(&p, &spec, 9).unwrap();
        assert_eq!(lf.data_bytes, 1 << 20);
        assert_eq!(lf.log_bytes, std::fs::metadata(&p).unwrap().len());
        let f = std::fs::File::open(&p).unwrap();
        let log = hrl::read_log(&f, disk).unwrap();
        assert_eq!(log.header.unique_id, spec.unique);
        let planned = plan_writes(Pattern::Mixed, 1 << 20, disk, &mut WyRand::new(9)).unwrap();
        let got: Vec<(u64, u64)> = log
            .extents
            .iter()
            .map(|e| (e.disk_offset, u64::from(e.length)))
            .collect();
        assert_eq!(got, planned);
        assert_eq!(lf.writes, planned.len() as u64);
        // Every written page differs from every other (the counter stamp).
        let mut pages = std::collections::HashSet::new();
        hrl::apply(&log, &f, |_, data| {
            for pg in data.chunks(4096) {
                assert!(pages.insert(pg.to_vec()), "a page was written twice");
            }
            Ok(())
        })
        .unwrap();
        // The same seed gives the same log content.
        let p2 = dir.path().join("b.hrl");
        write_log(&p2, &spec, 9).unwrap();
        let (a, b) = (std::fs::read(&p).unwrap(), std::fs::read(&p2).unwrap());
        assert_eq!(a.len(), b.len());
    }
}
