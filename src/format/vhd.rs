//! VHD disks (Microsoft "Virtual Hard Disk Image Format Specification" v1.0): readers for
//! fixed, dynamic and differencing disks, and the fixed-disk footer written at failover.
//!
//! Layouts (all integers big-endian):
//! - fixed: `[disk bytes][footer 512]`;
//! - dynamic / differencing: `[footer copy 512][dynamic header 1024][BAT][blocks...][footer 512]`,
//!   each allocated block being a sector bitmap (one bit per 512-byte sector, most significant
//!   bit first, padded to whole sectors) followed by `block size` bytes of data.
//!
//! Decisions where the specification is silent or where tools disagree:
//! - The virtual size is the footer's Current Size, never the CHS geometry: the geometry
//!   usually rounds the size down (see [`geometry`]) and qemu 7.2 trusts it only for some
//!   creators. Current Size must be a non-zero multiple of 512.
//! - [`fixed_footer`] writes the maximum geometry 65535/16/255 so that every qemu version
//!   reads the exact Current Size (specs/vhd.md).
//! - A dynamic disk's footer copy at offset 0 is authoritative (as in qemu); a valid footer at
//!   the end must agree with it on type, size and unique id. A footer at the end damaged in
//!   place is read past (the specification mirrors the footer at offset 0 for redundancy) if
//!   the disk's structures end exactly where it belongs; a file cut short or padded is refused
//!   instead of read with its tail missing.
//! - A sector whose bitmap bit is clear reads as zeros in a dynamic disk and from the parent
//!   in a differencing disk. qemu ignores the bitmap (it always writes it all-ones); Hyper-V
//!   clears bits for sectors never written, so honouring it is what the format means.
//! - Footer padding and the features bits are not checked: qemu and Microsoft's own readers
//!   ignore them, the checksum already covers them, and refusing a customer's disk over
//!   padding would block a failover for no integrity gain.
//! - Differencing parents are looked up only by *file name* in the child's directory (from
//!   the W2ru / W2ku locators, then the parent unicode name), never by following a path out
//!   of it, and the parent's unique id must match the child's record of it.
//! - BAT entries past the last block that the disk size needs are ignored (qemu sizes the
//!   table generously and leaves them unallocated).

use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{array_at, overlaps, ReadAt};

/// VHD sector size; every VHD structure and size is a multiple of it.
pub const SECTOR_SIZE: u64 = 512;
/// Size of the footer (and of its copy at the start of dynamic disks).
pub const FOOTER_SIZE: usize = 512;
/// Size of the dynamic disk header.
pub const DYNAMIC_HEADER_SIZE: usize = 1024;
/// Creator application the project writes into its footers.
pub const CREATOR_APPLICATION: [u8; 4] = *b"drvt";
/// Creator version (major << 16 | minor) the project writes into its footers.
pub const CREATOR_VERSION: u32 = 0x0001_0000;

const FOOTER_COOKIE: [u8; 8] = *b"conectix";
const DYNAMIC_COOKIE: [u8; 8] = *b"cxsparse";
const FILE_FORMAT_VERSION: u32 = 0x0001_0000;
const DYNAMIC_HEADER_VERSION: u32 = 0x0001_0000;
const CREATOR_HOST_OS: [u8; 4] = *b"Wi2k";
/// Bit 1 of Features is "reserved, must be set" in the specification.
const FEATURES_RESERVED_BIT: u32 = 0x0000_0002;
const DATA_OFFSET_NONE: u64 = u64::MAX;
const UNALLOCATED: u32 = u32::MAX;
/// 2000-01-01T00:00:00Z as a Unix time: the VHD time stamp epoch.
const VHD_EPOCH_UNIX_SECS: u64 = 946_684_800;
/// A chain deeper than this is almost certainly a loop of locators.
const MAX_PARENT_DEPTH: usize = 16;
/// Windows paths are at most 32767 UTF-16 units; anything longer is not a path.
const MAX_LOCATOR_BYTES: u32 = 65_536;
/// Maximum geometry; see the module documentation for why the writer uses it.
const MAX_GEOMETRY: Geometry = Geometry {
    cylinders: 65535,
    heads: 16,
    sectors_per_track: 255,
};

/// Errors from parsing or reading a VHD. Messages name the structure, offset and value.
#[derive(Debug, thiserror::Error)]
pub enum VhdError {
    #[error("{what}: bad cookie {found:?}, expected {expected:?}")]
    BadCookie {
        what: &'static str,
        expected: &'static str,
        found: String,
    },
    #[error("{what}: checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    BadChecksum {
        what: &'static str,
        stored: u32,
        computed: u32,
    },
    #[error("{what}: unsupported version {version:#010x}, expected 0x00010000")]
    UnsupportedVersion { what: &'static str, version: u32 },
    #[error("footer: unknown disk type {0} (2 fixed, 3 dynamic, 4 differencing)")]
    UnknownDiskType(u32),
    #[error("footer: saved-state byte is {0}, expected 0 or 1")]
    BadSavedState(u8),
    #[error("invalid disk size {size}: {reason}")]
    InvalidSize { size: u64, reason: &'static str },
    #[error("reading {what} ({len} bytes at offset {offset}): {source}")]
    Io {
        what: &'static str,
        offset: u64,
        len: u64,
        source: io::Error,
    },
    #[error("file truncated: {what} needs bytes up to {end} but the file is {file_len} bytes")]
    Truncated {
        what: &'static str,
        end: u64,
        file_len: u64,
    },
    #[error("footer at the end of the file {problem}; the file is truncated or damaged")]
    TrailingFooter { problem: String },
    #[error("footer cookie found at offset {offset} of a {file_len}-byte file instead of at {expected}: file truncated or padded")]
    MisplacedFooter {
        offset: u64,
        file_len: u64,
        expected: u64,
    },
    #[error("dynamic header offset {offset} is outside the {file_len}-byte file or overlaps the footer copy")]
    BadHeaderOffset { offset: u64, file_len: u64 },
    #[error("dynamic header: block size {0} is not a power of two of at least 512 bytes")]
    InvalidBlockSize(u32),
    #[error("dynamic header: {entries} BAT entries of {block_size} bytes cover {covered} bytes, less than the disk size {virtual_size}")]
    TableTooSmall {
        entries: u32,
        block_size: u32,
        covered: u64,
        virtual_size: u64,
    },
    #[error("BAT ({len} bytes at offset {offset}) is outside the file data ({limit} bytes before the footer) or overlaps the headers")]
    BadBatLocation { offset: u64, len: u64, limit: u64 },
    #[error("BAT entry {index} points past end of file: its block (sector {sector}) ends at byte {end}, the data area ends at {limit}")]
    BatEntryPastEof {
        index: usize,
        sector: u32,
        end: u64,
        limit: u64,
    },
    #[error("BAT entry {index}: block at byte {start} overlaps the {what}")]
    BlockOverlapsMetadata {
        index: usize,
        start: u64,
        what: &'static str,
    },
    #[error("parent locator {index}: {reason}")]
    BadParentLocator { index: usize, reason: String },
    #[error("differencing disk: parent {name:?} not found (looked for {tried:?})")]
    ParentNotFound { name: String, tried: Vec<PathBuf> },
    #[error("differencing disk: parent {path:?} has unique id {found}, the child was made from {expected}")]
    ParentMismatch {
        path: PathBuf,
        expected: String,
        found: String,
    },
    #[error("differencing disk: parent {path:?}: {error}")]
    Parent { path: PathBuf, error: Box<VhdError> },
    #[error("differencing chain deeper than {0} disks (a locator loop?)")]
    ParentChainTooDeep(usize),
    #[error("read of {len} bytes at offset {offset} is outside the {size}-byte disk")]
    OutOfRange { offset: u64, len: u64, size: u64 },
}

/// VHD disk type (footer offset 60).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskType {
    Fixed,
    Dynamic,
    Differencing,
}

impl DiskType {
    fn code(self) -> u32 {
        match self {
            DiskType::Fixed => 2,
            DiskType::Dynamic => 3,
            DiskType::Differencing => 4,
        }
    }
}

/// Cylinder/head/sector geometry (footer offset 56).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub cylinders: u16,
    pub heads: u8,
    pub sectors_per_track: u8,
}

/// The 512-byte footer, parsed and validated. The cookie, file format version and checksum
/// are implied: [`Footer::parse`] checks them and [`Footer::to_bytes`] writes them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Footer {
    pub features: u32,
    /// Offset of the dynamic header; all-ones for fixed disks.
    pub data_offset: u64,
    /// Seconds since 2000-01-01 00:00:00 UTC.
    pub timestamp: u32,
    pub creator_application: [u8; 4],
    pub creator_version: u32,
    pub creator_host_os: [u8; 4],
    pub original_size: u64,
    /// The virtual disk size in bytes.
    pub current_size: u64,
    pub geometry: Geometry,
    pub disk_type: DiskType,
    pub unique_id: [u8; 16],
    pub saved_state: bool,
}

