//! Reading a disk as of a recovery point: the base block map plus the extents of the journal's
//! first `n` logs, applied in order.
//!
//! Extents are indexed by block once per reader, and each block's pieces are resolved there and
//! then into *segments*: the bytes each log still supplies once every later write over them is
//! taken into account (later logs, and later extents of one log, win). A block's segments never
//! overlap and each lies within one 1 MiB log frame, so they can be filled in any order.
//!
//! Log bytes are read a *group* of touched blocks at a time: the group's segments are sorted by
//! (log, frame), each frame is opened (tag, decrypt, decompress) once and its segments copied
//! out, and the blocks are then built from their base content and those bytes. Reading a 4 KiB
//! piece at a time through a small frame cache instead opened most frames once per piece when
//! writes were scattered (a merge was 3-4% of `hrl apply`'s speed). A group holds only the
//! segment bytes, never whole blocks or frames; its size is capped by a budget, and every group
//! alive in the process (a merge's, and those kept for readers exporting or failing over a
//! point) draws from one memory reserve, so concurrent merges and exports cannot add up past it.
//! A merge walks its groups itself ([`PointReader::groups`], [`PointReader::load`]); single
//! block reads ([`PointReader::read_block`]) load the block's group and keep it in a small
//! shared cache, since exports and failovers ask for the following blocks next. A reader that
//! writes blocks straight to a device (a failover materializing a disk) reads them with
//! [`PointReader::read_block_into`], which fills the caller's buffer without a copy where no log
//! patches the block.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::StreamExt;

use crate::chunk::{ChunkStore, PlainHash, SealError};
use crate::error::{Error, Result};
use crate::file_formats::LOG_FRAME_LEN;
use crate::journal::{self, FrameCache};
use crate::replica::blockmap::{block_count, block_len, BlockMap, MapEntry};

/// Segment bytes a merge reads out at once (a group's budget).
pub const MERGE_GROUP_BYTES: u64 = 128 << 20;

/// Segment bytes a single block read loads with it (the following touched blocks), so an
/// export or failover reading blocks in order opens each frame once per group.
const READ_GROUP_BYTES: u64 = 32 << 20;

/// KiB of segment bytes all groups alive in the process may hold together.
const GROUP_MEMORY_KIB: u32 = 160 << 10;

/// KiB of groups the read cache keeps once their load is over (within the reserve above).
const READ_CACHE_KIB: u64 = 64 << 10;

/// Frames opened at once while loading a group.
const FRAMES_IN_FLIGHT: usize = 4;

const FRAME: u64 = LOG_FRAME_LEN as u64;

/// The memory reserve every loaded group holds its share of (in KiB).
static GROUP_MEMORY: tokio::sync::Semaphore =
    tokio::sync::Semaphore::const_new(GROUP_MEMORY_KIB as usize);

/// Groups loaded by single block reads, by (reader id, group number), oldest first.
static READ_CACHE: Mutex<ReadCache> = Mutex::new(ReadCache {
    groups: BTreeMap::new(),
    order: VecDeque::new(),
    kib: 0,
});

/// Source of reader ids (keys of [`READ_CACHE`]).
static NEXT_READER: AtomicU64 = AtomicU64::new(0);

/// Bytes one log supplies to one block at this point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Segment {
    /// Index into the reader's logs.
    log: usize,
    /// Offset within the block.
    at: u32,
    len: u32,
    log_offset: u64,
}

impl Segment {
    fn end(&self) -> u32 {
        self.at + self.len
    }

    /// The part of the segment from block offset `from` on (`from` within it).
    fn from(self, from: u32) -> Segment {
        let skip = from - self.at;
        Segment {
            at: from,
            len: self.len - skip,
            log_offset: self.log_offset + skip as u64,
            ..self
        }
    }
}

