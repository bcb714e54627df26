//! Recovery points, reading a disk at a point, and merge.
//!
//! A disk recovery point is the base map (the initial replication, or the last merged log) or
//! any accepted log of the journal. A VM recovery point exists for a cycle when every disk of the
//! VM has a point of that cycle; it is app-consistent when every disk's log of the cycle was
//! flagged so. Point ids are `c<cycle>` (`c0` is the initial replication).
//!
//! Merge folds the journal's oldest logs into the base map: the blocks they touch are computed
//! once (base + every merged log's extents in order), stored as chunks, and a new base map and the
//! shortened journal are committed in one record update; the merged logs are deleted afterwards.
//! Every retained point reads the same before and after.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use super::{BasePoint, DiskRecord, DiskState, Protection};
use crate::error::{Error, Result};
use crate::replica::point::PointReader;
use crate::replica::{BlockMap, MapEntry};

/// A VM recovery point as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PointView {
    pub id: String,
    pub cycle: u64,
    pub time: String,
    pub time_unix: u64,
    /// `crash_consistent` or `app_consistent`.
    pub kind: String,
    /// Every disk's log of the cycle was flagged final (the source VM had shut down).
    pub final_point: bool,
    pub disks: Vec<String>,
    /// The point reads through an object verify found damaged or missing: failover and export
    /// refuse it (`409 point_damaged`).
    #[serde(default)]
    pub damaged: bool,
    /// Which objects, when damaged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub damage: Option<String>,
}

/// What a merge did.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MergeReport {
    pub disks: usize,
    pub logs_merged: usize,
    pub blocks_rewritten: u64,
    pub log_bytes_freed: u64,
}

/// Disk points: (cycle, time, app, final).
fn disk_points(d: &DiskRecord) -> Vec<(u64, u64, bool, bool)> {
    let mut v = vec![(
        d.base_point.cycle,
        d.base_point.time_unix,
        d.base_point.app_consistent,
        false,
    )];
    v.extend(
        d.journal
            .iter()
            .map(|e| (e.cycle, e.accepted_unix, e.app_consistent, e.final_log)),
    );
    v
}

impl Protection {
    /// The VM's recovery points, oldest first.
    pub async fn points(&self, vm: &str) -> Result<Vec<PointView>> {
        let rec = self.vm_for(None, vm).await?;
        let mut per_cycle: BTreeMap<u64, (u64, bool, bool, usize)> = BTreeMap::new();
        let mut disks = Vec::new();
        for spec in &rec.spec.disks {
            let (_, d) = self.disk_for(None, vm, &spec.id).await?;
            if d.state != DiskState::Complete {
                return Ok(Vec::new());
            }
            disks.push(d.disk.clone());
            for (c, t, app, fin) in disk_points(&d) {
                let e = per_cycle.entry(c).or_insert((0, true, true, 0));
                e.0 = e.0.max(t);
                e.1 &= app;
                e.2 &= fin;
                e.3 += 1;
            }
        }
        let mut points: Vec<PointView> = per_cycle
            .into_iter()
            .filter(|(_, v)| v.3 == disks.len())
            .map(|(c, (t, app, fin, _))| PointView {
                id: format!("c{c}"),
                cycle: c,
                time: crate::util::rfc3339(t),
                time_unix: t,
                kind: if app && c > 0 {
                    "app_consistent".into()
                } else {
                    "crash_consistent".into()
                },
                final_point: fin && c > 0,
                disks: disks.clone(),
                damaged: false,
                damage: None,
            })
            .collect();
        for p in &mut points {
            let hits = self.point_damage(vm, p.cycle).await?;
            if !hits.is_empty() {
                p.damaged = true;
                p.damage = Some(format!(
                    "{} damaged or missing object(s): {}",
                    hits.len(),
                    crate::scrub::damage::summary(&hits)
                ));
            }
        }
        Ok(points)
    }

