//! Hyper-V Replica Log (`.hrl`, MS-HRL revision 6.0): the change log a host ships once per
//! replication cycle and per disk. It is read here (validated whole before anything is applied)
//! and written here (by the reference agent and by tests).
//!
//! # Format
//!
//! All integers are little-endian and all structures packed; the restated specification is
//! `shared/specs/hrl.md`.
//!
//! ```text
//! 0            log file header (4096 bytes, checksummed)
//! 4096         [data of block 1][metadata block 1][data of block 2][metadata block 2] ...
//! EOLLocation  end of the last metadata block
//! ```
//!
//! A metadata block (`MetadataSize` bytes, 4096 by default) is a 32-byte header (distance back to
//! the previous block, number of valid entries) followed by up to `(MetadataSize - 32) / 32`
//! 32-byte entries, each one disk write (`ByteOffset`, `DataLength`). A block's data comes
//! *before* it, contiguous and in entry order, starting where the previous block ended. A reader
//! therefore walks the blocks backwards from `EOLLocation - MetadataSize`, then forwards again to
//! assign data positions. Later entries override earlier ones, also across blocks.
//!
//! # Validation
//!
//! The checksums are plain byte sums (the specification's security section says "None"), so
//! nothing here trusts them alone: [`read_log`] checks every rule below and refuses the whole log
//! on the first violation, with an [`HrlError`] variant per rule that names the location and the
//! offending value. Header: cookie, checksum, version (2.0 only; 1.0 is the local-only format),
//! `EOLLocation` (0 = not closed properly, a resynchronization trigger with its own variant),
//! `MetadataSize`, `FileType`, `Flags`, reserved bytes. Blocks: checksum, reserved bytes, entry
//! count against capacity, back-pointers that strictly go backwards without entering the header
//! or overlapping the block they come from. Entries: checksum, operation (1 = write), `Location`,
//! reserved bytes, sector alignment, non-zero length, range on the disk, data that exactly fills
//! the gap before its block, `DataChecksum`. Finally `TotalMetadataEntries`. Allocations are
//! bounded by validated values only (one metadata block buffer, at most 1 MiB; the block stack is
//! bounded by the distance each step must cover).
//!
//! # Decisions where the specification is silent
//!
//! - Cookie: the eighth byte may be 0x00 or 0x20 on read; the writer writes 0x00.
//! - Check order in the header: cookie, checksum, version, `EOLLocation == 0`, then the rest, so
//!   an unclosed log whose header is otherwise intact is reported as [`HrlError::NotClosedProperly`].
//! - `DataChecksum == 0` means "not recorded" (the specification's example has 0 everywhere);
//!   any other value is checked as the ones' complement of the 32-bit byte sum of the data.
//! - Bytes after `EOLLocation` (a preallocated file) are ignored; `EOLLocation` past the end of
//!   the file is refused. `OriginalSize`, `CurrentSize`, `ErrorCode`, the creator fields and the
//!   unused entry slots of a block are not checked.
//! - Sector size is 512 bytes: `ByteOffset` and `DataLength` must be multiples of it (the
//!   example's lengths are).
//!
//! # The specification's worked example
//!
//! Its metadata header and entry checksums reproduce exactly (see the tests), and its layout
//! (an empty first block at 4096, data from 8192, the second block's back-pointer) matches the
//! traversal above. Its printed *header* checksum (4294959739) does not reproduce from the
//! printed header fields (byte sum 8152 where the stored value implies 7556), whatever the cookie
//! byte, creator padding or GUID byte order; the printed header is probably not the file's final
//! state. We verify the header checksum by the rule as written, not by that example.
//!
//! # Writer
//!
//! [`HrlWriter`] streams: it takes a `Write + Seek` output at creation, writes a provisional
//! header with `EOLLocation = 0` (so an abandoned log reads as not closed properly, as Hyper-V's
//! do) and, like the example, an empty first metadata block at 4096. Each write's data goes to
//! the output at once; only the open block's entries are held in memory (at most `MetadataSize`
//! bytes). [`HrlWriter::finish`] closes the last block and seeks back to write the final header.

use std::fmt;
use std::io::{self, Seek, SeekFrom, Write};
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

use thiserror::Error;

use super::ReadAt;

/// Size of the log file header; the first metadata block's data starts here.
pub const HEADER_SIZE: u64 = 4096;
/// Disk sector size: every write's offset and length is a multiple of it.
pub const SECTOR_SIZE: u64 = 512;
/// `LogFormatVersion` of the replicable format (major 2, minor 0).
pub const LOG_FORMAT_VERSION: u32 = 0x0002_0000;
/// `LogFormatVersion` of the local-only format, refused by name.
pub const LOCAL_ONLY_VERSION: u32 = 0x0001_0000;
/// `MetadataSize` Hyper-V uses and the writer's default.
pub const DEFAULT_METADATA_SIZE: u32 = 4096;
/// Largest `MetadataSize` accepted: the reader holds one block in memory at a time.
pub const MAX_METADATA_SIZE: u32 = 1 << 20;
/// Default longest single entry the writer emits; longer writes become several entries.
pub const DEFAULT_MAX_ENTRY_LENGTH: u32 = 1 << 20;

const COOKIE_PREFIX: &[u8; 7] = b"msctlog";
const METADATA_HEADER_SIZE: usize = 32;
const ENTRY_SIZE: usize = 32;
const META_OPERATION_WRITE: u8 = 1;
/// Unix time of 2000-01-01 00:00:00 UTC, the epoch of every HRL timestamp.
const HRL_EPOCH_UNIX: u64 = 946_684_800;
/// Data is moved in pieces of at most this size, whatever an entry's length.
const IO_CHUNK: usize = 256 * 1024;

// Header field offsets (specification section 2.2).
const H_COOKIE: usize = 0;
const H_VERSION: usize = 8;
const H_TIMESTAMP: usize = 12;
const H_CREATOR_APP: usize = 16;
const H_CREATOR_VERSION: usize = 20;
const H_ORIGINAL_SIZE: usize = 24;
const H_CURRENT_SIZE: usize = 32;
const H_CHECKSUM: usize = 40;
const H_EOL: usize = 44;
const H_ERROR_CODE: usize = 52;
const H_METADATA_SIZE: usize = 56;
const H_UNIQUE_ID: usize = 60;
const H_PREVIOUS_UNIQUE_ID: usize = 76;
const H_LAST_MODIFIED: usize = 92;
const H_TOTAL_ENTRIES: usize = 96;
const H_FILE_TYPE: usize = 104;
const H_FLAGS: usize = 108;
const H_VHD2_GUID: usize = 110;
const H_RESERVED: usize = 126;

// Metadata header field offsets.
const M_PREVIOUS: usize = 0;
const M_VALID: usize = 8;
const M_CHECKSUM: usize = 12;
const M_RESERVED: usize = 16;

// Metadata entry field offsets.
const E_BYTE_OFFSET: usize = 0;
const E_CHECKSUM: usize = 8;
const E_DATA_LENGTH: usize = 12;
const E_TIMESTAMP: usize = 16;
const E_OPERATION: usize = 20;
const E_DATA_CHECKSUM: usize = 21;
const E_LOCATION: usize = 25;
const E_RESERVED: usize = 26;

