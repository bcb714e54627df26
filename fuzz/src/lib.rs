//! Helpers shared by the fuzz targets: a sparse in-memory image source, the fixed parent disk
//! of the `vhd` / `image` targets, the fixed test key ring, and the invariant checks run on
//! every disk a reader accepts.
//!
//! Sparse image encoding (what the `vhd`, `vhdx` and `image` targets take as input; made from
//! real files by `fuzz/sparse.py`):
//!
//! ```text
//! u32 LE  file length: bits 0..29 (at most 1 GiB); bit 31 set = fix checksums (below)
//! then records, each:
//!   u32 LE  file offset
//!   u16 LE  n: bit 15 clear → n literal bytes follow;
//!              bit 15 set   → one byte follows, repeated (n & 0x7fff) times
//! ```
//!
//! Everything not covered by a record reads as zero; later records win; bytes past the file
//! length are dropped; a cut record keeps what is there. With bit 31 of the length field set,
//! the decoder then recomputes the checksums that guard the headers, as a writer would:
//! VHDX headers and region tables (CRC-32C), VHD footers (at 0 and at the end) and the
//! dynamic header the first one points at. Without that, a mutation of any header field is
//! refused at the checksum and never reaches the field's own validation. qemu's VHD blocks are 2 MiB and a
//! VHDX is at least 4 MiB, nearly all zeros: fed flat, almost every mutation would land in
//! those zeros, and every execution would copy megabytes. Sparse, a qemu image is a few KiB
//! of headers and tables, which is where the parsers are.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use drvault::chunk::keys::KeyRing;
use drvault::format::ReadAt;

/// Largest file a sparse input describes.
pub const MAX_FILE_LEN: u64 = (1 << 30) - 1;

/// Unique id of the parent disk in [`parent_dir`]: `format::vhd::tests::write_fuzz_seeds`
/// writes differencing seeds that name it.
pub const PARENT_ID: [u8; 16] = [0x5a; 16];
/// Virtual size of that parent (4 MiB, the seed child's size).
pub const PARENT_SIZE: u64 = 4 << 20;
/// File name of the parent; the seeds' locators point at it.
pub const PARENT_NAME: &str = "parent.vhd";

/// Master keys of the fuzz key ring (ids 1 and 2, 2 active); `chunk::seal::tests::
/// write_fuzz_seeds` seals its seeds with the same ones.
pub const KEY_1: [u8; 32] = [0x11; 32];
pub const KEY_2: [u8; 32] = [0x22; 32];
/// Object name the `sealed` targets open under.
pub const OBJECT_NAME: &str = "fuzz/object";

#[derive(Clone, Copy)]
enum Sum {
    /// MS-VHDX: CRC-32C of the structure with its checksum field zero, little-endian.
    Crc32c,
    /// VHD: one's complement of the byte sum without the checksum field, big-endian.
    Vhd,
}

enum Piece {
    Bytes(Vec<u8>),
    Fill(u8, usize),
}

/// A file of `len` bytes made of zeros and a few extents.
pub struct SparseImage {
    len: u64,
    extents: Vec<(u64, Piece)>,
}

