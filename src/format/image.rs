//! The common read interface over every disk image the agent can stream: raw, VHD (fixed,
//! dynamic, differencing) and VHDX (fixed, dynamic).
//!
//! The format is detected from the content, never from the file name:
//! 1. `vhdxfile` at offset 0 → VHDX;
//! 2. `conectix` at offset 0 → dynamic or differencing VHD;
//! 3. `conectix` anywhere in the last 512 bytes → fixed VHD (a footer that is not exactly at
//!    the start of the last 512 bytes is refused as misplaced: the file was cut or padded);
//! 4. anything else → raw.
//!
//! A file that looks like a VHD or VHDX but fails validation is an error, never read as raw:
//! streaming a damaged container as if it were the disk would replicate garbage silently.
//! Errors carry the file path (or `<reader>` for [`open_reader`]) in their message.

use std::io;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use super::vhd::{DiskType, VhdDisk, VhdError};
use super::vhdx::{VhdxDisk, VhdxError};
use super::ReadAt;

/// The container format of an opened image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageFormat {
    Raw,
    VhdFixed,
    VhdDynamic,
    VhdDifferencing,
    VhdxFixed,
    VhdxDynamic,
}

/// A virtual disk, readable from several threads at once.
pub trait DiskImage: Send + Sync {
    fn format(&self) -> ImageFormat;
    fn virtual_size(&self) -> u64;
    /// Reads buf.len() bytes at offset (offset+len <= virtual_size), unallocated reads as zeros.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), ImageError>;
    /// Sorted, non-overlapping byte ranges within [0, virtual_size) that may hold data;
    /// everything outside them is guaranteed to read as zero (raw: the file's data extents, the
    /// whole disk where the file system cannot tell).
    fn allocated_ranges(&self) -> Result<Vec<Range<u64>>, ImageError>;
}

/// Errors from opening or reading an image; `origin` is the file path or `<reader>`.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{origin}: VHD: {error}")]
    Vhd { origin: String, error: VhdError },
    #[error("{origin}: VHDX: {error}")]
    Vhdx { origin: String, error: VhdxError },
    #[error("{origin}: {what}: {error}")]
    Io {
        origin: String,
        what: &'static str,
        error: io::Error,
    },
    #[error("{origin}: read of {len} bytes at offset {offset} is outside the {size}-byte disk")]
    OutOfRange {
        origin: String,
        offset: u64,
        len: u64,
        size: u64,
    },
}

/// Opens the image at `path`, detecting its format from its content. A differencing VHD's
/// parent is looked for in the same directory.
pub fn open(path: &Path) -> Result<Box<dyn DiskImage>, ImageError> {
    let origin = path.display().to_string();
    let file = std::fs::File::open(path).map_err(|error| ImageError::Io {
        origin: origin.clone(),
        what: "opening",
        error,
    })?;
    detect_and_open(Arc::new(file), path.parent(), origin)
}

/// Opens an image from any positional reader; `parent_dir` is where a differencing VHD's
/// parent is looked for (without it, differencing disks fail with `ParentNotFound`).
pub fn open_reader(
    r: Arc<dyn ReadAt>,
    parent_dir: Option<&Path>,
) -> Result<Box<dyn DiskImage>, ImageError> {
    detect_and_open(r, parent_dir, "<reader>".to_string())
}

const VHDX_MAGIC: &[u8; 8] = b"vhdxfile";
const VHD_MAGIC: &[u8; 8] = b"conectix";

