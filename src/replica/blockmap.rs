//! Block maps: a disk's content as one entry per fixed-size block.
//!
//! An entry is 64 bytes: the chunk name (32) and the plain BLAKE3 of the block (32, kept for
//! resync comparisons without reading chunks). An all-zero entry means "zero block, not stored".
//!
//! Stored in two levels so a new version of a large map rewrites only what changed:
//!
//! ```text
//! root (ObjectKind::MapRoot, plaintext):
//!   0  u32 map version (1)    4  u32 block size    8  u64 disk size    16 u64 entry count
//!   24 u32 segment count      28 u32 reserved 0    32  segment names, 32 bytes each
//!                                                      (all zero = an all-zero segment, not stored)
//! segment (ObjectKind::MapSegment): up to 1024 entries × 64 bytes
//! ```
//!
//! Roots and segments are content-addressed (`ChunkName::derive_meta`), so identical segments
//! are stored once, and loading checks that the content still derives its name.

use crate::chunk::pipeline::ChunkError;
use crate::chunk::seal::SealError;
use crate::chunk::{ChunkName, ChunkStore, PlainHash};
use crate::error::{Error, Result};
use crate::file_formats::{
    ObjectKind, MAP_ENTRY_LEN, MAP_ROOT_DOMAIN, MAP_SEGMENT_DOMAIN, MAP_SEGMENT_ENTRIES,
    MAP_VERSION,
};
use crate::vault::layout;

/// One block's entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapEntry {
    Zero,
    Data { name: ChunkName, hash: PlainHash },
}

impl MapEntry {
    fn to_bytes(self) -> [u8; MAP_ENTRY_LEN] {
        let mut b = [0u8; MAP_ENTRY_LEN];
        if let MapEntry::Data { name, hash } = self {
            b[..32].copy_from_slice(&name.0);
            b[32..].copy_from_slice(&hash.0);
        }
        b
    }

    fn from_bytes(b: &[u8]) -> MapEntry {
        let mut name = [0u8; 32];
        let mut hash = [0u8; 32];
        name.copy_from_slice(&b[..32]);
        hash.copy_from_slice(&b[32..64]);
        if name == [0u8; 32] {
            MapEntry::Zero
        } else {
            MapEntry::Data {
                name: ChunkName(name),
                hash: PlainHash(hash),
            }
        }
    }
}

/// A disk's block map in memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockMap {
    disk_size: u64,
    block_size: u32,
    entries: Vec<MapEntry>,
}

impl BlockMap {
    /// An all-zero disk.
    pub fn zeroed(disk_size: u64, block_size: u32) -> BlockMap {
        let n = block_count(disk_size, block_size);
        BlockMap {
            disk_size,
            block_size,
            entries: vec![MapEntry::Zero; n as usize],
        }
    }

    pub fn disk_size(&self) -> u64 {
        self.disk_size
    }

    /// The map of the disk grown to `disk_size`: the new blocks are zeros. The caller rewrites
    /// a short last block, which the larger size makes longer (its entry still names the
    /// short chunk).
    pub fn grown(&self, disk_size: u64) -> BlockMap {
        let mut m = self.clone();
        if disk_size > self.disk_size {
            m.disk_size = disk_size;
            m.entries.resize(
                block_count(disk_size, self.block_size) as usize,
                MapEntry::Zero,
            );
        }
        m
    }

    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    pub fn len(&self) -> u64 {
        self.entries.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn get(&self, index: u64) -> Option<MapEntry> {
        self.entries.get(usize::try_from(index).ok()?).copied()
    }

    pub fn set(&mut self, index: u64, e: MapEntry) -> Result<()> {
        let slot = usize::try_from(index)
            .ok()
            .and_then(|i| self.entries.get_mut(i));
        match slot {
            Some(s) => {
                *s = e;
                Ok(())
            }
            None => Err(Error::invalid(
                "block_out_of_range",
                format!(
                    "block {index} is past the map's {} blocks",
                    self.entries.len()
                ),
            )),
        }
    }

    pub fn entries(&self) -> impl Iterator<Item = (u64, MapEntry)> + '_ {
        self.entries.iter().enumerate().map(|(i, e)| (i as u64, *e))
    }

    /// Length in bytes of block `index` (the last block may be short).
    pub fn block_len(&self, index: u64) -> u64 {
        block_len(self.disk_size, self.block_size, index)
    }

