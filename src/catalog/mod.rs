//! The catalog: the vault's records of protected VMs and their disks, and the one place that
//! changes them.
//!
//! State lives in the vault as versioned records (`records/vm/<id>`, `records/disk/<vm>-<disk>`);
//! [`Catalog`] caches them because this process is their only writer, and every change is a
//! compare-and-swap on the record's version followed by a cache refresh. Enabling protection
//! (the agent's declaration, checked by [`spec`]) creates the records; finalizing it marks the
//! VM protected once every disk completed initial replication.
//!
//! The services downstream hold a [`Catalog`] handle and only the caches they use:
//! [`crate::ingest::Ingest`] (initial-replication blocks, change logs),
//! [`crate::replica::Replicas`] (points, readers, merge, the damage register's point queries) and
//! [`crate::replica::resync::Resyncs`] (resynchronization sessions). [`crate::overview`] composes
//! them into what the API shows of a VM.
//!
//! Each disk also has a *journal lock* here: whoever changes a disk's journal (a log accepted, a
//! merge, a resync or failback switch) holds it, so chain checks see a stable head.

mod lifecycle;
pub mod spec;

pub use spec::validate as validate_spec;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, RwLock};

use crate::cluster::Cluster;
use crate::error::{Error, Result};
use crate::jobs::{JobKind, JobState, Jobs};
use crate::vault::layout::{self, Family};
use crate::vault::records::{Fenced, Versioned};
use crate::vault::Vault;

pub use crate::wire::{
    DiskState, DiskView, FailoverBrief, Health, PolicyChange, ResyncBrief, VmState, VmView,
};
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
    /// When protection was disabled (state `disabled`): the points stay until retention passes.
    #[serde(default)]
    pub disabled_unix: Option<u64>,
    /// Disks removed from the VM while protected: no longer replicated, still read by the
    /// points from before their removal.
    #[serde(default)]
    pub removed_disks: Vec<DiskSpec>,
    /// Per-NIC failover overrides by NIC index (target subnet, static IP, public address, skip).
    #[serde(default)]
    pub nic_overrides: BTreeMap<u32, crate::wire::NicOptions>,
    /// Epoch of the lease its last writer held (see [`crate::cluster`]).
    #[serde(default)]
    pub fence: u64,
}

impl Fenced for VmRecord {
    fn fence(&self) -> u64 {
        self.fence
    }
    fn set_fence(&mut self, epoch: u64) {
        self.fence = epoch;
    }
}

impl Fenced for DiskRecord {
    fn fence(&self) -> u64 {
        self.fence
    }
    fn set_fence(&mut self, epoch: u64) {
        self.fence = epoch;
    }
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
    /// Added to the VM after it was protected: it is in no point until its initial replication
    /// completes, and then in those from `first_cycle` on.
    #[serde(default)]
    pub added: bool,
    /// The first VM cycle whose points include the disk (0 for the disks the VM was protected
    /// with; an added disk's initial replication stands for this cycle).
    #[serde(default)]
    pub first_cycle: u64,
    /// Removed from the VM: the last cycle whose points include the disk.
    #[serde(default)]
    pub last_cycle_in_vm: Option<u64>,
    /// Epoch of the lease its last writer held (see [`crate::cluster`]).
    #[serde(default)]
    pub fence: u64,
}

/// The point the base map holds: the initial replication (cycle 0) or the last merged log.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct BasePoint {
    pub cycle: u64,
    /// The point's time: the merged log's own time where it had one.
    pub time_unix: u64,
    pub app_consistent: bool,
    /// When the server accepted what the base holds (0 in records before it was kept: then
    /// `time_unix`, which was that).
    #[serde(default)]
    pub accepted_unix: u64,
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

/// Held while one writer changes a disk's journal.
type JournalLock = Arc<Mutex<()>>;