    /// Resolves `latest`, `latest-app`, an id (`c12` or `12`) or an RFC 3339 time (the latest
    /// point at or before it) to a cycle.
    pub async fn resolve_point(&self, vm: &str, sel: &str) -> Result<PointView> {
        let points = self.points(vm).await?;
        let not_found = |m: String| Error::not_found("point_not_found", m);
        let p = match sel {
            "latest" => points.last().cloned(),
            "latest-app" => points
                .iter()
                .rev()
                .find(|p| p.kind == "app_consistent")
                .cloned(),
            s => {
                if let Ok(c) = s.strip_prefix('c').unwrap_or(s).parse::<u64>() {
                    points.iter().find(|p| p.cycle == c).cloned()
                } else if let Ok(t) = humantime::parse_rfc3339_weak(s) {
                    let secs = t
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_secs())
                        .unwrap_or(0);
                    points.iter().rev().find(|p| p.time_unix <= secs).cloned()
                } else {
                    return Err(Error::invalid(
                        "invalid_point",
                        format!(
                            "point {s:?}: use latest, latest-app, c<cycle> or an RFC 3339 time"
                        ),
                    ));
                }
            }
        };
        p.ok_or_else(|| not_found(format!("VM {vm} has no retained recovery point {sel:?}")))
    }

    /// A reader for one disk at a cycle (cached: points are immutable until merged away).
    pub async fn point_reader(&self, vm: &str, disk: &str, cycle: u64) -> Result<Arc<PointReader>> {
        let (_, d) = self.disk_for(None, vm, disk).await?;
        let chain = point_chain(&d, cycle)?;
        let root = d.map_root.clone().unwrap_or_default();
        let key = (d.vm_id.clone(), d.disk_id.clone(), cycle, root);
        if let Some(r) = self.readers.lock().await.get(&key) {
            return Ok(r.clone());
        }
        let base_root = chain.root.ok_or_else(|| {
            Error::conflict(
                "replication_incomplete",
                format!("disk {disk} of VM {vm} has not completed initial replication"),
            )
        })?;
        let base = self.map_by_root(&base_root).await?;
        let r = Arc::new(
            PointReader::build(
                self.vault.chunks.clone(),
                self.frames.clone(),
                &d.vm_id,
                &d.disk_id,
                base,
                chain.logs,
            )
            .await?,
        );
        let mut cache = self.readers.lock().await;
        if cache.len() >= 16 {
            cache.clear();
        }
        cache.insert(key, r.clone());
        Ok(r)
    }

    /// The whole disk at a reader's point as one block map: the blocks its logs touch are read,
    /// stored as chunks (once each) and put in the base's slots. Returns the map and how many
    /// blocks were rewritten.
    pub(crate) async fn full_map(&self, reader: &Arc<PointReader>) -> Result<(BlockMap, u64)> {
        let mut map: BlockMap = reader.base().clone();
        let touched: Vec<u64> = reader.touched().collect();
        let mut results = futures_util::stream::iter(touched.iter().copied().map(|i| {
            let reader = reader.clone();
            let chunks = self.vault.chunks.clone();
            async move {
                let (bytes, hash) = reader.read_block(i).await?;
                let put = chunks.put_block(bytes, Some(hash)).await?;
                Ok::<_, Error>((i, put))
            }
        }))
        .buffer_unordered(4);
        while let Some(r) = results.next().await {
            let (i, put) = r?;
            let e = match put.name {
                Some(name) => MapEntry::Data {
                    name,
                    hash: put.hash,
                },
                None => MapEntry::Zero,
            };
            map.set(i, e)?;
        }
        Ok((map, touched.len() as u64))
    }

    /// A block map by its root name (cached: maps are immutable).
    pub(crate) async fn map_by_root(&self, root: &str) -> Result<Arc<BlockMap>> {
        if let Some(m) = self.sessions.maps.lock().await.get(root) {
            return Ok(m.clone());
        }
        let name = crate::chunk::ChunkName::from_hex(root)
            .ok_or_else(|| Error::internal(format!("malformed map root {root:?} in a record")))?;
        let map = Arc::new(BlockMap::load(&self.vault.chunks, &name).await?);
        let mut cache = self.sessions.maps.lock().await;
        if cache.len() >= 16 {
            cache.clear();
        }
        cache.insert(root.to_string(), map.clone());
        Ok(map)
    }

    /// Merges the first `count` journal entries of a disk into its base map.
    pub async fn merge_disk(&self, vm: &str, disk: &str, count: usize) -> Result<MergeReport> {
        let (_, d0) = self.disk_for(None, vm, disk).await?;
        // New chunks and map, then the record: one critical section for garbage collection
        // (taken before the disk's lock, as every writer does).
        let _fenced = self.vault.chunks.fence().writer().await;
        let lock = self.log_lock_for(&d0).await;
        let _held = lock.lock().await;
        let (_, d) = self.disk_for(None, vm, disk).await?;
        let count = count.min(d.journal.len());
        if count == 0 {
            return Ok(MergeReport::default());
        }
        let last = d.journal[count - 1].clone();
        let reader = self.point_reader(vm, disk, last.cycle).await?;
        let (map, touched) = self.full_map(&reader).await?;
        let root = map.save(&self.vault.chunks).await?;
        let mut rec = d.clone();
        let merged: Vec<_> = rec.journal.drain(..count).collect();
        rec.map_root = Some(root.to_hex());
        rec.base_point = BasePoint {
            cycle: last.cycle,
            time_unix: last.accepted_unix,
            app_consistent: last.app_consistent,
        };
        let (data_blocks, zero_blocks) = map.entries().fold((0, 0), |(a, z), (_, e)| {
            if e == MapEntry::Zero {
                (a, z + 1)
            } else {
                (a + 1, z)
            }
        });
        rec.stats.data_blocks = data_blocks;
        rec.stats.zero_blocks = zero_blocks;
        // Pending bytes fell: a size-triggered resync mark no longer applies.
        if rec
            .resync_required
            .as_deref()
            .map(|r| r.starts_with("pending log bytes"))
            .unwrap_or(false)
            && rec.pending_log_bytes() < super::delta::resync_threshold(rec.size)
        {
            rec.resync_required = None;
        }
        self.store_disk(rec.clone()).await?;
        self.readers
            .lock()
            .await
            .retain(|k, _| !(k.0 == d.vm_id && k.1 == d.disk_id));
        let mut freed = 0;
        for e in merged.iter().filter(|e| e.is_log()) {
            let key = log_key(&e.log_id)?;
            if let Err(err) =
                crate::journal::delete_log(&self.vault.chunks, &d.vm_id, &d.disk_id, &key).await
            {
                tracing::warn!(vm, disk, log = %e.log_id, error = %err, "merged log not deleted; it is unreachable and will be collected");
            }
            self.frames.forget_prefix(
                crate::vault::layout::log_prefix(&d.vm_id, &d.disk_id, &key).as_str(),
            );
            freed += e.log_bytes;
        }
        metrics::counter!("drvault_merge_blocks_rewritten_total").increment(touched);
        tracing::info!(
            vm,
            disk,
            logs = count,
            blocks = touched,
            "merged logs into the base map"
        );
        Ok(MergeReport {
            disks: 1,
            logs_merged: count,
            blocks_rewritten: touched,
            log_bytes_freed: freed,
        })
    }

    /// Merges, on every disk of the VM, the logs that left the retention window (or all logs
    /// with `all`). The newest point of each disk is always kept as a log unless `all`.
    pub async fn merge_vm(&self, vm: &str, all: bool) -> Result<MergeReport> {
        self.merge_vm_through(vm, all, None).await
    }

    /// As [`Protection::merge_vm`]; with `through`, merges every log up to and including that
    /// cycle instead (the points before it disappear, the later ones read the same).
    pub async fn merge_vm_through(
        &self,
        vm: &str,
        all: bool,
        through: Option<u64>,
    ) -> Result<MergeReport> {
        let rec = self.vm_for(None, vm).await?;
        let retention = rec.spec.policy.clone().unwrap_or_default().retention_s;
        let cutoff = crate::util::unix_now().saturating_sub(retention);
        let mut total = MergeReport::default();
        for spec in &rec.spec.disks {
            let (_, d) = self.disk_for(None, vm, &spec.id).await?;
            if d.state != DiskState::Complete {
                continue;
            }
            let count = match through {
                Some(c) => d.journal.iter().take_while(|e| e.cycle <= c).count(),
                None if all => d.journal.len(),
                None => d
                    .journal
                    .iter()
                    .take_while(|e| e.accepted_unix < cutoff)
                    .count(),
            };
            let r = self.merge_disk(vm, &spec.id, count).await?;
            total.disks += 1;
            total.logs_merged += r.logs_merged;
            total.blocks_rewritten += r.blocks_rewritten;
            total.log_bytes_freed += r.log_bytes_freed;
        }
        Ok(total)
    }

    /// The background merge pass over every VM.
    pub async fn merge_expired_all(&self) {
        let vms: Vec<String> = self.vms.read().await.keys().cloned().collect();
        for vm in vms {
            if let Err(e) = self.merge_vm(&vm, false).await {
                tracing::warn!(%vm, error = %e, "background merge failed; will retry next pass");
            }
        }
    }

    /// Data blocks at a point: base data blocks plus every block a log writes.
    pub async fn point_blocks(
        &self,
        vm: &str,
        disk: &str,
        cycle: u64,
    ) -> Result<(DiskRecord, Vec<(u64, Option<String>)>)> {
        let reader = self.point_reader(vm, disk, cycle).await?;
        let (_, d) = self.disk_for(None, vm, disk).await?;
        let touched: BTreeSet<u64> = reader.touched().collect();
        let mut out: BTreeMap<u64, Option<String>> = BTreeMap::new();
        for (i, e) in reader.base().entries() {
            if let MapEntry::Data { hash, .. } = e {
                out.insert(i, (!touched.contains(&i)).then(|| hash.to_hex()));
            }
        }
        for i in touched {
            out.insert(i, None);
        }
        Ok((d, out.into_iter().collect()))
    }
}

