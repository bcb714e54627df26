//! Protecting VMs: enable protection, initial replication, finalize protection (the seed's
//! first three steps).
//!
//! * [`spec`]: the agent's declaration of a VM and the prerequisite checks.
//! * [`session`]: receiving a disk's blocks (receipts, resume queries, completion into a map).
//!
//! State lives in the vault as versioned records (`records/vm/<id>`, `records/disk/<vm>-<disk>`);
//! this service caches them because this process is their only writer.

pub mod delta;
pub mod points;
pub mod resync;
pub mod session;
pub mod spec;

pub use spec::validate as validate_spec;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::RwLock;

use crate::error::{Error, Result};
use crate::jobs::{JobKind, JobState, Jobs};
use crate::vault::layout::{self, Family};
use crate::vault::Vault;

pub use crate::wire::{
    DiskState, DiskView, FailoverBrief, Health, PolicyChange, ResyncBrief, VmState, VmView,
};
pub use session::{BlockAck, CompleteRequest, ReceivedQuery};
pub use spec::{DiskSpec, NicSpec, Policy, VmSpec};

/// The vault's record of a protected VM.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmRecord {
    pub name: String,
    pub id: String,
    /// The host that enabled protection; only it (or its cloud's provider) may touch the VM.
    pub owner: String,
    pub spec: VmSpec,
    pub state: VmState,
    pub warnings: Vec<String>,
    pub created_unix: u64,
    pub protected_unix: Option<u64>,
    pub enable_job: String,
    pub finalize_job: Option<String>,
    /// Per-NIC failover overrides by NIC index (target subnet, static IP, public address, skip).
    #[serde(default)]
    pub nic_overrides: BTreeMap<u32, crate::failover::definition::NicOptions>,
}

/// The vault's record of one disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiskRecord {
    pub vm: String,
    pub disk: String,
    pub vm_id: String,
    pub disk_id: String,
    pub size: u64,
    pub block_size: u32,
    pub state: DiskState,
    /// Current replication session (receipts live under it).
    pub session: String,
    /// Root of the base block map once complete (hex chunk name).
    pub map_root: Option<String>,
    /// BLAKE3 over the plain hashes of all blocks, as agreed with the agent at completion.
    #[serde(default)]
    pub content_digest: Option<String>,
    pub stats: DiskStats,
    pub completed_unix: Option<u64>,
    /// Accepted change logs not yet merged into the base map, oldest first.
    #[serde(default)]
    pub journal: Vec<crate::journal::JournalEntry>,
    /// The recovery point the base map itself represents.
    #[serde(default)]
    pub base_point: BasePoint,
    /// UniqueId of the last accepted log (survives merges): the next log must name it.
    #[serde(default)]
    pub chain_head: Option<String>,
    /// Vhd2DataWriteGuid of the chain; a different value means the disk changed offline.
    #[serde(default)]
    pub data_write_guid: Option<String>,
    /// Why the disk needs resynchronization, when it does.
    #[serde(default)]
    pub resync_required: Option<String>,
    /// The chain head when a resync (or failback) replaced the disk's content: a later log that
    /// names it as predecessor predates the resync and is refused.
    #[serde(default)]
    pub resync_fence: Option<String>,
}

/// The point the base map holds: the initial replication (cycle 0) or the last merged log.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct BasePoint {
    pub cycle: u64,
    pub time_unix: u64,
    pub app_consistent: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct DiskStats {
    pub blocks: u64,
    pub data_blocks: u64,
    pub zero_blocks: u64,
    /// Bytes of the disk held in data blocks.
    pub data_bytes: u64,
    /// Sealed bytes initial replication wrote to the store for this disk (after compression).
    #[serde(default)]
    pub stored_bytes: u64,
    /// Plain bytes of blocks whose chunk the vault already held (deduplication hits).
    #[serde(default)]
    pub deduplicated_bytes: u64,
}

/// Held while one log of a disk is accepted.
type DiskLock = Arc<tokio::sync::Mutex<()>>;