/// The VM and disk records, cached, with their compare-and-swap updates. Cheap to clone.
#[derive(Clone)]
pub struct Catalog {
    vault: Vault,
    jobs: Jobs,
    block_size: u32,
    mapped_networks: Arc<BTreeSet<String>>,
    /// VM records by name, with the version each was read or written at.
    vms: Arc<RwLock<BTreeMap<String, Versioned<VmRecord>>>>,
    disks: Arc<RwLock<BTreeMap<(String, String), DiskRecord>>>,
    /// One journal writer at a time per disk, by (vm id, disk id).
    journal_locks: Arc<Mutex<BTreeMap<(String, String), JournalLock>>>,
    /// The hosts' clusters, once the server attached its registry: hosts of one cluster act on
    /// each other's VMs. Without it only the owner does.
    registry: Arc<std::sync::OnceLock<crate::vault::registry::Registrar>>,
    /// This server among those sharing the vault: whose lease lets it change which VM.
    cluster: Cluster,
    /// Disk record versions as cached, by record id (VM records keep theirs in `vms`).
    disk_versions: Arc<std::sync::Mutex<BTreeMap<String, u64>>>,
    /// Called with a VM's id when this server takes its lease at a new epoch: services drop
    /// what they cached of the VM while another server may have changed it.
    on_take: Arc<std::sync::Mutex<Vec<TakeHook>>>,
    /// When a read last re-read each VM's records ([`Catalog::refresh_soon`]).
    refreshed: Arc<std::sync::Mutex<std::collections::HashMap<String, std::time::Instant>>>,
}

/// How stale the records of a VM held by another server may be when read here.
const READ_STALENESS: std::time::Duration = std::time::Duration::from_millis(500);

/// See `Catalog::on_take`.
type TakeHook = Arc<dyn Fn(String) -> futures_util::future::BoxFuture<'static, ()> + Send + Sync>;

