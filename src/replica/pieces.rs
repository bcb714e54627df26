//! Sub-block pieces: what merge and resync store when only part of a block changed.
//!
//! A layered block (see [`crate::replica::blockmap`]) is its base plus pieces, 4 KiB-aligned
//! ranges of the block. Each piece is sealed on its own like a chunk (zstd, AES-256-GCM, kind
//! [`ObjectKind::Piece`]); its associated data names the piece by content (`piece/<hex>` of
//! [`ChunkName::derive`] of its plain hash and length), so a piece cannot be swapped for another
//! one without failing its tag, and reading checks the plaintext against the map's hash too.
//!
//! Sealed pieces are concatenated into *packs* (`packs/<3 hex>/<64 hex>`, random names, closed
//! at [`PACK_TARGET_BYTES`]): one PUT per few MiB of changes instead of one object per 4 KiB, and
//! a range read fetches one piece. A pack holds nothing but sealed pieces; what is where is
//! known only from the maps that reference it. Packs are written before the map that
//! references them, so a crash in between leaves only unreferenced packs, which garbage
//! collection removes. A pack stays while any live map references any piece in it; the space
//! of its dead pieces is not reclaimed until the whole pack is dead (repacking is future work).
//!
//! Merge does not read a block's base to store its changed pieces, unless a log write covers a
//! 4 KiB page only partly: the page is then widened with the block's current bytes (the base is
//! read once for the block, and the block's hash comes for free). Hyper-V logs sectors of
//! 512 bytes, but file systems write 4 KiB pages, so widening is the exception; keeping
//! sector-sized pieces instead would make every reader and the map format deal with two
//! granularities for that exception.
//!
//! Compaction: a block is rewritten whole as a new base (its pieces dropped) when its pieces
//! would cover more than [`COMPACT_SHARE_PERCENT`] of the block or number more than
//! [`COMPACT_PIECES`]. Past half the block, a rewrite costs at most twice what the pieces cost
//! and every later reader saves the base read plus the pieces' reads; the count bound keeps a
//! block from needing more than a few dozen range reads (each a store request) to read.

use bytes::Bytes;
use futures_util::StreamExt;

use crate::chunk::{seal, ChunkName, ChunkStore, PlainHash, SealError};
use crate::error::{Error, Result};
use crate::file_formats::{ObjectKind, PACK_TARGET_BYTES, PIECE_AAD_PREFIX, PIECE_ALIGN};
use crate::replica::blockmap::{BlockMap, Layers, MapEntry, PieceRef};
use crate::store::PutOutcome;
use crate::vault::layout;

/// A block whose pieces would cover more than this share (percent) of it is compacted.
pub const COMPACT_SHARE_PERCENT: u64 = 50;
/// A block whose pieces would number more than this is compacted.
pub const COMPACT_PIECES: usize = 64;

/// Pieces fetched at once while reading a layered block.
const PIECES_IN_FLIGHT: usize = 8;

/// The associated-data name of a piece with this content.
fn piece_aad(chunks: &ChunkStore, hash: &PlainHash, len: u32) -> String {
    let name = ChunkName::derive(chunks.keys().name_key(), hash, len as u64);
    format!("{PIECE_AAD_PREFIX}{}", name.to_hex())
}

/// A piece sealed and ready to go into a pack (`sealed` is `None` for zeros: not stored).
pub struct SealedPiece {
    at: u32,
    len: u32,
    hash: PlainHash,
    sealed: Option<Vec<u8>>,
}

/// Seals the piece `data` found at `at` in its block (on the CPU pool).
pub async fn seal_piece(chunks: &ChunkStore, at: u32, data: Vec<u8>) -> Result<SealedPiece> {
    let keys = chunks.keys().clone();
    let level = chunks.zstd_level();
    let name_chunks = chunks.clone();
    let len =
        u32::try_from(data.len()).map_err(|_| Error::internal("a piece longer than 4 GiB"))?;
    chunks
        .cpu()
        .run(move || {
            let hash = PlainHash::of(&data);
            if crate::chunk::digest::is_zero(&data) {
                return Ok(SealedPiece {
                    at,
                    len,
                    hash,
                    sealed: None,
                });
            }
            let aad = piece_aad(&name_chunks, &hash, len);
            let s = seal::seal(&keys, ObjectKind::Piece, &aad, &data, Some(level))
                .map_err(crate::chunk::pipeline::ChunkError::from)?;
            Ok(SealedPiece {
                at,
                len,
                hash,
                sealed: Some(s.bytes),
            })
        })
        .await
}

