//! VHDX disks (Microsoft MS-VHDX, "Virtual Hard Disk v2"): reader for fixed and dynamic
//! disks, with replay of the metadata log; the writer of dynamic disks is [`write`].
//!
//! Layout (all integers little-endian, GUIDs in the Windows mixed-endian byte order):
//! - 0: file type identifier `vhdxfile`; 64 KiB and 128 KiB: two 4 KiB headers, each with a
//!   CRC-32C and a sequence number, the valid one with the higher number being current;
//!   192 KiB and 256 KiB: two copies of the region table (`regi`), locating the BAT and the
//!   metadata region; the rest of the file is 1 MiB-aligned objects in any order.
//! - metadata region: a 64 KiB table (`metadata`) of items: file parameters (block size,
//!   leave-block-allocated, has-parent), virtual disk size, logical and physical sector size,
//!   virtual disk id (the SCSI page 83 identifier), parent locator.
//! - BAT: u64 entries, state in bits 0..3, file offset in MiB from bit 20; after every
//!   chunk-ratio payload entries comes one sector-bitmap entry, chunk ratio =
//!   2^23 × logical sector size / block size.
//! - log: a ring of 4 KiB sectors holding entries (`loge` header, `desc`/`zero` descriptors,
//!   `data` sectors) that update metadata; when the current header's log GUID is non-zero the
//!   newest complete sequence of entries must be applied before anything else is read.
//!
//! Decisions where the specification leaves a choice:
//! - The log is replayed *in memory*: the file is never written. [`VhdxDisk`] reads through
//!   an overlay of the replayed sectors (data sectors are read from the log on demand, so the
//!   overlay costs a few dozen bytes per 4 KiB sector). Logs over 64 MiB are refused: the
//!   search for the active sequence is quadratic in the log size for hostile input, and
//!   Hyper-V and qemu make 1 MiB logs.
//! - Log entries may not target the first 192 KiB (file identifier and headers, which the
//!   specification keeps out of the log) nor the log itself.
//! - Payload blocks in the states not present, undefined, zero and unmapped read as zeros
//!   (the specification allows zeros for all four); partially present is refused in a file
//!   without a parent. Sector-bitmap entries are ignored for reads (they only matter for
//!   differencing disks), but their state must be a defined one.
//! - Differencing disks (has-parent) are refused with `DifferencingNotSupported`.
//! - A disk is reported as fixed when its leave-block-allocated flag is set (what Hyper-V
//!   and qemu write for fixed disks); otherwise dynamic.
//! - Reserved fields that the specification says "MUST be 0" (BAT entry bits, metadata
//!   entry and table bits, file parameter flags, log entry and zero descriptor fields) are
//!   checked; those it says to ignore (header and region table padding) are ignored. The
//!   region "Required" field must be 0 or 1; qemu writes 0 even for the BAT and metadata.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::ops::Range;
use std::sync::Arc;

use super::{array_at, overlaps, ReadAt};

pub mod write;
pub use write::{VhdxWriteError, VhdxWriter};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;
const FILE_IDENTIFIER: [u8; 8] = *b"vhdxfile";
const HEADER_SIGNATURE: [u8; 4] = *b"head";
const REGION_SIGNATURE: [u8; 4] = *b"regi";
const METADATA_SIGNATURE: [u8; 8] = *b"metadata";
const LOG_ENTRY_SIGNATURE: [u8; 4] = *b"loge";
const DATA_DESCRIPTOR_SIGNATURE: [u8; 4] = *b"desc";
const ZERO_DESCRIPTOR_SIGNATURE: [u8; 4] = *b"zero";
const DATA_SECTOR_SIGNATURE: [u8; 4] = *b"data";
/// Offsets of the two headers.
pub const HEADER_OFFSETS: [u64; 2] = [64 * KIB, 128 * KIB];
/// Size of each of the two headers.
pub const HEADER_SIZE: usize = 4096;
const REGION_TABLE_OFFSETS: [u64; 2] = [192 * KIB, 256 * KIB];
/// Size of each region table copy.
pub const REGION_TABLE_SIZE: usize = 64 * 1024;
const METADATA_TABLE_SIZE: usize = 64 * 1024;
/// Everything below this belongs to the header section.
const HEADER_SECTION_END: u64 = MIB;
/// Log entries may update region tables and everything after, never the identifier or headers.
const LOG_TARGET_MIN: u64 = 192 * KIB;
const MAX_TABLE_ENTRIES: u32 = 2047;
const MAX_METADATA_ITEM: u32 = 1024 * 1024;
const MAX_VIRTUAL_SIZE: u64 = 64 * 1024 * 1024 * MIB;
const LOG_SECTOR: u64 = 4096;
/// Largest log this reader replays; see the module documentation.
pub const MAX_REPLAY_LOG_LENGTH: u64 = 64 * MIB;
const SECTORS_PER_BITMAP_BLOCK: u64 = 1 << 23;

const STATE_NOT_PRESENT: u8 = 0;
const STATE_UNDEFINED: u8 = 1;
const STATE_ZERO: u8 = 2;
const STATE_UNMAPPED: u8 = 3;
const STATE_FULLY_PRESENT: u8 = 6;
const STATE_PARTIALLY_PRESENT: u8 = 7;
/// Sector bitmap block states: 0 not present, 6 present.
const SB_STATE_PRESENT: u8 = 6;
const BAT_RESERVED_MASK: u64 = 0x000F_FFF8;

/// A GUID in its on-disk (Windows mixed-endian) byte order.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Guid(pub [u8; 16]);

impl Guid {
    /// Builds the on-disk bytes from the canonical text fields `d1-d2-d3-d4`.
    const fn from_fields(d1: u32, d2: u16, d3: u16, d4: u64) -> Guid {
        let a = d1.to_le_bytes();
        let b = d2.to_le_bytes();
        let c = d3.to_le_bytes();
        let d = d4.to_be_bytes();
        Guid([
            a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d[0], d[1], d[2], d[3], d[4], d[5],
            d[6], d[7],
        ])
    }

    pub fn is_zero(&self) -> bool {
        self.0 == [0; 16]
    }
}

impl fmt::Display for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = &self.0;
        write!(
            f,
            "{:08X}-{:04X}-{:04X}-{:02X}{:02X}-{:02X}{:02X}{:02X}{:02X}{:02X}{:02X}",
            u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            u16::from_le_bytes([b[4], b[5]]),
            u16::from_le_bytes([b[6], b[7]]),
            b[8],
            b[9],
            b[10],
            b[11],
            b[12],
            b[13],
            b[14],
            b[15]
        )
    }
}

impl fmt::Debug for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

// Known GUIDs (MS-VHDX 2.2.3.2 and 2.6.2). Do not change.
const BAT_REGION: Guid = Guid::from_fields(0x2DC27766, 0xF623, 0x4200, 0x9D64_115E_9BFD_4A08);
const METADATA_REGION: Guid = Guid::from_fields(0x8B7CA206, 0x4790, 0x4B9A, 0xB8FE_575F_050F_886E);
const FILE_PARAMETERS: Guid = Guid::from_fields(0xCAA16737, 0xFA36, 0x4D43, 0xB3B6_33F0_AA44_E76B);
const VIRTUAL_DISK_SIZE: Guid =
    Guid::from_fields(0x2FA54224, 0xCD1B, 0x4876, 0xB211_5DBE_D83B_F4B8);
const VIRTUAL_DISK_ID: Guid = Guid::from_fields(0xBECA12AB, 0xB2E6, 0x4523, 0x93EF_C309_E000_C746);
const LOGICAL_SECTOR_SIZE: Guid =
    Guid::from_fields(0x8141BF1D, 0xA96F, 0x4709, 0xBA47_F233_A8FA_AB5F);
const PHYSICAL_SECTOR_SIZE: Guid =
    Guid::from_fields(0xCDA348C7, 0x445D, 0x4471, 0x9CC9_E988_5251_C556);
const PARENT_LOCATOR: Guid = Guid::from_fields(0xA8D35F2D, 0xB30B, 0x454D, 0xABF7_D3D8_4834_AB0C);

/// Errors from parsing or reading a VHDX. Messages name the structure, offset and value.
#[derive(Debug, thiserror::Error)]
pub enum VhdxError {
    #[error("file type identifier is {found:?}, expected \"vhdxfile\"")]
    BadFileIdentifier { found: String },
    #[error("{what}: signature {found:?}, expected {expected:?}")]
    BadSignature {
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
    #[error("no valid header: header 1: {first}; header 2: {second}")]
    NoValidHeader {
        first: Box<VhdxError>,
        second: Box<VhdxError>,
    },
    #[error("both headers are valid with the same sequence number {0}: no current header")]
    AmbiguousHeaders(u64),
    #[error("header version {0}, only version 1 is supported")]
    UnsupportedVersion(u16),
    #[error("log version {0} with a non-empty log, only version 0 is supported")]
    UnsupportedLogVersion(u16),
    #[error("log ({length} bytes at offset {offset}): {reason}")]
    BadLogLocation {
        offset: u64,
        length: u32,
        reason: &'static str,
    },
    #[error(
        "log of {length} bytes needs replaying, larger than the {max} bytes this reader replays"
    )]
    LogTooLarge { length: u64, max: u64 },
    #[error("log needs replaying but holds no valid, complete entry sequence")]
    NoValidLogSequence,
    #[error("log replay: the file is {file_len} bytes, shorter than the {flushed} bytes the log says were flushed: file truncated")]
    LogFileTruncated { flushed: u64, file_len: u64 },
    #[error("log entry {sequence}: descriptor targets {len} bytes at offset {offset}: {reason}")]
    BadLogTarget {
        sequence: u64,
        offset: u64,
        len: u64,
        reason: &'static str,
    },
    #[error("no valid region table: copy 1: {first}; copy 2: {second}")]
    NoValidRegionTable {
        first: Box<VhdxError>,
        second: Box<VhdxError>,
    },
    #[error("region table: {0}")]
    BadRegionTable(String),
    #[error("region table: unknown region {guid} is marked required")]
    UnknownRequiredRegion { guid: Guid },
    #[error("region table: no {0} region")]
    MissingRegion(&'static str),
    #[error("{what} ({len} bytes at offset {offset}): {reason}")]
    BadRegion {
        what: &'static str,
        offset: u64,
        len: u64,
        reason: String,
    },
    #[error("metadata table: {0}")]
    BadMetadataTable(String),
    #[error("metadata: unknown item {guid} is marked required")]
    UnknownRequiredMetadata { guid: Guid },
    #[error("metadata: no {0} item")]
    MissingMetadata(&'static str),
    #[error("metadata item {item}: {reason}")]
    BadMetadataItem { item: &'static str, reason: String },
    #[error("differencing VHDX (has-parent set) is not supported")]
    DifferencingNotSupported,
    #[error("BAT region of {region_len} bytes is smaller than the {needed} bytes of entries the disk needs")]
    BatTooSmall { needed: u64, region_len: u64 },
    #[error("BAT entry {index} ({kind}): invalid state {state}")]
    InvalidBatState {
        index: u64,
        kind: &'static str,
        state: u8,
    },
    #[error("BAT entry {index}: reserved bits set in {entry:#018x}")]
    BatReservedBits { index: u64, entry: u64 },
    #[error("BAT entry {index}: block partially present in a disk without a parent")]
    PartiallyPresentWithoutParent { index: u64 },
    #[error("BAT entry {index} points past end of file: block at offset {offset} ends at {end}, file is {file_len} bytes")]
    BatEntryPastEof {
        index: u64,
        offset: u64,
        end: u64,
        file_len: u64,
    },
    #[error("BAT entry {index}: block at offset {offset} overlaps the {what}")]
    BlockOverlaps {
        index: u64,
        offset: u64,
        what: &'static str,
    },
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
    #[error("read of {len} bytes at offset {offset} is outside the {size}-byte disk")]
    OutOfRange { offset: u64, len: u64, size: u64 },
}

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78) lookup table.
const CRC32C_TABLE: [u32; 256] = crc32c_table();

const fn crc32c_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0x82F6_3B78
            } else {
                c >> 1
            };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
}

