//! Block maps: a disk's content as one entry per fixed-size block.
//!
//! An entry is 64 bytes: the chunk name (32) and the plain BLAKE3 of the block (32, kept for
//! resync comparisons without reading chunks). An all-zero entry means "zero block, not stored".
//!
//! An entry may be *layered*: that base (a chunk, or zero) plus an ordered list of pieces,
//! 4 KiB-aligned ranges inside the block whose bytes replace the base's there, later pieces over
//! earlier ones ([`Layers`], stored by [`crate::replica::pieces`]). A layered entry's 64 bytes
//! keep naming its base chunk and that chunk's hash; the hash of the block as it reads may be
//! unknown (computing it needs the base), so [`BlockMap::content_hash`] is `None` for it until
//! someone read the block.
//!
//! Stored in two levels so a new version of a large map rewrites only what changed:
//!
//! ```text
//! root (ObjectKind::MapRoot, plaintext):
//!   0  u32 map version (1, or 2 with layered entries)   4  u32 block size
//!   8  u64 disk size    16 u64 entry count    24 u32 segment count      28 u32 reserved 0
//!   32  segment names, 32 bytes each (all zero = an all-zero segment, not stored)
//! segment (ObjectKind::MapSegment): up to 1024 entries × 64 bytes, then in version 2 and only
//!   when the segment holds layered entries, a trailer:
//!   u32 layered count, per layered entry (index order): u32 index in the segment, u32 piece
//!   count, 32 block hash (zero = unknown), then its pieces, 80 bytes each: pack name (32, zero
//!   for a zero piece) ‖ u32 offset in block ‖ u32 length ‖ u32 offset in pack ‖ u32 sealed
//!   length ‖ plain BLAKE3 of the piece (32)
//! ```
//!
//! A segment without layered entries is byte for byte a version-1 segment, so unchanged regions
//! stay shared between maps of either version, and a map without pieces is written as version 1.
//!
//! Roots and segments are content-addressed (`ChunkName::derive_meta`), so identical segments
//! are stored once, and loading checks that the content still derives its name.

use crate::chunk::pipeline::ChunkError;
use crate::chunk::seal::SealError;
use crate::chunk::{ChunkName, ChunkStore, PlainHash};
use crate::error::{Error, Result};
use crate::file_formats::{
    ObjectKind, MAP_ENTRY_LEN, MAP_LAYERED_HEADER, MAP_MAX_PIECES, MAP_PIECE_LEN, MAP_ROOT_DOMAIN,
    MAP_SEGMENT_DOMAIN, MAP_SEGMENT_ENTRIES, MAP_VERSION, MAP_VERSION_LAYERED, PIECE_ALIGN,
};
use crate::store::PutOutcome;
use crate::vault::layout;
use bytes::Bytes;
use std::collections::BTreeMap;
use std::sync::Arc;

/// One piece of a layered block: `len` bytes at `at` in the block, sealed in a pack (or zeros).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PieceRef {
    /// The pack holding the sealed piece; `None` for a piece of zeros (not stored).
    pub pack: Option<ChunkName>,
    pub at: u32,
    pub len: u32,
    /// Where the sealed piece starts in the pack, and its sealed length.
    pub pack_offset: u32,
    pub sealed_len: u32,
    /// Plain BLAKE3 of the piece's bytes (checked on every read).
    pub hash: PlainHash,
}

impl PieceRef {
    pub fn end(&self) -> u32 {
        self.at + self.len
    }

    fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.pack.map(|n| n.0).unwrap_or([0u8; 32]));
        out.extend_from_slice(&self.at.to_le_bytes());
        out.extend_from_slice(&self.len.to_le_bytes());
        out.extend_from_slice(&self.pack_offset.to_le_bytes());
        out.extend_from_slice(&self.sealed_len.to_le_bytes());
        out.extend_from_slice(&self.hash.0);
    }

    fn read(b: &[u8]) -> PieceRef {
        let pack: [u8; 32] = crate::format::array_at(b, 0);
        let u32_at = |o: usize| u32::from_le_bytes(crate::format::array_at(b, o));
        PieceRef {
            pack: (pack != [0u8; 32]).then_some(ChunkName(pack)),
            at: u32_at(32),
            len: u32_at(36),
            pack_offset: u32_at(40),
            sealed_len: u32_at(44),
            hash: PlainHash(crate::format::array_at(b, 48)),
        }
    }
}

