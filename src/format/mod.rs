//! Outside formats: MS-HRL change logs (in), VHD and VHDX disks (in), fixed VHD (out).
//!
//! Every parser here works over [`ReadAt`] (positional reads, no shared cursor) so one open
//! file can serve concurrent readers, and so the server can validate a log that sits sealed in
//! the object store through the same code that reads a local file. Parsers validate every
//! offset and length they are given before using it and return a precise error enum.

pub mod hrl;
pub mod image;
pub mod vhd;
pub mod vhdx;

/// Positional reads, as `std::os::unix::fs::FileExt::read_exact_at`.
#[allow(clippy::len_without_is_empty)] // a source's length is an I/O call; emptiness is never asked
pub trait ReadAt: Send + Sync {
    /// Fills `buf` from `offset`; an `UnexpectedEof` error when the source is shorter.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()>;
    /// Total length of the source in bytes.
    fn len(&self) -> std::io::Result<u64>;
    /// The sorted ranges within `[0, len)` that may hold data, when the source knows where
    /// its holes are; everything outside them reads as zeros. None: unknown, all may be data.
    fn data_ranges(&self, _len: u64) -> Option<Vec<std::ops::Range<u64>>> {
        None
    }
}

impl ReadAt for std::fs::File {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(self, buf, offset)
    }
    fn len(&self) -> std::io::Result<u64> {
        Ok(self.metadata()?.len())
    }
    /// The file's data extents from `SEEK_DATA` / `SEEK_HOLE`, so a sparse raw disk's holes
    /// are skipped without reading them (reading 15 GiB of holes costs seconds of CPU for
    /// copying and checking zeros). File systems without hole tracking report the whole file
    /// as data; any other failure gives None and the caller reads everything.
    fn data_ranges(&self, len: u64) -> Option<Vec<std::ops::Range<u64>>> {
        use rustix::fs::{seek, SeekFrom};
        let mut out = Vec::new();
        let mut pos = 0u64;
        while pos < len {
            let start = match seek(self, SeekFrom::Data(pos)) {
                Ok(d) => d,
                // No data at or after `pos`: the rest is one hole.
                Err(rustix::io::Errno::NXIO) => break,
                Err(_) => return None,
            };
            if start >= len {
                break;
            }
            let end = seek(self, SeekFrom::Hole(start)).ok()?.min(len);
            // A file that grew or shrank meanwhile: stop trusting the map.
            if end <= start {
                return None;
            }
            out.push(start..end);
            pos = end;
        }
        Some(out)
    }
}

impl ReadAt for [u8] {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let start = usize::try_from(offset).ok().filter(|&s| s <= self.len());
        let end = start
            .and_then(|s| s.checked_add(buf.len()))
            .filter(|&e| e <= self.len());
        match (start, end) {
            (Some(s), Some(e)) => {
                buf.copy_from_slice(&self[s..e]);
                Ok(())
            }
            _ => Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "read past end",
            )),
        }
    }
    fn len(&self) -> std::io::Result<u64> {
        Ok(<[u8]>::len(self) as u64)
    }
}

impl ReadAt for Vec<u8> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.as_slice().read_exact_at(buf, offset)
    }
    fn len(&self) -> std::io::Result<u64> {
        Ok(self.as_slice().len() as u64)
    }
}

/// Why a positional read of an on-disk structure failed.
pub(crate) enum ReadFailure {
    /// The file ends before the structure does: `end` is where it should have ended.
    Truncated {
        end: u64,
        file_len: u64,
    },
    Io(std::io::Error),
}

/// Positional read that tells a file too short for what its headers claim from an I/O error.
pub(crate) fn read_checked(
    file: &dyn ReadAt,
    buf: &mut [u8],
    offset: u64,
) -> Result<(), ReadFailure> {
    file.read_exact_at(buf, offset).map_err(|source| {
        let end = offset.saturating_add(buf.len() as u64);
        match (source.kind(), file.len()) {
            (std::io::ErrorKind::UnexpectedEof, Ok(file_len)) => {
                ReadFailure::Truncated { end, file_len }
            }
            _ => ReadFailure::Io(source),
        }
    })
}

/// Fixed-offset field reader. The offsets are constants within fixed-size structures, so a miss
/// is a programming error; it returns zeros rather than panic.
pub(crate) fn array_at<const N: usize>(raw: &[u8], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    if let Some(src) = at.checked_add(N).and_then(|end| raw.get(at..end)) {
        out.copy_from_slice(src);
    }
    out
}

/// Whether two byte ranges share at least one byte.
pub(crate) fn overlaps(a: &std::ops::Range<u64>, b: &std::ops::Range<u64>) -> bool {
    a.start < b.end && b.start < a.end
}