/// CRC-32C of `data`, as used by every VHDX checksum.
pub fn crc32c(data: &[u8]) -> u32 {
    crc32c_update(0, data)
}

/// Continues a CRC-32C: `crc32c_update(crc32c(a), b) == crc32c(a ++ b)`.
pub fn crc32c_update(crc: u32, data: &[u8]) -> u32 {
    let mut c = !crc;
    for &b in data {
        c = CRC32C_TABLE[((c ^ u32::from(b)) & 0xFF) as usize] ^ (c >> 8);
    }
    !c
}

/// CRC-32C of a structure whose 4-byte checksum field at offset 4 counts as zero.
fn crc_without_field(raw: &[u8]) -> u32 {
    let head = raw.get(..4).unwrap_or_default();
    let rest = raw.get(8..).unwrap_or_default();
    crc32c_update(crc32c_update(crc32c(head), &[0; 4]), rest)
}

/// A VHDX header (one of the two at 64 KiB and 128 KiB).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub sequence_number: u64,
    pub file_write_guid: Guid,
    pub data_write_guid: Guid,
    pub log_guid: Guid,
    pub log_version: u16,
    pub version: u16,
    pub log_length: u32,
    pub log_offset: u64,
}

impl Header {
    /// Parses a header if it is valid in the specification's sense: signature and checksum.
    /// Its fields are checked once it is chosen as the current header, since a damaged
    /// non-current header must not stop the file from opening.
    pub fn parse(raw: &[u8; HEADER_SIZE]) -> Result<Header, VhdxError> {
        check_signed(raw, &HEADER_SIGNATURE, "header", "head")?;
        Ok(Header {
            sequence_number: le_u64(raw, 8),
            file_write_guid: Guid(array_at(raw, 16)),
            data_write_guid: Guid(array_at(raw, 32)),
            log_guid: Guid(array_at(raw, 48)),
            log_version: le_u16(raw, 64),
            version: le_u16(raw, 66),
            log_length: le_u32(raw, 68),
            log_offset: le_u64(raw, 72),
        })
    }

    /// Field checks on the current header: version, log version and log placement.
    fn check(&self) -> Result<(), VhdxError> {
        if self.version != 1 {
            return Err(VhdxError::UnsupportedVersion(self.version));
        }
        if !self.log_guid.is_zero() && self.log_version != 0 {
            return Err(VhdxError::UnsupportedLogVersion(self.log_version));
        }
        let bad = |reason| VhdxError::BadLogLocation {
            offset: self.log_offset,
            length: self.log_length,
            reason,
        };
        if self.log_offset % MIB != 0 || self.log_offset < HEADER_SECTION_END {
            return Err(bad(
                "offset is not a multiple of 1 MiB after the header section",
            ));
        }
        if u64::from(self.log_length) % MIB != 0 {
            return Err(bad("length is not a multiple of 1 MiB"));
        }
        if self
            .log_offset
            .checked_add(u64::from(self.log_length))
            .is_none()
        {
            return Err(bad("end overflows"));
        }
        Ok(())
    }

    fn log_range(&self) -> Range<u64> {
        self.log_offset..self.log_offset.saturating_add(u64::from(self.log_length))
    }
}

/// One entry of the region table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionEntry {
    pub guid: Guid,
    pub file_offset: u64,
    pub length: u32,
    pub required: bool,
}

impl RegionEntry {
    fn range(&self) -> Range<u64> {
        self.file_offset..self.file_offset.saturating_add(u64::from(self.length))
    }
}

/// Checks the 4-byte signature at 0 and the CRC-32C at 4 of a self-checksummed structure.
fn check_signed(
    raw: &[u8],
    signature: &[u8; 4],
    what: &'static str,
    expected: &'static str,
) -> Result<(), VhdxError> {
    let found = raw.get(0..4).unwrap_or_default();
    if found != signature {
        return Err(VhdxError::BadSignature {
            what,
            expected,
            found: printable(found),
        });
    }
    let stored = le_u32(raw, 4);
    let computed = crc_without_field(raw);
    if stored != computed {
        return Err(VhdxError::BadChecksum {
            what,
            stored,
            computed,
        });
    }
    Ok(())
}

/// Parses and validates one copy of the region table: signature, checksum, entry count,
/// entries (alignment, required flag, uniqueness, no unknown required region).
pub fn parse_region_table(raw: &[u8; REGION_TABLE_SIZE]) -> Result<Vec<RegionEntry>, VhdxError> {
    check_signed(raw, &REGION_SIGNATURE, "region table", "regi")?;
    let count = le_u32(raw, 8);
    if count > MAX_TABLE_ENTRIES {
        return Err(VhdxError::BadRegionTable(format!(
            "{count} entries, at most {MAX_TABLE_ENTRIES} allowed"
        )));
    }
    let mut entries: Vec<RegionEntry> = Vec::new();
    for i in 0..count as usize {
        let at = 16 + 32 * i;
        let required = match le_u32(raw, at + 28) {
            0 => false,
            1 => true,
            other => {
                return Err(VhdxError::BadRegionTable(format!(
                    "entry {i}: required field is {other}, expected 0 or 1"
                )))
            }
        };
        let entry = RegionEntry {
            guid: Guid(array_at(raw, at)),
            file_offset: le_u64(raw, at + 16),
            length: le_u32(raw, at + 24),
            required,
        };
        if entries.iter().any(|e| e.guid == entry.guid) {
            return Err(VhdxError::BadRegionTable(format!(
                "region {} listed twice",
                entry.guid
            )));
        }
        if entry.guid != BAT_REGION && entry.guid != METADATA_REGION && entry.required {
            return Err(VhdxError::UnknownRequiredRegion { guid: entry.guid });
        }
        if entry.file_offset % MIB != 0
            || entry.file_offset < HEADER_SECTION_END
            || u64::from(entry.length) % MIB != 0
        {
            return Err(VhdxError::BadRegionTable(format!(
                "region {} ({} bytes at offset {}) is not 1 MiB-aligned after the header section",
                entry.guid, entry.length, entry.file_offset
            )));
        }
        entries.push(entry);
    }
    Ok(entries)
}

/// The metadata items this reader uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Metadata {
    pub block_size: u32,
    pub leave_block_allocated: bool,
    pub has_parent: bool,
    pub virtual_size: u64,
    pub logical_sector_size: u32,
    pub physical_sector_size: u32,
    /// Virtual disk id, presented to guests as SCSI VPD page 0x83.
    pub page83: Option<Guid>,
}

/// A log descriptor of the active sequence, ready to apply.
#[derive(Clone, Debug)]
enum Descriptor {
    Zero {
        offset: u64,
        len: u64,
    },
    Data {
        offset: u64,
        leading: [u8; 8],
        trailing: [u8; 4],
        /// Absolute file offset of the data sector holding bytes 8..4092.
        sector_at: u64,
    },
}

/// Header fields of a valid log entry.
#[derive(Clone, Copy, Debug)]
struct EntryInfo {
    /// Offset within the log.
    pos: u64,
    length: u64,
    tail: u64,
    sequence: u64,
    flushed_file_offset: u64,
    last_file_offset: u64,
}

/// Reads log entries from the ring at `offset..offset + length` of the file.
struct LogRing<'a> {
    file: &'a dyn ReadAt,
    offset: u64,
    length: u64,
    guid: Guid,
}

