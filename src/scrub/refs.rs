//! What references what: the mark of garbage collection and the object list of verify.
//!
//! The roots are read from the places that hold references, in this order:
//!
//! 1. receipts under `stage/` (blocks received by sessions not complete yet),
//! 2. resync session records (their comparison base and staged maps),
//! 3. disk records (base map, journal: logs and snapshot maps).
//!
//! References only ever move forward along that order (receipts → a session's staged map or a
//! disk's base map; staged map → a disk's journal; journal → merged base map), and each move
//! writes the new holder before it drops the old one. Reading the old holders first therefore
//! sees every reference either where it was or where it went. Objects stored but not referenced
//! yet are the write fence's business (see [`crate::chunk::fence`]).
//!
//! A holder is one disk at some of its points (`cycles`) or one disk's open session. Maps are
//! then walked object by object ([`walk_maps`]) so that one damaged segment hides only its own
//! chunks.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;

use futures_util::StreamExt;

use super::{ObjectFamily, Problem};
use crate::catalog::{Catalog, DiskState};
use crate::chunk::{ChunkName, ChunkStore};
use crate::error::{Error, Result};
use crate::file_formats::ObjectKind;
use crate::replica::blockmap::{MapEntry, MapRoot, PieceRef};
use crate::replica::resync::Resyncs;
use crate::store::Key;
use crate::vault::layout::{self, Family};

/// Who needs an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub vm: String,
    pub disk: String,
    /// The disk's points (cycles) that read through the object.
    pub cycles: BTreeSet<u64>,
    /// Set for an open session ("initial replication", "resync <id>"), which has no point yet.
    pub session: Option<String>,
}

/// A stored change log a journal entry refers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRef {
    pub vm_id: String,
    pub disk_id: String,
    pub key_id: String,
    /// The log's length: how many frames it has and how long each is.
    pub bytes: u64,
}

/// Whose record a record prefix is: VM and disk records can be rewritten from this server's
/// own copy; the others cannot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordOwner {
    Vm { vm: String },
    Disk { vm: String, disk: String },
    Resync { vm: String },
    Failback { vm: String },
}

impl RecordOwner {
    pub fn vm(&self) -> &str {
        match self {
            RecordOwner::Vm { vm }
            | RecordOwner::Disk { vm, .. }
            | RecordOwner::Resync { vm }
            | RecordOwner::Failback { vm } => vm,
        }
    }
}

/// Everything the records reference directly.
#[derive(Debug, Default)]
pub struct Roots {
    pub holders: Vec<Holder>,
    /// Map roots, with the holders reading through each.
    pub maps: BTreeMap<ChunkName, BTreeSet<usize>>,
    /// Stored logs by key prefix (`logs/<vm>/<disk>/<log>`).
    pub logs: BTreeMap<String, (LogRef, BTreeSet<usize>)>,
    /// Chunks named by receipts of open sessions.
    pub receipt_chunks: BTreeMap<ChunkName, BTreeSet<usize>>,
    /// Receipt objects of open sessions that opened.
    pub receipts: u64,
    /// `stage/<vm>/<disk>/<session>` prefixes of open sessions.
    pub live_stages: BTreeSet<String>,
    /// The holder of each open session's receipts, by stage prefix.
    pub receipt_holders: BTreeMap<String, usize>,
    pub records: Vec<(Key, RecordOwner)>,
    /// Objects that could not be read while collecting (receipts, resync records).
    pub problems: Vec<Problem>,
}

impl Roots {
    fn holder(&mut self, h: Holder) -> usize {
        self.holders.push(h);
        self.holders.len() - 1
    }
}

/// One receipt as read: its key and the chunk it names (`None`: a zero block), or why not.
type ReadReceipt = (Key, std::result::Result<Option<ChunkName>, Problem>);

