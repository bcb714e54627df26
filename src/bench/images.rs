//! Test images for the harness, and the views the agents read them through.
//!
//! Generated images are raw files cached in `<work>/images/<kind>-<bytes>.img`, written under a
//! `.partial` name and renamed when complete, so an interrupted generation is never reused:
//!
//! * `ext4`: `mkfs.ext4 -q -F -d TREE IMAGE SIZE` over a tree of real installed files, so the
//!   image looks like a disk: file data (ELF libraries, text, compressed archives, locale
//!   files), metadata, and free space that reads as zeros. The tree takes files from `/usr/share`
//!   and `/usr/lib` alternately (sorted walk, so the same machine gives the same image) until
//!   their sizes, rounded up to 4 KiB, reach 65% of the image: a fairly full disk that still
//!   leaves mkfs room for its metadata. Files are hard-linked into the tree (copied where a link
//!   is refused) and the tree is removed once the image exists. A sidecar `.json` records what
//!   went in, so a cached image reports the same.
//! * `random`: incompressible bytes from a fixed-seed wyrand generator (several GB/s: the image
//!   is written faster than /dev/urandom could fill it, and is identical on every run).
//! * `zero`: a sparse file of the given size.
//!
//! [`ensure_spread`] writes a base image's 4 MiB blocks evenly spaced over a larger raw file,
//! with holes or written zeros between them (`bench ingest --sparse-to`), cached the same way.
//!
//! [`DistinctImage`] gives each agent its own variant of one image; [`PrefixImage`] a short
//! view for the warm-up run.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::report::ImageInfo;
use super::{io_err, BenchError};
use crate::format::image::{DiskImage, ImageError, ImageFormat};

/// Share of an ext4 image filled with file data (documented in the module doc and the report).
pub const EXT4_FILL_PERCENT: u64 = 65;

/// What to generate.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageKind {
    Ext4,
    Random,
    Zero,
}

impl ImageKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ImageKind::Ext4 => "ext4",
            ImageKind::Random => "random",
            ImageKind::Zero => "zero",
        }
    }
}

/// A generated (or cached) image and what is in it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GeneratedImage {
    pub path: PathBuf,
    pub kind: ImageKind,
    pub size: u64,
    /// Bytes of file data put in an ext4 image, and how many files.
    pub file_bytes: Option<u64>,
    pub files: Option<u64>,
    /// True when this invocation generated it (false: taken from the cache); not stored.
    #[serde(skip)]
    pub generated_now: bool,
}

/// Returns the cached image of `kind` and `size` in `work`, generating it first if needed.
pub fn ensure_image(work: &Path, kind: ImageKind, size: u64) -> Result<GeneratedImage, BenchError> {
    if size % 4096 != 0 {
        return Err(BenchError::Invalid(format!(
            "--size {size}: a generated image must be a whole number of 4 KiB blocks"
        )));
    }
    if kind == ImageKind::Ext4 && size < (16 << 20) {
        return Err(BenchError::Invalid(format!(
            "--size {size}: an ext4 image needs at least 16 MiB"
        )));
    }
    let dir = work.join("images");
    std::fs::create_dir_all(&dir).map_err(io_err("creating", &dir))?;
    let stem = format!("{}-{size}", kind.as_str());
    let path = dir.join(format!("{stem}.img"));
    let meta_path = dir.join(format!("{stem}.json"));
    if let (Ok(m), Ok(text)) = (
        std::fs::metadata(&path),
        std::fs::read_to_string(&meta_path),
    ) {
        if let Ok(mut g) = serde_json::from_str::<GeneratedImage>(&text) {
            if m.len() == size && g.size == size && g.kind == kind {
                g.path = path;
                g.generated_now = false;
                return Ok(g);
            }
        }
    }
    let partial = dir.join(format!("{stem}.img.partial"));
    let _ = std::fs::remove_file(&partial);
    let (file_bytes, files) = match kind {
        ImageKind::Zero => {
            let f = std::fs::File::create(&partial).map_err(io_err("creating", &partial))?;
            f.set_len(size).map_err(io_err("sizing", &partial))?;
            (None, None)
        }
        ImageKind::Random => {
            write_random(&partial, size, 0x6472_7661_756c_7421 ^ size)?;
            (None, None)
        }
        ImageKind::Ext4 => {
            let tree = dir.join(format!("{stem}.tree"));
            let (bytes, n) = build_ext4(&tree, &partial, size)?;
            (Some(bytes), Some(n))
        }
    };
    std::fs::rename(&partial, &path).map_err(io_err("renaming", &partial))?;
    let g = GeneratedImage {
        path: path.clone(),
        kind,
        size,
        file_bytes,
        files,
        generated_now: true,
    };
    let text = serde_json::to_vec_pretty(&g)
        .map_err(|e| BenchError::Invalid(format!("encoding image metadata: {e}")))?;
    std::fs::write(&meta_path, text).map_err(io_err("writing", &meta_path))?;
    Ok(g)
}

