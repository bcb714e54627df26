//! Initial replication of one disk: a *session* of block uploads.
//!
//! Each accepted block is stored as a chunk (or recognised as zero / a duplicate) and then a small
//! sealed *receipt* is written at `stage/<vm>/<disk>/<session>/<index>`: chunk first, receipt
//! second, acknowledgement last, so an acknowledged block is durable and reachable (invariant 1).
//! The agent resumes an interrupted replication by asking which of its blocks (index + plain
//! hash) the session lacks. Completion checks that every block the agent says holds data has a
//! receipt and that a digest over all block hashes matches the agent's, builds the disk's block
//! map from the receipts, and switches the disk record to it in one versioned update.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::Mutex;

use super::{DiskRecord, DiskState, Protection};
use crate::chunk::{ChunkName, PlainHash};
use crate::error::{Error, Result};
use crate::file_formats::ObjectKind;
use crate::jobs::JobState;
use crate::replica::blockmap::{block_len, BlockMap, MapEntry};
use crate::store::PutOutcome;
use crate::vault::layout;
pub use crate::wire::{BlockAck, CompleteRequest, QueryBlock, ReceivedQuery};

/// Receipt plaintext: chunk name (32, zero for a zero block) ‖ plain hash (32) ‖ length (u64 LE).
const RECEIPT_LEN: usize = 72;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Receipt {
    pub name: Option<ChunkName>,
    pub hash: PlainHash,
}

/// Parses a receipt's plaintext; `None` when it is not `RECEIPT_LEN` bytes.
pub(crate) fn parse_receipt(plain: &[u8]) -> Option<Receipt> {
    if plain.len() != RECEIPT_LEN {
        return None;
    }
    let n: [u8; 32] = crate::format::array_at(plain, 0);
    let h: [u8; 32] = crate::format::array_at(plain, 32);
    Some(Receipt {
        name: (n != [0u8; 32]).then_some(ChunkName(n)),
        hash: PlainHash(h),
    })
}

struct SessionState {
    session: String,
    received: BTreeMap<u64, Receipt>,
    /// Sealed bytes stored and plain bytes deduplicated by this process's uploads. Receipts do
    /// not record how a block was taken, so blocks received before a server restart are not
    /// counted: the figures are for the operator's eye, nothing depends on them.
    stored_bytes: u64,
    deduplicated_bytes: u64,
}

type SharedState = Arc<Mutex<SessionState>>;

/// In-memory view of open sessions, rebuilt from receipts on first use after a restart.
#[derive(Clone, Default)]
pub struct Sessions {
    open: Arc<Mutex<HashMap<(String, String), SharedState>>>,
    /// Recently read block maps by root name (immutable objects, so never stale).
    pub(crate) maps: Arc<Mutex<HashMap<String, Arc<BlockMap>>>>,
}

impl Sessions {
    pub async fn received_count(&self, vm_id: &str, disk_id: &str) -> u64 {
        let s = self
            .open
            .lock()
            .await
            .get(&(vm_id.to_string(), disk_id.to_string()))
            .cloned();
        match s {
            Some(s) => s.lock().await.received.len() as u64,
            None => 0,
        }
    }

    /// (stored, deduplicated) bytes of the open session, see [`SessionState`].
    pub async fn written(&self, vm_id: &str, disk_id: &str) -> (u64, u64) {
        let s = self
            .open
            .lock()
            .await
            .get(&(vm_id.to_string(), disk_id.to_string()))
            .cloned();
        match s {
            Some(s) => {
                let s = s.lock().await;
                (s.stored_bytes, s.deduplicated_bytes)
            }
            None => (0, 0),
        }
    }
}

/// Largest resume query accepted in one request.
pub const MAX_QUERY_BLOCKS: usize = 65_536;

impl Protection {
    async fn session_state(&self, d: &DiskRecord) -> Result<Arc<Mutex<SessionState>>> {
        let key = (d.vm_id.clone(), d.disk_id.clone());
        let slot = {
            let mut open = self.sessions.open.lock().await;
            match open.get(&key) {
                Some(s) if s.lock().await.session == d.session => return Ok(s.clone()),
                _ => {}
            }
            let s = Arc::new(Mutex::new(SessionState {
                session: d.session.clone(),
                received: BTreeMap::new(),
                stored_bytes: 0,
                deduplicated_bytes: 0,
            }));
            open.insert(key.clone(), s.clone());
            s
        };
        // Rebuild from the receipts in the vault while holding the session lock, so uploads
        // that arrive meanwhile wait and then see a complete picture.
        let mut st = slot.lock().await;
        let prefix = layout::stage_session(&d.vm_id, &d.disk_id, &d.session);
        st.received = self.load_receipts(&prefix, &d.disk).await?;
        drop(st);
        Ok(slot)
    }

