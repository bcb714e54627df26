//! Resynchronization: bringing a replica back in line with its source by comparing checksums
//! and sending only what differs (the resync routes in docs/api.md).
//!
//! A *session* covers one VM: the disks that need it (or that the operator named). While a
//! session is open every log of the VM is refused with the recoverable `resync_in_progress`, so
//! the replica holds still and the VM's cycles stay aligned. A session starts *scheduled* for the
//! configured off-hours window (or *active* at once with `--now`); when an agent first asks for a
//! disk in an active session, the server fixes that disk's comparison base: the disk's newest
//! point as one full block map, or an empty disk when that point cannot be read because an
//! object it needs is lost or damaged (the agent then sends every block with data, which heals).
//!
//! The agent compares hierarchically (see [`crate::replica::patch`]): block hashes of the staged
//! view (base, or what this session already received), then 4 KiB fine hashes inside blocks that
//! differ, and uploads a patch per differing block. The server applies the patch to the base
//! block, checks the result against the agent's hash of the whole block, stores it as a chunk
//! and writes a receipt (chunk, receipt, acknowledgement: as for initial replication), so an
//! interrupted agent or a restarted server resumes where it stopped. Completion checks a digest
//! over every block's hash against the agent's and stages the disk's new map; when every disk of
//! the session is staged, each disk's journal gains, in one record update per disk, an entry at
//! the next cycle: the new map (a *snapshot*) for resynchronized disks, *unchanged* for the
//! others. Until then nothing a reader sees has changed: a cancelled or crashed resync leaves the
//! previous replica and all its points readable. Earlier points stay readable (they are base +
//! logs before the snapshot) until retention merges them away.
//!
//! After the switch the disk's log chain restarts: the next log may name any predecessor except
//! the pre-resync chain head (`log_predates_resync`), whose logs are already contained in the
//! resynchronized content.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::Mutex;

use super::damage::DamageRegister;
use super::stage::{self, Receipt};
use super::sync::{self, SyncSide};
use super::Replicas;
use crate::catalog::{Catalog, DiskRecord, DiskState, VmState};
use crate::chunk::PlainHash;
use crate::error::{Error, Kind, Result};
use crate::jobs::{JobKind, JobState};
use crate::replica::blockmap::{block_len, BlockMap, MapEntry};
use crate::tasks::Tasks;
use crate::vault::layout::{self, Family};
pub use crate::wire::{
    DigestRequest, FineRequest, PatchAck, ResyncCompletion, ResyncDisk, ResyncDiskView,
    ResyncRequest, ResyncSession, ResyncState,
};

/// What `resync/hashes` reports for a block whose chunk is registered damaged: a real block
/// hashes to it with probability 2^-256, so the agent sends that block.
const DAMAGED_BLOCK_HASH: [u8; 32] = [0xff; 32];

pub use super::sync::{digest_of, MAX_FINE_BLOCKS};

impl ResyncState {
    pub fn word(self) -> &'static str {
        match self {
            ResyncState::Scheduled => "scheduled",
            ResyncState::Active => "active",
            ResyncState::Committing => "committing",
            ResyncState::Committed => "committed",
            ResyncState::Cancelled => "cancelled",
        }
    }

    /// Whether logs are paused.
    pub fn is_open(self) -> bool {
        matches!(
            self,
            ResyncState::Scheduled | ResyncState::Active | ResyncState::Committing
        )
    }
}

/// The off-hours window in server local time: `HH:MM-HH:MM`, wrapping past midnight when the
/// end is earlier than the start; equal ends mean always open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    start_min: u32,
    end_min: u32,
}

impl Window {
    pub fn parse(s: &str) -> std::result::Result<Window, String> {
        let hm = |t: &str| -> Option<u32> {
            let (h, m) = t.trim().split_once(':')?;
            let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
            (h < 24 && m < 60 && t.trim().len() == 5).then_some(h * 60 + m)
        };
        let (a, b) = s
            .split_once('-')
            .ok_or_else(|| format!("resync window {s:?}: write HH:MM-HH:MM"))?;
        match (hm(a), hm(b)) {
            (Some(start_min), Some(end_min)) => Ok(Window { start_min, end_min }),
            _ => Err(format!(
                "resync window {s:?}: write HH:MM-HH:MM with 24-hour times"
            )),
        }
    }

    /// Minutes from `minute_of_day` until the window opens (0 inside it).
    pub fn wait_minutes(&self, minute_of_day: u32) -> u32 {
        let (s, e, m) = (self.start_min, self.end_min, minute_of_day);
        let inside = if s == e {
            true
        } else if s < e {
            m >= s && m < e
        } else {
            m >= s || m < e
        };
        if inside {
            0
        } else {
            (s + 24 * 60 - m) % (24 * 60)
        }
    }

    /// Unix time at which the window next opens (now when open).
    pub fn next_open_unix(&self) -> u64 {
        use chrono::Timelike;
        let now = chrono::Local::now();
        let wait = self.wait_minutes(now.hour() * 60 + now.minute());
        let secs = now.timestamp().max(0) as u64;
        if wait == 0 {
            secs
        } else {
            secs - now.second() as u64 + wait as u64 * 60
        }
    }
}