/// Which image a benchmark runs on (flattened into each `bench` subcommand).
#[derive(clap::Args, Debug, Clone)]
pub struct ImageArgs {
    /// Image to generate when --image is not given: ext4 (mkfs.ext4 over ~65% of real files
    /// from /usr), random (incompressible) or zero (sparse).
    #[arg(long, value_enum, default_value_t = ImageKind::Ext4, conflicts_with = "image")]
    pub kind: ImageKind,
    /// Size of the generated image (2GiB, 512M, 1.5G; GB/MB are SI units).
    #[arg(long, default_value = "2GiB", value_parser = super::parse_size_arg, conflicts_with = "image")]
    pub size: u64,
    /// Use this image (raw, VHD or VHDX) instead of generating one.
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// Where images are cached and runs keep their data (default $TMPDIR/drvault-bench).
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
}

/// The image a benchmark runs on, ready to read.
pub struct Prepared {
    /// The work directory (created).
    pub work: PathBuf,
    pub path: PathBuf,
    pub info: ImageInfo,
    pub image: Arc<dyn DiskImage>,
}

/// Creates the work directory (default [`super::default_work_dir`]) and opens the given
/// image, or the cached or newly generated one of the asked kind and size.
pub async fn prepare(a: &ImageArgs) -> Result<Prepared, BenchError> {
    let (kind, size) = (a.kind, a.size);
    let work = a.work_dir.clone().unwrap_or_else(super::default_work_dir);
    std::fs::create_dir_all(&work).map_err(io_err("creating", &work))?;
    let (path, mut info) = match &a.image {
        Some(p) => (p.clone(), ImageInfo::given(p)),
        None => {
            eprintln!(
                "bench: preparing the {} image of {} in {}",
                kind.as_str(),
                crate::util::human_bytes(size),
                work.display()
            );
            let w = work.clone();
            let g = tokio::task::spawn_blocking(move || ensure_image(&w, kind, size))
                .await
                .map_err(|e| BenchError::Invalid(format!("image generation stopped: {e}")))??;
            (g.path.clone(), ImageInfo::generated(&g))
        }
    };
    let image: Arc<dyn DiskImage> = Arc::from(crate::format::image::open(&path)?);
    info.virtual_size = image.virtual_size();
    info.format = format!("{:?}", image.format());
    Ok(Prepared {
        work,
        path,
        info,
        image,
    })
}

/// Reads a file once so every measurement starts with it in the page cache.
pub fn warm_page_cache(p: &Path) -> Result<(), BenchError> {
    let mut f = std::fs::File::open(p).map_err(io_err("opening", p))?;
    std::io::copy(&mut f, &mut std::io::sink()).map_err(io_err("reading", p))?;
    Ok(())
}

/// Writes `image` as a raw file at `out` (zero 1 MiB pieces left as holes) and fsyncs it:
/// the plaintext image that file-level baselines work on.
pub fn write_raw(image: &dyn DiskImage, out: &Path) -> Result<(), BenchError> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(out).map_err(io_err("creating", out))?;
    let size = image.virtual_size();
    f.set_len(size).map_err(io_err("sizing", out))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    while pos < size {
        let n = usize::try_from((size - pos).min(buf.len() as u64)).unwrap_or(buf.len());
        let chunk = buf.get_mut(..n).unwrap_or(&mut []);
        image.read_at(chunk, pos)?;
        if !crate::chunk::digest::is_zero(chunk) {
            f.write_all_at(chunk, pos).map_err(io_err("writing", out))?;
        }
        pos += n as u64;
    }
    f.sync_all().map_err(io_err("syncing", out))
}

