//! The client side of the block-sync protocol resync and failback share: fetch the server's
//! hash of every block, read and hash the local disk, fetch 4 KiB fine hashes of the blocks
//! that differ (in batches), and hand each batch to the direction: a resync uploads patches to
//! the vault, a failback downloads ranges into the local disk. Completion (the digest each side
//! checks) is the direction's own, as its answer differs.

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;

use super::backoff::Backoff;
use super::AgentError;
use crate::chunk::PlainHash;
use crate::client::{Client, SyncFlow};
use crate::format::image::{DiskImage, ImageError};
use crate::replica::blockmap::{block_count, block_len};
use crate::replica::patch;
use crate::replica::sync::MAX_FINE_BLOCKS;
use crate::wire::FineRequest;

/// Blocks whose fine hashes are fetched in one request.
const BATCH_BLOCKS: usize = if MAX_FINE_BLOCKS < 16 {
    MAX_FINE_BLOCKS
} else {
    16
};

/// One block read from the local disk.
pub(crate) struct SourceBlock {
    pub index: u64,
    pub data: Vec<u8>,
    pub hash: PlainHash,
}

/// A block that differs, as a batch hands it to the direction.
pub(crate) struct Differing {
    pub block: SourceBlock,
    /// The server's hash of the block.
    pub theirs: PlainHash,
    /// The server's 4 KiB hashes of the block (empty when [`SyncParams::fine`] is off).
    pub fine: Bytes,
}

/// What a sync (or one batch of it) did.
#[derive(Debug, Clone, Default)]
pub(crate) struct SyncCounts {
    pub compared: u64,
    pub differing: u64,
    /// Blocks uploaded (resync) or written (failback).
    pub moved: u64,
    /// Disk bytes sent (patches) or received (ranges).
    pub bytes: u64,
    /// Block and fine hashes fetched from the server.
    pub hash_bytes: u64,
}

impl SyncCounts {
    fn add(&mut self, o: SyncCounts) {
        self.compared += o.compared;
        self.differing += o.differing;
        self.moved += o.moved;
        self.bytes += o.bytes;
        self.hash_bytes += o.hash_bytes;
    }
}

/// A direction of the sync.
pub(crate) trait Direction {
    /// A block whose hash differs from the server's `theirs` (or any block, when
    /// [`SyncParams::every_block`]): whether it goes into a batch, or was dealt with here.
    fn differs(
        &self,
        b: &SourceBlock,
        theirs: &PlainHash,
        counts: &mut SyncCounts,
    ) -> Result<bool, AgentError>;

    /// One batch of differing blocks.
    fn batch(&self, blocks: Vec<Differing>)
        -> impl Future<Output = Result<SyncCounts, AgentError>>;
}

pub(crate) struct SyncParams<'a> {
    pub client: &'a Client,
    pub backoff: &'a Backoff,
    pub flow: SyncFlow,
    pub vm: &'a str,
    pub disk: &'a str,
    /// The disk as the server sees it (the local image has the same size).
    pub size: u64,
    pub block_size: u32,
    pub blocks: u64,
    /// Fetch fine hashes of differing blocks (else every batch block is moved whole).
    pub fine: bool,
    /// Treat every block as differing (a failback with `--full`).
    pub every_block: bool,
    /// Batches in flight: two overlap the server's fine hashing of one with the transfer of
    /// the other.
    pub overlap: usize,
    /// Progress bar on the console, and its label.
    pub progress: bool,
    pub label: &'static str,
}

/// What the comparison found.
pub(crate) struct SyncOutcome {
    /// The local disk's block hashes, as read (before anything was written to it).
    pub ours: Vec<PlainHash>,
    /// The server's block hashes.
    pub theirs: Vec<PlainHash>,
    pub counts: SyncCounts,
}