/// (vm id, disk id, session id).
type DiskSession = (String, String, String);
/// A session's receipts by block index.
type Receipts = Arc<Mutex<BTreeMap<u64, Receipt>>>;

/// The resync service: sessions, their staged receipts and the switch. Cheap to clone.
#[derive(Clone)]
pub struct Resyncs {
    catalog: Catalog,
    replicas: Replicas,
    damage: DamageRegister,
    tasks: Tasks,
    /// Off-hours window sessions wait for (`None`: start at once).
    window: Option<Window>,
    /// Open sessions' receipts, by (vm id, disk id, session).
    staged: Arc<Mutex<HashMap<DiskSession, Receipts>>>,
    /// One session transition at a time per VM.
    locks: Arc<Mutex<HashMap<String, Arc<Mutex<()>>>>>,
    /// Patch bytes received per (vm id, disk id, session) since the server started; written into
    /// the session when the disk completes.
    bytes: Arc<Mutex<HashMap<DiskSession, u64>>>,
    /// Each VM's session record as last read or written, by VM id: this server is the record's
    /// only writer, and agents' heartbeats ask for it every interval without a store read.
    sessions: Arc<Mutex<HashMap<String, Option<ResyncSession>>>>,
}

/// The stage directory of a resync session's receipts (`stage/<vm>/<disk>/rs-<session>`).
pub(crate) fn stage_id(session: &str) -> String {
    format!("rs-{session}")
}

impl Resyncs {
    pub fn new(
        catalog: Catalog,
        replicas: Replicas,
        damage: DamageRegister,
        tasks: Tasks,
        window: Option<Window>,
    ) -> Resyncs {
        let r = Resyncs {
            catalog: catalog.clone(),
            replicas,
            damage,
            tasks,
            window,
            staged: Default::default(),
            locks: Default::default(),
            bytes: Default::default(),
            sessions: Default::default(),
        };
        // Another server may have moved the VM's session on while it held the VM.
        let c = r.clone();
        catalog.on_take(move |vm_id| {
            let c = c.clone();
            Box::pin(async move {
                c.staged.lock().await.retain(|k, _| k.0 != vm_id);
                c.bytes.lock().await.retain(|k, _| k.0 != vm_id);
                c.sessions.lock().await.remove(&vm_id);
            })
        });
        r
    }

    /// Finishes every resync switch a crash interrupted (before anything reads the disks).
    pub async fn finish_interrupted(&self) -> Result<()> {
        for v in self.catalog.vms().await {
            if self.resync_session(&v.id).await?.map(|s| s.state) == Some(ResyncState::Committing)
                // Another live server holds the VM and finishes it.
                && self.catalog.try_hold(&v.name).await
            {
                self.commit_if_staged(&v.name).await?;
            }
        }
        Ok(())
    }

    async fn vm_lock(&self, vm_id: &str) -> Arc<Mutex<()>> {
        self.locks
            .lock()
            .await
            .entry(vm_id.to_string())
            .or_default()
            .clone()
    }

    /// The VM's latest resync session, if any.
    pub async fn resync_session(&self, vm_id: &str) -> Result<Option<ResyncSession>> {
        // The cache is good only while this server holds the VM (it is then the only writer);
        // otherwise the holder may have moved the session on: read the vault.
        let held = self.catalog.cluster().holds(vm_id);
        if !held {
            return Ok(self
                .catalog
                .vault()
                .records
                .load::<ResyncSession>(&layout::record(Family::Resync, vm_id))
                .await?
                .map(|v| v.value));
        }
        if let Some(s) = self.sessions.lock().await.get(vm_id) {
            return Ok(s.clone());
        }
        let s = self
            .catalog
            .vault()
            .records
            .load::<ResyncSession>(&layout::record(Family::Resync, vm_id))
            .await?
            .map(|v| v.value);
        // A save that ran meanwhile inserted the newer value: it stays.
        Ok(self
            .sessions
            .lock()
            .await
            .entry(vm_id.to_string())
            .or_insert(s)
            .clone())
    }

    /// The VM's session when it pauses logs.
    pub(crate) async fn open_resync(&self, vm_id: &str) -> Result<Option<ResyncSession>> {
        Ok(self
            .resync_session(vm_id)
            .await?
            .filter(|s| s.state.is_open()))
    }

    async fn save_session(&self, vm_id: &str, s: &ResyncSession) -> Result<()> {
        let saved = s.clone();
        // Forgotten first: a failed or uncertain write is read back from the store next time.
        self.sessions.lock().await.remove(vm_id);
        self.catalog
            .vault()
            .records
            .update(
                &layout::record(Family::Resync, vm_id),
                move |_: Option<&ResyncSession>| Ok(Some(saved.clone())),
            )
            .await?;
        self.sessions
            .lock()
            .await
            .insert(vm_id.to_string(), Some(s.clone()));
        Ok(())
    }

