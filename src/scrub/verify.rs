//! Verify: re-read what the records reference and check every object as a reader would.
//!
//! Checked per family: chunks (tag, then the plaintext's BLAKE3 and length derive the name),
//! map roots and segments (tag, name from the plaintext, geometry), log frames (tag, and each
//! frame's length against the log's recorded length) and extent lists, receipts of open
//! sessions, and the latest version of each VM's records (tag, JSON; VM and disk records are
//! also compared with this server's own copy, which catches a deleted latest version). Objects
//! are read straight from the store, never from the server's caches.
//!
//! `sample_percent` reads that share of chunks and log frames (chosen at random per run);
//! metadata (maps, extent lists, receipts, records) is always read whole. A scheduled verify
//! reads only chunks and frames written since the last verify, by the store's timestamps.
//! Registered damage is always re-checked.
//!
//! What is found damaged is *quarantined*: its bytes are copied to `quarantine/<key>/<time>`
//! and its key is deleted, never just dropped. Its key being free matters: the next upload of
//! the same block finds no chunk and stores it again, which heals it. A missing object is
//! registered as such. A damaged VM or disk record is rewritten from the server's copy (the
//! only writer holds the current value) and its bad version quarantined; other records (resync,
//! failback) are copied to quarantine and left in place, so they fail loudly rather than an
//! older version silently taking their place.
//!
//! A verify over every VM also walks the audit log's hash chain ([`crate::audit`]) and reports
//! each removed, edited or reordered entry (`audit_damage`, kind `audit_chain`, with its
//! sequence number). Those entries are left as they are: the log is evidence, not data to heal.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::Instant;

use futures_util::StreamExt;

use super::refs::{self, MapWalk, RecordOwner, Roots};
use super::{ObjectFamily, Problem, Scrub};
use crate::chunk::{ChunkName, ChunkStore};
use crate::error::{Error, Result};
use crate::file_formats::{ObjectKind, LOG_FRAME_LEN};
use crate::jobs::JobState;
use crate::replica::damage::{Affected, DamagedObject};
use crate::store::{Key, StoreError};
use crate::vault::layout;
pub use crate::wire::{Checked, DamagedPoint, VerifyReport, VerifyRequest};

pub(super) const STEPS: &[&str] = &[
    "Collect references",
    "Read and check objects",
    "Quarantine and register damage",
];

impl VerifyRequest {
    pub fn validate(&self) -> Result<()> {
        if let Some(p) = self.sample_percent {
            if !(p > 0.0 && p <= 100.0) {
                return Err(Error::invalid(
                    "invalid_sample",
                    format!("sample_percent {p}: must be more than 0 and at most 100"),
                ));
            }
        }
        if let Some(vm) = &self.vm {
            if !crate::vault::registry::valid_name(vm) {
                return Err(Error::invalid("invalid_name", format!("VM name {vm:?}")));
            }
        }
        Ok(())
    }

    fn whole(&self) -> bool {
        self.vm.is_none() && self.sample_percent.unwrap_or(100.0) >= 100.0
    }
}

/// Picks objects to read: registered ones always; others by age (schedule) and sample share.
struct Selector {
    seed: [u8; 32],
    /// Per 10 000.
    share: u64,
    since_ms: Option<u64>,
    mtimes: HashMap<String, u64>,
    registered: HashSet<String>,
}

impl Selector {
    fn wants(&self, key: &Key) -> bool {
        let k = key.as_str();
        if self.registered.contains(k) {
            return true;
        }
        if let Some(since) = self.since_ms {
            // Not listed: gone since, which is worth a look.
            if self.mtimes.get(k).is_some_and(|&m| m < since) {
                return false;
            }
        }
        if self.share >= 10_000 {
            return true;
        }
        let h = blake3::keyed_hash(&self.seed, k.as_bytes());
        let v = u64::from_le_bytes(crate::format::array_at(h.as_bytes(), 0));
        v % 10_000 < self.share
    }
}

