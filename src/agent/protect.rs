//! `drvault agent protect`: enable protection for a VM and replicate its disks in full, one disk
//! after the other (the seed's order).
//!
//! Per disk: a reader thread walks the blocks, skipping those entirely outside the image's
//! allocated ranges without reading them, reads the rest, drops all-zero blocks, and hashes the
//! others; windows of blocks are checked against the server ("which of these do you lack?") so an
//! interrupted replication resumes with only what is missing; missing blocks are uploaded with
//! several requests in flight. Completion sends the runs of data blocks and a digest over every
//! block's hash, which the server checks against what it received.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use super::backoff::Backoff;
use super::AgentError;
use crate::chunk::digest::is_zero;
use crate::chunk::PlainHash;
use crate::client::Client;
use crate::format::image::{DiskImage, SourceFormat};
use crate::replica::blockmap::{block_count, block_len};
use crate::wire::{
    CompleteRequest, DiskSpec, NicSpec, Policy, QueryBlock, ReceivedQuery, VmSpec, VmView,
};

/// One disk to protect: the image and its id.
pub struct DiskSource {
    pub id: String,
    pub path: PathBuf,
    pub image: Arc<dyn DiskImage>,
}

pub struct ProtectOptions {
    pub vm: String,
    pub generation: u8,
    pub cpus: u32,
    pub memory_mib: u64,
    pub nics: Vec<NicSpec>,
    pub policy: Option<Policy>,
    /// Uploads in flight per disk.
    pub parallel: usize,
    pub backoff: Backoff,
    pub progress: bool,
    /// When set, the seconds each block upload took (retries included) are appended here;
    /// `drvault bench` reads them for latency percentiles.
    pub upload_latencies: Option<Arc<std::sync::Mutex<Vec<f64>>>>,
    /// Bandwidth limit on block bodies (`drvault agent run`'s schedule), if any.
    pub throttle: Option<Arc<super::run::schedule::Throttle>>,
}

/// What one disk's replication did.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DiskSummary {
    pub id: String,
    pub size: u64,
    pub blocks: u64,
    pub data_blocks: u64,
    pub zero_blocks: u64,
    /// Data blocks the server already had (resumed replication).
    pub already_on_server: u64,
    pub uploaded_blocks: u64,
    pub uploaded_bytes: u64,
    /// Bytes the uploaded blocks took on the wire (compressed unless compression is off).
    #[serde(default)]
    pub wire_bytes: u64,
    pub deduplicated_blocks: u64,
    /// Bytes the server wrote after compression and encryption.
    pub stored_bytes: u64,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProtectSummary {
    pub vm: String,
    pub state: String,
    pub disks: Vec<DiskSummary>,
    pub seconds: f64,
}

/// Opens a disk image as `format` says (`Auto`: from its name, else its content).
pub fn open_disk(
    path: &std::path::Path,
    id: Option<String>,
    format: SourceFormat,
) -> Result<DiskSource, AgentError> {
    let image = crate::format::image::open_as(path, format)?;
    let id = match id {
        Some(i) => i,
        None => path
            .file_stem()
            .and_then(|s| s.to_str())
            .map(String::from)
            .ok_or_else(|| AgentError::Disk {
                path: path.display().to_string(),
                message: "cannot derive a disk id from the file name; give one as PATH:ID".into(),
            })?,
    };
    if !crate::vault::registry::valid_name(&id) {
        return Err(AgentError::Invalid(format!(
            "disk id {id:?}: use 1-64 characters from A-Z a-z 0-9 . _ -; give one as PATH:ID"
        )));
    }
    let size = image.virtual_size();
    if size == 0 || size % 512 != 0 {
        return Err(AgentError::Disk {
            path: path.display().to_string(),
            message: format!("virtual size {size} is not a whole number of 512-byte sectors"),
        });
    }
    Ok(DiskSource {
        id,
        path: path.to_path_buf(),
        image: Arc::from(image),
    })
}

