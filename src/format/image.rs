//! The common read interface over every disk image the agent can stream: raw, VHD (fixed,
//! dynamic, differencing) and VHDX (fixed, dynamic).
//!
//! Which format a file is read as ([`SourceFormat`], the agent's `--format`):
//! - `raw`, `vhd`, `vhdx`: as the caller says; a VHD or VHDX that does not parse is an error.
//! - `auto` (the default): a name ending in `.vhd` or `.avhd` must hold a VHD, one ending in
//!   `.vhdx` or `.avhdx` a VHDX (case-insensitive), as Hyper-V reads them; raw is never guessed
//!   for such a name. Any other name is detected from the content:
//!   1. `vhdxfile` at offset 0 → VHDX;
//!   2. `conectix` at offset 0 → dynamic or differencing VHD;
//!   3. `conectix` anywhere in the last 512 bytes → fixed VHD (a footer that is not exactly at
//!      the start of the last 512 bytes is refused as misplaced: the file was cut or padded);
//!   4. a container whose signatures are damaged but whose other structures are intact (a
//!      valid VHDX header at 64 or 128 KiB, a dynamic VHD header at 512) → refused;
//!   5. anything else → raw.
//!
//! A file that looks like a VHD or VHDX but fails validation is an error, never read as raw:
//! streaming a damaged container as if it were the disk would replicate garbage silently.
//! What the specifications let a reader tolerate still opens (one of a VHDX's two headers or
//! region tables damaged, a dynamic VHD's footer at the end damaged in place).
//! Errors carry the file path (or `<reader>` for [`open_reader`]) in their message.

use std::io;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use super::vhd::{DiskType, VhdDisk, VhdError};
use super::vhdx::{Header, VhdxDisk, VhdxError, HEADER_OFFSETS, HEADER_SIZE};
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

/// What an image file is to be read as.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SourceFormat {
    /// From the file name's extension for VHD and VHDX names, otherwise from the content.
    #[default]
    Auto,
    Raw,
    Vhd,
    Vhdx,
}

impl SourceFormat {
    /// What `Auto` means for a file with this name: the container its extension names, or
    /// `Auto` (detect from the content); any other choice is returned as it is.
    pub fn for_path(self, path: &Path) -> SourceFormat {
        if self != SourceFormat::Auto {
            return self;
        }
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        match ext.as_deref() {
            Some("vhd" | "avhd") => SourceFormat::Vhd,
            Some("vhdx" | "avhdx") => SourceFormat::Vhdx,
            _ => SourceFormat::Auto,
        }
    }
}

impl std::str::FromStr for SourceFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(SourceFormat::Auto),
            "raw" => Ok(SourceFormat::Raw),
            "vhd" => Ok(SourceFormat::Vhd),
            "vhdx" => Ok(SourceFormat::Vhdx),
            _ => Err(format!(
                "unknown image format {s:?}: use raw, vhd, vhdx or auto"
            )),
        }
    }
}

impl std::fmt::Display for SourceFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SourceFormat::Auto => "auto",
            SourceFormat::Raw => "raw",
            SourceFormat::Vhd => "vhd",
            SourceFormat::Vhdx => "vhdx",
        })
    }
}

/// What a refusal suggests when the file may really be a raw disk.
const RAW_HINT: &str = "if this really is a raw disk, pass --format raw";

/// Errors from opening or reading an image; `origin` is the file path or `<reader>`.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The file was to be read as `expected` (its name or `--format` says so) and is not one.
    #[error("{origin}: not a {expected} file: {problem}; {hint}")]
    NotContainer {
        origin: String,
        expected: &'static str,
        problem: String,
        hint: &'static str,
    },
    /// Detected from the content: a container whose signatures are damaged.
    #[error("{origin}: {problem}; {RAW_HINT}")]
    DamagedContainer { origin: String, problem: String },
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

/// Opens the image at `path` as [`SourceFormat::Auto`] reads it.
pub fn open(path: &Path) -> Result<Box<dyn DiskImage>, ImageError> {
    open_as(path, SourceFormat::Auto)
}

/// Opens the image at `path` as `format` (module documentation). A differencing VHD's parent
/// is looked for in the same directory.
pub fn open_as(path: &Path, format: SourceFormat) -> Result<Box<dyn DiskImage>, ImageError> {
    let origin = path.display().to_string();
    let file = std::fs::File::open(path).map_err(|error| ImageError::Io {
        origin: origin.clone(),
        what: "opening",
        error,
    })?;
    open_with(Arc::new(file), path.parent(), origin, format.for_path(path))
}

