//! The damage register: objects verify found damaged or missing, kept in one versioned record
//! (`records/scrub/damage`) and in memory. A recovery point is *damaged* when any object it reads
//! through is registered: the point listing says so and failover and export refuse it up front
//! (`409 point_damaged`) instead of failing half-way.
//!
//! Whether a point needs an object is worked out when asked, from the point's chain (map root,
//! then logs): a point that appeared after the verify (a new log on top of a damaged base) is
//! therefore marked too. Map walks are cached per root until the register changes. A map that
//! does not open at all marks every point reading it: if in doubt, refuse.
//!
//! A chunk leaves the register as soon as an upload of its block stores it again (a re-run of
//! `agent protect` with the same source, a resync, another VM's upload: the sender is told the
//! server lacks such blocks, see [`DamageRegister::chunk_needs_upload`]); the next verify reads it
//! and reports it healed. Any entry also leaves when a later verify finds the object sound
//! again (restored by hand) or, on a verify of every VM, when nothing references it any more.
//! Block maps and change-log frames are not re-sent by agents: a point needing a damaged one
//! stays damaged until the object is restored or the point leaves retention; a resync gives
//! the disk a new sound point.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use tokio::sync::{Mutex, RwLock};

use super::Replicas;
use crate::catalog::{DiskRecord, Health};
use crate::chunk::pipeline::BlockPut;
use crate::chunk::{ChunkName, ChunkStore};
use crate::error::{Error, Result};
use crate::replica::blockmap::{MapEntry, MapRoot};
use crate::store::PutOutcome;
use crate::vault::layout::{self, Family};
use crate::vault::Vault;
use crate::wire::ObjectFamily;
pub use crate::wire::{Affected, DamageRecord, DamagedObject};

impl DamageRecord {
    /// Whether the chunk of that name is registered.
    pub fn has_chunk(&self, name: &ChunkName) -> bool {
        !self.objects.is_empty()
            && self
                .objects
                .contains_key(ChunkStore::chunk_key(name).as_str())
    }
}

/// The register: verify records and clears entries ([`DamageRegister::update`]), uploads heal
/// chunks ([`DamageRegister::note_stored`]), and the read path asks what a point needs
/// ([`DamageRegister::record_point_damage`], [`Replicas::refuse_damaged`]). Cheap to clone.
#[derive(Clone)]
pub struct DamageRegister {
    vault: Vault,
    current: Arc<RwLock<Arc<DamageRecord>>>,
    /// Held across each read-modify-write of the register (verify's save, an upload's heal).
    writer: Arc<Mutex<()>>,
    /// Registered keys each map root leads to, for the current register.
    map_hits: Arc<Mutex<HashMap<ChunkName, Vec<String>>>>,
}

fn record_prefix() -> crate::store::Key {
    layout::record(Family::Scrub, "damage")
}

impl DamageRegister {
    pub async fn load(vault: Vault) -> Result<DamageRegister> {
        let rec = vault
            .records
            .load::<DamageRecord>(&record_prefix())
            .await?
            .map(|v| v.value)
            .unwrap_or_default();
        Ok(DamageRegister {
            vault,
            current: Arc::new(RwLock::new(Arc::new(rec))),
            writer: Default::default(),
            map_hits: Default::default(),
        })
    }

    pub async fn get(&self) -> Arc<DamageRecord> {
        self.current.read().await.clone()
    }

    /// Stores the register `f` makes of the current one. Verify and uploads that heal write it,
    /// one at a time.
    pub async fn update(&self, f: impl FnOnce(&DamageRecord) -> DamageRecord) -> Result<()> {
        let _writer = self.writer.lock().await;
        let rec = f(&*self.get().await);
        let r = rec.clone();
        self.vault
            .records
            .update(&record_prefix(), move |_: Option<&DamageRecord>| {
                Ok(Some(r.clone()))
            })
            .await?;
        let objects = rec.objects.len();
        *self.current.write().await = Arc::new(rec);
        self.map_hits.lock().await.clear();
        metrics::gauge!("drvault_damaged_objects").set(objects as f64);
        Ok(())
    }

    /// Moves chunks an upload stored again from the register's objects to its healed set: the
    /// points that needed them read them again at once.
    async fn heal(&self, key: &str) -> Result<()> {
        self.update(|cur| {
            let mut next = cur.clone();
            if next.objects.remove(key).is_some() {
                next.healed.insert(key.to_string());
            }
            next
        })
        .await
    }

    /// Registered keys a map (root, segments, chunks) leads to; a map that cannot be read is
    /// reported as such.
    async fn map_hits(
        &self,
        chunks: &ChunkStore,
        reg: &DamageRecord,
        root: &ChunkName,
    ) -> Vec<String> {
        if let Some(h) = self.map_hits.lock().await.get(root) {
            return h.clone();
        }
        let hits = walk_for_hits(chunks, reg, root).await;
        self.map_hits.lock().await.insert(*root, hits.clone());
        hits
    }

