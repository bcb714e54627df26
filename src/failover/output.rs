//! The disk file a failover writes.
//!
//! A materialized disk is written once, start to end, and then only read by the hypervisor that
//! boots it: keeping its data in the page cache on the way buys nothing. Through the cache, each
//! block is copied into freshly allocated pages and written back later by the kernel, which cost
//! about a fifth of a failover's CPU (perf, `drvault bench failover`) and left most of the data
//! for the final fsync. So whole blocks go to the device directly (`O_DIRECT`) from buffers
//! aligned for it; whatever is not aligned (a disk's short last block, the VHD footer, a block
//! that logs patched and that arrives in an ordinary buffer) goes through the cache, which the
//! final fsync covers. A file system that refuses `O_DIRECT` (tmpfs, some network and overlay
//! file systems) gets every write through the cache, flushed as it goes (see `Flusher`).

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::error::Error;

/// A failed write of failover output (a disk, a definition file, the folder): the disk is
/// full (`store_full`) or the folder cannot be written (`output_not_writable`). Both are the
/// server's trouble, not the request's, and the same failover succeeds once it is fixed, so
/// both are unavailable (503) and recoverable.
pub fn output_error(error: &io::Error, message: String) -> Error {
    Error::local_write(error, message, |m| {
        Error::unavailable("output_not_writable", m)
    })
}

/// Alignment of buffers, offsets and lengths for direct writes: the largest logical block size
/// of common devices (devices with 512-byte blocks accept it too).
pub const DIRECT_ALIGN: usize = 4096;

/// Written bytes after which a buffered write also starts the file's data on its way to the disk.
const FLUSH_EVERY: u64 = 128 * 1024 * 1024;

/// An output disk file, opened for buffered writes and, where the file system allows it, a
/// second time for direct ones.
pub struct DiskOutput {
    file: File,
    direct: Option<File>,
    /// Cleared by the first direct write the file system refuses: the rest go through the cache.
    direct_ok: AtomicBool,
    flush: Flusher,
}

impl DiskOutput {
    /// Creates `path` (which must not exist) with `len` bytes, all reading as zeros.
    pub fn create(path: &Path, len: u64) -> io::Result<DiskOutput> {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)?;
        file.set_len(len)?;
        let direct = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
            .open(path)
            .ok();
        Ok(DiskOutput {
            direct_ok: AtomicBool::new(direct.is_some()),
            file,
            direct,
            flush: Flusher::default(),
        })
    }

    /// Whether writes of aligned buffers still go to the device directly.
    pub fn is_direct(&self) -> bool {
        self.direct_ok.load(Ordering::Acquire)
    }

    /// Writes `data` at `offset`: directly when the buffer, the offset and the length are all
    /// aligned to [`DIRECT_ALIGN`] and the file system takes it, through the cache otherwise.
    pub fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        let aligned = data.as_ptr() as usize % DIRECT_ALIGN == 0
            && offset % DIRECT_ALIGN as u64 == 0
            && data.len() % DIRECT_ALIGN == 0;
        if let (true, Some(direct)) = (aligned && self.is_direct(), &self.direct) {
            match direct.write_all_at(data, offset) {
                Ok(()) => return Ok(()),
                // Refused for this file (alignment stricter than ours, or no direct I/O after
                // all): nothing was written, so the same write goes through the cache.
                Err(e) if e.kind() == io::ErrorKind::InvalidInput => {
                    tracing::debug!(error = %e, "direct writes refused; writing through the page cache");
                    self.direct_ok.store(false, Ordering::Release);
                }
                Err(e) => return Err(e),
            }
        }
        self.file.write_all_at(data, offset)?;
        self.flush.wrote(&self.file, data.len() as u64)
    }

    /// Writes the last bytes (a footer) and makes everything durable.
    pub fn finish(&self, tail: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(tail, offset)?;
        self.file.sync_all()
    }
}

/// A reusable block buffer with a [`DIRECT_ALIGN`]-aligned window of `len` bytes.
pub struct AlignedBuf {
    vec: Vec<u8>,
}

impl AlignedBuf {
    /// A buffer whose window holds `len` bytes (zeroed once, when made).
    pub fn new(len: usize) -> AlignedBuf {
        AlignedBuf {
            vec: vec![0u8; len + DIRECT_ALIGN],
        }
    }