/// Collects the roots of every VM, or of one.
pub async fn collect(catalog: &Catalog, resyncs: &Resyncs, only_vm: Option<&str>) -> Result<Roots> {
    let vault = catalog.vault();
    let vm_id = only_vm.map(|v| catalog.vm_id(v));
    // 1. Receipts, grouped by session prefix.
    let stage = match &vm_id {
        Some(id) => Key::new(&["stage", id.as_str()]),
        None => Key::new(&["stage"]),
    }
    .ok_or_else(|| Error::internal("stage prefix"))?;
    let listed = vault.store().list(&stage).await?;
    let chunks = vault.chunks.clone();
    let mut reads = futures_util::stream::iter(listed.into_iter().map(|l| {
        let chunks = chunks.clone();
        async move {
            let r = chunks.get_sealed(ObjectKind::Receipt, &l.key).await;
            (l.key, r)
        }
    }))
    .buffer_unordered(32);
    let mut receipts: BTreeMap<String, Vec<ReadReceipt>> = BTreeMap::new();
    while let Some((key, r)) = reads.next().await {
        let Some(session) = stage_session_of(&key) else {
            continue;
        };
        let parsed = match r {
            Ok(plain) => crate::replica::stage::parse_receipt(&plain)
                .map(|r| r.name)
                .ok_or_else(|| Problem {
                    key: key.clone(),
                    family: ObjectFamily::Receipt,
                    missing: false,
                    reason: format!("receipt of {} bytes", plain.len()),
                }),
            // Removed since the listing: its session completed or was dropped.
            Err(crate::chunk::pipeline::ChunkError::Store(
                crate::store::StoreError::NotFound { .. },
            )) => continue,
            Err(e) => Err(Problem::classify(&key, ObjectFamily::Receipt, e.into())?),
        };
        receipts
            .entry(session.to_string())
            .or_default()
            .push((key, parsed));
    }
    drop(reads);

    // 2 and 3. Resync sessions, then disk records (this server's own, current copies).
    let (vms, disks) = catalog.all_records().await;
    let mut roots = Roots::default();
    for v in vms.iter().filter(|v| only_vm.is_none_or(|o| o == v.name)) {
        roots.records.push((
            layout::record(Family::Vm, &v.id),
            RecordOwner::Vm { vm: v.name.clone() },
        ));
        roots.records.push((
            layout::record(Family::Resync, &v.id),
            RecordOwner::Resync { vm: v.name.clone() },
        ));
        roots.records.push((
            layout::record(Family::Failback, &v.id),
            RecordOwner::Failback { vm: v.name.clone() },
        ));
        let session = match resyncs.resync_session(&v.id).await {
            Ok(s) => s.filter(|s| s.state.is_open()),
            Err(e) => {
                let key = record_key(vault, &layout::record(Family::Resync, &v.id)).await?;
                roots
                    .problems
                    .push(Problem::classify(&key, ObjectFamily::Record, e)?);
                None
            }
        };
        for d in disks.iter().filter(|d| d.vm == v.name) {
            roots.records.push((
                layout::record(Family::Disk, &layout::disk_record_id(&d.vm_id, &d.disk_id)),
                RecordOwner::Disk {
                    vm: d.vm.clone(),
                    disk: d.disk.clone(),
                },
            ));
            if let Some(s) = &session {
                if let Some(sd) = s.disks.get(&d.disk) {
                    let h = roots.holder(Holder {
                        vm: d.vm.clone(),
                        disk: d.disk.clone(),
                        cycles: BTreeSet::new(),
                        session: Some(format!("resync {}", s.id)),
                    });
                    for r in [&sd.base_root, &sd.staged_root].into_iter().flatten() {
                        roots.maps.entry(root_name(r)?).or_default().insert(h);
                    }
                    let stage = crate::replica::resync::stage_id(&s.id);
                    add_receipts(&mut roots, &receipts, &d.vm_id, &d.disk_id, &stage, h);
                }
            }
            match d.state {
                DiskState::Receiving => {
                    let h = roots.holder(Holder {
                        vm: d.vm.clone(),
                        disk: d.disk.clone(),
                        cycles: BTreeSet::new(),
                        session: Some("initial replication".into()),
                    });
                    add_receipts(&mut roots, &receipts, &d.vm_id, &d.disk_id, &d.session, h);
                }
                DiskState::Complete => add_journal(&mut roots, d)?,
            }
        }
    }
    Ok(roots)
}