impl SparseImage {
    /// Decodes the sparse encoding above; `None` when there is no length field.
    pub fn decode(data: &[u8]) -> Option<SparseImage> {
        let head = data.get(..4)?;
        let len =
            u64::from(u32::from_le_bytes([head[0], head[1], head[2], head[3]])) & MAX_FILE_LEN;
        let mut extents = Vec::new();
        let mut rest = &data[4..];
        while rest.len() >= 6 {
            let at = u64::from(u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]));
            let n = u16::from_le_bytes([rest[4], rest[5]]);
            rest = &rest[6..];
            let (piece, used) = if n & 0x8000 != 0 {
                match rest.first() {
                    Some(&b) => (Piece::Fill(b, usize::from(n & 0x7fff)), 1),
                    None => break,
                }
            } else {
                let take = usize::from(n).min(rest.len());
                (Piece::Bytes(rest[..take].to_vec()), take)
            };
            rest = &rest[used..];
            if at < len {
                extents.push((at, piece));
            }
        }
        let mut image = SparseImage { len, extents };
        if head[3] & 0x80 != 0 {
            image.fix_checksums();
        }
        Some(image)
    }

    fn fix_checksums(&mut self) {
        let mut magic = [0u8; 8];
        if self.read_exact_at(&mut magic, 0).is_err() {
            return;
        }
        if &magic == b"vhdxfile" {
            for at in [64 << 10, 128 << 10] {
                self.fix_sum(at, 4096, 4, Sum::Crc32c);
            }
            for at in [192 << 10, 256 << 10] {
                self.fix_sum(at, 64 << 10, 4, Sum::Crc32c);
            }
            return;
        }
        let footers = [0, self.len.saturating_sub(512)];
        for at in footers {
            if self.read_exact_at(&mut magic, at).is_ok() && &magic == b"conectix" {
                self.fix_sum(at, 512, 64, Sum::Vhd);
            }
        }
        let mut data_offset = [0u8; 8];
        if self.read_exact_at(&mut data_offset, 16).is_ok() {
            let at = u64::from_be_bytes(data_offset);
            if self.read_exact_at(&mut magic, at).is_ok() && &magic == b"cxsparse" {
                self.fix_sum(at, 1024, 36, Sum::Vhd);
            }
        }
    }

    /// Recomputes the 4-byte checksum at `field` of the `len`-byte structure at `at`.
    fn fix_sum(&mut self, at: u64, len: usize, field: usize, sum: Sum) {
        let mut raw = vec![0u8; len];
        if self.read_exact_at(&mut raw, at).is_err() {
            return;
        }
        raw[field..field + 4].fill(0);
        let value = match sum {
            Sum::Crc32c => drvault::format::vhdx::crc32c(&raw).to_le_bytes(),
            Sum::Vhd => {
                (!raw.iter().fold(0u32, |a, &b| a.wrapping_add(u32::from(b)))).to_be_bytes()
            }
        };
        self.extents
            .push((at + field as u64, Piece::Bytes(value.to_vec())));
    }

    /// The whole file, flat (for small files: writing regression tests).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.len as usize];
        let _ = self.read_exact_at(&mut v, 0);
        v
    }
}

impl ReadAt for SparseImage {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset.checked_add(buf.len() as u64);
        let Some(end) = end.filter(|&e| e <= self.len) else {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read past end",
            ));
        };
        buf.fill(0);
        for (at, piece) in &self.extents {
            let plen = match piece {
                Piece::Bytes(b) => b.len(),
                Piece::Fill(_, n) => *n,
            } as u64;
            let (s, e) = ((*at).max(offset), (at + plen).min(end).min(self.len));
            if s >= e {
                continue;
            }
            let dst = &mut buf[(s - offset) as usize..(e - offset) as usize];
            match piece {
                Piece::Bytes(b) => dst.copy_from_slice(&b[(s - at) as usize..(e - at) as usize]),
                Piece::Fill(v, _) => dst.fill(*v),
            }
        }
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.len)
    }
}

/// A directory holding `parent.vhd`: a fixed 4 MiB VHD with id [`PARENT_ID`] whose sector
/// `k` is filled with `k as u8`, made once per process with drvault's own writer.
pub fn parent_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        // One shared directory (same bytes every time) rather than one per process: runs with
        // -jobs and every crash reproduction would otherwise leave 4 MiB behind each.
        let dir = std::env::temp_dir().join("drvault-fuzz-parent-v1");
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("fuzz parent dir: {e}"));
        let mut disk: Vec<u8> = (0..PARENT_SIZE / 512)
            .flat_map(|k| std::iter::repeat_n(k as u8, 512))
            .collect();
        let footer = drvault::format::vhd::fixed_footer(PARENT_SIZE, PARENT_ID, 0)
            .unwrap_or_else(|e| panic!("fuzz parent footer: {e}"));
        disk.extend_from_slice(&footer);
        // Written aside and renamed, so a parallel job never sees a half-written parent.
        let tmp = dir.join(format!("{PARENT_NAME}.{}", std::process::id()));
        std::fs::write(&tmp, disk).unwrap_or_else(|e| panic!("fuzz parent: {e}"));
        std::fs::rename(&tmp, dir.join(PARENT_NAME)).unwrap_or_else(|e| panic!("fuzz parent: {e}"));
        dir
    })
}