    /// Writes the map's segments and root (create-only, content-addressed) and returns the
    /// root's name. Unchanged segments already in the store cost one create that finds them.
    pub async fn save(&self, chunks: &ChunkStore) -> Result<ChunkName> {
        let mut root =
            Vec::with_capacity(32 + 32 * self.entries.len().div_ceil(MAP_SEGMENT_ENTRIES));
        root.extend_from_slice(&MAP_VERSION.to_le_bytes());
        root.extend_from_slice(&self.block_size.to_le_bytes());
        root.extend_from_slice(&self.disk_size.to_le_bytes());
        root.extend_from_slice(&(self.entries.len() as u64).to_le_bytes());
        let segs = self.entries.chunks(MAP_SEGMENT_ENTRIES);
        root.extend_from_slice(&(segs.len() as u32).to_le_bytes());
        root.extend_from_slice(&0u32.to_le_bytes());
        for seg in self.entries.chunks(MAP_SEGMENT_ENTRIES) {
            if seg.iter().all(|e| *e == MapEntry::Zero) {
                root.extend_from_slice(&[0u8; 32]);
                continue;
            }
            let mut plain = Vec::with_capacity(seg.len() * MAP_ENTRY_LEN);
            for e in seg {
                plain.extend_from_slice(&e.to_bytes());
            }
            let name = ChunkName::derive_meta(chunks.keys().name_key(), MAP_SEGMENT_DOMAIN, &plain);
            chunks
                .put_sealed_if_absent(
                    ObjectKind::MapSegment,
                    &layout::map_object(&name),
                    plain,
                    true,
                )
                .await?;
            root.extend_from_slice(&name.0);
        }
        let name = ChunkName::derive_meta(chunks.keys().name_key(), MAP_ROOT_DOMAIN, &root);
        chunks
            .put_sealed_if_absent(ObjectKind::MapRoot, &layout::map_object(&name), root, true)
            .await?;
        Ok(name)
    }

    /// Loads and verifies a map by its root name.
    pub async fn load(chunks: &ChunkStore, root_name: &ChunkName) -> Result<BlockMap> {
        let root = MapRoot::load(chunks, root_name).await?;
        // The count is the root's claim: reserve at most what a 4 TiB disk of 4 MiB blocks
        // needs up front and let the segments, each checked as it loads, grow it from there.
        let mut entries =
            Vec::with_capacity(usize::try_from(root.entry_count).unwrap_or(0).min(1 << 20));
        for s in 0..root.segments.len() {
            entries.extend(root.load_segment(chunks, s).await?);
        }
        Ok(BlockMap {
            disk_size: root.disk_size,
            block_size: root.block_size,
            entries,
        })
    }
}

/// A map root as stored: the disk's geometry and the names of its segments. Verify and garbage
/// collection walk maps through it object by object (a damaged segment does not hide the others).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapRoot {
    pub name: ChunkName,
    pub block_size: u32,
    pub disk_size: u64,
    pub entry_count: u64,
    /// One per segment; `None` for an all-zero segment (never stored).
    pub segments: Vec<Option<ChunkName>>,
}

impl MapRoot {
    /// Loads a root (tag, name) and checks its geometry.
    pub async fn load(chunks: &ChunkStore, name: &ChunkName) -> Result<MapRoot> {
        let root = load_meta(chunks, ObjectKind::MapRoot, MAP_ROOT_DOMAIN, name).await?;
        MapRoot::parse(name, &root)
    }

    /// Parses and validates a root's plaintext (layout in the module docs).
    fn parse(name: &ChunkName, root: &[u8]) -> Result<MapRoot> {
        let corrupt = |why: String| {
            Error::Corrupt(SealError::BadPayload {
                name: layout::map_object(name).to_string(),
                reason: why,
            })
        };
        if root.len() < 32 {
            return Err(corrupt("root shorter than its header".into()));
        }
        let u32_at = |o: usize| u32::from_le_bytes(crate::format::array_at(root, o));
        let u64_at = |o: usize| u64::from_le_bytes(crate::format::array_at(root, o));
        if u32_at(0) != MAP_VERSION {
            return Err(corrupt(format!("unknown map version {}", u32_at(0))));
        }
        let block_size = u32_at(4);
        let disk_size = u64_at(8);
        let count = u64_at(16);
        let seg_count = u32_at(24) as usize;
        if block_size == 0
            || count != block_count(disk_size, block_size)
            || seg_count != (count as usize).div_ceil(MAP_SEGMENT_ENTRIES)
            || root.len() != 32 + 32 * seg_count
            || u32_at(28) != 0
        {
            return Err(corrupt("inconsistent geometry".into()));
        }
        let segments = root[32..]
            .chunks_exact(32)
            .map(|c| {
                let n: [u8; 32] = crate::format::array_at(c, 0);
                (n != [0u8; 32]).then_some(ChunkName(n))
            })
            .collect();
        Ok(MapRoot {
            name: *name,
            block_size,
            disk_size,
            entry_count: count,
            segments,
        })
    }

    /// Entries segment `s` holds (the last segment may be short).
    pub fn segment_entries(&self, s: usize) -> usize {
        (self.entry_count as usize)
            .saturating_sub(s * MAP_SEGMENT_ENTRIES)
            .min(MAP_SEGMENT_ENTRIES)
    }

