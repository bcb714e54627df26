//! Writing dynamic VHDX files: what Hyper-V needs to take a disk back (export, failback).
//!
//! Layout of a written file (every region 1 MiB-aligned, as the reader checks):
//! - 0: file type identifier (`vhdxfile`, creator "drvault"); 64 KiB and 128 KiB: the two
//!   headers, sequence numbers 1 and 2 (the second is current), log GUID zero: the log is
//!   empty, so nothing is ever replayed; 192 KiB and 256 KiB: two identical region tables;
//! - 1 MiB: the log, 1 MiB of zeros (a hole);
//! - 2 MiB: the metadata region (table + file parameters, virtual disk size, page 83 id,
//!   logical sector size 512, physical sector size 4096);
//! - 3 MiB: the BAT, rounded up to whole MiB;
//! - after it: payload blocks, each allocated the first time a write with non-zero data touches
//!   it, in the order writes arrive. Blocks never touched, or touched only by zeros, stay "not
//!   present" and cost no space: a sparse disk gives a small file.
//!
//! Writes may come from many threads in any order ([`VhdxWriter::write_at`] takes `&self`); the
//! structures that name the data (BAT, metadata, region tables, headers, identifier) are written
//! by [`VhdxWriter::finish`], the identifier last, so an interrupted file never opens as a VHDX.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Mutex;

use super::{
    crc_without_field, Guid, BAT_REGION, FILE_IDENTIFIER, FILE_PARAMETERS, HEADER_OFFSETS,
    HEADER_SIGNATURE, HEADER_SIZE, LOGICAL_SECTOR_SIZE, METADATA_REGION, METADATA_SIGNATURE,
    METADATA_TABLE_SIZE, MIB, PHYSICAL_SECTOR_SIZE, REGION_SIGNATURE, REGION_TABLE_OFFSETS,
    REGION_TABLE_SIZE, SECTORS_PER_BITMAP_BLOCK, STATE_FULLY_PRESENT, VIRTUAL_DISK_ID,
    VIRTUAL_DISK_SIZE,
};

const LOG_OFFSET: u64 = MIB;
const LOG_LENGTH: u64 = MIB;
const METADATA_OFFSET: u64 = 2 * MIB;
const METADATA_LENGTH: u64 = MIB;
const BAT_OFFSET: u64 = 3 * MIB;
const LOGICAL_SECTOR: u32 = 512;
/// What Hyper-V reports for disks on current storage; guests align their I/O to it.
const PHYSICAL_SECTOR: u32 = 4096;
/// Block sizes the specification allows.
const MIN_BLOCK: u32 = 1024 * 1024;
const MAX_BLOCK: u32 = 256 * 1024 * 1024;
/// The specification's limit on the virtual size (64 TiB).
const MAX_SIZE: u64 = 64 * 1024 * 1024 * MIB;

/// Why a VHDX cannot be written.
#[derive(Debug, thiserror::Error)]
pub enum VhdxWriteError {
    #[error("a VHDX cannot hold a disk of {0} bytes: the size must be a non-zero multiple of 512 bytes, at most 64 TiB")]
    BadSize(u64),
    #[error("VHDX block size {0}: must be a power of two from 1 MiB to 256 MiB")]
    BadBlockSize(u32),
    #[error("write of {len} bytes at {offset} is outside the {size}-byte disk")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// The VHDX block size for a disk kept in `source_block` blocks: the same where VHDX allows it
/// (so one source block is one VHDX block, allocated or not as a whole), else the nearest
/// allowed size.
pub fn block_size_for(source_block: u32) -> u32 {
    source_block
        .checked_next_power_of_two()
        .unwrap_or(MAX_BLOCK)
        .clamp(MIN_BLOCK, MAX_BLOCK)
}

/// Where the payload block allocations stand.
struct Allocation {
    /// File offset of each payload block, 0 while not present.
    blocks: Vec<u64>,
    /// Where the next block goes (end of the file's data).
    next: u64,
}

/// A dynamic VHDX being written; see the module documentation.
pub struct VhdxWriter {
    file: File,
    virtual_size: u64,
    block_size: u32,
    alloc: Mutex<Allocation>,
}

impl VhdxWriter {
    /// Starts a dynamic VHDX of `virtual_size` bytes in `file` (empty, opened for writing).
    pub fn new(file: File, virtual_size: u64, block_size: u32) -> Result<Self, VhdxWriteError> {
        if virtual_size == 0
            || virtual_size % u64::from(LOGICAL_SECTOR) != 0
            || virtual_size > MAX_SIZE
        {
            return Err(VhdxWriteError::BadSize(virtual_size));
        }
        if !block_size.is_power_of_two() || !(MIN_BLOCK..=MAX_BLOCK).contains(&block_size) {
            return Err(VhdxWriteError::BadBlockSize(block_size));
        }
        let blocks = virtual_size.div_ceil(u64::from(block_size));
        let count = usize::try_from(blocks).map_err(|_| VhdxWriteError::BadSize(virtual_size))?;
        let next = BAT_OFFSET + bat_length(virtual_size, block_size);
        file.set_len(0)?;
        Ok(VhdxWriter {
            file,
            virtual_size,
            block_size,
            alloc: Mutex::new(Allocation {
                blocks: vec![0; count],
                next,
            }),
        })
    }