/// Collects sealed pieces into packs and stores each pack once full (or at
/// [`PackWriter::finish`]). The references it hands out are valid once `finish` returned.
pub struct PackWriter {
    chunks: ChunkStore,
    name: ChunkName,
    buf: Vec<u8>,
    written: u64,
}

impl PackWriter {
    pub fn new(chunks: ChunkStore) -> PackWriter {
        PackWriter {
            chunks,
            name: random_name(),
            buf: Vec::new(),
            written: 0,
        }
    }

    /// Adds a piece to the open pack; the pack is stored when it reaches its target size.
    pub async fn push(&mut self, p: SealedPiece) -> Result<PieceRef> {
        let Some(sealed) = p.sealed else {
            return Ok(PieceRef {
                pack: None,
                at: p.at,
                len: p.len,
                pack_offset: 0,
                sealed_len: 0,
                hash: p.hash,
            });
        };
        if !self.buf.is_empty() && self.buf.len() + sealed.len() > PACK_TARGET_BYTES {
            self.flush().await?;
        }
        let r = PieceRef {
            pack: Some(self.name),
            at: p.at,
            len: p.len,
            pack_offset: u32::try_from(self.buf.len())
                .map_err(|_| Error::internal("a pack past 4 GiB"))?,
            sealed_len: u32::try_from(sealed.len())
                .map_err(|_| Error::internal("a sealed piece past 4 GiB"))?,
            hash: p.hash,
        };
        self.buf.extend_from_slice(&sealed);
        Ok(r)
    }

    /// Stores the open pack, if it holds anything.
    pub async fn finish(&mut self) -> Result<()> {
        self.flush().await
    }

    /// Bytes of packs stored so far.
    pub fn bytes_written(&self) -> u64 {
        self.written
    }

    async fn flush(&mut self) -> Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let key = layout::pack_object(&self.name);
        // Touched first: a collection running now must not take the pack for garbage before
        // the map that references it is committed.
        self.chunks.fence().touch(&key).await;
        let data = Bytes::from(std::mem::take(&mut self.buf));
        let n = data.len() as u64;
        let outcome = self.chunks.store().put_if_absent(&key, data).await?;
        if outcome != PutOutcome::Created {
            return Err(Error::internal(format!(
                "pack {key} already existed (random names collide only by a fault)"
            )));
        }
        metrics::counter!("drvault_packs_stored_total").increment(1);
        self.written += n;
        self.name = random_name();
        Ok(())
    }
}

fn random_name() -> ChunkName {
    let mut n = [0u8; 32];
    crate::util::fill_random(&mut n);
    ChunkName(n)
}

/// Reads one piece and checks it (tag, length, plain hash).
pub async fn read_piece(chunks: &ChunkStore, p: &PieceRef) -> Result<Vec<u8>> {
    let Some(pack) = p.pack else {
        return Ok(vec![0u8; p.len as usize]);
    };
    let key = layout::pack_object(&pack);
    let from = p.pack_offset as u64;
    let raw = chunks
        .store()
        .get_range(&key, from..from + p.sealed_len as u64)
        .await?;
    let keys = chunks.keys().clone();
    let aad = piece_aad(chunks, &p.hash, p.len);
    let p = *p;
    let what = format!("{key}@{from}");
    chunks
        .cpu()
        .run(move || {
            let plain = seal::open(&keys, ObjectKind::Piece, &aad, Vec::from(raw)).map_err(
                |e| match e {
                    // The store key alone does not say which piece: name the offset too.
                    SealError::TagMismatch { .. } => SealError::TagMismatch { name: what.clone() },
                    other => other,
                },
            )?;
            if plain.len() != p.len as usize || !PlainHash::of(&plain).ct_eq(&p.hash) {
                return Err(Error::Corrupt(SealError::ContentMismatch { name: what }));
            }
            Ok(plain)
        })
        .await
}