pub async fn protect(
    client: &Client,
    disks: &[DiskSource],
    opts: &ProtectOptions,
) -> Result<ProtectSummary, AgentError> {
    let start = Instant::now();
    let spec = VmSpec {
        generation: opts.generation,
        cpus: opts.cpus,
        memory_mib: opts.memory_mib,
        disks: disks
            .iter()
            .map(|d| DiskSpec {
                id: d.id.clone(),
                size: d.image.virtual_size(),
            })
            .collect(),
        nics: opts.nics.clone(),
        policy: opts.policy.clone(),
    };
    let view: VmView = opts
        .backoff
        .retry("enable protection", || {
            client.enable_protection(&opts.vm, &spec)
        })
        .await?;
    for w in &view.health_reasons {
        tracing::warn!(vm = %opts.vm, "{w}");
    }
    let mut summaries = Vec::new();
    for d in disks {
        let dv = view
            .disks
            .iter()
            .find(|x| x.id == d.id)
            .ok_or_else(|| AgentError::Invalid(format!("server did not list disk {}", d.id)))?;
        let was_complete = dv.state == crate::wire::DiskState::Complete;
        summaries
            .push(replicate_disk(client, &opts.vm, d, dv.block_size, was_complete, opts).await?);
    }
    let view: VmView = opts
        .backoff
        .retry("read VM state", || client.agent_vm(&opts.vm))
        .await?;
    Ok(ProtectSummary {
        vm: opts.vm.clone(),
        state: serde_json::to_value(view.state)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default(),
        disks: summaries,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// One block as the reader produced it.
enum Item {
    /// A run of consecutive all-zero (or unallocated) blocks. Zero blocks are sent as runs so
    /// that they do not take the channel's slots: a disk that is mostly empty between its data
    /// blocks would otherwise hold the reader back to one window of blocks ahead of the
    /// uploads, and the empty reads would not overlap them.
    Zeros {
        first: u64,
        count: u64,
    },
    Data {
        index: u64,
        data: Bytes,
        hash: PlainHash,
    },
    Failed(AgentError),
}

async fn replicate_disk(
    client: &Client,
    vm: &str,
    d: &DiskSource,
    block_size: u32,
    was_complete: bool,
    opts: &ProtectOptions,
) -> Result<DiskSummary, AgentError> {
    let start = Instant::now();
    let size = d.image.virtual_size();
    let mut sum = DiskSummary {
        id: d.id.clone(),
        size,
        blocks: block_count(size, block_size),
        ..Default::default()
    };
    // Up to three passes: a pass after the server reports missing or changed blocks resends them.
    for pass in 0..3 {
        let (hashes, runs) = upload_pass(client, vm, d, block_size, opts, &mut sum).await?;
        let digest = disk_digest(&hashes, size, block_size);
        let req = CompleteRequest {
            data_runs: runs,
            digest: digest.to_hex(),
        };
        match opts
            .backoff
            .retry("complete disk", || client.complete_disk(vm, &d.id, &req))
            .await
        {
            Ok(_) => {
                sum.seconds = start.elapsed().as_secs_f64();
                return Ok(sum);
            }
            Err(AgentError::Client(e))
                if pass < 2
                    && matches!(e.code(), Some("blocks_missing") | Some("digest_mismatch")) =>
            {
                tracing::warn!(disk = %d.id, error = %e, "server lacks blocks; resuming");
            }
            // Declared again (a disk added to the VM, or the VM moved to another host of its
            // cluster): a disk replicated before has changed since, and its changes travel as
            // logs. The pass still re-sent any block of a chunk verify found damaged.
            Err(AgentError::Client(e))
                if was_complete && e.code() == Some("replication_complete") =>
            {
                tracing::info!(disk = %d.id, "replicated before; later changes travel as logs");
                sum.seconds = start.elapsed().as_secs_f64();
                return Ok(sum);
            }
            Err(e) => return Err(e),
        }
    }
    Err(AgentError::Invalid(format!(
        "disk {}: the server still reports missing blocks after three passes",
        d.id
    )))
}

/// Reads the whole disk once, uploads what the server lacks. Returns every block's hash (None
/// for zero blocks) and the runs of data blocks.
async fn upload_pass(
    client: &Client,
    vm: &str,
    d: &DiskSource,
    block_size: u32,
    opts: &ProtectOptions,
    sum: &mut DiskSummary,
) -> Result<(Vec<Option<PlainHash>>, Vec<(u64, u64)>), AgentError> {
    let size = d.image.virtual_size();
    let nblocks = block_count(size, block_size);
    let parallel = opts.parallel.max(1);
    let window = (parallel * 4).max(8);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Item>(window);
    let image = d.image.clone();
    let reader = tokio::task::spawn_blocking(move || read_blocks(&*image, block_size, tx));

    let bar = crate::progress::progress_bar(opts.progress, size, &d.id);
    let mut hashes: Vec<Option<PlainHash>> = vec![None; nblocks as usize];
    let (mut data_blocks, mut zero_blocks) = (0u64, 0u64);
    let mut done = false;
    while !done {
        // Collect one window of blocks.
        let mut batch: Vec<(u64, Bytes, PlainHash)> = Vec::with_capacity(window);
        while batch.len() < window {
            match rx.recv().await {
                Some(Item::Zeros { first, count }) => {
                    zero_blocks += count;
                    let start = first.saturating_mul(u64::from(block_size)).min(size);
                    let end = first
                        .saturating_add(count)
                        .saturating_mul(u64::from(block_size))
                        .min(size);
                    bar.inc(end - start);
                }
                Some(Item::Data { index, data, hash }) => {
                    hashes[index as usize] = Some(hash);
                    data_blocks += 1;
                    batch.push((index, data, hash));
                }
                Some(Item::Failed(e)) => return Err(e),
                None => {
                    done = true;
                    break;
                }
            }
        }
        if batch.is_empty() {
            continue;
        }
        let q = ReceivedQuery {
            blocks: batch
                .iter()
                .map(|(i, _, h)| QueryBlock {
                    index: *i,
                    hash: h.to_hex(),
                })
                .collect(),
        };
        let missing = opts
            .backoff
            .retry("query blocks", || client.query_blocks(vm, &d.id, &q))
            .await?;
        let missing: std::collections::HashSet<u64> = missing.missing.into_iter().collect();
        let mut uploads = Vec::new();
        for (index, data, hash) in batch {
            if missing.contains(&index) {
                uploads.push((index, data, hash));
            } else {
                sum.already_on_server += 1;
                bar.inc(block_len(size, block_size, index));
            }
        }
        let mut stream =
            futures_util::stream::iter(uploads.into_iter().map(|(index, data, hash)| {
                let hash = hash.to_hex();
                let disk = &d.id;
                let backoff = opts.backoff.clone();
                let latencies = opts.upload_latencies.clone();
                let throttle = opts.throttle.clone();
                async move {
                    let len = data.len() as u64;
                    let body = client.encode_body(data).await;
                    // The throttle limits the link: it counts bytes on the wire.
                    if let Some(t) = &throttle {
                        t.take(body.wire_len()).await;
                    }
                    let wire = body.wire_len();
                    let t = Instant::now();
                    let r = backoff
                        .retry("upload block", || {
                            client.put_block(vm, disk, index, &hash, &body)
                        })
                        .await;
                    if let Some(l) = &latencies {
                        // A poisoned lock only means another upload panicked: keep recording.
                        let mut v = l.lock().unwrap_or_else(|e| e.into_inner());
                        v.push(t.elapsed().as_secs_f64());
                    }
                    (len, wire, r)
                }
            }))
            .buffer_unordered(parallel);
        while let Some((len, wire, r)) = stream.next().await {
            let ack = r?;
            sum.uploaded_blocks += 1;
            sum.uploaded_bytes += len;
            sum.wire_bytes += wire;
            sum.stored_bytes += ack.stored_bytes;
            if ack.outcome == "deduplicated" {
                sum.deduplicated_blocks += 1;
            }
            bar.inc(len);
        }
    }
    bar.finish_and_clear();
    reader
        .await
        .map_err(|e| AgentError::Invalid(format!("disk reader stopped: {e}")))?;
    sum.data_blocks = data_blocks;
    sum.zero_blocks = zero_blocks;
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for (i, h) in hashes.iter().enumerate() {
        if h.is_some() {
            match runs.last_mut() {
                Some((f, c)) if *f + *c == i as u64 => *c += 1,
                _ => runs.push((i as u64, 1)),
            }
        }
    }
    Ok((hashes, runs))
}

/// Bytes read (and checked for zeros) at a time: small enough that the zero check finds them
/// still in the CPU cache, large enough that the read calls cost nothing next to the copy.
const READ_PIECE: usize = 512 << 10;

/// Longest zero run the reader holds back, so the progress bar still moves on empty disks.
const MAX_ZERO_RUN: u64 = 256;

/// The reader thread: never reads blocks outside allocated ranges, never sends zero blocks.
fn read_blocks(image: &dyn DiskImage, block_size: u32, tx: tokio::sync::mpsc::Sender<Item>) {
    let size = image.virtual_size();
    let nblocks = block_count(size, block_size);
    let ranges = match image.allocated_ranges() {
        Ok(r) => r,
        Err(e) => {
            let _ = tx.blocking_send(Item::Failed(AgentError::image(e)));
            return;
        }
    };
    let mut r = 0usize;
    // Kept while the blocks read into it are zero: no allocation per empty block.
    let mut buf: Vec<u8> = Vec::new();
    // The pending run of zero blocks: (first, count).
    let mut zeros: Option<(u64, u64)> = None;
    let flush = |zeros: &mut Option<(u64, u64)>| match zeros.take() {
        Some((first, count)) => tx.blocking_send(Item::Zeros { first, count }).is_ok(),
        None => true,
    };
    for index in 0..nblocks {
        let start = index * block_size as u64;
        let len = block_len(size, block_size, index);
        let end = start + len;
        while r < ranges.len() && ranges[r].end <= start {
            r += 1;
        }
        let allocated = r < ranges.len() && ranges[r].start < end;
        let data = if !allocated {
            Ok(false)
        } else {
            if buf.len() as u64 != len {
                buf = vec![0u8; len as usize];
            }
            read_checking_zero(image, &mut buf, start)
        };
        match data {
            Ok(false) => {
                zeros = match zeros {
                    Some((first, count)) if count < MAX_ZERO_RUN => Some((first, count + 1)),
                    Some(_) => {
                        if !flush(&mut zeros) {
                            return;
                        }
                        Some((index, 1))
                    }
                    None => Some((index, 1)),
                };
            }
            Ok(true) => {
                let hash = PlainHash::of(&buf);
                let data = Bytes::from(std::mem::take(&mut buf));
                if !flush(&mut zeros) || tx.blocking_send(Item::Data { index, data, hash }).is_err()
                {
                    return;
                }
            }
            Err(e) => {
                let _ = flush(&mut zeros);
                let _ = tx.blocking_send(Item::Failed(AgentError::image(e)));
                return;
            }
        }
    }
    flush(&mut zeros);
}

/// Fills `buf` from `offset` in cache-sized pieces, checking each for zeros while it is still
/// in the cache; true when any byte is non-zero.
fn read_checking_zero(
    image: &dyn DiskImage,
    buf: &mut [u8],
    offset: u64,
) -> Result<bool, crate::format::image::ImageError> {
    let mut data = false;
    let mut at = offset;
    for piece in buf.chunks_mut(READ_PIECE) {
        image.read_at(piece, at)?;
        data = data || !is_zero(piece);
        at += piece.len() as u64;
    }
    Ok(data)
}

/// BLAKE3 over every block's plain hash in order; zero blocks contribute the hash of their
/// zero bytes (the server computes the same from its receipts).
pub fn disk_digest(hashes: &[Option<PlainHash>], size: u64, block_size: u32) -> PlainHash {
    let zero_full = PlainHash::of(&vec![0u8; block_size as usize]);
    let mut h = blake3::Hasher::new();
    for (i, x) in hashes.iter().enumerate() {
        let v = match x {
            Some(v) => *v,
            None => {
                let len = block_len(size, block_size, i as u64);
                if len == block_size as u64 {
                    zero_full
                } else {
                    PlainHash::of(&vec![0u8; len as usize])
                }
            }
        };
        h.update(&v.0);
    }
    PlainHash(*h.finalize().as_bytes())
}
