//! Recovery points, reading a disk at a point, and merge.
//!
//! A disk recovery point is the base map (the initial replication, or the last merged log) or
//! any accepted log of the journal. A VM recovery point exists for a cycle when every disk of the
//! VM has a point of that cycle; it is app-consistent when every disk's log of the cycle was
//! flagged so. Point ids are `c<cycle>` (`c0` is the initial replication).
//!
//! Merge folds the journal's oldest logs into the base map: the blocks they touch are computed
//! once (base + every merged log's extents in order), stored as chunks, and a new base map and the
//! shortened journal are committed in one record update; the merged logs are deleted afterwards,
//! once no point reader pinned before the commit is still alive (a failover materializing a
//! point, an export between two block reads: deleting under them failed them with
//! `object_missing`). Every retained point reads the same before and after. Deletions a process
//! exit cuts short leave unreachable log objects behind (nothing collects them yet).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use futures_util::StreamExt;

use super::Replicas;
use crate::catalog::{BasePoint, DiskRecord, DiskState};
use crate::chunk::{ChunkName, PlainHash};
use crate::error::{Error, Result};
use crate::journal::JournalEntry;
use crate::replica::blockmap::block_len;
use crate::replica::blockmap::{Layers, PieceRef};
use crate::replica::pieces::{self, PackWriter, Plan};
use crate::replica::point::{resized_last_block, PointReader, MERGE_GROUP_BYTES};
use crate::replica::{BlockMap, MapEntry};
pub use crate::wire::{MergeReport, PointView};
use bytes::Bytes;

impl PointView {
    /// A cycle some disks have and others are still expected to send.
    pub fn is_incomplete(&self) -> bool {
        !self.waiting_for.is_empty()
    }
}

/// Kind of a complete point at `cycle`: the initial replication, or what its logs say.
fn point_kind(cycle: u64, app: bool) -> &'static str {
    match (cycle, app) {
        (0, _) => "initial",
        (_, true) => "app_consistent",
        (_, false) => "crash_consistent",
    }
}

/// Built point readers by (vm id, disk id, cycle, base map root).
pub(crate) type ReaderCache =
    Arc<tokio::sync::Mutex<BTreeMap<(String, String, u64, String), Arc<PointReader>>>>;

/// Pins of the point readers in use, by (vm id, disk id).
pub(crate) type ReaderPins =
    Arc<std::sync::Mutex<BTreeMap<(String, String), Vec<std::sync::Weak<()>>>>>;

/// What each pinned reader reads through (its base map root and log prefixes), held while its
/// pin lives: garbage collection keeps these even once a merge or resync made them unreachable
/// from the records, so a long failover or export never loses objects under its feet.
pub(crate) type ReaderRefs = Arc<std::sync::Mutex<Vec<(std::sync::Weak<()>, PinnedRefs)>>>;

/// The objects one pinned reader needs.
#[derive(Debug, Clone, Default)]
pub(crate) struct PinnedRefs {
    pub map_root: String,
    pub log_prefixes: Vec<String>,
}

/// A point reader with the pin that keeps a merge from deleting the logs it reads while it
/// lives (see [`Replicas::merge_disk`]). Clones share the pin; the cache keeps only the bare
/// reader, so an idle cached reader never holds a deletion back.
#[derive(Clone)]
pub struct PinnedReader {
    reader: Arc<PointReader>,
    _pin: Arc<()>,
}

impl std::ops::Deref for PinnedReader {
    type Target = PointReader;
    fn deref(&self) -> &PointReader {
        &self.reader
    }
}

impl PinnedReader {
    /// The point's data blocks in index order, each with its hash when the base map knows it
    /// (`None` for blocks a log writes and for layered blocks: their hash is known once read).
    pub fn data_blocks(&self) -> Vec<(u64, Option<String>)> {
        let touched: BTreeSet<u64> = self.touched().collect();
        let mut out: BTreeMap<u64, Option<String>> = BTreeMap::new();
        for (i, e) in self.base().entries() {
            if let MapEntry::Data { hash, .. } = e {
                let whole = !touched.contains(&i) && !self.base().is_layered(i);
                out.insert(i, whole.then(|| hash.to_hex()));
            }
        }
        for (i, _) in self.base().layered() {
            out.insert(i, None);
        }
        for i in touched {
            out.insert(i, None);
        }
        out.into_iter().collect()
    }
}

/// What building a disk's map from a point cost.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MapWrite {
    /// Blocks stored whole (chunks) and blocks given new pieces.
    pub blocks_whole: u64,
    pub blocks_layered: u64,
    /// Bytes of chunks and packs stored (map objects not included).
    pub bytes_written: u64,
}

/// One block of [`Replicas::full_map_in`]: stored whole, or (kept pieces, new pieces, block
/// hash when known).
enum Built {
    Whole(u64, crate::chunk::BlockPut),
    Pieces(u64, Vec<usize>, Vec<pieces::SealedPiece>, Option<PlainHash>),
}

/// How long a merge's deletion waits for the readers pinned before it. Past that the logs are
/// left in place (unreachable from any record, so only space is lost) rather than deleted
/// under a reader that may still need them.
const PIN_WAIT_LIMIT: std::time::Duration = std::time::Duration::from_secs(3600);

/// Waits until every pin in `pins` is dropped, up to `limit`; false when some outlived it.
async fn pins_released(pins: &[std::sync::Weak<()>], limit: std::time::Duration) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    let mut pause = std::time::Duration::from_millis(20);
    while pins.iter().any(|w| w.strong_count() > 0) {
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return false;
        }
        tokio::time::sleep(pause.min(deadline - now)).await;
        pause = (pause * 2).min(std::time::Duration::from_secs(1));
    }
    true
}

/// One disk's point: its cycle, time (the log's own where it has one), when the server
/// accepted it, app-consistent, final.
struct DiskPoint {
    cycle: u64,
    time: u64,
    accepted: u64,
    app: bool,
    fin: bool,
}

fn disk_points(d: &DiskRecord) -> Vec<DiskPoint> {
    let b = &d.base_point;
    let mut v = vec![DiskPoint {
        cycle: b.cycle,
        time: b.time_unix,
        accepted: if b.accepted_unix > 0 {
            b.accepted_unix
        } else {
            b.time_unix
        },
        app: b.app_consistent,
        fin: false,
    }];
    v.extend(d.journal.iter().map(|e| DiskPoint {
        cycle: e.cycle,
        time: e.point_unix(),
        accepted: e.accepted_unix,
        app: e.app_consistent,
        fin: e.final_log,
    }));
    v
}

impl Replicas {
    /// The VM's recovery points, oldest first.
    pub async fn points(&self, vm: &str) -> Result<Vec<PointView>> {
        let mut points = self.points_and_incomplete(vm).await?;
        points.retain(|p| !p.is_incomplete());
        Ok(points)
    }