/// A block's pieces, given in journal order, as non-overlapping segments in block order, each
/// within one log frame: what each piece still supplies once later pieces painted over it.
fn resolve(pieces: &[Segment]) -> Vec<Segment> {
    let mut painted: BTreeMap<u32, Segment> = BTreeMap::new();
    for p in pieces.iter().filter(|p| p.len > 0) {
        let (a, b) = (p.at, p.end());
        let mut hit: Vec<Segment> = painted
            .range(..a)
            .next_back()
            .map(|(_, s)| *s)
            .filter(|s| s.end() > a)
            .into_iter()
            .collect();
        hit.extend(painted.range(a..b).map(|(_, s)| *s));
        for s in hit {
            painted.remove(&s.at);
            if s.at < a {
                painted.insert(s.at, Segment { len: a - s.at, ..s });
            }
            if s.end() > b {
                painted.insert(b, s.from(b));
            }
        }
        painted.insert(a, *p);
    }
    let mut out = Vec::with_capacity(painted.len());
    for mut s in painted.into_values() {
        loop {
            let room = FRAME - s.log_offset % FRAME;
            if s.len as u64 <= room {
                out.push(s);
                break;
            }
            // room < len ≤ u32::MAX here.
            let cut = s.at + room as u32;
            out.push(Segment {
                len: room as u32,
                ..s
            });
            s = s.from(cut);
        }
    }
    out
}

/// Groups loaded by single block reads, kept for the next reads of the same reader.
struct ReadCache {
    groups: BTreeMap<(u64, usize), Arc<Overlay>>,
    order: VecDeque<(u64, usize)>,
    kib: u64,
}

impl ReadCache {
    fn lock() -> std::sync::MutexGuard<'static, ReadCache> {
        // A poisoned lock only means a panic elsewhere while holding it; the cache is usable.
        READ_CACHE.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn get(reader: u64, group: usize) -> Option<Arc<Overlay>> {
        Self::lock().groups.get(&(reader, group)).cloned()
    }

    fn put(reader: u64, group: usize, o: Arc<Overlay>) {
        let mut c = Self::lock();
        c.kib += o.kib as u64;
        if let Some(old) = c.groups.insert((reader, group), o) {
            c.kib -= old.kib as u64;
        } else {
            c.order.push_back((reader, group));
        }
        while c.kib > READ_CACHE_KIB && c.order.len() > 1 {
            c.evict_oldest();
        }
    }

    /// Drops the oldest group; false when there is none. Its memory returns to the reserve
    /// once no read still uses it.
    fn evict_oldest(&mut self) -> bool {
        match self.order.pop_front() {
            Some(k) => {
                if let Some(o) = self.groups.remove(&k) {
                    self.kib -= o.kib as u64;
                }
                true
            }
            None => false,
        }
    }

    fn forget(reader: u64) {
        let mut c = Self::lock();
        let gone: Vec<_> = c.order.iter().filter(|k| k.0 == reader).copied().collect();
        for k in gone {
            if let Some(o) = c.groups.remove(&k) {
                c.kib -= o.kib as u64;
            }
        }
        c.order.retain(|k| k.0 != reader);
    }
}

/// Takes `kib` from the group memory reserve, pushing cached groups out first rather than
/// waiting behind them (a cached group of an idle reader would otherwise hold it forever).
async fn reserve(kib: u32) -> Result<tokio::sync::SemaphorePermit<'static>> {
    let kib = kib.min(GROUP_MEMORY_KIB);
    loop {
        if let Ok(p) = GROUP_MEMORY.try_acquire_many(kib) {
            return Ok(p);
        }
        if !ReadCache::lock().evict_oldest() {
            break;
        }
    }
    GROUP_MEMORY
        .acquire_many(kib)
        .await
        .map_err(|_| Error::internal("the log group memory reserve was closed"))
}

/// The log bytes of a group of touched blocks, read out frame by frame.
pub struct Overlay {
    /// Per block: its segments' bytes one after another, in block order.
    blocks: BTreeMap<u64, Vec<u8>>,
    kib: u32,
    _memory: tokio::sync::SemaphorePermit<'static>,
}

/// How [`PointReader::read_block_into`] delivered a block.
pub enum ReadInto {
    /// Read straight into the caller's buffer: `len` bytes from the offset it gave.
    Filled { buf: Vec<u8>, len: usize },
    /// A block some log patches, one the base holds as zeros, or a layered one: its bytes as
    /// [`PointReader::read_block`] gives them; the buffer comes back untouched.
    Copied { buf: Vec<u8>, data: Bytes },
}