    /// Every receipt under a session prefix, by block index.
    pub(crate) async fn load_receipts(
        &self,
        prefix: &crate::store::Key,
        disk: &str,
    ) -> Result<BTreeMap<u64, Receipt>> {
        let listed = self.vault.store().list(prefix).await?;
        let chunks = self.vault.chunks.clone();
        let mut loads = futures_util::stream::iter(listed.into_iter().filter_map(|l| {
            let index: u64 = l.key.name().parse().ok()?;
            Some((index, l.key))
        }))
        .map(|(index, key)| {
            let chunks = chunks.clone();
            async move { (index, chunks.get_sealed(ObjectKind::Receipt, &key).await) }
        })
        .buffer_unordered(32);
        let mut out = BTreeMap::new();
        while let Some((index, r)) = loads.next().await {
            let plain = r?;
            let receipt = parse_receipt(&plain).ok_or_else(|| {
                Error::internal(format!(
                    "receipt {index} of disk {disk} has length {}",
                    plain.len()
                ))
            })?;
            out.insert(index, receipt);
        }
        Ok(out)
    }

    /// Writes the sealed receipt of a stored block (after the chunk, before the acknowledgement).
    pub(crate) async fn write_receipt(
        &self,
        key: &crate::store::Key,
        put: &crate::chunk::pipeline::BlockPut,
    ) -> Result<()> {
        let mut plain = Vec::with_capacity(RECEIPT_LEN);
        plain.extend_from_slice(&put.name.map(|n| n.0).unwrap_or([0u8; 32]));
        plain.extend_from_slice(&put.hash.0);
        plain.extend_from_slice(&put.len.to_le_bytes());
        self.vault
            .chunks
            .put_sealed(ObjectKind::Receipt, key, plain)
            .await?;
        Ok(())
    }

    /// Takes one block of an initial replication.
    pub async fn put_block(
        &self,
        host: &str,
        vm: &str,
        disk: &str,
        index: u64,
        claimed: PlainHash,
        body: Bytes,
    ) -> Result<BlockAck> {
        let (_, d) = self.disk_for(Some(host), vm, disk).await?;
        check_block(&d, index, body.len() as u64)?;
        let damaged = self
            .chunk_needs_upload(&self.chunk_of(&claimed, &body))
            .await?;
        if d.state == DiskState::Complete {
            if damaged {
                return self.heal_block(index, claimed, body).await;
            }
            return Err(Error::conflict(
                "replication_complete",
                format!("disk {disk} of VM {vm} already completed initial replication"),
            ));
        }
        let st = self.session_state(&d).await?;
        if let Some(r) = st.lock().await.received.get(&index) {
            if r.hash.ct_eq(&claimed) && !damaged {
                return Ok(BlockAck {
                    index,
                    outcome: "already_received".into(),
                    stored_bytes: 0,
                });
            }
        }
        // Chunk, then receipt, as one critical section for garbage collection.
        let fenced = self.vault.chunks.fence().writer().await;
        let put = self.vault.chunks.put_block(body, Some(claimed)).await?;
        let key = layout::stage_receipt(&d.vm_id, &d.disk_id, &d.session, index);
        self.write_receipt(&key, &put).await?;
        drop(fenced);
        let healed = self.note_stored(&put).await?;
        {
            let mut st = st.lock().await;
            st.received.insert(
                index,
                Receipt {
                    name: put.name,
                    hash: put.hash,
                },
            );
            st.stored_bytes = st.stored_bytes.saturating_add(put.stored_bytes);
            if put.outcome == Some(PutOutcome::Existed) {
                st.deduplicated_bytes = st.deduplicated_bytes.saturating_add(put.len);
            }
        }
        metrics::counter!("drvault_blocks_received_total").increment(1);
        metrics::counter!("drvault_bytes_received_total").increment(put.len);
        let outcome = match put.outcome {
            None => "zero",
            Some(PutOutcome::Created) if healed => "healed",
            Some(PutOutcome::Created) => "stored",
            Some(PutOutcome::Existed) => "deduplicated",
        };
        self.note_progress(&d).await;
        Ok(BlockAck {
            index,
            outcome: outcome.into(),
            stored_bytes: put.stored_bytes,
        })
    }