    /// Whether the chunk of `name` is registered damaged and absent from its key (moved to
    /// quarantine, or missing): an upload of its block stores it again, so a sender that asks
    /// which blocks the server lacks is told to send it.
    pub async fn chunk_needs_upload(&self, name: &ChunkName) -> Result<bool> {
        if !self.get().await.has_chunk(name) {
            return Ok(false);
        }
        let key = ChunkStore::chunk_key(name);
        Ok(self.vault.store().head(&key).await?.is_none())
    }

    /// After a block was stored: when its chunk was registered damaged, this upload stored it
    /// again (a put writes only where nothing is), which heals it. True when it did.
    pub async fn note_stored(&self, put: &BlockPut) -> Result<bool> {
        let Some(name) = put
            .name
            .filter(|_| put.outcome == Some(PutOutcome::Created))
        else {
            return Ok(false);
        };
        if !self.get().await.has_chunk(&name) {
            return Ok(false);
        }
        let key = ChunkStore::chunk_key(&name);
        self.heal(key.as_str()).await?;
        tracing::info!(object = %key, "an upload stored a damaged chunk again: healed");
        Ok(true)
    }

    /// Registered objects the point `cycle` of a disk record at hand reads through (see
    /// [`Replicas::disk_point_damage`]).
    pub async fn record_point_damage(
        &self,
        reg: &DamageRecord,
        d: &DiskRecord,
        cycle: u64,
    ) -> Result<Vec<String>> {
        let chain = super::points::point_chain(d, cycle)?;
        let mut hits = Vec::new();
        for log in &chain.logs {
            let prefix = format!("{}/", layout::log_prefix(&d.vm_id, &d.disk_id, log));
            hits.extend(
                reg.objects
                    .keys()
                    .filter(|k| k.starts_with(&prefix))
                    .cloned(),
            );
        }
        if let Some(root) = chain.root {
            let root = ChunkName::from_hex(&root)
                .ok_or_else(|| Error::internal(format!("malformed map root {root:?}")))?;
            hits.extend(self.map_hits(&self.vault.chunks, reg, &root).await);
        }
        Ok(hits)
    }

    /// What registered damage does to a VM's health, from its disk records (all complete): its
    /// recovery points are those every disk has; with none of them restorable the VM is
    /// Critical, with some damaged a Warning. `None` when no point is damaged.
    pub async fn health(&self, vm: &str, disks: &[DiskRecord]) -> Option<(Health, String)> {
        let reg = self.get().await;
        if reg.objects.is_empty() || disks.is_empty() {
            return None;
        }
        let cycles_of = |d: &DiskRecord| -> BTreeSet<u64> {
            std::iter::once(d.base_point.cycle)
                .chain(d.journal.iter().map(|e| e.cycle))
                .collect()
        };
        let mut cycles = cycles_of(&disks[0]);
        for d in &disks[1..] {
            let other = cycles_of(d);
            cycles.retain(|c| other.contains(c));
        }
        let (mut damaged, mut sound, mut hits) = (Vec::new(), Vec::new(), Vec::new());
        for c in cycles {
            let mut point_hits = Vec::new();
            for d in disks {
                // A point that cannot be traced reads as damaged: if in doubt, refuse.
                match self.record_point_damage(&reg, d, c).await {
                    Ok(h) => point_hits.extend(h),
                    Err(e) => point_hits.push(format!("disk {} (unreadable: {e})", d.disk)),
                }
            }
            if point_hits.is_empty() {
                sound.push(format!("c{c}"));
            } else {
                damaged.push(format!("c{c}"));
                hits.extend(point_hits);
            }
        }
        if damaged.is_empty() {
            return None;
        }
        hits.sort();
        hits.dedup();
        let objects = format!(
            "{} object(s) verify found damaged or missing: {}",
            hits.len(),
            summary(&hits)
        );
        let hint = heal_hint(vm, &hits);
        Some(match sound.last() {
            None => (
                Health::Critical,
                format!(
                    "no restorable recovery point: {} damaged ({objects}); {hint}",
                    ids(&damaged)
                ),
            ),
            Some(latest) => (
                Health::Warning,
                format!(
                    "recovery point(s) {} damaged ({objects}); {} restorable, the latest {latest}; {hint}",
                    ids(&damaged),
                    sound.len()
                ),
            ),
        })
    }
}