pub struct PointReader {
    chunks: ChunkStore,
    frames: FrameCache,
    vm_id: String,
    disk_id: String,
    base: Arc<BlockMap>,
    /// The disk's size at this point: the base map's, or larger when the disk grew after it
    /// (blocks past the base are zeros until a log writes them).
    size: u64,
    logs: Vec<String>,
    segments: BTreeMap<u64, Vec<Segment>>,
    /// First block of each group single block reads load (groups of `READ_GROUP_BYTES`).
    read_groups: Vec<u64>,
    /// Key of this reader's groups in the read cache.
    id: u64,
    /// Held while a read loads a group, so reads arriving meanwhile wait for it rather than
    /// load the same group again.
    loading: tokio::sync::Mutex<()>,
}

impl Drop for PointReader {
    fn drop(&mut self) {
        ReadCache::forget(self.id);
    }
}

impl PointReader {
    /// `logs`: object-key ids of the journal's logs up to the point, oldest first.
    pub async fn build(
        chunks: ChunkStore,
        frames: FrameCache,
        vm_id: &str,
        disk_id: &str,
        base: Arc<BlockMap>,
        logs: Vec<String>,
    ) -> Result<PointReader> {
        Self::build_sized(chunks, frames, vm_id, disk_id, base, logs, None).await
    }

    /// [`PointReader::build`] of a disk whose size at the point is `size` (`None`: the base
    /// map's). A size below the base map's is refused: disks never shrink.
    pub async fn build_sized(
        chunks: ChunkStore,
        frames: FrameCache,
        vm_id: &str,
        disk_id: &str,
        base: Arc<BlockMap>,
        logs: Vec<String>,
        size: Option<u64>,
    ) -> Result<PointReader> {
        let size = size.unwrap_or(base.disk_size());
        if size < base.disk_size() {
            return Err(Error::internal(format!(
                "disk {disk_id}: point size {size} is below its base map's {}",
                base.disk_size()
            )));
        }
        let bs = base.block_size() as u64;
        let mut pieces: BTreeMap<u64, Vec<Segment>> = BTreeMap::new();
        for (li, log) in logs.iter().enumerate() {
            let bad = |reason: &str| {
                Error::Corrupt(SealError::BadPayload {
                    name: log.clone(),
                    reason: reason.into(),
                })
            };
            for e in journal::load_extents(&chunks, vm_id, disk_id, log).await? {
                let end = e
                    .disk_offset
                    .checked_add(e.length as u64)
                    .filter(|&x| x <= size)
                    .ok_or_else(|| bad("extent past the disk end"))?;
                e.log_offset
                    .checked_add(e.length as u64)
                    .ok_or_else(|| bad("extent past the largest log offset"))?;
                let mut pos = e.disk_offset;
                while pos < end {
                    let block = pos / bs;
                    let at = pos % bs;
                    let take = (bs - at).min(end - pos);
                    pieces.entry(block).or_default().push(Segment {
                        log: li,
                        at: at as u32,
                        len: take as u32,
                        log_offset: e.log_offset + (pos - e.disk_offset),
                    });
                    pos += take;
                }
            }
        }
        // Resolving is CPU work in proportion to the journal's extents: off the runtime.
        let segments = chunks
            .cpu()
            .run(move || {
                pieces
                    .into_iter()
                    .map(|(b, ps)| (b, resolve(&ps)))
                    .collect::<BTreeMap<_, _>>()
            })
            .await;
        let mut segments = segments;
        // The base's short last block becomes longer when the disk grew: it is rebuilt (its
        // chunk's bytes, then zeros) as logs' blocks are, never read straight from the chunk.
        if let Some(last) = resized_last_block(&base, size) {
            segments.entry(last).or_default();
        }
        let read_groups = partition(&segments, READ_GROUP_BYTES)
            .iter()
            .filter_map(|g| g.first().copied())
            .collect();
        Ok(PointReader {
            chunks,
            frames,
            vm_id: vm_id.into(),
            disk_id: disk_id.into(),
            base,
            size,
            logs,
            segments,
            read_groups,
            id: NEXT_READER.fetch_add(1, Ordering::Relaxed),
            loading: tokio::sync::Mutex::new(()),
        })
    }