/// What one disk's point reads: a map (the base, or the last snapshot at or before the point:
/// a snapshot replaces everything before it) and the logs after it, oldest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PointChain {
    /// Root name (hex); `None` before initial replication completed.
    pub root: Option<String>,
    /// Object-key ids of the logs.
    pub logs: Vec<String>,
}

pub(crate) fn point_chain(d: &DiskRecord, cycle: u64) -> Result<PointChain> {
    let upto = if d.base_point.cycle == cycle {
        0
    } else {
        d.journal.iter().position(|e| e.cycle == cycle).map(|p| p + 1).ok_or_else(|| {
            Error::not_found("point_not_found", format!("disk {} of VM {} has no retained point c{cycle} (never existed or merged away)", d.disk, d.vm))
        })?
    };
    let before = d.journal.get(..upto).unwrap_or_default();
    let snap = before.iter().rposition(|e| e.snapshot_root.is_some());
    let root = match snap.and_then(|i| before.get(i)) {
        Some(e) => e.snapshot_root.clone(),
        None => d.map_root.clone(),
    };
    let from = snap.map(|i| i + 1).unwrap_or(0);
    let logs = before
        .get(from..)
        .unwrap_or_default()
        .iter()
        .filter(|e| e.is_log())
        .map(|e| log_key(&e.log_id))
        .collect::<Result<Vec<_>>>()?;
    Ok(PointChain { root, logs })
}

/// Object-key id of a log from its GUID text.
pub(crate) fn log_key(log_id: &str) -> Result<String> {
    let g: crate::format::hrl::Guid = log_id
        .parse()
        .map_err(|_| Error::internal(format!("journal holds a malformed log id {log_id}")))?;
    Ok(crate::journal::log_key_id(&g))
}