    /// Starts (or joins) a resync session: the operator's request, or a disk marked
    /// resync-required (`now` false: the window decides).
    pub async fn start_resync(
        &self,
        vm: &str,
        req: &ResyncRequest,
        reason: &str,
    ) -> Result<ResyncSession> {
        // Changes the VM: it runs on the server holding the VM's lease.
        self.catalog.hold(vm).await?;
        let v = self.catalog.vm_for(None, vm).await?;
        if v.state == VmState::FailedOver {
            return Err(Error::conflict("failed_over", format!("VM {vm} was failed over: fail back (drvault agent failback, drvault failback commit) instead of resynchronizing")));
        }
        let mut disks: Vec<String> = req.disks.clone();
        for d in &disks {
            if !v.spec.disks.iter().any(|x| &x.id == d) {
                return Err(Error::not_found(
                    "disk_not_found",
                    format!("VM {vm} has no disk {d}"),
                ));
            }
        }
        let mut records = Vec::new();
        for spec in &v.spec.disks {
            let (_, d) = self.catalog.disk_for(None, vm, &spec.id).await?;
            if d.state != DiskState::Complete {
                return Err(Error::conflict("replication_incomplete", format!("disk {} of VM {vm} has not finished initial replication: there is no replica to resynchronize yet", spec.id)));
            }
            records.push(d);
        }
        if disks.is_empty() {
            disks = records
                .iter()
                .filter(|d| d.resync_required.is_some())
                .map(|d| d.disk.clone())
                .collect();
        }
        if disks.is_empty() {
            disks = records.iter().map(|d| d.disk.clone()).collect();
        }
        let lock = self.vm_lock(&v.id).await;
        let _held = lock.lock().await;
        let not_before = if req.now {
            0
        } else {
            self.window
                .map(|w| w.next_open_unix())
                .filter(|&t| t > crate::util::unix_now())
                .unwrap_or(0)
        };
        if let Some(mut s) = self.open_resync(&v.id).await? {
            if s.state == ResyncState::Committing {
                return Ok(s);
            }
            for d in disks {
                s.disks.entry(d).or_default();
            }
            if req.now && s.state == ResyncState::Scheduled {
                s.state = ResyncState::Active;
                s.not_before_unix = 0;
            }
            self.save_session(&v.id, &s).await?;
            return Ok(s);
        }
        let job = self
            .catalog
            .jobs()
            .create(
                JobKind::Resync,
                Some(vm),
                &[
                    "Wait for the resync window",
                    "Compare and send changed blocks",
                    "Switch the replica",
                ],
                JobState::Running,
            )
            .await?;
        let state = if not_before == 0 {
            self.catalog
                .jobs()
                .step(&job.id, "Wait for the resync window", JobState::Succeeded)
                .await?;
            ResyncState::Active
        } else {
            ResyncState::Scheduled
        };
        let s = ResyncSession {
            id: uuid::Uuid::new_v4().simple().to_string(),
            vm: vm.to_string(),
            state,
            reason: reason.to_string(),
            requested_unix: crate::util::unix_now(),
            not_before_unix: not_before,
            disks: disks
                .into_iter()
                .map(|d| (d, ResyncDisk::default()))
                .collect(),
            commit_cycle: None,
            job: job.id,
            finished_unix: None,
        };
        self.save_session(&v.id, &s).await?;
        tracing::info!(vm, session = %s.id, state = s.state.word(), disks = ?s.disks.keys().collect::<Vec<_>>(), %reason, "resync session opened");
        Ok(s)
    }

    /// Cancels the open session: staged data is dropped, the replica is untouched. Disks still
    /// marked resync-required keep refusing logs until a new session completes.
    pub async fn cancel_resync(&self, vm: &str) -> Result<ResyncSession> {
        // Changes the VM: it runs on the server holding the VM's lease.
        self.catalog.hold(vm).await?;
        let v = self.catalog.vm_for(None, vm).await?;
        let lock = self.vm_lock(&v.id).await;
        let _held = lock.lock().await;
        let mut s = self.open_resync(&v.id).await?.ok_or_else(|| {
            Error::not_found(
                "no_resync",
                format!("VM {vm} has no resync session to cancel"),
            )
        })?;
        if s.state == ResyncState::Committing {
            return Err(Error::conflict(
                "resync_committing",
                "the resync is switching the replica and cannot be cancelled",
            ));
        }
        s.state = ResyncState::Cancelled;
        s.finished_unix = Some(crate::util::unix_now());
        self.save_session(&v.id, &s).await?;
        self.catalog
            .jobs()
            .fail(
                &s.job,
                &Error::conflict("resync_cancelled", "cancelled by the operator"),
            )
            .await?;
        for disk in s.disks.keys() {
            let (_, d) = self.catalog.disk_for(None, vm, disk).await?;
            self.drop_stage(&d, &s.id).await;
        }
        tracing::info!(vm, session = %s.id, "resync session cancelled");
        Ok(s)
    }

    async fn drop_stage(&self, d: &DiskRecord, session: &str) {
        self.staged
            .lock()
            .await
            .remove(&(d.vm_id.clone(), d.disk_id.clone(), session.to_string()));
        stage::drop_receipts(
            self.catalog.vault(),
            &self.tasks,
            layout::stage_session(&d.vm_id, &d.disk_id, &stage_id(session)),
        );
    }