/// Offset of the first byte where the first `len` bytes of two files differ (None: equal).
pub fn first_difference(a: &Path, b: &Path, len: u64) -> Result<Option<u64>, BenchError> {
    use std::os::unix::fs::FileExt;
    let fa = std::fs::File::open(a).map_err(io_err("opening", a))?;
    let fb = std::fs::File::open(b).map_err(io_err("opening", b))?;
    let (mut ba, mut bb) = (vec![0u8; 4 << 20], vec![0u8; 4 << 20]);
    let mut pos = 0u64;
    while pos < len {
        let n = usize::try_from((len - pos).min(ba.len() as u64)).unwrap_or(ba.len());
        let (ca, cb) = (
            ba.get_mut(..n).unwrap_or(&mut []),
            bb.get_mut(..n).unwrap_or(&mut []),
        );
        fa.read_exact_at(ca, pos).map_err(io_err("reading", a))?;
        fb.read_exact_at(cb, pos).map_err(io_err("reading", b))?;
        if ca != cb {
            let at = ca
                .iter()
                .zip(cb.iter())
                .position(|(x, y)| x != y)
                .unwrap_or(0);
            return Ok(Some(pos + at as u64));
        }
        pos += n as u64;
    }
    Ok(None)
}

/// The wyrand generator: 64-bit state, passes BigCrush, one multiply per 8 bytes.
pub struct WyRand(u64);

impl WyRand {
    pub fn new(seed: u64) -> WyRand {
        WyRand(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0xa076_1d64_78bd_642f);
        let t = u128::from(self.0) * u128::from(self.0 ^ 0xe703_7ed1_a0b4_28db);
        ((t >> 64) as u64) ^ (t as u64)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for c in chunks.by_ref() {
            c.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        let last = self.next_u64().to_le_bytes();
        let n = rest.len();
        rest.copy_from_slice(last.get(..n).unwrap_or(&[]));
    }
}

fn write_random(path: &Path, size: u64, seed: u64) -> Result<(), BenchError> {
    use std::io::Write;
    let f = std::fs::File::create(path).map_err(io_err("creating", path))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
    let mut rng = WyRand::new(seed);
    let mut buf = vec![0u8; 4 << 20];
    let mut left = size;
    while left > 0 {
        let n = usize::try_from(left.min(buf.len() as u64)).unwrap_or(buf.len());
        let chunk = buf.get_mut(..n).unwrap_or(&mut []);
        rng.fill(chunk);
        w.write_all(chunk).map_err(io_err("writing", path))?;
        left -= n as u64;
    }
    w.flush().map_err(io_err("writing", path))
}

/// Regular files under `root` in sorted order (symlinks and special files skipped; unreadable
/// directories skipped silently: the selection only needs to be large, not complete).
pub fn walk_files(root: &Path) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut entries: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
        entries.sort();
        let mut subdirs = Vec::new();
        for p in entries {
            let Ok(m) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            if m.is_dir() {
                subdirs.push(p);
            } else if m.is_file() {
                out.push((p, m.len()));
            }
        }
        // Reverse so the stack pops subdirectories in sorted order.
        stack.extend(subdirs.into_iter().rev());
    }
    out
}

/// Picks files alternately from each list until `budget` bytes (sizes rounded up to 4 KiB) or
/// `max_files` is reached; files that would overshoot are skipped and smaller ones still taken.
pub fn select_files(
    lists: &[Vec<(PathBuf, u64)>],
    budget: u64,
    max_files: usize,
) -> Vec<(PathBuf, u64)> {
    let mut picked = Vec::new();
    let mut used = 0u64;
    let longest = lists.iter().map(Vec::len).max().unwrap_or(0);
    'outer: for i in 0..longest {
        for list in lists {
            let Some((p, len)) = list.get(i) else {
                continue;
            };
            let rounded = len.div_ceil(4096).saturating_mul(4096).max(4096);
            if used.saturating_add(rounded) > budget {
                continue;
            }
            used += rounded;
            picked.push((p.clone(), *len));
            if picked.len() >= max_files || budget - used < 4096 {
                break 'outer;
            }
        }
    }
    picked
}