    /// The chunk name a block would be stored under (what the damage register knows it by).
    fn chunk_of(&self, hash: &PlainHash, body: &[u8]) -> ChunkName {
        ChunkName::derive(self.vault.keys().name_key(), hash, body.len() as u64)
    }

    /// Stores a block of a completed disk whose chunk verify registered damaged and moved
    /// aside: the map already names the chunk, so storing it again is all a heal takes.
    async fn heal_block(&self, index: u64, claimed: PlainHash, body: Bytes) -> Result<BlockAck> {
        let put = self.vault.chunks.put_block(body, Some(claimed)).await?;
        let healed = self.note_stored(&put).await?;
        metrics::counter!("drvault_blocks_received_total").increment(1);
        metrics::counter!("drvault_bytes_received_total").increment(put.len);
        Ok(BlockAck {
            index,
            outcome: if healed { "healed" } else { "deduplicated" }.into(),
            stored_bytes: put.stored_bytes,
        })
    }

    async fn note_progress(&self, d: &DiskRecord) {
        if let Ok(v) = self.vm_for(None, &d.vm).await {
            let view = self.view(&v).await;
            self.jobs.set_progress(&v.enable_job, view.progress).await;
        }
    }

    /// Which of the queried blocks the session does not hold with that content.
    pub async fn missing_blocks(
        &self,
        host: &str,
        vm: &str,
        disk: &str,
        q: &ReceivedQuery,
    ) -> Result<Vec<u64>> {
        if q.blocks.len() > MAX_QUERY_BLOCKS {
            return Err(Error::invalid(
                "query_too_large",
                format!("at most {MAX_QUERY_BLOCKS} blocks per query"),
            ));
        }
        let (_, d) = self.disk_for(Some(host), vm, disk).await?;
        let mut wanted = Vec::with_capacity(q.blocks.len());
        for b in &q.blocks {
            check_block(&d, b.index, block_len(d.size, d.block_size, b.index))?;
            let h = PlainHash::from_hex(&b.hash).ok_or_else(|| {
                Error::invalid(
                    "invalid_hash",
                    format!("block {}: hash is not 64 hex digits", b.index),
                )
            })?;
            wanted.push((b.index, h));
        }
        // Blocks whose chunk verify moved aside count as missing, whatever the session or the
        // map says: sending them again heals the chunk (see `put_block`).
        let mut missing = Vec::new();
        if !self.damage.get().await.objects.is_empty() {
            for (i, h) in &wanted {
                let len = block_len(d.size, d.block_size, *i);
                let name = ChunkName::derive(self.vault.keys().name_key(), h, len);
                if self.chunk_needs_upload(&name).await? {
                    missing.push(*i);
                }
            }
        }
        if d.state == DiskState::Complete {
            // Everything else is in the base map now.
            return Ok(missing);
        }
        let st = self.session_state(&d).await?;
        let st = st.lock().await;
        missing.extend(
            wanted
                .into_iter()
                .filter(|(i, h)| !st.received.get(i).map(|r| r.hash.ct_eq(h)).unwrap_or(false))
                .map(|(i, _)| i),
        );
        missing.sort_unstable();
        missing.dedup();
        Ok(missing)
    }