async fn walk_for_hits(chunks: &ChunkStore, reg: &DamageRecord, root: &ChunkName) -> Vec<String> {
    let root_key = layout::map_object(root).to_string();
    if reg.objects.contains_key(&root_key) {
        return vec![root_key];
    }
    let m = match MapRoot::load(chunks, root).await {
        Ok(m) => m,
        Err(e) => return vec![format!("{root_key} (unreadable: {e})")],
    };
    let wanted: HashSet<&str> = reg
        .objects
        .values()
        .filter(|o| matches!(o.family, ObjectFamily::Chunk | ObjectFamily::Pack))
        .map(|o| o.key.as_str())
        .collect();
    let mut hits = Vec::new();
    for (i, seg) in m.segments.iter().enumerate() {
        let Some(seg) = seg else { continue };
        let seg_key = layout::map_object(seg).to_string();
        if reg.objects.contains_key(&seg_key) {
            hits.push(seg_key);
            continue;
        }
        if wanted.is_empty() {
            continue;
        }
        match m.load_segment_layered(chunks, i).await {
            Ok(seg) => {
                for p in seg.layers.iter().flat_map(|(_, l)| &l.pieces) {
                    if let Some(pack) = p.pack {
                        let k = layout::pack_object(&pack).to_string();
                        if wanted.contains(k.as_str()) {
                            hits.push(k);
                        }
                    }
                }
                for e in seg.entries {
                    if let MapEntry::Data { name, .. } = e {
                        let k = ChunkStore::chunk_key(&name).to_string();
                        if wanted.contains(k.as_str()) {
                            hits.push(k);
                        }
                    }
                }
            }
            Err(e) => hits.push(format!("{seg_key} (unreadable: {e})")),
        }
    }
    hits.sort();
    hits.dedup();
    hits
}

impl Replicas {
    /// Registered objects one disk's point `cycle` reads through (empty: the point is sound as
    /// far as verify knows).
    pub async fn disk_point_damage(&self, vm: &str, disk: &str, cycle: u64) -> Result<Vec<String>> {
        let reg = self.damage.get().await;
        if reg.objects.is_empty() {
            return Ok(Vec::new());
        }
        let (_, d) = self.catalog.disk_for(None, vm, disk).await?;
        self.damage.record_point_damage(&reg, &d, cycle).await
    }

    /// Registered objects a VM point reads through, on any disk.
    pub async fn point_damage(&self, vm: &str, cycle: u64) -> Result<Vec<String>> {
        let rec = self.catalog.vm_for(None, vm).await?;
        let mut hits = Vec::new();
        for d in self.catalog.point_disks(&rec, cycle).await {
            hits.extend(self.disk_point_damage(vm, &d.disk, cycle).await?);
        }
        Ok(hits)
    }

    /// `409 point_damaged` when the point (of one disk, or of the whole VM) reads through a
    /// registered object: nothing is written from a point known to be damaged.
    pub async fn refuse_damaged(&self, vm: &str, disk: Option<&str>, cycle: u64) -> Result<()> {
        let hits = match disk {
            Some(d) => self.disk_point_damage(vm, d, cycle).await?,
            None => self.point_damage(vm, cycle).await?,
        };
        if hits.is_empty() {
            return Ok(());
        }
        Err(Error::conflict(
            "point_damaged",
            format!(
                "point c{cycle} of VM {vm} is damaged: it needs {} object(s) verify found damaged or missing ({}); choose an undamaged point (drvault points --vm {vm}), or {}",
                hits.len(),
                summary(&hits),
                heal_hint(vm, &hits)
            ),
        ))
    }
}

/// What re-sends the objects a point lacks. Chunks come back with any upload of their block;
/// block maps and change-log frames are the server's own, so no agent re-sends them.
pub fn heal_hint(vm: &str, hits: &[String]) -> String {
    let chunks_only = hits.iter().all(|k| k.starts_with("chunks/"));
    if chunks_only {
        format!("heal it: run drvault agent protect again for VM {vm} with the same source disks (it re-sends the blocks of damaged chunks), or resync it (drvault resync --vm {vm} --now, then drvault agent resync)")
    } else {
        format!("restore the damaged block map or change-log objects from a copy of the vault and run drvault verify (protect does not re-send them), or resync the VM for a new sound point (drvault resync --vm {vm} --now, then drvault agent resync)")
    }
}

/// Point ids for messages: the first eight, then how many more.
fn ids(points: &[String]) -> String {
    let mut s = points
        .iter()
        .take(8)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if points.len() > 8 {
        s.push_str(&format!(" and {} more", points.len() - 8));
    }
    s
}

/// The first few keys of a list, for messages.
pub fn summary(keys: &[String]) -> String {
    let mut s = keys.iter().take(4).cloned().collect::<Vec<_>>().join(", ");
    if keys.len() > 4 {
        s.push_str(&format!(" and {} more", keys.len() - 4));
    }
    s
}