    /// The entries of segment `s`, verified (tag, name, length).
    pub async fn load_segment(&self, chunks: &ChunkStore, s: usize) -> Result<Vec<MapEntry>> {
        let want = self.segment_entries(s);
        let Some(name) = self.segments.get(s).copied().flatten() else {
            return Ok(vec![MapEntry::Zero; want]);
        };
        let seg = load_meta(chunks, ObjectKind::MapSegment, MAP_SEGMENT_DOMAIN, &name).await?;
        if seg.len() != want * MAP_ENTRY_LEN {
            return Err(Error::Corrupt(SealError::BadPayload {
                name: layout::map_object(&name).to_string(),
                reason: format!(
                    "segment {s} of root {} holds {} bytes, expected {}",
                    self.name.to_hex(),
                    seg.len(),
                    want * MAP_ENTRY_LEN
                ),
            }));
        }
        Ok(seg
            .chunks_exact(MAP_ENTRY_LEN)
            .map(MapEntry::from_bytes)
            .collect())
    }
}

async fn load_meta(
    chunks: &ChunkStore,
    kind: ObjectKind,
    domain: &str,
    name: &ChunkName,
) -> Result<Vec<u8>> {
    let key = layout::map_object(name);
    let plain = chunks.get_sealed(kind, &key).await?;
    if !ChunkName::derive_meta(chunks.keys().name_key(), domain, &plain).ct_eq(name) {
        return Err(ChunkError::Corrupt(SealError::ContentMismatch {
            name: key.to_string(),
        })
        .into());
    }
    Ok(plain)
}

/// Number of blocks of a disk.
pub fn block_count(disk_size: u64, block_size: u32) -> u64 {
    disk_size.div_ceil(block_size as u64)
}

/// Length of block `index` of a disk (the last block may be short; past the end: 0).
pub fn block_len(disk_size: u64, block_size: u32, index: u64) -> u64 {
    let start = index.saturating_mul(block_size as u64);
    disk_size.saturating_sub(start).min(block_size as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::{CpuPool, KeyRing};
    use crate::store::Store;
    use std::sync::Arc;

    fn cs() -> ChunkStore {
        ChunkStore::new(
            Store::open("memory://", &[]).unwrap(),
            Arc::new(KeyRing::random()),
            CpuPool::new(2),
            1,
        )
    }

    #[test]
    fn geometry() {
        assert_eq!(block_count(0, 4096), 0);
        assert_eq!(block_count(4096, 4096), 1);
        assert_eq!(block_count(4097, 4096), 2);
        assert_eq!(block_len(4097, 4096, 1), 1);
        assert_eq!(block_len(4097, 4096, 2), 0);
    }

    #[tokio::test]
    async fn save_load_and_share_segments() {
        let cs = cs();
        let block = 64 * 1024u32;
        let size = block as u64 * 3000 + 512;
        let mut m = BlockMap::zeroed(size, block);
        for i in [0u64, 5, 1500, 3000] {
            let h = PlainHash::of(&i.to_le_bytes());
            m.set(
                i,
                MapEntry::Data {
                    name: ChunkName::derive(cs.keys().name_key(), &h, 1),
                    hash: h,
                },
            )
            .unwrap();
        }
        assert!(m.set(3001, MapEntry::Zero).is_err());
        let root = m.save(&cs).await.unwrap();
        let back = BlockMap::load(&cs, &root).await.unwrap();
        assert_eq!(back, m);
        let objects = cs
            .store()
            .list(&crate::store::Key::new(&["maps"]).unwrap())
            .await
            .unwrap()
            .len();
        // Change one block in segment 1: only that segment and the root are new.
        m.set(1500, MapEntry::Zero).unwrap();
        let root2 = m.save(&cs).await.unwrap();
        assert_ne!(root, root2);
        let objects2 = cs
            .store()
            .list(&crate::store::Key::new(&["maps"]).unwrap())
            .await
            .unwrap()
            .len();
        assert_eq!(
            objects2,
            objects + 1,
            "segment 1 became all-zero (not stored), new root stored"
        );
        assert_eq!(
            BlockMap::load(&cs, &root)
                .await
                .unwrap()
                .get(1500)
                .map(|e| e != MapEntry::Zero),
            Some(true)
        );
    }

    #[tokio::test]
    async fn damaged_segment_is_reported() {
        let cs = cs();
        let mut m = BlockMap::zeroed(64 * 1024 * 10, 64 * 1024);
        let h = PlainHash::of(b"x");
        m.set(
            3,
            MapEntry::Data {
                name: ChunkName::derive(cs.keys().name_key(), &h, 1),
                hash: h,
            },
        )
        .unwrap();
        let root = m.save(&cs).await.unwrap();
        let maps = cs
            .store()
            .list(&crate::store::Key::new(&["maps"]).unwrap())
            .await
            .unwrap();
        for l in &maps {
            if l.key != layout::map_object(&root) {
                let mut raw = cs.store().get(&l.key).await.unwrap().to_vec();
                let last = raw.len() - 1;
                raw[last] ^= 1;
                cs.store().put(&l.key, raw.into()).await.unwrap();
            }
        }
        assert!(matches!(
            BlockMap::load(&cs, &root).await,
            Err(Error::Corrupt(_))
        ));
    }
}
