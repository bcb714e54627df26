//! `drvault agent resync`: bring the replica of one disk in line with the source file, sending
//! only what differs (see `protection::resync` for the server's side).
//!
//! The agent fetches the hash of every block as the session holds it, reads and hashes its own
//! disk, and for the blocks that differ fetches 4 KiB fine hashes (in batches) and uploads one
//! patch per block with the hash of the whole new block. Everything it needs to resume lives on
//! the server: a rerun after any interruption compares again and skips what already arrived.

use std::path::Path;
use std::time::Instant;

use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use super::backoff::Backoff;
use super::sync::{Differing, Direction, SourceBlock, SyncCounts, SyncParams};
use super::AgentError;
use crate::chunk::PlainHash;
use crate::client::{Client, SyncFlow};
use crate::format::image::SourceFormat;
use crate::replica::patch;
use crate::wire::{DigestRequest, ResyncDiskView, ResyncState};

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

pub async fn resync(
    client: &Client,
    path: &Path,
    opts: &ResyncOptions,
) -> Result<ResyncSummary, AgentError> {
    let t0 = Instant::now();
    let src = super::protect::open_disk(path, Some(opts.disk.clone()), opts.format)?;
    // A scheduled session is not retried here: the window may be hours away.
    let view: ResyncDiskView = match client.resync_view(&opts.vm, &opts.disk).await {
        Ok(v) => v,
        Err(e) if e.code() == Some("resync_scheduled") => return Err(AgentError::Client(e)),
        Err(_) => {
            opts.backoff
                .retry("resync session", || {
                    client.resync_view(&opts.vm, &opts.disk)
                })
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
    if view.state == ResyncState::Committed {
        // The session this disk belonged to already switched the replica (this agent, or an
        // earlier run of it, was stopped after completing): nothing to compare or send.
        summary.state = view.state.word().to_string();
        summary.cycle = view.commit_cycle;
        summary.seconds = t0.elapsed().as_secs_f64();
        return Ok(summary);
    }
    let params = SyncParams {
        client,
        backoff: &opts.backoff,
        flow: SyncFlow::Resync,
        vm: &opts.vm,
        disk: &opts.disk,
        size,
        block_size: view.block_size,
        blocks: view.blocks,
        fine: true,
        every_block: false,
        overlap: 2,
        progress: opts.progress,
        label: "resync",
    };
    let outcome = super::sync::run(&params, src.image.clone(), &Upload { client, opts }).await?;
    let n = outcome.counts;
    summary.blocks_compared = n.compared;
    summary.blocks_differing = n.differing;
    summary.blocks_uploaded = n.moved;
    summary.bytes_uploaded = n.bytes;
    summary.hash_bytes_downloaded = n.hash_bytes;
    let req = DigestRequest {
        digest: crate::replica::sync::digest_of(&outcome.ours).to_hex(),
    };
    let done = opts
        .backoff
        .retry("complete resync", || {
            client.resync_complete(&opts.vm, &opts.disk, &req)
        })
        .await?;
    summary.state = done.state.word().to_string();
    summary.cycle = done.cycle;
    summary.waiting_for = done.waiting_for;
    summary.seconds = t0.elapsed().as_secs_f64();
    Ok(summary)
}

/// A resync's direction: each differing block goes to the vault as a patch of the ranges
/// whose fine hashes differ, with the hash of the whole new block.
struct Upload<'a> {
    client: &'a Client,
    opts: &'a ResyncOptions,
}

impl Direction for Upload<'_> {
    fn differs(
        &self,
        _: &SourceBlock,
        _: &PlainHash,
        _: &mut SyncCounts,
    ) -> Result<bool, AgentError> {
        Ok(true)
    }

    async fn batch(&self, blocks: Vec<Differing>) -> Result<SyncCounts, AgentError> {
        let (client, opts) = (self.client, self.opts);
        let patches = blocks.into_iter().map(|d| {
            let b = d.block;
            let ranges = patch::differing_ranges(&b.data, &d.fine);
            (
                b.index,
                b.hash,
                Bytes::from(patch::encode(&b.data, &ranges)),
            )
        });
        let mut uploads = futures_util::stream::iter(patches.map(|(index, hash, body)| {
            let hash = hash.to_hex();
            async move {
                let len = body.len() as u64;
                let body = client.encode_body(body).await;
                opts.backoff
                    .retry("upload patch", || {
                        client.resync_put_patch(&opts.vm, &opts.disk, index, &hash, &body)
                    })
                    .await
                    .map(|a| (len, a))
            }
        }))
        .buffer_unordered(opts.parallel.max(1));
        let mut counts = SyncCounts::default();
        while let Some(r) = uploads.next().await {
            let (len, ack) = r?;
            if ack.outcome != "already_received" {
                counts.moved += 1;
                counts.bytes += len;
            }
        }
        Ok(counts)
    }
}
