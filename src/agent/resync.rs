//! `drvault agent resync`: bring the replica of one disk in line with the source file, sending
//! only what differs (see `protection::resync` for the server's side).
//!
//! The agent fetches the hash of every block as the session holds it, reads and hashes its own
//! disk, and for the blocks that differ fetches 4 KiB fine hashes (in batches) and uploads one
//! patch per block with the hash of the whole new block. Everything it needs to resume lives on
//! the server: a rerun after any interruption compares again and skips what already arrived.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use super::backoff::Backoff;
use super::AgentError;
use crate::api::routes::BLAKE3_HEADER;
use crate::chunk::PlainHash;
use crate::client::Client;
use crate::format::image::{DiskImage, ImageError, SourceFormat};
use crate::replica::blockmap::{block_count, block_len};
use crate::replica::patch;
use crate::replica::resync::{
    DigestRequest, FineRequest, PatchAck, ResyncCompletion, ResyncDiskView, SessionState,
    MAX_FINE_BLOCKS,
};

pub struct ResyncOptions {
    pub vm: String,
    pub disk: String,
    /// Patch uploads in flight.
    pub parallel: usize,
    pub backoff: Backoff,
    pub progress: bool,
    /// What the source disk is read as.
    pub format: SourceFormat,
}

/// What one disk's resync did.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ResyncSummary {
    pub vm: String,
    pub disk: String,
    pub session: String,
    pub size: u64,
    pub blocks_compared: u64,
    pub blocks_differing: u64,
    pub blocks_uploaded: u64,
    /// Patch bytes sent (data of differing 4 KiB pieces plus 9 bytes per range).
    pub bytes_uploaded: u64,
    /// Block and fine hashes fetched from the server.
    pub hash_bytes_downloaded: u64,
    pub seconds: f64,
    /// Session state after this disk completed (`committed` once every disk is in).
    pub state: String,
    pub cycle: Option<u64>,
    pub waiting_for: Vec<String>,
}