impl Footer {
    /// Parses and validates a footer: cookie, checksum, file format version, disk type, then
    /// sizes (Current Size a non-zero multiple of 512).
    pub fn parse(raw: &[u8; FOOTER_SIZE]) -> Result<Footer, VhdError> {
        check_cookie(raw, FOOTER_COOKIE, "footer", "conectix")?;
        let stored = be_u32(raw, 64);
        let computed = checksum(raw, 64);
        if stored != computed {
            return Err(VhdError::BadChecksum {
                what: "footer",
                stored,
                computed,
            });
        }
        let version = be_u32(raw, 12);
        if version != FILE_FORMAT_VERSION {
            return Err(VhdError::UnsupportedVersion {
                what: "footer",
                version,
            });
        }
        let disk_type = match be_u32(raw, 60) {
            2 => DiskType::Fixed,
            3 => DiskType::Dynamic,
            4 => DiskType::Differencing,
            other => return Err(VhdError::UnknownDiskType(other)),
        };
        let current_size = be_u64(raw, 48);
        check_disk_size(current_size)?;
        let saved_state = match raw[84] {
            0 => false,
            1 => true,
            other => return Err(VhdError::BadSavedState(other)),
        };
        Ok(Footer {
            features: be_u32(raw, 8),
            data_offset: be_u64(raw, 16),
            timestamp: be_u32(raw, 24),
            creator_application: array_at(raw, 28),
            creator_version: be_u32(raw, 32),
            creator_host_os: array_at(raw, 36),
            original_size: be_u64(raw, 40),
            current_size,
            geometry: Geometry {
                cylinders: be_u16(raw, 56),
                heads: raw[58],
                sectors_per_track: raw[59],
            },
            disk_type,
            unique_id: array_at(raw, 68),
            saved_state,
        })
    }

    /// Serializes the footer with cookie, version and a freshly computed checksum.
    pub fn to_bytes(&self) -> [u8; FOOTER_SIZE] {
        let mut raw = [0u8; FOOTER_SIZE];
        raw[0..8].copy_from_slice(&FOOTER_COOKIE);
        raw[8..12].copy_from_slice(&self.features.to_be_bytes());
        raw[12..16].copy_from_slice(&FILE_FORMAT_VERSION.to_be_bytes());
        raw[16..24].copy_from_slice(&self.data_offset.to_be_bytes());
        raw[24..28].copy_from_slice(&self.timestamp.to_be_bytes());
        raw[28..32].copy_from_slice(&self.creator_application);
        raw[32..36].copy_from_slice(&self.creator_version.to_be_bytes());
        raw[36..40].copy_from_slice(&self.creator_host_os);
        raw[40..48].copy_from_slice(&self.original_size.to_be_bytes());
        raw[48..56].copy_from_slice(&self.current_size.to_be_bytes());
        raw[56..58].copy_from_slice(&self.geometry.cylinders.to_be_bytes());
        raw[58] = self.geometry.heads;
        raw[59] = self.geometry.sectors_per_track;
        raw[60..64].copy_from_slice(&self.disk_type.code().to_be_bytes());
        raw[68..84].copy_from_slice(&self.unique_id);
        raw[84] = u8::from(self.saved_state);
        let sum = checksum(&raw, 64);
        raw[64..68].copy_from_slice(&sum.to_be_bytes());
        raw
    }
}

/// CHS geometry for a disk of `size` bytes, per the specification's appendix (qemu's
/// `calculate_geometry` is the same). Returns (cylinders, heads, sectors per track).
pub fn geometry(size: u64) -> (u16, u8, u8) {
    let total = (size / SECTOR_SIZE).min(65535 * 16 * 255);
    let (spt, heads, cth) = if total >= 65535 * 16 * 63 {
        (255u64, 16u64, total / 255)
    } else {
        let mut spt = 17u64;
        let mut cth = total / spt;
        let mut heads = cth.div_ceil(1024).max(4);
        if cth >= heads * 1024 || heads > 16 {
            spt = 31;
            heads = 16;
            cth = total / spt;
        }
        if cth >= heads * 1024 {
            spt = 63;
            heads = 16;
            cth = total / spt;
        }
        (spt, heads, cth)
    };
    // The clamp of `total` bounds cth / heads by 65535, heads by 16 and spt by 255.
    let cylinders = u16::try_from(cth / heads).unwrap_or(u16::MAX);
    let heads = u8::try_from(heads).unwrap_or(u8::MAX);
    let spt = u8::try_from(spt).unwrap_or(u8::MAX);
    (cylinders, heads, spt)
}

/// Seconds since 2000-01-01 00:00:00 UTC for a Unix time, saturating at both ends of the
/// field's range (before 2000 gives 0, after 2136 gives `u32::MAX`).
pub fn vhd_timestamp(unix_secs: u64) -> u32 {
    u32::try_from(unix_secs.saturating_sub(VHD_EPOCH_UNIX_SECS)).unwrap_or(u32::MAX)
}

/// The footer to append to `size` bytes of raw disk to make a fixed VHD: Current = Original
/// = `size`, maximum geometry, creator `drvt` 1.0 on `Wi2k`, features 2, no data offset.
/// `size` must be a non-zero multiple of 512.
pub fn fixed_footer(
    size: u64,
    unique_id: [u8; 16],
    timestamp: u32,
) -> Result<[u8; FOOTER_SIZE], VhdError> {
    check_disk_size(size)?;
    let footer = Footer {
        features: FEATURES_RESERVED_BIT,
        data_offset: DATA_OFFSET_NONE,
        timestamp,
        creator_application: CREATOR_APPLICATION,
        creator_version: CREATOR_VERSION,
        creator_host_os: CREATOR_HOST_OS,
        original_size: size,
        current_size: size,
        geometry: MAX_GEOMETRY,
        disk_type: DiskType::Fixed,
        unique_id,
        saved_state: false,
    };
    Ok(footer.to_bytes())
}

/// One of the eight parent locator entries of a dynamic header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParentLocator {
    /// `W2ru` (relative Windows path, UTF-16LE), `W2ku` (absolute), or a legacy code.
    pub platform_code: [u8; 4],
    /// Space reserved for the locator data, in sectors.
    pub data_space: u32,
    /// Length of the locator data in bytes.
    pub data_length: u32,
    /// Absolute file offset of the locator data.
    pub data_offset: u64,
}

/// The 1024-byte dynamic disk header, parsed and validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DynamicHeader {
    /// Absolute offset of the BAT.
    pub table_offset: u64,
    pub max_table_entries: u32,
    pub block_size: u32,
    pub parent_unique_id: [u8; 16],
    pub parent_timestamp: u32,
    /// The parent's file name (UTF-16BE on disk), trailing NULs removed.
    pub parent_unicode_name: String,
    /// The locator slots whose platform code is non-zero, with their slot index.
    pub parent_locators: Vec<(usize, ParentLocator)>,
}

impl DynamicHeader {
    /// Parses and validates a dynamic header: cookie, checksum, header version, block size.
    pub fn parse(raw: &[u8; DYNAMIC_HEADER_SIZE]) -> Result<DynamicHeader, VhdError> {
        check_cookie(raw, DYNAMIC_COOKIE, "dynamic header", "cxsparse")?;
        let stored = be_u32(raw, 36);
        let computed = checksum(raw, 36);
        if stored != computed {
            return Err(VhdError::BadChecksum {
                what: "dynamic header",
                stored,
                computed,
            });
        }
        let version = be_u32(raw, 24);
        if version != DYNAMIC_HEADER_VERSION {
            return Err(VhdError::UnsupportedVersion {
                what: "dynamic header",
                version,
            });
        }
        let block_size = be_u32(raw, 32);
        if block_size < 512 || !block_size.is_power_of_two() {
            return Err(VhdError::InvalidBlockSize(block_size));
        }
        let name_units: Vec<u16> = raw[64..576]
            .chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .collect();
        let parent_locators = (0..8)
            .map(|i| {
                let at = 576 + 24 * i;
                let locator = ParentLocator {
                    platform_code: array_at(raw, at),
                    data_space: be_u32(raw, at + 4),
                    data_length: be_u32(raw, at + 8),
                    data_offset: be_u64(raw, at + 16),
                };
                (i, locator)
            })
            .filter(|(_, l)| l.platform_code != [0; 4])
            .collect();
        Ok(DynamicHeader {
            table_offset: be_u64(raw, 16),
            max_table_entries: be_u32(raw, 28),
            block_size,
            parent_unique_id: array_at(raw, 40),
            parent_timestamp: be_u32(raw, 56),
            parent_unicode_name: utf16_trimmed(&name_units),
            parent_locators,
        })
    }
}