/// Builds the tree of real files and runs mkfs.ext4 over it. Returns (file bytes, files).
fn build_ext4(tree: &Path, image: &Path, size: u64) -> Result<(u64, u64), BenchError> {
    if tree.exists() {
        std::fs::remove_dir_all(tree).map_err(io_err("removing old tree", tree))?;
    }
    std::fs::create_dir_all(tree).map_err(io_err("creating", tree))?;
    let lists = [
        walk_files(Path::new("/usr/share")),
        walk_files(Path::new("/usr/lib")),
    ];
    let budget = size / 100 * EXT4_FILL_PERCENT;
    // mkfs gives one inode per 16 KiB (4 KiB for small file systems); directories need
    // inodes too, so take at most half as many files.
    let max_files = usize::try_from(size / 16384 / 2).unwrap_or(usize::MAX);
    let picked = select_files(&lists, budget, max_files);
    let mut bytes = 0u64;
    let mut files = 0u64;
    for (src, len) in &picked {
        let rel = src.strip_prefix("/").unwrap_or(src);
        let dst = tree.join(rel);
        if let Some(parent) = dst.parent() {
            std::fs::create_dir_all(parent).map_err(io_err("creating", parent))?;
        }
        // A link is instant and costs no space; across file systems (or where the kernel's
        // protected_hardlinks refuses) the file is copied; unreadable files are left out.
        if std::fs::hard_link(src, &dst).is_err() && std::fs::copy(src, &dst).is_err() {
            continue;
        }
        bytes += len;
        files += 1;
    }
    let out = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(tree)
        .arg(image)
        .arg(format!("{}k", size / 1024))
        .output()
        .map_err(|e| BenchError::Tool {
            tool: "mkfs.ext4".into(),
            message: format!("cannot run it ({e}); install e2fsprogs"),
        })?;
    let _ = std::fs::remove_dir_all(tree);
    if !out.status.success() {
        return Err(BenchError::Tool {
            tool: "mkfs.ext4".into(),
            message: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok((bytes, files))
}

/// Block unit of a spread image: the server's block size, so each block of the base image
/// stays one block of the spread image (same data blocks, same hashes, same uploads).
pub const SPREAD_BLOCK: u64 = 4 << 20;

/// What fills a spread image between the base image's blocks.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Gaps {
    /// Never written: the file system reports them as holes (`SEEK_HOLE`).
    Holes,
    /// Written zeros: allocated on disk, so only reading them shows they are empty.
    Zeros,
}

impl Gaps {
    pub fn as_str(self) -> &'static str {
        match self {
            Gaps::Holes => "holes",
            Gaps::Zeros => "zeros",
        }
    }
}

/// A base image's data blocks spread over a larger raw file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SpreadImage {
    pub path: PathBuf,
    pub size: u64,
    pub gaps: Gaps,
    pub base_size: u64,
    /// Modification time of the base image (ns since the epoch) when this was made: a
    /// regenerated base invalidates the cached spread image.
    pub base_mtime_ns: u128,
    /// Non-zero 4 MiB blocks copied from the base (the zero ones are gaps like the rest).
    pub data_blocks: u64,
    #[serde(skip)]
    pub generated_now: bool,
}

/// Block `i` of a base image of `n` blocks lands at block `spread_slot(i, n, m)` of an `m`-block
/// spread image: evenly spaced, first block at 0, strictly increasing when `m >= n`.
pub fn spread_slot(i: u64, n: u64, m: u64) -> u64 {
    if n == 0 {
        return 0;
    }
    // i < n and m < 2^52 (sizes are u64 bytes / 4 MiB): the product fits a u128 easily.
    u64::try_from(u128::from(i) * u128::from(m) / u128::from(n)).unwrap_or(u64::MAX)
}