    pub fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// Writes `data` at virtual `offset`. Parts that fall into blocks not allocated yet and are
    /// all zeros are skipped (those blocks read as zeros); any other part allocates its block.
    /// Writes to disjoint ranges may run concurrently.
    pub fn write_at(&self, data: &[u8], offset: u64) -> Result<(), VhdxWriteError> {
        let len = data.len() as u64;
        if offset
            .checked_add(len)
            .is_none_or(|end| end > self.virtual_size)
        {
            return Err(VhdxWriteError::OutOfRange {
                offset,
                len,
                size: self.virtual_size,
            });
        }
        let bs = u64::from(self.block_size);
        let mut done = 0usize;
        while done < data.len() {
            let pos = offset + done as u64;
            let within = pos % bs;
            let n = (data.len() - done).min((bs - within) as usize);
            let part = &data[done..done + n];
            let index = (pos / bs) as usize;
            if let Some(at) = self.block_offset(index, crate::chunk::digest::is_zero(part)) {
                self.file.write_all_at(part, at + within)?;
            }
            done += n;
        }
        Ok(())
    }

    /// The file offset of payload block `index`, allocating it unless `zeros` (data that need
    /// not be written to a block that is not there yet).
    fn block_offset(&self, index: usize, zeros: bool) -> Option<u64> {
        let mut a = self.alloc.lock().unwrap_or_else(|e| e.into_inner());
        let at = *a.blocks.get(index)?;
        if at != 0 {
            return Some(at);
        }
        if zeros {
            return None;
        }
        let at = a.next;
        a.next += u64::from(self.block_size);
        a.blocks[index] = at;
        Some(at)
    }

    /// Number of payload blocks holding data so far.
    pub fn allocated_blocks(&self) -> u64 {
        let a = self.alloc.lock().unwrap_or_else(|e| e.into_inner());
        a.blocks.iter().filter(|&&b| b != 0).count() as u64
    }