pub(super) async fn run(
    s: &Scrub,
    job: &str,
    req: &VerifyRequest,
    since: Option<u64>,
) -> Result<VerifyReport> {
    let started = Instant::now();
    let started_unix = crate::util::unix_now();
    // Records other servers on the vault changed since this one last looked.
    s.catalog.refresh().await?;
    let chunks = &s.vault.chunks;
    let reg = s.replicas.damage().get().await;

    s.jobs
        .step(job, "Collect references", JobState::Running)
        .await?;
    let roots = refs::collect(&s.catalog, &s.resyncs, req.vm.as_deref()).await?;
    let walk = refs::walk_maps(chunks, roots.maps.keys().copied()).await?;
    let mut checked: BTreeMap<ObjectFamily, Checked> = BTreeMap::new();
    let mut problems: BTreeMap<String, Problem> = BTreeMap::new();
    for pr in roots.problems.iter().chain(&walk.problems) {
        problems.insert(pr.key.to_string(), pr.clone());
    }
    checked.entry(ObjectFamily::Map).or_default().objects =
        (walk.roots.len() + walk.segments.len() + walk.problems.len()) as u64;
    checked.entry(ObjectFamily::Receipt).or_default().objects = roots.receipts;
    next_step(s, job, "Collect references", "Read and check objects").await?;
    let mut seed = [0u8; 32];
    crate::util::fill_random(&mut seed);
    let mut mtimes = HashMap::new();
    if since.is_some() {
        for prefix in ["chunks", "packs", "logs"] {
            let k = Key::new(&[prefix]).ok_or_else(|| Error::internal("prefix"))?;
            for l in s.vault.store().list(&k).await? {
                mtimes.insert(l.key.to_string(), l.modified_ms);
            }
        }
    }
    let sel = Selector {
        seed,
        share: (req.sample_percent.unwrap_or(100.0) * 100.0).round() as u64,
        since_ms: since.map(|t| t.saturating_mul(1000)),
        mtimes,
        registered: reg.objects.keys().chain(&reg.healed).cloned().collect(),
    };

    // Chunks: from every opened segment and from open sessions' receipts.
    let mut all_chunks: BTreeSet<ChunkName> = walk.chunks().into_iter().collect();
    all_chunks.extend(roots.receipt_chunks.keys().copied());
    let chosen: Vec<ChunkName> = all_chunks
        .iter()
        .copied()
        .filter(|n| sel.wants(&ChunkStore::chunk_key(n)))
        .collect();
    let total = chosen.len().max(1) as f64;
    let mut reads = futures_util::stream::iter(chosen.into_iter().map(|name| {
        let chunks = chunks.clone();
        async move { (name, chunks.get_block(&name).await) }
    }))
    .buffer_unordered(8);
    let mut done = 0u64;
    while let Some((name, r)) = reads.next().await {
        let c = checked.entry(ObjectFamily::Chunk).or_default();
        c.objects += 1;
        match r {
            Ok((bytes, _)) => c.bytes += bytes.len() as u64,
            Err(e) => {
                let key = ChunkStore::chunk_key(&name);
                let pr = Problem::classify(&key, ObjectFamily::Chunk, e.into())?;
                problems.insert(key.to_string(), pr);
            }
        }
        done += 1;
        if done % 64 == 0 {
            s.jobs
                .set_progress(job, 0.1 + 0.7 * done as f64 / total)
                .await;
        }
    }
    drop(reads);

    // Packs: every piece a live map names, each by its own range read (tag, length, hash).
    // The first bad piece registers the whole pack: it is quarantined whole, and every map
    // naming any of its pieces is attributed.
    for (pack, refs_in) in &walk.pieces {
        let key = layout::pack_object(pack);
        if !sel.wants(&key) {
            continue;
        }
        let c = checked.entry(ObjectFamily::Pack).or_default();
        c.objects += 1;
        for p in refs_in.values() {
            match crate::replica::pieces::read_piece(chunks, p).await {
                Ok(plain) => {
                    checked.entry(ObjectFamily::Pack).or_default().bytes += plain.len() as u64
                }
                Err(e) => {
                    problems.insert(
                        key.to_string(),
                        Problem::classify(&key, ObjectFamily::Pack, e)?,
                    );
                    break;
                }
            }
        }
    }

    // Logs: every frame the recorded length implies, each of its length, and the extent list.
    for (log, _) in roots.logs.values() {
        let frames = log.bytes.div_ceil(LOG_FRAME_LEN as u64);
        for n in 0..frames {
            let key = layout::log_frame(&log.vm_id, &log.disk_id, &log.key_id, n);
            if !sel.wants(&key) {
                continue;
            }
            let want = (log.bytes - n * LOG_FRAME_LEN as u64).min(LOG_FRAME_LEN as u64);
            let c = checked.entry(ObjectFamily::Log).or_default();
            c.objects += 1;
            match chunks.get_sealed(ObjectKind::LogFrame, &key).await {
                Ok(plain) if plain.len() as u64 == want => c.bytes += want,
                Ok(plain) => {
                    problems.insert(
                        key.to_string(),
                        Problem {
                            key: key.clone(),
                            family: ObjectFamily::Log,
                            missing: false,
                            reason: format!(
                                "frame holds {} bytes, the log's length implies {want}",
                                plain.len()
                            ),
                        },
                    );
                }
                Err(e) => {
                    problems.insert(
                        key.to_string(),
                        Problem::classify(&key, ObjectFamily::Log, e.into())?,
                    );
                }
            }
        }
        let key = layout::log_extents(&log.vm_id, &log.disk_id, &log.key_id);
        checked.entry(ObjectFamily::Log).or_default().objects += 1;
        if let Err(e) =
            crate::journal::load_extents(chunks, &log.vm_id, &log.disk_id, &log.key_id).await
        {
            problems.insert(
                key.to_string(),
                Problem::classify(&key, ObjectFamily::Log, e.into())?,
            );
        }
    }

    // Records.
    for (prefix, owner) in &roots.records {
        checked.entry(ObjectFamily::Record).or_default().objects += 1;
        if let Some(pr) = check_record(s, prefix, owner).await? {
            problems.insert(pr.key.to_string(), pr);
        }
    }
    // A log merged away while this verify read it is gone, not damaged.
    let (_, disks) = s.catalog.all_records().await;
    let mut current_logs = HashSet::new();
    for d in &disks {
        for e in d.journal.iter().filter(|e| e.is_log()) {
            let key_id = crate::replica::points::log_key(&e.log_id)?;
            current_logs.insert(layout::log_prefix(&d.vm_id, &d.disk_id, &key_id).to_string());
        }
    }
    problems.retain(|_, pr| {
        !(pr.family == ObjectFamily::Log
            && pr.missing
            && layout::log_prefix_of(&pr.key).is_some_and(|l| !current_logs.contains(l)))
    });
    next_step(
        s,
        job,
        "Read and check objects",
        "Quarantine and register damage",
    )
    .await?;
    let holders = Attribution::new(&walk, &problems);
    let mut next = (*reg).clone();
    let mut damaged = Vec::new();
    for (k, pr) in &problems {
        // A chunk an upload stored again that reads back damaged is registered anew.
        next.healed.remove(k);
        let affects = holders.affects(pr, &roots);
        if let Some(known) = reg.objects.get(k) {
            // Still damaged: keep what was done then, refresh who needs it.
            let mut o = known.clone();
            o.affects = affects;
            next.objects.insert(k.clone(), o.clone());
            damaged.push(o);
            continue;
        }
        let mut o = DamagedObject {
            key: k.clone(),
            family: pr.family,
            problem: if pr.missing { "missing" } else { "corrupt" }.into(),
            reason: pr.reason.clone(),
            quarantined: None,
            action: String::new(),
            found_unix: crate::util::unix_now(),
            affects,
        };
        metrics::counter!("drvault_verify_damaged_total", "family" => pr.family.word())
            .increment(1);
        let owner = roots
            .records
            .iter()
            .find(|(prefix, _)| k.starts_with(&format!("{prefix}/")))
            .map(|(prefix, owner)| (prefix.clone(), owner.clone()));
        match (pr.family, owner) {
            (ObjectFamily::Record, Some((prefix, owner))) => {
                repair_record(s, &prefix, &owner, pr, &mut o).await?;
                if o.action == "kept" {
                    next.objects.insert(k.clone(), o.clone());
                }
            }
            _ => {
                if !pr.missing {
                    o.quarantined = quarantine(s, &pr.key).await?;
                }
                o.action = if o.quarantined.is_some() {
                    metrics::counter!("drvault_quarantined_objects_total").increment(1);
                    "quarantined"
                } else {
                    "registered"
                }
                .into();
                next.objects.insert(k.clone(), o.clone());
            }
        }
        tracing::warn!(object = %k, problem = %o.problem, reason = %o.reason, action = %o.action, "verify found a damaged object");
        damaged.push(o);
    }
    // Registered objects this run read back sound, or (over every VM) no longer referenced.
    let referenced = Referenced::new(&roots, &walk);
    let mut healed = Vec::new();
    let mut unreferenced = Vec::new();
    for k in reg.objects.keys().chain(&reg.healed) {
        if problems.contains_key(k) {
            continue;
        }
        let stored_again = reg.healed.contains(k);
        if referenced.contains(k) {
            healed.push(k.clone());
        } else if req.vm.is_none() {
            if !stored_again {
                unreferenced.push(k.clone());
            }
        } else {
            continue;
        }
        next.objects.remove(k);
        next.healed.remove(k);
    }
    healed.sort();
    healed.dedup();
    if req.whole() {
        next.last_verify_unix = Some(started_unix);
    }
    s.replicas
        .damage()
        .update(|now| {
            // Chunks uploads stored again while this verify ran: whatever it read of them, they
            // were written sound after it looked.
            for k in now.healed.difference(&reg.healed) {
                next.objects.remove(k);
                next.healed.insert(k.clone());
            }
            next
        })
        .await?;

    let mut damaged_points = Vec::new();
    let (vms, _) = s.catalog.all_records().await;
    for v in vms
        .iter()
        .filter(|v| req.vm.as_deref().is_none_or(|o| o == v.name))
    {
        for pt in s.replicas.points(&v.name).await? {
            if pt.damaged {
                let objects = s.replicas.point_damage(&v.name, pt.cycle).await?;
                damaged_points.push(DamagedPoint {
                    vm: v.name.clone(),
                    point: pt.id,
                    objects,
                });
            }
        }
    }
    for (f, c) in &checked {
        metrics::counter!("drvault_verify_objects_total", "family" => f.word())
            .increment(c.objects);
        metrics::counter!("drvault_verify_bytes_total", "family" => f.word()).increment(c.bytes);
    }
    let audit_damage = match (s.audit(), &req.vm) {
        (Some(log), None) => log.check_chain().await.map_err(Error::from)?,
        _ => Vec::new(),
    };
    for d in &audit_damage {
        tracing::warn!(seq = d.seq, problem = %d.problem, reason = %d.reason, "verify found the audit chain broken");
    }
    metrics::counter!("drvault_verify_damaged_total", "family" => "audit_chain")
        .increment(audit_damage.len() as u64);
    let seconds = started.elapsed().as_secs_f64();
    let bytes: u64 = checked.values().map(|c| c.bytes).sum();
    let clean = damaged.is_empty() && damaged_points.is_empty() && audit_damage.is_empty();
    tracing::info!(
        job,
        damaged = damaged.len(),
        healed = healed.len(),
        seconds,
        "verify finished"
    );
    Ok(VerifyReport {
        job: job.to_string(),
        vm: req.vm.clone(),
        sample_percent: req.sample_percent.unwrap_or(100.0),
        since_unix: since,
        started_unix,
        seconds,
        checked,
        mb_per_s: if seconds > 0.0 {
            bytes as f64 / 1e6 / seconds
        } else {
            0.0
        },
        damaged,
        healed,
        unreferenced,
        damaged_points,
        audit_damage,
        clean,
    })
}