/// Everything that makes a log unreadable, unwritable or unappliable.
#[derive(Debug, Error)]
pub enum HrlError {
    #[error("I/O error {what} at log offset {offset}")]
    Io {
        what: &'static str,
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("log file is {len} bytes, shorter than its {HEADER_SIZE}-byte header")]
    TooShort { len: u64 },
    #[error("bad cookie {found:02x?}: expected \"msctlog\" followed by 0x00 or 0x20")]
    BadCookie { found: [u8; 8] },
    #[error("header checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    HeaderChecksum { stored: u32, computed: u32 },
    #[error("log format version 0x00010000 is the local-only format, which is never replicated")]
    LocalOnlyVersion,
    #[error("unsupported log format version {0:#010x} (expected 0x00020000)")]
    UnsupportedVersion(u32),
    #[error("log was not closed properly (EOLLocation is 0): resynchronization needed")]
    NotClosedProperly,
    #[error("header FileType is {0}, expected 0 (HRL)")]
    BadFileType(u32),
    #[error("header Flags is {0:#06x}, expected 0")]
    BadFlags(u16),
    #[error("header reserved byte at offset {offset} is {value:#04x}, expected 0")]
    HeaderReservedNonZero { offset: usize, value: u8 },
    #[error("MetadataSize {0} is not a multiple of 512 between 512 and {MAX_METADATA_SIZE}")]
    BadMetadataSize(u32),
    #[error("EOLLocation {eol} is before the end of the first possible metadata block ({min})")]
    EolTooSmall { eol: u64, min: u64 },
    #[error("EOLLocation {eol} is beyond the end of the {file_len}-byte file")]
    EolBeyondFile { eol: u64, file_len: u64 },
    #[error("metadata block at {block_offset}: checksum stored {stored:#010x}, computed {computed:#010x}")]
    MetadataHeaderChecksum {
        block_offset: u64,
        stored: u32,
        computed: u32,
    },
    #[error("metadata block at {block_offset}: reserved byte {index} is {value:#04x}, expected 0")]
    MetadataReservedNonZero {
        block_offset: u64,
        index: usize,
        value: u8,
    },
    #[error(
        "metadata block at {block_offset}: {valid} valid entries, it holds at most {capacity}"
    )]
    TooManyEntries {
        block_offset: u64,
        valid: u32,
        capacity: u32,
    },
    #[error("metadata block at {block_offset}: back-pointer {distance} points forward to {target} (a loop)")]
    BackPointerLoop {
        block_offset: u64,
        distance: u64,
        target: u64,
    },
    #[error("metadata block at {block_offset}: back-pointer {distance} points outside the file")]
    BackPointerOutsideFile { block_offset: u64, distance: u64 },
    #[error(
        "metadata block at {block_offset}: previous block at {previous_offset} overlaps the header"
    )]
    MetadataOverlapsHeader {
        block_offset: u64,
        previous_offset: u64,
    },
    #[error("metadata block at {block_offset}: back-pointer {distance} is less than MetadataSize {metadata_size}, blocks overlap")]
    MetadataBlocksOverlap {
        block_offset: u64,
        distance: u64,
        metadata_size: u32,
    },
    #[error("metadata block at {block_offset}, entry {index}: checksum stored {stored:#010x}, computed {computed:#010x}")]
    EntryChecksum {
        block_offset: u64,
        index: usize,
        stored: u32,
        computed: u32,
    },
    #[error("metadata block at {block_offset}, entry {index}: MetaOperation {operation} is not 1 (write)")]
    UnknownOperation {
        block_offset: u64,
        index: usize,
        operation: u8,
    },
    #[error("metadata block at {block_offset}, entry {index}: Location {location} is not 0")]
    BadLocation {
        block_offset: u64,
        index: usize,
        location: u8,
    },
    #[error("metadata block at {block_offset}, entry {index}: reserved byte {byte} is {value:#04x}, expected 0")]
    EntryReservedNonZero {
        block_offset: u64,
        index: usize,
        byte: usize,
        value: u8,
    },
    #[error("metadata block at {block_offset}, entry {index}: DataLength is 0")]
    ZeroLength { block_offset: u64, index: usize },
    #[error("metadata block at {block_offset}, entry {index}: ByteOffset {byte_offset} or DataLength {data_length} is not a multiple of 512")]
    Unaligned {
        block_offset: u64,
        index: usize,
        byte_offset: u64,
        data_length: u32,
    },
    #[error("metadata block at {block_offset}, entry {index}: write of {data_length} bytes at {byte_offset} ends past the {disk_size}-byte disk")]
    ExtentPastDiskEnd {
        block_offset: u64,
        index: usize,
        byte_offset: u64,
        data_length: u32,
        disk_size: u64,
    },
    #[error("metadata block at {block_offset}, entry {index}: data at {log_offset} (+{data_length}) ends past the {file_len}-byte file")]
    DataOutsideFile {
        block_offset: u64,
        index: usize,
        log_offset: u64,
        data_length: u32,
        file_len: u64,
    },
    #[error("metadata block at {block_offset}, entry {index}: data at {log_offset} (+{data_length}) runs into the metadata block")]
    DataOverlapsMetadata {
        block_offset: u64,
        index: usize,
        log_offset: u64,
        data_length: u32,
    },
    #[error("metadata block at {block_offset}: its entries' data ends at {data_end}, not where the block starts")]
    DataGap { block_offset: u64, data_end: u64 },
    #[error("metadata block at {block_offset}, entry {index}: DataChecksum stored {stored:#010x}, computed {computed:#010x}")]
    DataChecksum {
        block_offset: u64,
        index: usize,
        stored: u32,
        computed: u32,
    },
    #[error("header TotalMetadataEntries is {header}, the metadata blocks hold {found}")]
    TotalEntriesMismatch { header: u64, found: u64 },
    #[error("write at disk offset {disk_offset} of {length} bytes: offset and length must be non-zero multiples of 512")]
    WriteUnaligned { disk_offset: u64, length: u64 },
    #[error("write at disk offset {disk_offset} of {length} bytes ends past 2^64")]
    WriteOutOfRange { disk_offset: u64, length: u64 },
    #[error("maximum entry length {0} is not a non-zero multiple of 512")]
    BadMaxEntryLength(u32),
    #[error("log grows past 2^64 bytes")]
    LogTooLarge,
    #[error("applying {length} bytes at disk offset {disk_offset}")]
    ApplyWrite {
        disk_offset: u64,
        length: usize,
        #[source]
        source: io::Error,
    },
    #[error("invalid GUID text {text:?}")]
    InvalidGuid { text: String },
}

/// A GUID as stored on disk (16 bytes, Windows mixed-endian: the first three fields
/// little-endian). Displays and parses in the usual `8-4-4-4-12` form.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Guid(pub [u8; 16]);

impl Guid {
    pub const NIL: Guid = Guid([0; 16]);

    /// A random (version 4) GUID, for new logs.
    pub fn new_random() -> Guid {
        Guid(uuid::Uuid::new_v4().to_bytes_le())
    }
}

impl fmt::Display for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&uuid::Uuid::from_bytes_le(self.0).hyphenated(), f)
    }
}

impl fmt::Debug for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Guid({self})")
    }
}

impl FromStr for Guid {
    type Err = HrlError;
    fn from_str(s: &str) -> Result<Guid, HrlError> {
        uuid::Uuid::try_parse(s)
            .map(|u| Guid(u.to_bytes_le()))
            .map_err(|_| HrlError::InvalidGuid { text: s.to_owned() })
    }
}

/// Seconds since 2000-01-01 00:00:00 UTC, as HRL timestamps count; saturates at both ends.
pub fn hrl_timestamp(t: SystemTime) -> u32 {
    let unix = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    u32::try_from(unix.saturating_sub(HRL_EPOCH_UNIX)).unwrap_or(u32::MAX)
}

impl HrlHeader {
    /// The time the log's content reaches, in Unix seconds: its `LastModifiedTimeStamp` (the
    /// last write it holds), else its `TimeStamp`; `None` when the log carries neither (0).
    pub fn content_time_unix(&self) -> Option<u64> {
        [self.last_modified_timestamp, self.timestamp]
            .into_iter()
            .find(|t| *t != 0)
            .map(|t| HRL_EPOCH_UNIX + u64::from(t))
    }
}

/// The log file header. `checksum` is the stored value on parse; [`HrlHeader::to_bytes`]
/// recomputes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HrlHeader {
    /// Eighth byte of the `msctlog` cookie (0x00 or 0x20).
    pub cookie_byte8: u8,
    pub version: u32,
    pub timestamp: u32,
    pub creator_application: [u8; 4],
    pub creator_version: u32,
    pub original_size: u64,
    pub current_size: u64,
    pub checksum: u32,
    pub eol_location: u64,
    pub error_code: i32,
    pub metadata_size: u32,
    pub unique_id: Guid,
    pub previous_unique_id: Guid,
    pub last_modified_timestamp: u32,
    pub total_metadata_entries: u64,
    pub file_type: u32,
    pub flags: u16,
    pub vhd2_data_write_guid: Guid,
}

impl HrlHeader {
    /// Parses and validates everything the header alone can tell (not `EOLLocation` against
    /// the file length: [`read_log`] does that).
    pub fn parse(buf: &[u8; 4096]) -> Result<HrlHeader, HrlError> {
        let cookie: [u8; 8] = arr(buf, H_COOKIE);
        let cookie_byte8 = cookie[7];
        if &cookie[..7] != COOKIE_PREFIX || !(cookie_byte8 == 0 || cookie_byte8 == 0x20) {
            return Err(HrlError::BadCookie { found: cookie });
        }
        let stored = le_u32(buf, H_CHECKSUM);
        let computed = header_checksum(buf);
        if stored != computed {
            return Err(HrlError::HeaderChecksum { stored, computed });
        }
        let version = le_u32(buf, H_VERSION);
        match version {
            LOG_FORMAT_VERSION => {}
            LOCAL_ONLY_VERSION => return Err(HrlError::LocalOnlyVersion),
            v => return Err(HrlError::UnsupportedVersion(v)),
        }
        let eol_location = le_u64(buf, H_EOL);
        if eol_location == 0 {
            return Err(HrlError::NotClosedProperly);
        }
        let file_type = le_u32(buf, H_FILE_TYPE);
        if file_type != 0 {
            return Err(HrlError::BadFileType(file_type));
        }
        let flags = le_u16(buf, H_FLAGS);
        if flags != 0 {
            return Err(HrlError::BadFlags(flags));
        }
        if let Some((i, &value)) = buf
            .iter()
            .enumerate()
            .skip(H_RESERVED)
            .find(|(_, &b)| b != 0)
        {
            return Err(HrlError::HeaderReservedNonZero { offset: i, value });
        }
        let metadata_size = le_u32(buf, H_METADATA_SIZE);
        check_metadata_size(metadata_size)?;
        let min = HEADER_SIZE + u64::from(metadata_size);
        if eol_location < min {
            return Err(HrlError::EolTooSmall {
                eol: eol_location,
                min,
            });
        }
        Ok(HrlHeader {
            cookie_byte8,
            version,
            timestamp: le_u32(buf, H_TIMESTAMP),
            creator_application: arr(buf, H_CREATOR_APP),
            creator_version: le_u32(buf, H_CREATOR_VERSION),
            original_size: le_u64(buf, H_ORIGINAL_SIZE),
            current_size: le_u64(buf, H_CURRENT_SIZE),
            checksum: stored,
            eol_location,
            error_code: i32::from_le_bytes(arr(buf, H_ERROR_CODE)),
            metadata_size,
            unique_id: Guid(arr(buf, H_UNIQUE_ID)),
            previous_unique_id: Guid(arr(buf, H_PREVIOUS_UNIQUE_ID)),
            last_modified_timestamp: le_u32(buf, H_LAST_MODIFIED),
            total_metadata_entries: le_u64(buf, H_TOTAL_ENTRIES),
            file_type,
            flags,
            vhd2_data_write_guid: Guid(arr(buf, H_VHD2_GUID)),
        })
    }