    /// Ends a disk's initial replication: verify, build the block map, switch the record.
    pub async fn complete_disk(
        &self,
        host: &str,
        vm: &str,
        disk: &str,
        req: &CompleteRequest,
    ) -> Result<super::DiskView> {
        let (_, d) = self.disk_for(Some(host), vm, disk).await?;
        let claimed = PlainHash::from_hex(&req.digest)
            .ok_or_else(|| Error::invalid("invalid_hash", "digest is not 64 hex digits"))?;
        let nblocks = d.stats.blocks;
        // Validate runs: in range, sorted, not overlapping.
        let mut next_free = 0u64;
        for &(first, count) in &req.data_runs {
            let end = first
                .checked_add(count)
                .filter(|&e| e <= nblocks && count > 0);
            match end {
                Some(end) if first >= next_free => next_free = end,
                _ => return Err(Error::invalid("invalid_runs", format!("data run [{first}, +{count}] is empty, overlaps, is unsorted or passes block {nblocks}"))),
            }
        }
        if d.state == DiskState::Complete {
            return self.disk_view_if_same(&d, &claimed).await;
        }
        let st = self.session_state(&d).await?;
        let st = st.lock().await;
        let mut missing = Vec::new();
        for &(first, count) in &req.data_runs {
            for i in first..first + count {
                if !st.received.contains_key(&i) {
                    missing.push(i);
                }
            }
        }
        if !missing.is_empty() {
            return Err(Error::conflict(
                "blocks_missing",
                format!(
                    "{} data blocks were never received (first: block {}); resume the upload",
                    missing.len(),
                    missing[0]
                ),
            ));
        }
        let mut map = BlockMap::zeroed(d.size, d.block_size);
        let mut digest = blake3::Hasher::new();
        let zero_full = PlainHash::of(&vec![0u8; d.block_size as usize]);
        let mut runs = req.data_runs.iter().peekable();
        let (mut data_blocks, mut data_bytes) = (0u64, 0u64);
        for i in 0..nblocks {
            while runs.peek().map(|&&(f, c)| i >= f + c).unwrap_or(false) {
                runs.next();
            }
            let in_data = runs.peek().map(|&&(f, _)| i >= f).unwrap_or(false);
            let len = block_len(d.size, d.block_size, i);
            let zero_hash = || {
                if len == d.block_size as u64 {
                    zero_full
                } else {
                    PlainHash::of(&vec![0u8; len as usize])
                }
            };
            if in_data {
                // Present by the check above.
                let r = st
                    .received
                    .get(&i)
                    .copied()
                    .ok_or_else(|| Error::internal("receipt vanished"))?;
                digest.update(&r.hash.0);
                if let Some(name) = r.name {
                    map.set(i, MapEntry::Data { name, hash: r.hash })?;
                    data_blocks += 1;
                    data_bytes += len;
                }
            } else {
                digest.update(&zero_hash().0);
            }
        }
        let actual = PlainHash(*digest.finalize().as_bytes());
        if !actual.ct_eq(&claimed) {
            return Err(Error::conflict(
                "digest_mismatch",
                format!("disk {disk}: the received blocks digest to {}, the agent's disk to {}; resume to resend changed blocks", actual.to_hex(), claimed.to_hex()),
            ));
        }
        let written = (st.stored_bytes, st.deduplicated_bytes);
        drop(st);
        // The map's objects become reachable only with the record: one critical section.
        let fenced = self.vault.chunks.fence().writer().await;
        let root = map.save(&self.vault.chunks).await?;
        let mut rec = d.clone();
        rec.state = DiskState::Complete;
        rec.map_root = Some(root.to_hex());
        rec.content_digest = Some(actual.to_hex());
        rec.completed_unix = Some(crate::util::unix_now());
        rec.base_point = super::BasePoint {
            cycle: 0,
            time_unix: crate::util::unix_now(),
            app_consistent: false,
        };
        rec.stats.data_blocks = data_blocks;
        rec.stats.zero_blocks = nblocks - data_blocks;
        rec.stats.data_bytes = data_bytes;
        (rec.stats.stored_bytes, rec.stats.deduplicated_bytes) = written;
        self.store_disk(rec.clone()).await?;
        drop(fenced);
        tracing::info!(
            vm,
            disk,
            data_blocks,
            "initial replication of disk complete"
        );
        // Receipts are no longer needed: the map holds everything. Removing them is best effort.
        self.sessions
            .open
            .lock()
            .await
            .remove(&(d.vm_id.clone(), d.disk_id.clone()));
        let store = self.vault.store().clone();
        let prefix = layout::stage_session(&d.vm_id, &d.disk_id, &d.session);
        tokio::spawn(async move {
            if let Ok(items) = store.list(&prefix).await {
                for l in items {
                    let _ = store.delete(&l.key).await;
                }
            }
        });
        let v = self.vm_for(None, vm).await?;
        self.jobs
            .step(
                &v.enable_job,
                &format!("Initial replication of disk {disk}"),
                JobState::Succeeded,
            )
            .await?;
        self.note_progress(&rec).await;
        self.finalize_if_complete(vm).await?;
        self.disk_view(vm, disk).await
    }