/// Marks step `done` succeeded and step `next` running.
async fn next_step(s: &Scrub, job: &str, done: &str, next: &str) -> Result<()> {
    s.jobs.step(job, done, JobState::Succeeded).await?;
    s.jobs.step(job, next, JobState::Running).await?;
    Ok(())
}

/// Who needs a damaged object: chunk → segments → roots → holders, and so on.
struct Attribution {
    /// Damaged chunks → segments naming them.
    chunk_segments: HashMap<ChunkName, Vec<ChunkName>>,
    /// Damaged packs → segments naming pieces in them.
    pack_segments: HashMap<ChunkName, Vec<ChunkName>>,
    segment_roots: HashMap<ChunkName, Vec<ChunkName>>,
}

impl Attribution {
    fn new(walk: &MapWalk, problems: &BTreeMap<String, Problem>) -> Attribution {
        let bad: HashSet<ChunkName> = problems
            .values()
            .filter(|p| p.family == ObjectFamily::Chunk)
            .filter_map(|p| ChunkName::from_hex(p.key.name()))
            .collect();
        let mut chunk_segments: HashMap<ChunkName, Vec<ChunkName>> = HashMap::new();
        if !bad.is_empty() {
            for (seg, names) in &walk.segments {
                for n in names.iter().filter(|n| bad.contains(n)) {
                    chunk_segments.entry(*n).or_default().push(*seg);
                }
            }
        }
        let bad_packs: HashSet<ChunkName> = problems
            .values()
            .filter(|p| p.family == ObjectFamily::Pack)
            .filter_map(|p| ChunkName::from_hex(p.key.name()))
            .collect();
        let mut pack_segments: HashMap<ChunkName, Vec<ChunkName>> = HashMap::new();
        for (seg, packs) in &walk.segment_packs {
            for n in packs.iter().filter(|n| bad_packs.contains(n)) {
                pack_segments.entry(*n).or_default().push(*seg);
            }
        }
        let mut segment_roots: HashMap<ChunkName, Vec<ChunkName>> = HashMap::new();
        for r in walk.roots.values() {
            for seg in r.segments.iter().flatten() {
                segment_roots.entry(*seg).or_default().push(r.name);
            }
        }
        Attribution {
            chunk_segments,
            pack_segments,
            segment_roots,
        }
    }

