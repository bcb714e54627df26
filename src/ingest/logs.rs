//! Delta replication: accepting one MS-HRL change log per disk per replication cycle.
//!
//! Order of work for one log (one log per disk at a time, under the disk's log lock):
//! authorization and state checks → frames stored as the body streams in (bounded memory, size
//! limit) → the whole log validated from its frames → chain rules → extent index stored → the
//! disk record gains the journal entry (commit point) → acknowledgement. Anything refused is
//! deleted again and leaves the journal unchanged. A retry of an accepted log (same UniqueId) is
//! acknowledged again without reading its body.
//!
//! Chain rules: the first log after initial replication starts
//! the chain; each later log's PreviousUniqueId must be the last accepted UniqueId. A gap or fork,
//! a log that was not closed properly (EOLLocation 0), or a changed Vhd2DataWriteGuid is refused
//! and marks the disk resync-required, as does the host's backlog of logs not yet sent reaching
//! half the disk size ([`Ingest::note_backlog`], from the agent's heartbeat). Logs the vault
//! keeps within retention never count towards it, however long the retention.

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use serde::{Deserialize, Serialize};

use super::wire::LogInflater;
use super::Ingest;
use crate::catalog::{DiskRecord, DiskState, VmState};
use crate::error::{Error, Result};
use crate::file_formats::ObjectKind;
use crate::format::hrl::{self, Guid, HrlError};
use crate::journal::{self, encode_extents, Extent, FrameWriter, JournalEntry, StoredLog};
use crate::store::StoreError;
use crate::vault::layout;
pub use crate::wire::LogAck;

/// What the agent says about a log besides its bytes.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct LogMeta {
    /// Replication cycle; default: the disk's previous cycle + 1.
    pub cycle: Option<u64>,
    #[serde(default)]
    pub app_consistent: bool,
    /// The last log before the source VM shut down (planned failover).
    #[serde(default, rename = "final")]
    pub final_log: bool,
}

/// Adds plain log bytes to the frames, refusing a log that grows past `max` bytes.
async fn push_within(w: &mut FrameWriter, plain: Bytes, max: u64) -> Result<()> {
    if w.total() + plain.len() as u64 > max {
        return Err(Error::TooLarge {
            code: "log_too_large",
            message: format!("log exceeds the {max}-byte limit"),
        });
    }
    Ok(w.push(plain).await?)
}

/// How a log's body is sent, with the length the server may expect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogBody {
    /// As it is; `announced_len` is the body's `Content-Length` when it has one.
    Identity { announced_len: Option<u64> },
    /// zstd-compressed; inflated no further than `plain_len`, and refused unless it inflates
    /// to exactly that.
    Zstd { plain_len: u64 },
}

/// Host backlog bytes at which a disk needs resynchronization: half its size.
pub use crate::catalog::resync_threshold;

impl Ingest {
    async fn mark_resync(&self, vm: &str, disk: &str, reason: String) -> Result<()> {
        let (_, mut d) = self.catalog.disk_for(None, vm, disk).await?;
        if d.resync_required.is_none() {
            tracing::warn!(vm, disk, %reason, "disk marked resync-required");
            d.resync_required = Some(reason.clone());
            self.catalog.store_disk(d).await?;
            self.open_resync_for(vm, disk, &reason).await;
        }
        Ok(())
    }

    /// The host's agent reports `backlog_bytes` of change logs of this disk it could not send
    /// yet: at half the disk size they are no longer worth sending (the seed's 50% rule), so the
    /// disk is marked resync-required and a session opened in the window, as for a broken chain.
    /// True when this call marked it. Disks still in initial replication, or already marked,
    /// are left alone.
    pub async fn note_backlog(&self, vm: &str, disk: &str, backlog_bytes: u64) -> Result<bool> {
        let (_, d) = self.catalog.disk_for(None, vm, disk).await?;
        if d.state != DiskState::Complete
            || d.resync_required.is_some()
            || backlog_bytes < resync_threshold(d.size)
        {
            return Ok(false);
        }
        // The disk record is rewritten: not while a log or a merge is changing it.
        let lock = self.catalog.journal_lock(&d).await;
        let _held = lock.lock().await;
        let reason = format!(
            "the host's backlog of unsent logs ({backlog_bytes} bytes) reached 50% of the disk size ({})",
            d.size
        );
        self.mark_resync(vm, disk, reason).await?;
        Ok(true)
    }