impl LogRing<'_> {
    /// Absolute file offset of the log sector at ring position `pos` (wrapping).
    fn sector_at(&self, pos: u64) -> u64 {
        self.offset + pos % self.length
    }

    fn read_sector(&self, pos: u64) -> Result<[u8; LOG_SECTOR as usize], VhdxError> {
        let mut sector = [0u8; LOG_SECTOR as usize];
        read_exact(self.file, &mut sector, self.sector_at(pos), "log sector")?;
        Ok(sector)
    }

    /// Parses and fully validates the entry at ring position `pos` (signature, fields,
    /// descriptors, data sectors, checksum). `Ok(None)` for anything that is not a valid
    /// entry of this log; `Err` only for I/O failures.
    fn entry(&self, pos: u64) -> Result<Option<(EntryInfo, Vec<Descriptor>)>, VhdxError> {
        let first = self.read_sector(pos)?;
        if first[0..4] != LOG_ENTRY_SIGNATURE {
            return Ok(None);
        }
        let length = u64::from(le_u32(&first, 8));
        let tail = u64::from(le_u32(&first, 12));
        let sequence = le_u64(&first, 16);
        let count = u64::from(le_u32(&first, 24));
        let info = EntryInfo {
            pos,
            length,
            tail,
            sequence,
            flushed_file_offset: le_u64(&first, 48),
            last_file_offset: le_u64(&first, 56),
        };
        let header_ok = length % LOG_SECTOR == 0
            && length >= LOG_SECTOR
            && length <= self.length
            && tail % LOG_SECTOR == 0
            && tail < self.length
            && sequence != 0
            && le_u32(&first, 28) == 0
            && Guid(array_at(&first, 32)) == self.guid;
        // The first sector holds the 64-byte header and 126 descriptors, the others 128.
        let descriptor_sectors = (count + 2).div_ceil(128);
        if !header_ok || descriptor_sectors * LOG_SECTOR > length {
            return Ok(None);
        }

        let mut table =
            Vec::with_capacity(usize::try_from(descriptor_sectors * LOG_SECTOR).unwrap_or(0));
        table.extend_from_slice(&first);
        let mut crc = crc_without_field(&first);
        for s in 1..descriptor_sectors {
            let sector = self.read_sector(pos + s * LOG_SECTOR)?;
            crc = crc32c_update(crc, &sector);
            table.extend_from_slice(&sector);
        }

        let mut descriptors = Vec::new();
        let mut data_sectors = 0u64;
        for i in 0..count {
            let at = usize::try_from(64 + 32 * i).unwrap_or(usize::MAX);
            let raw: [u8; 32] = array_at(&table, at);
            let offset = le_u64(&raw, 16);
            if le_u64(&raw, 24) != sequence || offset % LOG_SECTOR != 0 {
                return Ok(None);
            }
            match array_at::<4>(&raw, 0) {
                DATA_DESCRIPTOR_SIGNATURE => {
                    let sector_pos = pos + (descriptor_sectors + data_sectors) * LOG_SECTOR;
                    descriptors.push(Descriptor::Data {
                        offset,
                        leading: array_at(&raw, 8),
                        trailing: array_at(&raw, 4),
                        sector_at: self.sector_at(sector_pos),
                    });
                    data_sectors += 1;
                }
                ZERO_DESCRIPTOR_SIGNATURE => {
                    let len = le_u64(&raw, 8);
                    if le_u32(&raw, 4) != 0 || len % LOG_SECTOR != 0 {
                        return Ok(None);
                    }
                    descriptors.push(Descriptor::Zero { offset, len });
                }
                _ => return Ok(None),
            }
        }
        if (descriptor_sectors + data_sectors) * LOG_SECTOR != length {
            return Ok(None);
        }
        for k in 0..data_sectors {
            let sector = self.read_sector(pos + (descriptor_sectors + k) * LOG_SECTOR)?;
            let seq_ok = sector[0..4] == DATA_SECTOR_SIGNATURE
                && le_u32(&sector, 4) == (sequence >> 32) as u32
                && le_u32(&sector, 4092) == sequence as u32;
            if !seq_ok {
                return Ok(None);
            }
            crc = crc32c_update(crc, &sector);
        }
        if crc != le_u32(&first, 4) {
            return Ok(None);
        }
        Ok(Some((info, descriptors)))
    }

    /// Finds the active sequence (MS-VHDX 2.3.3): the newest run of consecutive valid entries
    /// whose head's tail lies inside the run. Returns its entries, tail first.
    fn active_sequence(&self) -> Result<Vec<EntryInfo>, VhdxError> {
        let sectors = usize::try_from(self.length / LOG_SECTOR).unwrap_or(0);
        // Each ring position is parsed at most once; the scan revisits positions often.
        let mut memo: Vec<Option<Option<EntryInfo>>> = vec![None; sectors];
        let mut entry_at = |pos: u64| -> Result<Option<EntryInfo>, VhdxError> {
            let slot = usize::try_from(pos / LOG_SECTOR).unwrap_or(usize::MAX);
            if let Some(Some(known)) = memo.get(slot) {
                return Ok(*known);
            }
            let parsed = self.entry(pos)?.map(|(info, _)| info);
            if let Some(m) = memo.get_mut(slot) {
                *m = Some(parsed);
            }
            Ok(parsed)
        };

        let mut candidate: Vec<EntryInfo> = Vec::new();
        let mut current_tail = 0u64;
        let mut old_tail = 0u64;
        loop {
            let mut run: Vec<EntryInfo> = Vec::new();
            let mut head = current_tail;
            let mut covered = 0u64;
            while let Some(e) = entry_at(head)? {
                let follows = run
                    .last()
                    .is_none_or(|l| l.sequence.checked_add(1) == Some(e.sequence));
                // A run longer than the ring would be reading its own start again.
                if !follows || covered + e.length > self.length {
                    break;
                }
                covered += e.length;
                head = (head + e.length) % self.length;
                run.push(e);
            }
            let valid = run
                .last()
                .is_some_and(|h| run.iter().any(|e| e.pos == h.tail));
            let newer = |run: &[EntryInfo]| {
                run.last().map(|h| h.sequence) > candidate.last().map(|h| h.sequence)
            };
            if valid && newer(&run) {
                candidate = run;
                current_tail = head;
            } else if valid {
                current_tail = head;
            } else {
                current_tail = (current_tail + LOG_SECTOR) % self.length;
            }
            if current_tail <= old_tail {
                break;
            }
            old_tail = current_tail;
        }
        if candidate.is_empty() {
            return Err(VhdxError::NoValidLogSequence);
        }
        Ok(candidate)
    }
}

/// A piece of the replay overlay: `start..end` of the file reads from `source`.
#[derive(Clone, Debug)]
struct Piece {
    end: u64,
    source: Source,
}

#[derive(Clone, Debug)]
enum Source {
    Zero,
    /// A 4 KiB sector written at `target`: leading bytes, log data sector, trailing bytes.
    Data {
        target: u64,
        leading: [u8; 8],
        trailing: [u8; 4],
        sector_at: u64,
    },
}

/// The file as it reads after the log is replayed: the file's bytes, zeros past its end up
/// to the replayed length, and the replayed sectors on top.
struct ReplayedFile {
    base: Arc<dyn ReadAt>,
    base_len: u64,
    len: u64,
    /// Disjoint pieces keyed by start offset; later log writes replace earlier ones.
    overlay: BTreeMap<u64, Piece>,
}

impl ReplayedFile {
    fn apply(&mut self, start: u64, end: u64, source: Source) {
        let hit: Vec<(u64, Piece)> = self
            .overlay
            .range(..end)
            .rev()
            .take_while(|(_, p)| p.end > start)
            .map(|(&k, p)| (k, p.clone()))
            .collect();
        for (k, piece) in hit {
            self.overlay.remove(&k);
            if k < start {
                let head = Piece {
                    end: start,
                    source: piece.source.clone(),
                };
                self.overlay.insert(k, head);
            }
            if piece.end > end {
                self.overlay.insert(end, piece);
            }
        }
        self.overlay.insert(start, Piece { end, source });
        self.len = self.len.max(end);
    }
}

impl ReadAt for ReplayedFile {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.len)
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "read past end"))?;
        buf.fill(0);
        if offset < self.base_len {
            let n = usize::try_from(self.base_len - offset)
                .unwrap_or(usize::MAX)
                .min(buf.len());
            self.base.read_exact_at(&mut buf[..n], offset)?;
        }
        let pieces = self
            .overlay
            .range(..end)
            .rev()
            .take_while(|(_, p)| p.end > offset);
        for (&start, piece) in pieces {
            let a = start.max(offset);
            let b = piece.end.min(end);
            let dst = &mut buf[(a - offset) as usize..(b - offset) as usize];
            match &piece.source {
                Source::Zero => dst.fill(0),
                Source::Data {
                    target,
                    leading,
                    trailing,
                    sector_at,
                } => {
                    let mut sector = [0u8; LOG_SECTOR as usize];
                    self.base.read_exact_at(&mut sector, *sector_at)?;
                    sector[0..8].copy_from_slice(leading);
                    sector[4092..4096].copy_from_slice(trailing);
                    let from = (a - target) as usize;
                    dst.copy_from_slice(&sector[from..from + dst.len()]);
                }
            }
        }
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.len)
    }
}

/// Replays the log of `header` in memory over `file`.
fn replay_log(file: Arc<dyn ReadAt>, header: &Header) -> Result<ReplayedFile, VhdxError> {
    let base_len = file_len(file.as_ref())?;
    let length = u64::from(header.log_length);
    if length == 0 {
        return Err(VhdxError::BadLogLocation {
            offset: header.log_offset,
            length: header.log_length,
            reason: "log needs replaying but has length 0",
        });
    }
    if length > MAX_REPLAY_LOG_LENGTH {
        return Err(VhdxError::LogTooLarge {
            length,
            max: MAX_REPLAY_LOG_LENGTH,
        });
    }
    let log_range = header.log_range();
    if log_range.end > base_len {
        return Err(VhdxError::Truncated {
            what: "log",
            end: log_range.end,
            file_len: base_len,
        });
    }
    let ring = LogRing {
        file: file.as_ref(),
        offset: header.log_offset,
        length,
        guid: header.log_guid,
    };
    let sequence = ring.active_sequence()?;
    let Some(head) = sequence.last().copied() else {
        return Err(VhdxError::NoValidLogSequence);
    };
    if base_len < head.flushed_file_offset {
        return Err(VhdxError::LogFileTruncated {
            flushed: head.flushed_file_offset,
            file_len: base_len,
        });
    }

    let mut replayed = ReplayedFile {
        base: Arc::clone(&file),
        base_len,
        len: base_len.max(head.last_file_offset),
        overlay: BTreeMap::new(),
    };
    for info in &sequence {
        let Some((_, descriptors)) = ring.entry(info.pos)? else {
            return Err(VhdxError::NoValidLogSequence);
        };
        for d in descriptors {
            let (offset, len, source) = match d {
                Descriptor::Zero { offset, len } => (offset, len, Source::Zero),
                Descriptor::Data {
                    offset,
                    leading,
                    trailing,
                    sector_at,
                } => (
                    offset,
                    LOG_SECTOR,
                    Source::Data {
                        target: offset,
                        leading,
                        trailing,
                        sector_at,
                    },
                ),
            };
            let bad = |reason| VhdxError::BadLogTarget {
                sequence: info.sequence,
                offset,
                len,
                reason,
            };
            let end = offset
                .checked_add(len)
                .ok_or_else(|| bad("end overflows"))?;
            if offset < LOG_TARGET_MIN {
                return Err(bad("inside the file identifier or headers"));
            }
            if overlaps(&(offset..end), &log_range) {
                return Err(bad("inside the log itself"));
            }
            if len > 0 {
                replayed.apply(offset, end, source);
            }
        }
    }
    Ok(replayed)
}