    fn affects(&self, p: &Problem, roots: &Roots) -> Vec<Affected> {
        let mut hs: BTreeSet<usize> = BTreeSet::new();
        let name = ChunkName::from_hex(p.key.name());
        let map_holders = |root: &ChunkName, hs: &mut BTreeSet<usize>| {
            if let Some(h) = roots.maps.get(root) {
                hs.extend(h);
            }
        };
        match (p.family, name) {
            (ObjectFamily::Chunk, Some(n)) => {
                for seg in self.chunk_segments.get(&n).into_iter().flatten() {
                    for r in self.segment_roots.get(seg).into_iter().flatten() {
                        map_holders(r, &mut hs);
                    }
                }
                if let Some(h) = roots.receipt_chunks.get(&n) {
                    hs.extend(h);
                }
            }
            (ObjectFamily::Pack, Some(n)) => {
                for seg in self.pack_segments.get(&n).into_iter().flatten() {
                    for r in self.segment_roots.get(seg).into_iter().flatten() {
                        map_holders(r, &mut hs);
                    }
                }
            }
            (ObjectFamily::Map, Some(n)) => {
                map_holders(&n, &mut hs);
                for r in self.segment_roots.get(&n).into_iter().flatten() {
                    map_holders(r, &mut hs);
                }
            }
            (ObjectFamily::Log, _) => {
                if let Some((_, h)) = layout::log_prefix_of(&p.key).and_then(|x| roots.logs.get(x))
                {
                    hs.extend(h);
                }
            }
            (ObjectFamily::Receipt, _) => {
                if let Some(h) =
                    refs::stage_session_of(&p.key).and_then(|x| roots.receipt_holders.get(x))
                {
                    hs.insert(*h);
                }
            }
            (ObjectFamily::Record, _) => {
                if let Some((_, owner)) = roots
                    .records
                    .iter()
                    .find(|(prefix, _)| p.key.as_str().starts_with(&format!("{prefix}/")))
                {
                    let disk = match owner {
                        RecordOwner::Disk { disk, .. } => disk.clone(),
                        _ => String::new(),
                    };
                    return vec![Affected {
                        vm: owner.vm().to_string(),
                        disk,
                        points: Vec::new(),
                        session: Some("record".into()),
                    }];
                }
            }
            _ => {}
        }
        // One entry per (vm, disk, session): the union of the holders' points.
        let mut out: BTreeMap<(String, String, Option<String>), BTreeSet<u64>> = BTreeMap::new();
        for h in hs.iter().filter_map(|&i| roots.holders.get(i)) {
            out.entry((h.vm.clone(), h.disk.clone(), h.session.clone()))
                .or_default()
                .extend(&h.cycles);
        }
        out.into_iter()
            .map(|((vm, disk, session), cycles)| Affected {
                vm,
                disk,
                points: cycles.iter().map(|c| format!("c{c}")).collect(),
                session,
            })
            .collect()
    }
}