    /// Encodes the header with a freshly computed checksum (`self.checksum` is ignored: a header
    /// with a stale checksum is never worth writing).
    pub fn to_bytes(&self) -> [u8; 4096] {
        let mut b = [0u8; 4096];
        put(&mut b, H_COOKIE, COOKIE_PREFIX);
        put(&mut b, H_COOKIE + 7, &[self.cookie_byte8]);
        put(&mut b, H_VERSION, &self.version.to_le_bytes());
        put(&mut b, H_TIMESTAMP, &self.timestamp.to_le_bytes());
        put(&mut b, H_CREATOR_APP, &self.creator_application);
        put(
            &mut b,
            H_CREATOR_VERSION,
            &self.creator_version.to_le_bytes(),
        );
        put(&mut b, H_ORIGINAL_SIZE, &self.original_size.to_le_bytes());
        put(&mut b, H_CURRENT_SIZE, &self.current_size.to_le_bytes());
        put(&mut b, H_EOL, &self.eol_location.to_le_bytes());
        put(&mut b, H_ERROR_CODE, &self.error_code.to_le_bytes());
        put(&mut b, H_METADATA_SIZE, &self.metadata_size.to_le_bytes());
        put(&mut b, H_UNIQUE_ID, &self.unique_id.0);
        put(&mut b, H_PREVIOUS_UNIQUE_ID, &self.previous_unique_id.0);
        put(
            &mut b,
            H_LAST_MODIFIED,
            &self.last_modified_timestamp.to_le_bytes(),
        );
        put(
            &mut b,
            H_TOTAL_ENTRIES,
            &self.total_metadata_entries.to_le_bytes(),
        );
        put(&mut b, H_FILE_TYPE, &self.file_type.to_le_bytes());
        put(&mut b, H_FLAGS, &self.flags.to_le_bytes());
        put(&mut b, H_VHD2_GUID, &self.vhd2_data_write_guid.0);
        let checksum = header_checksum(&b);
        put(&mut b, H_CHECKSUM, &checksum.to_le_bytes());
        b
    }
}

/// One write recorded in a log, with where its data sits in the log file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HrlExtent {
    pub disk_offset: u64,
    pub length: u32,
    /// Offset of the data in the log file.
    pub log_offset: u64,
    pub timestamp: u32,
    /// As stored; 0 when the writer did not record one.
    pub data_checksum: u32,
}

/// A validated log: its header and its writes in the order they must be applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HrlLog {
    pub header: HrlHeader,
    pub extents: Vec<HrlExtent>,
}

/// The 32-byte header of a metadata block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct MetadataHeader {
    /// Distance back to the previous block; 0 for the first block.
    previous_location: u64,
    valid_entries: u32,
}

impl MetadataHeader {
    fn parse(b: &[u8; METADATA_HEADER_SIZE], block_offset: u64) -> Result<Self, HrlError> {
        let stored = le_u32(b, M_CHECKSUM);
        let computed = record_checksum(b, M_CHECKSUM);
        if stored != computed {
            return Err(HrlError::MetadataHeaderChecksum {
                block_offset,
                stored,
                computed,
            });
        }
        if let Some((i, &value)) = b.iter().enumerate().skip(M_RESERVED).find(|(_, &v)| v != 0) {
            return Err(HrlError::MetadataReservedNonZero {
                block_offset,
                index: i - M_RESERVED,
                value,
            });
        }
        Ok(MetadataHeader {
            previous_location: le_u64(b, M_PREVIOUS),
            valid_entries: le_u32(b, M_VALID),
        })
    }

    fn to_bytes(self) -> [u8; METADATA_HEADER_SIZE] {
        let mut b = [0u8; METADATA_HEADER_SIZE];
        put(&mut b, M_PREVIOUS, &self.previous_location.to_le_bytes());
        put(&mut b, M_VALID, &self.valid_entries.to_le_bytes());
        let checksum = record_checksum(&b, M_CHECKSUM);
        put(&mut b, M_CHECKSUM, &checksum.to_le_bytes());
        b
    }
}

/// One 32-byte metadata entry. Only structural checks happen in `parse`; the range checks that
/// need the disk size and the file layout happen in [`read_log`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct MetadataEntry {
    byte_offset: u64,
    data_length: u32,
    timestamp: u32,
    data_checksum: u32,
}

impl MetadataEntry {
    fn parse(b: &[u8; ENTRY_SIZE], block_offset: u64, index: usize) -> Result<Self, HrlError> {
        let stored = le_u32(b, E_CHECKSUM);
        let computed = record_checksum(b, E_CHECKSUM);
        if stored != computed {
            return Err(HrlError::EntryChecksum {
                block_offset,
                index,
                stored,
                computed,
            });
        }
        let operation = b[E_OPERATION];
        if operation != META_OPERATION_WRITE {
            return Err(HrlError::UnknownOperation {
                block_offset,
                index,
                operation,
            });
        }
        let location = b[E_LOCATION];
        if location != 0 {
            return Err(HrlError::BadLocation {
                block_offset,
                index,
                location,
            });
        }
        if let Some((i, &value)) = b.iter().enumerate().skip(E_RESERVED).find(|(_, &v)| v != 0) {
            return Err(HrlError::EntryReservedNonZero {
                block_offset,
                index,
                byte: i - E_RESERVED,
                value,
            });
        }
        Ok(MetadataEntry {
            byte_offset: le_u64(b, E_BYTE_OFFSET),
            data_length: le_u32(b, E_DATA_LENGTH),
            timestamp: le_u32(b, E_TIMESTAMP),
            data_checksum: u32::from_le_bytes(arr(b, E_DATA_CHECKSUM)),
        })
    }

    fn to_bytes(self) -> [u8; ENTRY_SIZE] {
        let mut b = [0u8; ENTRY_SIZE];
        put(&mut b, E_BYTE_OFFSET, &self.byte_offset.to_le_bytes());
        put(&mut b, E_DATA_LENGTH, &self.data_length.to_le_bytes());
        put(&mut b, E_TIMESTAMP, &self.timestamp.to_le_bytes());
        put(&mut b, E_OPERATION, &[META_OPERATION_WRITE]);
        put(&mut b, E_DATA_CHECKSUM, &self.data_checksum.to_le_bytes());
        let checksum = record_checksum(&b, E_CHECKSUM);
        put(&mut b, E_CHECKSUM, &checksum.to_le_bytes());
        b
    }
}

/// Validates a whole log read through `r` (its length is the file length) for a disk of
/// `disk_size` bytes, and returns its writes in apply order. Reads every data range whose
/// `DataChecksum` is recorded.
pub fn read_log<R: ReadAt + ?Sized>(r: &R, disk_size: u64) -> Result<HrlLog, HrlError> {
    let file_len = r.len().map_err(|source| HrlError::Io {
        what: "reading the log length",
        offset: 0,
        source,
    })?;
    if file_len < HEADER_SIZE {
        return Err(HrlError::TooShort { len: file_len });
    }
    let mut hbuf = [0u8; 4096];
    read_at(r, &mut hbuf, 0, "reading the header")?;
    let header = HrlHeader::parse(&hbuf)?;
    if header.eol_location > file_len {
        return Err(HrlError::EolBeyondFile {
            eol: header.eol_location,
            file_len,
        });
    }
    let blocks = walk_blocks(r, &header, file_len)?;

    let ms = u64::from(header.metadata_size);
    // check_metadata_size bounded this to 1 MiB.
    let mut block_buf = vec![0u8; header.metadata_size as usize];
    let mut data_buf = Vec::new();
    let mut extents = Vec::new();
    let mut data_pos = HEADER_SIZE;
    for &block_offset in &blocks {
        read_at(r, &mut block_buf, block_offset, "reading a metadata block")?;
        let mut records = block_buf
            .chunks_exact(ENTRY_SIZE)
            .filter_map(|c| <&[u8; 32]>::try_from(c).ok());
        let Some(head) = records.next() else {
            return Err(HrlError::BadMetadataSize(header.metadata_size));
        };
        let mh = MetadataHeader::parse(head, block_offset)?;
        let capacity = entry_capacity(header.metadata_size);
        if mh.valid_entries > capacity {
            return Err(HrlError::TooManyEntries {
                block_offset,
                valid: mh.valid_entries,
                capacity,
            });
        }
        for (index, rec) in records.take(mh.valid_entries as usize).enumerate() {
            let e = MetadataEntry::parse(rec, block_offset, index)?;
            let len = u64::from(e.data_length);
            if e.data_length == 0 {
                return Err(HrlError::ZeroLength {
                    block_offset,
                    index,
                });
            }
            if e.byte_offset % SECTOR_SIZE != 0 || len % SECTOR_SIZE != 0 {
                return Err(HrlError::Unaligned {
                    block_offset,
                    index,
                    byte_offset: e.byte_offset,
                    data_length: e.data_length,
                });
            }
            if e.byte_offset
                .checked_add(len)
                .is_none_or(|end| end > disk_size)
            {
                return Err(HrlError::ExtentPastDiskEnd {
                    block_offset,
                    index,
                    byte_offset: e.byte_offset,
                    data_length: e.data_length,
                    disk_size,
                });
            }
            let data_end = data_pos.checked_add(len).filter(|&end| end <= file_len);
            let Some(data_end) = data_end else {
                return Err(HrlError::DataOutsideFile {
                    block_offset,
                    index,
                    log_offset: data_pos,
                    data_length: e.data_length,
                    file_len,
                });
            };
            if data_end > block_offset {
                return Err(HrlError::DataOverlapsMetadata {
                    block_offset,
                    index,
                    log_offset: data_pos,
                    data_length: e.data_length,
                });
            }
            if e.data_checksum != 0 {
                let computed = data_checksum(r, data_pos, len, &mut data_buf)?;
                if computed != e.data_checksum {
                    return Err(HrlError::DataChecksum {
                        block_offset,
                        index,
                        stored: e.data_checksum,
                        computed,
                    });
                }
            }
            extents.push(HrlExtent {
                disk_offset: e.byte_offset,
                length: e.data_length,
                log_offset: data_pos,
                timestamp: e.timestamp,
                data_checksum: e.data_checksum,
            });
            data_pos = data_end;
        }
        if data_pos != block_offset {
            return Err(HrlError::DataGap {
                block_offset,
                data_end: data_pos,
            });
        }
        // walk_blocks proved every block lies inside [HEADER_SIZE, EOLLocation].
        data_pos = block_offset.checked_add(ms).ok_or(HrlError::LogTooLarge)?;
    }
    let found = extents.len() as u64;
    if found != header.total_metadata_entries {
        return Err(HrlError::TotalEntriesMismatch {
            header: header.total_metadata_entries,
            found,
        });
    }
    Ok(HrlLog { header, extents })
}