/// The protection service.
#[derive(Clone)]
pub struct Protection {
    pub(crate) vault: Vault,
    pub(crate) jobs: Jobs,
    block_size: u32,
    mapped_networks: Arc<BTreeSet<String>>,
    vms: Arc<RwLock<BTreeMap<String, VmRecord>>>,
    disks: Arc<RwLock<BTreeMap<(String, String), DiskRecord>>>,
    pub(crate) sessions: session::Sessions,
    /// One log accepted at a time per disk (chain checks need a stable head).
    log_locks: Arc<tokio::sync::Mutex<BTreeMap<(String, String), DiskLock>>>,
    /// Opened log frames, shared by validation and point reads.
    pub(crate) frames: crate::journal::FrameCache,
    pub(crate) max_log_bytes: u64,
    /// Point readers by (vm id, disk id, cycle, base map root).
    pub(crate) resyncs: resync::ResyncCache,
    /// Off-hours window resync sessions wait for (`None`: start at once).
    pub(crate) resync_window: Option<resync::Window>,
    pub(crate) readers: points::ReaderCache,
    /// The pins of every point reader handed out or being built, by (vm id, disk id): a merge
    /// deletes the logs it folded in only once the readers pinned before it are gone.
    pub(crate) reader_pins: points::ReaderPins,
    /// What the pinned readers read through, kept by garbage collection.
    pub(crate) reader_refs: points::ReaderRefs,
    /// Objects verify found damaged or missing: points that need them are marked unusable.
    pub(crate) damage: crate::scrub::damage::Damage,
}

impl Protection {
    /// Loads every VM and disk record and finishes any finalize step a crash interrupted.
    pub async fn load(
        vault: Vault,
        jobs: Jobs,
        block_size: u32,
        mapped_networks: BTreeSet<String>,
    ) -> Result<Protection> {
        let mut vms = BTreeMap::new();
        for id in vault.records.ids(Family::Vm).await? {
            if let Some(v) = vault
                .records
                .load::<VmRecord>(&layout::record(Family::Vm, &id))
                .await?
            {
                vms.insert(v.value.name.clone(), v.value);
            }
        }
        let mut disks = BTreeMap::new();
        for id in vault.records.ids(Family::Disk).await? {
            if let Some(d) = vault
                .records
                .load::<DiskRecord>(&layout::record(Family::Disk, &id))
                .await?
            {
                disks.insert((d.value.vm.clone(), d.value.disk.clone()), d.value);
            }
        }
        let damage = crate::scrub::damage::Damage::load(&vault.records).await?;
        let p = Protection {
            vault,
            jobs,
            block_size,
            mapped_networks: Arc::new(mapped_networks),
            vms: Arc::new(RwLock::new(vms)),
            disks: Arc::new(RwLock::new(disks)),
            sessions: session::Sessions::default(),
            log_locks: Default::default(),
            frames: crate::journal::FrameCache::new(64),
            max_log_bytes: 64 << 30,
            readers: Default::default(),
            resyncs: Default::default(),
            resync_window: None,
            damage,
            reader_pins: Default::default(),
            reader_refs: Default::default(),
        };
        let pending: Vec<String> = p
            .vms
            .read()
            .await
            .values()
            .filter(|v| v.state == VmState::InitialReplication)
            .map(|v| v.name.clone())
            .collect();
        for vm in pending {
            p.finalize_if_complete(&vm).await?;
        }
        // A resync switch a crash interrupted is finished before anything reads the disks.
        let names: Vec<(String, String)> = p
            .vms
            .read()
            .await
            .values()
            .map(|v| (v.name.clone(), v.id.clone()))
            .collect();
        for (vm, id) in names {
            if p.resync_session(&id).await?.map(|s| s.state)
                == Some(resync::SessionState::Committing)
            {
                p.commit_if_staged(&vm).await?;
            }
        }
        Ok(p)
    }

    /// Largest change log accepted (bytes); larger uploads get 413.
    pub fn with_max_log_bytes(mut self, max: u64) -> Protection {
        self.max_log_bytes = max;
        self
    }

    /// The off-hours window resync sessions wait for (`None`: they start at once).
    pub fn with_resync_window(mut self, w: Option<resync::Window>) -> Protection {
        self.resync_window = w;
        self
    }

    /// Block size given to newly protected disks.
    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    pub fn vm_id(&self, vm: &str) -> String {
        self.vault.keys().ident("vm", vm)
    }

    pub fn disk_id(&self, vm: &str, disk: &str) -> String {
        self.vault.keys().ident("disk", &format!("{vm}\0{disk}"))
    }