/// The pieces over a block's base, oldest first, and the block's hash when known.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Layers {
    pub pieces: Vec<PieceRef>,
    /// Plain BLAKE3 of the whole block as it reads (base with every piece applied).
    pub hash: Option<PlainHash>,
}

impl Layers {
    /// Bytes the pieces cover (overlaps counted once per piece: an upper bound).
    pub fn piece_bytes(&self) -> u64 {
        self.pieces.iter().map(|p| p.len as u64).sum()
    }
}

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
    /// Layered entries by block index (the base is in `entries`).
    layers: BTreeMap<u64, Arc<Layers>>,
}

impl BlockMap {
    /// An all-zero disk.
    pub fn zeroed(disk_size: u64, block_size: u32) -> BlockMap {
        let n = block_count(disk_size, block_size);
        BlockMap {
            disk_size,
            block_size,
            entries: vec![MapEntry::Zero; n as usize],
            layers: BTreeMap::new(),
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

    /// Block `index`'s base entry. A layered block reads as this base with its
    /// [`BlockMap::layers`] applied: readers that take the base for the content must check
    /// [`BlockMap::is_layered`] first.
    pub fn get(&self, index: u64) -> Option<MapEntry> {
        self.entries.get(usize::try_from(index).ok()?).copied()
    }

    /// The pieces over block `index`'s base, if it is layered.
    pub fn layers(&self, index: u64) -> Option<&Arc<Layers>> {
        self.layers.get(&index)
    }

    pub fn is_layered(&self, index: u64) -> bool {
        self.layers.contains_key(&index)
    }

    /// Every layered block, in index order.
    pub fn layered(&self) -> impl Iterator<Item = (u64, &Arc<Layers>)> + '_ {
        self.layers.iter().map(|(i, l)| (*i, l))
    }

    /// The plain hash of block `index` as it reads, where the map knows it: a whole data
    /// block's, or a layered block's once computed. `None` for zero blocks (their hash depends
    /// only on their length) and for layered blocks whose hash is unknown.
    pub fn content_hash(&self, index: u64) -> Option<PlainHash> {
        if let Some(l) = self.layers.get(&index) {
            return l.hash;
        }
        match self.get(index)? {
            MapEntry::Data { hash, .. } => Some(hash),
            MapEntry::Zero => None,
        }
    }

    /// Sets block `index` to `e` whole (any pieces over it are dropped).
    pub fn set(&mut self, index: u64, e: MapEntry) -> Result<()> {
        self.set_layered(index, e, None)
    }

    /// Sets block `index` to base `e` with `layers` over it (`None` or no pieces: whole).
    pub fn set_layered(&mut self, index: u64, e: MapEntry, layers: Option<Layers>) -> Result<()> {
        let slot = usize::try_from(index)
            .ok()
            .and_then(|i| self.entries.get_mut(i));
        match slot {
            Some(s) => {
                *s = e;
                match layers.filter(|l| !l.pieces.is_empty()) {
                    Some(l) => {
                        self.layers.insert(index, Arc::new(l));
                    }
                    None => {
                        self.layers.remove(&index);
                    }
                }
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
        Ok(self.save_counted(chunks).await?.0)
    }

    /// [`BlockMap::save`], also returning the bytes it stored (objects that existed cost 0).
    pub async fn save_counted(&self, chunks: &ChunkStore) -> Result<(ChunkName, u64)> {
        let version = if self.layers.is_empty() {
            MAP_VERSION
        } else {
            MAP_VERSION_LAYERED
        };
        let mut written = 0u64;
        let mut root =
            Vec::with_capacity(32 + 32 * self.entries.len().div_ceil(MAP_SEGMENT_ENTRIES));
        root.extend_from_slice(&version.to_le_bytes());
        root.extend_from_slice(&self.block_size.to_le_bytes());
        root.extend_from_slice(&self.disk_size.to_le_bytes());
        root.extend_from_slice(&(self.entries.len() as u64).to_le_bytes());
        let segs = self.entries.chunks(MAP_SEGMENT_ENTRIES);
        root.extend_from_slice(&(segs.len() as u32).to_le_bytes());
        root.extend_from_slice(&0u32.to_le_bytes());
        for (s, seg) in self.entries.chunks(MAP_SEGMENT_ENTRIES).enumerate() {
            let first = (s * MAP_SEGMENT_ENTRIES) as u64;
            let layered: Vec<(u64, &Arc<Layers>)> = self
                .layers
                .range(first..first + seg.len() as u64)
                .map(|(i, l)| (*i - first, l))
                .collect();
            if layered.is_empty() && seg.iter().all(|e| *e == MapEntry::Zero) {
                root.extend_from_slice(&[0u8; 32]);
                continue;
            }
            let mut plain = Vec::with_capacity(seg.len() * MAP_ENTRY_LEN);
            for e in seg {
                plain.extend_from_slice(&e.to_bytes());
            }
            if !layered.is_empty() {
                plain.extend_from_slice(&(layered.len() as u32).to_le_bytes());
                for (i, l) in layered {
                    plain.extend_from_slice(&(i as u32).to_le_bytes());
                    plain.extend_from_slice(&(l.pieces.len() as u32).to_le_bytes());
                    plain.extend_from_slice(&l.hash.map(|h| h.0).unwrap_or([0u8; 32]));
                    for p in &l.pieces {
                        p.write(&mut plain);
                    }
                }
            }
            let name = ChunkName::derive_meta(chunks.keys().name_key(), MAP_SEGMENT_DOMAIN, &plain);
            written += put_meta(chunks, ObjectKind::MapSegment, &name, plain).await?;
            root.extend_from_slice(&name.0);
        }
        let name = ChunkName::derive_meta(chunks.keys().name_key(), MAP_ROOT_DOMAIN, &root);
        written += put_meta(chunks, ObjectKind::MapRoot, &name, root).await?;
        Ok((name, written))
    }

    /// Loads and verifies a map by its root name.
    pub async fn load(chunks: &ChunkStore, root_name: &ChunkName) -> Result<BlockMap> {
        let root = MapRoot::load(chunks, root_name).await?;
        // The count is the root's claim: reserve at most what a 4 TiB disk of 4 MiB blocks
        // needs up front and let the segments, each checked as it loads, grow it from there.
        let mut entries =
            Vec::with_capacity(usize::try_from(root.entry_count).unwrap_or(0).min(1 << 20));
        let mut layers = BTreeMap::new();
        for s in 0..root.segments.len() {
            let seg = root.load_segment_layered(chunks, s).await?;
            let first = (s * MAP_SEGMENT_ENTRIES) as u64;
            layers.extend(
                seg.layers
                    .into_iter()
                    .map(|(i, l)| (first + i, Arc::new(l))),
            );
            entries.extend(seg.entries);
        }
        Ok(BlockMap {
            disk_size: root.disk_size,
            block_size: root.block_size,
            entries,
            layers,
        })
    }
}

/// A map root as stored: the disk's geometry and the names of its segments. Verify and garbage
/// collection walk maps through it object by object (a damaged segment does not hide the others).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapRoot {
    pub name: ChunkName,
    /// `MAP_VERSION` or `MAP_VERSION_LAYERED`.
    pub version: u32,
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
        let version = u32_at(0);
        if version != MAP_VERSION && version != MAP_VERSION_LAYERED {
            return Err(corrupt(format!("unknown map version {version}")));
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
            version,
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

    /// The base entries of segment `s`, verified (tag, name, length). Layered entries come
    /// back as their bases: readers of content use [`MapRoot::load_segment_layered`].
    pub async fn load_segment(&self, chunks: &ChunkStore, s: usize) -> Result<Vec<MapEntry>> {
        Ok(self.load_segment_layered(chunks, s).await?.entries)
    }

    /// Segment `s` whole: base entries and the layers of its layered entries (by index in the
    /// segment), verified (tag, name, length, trailer geometry).
    pub async fn load_segment_layered(&self, chunks: &ChunkStore, s: usize) -> Result<Segment> {
        let want = self.segment_entries(s);
        let Some(name) = self.segments.get(s).copied().flatten() else {
            return Ok(Segment {
                entries: vec![MapEntry::Zero; want],
                layers: Vec::new(),
            });
        };
        let seg = load_meta(chunks, ObjectKind::MapSegment, MAP_SEGMENT_DOMAIN, &name).await?;
        let corrupt = |reason: String| {
            Error::Corrupt(SealError::BadPayload {
                name: layout::map_object(&name).to_string(),
                reason,
            })
        };
        let base_len = want * MAP_ENTRY_LEN;
        let layered_ok = self.version == MAP_VERSION_LAYERED && seg.len() > base_len;
        if seg.len() != base_len && !layered_ok {
            return Err(corrupt(format!(
                "segment {s} of root {} holds {} bytes, expected {}",
                self.name.to_hex(),
                seg.len(),
                base_len
            )));
        }
        let entries = seg[..base_len]
            .chunks_exact(MAP_ENTRY_LEN)
            .map(MapEntry::from_bytes)
            .collect();
        let layers = if layered_ok {
            let first = (s * MAP_SEGMENT_ENTRIES) as u64;
            parse_layers(&seg[base_len..], want, |i| {
                block_len(self.disk_size, self.block_size, first + i as u64)
            })
            .map_err(|why| corrupt(format!("segment {s}: {why}")))?
        } else {
            Vec::new()
        };
        Ok(Segment { entries, layers })
    }
}

/// A segment as loaded: its base entries and its layered entries' pieces.
#[derive(Debug, Clone, Default)]
pub struct Segment {
    pub entries: Vec<MapEntry>,
    /// (index in the segment, layers), in index order.
    pub layers: Vec<(u64, Layers)>,
}

/// Parses a version-2 segment trailer (layout in the module docs). `block_len(i)`: the length
/// of the segment's block `i`, which every piece must lie within.
fn parse_layers(
    t: &[u8],
    entries: usize,
    block_len: impl Fn(usize) -> u64,
) -> std::result::Result<Vec<(u64, Layers)>, String> {
    let u32_at = |o: usize| -> std::result::Result<u32, String> {
        t.get(o..o + 4)
            .map(|b| u32::from_le_bytes(crate::format::array_at(b, 0)))
            .ok_or_else(|| "trailer cut short".to_string())
    };
    let count = u32_at(0)? as usize;
    if count == 0 || count > entries {
        return Err(format!("{count} layered entries in a segment of {entries}"));
    }
    let mut out = Vec::with_capacity(count);
    let mut pos = 4usize;
    let mut last: Option<usize> = None;
    for _ in 0..count {
        let index = u32_at(pos)? as usize;
        let n = u32_at(pos + 4)? as usize;
        if index >= entries || last.is_some_and(|l| index <= l) {
            return Err(format!("layered entry {index} out of order or range"));
        }
        if n == 0 || n > MAP_MAX_PIECES {
            return Err(format!("layered entry {index} claims {n} pieces"));
        }
        last = Some(index);
        let hash: [u8; 32] = t
            .get(pos + 8..pos + MAP_LAYERED_HEADER)
            .map(|b| crate::format::array_at(b, 0))
            .ok_or("trailer cut short")?;
        pos += MAP_LAYERED_HEADER;
        let body = t
            .get(pos..pos + n * MAP_PIECE_LEN)
            .ok_or("trailer cut short")?;
        pos += n * MAP_PIECE_LEN;
        let len = block_len(index);
        let pieces: Vec<PieceRef> = body
            .chunks_exact(MAP_PIECE_LEN)
            .map(PieceRef::read)
            .collect();
        for p in &pieces {
            let aligned =
                p.at % PIECE_ALIGN == 0 && (p.len % PIECE_ALIGN == 0 || p.end() as u64 == len);
            if p.len == 0
                || p.end() as u64 > len
                || !aligned
                || (p.pack.is_none() && p.sealed_len != 0)
            {
                return Err(format!(
                    "layered entry {index}: piece at {} (+{}) does not fit its {len}-byte block",
                    p.at, p.len
                ));
            }
        }
        out.push((
            index as u64,
            Layers {
                pieces,
                hash: (hash != [0u8; 32]).then_some(PlainHash(hash)),
            },
        ));
    }
    if pos != t.len() {
        return Err(format!("{} bytes after the trailer", t.len() - pos));
    }
    Ok(out)
}

/// Seals and writes a map object (create-only); returns the bytes stored (0 when it existed).
async fn put_meta(
    chunks: &ChunkStore,
    kind: ObjectKind,
    name: &ChunkName,
    plain: Vec<u8>,
) -> Result<u64> {
    let key = layout::map_object(name);
    chunks.fence().touch(&key).await;
    let keys = chunks.keys().clone();
    let key_str = key.as_str().to_string();
    let level = chunks.zstd_level();
    let sealed = chunks
        .cpu()
        .run(move || crate::chunk::seal::seal(&keys, kind, &key_str, &plain, Some(level)))
        .await
        .map_err(ChunkError::from)?;
    let n = sealed.bytes.len() as u64;
    let outcome = chunks
        .store()
        .put_if_absent(&key, Bytes::from(sealed.bytes))
        .await
        .map_err(ChunkError::from)?;
    Ok(if outcome == PutOutcome::Created { n } else { 0 })
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