/// An open VHD of any type. Reads take `&self` only, so one disk serves many threads.
pub struct VhdDisk {
    footer: Footer,
    layout: Layout,
}

enum Layout {
    Fixed { file: Arc<dyn ReadAt> },
    Sparse(Box<Sparse>),
}

/// State of a dynamic or differencing disk, all validated at open.
struct Sparse {
    file: Arc<dyn ReadAt>,
    header: DynamicHeader,
    /// The BAT entries the disk size needs, each checked to lie inside the file.
    bat: Vec<u32>,
    block_size: u64,
    /// Sector bitmap size in bytes (whole sectors) in front of each block's data.
    bitmap_len: u64,
    parent: Option<Box<VhdDisk>>,
}

impl VhdDisk {
    /// Opens a VHD from its content: a footer copy at offset 0 means dynamic or differencing,
    /// otherwise the footer must be in the last 512 bytes (fixed). A differencing disk's
    /// parent is looked for in `parent_dir`; without one it fails with `ParentNotFound`.
    pub fn open(file: Arc<dyn ReadAt>, parent_dir: Option<&Path>) -> Result<VhdDisk, VhdError> {
        Self::open_at_depth(file, parent_dir, 0)
    }

    fn open_at_depth(
        file: Arc<dyn ReadAt>,
        parent_dir: Option<&Path>,
        depth: usize,
    ) -> Result<VhdDisk, VhdError> {
        let file_len = file_len(file.as_ref())?;
        if file_len < FOOTER_SIZE as u64 {
            return Err(VhdError::Truncated {
                what: "VHD footer",
                end: FOOTER_SIZE as u64,
                file_len,
            });
        }
        let tail_at = file_len - FOOTER_SIZE as u64;
        let mut head = [0u8; FOOTER_SIZE];
        read_exact(file.as_ref(), &mut head, 0, "footer copy")?;
        let mut tail = [0u8; FOOTER_SIZE];
        read_exact(file.as_ref(), &mut tail, tail_at, "footer")?;

        if head[0..8] == FOOTER_COOKIE {
            let footer = Footer::parse(&head)?;
            if footer.disk_type != DiskType::Fixed {
                let sparse = match Footer::parse(&tail) {
                    Ok(trailing) => {
                        check_same_disk(&footer, &trailing)?;
                        Sparse::open(&file, &footer, file_len, parent_dir, depth)?
                    }
                    // Damaged in place (cookie or checksum), not moved by a cut or padding:
                    // the copy at offset 0 is there for exactly this.
                    Err(damage) if find_cookie(&tail).is_none_or(|at| at == 0) => {
                        open_past_damaged_footer(
                            &file, &footer, file_len, parent_dir, depth, damage,
                        )?
                    }
                    Err(e) => {
                        return Err(VhdError::TrailingFooter {
                            problem: format!("is not valid ({e})"),
                        })
                    }
                };
                return Ok(VhdDisk {
                    footer,
                    layout: Layout::Sparse(Box::new(sparse)),
                });
            }
            // A fixed disk whose first guest sector happens to be a fixed footer: the real
            // footer is still the one at the end, handled below.
        }
        if tail[0..8] != FOOTER_COOKIE {
            if let Some(pos) = find_cookie(&tail) {
                return Err(VhdError::MisplacedFooter {
                    offset: tail_at + pos as u64,
                    file_len,
                    expected: tail_at,
                });
            }
        }
        let footer = Footer::parse(&tail)?;
        if footer.disk_type != DiskType::Fixed {
            return Err(VhdError::BadCookie {
                what: "footer copy at offset 0 of a dynamic disk",
                expected: "conectix",
                found: printable(&head[0..8]),
            });
        }
        if footer.current_size > tail_at {
            return Err(VhdError::Truncated {
                what: "fixed disk data",
                end: footer.current_size.saturating_add(FOOTER_SIZE as u64),
                file_len,
            });
        }
        Ok(VhdDisk {
            footer,
            layout: Layout::Fixed { file },
        })
    }

    /// The validated footer.
    pub fn footer(&self) -> &Footer {
        &self.footer
    }

    /// The dynamic header of a dynamic or differencing disk.
    pub fn dynamic_header(&self) -> Option<&DynamicHeader> {
        match &self.layout {
            Layout::Fixed { .. } => None,
            Layout::Sparse(s) => Some(&s.header),
        }
    }

    pub fn disk_type(&self) -> DiskType {
        self.footer.disk_type
    }

    /// Virtual disk size in bytes (footer Current Size).
    pub fn virtual_size(&self) -> u64 {
        self.footer.current_size
    }

    /// Reads `buf.len()` bytes of the virtual disk at `offset`; unallocated sectors read as
    /// zeros (or from the parent of a differencing disk).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), VhdError> {
        let size = self.virtual_size();
        let len = buf.len() as u64;
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(VhdError::OutOfRange { offset, len, size });
        }
        match &self.layout {
            Layout::Fixed { file } => read_exact(file.as_ref(), buf, offset, "disk data"),
            Layout::Sparse(s) => s.read(buf, offset),
        }
    }

    /// Sorted, disjoint byte ranges that may hold data; everything else reads as zeros.
    pub fn allocated_ranges(&self) -> Result<Vec<Range<u64>>, VhdError> {
        match &self.layout {
            Layout::Fixed { .. } => Ok(std::iter::once(0..self.virtual_size()).collect()),
            Layout::Sparse(s) => s.allocated_ranges(self.virtual_size()),
        }
    }
}

impl Sparse {
    fn open(
        file: &Arc<dyn ReadAt>,
        footer: &Footer,
        file_len: u64,
        parent_dir: Option<&Path>,
        depth: usize,
    ) -> Result<Sparse, VhdError> {
        // Everything but the trailing footer: blocks and tables must end before it.
        let data_limit = file_len - FOOTER_SIZE as u64;
        let header_at = footer.data_offset;
        let header_end = header_at.checked_add(DYNAMIC_HEADER_SIZE as u64);
        if header_at < FOOTER_SIZE as u64 || header_end.is_none_or(|e| e > data_limit) {
            return Err(VhdError::BadHeaderOffset {
                offset: header_at,
                file_len,
            });
        }
        let header_range = header_at..header_at + DYNAMIC_HEADER_SIZE as u64;
        let mut raw = [0u8; DYNAMIC_HEADER_SIZE];
        read_exact(file.as_ref(), &mut raw, header_at, "dynamic header")?;
        let header = DynamicHeader::parse(&raw)?;

        let block_size = u64::from(header.block_size);
        let virtual_size = footer.current_size;
        // u32 × u32 cannot overflow u64.
        let covered = u64::from(header.max_table_entries) * block_size;
        if covered < virtual_size {
            return Err(VhdError::TableTooSmall {
                entries: header.max_table_entries,
                block_size: header.block_size,
                covered,
                virtual_size,
            });
        }
        let bat_len = u64::from(header.max_table_entries) * 4;
        let bat_range = header.table_offset..header.table_offset.saturating_add(bat_len);
        if header
            .table_offset
            .checked_add(bat_len)
            .is_none_or(|e| e > data_limit)
            || bat_range.start < FOOTER_SIZE as u64
            || overlaps(&bat_range, &header_range)
        {
            return Err(VhdError::BadBatLocation {
                offset: header.table_offset,
                len: bat_len,
                limit: data_limit,
            });
        }

        let blocks = virtual_size.div_ceil(block_size);
        // blocks <= max_table_entries (checked above), so this fits in the BAT just checked.
        let mut raw_bat = vec![0u8; usize::try_from(blocks * 4).unwrap_or(usize::MAX)];
        read_exact(file.as_ref(), &mut raw_bat, header.table_offset, "BAT")?;
        let bat: Vec<u32> = raw_bat
            .chunks_exact(4)
            .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
            .collect();

        let bitmap_len = (block_size / SECTOR_SIZE)
            .div_ceil(8)
            .next_multiple_of(SECTOR_SIZE);
        for (index, &sector) in bat.iter().enumerate() {
            if sector == UNALLOCATED {
                continue;
            }
            let start = u64::from(sector) * SECTOR_SIZE;
            let block_first = index as u64 * block_size;
            let needed = block_size.min(virtual_size - block_first);
            let end = start.saturating_add(bitmap_len).saturating_add(needed);
            if end > data_limit {
                return Err(VhdError::BatEntryPastEof {
                    index,
                    sector,
                    end,
                    limit: data_limit,
                });
            }
            let block = start..end;
            for (what, range) in [
                ("footer copy", 0..FOOTER_SIZE as u64),
                ("dynamic header", header_range.clone()),
                ("BAT", bat_range.clone()),
            ] {
                if overlaps(&block, &range) {
                    return Err(VhdError::BlockOverlapsMetadata { index, start, what });
                }
            }
        }

        let parent = if footer.disk_type == DiskType::Differencing {
            Some(Box::new(resolve_parent(
                file.as_ref(),
                file_len,
                &header,
                parent_dir,
                depth,
            )?))
        } else {
            None
        };
        Ok(Sparse {
            file: Arc::clone(file),
            header,
            bat,
            block_size,
            bitmap_len,
            parent,
        })
    }