    async fn disk_view_if_same(
        &self,
        d: &DiskRecord,
        claimed: &PlainHash,
    ) -> Result<super::DiskView> {
        match d.content_digest.as_deref().and_then(PlainHash::from_hex) {
            Some(h) if h.ct_eq(claimed) => self.disk_view(&d.vm, &d.disk).await,
            _ => Err(Error::conflict(
                "replication_complete",
                format!("disk {} already completed with different content (changes since travel as change logs, or a resync); any blocks of damaged chunks this run sent were stored again", d.disk),
            )),
        }
    }

    pub async fn disk_view(&self, vm: &str, disk: &str) -> Result<super::DiskView> {
        let v = self.vm_for(None, vm).await?;
        let view = self.view(&v).await;
        view.disks
            .into_iter()
            .find(|x| x.id == disk)
            .ok_or_else(|| {
                Error::not_found("disk_not_found", format!("VM {vm} has no disk {disk}"))
            })
    }

    /// The base block map of a completed disk.
    pub async fn base_map(&self, vm: &str, disk: &str) -> Result<(DiskRecord, BlockMap)> {
        let (_, d) = self.disk_for(None, vm, disk).await?;
        let root = match (&d.state, &d.map_root) {
            (DiskState::Complete, Some(r)) => ChunkName::from_hex(r)
                .ok_or_else(|| Error::internal("bad map root in disk record"))?,
            _ => {
                return Err(Error::conflict(
                    "replication_incomplete",
                    format!("disk {disk} of VM {vm} has not completed initial replication"),
                ))
            }
        };
        let map = BlockMap::load(&self.vault.chunks, &root).await?;
        Ok((d, map))
    }
}

impl Protection {
    /// Reads one block of a completed disk's base map, verified (tag, name, plain hash).
    pub async fn read_block(&self, vm: &str, disk: &str, index: u64) -> Result<(Bytes, PlainHash)> {
        let (d, map) = self.cached_map(vm, disk).await?;
        let entry = map.get(index).ok_or_else(|| {
            Error::invalid(
                "block_out_of_range",
                format!(
                    "block {index} is past the end of disk {disk} ({} blocks)",
                    map.len()
                ),
            )
        })?;
        match entry {
            MapEntry::Zero => {
                let len = block_len(d.size, d.block_size, index) as usize;
                let z = vec![0u8; len];
                let h = PlainHash::of(&z);
                Ok((Bytes::from(z), h))
            }
            MapEntry::Data { name, hash } => {
                let (bytes, h) = self.vault.chunks.get_block(&name).await?;
                if !h.ct_eq(&hash) {
                    return Err(Error::Corrupt(crate::chunk::SealError::ContentMismatch {
                        name: name.to_hex(),
                    }));
                }
                Ok((bytes, h))
            }
        }
    }

    /// Base maps are immutable once written (content-addressed): cache a few by root name.
    pub(crate) async fn cached_map(
        &self,
        vm: &str,
        disk: &str,
    ) -> Result<(DiskRecord, Arc<BlockMap>)> {
        let (_, d) = self.disk_for(None, vm, disk).await?;
        let root = d.map_root.clone().ok_or_else(|| {
            Error::conflict(
                "replication_incomplete",
                format!("disk {disk} of VM {vm} has not completed initial replication"),
            )
        })?;
        Ok((d, self.map_by_root(&root).await?))
    }
}

fn check_block(d: &DiskRecord, index: u64, len: u64) -> Result<()> {
    if index >= d.stats.blocks {
        return Err(Error::invalid(
            "block_out_of_range",
            format!(
                "block {index} is past the end of disk {} ({} blocks of {} bytes)",
                d.disk, d.stats.blocks, d.block_size
            ),
        ));
    }
    let want = block_len(d.size, d.block_size, index);
    if len > want {
        return Err(Error::invalid(
            "body_too_long",
            format!("block {index} carries {len} bytes; the block is {want} bytes"),
        ));
    }
    if len < want {
        return Err(Error::invalid(
            "body_too_short",
            format!("block {index} carries {len} bytes; the block is {want} bytes"),
        ));
    }
    Ok(())
}