/// An open fixed or dynamic VHDX. Reads take `&self` only, so one disk serves many threads.
pub struct VhdxDisk {
    /// The file, or its in-memory replayed view when the log was not empty.
    file: Arc<dyn ReadAt>,
    header: Header,
    regions: Vec<RegionEntry>,
    metadata: Metadata,
    /// Payload BAT entries only (sector-bitmap entries dropped), one per block.
    payload: Vec<u64>,
    log_replayed: bool,
}

impl VhdxDisk {
    /// Opens and validates a VHDX, replaying its log in memory when needed.
    pub fn open(file: Arc<dyn ReadAt>) -> Result<VhdxDisk, VhdxError> {
        let mut ident = [0u8; 8];
        read_exact(file.as_ref(), &mut ident, 0, "file type identifier")?;
        if ident != FILE_IDENTIFIER {
            return Err(VhdxError::BadFileIdentifier {
                found: printable(&ident),
            });
        }
        let header = current_header(file.as_ref())?;
        header.check()?;

        let log_replayed = !header.log_guid.is_zero();
        let file: Arc<dyn ReadAt> = if log_replayed {
            Arc::new(replay_log(file, &header)?)
        } else {
            file
        };
        let file_len = file_len(file.as_ref())?;

        let regions = region_table(file.as_ref())?;
        let find = |guid, name| {
            regions
                .iter()
                .find(|r| r.guid == guid)
                .cloned()
                .ok_or(VhdxError::MissingRegion(name))
        };
        let bat_region = find(BAT_REGION, "BAT")?;
        let metadata_region = find(METADATA_REGION, "metadata")?;
        check_region_layout(&regions, &header, file_len)?;

        let metadata = read_metadata(file.as_ref(), &metadata_region)?;
        if metadata.has_parent {
            return Err(VhdxError::DifferencingNotSupported);
        }
        let payload = read_bat(
            file.as_ref(),
            file_len,
            &metadata,
            &bat_region,
            &metadata_region,
            &header,
        )?;
        Ok(VhdxDisk {
            file,
            header,
            regions,
            metadata,
            payload,
            log_replayed,
        })
    }

    /// The current header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The region table in use.
    pub fn regions(&self) -> &[RegionEntry] {
        &self.regions
    }

    pub fn metadata(&self) -> &Metadata {
        &self.metadata
    }

    /// Whether a non-empty log was replayed (in memory) at open.
    pub fn log_replayed(&self) -> bool {
        self.log_replayed
    }

    /// Whether the disk is fixed (leave-block-allocated set) rather than dynamic.
    pub fn is_fixed(&self) -> bool {
        self.metadata.leave_block_allocated
    }

    pub fn virtual_size(&self) -> u64 {
        self.metadata.virtual_size
    }

    /// Reads `buf.len()` bytes of the virtual disk at `offset`; blocks without data read as
    /// zeros.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), VhdxError> {
        let size = self.virtual_size();
        let len = buf.len() as u64;
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(VhdxError::OutOfRange { offset, len, size });
        }
        let block_size = u64::from(self.metadata.block_size);
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let within = pos % block_size;
            let n =
                (buf.len() - done).min(usize::try_from(block_size - within).unwrap_or(usize::MAX));
            let out = &mut buf[done..done + n];
            let entry = usize::try_from(pos / block_size)
                .ok()
                .and_then(|i| self.payload.get(i))
                .copied()
                .unwrap_or(0);
            if bat_state(entry) == STATE_FULLY_PRESENT {
                read_exact(
                    self.file.as_ref(),
                    out,
                    bat_offset(entry) + within,
                    "block data",
                )?;
            } else {
                out.fill(0);
            }
            done += n;
        }
        Ok(())
    }

    /// Sorted, disjoint byte ranges that may hold data (the fully present blocks).
    pub fn allocated_ranges(&self) -> Vec<Range<u64>> {
        let block_size = u64::from(self.metadata.block_size);
        let size = self.virtual_size();
        let ranges = self
            .payload
            .iter()
            .enumerate()
            .filter(|(_, &e)| bat_state(e) == STATE_FULLY_PRESENT)
            .map(|(i, _)| {
                let start = i as u64 * block_size;
                start..(start + block_size).min(size)
            })
            .collect();
        super::image::normalize_ranges(ranges)
    }
}

/// Picks the current header: the valid one, or the valid one with the higher sequence number.
fn current_header(file: &dyn ReadAt) -> Result<Header, VhdxError> {
    let mut parsed = Vec::with_capacity(2);
    for at in HEADER_OFFSETS {
        let mut raw = [0u8; HEADER_SIZE];
        read_exact(file, &mut raw, at, "header")?;
        parsed.push(Header::parse(&raw));
    }
    let missing = || Err(VhdxError::MissingRegion("header"));
    let second = parsed.pop().unwrap_or_else(missing);
    let first = parsed.pop().unwrap_or_else(missing);
    match (first, second) {
        (Ok(a), Ok(b)) if a.sequence_number == b.sequence_number => {
            Err(VhdxError::AmbiguousHeaders(a.sequence_number))
        }
        (Ok(a), Ok(b)) => Ok(if a.sequence_number > b.sequence_number {
            a
        } else {
            b
        }),
        (Ok(a), Err(_)) | (Err(_), Ok(a)) => Ok(a),
        (Err(first), Err(second)) => Err(VhdxError::NoValidHeader {
            first: Box::new(first),
            second: Box::new(second),
        }),
    }
}

/// The region table: copy 1 if its signature and checksum hold, else copy 2. A copy that is
/// intact but invalid is an error: both copies are written identically.
fn region_table(file: &dyn ReadAt) -> Result<Vec<RegionEntry>, VhdxError> {
    let mut problems = Vec::new();
    for at in REGION_TABLE_OFFSETS {
        let mut raw = vec![0u8; REGION_TABLE_SIZE];
        read_exact(file, &mut raw, at, "region table")?;
        let raw: &[u8; REGION_TABLE_SIZE] = raw
            .as_slice()
            .try_into()
            .map_err(|_| VhdxError::BadRegionTable("internal size mismatch".into()))?;
        match parse_region_table(raw) {
            Err(e @ (VhdxError::BadSignature { .. } | VhdxError::BadChecksum { .. })) => {
                problems.push(Box::new(e))
            }
            other => return other,
        }
    }
    let missing = || Box::new(VhdxError::MissingRegion("region table"));
    let second = problems.pop().unwrap_or_else(missing);
    let first = problems.pop().unwrap_or_else(missing);
    Err(VhdxError::NoValidRegionTable { first, second })
}

/// Regions must lie inside the file and overlap neither each other nor the log.
fn check_region_layout(
    regions: &[RegionEntry],
    header: &Header,
    file_len: u64,
) -> Result<(), VhdxError> {
    let name = |r: &RegionEntry| match r.guid {
        g if g == BAT_REGION => "BAT region",
        g if g == METADATA_REGION => "metadata region",
        _ => "optional region",
    };
    for (i, r) in regions.iter().enumerate() {
        let bad = |reason: String| VhdxError::BadRegion {
            what: name(r),
            offset: r.file_offset,
            len: u64::from(r.length),
            reason,
        };
        let end = r.file_offset.checked_add(u64::from(r.length));
        if end.is_none_or(|e| e > file_len) {
            return Err(bad(format!(
                "extends past the end of the {file_len}-byte file"
            )));
        }
        if header.log_length > 0 && overlaps(&r.range(), &header.log_range()) {
            return Err(bad("overlaps the log".into()));
        }
        if let Some(other) = regions[..i]
            .iter()
            .find(|o| overlaps(&r.range(), &o.range()))
        {
            return Err(bad(format!("overlaps the {}", name(other))));
        }
    }
    Ok(())
}