/// Runs the comparison and the batches of one disk.
pub(crate) async fn run<D: Direction>(
    p: &SyncParams<'_>,
    image: Arc<dyn DiskImage>,
    direction: &D,
) -> Result<SyncOutcome, AgentError> {
    let theirs = fetch_block_hashes(p).await?;
    let mut counts = SyncCounts {
        hash_bytes: theirs.len() as u64 * 32,
        ..Default::default()
    };
    let bar = crate::progress::progress_bar(p.progress, p.size, p.label);
    let mut rx = read_blocks(image, p.block_size, 8);
    let mut ours = Vec::with_capacity(p.blocks as usize);
    let mut inflight = futures_util::stream::FuturesUnordered::new();
    let mut batch: Vec<(SourceBlock, PlainHash)> = Vec::new();
    while let Some(b) = rx.recv().await {
        let b = b.map_err(AgentError::image)?;
        bar.inc(b.data.len() as u64);
        counts.compared += 1;
        ours.push(b.hash);
        let want = theirs
            .get(b.index as usize)
            .ok_or_else(|| AgentError::Invalid("block past the hashes".into()))?;
        if !p.every_block && b.hash.ct_eq(want) {
            continue;
        }
        counts.differing += 1;
        if !direction.differs(&b, want, &mut counts)? {
            continue;
        }
        let want = *want;
        batch.push((b, want));
        if batch.len() >= BATCH_BLOCKS {
            inflight.push(send_batch(p, direction, std::mem::take(&mut batch)));
            while inflight.len() >= p.overlap.max(1) {
                if let Some(r) = inflight.next().await {
                    counts.add(r?);
                }
            }
        }
    }
    if !batch.is_empty() {
        inflight.push(send_batch(p, direction, batch));
    }
    while let Some(r) = inflight.next().await {
        counts.add(r?);
    }
    bar.finish_and_clear();
    if ours.len() as u64 != p.blocks {
        return Err(AgentError::Invalid(format!(
            "reading disk {} stopped early",
            p.disk
        )));
    }
    Ok(SyncOutcome {
        ours,
        theirs,
        counts,
    })
}

/// Fine hashes of a batch (when wanted), then the direction's transfer.
async fn send_batch<D: Direction>(
    p: &SyncParams<'_>,
    direction: &D,
    batch: Vec<(SourceBlock, PlainHash)>,
) -> Result<SyncCounts, AgentError> {
    let mut hash_bytes = 0;
    let blocks = if p.fine {
        let req = FineRequest {
            blocks: batch.iter().map(|(b, _)| b.index).collect(),
        };
        let fine = p
            .backoff
            .retry("fine hashes", || {
                p.client.sync_fine(p.flow, p.vm, p.disk, &req)
            })
            .await?;
        hash_bytes = fine.len() as u64;
        let mut at = 0usize;
        let mut out = Vec::with_capacity(batch.len());
        for (block, theirs) in batch {
            let n = block.data.len().div_ceil(patch::FINE) * patch::FINE_HASH_LEN;
            if fine.len() < at + n {
                return Err(AgentError::Invalid(format!(
                    "the server sent {} bytes of fine hashes, fewer than the blocks need",
                    fine.len()
                )));
            }
            out.push(Differing {
                block,
                theirs,
                fine: fine.slice(at..at + n),
            });
            at += n;
        }
        out
    } else {
        batch
            .into_iter()
            .map(|(block, theirs)| Differing {
                block,
                theirs,
                fine: Bytes::new(),
            })
            .collect()
    };
    let mut counts = direction.batch(blocks).await?;
    counts.hash_bytes += hash_bytes;
    Ok(counts)
}

/// Reads and hashes every block of an image on a blocking thread, in order, through a bounded
/// channel (memory: `depth` blocks).
pub(crate) fn read_blocks(
    image: Arc<dyn DiskImage>,
    block_size: u32,
    depth: usize,
) -> tokio::sync::mpsc::Receiver<Result<SourceBlock, ImageError>> {
    let (tx, rx) = tokio::sync::mpsc::channel(depth);
    tokio::task::spawn_blocking(move || {
        let size = image.virtual_size();
        for index in 0..block_count(size, block_size) {
            let len = block_len(size, block_size, index) as usize;
            let mut data = vec![0u8; len];
            let r = image
                .read_at(&mut data, index * block_size as u64)
                .map(|_| {
                    let hash = PlainHash::of(&data);
                    SourceBlock { index, data, hash }
                });
            let failed = r.is_err();
            if tx.blocking_send(r).is_err() || failed {
                return;
            }
        }
    });
    rx
}

/// One plain BLAKE3 per block of the server's side of the comparison.
async fn fetch_block_hashes(p: &SyncParams<'_>) -> Result<Vec<PlainHash>, AgentError> {
    let raw = p
        .backoff
        .retry("block hashes", || {
            p.client.sync_hashes(p.flow, p.vm, p.disk)
        })
        .await?;
    split_hashes(&raw, p.blocks)
}

/// Splits a concatenation of per-block 32-byte hashes.
fn split_hashes(b: &[u8], blocks: u64) -> Result<Vec<PlainHash>, AgentError> {
    if b.len() as u64 != blocks * 32 {
        return Err(AgentError::Invalid(format!(
            "the server sent {} bytes of block hashes for {blocks} blocks",
            b.len()
        )));
    }
    Ok(b.chunks(32)
        .map(|c| {
            let mut h = [0u8; 32];
            h.copy_from_slice(c);
            PlainHash(h)
        })
        .collect())
}