    /// Where the last structure in the file ends (dynamic header at `header_at`, BAT, parent
    /// locator data, whole blocks with their bitmaps), rounded up to a sector: where a writer
    /// puts the footer.
    fn structures_end(&self, header_at: u64) -> u64 {
        let header_end = header_at.saturating_add(DYNAMIC_HEADER_SIZE as u64);
        let bat_end = self
            .header
            .table_offset
            .saturating_add(u64::from(self.header.max_table_entries) * 4);
        // The locator's data length, not its reserved space: writers disagree on whether the
        // space counts sectors or bytes.
        let locators_end = self
            .header
            .parent_locators
            .iter()
            .map(|(_, l)| l.data_offset.saturating_add(u64::from(l.data_length)));
        let blocks_end = self
            .bat
            .iter()
            .filter(|&&sector| sector != UNALLOCATED)
            .map(|&sector| {
                (u64::from(sector) * SECTOR_SIZE)
                    .saturating_add(self.bitmap_len)
                    .saturating_add(self.block_size)
            });
        [header_end, bat_end]
            .into_iter()
            .chain(locators_end)
            .chain(blocks_end)
            .max()
            .unwrap_or(header_end)
            .next_multiple_of(SECTOR_SIZE)
    }

    /// Reads a range already checked to lie within the virtual disk.
    fn read(&self, buf: &mut [u8], offset: u64) -> Result<(), VhdError> {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let block = pos / self.block_size;
            let within = pos % self.block_size;
            let n = (buf.len() - done)
                .min(usize::try_from(self.block_size - within).unwrap_or(usize::MAX));
            let out = &mut buf[done..done + n];
            match self.bat.get(usize::try_from(block).unwrap_or(usize::MAX)) {
                Some(&sector) if sector != UNALLOCATED => {
                    self.read_in_block(out, sector, within, pos)?
                }
                _ => self.read_underlying(out, pos)?,
            }
            done += n;
        }
        Ok(())
    }

    /// Reads part of an allocated block sector run by sector run, following its bitmap.
    fn read_in_block(
        &self,
        out: &mut [u8],
        sector: u32,
        within: u64,
        pos: u64,
    ) -> Result<(), VhdError> {
        let block_at = u64::from(sector) * SECTOR_SIZE;
        let data_at = block_at + self.bitmap_len;
        let first = within / SECTOR_SIZE;
        let last = (within + out.len() as u64 - 1) / SECTOR_SIZE;
        let bitmap = self.read_bitmap(block_at, first, last)?;
        let first_byte = first / 8;
        let is_set = |s: u64| bit_msb_first(&bitmap, s - first_byte * 8);

        let end = within + out.len() as u64;
        let mut cur = within;
        while cur < end {
            let set = is_set(cur / SECTOR_SIZE);
            let mut run_end = (cur / SECTOR_SIZE + 1) * SECTOR_SIZE;
            while run_end < end && is_set(run_end / SECTOR_SIZE) == set {
                run_end += SECTOR_SIZE;
            }
            let run_end = run_end.min(end);
            let a = usize::try_from(cur - within).unwrap_or(usize::MAX);
            let b = usize::try_from(run_end - within).unwrap_or(usize::MAX);
            let part = &mut out[a..b];
            if set {
                read_exact(self.file.as_ref(), part, data_at + cur, "block data")?;
            } else {
                self.read_underlying(part, pos + (cur - within))?;
            }
            cur = run_end;
        }
        Ok(())
    }

    /// The bitmap bytes covering sectors `first..=last` of the block at `block_at`.
    fn read_bitmap(&self, block_at: u64, first: u64, last: u64) -> Result<Vec<u8>, VhdError> {
        let from = first / 8;
        let len = last / 8 + 1 - from;
        let mut bitmap = vec![0u8; usize::try_from(len).unwrap_or(usize::MAX)];
        read_exact(
            self.file.as_ref(),
            &mut bitmap,
            block_at + from,
            "sector bitmap",
        )?;
        Ok(bitmap)
    }

    /// What lies under this disk where it holds no data: the parent's bytes or zeros.
    fn read_underlying(&self, out: &mut [u8], pos: u64) -> Result<(), VhdError> {
        out.fill(0);
        if let Some(parent) = &self.parent {
            let parent_size = parent.virtual_size();
            if pos < parent_size {
                let n = usize::try_from(parent_size - pos)
                    .unwrap_or(usize::MAX)
                    .min(out.len());
                parent.read_at(&mut out[..n], pos)?;
            }
        }
        Ok(())
    }

    fn allocated_ranges(&self, size: u64) -> Result<Vec<Range<u64>>, VhdError> {
        let mut ranges = Vec::new();
        for (index, &sector) in self.bat.iter().enumerate() {
            if sector == UNALLOCATED {
                continue;
            }
            let block_first = index as u64 * self.block_size;
            let sectors = self.block_size.min(size - block_first) / SECTOR_SIZE;
            let block_at = u64::from(sector) * SECTOR_SIZE;
            let bitmap = self.read_bitmap(block_at, 0, sectors - 1)?;
            let mut s = 0;
            while s < sectors {
                if !bit_msb_first(&bitmap, s) {
                    s += 1;
                    continue;
                }
                let run_start = s;
                while s < sectors && bit_msb_first(&bitmap, s) {
                    s += 1;
                }
                ranges.push(block_first + run_start * SECTOR_SIZE..block_first + s * SECTOR_SIZE);
            }
        }
        if let Some(parent) = &self.parent {
            for r in parent.allocated_ranges()? {
                if r.start < size {
                    ranges.push(r.start..r.end.min(size));
                }
            }
        }
        Ok(super::image::normalize_ranges(ranges))
    }
}

/// A valid footer at the end of a dynamic disk must describe the same disk as the copy at
/// offset 0.
fn check_same_disk(head: &Footer, trailing: &Footer) -> Result<(), VhdError> {
    if trailing.disk_type != head.disk_type
        || trailing.current_size != head.current_size
        || trailing.unique_id != head.unique_id
    {
        return Err(VhdError::TrailingFooter {
            problem: format!(
                "describes another disk (type {:?}, size {}) than the copy at offset 0 (type {:?}, size {})",
                trailing.disk_type, trailing.current_size, head.disk_type, head.current_size
            ),
        });
    }
    Ok(())
}

/// Opens a dynamic or differencing disk whose footer at the end is damaged, from the copy at
/// offset 0 (the specification keeps that copy for redundancy; qemu reads only it). A cut or
/// padded file must still be refused: the damaged sector has to sit exactly where the
/// structures end, as the writer appends the footer right after the last block.
fn open_past_damaged_footer(
    file: &Arc<dyn ReadAt>,
    footer: &Footer,
    file_len: u64,
    parent_dir: Option<&Path>,
    depth: usize,
    damage: VhdError,
) -> Result<Sparse, VhdError> {
    let data_limit = file_len - FOOTER_SIZE as u64;
    let sparse = Sparse::open(file, footer, file_len, parent_dir, depth).map_err(|e| {
        VhdError::TrailingFooter {
            problem: format!("is not valid ({damage}) and the disk does not fit before it ({e})"),
        }
    })?;
    let end = sparse.structures_end(footer.data_offset);
    if end != data_limit {
        return Err(VhdError::TrailingFooter {
            problem: format!(
                "is not valid ({damage}) and the disk's structures end at {end}, not at {data_limit} where it belongs"
            ),
        });
    }
    Ok(sparse)
}