    /// The VM's recovery points and, among them, the cycles that are not complete yet: some
    /// disk sent its log of the cycle and another has not (`kind` `incomplete`, `waiting_for`
    /// names those disks), oldest first. A disk still in initial replication makes `c0` wait
    /// for it. A cycle a disk skipped (it sent a later one) never completes and is not listed.
    pub async fn points_and_incomplete(&self, vm: &str) -> Result<Vec<PointView>> {
        let rec = self.catalog.vm_for(None, vm).await?;
        // Every disk some point may include (removed ones too), with its points by cycle.
        let members = self.catalog.member_disks(&rec).await;
        let mut per_disk: Vec<(&DiskRecord, BTreeMap<u64, DiskPoint>)> = Vec::new();
        let mut cycles = BTreeSet::new();
        for d in &members {
            let pts: BTreeMap<u64, DiskPoint> = if d.state == DiskState::Complete {
                disk_points(d).into_iter().map(|p| (p.cycle, p)).collect()
            } else {
                BTreeMap::new()
            };
            cycles.extend(pts.keys().copied());
            per_disk.push((d, pts));
        }
        let first_disks_pending: Vec<String> = members
            .iter()
            .filter(|d| !d.added && d.state != DiskState::Complete)
            .map(|d| d.disk.clone())
            .collect();
        if !first_disks_pending.is_empty() {
            // Before every disk the VM was protected with completed initial replication there
            // is no point at all: c0 waits for them.
            return Ok(vec![PointView {
                id: "c0".into(),
                cycle: 0,
                time: String::new(),
                time_unix: 0,
                accepted: String::new(),
                accepted_unix: 0,
                kind: "incomplete".into(),
                final_point: false,
                disks: Vec::new(),
                damaged: false,
                damage: None,
                waiting_for: first_disks_pending,
            }]);
        }
        let mut points = Vec::new();
        for c in cycles {
            // The disks this cycle's point is made of, and which of them have it.
            let required: Vec<&(&DiskRecord, BTreeMap<u64, DiskPoint>)> =
                per_disk.iter().filter(|(d, _)| d.in_cycle(c)).collect();
            let have: Vec<(&DiskRecord, &DiskPoint)> = required
                .iter()
                .filter_map(|(d, pts)| pts.get(&c).map(|p| (*d, p)))
                .collect();
            let waiting_for: Vec<String> = required
                .iter()
                .filter(|(d, pts)| !pts.contains_key(&c) && d.last_cycle() < c)
                .map(|(d, _)| d.disk.clone())
                .collect();
            if have.is_empty() || (have.len() != required.len() && waiting_for.is_empty()) {
                continue;
            }
            let t = have.iter().map(|(_, p)| p.time).max().unwrap_or(0);
            let accepted = have.iter().map(|(_, p)| p.accepted).max().unwrap_or(0);
            let app = have.iter().all(|(_, p)| p.app);
            let fin = have.iter().all(|(_, p)| p.fin);
            let kind = if waiting_for.is_empty() {
                point_kind(c, app)
            } else {
                "incomplete"
            };
            let rfc = |t: u64| {
                if t > 0 {
                    crate::util::rfc3339(t)
                } else {
                    String::new()
                }
            };
            points.push(PointView {
                id: format!("c{c}"),
                cycle: c,
                time: rfc(t),
                time_unix: t,
                accepted: rfc(accepted),
                accepted_unix: accepted,
                kind: kind.into(),
                final_point: fin && c > 0 && waiting_for.is_empty(),
                disks: have.iter().map(|(d, _)| d.disk.clone()).collect(),
                damaged: false,
                damage: None,
                waiting_for,
            });
        }
        for p in points.iter_mut().filter(|p| !p.is_incomplete()) {
            let hits = self.point_damage(vm, p.cycle).await?;
            if !hits.is_empty() {
                p.damaged = true;
                p.damage = Some(format!(
                    "{} damaged or missing object(s): {}",
                    hits.len(),
                    super::damage::summary(&hits)
                ));
            }
        }
        Ok(points)
    }

    /// Resolves `latest`, `latest-app`, an id (`c12` or `12`) or an RFC 3339 time (the latest
    /// point at or before it) to a cycle.
    pub async fn resolve_point(&self, vm: &str, sel: &str) -> Result<PointView> {
        let mut points = self.points_and_incomplete(vm).await?;
        // Asked for by id, an incomplete cycle gets its own answer; `latest` and the others
        // choose among complete points only.
        let incomplete: Vec<PointView> = points
            .iter()
            .filter(|p| p.is_incomplete())
            .cloned()
            .collect();
        points.retain(|p| !p.is_incomplete());
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
        if let Some(p) = p {
            return Ok(p);
        }
        let cycle = sel.strip_prefix('c').unwrap_or(sel).parse::<u64>().ok();
        if let Some(p) = incomplete.iter().find(|p| Some(p.cycle) == cycle) {
            return Err(incomplete_point(vm, p));
        }
        if points.is_empty() {
            if let Some(p) = incomplete.first() {
                return Err(incomplete_point(vm, p));
            }
        }
        Err(not_found(format!(
            "VM {vm} has no retained recovery point {sel:?}"
        )))
    }

    /// The point `sel` names, refused for a disk it does not include (added after it, or
    /// removed before it): `404 disk_not_in_point`.
    pub async fn resolve_disk_point(&self, vm: &str, disk: &str, sel: &str) -> Result<PointView> {
        let p = self.resolve_point(vm, sel).await?;
        // An unknown disk is answered as such first.
        self.catalog.disk_for(None, vm, disk).await?;
        if !p.disks.iter().any(|d| d == disk) {
            return Err(Error::not_found(
                "disk_not_in_point",
                format!(
                    "point {} of VM {vm} does not include disk {disk} (its disks: {})",
                    p.id,
                    p.disks.join(", ")
                ),
            ));
        }
        Ok(p)
    }

    /// A reader for one disk at a cycle (cached: points are immutable until merged away).
    pub async fn point_reader(&self, vm: &str, disk: &str, cycle: u64) -> Result<PinnedReader> {
        let (_, ids) = self.catalog.disk_for(None, vm, disk).await?;
        // Pinned before the record is read: a merge that commits later sees the pin and keeps
        // the logs this reader may use; one that committed earlier is in the record read below.
        let pin = self.pin_readers(&ids.vm_id, &ids.disk_id);
        // One record for everything below: the journal may be shortened by a merge meanwhile.
        let (_, d) = self.catalog.disk_for(None, vm, disk).await?;
        let chain = point_chain(&d, cycle)?;
        if let Some(root) = &chain.root {
            self.hold_refs(
                &pin,
                PinnedRefs {
                    map_root: root.clone(),
                    log_prefixes: chain
                        .logs
                        .iter()
                        .map(|k| {
                            crate::vault::layout::log_prefix(&d.vm_id, &d.disk_id, k).to_string()
                        })
                        .collect(),
                },
            );
        }
        let root = d.map_root.clone().unwrap_or_default();
        let key = (d.vm_id.clone(), d.disk_id.clone(), cycle, root);
        if let Some(r) = self.readers.lock().await.get(&key) {
            return Ok(PinnedReader {
                reader: r.clone(),
                _pin: pin,
            });
        }
        let base_root = chain.root.ok_or_else(|| {
            Error::conflict(
                "replication_incomplete",
                format!("disk {disk} of VM {vm} has not completed initial replication"),
            )
        })?;
        let base = self.map_by_root(&base_root).await?;
        let reader = Arc::new(
            PointReader::build_sized(
                self.catalog.vault().chunks.clone(),
                self.frames.clone(),
                &d.vm_id,
                &d.disk_id,
                base,
                chain.logs,
                chain.size,
            )
            .await?,
        );
        let mut cache = self.readers.lock().await;
        if cache.len() >= 16 {
            cache.clear();
        }
        cache.insert(key, reader.clone());
        Ok(PinnedReader { reader, _pin: pin })
    }