fn detect_and_open(
    r: Arc<dyn ReadAt>,
    parent_dir: Option<&Path>,
    origin: String,
) -> Result<Box<dyn DiskImage>, ImageError> {
    let io_err = |what, error| ImageError::Io {
        origin: origin.clone(),
        what,
        error,
    };
    let len = r.len().map_err(|e| io_err("reading the length", e))?;
    let mut head = [0u8; 8];
    let head_len = usize::try_from(len.min(8)).unwrap_or(8);
    r.read_exact_at(&mut head[..head_len], 0)
        .map_err(|e| io_err("reading the first bytes", e))?;
    let tail_len = len.min(512);
    let mut tail = vec![0u8; usize::try_from(tail_len).unwrap_or(512)];
    r.read_exact_at(&mut tail, len - tail_len)
        .map_err(|e| io_err("reading the last bytes", e))?;

    if &head == VHDX_MAGIC {
        let disk = VhdxDisk::open(r).map_err(|error| ImageError::Vhdx {
            origin: origin.clone(),
            error,
        })?;
        return Ok(Box::new(VhdxImage { origin, disk }));
    }
    let footer_in_tail = tail.windows(8).any(|w| w == VHD_MAGIC);
    if &head == VHD_MAGIC || footer_in_tail {
        let disk = VhdDisk::open(r, parent_dir).map_err(|error| ImageError::Vhd {
            origin: origin.clone(),
            error,
        })?;
        return Ok(Box::new(VhdImage { origin, disk }));
    }
    Ok(Box::new(RawImage {
        origin,
        file: r,
        size: len,
    }))
}

/// Sorts `ranges` and merges overlapping or touching ones; empty ranges are dropped.
pub(crate) fn normalize_ranges(mut ranges: Vec<Range<u64>>) -> Vec<Range<u64>> {
    ranges.retain(|r| r.start < r.end);
    ranges.sort_unstable_by_key(|r| r.start);
    let mut merged: Vec<Range<u64>> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match merged.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => merged.push(r),
        }
    }
    merged
}

fn check_range(origin: &str, offset: u64, len: usize, size: u64) -> Result<(), ImageError> {
    let len = len as u64;
    if offset.checked_add(len).is_none_or(|end| end > size) {
        return Err(ImageError::OutOfRange {
            origin: origin.to_string(),
            offset,
            len,
            size,
        });
    }
    Ok(())
}

struct RawImage {
    origin: String,
    file: Arc<dyn ReadAt>,
    size: u64,
}

impl DiskImage for RawImage {
    fn format(&self) -> ImageFormat {
        ImageFormat::Raw
    }

    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), ImageError> {
        check_range(&self.origin, offset, buf.len(), self.size)?;
        self.file
            .read_exact_at(buf, offset)
            .map_err(|error| ImageError::Io {
                origin: self.origin.clone(),
                what: "reading disk data",
                error,
            })
    }

    fn allocated_ranges(&self) -> Result<Vec<Range<u64>>, ImageError> {
        // A sparse file's holes read as zeros: only its data extents need reading.
        let ranges = self
            .file
            .data_ranges(self.size)
            .unwrap_or_else(|| std::iter::once(0..self.size).collect());
        Ok(normalize_ranges(ranges))
    }
}

struct VhdImage {
    origin: String,
    disk: VhdDisk,
}

impl VhdImage {
    fn wrap(&self, error: VhdError) -> ImageError {
        ImageError::Vhd {
            origin: self.origin.clone(),
            error,
        }
    }
}

impl DiskImage for VhdImage {
    fn format(&self) -> ImageFormat {
        match self.disk.disk_type() {
            DiskType::Fixed => ImageFormat::VhdFixed,
            DiskType::Dynamic => ImageFormat::VhdDynamic,
            DiskType::Differencing => ImageFormat::VhdDifferencing,
        }
    }

    fn virtual_size(&self) -> u64 {
        self.disk.virtual_size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), ImageError> {
        check_range(&self.origin, offset, buf.len(), self.virtual_size())?;
        self.disk.read_at(buf, offset).map_err(|e| self.wrap(e))
    }

    fn allocated_ranges(&self) -> Result<Vec<Range<u64>>, ImageError> {
        self.disk.allocated_ranges().map_err(|e| self.wrap(e))
    }
}

struct VhdxImage {
    origin: String,
    disk: VhdxDisk,
}

impl DiskImage for VhdxImage {
    fn format(&self) -> ImageFormat {
        if self.disk.is_fixed() {
            ImageFormat::VhdxFixed
        } else {
            ImageFormat::VhdxDynamic
        }
    }

    fn virtual_size(&self) -> u64 {
        self.disk.virtual_size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), ImageError> {
        check_range(&self.origin, offset, buf.len(), self.virtual_size())?;
        self.disk
            .read_at(buf, offset)
            .map_err(|error| ImageError::Vhdx {
                origin: self.origin.clone(),
                error,
            })
    }