    /// Opens (or joins) the VM's resync session for a disk marked resync-required, in the
    /// off-hours window. A failure is logged: the mark stays and the operator can start one.
    async fn open_resync_for(&self, vm: &str, disk: &str, reason: &str) {
        let req = crate::replica::resync::ResyncRequest {
            now: false,
            disks: vec![disk.to_string()],
        };
        if let Err(e) = self.resyncs.start_resync(vm, &req, reason).await {
            tracing::warn!(vm, disk, error = %e, "could not open a resync session");
        }
    }

    /// Accepts one change log streamed in `body`, sent as it is.
    #[allow(clippy::too_many_arguments)] // the request's path, headers and body, each named
    pub async fn accept_log<S, E>(
        &self,
        host: &str,
        vm: &str,
        disk: &str,
        log_id: &str,
        meta: LogMeta,
        announced_len: Option<u64>,
        body: S,
    ) -> Result<LogAck>
    where
        S: Stream<Item = std::result::Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        self.accept_log_encoded(
            host,
            vm,
            disk,
            log_id,
            meta,
            LogBody::Identity { announced_len },
            body,
        )
        .await
    }

    /// Accepts one change log streamed in `body`, encoded as `encoding` says.
    #[allow(clippy::too_many_arguments)] // the request's path, headers and body, each named
    pub async fn accept_log_encoded<S, E>(
        &self,
        host: &str,
        vm: &str,
        disk: &str,
        log_id: &str,
        meta: LogMeta,
        encoding: LogBody,
        mut body: S,
    ) -> Result<LogAck>
    where
        S: Stream<Item = std::result::Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let (v, d) = self.catalog.disk_for(Some(host), vm, disk).await?;
        if v.state == VmState::FailedOver {
            return Err(Error::conflict("failed_over", format!("VM {vm} was failed over and the failover committed: the source's logs are refused; fail back and re-protect")));
        }
        let guid: Guid = log_id
            .parse()
            .map_err(|_| Error::invalid("invalid_log_id", format!("{log_id:?} is not a GUID")))?;
        let log_id = guid.to_string();
        if d.state != DiskState::Complete {
            return Err(Error::conflict("replication_incomplete", format!("disk {disk} of VM {vm} has not finished initial replication; logs start after it")));
        }
        let lock = self.catalog.journal_lock(&d).await;
        let _held = lock.lock().await;
        let (_, d) = self.catalog.disk_for(Some(host), vm, disk).await?;
        if let Some(e) = d.journal.iter().find(|e| e.log_id == log_id) {
            return Ok(ack(&d, e.cycle, &log_id, "already_accepted"));
        }
        if d.chain_head.as_deref() == Some(log_id.as_str()) {
            return Ok(ack(&d, d.last_cycle(), &log_id, "already_accepted"));
        }
        if let Some(s) = self.resyncs.open_resync(&v.id).await? {
            return Err(Error::conflict_recoverable("resync_in_progress", format!("VM {vm} is being resynchronized (session {}, {}); logs are paused until it completes: discard logs cut before it and send the next cycle's log afterwards", s.id, s.state.word())));
        }
        if let Some(reason) = &d.resync_required {
            return Err(Error::conflict("resync_required", format!("disk {disk} of VM {vm} needs resynchronization ({reason}); logs are refused until it completes")));
        }
        let max = self.max_log_bytes;
        let (announced_len, inflater) = match encoding {
            LogBody::Identity { announced_len } => (announced_len, None),
            LogBody::Zstd { plain_len } => (Some(plain_len), Some(plain_len)),
        };
        if let Some(len) = announced_len.filter(|&l| l > max) {
            return Err(Error::TooLarge {
                code: "log_too_large",
                message: format!("log of {len} bytes exceeds the {max}-byte limit"),
            });
        }
        let inflater = inflater.map(LogInflater::new).transpose()?;
        let key_id = journal::log_key_id(&guid);
        // Until the journal refers to it (or it is refused), garbage collection keeps the log.
        let _receiving = self
            .catalog
            .vault()
            .chunks
            .fence()
            .log_upload(&layout::log_prefix(&d.vm_id, &d.disk_id, &key_id));
        // Frames from an earlier, failed attempt at this log are replaced or removed below.
        let _ =
            journal::delete_log(&self.catalog.vault().chunks, &d.vm_id, &d.disk_id, &key_id).await;
        let stored = self
            .store_frames(&d, &key_id, max, inflater, &mut body)
            .await;
        let len = match stored {
            Ok(len) => len,
            Err(e) => {
                // Only while this server still holds the VM: otherwise the new holder may have
                // stored (and accepted) this same log under the same keys.
                if self.catalog.confirm_held(vm).await {
                    let _ = journal::delete_log(
                        &self.catalog.vault().chunks,
                        &d.vm_id,
                        &d.disk_id,
                        &key_id,
                    )
                    .await;
                }
                return Err(e);
            }
        };
        match self
            .validate_and_commit(vm, disk, &d, &guid, &key_id, len, &meta)
            .await
        {
            Ok(a) => Ok(a),
            Err(e) => {
                // Fenced out (or no longer holding the VM): the log's keys may be the new
                // holder's accepted log now; garbage collection takes ours if they are not.
                let lost = matches!(e, Error::LeaseLost { .. } | Error::LeaseHeld { .. });
                if !lost && self.catalog.confirm_held(vm).await {
                    let _ = journal::delete_log(
                        &self.catalog.vault().chunks,
                        &d.vm_id,
                        &d.disk_id,
                        &key_id,
                    )
                    .await;
                }
                self.frames
                    .forget_prefix(layout::log_prefix(&d.vm_id, &d.disk_id, &key_id).as_str());
                Err(e)
            }
        }
    }

    /// Stores the log's frames as its body arrives; a compressed body goes through `inflater`
    /// first, one bounded piece at a time on the CPU pool.
    async fn store_frames<S, E>(
        &self,
        d: &DiskRecord,
        key_id: &str,
        max: u64,
        mut inflater: Option<LogInflater>,
        body: &mut S,
    ) -> Result<u64>
    where
        S: Stream<Item = std::result::Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let mut w = FrameWriter::new(
            self.catalog.vault().chunks.clone(),
            &d.vm_id,
            &d.disk_id,
            key_id,
        );
        let cpu = self.catalog.vault().chunks.cpu().clone();
        while let Some(piece) = body.next().await {
            let piece = piece.map_err(|e| {
                Error::invalid("body_incomplete", format!("log upload was cut off: {e}"))
            })?;
            let Some(mut inf) = inflater.take() else {
                push_within(&mut w, piece, max).await?;
                continue;
            };
            inf.feed(piece);
            loop {
                let (back, plain) = cpu
                    .run(move || {
                        let plain = inf.next_piece();
                        (inf, plain)
                    })
                    .await;
                inf = back;
                match plain? {
                    Some(plain) => push_within(&mut w, plain, max).await?,
                    None => break,
                }
            }
            inflater = Some(inf);
        }
        if let Some(inf) = &inflater {
            inf.finish()?;
        }
        Ok(w.finish().await?)
    }

    #[allow(clippy::too_many_arguments)]
    async fn validate_and_commit(
        &self,
        vm: &str,
        disk: &str,
        d: &DiskRecord,
        guid: &Guid,
        key_id: &str,
        len: u64,
        meta: &LogMeta,
    ) -> Result<LogAck> {
        let reader = StoredLog::new(
            self.catalog.vault().chunks.clone(),
            &d.vm_id,
            &d.disk_id,
            key_id,
            len,
            self.frames.clone(),
            tokio::runtime::Handle::current(),
        );
        let size = d.size;
        let parsed = self
            .catalog
            .vault()
            .chunks
            .cpu()
            .run(move || hrl::read_log(&reader, size))
            .await;
        let log = match parsed {
            Ok(l) => l,
            Err(HrlError::NotClosedProperly) => {
                self.mark_resync(
                    vm,
                    disk,
                    "a log arrived that was not closed properly (EOLLocation 0)".into(),
                )
                .await?;
                return Err(Error::conflict("log_not_closed", "the log was not closed properly (EOLLocation 0): it is never applied; the disk needs resynchronization"));
            }
            // The store failed while the stored log was read back: its error (recoverable for
            // an outage or a full disk), not a verdict on the log the agent sent.
            Err(HrlError::Io { source, .. })
                if source
                    .get_ref()
                    .is_some_and(|e| e.is::<crate::chunk::pipeline::ChunkError>()) =>
            {
                return Err(
                    match journal::store_failure(source)
                        .unwrap_or_else(|| Error::internal("stored log read failed"))
                    {
                        // A frame this very request stored is gone: the store lost a write it
                        // had acknowledged. That is the store failing, not damage to keep: the
                        // frames are deleted below and the agent's retry stores them again.
                        Error::Store(StoreError::NotFound { key }) => {
                            Error::Store(StoreError::Unavailable {
                                op: "read-back",
                                key,
                                source: "a frame the store acknowledged is missing".into(),
                            })
                        }
                        e => e,
                    },
                );
            }
            Err(e) => {
                return Err(Error::invalid(
                    "invalid_log",
                    format!("not a valid MS-HRL log: {e}"),
                ))
            }
        };
        let h = &log.header;
        if h.unique_id != *guid {
            return Err(Error::invalid(
                "log_id_mismatch",
                format!(
                    "the URL names log {guid}, the log's header says {}",
                    h.unique_id
                ),
            ));
        }
        let write_guid = h.vhd2_data_write_guid.to_string();
        if let Some(expected) = &d.data_write_guid {
            if *expected != write_guid {
                self.mark_resync(vm, disk, format!("Vhd2DataWriteGuid changed from {expected} to {write_guid}: the disk was modified while change tracking was off")).await?;
                return Err(Error::conflict("offline_change", "the disk's data-write GUID changed (modified offline): the disk needs resynchronization"));
            }
        }
        let prev = h.previous_unique_id.to_string();
        if d.chain_head.is_none() && d.resync_fence.as_deref() == Some(prev.as_str()) {
            return Err(Error::conflict("log_predates_resync", format!("log {guid} continues the chain from before the disk's resynchronization (it follows {prev}); its changes are already in the resynchronized replica: discard it")));
        }
        if let Some(head) = &d.chain_head {
            if *head != prev {
                self.mark_resync(
                    vm,
                    disk,
                    format!("log {guid} follows {prev}, but the last accepted log is {head}"),
                )
                .await?;
                return Err(Error::conflict("chain_broken", format!("broken log chain: log {guid} names {prev} as its predecessor, the last accepted log is {head}; the disk needs resynchronization")));
            }
        }
        let last = d.last_cycle();
        let cycle = meta.cycle.unwrap_or(last + 1);
        if cycle <= last {
            return Err(Error::invalid(
                "cycle_not_increasing",
                format!("cycle {cycle} is not after the disk's last cycle {last}"),
            ));
        }
        let extents: Vec<Extent> = log
            .extents
            .iter()
            .map(|e| Extent {
                disk_offset: e.disk_offset,
                length: e.length,
                log_offset: e.log_offset,
            })
            .collect();
        let data_bytes = extents.iter().map(|e| e.length as u64).sum();
        let ekey = layout::log_extents(&d.vm_id, &d.disk_id, key_id);
        self.catalog
            .vault()
            .chunks
            .put_sealed_compressed(ObjectKind::LogFrame, &ekey, encode_extents(&extents))
            .await?;
        let entry = JournalEntry {
            log_id: guid.to_string(),
            previous_id: prev,
            cycle,
            app_consistent: meta.app_consistent,
            final_log: meta.final_log,
            accepted_unix: crate::util::unix_now(),
            log_unix: h.content_time_unix(),
            disk_size: Some(d.size),
            log_bytes: len,
            extents: extents.len() as u64,
            data_bytes,
            snapshot_root: None,
            unchanged: false,
        };
        let mut rec = d.clone();
        rec.journal.push(entry.clone());
        rec.chain_head = Some(entry.log_id.clone());
        rec.data_write_guid = Some(write_guid);
        self.catalog.store_disk(rec.clone()).await?;
        metrics::counter!("drvault_logs_accepted_total").increment(1);
        metrics::counter!("drvault_log_bytes_accepted_total").increment(len);
        tracing::info!(vm, disk, log = %entry.log_id, cycle, bytes = len, extents = entry.extents, "log accepted");
        Ok(ack(&rec, cycle, &entry.log_id, "accepted"))
    }
}