/// Reads and validates the metadata table and the known items.
fn read_metadata(file: &dyn ReadAt, region: &RegionEntry) -> Result<Metadata, VhdxError> {
    let region_len = u64::from(region.length);
    if region_len < METADATA_TABLE_SIZE as u64 {
        return Err(VhdxError::BadMetadataTable(format!(
            "region of {region_len} bytes cannot hold the 64 KiB table"
        )));
    }
    let mut table = vec![0u8; METADATA_TABLE_SIZE];
    read_exact(file, &mut table, region.file_offset, "metadata table")?;
    if table[0..8] != METADATA_SIGNATURE {
        return Err(VhdxError::BadMetadataTable(format!(
            "signature {:?}, expected \"metadata\"",
            printable(&table[0..8])
        )));
    }
    let count = le_u16(&table, 10);
    if le_u16(&table, 8) != 0 || table[12..32].iter().any(|&b| b != 0) {
        return Err(VhdxError::BadMetadataTable(
            "reserved header fields are not zero".into(),
        ));
    }
    if u32::from(count) > MAX_TABLE_ENTRIES {
        return Err(VhdxError::BadMetadataTable(format!(
            "{count} entries, at most {MAX_TABLE_ENTRIES} allowed"
        )));
    }

    struct Item {
        guid: Guid,
        is_user: bool,
        offset: u32,
        length: u32,
    }
    let mut items: Vec<Item> = Vec::new();
    for i in 0..usize::from(count) {
        let at = 32 + 32 * i;
        let flags = le_u32(&table, at + 24);
        let item = Item {
            guid: Guid(array_at(&table, at)),
            is_user: flags & 1 != 0,
            offset: le_u32(&table, at + 16),
            length: le_u32(&table, at + 20),
        };
        let required = flags & 4 != 0;
        if flags & !7 != 0 || le_u32(&table, at + 28) != 0 {
            return Err(VhdxError::BadMetadataTable(format!(
                "entry {i} ({}): reserved bits set",
                item.guid
            )));
        }
        if items
            .iter()
            .any(|o| o.guid == item.guid && o.is_user == item.is_user)
        {
            return Err(VhdxError::BadMetadataTable(format!(
                "item {} listed twice",
                item.guid
            )));
        }
        let placement_ok = if item.length == 0 {
            item.offset == 0
        } else {
            u64::from(item.offset) >= METADATA_TABLE_SIZE as u64
                && item.length <= MAX_METADATA_ITEM
                && u64::from(item.offset) + u64::from(item.length) <= region_len
        };
        if !placement_ok {
            return Err(VhdxError::BadMetadataTable(format!(
                "item {}: {} bytes at offset {} are not inside the {region_len}-byte region",
                item.guid, item.length, item.offset
            )));
        }
        let known = [
            FILE_PARAMETERS,
            VIRTUAL_DISK_SIZE,
            VIRTUAL_DISK_ID,
            LOGICAL_SECTOR_SIZE,
            PHYSICAL_SECTOR_SIZE,
            PARENT_LOCATOR,
        ];
        if required && (item.is_user || !known.contains(&item.guid)) {
            return Err(VhdxError::UnknownRequiredMetadata { guid: item.guid });
        }
        items.push(item);
    }
    let mut spans: Vec<(u32, u32)> = items
        .iter()
        .filter(|i| i.length > 0)
        .map(|i| (i.offset, i.length))
        .collect();
    spans.sort_unstable();
    if spans
        .windows(2)
        .any(|w| u64::from(w[0].0) + u64::from(w[0].1) > u64::from(w[1].0))
    {
        return Err(VhdxError::BadMetadataTable("items overlap".into()));
    }

    // Reads a known system item, which must have exactly its defined size.
    let item = |guid: Guid, name: &'static str, size: u32| -> Result<Option<Vec<u8>>, VhdxError> {
        let Some(found) = items.iter().find(|i| i.guid == guid && !i.is_user) else {
            return Ok(None);
        };
        if found.length != size {
            return Err(VhdxError::BadMetadataItem {
                item: name,
                reason: format!("{} bytes, expected {size}", found.length),
            });
        }
        let mut raw = vec![0u8; size as usize];
        read_exact(
            file,
            &mut raw,
            region.file_offset + u64::from(found.offset),
            "metadata item",
        )?;
        Ok(Some(raw))
    };
    let required =
        |guid, name, size| item(guid, name, size)?.ok_or(VhdxError::MissingMetadata(name));

    let params = required(FILE_PARAMETERS, "file parameters", 8)?;
    let block_size = le_u32(&params, 0);
    let flags = le_u32(&params, 4);
    if flags & !3 != 0 {
        return Err(VhdxError::BadMetadataItem {
            item: "file parameters",
            reason: format!("reserved flag bits set in {flags:#x}"),
        });
    }
    if !(MIB..=256 * MIB).contains(&u64::from(block_size)) || !block_size.is_power_of_two() {
        return Err(VhdxError::BadMetadataItem {
            item: "file parameters",
            reason: format!("block size {block_size} is not a power of two from 1 MiB to 256 MiB"),
        });
    }
    let sector_size = |guid, name| -> Result<u32, VhdxError> {
        let value = le_u32(&required(guid, name, 4)?, 0);
        if value != 512 && value != 4096 {
            return Err(VhdxError::BadMetadataItem {
                item: name,
                reason: format!("{value}, expected 512 or 4096"),
            });
        }
        Ok(value)
    };
    let logical_sector_size = sector_size(LOGICAL_SECTOR_SIZE, "logical sector size")?;
    let physical_sector_size = sector_size(PHYSICAL_SECTOR_SIZE, "physical sector size")?;
    let virtual_size = le_u64(&required(VIRTUAL_DISK_SIZE, "virtual disk size", 8)?, 0);
    if virtual_size == 0
        || virtual_size > MAX_VIRTUAL_SIZE
        || virtual_size % u64::from(logical_sector_size) != 0
    {
        return Err(VhdxError::BadMetadataItem {
            item: "virtual disk size",
            reason: format!(
                "{virtual_size} is not a non-zero multiple of the {logical_sector_size}-byte sector up to 64 TiB"
            ),
        });
    }
    let page83 = item(VIRTUAL_DISK_ID, "virtual disk id", 16)?.map(|raw| Guid(array_at(&raw, 0)));
    Ok(Metadata {
        block_size,
        leave_block_allocated: flags & 1 != 0,
        has_parent: flags & 2 != 0,
        virtual_size,
        logical_sector_size,
        physical_sector_size,
        page83,
    })
}

fn bat_state(entry: u64) -> u8 {
    (entry & 7) as u8
}

fn bat_offset(entry: u64) -> u64 {
    (entry >> 20) << 20
}

/// Reads the BAT and checks every entry: state, reserved bits, and that each present block
/// lies inside the file clear of the header section, regions and log.
fn read_bat(
    file: &dyn ReadAt,
    file_len: u64,
    metadata: &Metadata,
    bat_region: &RegionEntry,
    metadata_region: &RegionEntry,
    header: &Header,
) -> Result<Vec<u64>, VhdxError> {
    let block_size = u64::from(metadata.block_size);
    let chunk_ratio =
        SECTORS_PER_BITMAP_BLOCK * u64::from(metadata.logical_sector_size) / block_size;
    let blocks = metadata.virtual_size.div_ceil(block_size);
    // Non-differencing layout: one bitmap entry after each full chunk, none trailing.
    let entries = blocks + (blocks - 1) / chunk_ratio;
    let needed = entries * 8;
    if needed > u64::from(bat_region.length) {
        return Err(VhdxError::BatTooSmall {
            needed,
            region_len: u64::from(bat_region.length),
        });
    }
    let mut raw = vec![0u8; usize::try_from(needed).unwrap_or(usize::MAX)];
    read_exact(file, &mut raw, bat_region.file_offset, "BAT")?;

    let avoid = [
        ("BAT region", bat_region.range()),
        ("metadata region", metadata_region.range()),
        ("log", header.log_range()),
    ];
    let mut payload = Vec::with_capacity(usize::try_from(blocks).unwrap_or(0));
    for (index, chunk) in raw.chunks_exact(8).enumerate() {
        let index = index as u64;
        let entry = le_u64(chunk, 0);
        let state = bat_state(entry);
        if entry & BAT_RESERVED_MASK != 0 {
            return Err(VhdxError::BatReservedBits { index, entry });
        }
        if (index + 1) % (chunk_ratio + 1) == 0 {
            if state != 0 && state != SB_STATE_PRESENT {
                return Err(VhdxError::InvalidBatState {
                    index,
                    kind: "sector bitmap",
                    state,
                });
            }
            continue;
        }
        let block = payload.len() as u64;
        match state {
            STATE_NOT_PRESENT | STATE_UNDEFINED | STATE_ZERO | STATE_UNMAPPED => {}
            STATE_FULLY_PRESENT => {
                let offset = bat_offset(entry);
                let len = block_size.min(metadata.virtual_size - block * block_size);
                let end = offset.saturating_add(len);
                if offset < HEADER_SECTION_END {
                    return Err(VhdxError::BlockOverlaps {
                        index,
                        offset,
                        what: "header section",
                    });
                }
                if end > file_len {
                    return Err(VhdxError::BatEntryPastEof {
                        index,
                        offset,
                        end,
                        file_len,
                    });
                }
                if let Some((what, _)) = avoid.iter().find(|(_, r)| overlaps(&(offset..end), r)) {
                    return Err(VhdxError::BlockOverlaps {
                        index,
                        offset,
                        what,
                    });
                }
            }
            STATE_PARTIALLY_PRESENT => {
                return Err(VhdxError::PartiallyPresentWithoutParent { index });
            }
            _ => {
                return Err(VhdxError::InvalidBatState {
                    index,
                    kind: "payload",
                    state,
                })
            }
        }
        payload.push(entry);
    }
    Ok(payload)
}

fn printable(raw: &[u8]) -> String {
    raw.iter()
        .map(|&b| if b.is_ascii_graphic() { b as char } else { '.' })
        .collect()
}