    /// Where the aligned window starts in [`AlignedBuf::into_vec`]'s vector. The heap block of a
    /// vector never moves while it is not resized, so this stays the same for the buffer's life.
    pub fn start(&self) -> usize {
        (DIRECT_ALIGN - self.vec.as_ptr() as usize % DIRECT_ALIGN) % DIRECT_ALIGN
    }

    /// The vector, to be filled from [`AlignedBuf::start`] (and given back with
    /// [`AlignedBuf::from_vec`]).
    pub fn into_vec(self) -> Vec<u8> {
        self.vec
    }

    pub fn from_vec(vec: Vec<u8>) -> AlignedBuf {
        AlignedBuf { vec }
    }

    /// The first `n` bytes of the aligned window.
    pub fn window(&self, n: usize) -> &[u8] {
        let at = self.start();
        &self.vec[at..at + n]
    }
}

/// Flushes buffered output while it is being written. The kernel starts writing dirty pages
/// back only past a share of memory (gigabytes on a large host) or after 30 s, so without this a
/// disk's whole data waits for the final fsync, which then costs as long as a plain copy of it.
/// One `fdatasync` at a time, run by the write that crossed the threshold (its errors fail the
/// disk like any write error; the final fsync still covers everything).
#[derive(Default)]
struct Flusher {
    unflushed: AtomicU64,
    running: AtomicBool,
}

impl Flusher {
    fn wrote(&self, file: &File, n: u64) -> io::Result<()> {
        let total = self.unflushed.fetch_add(n, Ordering::AcqRel) + n;
        if total < FLUSH_EVERY
            || self
                .running
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
        {
            return Ok(());
        }
        self.unflushed.store(0, Ordering::Release);
        let r = file.sync_data();
        self.running.store(false, Ordering::Release);
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flusher_syncs_once_past_the_threshold_and_starts_counting_again() {
        let f = tempfile::tempfile().unwrap();
        let fl = Flusher::default();
        fl.wrote(&f, FLUSH_EVERY - 1).unwrap();
        assert_eq!(fl.unflushed.load(Ordering::Acquire), FLUSH_EVERY - 1);
        fl.wrote(&f, 1).unwrap();
        assert_eq!(fl.unflushed.load(Ordering::Acquire), 0, "synced and reset");
        assert!(!fl.running.load(Ordering::Acquire));
        // While another write's sync runs, a write past the threshold only counts.
        fl.running.store(true, Ordering::Release);
        fl.wrote(&f, FLUSH_EVERY).unwrap();
        assert_eq!(fl.unflushed.load(Ordering::Acquire), FLUSH_EVERY);
    }

    #[test]
    fn aligned_and_unaligned_writes_land_where_asked() {
        // Direct I/O where the file system has it (ext4 here), the cache where not;
        // the bytes must be the same either way.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.vhd");
        let len = 3 * DIRECT_ALIGN as u64 * 64 + 512;
        let out = DiskOutput::create(&path, len).unwrap();
        let mut expect = vec![0u8; len as usize];

        let mut buf = AlignedBuf::new(64 * DIRECT_ALIGN);
        let at = buf.start();
        let mut v = buf.into_vec();
        for (k, b) in v[at..at + 64 * DIRECT_ALIGN].iter_mut().enumerate() {
            *b = (k % 251) as u8 + 1;
        }
        buf = AlignedBuf::from_vec(v);
        assert_eq!(buf.start(), at, "the window does not move");
        let off = 64 * DIRECT_ALIGN;
        out.write_at(buf.window(64 * DIRECT_ALIGN), off as u64)
            .unwrap();
        expect[off..off + 64 * DIRECT_ALIGN].copy_from_slice(buf.window(64 * DIRECT_ALIGN));

        // Unaligned in every way: an odd offset and length from an ordinary vector.
        let odd: Vec<u8> = (0..1000u32).map(|k| (k % 7) as u8 + 9).collect();
        out.write_at(&odd, 777).unwrap();
        expect[777..1777].copy_from_slice(&odd);

        let tail = [0xEEu8; 512];
        out.finish(&tail, len - 512).unwrap();
        expect[len as usize - 512..].copy_from_slice(&tail);
        drop(out);
        assert_eq!(std::fs::read(&path).unwrap(), expect);
    }

    #[test]
    fn an_existing_file_is_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.vhd");
        std::fs::write(&path, b"keep").unwrap();
        let e = DiskOutput::create(&path, 4096).err().expect("refused");
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&path).unwrap(), b"keep");
    }
}