    /// Writes the metadata, BAT, region tables, headers and identifier, sizes the file to its
    /// last block and makes it durable. Returns the file.
    pub fn finish(self) -> Result<File, VhdxWriteError> {
        let Allocation { blocks, next } =
            self.alloc.into_inner().unwrap_or_else(|e| e.into_inner());
        let file = self.file;
        file.set_len(next)?;
        let bat = bat_bytes(&blocks, self.virtual_size, self.block_size);
        file.write_all_at(&bat, BAT_OFFSET)?;
        let mut disk_id = [0u8; 16];
        crate::util::fill_random(&mut disk_id);
        file.write_all_at(
            &metadata_region(self.virtual_size, self.block_size, Guid(disk_id)),
            METADATA_OFFSET,
        )?;
        let regions = region_table(bat_length(self.virtual_size, self.block_size));
        for at in REGION_TABLE_OFFSETS {
            file.write_all_at(&regions, at)?;
        }
        let (mut file_write, mut data_write) = ([0u8; 16], [0u8; 16]);
        crate::util::fill_random(&mut file_write);
        crate::util::fill_random(&mut data_write);
        for (seq, at) in (1u64..).zip(HEADER_OFFSETS) {
            file.write_all_at(&header(seq, Guid(file_write), Guid(data_write)), at)?;
        }
        file.sync_data()?;
        // The identifier last: until it is there, nothing takes the file for a VHDX.
        file.write_all_at(&identifier(), 0)?;
        file.sync_all()?;
        Ok(file)
    }
}

/// Payload blocks per sector-bitmap block.
fn chunk_ratio(block_size: u32) -> u64 {
    SECTORS_PER_BITMAP_BLOCK * u64::from(LOGICAL_SECTOR) / u64::from(block_size)
}

/// BAT entries of a non-differencing disk: a sector-bitmap entry after every full chunk.
fn bat_entries(virtual_size: u64, block_size: u32) -> u64 {
    let blocks = virtual_size.div_ceil(u64::from(block_size));
    blocks + (blocks - 1) / chunk_ratio(block_size)
}

fn bat_length(virtual_size: u64, block_size: u32) -> u64 {
    (bat_entries(virtual_size, block_size) * 8).div_ceil(MIB) * MIB
}

fn bat_bytes(blocks: &[u64], virtual_size: u64, block_size: u32) -> Vec<u8> {
    let ratio = chunk_ratio(block_size);
    let mut out = vec![0u8; (bat_entries(virtual_size, block_size) * 8) as usize];
    for (i, &at) in blocks.iter().enumerate() {
        if at == 0 {
            continue; // not present (state 0): reads as zeros
        }
        let i = i as u64;
        let entry_index = (i + i / ratio) as usize;
        let entry = u64::from(STATE_FULLY_PRESENT) | ((at / MIB) << 20);
        out[entry_index * 8..entry_index * 8 + 8].copy_from_slice(&entry.to_le_bytes());
    }
    out
}

fn identifier() -> Vec<u8> {
    let mut out = vec![0u8; 8 + 512];
    out[..8].copy_from_slice(&FILE_IDENTIFIER);
    for (i, unit) in "drvault".encode_utf16().enumerate() {
        out[8 + 2 * i..10 + 2 * i].copy_from_slice(&unit.to_le_bytes());
    }
    out
}

fn header(sequence: u64, file_write: Guid, data_write: Guid) -> Vec<u8> {
    let mut h = vec![0u8; HEADER_SIZE];
    h[0..4].copy_from_slice(&HEADER_SIGNATURE);
    h[8..16].copy_from_slice(&sequence.to_le_bytes());
    h[16..32].copy_from_slice(&file_write.0);
    h[32..48].copy_from_slice(&data_write.0);
    // 48..64: log GUID zero (empty log); 64: log version 0.
    h[66..68].copy_from_slice(&1u16.to_le_bytes());
    h[68..72].copy_from_slice(&(LOG_LENGTH as u32).to_le_bytes());
    h[72..80].copy_from_slice(&LOG_OFFSET.to_le_bytes());
    let crc = crc_without_field(&h);
    h[4..8].copy_from_slice(&crc.to_le_bytes());
    h
}

fn region_table(bat_len: u64) -> Vec<u8> {
    let mut t = vec![0u8; REGION_TABLE_SIZE];
    t[0..4].copy_from_slice(&REGION_SIGNATURE);
    t[8..12].copy_from_slice(&2u32.to_le_bytes());
    for (i, (guid, offset, len)) in [
        (BAT_REGION, BAT_OFFSET, bat_len),
        (METADATA_REGION, METADATA_OFFSET, METADATA_LENGTH),
    ]
    .into_iter()
    .enumerate()
    {
        let at = 16 + 32 * i;
        t[at..at + 16].copy_from_slice(&guid.0);
        t[at + 16..at + 24].copy_from_slice(&offset.to_le_bytes());
        t[at + 24..at + 28].copy_from_slice(&(len as u32).to_le_bytes());
        t[at + 28..at + 32].copy_from_slice(&1u32.to_le_bytes()); // required
    }
    let crc = crc_without_field(&t);
    t[4..8].copy_from_slice(&crc.to_le_bytes());
    t
}

fn metadata_region(virtual_size: u64, block_size: u32, disk_id: Guid) -> Vec<u8> {
    const IS_VIRTUAL_DISK: u32 = 2;
    const IS_REQUIRED: u32 = 4;
    let mut file_parameters = [0u8; 8];
    file_parameters[..4].copy_from_slice(&block_size.to_le_bytes());
    // flags 0: blocks may be left unallocated (dynamic), no parent.
    let items: [(Guid, u32, Vec<u8>); 5] = [
        (FILE_PARAMETERS, IS_REQUIRED, file_parameters.to_vec()),
        (
            VIRTUAL_DISK_SIZE,
            IS_VIRTUAL_DISK | IS_REQUIRED,
            virtual_size.to_le_bytes().to_vec(),
        ),
        (
            VIRTUAL_DISK_ID,
            IS_VIRTUAL_DISK | IS_REQUIRED,
            disk_id.0.to_vec(),
        ),
        (
            LOGICAL_SECTOR_SIZE,
            IS_VIRTUAL_DISK | IS_REQUIRED,
            LOGICAL_SECTOR.to_le_bytes().to_vec(),
        ),
        (
            PHYSICAL_SECTOR_SIZE,
            IS_VIRTUAL_DISK | IS_REQUIRED,
            PHYSICAL_SECTOR.to_le_bytes().to_vec(),
        ),
    ];
    let mut m = vec![0u8; METADATA_TABLE_SIZE + 64];
    m[0..8].copy_from_slice(&METADATA_SIGNATURE);
    m[10..12].copy_from_slice(&(items.len() as u16).to_le_bytes());
    let mut data_at = METADATA_TABLE_SIZE;
    for (i, (guid, flags, data)) in items.iter().enumerate() {
        let at = 32 + 32 * i;
        m[at..at + 16].copy_from_slice(&guid.0);
        m[at + 16..at + 20].copy_from_slice(&(data_at as u32).to_le_bytes());
        m[at + 20..at + 24].copy_from_slice(&(data.len() as u32).to_le_bytes());
        m[at + 24..at + 28].copy_from_slice(&flags.to_le_bytes());
        m[data_at..data_at + data.len()].copy_from_slice(data);
        data_at += data.len();
    }
    m
}

#[cfg(test)]
mod tests {
    use super::super::VhdxDisk;
    use super::*;
    use std::sync::Arc;

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8 ^ seed | 1).collect()
    }

    #[test]
    fn written_file_reads_back_with_only_data_blocks_allocated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.vhdx");
        let size = 40 * MIB + 512 * 3;
        let w = VhdxWriter::new(File::create(&path).unwrap(), size, MIB as u32).unwrap();
        let a = pattern(300_000, 7);
        let b = pattern(4096, 9);
        // Out of order, across a block boundary, a zero write that allocates nothing, and the
        // disk's short last block.
        w.write_at(&a, 5 * MIB - 1000).unwrap();
        w.write_at(&vec![0u8; MIB as usize], 20 * MIB).unwrap();
        w.write_at(&b, size - 4096).unwrap();
        // Blocks 4 and 5 (a), 39 and 40 (b ends 1536 bytes into the short last block).
        assert_eq!(w.allocated_blocks(), 4);
        assert!(matches!(
            w.write_at(&b, size - 512),
            Err(VhdxWriteError::OutOfRange { .. })
        ));
        w.finish().unwrap();

        let disk = VhdxDisk::open(Arc::new(File::open(&path).unwrap())).unwrap();
        assert!(!disk.is_fixed() && !disk.log_replayed());
        assert_eq!(disk.virtual_size(), size);
        let mut all = vec![0u8; size as usize];
        disk.read_at(&mut all, 0).unwrap();
        let mut expect = vec![0u8; size as usize];
        expect[(5 * MIB - 1000) as usize..][..a.len()].copy_from_slice(&a);
        expect[(size - 4096) as usize..].copy_from_slice(&b);
        assert!(all == expect, "contents differ");
        assert_eq!(
            disk.allocated_ranges(),
            vec![4 * MIB..6 * MIB, 39 * MIB..size]
        );
        // Header section, log, metadata and BAT take 4 MiB; then the four 1 MiB blocks.
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 8 * MIB);
    }

    #[test]
    fn bad_sizes_are_refused() {
        let f = || tempfile::tempfile().unwrap();
        for size in [0, 511, MAX_SIZE + 512] {
            assert!(matches!(
                VhdxWriter::new(f(), size, MIB as u32),
                Err(VhdxWriteError::BadSize(_))
            ));
        }
        for bs in [512 * 1024, 3 * MIB as u32, 512 * MIB as u32] {
            assert!(matches!(
                VhdxWriter::new(f(), MIB, bs),
                Err(VhdxWriteError::BadBlockSize(_))
            ));
        }
        assert_eq!(block_size_for(65536), MIB as u32);
        assert_eq!(block_size_for(4 * MIB as u32), 4 * MIB as u32);
    }

    #[test]
    fn many_blocks_cross_a_sector_bitmap_entry() {
        // 1 MiB blocks: chunk ratio 4096, so block 4096 sits after the first bitmap entry.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.vhdx");
        let size = 4100 * MIB;
        let w = VhdxWriter::new(File::create(&path).unwrap(), size, MIB as u32).unwrap();
        let d = pattern(8192, 3);
        w.write_at(&d, 4097 * MIB + 10).unwrap();
        w.finish().unwrap();
        let disk = VhdxDisk::open(Arc::new(File::open(&path).unwrap())).unwrap();
        let mut got = vec![0u8; 8192];
        disk.read_at(&mut got, 4097 * MIB + 10).unwrap();
        assert!(got == d);
        assert_eq!(disk.allocated_ranges(), vec![4097 * MIB..4098 * MIB]);
    }
}