/// Keys this run reached (to tell healed registered objects from unreferenced ones).
struct Referenced<'a> {
    roots: &'a Roots,
    walk: &'a MapWalk,
}

impl<'a> Referenced<'a> {
    fn new(roots: &'a Roots, walk: &'a MapWalk) -> Referenced<'a> {
        Referenced { roots, walk }
    }

    fn contains(&self, k: &str) -> bool {
        let Some(key) = Key::new(&k.split('/').collect::<Vec<_>>()) else {
            return false;
        };
        let name = ChunkName::from_hex(key.name());
        match (ObjectFamily::of_key(k), name) {
            (Some(ObjectFamily::Chunk), Some(n)) => {
                self.roots.receipt_chunks.contains_key(&n)
                    || self.walk.segments.values().any(|s| s.contains(&n))
            }
            (Some(ObjectFamily::Map), Some(n)) => {
                self.walk.roots.contains_key(&n) || self.walk.segments.contains_key(&n)
            }
            (Some(ObjectFamily::Pack), Some(n)) => self.walk.pieces.contains_key(&n),
            (Some(ObjectFamily::Log), _) => {
                layout::log_prefix_of(&key).is_some_and(|p| self.roots.logs.contains_key(p))
            }
            (Some(ObjectFamily::Receipt), _) => {
                refs::stage_session_of(&key).is_some_and(|p| self.roots.live_stages.contains(p))
            }
            (Some(ObjectFamily::Record), _) => self
                .roots
                .records
                .iter()
                .any(|(prefix, _)| k.starts_with(&format!("{prefix}/"))),
            _ => false,
        }
    }
}