/// The fixed key ring of the `sealed` targets.
pub fn keys() -> &'static KeyRing {
    static KEYS: OnceLock<KeyRing> = OnceLock::new();
    KEYS.get_or_init(|| {
        KeyRing::from_masters(&[(1, KEY_1), (2, KEY_2)], 2).unwrap_or_else(|| panic!("key ring"))
    })
}

/// How many bytes one execution reads in full before it only samples range edges.
const READ_BUDGET: u64 = 8 << 20;

/// Checks what a reader promises about an accepted disk: ranges sorted, disjoint, non-empty
/// and inside the disk; every allocated byte readable (in full up to a budget, then the first
/// and last sector of each range); gaps between ranges read as zeros (their edge sectors);
/// the last byte readable and a read past the end refused.
pub fn check_disk<E: std::fmt::Debug>(
    size: u64,
    ranges: &[std::ops::Range<u64>],
    read: impl Fn(&mut [u8], u64) -> Result<(), E>,
) {
    let mut prev_end = 0u64;
    for r in ranges {
        assert!(r.start < r.end, "empty range {r:?}");
        assert!(
            r.start >= prev_end,
            "ranges overlap or are unsorted: {ranges:?}"
        );
        assert!(r.end <= size, "range {r:?} past the disk's {size} bytes");
        prev_end = r.end;
    }
    let mut buf = vec![0u8; 64 << 10];
    let mut budget = READ_BUDGET;
    let mut read_ok = |at: u64, len: u64| {
        let b = &mut buf[..len as usize];
        if let Err(e) = read(b, at) {
            panic!("accepted disk fails to read {len} bytes at {at}: {e:?}");
        }
    };
    for r in ranges {
        if r.end - r.start <= budget {
            budget -= r.end - r.start;
            let mut at = r.start;
            while at < r.end {
                let n = (r.end - at).min(64 << 10);
                read_ok(at, n);
                at += n;
            }
        } else {
            read_ok(r.start, (r.end - r.start).min(512));
            let n = (r.end - r.start).min(512);
            read_ok(r.end - n, n);
        }
    }
    // Gaps: the sectors at both edges of each, and the tail after the last range.
    let mut gaps = Vec::new();
    let mut from = 0u64;
    for r in ranges.iter().chain(std::iter::once(&(size..size))) {
        if r.start > from {
            gaps.push(from..r.start);
        }
        from = r.end;
    }
    let mut zeros = vec![0u8; 512];
    for g in gaps.iter().take(64) {
        let n = (g.end - g.start).min(512);
        for at in [g.start, g.end - n] {
            let z = &mut zeros[..n as usize];
            z.fill(0xee);
            if let Err(e) = read(z, at) {
                panic!("accepted disk fails to read a gap at {at}: {e:?}");
            }
            assert!(
                z.iter().all(|&b| b == 0),
                "gap {g:?} outside the allocated ranges holds data at {at}"
            );
        }
    }
    if size > 0 {
        let mut one = [0u8; 1];
        if let Err(e) = read(&mut one, size - 1) {
            panic!("accepted disk fails to read its last byte: {e:?}");
        }
    }
    let mut one = [0u8; 1];
    assert!(read(&mut one, size).is_err(), "read past the end accepted");
}
