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
use tokio::sync::Mutex;

use super::wire::BlockBody;
use super::Ingest;
use crate::catalog::{complete_disk_view, DiskRecord, DiskState, DiskView, VmRecord, VmState};
use crate::chunk::{ChunkName, PlainHash};
use crate::error::{Error, Result};
use crate::jobs::JobState;
use crate::replica::blockmap::{block_len, BlockMap, MapEntry};
use crate::replica::stage::{self, Receipt};
use crate::store::PutOutcome;
use crate::vault::layout;
pub use crate::wire::{BlockAck, CompleteRequest, QueryBlock, ReceivedQuery};

/// What this process knows of one disk's open initial-replication session.
struct ReceivingSession {
    session: String,
    received: BTreeMap<u64, Receipt>,
    /// Sealed bytes stored and plain bytes deduplicated by this process's uploads. Receipts do
    /// not record how a block was taken, so blocks received before a server restart are not
    /// counted: the figures are for the operator's eye, nothing depends on them.
    stored_bytes: u64,
    deduplicated_bytes: u64,
}

type SharedSession = Arc<Mutex<ReceivingSession>>;

/// In-memory view of open sessions by (vm id, disk id), rebuilt from receipts on first use after
/// a restart.
#[derive(Clone, Default)]
pub(crate) struct ReceivingSessions {
    open: Arc<Mutex<HashMap<(String, String), SharedSession>>>,
}

impl ReceivingSessions {
    /// Drops what this process cached of a VM's sessions (the next upload re-reads receipts).
    pub async fn forget_vm(&self, vm_id: &str) {
        self.open.lock().await.retain(|(v, _), _| v != vm_id);
    }

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

    /// (stored, deduplicated) bytes of the open session, see [`ReceivingSession`].
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

impl Ingest {
    /// Blocks the open session of a disk holds (0 when none is open).
    pub async fn received_count(&self, vm_id: &str, disk_id: &str) -> u64 {
        self.sessions.received_count(vm_id, disk_id).await
    }

    /// (stored, deduplicated) bytes of a disk's open session, see [`ReceivingSession`].
    pub async fn written(&self, vm_id: &str, disk_id: &str) -> (u64, u64) {
        self.sessions.written(vm_id, disk_id).await
    }