/// Checks a record's latest version; VM and disk records also against this server's copy.
async fn check_record(s: &Scrub, prefix: &Key, owner: &RecordOwner) -> Result<Option<Problem>> {
    let records = &s.vault.records;
    // Twice at most: a concurrent update may land between reading the store and the copy.
    for attempt in 0..2 {
        let latest = records.latest_version(prefix).await?;
        let own = own_copy(s, owner).await?;
        let Some(v) = latest else {
            return Ok(own.map(|_| Problem {
                key: layout::record_version(prefix, 1),
                family: ObjectFamily::Record,
                missing: true,
                reason: "no version of the record is stored".into(),
            }));
        };
        let key = layout::record_version(prefix, v);
        let value = match s.vault.chunks.get_sealed(ObjectKind::Record, &key).await {
            Ok(plain) => serde_json::from_slice::<serde_json::Value>(&plain)
                .map_err(|e| format!("does not parse: {e}")),
            Err(e) => {
                return Ok(Some(Problem::classify(
                    &key,
                    ObjectFamily::Record,
                    e.into(),
                )?))
            }
        };
        let value = match value {
            Ok(v) => v,
            Err(reason) => {
                return Ok(Some(Problem {
                    key,
                    family: ObjectFamily::Record,
                    missing: false,
                    reason,
                }))
            }
        };
        match own {
            Some(own) if own != value => {
                if attempt == 0 {
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                    continue;
                }
                return Ok(Some(Problem {
                    key: layout::record_version(prefix, v + 1),
                    family: ObjectFamily::Record,
                    missing: true,
                    reason: format!("the latest version is missing: the newest stored one (v{v}) is older than the server's copy"),
                }));
            }
            _ => return Ok(None),
        }
    }
    Ok(None)
}

/// This server's current value of a VM or disk record (it is their only writer).
async fn own_copy(s: &Scrub, owner: &RecordOwner) -> Result<Option<serde_json::Value>> {
    let v = match owner {
        RecordOwner::Vm { vm } => serde_json::to_value(s.catalog.vm_for(None, vm).await?),
        RecordOwner::Disk { vm, disk } => {
            serde_json::to_value(s.catalog.disk_for(None, vm, disk).await?.1)
        }
        _ => return Ok(None),
    };
    v.map(Some)
        .map_err(|e| Error::internal(format!("record encode: {e}")))
}

/// A damaged VM or disk record is written again from the server's copy, then the bad version
/// is quarantined; any other record is copied to quarantine and left in place.
async fn repair_record(
    s: &Scrub,
    prefix: &Key,
    owner: &RecordOwner,
    pr: &Problem,
    o: &mut DamagedObject,
) -> Result<()> {
    match own_copy(s, owner).await? {
        Some(own) => {
            let v = s.vault.records.write_after_latest(prefix, &own).await?;
            if !pr.missing {
                o.quarantined = quarantine(s, &pr.key).await?;
            }
            o.action = "repaired".into();
            tracing::warn!(record = %prefix, version = ?v, "damaged record rewritten from the server's copy");
        }
        None => {
            o.quarantined = copy_to_quarantine(s, &pr.key).await?;
            o.action = "kept".into();
        }
    }
    Ok(())
}

/// Copies a damaged object's bytes to quarantine, then deletes it. `None` when it vanished.
async fn quarantine(s: &Scrub, key: &Key) -> Result<Option<String>> {
    let q = copy_to_quarantine(s, key).await?;
    if q.is_some() {
        s.vault.store().delete(key).await?;
    }
    Ok(q)
}

