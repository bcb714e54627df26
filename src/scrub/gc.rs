//! Garbage collection: mark what the records reference, sweep the rest (see the module docs of
//! [`crate::scrub`] for why this is safe while agents upload).
//!
//! Swept prefixes: `chunks/`, `maps/` and `packs/` (shared: unmarked means no map and no
//! open session names them), `logs/` (a whole stored log is kept while a journal entry refers to
//! it or while it is being received), `stage/` (receipts of sessions that are no longer open:
//! completed, cancelled or replaced). Records and `quarantine/` are never swept.
//!
//! In a local vault a collection also removes the staging files (`<key>#<n>`) writes of a killed
//! process left behind, once older than the cutoff and than [`STAGING_MIN_AGE_MS`]; the server
//! removes those from before its start when it starts.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::time::Instant;

use super::refs;
use super::{ObjectFamily, Scrub};
use crate::chunk::fence::Collection;
use crate::chunk::{ChunkName, ChunkStore};
use crate::error::{Error, Result};
use crate::jobs::JobState;
use crate::store::Key;
use crate::vault::layout;
pub use crate::wire::{Count, GcReport, GcRequest};

pub(super) const STEPS: &[&str] = &["Mark", "Sweep"];

impl Count {
    fn add(&mut self, bytes: u64) {
        self.objects += 1;
        self.bytes += bytes;
    }
}

/// Staging files younger than this are never removed, whatever the grace period: a write in
/// flight owns its staging file until it renames it, and no single object write lasts an hour.
/// Without this floor `--grace 0` could pull the file from under an upload.
pub const STAGING_MIN_AGE_MS: u64 = 3600 * 1000;

/// The marked set: what the sweep must keep.
#[derive(Debug, Default)]
pub struct Marked {
    pub keys: HashSet<String>,
    pub logs: HashSet<String>,
    pub stages: HashSet<String>,
}

impl Marked {
    /// Whether a listed object is referenced.
    pub fn keeps(&self, key: &Key) -> bool {
        match ObjectFamily::of_key(key.as_str()) {
            Some(ObjectFamily::Log) => {
                layout::log_prefix_of(key).is_some_and(|p| self.logs.contains(p))
            }
            Some(ObjectFamily::Receipt) => {
                refs::stage_session_of(key).is_some_and(|p| self.stages.contains(p))
            }
            _ => self.keys.contains(key.as_str()),
        }
    }
}

/// The mark: everything reachable from every VM. Refuses when part of it cannot be read.
pub async fn mark(s: &Scrub) -> Result<Marked> {
    let roots = refs::collect(&s.catalog, &s.resyncs, None).await?;
    // Readers in use (a failover writing its disks, an export) may read through maps and logs
    // a merge or resync has since superseded: those stay until the readers are dropped. They
    // are taken after the records, so a merge committing in between is covered either way.
    let pinned = s.replicas.pinned_refs();
    let mut map_roots: BTreeSet<ChunkName> = roots.maps.keys().copied().collect();
    for r in &pinned {
        let name = ChunkName::from_hex(&r.map_root).ok_or_else(|| {
            Error::internal(format!(
                "malformed map root {:?} held by a reader",
                r.map_root
            ))
        })?;
        map_roots.insert(name);
    }
    let walk = refs::walk_maps(&s.vault.chunks, map_roots).await?;
    let problems: Vec<String> = roots
        .problems
        .iter()
        .chain(&walk.problems)
        .map(|p| format!("{} ({})", p.key, p.reason))
        .collect();
    if !problems.is_empty() {
        return Err(Error::conflict(
            "gc_mark_incomplete",
            format!(
                "{} referenced object(s) cannot be read, so what they reference is unknown and nothing is collected: {}; run drvault verify",
                problems.len(),
                crate::replica::damage::summary(&problems)
            ),
        ));
    }
    let mut m = Marked::default();
    for name in walk.roots.keys().chain(walk.segments.keys()) {
        m.keys.insert(layout::map_object(name).to_string());
    }
    for name in walk.chunks().iter().chain(roots.receipt_chunks.keys()) {
        m.keys.insert(ChunkStore::chunk_key(name).to_string());
    }
    for name in walk.packs() {
        m.keys.insert(layout::pack_object(&name).to_string());
    }
    m.logs = roots.logs.keys().cloned().collect();
    m.logs
        .extend(pinned.into_iter().flat_map(|r| r.log_prefixes));
    m.stages = roots.live_stages.iter().cloned().collect();
    Ok(m)
}