/// Follows the back-pointers from the last block and returns the block offsets first block
/// first. Each step must go back by at least one whole block and stay after the header, so the
/// walk ends within `(EOLLocation - 4096) / MetadataSize` steps and cannot loop.
fn walk_blocks<R: ReadAt + ?Sized>(
    r: &R,
    header: &HrlHeader,
    file_len: u64,
) -> Result<Vec<u64>, HrlError> {
    let ms = u64::from(header.metadata_size);
    let too_small = HrlError::EolTooSmall {
        eol: header.eol_location,
        min: HEADER_SIZE + ms,
    };
    let mut cur = header
        .eol_location
        .checked_sub(ms)
        .filter(|&c| c >= HEADER_SIZE)
        .ok_or(too_small)?;
    let max_blocks = (cur - HEADER_SIZE) / ms + 1;
    // Reserve by the proven bound, but not more than a modest amount up front.
    let mut stack = Vec::with_capacity(usize::try_from(max_blocks.min(1024)).unwrap_or(1024));
    loop {
        stack.push(cur);
        let mut hb = [0u8; METADATA_HEADER_SIZE];
        read_at(r, &mut hb, cur, "reading a metadata block header")?;
        let distance = MetadataHeader::parse(&hb, cur)?.previous_location;
        if distance == 0 {
            break;
        }
        let Some(prev) = cur.checked_sub(distance) else {
            // A naive reader would wrap around; if it lands back inside the file it loops.
            let target = cur.wrapping_sub(distance);
            return Err(if target < file_len {
                HrlError::BackPointerLoop {
                    block_offset: cur,
                    distance,
                    target,
                }
            } else {
                HrlError::BackPointerOutsideFile {
                    block_offset: cur,
                    distance,
                }
            });
        };
        if prev < HEADER_SIZE {
            return Err(HrlError::MetadataOverlapsHeader {
                block_offset: cur,
                previous_offset: prev,
            });
        }
        if distance < ms {
            return Err(HrlError::MetadataBlocksOverlap {
                block_offset: cur,
                distance,
                metadata_size: header.metadata_size,
            });
        }
        cur = prev;
    }
    stack.reverse();
    Ok(stack)
}

/// Applies the log's writes in order: reads each extent's data from `r` (the same bytes
/// [`read_log`] validated) in bounded pieces and hands them to `write(disk_offset, data)`.
pub fn apply<R: ReadAt + ?Sized>(
    log: &HrlLog,
    r: &R,
    mut write: impl FnMut(u64, &[u8]) -> io::Result<()>,
) -> Result<(), HrlError> {
    let mut buf = Vec::new();
    for e in &log.extents {
        let len = u64::from(e.length);
        let mut done = 0u64;
        while done < len {
            let n = chunk_len(len - done);
            buf.resize(n, 0);
            let log_offset = e
                .log_offset
                .checked_add(done)
                .ok_or(HrlError::LogTooLarge)?;
            let disk_offset = e
                .disk_offset
                .checked_add(done)
                .ok_or(HrlError::WriteOutOfRange {
                    disk_offset: e.disk_offset,
                    length: len,
                })?;
            read_at(r, &mut buf, log_offset, "reading write data")?;
            write(disk_offset, &buf).map_err(|source| HrlError::ApplyWrite {
                disk_offset,
                length: n,
                source,
            })?;
            done += n as u64;
        }
    }
    Ok(())
}

/// What a new log is made with. `Default` gives nil GUIDs, timestamp 0, Hyper-V's block size,
/// 1 MiB entries and recorded data checksums.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HrlWriterParams {
    pub unique_id: Guid,
    pub previous_unique_id: Guid,
    pub vhd2_data_write_guid: Guid,
    /// Header `TimeStamp` and `LastModifiedTimeStamp`, and the default entry timestamp.
    pub timestamp: u32,
    pub metadata_size: u32,
    /// Writes longer than this become several entries; a non-zero multiple of 512.
    pub max_entry_length: u32,
    pub creator_application: [u8; 4],
    pub creator_version: u32,
    /// Whether entries carry a `DataChecksum`; Hyper-V's example leaves it 0.
    pub record_data_checksums: bool,
}

impl Default for HrlWriterParams {
    fn default() -> Self {
        HrlWriterParams {
            unique_id: Guid::NIL,
            previous_unique_id: Guid::NIL,
            vhd2_data_write_guid: Guid::NIL,
            timestamp: 0,
            metadata_size: DEFAULT_METADATA_SIZE,
            max_entry_length: DEFAULT_MAX_ENTRY_LENGTH,
            // Not Hyper-V's "ct": these logs are ours, and the field is informative only.
            creator_application: *b"drv\0",
            creator_version: 1,
            record_data_checksums: true,
        }
    }
}

/// Streams a log to `out` (see the module doc): data is written as writes are added; memory
/// holds at most one metadata block of entries.
pub struct HrlWriter<W: Write + Seek> {
    out: W,
    params: HrlWriterParams,
    /// Stream position of the log's offset 0.
    base: u64,
    /// Log offset of the next byte to write.
    pos: u64,
    /// Log offset of the last metadata block written.
    last_block: u64,
    pending: Vec<MetadataEntry>,
    capacity: usize,
    total_entries: u64,
    scratch: Vec<u8>,
}

impl<W: Write + Seek> HrlWriter<W> {
    /// Starts a log at `out`'s current position: writes a provisional header (EOLLocation 0)
    /// and the empty first metadata block.
    pub fn new(params: HrlWriterParams, mut out: W) -> Result<Self, HrlError> {
        check_metadata_size(params.metadata_size)?;
        if params.max_entry_length == 0 || u64::from(params.max_entry_length) % SECTOR_SIZE != 0 {
            return Err(HrlError::BadMaxEntryLength(params.max_entry_length));
        }
        let base = out.stream_position().map_err(|source| HrlError::Io {
            what: "finding the start of the log",
            offset: 0,
            source,
        })?;
        let capacity = entry_capacity(params.metadata_size) as usize;
        let mut w = HrlWriter {
            out,
            params,
            base,
            pos: 0,
            last_block: HEADER_SIZE,
            pending: Vec::with_capacity(capacity),
            capacity,
            total_entries: 0,
            scratch: Vec::new(),
        };
        let provisional = w.header(0).to_bytes();
        w.emit(&provisional, "writing the provisional header")?;
        w.close_block()?;
        Ok(w)
    }

    /// Records a write of `data` at `disk_offset` with the log's timestamp.
    pub fn add_write(&mut self, disk_offset: u64, data: &[u8]) -> Result<(), HrlError> {
        self.add_write_at(disk_offset, data, self.params.timestamp)
    }

    /// Records a write with its own entry timestamp. Offset and length must be non-zero
    /// multiples of 512; writes longer than `max_entry_length` become several entries.
    /// After an I/O error the log is incomplete: drop the writer; the provisional header left
    /// in place makes readers refuse the log as not closed properly.
    pub fn add_write_at(
        &mut self,
        disk_offset: u64,
        data: &[u8],
        timestamp: u32,
    ) -> Result<(), HrlError> {
        let length = data.len() as u64;
        if length == 0 || length % SECTOR_SIZE != 0 || disk_offset % SECTOR_SIZE != 0 {
            return Err(HrlError::WriteUnaligned {
                disk_offset,
                length,
            });
        }
        if disk_offset.checked_add(length).is_none() {
            return Err(HrlError::WriteOutOfRange {
                disk_offset,
                length,
            });
        }
        let mut piece_offset = disk_offset;
        for piece in data.chunks(self.params.max_entry_length as usize) {
            if self.pending.len() == self.capacity {
                self.close_block()?;
            }
            let data_checksum = if self.params.record_data_checksums {
                !byte_sum(piece)
            } else {
                0
            };
            self.emit(piece, "writing write data")?;
            self.pending.push(MetadataEntry {
                byte_offset: piece_offset,
                // chunks() bounded the piece by max_entry_length, a u32.
                data_length: u32::try_from(piece.len())
                    .map_err(|_| HrlError::BadMaxEntryLength(self.params.max_entry_length))?,
                timestamp,
                data_checksum,
            });
            piece_offset += piece.len() as u64;
        }
        Ok(())
    }