async fn copy_to_quarantine(s: &Scrub, key: &Key) -> Result<Option<String>> {
    let raw = match s.vault.store().get(key).await {
        Ok(r) => r,
        Err(StoreError::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let q = layout::quarantine(key, crate::util::unix_now())
        .ok_or_else(|| Error::internal(format!("no quarantine key for {key}")))?;
    s.vault.store().put(&q, raw).await?;
    Ok(Some(q.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::JobKind;
    use crate::scrub::gc::tests::{block, complete, send_log, service, upload};

    /// Whether each point of `vm` is listed as damaged.
    async fn marks(s: &Scrub, vm: &str) -> Vec<bool> {
        let points = s.replicas.points(vm).await.unwrap();
        points.iter().map(|p| p.damaged).collect()
    }

    async fn verify(s: &Scrub) -> VerifyReport {
        let job = s
            .jobs
            .create(JobKind::Verify, None, STEPS, JobState::Running)
            .await
            .unwrap();
        run(s, &job.id, &VerifyRequest::default(), None)
            .await
            .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_flipped_chunk_is_quarantined_marks_its_points_and_heals_on_upload() {
        let s = service().await;
        let (b1, b2, b3, b4) = (block(1), block(2), block(3), block(4));
        upload(&s, "a", &[b1.clone(), b2.clone()]).await;
        complete(&s, "a", &[b1.clone(), b2.clone()]).await;
        let c1 = send_log(&s, "a", 1, 1, &b3).await;
        upload(&s, "b", std::slice::from_ref(&b4)).await;
        complete(&s, "b", std::slice::from_ref(&b4)).await;
        assert!(verify(&s).await.clean);

        let name = ChunkName::derive(
            s.vault.keys().name_key(),
            &crate::chunk::PlainHash::of(&b1),
            b1.len() as u64,
        );
        let key = ChunkStore::chunk_key(&name);
        let mut raw = s.vault.store().get(&key).await.unwrap().to_vec();
        raw[40] ^= 0x10;
        s.vault.store().put(&key, raw.into()).await.unwrap();

        let r = verify(&s).await;
        assert!(!r.clean);
        assert_eq!(r.damaged.len(), 1, "{:?}", r.damaged);
        let d = &r.damaged[0];
        assert_eq!(
            (d.key.as_str(), d.action.as_str()),
            (key.as_str(), "quarantined")
        );
        assert_eq!(d.affects.len(), 1);
        assert_eq!(
            d.affects[0].points,
            vec!["c0".to_string(), format!("c{c1}")]
        );
        let q = Key::new(
            &d.quarantined
                .as_deref()
                .unwrap()
                .split('/')
                .collect::<Vec<_>>(),
        )
        .unwrap();
        assert!(s.vault.store().head(&q).await.unwrap().is_some());
        assert_eq!(s.vault.store().head(&key).await.unwrap(), None);
        assert!(marks(&s, "a").await.iter().all(|&d| d));
        assert!(marks(&s, "b").await.iter().all(|&d| !d));
        let e = s.replicas.refuse_damaged("a", None, c1).await.unwrap_err();
        assert_eq!(e.code(), "point_damaged");

        // The same block uploaded again (another VM's initial replication) stores it anew.
        upload(&s, "c", std::slice::from_ref(&b1)).await;
        let r = verify(&s).await;
        assert!(r.clean, "{r:?}");
        assert_eq!(r.healed, vec![key.to_string()]);
        assert!(marks(&s, "a").await.iter().all(|&d| !d));
        let reader = s.replicas.point_reader("a", "d", 0).await.unwrap();
        assert_eq!(reader.read_block(0).await.unwrap().0, b1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_resync_resends_a_registered_block_and_heals_it() {
        use crate::chunk::PlainHash;
        use crate::replica::resync::{digest_of, DigestRequest, ResyncRequest};
        let s = service().await;
        let (b1, b2) = (block(1), block(2));
        upload(&s, "a", &[b1.clone(), b2.clone()]).await;
        complete(&s, "a", &[b1.clone(), b2.clone()]).await;
        let name = ChunkName::derive(
            s.vault.keys().name_key(),
            &PlainHash::of(&b1),
            b1.len() as u64,
        );
        s.vault
            .store()
            .delete(&ChunkStore::chunk_key(&name))
            .await
            .unwrap();
        let r = verify(&s).await;
        assert_eq!(r.damaged.len(), 1);
        assert_eq!(r.damaged[0].action, "registered");
        let req = ResyncRequest {
            now: true,
            disks: vec![],
        };
        s.resyncs.start_resync("a", &req, "test").await.unwrap();
        // The replica's hash of block 0 matches nothing, block 1's is the real one.
        let hashes = s.resyncs.resync_hashes("h", "a", "d").await.unwrap();
        assert_ne!(&hashes[..32], &PlainHash::of(&b1).0[..]);
        assert_eq!(&hashes[32..64], &PlainHash::of(&b2).0[..]);
        // A whole-block patch (data record at 0) rebuilds it.
        let mut patch = vec![0u8];
        patch.extend_from_slice(&0u32.to_le_bytes());
        patch.extend_from_slice(&(b1.len() as u32).to_le_bytes());
        patch.extend_from_slice(&b1);
        s.resyncs
            .resync_put_patch("h", "a", "d", 0, PlainHash::of(&b1), patch.into())
            .await
            .unwrap();
        let digest = digest_of(&[PlainHash::of(&b1), PlainHash::of(&b2)]).to_hex();
        s.resyncs
            .resync_complete("h", "a", "d", &DigestRequest { digest })
            .await
            .unwrap();
        let r = verify(&s).await;
        assert!(r.clean, "{r:?}");
        assert_eq!(r.healed.len(), 1);
        for p in s.replicas.points("a").await.unwrap() {
            assert!(!p.damaged);
            let reader = s.replicas.point_reader("a", "d", p.cycle).await.unwrap();
            assert_eq!(reader.read_block(0).await.unwrap().0, b1);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_completed_disk_asks_for_blocks_of_quarantined_chunks_and_takes_only_those() {
        use crate::catalog::Health;
        use crate::chunk::PlainHash;
        use crate::ingest::blocks::{QueryBlock, ReceivedQuery};
        let s = service().await;
        let (b1, b2) = (block(1), block(2));
        upload(&s, "a", &[b1.clone(), b2.clone()]).await;
        complete(&s, "a", &[b1.clone(), b2.clone()]).await;
        let query = ReceivedQuery {
            blocks: [&b1, &b2]
                .iter()
                .enumerate()
                .map(|(i, b)| QueryBlock {
                    index: i as u64,
                    hash: PlainHash::of(b).to_hex(),
                })
                .collect(),
        };
        let missing = || s.ingest.missing_blocks("h", "a", "d", &query);
        let health = || async { s.overview.list().await[0].health };
        assert_eq!(missing().await.unwrap(), Vec::<u64>::new());
        let name = ChunkName::derive(
            s.vault.keys().name_key(),
            &PlainHash::of(&b1),
            b1.len() as u64,
        );
        let key = ChunkStore::chunk_key(&name);
        let mut raw = s.vault.store().get(&key).await.unwrap().to_vec();
        raw[40] ^= 0x10;
        s.vault.store().put(&key, raw.into()).await.unwrap();
        assert!(!verify(&s).await.clean);
        assert_eq!(health().await, Health::Critical);

        assert_eq!(missing().await.unwrap(), vec![0]);
        let e = s
            .ingest
            .put_block("h", "a", "d", 1, PlainHash::of(&b2), b2.clone())
            .await
            .unwrap_err();
        assert_eq!(e.code(), "replication_complete");
        let ack = s
            .ingest
            .put_block("h", "a", "d", 0, PlainHash::of(&b1), b1.clone())
            .await
            .unwrap();
        assert_eq!(ack.outcome, "healed");
        let reg = s.replicas.damage().get().await;
        assert!(reg.objects.is_empty(), "{:?}", reg.objects);
        assert_eq!(health().await, Health::Normal);
        assert!(marks(&s, "a").await.iter().all(|&d| !d));
        assert_eq!(missing().await.unwrap(), Vec::<u64>::new());
        let r = verify(&s).await;
        assert!(r.clean, "{r:?}");
        assert_eq!(r.healed, vec![key.to_string()]);
        assert!(s.replicas.damage().get().await.healed.is_empty());
    }

    #[test]
    fn samples_are_refused_outside_0_to_100() {
        for bad in [0.0, -1.0, 100.5, f64::NAN] {
            let r = VerifyRequest {
                vm: None,
                sample_percent: Some(bad),
            };
            assert_eq!(r.validate().unwrap_err().code(), "invalid_sample");
        }
        let r = VerifyRequest {
            vm: Some("../x".into()),
            sample_percent: None,
        };
        assert_eq!(r.validate().unwrap_err().code(), "invalid_name");
    }
}