/// Finds the parent of a differencing disk next to it and checks its identity.
fn resolve_parent(
    file: &dyn ReadAt,
    file_len: u64,
    header: &DynamicHeader,
    parent_dir: Option<&Path>,
    depth: usize,
) -> Result<VhdDisk, VhdError> {
    if depth >= MAX_PARENT_DEPTH {
        return Err(VhdError::ParentChainTooDeep(MAX_PARENT_DEPTH));
    }
    // Relative locators first: they survive a move of the whole chain, as Hyper-V prefers.
    let mut names = Vec::new();
    for code in [*b"W2ru", *b"W2ku"] {
        for (index, locator) in header
            .parent_locators
            .iter()
            .filter(|(_, l)| l.platform_code == code)
        {
            let path = read_locator(file, file_len, *index, locator)?;
            names.extend(file_name_of(&path));
        }
    }
    names.extend(file_name_of(&header.parent_unicode_name));

    let mut tried = Vec::new();
    if let Some(dir) = parent_dir {
        for name in names {
            let path = dir.join(&name);
            if tried.contains(&path) {
                continue;
            }
            tried.push(path.clone());
            if !path.is_file() {
                continue;
            }
            let parent_file = std::fs::File::open(&path).map_err(|e| VhdError::Parent {
                path: path.clone(),
                error: Box::new(VhdError::Io {
                    what: "parent file",
                    offset: 0,
                    len: 0,
                    source: e,
                }),
            })?;
            let parent = VhdDisk::open_at_depth(Arc::new(parent_file), Some(dir), depth + 1)
                .map_err(|e| VhdError::Parent {
                    path: path.clone(),
                    error: Box::new(e),
                })?;
            if parent.footer.unique_id != header.parent_unique_id {
                return Err(VhdError::ParentMismatch {
                    path,
                    expected: hex::encode(header.parent_unique_id),
                    found: hex::encode(parent.footer.unique_id),
                });
            }
            return Ok(parent);
        }
    }
    Err(VhdError::ParentNotFound {
        name: header.parent_unicode_name.clone(),
        tried,
    })
}

/// Reads a W2ru / W2ku locator's UTF-16LE path.
fn read_locator(
    file: &dyn ReadAt,
    file_len: u64,
    index: usize,
    locator: &ParentLocator,
) -> Result<String, VhdError> {
    let bad = |reason: String| VhdError::BadParentLocator { index, reason };
    if locator.data_length > MAX_LOCATOR_BYTES || locator.data_length % 2 != 0 {
        return Err(bad(format!(
            "data length {} is odd or longer than {MAX_LOCATOR_BYTES} bytes",
            locator.data_length
        )));
    }
    let end = locator
        .data_offset
        .checked_add(u64::from(locator.data_length));
    if end.is_none_or(|e| e > file_len) {
        return Err(bad(format!(
            "{} bytes at offset {} lie outside the {file_len}-byte file",
            locator.data_length, locator.data_offset
        )));
    }
    let mut raw = vec![0u8; usize::try_from(locator.data_length).unwrap_or(usize::MAX)];
    read_exact(file, &mut raw, locator.data_offset, "parent locator")?;
    let units: Vec<u16> = raw
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    Ok(utf16_trimmed(&units))
}

/// The last component of a Windows or Unix path, if it can name a file in a directory.
fn file_name_of(path: &str) -> Option<String> {
    let name = path.rsplit(['\\', '/']).next()?.trim_end_matches('\0');
    let usable = !name.is_empty() && name != "." && name != ".." && !name.contains(['\0', ':']);
    usable.then(|| name.to_string())
}

fn utf16_trimmed(units: &[u16]) -> String {
    let end = units.iter().rposition(|&u| u != 0).map_or(0, |p| p + 1);
    String::from_utf16_lossy(&units[..end])
}

fn check_disk_size(size: u64) -> Result<(), VhdError> {
    if size == 0 {
        return Err(VhdError::InvalidSize {
            size,
            reason: "a disk must not be empty",
        });
    }
    if size % SECTOR_SIZE != 0 {
        return Err(VhdError::InvalidSize {
            size,
            reason: "not a multiple of 512",
        });
    }
    Ok(())
}

fn check_cookie(
    raw: &[u8],
    cookie: [u8; 8],
    what: &'static str,
    expected: &'static str,
) -> Result<(), VhdError> {
    let found = raw.get(0..8).unwrap_or_default();
    if found != cookie {
        return Err(VhdError::BadCookie {
            what,
            expected,
            found: printable(found),
        });
    }
    Ok(())
}

fn find_cookie(raw: &[u8]) -> Option<usize> {
    raw.windows(FOOTER_COOKIE.len())
        .position(|w| w == FOOTER_COOKIE)
}

fn printable(raw: &[u8]) -> String {
    raw.iter()
        .map(|&b| if b.is_ascii_graphic() { b as char } else { '.' })
        .collect()
}

/// Ones' complement of the byte sum, with the 4-byte checksum field at `skip` left out.
fn checksum(raw: &[u8], skip: usize) -> u32 {
    let sum = raw
        .iter()
        .enumerate()
        .filter(|(i, _)| !(skip..skip + 4).contains(i))
        .fold(0u32, |acc, (_, &b)| acc.wrapping_add(u32::from(b)));
    !sum
}

fn bit_msb_first(bitmap: &[u8], index: u64) -> bool {
    let byte = usize::try_from(index / 8).ok().and_then(|i| bitmap.get(i));
    byte.is_some_and(|b| b & (0x80 >> (index % 8)) != 0)
}

fn file_len(file: &dyn ReadAt) -> Result<u64, VhdError> {
    file.len().map_err(|source| VhdError::Io {
        what: "file length",
        offset: 0,
        len: 0,
        source,
    })
}

/// Positional read; a short file becomes `Truncated`, other failures `Io`.
fn read_exact(
    file: &dyn ReadAt,
    buf: &mut [u8],
    offset: u64,
    what: &'static str,
) -> Result<(), VhdError> {
    let len = buf.len() as u64;
    super::read_checked(file, buf, offset).map_err(|f| match f {
        super::ReadFailure::Truncated { end, file_len } => VhdError::Truncated {
            what,
            end,
            file_len,
        },
        super::ReadFailure::Io(source) => VhdError::Io {
            what,
            offset,
            len,
            source,
        },
    })
}

fn be_u16(raw: &[u8], at: usize) -> u16 {
    u16::from_be_bytes(array_at(raw, at))
}

fn be_u32(raw: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(array_at(raw, at))
}