    fn allocated_ranges(&self) -> Result<Vec<Range<u64>>, ImageError> {
        Ok(self.disk.allocated_ranges())
    }
}

/// Fixture helpers shared by the format tests: qemu-img / qemu-io and deterministic data.
#[cfg(test)]
pub(crate) mod testutil {
    use std::path::Path;
    use std::process::Command;

    fn run(tool: &str, args: &[&str]) -> String {
        let out = Command::new(tool).args(args).output().unwrap_or_else(|e| {
            panic!(
                "cannot run {tool} ({e}): these tests need qemu-utils (apt-get install qemu-utils)"
            )
        });
        assert!(
            out.status.success(),
            "{tool} {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn qemu_img(args: &[&str]) -> String {
        run("qemu-img", args)
    }

    pub fn qemu_io(args: &[&str]) -> String {
        run("qemu-io", args)
    }

    pub fn p(path: &Path) -> &str {
        path.to_str().unwrap_or_default()
    }

    /// Deterministic pseudo-random bytes (xorshift64*), so failures reproduce.
    pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
        let mut state = seed | 1;
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            out.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
        }
        out.truncate(len);
        out
    }

    /// A disk of `size` bytes that is mostly zeros with random data in a few places, so that
    /// sparse formats have both allocated and unallocated blocks.
    pub fn sparse_disk(size: usize, seed: u64) -> Vec<u8> {
        let mut disk = vec![0u8; size];
        let spots = [
            (0usize, 4096usize),
            (size / 3 + 1000, 70_000),
            (size / 2, 512),
            (size.saturating_sub(1536), 1536),
        ];
        for (i, (at, len)) in spots.into_iter().enumerate() {
            let end = (at + len).min(size);
            let data = random_bytes(end - at, seed + i as u64);
            disk[at..end].copy_from_slice(&data);
        }
        disk
    }

    /// Virtual size qemu reports for an image.
    pub fn qemu_virtual_size(format: &str, path: &Path) -> u64 {
        let json = qemu_img(&["info", "-f", format, "--output=json", p(path)]);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap_or_default();
        v["virtual-size"].as_u64().unwrap_or(0)
    }

    /// The image converted to raw by qemu: the oracle for our readers.
    pub fn qemu_to_raw(format: &str, path: &Path, dir: &Path) -> Vec<u8> {
        let out = dir.join(format!(
            "{}.oracle.raw",
            path.file_name().and_then(|n| n.to_str()).unwrap_or("x")
        ));
        qemu_img(&["convert", "-f", format, "-O", "raw", p(path), p(&out)]);
        std::fs::read(&out).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::*;
    use super::*;

    fn read_all(img: &dyn DiskImage) -> Vec<u8> {
        let mut out = vec![0u8; img.virtual_size() as usize];
        // Odd-sized chunks cross block and sector boundaries on purpose.
        let chunk = 777_777;
        let mut at = 0;
        while at < out.len() {
            let end = (at + chunk).min(out.len());
            img.read_at(&mut out[at..end], at as u64).unwrap();
            at = end;
        }
        out
    }

    /// Every non-zero byte lies inside an allocated range, and the ranges are sorted,
    /// disjoint and inside the disk.
    fn assert_ranges_cover(img: &dyn DiskImage, data: &[u8]) {
        let ranges = img.allocated_ranges().unwrap();
        for w in ranges.windows(2) {
            assert!(
                w[0].end < w[1].start,
                "ranges not sorted/disjoint: {ranges:?}"
            );
        }
        assert!(ranges
            .iter()
            .all(|r| r.start < r.end && r.end <= img.virtual_size()));
        let mut covered = vec![false; data.len()];
        for r in &ranges {
            covered[r.start as usize..r.end as usize].fill(true);
        }
        let stray = data.iter().zip(&covered).position(|(&b, &c)| b != 0 && !c);
        assert_eq!(
            stray, None,
            "non-zero byte outside allocated ranges {ranges:?}"
        );
    }

    struct Case {
        name: &'static str,
        qemu_format: &'static str,
        options: &'static str,
        expect: ImageFormat,
        size: usize,
    }

    /// Converts a raw disk with qemu-img and checks open() reads exactly what qemu reads.
    #[test]
    fn converted_images_read_back_like_qemu() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            Case {
                name: "vhd-dynamic",
                qemu_format: "vpc",
                options: "subformat=dynamic",
                expect: ImageFormat::VhdDynamic,
                size: 10 << 20,
            },
            Case {
                name: "vhd-fixed",
                qemu_format: "vpc",
                options: "subformat=fixed",
                expect: ImageFormat::VhdFixed,
                size: 10 << 20,
            },
            Case {
                name: "vhd-dynamic-forced",
                qemu_format: "vpc",
                options: "subformat=dynamic,force_size=on",
                expect: ImageFormat::VhdDynamic,
                size: (7 << 20) + 512,
            },
            Case {
                name: "vhdx-dynamic",
                qemu_format: "vhdx",
                options: "subformat=dynamic",
                expect: ImageFormat::VhdxDynamic,
                size: 10 << 20,
            },
            Case {
                name: "vhdx-fixed",
                qemu_format: "vhdx",
                options: "subformat=fixed",
                expect: ImageFormat::VhdxFixed,
                size: 10 << 20,
            },
            Case {
                name: "vhdx-1m-odd",
                qemu_format: "vhdx",
                options: "subformat=dynamic,block_size=1M",
                expect: ImageFormat::VhdxDynamic,
                size: (5 << 20) + 3 * 512,
            },
            Case {
                name: "vhdx-fixed-odd",
                qemu_format: "vhdx",
                options: "subformat=fixed,block_size=1M",
                expect: ImageFormat::VhdxFixed,
                size: (3 << 20) + 4096,
            },
        ];
        for (i, case) in cases.iter().enumerate() {
            let raw = sparse_disk(case.size, 100 + i as u64);
            let raw_path = dir.path().join(format!("{}.raw", case.name));
            std::fs::write(&raw_path, &raw).unwrap();
            let img_path = dir.path().join(format!("{}.img", case.name));
            qemu_img(&[
                "convert",
                "-f",
                "raw",
                "-O",
                case.qemu_format,
                "-o",
                case.options,
                p(&raw_path),
                p(&img_path),
            ]);

            let img = open(&img_path).unwrap();
            assert_eq!(img.format(), case.expect, "{}", case.name);
            assert_eq!(
                img.virtual_size(),
                qemu_virtual_size(case.qemu_format, &img_path),
                "{}",
                case.name
            );
            let ours = read_all(img.as_ref());
            let oracle = qemu_to_raw(case.qemu_format, &img_path, dir.path());
            assert!(ours == oracle, "{}: contents differ from qemu's", case.name);
            // qemu may round a VHD's size up to its geometry; the original bytes come first.
            assert!(
                ours.len() >= raw.len() && ours[..raw.len()] == raw[..],
                "{}",
                case.name
            );
            assert!(ours[raw.len()..].iter().all(|&b| b == 0), "{}", case.name);
            assert_ranges_cover(img.as_ref(), &ours);
        }
    }

    /// Data written by qemu-io into freshly created sparse images.
    #[test]
    fn qemu_io_writes_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let size = 9 << 20;
        // (format, options, file, whether the writes leave some blocks unallocated)
        for (fmt, opts, name, sparse) in [
            ("vpc", "subformat=dynamic", "w.vhd", true),
            ("vhdx", "subformat=dynamic", "w.vhdx", false),
            ("vhdx", "subformat=dynamic,block_size=1M", "w1m.vhdx", true),
        ] {
            let path = dir.path().join(name);
            qemu_img(&["create", "-f", fmt, "-o", opts, p(&path), &size.to_string()]);
            let size = qemu_virtual_size(fmt, &path) as usize;
            let mut expected = vec![0u8; size];
            for (off, len, pat) in [
                (1_000_448usize, 70_144usize, 0xabu8),
                (4 << 20, 512, 0x11),
                (size - 4096, 4096, 0xcd),
            ] {
                let cmd = format!("write -P {pat:#x} {off} {len}");
                qemu_io(&["-f", fmt, "-c", &cmd, p(&path)]);
                expected[off..off + len].fill(pat);
            }
            let img = open(&path).unwrap();
            assert_eq!(img.virtual_size() as usize, size, "{name}");
            let ours = read_all(img.as_ref());
            assert!(ours == expected, "{name}: contents differ");
            assert_ranges_cover(img.as_ref(), &ours);
            let ranges = img.allocated_ranges().unwrap();
            let total: u64 = ranges.iter().map(|r| r.end - r.start).sum();
            assert_eq!(
                total < size as u64,
                sparse,
                "{name}: allocated {total} of {size} bytes"
            );
        }
    }

    #[test]
    fn sparse_raw_files_skip_their_holes() {
        use std::os::unix::fs::{FileExt, MetadataExt};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sparse.img");
        let f = std::fs::File::create(&path).unwrap();
        let size = 64u64 << 20;
        f.set_len(size).unwrap();
        let (a, b) = (random_bytes(4096, 1), random_bytes(8192, 2));
        f.write_all_at(&a, 0).unwrap();
        f.write_all_at(&b, 40 << 20).unwrap();
        f.sync_all().unwrap();
        let mut data = vec![0u8; size as usize];
        data[..4096].copy_from_slice(&a);
        data[40 << 20..(40 << 20) + 8192].copy_from_slice(&b);
        let img = open(&path).unwrap();
        assert_eq!(read_all(img.as_ref()), data);
        assert_ranges_cover(img.as_ref(), &data);
        // Where the file system keeps holes (it allocated less than the size), they are left
        // out; elsewhere the whole file counts as data.
        let total: u64 = img
            .allocated_ranges()
            .unwrap()
            .iter()
            .map(|r| r.end - r.start)
            .sum();
        if std::fs::metadata(&path).unwrap().blocks() * 512 < size {
            assert!(total <= 8 << 20, "holes skipped: {total} bytes to read");
        } else {
            assert_eq!(total, size);
        }
        // Entirely a hole: nothing to read.
        let hole = dir.path().join("hole.img");
        std::fs::File::create(&hole).unwrap().set_len(size).unwrap();
        let img = open(&hole).unwrap();
        assert!(img.allocated_ranges().unwrap().len() <= 1);
    }

    #[test]
    fn raw_files_are_raw() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.vhd"); // the name must not matter
        let data = random_bytes(3 * 4096 + 17, 7);
        std::fs::write(&path, &data).unwrap();
        let img = open(&path).unwrap();
        assert_eq!(img.format(), ImageFormat::Raw);
        assert_eq!(read_all(img.as_ref()), data);
        assert_eq!(img.allocated_ranges().unwrap(), vec![0..data.len() as u64]);
        let mut buf = [0u8; 2];
        let err = img.read_at(&mut buf, data.len() as u64 - 1).unwrap_err();
        assert!(matches!(err, ImageError::OutOfRange { .. }), "{err}");
        assert!(err.to_string().contains("disk.vhd"), "{err}");

        let empty = open_reader(Arc::new(Vec::<u8>::new()), None).unwrap();
        assert_eq!(empty.format(), ImageFormat::Raw);
        assert_eq!(empty.allocated_ranges().unwrap(), Vec::<Range<u64>>::new());
    }

    #[test]
    fn damaged_containers_are_errors_not_raw() {
        // A VHDX identifier with nothing behind it.
        let mut vhdx = vec![0u8; 2 << 20];
        vhdx[..8].copy_from_slice(b"vhdxfile");
        let err = open_reader(Arc::new(vhdx), None).err().unwrap();
        assert!(
            matches!(
                err,
                ImageError::Vhdx {
                    error: VhdxError::NoValidHeader { .. },
                    ..
                }
            ),
            "{err}"
        );
        assert!(
            err.to_string()
                .starts_with("<reader>: VHDX: no valid header"),
            "{err}"
        );

        // A fixed VHD with one byte cut off the end: the footer no longer sits at len - 512.
        let mut vhd = vec![0u8; 1 << 20];
        vhd.extend_from_slice(&crate::format::vhd::fixed_footer(1 << 20, [7; 16], 0).unwrap());
        vhd.pop();
        let err = open_reader(Arc::new(vhd), None).err().unwrap();
        assert!(
            matches!(
                err,
                ImageError::Vhd {
                    error: VhdError::MisplacedFooter { .. },
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn readers_serve_many_threads() {
        let dir = tempfile::tempdir().unwrap();
        let raw = random_bytes(6 << 20, 3);
        let raw_path = dir.path().join("t.raw");
        std::fs::write(&raw_path, &raw).unwrap();
        let path = dir.path().join("t.vhdx");
        qemu_img(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "vhdx",
            "-o",
            "subformat=dynamic,block_size=1M",
            p(&raw_path),
            p(&path),
        ]);
        let img: Arc<dyn DiskImage> = Arc::from(open(&path).unwrap());
        let handles: Vec<_> = (0..4)
            .map(|t| {
                let img = Arc::clone(&img);
                let raw = raw.clone();
                std::thread::spawn(move || {
                    for i in 0..50u64 {
                        let off = (i * 131_071 + t * 7919) % (raw.len() as u64 - 10_000);
                        let mut buf = vec![0u8; 10_000];
                        img.read_at(&mut buf, off).unwrap();
                        assert_eq!(buf, raw[off as usize..off as usize + 10_000]);
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
    }

    #[test]
    fn normalize_merges_touching_and_overlapping() {
        let got = normalize_ranges(vec![10..20, 0..5, 5..7, 15..30, 40..40, 31..35]);
        assert_eq!(got, vec![0..7, 10..30, 31..35]);
    }

    mod never_panics {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

            /// Arbitrary bytes, sometimes behind a magic, never panic the detector or readers.
            #[test]
            fn arbitrary_bytes(mut data in proptest::collection::vec(any::<u8>(), 0..4096), magic in 0u8..4) {
                match magic {
                    1 if data.len() >= 8 => data[..8].copy_from_slice(b"vhdxfile"),
                    2 if data.len() >= 8 => data[..8].copy_from_slice(b"conectix"),
                    3 if data.len() >= 8 => { let n = data.len(); data[n - 8..].copy_from_slice(b"conectix") }
                    _ => {}
                }
                exercise(data);
            }
        }

        /// Opens and, if that works, reads everything and lists ranges: errors are fine.
        pub(crate) fn exercise(data: Vec<u8>) {
            if let Ok(img) = open_reader(Arc::new(data), None) {
                let _ = img.allocated_ranges();
                let size = img.virtual_size().min(64 << 20);
                let mut buf = vec![0u8; 1 << 20];
                let mut at = 0;
                while at < size {
                    let n = (size - at).min(buf.len() as u64) as usize;
                    let _ = img.read_at(&mut buf[..n], at);
                    at += n as u64;
                }
            }
        }

        fn fixture(format: &str, options: &str) -> Vec<u8> {
            let dir = tempfile::tempdir().unwrap();
            let raw_path = dir.path().join("f.raw");
            std::fs::write(&raw_path, sparse_disk(3 << 20, 9)).unwrap();
            let path = dir.path().join("f.img");
            qemu_img(&[
                "convert",
                "-f",
                "raw",
                "-O",
                format,
                "-o",
                options,
                p(&raw_path),
                p(&path),
            ]);
            std::fs::read(&path).unwrap()
        }

        /// Valid images with random bytes changed; the flips aim at the metadata-dense areas
        /// as well as anywhere in the file.
        #[test]
        fn flipped_valid_images() {
            let images = [
                fixture("vpc", "subformat=dynamic"),
                fixture("vpc", "subformat=fixed"),
                fixture("vhdx", "subformat=dynamic,block_size=1M"),
            ];
            let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
                cases: 150,
                ..ProptestConfig::default()
            });
            for image in images {
                let len = image.len();
                let flips = proptest::collection::vec((0usize..len, 0usize..3, any::<u8>()), 1..16);
                runner
                    .run(&flips, |flips| {
                        let mut data = image.clone();
                        for (pos, zone, value) in flips {
                            // zone 0: anywhere; 1: first 512 KiB (VHDX headers, VHD tables); 2: last 4 KiB.
                            let at = match zone {
                                1 => pos % len.min(512 << 10),
                                2 => len - 1 - pos % len.min(4096),
                                _ => pos,
                            };
                            data[at] = value;
                        }
                        exercise(data);
                        Ok(())
                    })
                    .unwrap();
            }
        }
    }
}