/// Applies `layers`' pieces, in order, over `data` (the block's base bytes).
pub async fn apply_layers(chunks: &ChunkStore, data: &mut [u8], layers: &Layers) -> Result<()> {
    let mut reads = futures_util::stream::iter(layers.pieces.iter().copied().map(|p| {
        let chunks = chunks.clone();
        async move { Ok::<_, Error>((p, read_piece(&chunks, &p).await?)) }
    }))
    .buffered(PIECES_IN_FLIGHT);
    while let Some(r) = reads.next().await {
        let (p, bytes) = r?;
        let dst = data
            .get_mut(p.at as usize..p.end() as usize)
            .ok_or_else(|| Error::internal(format!("a piece at {} overruns its block", p.at)))?;
        dst.copy_from_slice(&bytes);
    }
    Ok(())
}

/// Block `index` of `map` as it reads (base chunk verified against the map's hash, pieces
/// applied), `len` bytes long (zeros past a short base: a grown disk's old last block).
pub async fn read_base(
    chunks: &ChunkStore,
    map: &BlockMap,
    index: u64,
    len: usize,
) -> Result<Vec<u8>> {
    let mut data = match map.get(index).unwrap_or(MapEntry::Zero) {
        MapEntry::Zero => vec![0u8; len],
        MapEntry::Data { name, hash } => {
            let (b, h) = chunks.get_block(&name).await?;
            if !h.ct_eq(&hash) {
                return Err(Error::Corrupt(SealError::ContentMismatch {
                    name: name.to_hex(),
                }));
            }
            let mut v = b.to_vec();
            v.resize(len, 0);
            v
        }
    };
    if let Some(l) = map.layers(index) {
        apply_layers(chunks, &mut data, l).await?;
        if let Some(want) = l.hash {
            let d = data.clone();
            let got = chunks.cpu().run(move || PlainHash::of(&d)).await;
            if !got.ct_eq(&want) {
                return Err(Error::Corrupt(SealError::ContentMismatch {
                    name: format!("block {index} (base and pieces)"),
                }));
            }
        }
    }
    Ok(data)
}

/// What merge (or resync) does with a block some writes changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Rewrite the block whole as a new base.
    Whole,
    /// Store `ranges` (block offset, end) as new pieces after the existing pieces `kept`
    /// (indices into them; the others are wholly covered by the new ranges). `need_base`: some
    /// range is not wholly written, so its bytes start from the block's current content.
    Pieces {
        ranges: Vec<(u32, u32)>,
        kept: Vec<usize>,
        need_base: bool,
    },
}