fn be_u64(raw: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(array_at(raw, at))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::image::testutil::*;
    use std::process::Command;

    fn open_bytes(data: Vec<u8>) -> Result<VhdDisk, VhdError> {
        VhdDisk::open(Arc::new(data), None)
    }

    fn read_all(disk: &VhdDisk) -> Vec<u8> {
        let mut out = vec![0u8; disk.virtual_size() as usize];
        disk.read_at(&mut out, 0).unwrap();
        out
    }

    /// Converts `raw` to a VHD with qemu-img and returns the file's bytes.
    fn qemu_vhd(dir: &Path, raw: &[u8], options: &str, name: &str) -> Vec<u8> {
        std::fs::read(qemu_convert(dir, raw, "vpc", options, name)).unwrap()
    }

    /// Rewrites the footer at `at` through `edit`, with a valid checksum.
    fn edit_footer(file: &mut [u8], at: usize, edit: impl Fn(&mut Footer)) {
        let mut footer = Footer::parse(&array_at(file, at)).unwrap();
        edit(&mut footer);
        file[at..at + FOOTER_SIZE].copy_from_slice(&footer.to_bytes());
    }

    /// Rewrites bytes of the dynamic header at 512 and fixes its checksum.
    fn edit_header(file: &mut [u8], edit: impl Fn(&mut [u8])) {
        let header = &mut file[512..512 + DYNAMIC_HEADER_SIZE];
        edit(header);
        let sum = checksum(header, 36);
        header[36..40].copy_from_slice(&sum.to_be_bytes());
    }

    fn bat_entry(file: &[u8], index: usize) -> u32 {
        let table = be_u64(file, 512 + 16) as usize;
        be_u32(file, table + 4 * index)
    }

    #[test]
    fn geometry_follows_the_specification() {
        assert_eq!(geometry(100 << 20), (1003, 12, 17));
        // Past the CHS range the geometry saturates at the maximum.
        assert_eq!(geometry(3 << 40), (65535, 16, 255));
        assert_eq!(geometry(0), (0, 4, 17));
    }

    /// qemu computes the same geometry: without force_size it rounds the size up to a CHS
    /// product and stores that size and its geometry in the footer.
    #[test]
    fn geometry_matches_qemu() {
        let dir = tempfile::tempdir().unwrap();
        for size in [
            1u64 << 20,
            20 << 20,
            100 << 20,
            (3 << 20) + 512,
            1 << 30,
            40 << 30,
            130 << 30,
            2040 << 30,
        ] {
            let path = dir.path().join(format!("{size}.vhd"));
            qemu_img(&[
                "create",
                "-f",
                "vpc",
                "-o",
                "subformat=dynamic",
                p(&path),
                &size.to_string(),
            ]);
            let file = std::fs::read(&path).unwrap();
            let footer = Footer::parse(&array_at(&file, 0)).unwrap();
            let (c, h, s) = geometry(footer.current_size);
            assert_eq!(
                footer.geometry,
                Geometry {
                    cylinders: c,
                    heads: h,
                    sectors_per_track: s
                },
                "size {size}"
            );
            // Beyond the CHS range qemu keeps the exact size under the maximum geometry.
            let chs = u64::from(c) * u64::from(h) * u64::from(s) * 512;
            if size <= 65535 * 16 * 255 * 512 {
                assert_eq!(chs, footer.current_size, "size {size}");
            } else {
                assert_eq!((c, h, s), (65535, 16, 255), "size {size}");
            }
        }
    }

    #[test]
    fn timestamps_count_from_2000() {
        assert_eq!(vhd_timestamp(946_684_800), 0);
        assert_eq!(vhd_timestamp(946_684_800 + 86_400), 86_400);
        assert_eq!(vhd_timestamp(0), 0);
        assert_eq!(vhd_timestamp(u64::MAX), u32::MAX);
    }

    /// The failover output: raw bytes + fixed_footer() is a VHD qemu reads at the exact size
    /// with identical contents, and every footer field is as the spec table says.
    #[test]
    fn fixed_footer_makes_vhds_qemu_accepts() {
        let dir = tempfile::tempdir().unwrap();
        for size in [100u64 << 20, 20 << 20, (3 << 20) + 512] {
            let raw = sparse_disk(size as usize, size);
            let raw_path = dir.path().join(format!("{size}.raw"));
            std::fs::write(&raw_path, &raw).unwrap();
            let id = [0x5a; 16];
            let ts = vhd_timestamp(1_700_000_000);
            let footer = fixed_footer(size, id, ts).unwrap();
            let vhd_path = dir.path().join(format!("{size}.vhd"));
            let mut vhd = raw.clone();
            vhd.extend_from_slice(&footer);
            std::fs::write(&vhd_path, &vhd).unwrap();

            assert_eq!(qemu_virtual_size("vpc", &vhd_path), size);
            let status = Command::new("qemu-img")
                .args([
                    "compare",
                    "-f",
                    "vpc",
                    "-F",
                    "raw",
                    p(&vhd_path),
                    p(&raw_path),
                ])
                .status()
                .unwrap();
            assert!(status.success(), "qemu-img compare failed for size {size}");

            // Field by field against specs/vhd.md.
            assert_eq!(&footer[0..8], b"conectix");
            assert_eq!(be_u32(&footer, 8), 2);
            assert_eq!(be_u32(&footer, 12), 0x0001_0000);
            assert_eq!(be_u64(&footer, 16), u64::MAX);
            assert_eq!(be_u32(&footer, 24), ts);
            assert_eq!(&footer[28..32], b"drvt");
            assert_eq!(be_u32(&footer, 32), 0x0001_0000);
            assert_eq!(&footer[36..40], b"Wi2k");
            assert_eq!(be_u64(&footer, 40), size);
            assert_eq!(be_u64(&footer, 48), size);
            assert_eq!(&footer[56..60], &[0xff, 0xff, 16, 255]);
            assert_eq!(be_u32(&footer, 60), 2);
            assert_eq!(be_u32(&footer, 64), checksum(&footer, 64));
            assert_eq!(&footer[68..84], &id);
            assert!(footer[84..].iter().all(|&b| b == 0));

            let parsed = Footer::parse(&footer).unwrap();
            assert_eq!(parsed.to_bytes(), footer);
            assert_eq!(parsed.current_size, size);
            assert_eq!(parsed.disk_type, DiskType::Fixed);

            let disk = open_bytes(vhd).unwrap();
            assert_eq!(disk.disk_type(), DiskType::Fixed);
            assert!(read_all(&disk) == raw);
        }
    }

    #[test]
    fn fixed_footer_refuses_bad_sizes() {
        for size in [0, 1000, (1 << 20) + 1] {
            let err = fixed_footer(size, [0; 16], 0).unwrap_err();
            assert!(matches!(err, VhdError::InvalidSize { .. }), "{size}: {err}");
        }
    }

    #[test]
    fn bad_footer_cookie_is_refused() {
        let mut vhd = vec![0u8; 1 << 20];
        vhd.extend_from_slice(&fixed_footer(1 << 20, [1; 16], 0).unwrap());
        let at = vhd.len() - FOOTER_SIZE;
        vhd[at] = b'C';
        let err = open_bytes(vhd).err().unwrap();
        assert!(
            matches!(err, VhdError::BadCookie { what: "footer", .. }),
            "{err}"
        );
    }

    #[test]
    fn bad_footer_checksum_is_refused() {
        let mut vhd = vec![0u8; 1 << 20];
        vhd.extend_from_slice(&fixed_footer(1 << 20, [1; 16], 0).unwrap());
        let at = vhd.len() - FOOTER_SIZE + 30; // inside the creator application
        vhd[at] ^= 0x01;
        let err = open_bytes(vhd).err().unwrap();
        assert!(
            matches!(err, VhdError::BadChecksum { what: "footer", .. }),
            "{err}"
        );
    }

    #[test]
    fn footer_fields_are_validated() {
        let good = fixed_footer(1 << 20, [1; 16], 0).unwrap();
        let mut f = Footer::parse(&good).unwrap();
        let mut raw = f.to_bytes();
        raw[12..16].copy_from_slice(&0x0002_0000u32.to_be_bytes());
        let sum = checksum(&raw, 64);
        raw[64..68].copy_from_slice(&sum.to_be_bytes());
        assert!(matches!(
            Footer::parse(&raw),
            Err(VhdError::UnsupportedVersion {
                version: 0x0002_0000,
                ..
            })
        ));

        let mut raw = f.to_bytes();
        raw[60..64].copy_from_slice(&5u32.to_be_bytes());
        let sum = checksum(&raw, 64);
        raw[64..68].copy_from_slice(&sum.to_be_bytes());
        assert!(matches!(
            Footer::parse(&raw),
            Err(VhdError::UnknownDiskType(5))
        ));

        f.current_size = 1000;
        assert!(matches!(
            Footer::parse(&f.to_bytes()),
            Err(VhdError::InvalidSize { size: 1000, .. })
        ));
    }

    #[test]
    fn truncated_fixed_data_is_refused() {
        // A footer claiming 2 MiB behind only 1 MiB of data.
        let mut vhd = vec![0u8; 1 << 20];
        vhd.extend_from_slice(&fixed_footer(2 << 20, [1; 16], 0).unwrap());
        let err = open_bytes(vhd).err().unwrap();
        assert!(
            matches!(
                err,
                VhdError::Truncated {
                    what: "fixed disk data",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn dynamic_header_checksum_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let mut vhd = qemu_vhd(
            dir.path(),
            &sparse_disk(4 << 20, 1),
            "subformat=dynamic",
            "h.vhd",
        );
        vhd[512 + 100] ^= 0x40; // inside the parent unicode name
        let err = open_bytes(vhd).err().unwrap();
        assert!(
            matches!(
                err,
                VhdError::BadChecksum {
                    what: "dynamic header",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn dynamic_header_fields_are_validated() {
        let dir = tempfile::tempdir().unwrap();
        let vhd = qemu_vhd(
            dir.path(),
            &sparse_disk(4 << 20, 1),
            "subformat=dynamic",
            "f.vhd",
        );

        let mut bad = vhd.clone();
        bad[512] = b'X';
        let err = open_bytes(bad).err().unwrap();
        assert!(
            matches!(
                err,
                VhdError::BadCookie {
                    what: "dynamic header",
                    ..
                }
            ),
            "{err}"
        );

        let mut bad = vhd.clone();
        edit_header(&mut bad, |h| {
            h[32..36].copy_from_slice(&1000u32.to_be_bytes())
        });
        let err = open_bytes(bad).err().unwrap();
        assert!(matches!(err, VhdError::InvalidBlockSize(1000)), "{err}");

        let mut bad = vhd.clone();
        edit_header(&mut bad, |h| h[28..32].copy_from_slice(&1u32.to_be_bytes()));
        let err = open_bytes(bad).err().unwrap();
        assert!(
            matches!(err, VhdError::TableTooSmall { entries: 1, .. }),
            "{err}"
        );

        let mut bad = vhd.clone();
        edit_header(&mut bad, |h| {
            h[16..24].copy_from_slice(&(1u64 << 40).to_be_bytes())
        });
        let err = open_bytes(bad).err().unwrap();
        assert!(matches!(err, VhdError::BadBatLocation { .. }), "{err}");

        let mut bad = vhd.clone();
        edit_footer(&mut bad, 0, |f| f.data_offset = 1 << 40);
        let err = open_bytes(bad).err().unwrap();
        assert!(matches!(err, VhdError::BadHeaderOffset { .. }), "{err}");
    }

    #[test]
    fn bat_entry_past_end_of_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut vhd = qemu_vhd(
            dir.path(),
            &sparse_disk(4 << 20, 1),
            "subformat=dynamic",
            "b.vhd",
        );
        assert_ne!(bat_entry(&vhd, 0), UNALLOCATED);
        let table = be_u64(&vhd, 512 + 16) as usize;
        vhd[table..table + 4].copy_from_slice(&0x00FF_0000u32.to_be_bytes());
        let err = open_bytes(vhd).err().unwrap();
        assert!(
            matches!(err, VhdError::BatEntryPastEof { index: 0, .. }),
            "{err}"
        );
        assert!(
            err.to_string()
                .contains("BAT entry 0 points past end of file"),
            "{err}"
        );
    }

    #[test]
    fn bat_entry_over_the_headers_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut vhd = qemu_vhd(
            dir.path(),
            &sparse_disk(4 << 20, 1),
            "subformat=dynamic",
            "o.vhd",
        );
        let table = be_u64(&vhd, 512 + 16) as usize;
        vhd[table..table + 4].copy_from_slice(&1u32.to_be_bytes());
        let err = open_bytes(vhd).err().unwrap();
        assert!(
            matches!(err, VhdError::BlockOverlapsMetadata { index: 0, .. }),
            "{err}"
        );
    }

    #[test]
    fn truncated_dynamic_vhd_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let vhd = qemu_vhd(
            dir.path(),
            &sparse_disk(4 << 20, 1),
            "subformat=dynamic",
            "t.vhd",
        );
        for cut in [512, 4096, 1 << 20] {
            let short = vhd[..vhd.len() - cut].to_vec();
            let err = open_bytes(short).err().unwrap();
            assert!(
                matches!(err, VhdError::TrailingFooter { .. }),
                "cut {cut}: {err}"
            );
        }
        // Cut so far that the blocks are gone but a footer-looking tail is put back.
        let mut short = vhd[..1 << 20].to_vec();
        short.extend_from_slice(&vhd[vhd.len() - FOOTER_SIZE..]);
        let err = open_bytes(short).err().unwrap();
        assert!(matches!(err, VhdError::BatEntryPastEof { .. }), "{err}");
        // Less than a footer.
        let err = open_bytes(vec![0u8; 100]).err().unwrap();
        assert!(matches!(err, VhdError::Truncated { .. }), "{err}");
    }

    /// The footer at the end damaged in place (cookie or checksum) is read past from the copy
    /// at offset 0, as the specification's redundancy allows; moved by padding, it is not.
    #[test]
    fn dynamic_disk_with_its_end_footer_damaged_in_place_reads_from_the_copy() {
        let dir = tempfile::tempdir().unwrap();
        let raw = sparse_disk(4 << 20, 3);
        let vhd = qemu_vhd(dir.path(), &raw, "subformat=dynamic", "d.vhd");
        let empty = qemu_vhd(dir.path(), &[0u8; 1 << 20], "subformat=dynamic", "e.vhd");
        for (name, image) in [("with data", &vhd), ("without blocks", &empty)] {
            let expected = read_all(&open_bytes(image.clone()).unwrap());
            let end = image.len() - FOOTER_SIZE;
            for (what, at) in [("cookie", end), ("checksum", end + 64)] {
                let mut damaged = image.clone();
                damaged[at] ^= 0x55;
                let disk =
                    open_bytes(damaged).unwrap_or_else(|e| panic!("{name}, {what} damaged: {e}"));
                assert_eq!(read_all(&disk), expected, "{name}, {what} damaged");
            }
            // A sector of padding after a damaged footer: the file no longer ends where the
            // disk's structures say it should.
            let mut padded = image.clone();
            padded[end] ^= 0x55;
            padded.extend_from_slice(&[0u8; FOOTER_SIZE]);
            let err = open_bytes(padded).err().unwrap();
            assert!(
                matches!(err, VhdError::TrailingFooter { .. }),
                "{name}: {err}"
            );
        }
    }

    #[test]
    fn dynamic_disk_without_its_head_copy_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut vhd = qemu_vhd(
            dir.path(),
            &sparse_disk(4 << 20, 1),
            "subformat=dynamic",
            "n.vhd",
        );
        vhd[0] = b'X';
        let err = open_bytes(vhd).err().unwrap();
        assert!(matches!(err, VhdError::BadCookie { .. }), "{err}");
    }

    /// Sectors whose bitmap bit is clear read as zeros, and are not reported as allocated.
    #[test]
    fn cleared_bitmap_bits_read_as_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let raw = random_bytes(4 << 20, 5);
        let mut vhd = qemu_vhd(dir.path(), &raw, "subformat=dynamic", "m.vhd");
        let block0 = u64::from(bat_entry(&vhd, 0)) as usize * 512;
        // Clear sectors 8..16 (bitmap byte 1) and sector 17 (bit 1 of byte 2, MSB first).
        vhd[block0 + 1] = 0;
        vhd[block0 + 2] &= !0x40;
        let disk = open_bytes(vhd).unwrap();
        let mut expected = raw.clone();
        expected.resize(disk.virtual_size() as usize, 0);
        expected[8 * 512..16 * 512].fill(0);
        expected[17 * 512..18 * 512].fill(0);
        assert!(read_all(&disk) == expected);
        let ranges = disk.allocated_ranges().unwrap();
        assert_eq!(ranges[0], 0..8 * 512);
        assert_eq!(ranges[1], 16 * 512..17 * 512);
        assert_eq!(ranges[2].start, 18 * 512);
        // A read of one byte in the middle of a cleared sector.
        let mut one = [0xffu8; 1];
        disk.read_at(&mut one, 8 * 512 + 100).unwrap();
        assert_eq!(one, [0]);
    }

    #[test]
    fn reads_outside_the_disk_are_refused() {
        let mut vhd = vec![0u8; 1 << 20];
        vhd.extend_from_slice(&fixed_footer(1 << 20, [1; 16], 0).unwrap());
        let disk = open_bytes(vhd).unwrap();
        let mut buf = [0u8; 2];
        assert!(matches!(
            disk.read_at(&mut buf, (1 << 20) - 1),
            Err(VhdError::OutOfRange { .. })
        ));
        assert!(matches!(
            disk.read_at(&mut buf, u64::MAX),
            Err(VhdError::OutOfRange { .. })
        ));
    }

    /// A differencing chain made by hand from qemu dynamic images (qemu cannot create
    /// differencing VHDs): child sectors with their bitmap bit set come from the child,
    /// everything else from the parent.
    struct Chain {
        dir: tempfile::TempDir,
        child_data: Vec<u8>,
        child: Vec<u8>,
    }

    fn utf16le(s: &str) -> Vec<u8> {
        s.encode_utf16().flat_map(u16::to_le_bytes).collect()
    }

    /// A dynamic VHD of `size` qemu wrote 64 KiB of 0x77 into at 2 MiB (block 1, which qemu
    /// allocates whole with an all-ones bitmap), with sectors 0..8 of block 1 cleared in the
    /// bitmap so that, once the image is a child, they read through to its parent.
    fn qemu_child_image(dir: &Path, size: &str) -> Vec<u8> {
        let child_path = dir.join("child-src.vhd");
        qemu_img(&[
            "create",
            "-f",
            "vpc",
            "-o",
            "subformat=dynamic",
            p(&child_path),
            size,
        ]);
        qemu_io(&[
            "-f",
            "vpc",
            "-c",
            "write -P 0x77 2097152 65536",
            p(&child_path),
        ]);
        let mut child = std::fs::read(&child_path).unwrap();
        let block1 = u64::from(bat_entry(&child, 1)) as usize * 512;
        child[block1] = 0;
        child
    }

    /// Makes `child` a differencing disk of the parent with `parent_id`: its unicode name, and
    /// a locator (`code`, path) whose data is appended after the blocks, before the footer.
    fn make_differencing(
        child: &mut Vec<u8>,
        parent_id: [u8; 16],
        unicode_name: &str,
        locator: Option<(&[u8; 4], &str)>,
    ) {
        let trailing = child.split_off(child.len() - FOOTER_SIZE);
        let locator_at = child.len() as u64;
        if let Some((_, path)) = locator {
            let mut data = utf16le(path);
            data.resize(512, 0);
            child.extend_from_slice(&data);
        }
        child.extend_from_slice(&trailing);
        let name: Vec<u8> = unicode_name
            .encode_utf16()
            .flat_map(u16::to_be_bytes)
            .collect();
        edit_header(child, |h| {
            h[40..56].copy_from_slice(&parent_id);
            h[64..576].fill(0);
            h[64..64 + name.len()].copy_from_slice(&name);
            if let Some((code, path)) = locator {
                h[576..580].copy_from_slice(code);
                h[580..584].copy_from_slice(&1u32.to_be_bytes());
                h[584..588].copy_from_slice(&(utf16le(path).len() as u32).to_be_bytes());
                h[592..600].copy_from_slice(&locator_at.to_be_bytes());
            }
        });
        let tail = child.len() - FOOTER_SIZE;
        for at in [0, tail] {
            edit_footer(child, at, |f| f.disk_type = DiskType::Differencing);
        }
    }

    fn make_chain(locator: Option<(&[u8; 4], &str)>, unicode_name: &str) -> Chain {
        let dir = tempfile::tempdir().unwrap();
        let parent_raw = random_bytes(6 << 20, 11);
        let parent = qemu_vhd(dir.path(), &parent_raw, "subformat=dynamic", "parent.vhd");
        let parent_footer = Footer::parse(&array_at(&parent, 0)).unwrap();
        let size = parent_footer.current_size as usize;
        let mut parent_raw = parent_raw;
        parent_raw.resize(size, 0);

        // The child: a dynamic image of the same size with data in part of block 1 only.
        // qemu allocates the whole block: the rest of it reads as the child's zeros, not the
        // parent's data, but for sectors 0..8, which read from the parent.
        let mut child = qemu_child_image(dir.path(), &size.to_string());
        let mut child_data = parent_raw.clone();
        child_data[2 << 20..(4 << 20).min(size)].fill(0);
        child_data[2 << 20..(2 << 20) + 65536].fill(0x77);
        child_data[2 << 20..(2 << 20) + 8 * 512]
            .copy_from_slice(&parent_raw[2 << 20..(2 << 20) + 8 * 512]);
        make_differencing(&mut child, parent_footer.unique_id, unicode_name, locator);
        Chain {
            dir,
            child_data,
            child,
        }
    }

    #[test]
    fn differencing_disk_reads_through_to_its_parent() {
        for (locator, name) in [
            (Some((b"W2ru", ".\\parent.vhd")), ""),
            (Some((b"W2ku", "C:\\VMs\\Disks\\parent.vhd")), ""),
            (None, "parent.vhd"),
        ] {
            let chain = make_chain(locator, name);
            let disk =
                VhdDisk::open(Arc::new(chain.child.clone()), Some(chain.dir.path())).unwrap();
            assert_eq!(disk.disk_type(), DiskType::Differencing);
            let got = read_all(&disk);
            let diff = got.iter().zip(&chain.child_data).position(|(a, b)| a != b);
            assert_eq!(
                diff,
                None,
                "{locator:?} {name}: {} vs {}",
                got.len(),
                chain.child_data.len()
            );
            let ranges = disk.allocated_ranges().unwrap();
            // qemu left the parent's all-zero tail past 6 MiB unallocated; block 1 of the
            // child lies inside the parent's data.
            assert_eq!(ranges, vec![0..6 << 20]);

            // Through the common interface too, from a file next to its parent.
            let path = chain.dir.path().join("child.vhd");
            std::fs::write(&path, &chain.child).unwrap();
            let img = crate::format::image::open(&path).unwrap();
            assert_eq!(
                img.format(),
                crate::format::image::ImageFormat::VhdDifferencing
            );
        }
    }

    #[test]
    fn differencing_disk_without_its_parent_is_refused() {
        let chain = make_chain(Some((b"W2ru", ".\\parent.vhd")), "parent.vhd");
        let err = VhdDisk::open(Arc::new(chain.child.clone()), None)
            .err()
            .unwrap();
        assert!(matches!(err, VhdError::ParentNotFound { .. }), "{err}");

        let elsewhere = tempfile::tempdir().unwrap();
        let err = VhdDisk::open(Arc::new(chain.child.clone()), Some(elsewhere.path()))
            .err()
            .unwrap();
        assert!(
            matches!(&err, VhdError::ParentNotFound { tried, .. } if tried.len() == 1),
            "{err}"
        );

        // A parent file with another identity.
        let other = qemu_vhd(
            chain.dir.path(),
            &random_bytes(6 << 20, 12),
            "subformat=dynamic",
            "other.vhd",
        );
        std::fs::write(chain.dir.path().join("parent.vhd"), other).unwrap();
        let err = VhdDisk::open(Arc::new(chain.child.clone()), Some(chain.dir.path()))
            .err()
            .unwrap();
        assert!(matches!(err, VhdError::ParentMismatch { .. }), "{err}");
    }

    #[test]
    fn locators_cannot_leave_the_directory() {
        // Only the file name of a locator path is used, never its directories.
        assert_eq!(
            file_name_of("..\\..\\etc\\passwd").as_deref(),
            Some("passwd")
        );
        assert_eq!(file_name_of("C:\\a\\b.vhd").as_deref(), Some("b.vhd"));
        assert_eq!(file_name_of("dir\\.."), None);
        assert_eq!(file_name_of(""), None);
        assert_eq!(file_name_of("C:"), None);
    }

    #[test]
    fn bad_parent_locator_is_refused() {
        let mut chain = make_chain(Some((b"W2ru", ".\\parent.vhd")), "parent.vhd");
        edit_header(&mut chain.child, |h| {
            h[592..600].copy_from_slice(&(1u64 << 50).to_be_bytes())
        });
        let err = VhdDisk::open(Arc::new(chain.child), Some(chain.dir.path()))
            .err()
            .unwrap();
        assert!(
            matches!(err, VhdError::BadParentLocator { index: 0, .. }),
            "{err}"
        );
    }

    /// Writes seeds for the `vhd` and `image` fuzz targets into `$VHD_SEED_DIR` (fuzz/seed.sh
    /// converts them to the targets' sparse encoding): our writer's fixed disks, and a
    /// differencing disk (qemu cannot make those) whose parent is the fixed disk the fuzz
    /// targets keep in their parent directory: `parent.vhd`, 4 MiB, unique id 0x5a × 16.
    #[test]
    #[ignore = "writes fuzz seeds; run through fuzz/seed.sh"]
    fn write_fuzz_seeds() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = std::env::var_os("VHD_SEED_DIR")
            .map_or_else(|| tmp.path().to_owned(), std::path::PathBuf::from);
        std::fs::create_dir_all(&dir).unwrap();
        let mut seeds = Vec::new();
        for (name, size) in [
            ("writer-fixed-512.vhd", 512usize),
            ("writer-fixed-1m.vhd", 1 << 20),
        ] {
            // Patterned rather than random data keeps the sparse seeds small.
            let mut vhd = vec![0u8; size];
            vhd[..size.min(65536)].fill(0xab);
            vhd[size / 2..size / 2 + 8].copy_from_slice(b"drvault!");
            vhd.extend_from_slice(&fixed_footer(size as u64, [3; 16], vhd_timestamp(0)).unwrap());
            seeds.push((name, vhd));
        }

        // A 4 MiB dynamic image from qemu with data in block 1, turned into a child of the
        // fuzz parent: parent id and name, a W2ru locator after the blocks, type 4.
        let mut child = qemu_child_image(tmp.path(), "4M");
        make_differencing(
            &mut child,
            [0x5a; 16],
            "parent.vhd",
            Some((b"W2ru", ".\\parent.vhd")),
        );
        let parent = tmp.path().join("parent.vhd");
        let mut parent_disk: Vec<u8> = (0..(4u64 << 20) / 512)
            .flat_map(|k| std::iter::repeat_n(k as u8, 512))
            .collect();
        parent_disk.extend_from_slice(&fixed_footer(4 << 20, [0x5a; 16], 0).unwrap());
        std::fs::write(&parent, parent_disk).unwrap();
        let disk = VhdDisk::open(Arc::new(child.clone()), Some(tmp.path())).unwrap();
        assert_eq!(disk.disk_type(), DiskType::Differencing);
        seeds.push(("differencing.vhd", child));

        for (name, vhd) in seeds {
            std::fs::write(dir.join(name), vhd).unwrap();
        }
    }
}