    /// The session and disk an agent works on, activated when its window opened, with the
    /// disk's comparison base fixed.
    async fn agent_session(
        &self,
        host: &str,
        vm: &str,
        disk: &str,
    ) -> Result<(ResyncSession, DiskRecord, Arc<BlockMap>)> {
        let (v, d) = self.catalog.disk_for(Some(host), vm, disk).await?;
        // The comparison base may be computed below (chunks and map, then the session record):
        // a critical section for garbage collection, entered before the VM's lock.
        let fenced = self.catalog.vault().chunks.fence().writer().await;
        let lock = self.vm_lock(&v.id).await;
        let _held = lock.lock().await;
        let mut s = self.open_resync(&v.id).await?.ok_or_else(|| {
            Error::not_found("no_resync", format!("VM {vm} has no resync session (the operator starts one with drvault resync --vm {vm}, or a broken log chain does)"))
        })?;
        let Some(sd) = s.disks.get(disk).cloned() else {
            return Err(Error::not_found(
                "no_resync",
                format!(
                    "disk {disk} is not part of VM {vm}'s resync session {}",
                    s.id
                ),
            ));
        };
        if s.state == ResyncState::Scheduled {
            let now = crate::util::unix_now();
            if now < s.not_before_unix {
                let wait = s.not_before_unix - now;
                return Err(Error::Busy {
                    code: "resync_scheduled",
                    message: format!("the resync of VM {vm} is scheduled for the off-hours window, opening in {wait} s ({}); the operator can start it now with drvault resync --vm {vm} --now", crate::util::rfc3339(s.not_before_unix)),
                    retry_after_s: wait,
                });
            }
            s.state = ResyncState::Active;
            self.save_session(&v.id, &s).await?;
            self.catalog
                .jobs()
                .step(&s.job, "Wait for the resync window", JobState::Succeeded)
                .await?;
        }
        // Every request of the comparison comes through here (hashes, fine hashes, each
        // block's patch): the job's record is written when the step starts, not per block.
        const COMPARE: &str = "Compare and send changed blocks";
        let comparing = || async {
            self.catalog.jobs().get(&s.job).await.is_some_and(|j| {
                j.steps
                    .iter()
                    .any(|st| st.name == COMPARE && st.state == JobState::Running)
            })
        };
        if s.state == ResyncState::Active && !comparing().await {
            self.catalog
                .jobs()
                .step(&s.job, COMPARE, JobState::Running)
                .await?;
        }
        let base = match &sd.base_root {
            Some(root) => self.replicas.map_by_root(root).await?,
            None => {
                let latest = async {
                    let reader = self.replicas.point_reader(vm, disk, d.last_cycle()).await?;
                    let (map, cost) = self.replicas.full_map(&reader).await?;
                    metrics::counter!("drvault_resync_bytes_written_total")
                        .increment(cost.bytes_written);
                    self.with_layered_hashes(map).await
                }
                .await;
                let map = match latest {
                    Ok(map) => map,
                    // The latest point cannot be read: an object it needs is lost or damaged
                    // (a log's extent list, a chunk under a logged block). Comparing against
                    // nothing makes the agent send every block with data, so the resync
                    // rebuilds the replica whole instead of failing forever. A store outage is
                    // not damage: it fails (recoverably) as usual.
                    Err(e) if e.kind() == Kind::Corrupt => {
                        tracing::warn!(vm, disk, session = %s.id, error = %e, "the latest point is unreadable: resync compares against an empty disk");
                        BlockMap::zeroed(d.size, d.block_size)
                    }
                    Err(e) => return Err(e),
                };
                let (root, map_bytes) = map.save_counted(&self.catalog.vault().chunks).await?;
                metrics::counter!("drvault_resync_bytes_written_total").increment(map_bytes);
                let root = root.to_hex();
                if let Some(x) = s.disks.get_mut(disk) {
                    x.base_root = Some(root.clone());
                }
                self.save_session(&v.id, &s).await?;
                self.replicas.map_by_root(&root).await?
            }
        };
        drop(fenced);
        Ok((s, d, base))
    }

    /// `map` with the hash of every layered block filled in: the comparison needs every
    /// block's hash, and a layered block's is unknown when merge stored its pieces without
    /// reading its base. Those blocks are read here, once per session (the base map it saves
    /// keeps the hashes).
    async fn with_layered_hashes(&self, mut map: BlockMap) -> Result<BlockMap> {
        let chunks = &self.catalog.vault().chunks;
        let unknown: Vec<u64> = map
            .layered()
            .filter(|(_, l)| l.hash.is_none())
            .map(|(i, _)| i)
            .collect();
        for i in unknown {
            let data = super::pieces::read_base(chunks, &map, i, map.block_len(i) as usize).await?;
            let hash = chunks.cpu().run(move || PlainHash::of(&data)).await;
            let base = map.get(i).unwrap_or(MapEntry::Zero);
            let mut layers = map.layers(i).map(|l| (**l).clone()).unwrap_or_default();
            layers.hash = Some(hash);
            map.set_layered(i, base, Some(layers))?;
        }
        Ok(map)
    }