    /// A new pin on a disk's logs, registered (dead pins are pruned on the way).
    fn pin_readers(&self, vm_id: &str, disk_id: &str) -> Arc<()> {
        let pin = Arc::new(());
        // A poisoned lock only means a panic elsewhere while holding it; the map is usable.
        let mut pins = self.reader_pins.lock().unwrap_or_else(|e| e.into_inner());
        let list = pins
            .entry((vm_id.to_string(), disk_id.to_string()))
            .or_default();
        list.retain(|w| w.strong_count() > 0);
        list.push(Arc::downgrade(&pin));
        pin
    }

    /// Registers what a pinned reader reads through, for garbage collection.
    fn hold_refs(&self, pin: &Arc<()>, refs: PinnedRefs) {
        let mut held = self.reader_refs.lock().unwrap_or_else(|e| e.into_inner());
        held.retain(|(w, _)| w.strong_count() > 0);
        held.push((Arc::downgrade(pin), refs));
    }

    /// What the pinned readers alive now read through (garbage collection keeps it).
    pub(crate) fn pinned_refs(&self) -> Vec<PinnedRefs> {
        let mut held = self.reader_refs.lock().unwrap_or_else(|e| e.into_inner());
        held.retain(|(w, _)| w.strong_count() > 0);
        held.iter().map(|(_, r)| r.clone()).collect()
    }

    /// The disk's pins alive now.
    fn live_pins(&self, vm_id: &str, disk_id: &str) -> Vec<std::sync::Weak<()>> {
        let mut pins = self.reader_pins.lock().unwrap_or_else(|e| e.into_inner());
        let list = pins
            .entry((vm_id.to_string(), disk_id.to_string()))
            .or_default();
        list.retain(|w| w.strong_count() > 0);
        list.clone()
    }

    /// The whole disk at a reader's point as one block map: the blocks its logs touch get
    /// pieces for the pages the logs wrote ([`crate::replica::pieces`]), or are read and stored
    /// whole as chunks when [`pieces::plan`] says so (compaction, a whole-block write, the
    /// short last block of a grown disk), and put in the base's slots. Returns the map and
    /// what writing it cost. Blocks go a group at a time, so each log frame is opened once per
    /// group rather than once per piece (see [`crate::replica::point`]). The packs are stored
    /// before this returns, so a map saved from the result never names a pack that is not there.
    pub(crate) async fn full_map(&self, reader: &PinnedReader) -> Result<(BlockMap, MapWrite)> {
        self.full_map_in(reader, MERGE_GROUP_BYTES).await
    }

    /// [`Replicas::full_map`] with groups of `budget` log bytes.
    pub(crate) async fn full_map_in(
        &self,
        reader: &PinnedReader,
        budget: u64,
    ) -> Result<(BlockMap, MapWrite)> {
        // A grown disk's point: the larger map (its short last block is among the touched).
        let mut map: BlockMap = reader.base().grown(reader.size());
        let resized = resized_last_block(reader.base(), reader.size());
        let chunks = self.catalog.vault().chunks.clone();
        let mut packs = PackWriter::new(chunks.clone());
        let mut cost = MapWrite::default();
        let base = reader.base();
        let bs = base.block_size();
        for group in reader.groups(budget) {
            let overlay = reader.load(&group).await?;
            let overlay = &overlay;
            let mut results = futures_util::stream::iter(group.iter().copied().map(|i| {
                let chunks = chunks.clone();
                let len = block_len(reader.size(), bs, i) as u32;
                let plan = if Some(i) == resized {
                    Plan::Whole
                } else {
                    let old: Option<&Layers> = base.layers(i).map(|l| l.as_ref());
                    pieces::plan(len, old, &reader.writes(i))
                };
                async move {
                    let (ranges, kept, need_base) = match plan {
                        Plan::Whole => {
                            let (bytes, hash) = reader.block_with(i, overlay).await?;
                            let put = chunks.put_block(bytes, Some(hash)).await?;
                            return Ok::<_, Error>(Built::Whole(i, put));
                        }
                        Plan::Pieces {
                            ranges,
                            kept,
                            need_base,
                        } => (ranges, kept, need_base),
                    };
                    // Only a page the logs write in part needs the block's current bytes.
                    let current = match need_base {
                        true => Some(pieces::read_base(&chunks, base, i, len as usize).await?),
                        false => None,
                    };
                    let mut sealed = Vec::with_capacity(ranges.len());
                    for (a, e) in ranges {
                        let mut buf = match &current {
                            Some(c) => c
                                .get(a as usize..e as usize)
                                .ok_or_else(|| Error::internal("a piece past its block"))?
                                .to_vec(),
                            None => vec![0u8; (e - a) as usize],
                        };
                        reader.paint(i, overlay, &mut buf, a)?;
                        sealed.push(pieces::seal_piece(&chunks, a, buf).await?);
                    }
                    // With the current bytes in hand, the block's new hash costs one pass.
                    let hash = match current {
                        Some(mut c) => {
                            reader.paint(i, overlay, &mut c, 0)?;
                            Some(chunks.cpu().run(move || PlainHash::of(&c)).await)
                        }
                        None => None,
                    };
                    Ok(Built::Pieces(i, kept, sealed, hash))
                }
            }))
            .buffer_unordered(4);
            while let Some(r) = results.next().await {
                match r? {
                    Built::Whole(i, put) => {
                        self.damage.note_stored(&put).await?;
                        cost.bytes_written += put.stored_bytes;
                        let e = match put.name {
                            Some(name) => MapEntry::Data {
                                name,
                                hash: put.hash,
                            },
                            None => MapEntry::Zero,
                        };
                        map.set(i, e)?;
                        cost.blocks_whole += 1;
                    }
                    Built::Pieces(i, kept, sealed, hash) => {
                        let old = base.layers(i);
                        let mut list: Vec<PieceRef> = kept
                            .iter()
                            .filter_map(|&k| old.and_then(|l| l.pieces.get(k)).copied())
                            .collect();
                        for p in sealed {
                            list.push(packs.push(p).await?);
                        }
                        let e = map.get(i).unwrap_or(MapEntry::Zero);
                        map.set_layered(i, e, Some(Layers { pieces: list, hash }))?;
                        cost.blocks_layered += 1;
                    }
                }
            }
        }
        packs.finish().await?;
        cost.bytes_written += packs.bytes_written();
        Ok((map, cost))
    }

    /// A block map by its root name (cached: maps are immutable).
    pub(crate) async fn map_by_root(&self, root: &str) -> Result<Arc<BlockMap>> {
        if let Some(m) = self.maps.lock().await.get(root) {
            return Ok(m.clone());
        }
        let name = crate::chunk::ChunkName::from_hex(root)
            .ok_or_else(|| Error::internal(format!("malformed map root {root:?} in a record")))?;
        let map = Arc::new(BlockMap::load(&self.catalog.vault().chunks, &name).await?);
        let mut cache = self.maps.lock().await;
        if cache.len() >= 16 {
            cache.clear();
        }
        cache.insert(root.to_string(), map.clone());
        Ok(map)
    }