    pub fn base(&self) -> &BlockMap {
        &self.base
    }

    /// The disk's size at this point.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Blocks of the disk at this point.
    pub fn blocks(&self) -> u64 {
        block_count(self.size, self.base.block_size())
    }

    /// Blocks some log of this point writes to.
    pub fn touched(&self) -> impl Iterator<Item = u64> + '_ {
        self.segments.keys().copied()
    }

    pub fn is_touched(&self, index: u64) -> bool {
        self.segments.contains_key(&index)
    }

    /// The touched blocks in index order, cut into groups whose log bytes stay within
    /// `budget` (a block alone may exceed it: it is then a group of its own).
    pub fn groups(&self, budget: u64) -> Vec<Vec<u64>> {
        partition(&self.segments, budget)
    }

    /// Reads the log bytes of `blocks` (touched or not), opening each log frame they need once.
    /// Frames are verified by their tags; the group's memory is taken from the process-wide
    /// reserve first, so this may wait for other groups to be done.
    pub async fn load(&self, blocks: &[u64]) -> Result<Overlay> {
        // By (log, frame): (block, offset in the block's bytes, offset in the frame, length).
        type Wants = BTreeMap<(usize, u64), Vec<(u64, usize, usize, usize)>>;
        let mut wants: Wants = BTreeMap::new();
        let mut sizes = Vec::new();
        let mut total = 0u64;
        for &b in blocks {
            let Some(segs) = self.segments.get(&b) else {
                continue;
            };
            let mut dest = 0usize;
            for s in segs {
                wants
                    .entry((s.log, s.log_offset / FRAME))
                    .or_default()
                    .push((b, dest, (s.log_offset % FRAME) as usize, s.len as usize));
                dest += s.len as usize;
            }
            sizes.push((b, dest));
            total += dest as u64;
        }
        let kib = u32::try_from(total.div_ceil(1024)).unwrap_or(u32::MAX);
        let memory = reserve(kib).await?;
        let mut out: BTreeMap<u64, Vec<u8>> =
            sizes.into_iter().map(|(b, n)| (b, vec![0u8; n])).collect();
        let mut opened =
            futures_util::stream::iter(wants.into_iter().map(|((log, n), dests)| async move {
                let log_id = self.logs.get(log).ok_or_else(|| {
                    Error::internal(format!("segment of log {log} past the reader's logs"))
                })?;
                let frame = journal::open_frame(
                    &self.chunks,
                    &self.frames,
                    &self.vm_id,
                    &self.disk_id,
                    log_id,
                    n,
                    false,
                )
                .await?;
                Ok::<_, Error>((log_id, n, frame, dests))
            }))
            .buffered(FRAMES_IN_FLIGHT);
        while let Some(r) = opened.next().await {
            let (log_id, n, frame, dests) = r?;
            for (b, at, within, len) in dests {
                let src = frame
                    .get(within..within + len)
                    .ok_or_else(|| journal::short_frame(&self.vm_id, &self.disk_id, log_id, n))?;
                let dst = out
                    .get_mut(&b)
                    .and_then(|buf| buf.get_mut(at..at + len))
                    .ok_or_else(|| Error::internal(format!("block {b}'s log bytes misplaced")))?;
                dst.copy_from_slice(src);
            }
        }
        Ok(Overlay {
            blocks: out,
            kib,
            _memory: memory,
        })
    }

    /// A block's content at this point, with its plain hash, from its base content (chunk and
    /// pieces) and the log bytes `overlay` read for it (which must hold them if a log writes the
    /// block). Base chunks are verified (tag, name, map hash), pieces by their tags and hashes.
    pub async fn block_with(&self, index: u64, overlay: &Overlay) -> Result<(Bytes, PlainHash)> {
        // Blocks past the base map but within a grown disk read as zeros until a log writes
        // there (`read_base` gives zeros for them).
        if index >= self.blocks() {
            return Err(Error::invalid(
                "block_out_of_range",
                format!(
                    "block {index} is past the end of the disk ({} blocks)",
                    self.blocks()
                ),
            ));
        }
        let len = block_len(self.size, self.base.block_size(), index) as usize;
        let mut data =
            crate::replica::pieces::read_base(&self.chunks, &self.base, index, len).await?;
        self.paint(index, overlay, &mut data, 0)?;
        let data = Bytes::from(data);
        let d2 = data.clone();
        let hash = self.chunks.cpu().run(move || PlainHash::of(&d2)).await;
        Ok((data, hash))
    }

    /// The ranges (offset in the block, length) the logs of this point write in block `index`,
    /// in block order, not overlapping.
    pub fn writes(&self, index: u64) -> Vec<(u32, u32)> {
        let mut out: Vec<(u32, u32)> = Vec::new();
        for s in self.segments.get(&index).into_iter().flatten() {
            match out.last_mut() {
                Some((a, n)) if *a + *n == s.at => *n += s.len,
                _ => out.push((s.at, s.len)),
            }
        }
        out
    }

    /// Copies the log bytes `overlay` holds for block `index` into `dst`, which stands for the
    /// block's bytes from offset `dst_at` on (writes outside it are skipped).
    pub fn paint(&self, index: u64, overlay: &Overlay, dst: &mut [u8], dst_at: u32) -> Result<()> {
        let Some(segs) = self.segments.get(&index) else {
            return Ok(());
        };
        let bytes = overlay
            .blocks
            .get(&index)
            .ok_or_else(|| Error::internal(format!("block {index} read without its log bytes")))?;
        let (lo, hi) = (dst_at as u64, dst_at as u64 + dst.len() as u64);
        let mut from = 0usize;
        for s in segs {
            let n = s.len as usize;
            let (a, b) = ((s.at as u64).max(lo), (s.end() as u64).min(hi));
            if a < b {
                let skip = (a - s.at as u64) as usize;
                let take = (b - a) as usize;
                let (Some(d), Some(src)) = (
                    dst.get_mut((a - lo) as usize..(b - lo) as usize),
                    bytes.get(from + skip..from + skip + take),
                ) else {
                    return Err(Error::internal(format!(
                        "block {index}: a log segment at {} (+{n}) does not fit",
                        s.at
                    )));
                };
                d.copy_from_slice(src);
            }
            from += n;
        }
        Ok(())
    }

    /// A block's content at this point, with its plain hash. Base chunks are verified (tag,
    /// name, map hash) and log frames by their tags. A touched block's whole group is loaded
    /// and kept for a while, for the reads of the blocks after it.
    pub async fn read_block(&self, index: u64) -> Result<(Bytes, PlainHash)> {
        if !self.is_touched(index) {
            return self.block_with(index, &self.load(&[]).await?).await;
        }
        let g = self
            .read_groups
            .partition_point(|&first| first <= index)
            .saturating_sub(1);
        let overlay = match ReadCache::get(self.id, g) {
            Some(o) => o,
            None => {
                let _one = self.loading.lock().await;
                match ReadCache::get(self.id, g) {
                    Some(o) => o,
                    None => {
                        let lo = self.read_groups.get(g).copied().unwrap_or(0);
                        let hi = self.read_groups.get(g + 1).copied().unwrap_or(u64::MAX);
                        let blocks: Vec<u64> =
                            self.segments.range(lo..hi).map(|(b, _)| *b).collect();
                        let o = Arc::new(self.load(&blocks).await?);
                        ReadCache::put(self.id, g, o.clone());
                        o
                    }
                }
            }
        };
        self.block_with(index, &overlay).await
    }

    /// A block's content at this point, read into `buf` from offset `at` where it can be. A
    /// block no log of the point writes is decrypted and decompressed straight from its chunk
    /// into `buf` (`get_block_into` checks the seal's tag and that the content derives the
    /// chunk's name; the map's hash is compared here). Other blocks come through
    /// [`PointReader::read_block`], which copies the bytes and hashes them a second time: for
    /// every block of a full disk that would cost about a fifth of a failover's CPU. `buf`
    /// must hold a whole block from `at` on.
    pub async fn read_block_into(&self, index: u64, buf: Vec<u8>, at: usize) -> Result<ReadInto> {
        let untouched_data = match self.base.get(index) {
            Some(MapEntry::Data { name, hash })
                if !self.is_touched(index) && !self.base.is_layered(index) =>
            {
                Some((name, hash))
            }
            _ => None,
        };
        let Some((name, hash)) = untouched_data else {
            let (data, _) = self.read_block(index).await?;
            return Ok(ReadInto::Copied { buf, data });
        };
        let (buf, len, got) = self.chunks.get_block_into(&name, buf, at).await?;
        if !got.ct_eq(&hash) {
            return Err(Error::Corrupt(SealError::ContentMismatch {
                name: name.to_hex(),
            }));
        }
        Ok(ReadInto::Filled { buf, len })
    }
}