/// Adds to `marked` everything the maps under `roots` reference (readers on other servers).
async fn keep_maps(s: &Scrub, marked: &mut Marked, roots: BTreeSet<ChunkName>) -> Result<()> {
    if roots.is_empty() {
        return Ok(());
    }
    let walk = refs::walk_maps(&s.vault.chunks, roots).await?;
    if let Some(p) = walk.problems.first() {
        return Err(Error::conflict(
            "gc_mark_incomplete",
            format!(
                "a map another server's reader uses cannot be read ({}: {}); nothing is collected; run drvault verify",
                p.key, p.reason
            ),
        ));
    }
    for name in walk.roots.keys().chain(walk.segments.keys()) {
        marked.keys.insert(layout::map_object(name).to_string());
    }
    for name in walk.chunks() {
        marked.keys.insert(ChunkStore::chunk_key(&name).to_string());
    }
    for name in walk.packs() {
        marked.keys.insert(layout::pack_object(&name).to_string());
    }
    Ok(())
}

/// Deletes (or with `dry_run` counts) every listed object under the swept prefixes that is not
/// marked, older than `cutoff_ms` and not touched by a writer during `collection`.
pub async fn sweep(
    s: &Scrub,
    collection: &Collection,
    marked: &Marked,
    cutoff_ms: u64,
    dry_run: bool,
    report: &mut GcReport,
) -> Result<()> {
    let store = s.vault.store().clone();
    for prefix in ["chunks", "maps", "packs", "logs", "stage"] {
        let p = Key::new(&[prefix]).ok_or_else(|| Error::internal("prefix"))?;
        for l in store.list(&p).await? {
            report.scanned += 1;
            let Some(family) = ObjectFamily::of_key(l.key.as_str()) else {
                continue;
            };
            if marked.keeps(&l.key) {
                continue;
            }
            if l.modified_ms >= cutoff_ms {
                report.kept_young.add(l.size);
                continue;
            }
            let freed = dry_run
                || collection
                    .delete_if_untouched(&store, &l.key, layout::log_prefix_of(&l.key))
                    .await?;
            if freed {
                report.freed.entry(family).or_default().add(l.size);
                report.freed_total.add(l.size);
                tracing::trace!(object = %l.key, dry_run, "collected");
            } else {
                report.kept_in_use.add(l.size);
            }
        }
    }
    Ok(())
}

pub(super) async fn run(s: &Scrub, job: &str, dry_run: bool, grace_s: u64) -> Result<GcReport> {
    // Other servers on the vault take part in a round (see [`super::rounds`]): read who is
    // live now, not as of the last heartbeat (a server started since must be in it).
    s.catalog.cluster().heartbeat().await?;
    let peers = s.catalog.cluster().live_peers();
    if peers.is_empty() {
        return run_round(s, job, dry_run, grace_s, None).await;
    }
    let id = uuid::Uuid::new_v4().simple().to_string();
    let result = run_round(s, job, dry_run, grace_s, Some((&id, &peers))).await;
    // Whatever happened, the other servers let their writers go.
    if let Err(e) = s.set_phase(&id, super::rounds::Phase::Done).await {
        tracing::warn!(error = %e, "could not end the collection round; the other servers end it when this server's lease ends");
    }
    result
}