fn ack(d: &DiskRecord, cycle: u64, log_id: &str, status: &str) -> LogAck {
    LogAck {
        log_id: log_id.to_string(),
        status: status.into(),
        cycle,
        journal_length: d.journal.len(),
        pending_log_bytes: d.pending_log_bytes(),
        resync_required: d.resync_required.clone(),
    }
}

#[cfg(test)]
mod tests {
    use crate::services::testing::{block, memory, protect, send_log, BS};
    use crate::store::Key;

    #[tokio::test]
    async fn a_log_that_breaks_the_chain_is_refused_and_the_disk_needs_a_resync() {
        let (s, vault) = memory().await;
        protect(&s, "vm", &[("os", vec![Some(block(1)), None])]).await;
        let ack = send_log(&s, "vm", "os", (1, 0), 1, (0, &[7u8; 4096]))
            .await
            .unwrap();
        assert_eq!((ack.status.as_str(), ack.journal_length), ("accepted", 1));
        // A retry of an accepted log is acknowledged again, not applied twice.
        let ack = send_log(&s, "vm", "os", (1, 0), 1, (0, &[7u8; 4096]))
            .await
            .unwrap();
        assert_eq!(
            (ack.status.as_str(), ack.journal_length),
            ("already_accepted", 1)
        );
        let logs = || async {
            vault
                .store()
                .list(&Key::new(&["logs"]).unwrap())
                .await
                .unwrap()
                .len()
        };
        let stored = logs().await;
        // Log 3 names log 2 as its predecessor, but the last accepted log is 1.
        let e = send_log(&s, "vm", "os", (3, 2), 2, (BS as u64, &[8u8; 4096]))
            .await
            .unwrap_err();
        assert_eq!(e.code(), "chain_broken");
        assert_eq!(
            logs().await,
            stored,
            "the refused log's objects are deleted"
        );
        let (_, d) = s.catalog.disk_for(None, "vm", "os").await.unwrap();
        assert_eq!(d.journal.len(), 1);
        assert!(d.resync_required.is_some());
        // A resync session opened for it; logs wait until it completes.
        let session = s.resyncs.open_resync(&d.vm_id).await.unwrap();
        assert!(session.is_some_and(|x| x.disks.contains_key("os")));
        let e = send_log(&s, "vm", "os", (2, 1), 2, (0, &[9u8; 4096]))
            .await
            .unwrap_err();
        assert_eq!(e.code(), "resync_in_progress");
        let view = s.overview.vm(None, "vm").await.unwrap();
        assert!(
            view.health_reasons
                .iter()
                .any(|r| r.contains("resynchronization")),
            "{:?}",
            view.health_reasons
        );
    }
}