/// Opens an image from any positional reader, detecting its format from the content;
/// `parent_dir` is where a differencing VHD's parent is looked for (without it, differencing
/// disks fail with `ParentNotFound`).
pub fn open_reader(
    r: Arc<dyn ReadAt>,
    parent_dir: Option<&Path>,
) -> Result<Box<dyn DiskImage>, ImageError> {
    open_reader_as(r, parent_dir, SourceFormat::Auto)
}

/// [`open_reader`] as `format` (there is no name, so `Auto` detects from the content).
pub fn open_reader_as(
    r: Arc<dyn ReadAt>,
    parent_dir: Option<&Path>,
    format: SourceFormat,
) -> Result<Box<dyn DiskImage>, ImageError> {
    open_with(r, parent_dir, "<reader>".to_string(), format)
}

const VHDX_MAGIC: &[u8; 8] = b"vhdxfile";
const VHD_MAGIC: &[u8; 8] = b"conectix";
/// Cookie of a dynamic VHD's header, at offset 512 in every writer's layout.
const VHD_DYNAMIC_MAGIC: &[u8; 8] = b"cxsparse";

fn open_with(
    r: Arc<dyn ReadAt>,
    parent_dir: Option<&Path>,
    origin: String,
    format: SourceFormat,
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

    let is_vhdx = &head == VHDX_MAGIC;
    let is_vhd = &head == VHD_MAGIC || tail.windows(8).any(|w| w == VHD_MAGIC);
    let not_container = |expected, problem: &str, hint| ImageError::NotContainer {
        origin: origin.clone(),
        expected,
        problem: problem.to_string(),
        hint,
    };
    let open_vhdx = |r| -> Result<Box<dyn DiskImage>, ImageError> {
        let disk = VhdxDisk::open(r).map_err(|error| ImageError::Vhdx {
            origin: origin.clone(),
            error,
        })?;
        Ok(Box::new(VhdxImage {
            origin: origin.clone(),
            disk,
        }))
    };
    let open_vhd = |r| -> Result<Box<dyn DiskImage>, ImageError> {
        let disk = VhdDisk::open(r, parent_dir).map_err(|error| ImageError::Vhd {
            origin: origin.clone(),
            error,
        })?;
        Ok(Box::new(VhdImage {
            origin: origin.clone(),
            disk,
        }))
    };
    match format {
        SourceFormat::Vhdx if is_vhdx => open_vhdx(r),
        SourceFormat::Vhdx if is_vhd => Err(not_container(
            "VHDX",
            "it holds a VHD (cookie 'conectix' found)",
            "if that is what it is, pass --format vhd",
        )),
        SourceFormat::Vhdx => Err(not_container(
            "VHDX",
            "signature 'vhdxfile' missing at offset 0",
            RAW_HINT,
        )),
        SourceFormat::Vhd if is_vhdx => Err(not_container(
            "VHD",
            "it holds a VHDX (signature 'vhdxfile' at offset 0)",
            "if that is what it is, pass --format vhdx",
        )),
        SourceFormat::Vhd if is_vhd => open_vhd(r),
        SourceFormat::Vhd => Err(not_container(
            "VHD",
            "cookie 'conectix' missing at offset 0 and in the last 512 bytes",
            RAW_HINT,
        )),
        SourceFormat::Auto if is_vhdx => open_vhdx(r),
        SourceFormat::Auto if is_vhd => open_vhd(r),
        SourceFormat::Auto => match damaged_container(r.as_ref(), len) {
            Some(problem) => Err(ImageError::DamagedContainer { origin, problem }),
            None => Ok(Box::new(RawImage {
                origin,
                file: r,
                size: len,
            })),
        },
        SourceFormat::Raw => Ok(Box::new(RawImage {
            origin,
            file: r,
            size: len,
        })),
    }
}