    /// Closes the last block, writes the final header and leaves `out` positioned at the end of
    /// the log. Returns `out` (for a file, sync it before announcing the log).
    pub fn finish(mut self) -> Result<W, HrlError> {
        if !self.pending.is_empty() {
            self.close_block()?;
        }
        let header = self.header(self.pos).to_bytes();
        let end = self
            .base
            .checked_add(self.pos)
            .ok_or(HrlError::LogTooLarge)?;
        let io = |source| HrlError::Io {
            what: "writing the final header",
            offset: 0,
            source,
        };
        self.out.seek(SeekFrom::Start(self.base)).map_err(io)?;
        self.out.write_all(&header).map_err(io)?;
        self.out.seek(SeekFrom::Start(end)).map_err(io)?;
        self.out.flush().map_err(io)?;
        Ok(self.out)
    }

    fn header(&self, eol: u64) -> HrlHeader {
        HrlHeader {
            cookie_byte8: 0,
            version: LOG_FORMAT_VERSION,
            timestamp: self.params.timestamp,
            creator_application: self.params.creator_application,
            creator_version: self.params.creator_version,
            original_size: eol,
            current_size: eol,
            checksum: 0,
            eol_location: eol,
            error_code: 0,
            metadata_size: self.params.metadata_size,
            unique_id: self.params.unique_id,
            previous_unique_id: self.params.previous_unique_id,
            last_modified_timestamp: self.params.timestamp,
            total_metadata_entries: self.total_entries,
            file_type: 0,
            flags: 0,
            vhd2_data_write_guid: self.params.vhd2_data_write_guid,
        }
    }

    /// Writes the metadata block describing the pending entries (possibly none) at `pos`.
    fn close_block(&mut self) -> Result<(), HrlError> {
        let block_offset = self.pos;
        let first = block_offset == HEADER_SIZE;
        let head = MetadataHeader {
            previous_location: if first {
                0
            } else {
                block_offset - self.last_block
            },
            valid_entries: self.pending.len() as u32,
        };
        self.scratch.clear();
        self.scratch.extend_from_slice(&head.to_bytes());
        for e in &self.pending {
            self.scratch.extend_from_slice(&e.to_bytes());
        }
        self.scratch.resize(self.params.metadata_size as usize, 0);
        let block = std::mem::take(&mut self.scratch);
        let written = self.emit(&block, "writing a metadata block");
        self.scratch = block;
        written?;
        self.total_entries += self.pending.len() as u64;
        self.pending.clear();
        self.last_block = block_offset;
        Ok(())
    }

    fn emit(&mut self, bytes: &[u8], what: &'static str) -> Result<(), HrlError> {
        let offset = self.pos;
        self.out.write_all(bytes).map_err(|source| HrlError::Io {
            what,
            offset,
            source,
        })?;
        self.pos = offset
            .checked_add(bytes.len() as u64)
            .ok_or(HrlError::LogTooLarge)?;
        Ok(())
    }
}

impl HrlWriter<io::Cursor<Vec<u8>>> {
    /// A writer that builds the log in memory (tests, small logs).
    pub fn in_memory(params: HrlWriterParams) -> Result<Self, HrlError> {
        HrlWriter::new(params, io::Cursor::new(Vec::new()))
    }

    pub fn finish_to_vec(self) -> Result<Vec<u8>, HrlError> {
        self.finish().map(io::Cursor::into_inner)
    }
}

fn check_metadata_size(ms: u32) -> Result<(), HrlError> {
    if ms < SECTOR_SIZE as u32 || ms > MAX_METADATA_SIZE || u64::from(ms) % SECTOR_SIZE != 0 {
        return Err(HrlError::BadMetadataSize(ms));
    }
    Ok(())
}

/// Entries one block holds: 127 for 4096-byte blocks.
fn entry_capacity(metadata_size: u32) -> u32 {
    metadata_size.saturating_sub(METADATA_HEADER_SIZE as u32) / ENTRY_SIZE as u32
}

fn byte_sum(bytes: &[u8]) -> u32 {
    bytes
        .iter()
        .fold(0u32, |s, &b| s.wrapping_add(u32::from(b)))
}

/// Ones' complement of the byte sum of the 4096 header bytes, the checksum field excluded.
fn header_checksum(b: &[u8; 4096]) -> u32 {
    !byte_sum(b).wrapping_sub(byte_sum(&b[H_CHECKSUM..H_CHECKSUM + 4]))
}

/// Ones' complement of the byte sum of a 32-byte record with its checksum field taken as 0.
fn record_checksum(b: &[u8; 32], checksum_at: usize) -> u32 {
    !byte_sum(b).wrapping_sub(byte_sum(&b[checksum_at..checksum_at + 4]))
}

/// Data checksum of `len` bytes at `offset`, read in bounded pieces into `buf`.
fn data_checksum<R: ReadAt + ?Sized>(
    r: &R,
    offset: u64,
    len: u64,
    buf: &mut Vec<u8>,
) -> Result<u32, HrlError> {
    let mut sum = 0u32;
    let mut done = 0u64;
    while done < len {
        let n = chunk_len(len - done);
        buf.resize(n, 0);
        read_at(r, buf, offset + done, "reading write data")?;
        sum = sum.wrapping_add(byte_sum(buf));
        done += n as u64;
    }
    Ok(!sum)
}

fn chunk_len(remaining: u64) -> usize {
    usize::try_from(remaining).map_or(IO_CHUNK, |r| r.min(IO_CHUNK))
}

fn read_at<R: ReadAt + ?Sized>(
    r: &R,
    buf: &mut [u8],
    offset: u64,
    what: &'static str,
) -> Result<(), HrlError> {
    r.read_exact_at(buf, offset).map_err(|source| HrlError::Io {
        what,
        offset,
        source,
    })
}