    async fn session_state(&self, d: &DiskRecord) -> Result<SharedSession> {
        let key = (d.vm_id.clone(), d.disk_id.clone());
        let slot = {
            let mut open = self.sessions.open.lock().await;
            match open.get(&key) {
                Some(s) if s.lock().await.session == d.session => return Ok(s.clone()),
                _ => {}
            }
            let s = Arc::new(Mutex::new(ReceivingSession {
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
        st.received = stage::load_receipts(self.catalog.vault(), &prefix, &d.disk).await?;
        drop(st);
        Ok(slot)
    }

    /// Takes one block of an initial replication, sent as it is.
    pub async fn put_block(
        &self,
        host: &str,
        vm: &str,
        disk: &str,
        index: u64,
        claimed: PlainHash,
        body: Bytes,
    ) -> Result<BlockAck> {
        let body = BlockBody {
            plain: body,
            zstd: None,
        };
        self.put_block_body(host, vm, disk, index, claimed, body)
            .await
    }

    /// Takes one block of an initial replication, decoded from the wire: a block that came
    /// compressed is sealed from the sender's compressed bytes once its plain content is
    /// checked against `claimed`.
    pub async fn put_block_body(
        &self,
        host: &str,
        vm: &str,
        disk: &str,
        index: u64,
        claimed: PlainHash,
        block: BlockBody,
    ) -> Result<BlockAck> {
        let BlockBody { plain: body, zstd } = block;
        let (_, d) = self.catalog.disk_for(Some(host), vm, disk).await?;
        check_block(&d, index, body.len() as u64)?;
        let damaged = self
            .damage
            .chunk_needs_upload(&self.chunk_of(&claimed, &body))
            .await?;
        if d.state == DiskState::Complete {
            if damaged {
                return self.heal_block(index, claimed, body, zstd).await;
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
        let fenced = self.catalog.vault().chunks.fence().writer().await;
        let put = self
            .catalog
            .vault()
            .chunks
            .put_block_with_payload(body, Some(claimed), zstd)
            .await?;
        let key = layout::stage_receipt(&d.vm_id, &d.disk_id, &d.session, index);
        stage::write_receipt(self.catalog.vault(), &key, &put).await?;
        drop(fenced);
        let healed = self.damage.note_stored(&put).await?;
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
        ChunkName::derive(
            self.catalog.vault().keys().name_key(),
            hash,
            body.len() as u64,
        )
    }

    /// Stores a block of a completed disk whose chunk verify registered damaged and moved
    /// aside: the map already names the chunk, so storing it again is all a heal takes.
    async fn heal_block(
        &self,
        index: u64,
        claimed: PlainHash,
        body: Bytes,
        zstd: Option<Bytes>,
    ) -> Result<BlockAck> {
        let put = self
            .catalog
            .vault()
            .chunks
            .put_block_with_payload(body, Some(claimed), zstd)
            .await?;
        let healed = self.damage.note_stored(&put).await?;
        metrics::counter!("drvault_blocks_received_total").increment(1);
        metrics::counter!("drvault_bytes_received_total").increment(put.len);
        Ok(BlockAck {
            index,
            outcome: if healed { "healed" } else { "deduplicated" }.into(),
            stored_bytes: put.stored_bytes,
        })
    }

    async fn note_progress(&self, d: &DiskRecord) {
        if let Ok(v) = self.catalog.vm_for(None, &d.vm).await {
            let progress = self.progress(&v).await;
            self.catalog
                .jobs()
                .set_progress(&v.enable_job, progress)
                .await;
        }
    }

    /// How far a VM's initial replication is, 0.0 ..= 1.0 (1.0 once protected).
    pub async fn progress(&self, v: &VmRecord) -> f64 {
        if v.state == VmState::Protected {
            return 1.0;
        }
        let (mut done, mut total) = (0u64, 0u64);
        for r in self.catalog.disks_of(v).await {
            let received = match r.state {
                DiskState::Complete => r.stats.blocks,
                DiskState::Receiving => self.sessions.received_count(&r.vm_id, &r.disk_id).await,
            };
            done += received.min(r.stats.blocks);
            total += r.stats.blocks;
        }
        if total == 0 {
            0.0
        } else {
            done as f64 / total as f64
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
        let (_, d) = self.catalog.disk_for(Some(host), vm, disk).await?;
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
                let name = ChunkName::derive(self.catalog.vault().keys().name_key(), h, len);
                if self.damage.chunk_needs_upload(&name).await? {
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
    ) -> Result<DiskView> {
        let (_, d) = self.catalog.disk_for(Some(host), vm, disk).await?;
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
        let fenced = self.catalog.vault().chunks.fence().writer().await;
        let root = map.save(&self.catalog.vault().chunks).await?;
        let mut rec = d.clone();
        // A disk added to a protected VM joins its points after the newest cycle: its initial
        // replication stands for that cycle (the VM's first disks: the initial point c0).
        let cycle = if d.added {
            self.catalog.joining_cycle(vm, disk).await?
        } else {
            0
        };
        rec.first_cycle = cycle;
        rec.state = DiskState::Complete;
        rec.map_root = Some(root.to_hex());
        rec.content_digest = Some(actual.to_hex());
        rec.completed_unix = Some(crate::util::unix_now());
        rec.base_point = crate::catalog::BasePoint {
            cycle,
            time_unix: crate::util::unix_now(),
            app_consistent: false,
            accepted_unix: crate::util::unix_now(),
        };
        rec.stats.data_blocks = data_blocks;
        rec.stats.zero_blocks = nblocks - data_blocks;
        rec.stats.data_bytes = data_bytes;
        (rec.stats.stored_bytes, rec.stats.deduplicated_bytes) = written;
        self.catalog.store_disk(rec.clone()).await?;
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
        stage::drop_receipts(
            self.catalog.vault(),
            &self.tasks,
            layout::stage_session(&d.vm_id, &d.disk_id, &d.session),
        );
        let v = self.catalog.vm_for(None, vm).await?;
        self.catalog
            .jobs()
            .step(
                &v.enable_job,
                &format!("Initial replication of disk {disk}"),
                JobState::Succeeded,
            )
            .await?;
        self.note_progress(&rec).await;
        self.catalog.finalize_if_complete(vm).await?;
        Ok(complete_disk_view(&rec))
    }

    async fn disk_view_if_same(&self, d: &DiskRecord, claimed: &PlainHash) -> Result<DiskView> {
        match d.content_digest.as_deref().and_then(PlainHash::from_hex) {
            Some(h) if h.ct_eq(claimed) => Ok(complete_disk_view(d)),
            _ => Err(Error::conflict(
                "replication_complete",
                format!("disk {} already completed with different content (changes since travel as change logs, or a resync); any blocks of damaged chunks this run sent were stored again", d.disk),
            )),
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::testing::{block, digest, memory, reload, spec};

    fn query(blocks: &[(u64, &Bytes)]) -> ReceivedQuery {
        ReceivedQuery {
            blocks: blocks
                .iter()
                .map(|(index, b)| QueryBlock {
                    index: *index,
                    hash: PlainHash::of(b).to_hex(),
                })
                .collect(),
        }
    }

    #[tokio::test]
    async fn an_interrupted_upload_resumes_with_only_the_missing_blocks() {
        let (s, vault) = memory().await;
        s.catalog
            .enable("h", "vm", &spec(&[("os", 4)]))
            .await
            .unwrap();
        let blocks: Vec<Bytes> = (1..=4).map(block).collect();
        for i in [0usize, 2] {
            let ack = s
                .ingest
                .put_block(
                    "h",
                    "vm",
                    "os",
                    i as u64,
                    PlainHash::of(&blocks[i]),
                    blocks[i].clone(),
                )
                .await
                .unwrap();
            assert_eq!(ack.outcome, "stored");
        }
        // The server restarts: what the session holds comes back from the receipts.
        let s = reload(&vault).await;
        let all: Vec<(u64, &Bytes)> = blocks
            .iter()
            .enumerate()
            .map(|(i, b)| (i as u64, b))
            .collect();
        let missing = s
            .ingest
            .missing_blocks("h", "vm", "os", &query(&all))
            .await
            .unwrap();
        assert_eq!(missing, vec![1, 3]);
        // Block 0 changed on the source since it was sent: it is wanted again.
        let changed = block(9);
        let missing = s
            .ingest
            .missing_blocks("h", "vm", "os", &query(&[(0, &changed), (2, &blocks[2])]))
            .await
            .unwrap();
        assert_eq!(missing, vec![0]);
        let again = s
            .ingest
            .put_block(
                "h",
                "vm",
                "os",
                2,
                PlainHash::of(&blocks[2]),
                blocks[2].clone(),
            )
            .await
            .unwrap();
        assert_eq!(again.outcome, "already_received");
        let view = s.overview.vm(Some("h"), "vm").await.unwrap();
        assert_eq!(view.disks[0].blocks_received, 2);
        assert_eq!(view.progress, 0.5);
        let e = s
            .ingest
            .put_block(
                "h",
                "vm",
                "os",
                4,
                PlainHash::of(&blocks[0]),
                blocks[0].clone(),
            )
            .await
            .unwrap_err();
        assert_eq!(e.code(), "block_out_of_range");
    }

    #[tokio::test]
    async fn completion_checks_every_data_block_and_the_digest_then_protects_the_vm() {
        let (s, _vault) = memory().await;
        s.catalog
            .enable("h", "vm", &spec(&[("os", 3)]))
            .await
            .unwrap();
        // Blocks 0 and 2 hold data, block 1 is all zeros (never sent).
        let disk = [Some(block(1)), None, Some(block(3))];
        let put = |i: usize| {
            let b = disk[i].clone().unwrap();
            let s = s.clone();
            async move {
                s.ingest
                    .put_block("h", "vm", "os", i as u64, PlainHash::of(&b), b)
                    .await
                    .unwrap()
            }
        };
        put(0).await;
        let req = CompleteRequest {
            data_runs: vec![(0, 1), (2, 1)],
            digest: digest(&disk),
        };
        let e = s
            .ingest
            .complete_disk("h", "vm", "os", &req)
            .await
            .unwrap_err();
        assert_eq!(e.code(), "blocks_missing");
        put(2).await;
        let wrong = CompleteRequest {
            data_runs: req.data_runs.clone(),
            digest: digest(&[Some(block(1)), Some(block(2)), Some(block(3))]),
        };
        let e = s
            .ingest
            .complete_disk("h", "vm", "os", &wrong)
            .await
            .unwrap_err();
        assert_eq!(e.code(), "digest_mismatch");
        let (_, d) = s.catalog.disk_for(None, "vm", "os").await.unwrap();
        assert_eq!(
            d.state,
            DiskState::Receiving,
            "a refused completion changes nothing"
        );
        let view = s.ingest.complete_disk("h", "vm", "os", &req).await.unwrap();
        assert_eq!(
            (view.state, view.data_blocks, view.zero_blocks),
            (DiskState::Complete, 2, 1)
        );
        // Completing again with the same content is acknowledged; the VM is protected and its
        // initial point reads back what was sent.
        s.ingest.complete_disk("h", "vm", "os", &req).await.unwrap();
        let vm = s.catalog.vm_for(None, "vm").await.unwrap();
        assert_eq!(vm.state, VmState::Protected);
        assert!(vm.finalize_job.is_some());
        let points = s.replicas.points("vm").await.unwrap();
        assert_eq!(
            points.iter().map(|p| p.id.as_str()).collect::<Vec<_>>(),
            ["c0"]
        );
        for (i, want) in disk.iter().enumerate() {
            let (got, _) = s.replicas.read_block("vm", "os", i as u64).await.unwrap();
            let want = want
                .clone()
                .unwrap_or_else(|| Bytes::from(vec![0u8; got.len()]));
            assert!(got == want, "block {i}");
        }
        let e = s
            .ingest
            .put_block("h", "vm", "os", 1, PlainHash::of(&block(5)), block(5))
            .await
            .unwrap_err();
        assert_eq!(e.code(), "replication_complete");
    }
}
