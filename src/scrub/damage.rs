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
//! An entry leaves the register when a later verify finds the object sound again (a re-upload
//! of the same block stored it anew, see `ChunkStore::put_block`) or, on a verify of every VM,
//! when nothing references it any more.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, RwLock};

use super::ObjectFamily;
use crate::chunk::{ChunkName, ChunkStore};
use crate::error::{Error, Result};
use crate::protection::Protection;
use crate::replica::blockmap::{MapEntry, MapRoot};
use crate::vault::layout::{self, Family};
use crate::vault::Records;

/// One registered object.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DamagedObject {
    pub key: String,
    pub family: ObjectFamily,
    /// `missing` or `corrupt`.
    pub problem: String,
    pub reason: String,
    /// Where its bytes were moved (none for a missing object).
    pub quarantined: Option<String>,
    /// What verify did: `quarantined`, `registered` (missing), `repaired` (a record rewritten
    /// from the server's own copy: not registered), `kept` (a record with no other copy).
    #[serde(default)]
    pub action: String,
    pub found_unix: u64,
    /// What needed it when it was found.
    pub affects: Vec<Affected>,
}

/// The points (or open session) of one disk that need an object.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct Affected {
    pub vm: String,
    pub disk: String,
    /// Point ids (`c<cycle>`) of the disk.
    pub points: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
}

/// The stored register.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DamageRecord {
    pub objects: BTreeMap<String, DamagedObject>,
    /// Start of the last verify that covered every VM and everything written before it (a
    /// full one, or a scheduled one): the next scheduled verify reads what was written since.
    #[serde(default)]
    pub last_verify_unix: Option<u64>,
}

impl DamageRecord {
    /// Whether the chunk of that name is registered.
    pub fn has_chunk(&self, name: &ChunkName) -> bool {
        !self.objects.is_empty()
            && self
                .objects
                .contains_key(ChunkStore::chunk_key(name).as_str())
    }
}

/// Handle on the register. Cheap to clone.
#[derive(Clone, Default)]
pub struct Damage {
    current: Arc<RwLock<Arc<DamageRecord>>>,
    /// Registered keys each map root leads to, for the current register.
    map_hits: Arc<Mutex<HashMap<ChunkName, Vec<String>>>>,
}

fn record_prefix() -> crate::store::Key {
    layout::record(Family::Scrub, "damage")
}

impl Damage {
    pub async fn load(records: &Records) -> Result<Damage> {
        let rec = records
            .load::<DamageRecord>(&record_prefix())
            .await?
            .map(|v| v.value)
            .unwrap_or_default();
        Ok(Damage {
            current: Arc::new(RwLock::new(Arc::new(rec))),
            map_hits: Default::default(),
        })
    }

    pub async fn get(&self) -> Arc<DamageRecord> {
        self.current.read().await.clone()
    }

    /// Stores a new register (the caller, verify, is its only writer).
    pub async fn save(&self, records: &Records, rec: DamageRecord) -> Result<()> {
        let r = rec.clone();
        records
            .update(&record_prefix(), move |_: Option<&DamageRecord>| {
                Ok(Some(r.clone()))
            })
            .await?;
        *self.current.write().await = Arc::new(rec);
        self.map_hits.lock().await.clear();
        metrics::gauge!("drvault_damaged_objects").set(self.get().await.objects.len() as f64);
        Ok(())
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
        .filter(|o| o.family == ObjectFamily::Chunk)
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
        match m.load_segment(chunks, i).await {
            Ok(entries) => {
                for e in entries {
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

impl Protection {
    /// Registered objects one disk's point `cycle` reads through (empty: the point is sound as
    /// far as verify knows).
    pub async fn disk_point_damage(&self, vm: &str, disk: &str, cycle: u64) -> Result<Vec<String>> {
        let reg = self.damage.get().await;
        if reg.objects.is_empty() {
            return Ok(Vec::new());
        }
        let (_, d) = self.disk_for(None, vm, disk).await?;
        let chain = crate::protection::points::point_chain(&d, cycle)?;
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
            hits.extend(self.damage.map_hits(&self.vault.chunks, &reg, &root).await);
        }
        Ok(hits)
    }

    /// Registered objects a VM point reads through, on any disk.
    pub async fn point_damage(&self, vm: &str, cycle: u64) -> Result<Vec<String>> {
        let rec = self.vm_for(None, vm).await?;
        let mut hits = Vec::new();
        for d in &rec.spec.disks {
            hits.extend(self.disk_point_damage(vm, &d.id, cycle).await?);
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
                "point c{cycle} of VM {vm} is damaged: it needs {} object(s) verify found damaged or missing ({}); choose an undamaged point (drvault points --vm {vm}), or re-send the data (resync, or protect the same source) and run drvault verify again",
                hits.len(),
                summary(&hits)
            ),
        ))
    }
}

/// The first few keys of a list, for messages.
pub fn summary(keys: &[String]) -> String {
    let mut s = keys.iter().take(4).cloned().collect::<Vec<_>>().join(", ");
    if keys.len() > 4 {
        s.push_str(&format!(" and {} more", keys.len() - 4));
    }
    s
}