async fn run_round(
    s: &Scrub,
    job: &str,
    dry_run: bool,
    grace_s: u64,
    round: Option<(&str, &[String])>,
) -> Result<GcReport> {
    use super::rounds::Phase;
    let started = Instant::now();
    let started_unix = crate::util::unix_now();
    let wait = s.catalog.cluster().ttl() * 2 + std::time::Duration::from_secs(10);
    s.jobs.step(job, "Mark", JobState::Running).await?;
    if let Some((id, _)) = round {
        s.set_phase(id, Phase::Mark).await?;
    }
    // From here on every store or reuse by a writer is tracked, and the mark below sees every
    // reference made before.
    let collection = s.vault.chunks.fence().begin_collection().await;
    let t0 = crate::util::unix_now_ms();
    if let Some((id, peers)) = round {
        // Every other server tracks its writers too now, and finished what it had in flight.
        s.wait_acks(id, Phase::Mark, peers, wait).await?;
    }
    // The mark reads the records as the vault has them: other servers (live or gone) may have
    // changed those of the VMs this server does not hold since it last read them.
    s.catalog.refresh().await?;
    let mut marked = mark(s).await?;
    s.jobs.step(job, "Mark", JobState::Succeeded).await?;
    s.jobs.step(job, "Sweep", JobState::Running).await?;
    if let Some((id, peers)) = round {
        s.set_phase(id, Phase::Sweep).await?;
        // Their writers are stopped now; what they touched and what their readers use stays.
        let acks = s.wait_acks(id, Phase::Sweep, peers, wait).await?;
        let mut maps = BTreeSet::new();
        for ack in acks.into_values() {
            collection.add_touched(ack.touched, ack.logs);
            marked.logs.extend(ack.pinned_logs);
            for root in ack.pinned_maps {
                let name = ChunkName::from_hex(&root).ok_or_else(|| {
                    Error::internal(format!("malformed map root {root:?} pinned by a server"))
                })?;
                maps.insert(name);
            }
        }
        keep_maps(s, &mut marked, maps).await?;
        if !s.catalog.cluster().holds(crate::cluster::MAINTENANCE) {
            return Err(Error::Unavailable {
                code: "maintenance_lease_lost",
                message: "this server lost the maintenance lease during the collection (paused or cut off); nothing was deleted".into(),
            });
        }
    }
    let cutoff = t0.min(crate::util::unix_now_ms().saturating_sub(grace_s.saturating_mul(1000)));
    let mut report = GcReport {
        job: job.to_string(),
        dry_run,
        grace_s,
        started_unix,
        seconds: 0.0,
        cutoff_unix_ms: cutoff,
        marked: BTreeMap::new(),
        scanned: 0,
        freed: BTreeMap::new(),
        freed_total: Count::default(),
        kept_young: Count::default(),
        kept_in_use: Count::default(),
        staging_leftovers: Count::default(),
    };
    for k in &marked.keys {
        if let Some(f) = ObjectFamily::of_key(k) {
            *report.marked.entry(f).or_default() += 1;
        }
    }
    *report.marked.entry(ObjectFamily::Log).or_default() += marked.logs.len() as u64;
    *report.marked.entry(ObjectFamily::Receipt).or_default() += marked.stages.len() as u64;
    sweep(s, &collection, &marked, cutoff, dry_run, &mut report).await?;
    drop(collection);
    let staging_cutoff = cutoff.min(crate::util::unix_now_ms().saturating_sub(STAGING_MIN_AGE_MS));
    let left = s
        .vault
        .store()
        .remove_staging_leftovers(staging_cutoff, dry_run)
        .await?;
    report.staging_leftovers = Count {
        objects: left.files,
        bytes: left.bytes,
    };
    if !dry_run {
        metrics::counter!("drvault_gc_freed_objects_total").increment(report.freed_total.objects);
        metrics::counter!("drvault_gc_freed_bytes_total").increment(report.freed_total.bytes);
    }
    report.seconds = started.elapsed().as_secs_f64();
    tracing::info!(
        job,
        dry_run,
        grace_s,
        freed_objects = report.freed_total.objects,
        freed_bytes = report.freed_total.bytes,
        staging_leftovers = report.staging_leftovers.objects,
        "garbage collection finished"
    );
    Ok(report)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::catalog::{DiskSpec, VmSpec};
    use crate::chunk::{CpuPool, KeyRing, PlainHash};
    use crate::format::hrl::{Guid, HrlWriter, HrlWriterParams};
    use crate::ingest::{CompleteRequest, Ingest};
    use crate::jobs::{JobKind, Jobs};
    use crate::overview::Overview;
    use crate::services::{Services, Settings};
    use crate::store::Store;
    use crate::vault::Vault;
    use bytes::Bytes;
    use std::sync::Arc;

    pub(crate) const BS: u32 = 65536;

    /// The scrub service with the ingest and overview services over the same vault (tests
    /// upload through them).
    pub(crate) struct Fixture {
        pub scrub: Scrub,
        pub ingest: Ingest,
        pub overview: Overview,
    }

    impl std::ops::Deref for Fixture {
        type Target = Scrub;
        fn deref(&self) -> &Scrub {
            &self.scrub
        }
    }

    pub(crate) async fn service() -> Fixture {
        let vault = Vault::open(
            Store::open("memory://", &[]).unwrap(),
            Arc::new(KeyRing::random()),
            CpuPool::new(2),
            1,
        )
        .await
        .unwrap();
        let jobs = Jobs::load(vault.records.clone()).await.unwrap();
        let sv = Services::load(
            vault.clone(),
            jobs.clone(),
            crate::tasks::Tasks::new(),
            Settings::new(BS),
        )
        .await
        .unwrap();
        Fixture {
            scrub: Scrub::new(
                vault,
                sv.catalog,
                sv.replicas,
                sv.resyncs,
                jobs,
                0,
                crate::tasks::Tasks::new(),
            ),
            ingest: sv.ingest,
            overview: sv.overview,
        }
    }

    pub(crate) fn block(seed: u8) -> Bytes {
        Bytes::from(
            (0..BS)
                .map(|i| (i as u8).wrapping_mul(seed | 1).wrapping_add(seed))
                .collect::<Vec<u8>>(),
        )
    }

    /// Enables protection of `vm` (one disk "d" of `blocks.len()` blocks) and uploads them.
    pub(crate) async fn upload(s: &Fixture, vm: &str, blocks: &[Bytes]) {
        let spec = VmSpec {
            generation: 2,
            cpus: 1,
            memory_mib: 512,
            disks: vec![DiskSpec {
                id: "d".into(),
                size: BS as u64 * blocks.len() as u64,
            }],
            nics: vec![],
            policy: None,
        };
        s.catalog.enable("h", vm, &spec).await.unwrap();
        for (i, b) in blocks.iter().enumerate() {
            s.ingest
                .put_block("h", vm, "d", i as u64, PlainHash::of(b), b.clone())
                .await
                .unwrap();
        }
    }

    pub(crate) async fn complete(s: &Fixture, vm: &str, blocks: &[Bytes]) {
        let hashes: Vec<PlainHash> = blocks.iter().map(|b| PlainHash::of(b)).collect();
        let req = CompleteRequest {
            data_runs: vec![(0, blocks.len() as u64)],
            digest: crate::replica::resync::digest_of(&hashes).to_hex(),
        };
        s.ingest.complete_disk("h", vm, "d", &req).await.unwrap();
    }

    /// Sends a log that overwrites whole block `index` with `data`; returns its cycle.
    pub(crate) async fn send_log(s: &Fixture, vm: &str, n: u64, index: u64, data: &[u8]) -> u64 {
        let guid = |n: u64| {
            let mut b = [0u8; 16];
            b[..8].copy_from_slice(&n.to_le_bytes());
            b[8] = 0x42;
            Guid(b)
        };
        let prev = if n == 1 { Guid::NIL } else { guid(n - 1) };
        let mut w = HrlWriter::in_memory(HrlWriterParams {
            unique_id: guid(n),
            previous_unique_id: prev,
            ..Default::default()
        })
        .unwrap();
        w.add_write(index * BS as u64, data).unwrap();
        let log = w.finish_to_vec().unwrap();
        let len = log.len() as u64;
        let body = futures_util::stream::iter(vec![Ok::<_, std::io::Error>(Bytes::from(log))]);
        s.ingest
            .accept_log(
                "h",
                vm,
                "d",
                &guid(n).to_string(),
                Default::default(),
                Some(len),
                body,
            )
            .await
            .unwrap()
            .cycle
    }

    fn chunk_key(b: &Bytes, s: &Scrub) -> String {
        let name = crate::chunk::ChunkName::derive(
            s.vault.keys().name_key(),
            &PlainHash::of(b),
            b.len() as u64,
        );
        ChunkStore::chunk_key(&name).to_string()
    }

    async fn read(s: &Scrub, vm: &str, cycle: u64, index: u64) -> Bytes {
        let r = s.replicas.point_reader(vm, "d", cycle).await.unwrap();
        r.read_block(index).await.unwrap().0
    }

    async fn collect_garbage(s: &Scrub) -> GcReport {
        let job = s
            .jobs
            .create(JobKind::GarbageCollection, None, STEPS, JobState::Running)
            .await
            .unwrap();
        run(s, &job.id, false, 0).await.unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_mark_follows_receipts_then_maps_then_logs_and_merges() {
        let s = service().await;
        let (b1, b2, b3) = (block(1), block(2), block(3));
        upload(&s, "a", &[b1.clone(), b2.clone()]).await;
        // Open session: its receipts hold the chunks.
        let m = mark(&s).await.unwrap();
        assert!(m.keys.contains(&chunk_key(&b1, &s)) && m.keys.contains(&chunk_key(&b2, &s)));
        assert_eq!(m.stages.len(), 1);
        complete(&s, "a", &[b1.clone(), b2.clone()]).await;
        // Complete: the base map (root and segment) holds them; no session is open.
        let m = mark(&s).await.unwrap();
        assert!(m.keys.contains(&chunk_key(&b1, &s)));
        assert_eq!(m.keys.iter().filter(|k| k.starts_with("maps/")).count(), 2);
        assert!(m.stages.is_empty() && m.logs.is_empty());
        let c1 = send_log(&s, "a", 1, 0, &b3).await;
        let m = mark(&s).await.unwrap();
        assert_eq!(m.logs.len(), 1, "the journal's log is marked");
        assert!(m.keys.contains(&chunk_key(&b1, &s)), "c0 still reads b1");
        s.replicas.merge_vm("a", true).await.unwrap();
        // After the merge b3 is a chunk of the new base; b1 is referenced by nothing.
        let m = mark(&s).await.unwrap();
        assert!(m.keys.contains(&chunk_key(&b3, &s)) && m.keys.contains(&chunk_key(&b2, &s)));
        assert!(!m.keys.contains(&chunk_key(&b1, &s)));
        assert!(m.logs.is_empty());
        let r = collect_garbage(&s).await;
        assert_eq!(
            r.freed.get(&ObjectFamily::Chunk).map(|c| c.objects),
            Some(1)
        );
        assert!(r.freed.get(&ObjectFamily::Map).map(|c| c.objects) >= Some(1));
        let head = |k: String| {
            let st = s.vault.store().clone();
            async move {
                st.head(&Key::new(&k.split('/').collect::<Vec<_>>()).unwrap())
                    .await
                    .unwrap()
            }
        };
        assert_eq!(head(chunk_key(&b1, &s)).await, None);
        assert_eq!(read(&s, "a", c1, 0).await, b3);
        assert_eq!(read(&s, "a", c1, 1).await, b2);
        // Nothing is left to collect.
        assert_eq!(collect_garbage(&s).await.freed_total, Count::default());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reader_in_use_keeps_what_a_merge_superseded_until_it_is_dropped() {
        let s = service().await;
        let (b1, b2, b3) = (block(1), block(2), block(3));
        upload(&s, "a", &[b1.clone(), b2.clone()]).await;
        complete(&s, "a", &[b1.clone(), b2.clone()]).await;
        let c1 = send_log(&s, "a", 1, 0, &b3).await;
        // A failover is materializing c0 (the old base) when c1 is merged and a collection runs.
        let reader = s.replicas.point_reader("a", "d", 0).await.unwrap();
        s.replicas.merge_vm("a", true).await.unwrap();
        let r = collect_garbage(&s).await;
        // The merged log is garbage (c0 never read it); the old base map and b1 are not.
        assert!(
            !r.freed.contains_key(&ObjectFamily::Chunk)
                && !r.freed.contains_key(&ObjectFamily::Map),
            "{r:?}"
        );
        assert_eq!(reader.read_block(0).await.unwrap().0, b1);
        drop(reader);
        // Once it is gone, the old base and its chunk are garbage.
        let r = collect_garbage(&s).await;
        assert_eq!(
            r.freed.get(&ObjectFamily::Chunk).map(|c| c.objects),
            Some(1),
            "{r:?}"
        );
        assert_eq!(read(&s, "a", c1, 0).await, b3);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_chunk_reused_between_mark_and_sweep_is_kept() {
        let s = service().await;
        let (b1, b2) = (block(1), block(2));
        upload(&s, "a", std::slice::from_ref(&b1)).await;
        complete(&s, "a", std::slice::from_ref(&b1)).await;
        send_log(&s, "a", 1, 0, &b2).await;
        s.replicas.merge_vm("a", true).await.unwrap();
        // b1 is now garbage, older than what follows.
        let collection = s.vault.chunks.fence().begin_collection().await;
        let t0 = crate::util::unix_now_ms() + 1;
        let marked = mark(&s).await.unwrap();
        assert!(!marked.keys.contains(&chunk_key(&b1, &s)));
        // An initial replication of the same content deduplicates against it meanwhile.
        upload(&s, "b", std::slice::from_ref(&b1)).await;
        let mut report = GcReport::default();
        sweep(&s, &collection, &marked, t0, false, &mut report)
            .await
            .unwrap();
        assert!(report.kept_in_use.objects >= 1, "{report:?}");
        drop(collection);
        complete(&s, "b", std::slice::from_ref(&b1)).await;
        assert_eq!(read(&s, "b", 0, 0).await, b1);
        collect_garbage(&s).await;
        assert_eq!(read(&s, "b", 0, 0).await, b1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unreadable_map_stops_the_collection() {
        let s = service().await;
        let b1 = block(1);
        upload(&s, "a", std::slice::from_ref(&b1)).await;
        complete(&s, "a", std::slice::from_ref(&b1)).await;
        let maps = s
            .vault
            .store()
            .list(&Key::new(&["maps"]).unwrap())
            .await
            .unwrap();
        for l in &maps {
            s.vault.store().delete(&l.key).await.unwrap();
        }
        let job = s
            .jobs
            .create(JobKind::GarbageCollection, None, STEPS, JobState::Running)
            .await
            .unwrap();
        let e = run(&s, &job.id, false, 0).await.unwrap_err();
        assert_eq!(e.code(), "gc_mark_incomplete");
        // The chunk the lost map named was not collected.
        assert!(s
            .vault
            .store()
            .head(&Key::new(&chunk_key(&b1, &s).split('/').collect::<Vec<_>>()).unwrap())
            .await
            .unwrap()
            .is_some());
    }
}
