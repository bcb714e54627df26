//! Every magic number and derivation context of drvault's own formats, in one registry.
//!
//! **Do not change any value here**: each one is written into vaults that must stay readable.
//! A format change gets a new version number next to the old one, and readers keep both.
//! Outside formats (MS-HRL, VHD, VHDX) keep their constants in their own modules under
//! `format/`, next to the specification text they come from.

/// First four bytes of every sealed object: "DRVS" (DR Vault Sealed).
pub const SEALED_MAGIC: [u8; 4] = *b"DRVS";
/// Version of the sealed-object framing (header layout, associated data, algorithms).
pub const SEALED_VERSION: u8 = 1;
/// Size of the sealed-object header (see `chunk::seal`).
pub const SEALED_HEADER_LEN: usize = 32;
/// AES-256-GCM tag length.
pub const SEALED_TAG_LEN: usize = 16;

/// What a sealed object holds; part of the authenticated header, so an object of one kind can
/// never be opened as another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ObjectKind {
    /// One disk block (plaintext up to the block size).
    Chunk = 1,
    /// A block-map root: disk geometry plus the names of its segments.
    MapRoot = 2,
    /// A block-map segment: up to `MAP_SEGMENT_ENTRIES` block entries.
    MapSegment = 3,
    /// A versioned record (JSON): VM, disk, job, registry.
    Record = 4,
    /// A receipt for one block received during a replication session.
    Receipt = 5,
    /// One frame of a stored change log.
    LogFrame = 6,
    /// One piece of a block (a 4 KiB-aligned range), sealed on its own inside a pack.
    Piece = 7,
}

impl ObjectKind {
    /// Every kind, in tag order.
    pub const ALL: [ObjectKind; 7] = [
        ObjectKind::Chunk,
        ObjectKind::MapRoot,
        ObjectKind::MapSegment,
        ObjectKind::Record,
        ObjectKind::Receipt,
        ObjectKind::LogFrame,
        ObjectKind::Piece,
    ];

    pub fn from_u8(v: u8) -> Option<ObjectKind> {
        Some(match v {
            1 => ObjectKind::Chunk,
            2 => ObjectKind::MapRoot,
            3 => ObjectKind::MapSegment,
            4 => ObjectKind::Record,
            5 => ObjectKind::Receipt,
            6 => ObjectKind::LogFrame,
            7 => ObjectKind::Piece,
            _ => return None,
        })
    }
}

/// Header flag: the payload is zstd-compressed.
pub const FLAG_ZSTD: u8 = 0x01;

/// Entries per block-map segment: 1024 × 64 bytes = 64 KiB of plaintext per segment, so a new map
/// version rewrites only the segments whose blocks changed.
pub const MAP_SEGMENT_ENTRIES: usize = 1024;
/// Bytes per block-map entry: chunk name (32, all zero for a zero block) + plain BLAKE3 (32).
pub const MAP_ENTRY_LEN: usize = 64;
/// Version of the block-map root layout: 1 is whole blocks only (every segment exactly
/// `entries × MAP_ENTRY_LEN` bytes); 2 adds layered entries (a base plus pieces) in a trailer after a
/// segment's entries. A map without pieces is still written as version 1.
pub const MAP_VERSION: u32 = 1;
pub const MAP_VERSION_LAYERED: u32 = 2;
/// Bytes per piece reference in a version-2 segment: pack name (32, all zero for a zero piece) ‖
/// offset in the block u32 ‖ length u32 ‖ offset in the pack u32 ‖ sealed length u32 ‖ plain BLAKE3
/// of the piece (32).
pub const MAP_PIECE_LEN: usize = 80;
/// Header of a layered entry in a version-2 segment trailer: index in the segment u32 ‖ piece
/// count u32 ‖ plain BLAKE3 of the whole block (32; all zero = not known).
pub const MAP_LAYERED_HEADER: usize = 40;
/// Most pieces one layered entry may hold (a bound on what a crafted segment can claim; merge
/// compacts far earlier, at `COMPACT_PIECES`).
pub const MAP_MAX_PIECES: usize = 1024;

/// Piece granularity: piece offsets and lengths are multiples of it (except a piece ending at a
/// short last block's end).
pub const PIECE_ALIGN: u32 = 4096;
/// A pack is closed once its sealed pieces reach this size (a few MiB: one PUT carries many
/// pieces, and a range read fetches one).
pub const PACK_TARGET_BYTES: usize = 4 * 1024 * 1024;
/// Prefix of the associated-data name a piece is sealed under: `piece/<64 hex>`, the hex of the
/// piece's content name (`ChunkName::derive` of its plain BLAKE3 and length).
pub const PIECE_AAD_PREFIX: &str = "piece/";