    /// Enable protection (idempotent for the same host and spec).
    pub async fn enable(&self, host: &str, vm: &str, spec: &VmSpec) -> Result<(VmView, bool)> {
        let (spec, warnings) = spec::validate(vm, spec, &self.mapped_networks)?;
        if let Some(existing) = self.vms.read().await.get(vm).cloned() {
            if existing.owner != host {
                return Err(Error::forbidden(format!(
                    "VM {vm} is protected by another host"
                )));
            }
            // The policy is the operator's after enabling (`drvault vm set`): compare the rest.
            let same = VmSpec {
                policy: None,
                ..existing.spec.clone()
            } == VmSpec {
                policy: None,
                ..spec.clone()
            };
            if !same {
                return Err(Error::conflict(
                    "vm_exists",
                    format!("VM {vm} is already protected with a different specification; disable protection first"),
                ));
            }
            return Ok((self.view(&existing).await, false));
        }
        let vm_id = self.vm_id(vm);
        let mut steps: Vec<String> = vec!["Check prerequisites".into()];
        steps.extend(
            spec.disks
                .iter()
                .map(|d| format!("Initial replication of disk {}", d.id)),
        );
        let step_refs: Vec<&str> = steps.iter().map(String::as_str).collect();
        let job = self
            .jobs
            .create(
                JobKind::EnableProtection,
                Some(vm),
                &step_refs,
                JobState::Running,
            )
            .await?;
        self.jobs
            .step(&job.id, "Check prerequisites", JobState::Succeeded)
            .await?;
        let now = crate::util::unix_now();
        // Disk records first: a VM record is never visible without its disks.
        for d in &spec.disks {
            let disk_id = self.disk_id(vm, &d.id);
            let rec = DiskRecord {
                vm: vm.to_string(),
                disk: d.id.clone(),
                vm_id: vm_id.clone(),
                disk_id: disk_id.clone(),
                size: d.size,
                block_size: self.block_size,
                state: DiskState::Receiving,
                session: uuid::Uuid::new_v4().simple().to_string(),
                map_root: None,
                content_digest: None,
                journal: Vec::new(),
                base_point: BasePoint::default(),
                chain_head: None,
                data_write_guid: None,
                resync_required: None,
                resync_fence: None,
                stats: DiskStats {
                    blocks: crate::replica::blockmap::block_count(d.size, self.block_size),
                    ..Default::default()
                },
                completed_unix: None,
            };
            let prefix = layout::record(Family::Disk, &layout::disk_record_id(&vm_id, &disk_id));
            // A leftover from a crashed enable is replaced; the VM record below is the commit point.
            self.vault
                .records
                .update(&prefix, |_: Option<&DiskRecord>| Ok(Some(rec.clone())))
                .await?;
            self.disks
                .write()
                .await
                .insert((vm.to_string(), d.id.clone()), rec);
        }
        let rec = VmRecord {
            name: vm.to_string(),
            id: vm_id.clone(),
            owner: host.to_string(),
            spec,
            state: VmState::InitialReplication,
            warnings,
            created_unix: now,
            protected_unix: None,
            enable_job: job.id.clone(),
            finalize_job: None,
            nic_overrides: BTreeMap::new(),
        };
        if !self
            .vault
            .records
            .create(&layout::record(Family::Vm, &vm_id), &rec)
            .await?
        {
            return Err(Error::Conflict {
                code: "vm_exists",
                message: format!("VM {vm} was created concurrently; retry"),
                recoverable: true,
            });
        }
        self.vms.write().await.insert(vm.to_string(), rec.clone());
        tracing::info!(vm, host, disks = rec.spec.disks.len(), "protection enabled");
        Ok((self.view(&rec).await, true))
    }

    /// Every VM record and every disk record, as this server holds them (it is their only
    /// writer, so these are the current versions).
    pub(crate) async fn all_records(&self) -> (Vec<VmRecord>, Vec<DiskRecord>) {
        let vms = self.vms.read().await.values().cloned().collect();
        let disks = self.disks.read().await.values().cloned().collect();
        (vms, disks)
    }

    /// The VM record, checking that `host` may act on it (None = operator).
    pub async fn vm_for(&self, host: Option<&str>, vm: &str) -> Result<VmRecord> {
        let rec =
            self.vms.read().await.get(vm).cloned().ok_or_else(|| {
                Error::not_found("vm_not_found", format!("VM {vm} is not protected"))
            })?;
        if let Some(h) = host {
            if rec.owner != h {
                return Err(Error::forbidden(format!("VM {vm} belongs to another host")));
            }
        }
        Ok(rec)
    }