fn file_len(file: &dyn ReadAt) -> Result<u64, VhdxError> {
    file.len().map_err(|source| VhdxError::Io {
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
) -> Result<(), VhdxError> {
    let len = buf.len() as u64;
    super::read_checked(file, buf, offset).map_err(|f| match f {
        super::ReadFailure::Truncated { end, file_len } => VhdxError::Truncated {
            what,
            end,
            file_len,
        },
        super::ReadFailure::Io(source) => VhdxError::Io {
            what,
            offset,
            len,
            source,
        },
    })
}

fn le_u16(raw: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(array_at(raw, at))
}

fn le_u32(raw: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(array_at(raw, at))
}

fn le_u64(raw: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(array_at(raw, at))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::image::testutil::*;
    use std::path::Path;

    fn open_bytes(data: Vec<u8>) -> Result<VhdxDisk, VhdxError> {
        VhdxDisk::open(Arc::new(data))
    }

    fn read_range(disk: &VhdxDisk, offset: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        disk.read_at(&mut out, offset).unwrap();
        out
    }

    /// A qemu-made VHDX of `size` bytes with `writes` (offset, len, pattern) done by qemu-io.
    fn qemu_vhdx(
        dir: &Path,
        name: &str,
        options: &str,
        size: u64,
        writes: &[(u64, u64, u8)],
    ) -> Vec<u8> {
        let path = dir.join(name);
        qemu_img(&[
            "create",
            "-f",
            "vhdx",
            "-o",
            options,
            p(&path),
            &size.to_string(),
        ]);
        for (off, len, pat) in writes {
            qemu_io(&[
                "-f",
                "vhdx",
                "-c",
                &format!("write -P {pat:#x} {off} {len}"),
                p(&path),
            ]);
        }
        std::fs::read(&path).unwrap()
    }

    fn small_dynamic(dir: &Path) -> Vec<u8> {
        qemu_vhdx(
            dir,
            "s.vhdx",
            "subformat=dynamic,block_size=1M",
            8 << 20,
            &[(0, 1 << 20, 0xab), (3 << 20, 4096, 0x5c)],
        )
    }

    /// Offset of the current header (the one with the higher sequence number).
    fn current_header_at(file: &[u8]) -> usize {
        let seq = |at: usize| le_u64(file, at + 8);
        if seq(64 << 10) > seq(128 << 10) {
            64 << 10
        } else {
            128 << 10
        }
    }

    fn fix_crc(file: &mut [u8], at: usize, len: usize) {
        file[at + 4..at + 8].fill(0);
        let crc = crc32c(&file[at..at + len]);
        file[at + 4..at + 8].copy_from_slice(&crc.to_le_bytes());
    }

    fn edit_header(file: &mut [u8], at: usize, edit: impl Fn(&mut [u8])) {
        edit(&mut file[at..at + HEADER_SIZE]);
        fix_crc(file, at, HEADER_SIZE);
    }

    fn edit_region_tables(file: &mut [u8], edit: impl Fn(&mut [u8])) {
        for at in REGION_TABLE_OFFSETS {
            let at = at as usize;
            edit(&mut file[at..at + REGION_TABLE_SIZE]);
            fix_crc(file, at, REGION_TABLE_SIZE);
        }
    }

    fn region_offset(disk: &VhdxDisk, guid: Guid) -> usize {
        disk.regions()
            .iter()
            .find(|r| r.guid == guid)
            .map(|r| r.file_offset as usize)
            .unwrap()
    }

    /// File offset of a metadata table entry (32 bytes) for `guid`.
    fn metadata_entry_at(file: &[u8], metadata_at: usize, guid: Guid) -> usize {
        let count = le_u16(file, metadata_at + 10) as usize;
        (0..count)
            .map(|i| metadata_at + 32 + 32 * i)
            .find(|&at| file[at..at + 16] == guid.0)
            .unwrap()
    }

    #[test]
    fn crc32c_matches_the_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
        assert_eq!(crc32c_update(crc32c(b"12345"), b"6789"), 0xE306_9283);
    }

    #[test]
    fn guids_use_the_on_disk_byte_order() {
        // Bytes as qemu writes the BAT region GUID into its region table.
        assert_eq!(
            hex::encode(BAT_REGION.0),
            "6677c22d23f600429d64115e9bfd4a08"
        );
        assert_eq!(
            BAT_REGION.to_string(),
            "2DC27766-F623-4200-9D64-115E9BFD4A08"
        );
    }

    #[test]
    fn qemu_images_parse_with_their_parameters() {
        let dir = tempfile::tempdir().unwrap();
        let file = qemu_vhdx(
            dir.path(),
            "p.vhdx",
            "subformat=dynamic,block_size=2M",
            (5 << 20) + 512,
            &[],
        );
        let disk = open_bytes(file).unwrap();
        let m = disk.metadata();
        assert_eq!(
            (m.block_size, m.logical_sector_size, m.physical_sector_size),
            (2 << 20, 512, 512)
        );
        assert_eq!(m.virtual_size, (5 << 20) + 512);
        assert!(!m.has_parent && !m.leave_block_allocated && m.page83.is_some());
        assert!(!disk.is_fixed() && !disk.log_replayed());
        assert_eq!(disk.allocated_ranges(), Vec::<Range<u64>>::new());
        assert!(read_range(&disk, 0, 5 << 20).iter().all(|&b| b == 0));

        let file = qemu_vhdx(
            dir.path(),
            "f.vhdx",
            "subformat=fixed,block_size=1M",
            3 << 20,
            &[],
        );
        let disk = open_bytes(file).unwrap();
        assert!(disk.is_fixed());
        // qemu preallocates a fixed disk's blocks but marks them "zero" (block_state_zero).
        assert_eq!(disk.allocated_ranges(), Vec::<Range<u64>>::new());
        assert!(read_range(&disk, 0, 3 << 20).iter().all(|&b| b == 0));
    }

    /// More blocks than one chunk (4096 blocks of 1 MiB with 512-byte sectors), so the BAT
    /// holds a sector-bitmap entry between payload entries that the reader must skip.
    #[test]
    fn sector_bitmap_entries_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let writes = [
            (4093u64 << 20, 2 << 20, 0x21u8),
            (4097 << 20, 4096, 0x42),
            (5119 << 20, 1 << 20, 0x63),
        ];
        let file = qemu_vhdx(
            dir.path(),
            "big.vhdx",
            "subformat=dynamic,block_size=1M",
            5 << 30,
            &writes,
        );
        let disk = open_bytes(file).unwrap();
        assert_eq!(
            disk.allocated_ranges(),
            vec![
                4093 << 20..4095 << 20,
                4097 << 20..4098 << 20,
                5119 << 20..5 << 30
            ]
        );
        for (off, len, pat) in writes {
            // A sector on each side of the write, where the disk has one, reads as zeros.
            let end = (off + len + 512).min(disk.virtual_size());
            let got = read_range(&disk, off - 512, (end - off + 512) as usize);
            let (before, rest) = got.split_at(512);
            let (data, after) = rest.split_at(len as usize);
            assert!(before.iter().all(|&b| b == 0), "before write at {off}");
            assert!(data.iter().all(|&b| b == pat), "write at {off}");
            assert!(after.iter().all(|&b| b == 0), "after write at {off}");
        }
    }

    #[test]
    fn one_damaged_header_falls_back_to_the_other() {
        let dir = tempfile::tempdir().unwrap();
        let mut file = small_dynamic(dir.path());
        let current = current_header_at(&file);
        file[current + 100] ^= 1;
        let disk = open_bytes(file).unwrap();
        assert!(read_range(&disk, 0, 4096).iter().all(|&b| b == 0xab));
    }

    #[test]
    fn both_header_checksums_broken_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut file = small_dynamic(dir.path());
        file[(64 << 10) + 100] ^= 1;
        file[(128 << 10) + 100] ^= 1;
        let err = open_bytes(file).err().unwrap();
        assert!(matches!(err, VhdxError::NoValidHeader { .. }), "{err}");
        assert!(err.to_string().contains("checksum mismatch"), "{err}");
    }

    #[test]
    fn header_fields_are_validated() {
        let dir = tempfile::tempdir().unwrap();
        let file = small_dynamic(dir.path());
        let current = current_header_at(&file);

        let mut bad = file.clone();
        let other = if current == 64 << 10 {
            128 << 10
        } else {
            64 << 10
        };
        let seq: [u8; 8] = array_at(&bad, current + 8);
        edit_header(&mut bad, other, |h| h[8..16].copy_from_slice(&seq));
        assert!(matches!(
            open_bytes(bad),
            Err(VhdxError::AmbiguousHeaders(_))
        ));

        let mut bad = file.clone();
        edit_header(&mut bad, current, |h| {
            h[66..68].copy_from_slice(&2u16.to_le_bytes())
        });
        assert!(matches!(
            open_bytes(bad),
            Err(VhdxError::UnsupportedVersion(2))
        ));

        let mut bad = file.clone();
        edit_header(&mut bad, current, |h| {
            h[72..80].copy_from_slice(&12345u64.to_le_bytes())
        });
        assert!(matches!(
            open_bytes(bad),
            Err(VhdxError::BadLogLocation { .. })
        ));

        let mut bad = file.clone();
        bad[0] = b'V';
        assert!(matches!(
            open_bytes(bad),
            Err(VhdxError::BadFileIdentifier { .. })
        ));
    }

    #[test]
    fn unknown_required_region_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut file = small_dynamic(dir.path());
        edit_region_tables(&mut file, |t| {
            let count = le_u32(t, 8) as usize;
            let at = 16 + 32 * count;
            t[at..at + 16].copy_from_slice(&[0x11; 16]);
            t[at + 16..at + 24].copy_from_slice(&(64u64 << 20).to_le_bytes());
            t[at + 24..at + 28].copy_from_slice(&(1u32 << 20).to_le_bytes());
            t[at + 28..at + 32].copy_from_slice(&1u32.to_le_bytes());
            t[8..12].copy_from_slice(&(count as u32 + 1).to_le_bytes());
        });
        let err = open_bytes(file).err().unwrap();
        assert!(
            matches!(
                err,
                VhdxError::UnknownRequiredRegion { guid } if guid == Guid([0x11; 16])
            ),
            "{err}"
        );
    }

    #[test]
    fn unknown_optional_region_is_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let mut file = small_dynamic(dir.path());
        let len = file.len() as u64;
        edit_region_tables(&mut file, |t| {
            let count = le_u32(t, 8) as usize;
            let at = 16 + 32 * count;
            t[at..at + 16].copy_from_slice(&[0x11; 16]);
            // Somewhere inside the file clear of everything: the last MiB is block data, so
            // use a spot that is free in qemu's layout only if it exists; keep it zero-length.
            t[at + 16..at + 24].copy_from_slice(&(len.next_multiple_of(MIB)).to_le_bytes());
            t[8..12].copy_from_slice(&(count as u32 + 1).to_le_bytes());
        });
        let disk = open_bytes(file).unwrap();
        assert_eq!(disk.regions().len(), 3);
    }

    #[test]
    fn damaged_region_table_copies() {
        let dir = tempfile::tempdir().unwrap();
        let file = small_dynamic(dir.path());
        let mut one = file.clone();
        one[(192 << 10) + 20] ^= 1;
        assert!(
            open_bytes(one.clone()).is_ok(),
            "copy 2 is used when copy 1 is damaged"
        );
        one[(256 << 10) + 20] ^= 1;
        let err = open_bytes(one).err().unwrap();
        assert!(matches!(err, VhdxError::NoValidRegionTable { .. }), "{err}");
    }

    /// Rewrites payload BAT entry 0 of `file` (parsed with qemu's layout).
    fn with_bat_entry0(file: &[u8], f: impl Fn(u64) -> u64) -> Vec<u8> {
        let disk = open_bytes(file.to_vec()).unwrap();
        let bat = region_offset(&disk, BAT_REGION);
        let mut out = file.to_vec();
        let e = f(le_u64(&out, bat));
        out[bat..bat + 8].copy_from_slice(&e.to_le_bytes());
        out
    }

    #[test]
    fn invalid_bat_entries_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = small_dynamic(dir.path());

        for state in [4u64, 5] {
            let err = open_bytes(with_bat_entry0(&file, |e| (e & !7) | state))
                .err()
                .unwrap();
            assert!(
                matches!(
                    err,
                    VhdxError::InvalidBatState {
                        index: 0,
                        kind: "payload",
                        ..
                    }
                ),
                "{err}"
            );
        }
        let err = open_bytes(with_bat_entry0(&file, |e| (e & !7) | 7))
            .err()
            .unwrap();
        assert!(
            matches!(err, VhdxError::PartiallyPresentWithoutParent { index: 0 }),
            "{err}"
        );

        let err = open_bytes(with_bat_entry0(&file, |e| e | 0x100))
            .err()
            .unwrap();
        assert!(
            matches!(err, VhdxError::BatReservedBits { index: 0, .. }),
            "{err}"
        );

        let err = open_bytes(with_bat_entry0(&file, |e| (e & 0xF_FFFF) | (1 << 40)))
            .err()
            .unwrap();
        assert!(
            matches!(err, VhdxError::BatEntryPastEof { index: 0, .. }),
            "{err}"
        );
        assert!(
            err.to_string()
                .contains("BAT entry 0 points past end of file"),
            "{err}"
        );

        let err = open_bytes(with_bat_entry0(&file, |e| e & 0xF_FFFF))
            .err()
            .unwrap();
        assert!(
            matches!(
                err,
                VhdxError::BlockOverlaps {
                    what: "header section",
                    ..
                }
            ),
            "{err}"
        );

        // Blocks in the zero and unmapped states read as zeros even with an offset left.
        for state in [STATE_ZERO, STATE_UNMAPPED, STATE_UNDEFINED] {
            let disk = open_bytes(with_bat_entry0(&file, |e| (e & !7) | u64::from(state))).unwrap();
            assert!(read_range(&disk, 0, 4096).iter().all(|&b| b == 0));
            assert_eq!(disk.allocated_ranges(), vec![3 << 20..4 << 20]);
        }
    }

    #[test]
    fn truncated_vhdx_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = small_dynamic(dir.path());
        let err = open_bytes(file[..file.len() - 4096].to_vec())
            .err()
            .unwrap();
        assert!(matches!(err, VhdxError::BatEntryPastEof { .. }), "{err}");
        let err = open_bytes(file[..(3 << 20) / 2].to_vec()).err().unwrap();
        assert!(matches!(err, VhdxError::BadRegion { .. }), "{err}");
        let err = open_bytes(file[..100 << 10].to_vec()).err().unwrap();
        assert!(
            matches!(err, VhdxError::Truncated { what: "header", .. }),
            "{err}"
        );
    }

    #[test]
    fn metadata_is_validated() {
        let dir = tempfile::tempdir().unwrap();
        let file = small_dynamic(dir.path());
        let disk = open_bytes(file.clone()).unwrap();
        let meta = region_offset(&disk, METADATA_REGION);

        // has-parent: a differencing disk.
        let mut bad = file.clone();
        let params =
            meta + le_u32(&bad, metadata_entry_at(&bad, meta, FILE_PARAMETERS) + 16) as usize;
        bad[params + 4] |= 2;
        assert!(matches!(
            open_bytes(bad),
            Err(VhdxError::DifferencingNotSupported)
        ));

        let mut bad = file.clone();
        bad[params..params + 4].copy_from_slice(&(3u32 << 20).to_le_bytes());
        assert!(matches!(
            open_bytes(bad),
            Err(VhdxError::BadMetadataItem {
                item: "file parameters",
                ..
            })
        ));

        // An item nobody knows, marked required.
        let mut bad = file.clone();
        let entry = metadata_entry_at(&bad, meta, VIRTUAL_DISK_ID);
        bad[entry..entry + 16].copy_from_slice(&[0x22; 16]);
        bad[entry + 24] |= 4;
        let err = open_bytes(bad).err().unwrap();
        assert!(
            matches!(
                err,
                VhdxError::UnknownRequiredMetadata { guid } if guid == Guid([0x22; 16])
            ),
            "{err}"
        );

        let mut bad = file.clone();
        let entry = metadata_entry_at(&bad, meta, LOGICAL_SECTOR_SIZE);
        bad[entry..entry + 16].copy_from_slice(&[0x33; 16]);
        bad[entry + 24] &= !4;
        assert!(matches!(
            open_bytes(bad),
            Err(VhdxError::MissingMetadata("logical sector size"))
        ));

        let mut bad = file.clone();
        bad[meta] = b'M';
        assert!(matches!(
            open_bytes(bad),
            Err(VhdxError::BadMetadataTable(_))
        ));
    }

    // ---- log replay ----

    enum TestDescriptor {
        Data { offset: u64, sector: Vec<u8> },
        Zero { offset: u64, len: u64 },
    }

    /// Serializes a log entry exactly as MS-VHDX 2.3.1 lays it out.
    fn log_entry(
        seq: u64,
        tail: u64,
        guid: Guid,
        descriptors: &[TestDescriptor],
        file_len: u64,
    ) -> Vec<u8> {
        let count = descriptors.len() as u64;
        let desc_sectors = (count + 2).div_ceil(128);
        let data: Vec<&Vec<u8>> = descriptors
            .iter()
            .filter_map(|d| match d {
                TestDescriptor::Data { sector, .. } => Some(sector),
                TestDescriptor::Zero { .. } => None,
            })
            .collect();
        let len = (desc_sectors + data.len() as u64) * LOG_SECTOR;
        let mut e = vec![0u8; len as usize];
        e[0..4].copy_from_slice(b"loge");
        e[8..12].copy_from_slice(&(len as u32).to_le_bytes());
        e[12..16].copy_from_slice(&(tail as u32).to_le_bytes());
        e[16..24].copy_from_slice(&seq.to_le_bytes());
        e[24..28].copy_from_slice(&(count as u32).to_le_bytes());
        e[32..48].copy_from_slice(&guid.0);
        e[48..56].copy_from_slice(&file_len.to_le_bytes());
        e[56..64].copy_from_slice(&file_len.to_le_bytes());
        for (i, d) in descriptors.iter().enumerate() {
            let at = 64 + 32 * i;
            match d {
                TestDescriptor::Data { offset, sector } => {
                    e[at..at + 4].copy_from_slice(b"desc");
                    e[at + 4..at + 8].copy_from_slice(&sector[4092..4096]);
                    e[at + 8..at + 16].copy_from_slice(&sector[0..8]);
                    e[at + 16..at + 24].copy_from_slice(&offset.to_le_bytes());
                }
                TestDescriptor::Zero { offset, len } => {
                    e[at..at + 4].copy_from_slice(b"zero");
                    e[at + 8..at + 16].copy_from_slice(&len.to_le_bytes());
                    e[at + 16..at + 24].copy_from_slice(&offset.to_le_bytes());
                }
            }
            e[at + 24..at + 32].copy_from_slice(&seq.to_le_bytes());
        }
        for (k, sector) in data.iter().enumerate() {
            let at = ((desc_sectors as usize) + k) * LOG_SECTOR as usize;
            e[at..at + 4].copy_from_slice(b"data");
            e[at + 4..at + 8].copy_from_slice(&((seq >> 32) as u32).to_le_bytes());
            e[at + 8..at + 4092].copy_from_slice(&sector[8..4092]);
            e[at + 4092..at + 4096].copy_from_slice(&(seq as u32).to_le_bytes());
        }
        fix_crc(&mut e, 0, len as usize);
        e
    }

    /// Writes an entry into the log ring at `pos`, wrapping at the ring's end.
    fn place(file: &mut [u8], log: (usize, usize), pos: usize, entry: &[u8]) {
        for (i, &b) in entry.iter().enumerate() {
            file[log.0 + (pos + i) % log.1] = b;
        }
    }

    fn set_log_guid(file: &mut [u8], guid: Guid) {
        let current = current_header_at(file);
        edit_header(file, current, |h| h[48..64].copy_from_slice(&guid.0));
    }

    /// Applies qemu's own replay (qemu replays when it opens the file writable) and returns
    /// what qemu then reads.
    fn qemu_replayed(dir: &Path, name: &str, file: &[u8]) -> Vec<u8> {
        let path = dir.join(name);
        std::fs::write(&path, file).unwrap();
        let _ = std::process::Command::new("qemu-img")
            .args(["check", "-r", "all", "-f", "vhdx", p(&path)])
            .output();
        qemu_to_raw("vhdx", &path, dir)
    }

    fn read_all(disk: &VhdxDisk) -> Vec<u8> {
        read_range(disk, 0, disk.virtual_size() as usize)
    }

    /// A log written by qemu itself: take the file after a write, put the BAT back as it was
    /// before the write, and point the header at the log entry qemu wrote for that BAT
    /// update. Only a replay brings the data back.
    #[test]
    fn replays_a_log_written_by_qemu() {
        let dir = tempfile::tempdir().unwrap();
        let (path, after, dirty) = qemu_log_left_dirty(dir.path());
        let expected = qemu_to_raw("vhdx", &path, dir.path());
        let log_at = open_bytes(after.clone()).unwrap().header().log_offset as usize;
        assert_eq!(
            &after[log_at..log_at + 4],
            b"loge",
            "qemu leaves its last entry in the log"
        );
        let mut undone = dirty.clone();
        set_log_guid(&mut undone, Guid([0; 16]));
        assert!(read_all(&open_bytes(undone).unwrap())
            .iter()
            .all(|&b| b == 0));
        let disk = open_bytes(dirty.clone()).unwrap();
        assert!(disk.log_replayed());
        assert!(read_all(&disk) == expected);
        assert!(qemu_replayed(dir.path(), "q-dirty.vhdx", &dirty) == expected);
    }

    /// A dynamic VHDX qemu wrote 8 KiB of 0x3c into, and the same file with the BAT update
    /// undone and the header naming qemu's log entry: only a log replay brings the data back.
    /// Returns the path, the file as qemu left it, and the dirty file.
    fn qemu_log_left_dirty(dir: &Path) -> (std::path::PathBuf, Vec<u8>, Vec<u8>) {
        let path = dir.join("q.vhdx");
        qemu_img(&[
            "create",
            "-f",
            "vhdx",
            "-o",
            "subformat=dynamic,block_size=1M",
            p(&path),
            "8M",
        ]);
        let before = std::fs::read(&path).unwrap();
        qemu_io(&["-f", "vhdx", "-c", "write -P 0x3c 1048576 8192", p(&path)]);
        let after = std::fs::read(&path).unwrap();
        let disk = open_bytes(after.clone()).unwrap();
        let bat = region_offset(&disk, BAT_REGION);
        let log_at = disk.header().log_offset as usize;
        let guid = Guid(array_at(&after, log_at + 32));
        let mut dirty = after.clone();
        dirty[bat..bat + 4096].copy_from_slice(&before[bat..bat + 4096]);
        set_log_guid(&mut dirty, guid);
        (path, after, dirty)
    }

    /// Builds a dirty file from a qemu image whose block 0 holds 0xab: a two-entry sequence
    /// whose first entry wraps around the end of the ring, plus decoys (an older sequence and
    /// an entry of another log). Returns the file, the ring, the BAT offset and block 0's entry.
    fn synthesized(dir: &Path) -> (Vec<u8>, (usize, usize), usize, u64) {
        let file = qemu_vhdx(
            dir,
            "l.vhdx",
            "subformat=dynamic,block_size=1M",
            8 << 20,
            &[(0, 1 << 20, 0xab)],
        );
        let disk = open_bytes(file.clone()).unwrap();
        let bat = region_offset(&disk, BAT_REGION);
        let ring = (
            disk.header().log_offset as usize,
            disk.header().log_length as usize,
        );
        let block0 = le_u64(&file, bat);
        assert_eq!(bat_state(block0), STATE_FULLY_PRESENT);
        let len = file.len() as u64;
        let guid = Guid([0x42; 16]);
        let bat_sector = |entries: &[u64]| {
            let mut s = file[bat..bat + 4096].to_vec();
            for (i, e) in entries.iter().enumerate() {
                s[8 * i..8 * i + 8].copy_from_slice(&e.to_le_bytes());
            }
            s
        };
        let mut dirty = file.clone();
        // Entry 10 (at the ring's last sector, wrapping): blocks 0 and 1 both map block 0's data.
        let e10 = log_entry(
            10,
            (ring.1 - 4096) as u64,
            guid,
            &[TestDescriptor::Data {
                offset: bat as u64,
                sector: bat_sector(&[block0, block0]),
            }],
            len,
        );
        // Entry 11: zero two BAT sectors, then rewrite the first: block 0 gone, block 1 kept.
        let e11 = log_entry(
            11,
            (ring.1 - 4096) as u64,
            guid,
            &[
                TestDescriptor::Zero {
                    offset: bat as u64,
                    len: 8192,
                },
                TestDescriptor::Data {
                    offset: bat as u64,
                    sector: bat_sector(&[0, block0]),
                },
            ],
            len,
        );
        place(&mut dirty, ring, ring.1 - 4096, &e10);
        place(&mut dirty, ring, 4096, &e11);
        // Decoys: an older complete sequence, and a newer entry of another log.
        let old = log_entry(
            3,
            64 << 10,
            guid,
            &[TestDescriptor::Zero {
                offset: bat as u64,
                len: 4096,
            }],
            len,
        );
        place(&mut dirty, ring, 64 << 10, &old);
        let foreign = log_entry(
            99,
            128 << 10,
            Guid([0x43; 16]),
            &[TestDescriptor::Zero {
                offset: bat as u64,
                len: 4096,
            }],
            len,
        );
        place(&mut dirty, ring, 128 << 10, &foreign);
        set_log_guid(&mut dirty, guid);
        (dirty, ring, bat, block0)
    }

    #[test]
    fn replays_a_synthesized_sequence_like_qemu() {
        let dir = tempfile::tempdir().unwrap();
        let (dirty, _, bat, _) = synthesized(dir.path());
        let disk = open_bytes(dirty.clone()).unwrap();
        assert!(disk.log_replayed());
        let ours = read_all(&disk);
        assert!(
            ours[..1 << 20].iter().all(|&b| b == 0),
            "block 0 unmapped by entry 11"
        );
        assert!(
            ours[1 << 20..2 << 20].iter().all(|&b| b == 0xab),
            "block 1 maps block 0's data"
        );
        assert_eq!(disk.allocated_ranges(), vec![1 << 20..2 << 20]);
        // The zero descriptor's second sector stays zero under the rewritten first one.
        let mut second = vec![0xffu8; 4096];
        disk.file
            .read_exact_at(&mut second, bat as u64 + 4096)
            .unwrap();
        assert!(second.iter().all(|&b| b == 0));

        assert!(
            qemu_replayed(dir.path(), "syn.vhdx", &dirty) == ours,
            "qemu replays it the same way"
        );
    }

    #[test]
    fn a_broken_head_entry_ends_the_sequence_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let (mut dirty, ring, _, _) = synthesized(dir.path());
        // Corrupt entry 11's data sector: the active sequence is entry 10 alone.
        dirty[ring.0 + 4096 + 4096 + 100] ^= 1;
        let disk = open_bytes(dirty).unwrap();
        let ours = read_all(&disk);
        assert!(ours[..2 << 20].iter().all(|&b| b == 0xab));
    }

    #[test]
    fn log_without_a_valid_sequence_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (mut dirty, _, _, _) = synthesized(dir.path());
        set_log_guid(&mut dirty, Guid([0x44; 16]));
        assert!(matches!(
            open_bytes(dirty),
            Err(VhdxError::NoValidLogSequence)
        ));
    }

    #[test]
    fn log_of_a_truncated_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (dirty, _, _, _) = synthesized(dir.path());
        let short = dirty[..dirty.len() - 4096].to_vec();
        let err = open_bytes(short).err().unwrap();
        assert!(matches!(err, VhdxError::LogFileTruncated { .. }), "{err}");
    }

    #[test]
    fn log_writes_into_the_headers_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = small_dynamic(dir.path());
        let disk = open_bytes(file.clone()).unwrap();
        let ring = (
            disk.header().log_offset as usize,
            disk.header().log_length as usize,
        );
        let guid = Guid([0x45; 16]);
        let mut dirty = file.clone();
        let e = log_entry(
            1,
            0,
            guid,
            &[TestDescriptor::Zero {
                offset: 64 << 10,
                len: 4096,
            }],
            file.len() as u64,
        );
        place(&mut dirty, ring, 0, &e);
        set_log_guid(&mut dirty, guid);
        let err = open_bytes(dirty).err().unwrap();
        assert!(
            matches!(err, VhdxError::BadLogTarget { offset: 65536, .. }),
            "{err}"
        );
    }

    /// Random byte changes in a file whose log needs replaying (in the ring, the BAT, the
    /// headers) give errors or a readable disk, never a panic.
    #[test]
    fn damaged_logs_never_panic() {
        use proptest::prelude::*;
        let dir = tempfile::tempdir().unwrap();
        let (dirty, ring, bat, _) = synthesized(dir.path());
        let zones = [
            (ring.0, 12 << 10),             // entry 11 and the wrapped tail of entry 10
            (ring.0 + ring.1 - 4096, 4096), // entry 10's descriptor sector
            (bat, 64),                      // the BAT sector the log rewrites
            (64 << 10, 4096),               // header 1
            (128 << 10, 4096),              // header 2
        ];
        let flips =
            proptest::collection::vec((0usize..zones.len(), any::<u16>(), any::<u8>()), 1..8);
        let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
            cases: 200,
            ..ProptestConfig::default()
        });
        runner
            .run(&flips, |flips| {
                let mut data = dirty.clone();
                for (zone, pos, value) in flips {
                    let (start, len) = zones[zone];
                    data[start + usize::from(pos) % len] = value;
                }
                if let Ok(disk) = open_bytes(data) {
                    let _ = disk.allocated_ranges();
                    let mut buf = vec![0u8; disk.virtual_size() as usize];
                    let _ = disk.read_at(&mut buf, 0);
                }
                Ok(())
            })
            .unwrap();
    }

    #[test]
    fn overlay_pieces_split_and_replace() {
        let base: Arc<dyn ReadAt> = Arc::new(vec![1u8; 64]);
        let mut view = ReplayedFile {
            base,
            base_len: 64,
            len: 64,
            overlay: BTreeMap::new(),
        };
        view.apply(10, 50, Source::Zero);
        view.apply(20, 30, Source::Zero);
        view.apply(0, 15, Source::Zero);
        view.apply(60, 80, Source::Zero);
        let spans: Vec<(u64, u64)> = view.overlay.iter().map(|(&s, p)| (s, p.end)).collect();
        assert_eq!(spans, vec![(0, 15), (15, 20), (20, 30), (30, 50), (60, 80)]);
        let mut buf = vec![9u8; 80];
        view.read_exact_at(&mut buf, 0).unwrap();
        let mut expected = vec![0u8; 80];
        expected[50..60].fill(1);
        assert_eq!(buf, expected);
        assert!(view.read_exact_at(&mut buf[..2], 79).is_err());
    }

    /// Writes seeds with a log to replay for the `vhdx` and `image` fuzz targets into
    /// `$VHDX_SEED_DIR` (fuzz/seed.sh converts them to the targets' sparse encoding; it makes
    /// the clean images with qemu itself): the synthesized wrapping sequence with its decoys,
    /// and a log entry qemu wrote, made live again by restoring the BAT from before the write.
    #[test]
    #[ignore = "writes fuzz seeds; run through fuzz/seed.sh"]
    fn write_fuzz_seeds() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = std::env::var_os("VHDX_SEED_DIR")
            .map_or_else(|| tmp.path().to_owned(), std::path::PathBuf::from);
        std::fs::create_dir_all(&dir).unwrap();
        let (synth, _, _, _) = synthesized(tmp.path());

        let (_, _, dirty) = qemu_log_left_dirty(tmp.path());

        for (name, file) in [("log-synthesized.vhdx", synth), ("log-qemu.vhdx", dirty)] {
            assert!(open_bytes(file.clone()).unwrap().log_replayed(), "{name}");
            std::fs::write(dir.join(name), file).unwrap();
        }
    }
}