    async fn receipts(
        &self,
        d: &DiskRecord,
        session: &str,
    ) -> Result<Arc<Mutex<BTreeMap<u64, Receipt>>>> {
        let key = (d.vm_id.clone(), d.disk_id.clone(), session.to_string());
        if let Some(r) = self.staged.lock().await.get(&key) {
            return Ok(r.clone());
        }
        let prefix = layout::stage_session(&d.vm_id, &d.disk_id, &stage_id(session));
        let loaded = Arc::new(Mutex::new(
            stage::load_receipts(self.catalog.vault(), &prefix, &d.disk).await?,
        ));
        Ok(self
            .staged
            .lock()
            .await
            .entry(key)
            .or_insert(loaded)
            .clone())
    }

    /// The agent's view of a disk in the session (starting the session's work on it).
    pub async fn resync_disk_view(
        &self,
        host: &str,
        vm: &str,
        disk: &str,
    ) -> Result<ResyncDiskView> {
        if let Some(view) = self.committed_view(host, vm, disk).await? {
            return Ok(view);
        }
        let (s, d, _) = self.agent_session(host, vm, disk).await?;
        let sd = s.disks.get(disk).cloned().unwrap_or_default();
        Ok(ResyncDiskView {
            session: s.id,
            state: s.state,
            reason: s.reason,
            size: d.size,
            block_size: d.block_size,
            blocks: d.stats.blocks,
            staged: sd.staged_root.is_some(),
            blocks_changed: sd.blocks_changed,
            commit_cycle: None,
        })
    }

    /// The disk's view of the VM's last session when no session is open, that one committed
    /// with this disk in it, and the disk has not needed a resync since: an agent killed after
    /// its completion switched the replica learns the work is done instead of `no_resync`.
    async fn committed_view(
        &self,
        host: &str,
        vm: &str,
        disk: &str,
    ) -> Result<Option<ResyncDiskView>> {
        let (v, d) = self.catalog.disk_for(Some(host), vm, disk).await?;
        if d.resync_required.is_some() {
            return Ok(None);
        }
        let Some(s) = self.resync_session(&v.id).await? else {
            return Ok(None);
        };
        if s.state != ResyncState::Committed {
            return Ok(None);
        }
        let Some(sd) = s.disks.get(disk) else {
            return Ok(None);
        };
        Ok(Some(ResyncDiskView {
            session: s.id.clone(),
            state: s.state,
            reason: s.reason.clone(),
            size: d.size,
            block_size: d.block_size,
            blocks: d.stats.blocks,
            staged: true,
            blocks_changed: sd.blocks_changed,
            commit_cycle: s.commit_cycle,
        }))
    }

    /// The plain hash of every block as the session holds it (received, else the base): 32
    /// bytes per block. An agent that resumes compares against this and skips what it sent.
    pub async fn resync_hashes(&self, host: &str, vm: &str, disk: &str) -> Result<Bytes> {
        let (s, d, base) = self.agent_session(host, vm, disk).await?;
        let received = self.receipts(&d, &s.id).await?;
        let received = received.lock().await;
        let mut out = Vec::with_capacity(base.len() as usize);
        let zero_full = PlainHash::of(&vec![0u8; d.block_size as usize]);
        let damage = self.damage.get().await;
        for (i, e) in base.entries() {
            let h = match (received.get(&i), e) {
                (Some(r), _) => r.hash,
                // A block whose chunk verify registered as damaged matches nothing, so the
                // agent sends it (whole: the session's copy of it reads as zeros) and the
                // upload stores the chunk again.
                (None, MapEntry::Data { name, .. }) if damage.has_chunk(&name) => {
                    PlainHash(DAMAGED_BLOCK_HASH)
                }
                // A layered block: its hash was filled in when the session's base was fixed
                // (a base without it matches nothing, so the agent sends the block).
                (None, _) if base.is_layered(i) => base
                    .content_hash(i)
                    .unwrap_or(PlainHash(DAMAGED_BLOCK_HASH)),
                (None, MapEntry::Data { hash, .. }) => hash,
                (None, MapEntry::Zero) => {
                    let len = block_len(d.size, d.block_size, i);
                    if len == d.block_size as u64 {
                        zero_full
                    } else {
                        PlainHash::of(&vec![0u8; len as usize])
                    }
                }
            };
            out.push(h);
        }
        Ok(sync::hashes_body(out))
    }

    /// A block as the session holds it.
    async fn session_block(
        &self,
        d: &DiskRecord,
        base: &BlockMap,
        received: Option<Receipt>,
        index: u64,
    ) -> Result<Vec<u8>> {
        let entry = match received {
            Some(r) => match r.name {
                Some(name) => MapEntry::Data { name, hash: r.hash },
                None => MapEntry::Zero,
            },
            None => base.get(index).ok_or_else(|| {
                Error::invalid(
                    "block_out_of_range",
                    format!("block {index} is past the end of disk {}", d.disk),
                )
            })?,
        };
        let zeros = || vec![0u8; block_len(d.size, d.block_size, index) as usize];
        if received.is_none() && base.is_layered(index) {
            let len = block_len(d.size, d.block_size, index) as usize;
            return super::pieces::read_base(&self.catalog.vault().chunks, base, index, len).await;
        }
        match entry {
            MapEntry::Zero => Ok(zeros()),
            // Damaged: the agent's patch rebuilds it from nothing (checked by its whole hash).
            MapEntry::Data { name, .. } if self.damage.get().await.has_chunk(&name) => Ok(zeros()),
            MapEntry::Data { name, hash } => {
                let (b, h) = self.catalog.vault().chunks.get_block(&name).await?;
                if !h.ct_eq(&hash) {
                    return Err(Error::Corrupt(crate::chunk::SealError::ContentMismatch {
                        name: name.to_hex(),
                    }));
                }
                Ok(b.to_vec())
            }
        }
    }