    pub async fn disk_for(
        &self,
        host: Option<&str>,
        vm: &str,
        disk: &str,
    ) -> Result<(VmRecord, DiskRecord)> {
        let v = self.vm_for(host, vm).await?;
        let d = self
            .disks
            .read()
            .await
            .get(&(vm.to_string(), disk.to_string()))
            .cloned()
            .ok_or_else(|| {
                Error::not_found("disk_not_found", format!("VM {vm} has no disk {disk}"))
            })?;
        Ok((v, d))
    }

    pub(crate) async fn store_disk(&self, rec: DiskRecord) -> Result<()> {
        let prefix = layout::record(
            Family::Disk,
            &layout::disk_record_id(&rec.vm_id, &rec.disk_id),
        );
        self.vault
            .records
            .update(&prefix, |_: Option<&DiskRecord>| Ok(Some(rec.clone())))
            .await?;
        self.disks
            .write()
            .await
            .insert((rec.vm.clone(), rec.disk.clone()), rec);
        Ok(())
    }

    /// When every disk of a VM is complete: the "Finalize protection" job marks it protected.
    pub(crate) async fn finalize_if_complete(&self, vm: &str) -> Result<()> {
        let rec = self.vm_for(None, vm).await?;
        if rec.state != VmState::InitialReplication {
            return Ok(());
        }
        let disks = self.disks.read().await;
        let all = rec.spec.disks.iter().all(|d| {
            disks
                .get(&(vm.to_string(), d.id.clone()))
                .map(|r| r.state == DiskState::Complete)
                .unwrap_or(false)
        });
        drop(disks);
        if !all {
            return Ok(());
        }
        let job = self
            .jobs
            .create(
                JobKind::FinalizeProtection,
                Some(vm),
                &["Configure post-replication settings", "Mark protected"],
                JobState::Running,
            )
            .await?;
        self.jobs
            .step(
                &job.id,
                "Configure post-replication settings",
                JobState::Succeeded,
            )
            .await?;
        let now = crate::util::unix_now();
        let jid = job.id.clone();
        self.update_vm(vm, |r| {
            if r.state == VmState::Protected {
                return Ok(false);
            }
            r.state = VmState::Protected;
            r.protected_unix = Some(now);
            r.finalize_job = Some(jid.clone());
            Ok(true)
        })
        .await?;
        self.jobs.succeed(&job.id).await?;
        if let Some(j) = self.jobs.get(&rec.enable_job).await {
            if !j.state.is_final() {
                self.jobs.succeed(&rec.enable_job).await?;
            }
        }
        tracing::info!(vm, "protection finalized: VM protected");
        Ok(())
    }

    /// Read-modify-write of a VM record (compare-and-swap retried); `f` returns `false` to leave
    /// it unchanged. The cache is refreshed with the result.
    pub(crate) async fn update_vm(
        &self,
        vm: &str,
        f: impl Fn(&mut VmRecord) -> Result<bool>,
    ) -> Result<VmRecord> {
        let rec = self.vm_for(None, vm).await?;
        let updated = self
            .vault
            .records
            .update(
                &layout::record(Family::Vm, &rec.id),
                |cur: Option<&VmRecord>| {
                    let mut r = cur
                        .cloned()
                        .ok_or_else(|| Error::not_found("vm_not_found", "VM record vanished"))?;
                    Ok(f(&mut r)?.then_some(r))
                },
            )
            .await?
            .ok_or_else(|| Error::internal("VM record missing after update"))?;
        self.vms
            .write()
            .await
            .insert(vm.to_string(), updated.value.clone());
        Ok(updated.value)
    }

    /// Sets a VM's state (failover commit).
    pub async fn set_state(&self, vm: &str, state: VmState) -> Result<()> {
        self.update_vm(vm, |r| {
            r.state = state;
            Ok(true)
        })
        .await?;
        Ok(())
    }