/// The base map and the journal of a complete disk: each map with the cycles that read through
/// it, each log with its own cycle and every later one up to the next snapshot.
fn add_journal(roots: &mut Roots, d: &crate::catalog::DiskRecord) -> Result<()> {
    let mut root = d.map_root.clone();
    let mut cycles = BTreeSet::from([d.base_point.cycle]);
    let mut logs_since: Vec<String> = Vec::new();
    let mut log_cycles: BTreeMap<String, (LogRef, BTreeSet<u64>)> = BTreeMap::new();
    let flush = |roots: &mut Roots, root: Option<String>, cycles: BTreeSet<u64>| {
        let Some(r) = root else { return Ok(()) };
        let h = roots.holder(Holder {
            vm: d.vm.clone(),
            disk: d.disk.clone(),
            cycles,
            session: None,
        });
        roots.maps.entry(root_name(&r)?).or_default().insert(h);
        Ok::<(), Error>(())
    };
    for e in &d.journal {
        if let Some(snap) = &e.snapshot_root {
            flush(
                roots,
                root.replace(snap.clone()),
                std::mem::take(&mut cycles),
            )?;
            cycles.insert(e.cycle);
            logs_since.clear();
            continue;
        }
        cycles.insert(e.cycle);
        if e.is_log() {
            let key_id = crate::replica::points::log_key(&e.log_id)?;
            let prefix = layout::log_prefix(&d.vm_id, &d.disk_id, &key_id).to_string();
            log_cycles.insert(
                prefix.clone(),
                (
                    LogRef {
                        vm_id: d.vm_id.clone(),
                        disk_id: d.disk_id.clone(),
                        key_id,
                        bytes: e.log_bytes,
                    },
                    BTreeSet::new(),
                ),
            );
            logs_since.push(prefix);
        }
        for l in &logs_since {
            if let Some((_, c)) = log_cycles.get_mut(l) {
                c.insert(e.cycle);
            }
        }
    }
    flush(roots, root, cycles)?;
    for (prefix, (log, cycles)) in log_cycles {
        let h = roots.holder(Holder {
            vm: d.vm.clone(),
            disk: d.disk.clone(),
            cycles,
            session: None,
        });
        roots
            .logs
            .entry(prefix)
            .or_insert_with(|| (log, BTreeSet::new()))
            .1
            .insert(h);
    }
    Ok(())
}

fn add_receipts(
    roots: &mut Roots,
    receipts: &BTreeMap<String, Vec<ReadReceipt>>,
    vm_id: &str,
    disk_id: &str,
    session: &str,
    holder: usize,
) {
    let prefix = layout::stage_session(vm_id, disk_id, session).to_string();
    for (_, r) in receipts.get(&prefix).into_iter().flatten() {
        match r {
            Ok(Some(name)) => {
                roots.receipts += 1;
                roots
                    .receipt_chunks
                    .entry(*name)
                    .or_default()
                    .insert(holder);
            }
            Ok(None) => roots.receipts += 1,
            Err(p) => roots.problems.push(p.clone()),
        }
    }
    roots.live_stages.insert(prefix.clone());
    roots.receipt_holders.insert(prefix, holder);
}

/// `stage/<vm>/<disk>/<session>` of a receipt key.
pub fn stage_session_of(k: &Key) -> Option<&str> {
    let s = k.as_str();
    let end = s.match_indices('/').nth(3).map(|(i, _)| i)?;
    s.strip_prefix("stage/").and(s.get(..end))
}

fn root_name(hex: &str) -> Result<ChunkName> {
    ChunkName::from_hex(hex)
        .ok_or_else(|| Error::internal(format!("malformed map root {hex:?} in a record")))
}

/// The key of a record's latest version (the prefix itself when it has none).
pub(crate) async fn record_key(vault: &crate::vault::Vault, prefix: &Key) -> Result<Key> {
    Ok(match vault.records.latest_version(prefix).await? {
        Some(v) => layout::record_version(prefix, v),
        None => prefix.clone(),
    })
}