    /// Fine hashes (see [`crate::replica::patch::fine_hashes`]) of the named blocks, in order.
    pub async fn resync_fine(
        &self,
        host: &str,
        vm: &str,
        disk: &str,
        req: &FineRequest,
    ) -> Result<Bytes> {
        sync::check_fine_request(&req.blocks)?;
        let (s, d, base) = self.agent_session(host, vm, disk).await?;
        let received = self.receipts(&d, &s.id).await?;
        let side = SessionSide {
            resyncs: self,
            disk: &d,
            base: &base,
            received,
        };
        sync::fine_hashes(&side, self.catalog.vault().chunks.cpu(), &req.blocks).await
    }

    /// Applies one block's patch to the session's block, checks the result against the agent's
    /// hash of the whole block, stores it and writes its receipt.
    pub async fn resync_put_patch(
        &self,
        host: &str,
        vm: &str,
        disk: &str,
        index: u64,
        claimed: PlainHash,
        body: Bytes,
    ) -> Result<PatchAck> {
        let (s, d, base) = self.agent_session(host, vm, disk).await?;
        if s.state != ResyncState::Active {
            return Err(Error::conflict(
                "resync_committing",
                "the session is switching the replica; no more blocks are taken",
            ));
        }
        if index >= d.stats.blocks {
            return Err(Error::invalid(
                "block_out_of_range",
                format!(
                    "block {index} is past the end of disk {disk} ({} blocks)",
                    d.stats.blocks
                ),
            ));
        }
        if s.disks
            .get(disk)
            .and_then(|x| x.staged_root.as_ref())
            .is_some()
        {
            return Err(Error::conflict(
                "resync_disk_staged",
                format!("disk {disk} was already completed in this session"),
            ));
        }
        let received = self.receipts(&d, &s.id).await?;
        let prior = received.lock().await.get(&index).copied();
        if prior.map(|r| r.hash.ct_eq(&claimed)).unwrap_or(false) {
            return Ok(PatchAck {
                index,
                outcome: "already_received".into(),
                patch_bytes: 0,
            });
        }
        let block = self.session_block(&d, &base, prior, index).await?;
        let patch_len = body.len() as u64;
        let cpu = self.catalog.vault().chunks.cpu();
        let (block, hash) = sync::apply_patch(cpu, index, block, body, claimed).await?;
        // Chunk, then receipt: one critical section for garbage collection.
        let fenced = self.catalog.vault().chunks.fence().writer().await;
        let put = self
            .catalog
            .vault()
            .chunks
            .put_block(Bytes::from(block), Some(hash))
            .await?;
        let key = layout::stage_receipt(&d.vm_id, &d.disk_id, &stage_id(&s.id), index);
        stage::write_receipt(self.catalog.vault(), &key, &put).await?;
        drop(fenced);
        self.damage.note_stored(&put).await?;
        metrics::counter!("drvault_resync_bytes_written_total").increment(put.stored_bytes);
        received.lock().await.insert(
            index,
            Receipt {
                name: put.name,
                hash: put.hash,
            },
        );
        self.note_resync_bytes(&d, &s.id, patch_len).await;
        metrics::counter!("drvault_resync_patch_bytes_total").increment(patch_len);
        let outcome = match put.outcome {
            None => "zero",
            Some(crate::store::PutOutcome::Created) => "stored",
            Some(crate::store::PutOutcome::Existed) => "deduplicated",
        };
        Ok(PatchAck {
            index,
            outcome: outcome.into(),
            patch_bytes: patch_len,
        })
    }

    /// Per-disk wire bytes live in memory until completion writes them into the session.
    async fn note_resync_bytes(&self, d: &DiskRecord, session: &str, n: u64) {
        let mut m = self.bytes.lock().await;
        *m.entry((d.vm_id.clone(), d.disk_id.clone(), session.to_string()))
            .or_default() += n;
    }