    /// Sets (or with `None` clears) the failover override of one NIC (operator).
    pub async fn set_nic_override(
        &self,
        vm: &str,
        index: u32,
        o: Option<crate::failover::definition::NicOptions>,
    ) -> Result<VmRecord> {
        let rec = self.vm_for(None, vm).await?;
        if index as usize >= rec.spec.nics.len() {
            return Err(Error::not_found(
                "nic_not_found",
                format!("VM {vm} has no NIC {index} ({} NICs)", rec.spec.nics.len()),
            ));
        }
        self.update_vm(vm, |r| {
            match &o {
                Some(o) => r.nic_overrides.insert(index, o.clone()),
                None => r.nic_overrides.remove(&index),
            };
            Ok(true)
        })
        .await
    }

    /// Changes a VM's replication policy (operator). Validated like at enable time.
    pub async fn set_policy(&self, vm: &str, change: &PolicyChange) -> Result<VmView> {
        let rec = self.vm_for(None, vm).await?;
        let mut policy = rec.spec.policy.clone().unwrap_or_default();
        if let Some(v) = change.interval_s {
            policy.interval_s = v;
        }
        if let Some(v) = change.retention_s {
            policy.retention_s = v;
        }
        if let Some(v) = change.app_consistent_every_s {
            policy.app_consistent_every_s = v;
        }
        policy.validate()?;
        let updated = self
            .update_vm(vm, |r| {
                r.spec.policy = Some(policy.clone());
                Ok(true)
            })
            .await?;
        tracing::info!(vm, ?policy, "replication policy changed");
        Ok(self.view(&updated).await)
    }

    pub async fn list(&self) -> Vec<VmView> {
        let vms: Vec<VmRecord> = self.vms.read().await.values().cloned().collect();
        let mut out = Vec::with_capacity(vms.len());
        for v in &vms {
            out.push(self.view(v).await);
        }
        out
    }