// Field access inside fixed-size records: the offsets are the constants above, all in range for
// the record type they are used with, so these slices cannot fail on any input.
fn arr<const N: usize, const M: usize>(b: &[u8; M], at: usize) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&b[at..at + N]);
    a
}
fn le_u16<const M: usize>(b: &[u8; M], at: usize) -> u16 {
    u16::from_le_bytes(arr(b, at))
}
fn le_u32<const M: usize>(b: &[u8; M], at: usize) -> u32 {
    u32::from_le_bytes(arr(b, at))
}
fn le_u64<const M: usize>(b: &[u8; M], at: usize) -> u64 {
    u64::from_le_bytes(arr(b, at))
}
fn put<const M: usize>(b: &mut [u8; M], at: usize, bytes: &[u8]) {
    b[at..at + bytes.len()].copy_from_slice(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::io::Cursor;

    const DISK: u64 = 1 << 30;

    fn params(metadata_size: u32) -> HrlWriterParams {
        HrlWriterParams {
            unique_id: "6f1c2a9e-0d3b-4c57-9a61-1b2c3d4e5f60".parse().unwrap(),
            previous_unique_id: "0a0b0c0d-1111-2222-3333-444455556666".parse().unwrap(),
            vhd2_data_write_guid: Guid([7; 16]),
            timestamp: 800_000_000,
            metadata_size,
            ..HrlWriterParams::default()
        }
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| seed.wrapping_add((i % 251) as u8))
            .collect()
    }

    fn build(p: HrlWriterParams, writes: &[(u64, Vec<u8>)]) -> Vec<u8> {
        let mut w = HrlWriter::in_memory(p).unwrap();
        for (off, data) in writes {
            w.add_write(*off, data).unwrap();
        }
        w.finish_to_vec().unwrap()
    }

    fn image_after(log: &[u8], parsed: &HrlLog, size: usize) -> Vec<u8> {
        let mut img = vec![0u8; size];
        apply(parsed, log, |off, data| {
            let s = off as usize;
            img[s..s + data.len()].copy_from_slice(data);
            Ok(())
        })
        .unwrap();
        img
    }

    fn flat_model(writes: &[(u64, Vec<u8>)], size: usize) -> Vec<u8> {
        let mut img = vec![0u8; size];
        for (off, data) in writes {
            let s = *off as usize;
            img[s..s + data.len()].copy_from_slice(data);
        }
        img
    }

    fn get_u32(log: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(log[at..at + 4].try_into().unwrap())
    }
    fn get_u64(log: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(log[at..at + 8].try_into().unwrap())
    }
    fn set_u32(log: &mut [u8], at: usize, v: u32) {
        log[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }
    fn set_u64(log: &mut [u8], at: usize, v: u64) {
        log[at..at + 8].copy_from_slice(&v.to_le_bytes());
    }

    fn refix_header(log: &mut [u8]) {
        let c = header_checksum(log[..4096].try_into().unwrap());
        set_u32(log, H_CHECKSUM, c);
    }
    fn refix_record(log: &mut [u8], at: usize, checksum_at: usize) {
        let c = record_checksum(log[at..at + 32].try_into().unwrap(), checksum_at);
        set_u32(log, at + checksum_at, c);
    }
    fn refix_block_header(log: &mut [u8], block: u64) {
        refix_record(log, block as usize, M_CHECKSUM);
    }
    fn entry_at(block: u64, index: usize) -> usize {
        block as usize + METADATA_HEADER_SIZE + index * ENTRY_SIZE
    }
    fn refix_entry(log: &mut [u8], block: u64, index: usize) {
        refix_record(log, entry_at(block, index), E_CHECKSUM);
    }

    /// Block offsets of a well-formed log, first first, read straight from the bytes.
    fn block_offsets(log: &[u8]) -> Vec<u64> {
        let ms = u64::from(get_u32(log, H_METADATA_SIZE));
        let mut cur = get_u64(log, H_EOL) - ms;
        let mut blocks = vec![cur];
        loop {
            let d = get_u64(log, cur as usize);
            if d == 0 {
                break;
            }
            cur -= d;
            blocks.push(cur);
        }
        blocks.reverse();
        blocks
    }

    /// 20 writes of 1 KiB in 512-byte blocks (15 entries each): an empty first block, a full
    /// one and a partial one, with data checksums.
    fn fixture() -> (Vec<u8>, Vec<u64>) {
        let writes: Vec<_> = (0..20u64)
            .map(|i| (i * 4096, pattern(1024, i as u8)))
            .collect();
        let log = build(params(512), &writes);
        let blocks = block_offsets(&log);
        assert_eq!(blocks.len(), 3);
        assert!(read_log(&log, DISK).is_ok());
        (log, blocks)
    }

    fn err(log: &[u8]) -> HrlError {
        read_log(log, DISK).unwrap_err()
    }

    // ---- the specification's worked example ----

    /// The example's 58 writes: entries 1 and 42 as printed; the other 56 are synthesised
    /// (the full table is not available here) with lengths making the printed total of 320000.
    fn example_entries() -> Vec<(u64, u32, u32)> {
        let mut synthetic_lengths =
            std::iter::repeat_n(5120u32, 52).chain(std::iter::repeat_n(4608, 4));
        (0..58usize)
            .map(|i| match i {
                0 => (3_626_348_544, 4096, 539_842_381),
                41 => (3_673_764_352, 31_232, 539_842_382),
                _ => {
                    let len = synthetic_lengths.next().unwrap();
                    let ts = if i < 41 { 539_842_381 } else { 539_842_382 };
                    (3_626_352_640 + i as u64 * (1 << 20), len, ts)
                }
            })
            .collect()
    }

    #[test]
    fn example_record_checksums_reproduce() {
        let first = MetadataHeader {
            previous_location: 0,
            valid_entries: 0,
        }
        .to_bytes();
        assert_eq!(get_u32(&first, M_CHECKSUM), 4_294_967_295);
        let second = MetadataHeader {
            previous_location: 324_096,
            valid_entries: 58,
        }
        .to_bytes();
        assert_eq!(get_u32(&second, M_CHECKSUM), 4_294_966_991);
        let e1 = MetadataEntry {
            byte_offset: 3_626_348_544,
            data_length: 4096,
            timestamp: 539_842_381,
            data_checksum: 0,
        };
        assert_eq!(get_u32(&e1.to_bytes(), E_CHECKSUM), 4_294_966_608);
        let e42 = MetadataEntry {
            byte_offset: 3_673_764_352,
            data_length: 31_232,
            timestamp: 539_842_382,
            data_checksum: 0,
        };
        assert_eq!(get_u32(&e42.to_bytes(), E_CHECKSUM), 4_294_966_413);
        assert_eq!(MetadataEntry::parse(&e42.to_bytes(), 0, 41).unwrap(), e42);
    }

    #[test]
    fn writer_rebuilds_the_example_layout() {
        let entries = example_entries();
        assert_eq!(entries.iter().map(|e| u64::from(e.1)).sum::<u64>(), 320_000);
        let mut p = params(4096);
        p.record_data_checksums = false;
        let mut w = HrlWriter::in_memory(p).unwrap();
        for &(off, len, ts) in &entries {
            w.add_write_at(off, &pattern(len as usize, 3), ts).unwrap();
        }
        let log = w.finish_to_vec().unwrap();

        assert_eq!(log.len(), 332_288);
        assert_eq!(get_u64(&log, H_EOL), 332_288);
        assert_eq!(block_offsets(&log), vec![4096, 328_192]);
        // The empty first block: all zero but its checksum.
        assert_eq!(get_u64(&log, 4096), 0);
        assert_eq!(get_u32(&log, 4096 + M_VALID), 0);
        assert_eq!(get_u32(&log, 4096 + M_CHECKSUM), 4_294_967_295);
        assert_eq!(get_u64(&log, 328_192), 324_096);
        assert_eq!(get_u32(&log, 328_192 + M_VALID), 58);
        assert_eq!(get_u32(&log, 328_192 + M_CHECKSUM), 4_294_966_991);
        assert_eq!(
            get_u32(&log, entry_at(328_192, 0) + E_CHECKSUM),
            4_294_966_608
        );
        assert_eq!(
            get_u32(&log, entry_at(328_192, 41) + E_CHECKSUM),
            4_294_966_413
        );

        let parsed = read_log(&log, 4 << 30).unwrap();
        assert_eq!(parsed.header.total_metadata_entries, 58);
        assert_eq!(parsed.extents.len(), 58);
        assert_eq!(parsed.extents[0].log_offset, 8192);
        assert_eq!(parsed.extents[0].disk_offset, 3_626_348_544);
        assert_eq!(parsed.extents[41].timestamp, 539_842_382);
        let last = parsed.extents[57];
        assert_eq!(last.log_offset + u64::from(last.length), 328_192);
    }

    // ---- header, GUID, timestamps ----

    #[test]
    fn guid_text_is_windows_mixed_endian() {
        let g: Guid = "00112233-4455-6677-8899-aabbccddeeff".parse().unwrap();
        assert_eq!(
            g.0,
            [
                0x33, 0x22, 0x11, 0x00, 0x55, 0x44, 0x77, 0x66, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd,
                0xee, 0xff
            ]
        );
        assert_eq!(g.to_string(), "00112233-4455-6677-8899-aabbccddeeff");
        assert_eq!(
            "{00112233-4455-6677-8899-AABBCCDDEEFF}"
                .parse::<Guid>()
                .unwrap(),
            g
        );
        assert!(matches!(
            "not-a-guid".parse::<Guid>(),
            Err(HrlError::InvalidGuid { .. })
        ));
        assert_ne!(Guid::new_random(), Guid::new_random());
    }

    #[test]
    fn timestamps_count_from_2000() {
        let t = UNIX_EPOCH + std::time::Duration::from_secs(HRL_EPOCH_UNIX + 5);
        assert_eq!(hrl_timestamp(t), 5);
        assert_eq!(hrl_timestamp(UNIX_EPOCH), 0);
    }

    #[test]
    fn header_round_trips_and_keeps_its_fields() {
        let (log, _) = fixture();
        let h = HrlHeader::parse(log[..4096].try_into().unwrap()).unwrap();
        assert_eq!(h.to_bytes().as_slice(), &log[..4096]);
        assert_eq!(
            h.unique_id.to_string(),
            "6f1c2a9e-0d3b-4c57-9a61-1b2c3d4e5f60"
        );
        assert_eq!(
            h.previous_unique_id.to_string(),
            "0a0b0c0d-1111-2222-3333-444455556666"
        );
        assert_eq!(h.vhd2_data_write_guid, Guid([7; 16]));
        assert_eq!(
            (h.timestamp, h.last_modified_timestamp),
            (800_000_000, 800_000_000)
        );
        assert_eq!(
            (h.original_size, h.current_size, h.eol_location),
            (log.len() as u64, log.len() as u64, log.len() as u64)
        );
        assert_eq!(
            (h.metadata_size, h.total_metadata_entries, h.cookie_byte8),
            (512, 20, 0)
        );
    }

    // ---- writer and reader together ----

    #[test]
    fn round_trip_splits_long_writes_and_packs_blocks() {
        let mut p = params(512);
        p.max_entry_length = 4096;
        let writes = vec![
            (0u64, pattern(3 * 4096 + 512, 1)),
            (8192, pattern(512, 2)),
            (1024, pattern(2048, 3)),
        ];
        let mut all = writes.clone();
        // Enough small writes to need several blocks.
        for i in 0..30u64 {
            all.push((i * 1024, pattern(512, 10 + i as u8)));
        }
        let log = build(p, &all);
        let parsed = read_log(&log, 64 * 1024).unwrap();
        // 4 entries for the split write, then one per write.
        assert_eq!(parsed.extents.len(), 4 + 2 + 30);
        assert_eq!(parsed.header.total_metadata_entries, 36);
        let lens: Vec<u32> = parsed.extents[..4].iter().map(|e| e.length).collect();
        assert_eq!(lens, vec![4096, 4096, 4096, 512]);
        let offs: Vec<u64> = parsed.extents[..4].iter().map(|e| e.disk_offset).collect();
        assert_eq!(offs, vec![0, 4096, 8192, 12288]);
        assert_eq!(parsed.extents[0].log_offset, HEADER_SIZE + 512);
        assert_eq!(block_offsets(&log).len(), 1 + 3);
        assert!(parsed.extents.iter().all(|e| e.data_checksum != 0));
        assert_eq!(
            image_after(&log, &parsed, 64 * 1024),
            flat_model(&all, 64 * 1024)
        );
    }

    #[test]
    fn empty_log_is_valid() {
        let log = build(params(4096), &[]);
        assert_eq!(log.len(), 8192);
        let parsed = read_log(&log, DISK).unwrap();
        assert!(parsed.extents.is_empty());
        assert_eq!(parsed.header.eol_location, 8192);
    }

    #[test]
    fn writer_starts_at_the_stream_position_and_ends_at_eol() {
        let mut cur = Cursor::new(vec![0xEE; 100]);
        cur.set_position(100);
        let mut w = HrlWriter::new(params(4096), cur).unwrap();
        w.add_write(512, &pattern(1024, 9)).unwrap();
        let cur = w.finish().unwrap();
        assert_eq!(cur.position(), cur.get_ref().len() as u64);
        let bytes = cur.into_inner();
        assert_eq!(&bytes[..100], &[0xEE; 100][..]);
        let parsed = read_log(&bytes[100..], DISK).unwrap();
        assert_eq!(parsed.extents.len(), 1);
    }

    #[test]
    fn abandoned_writer_leaves_a_log_not_closed_properly() {
        let mut cur = Cursor::new(Vec::new());
        {
            let mut w = HrlWriter::new(params(4096), &mut cur).unwrap();
            w.add_write(0, &pattern(512, 1)).unwrap();
        }
        assert!(matches!(err(cur.get_ref()), HrlError::NotClosedProperly));
    }

    #[test]
    fn logs_stream_to_and_read_back_from_a_file() {
        let writes: Vec<_> = (0..300u64)
            .map(|i| ((i % 40) * 512, pattern(1024, i as u8)))
            .collect();
        let file = tempfile::tempfile().unwrap();
        let mut w = HrlWriter::new(params(4096), io::BufWriter::new(file)).unwrap();
        for (off, data) in &writes {
            w.add_write(*off, data).unwrap();
        }
        let file = w.finish().unwrap().into_inner().unwrap();
        let r: &dyn ReadAt = &file;
        let parsed = read_log(r, 64 * 1024).unwrap();
        assert_eq!(parsed.extents.len(), 300);
        assert_eq!(parsed.header.eol_location, r.len().unwrap());
        let mut img = vec![0u8; 64 * 1024];
        apply(&parsed, r, |off, data| {
            img[off as usize..off as usize + data.len()].copy_from_slice(data);
            Ok(())
        })
        .unwrap();
        assert_eq!(img, flat_model(&writes, 64 * 1024));
    }

    #[test]
    fn trailing_bytes_after_eol_are_ignored() {
        let (mut log, _) = fixture();
        let expected = read_log(&log, DISK).unwrap();
        log.extend_from_slice(&[0xAB; 4096]);
        assert_eq!(read_log(&log, DISK).unwrap(), expected);
    }

    #[test]
    fn unrecorded_data_checksum_is_not_checked() {
        let mut p = params(4096);
        p.record_data_checksums = false;
        let mut log = build(p, &[(0, pattern(512, 1))]);
        log[8192] ^= 0xFF;
        let parsed = read_log(&log, DISK).unwrap();
        assert_eq!(parsed.extents[0].data_checksum, 0);
    }

    #[test]
    fn writer_refuses_bad_writes_and_params() {
        let mut w = HrlWriter::in_memory(params(4096)).unwrap();
        let e = w.add_write(100, &[0; 512]).unwrap_err();
        assert!(matches!(
            e,
            HrlError::WriteUnaligned {
                disk_offset: 100,
                length: 512
            }
        ));
        assert!(matches!(
            w.add_write(0, &[0; 100]),
            Err(HrlError::WriteUnaligned { .. })
        ));
        assert!(matches!(
            w.add_write(0, &[]),
            Err(HrlError::WriteUnaligned { length: 0, .. })
        ));
        let top = u64::MAX - 511;
        assert!(matches!(
            w.add_write(top, &[0; 1024]),
            Err(HrlError::WriteOutOfRange { .. })
        ));
        // The refused writes left nothing behind.
        let log = w.finish_to_vec().unwrap();
        assert!(read_log(&log, DISK).unwrap().extents.is_empty());

        for ms in [0, 256, 1000, 2 << 20] {
            assert!(
                matches!(HrlWriter::in_memory(params(ms)), Err(HrlError::BadMetadataSize(m)) if m == ms)
            );
        }
        for max in [0, 1000] {
            let mut p = params(4096);
            p.max_entry_length = max;
            assert!(
                matches!(HrlWriter::in_memory(p), Err(HrlError::BadMaxEntryLength(m)) if m == max)
            );
        }
    }

    #[test]
    fn apply_reports_the_failing_disk_write() {
        let (log, _) = fixture();
        let parsed = read_log(&log, DISK).unwrap();
        let e = apply(&parsed, &log[..], |off, _| {
            if off == 4096 {
                Err(io::Error::other("disk full"))
            } else {
                Ok(())
            }
        })
        .unwrap_err();
        assert!(
            matches!(
                e,
                HrlError::ApplyWrite {
                    disk_offset: 4096,
                    length: 1024,
                    ..
                }
            ),
            "{e:?}"
        );
    }

    // ---- every rule, broken one at a time ----

    #[test]
    fn header_corruption_is_refused() {
        let (log, _) = fixture();

        let mut bad = log.clone();
        bad[300] ^= 1;
        assert!(matches!(err(&bad), HrlError::HeaderChecksum { .. }));

        let mut bad = log.clone();
        bad[0] = b'X';
        refix_header(&mut bad);
        assert!(matches!(err(&bad), HrlError::BadCookie { found } if &found[..] == b"Xsctlog\0"));

        let mut ok = log.clone();
        ok[7] = 0x20;
        refix_header(&mut ok);
        assert_eq!(read_log(&ok, DISK).unwrap().header.cookie_byte8, 0x20);
        ok[7] = 0x21;
        refix_header(&mut ok);
        assert!(matches!(err(&ok), HrlError::BadCookie { .. }));

        let mut bad = log.clone();
        set_u32(&mut bad, H_VERSION, 0x0001_0000);
        refix_header(&mut bad);
        assert!(matches!(err(&bad), HrlError::LocalOnlyVersion));
        set_u32(&mut bad, H_VERSION, 0x0003_0000);
        refix_header(&mut bad);
        assert!(matches!(
            err(&bad),
            HrlError::UnsupportedVersion(0x0003_0000)
        ));

        let mut bad = log.clone();
        set_u64(&mut bad, H_EOL, 0);
        refix_header(&mut bad);
        assert!(matches!(err(&bad), HrlError::NotClosedProperly));

        let mut bad = log.clone();
        set_u64(&mut bad, H_EOL, HEADER_SIZE + 511);
        refix_header(&mut bad);
        assert!(matches!(
            err(&bad),
            HrlError::EolTooSmall {
                eol: 4607,
                min: 4608
            }
        ));

        for ms in [0u32, 1000, 2 << 20] {
            let mut bad = log.clone();
            set_u32(&mut bad, H_METADATA_SIZE, ms);
            refix_header(&mut bad);
            assert!(matches!(err(&bad), HrlError::BadMetadataSize(m) if m == ms));
        }

        let mut bad = log.clone();
        set_u32(&mut bad, H_FILE_TYPE, 1);
        refix_header(&mut bad);
        assert!(matches!(err(&bad), HrlError::BadFileType(1)));

        let mut bad = log.clone();
        bad[H_FLAGS] = 1;
        refix_header(&mut bad);
        assert!(matches!(err(&bad), HrlError::BadFlags(1)));

        let mut bad = log.clone();
        bad[4000] = 9;
        refix_header(&mut bad);
        assert!(matches!(
            err(&bad),
            HrlError::HeaderReservedNonZero {
                offset: 4000,
                value: 9
            }
        ));

        let mut bad = log.clone();
        set_u64(&mut bad, H_TOTAL_ENTRIES, 21);
        refix_header(&mut bad);
        assert!(matches!(
            err(&bad),
            HrlError::TotalEntriesMismatch {
                header: 21,
                found: 20
            }
        ));
    }

    #[test]
    fn truncated_logs_are_refused() {
        let (log, _) = fixture();
        let len = log.len() as u64;
        let e = err(&log[..log.len() - 1]);
        assert!(
            matches!(e, HrlError::EolBeyondFile { eol, file_len } if eol == len && file_len == len - 1)
        );
        assert!(matches!(err(&log[..100]), HrlError::TooShort { len: 100 }));
        assert!(matches!(err(&[]), HrlError::TooShort { len: 0 }));
    }

    #[test]
    fn metadata_header_corruption_is_refused() {
        let (log, blocks) = fixture();
        let b2 = blocks[2];

        let mut bad = log.clone();
        bad[b2 as usize + M_VALID] ^= 1;
        assert!(
            matches!(err(&bad), HrlError::MetadataHeaderChecksum { block_offset, .. } if block_offset == b2)
        );

        let mut bad = log.clone();
        bad[b2 as usize + M_RESERVED + 4] = 1;
        refix_block_header(&mut bad, b2);
        assert!(matches!(
            err(&bad),
            HrlError::MetadataReservedNonZero {
                index: 4,
                value: 1,
                ..
            }
        ));

        let b1 = blocks[1];
        let mut bad = log.clone();
        set_u32(&mut bad, b1 as usize + M_VALID, 16);
        refix_block_header(&mut bad, b1);
        let e = err(&bad);
        assert!(
            matches!(e, HrlError::TooManyEntries { block_offset, valid: 16, capacity: 15 } if block_offset == b1),
            "{e:?}"
        );
    }

    #[test]
    fn bad_back_pointers_are_refused() {
        let (log, blocks) = fixture();
        let (b1, b2) = (blocks[1], blocks[2]);
        let with_pointer = |block: u64, distance: u64| {
            let mut bad = log.clone();
            set_u64(&mut bad, block as usize + M_PREVIOUS, distance);
            refix_block_header(&mut bad, block);
            bad
        };

        // b2 -> b1 is intact; b1 -> "b2" closes a loop if read with wrapping arithmetic.
        let e = err(&with_pointer(b1, b1.wrapping_sub(b2)));
        assert!(
            matches!(e, HrlError::BackPointerLoop { block_offset, target, .. } if block_offset == b1 && target == b2),
            "{e:?}"
        );

        let e = err(&with_pointer(b2, b2 + 4096));
        assert!(
            matches!(e, HrlError::BackPointerOutsideFile { block_offset, distance } if block_offset == b2 && distance == b2 + 4096)
        );

        let e = err(&with_pointer(b2, b2 - 1024));
        assert!(
            matches!(
                e,
                HrlError::MetadataOverlapsHeader {
                    previous_offset: 1024,
                    ..
                }
            ),
            "{e:?}"
        );

        let e = err(&with_pointer(b2, 256));
        assert!(
            matches!(
                e,
                HrlError::MetadataBlocksOverlap {
                    distance: 256,
                    metadata_size: 512,
                    ..
                }
            ),
            "{e:?}"
        );
    }

    #[test]
    fn entry_corruption_is_refused() {
        let (log, blocks) = fixture();
        let b1 = blocks[1];
        let e3 = entry_at(b1, 3);
        let with_entry = |index: usize, change: &dyn Fn(&mut Vec<u8>, usize)| {
            let mut bad = log.clone();
            change(&mut bad, entry_at(b1, index));
            refix_entry(&mut bad, b1, index);
            bad
        };

        let mut bad = log.clone();
        bad[e3 + E_BYTE_OFFSET + 1] ^= 2;
        assert!(matches!(
            err(&bad),
            HrlError::EntryChecksum { index: 3, .. }
        ));

        let bad = with_entry(3, &|l, at| l[at + E_OPERATION] = 2);
        assert!(matches!(
            err(&bad),
            HrlError::UnknownOperation {
                index: 3,
                operation: 2,
                ..
            }
        ));

        let bad = with_entry(3, &|l, at| l[at + E_LOCATION] = 1);
        assert!(matches!(
            err(&bad),
            HrlError::BadLocation {
                index: 3,
                location: 1,
                ..
            }
        ));

        let bad = with_entry(3, &|l, at| l[at + 31] = 4);
        assert!(matches!(
            err(&bad),
            HrlError::EntryReservedNonZero {
                index: 3,
                byte: 5,
                value: 4,
                ..
            }
        ));

        let bad = with_entry(3, &|l, at| set_u32(l, at + E_DATA_LENGTH, 0));
        assert!(matches!(err(&bad), HrlError::ZeroLength { index: 3, .. }));

        let bad = with_entry(3, &|l, at| set_u64(l, at + E_BYTE_OFFSET, 3 * 4096 + 1));
        assert!(matches!(
            err(&bad),
            HrlError::Unaligned {
                index: 3,
                byte_offset: 12289,
                ..
            }
        ));
        let bad = with_entry(3, &|l, at| set_u32(l, at + E_DATA_LENGTH, 1000));
        assert!(matches!(
            err(&bad),
            HrlError::Unaligned {
                index: 3,
                data_length: 1000,
                ..
            }
        ));

        let bad = with_entry(3, &|l, at| set_u64(l, at + E_BYTE_OFFSET, u64::MAX - 511));
        assert!(matches!(
            err(&bad),
            HrlError::ExtentPastDiskEnd { index: 3, .. }
        ));

        // The last write ends at 19 * 4096 + 1024.
        let e = read_log(&log, 19 * 4096 + 1023).unwrap_err();
        assert!(
            matches!(
                e,
                HrlError::ExtentPastDiskEnd {
                    index: 4,
                    disk_size: 78_847,
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(read_log(&log, 19 * 4096 + 1024).is_ok());

        let mut bad = log.clone();
        // Block 1's data starts right after the empty first block.
        bad[4096 + 512 + 10] ^= 1;
        let e = err(&bad);
        assert!(
            matches!(e, HrlError::DataChecksum { index: 0, block_offset, .. } if block_offset == b1),
            "{e:?}"
        );
    }

    #[test]
    fn data_outside_its_place_is_refused() {
        let (log, blocks) = fixture();
        let (b1, b2) = (blocks[1], blocks[2]);
        let len = log.len() as u64;

        // The last block's first entry claims far more data than the file holds.
        let mut bad = log.clone();
        set_u32(&mut bad, entry_at(b2, 0) + E_DATA_LENGTH, 0x7FFF_FE00);
        refix_entry(&mut bad, b2, 0);
        let e = read_log(&bad, 1 << 40).unwrap_err();
        assert!(
            matches!(e, HrlError::DataOutsideFile { index: 0, file_len, .. } if file_len == len),
            "{e:?}"
        );

        // Block 1's last entry runs into block 1 itself.
        let mut bad = log.clone();
        set_u32(&mut bad, entry_at(b1, 14) + E_DATA_LENGTH, 1536);
        refix_entry(&mut bad, b1, 14);
        let e = err(&bad);
        assert!(
            matches!(e, HrlError::DataOverlapsMetadata { index: 14, .. }),
            "{e:?}"
        );

        // ... or stops short of it (checksum dropped so the gap rule is the one that fires).
        let mut bad = log.clone();
        set_u32(&mut bad, entry_at(b1, 14) + E_DATA_LENGTH, 512);
        set_u32(&mut bad, entry_at(b1, 14) + E_DATA_CHECKSUM, 0);
        refix_entry(&mut bad, b1, 14);
        let e = err(&bad);
        assert!(
            matches!(e, HrlError::DataGap { block_offset, data_end } if block_offset == b1 && data_end == b1 - 512),
            "{e:?}"
        );
    }

    // ---- properties ----

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        #[test]
        fn random_writes_apply_like_a_flat_image(
            ms_sectors in 1u32..4,
            max_sectors in 1u32..6,
            writes in prop::collection::vec((0u64..60, 1usize..12, any::<u8>()), 0..40),
        ) {
            const SIZE: usize = 72 * 512;
            let mut p = params(ms_sectors * 512);
            p.max_entry_length = max_sectors * 512;
            let writes: Vec<(u64, Vec<u8>)> = writes
                .into_iter()
                .map(|(sector, sectors, seed)| (sector * 512, pattern(sectors * 512, seed)))
                .collect();
            let log = build(p, &writes);
            let parsed = read_log(&log, SIZE as u64).unwrap();
            prop_assert_eq!(image_after(&log, &parsed, SIZE), flat_model(&writes, SIZE));
        }

        #[test]
        fn arbitrary_bytes_never_panic(mut bytes in prop::collection::vec(any::<u8>(), 0..9000), cookie in any::<bool>()) {
            if cookie && bytes.len() >= 4096 {
                bytes[..8].copy_from_slice(b"msctlog\0");
                set_u32(&mut bytes, H_VERSION, LOG_FORMAT_VERSION);
                refix_header(&mut bytes);
            }
            let _ = read_log(&bytes, 1 << 40);
        }

        #[test]
        fn flipped_logs_never_panic(
            flips in prop::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..8),
            refix in any::<bool>(),
        ) {
            let (mut log, _) = fixture();
            for (at, xor) in flips {
                let i = at.index(log.len());
                log[i] ^= xor;
            }
            if refix {
                refix_header(&mut log);
            }
            if let Ok(parsed) = read_log(&log, 1 << 40) {
                apply(&parsed, &log[..], |_, _| Ok(())).unwrap();
            }
        }
    }

    /// Writes writer-made seed logs for the fuzz target into `$HRL_SEED_DIR` (fuzz/seed.sh).
    #[test]
    #[ignore = "writes fuzz seeds; run through fuzz/seed.sh"]
    fn write_fuzz_seeds() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = std::env::var_os("HRL_SEED_DIR")
            .map_or_else(|| tmp.path().to_owned(), std::path::PathBuf::from);
        std::fs::create_dir_all(&dir).unwrap();
        let mut no_checksums = params(512);
        no_checksums.record_data_checksums = false;
        let mut split = params(1024);
        split.max_entry_length = 1024;
        let seeds = [
            ("empty.hrl", build(params(512), &[])),
            (
                "one-write.hrl",
                build(params(512), &[(4096, pattern(512, 1))]),
            ),
            ("three-blocks.hrl", fixture().0),
            (
                "no-data-checksums.hrl",
                build(
                    no_checksums,
                    &[(0, pattern(1024, 2)), (512, pattern(512, 3))],
                ),
            ),
            (
                "split.hrl",
                build(split, &[(0, pattern(4096, 4)), (1024, pattern(2048, 5))]),
            ),
        ];
        for (name, log) in seeds {
            assert!(read_log(&log, 1 << 40).is_ok(), "{name}");
            std::fs::write(dir.join(name), log).unwrap();
        }
    }
}

/// Why [`apply_to_raw`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("opening {path}")]
    Open {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a valid MS-HRL log for a {size}-byte disk")]
    NotALog {
        path: String,
        size: u64,
        #[source]
        source: HrlError,
    },
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error(transparent)]
    Hrl(#[from] HrlError),
}

/// Applies the log at `log_path` to the raw image at `image_path` in place (validated first,
/// fsynced after); returns (extents, bytes written).
pub fn apply_to_raw(
    log_path: &std::path::Path,
    image_path: &std::path::Path,
) -> Result<(u64, u64), ApplyError> {
    use std::os::unix::fs::FileExt;
    fn open(p: &std::path::Path) -> impl FnOnce(io::Error) -> ApplyError + '_ {
        move |source| ApplyError::Open {
            path: p.display().to_string(),
            source,
        }
    }
    let img = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(image_path)
        .map_err(open(image_path))?;
    let size = img.metadata()?.len();
    let f = std::fs::File::open(log_path).map_err(open(log_path))?;
    let log = read_log(&f, size).map_err(|source| ApplyError::NotALog {
        path: log_path.display().to_string(),
        size,
        source,
    })?;
    let mut bytes = 0u64;
    apply(&log, &f, |off, data| {
        bytes += data.len() as u64;
        img.write_all_at(data, off)
    })?;
    img.sync_all()?;
    Ok((log.extents.len() as u64, bytes))
}