    /// Merges the first `count` journal entries of a disk into its base map.
    pub async fn merge_disk(&self, vm: &str, disk: &str, count: usize) -> Result<MergeReport> {
        let (_, d0) = self.catalog.disk_for(None, vm, disk).await?;
        // New chunks and map, then the record: one critical section for garbage collection
        // (taken before the disk's lock, as every writer does).
        let _fenced = self.catalog.vault().chunks.fence().writer().await;
        let lock = self.catalog.journal_lock(&d0).await;
        let _held = lock.lock().await;
        let (_, d) = self.catalog.disk_for(None, vm, disk).await?;
        let count = count.min(d.journal.len());
        if count == 0 {
            return Ok(MergeReport::default());
        }
        let last = d.journal[count - 1].clone();
        let reader = self.point_reader(vm, disk, last.cycle).await?;
        let (map, cost) = self.full_map(&reader).await?;
        let touched = cost.blocks_whole + cost.blocks_layered;
        let (root, map_bytes) = map.save_counted(&self.catalog.vault().chunks).await?;
        metrics::counter!("drvault_merge_bytes_written_total")
            .increment(cost.bytes_written + map_bytes);
        let mut rec = d.clone();
        let merged: Vec<_> = rec.journal.drain(..count).collect();
        rec.map_root = Some(root.to_hex());
        rec.base_point = BasePoint {
            cycle: last.cycle,
            time_unix: last.point_unix(),
            app_consistent: last.app_consistent,
            accepted_unix: last.accepted_unix,
        };
        let (data_blocks, zero_blocks) = map.entries().fold((0, 0), |(a, z), (i, e)| {
            if e == MapEntry::Zero && !map.is_layered(i) {
                (a, z + 1)
            } else {
                (a + 1, z)
            }
        });
        rec.stats.data_blocks = data_blocks;
        rec.stats.zero_blocks = zero_blocks;
        // Marks a server before the backlog rule set on logs kept ("pending log bytes …"):
        // once merged below half the disk they no longer apply.
        if rec
            .resync_required
            .as_deref()
            .map(|r| r.starts_with("pending log bytes"))
            .unwrap_or(false)
            && rec.pending_log_bytes() < crate::catalog::resync_threshold(rec.size)
        {
            rec.resync_required = None;
        }
        self.catalog.store_disk(rec.clone()).await?;
        self.readers
            .lock()
            .await
            .retain(|k, _| !(k.0 == d.vm_id && k.1 == d.disk_id));
        drop(reader);
        // Readers pinned before the commit (a failover writing its disks, an export between two
        // blocks) may still read the merged logs' frames: those go once the last of them is
        // dropped, not under their feet. Readers pinned from now on use the new base map.
        let users = self.live_pins(&d.vm_id, &d.disk_id);
        let in_use = users.len();
        let mut keys = Vec::with_capacity(merged.len());
        let mut freed = 0;
        for e in merged.iter().filter(|e| e.is_log()) {
            keys.push((e.log_id.clone(), log_key(&e.log_id)?));
            freed += e.log_bytes;
        }
        let (chunks, frames) = (self.catalog.vault().chunks.clone(), self.frames.clone());
        let (vm_id, disk_id) = (d.vm_id.clone(), d.disk_id.clone());
        let (vm_name, disk_name) = (vm.to_string(), disk.to_string());
        let delete = async move {
            if !pins_released(&users, PIN_WAIT_LIMIT).await {
                tracing::warn!(vm = %vm_name, disk = %disk_name, logs = keys.len(), "merged logs kept: a point reader from before the merge is still in use after an hour; they are unreachable and only take space");
                return;
            }
            for (log_id, key) in keys {
                if let Err(err) = crate::journal::delete_log(&chunks, &vm_id, &disk_id, &key).await
                {
                    tracing::warn!(vm = %vm_name, disk = %disk_name, log = %log_id, error = %err, "merged log not deleted; it is unreachable");
                }
                frames.forget_prefix(
                    crate::vault::layout::log_prefix(&vm_id, &disk_id, &key).as_str(),
                );
            }
        };
        if !self.catalog.cluster().live_peers().is_empty() {
            // Readers on other servers (an export, a failover) may be reading these logs and
            // their pins are not seen here: garbage collection removes them, after its grace
            // period and with every server's readers counted.
            tracing::debug!(
                vm,
                disk,
                "merged logs left to garbage collection: other servers share the vault"
            );
        } else if in_use > 0 {
            // The merge is done as far as its caller can tell: every point reads the same
            // whether the old logs exist or not, so it need not wait for the readers.
            tracing::info!(
                vm,
                disk,
                readers = in_use,
                "merged logs are deleted once the readers still using them finish"
            );
            self.tasks.spawn("merged log delete", delete);
        } else {
            // Nothing reads them: gone before the merge returns, as callers may check.
            delete.await;
        }
        metrics::counter!("drvault_merge_blocks_rewritten_total").increment(cost.blocks_whole);
        metrics::counter!("drvault_merge_blocks_layered_total").increment(cost.blocks_layered);
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

    /// As [`Replicas::merge_vm`]; with `through`, merges every log up to and including that
    /// cycle instead (the points before it disappear, the later ones read the same).
    pub async fn merge_vm_through(
        &self,
        vm: &str,
        all: bool,
        through: Option<u64>,
    ) -> Result<MergeReport> {
        let rec = self.catalog.vm_for(None, vm).await?;
        let mut total = MergeReport::default();
        for spec in &rec.spec.disks {
            let Some(r) = self.merge_disk_upto(&rec, &spec.id, all, through).await? else {
                continue;
            };
            total.disks += 1;
            total.logs_merged += r.logs_merged;
            total.blocks_rewritten += r.blocks_rewritten;
            total.log_bytes_freed += r.log_bytes_freed;
        }
        Ok(total)
    }

    /// One disk's part of [`Replicas::merge_vm_through`]; `None` for a disk still in initial
    /// replication.
    async fn merge_disk_upto(
        &self,
        rec: &crate::catalog::VmRecord,
        disk: &str,
        all: bool,
        through: Option<u64>,
    ) -> Result<Option<MergeReport>> {
        let retention = rec.spec.policy.clone().unwrap_or_default().retention_s;
        let cutoff = crate::util::unix_now().saturating_sub(retention);
        let (_, d) = self.catalog.disk_for(None, &rec.name, disk).await?;
        if d.state != DiskState::Complete {
            return Ok(None);
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
        Ok(Some(self.merge_disk(&rec.name, disk, count).await?))
    }

    /// The background merge pass: on every disk of every VM, the logs that left the retention
    /// window. A disk whose merge failed is tried again only once its back-off passed (doubling
    /// per failure up to a cap), so a disk that keeps failing is not retried on every pass and
    /// does not hold back the other disks.
    pub async fn merge_expired_all(&self) {
        for vm in self.catalog.vm_names().await {
            let Ok(rec) = self.catalog.vm_for(None, &vm).await else {
                continue;
            };
            // Another live server holds the VM and merges it.
            if !self.catalog.try_hold(&vm).await {
                continue;
            }
            for spec in &rec.spec.disks {
                let key = (vm.clone(), spec.id.clone());
                if !self.merge_retries.due(&key, std::time::Instant::now()) {
                    continue;
                }
                match self.merge_disk_upto(&rec, &spec.id, false, None).await {
                    Ok(_) => self.merge_retries.succeeded(&key),
                    Err(e) => {
                        let wait = self
                            .merge_retries
                            .failed(key, std::time::Instant::now(), &e);
                        tracing::warn!(%vm, disk = %spec.id, error = %e, retry_in_s = wait.as_secs(), "background merge failed; retried after a back-off");
                    }
                }
            }
        }
    }

    /// The background merge's failure record of a disk, if its last try failed.
    pub fn merge_retry(&self, vm: &str, disk: &str) -> Option<crate::tasks::Retry> {
        self.merge_retries.get(&(vm.to_string(), disk.to_string()))
    }

    /// Data blocks at a point: base data blocks plus every block a log writes.
    pub async fn point_blocks(
        &self,
        vm: &str,
        disk: &str,
        cycle: u64,
    ) -> Result<(DiskRecord, u64, Vec<(u64, Option<String>)>)> {
        let reader = self.point_reader(vm, disk, cycle).await?;
        let (_, d) = self.catalog.disk_for(None, vm, disk).await?;
        Ok((d, reader.size(), reader.data_blocks()))
    }

    /// The base block map of a completed disk.
    pub async fn base_map(&self, vm: &str, disk: &str) -> Result<(DiskRecord, BlockMap)> {
        let (_, d) = self.catalog.disk_for(None, vm, disk).await?;
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
        let map = BlockMap::load(&self.catalog.vault().chunks, &root).await?;
        Ok((d, map))
    }

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
        if map.is_layered(index) {
            let len = block_len(d.size, d.block_size, index) as usize;
            let chunks = &self.catalog.vault().chunks;
            let data = pieces::read_base(chunks, &map, index, len).await?;
            let (data, h) = chunks
                .cpu()
                .run(move || {
                    let h = PlainHash::of(&data);
                    (data, h)
                })
                .await;
            return Ok((Bytes::from(data), h));
        }
        match entry {
            MapEntry::Zero => {
                let len = block_len(d.size, d.block_size, index) as usize;
                let z = vec![0u8; len];
                let h = PlainHash::of(&z);
                Ok((Bytes::from(z), h))
            }
            MapEntry::Data { name, hash } => {
                let (bytes, h) = self.catalog.vault().chunks.get_block(&name).await?;
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
        let (_, d) = self.catalog.disk_for(None, vm, disk).await?;
        let root = d.map_root.clone().ok_or_else(|| {
            Error::conflict(
                "replication_incomplete",
                format!("disk {disk} of VM {vm} has not completed initial replication"),
            )
        })?;
        Ok((d, self.map_by_root(&root).await?))
    }

    /// Gives every disk of the VM a journal entry at one new cycle: the snapshot map for the
    /// disks in `roots`, *unchanged* for the others. Each disk switches in one record update and
    /// a disk that already has the entry (`tag`) is skipped, so an interrupted switch finishes
    /// when run again. Snapshot disks restart their log chain. Returns the cycle.
    pub async fn install_snapshots(
        &self,
        vm: &str,
        tag: &str,
        roots: &BTreeMap<String, String>,
        fixed_cycle: Option<u64>,
    ) -> Result<u64> {
        let v = self.catalog.vm_for(None, vm).await?;
        let mut disks = Vec::new();
        for spec in &v.spec.disks {
            disks.push(self.catalog.disk_for(None, vm, &spec.id).await?.1);
        }
        let cycle = match fixed_cycle.or_else(|| {
            disks
                .iter()
                .flat_map(|d| d.journal.iter())
                .find(|e| e.log_id.ends_with(tag))
                .map(|e| e.cycle)
        }) {
            Some(c) => c,
            None => disks.iter().map(|d| d.last_cycle()).max().unwrap_or(0) + 1,
        };
        for d0 in disks {
            let lock = self.catalog.journal_lock(&d0).await;
            let _held = lock.lock().await;
            let (_, d) = self.catalog.disk_for(None, vm, &d0.disk).await?;
            if d.journal.iter().any(|e| e.log_id.ends_with(tag)) {
                continue;
            }
            let mut rec = d.clone();
            let snapshot = roots.get(&d.disk).cloned();
            let entry = JournalEntry {
                log_id: format!(
                    "{}{tag}",
                    if snapshot.is_some() { "" } else { "unchanged-" }
                ),
                previous_id: String::new(),
                cycle,
                app_consistent: false,
                final_log: false,
                accepted_unix: crate::util::unix_now(),
                log_unix: None,
                disk_size: None,
                log_bytes: 0,
                extents: 0,
                data_bytes: 0,
                unchanged: snapshot.is_none(),
                snapshot_root: snapshot.clone(),
            };
            if cycle <= rec.last_cycle() {
                return Err(Error::internal(format!(
                    "disk {} already has cycle {} past the switch cycle {cycle}",
                    d.disk,
                    rec.last_cycle()
                )));
            }
            rec.journal.push(entry);
            if snapshot.is_some() {
                rec.resync_fence = rec.chain_head.take().or(rec.resync_fence);
                rec.data_write_guid = None;
                rec.resync_required = None;
            }
            self.catalog.store_disk(rec).await?;
        }
        Ok(cycle)
    }
}

/// The refusal of a point that is not complete yet, naming the disks it waits for.
fn incomplete_point(vm: &str, p: &PointView) -> Error {
    let what = if p.cycle == 0 {
        "its initial replication"
    } else {
        "its log of the cycle"
    };
    Error::conflict_recoverable(
        "point_incomplete",
        format!(
            "recovery point {} of VM {vm} is not complete yet: waiting for {} {} ({what}); every disk of the VM needs a point at cycle {}",
            p.id,
            if p.waiting_for.len() == 1 { "disk" } else { "disks" },
            p.waiting_for.join(", "),
            p.cycle
        ),
    )
}

/// What one disk's point reads: a map (the base, or the last snapshot at or before the point:
/// a snapshot replaces everything before it) and the logs after it, oldest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PointChain {
    /// Root name (hex); `None` before initial replication completed.
    pub root: Option<String>,
    /// Object-key ids of the logs.
    pub logs: Vec<String>,
    /// The disk's size at the point when a log after the root says it (a grown disk).
    pub size: Option<u64>,
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
    let after_root = before.get(from..).unwrap_or_default();
    let logs = after_root
        .iter()
        .filter(|e| e.is_log())
        .map(|e| log_key(&e.log_id))
        .collect::<Result<Vec<_>>>()?;
    let size = after_root.iter().rev().find_map(|e| e.disk_size);
    Ok(PointChain { root, logs, size })
}

/// Object-key id of a log from its GUID text.
pub(crate) fn log_key(log_id: &str) -> Result<String> {
    let g: crate::format::hrl::Guid = log_id
        .parse()
        .map_err(|_| Error::internal(format!("journal holds a malformed log id {log_id}")))?;
    Ok(crate::journal::log_key_id(&g))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::protect::disk_digest;
    use crate::catalog::VmSpec;
    use crate::chunk::{CpuPool, KeyRing, PlainHash};
    use crate::format::hrl::{Guid, HrlWriter, HrlWriterParams};
    use crate::ingest::logs::LogMeta;
    use crate::ingest::CompleteRequest;
    use crate::services::{Services, Settings};
    use crate::store::{Key, Store};
    use crate::vault::Vault;
    use bytes::Bytes;

    const BS: usize = 65536;
    /// Blocks of the test disk: 16 MiB, so a few MiB of logs stay below the resync threshold.
    const BLOCKS: usize = 256;

    /// A VM whose disk holds block 0 and got two logs: c1 writes block 1, c2 block 2.
    async fn protected_with_two_logs() -> (Services, Vault) {
        let logs = (1..=2u8)
            .map(|c| vec![(c as u64 * BS as u64, vec![c + 1; 4096])])
            .collect();
        protected_with_logs(logs).await
    }

    /// A VM whose disk of `BLOCKS` blocks holds block 0 (all ones) and got one log per element of
    /// `logs` (cycles 1, 2, …), each made of its (disk offset, bytes) writes in that order.
    async fn protected_with_logs(logs: Vec<Vec<(u64, Vec<u8>)>>) -> (Services, Vault) {
        let store = Store::open("memory://", &[]).unwrap();
        let vault = Vault::open(store, Arc::new(KeyRing::random()), CpuPool::new(2), 1)
            .await
            .unwrap();
        let jobs = crate::jobs::Jobs::load(vault.records.clone())
            .await
            .unwrap();
        let p = Services::load(
            vault.clone(),
            jobs,
            crate::tasks::Tasks::new(),
            Settings::new(BS as u32),
        )
        .await
        .unwrap();
        let size = (BLOCKS * BS) as u64;
        let spec: VmSpec =
            serde_json::from_value(serde_json::json!({"disks": [{"id": "os", "size": size}]}))
                .unwrap();
        p.catalog.enable("h", "vm", &spec).await.unwrap();
        let base = vec![1u8; BS];
        let hash = PlainHash::of(&base);
        p.ingest
            .put_block("h", "vm", "os", 0, hash, Bytes::from(base))
            .await
            .unwrap();
        let mut hashes = vec![None; BLOCKS];
        hashes[0] = Some(hash);
        let req = CompleteRequest {
            data_runs: vec![(0, 1)],
            digest: disk_digest(&hashes, size, BS as u32).to_hex(),
        };
        p.ingest.complete_disk("h", "vm", "os", &req).await.unwrap();
        let mut prev = Guid([0; 16]);
        for (c, writes) in (1..=255u8).zip(logs) {
            let id = Guid([c; 16]);
            let mut w = HrlWriter::in_memory(HrlWriterParams {
                unique_id: id,
                previous_unique_id: prev,
                timestamp: 1,
                ..Default::default()
            })
            .unwrap();
            for (off, data) in writes {
                w.add_write(off, &data).unwrap();
            }
            let log = w.finish_to_vec().unwrap();
            let len = log.len() as u64;
            let body = futures_util::stream::iter([Ok::<_, std::io::Error>(Bytes::from(log))]);
            let meta = LogMeta {
                cycle: Some(c as u64),
                app_consistent: false,
                final_log: false,
            };
            p.ingest
                .accept_log("h", "vm", "os", &id.to_string(), meta, Some(len), body)
                .await
                .unwrap();
            prev = id;
        }
        (p, vault)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_merge_keeps_the_logs_a_reader_from_before_it_still_reads() {
        let (p, vault) = protected_with_two_logs().await;
        let logs = Key::new(&["logs"]).unwrap();
        // A failover or an export has begun reading c2; every log is merged under it.
        let reader = p.replicas.point_reader("vm", "os", 2).await.unwrap();
        p.replicas.merge_vm("vm", true).await.unwrap();
        assert_eq!(p.replicas.points("vm").await.unwrap().len(), 1);
        for (i, byte) in [(0u64, 1u8), (1, 2), (2, 3)] {
            let (b, _) = reader.read_block(i).await.unwrap();
            assert_eq!(
                &b[..4096],
                &[byte; 4096][..],
                "block {i} of c2 after the merge"
            );
        }
        assert!(
            !vault.store().list(&logs).await.unwrap().is_empty(),
            "logs deleted under a reader"
        );
        // Once the reader is gone, so are the merged logs.
        drop(reader);
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
        while !vault.store().list(&logs).await.unwrap().is_empty() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "merged logs never deleted"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        // And the merged disk reads the same through a new reader.
        let (b, _) = p
            .replicas
            .point_reader("vm", "os", 2)
            .await
            .unwrap()
            .read_block(2)
            .await
            .unwrap();
        assert_eq!(&b[..4096], &[3u8; 4096][..]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_merge_equals_the_logs_applied_in_order_whatever_the_groups() {
        // Three logs of 1.5 MiB (two frames each) over the same 1 MiB of the disk, 4 KiB
        // writes in a different order in each, then writes across block ends over them and
        // one over those: each log overrides the last, and within a log a later write an
        // earlier one.
        let mut raw = vec![0u8; BLOCKS * BS];
        raw[..BS].fill(1);
        let mut logs = Vec::new();
        for l in 0..3u64 {
            let mut writes = Vec::new();
            for k in 0..256u64 {
                let slot = (k * (2 * l + 3) + l * 17) % 256;
                let b = (l * 64 + k) as u8 | 1;
                writes.push((BS as u64 * 4 + slot * 4096, vec![b; 4096]));
            }
            for k in 0..4u64 {
                let off = BS as u64 * (5 + 3 * k) - 512 * (l + 1) * 8;
                writes.push((off, vec![(l * 4 + k) as u8 + 100; 128 * 1024]));
            }
            writes.push((BS as u64 * 5 - 4096, vec![200 + l as u8; 8192]));
            for (off, data) in &writes {
                raw[*off as usize..*off as usize + data.len()].copy_from_slice(data);
            }
            logs.push(writes);
        }
        let (p, vault) = protected_with_logs(logs).await;
        let chunks = vault.chunks.clone();
        let check = |map: BlockMap, what: String| {
            let chunks = chunks.clone();
            let raw = raw.clone();
            async move {
                for (i, _) in map.entries() {
                    let want = &raw[i as usize * BS..(i as usize + 1) * BS];
                    let got = pieces::read_base(&chunks, &map, i, BS).await.unwrap();
                    assert!(got[..] == want[..], "{what}: block {i}");
                }
            }
        };
        let reader = p.replicas.point_reader("vm", "os", 3).await.unwrap();
        for budget in [1, 100_000, 300_000, MERGE_GROUP_BYTES] {
            let (map, n) = p.replicas.full_map_in(&reader, budget).await.unwrap();
            assert_eq!(
                n.blocks_whole + n.blocks_layered,
                16,
                "blocks 4 to 19 are written"
            );
            check(map, format!("groups of {budget} bytes")).await;
        }
        drop(reader);
        p.replicas.merge_vm("vm", true).await.unwrap();
        let (_, d) = p.catalog.disk_for(None, "vm", "os").await.unwrap();
        assert!(d.journal.is_empty());
        let root = d.map_root.clone().unwrap();
        let merged = p.replicas.map_by_root(&root).await.unwrap();
        check((*merged).clone(), "the merged base".into()).await;
    }

    #[tokio::test]
    async fn a_merge_nothing_reads_from_deletes_the_logs_before_it_returns() {
        let (p, vault) = protected_with_two_logs().await;
        let logs = Key::new(&["logs"]).unwrap();
        // A reader used and dropped before the merge, and one cached: neither holds it back.
        let (b, _) = p
            .replicas
            .point_reader("vm", "os", 1)
            .await
            .unwrap()
            .read_block(1)
            .await
            .unwrap();
        assert_eq!(&b[..4096], &[2u8; 4096][..]);
        p.replicas.merge_vm("vm", true).await.unwrap();
        assert!(vault.store().list(&logs).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_reader_merged_away_before_it_was_built_is_refused() {
        let (p, _vault) = protected_with_two_logs().await;
        p.replicas.merge_vm("vm", true).await.unwrap();
        let e = p.replicas.point_reader("vm", "os", 1).await.err().unwrap();
        assert_eq!(e.code(), "point_not_found", "{e}");
    }

    #[tokio::test]
    async fn a_pin_outliving_the_limit_stops_the_wait() {
        let pin = Arc::new(());
        let pins = [Arc::downgrade(&pin)];
        let limit = std::time::Duration::from_millis(50);
        assert!(!pins_released(&pins, limit).await);
        drop(pin);
        assert!(pins_released(&pins, limit).await);
    }

    #[tokio::test]
    async fn a_disk_whose_background_merge_fails_waits_its_back_off_while_others_merge() {
        use crate::services::testing::{block, on_store, protect, send_log, BS};
        use crate::store::faulty::{FaultKind, FaultOp, FaultRule, FaultyStore};
        let (store, faults) = FaultyStore::wrap(&Store::open("memory://", &[]).unwrap(), 1);
        let (s, _vault) = on_store(store).await;
        for vm in ["a", "b"] {
            protect(&s, vm, &[("os", vec![Some(block(1)), None])]).await;
            send_log(&s, vm, "os", (1, 0), 1, (0, &[7u8; 4096]))
                .await
                .unwrap();
            send_log(&s, vm, "os", (2, 1), 2, (BS as u64, &[8u8; 4096]))
                .await
                .unwrap();
            // The first log left the retention window (a day) two days ago.
            let (_, mut d) = s.catalog.disk_for(None, vm, "os").await.unwrap();
            d.journal[0].accepted_unix -= 2 * 86_400;
            s.catalog.store_disk(d).await.unwrap();
        }
        let journal = |vm: &'static str| {
            let s = s.clone();
            async move {
                s.catalog
                    .disk_for(None, vm, "os")
                    .await
                    .unwrap()
                    .1
                    .journal
                    .len()
            }
        };
        // VM a's logs cannot be read: its merge fails, b's goes ahead.
        let a_logs = format!("logs/{}/", s.catalog.vm_id("a"));
        faults
            .set_rules(vec![
                FaultRule::new(FaultOp::Get, FaultKind::Error(1.0)).under(&a_logs)
            ])
            .unwrap();
        s.replicas.merge_expired_all().await;
        assert_eq!((journal("a").await, journal("b").await), (2, 1));
        let retry = s.replicas.merge_retry("a", "os").unwrap();
        assert_eq!(retry.failures, 1);
        assert!(retry.next_at >= std::time::Instant::now() + crate::replica::MERGE_RETRY_FIRST / 2);
        assert!(s.replicas.merge_retry("b", "os").is_none());
        // The store works again, but the disk's back-off has not passed: no new try yet.
        faults.clear();
        s.replicas.merge_expired_all().await;
        assert_eq!(journal("a").await, 2);
        assert_eq!(s.replicas.merge_retry("a", "os").unwrap().failures, 1);
        // An operator's merge is not held back by it.
        s.replicas.merge_vm("a", false).await.unwrap();
        assert_eq!(journal("a").await, 1);
    }

    /// xorshift64*: deterministic test data without a dependency.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
        fn bytes(&mut self, n: usize) -> Vec<u8> {
            // Runs of one value: compressible, and never all zeros by chance.
            let v = self.next() as u8 | 1;
            let mut out = vec![v; n];
            for b in out.iter_mut().step_by(97) {
                *b = self.next() as u8;
            }
            out
        }
    }

    /// Sends a log of `writes` (disk offset, bytes) with id `n` after `after`, as `cycle`.
    async fn send_writes(
        s: &Services,
        (n, after): (u8, u8),
        cycle: u64,
        writes: &[(u64, Vec<u8>)],
    ) {
        use crate::services::testing::log_id;
        let mut w = HrlWriter::in_memory(HrlWriterParams {
            unique_id: log_id(n),
            previous_unique_id: log_id(after),
            timestamp: 1,
            ..Default::default()
        })
        .unwrap();
        for (off, data) in writes {
            w.add_write(*off, data).unwrap();
        }
        let log = w.finish_to_vec().unwrap();
        let len = log.len() as u64;
        let body = futures_util::stream::iter([Ok::<_, std::io::Error>(Bytes::from(log))]);
        let meta = LogMeta {
            cycle: Some(cycle),
            app_consistent: false,
            final_log: false,
        };
        s.ingest
            .accept_log(
                "h",
                "vm",
                "os",
                &log_id(n).to_string(),
                meta,
                Some(len),
                body,
            )
            .await
            .unwrap();
    }

    /// Runs a whole resync of disk "os" to `source` (the agent's side of the protocol, in
    /// process); returns the cycle it committed.
    async fn resync_to(s: &Services, source: &[u8]) -> u64 {
        use crate::replica::patch;
        use crate::replica::resync::{digest_of, DigestRequest, FineRequest, ResyncRequest};
        let bs = crate::services::testing::BS as usize;
        let req = ResyncRequest {
            now: true,
            disks: vec![],
        };
        s.resyncs.start_resync("vm", &req, "test").await.unwrap();
        let theirs = s.resyncs.resync_hashes("h", "vm", "os").await.unwrap();
        let blocks: Vec<&[u8]> = source.chunks(bs).collect();
        for (i, b) in blocks.iter().enumerate() {
            if theirs[i * 32..(i + 1) * 32] == PlainHash::of(b).0[..] {
                continue;
            }
            let fine = FineRequest {
                blocks: vec![i as u64],
            };
            let fine = s.resyncs.resync_fine("h", "vm", "os", &fine).await.unwrap();
            let ranges = patch::differing_ranges(b, &fine);
            let body = Bytes::from(patch::encode(b, &ranges));
            s.resyncs
                .resync_put_patch("h", "vm", "os", i as u64, PlainHash::of(b), body)
                .await
                .unwrap();
        }
        let hashes: Vec<PlainHash> = blocks.iter().map(|b| PlainHash::of(b)).collect();
        let done = DigestRequest {
            digest: digest_of(&hashes).to_hex(),
        };
        let done = s
            .resyncs
            .resync_complete("h", "vm", "os", &done)
            .await
            .unwrap();
        done.cycle.unwrap()
    }

    /// Random writes over a disk of `size` bytes: mostly 4 KiB pages, some sector-sized and
    /// unaligned ones, some across block ends, now and then a whole block or more.
    fn random_writes(rng: &mut Rng, size: u64) -> Vec<(u64, Vec<u8>)> {
        let bs = crate::services::testing::BS as u64;
        (0..rng.below(24) + 1)
            .map(|_| {
                let len = match rng.below(10) {
                    0..=5 => 4096 * (rng.below(3) + 1),
                    6 | 7 => 512 * (rng.below(9) + 1),
                    8 => bs - 4096 + 512 * rng.below(24),
                    _ => bs * (rng.below(2) + 1),
                }
                .min(size);
                let off = match rng.below(3) {
                    0 => rng.below((size - len) / 512 + 1) * 512,
                    _ => rng.below((size - len) / 4096 + 1) * 4096,
                };
                let data = rng.bytes(len as usize);
                (off, data)
            })
            .collect()
    }

    /// Checks every retained point of disk "os" against the model, block by block, through
    /// the copying and the in-place read paths.
    async fn check_points(s: &Services, model: &BTreeMap<u64, Vec<u8>>, what: &str) {
        let bs = crate::services::testing::BS as usize;
        let cycles: Vec<u64> = s
            .replicas
            .points("vm")
            .await
            .unwrap()
            .iter()
            .map(|p| p.cycle)
            .collect();
        assert_eq!(
            cycles,
            model.keys().copied().collect::<Vec<_>>(),
            "{what}: points"
        );
        for (&c, disk) in model {
            let r = s.replicas.point_reader("vm", "os", c).await.unwrap();
            for (i, want) in disk.chunks(bs).enumerate() {
                let (got, h) = r.read_block(i as u64).await.unwrap();
                assert!(got[..] == want[..], "{what}: c{c} block {i}");
                assert!(h.ct_eq(&PlainHash::of(want)));
                match r.read_block_into(i as u64, vec![0u8; bs], 0).await.unwrap() {
                    crate::replica::point::ReadInto::Filled { buf, len } => {
                        assert!(buf[..len] == want[..], "{what}: c{c} block {i} in place")
                    }
                    crate::replica::point::ReadInto::Copied { data, .. } => {
                        assert!(data[..] == want[..], "{what}: c{c} block {i} copied")
                    }
                }
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn random_logs_resyncs_and_merges_read_as_the_flat_disk_at_every_point() {
        use crate::services::testing::{memory, protect, BS};
        let mut layered_seen = 0usize;
        for seed in 1..=5u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let (s, _vault) = memory().await;
            let blocks = rng.below(12) as usize + 4;
            let initial: Vec<Option<Bytes>> = (0..blocks)
                .map(|_| (rng.below(3) > 0).then(|| Bytes::from(rng.bytes(BS as usize))))
                .collect();
            protect(&s, "vm", &[("os", initial.clone())]).await;
            let mut disk: Vec<u8> = initial
                .iter()
                .flat_map(|b| {
                    b.clone()
                        .map(|b| b.to_vec())
                        .unwrap_or(vec![0u8; BS as usize])
                })
                .collect();
            let size = disk.len() as u64;
            let mut model: BTreeMap<u64, Vec<u8>> = BTreeMap::from([(0, disk.clone())]);
            let (mut next_log, mut prev_log, mut cycle) = (1u8, 0u8, 0u64);
            for step in 0..14 {
                let what = format!("seed {seed} step {step}");
                match rng.below(10) {
                    0..=5 => {
                        let writes = random_writes(&mut rng, size);
                        for (off, data) in &writes {
                            disk[*off as usize..*off as usize + data.len()].copy_from_slice(data);
                        }
                        cycle += 1;
                        send_writes(&s, (next_log, prev_log), cycle, &writes).await;
                        (prev_log, next_log) = (next_log, next_log + 1);
                        model.insert(cycle, disk.clone());
                    }
                    6..=8 => {
                        // Through a random retained point, in groups of a random budget.
                        let retained: Vec<u64> = model.keys().copied().collect();
                        let through = retained[rng.below(retained.len() as u64) as usize];
                        if rng.below(2) == 0 {
                            let r = s.replicas.point_reader("vm", "os", through).await.unwrap();
                            let budget =
                                [1, 5000, 200_000, MERGE_GROUP_BYTES][rng.below(4) as usize];
                            let (map, _) = s.replicas.full_map_in(&r, budget).await.unwrap();
                            for (i, want) in model[&through].chunks(BS as usize).enumerate() {
                                let chunks = &s.catalog.vault().chunks;
                                let got = pieces::read_base(chunks, &map, i as u64, BS as usize)
                                    .await
                                    .unwrap();
                                assert!(got[..] == want[..], "{what}: map block {i}");
                            }
                        }
                        s.replicas
                            .merge_vm_through("vm", false, Some(through))
                            .await
                            .unwrap();
                        model.retain(|&c, _| c >= through);
                        let (_, base) = s.replicas.cached_map("vm", "os").await.unwrap();
                        layered_seen += base.layered().count();
                    }
                    _ => {
                        for (off, data) in random_writes(&mut rng, size) {
                            disk[off as usize..off as usize + data.len()].copy_from_slice(&data);
                        }
                        cycle = resync_to(&s, &disk).await;
                        // The chain restarts after a resync: the next log names a new parent.
                        prev_log = next_log;
                        next_log += 1;
                        model.insert(cycle, disk.clone());
                    }
                }
                check_points(&s, &model, &what).await;
            }
        }
        assert!(
            layered_seen > 10,
            "merges stored pieces ({layered_seen} layered blocks seen)"
        );
    }

    /// Bytes a merge of one log of `writes` stores (pieces, chunks and map objects) on a
    /// 64 MiB disk of 4 MiB blocks of incompressible data.
    async fn merge_cost(writes: Vec<(u64, Vec<u8>)>) -> (u64, MapWrite) {
        const BLOCK: u32 = 4 << 20;
        let store = Store::open("memory://", &[]).unwrap();
        let vault = Vault::open(store, Arc::new(KeyRing::random()), CpuPool::new(2), 1)
            .await
            .unwrap();
        let jobs = crate::jobs::Jobs::load(vault.records.clone())
            .await
            .unwrap();
        let s = Services::load(
            vault,
            jobs,
            crate::tasks::Tasks::new(),
            Settings::new(BLOCK),
        )
        .await
        .unwrap();
        let size = 64u64 << 20;
        let spec: VmSpec =
            serde_json::from_value(serde_json::json!({"disks": [{"id": "os", "size": size}]}))
                .unwrap();
        s.catalog.enable("h", "vm", &spec).await.unwrap();
        let mut rng = Rng(7);
        let mut hashes = Vec::new();
        for i in 0..16u64 {
            let b: Vec<u8> = (0..BLOCK / 8)
                .flat_map(|_| rng.next().to_le_bytes())
                .collect();
            let h = PlainHash::of(&b);
            s.ingest
                .put_block("h", "vm", "os", i, h, Bytes::from(b))
                .await
                .unwrap();
            hashes.push(Some(h));
        }
        let req = CompleteRequest {
            data_runs: vec![(0, 16)],
            digest: disk_digest(&hashes, size, BLOCK).to_hex(),
        };
        s.ingest.complete_disk("h", "vm", "os", &req).await.unwrap();
        send_writes(&s, (1, 0), 1, &writes).await;
        let r = s.replicas.point_reader("vm", "os", 1).await.unwrap();
        let (map, cost) = s.replicas.full_map(&r).await.unwrap();
        let (_, map_bytes) = map.save_counted(&s.catalog.vault().chunks).await.unwrap();
        // What it wrote reads back as the point.
        for i in 0..16u64 {
            let chunks = &s.catalog.vault().chunks;
            let got = pieces::read_base(chunks, &map, i, BLOCK as usize)
                .await
                .unwrap();
            assert!(got[..] == r.read_block(i).await.unwrap().0[..], "block {i}");
        }
        (cost.bytes_written + map_bytes, cost)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_merge_writes_about_the_bytes_that_changed() {
        let mut rng = Rng(99);
        let mut noise =
            |n: usize| -> Vec<u8> { (0..n / 8).flat_map(|_| rng.next().to_le_bytes()).collect() };
        // A lone 4 KiB write: one piece and the map's changed segment and root, not a block.
        let (lone, cost) = merge_cost(vec![(5 * (4 << 20) + 40960, noise(4096))]).await;
        eprintln!("lone 4 KiB write: {lone} bytes written by merge ({cost:?})");
        assert_eq!((cost.blocks_whole, cost.blocks_layered), (0, 1));
        assert!(lone < 16 * 1024, "a lone 4 KiB write cost {lone} bytes");
        // 5% of the disk in scattered 4 KiB pages (distinct pages, so every byte is new).
        let pages = (64u64 << 20) / 4096;
        let mut chosen = BTreeSet::new();
        let mut pick = Rng(5);
        while chosen.len() < (pages / 20) as usize {
            chosen.insert(pick.below(pages));
        }
        let writes: Vec<(u64, Vec<u8>)> = chosen.iter().map(|&p| (p * 4096, noise(4096))).collect();
        let changed = writes.len() as u64 * 4096;
        let (bytes, cost) = merge_cost(writes).await;
        let ratio = bytes as f64 / changed as f64;
        eprintln!("5% scattered 4 KiB writes on 64 MiB: {bytes} bytes written for {changed} changed, {ratio:.3} per changed byte ({cost:?})");
        assert_eq!(cost.blocks_whole, 0, "no block rewritten whole");
        assert!(ratio <= 1.2, "{ratio} bytes written per changed byte");
    }
}