/// A file without container signatures whose other structures say it is a VHDX or a dynamic
/// VHD: its signatures were damaged, and reading it as raw would replicate the container.
/// Read errors count as "no": the raw reader reports them with context later.
fn damaged_container(r: &dyn ReadAt, len: u64) -> Option<String> {
    let mut header = [0u8; HEADER_SIZE];
    for at in HEADER_OFFSETS {
        if at + HEADER_SIZE as u64 <= len
            && r.read_exact_at(&mut header, at).is_ok()
            && Header::parse(&header).is_ok()
        {
            return Some(format!(
                "it looks like a VHDX whose signature 'vhdxfile' at offset 0 is damaged (a valid VHDX header is at offset {at})"
            ));
        }
    }
    let mut cookie = [0u8; 8];
    if len >= 2048 && r.read_exact_at(&mut cookie, 512).is_ok() && &cookie == VHD_DYNAMIC_MAGIC {
        return Some(
            "it looks like a dynamic VHD whose footers are damaged (cookie 'conectix' missing at offset 0 and at the end, dynamic header 'cxsparse' at offset 512)"
                .to_string(),
        );
    }
    None
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
    use std::path::{Path, PathBuf};
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

    /// Converts `raw` with qemu-img into `dir/name` and returns the path.
    pub fn qemu_convert(
        dir: &Path,
        raw: &[u8],
        format: &str,
        options: &str,
        name: &str,
    ) -> PathBuf {
        let raw_path = dir.join(format!("{name}.src"));
        std::fs::write(&raw_path, raw).unwrap();
        let path = dir.join(name);
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
        path
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
    use std::path::PathBuf;

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
        let path = dir.path().join("disk.img");
        let data = random_bytes(3 * 4096 + 17, 7);
        std::fs::write(&path, &data).unwrap();
        let img = open(&path).unwrap();
        assert_eq!(img.format(), ImageFormat::Raw);
        assert_eq!(read_all(img.as_ref()), data);
        assert_eq!(img.allocated_ranges().unwrap(), vec![0..data.len() as u64]);
        let mut buf = [0u8; 2];
        let err = img.read_at(&mut buf, data.len() as u64 - 1).unwrap_err();
        assert!(matches!(err, ImageError::OutOfRange { .. }), "{err}");
        assert!(err.to_string().contains("disk.img"), "{err}");

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

    /// The same 3 MiB disk as a dynamic VHDX and a dynamic VHD in `dir`, and the offset of
    /// the VHD's footer at the end.
    fn dynamic_pair(dir: &Path, seed: u64) -> (PathBuf, PathBuf, u64) {
        let sparse = sparse_disk(3 << 20, seed);
        let options = "subformat=dynamic,block_size=1M";
        let vhdx = qemu_convert(dir, &sparse, "vhdx", options, &format!("{seed}.vhdx"));
        let vhd = qemu_convert(
            dir,
            &sparse,
            "vpc",
            "subformat=dynamic",
            &format!("{seed}.vhd"),
        );
        let vhd_end = std::fs::metadata(&vhd).unwrap().len() - 512;
        (vhdx, vhd, vhd_end)
    }

    fn copy_with(from: &Path, to: &Path, edits: &[(u64, &[u8])]) -> PathBuf {
        let mut data = std::fs::read(from).unwrap();
        for &(at, bytes) in edits {
            let at = at as usize;
            data[at..at + bytes.len()].copy_from_slice(bytes);
        }
        std::fs::write(to, data).unwrap();
        to.to_path_buf()
    }

    #[test]
    fn container_names_are_never_read_as_raw() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let data = random_bytes(1 << 20, 5);
        for (name, expected, problem) in [
            ("x.vhdx", "VHDX", "signature 'vhdxfile' missing at offset 0"),
            ("X.VHDX", "VHDX", "signature 'vhdxfile' missing at offset 0"),
            (
                "x.avhdx",
                "VHDX",
                "signature 'vhdxfile' missing at offset 0",
            ),
            (
                "x.vhd",
                "VHD",
                "cookie 'conectix' missing at offset 0 and in the last 512 bytes",
            ),
            (
                "x.Vhd",
                "VHD",
                "cookie 'conectix' missing at offset 0 and in the last 512 bytes",
            ),
        ] {
            let path = d.join(name);
            std::fs::write(&path, &data).unwrap();
            let err = open(&path).err().unwrap();
            assert!(
                matches!(err, ImageError::NotContainer { expected: e, .. } if e == expected),
                "{name}: {err}"
            );
            let msg = err.to_string();
            assert!(
                msg.starts_with(&format!(
                    "{}: not a {expected} file: {problem}",
                    path.display()
                )) && msg.ends_with("if this really is a raw disk, pass --format raw"),
                "{msg}"
            );
            // Whoever means raw says so.
            let img = open_as(&path, SourceFormat::Raw).unwrap();
            assert_eq!(img.format(), ImageFormat::Raw);
            assert_eq!(read_all(img.as_ref()), data);
        }
        // One container named as the other: refused, naming the format to pass.
        let sparse = sparse_disk(3 << 20, 4);
        let vhdx_named_vhd =
            qemu_convert(d, &sparse, "vhdx", "subformat=dynamic", "vhdx-inside.vhd");
        let err = open(&vhdx_named_vhd).err().unwrap();
        assert!(err.to_string().contains("it holds a VHDX"), "{err}");
        assert!(err.to_string().ends_with("pass --format vhdx"), "{err}");
        let img = open_as(&vhdx_named_vhd, SourceFormat::Vhdx).unwrap();
        assert_eq!(img.format(), ImageFormat::VhdxDynamic);
        let vhd_named_vhdx =
            qemu_convert(d, &sparse, "vpc", "subformat=dynamic", "vhd-inside.vhdx");
        let err = open(&vhd_named_vhdx).err().unwrap();
        assert!(err.to_string().ends_with("pass --format vhd"), "{err}");
        // A name that says nothing leaves the content to decide.
        assert_eq!(
            SourceFormat::Auto.for_path(Path::new("disk.raw")),
            SourceFormat::Auto
        );
        assert_eq!("VHDX".parse::<SourceFormat>(), Ok(SourceFormat::Vhdx));
        assert!("qcow2".parse::<SourceFormat>().is_err());
    }

    /// Damaged signatures with the rest of the container intact: refused whatever the name,
    /// never replicated as the container's bytes.
    #[test]
    fn damaged_signatures_are_refused_whatever_the_name() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let (vhdx, vhd, vhd_end) = dynamic_pair(d, 6);
        let bad_vhdx = [(0u64, &b"XXXXXXXX"[..])];
        let bad_vhd = [(0u64, &b"XXXXXXXX"[..]), (vhd_end, &b"XXXXXXXX"[..])];
        for (name, from, edits, problem, expected) in [
            (
                "b.vhdx",
                &vhdx,
                &bad_vhdx[..],
                "signature 'vhdxfile' missing",
                "VHDX",
            ),
            (
                "b.vhd",
                &vhd,
                &bad_vhd[..],
                "cookie 'conectix' missing",
                "VHD",
            ),
        ] {
            let path = copy_with(from, &d.join(name), edits);
            let err = open(&path).err().unwrap();
            assert!(
                matches!(err, ImageError::NotContainer { expected: e, .. } if e == expected),
                "{name}: {err}"
            );
            assert!(err.to_string().contains(problem), "{err}");
        }
        for (name, from, edits, problem) in [
            (
                "b-vhdx.img",
                &vhdx,
                &bad_vhdx[..],
                "a valid VHDX header is at offset 65536",
            ),
            (
                "b-vhd.img",
                &vhd,
                &bad_vhd[..],
                "dynamic header 'cxsparse' at offset 512",
            ),
        ] {
            let path = copy_with(from, &d.join(name), edits);
            let err = open(&path).err().unwrap();
            assert!(
                matches!(err, ImageError::DamagedContainer { .. }),
                "{name}: {err}"
            );
            let msg = err.to_string();
            assert!(msg.contains(problem) && msg.contains(name), "{msg}");
            assert!(
                msg.ends_with("if this really is a raw disk, pass --format raw"),
                "{msg}"
            );
            assert_eq!(
                open_as(&path, SourceFormat::Raw).unwrap().format(),
                ImageFormat::Raw
            );
        }
    }

    /// What the specifications let a reader survive still opens under a container name: one
    /// of a VHDX's two headers damaged, a dynamic VHD's end footer damaged in place.
    #[test]
    fn damage_the_formats_tolerate_still_opens() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let (vhdx, vhd, vhd_end) = dynamic_pair(d, 8);
        for (name, from, at) in [
            ("header1.vhdx", &vhdx, 64 << 10),
            ("header2.vhdx", &vhdx, 128 << 10),
            ("footer.vhd", &vhd, vhd_end),
        ] {
            let expected = read_all(open(from).unwrap().as_ref());
            let path = copy_with(from, &d.join(name), &[(at, &b"XXXX"[..])]);
            let img = open(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(
                read_all(img.as_ref()) == expected,
                "{name}: contents differ"
            );
        }
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
            let disk = sparse_disk(3 << 20, 9);
            std::fs::read(qemu_convert(dir.path(), &disk, format, options, "f.img")).unwrap()
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