    /// Ends a disk's part of the session: the digest over every block hash of the staged view
    /// must equal the agent's over its disk. Stages the disk's new map; the last disk switches
    /// the replica.
    pub async fn resync_complete(
        &self,
        host: &str,
        vm: &str,
        disk: &str,
        req: &DigestRequest,
    ) -> Result<ResyncCompletion> {
        let claimed = sync::claimed_digest(&req.digest)?;
        let (s, d, base) = self.agent_session(host, vm, disk).await?;
        let already = s.disks.get(disk).and_then(|x| x.staged_root.clone());
        if already.is_none() {
            let received = self.receipts(&d, &s.id).await?;
            let received = received.lock().await;
            let mut map = (*base).clone();
            for (&i, r) in received.iter() {
                let e = match r.name {
                    Some(name) => MapEntry::Data { name, hash: r.hash },
                    None => MapEntry::Zero,
                };
                map.set(i, e)?;
            }
            let actual = map_digest(&map);
            if !actual.ct_eq(&claimed) {
                return Err(Error::conflict("digest_mismatch", format!("disk {disk}: the staged replica digests to {}, the agent's disk to {}: blocks are still missing or the source changed; run the resync again", actual.to_hex(), claimed.to_hex())));
            }
            let changed = received.len() as u64;
            drop(received);
            // The staged map, then the session record that refers to it: one critical section.
            let _fenced = self.catalog.vault().chunks.fence().writer().await;
            let (root, map_bytes) = map.save_counted(&self.catalog.vault().chunks).await?;
            metrics::counter!("drvault_resync_bytes_written_total").increment(map_bytes);
            let root = root.to_hex();
            let bytes = self
                .bytes
                .lock()
                .await
                .get(&(d.vm_id.clone(), d.disk_id.clone(), s.id.clone()))
                .copied()
                .unwrap_or(0);
            let v = self.catalog.vm_for(None, vm).await?;
            let lock = self.vm_lock(&v.id).await;
            let _held = lock.lock().await;
            let mut cur = self
                .open_resync(&v.id)
                .await?
                .filter(|x| x.id == s.id)
                .ok_or_else(|| Error::conflict("no_resync", "the session ended meanwhile"))?;
            if let Some(x) = cur.disks.get_mut(disk) {
                x.staged_root = Some(root);
                x.blocks_changed = changed;
                x.bytes_received += bytes;
            }
            self.save_session(&v.id, &cur).await?;
            tracing::info!(vm, disk, session = %s.id, blocks_changed = changed, bytes, "resync of disk staged");
        }
        self.commit_if_staged(vm)
            .await
            .map(|(s, cycle)| ResyncCompletion {
                disk: disk.to_string(),
                session: s.id.clone(),
                state: s.state,
                waiting_for: s
                    .disks
                    .iter()
                    .filter(|(_, x)| x.staged_root.is_none())
                    .map(|(k, _)| k.clone())
                    .collect(),
                cycle,
            })
    }

    /// Switches the replica when every disk of the open session is staged (also finishes a
    /// switch a crash interrupted: it is idempotent per disk).
    pub async fn commit_if_staged(&self, vm: &str) -> Result<(ResyncSession, Option<u64>)> {
        let v = self.catalog.vm_for(None, vm).await?;
        let lock = self.vm_lock(&v.id).await;
        let _held = lock.lock().await;
        let Some(mut s) = self.resync_session(&v.id).await? else {
            return Err(Error::not_found(
                "no_resync",
                format!("VM {vm} has no resync session"),
            ));
        };
        if s.state == ResyncState::Committed {
            return Ok((s.clone(), s.commit_cycle));
        }
        if !s.state.is_open() || s.disks.values().any(|x| x.staged_root.is_none()) {
            return Ok((s, None));
        }
        s.state = ResyncState::Committing;
        self.save_session(&v.id, &s).await?;
        let roots: BTreeMap<String, String> = s
            .disks
            .iter()
            .filter_map(|(k, x)| x.staged_root.clone().map(|r| (k.clone(), r)))
            .collect();
        let cycle = self
            .replicas
            .install_snapshots(vm, &format!("resync:{}", s.id), &roots, s.commit_cycle)
            .await?;
        s.commit_cycle = Some(cycle);
        s.state = ResyncState::Committed;
        s.finished_unix = Some(crate::util::unix_now());
        self.save_session(&v.id, &s).await?;
        self.catalog
            .jobs()
            .step(
                &s.job,
                "Compare and send changed blocks",
                JobState::Succeeded,
            )
            .await?;
        self.catalog
            .jobs()
            .step(&s.job, "Switch the replica", JobState::Succeeded)
            .await?;
        self.catalog.jobs().succeed(&s.job).await?;
        for disk in s.disks.keys() {
            let (_, d) = self.catalog.disk_for(None, vm, disk).await?;
            self.drop_stage(&d, &s.id).await;
        }
        tracing::info!(vm, session = %s.id, cycle, "resync committed: the replica switched");
        Ok((s, Some(cycle)))
    }
}

/// The replica's side of a resync: the session's staged view of one disk (received blocks over
/// the comparison base).
struct SessionSide<'a> {
    resyncs: &'a Resyncs,
    disk: &'a DiskRecord,
    base: &'a BlockMap,
    received: Receipts,
}

impl SyncSide for SessionSide<'_> {
    fn disk(&self) -> &str {
        &self.disk.disk
    }

    fn blocks(&self) -> u64 {
        self.disk.stats.blocks
    }

    async fn read_block(&self, index: u64) -> Result<Vec<u8>> {
        let r = self.received.lock().await.get(&index).copied();
        self.resyncs
            .session_block(self.disk, self.base, r, index)
            .await
    }
}