fn mtime_ns(m: &std::fs::Metadata) -> u128 {
    m.modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// Returns the cached spread of the raw image `base` (named `stem` in `work/images`) over `size`
/// bytes with `gaps` between its blocks, making it first if needed. Every non-zero 4 MiB block
/// of the base is written at its [`spread_slot`]; so the spread image holds exactly the base's
/// data bytes, spaced out (rather than data followed by one long hole, which a reader could
/// skip in one step). With `Gaps::Zeros` every other block is written with zeros.
pub fn ensure_spread(
    work: &Path,
    base: &Path,
    stem: &str,
    size: u64,
    gaps: Gaps,
) -> Result<SpreadImage, BenchError> {
    let bm = std::fs::metadata(base).map_err(io_err("reading", base))?;
    let base_size = bm.len();
    if base_size % SPREAD_BLOCK != 0 || size % SPREAD_BLOCK != 0 || size < base_size {
        return Err(BenchError::Invalid(format!(
            "--sparse-to {size} over a {base_size}-byte image: both must be whole 4 MiB blocks \
             and the spread image at least as large"
        )));
    }
    let dir = work.join("images");
    std::fs::create_dir_all(&dir).map_err(io_err("creating", &dir))?;
    let name = format!("{stem}-spread-{size}-{}", gaps.as_str());
    let path = dir.join(format!("{name}.img"));
    let meta_path = dir.join(format!("{name}.json"));
    let base_mtime_ns = mtime_ns(&bm);
    if let (Ok(m), Ok(text)) = (
        std::fs::metadata(&path),
        std::fs::read_to_string(&meta_path),
    ) {
        if let Ok(mut s) = serde_json::from_str::<SpreadImage>(&text) {
            if m.len() == size
                && s.size == size
                && s.gaps == gaps
                && s.base_size == base_size
                && s.base_mtime_ns == base_mtime_ns
            {
                s.path = path;
                s.generated_now = false;
                return Ok(s);
            }
        }
    }
    let partial = dir.join(format!("{name}.img.partial"));
    let _ = std::fs::remove_file(&partial);
    let data_blocks = write_spread(base, &partial, base_size, size, gaps)?;
    std::fs::rename(&partial, &path).map_err(io_err("renaming", &partial))?;
    let s = SpreadImage {
        path,
        size,
        gaps,
        base_size,
        base_mtime_ns,
        data_blocks,
        generated_now: true,
    };
    let text = serde_json::to_vec_pretty(&s)
        .map_err(|e| BenchError::Invalid(format!("encoding image metadata: {e}")))?;
    std::fs::write(&meta_path, text).map_err(io_err("writing", &meta_path))?;
    Ok(s)
}

fn write_spread(
    base: &Path,
    out: &Path,
    base_size: u64,
    size: u64,
    gaps: Gaps,
) -> Result<u64, BenchError> {
    use std::os::unix::fs::FileExt;
    let src = std::fs::File::open(base).map_err(io_err("opening", base))?;
    let dst = std::fs::File::create(out).map_err(io_err("creating", out))?;
    dst.set_len(size).map_err(io_err("sizing", out))?;
    let (n, m) = (base_size / SPREAD_BLOCK, size / SPREAD_BLOCK);
    let mut buf = vec![0u8; SPREAD_BLOCK as usize];
    let zeros = vec![0u8; SPREAD_BLOCK as usize];
    let mut copied = 0u64;
    // Slots strictly increase, so the gaps are the blocks between consecutive slots.
    let mut next_gap = 0u64;
    let fill_to = |end: u64, next_gap: &mut u64| -> Result<(), BenchError> {
        if gaps == Gaps::Zeros {
            for j in *next_gap..end {
                dst.write_all_at(&zeros, j * SPREAD_BLOCK)
                    .map_err(io_err("writing", out))?;
            }
        }
        *next_gap = end;
        Ok(())
    };
    for i in 0..n {
        src.read_exact_at(&mut buf, i * SPREAD_BLOCK)
            .map_err(io_err("reading", base))?;
        let slot = spread_slot(i, n, m);
        fill_to(slot, &mut next_gap)?;
        // A zero block of the base is a gap of the spread image like the others.
        if crate::chunk::digest::is_zero(&buf) {
            fill_to(slot + 1, &mut next_gap)?;
        } else {
            dst.write_all_at(&buf, slot * SPREAD_BLOCK)
                .map_err(io_err("writing", out))?;
            copied += 1;
            next_gap = slot + 1;
        }
    }
    fill_to(m, &mut next_gap)?;
    // Written now so that the write-back does not run during the measured replications.
    dst.sync_all().map_err(io_err("syncing", out))?;
    Ok(copied)
}

/// Reads the blocks of `s` that hold the base's data (all of it for `Gaps::Zeros`), so the
/// measured runs read from the page cache without populating it with the holes.
pub fn warm_spread(s: &SpreadImage) -> Result<(), BenchError> {
    use std::os::unix::fs::FileExt;
    if s.gaps == Gaps::Zeros {
        return warm_page_cache(&s.path);
    }
    let f = std::fs::File::open(&s.path).map_err(io_err("opening", &s.path))?;
    let (n, m) = (s.base_size / SPREAD_BLOCK, s.size / SPREAD_BLOCK);
    let mut buf = vec![0u8; SPREAD_BLOCK as usize];
    for i in 0..n {
        f.read_exact_at(&mut buf, spread_slot(i, n, m) * SPREAD_BLOCK)
            .map_err(io_err("reading", &s.path))?;
    }
    Ok(())
}

/// Page size of the per-agent variation.
pub const DISTINCT_PAGE: u64 = 4096;

/// One agent's variant of a shared image: the first byte of every 4 KiB page that holds data is
/// XORed with the agent's salt (1..=255). Zero pages stay zero (so zero blocks are still skipped),
/// compressibility is unchanged (one byte per page), identical blocks within one image stay
/// identical (the change depends on the salt, not the offset), but no block of one agent equals
/// a block of another. A data page whose only non-zero byte is its first and equals the salt
/// becomes zero: rare enough not to move the figures. The variation is decided per whole page,
/// so reads must be page-aligned (the agent reads whole blocks) for it to be stable.
pub struct DistinctImage {
    inner: Arc<dyn DiskImage>,
    salt: u8,
}

impl DistinctImage {
    pub fn new(inner: Arc<dyn DiskImage>, salt: u8) -> Result<DistinctImage, BenchError> {
        if salt == 0 {
            return Err(BenchError::Invalid(
                "distinct image salt must be 1-255 (0 would leave the image unchanged)".into(),
            ));
        }
        Ok(DistinctImage { inner, salt })
    }
}

impl DiskImage for DistinctImage {
    fn format(&self) -> ImageFormat {
        self.inner.format()
    }

    fn virtual_size(&self) -> u64 {
        self.inner.virtual_size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), ImageError> {
        self.inner.read_at(buf, offset)?;
        // Skip to the first page boundary at or after `offset`.
        let skip = ((DISTINCT_PAGE - offset % DISTINCT_PAGE) % DISTINCT_PAGE) as usize;
        if let Some(rest) = buf.get_mut(skip..) {
            for page in rest.chunks_mut(DISTINCT_PAGE as usize) {
                if !crate::chunk::digest::is_zero(page) {
                    if let Some(b) = page.first_mut() {
                        *b ^= self.salt;
                    }
                }
            }
        }
        Ok(())
    }

    fn allocated_ranges(&self) -> Result<Vec<Range<u64>>, ImageError> {
        self.inner.allocated_ranges()
    }
}

/// The first `len` bytes of an image (rounded down to whole sectors): the warm-up run.
pub struct PrefixImage {
    inner: Arc<dyn DiskImage>,
    len: u64,
}

impl PrefixImage {
    pub fn new(inner: Arc<dyn DiskImage>, len: u64) -> PrefixImage {
        let len = (len.min(inner.virtual_size()) / 512) * 512;
        PrefixImage { inner, len }
    }
}

impl DiskImage for PrefixImage {
    fn format(&self) -> ImageFormat {
        self.inner.format()
    }

    fn virtual_size(&self) -> u64 {
        self.len
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), ImageError> {
        let end = offset.checked_add(buf.len() as u64);
        if end.is_none_or(|e| e > self.len) {
            return Err(ImageError::OutOfRange {
                origin: "<prefix view>".into(),
                offset,
                len: buf.len() as u64,
                size: self.len,
            });
        }
        self.inner.read_at(buf, offset)
    }

    fn allocated_ranges(&self) -> Result<Vec<Range<u64>>, ImageError> {
        Ok(self
            .inner
            .allocated_ranges()?
            .into_iter()
            .filter(|r| r.start < self.len)
            .map(|r| r.start..r.end.min(self.len))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An in-memory raw disk.
    fn mem(data: Vec<u8>) -> Arc<dyn DiskImage> {
        Arc::from(crate::format::image::open_reader(Arc::new(data), None).unwrap())
    }

    #[test]
    fn distinct_variants_differ_but_keep_zeros() {
        let mut data = vec![0u8; 4 * 4096];
        data[4096 + 10] = 7; // page 1 has data; pages 0, 2, 3 are zero
        data[3 * 4096] = 9; // page 3 has data in its first byte
        let base = mem(data.clone());
        let a = DistinctImage::new(base.clone(), 1).unwrap();
        let b = DistinctImage::new(base, 2).unwrap();
        let (mut ra, mut rb) = (vec![0u8; data.len()], vec![0u8; data.len()]);
        a.read_at(&mut ra, 0).unwrap();
        b.read_at(&mut rb, 0).unwrap();
        assert_ne!(ra, rb);
        assert!(ra[..4096].iter().all(|&x| x == 0), "zero page stays zero");
        assert!(ra[2 * 4096..3 * 4096].iter().all(|&x| x == 0));
        assert_eq!((ra[4096], rb[4096]), (1, 2));
        assert_eq!(ra[4096 + 10], 7, "only the page's first byte changes");
        assert_eq!((ra[3 * 4096], rb[3 * 4096]), (9 ^ 1, 9 ^ 2));
        // Reading a page-aligned part gives the same bytes as the whole read.
        let mut part = vec![0u8; 4096];
        a.read_at(&mut part, 4096).unwrap();
        assert_eq!(part, ra[4096..2 * 4096]);
    }

    #[test]
    fn distinct_salt_zero_is_refused() {
        assert!(matches!(
            DistinctImage::new(mem(vec![0u8; 512]), 0),
            Err(BenchError::Invalid(_))
        ));
    }

    #[test]
    fn prefix_view_clips_size_ranges_and_reads() {
        let p = PrefixImage::new(mem(vec![5u8; 8192]), 5000);
        assert_eq!(p.virtual_size(), 4608, "rounded down to sectors");
        assert_eq!(p.allocated_ranges().unwrap(), vec![0..4608]);
        let mut buf = vec![0u8; 512];
        p.read_at(&mut buf, 4096).unwrap();
        assert!(buf.iter().all(|&x| x == 5));
        assert!(matches!(
            p.read_at(&mut buf, 4608),
            Err(ImageError::OutOfRange { .. })
        ));
        assert!(matches!(
            p.read_at(&mut buf, u64::MAX - 10),
            Err(ImageError::OutOfRange { .. })
        ));
    }

    #[test]
    fn file_selection_alternates_and_respects_the_budget() {
        let a: Vec<(PathBuf, u64)> = (0..5).map(|i| (format!("/a{i}").into(), 100)).collect();
        let b: Vec<(PathBuf, u64)> = vec![("/b0".into(), 20000), ("/b1".into(), 1)];
        let picked = select_files(&[a.clone(), b], 5 * 4096, 100);
        let names: Vec<String> = picked
            .iter()
            .map(|(p, _)| p.display().to_string())
            .collect();
        // b0 (5 pages) never fits after a0; b1 does; each small file costs a whole 4 KiB page.
        assert_eq!(names, ["/a0", "/a1", "/b1", "/a2", "/a3"]);
        assert_eq!(select_files(&[a], 1 << 30, 2).len(), 2, "file cap");
    }

    #[test]
    fn random_generator_is_deterministic_and_fills_odd_lengths() {
        let (mut x, mut y) = (vec![0u8; 13], vec![0u8; 13]);
        WyRand::new(1).fill(&mut x);
        WyRand::new(1).fill(&mut y);
        assert_eq!(x, y);
        assert!(x.iter().any(|&b| b != 0));
        let mut z = vec![0u8; 13];
        WyRand::new(2).fill(&mut z);
        assert_ne!(x, z);
    }

    #[test]
    fn raw_copies_compare_equal_and_a_change_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let mut data = vec![0u8; 3 << 20];
        data[(1 << 20) + 5] = 1;
        let out = dir.path().join("copy.raw");
        write_raw(mem(data.clone()).as_ref(), &out).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), data);
        let other = dir.path().join("other.raw");
        data[(2 << 20) + 9] = 7;
        std::fs::write(&other, &data).unwrap();
        assert_eq!(first_difference(&out, &out, 3 << 20).unwrap(), None);
        assert_eq!(
            first_difference(&out, &other, 3 << 20).unwrap(),
            Some((2 << 20) + 9)
        );
        assert_eq!(first_difference(&out, &other, 2 << 20).unwrap(), None);
        assert!(matches!(
            first_difference(&out, &other, 4 << 20),
            Err(BenchError::Io { .. })
        ));
    }

    #[test]
    fn spread_slots_are_even_and_increasing() {
        let slots: Vec<u64> = (0..4).map(|i| spread_slot(i, 4, 16)).collect();
        assert_eq!(slots, [0, 4, 8, 12]);
        assert_eq!(spread_slot(2, 3, 3), 2, "same size: identity");
        let s: Vec<u64> = (0..5).map(|i| spread_slot(i, 5, 7)).collect();
        assert!(s.windows(2).all(|w| w[0] < w[1]) && s[4] < 7, "{s:?}");
    }

    #[test]
    fn spread_images_hold_the_same_blocks_with_holes_or_zeros_between() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let b = SPREAD_BLOCK as usize;
        // Four blocks: data, zero, data, data.
        let mut data = vec![0u8; 4 * b];
        WyRand::new(3).fill(&mut data[..b]);
        WyRand::new(4).fill(&mut data[2 * b..]);
        let base = dir.path().join("base.img");
        std::fs::write(&base, &data).unwrap();
        let size = 16 * SPREAD_BLOCK;
        let h = ensure_spread(dir.path(), &base, "base", size, Gaps::Holes).unwrap();
        let z = ensure_spread(dir.path(), &base, "base", size, Gaps::Zeros).unwrap();
        assert!(h.generated_now && z.generated_now);
        assert_eq!(
            (h.data_blocks, z.data_blocks),
            (3, 3),
            "the zero block is a gap"
        );
        for s in [&h, &z] {
            let out = std::fs::read(&s.path).unwrap();
            assert_eq!(out.len() as u64, size);
            let mut expect = vec![0u8; size as usize];
            for i in 0..4 {
                let at = spread_slot(i, 4, 16) as usize * b;
                expect[at..at + b].copy_from_slice(&data[i as usize * b..(i as usize + 1) * b]);
            }
            assert!(
                out == expect,
                "{:?}: the base's blocks at their slots",
                s.gaps
            );
        }
        // Holes take no space; written zeros take all of it (st_blocks is in 512-byte units).
        let used = |p: &Path| std::fs::metadata(p).unwrap().blocks() * 512;
        assert!(used(&h.path) <= 4 * SPREAD_BLOCK, "{}", used(&h.path));
        assert!(used(&z.path) >= size - SPREAD_BLOCK, "{}", used(&z.path));
        // Cached next time; a changed base makes it again.
        assert!(
            !ensure_spread(dir.path(), &base, "base", size, Gaps::Holes)
                .unwrap()
                .generated_now
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&base, &data).unwrap();
        assert!(
            ensure_spread(dir.path(), &base, "base", size, Gaps::Holes)
                .unwrap()
                .generated_now
        );
    }

    #[test]
    fn spread_sizes_must_be_whole_blocks_and_not_smaller() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.img");
        std::fs::write(&base, vec![1u8; 2 * SPREAD_BLOCK as usize]).unwrap();
        for size in [SPREAD_BLOCK, 3 * SPREAD_BLOCK + 4096] {
            assert!(matches!(
                ensure_spread(dir.path(), &base, "b", size, Gaps::Holes),
                Err(BenchError::Invalid(_))
            ));
        }
        std::fs::write(&base, vec![1u8; 4096]).unwrap();
        assert!(matches!(
            ensure_spread(dir.path(), &base, "b", 4 * SPREAD_BLOCK, Gaps::Holes),
            Err(BenchError::Invalid(_))
        ));
    }

    #[test]
    fn zero_and_random_images_are_generated_once_then_cached() {
        let dir = tempfile::tempdir().unwrap();
        let z = ensure_image(dir.path(), ImageKind::Zero, 1 << 20).unwrap();
        assert!(z.generated_now);
        assert_eq!(std::fs::metadata(&z.path).unwrap().len(), 1 << 20);
        let again = ensure_image(dir.path(), ImageKind::Zero, 1 << 20).unwrap();
        assert!(!again.generated_now);
        let r = ensure_image(dir.path(), ImageKind::Random, 1 << 20).unwrap();
        let data = std::fs::read(&r.path).unwrap();
        assert_eq!(data.len(), 1 << 20);
        let zeros = data.iter().filter(|&&b| b == 0).count();
        assert!(zeros < 10_000, "random data has about 1/256 zero bytes");
        assert!(matches!(
            ensure_image(dir.path(), ImageKind::Zero, 1000),
            Err(BenchError::Invalid(_))
        ));
        assert!(matches!(
            ensure_image(dir.path(), ImageKind::Ext4, 1 << 20),
            Err(BenchError::Invalid(_))
        ));
    }
}