impl Catalog {
    /// Loads every VM and disk record and finishes any finalize step a crash interrupted.
    pub async fn load(
        vault: Vault,
        jobs: Jobs,
        block_size: u32,
        mapped_networks: BTreeSet<String>,
        cluster: Cluster,
    ) -> Result<Catalog> {
        let mut vms = BTreeMap::new();
        for id in vault.records.ids(Family::Vm).await? {
            if let Some(v) = vault
                .records
                .load::<VmRecord>(&layout::record(Family::Vm, &id))
                .await?
            {
                vms.insert(v.value.name.clone(), v);
            }
        }
        let mut disks = BTreeMap::new();
        let mut disk_versions = BTreeMap::new();
        for id in vault.records.ids(Family::Disk).await? {
            if let Some(d) = vault
                .records
                .load::<DiskRecord>(&layout::record(Family::Disk, &id))
                .await?
            {
                disk_versions.insert(id, d.version);
                disks.insert((d.value.vm.clone(), d.value.disk.clone()), d.value);
            }
        }
        // Disk records without their VM record: an enable that crashed before its commit point
        // or a disable --delete-data cut short after it. Either way nothing reads them, and
        // left in place they would keep the disk's objects from garbage collection. With other
        // servers on the vault such a record may be an enable in flight there: only records
        // older than a lease TTL count (an enable writes its VM record within seconds).
        let orphans: Vec<(String, String)> = disks
            .keys()
            .filter(|(vm, _)| !vms.contains_key(vm))
            .cloned()
            .collect();
        let mut orphans_old = Vec::new();
        for key in orphans {
            let Some(d) = disks.get(&key) else { continue };
            let prefix =
                layout::record(Family::Disk, &layout::disk_record_id(&d.vm_id, &d.disk_id));
            if vault.records.age_s(&prefix).await? >= cluster.ttl().as_secs() {
                orphans_old.push(key);
            }
        }
        let orphans = orphans_old;
        for key in orphans {
            if let Some(d) = disks.remove(&key) {
                vault
                    .records
                    .remove(&layout::record(
                        Family::Disk,
                        &layout::disk_record_id(&d.vm_id, &d.disk_id),
                    ))
                    .await?;
                tracing::info!(vm = %d.vm, disk = %d.disk, "removed a disk record whose VM record is gone");
            }
        }
        let c = Catalog {
            vault,
            jobs,
            block_size,
            mapped_networks: Arc::new(mapped_networks),
            vms: Arc::new(RwLock::new(vms)),
            disks: Arc::new(RwLock::new(disks)),
            journal_locks: Default::default(),
            registry: Default::default(),
            cluster,
            disk_versions: Arc::new(std::sync::Mutex::new(disk_versions)),
            on_take: Default::default(),
            refreshed: Default::default(),
        };
        let pending: Vec<String> = c
            .vms
            .read()
            .await
            .values()
            .filter(|v| v.value.state == VmState::InitialReplication)
            .map(|v| v.value.name.clone())
            .collect();
        for vm in pending {
            match c.finalize_if_complete(&vm).await {
                // Another live server holds the VM: finalizing it is that server's work.
                Err(Error::LeaseHeld { .. }) => {}
                other => other?,
            }
        }
        Ok(c)
    }

    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// Registers what to drop when this server takes a VM over (see `on_take`).
    pub fn on_take(
        &self,
        f: impl Fn(String) -> futures_util::future::BoxFuture<'static, ()> + Send + Sync + 'static,
    ) {
        self.on_take
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Arc::new(f));
    }

    /// Whether this server holds the VM's lease now (background work skips the others).
    pub fn holds(&self, vm: &str) -> bool {
        self.cluster.holds(&self.vm_id(vm))
    }

    /// Whether this server still holds the VM's lease according to the vault (one read).
    pub async fn confirm_held(&self, vm: &str) -> bool {
        self.cluster.confirm(&self.vm_id(vm)).await
    }

    /// For background work: holds the VM's lease if it can be had, `false` when another live
    /// server holds it (that server does the work) or taking it failed (logged; tried again
    /// next time).
    pub async fn try_hold(&self, vm: &str) -> bool {
        if self.holds(vm) {
            return true;
        }
        if self.cluster.held_elsewhere(vm) {
            return false;
        }
        match self.hold(vm).await {
            Ok(_) => true,
            Err(Error::LeaseHeld { .. }) => false,
            Err(e) => {
                tracing::warn!(vm, error = %e, "could not take the VM's lease for background work");
                false
            }
        }
    }

    /// Makes sure this server holds the VM's lease, taking it when it is free or its holder is
    /// gone, and returns the epoch every record change is fenced with. `lease_held` (with the
    /// holder's URL) when a live server holds it.
    pub async fn hold(&self, vm: &str) -> Result<u64> {
        let vm_id = self.vm_id(vm);
        if let Some(e) = self.cluster.held_epoch(&vm_id) {
            return Ok(e);
        }
        self.cluster
            .acquire(&vm_id, vm, |epoch| self.take_records(vm, epoch))
            .await
    }

    /// After taking a VM's lease at `epoch`: re-reads the VM's records from the vault (another
    /// server may have changed them), stamps each with the epoch (the fence: from now on no
    /// older holder's update succeeds), caches them, and tells the services.
    async fn take_records(&self, vm: &str, epoch: u64) -> Result<()> {
        let vm_id = self.vm_id(vm);
        let records = &self.vault.records;
        let stamp = |_: &mut VmRecord| Ok::<bool, Error>(true);
        let vm_rec = records
            .update_fenced(
                &layout::record(Family::Vm, &vm_id),
                epoch,
                |cur: Option<&VmRecord>| {
                    Ok(cur.cloned().map(|mut r| {
                        let _ = stamp(&mut r);
                        r
                    }))
                },
            )
            .await?;
        let mut disk_ids: Vec<String> = Vec::new();
        for id in records.ids(Family::Disk).await? {
            if id.starts_with(&format!("{vm_id}-")) {
                disk_ids.push(id);
            }
        }
        let mut fenced = Vec::new();
        for id in disk_ids {
            let d = records
                .update_fenced(
                    &layout::record(Family::Disk, &id),
                    epoch,
                    |cur: Option<&DiskRecord>| Ok(cur.cloned()),
                )
                .await?;
            if let Some(d) = d {
                fenced.push((id, d));
            }
        }
        {
            let mut vms = self.vms.write().await;
            match vm_rec {
                Some(v) => {
                    vms.insert(vm.to_string(), v);
                }
                None => {
                    vms.remove(vm);
                }
            }
        }
        {
            let mut disks = self.disks.write().await;
            disks.retain(|(v, _), _| v != vm);
            let mut versions = self.disk_versions.lock().unwrap_or_else(|p| p.into_inner());
            for (id, d) in fenced {
                versions.insert(id, d.version);
                disks.insert((d.value.vm.clone(), d.value.disk.clone()), d.value);
            }
        }
        let cluster = self.cluster.clone();
        self.jobs
            .fail_orphans(vm, |server| !cluster.alive(server))
            .await?;
        let hooks: Vec<TakeHook> = self
            .on_take
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for f in hooks {
            f(vm_id.clone()).await;
        }
        Ok(())
    }

    /// Re-reads `vm`'s records unless that happened in the last [`READ_STALENESS`]: what a
    /// read of a VM this server does not hold may lag behind the vault. A failure leaves the
    /// cache as it is (logged).
    async fn refresh_soon(&self, vm: &str) {
        {
            let mut last = self.refreshed.lock().unwrap_or_else(|p| p.into_inner());
            if last.get(vm).is_some_and(|t| t.elapsed() < READ_STALENESS) {
                return;
            }
            if last.len() > 10_000 {
                // Names nobody reads any more (and bogus ones) do not pile up.
                last.retain(|_, t| t.elapsed() < READ_STALENESS);
            }
            last.insert(vm.to_string(), std::time::Instant::now());
        }
        if let Err(e) = self.refresh_vm(vm).await {
            tracing::warn!(vm, error = %e, "re-reading a VM's records another server changed failed");
        }
    }

    /// Caches a disk record read from the vault unless a newer version is cached already
    /// (checked under the cache's lock: a takeover meanwhile installed a newer one).
    async fn install_disk(&self, id: &str, d: Versioned<DiskRecord>) {
        let mut disks = self.disks.write().await;
        let mut versions = self.disk_versions.lock().unwrap_or_else(|p| p.into_inner());
        if versions.get(id).is_none_or(|v| *v < d.version) {
            versions.insert(id.to_string(), d.version);
            disks.insert((d.value.vm.clone(), d.value.disk.clone()), d.value);
        }
    }

    /// Re-reads one VM's record and its disks' records (see [`Catalog::refresh_soon`]).
    async fn refresh_vm(&self, vm: &str) -> Result<()> {
        let vm_id = self.vm_id(vm);
        let records = &self.vault.records;
        let Some(v) = records
            .load::<VmRecord>(&layout::record(Family::Vm, &vm_id))
            .await?
        else {
            if !self.cluster.holds(&vm_id) {
                self.vms.write().await.remove(vm);
                self.disks.write().await.retain(|(n, _), _| n != vm);
            }
            return Ok(());
        };
        let disks: Vec<String> = v
            .value
            .spec
            .disks
            .iter()
            .chain(&v.value.removed_disks)
            .map(|d| d.id.clone())
            .collect();
        {
            let mut vms = self.vms.write().await;
            if vms.get(vm).is_none_or(|c| c.version < v.version) {
                vms.insert(vm.to_string(), v);
            }
        }
        for disk in disks {
            let id = layout::disk_record_id(&vm_id, &self.disk_id(vm, &disk));
            if let Some(d) = records
                .load::<DiskRecord>(&layout::record(Family::Disk, &id))
                .await?
            {
                self.install_disk(&id, d).await;
            }
        }
        Ok(())
    }

    /// Brings the cached records of the VMs this server does not hold up to the vault's
    /// versions (other servers change them): two listings, and a read of each record whose
    /// version moved. Called every few seconds.
    pub async fn refresh(&self) -> Result<()> {
        let records = &self.vault.records;
        let vm_versions = records.latest_versions(Family::Vm).await?;
        let disk_versions = records.latest_versions(Family::Disk).await?;
        let cached: BTreeMap<String, (String, u64)> = self
            .vms
            .read()
            .await
            .values()
            .map(|v| (v.value.id.clone(), (v.value.name.clone(), v.version)))
            .collect();
        for (id, version) in &vm_versions {
            let held_name = cached.get(id).map(|(n, _)| n.clone());
            if held_name.as_deref().is_some_and(|n| self.holds(n))
                || self.cluster.holds(id)
                || cached.get(id).is_some_and(|(_, v)| v >= version)
            {
                continue;
            }
            if let Some(v) = records
                .load::<VmRecord>(&layout::record(Family::Vm, id))
                .await?
            {
                let mut vms = self.vms.write().await;
                if vms.get(&v.value.name).is_none_or(|c| c.version < v.version) {
                    vms.insert(v.value.name.clone(), v);
                }
            }
        }
        // VMs whose record is gone (deleted on another server).
        for (id, (name, _)) in &cached {
            if !vm_versions.contains_key(id) && !self.cluster.holds(id) {
                self.vms.write().await.remove(name);
                self.disks.write().await.retain(|(v, _), _| v != name);
            }
        }
        let known: BTreeMap<String, u64> = self
            .disk_versions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for (id, version) in &disk_versions {
            let vm_id = id.split('-').next().unwrap_or_default();
            if self.cluster.holds(vm_id) || known.get(id).is_some_and(|v| v >= version) {
                continue;
            }
            if let Some(d) = records
                .load::<DiskRecord>(&layout::record(Family::Disk, id))
                .await?
            {
                self.install_disk(id, d).await;
            }
        }
        Ok(())
    }

    pub fn vault(&self) -> &Vault {
        &self.vault
    }

    /// Lets the hosts of a cluster act on each other's VMs (the registry knows the clusters).
    pub fn attach_registry(&self, registry: crate::vault::registry::Registrar) {
        // Set once at startup; a second call would only repeat the same registry.
        let _ = self.registry.set(registry);
    }

    /// Whether `host` may act on a VM `owner` protected: the owner itself or a host of its
    /// cluster (Hyper-V moves VMs between a cluster's nodes; the log chain continues).
    pub async fn may_act(&self, host: &str, owner: &str) -> bool {
        if host == owner {
            return true;
        }
        match self.registry.get() {
            Some(r) => r.same_cluster(host, owner).await,
            None => false,
        }
    }

    pub fn jobs(&self) -> &Jobs {
        &self.jobs
    }

    /// Block size given to newly protected disks.
    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// Source networks the configuration maps (a NIC on another one gets a warning).
    pub fn mapped_networks(&self) -> &BTreeSet<String> {
        &self.mapped_networks
    }

    pub fn vm_id(&self, vm: &str) -> String {
        self.vault.keys().ident(crate::file_formats::IDENT_VM, vm)
    }

    pub fn disk_id(&self, vm: &str, disk: &str) -> String {
        self.vault
            .keys()
            .ident(crate::file_formats::IDENT_DISK, &format!("{vm}\0{disk}"))
    }

    /// The names of every protected VM.
    pub async fn vm_names(&self) -> Vec<String> {
        self.vms.read().await.keys().cloned().collect()
    }

    /// Every VM record, by name.
    pub async fn vms(&self) -> Vec<VmRecord> {
        self.vms
            .read()
            .await
            .values()
            .map(|v| v.value.clone())
            .collect()
    }

    /// The disk's journal lock: held by whoever appends to or rewrites its journal.
    pub async fn journal_lock(&self, d: &DiskRecord) -> JournalLock {
        let mut locks = self.journal_locks.lock().await;
        locks
            .entry((d.vm_id.clone(), d.disk_id.clone()))
            .or_default()
            .clone()
    }

    /// The records of every disk some point of the VM may include: its disks, then those
    /// removed from it.
    pub async fn member_disks(&self, rec: &VmRecord) -> Vec<DiskRecord> {
        let disks = self.disks.read().await;
        rec.spec
            .disks
            .iter()
            .chain(&rec.removed_disks)
            .filter_map(|d| disks.get(&(rec.name.clone(), d.id.clone())).cloned())
            .collect()
    }

    /// The records of the disks VM point `cycle` is made of.
    pub async fn point_disks(&self, rec: &VmRecord, cycle: u64) -> Vec<DiskRecord> {
        let mut v = self.member_disks(rec).await;
        v.retain(|d| d.in_cycle(cycle));
        v
    }

    /// The records of a VM's disks that exist, in the VM's order.
    pub async fn disks_of(&self, rec: &VmRecord) -> Vec<DiskRecord> {
        let disks = self.disks.read().await;
        rec.spec
            .disks
            .iter()
            .filter_map(|d| disks.get(&(rec.name.clone(), d.id.clone())).cloned())
            .collect()
    }

    /// Enable protection (idempotent for the same host and spec).
    pub async fn enable(&self, host: &str, vm: &str, spec: &VmSpec) -> Result<(VmRecord, bool)> {
        let (spec, warnings) = spec::validate(vm, spec, &self.mapped_networks)?;
        // The lease first: taking it re-reads the VM's records, which another server may have
        // written (enabled it there).
        let epoch = self.hold(vm).await?;
        // Bound first: the read guard must not live on into the disk change below, which
        // writes the VM record.
        let existing = self.vms.read().await.get(vm).map(|v| v.value.clone());
        if let Some(existing) = existing {
            if !self.may_act(host, &existing.owner).await {
                return Err(Error::forbidden(format!(
                    "VM {vm} is protected by another host"
                )));
            }
            if existing.state == VmState::Disabled {
                return Err(lifecycle::disabled_error(vm));
            }
            // The policy is the operator's after enabling (`drvault vm set`); disks may be
            // added, removed or grown once the VM is protected; the rest must be the same.
            let rest = |s: &VmSpec| VmSpec {
                policy: None,
                disks: Vec::new(),
                ..s.clone()
            };
            let same_disks = existing.spec.disks == spec.disks;
            if rest(&existing.spec) != rest(&spec)
                || (!same_disks && existing.state != VmState::Protected)
            {
                return Err(Error::conflict(
                    "vm_exists",
                    format!("VM {vm} is already protected with a different specification; disable protection first (disks alone may change once initial replication completed)"),
                ));
            }
            if same_disks {
                return Ok((existing, false));
            }
            return self.change_disks(&existing, &spec).await;
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
            let rec = self.new_disk_record(vm, &vm_id, &d.id, d.size, false);
            // A leftover from a crashed enable is replaced; the VM record below is the commit point.
            self.write_disk(epoch, rec).await?;
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
            disabled_unix: None,
            removed_disks: Vec::new(),
            nic_overrides: BTreeMap::new(),
            fence: epoch,
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
        // `create` wrote version 1.
        self.vms.write().await.insert(
            vm.to_string(),
            Versioned {
                version: 1,
                value: rec.clone(),
            },
        );
        tracing::info!(vm, host, disks = rec.spec.disks.len(), "protection enabled");
        Ok((rec, true))
    }

    /// Every VM record and every disk record, as this server holds them (it is their only
    /// writer, so these are the current versions).
    pub async fn all_records(&self) -> (Vec<VmRecord>, Vec<DiskRecord>) {
        let vms = self
            .vms
            .read()
            .await
            .values()
            .map(|v| v.value.clone())
            .collect();
        let disks = self.disks.read().await.values().cloned().collect();
        (vms, disks)
    }

    /// The VM record, checking that `host` may act on it (None = operator).
    pub async fn vm_for(&self, host: Option<&str>, vm: &str) -> Result<VmRecord> {
        if !self.holds(vm) {
            // Another server may have changed it (or created it) since the last refresh; a
            // server alone on the vault re-reads only names it does not know.
            let miss = !self.vms.read().await.contains_key(vm);
            if miss || !self.cluster.live_peers().is_empty() {
                self.refresh_soon(vm).await;
            }
        }
        let rec = self
            .vms
            .read()
            .await
            .get(vm)
            .map(|v| v.value.clone())
            .ok_or_else(|| Error::not_found("vm_not_found", format!("VM {vm} is not protected")))?;
        if let Some(h) = host {
            if !self.may_act(h, &rec.owner).await {
                return Err(Error::forbidden(format!(
                    "VM {vm} belongs to another host (not of host {h}'s cluster)"
                )));
            }
            // Agents are refused once protection is disabled; the operator still reads points.
            if rec.state == VmState::Disabled {
                return Err(lifecycle::disabled_error(vm));
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
        let mut v = self.vm_for(host, vm).await?;
        if host.is_some() {
            // What an agent sends for a disk changes it (blocks, logs, resync, failback): it
            // belongs on the lease holder. Taking the lease may re-read the records.
            self.hold(vm).await?;
            if let Some(fresh) = self.vms.read().await.get(vm) {
                v = fresh.value.clone();
            }
        }
        let d = self
            .disks
            .read()
            .await
            .get(&(vm.to_string(), disk.to_string()))
            .cloned()
            .ok_or_else(|| {
                Error::not_found("disk_not_found", format!("VM {vm} has no disk {disk}"))
            })?;
        // A removed disk's record stays for the points before its removal (the operator reads
        // them); agents can no longer send it anything.
        if host.is_some() && !v.spec.disks.iter().any(|s| s.id == disk) {
            return Err(Error::conflict(
                "disk_removed",
                format!("disk {disk} was removed from VM {vm}: it is no longer replicated"),
            ));
        }
        Ok((v, d))
    }

    pub(crate) async fn store_disk(&self, rec: DiskRecord) -> Result<()> {
        let epoch = self.hold(&rec.vm).await?;
        self.write_disk(epoch, rec).await
    }

    /// Writes a disk record under lease `epoch` (fenced) and caches what was stored.
    async fn write_disk(&self, epoch: u64, rec: DiskRecord) -> Result<()> {
        let id = layout::disk_record_id(&rec.vm_id, &rec.disk_id);
        let prefix = layout::record(Family::Disk, &id);
        let stored = self
            .vault
            .records
            .update_fenced(&prefix, epoch, |_: Option<&DiskRecord>| {
                Ok(Some(rec.clone()))
            })
            .await?
            .ok_or_else(|| Error::internal("disk record missing after update"))?;
        self.disk_versions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, stored.version);
        self.disks
            .write()
            .await
            .insert((rec.vm.clone(), rec.disk.clone()), stored.value);
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
                &[FAILOVER_SETTINGS_STEP, "Mark protected"],
                JobState::Running,
            )
            .await?;
        let found = self.check_failover_settings(&rec);
        // Settings a failover needs never hold protection back: they can be fixed later (the
        // VM's health reasons say so until they are); the step says what a failover meets now.
        self.jobs
            .step_with(&job.id, FAILOVER_SETTINGS_STEP, JobState::Succeeded, found)
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

    /// What the finalize step checks of a VM about to be protected: each NIC's source network
    /// has a target mapping, and the policy is valid. Returns the step's report: what holds and
    /// problems found, each prefixed `warning:`.
    fn check_failover_settings(&self, rec: &VmRecord) -> String {
        let mut problems = spec::unmapped_nic_warnings(&rec.spec.nics, &self.mapped_networks);
        let mut found: Vec<String> = rec
            .spec
            .nics
            .iter()
            .enumerate()
            .filter(|(_, n)| self.mapped_networks.contains(&n.network))
            .map(|(i, n)| format!("NIC {i} ({}) mapped", n.network))
            .collect();
        if rec.spec.nics.is_empty() {
            found.push("no NICs".into());
        }
        let policy = rec.spec.policy.clone().unwrap_or_default();
        match policy.validate() {
            Ok(()) => found.push(format!(
                "policy valid (interval {} s, retention {} s, app-consistent every {} s)",
                policy.interval_s, policy.retention_s, policy.app_consistent_every_s
            )),
            Err(e) => problems.push(format!("replication policy not valid: {e}")),
        }
        found.extend(problems.drain(..).map(|p| format!("warning: {p}")));
        found.join("; ")
    }

    /// Read-modify-write of a VM record (compare-and-swap retried); `f` returns `false` to leave
    /// it unchanged. The cache is refreshed with the result.
    pub(crate) async fn update_vm(
        &self,
        vm: &str,
        f: impl Fn(&mut VmRecord) -> Result<bool>,
    ) -> Result<VmRecord> {
        let rec = self.vm_for(None, vm).await?;
        let epoch = self.hold(vm).await?;
        let updated = self
            .vault
            .records
            .update_fenced(
                &layout::record(Family::Vm, &rec.id),
                epoch,
                |cur: Option<&VmRecord>| {
                    let mut r = cur
                        .cloned()
                        .ok_or_else(|| Error::not_found("vm_not_found", "VM record vanished"))?;
                    Ok(f(&mut r)?.then_some(r))
                },
            )
            .await?
            .ok_or_else(|| Error::internal("VM record missing after update"))?;
        // Concurrent updates can finish out of order: the cache keeps the newest version.
        let mut vms = self.vms.write().await;
        if vms
            .get(vm)
            .is_none_or(|cached| cached.version < updated.version)
        {
            vms.insert(vm.to_string(), updated.clone());
        }
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
        o: Option<crate::wire::NicOptions>,
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
    pub async fn set_policy(&self, vm: &str, change: &PolicyChange) -> Result<VmRecord> {
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
        Ok(updated)
    }
}

/// The finalize job's first step: it checks what a failover of the VM will need.
pub const FAILOVER_SETTINGS_STEP: &str = "Check network mappings and policy";

/// Pending (unmerged) log bytes at which a disk needs resynchronization: half its size.
pub fn resync_threshold(disk_size: u64) -> u64 {
    disk_size / 2
}

impl DiskRecord {
    /// Log bytes a read of the newest point goes through: those after the last snapshot.
    pub fn pending_log_bytes(&self) -> u64 {
        self.journal
            .iter()
            .rev()
            .take_while(|e| e.snapshot_root.is_none())
            .map(|e| e.log_bytes)
            .sum()
    }

    /// Whether VM point `cycle` includes this disk: from the cycle it joined the VM (once its
    /// initial replication completed, for a disk added later) to the last before its removal.
    pub fn in_cycle(&self, cycle: u64) -> bool {
        (!self.added || self.state == DiskState::Complete)
            && self.first_cycle <= cycle
            && self.last_cycle_in_vm.is_none_or(|l| cycle <= l)
    }

    pub fn last_cycle(&self) -> u64 {
        self.journal
            .last()
            .map(|e| e.cycle)
            .unwrap_or(self.base_point.cycle)
    }
}

/// What the API shows of one disk: `received` blocks and the `(stored, deduplicated)` bytes
/// `written` so far count while initial replication runs (the record's figures once complete).
pub fn disk_view(r: &DiskRecord, received: u64, written: (u64, u64)) -> DiskView {
    let (stored_bytes, deduplicated_bytes) = written;
    DiskView {
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
        resync_threshold_bytes: resync_threshold(r.size),
        resync_required: r.resync_required.clone(),
        last_log: r
            .journal
            .last()
            .map(|e| crate::util::rfc3339(e.accepted_unix)),
    }
}

/// [`disk_view`] of a disk whose initial replication completed (its record has the figures).
pub fn complete_disk_view(r: &DiskRecord) -> DiskView {
    disk_view(
        r,
        r.stats.blocks,
        (r.stats.stored_bytes, r.stats.deduplicated_bytes),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::testing::{memory, reload, spec};
    use crate::wire::NicOptions;

    fn with_nics(mut s: VmSpec, n: usize) -> VmSpec {
        s.nics = (0..n)
            .map(|i| NicSpec {
                network: "corp".into(),
                mac: format!("00:15:5d:00:00:{i:02x}"),
                ip: None,
            })
            .collect();
        s
    }

    #[tokio::test]
    async fn records_and_their_changes_survive_a_restart() {
        let (s, vault) = memory().await;
        let (rec, created) = s
            .catalog
            .enable("h", "vm", &spec(&[("os", 4), ("data", 2)]))
            .await
            .unwrap();
        assert!(created);
        assert_eq!(rec.state, VmState::InitialReplication);
        let change = PolicyChange {
            retention_s: Some(7200),
            ..Default::default()
        };
        s.catalog.set_policy("vm", &change).await.unwrap();
        let policy = |r: VmRecord| r.spec.policy.unwrap_or_default().retention_s;
        // The cache answers with the change at once, a restarted server from the vault.
        assert_eq!(policy(s.catalog.vm_for(None, "vm").await.unwrap()), 7200);
        let again = reload(&vault).await;
        assert_eq!(
            policy(again.catalog.vm_for(Some("h"), "vm").await.unwrap()),
            7200
        );
        let (_, d) = again.catalog.disk_for(None, "vm", "data").await.unwrap();
        assert_eq!((d.state, d.stats.blocks), (DiskState::Receiving, 2));
        let code = |e: Error| e.code().to_string();
        assert_eq!(
            code(again.catalog.vm_for(Some("other"), "vm").await.unwrap_err()),
            "forbidden"
        );
        assert_eq!(
            code(
                again
                    .catalog
                    .disk_for(None, "vm", "swap")
                    .await
                    .unwrap_err()
            ),
            "disk_not_found"
        );
        assert_eq!(
            code(again.catalog.vm_for(None, "nope").await.unwrap_err()),
            "vm_not_found"
        );
    }

    #[tokio::test]
    async fn a_refused_policy_change_leaves_the_policy_as_it_was() {
        let (s, vault) = memory().await;
        s.catalog
            .enable("h", "vm", &spec(&[("os", 1)]))
            .await
            .unwrap();
        let bad = PolicyChange {
            interval_s: Some(0),
            ..Default::default()
        };
        let e = s.catalog.set_policy("vm", &bad).await.unwrap_err();
        assert_eq!(e.code(), "invalid_policy");
        for c in [s.catalog.clone(), reload(&vault).await.catalog] {
            let r = c.vm_for(None, "vm").await.unwrap();
            assert_eq!(r.spec.policy.unwrap_or_default(), Policy::default());
        }
    }

    #[tokio::test]
    async fn enabling_again_is_idempotent_and_a_different_spec_is_refused() {
        let (s, _vault) = memory().await;
        let first = spec(&[("os", 2)]);
        s.catalog.enable("h", "vm", &first).await.unwrap();
        let (again, created) = s.catalog.enable("h", "vm", &first).await.unwrap();
        assert!(!created);
        assert_eq!(
            again.enable_job,
            s.catalog.vm_for(None, "vm").await.unwrap().enable_job
        );
        let e = s
            .catalog
            .enable("h", "vm", &spec(&[("os", 3)]))
            .await
            .unwrap_err();
        assert_eq!(e.code(), "vm_exists");
        let e = s.catalog.enable("h2", "vm", &first).await.unwrap_err();
        assert_eq!(e.code(), "forbidden");
        let (_, d) = s.catalog.disk_for(None, "vm", "os").await.unwrap();
        assert_eq!(d.size, 2 * crate::services::testing::BS as u64);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_nic_overrides_are_all_kept() {
        let (s, vault) = memory().await;
        s.catalog
            .enable("h", "vm", &with_nics(spec(&[("os", 1)]), 8))
            .await
            .unwrap();
        let sets = (0..8u32).map(|i| {
            let c = s.catalog.clone();
            tokio::spawn(async move {
                let o = NicOptions {
                    target: Some(format!("net/sub{i}")),
                    ..Default::default()
                };
                c.set_nic_override("vm", i, Some(o)).await.unwrap();
            })
        });
        for t in sets.collect::<Vec<_>>() {
            t.await.unwrap();
        }
        // Each update is a compare-and-swap on the record: none overwrote another.
        for c in [s.catalog.clone(), reload(&vault).await.catalog] {
            let r = c.vm_for(None, "vm").await.unwrap();
            assert_eq!(r.nic_overrides.len(), 8, "{:?}", r.nic_overrides);
        }
        let e = s.catalog.set_nic_override("vm", 8, None).await.unwrap_err();
        assert_eq!(e.code(), "nic_not_found");
    }
}