/// Decides how to store a block of `block_len` bytes with `existing` layers, given the ranges
/// `writes` (offset, length; non-overlapping, in order) the changes cover.
pub fn plan(block_len: u32, existing: Option<&Layers>, writes: &[(u32, u32)]) -> Plan {
    let a = PIECE_ALIGN;
    // Touched pages as (page, bytes written in it).
    let mut pages: Vec<(u32, u32)> = Vec::new();
    for &(at, len) in writes.iter().filter(|w| w.1 > 0) {
        let end = at.saturating_add(len).min(block_len);
        let mut pos = at;
        while pos < end {
            let page = pos / a;
            let upto = ((page + 1) * a).min(end);
            match pages.last_mut() {
                Some((p, n)) if *p == page => *n += upto - pos,
                _ => pages.push((page, upto - pos)),
            }
            pos = upto;
        }
    }
    let page_len = |p: u32| (block_len - p * a).min(a);
    let need_base = pages.iter().any(|&(p, n)| n < page_len(p));
    let mut ranges: Vec<(u32, u32)> = Vec::new();
    for &(p, _) in &pages {
        let (s, e) = (p * a, p * a + page_len(p));
        match ranges.last_mut() {
            Some((_, end)) if *end == s => *end = e,
            _ => ranges.push((s, e)),
        }
    }
    let new_bytes: u64 = ranges.iter().map(|(s, e)| (e - s) as u64).sum();
    if new_bytes >= block_len as u64 {
        return Plan::Whole;
    }
    let covered = |p: &PieceRef| ranges.iter().any(|&(s, e)| s <= p.at && p.end() <= e);
    let old = existing.map(|l| &l.pieces[..]).unwrap_or_default();
    let kept: Vec<usize> = (0..old.len()).filter(|&i| !covered(&old[i])).collect();
    let live = new_bytes + kept.iter().map(|&i| old[i].len as u64).sum::<u64>();
    if live * 100 > COMPACT_SHARE_PERCENT * block_len as u64
        || kept.len() + ranges.len() > COMPACT_PIECES
    {
        return Plan::Whole;
    }
    Plan::Pieces {
        ranges,
        kept,
        need_base,
    }
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

    fn piece(at: u32, len: u32) -> PieceRef {
        PieceRef {
            pack: None,
            at,
            len,
            pack_offset: 0,
            sealed_len: 0,
            hash: PlainHash([0; 32]),
        }
    }

    #[test]
    fn plans_widen_to_pages_and_compact_past_the_bounds() {
        const B: u32 = 1 << 20;
        // One aligned 4 KiB write: one piece, no base read.
        assert_eq!(
            plan(B, None, &[(8192, 4096)]),
            Plan::Pieces {
                ranges: vec![(8192, 12288)],
                kept: vec![],
                need_base: false
            }
        );
        // A sector write and two adjacent pages: widened, joined, the base needed.
        assert_eq!(
            plan(B, None, &[(512, 512), (4096, 8192)]),
            Plan::Pieces {
                ranges: vec![(0, 12288)],
                kept: vec![],
                need_base: true
            }
        );
        // A page written in two halves needs no base.
        assert_eq!(
            plan(B, None, &[(0, 2048), (2048, 2048)]),
            Plan::Pieces {
                ranges: vec![(0, 4096)],
                kept: vec![],
                need_base: false
            }
        );
        // Existing pieces wholly overwritten are dropped, the others kept.
        let old = Layers {
            pieces: vec![piece(0, 4096), piece(8192, 8192)],
            hash: None,
        };
        assert_eq!(
            plan(B, Some(&old), &[(0, 4096), (8192, 4096)]),
            Plan::Pieces {
                ranges: vec![(0, 4096), (8192, 12288)],
                kept: vec![1],
                need_base: false
            }
        );
        // Past half the block, or past the piece count: whole.
        assert_eq!(plan(B, None, &[(0, B / 2 + 4096)]), Plan::Whole);
        let many: Vec<(u32, u32)> = (0..=COMPACT_PIECES as u32)
            .map(|k| (k * 8192, 4096))
            .collect();
        assert_eq!(plan(B, None, &many), Plan::Whole);
        // A short last block: its last page is short too.
        assert_eq!(
            plan(5000, None, &[(4096, 904)]),
            Plan::Pieces {
                ranges: vec![(4096, 5000)],
                kept: vec![],
                need_base: false
            }
        );
    }

    #[tokio::test]
    async fn pieces_round_trip_through_packs_and_refuse_damage() {
        let cs = cs();
        let mut w = PackWriter::new(cs.clone());
        let mut refs = Vec::new();
        for k in 0..3u8 {
            let data = vec![k + 1; 4096];
            refs.push(
                w.push(seal_piece(&cs, k as u32 * 4096, data).await.unwrap())
                    .await
                    .unwrap(),
            );
        }
        let zero = w
            .push(seal_piece(&cs, 0, vec![0u8; 4096]).await.unwrap())
            .await
            .unwrap();
        assert!(zero.pack.is_none(), "zeros are not stored");
        w.finish().await.unwrap();
        assert!(w.bytes_written() > 0);
        assert!(refs.iter().all(|r| r.pack == refs[0].pack), "one pack");
        for (k, r) in refs.iter().enumerate() {
            assert_eq!(read_piece(&cs, r).await.unwrap(), vec![k as u8 + 1; 4096]);
        }
        // A piece named by another's offset fails its tag; a wrong hash fails the content.
        let mut swapped = refs[0];
        swapped.pack_offset = refs[1].pack_offset;
        let e = read_piece(&cs, &swapped).await.unwrap_err();
        assert_eq!(e.code(), "corrupt_object", "{e}");
        // Damage in the pack is found.
        let key = layout::pack_object(&refs[0].pack.unwrap());
        let mut raw = cs.store().get(&key).await.unwrap().to_vec();
        raw[refs[2].pack_offset as usize + 40] ^= 1;
        cs.store().put(&key, raw.into()).await.unwrap();
        assert_eq!(
            read_piece(&cs, &refs[2]).await.unwrap_err().code(),
            "corrupt_object"
        );
        assert!(
            read_piece(&cs, &refs[1]).await.is_ok(),
            "other pieces still read"
        );
    }
}