/// The map objects reached from a set of roots, each opened and checked.
#[derive(Debug, Default)]
pub struct MapWalk {
    /// Roots that opened, with their segment names (`None`: an all-zero segment).
    pub roots: BTreeMap<ChunkName, Arc<MapRoot>>,
    /// Segments that opened, with the chunks their entries name.
    pub segments: BTreeMap<ChunkName, Vec<ChunkName>>,
    /// Segments that opened, with the packs their layered entries' pieces name (only segments
    /// that name some).
    pub segment_packs: BTreeMap<ChunkName, Vec<ChunkName>>,
    /// Every piece some opened segment names, by pack and offset in it (what verify reads).
    pub pieces: BTreeMap<ChunkName, BTreeMap<u32, PieceRef>>,
    pub problems: Vec<Problem>,
}

impl MapWalk {
    /// Every chunk some opened segment names.
    pub fn chunks(&self) -> HashSet<ChunkName> {
        self.segments.values().flatten().copied().collect()
    }

    /// Every pack some opened segment names: a pack is kept while any live map references
    /// any piece in it.
    pub fn packs(&self) -> HashSet<ChunkName> {
        self.segment_packs.values().flatten().copied().collect()
    }

    /// Roots whose segments include `segment`.
    pub fn roots_of_segment(&self, segment: &ChunkName) -> Vec<ChunkName> {
        self.roots
            .values()
            .filter(|r| r.segments.iter().flatten().any(|s| s == segment))
            .map(|r| r.name)
            .collect()
    }
}

/// Opens every root and every distinct segment under them (segments are shared between map
/// versions: each is read once).
pub async fn walk_maps(
    chunks: &ChunkStore,
    roots: impl IntoIterator<Item = ChunkName>,
) -> Result<MapWalk> {
    let mut walk = MapWalk::default();
    let mut loads = futures_util::stream::iter(roots.into_iter().map(|name| {
        let chunks = chunks.clone();
        async move { (name, MapRoot::load(&chunks, &name).await) }
    }))
    .buffer_unordered(8);
    while let Some((name, r)) = loads.next().await {
        match r {
            Ok(root) => {
                walk.roots.insert(name, Arc::new(root));
            }
            Err(e) => walk.problems.push(Problem::classify(
                &layout::map_object(&name),
                ObjectFamily::Map,
                e,
            )?),
        }
    }
    drop(loads);
    // (segment name, a root that names it, its index there): each distinct segment once.
    let mut wanted: BTreeMap<ChunkName, (ChunkName, usize)> = BTreeMap::new();
    for root in walk.roots.values() {
        for (i, s) in root.segments.iter().enumerate() {
            if let Some(s) = s {
                wanted.entry(*s).or_insert((root.name, i));
            }
        }
    }
    let roots = &walk.roots;
    let mut loads = futures_util::stream::iter(wanted.into_iter().filter_map(|(seg, (r, i))| {
        let root = Arc::clone(roots.get(&r)?);
        let chunks = chunks.clone();
        Some(async move { (seg, root.load_segment_layered(&chunks, i).await) })
    }))
    .buffer_unordered(16);
    let mut segments = BTreeMap::new();
    let mut segment_packs = BTreeMap::new();
    let mut pieces: BTreeMap<ChunkName, BTreeMap<u32, PieceRef>> = BTreeMap::new();
    let mut problems = Vec::new();
    while let Some((seg, r)) = loads.next().await {
        match r {
            Ok(loaded) => {
                for p in loaded.layers.iter().flat_map(|(_, l)| &l.pieces) {
                    if let Some(pack) = p.pack {
                        pieces.entry(pack).or_default().insert(p.pack_offset, *p);
                    }
                }
                let mut packs: Vec<ChunkName> = loaded
                    .layers
                    .iter()
                    .flat_map(|(_, l)| l.pieces.iter().filter_map(|p| p.pack))
                    .collect();
                packs.sort();
                packs.dedup();
                if !packs.is_empty() {
                    segment_packs.insert(seg, packs);
                }
                let names = loaded
                    .entries
                    .into_iter()
                    .filter_map(|e| match e {
                        MapEntry::Data { name, .. } => Some(name),
                        MapEntry::Zero => None,
                    })
                    .collect();
                segments.insert(seg, names);
            }
            Err(e) => problems.push(Problem::classify(
                &layout::map_object(&seg),
                ObjectFamily::Map,
                e,
            )?),
        }
    }
    drop(loads);
    walk.segments = segments;
    walk.segment_packs = segment_packs;
    walk.pieces = pieces;
    walk.problems.extend(problems);
    Ok(walk)
}