/// The base map's last block when it is short and the disk at the point is larger: that
/// block's content at the point is longer than its chunk.
pub(crate) fn resized_last_block(base: &BlockMap, size: u64) -> Option<u64> {
    let last = base.len().checked_sub(1)?;
    let bs = base.block_size() as u64;
    (size > base.disk_size() && base.disk_size() % bs != 0).then_some(last)
}

/// Touched blocks in index order, cut where a group's segment bytes would pass `budget`.
fn partition(segments: &BTreeMap<u64, Vec<Segment>>, budget: u64) -> Vec<Vec<u64>> {
    let mut groups: Vec<Vec<u64>> = Vec::new();
    let mut cur: Vec<u64> = Vec::new();
    let mut bytes = 0u64;
    for (&b, segs) in segments {
        let n: u64 = segs.iter().map(|s| s.len as u64).sum();
        if !cur.is_empty() && bytes + n > budget {
            groups.push(std::mem::take(&mut cur));
            bytes = 0;
        }
        cur.push(b);
        bytes += n;
    }
    if !cur.is_empty() {
        groups.push(cur);
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::{CpuPool, KeyRing};
    use crate::file_formats::ObjectKind;
    use crate::journal::{encode_extents, Extent, FrameWriter};
    use crate::store::Store;
    use crate::vault::layout;

    /// xorshift64*: deterministic test data without a dependency.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    #[test]
    fn resolved_segments_give_every_byte_its_last_writer() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        const BLOCK: u32 = 8192;
        for _ in 0..500 {
            let pieces: Vec<Segment> = (0..rng.below(12) + 1)
                .map(|_| {
                    let at = rng.below(BLOCK as u64) as u32;
                    let len = rng.below((BLOCK - at) as u64 + 1) as u32;
                    // Log offsets near frame boundaries, so segments get cut there.
                    let log_offset = (rng.below(3) + 1) * FRAME - rng.below(2 * BLOCK as u64);
                    Segment {
                        log: rng.below(3) as usize,
                        at,
                        len,
                        log_offset,
                    }
                })
                .collect();
            let mut painted = vec![None; BLOCK as usize];
            for p in &pieces {
                for k in 0..p.len {
                    painted[(p.at + k) as usize] = Some((p.log, p.log_offset + k as u64));
                }
            }
            let segs = resolve(&pieces);
            let mut got = vec![None; BLOCK as usize];
            let mut last_end = 0;
            for s in &segs {
                assert!(s.len > 0 && s.at >= last_end, "segments overlap: {segs:?}");
                last_end = s.end();
                assert_eq!(
                    s.log_offset / FRAME,
                    (s.log_offset + s.len as u64 - 1) / FRAME,
                    "segment spans two frames: {s:?}"
                );
                for k in 0..s.len {
                    got[(s.at + k) as usize] = Some((s.log, s.log_offset + k as u64));
                }
            }
            assert_eq!(got, painted, "pieces {pieces:?}");
        }
    }

    /// Stores a log made of `writes` (disk offset, bytes), in that extent order, with the
    /// bytes laid out in the log in reverse order (so log order is not extent order).
    async fn store_log(cs: &ChunkStore, id: &str, writes: &[(u64, Vec<u8>)]) {
        let total: usize = writes.iter().map(|w| w.1.len()).sum();
        let mut log = vec![0u8; total];
        let mut extents = Vec::new();
        let mut end = total;
        for (off, bytes) in writes {
            let at = end - bytes.len();
            log[at..end].copy_from_slice(bytes);
            extents.push(Extent {
                disk_offset: *off,
                length: bytes.len() as u32,
                log_offset: at as u64,
            });
            end = at;
        }
        let mut w = FrameWriter::new(cs.clone(), "v", "d", id);
        w.push(Bytes::from(log)).await.unwrap();
        w.finish().await.unwrap();
        cs.put_sealed_compressed(
            ObjectKind::LogFrame,
            &layout::log_extents("v", "d", id),
            encode_extents(&extents),
        )
        .await
        .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn logs_overwriting_each_other_read_as_if_applied_in_order() {
        const BS: u32 = 65536;
        const BLOCKS: u64 = 64;
        let disk_size = BLOCKS * BS as u64 - 1000; // a short last block
        let cs = ChunkStore::new(
            Store::open("memory://", &[]).unwrap(),
            Arc::new(KeyRing::random()),
            CpuPool::new(2),
            1,
        );
        let mut rng = Rng(42);
        let mut raw: Vec<u8> = vec![0u8; disk_size as usize];
        let mut base = BlockMap::zeroed(disk_size, BS);
        for b in (0..BLOCKS).step_by(3) {
            let len = block_len(disk_size, BS, b) as usize;
            let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            let at = (b * BS as u64) as usize;
            raw[at..at + len].copy_from_slice(&data);
            let put = cs.put_block(Bytes::from(data), None).await.unwrap();
            let name = put.name.unwrap();
            let e = MapEntry::Data {
                name,
                hash: put.hash,
            };
            base.set(b, e).unwrap();
        }
        // Four logs of 2-3 MiB (several frames each) over the same 2.5 MiB of the disk: small
        // writes, writes across block ends, and within each log writes over its own earlier
        // ones; each log also rewrites one range whole, in a different place each time.
        let mut logs = Vec::new();
        for l in 0..4u8 {
            let mut writes: Vec<(u64, Vec<u8>)> = Vec::new();
            let mut bytes = 0;
            while bytes < 2 << 20 {
                let len = match rng.below(3) {
                    0 => 4096,
                    1 => rng.below(3 * BS as u64) + 1,
                    _ => rng.below(700) + 1,
                };
                let off = rng.below((5 << 19) - len) + (l as u64 * 7 * BS as u64) % (8 * BS as u64);
                let data: Vec<u8> = (0..len).map(|_| rng.next() as u8 | 1).collect();
                bytes += len;
                writes.push((off, data));
            }
            let whole = (l as u64 * 3 + 1) * BS as u64 + 77;
            writes.push((whole, vec![l + 10; 2 * BS as usize]));
            let id = format!("log{l}");
            store_log(&cs, &id, &writes).await;
            for (off, data) in &writes {
                raw[*off as usize..*off as usize + data.len()].copy_from_slice(data);
            }
            logs.push(id);
        }
        let reader = PointReader::build(
            cs.clone(),
            FrameCache::new(2),
            "v",
            "d",
            Arc::new(base),
            logs,
        )
        .await
        .unwrap();
        let expect = |b: u64| {
            let at = (b * BS as u64) as usize;
            raw[at..at + block_len(disk_size, BS, b) as usize].to_vec()
        };
        // Block by block, as an export reads, in an order that jumps between read groups.
        for b in (0..BLOCKS).rev().chain(0..BLOCKS) {
            let (got, hash) = reader.read_block(b).await.unwrap();
            assert!(got[..] == expect(b)[..], "block {b} read alone");
            assert!(hash.ct_eq(&PlainHash::of(&got)));
        }
        // A group at a time, as a merge reads, with groups of one block up to all of them.
        for budget in [1, 100_000, 3 * BS as u64, u64::MAX] {
            let groups = reader.groups(budget);
            assert_eq!(
                groups.concat(),
                reader.touched().collect::<Vec<_>>(),
                "groups of {budget} bytes cover the touched blocks in order"
            );
            if budget == 1 {
                assert_eq!(groups.len(), reader.touched().count());
            }
            for g in &groups {
                let overlay = reader.load(g).await.unwrap();
                for &b in g {
                    let (got, _) = reader.block_with(b, &overlay).await.unwrap();
                    assert!(got[..] == expect(b)[..], "block {b}, groups of {budget}");
                }
            }
        }
        assert!(reader.groups(u64::MAX).len() == 1 && reader.touched().count() > 30);
    }

    #[tokio::test]
    async fn a_lost_frame_fails_the_read_until_it_is_back() {
        let cs = ChunkStore::new(
            Store::open("memory://", &[]).unwrap(),
            Arc::new(KeyRing::random()),
            CpuPool::new(1),
            1,
        );
        store_log(&cs, "l", &[(100, vec![5u8; 3 << 20])]).await;
        let reader = PointReader::build(
            cs.clone(),
            FrameCache::new(2),
            "v",
            "d",
            Arc::new(BlockMap::zeroed(4 << 20, 1 << 20)),
            vec!["l".into()],
        )
        .await
        .unwrap();
        let frame = layout::log_frame("v", "d", "l", 1);
        let kept = cs.store().get(&frame).await.unwrap();
        cs.store().delete(&frame).await.unwrap();
        let e = reader.read_block(2).await.unwrap_err();
        assert_eq!(e.code(), "object_missing", "{e}");
        cs.store().put(&frame, kept).await.unwrap();
        let (b, _) = reader.read_block(2).await.unwrap();
        assert!(b.iter().all(|&x| x == 5));
        let e = reader.read_block(9).await.unwrap_err();
        assert_eq!(e.code(), "block_out_of_range", "{e}");
    }

    #[tokio::test]
    async fn blocks_read_into_a_buffer_match_copied_reads_and_are_verified() {
        const BS: u32 = 65536;
        let cs = ChunkStore::new(
            Store::open("memory://", &[]).unwrap(),
            Arc::new(KeyRing::random()),
            CpuPool::new(1),
            1,
        );
        let disk_size = 4 * BS as u64;
        let mut base = BlockMap::zeroed(disk_size, BS);
        for b in 0..3u64 {
            let put = cs
                .put_block(Bytes::from(vec![b as u8 + 1; BS as usize]), None)
                .await
                .unwrap();
            let e = MapEntry::Data {
                name: put.name.unwrap(),
                hash: put.hash,
            };
            base.set(b, e).unwrap();
        }
        // Block 1 is patched by a log; 0 and 2 come from their chunks alone; 3 is a hole.
        store_log(&cs, "l", &[(BS as u64 + 10, vec![9u8; 100])]).await;
        let reader = PointReader::build(
            cs.clone(),
            FrameCache::new(2),
            "v",
            "d",
            Arc::new(base.clone()),
            vec!["l".into()],
        )
        .await
        .unwrap();
        for b in 0..4u64 {
            let (copied, _) = reader.read_block(b).await.unwrap();
            let at = 7;
            match reader
                .read_block_into(b, vec![0u8; at + BS as usize], at)
                .await
                .unwrap()
            {
                ReadInto::Filled { buf, len } => {
                    assert!(b == 0 || b == 2, "block {b} filled in place");
                    assert_eq!(&buf[at..at + len], &copied[..], "block {b}");
                }
                ReadInto::Copied { buf, data } => {
                    assert!(b == 1 || b == 3, "block {b} copied");
                    assert_eq!(data, copied, "block {b}");
                    assert!(
                        buf.iter().all(|&x| x == 0),
                        "the buffer comes back untouched"
                    );
                }
            }
        }
        // A map whose hash does not match the chunk's content is refused, not written out.
        let other = cs
            .put_block(Bytes::from(vec![0xAAu8; BS as usize]), None)
            .await
            .unwrap();
        let MapEntry::Data { name, .. } = base.get(0).unwrap() else {
            unreachable!()
        };
        base.set(
            0,
            MapEntry::Data {
                name,
                hash: other.hash,
            },
        )
        .unwrap();
        let reader = PointReader::build(
            cs.clone(),
            FrameCache::new(2),
            "v",
            "d",
            Arc::new(base),
            vec![],
        )
        .await
        .unwrap();
        let e = reader
            .read_block_into(0, vec![0u8; BS as usize], 0)
            .await
            .err()
            .expect("refused");
        assert_eq!(e.code(), "corrupt_object", "{e}");
    }
}