/// One block read from the source.
pub(crate) struct SourceBlock {
    pub index: u64,
    pub data: Vec<u8>,
    pub hash: PlainHash,
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

/// Fetches `{base}/hashes`: one plain BLAKE3 per block of the server's side of the comparison.
pub(crate) async fn fetch_block_hashes(
    client: &Client,
    backoff: &Backoff,
    base: &str,
    blocks: u64,
) -> Result<Vec<PlainHash>, AgentError> {
    let raw = backoff
        .retry("block hashes", || async {
            client
                .get_bytes(&format!("{base}/hashes"))
                .await
                .map(|r| r.0)
        })
        .await?;
    split_hashes(&raw, blocks)
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

pub async fn resync(
    client: &Client,
    path: &Path,
    opts: &ResyncOptions,
) -> Result<ResyncSummary, AgentError> {
    let t0 = Instant::now();
    let src = super::protect::open_disk(path, Some(opts.disk.clone()), opts.format)?;
    let base = format!("/v1/agent/vms/{}/disks/{}/resync", opts.vm, opts.disk);
    // A scheduled session is not retried here: the window may be hours away.
    let view: ResyncDiskView = match client.get_json(&base).await {
        Ok(v) => v,
        Err(e) if e.code() == Some("resync_scheduled") => return Err(AgentError::Client(e)),
        Err(_) => {
            opts.backoff
                .retry("resync session", || client.get_json(&base))
                .await?
        }
    };
    let size = src.image.virtual_size();
    if size != view.size {
        return Err(AgentError::Disk {
            path: path.display().to_string(),
            message: format!(
                "virtual size {size} differs from the replica's {}: a resized disk needs a new initial replication",
                view.size
            ),
        });
    }
    let mut summary = ResyncSummary {
        vm: opts.vm.clone(),
        disk: opts.disk.clone(),
        session: view.session.clone(),
        size,
        ..Default::default()
    };
    if view.state == SessionState::Committed {
        // The session this disk belonged to already switched the replica (this agent, or an
        // earlier run of it, was stopped after completing): nothing to compare or send.
        summary.state = view.state.word().to_string();
        summary.cycle = view.commit_cycle;
        summary.seconds = t0.elapsed().as_secs_f64();
        return Ok(summary);
    }
    let theirs = fetch_block_hashes(client, &opts.backoff, &base, view.blocks).await?;
    summary.hash_bytes_downloaded += theirs.len() as u64 * 32;

    let bar = super::protect::progress_bar(opts.progress, size, "resync");
    let mut rx = read_blocks(src.image.clone(), view.block_size, 8);
    let mut ours = Vec::with_capacity(view.blocks as usize);
    let mut inflight = futures_util::stream::FuturesUnordered::new();
    let mut batch: Vec<SourceBlock> = Vec::new();
    while let Some(b) = rx.recv().await {
        let b = b.map_err(AgentError::image)?;
        bar.inc(b.data.len() as u64);
        summary.blocks_compared += 1;
        ours.push(b.hash);
        let same = theirs
            .get(b.index as usize)
            .map(|h| h.ct_eq(&b.hash))
            .unwrap_or(false);
        if !same {
            batch.push(b);
            if batch.len() >= MAX_FINE_BLOCKS.min(16) {
                inflight.push(send_batch(client, &base, opts, std::mem::take(&mut batch)));
                // Two batches overlap: one's fine hashes are computed on the server while the
                // other's patches upload.
                while inflight.len() >= 2 {
                    if let Some(r) = inflight.next().await {
                        r?.add_to(&mut summary);
                    }
                }
            }
        }
    }
    if !batch.is_empty() {
        inflight.push(send_batch(client, &base, opts, batch));
    }
    while let Some(r) = inflight.next().await {
        r?.add_to(&mut summary);
    }
    bar.finish_and_clear();
    if ours.len() as u64 != view.blocks {
        return Err(AgentError::Disk {
            path: path.display().to_string(),
            message: "reading the disk stopped early".into(),
        });
    }
    let req = DigestRequest {
        digest: crate::replica::resync::digest_of(&ours).to_hex(),
    };
    let url_complete = format!("{base}/complete");
    let done: ResyncCompletion = opts
        .backoff
        .retry("complete resync", || {
            client.send_json(reqwest::Method::POST, &url_complete, &req)
        })
        .await?;
    summary.state = done.state.word().to_string();
    summary.cycle = done.cycle;
    summary.waiting_for = done.waiting_for;
    summary.seconds = t0.elapsed().as_secs_f64();
    Ok(summary)
}

/// What one batch did, added to the summary when it finishes.
#[derive(Default)]
struct BatchCounts {
    differing: u64,
    uploaded: u64,
    bytes_uploaded: u64,
    hash_bytes: u64,
}

impl BatchCounts {
    fn add_to(self, s: &mut ResyncSummary) {
        s.blocks_differing += self.differing;
        s.blocks_uploaded += self.uploaded;
        s.bytes_uploaded += self.bytes_uploaded;
        s.hash_bytes_downloaded += self.hash_bytes;
    }
}

/// Fine hashes for a batch of differing blocks, then one patch per block.
async fn send_batch(
    client: &Client,
    base: &str,
    opts: &ResyncOptions,
    batch: Vec<SourceBlock>,
) -> Result<BatchCounts, AgentError> {
    let mut summary = BatchCounts {
        differing: batch.len() as u64,
        ..Default::default()
    };
    let req = FineRequest {
        blocks: batch.iter().map(|b| b.index).collect(),
    };
    let url_fine = format!("{base}/fine");
    let fine = opts
        .backoff
        .retry("fine hashes", || client.post_json_bytes(&url_fine, &req))
        .await?;
    summary.hash_bytes += fine.len() as u64;
    let mut at = 0usize;
    let mut patches = Vec::with_capacity(batch.len());
    for b in batch {
        let n = b.data.len().div_ceil(patch::FINE) * patch::FINE_HASH_LEN;
        let theirs = fine.get(at..at + n).ok_or_else(|| {
            AgentError::Invalid(format!(
                "the server sent {} bytes of fine hashes, fewer than the blocks need",
                fine.len()
            ))
        })?;
        at += n;
        let ranges = patch::differing_ranges(&b.data, theirs);
        patches.push((
            b.index,
            b.hash,
            Bytes::from(patch::encode(&b.data, &ranges)),
        ));
    }
    let mut uploads = futures_util::stream::iter(patches.into_iter().map(|(index, hash, body)| {
        let path = format!("{base}/blocks/{index}");
        let headers = [(BLAKE3_HEADER, hash.to_hex())];
        async move {
            let len = body.len() as u64;
            opts.backoff
                .retry("upload patch", || {
                    client.put_bytes::<PatchAck>(&path, &headers, body.clone())
                })
                .await
                .map(|a| (len, a))
        }
    }))
    .buffer_unordered(opts.parallel.max(1));
    while let Some(r) = uploads.next().await {
        let (len, ack) = r?;
        if ack.outcome != "already_received" {
            summary.uploaded += 1;
            summary.bytes_uploaded += len;
        }
    }
    Ok(summary)
}