/// [`digest_of`] a map's blocks (zero blocks: the hash of their zero bytes).
pub fn map_digest(map: &BlockMap) -> PlainHash {
    let zero_full = PlainHash::of(&vec![0u8; map.block_size() as usize]);
    let hashes: Vec<PlainHash> = map
        .entries()
        .map(|(i, e)| match e {
            // A layered block counts by the hash of what it reads as; unknown, it matches
            // nothing (resync fills these in before it compares).
            _ if map.is_layered(i) => map.content_hash(i).unwrap_or(PlainHash(DAMAGED_BLOCK_HASH)),
            MapEntry::Data { hash, .. } => hash,
            MapEntry::Zero if map.block_len(i) == map.block_size() as u64 => zero_full,
            MapEntry::Zero => PlainHash::of(&vec![0u8; map.block_len(i) as usize]),
        })
        .collect();
    digest_of(&hashes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replica::patch;

    #[test]
    fn windows_open_and_wrap_past_midnight() {
        let w = Window::parse("22:00-06:00").unwrap();
        assert_eq!(w.wait_minutes(23 * 60), 0);
        assert_eq!(w.wait_minutes(3 * 60), 0);
        assert_eq!(w.wait_minutes(6 * 60), 16 * 60);
        assert_eq!(w.wait_minutes(21 * 60 + 59), 1);
        let day = Window::parse("09:30-10:00").unwrap();
        assert_eq!(day.wait_minutes(9 * 60 + 45), 0);
        assert_eq!(day.wait_minutes(10 * 60), 23 * 60 + 30);
        assert_eq!(Window::parse("00:00-00:00").unwrap().wait_minutes(777), 0);
        for bad in [
            "",
            "22:00",
            "24:00-01:00",
            "22:60-01:00",
            "2:00-06:00",
            "a-b",
            "22:00-06",
        ] {
            assert!(Window::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn a_resync_sends_only_what_differs_and_switches_at_the_next_cycle() {
        use crate::services::testing::{block, memory, protect, send_log};
        let (s, _vault) = memory().await;
        let old = vec![Some(block(1)), Some(block(2)), None, Some(block(4))];
        protect(&s, "vm", &[("os", old)]).await;
        send_log(&s, "vm", "os", (1, 0), 1, (0, &[7u8; 4096]))
            .await
            .unwrap();
        let req = ResyncRequest {
            now: true,
            disks: vec![],
        };
        let session = s.resyncs.start_resync("vm", &req, "test").await.unwrap();
        assert_eq!(session.state, ResyncState::Active);
        // The source now: block 0 as of c1, 4 KiB of block 1 changed, block 2 written.
        let mut source: Vec<Vec<u8>> = [1u8, 2, 0, 4].iter().map(|&b| block(b).to_vec()).collect();
        source[0][..4096].fill(7);
        source[1][4096..8192].fill(0x55);
        source[2].fill(0xaa);
        let theirs = s.resyncs.resync_hashes("h", "vm", "os").await.unwrap();
        assert_eq!(theirs.len(), 4 * 32);
        let mut patched = Vec::new();
        for (i, b) in source.iter().enumerate() {
            if theirs[i * 32..(i + 1) * 32] == PlainHash::of(b).0[..] {
                continue;
            }
            let fine = FineRequest {
                blocks: vec![i as u64],
            };
            let fine = s.resyncs.resync_fine("h", "vm", "os", &fine).await.unwrap();
            let ranges = patch::differing_ranges(b, &fine);
            let body = Bytes::from(patch::encode(b, &ranges));
            let ack = s
                .resyncs
                .resync_put_patch("h", "vm", "os", i as u64, PlainHash::of(b), body)
                .await
                .unwrap();
            assert_eq!(ack.outcome, "stored");
            patched.push((i, ranges.len()));
        }
        assert_eq!(patched, [(1, 1), (2, 1)], "only what differs is sent");
        let hashes: Vec<PlainHash> = source.iter().map(|b| PlainHash::of(b)).collect();
        let wrong = DigestRequest {
            digest: digest_of(&hashes[..3]).to_hex(),
        };
        let e = s
            .resyncs
            .resync_complete("h", "vm", "os", &wrong)
            .await
            .unwrap_err();
        assert_eq!(e.code(), "digest_mismatch");
        let done = DigestRequest {
            digest: digest_of(&hashes).to_hex(),
        };
        let done = s
            .resyncs
            .resync_complete("h", "vm", "os", &done)
            .await
            .unwrap();
        assert_eq!((done.state, done.cycle), (ResyncState::Committed, Some(2)));
        // The new point reads the source, the one before it what it held.
        let c2 = s.replicas.point_reader("vm", "os", 2).await.unwrap();
        for (i, b) in source.iter().enumerate() {
            assert!(
                c2.read_block(i as u64).await.unwrap().0 == b[..],
                "c2 block {i}"
            );
        }
        let c1 = s.replicas.point_reader("vm", "os", 1).await.unwrap();
        assert!(c1.read_block(1).await.unwrap().0 == block(2));
        // The log chain restarts: a log continuing the one before the resync is refused.
        let e = send_log(&s, "vm", "os", (2, 1), 3, (0, &[9u8; 4096]))
            .await
            .unwrap_err();
        assert_eq!(e.code(), "log_predates_resync");
        let ack = send_log(&s, "vm", "os", (5, 4), 3, (0, &[9u8; 4096]))
            .await
            .unwrap();
        assert_eq!((ack.status.as_str(), ack.cycle), ("accepted", 3));
    }
}
