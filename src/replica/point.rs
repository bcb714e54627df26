//! Reading a disk as of a recovery point: the base block map plus the extents of the journal's
//! first `n` logs, applied in order. Extents are indexed by block once per reader, so reading a
//! block touches only the log bytes that land in it (never a whole log per block), through the
//! shared frame cache.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;

use crate::chunk::{ChunkStore, PlainHash, SealError};
use crate::error::{Error, Result};
use crate::journal::{self, FrameCache};
use crate::replica::blockmap::{block_len, BlockMap, MapEntry};

/// A piece of one log's write that lands in one block.
#[derive(Debug, Clone, Copy)]
struct Piece {
    log: usize,
    /// Offset within the block.
    at: u32,
    len: u32,
    log_offset: u64,
}

pub struct PointReader {
    chunks: ChunkStore,
    frames: FrameCache,
    vm_id: String,
    disk_id: String,
    base: Arc<BlockMap>,
    logs: Vec<String>,
    pieces: BTreeMap<u64, Vec<Piece>>,
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
        let bs = base.block_size() as u64;
        let mut pieces: BTreeMap<u64, Vec<Piece>> = BTreeMap::new();
        for (li, log) in logs.iter().enumerate() {
            for e in journal::load_extents(&chunks, vm_id, disk_id, log).await? {
                let end = e
                    .disk_offset
                    .checked_add(e.length as u64)
                    .filter(|&x| x <= base.disk_size())
                    .ok_or_else(|| {
                        Error::Corrupt(SealError::BadPayload {
                            name: log.clone(),
                            reason: "extent past the disk end".into(),
                        })
                    })?;
                let mut pos = e.disk_offset;
                while pos < end {
                    let block = pos / bs;
                    let at = pos % bs;
                    let take = (bs - at).min(end - pos);
                    pieces.entry(block).or_default().push(Piece {
                        log: li,
                        at: at as u32,
                        len: take as u32,
                        log_offset: e.log_offset + (pos - e.disk_offset),
                    });
                    pos += take;
                }
            }
        }
        Ok(PointReader {
            chunks,
            frames,
            vm_id: vm_id.into(),
            disk_id: disk_id.into(),
            base,
            logs,
            pieces,
        })
    }

    pub fn base(&self) -> &BlockMap {
        &self.base
    }

    /// Blocks some log of this point writes to.
    pub fn touched(&self) -> impl Iterator<Item = u64> + '_ {
        self.pieces.keys().copied()
    }

    pub fn is_touched(&self, index: u64) -> bool {
        self.pieces.contains_key(&index)
    }

    /// A block's content at this point, with its plain hash. Base chunks are verified (tag,
    /// name, map hash) and log frames by their tags.
    pub async fn read_block(&self, index: u64) -> Result<(Bytes, PlainHash)> {
        let entry = self.base.get(index).ok_or_else(|| {
            Error::invalid(
                "block_out_of_range",
                format!(
                    "block {index} is past the end of the disk ({} blocks)",
                    self.base.len()
                ),
            )
        })?;
        let len = block_len(self.base.disk_size(), self.base.block_size(), index) as usize;
        let mut data = match entry {
            MapEntry::Zero => vec![0u8; len],
            MapEntry::Data { name, hash } => {
                let (b, h) = self.chunks.get_block(&name).await?;
                if !h.ct_eq(&hash) {
                    return Err(Error::Corrupt(SealError::ContentMismatch {
                        name: name.to_hex(),
                    }));
                }
                b.to_vec()
            }
        };
        if let Some(ps) = self.pieces.get(&index) {
            for p in ps {
                let bytes = journal::read_log_range(
                    &self.chunks,
                    &self.frames,
                    &self.vm_id,
                    &self.disk_id,
                    &self.logs[p.log],
                    p.log_offset,
                    p.len as usize,
                )
                .await?;
                data[p.at as usize..p.at as usize + p.len as usize].copy_from_slice(&bytes);
            }
        }
        let data = Bytes::from(data);
        let d2 = data.clone();
        let hash = self.chunks.cpu().run(move || PlainHash::of(&d2)).await;
        Ok((data, hash))
    }
}