/// BLAKE3 `derive_key` contexts (globally unique, hard-coded, application-specific, as BLAKE3
/// asks). Each derives one 32-byte key from a master key.
pub const KDF_CHUNK_NAME: &str = "drvault 2026-11-26 chunk name v1";
pub const KDF_SEAL: &str = "drvault 2026-11-26 AES-256-GCM seal v1";
pub const KDF_IDENT: &str = "drvault 2026-11-26 object identifiers v1";
pub const KDF_TOKEN: &str = "drvault 2026-11-26 token digest v1";

/// Largest plaintext any sealed object may claim; bounds every decompression (a crafted object
/// cannot make the server allocate more than this).
pub const MAX_SEALED_PLAINTEXT: u64 = 64 * 1024 * 1024;
/// zstd window limit on decompression (2^27 = 128 MiB is zstd's default maximum for level ≤ 19;
/// our writer uses far less), so a crafted frame cannot demand a larger window.
pub const ZSTD_WINDOW_LOG_MAX: u32 = 27;

/// Block size bounds: a power of two between 64 KiB and 64 MiB; 4 MiB by default (the same
/// fixed-index granularity as Proxmox Backup Server).
pub const DEFAULT_BLOCK_SIZE: u32 = 4 * 1024 * 1024;
pub const MIN_BLOCK_SIZE: u32 = 64 * 1024;
pub const MAX_BLOCK_SIZE: u32 = 64 * 1024 * 1024;

/// Largest disk a VM may protect (4 TiB, the prerequisite).
pub const MAX_DISK_SIZE: u64 = 4 * 1024 * 1024 * 1024 * 1024;

/// Plaintext bytes per stored frame of a change log: any byte range of a log is read back by
/// opening at most ⌈len / frame⌉ + 1 frames, never the whole log.
pub const LOG_FRAME_LEN: usize = 1024 * 1024;
/// Bytes per extent-index entry: disk offset u64, length u32, log offset u64 (little-endian).
pub const EXTENT_ENTRY_LEN: usize = 20;

/// Object keys of content-addressed objects (`chunks/`, `maps/`) fan out by the first this many
/// hex digits of the name: 4096 directories, so no directory of the local backend grows huge.
pub const KEY_FANOUT_HEX: usize = 3;

/// Domain tags of the names of block-map objects (`ChunkName::derive_meta`): a map object's name
/// can never collide with a chunk name or with the other kind of map object.
pub const MAP_SEGMENT_DOMAIN: &str = "map-segment";
pub const MAP_ROOT_DOMAIN: &str = "map-root";

/// Resync and failback patches (`replica::patch`): the fine comparison's granularity, the bytes
/// of one fine hash (BLAKE3 truncated), and the record framing
/// `op u8 | offset u32 LE | length u32 LE | [data]` with its two operations.
pub const PATCH_FINE: usize = 4096;
pub const PATCH_FINE_HASH_LEN: usize = 16;
pub const PATCH_RECORD_HEADER: usize = 9;
pub const PATCH_OP_DATA: u8 = 0;
pub const PATCH_OP_ZERO: u8 = 1;

/// Receipt plaintext (`stage/…` objects): chunk name (32, zero for a zero block) ‖ plain hash
/// (32) ‖ length (u64 LE).
pub const RECEIPT_LEN: usize = 72;

/// Domains of the keyed identifiers (`KeyRing::ident`) that name records: a VM's record id, a
/// disk's (of `"<vm>\0<disk>"`), a recovery plan's.
pub const IDENT_VM: &str = "vm";
pub const IDENT_DISK: &str = "disk";
pub const IDENT_PLAN: &str = "plan";

/// Vault format this release writes and understands. 1: one server per vault (what
/// `vault/keycheck` of older vaults says); 2: records carry lease fences, so a server that does
/// not fence (any release reading only format 1) must not write a vault a format-2 server used.
pub const VAULT_FORMAT: u64 = 2;
/// Oldest vault format this release opens, upgrading it to [`VAULT_FORMAT`] at start.
pub const VAULT_FORMAT_OLDEST: u64 = 1;