    pub async fn view(&self, rec: &VmRecord) -> VmView {
        // A resync under way turns "resync required" from Critical (nothing is happening) into
        // Warning (it is scheduled or progressing). An unreadable session record reads as none.
        let open = self.open_resync(&rec.id).await.ok().flatten();
        let resync = open.as_ref().map(|s| ResyncBrief {
            session: s.id.clone(),
            state: s.state.word().to_string(),
            reason: s.reason.clone(),
            not_before: (s.not_before_unix > 0).then(|| crate::util::rfc3339(s.not_before_unix)),
            disks: s.disks.keys().cloned().collect(),
            disks_done: s
                .disks
                .iter()
                .filter(|(_, d)| d.staged_root.is_some())
                .map(|(k, _)| k.clone())
                .collect(),
        });
        let mut resyncing: Vec<String> = Vec::new();
        let disks = self.disks.read().await;
        let mut dv = Vec::new();
        let (mut done, mut total) = (0u64, 0u64);
        let mut critical: Vec<String> = Vec::new();
        let mut earliest_latest = u64::MAX;
        let mut complete: Vec<DiskRecord> = Vec::new();
        for d in &rec.spec.disks {
            if let Some(r) = disks.get(&(rec.name.clone(), d.id.clone())) {
                if r.state == DiskState::Complete {
                    complete.push(r.clone());
                }
                let (received, (stored_bytes, deduplicated_bytes)) = match r.state {
                    DiskState::Complete => (
                        r.stats.blocks,
                        (r.stats.stored_bytes, r.stats.deduplicated_bytes),
                    ),
                    DiskState::Receiving => (
                        self.sessions.received_count(&r.vm_id, &r.disk_id).await,
                        self.sessions.written(&r.vm_id, &r.disk_id).await,
                    ),
                };
                done += received.min(r.stats.blocks);
                total += r.stats.blocks;
                dv.push(DiskView {
                    id: r.disk.clone(),
                    size: r.size,
                    block_size: r.block_size,
                    state: r.state,
                    blocks: r.stats.blocks,
                    blocks_received: received,
                    data_blocks: r.stats.data_blocks,
                    zero_blocks: r.stats.zero_blocks,
                    data_bytes: r.stats.data_bytes,
                    stored_bytes,
                    deduplicated_bytes,
                    journal_length: r.journal.len(),
                    pending_log_bytes: r.pending_log_bytes(),
                    resync_threshold_bytes: delta::resync_threshold(r.size),
                    resync_required: r.resync_required.clone(),
                    last_log: r
                        .journal
                        .last()
                        .map(|e| crate::util::rfc3339(e.accepted_unix)),
                });
                if let Some(reason) = &r.resync_required {
                    match &resync {
                        Some(b) if b.disks.contains(&r.disk) => resyncing.push(format!(
                            "disk {}: resynchronization {} ({reason})",
                            r.disk,
                            match (b.state.as_str(), &b.not_before) {
                                ("scheduled", Some(t)) => format!("scheduled for {t}"),
                                ("scheduled", None) => "scheduled".to_string(),
                                _ => "running".to_string(),
                            }
                        )),
                        _ => critical.push(format!(
                            "disk {}: resynchronization required: {reason}",
                            r.disk
                        )),
                    }
                }
                earliest_latest = earliest_latest.min(
                    r.journal
                        .last()
                        .map(|e| e.accepted_unix)
                        .unwrap_or(r.base_point.time_unix),
                );
            }
        }
        drop(disks);
        let mut damage_warning = None;
        if complete.len() == rec.spec.disks.len() {
            match self.damage_health(&rec.name, &complete).await {
                Some((Health::Critical, reason)) => critical.push(reason),
                Some((_, reason)) => damage_warning = Some(reason),
                None => {}
            }
        }
        let policy = rec.spec.policy.clone().unwrap_or_default();
        // RPO: age of the newest point every disk has (the oldest of the disks' newest points).
        let rpo_s = (rec.state == VmState::Protected && earliest_latest != u64::MAX)
            .then(|| crate::util::unix_now().saturating_sub(earliest_latest));
        let mut reasons = critical.clone();
        reasons.extend(resyncing);
        reasons.extend(damage_warning);
        if let Some(r) = rpo_s {
            if r > 2 * policy.interval_s {
                reasons.push(format!(
                    "RPO {r} s exceeds twice the replication interval ({} s)",
                    policy.interval_s
                ));
            }
        }
        // From the configuration now, not the one at enable time: a mapping added since (and
        // a restart) clears the warning.
        reasons.extend(spec::unmapped_nic_warnings(
            &rec.spec.nics,
            &self.mapped_networks,
        ));
        let health = if !critical.is_empty() {
            Health::Critical
        } else if reasons.is_empty() {
            Health::Normal
        } else {
            Health::Warning
        };
        VmView {
            name: rec.name.clone(),
            owner: rec.owner.clone(),
            state: rec.state,
            health,
            health_reasons: reasons,
            generation: rec.spec.generation,
            cpus: rec.spec.cpus,
            memory_mib: rec.spec.memory_mib,
            policy,
            disks: dv,
            nics: rec.spec.nics.clone(),
            created: crate::util::rfc3339(rec.created_unix),
            protected: rec.protected_unix.map(crate::util::rfc3339),
            enable_job: rec.enable_job.clone(),
            finalize_job: rec.finalize_job.clone(),
            progress: if rec.state == VmState::Protected {
                1.0
            } else if total == 0 {
                0.0
            } else {
                done as f64 / total as f64
            },
            rpo_seconds: rpo_s,
            resync,
            failover: self.failover_brief(&rec.name).await,
        }
    }

    /// The VM's failover while it is running or waiting for a commit or cleanup. An unreadable
    /// failover record reads as none (the view is informative; failover commands report it).
    async fn failover_brief(&self, vm: &str) -> Option<FailoverBrief> {
        use crate::failover::definition::FailoverKind;
        use crate::failover::service::{FailoverRecord, FailoverState};
        let key =
            crate::vault::layout::record(crate::vault::layout::Family::Failover, &self.vm_id(vm));
        let rec = self
            .vault
            .records
            .load::<FailoverRecord>(&key)
            .await
            .ok()??
            .value;
        let kind = serde_json::to_value(rec.kind).ok()?.as_str()?.to_string();
        let summary = match (rec.state, rec.kind) {
            (FailoverState::Running, _) => format!("failing over ({kind})"),
            (FailoverState::Succeeded, FailoverKind::Test) => {
                "failed over (test), not cleaned up".to_string()
            }
            (FailoverState::Succeeded, _) => format!("failed over ({kind}), not committed"),
            _ => return None,
        };
        Some(FailoverBrief {
            id: rec.id,
            kind,
            state: serde_json::to_value(rec.state).ok()?.as_str()?.to_string(),
            point: rec.point,
            summary,
        })
    }
}
