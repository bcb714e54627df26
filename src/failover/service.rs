//! Failover jobs: turn a recovery point into fixed VHD disks and a VM definition attached to a
//! target network (test, planned, unplanned), then commit or clean up.
//!
//! A failover runs as a job with steps: choose the point (a planned failover first waits, in
//! state "waiting for input", until every disk's final log is in) → materialize each disk (in
//! parallel, every block verified as read, zero blocks left as holes, fsynced) → assign addresses
//! (one compare-and-swap on the vault's allocation record, all NICs or none) → write vm.json,
//! libvirt domain and network XML and the qemu command line. A failure at any step removes what
//! the failover wrote and releases its addresses. One failover per VM at a time; a test failover
//! (drill) writes to a separate folder and must be cleaned up, which is what marks it successful.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::definition::{self, FailoverInfo, FailoverKind, NicOptions, VmDefinition};
use super::network::NetworkConfig;
pub use super::qemu::public_forwards;
use crate::catalog::{Catalog, VmState};
use crate::error::{Error, Result};
use crate::jobs::{JobKind, JobState, Jobs};
use crate::replica::Replicas;
use crate::tasks::Tasks;
use crate::vault::layout::{self, Family};
use crate::vault::Vault;
pub use crate::wire::{FailoverRecord, FailoverRequest, FailoverState, FailoverView};

#[derive(Clone)]
pub struct Failovers {
    pub(super) vault: Vault,
    pub(super) catalog: Catalog,
    pub(super) replicas: Replicas,
    pub(super) jobs: Jobs,
    pub(super) target_hashes: super::failback::TargetHashes,
    pub(super) networks: Arc<NetworkConfig>,
    output: PathBuf,
    pub(super) planned_wait: Duration,
    /// The server's background runner: failover runs are its tasks, so shutdown waits for them.
    pub(super) tasks: Tasks,
    /// Azure storage the disks are written to instead of `output` (definitions stay there).
    pub(super) target: Option<super::azure_target::AzureTarget>,
    /// Held while a failback copies a disk from the Azure target.
    pub(super) blob_fetch: Arc<tokio::sync::Mutex<()>>,
    running: Arc<tokio::sync::Mutex<std::collections::BTreeSet<String>>>,
    /// VMs whose planned failover an operator told to stop waiting for the final logs.
    pub(super) cancelled: Arc<std::sync::Mutex<std::collections::BTreeSet<String>>>,
}

/// Where failovers write and attach, from the server config.
pub struct FailoverSettings {
    /// Target networks and the source → target mapping.
    pub networks: NetworkConfig,
    /// The directory each failover's disks and definition go under.
    pub output: PathBuf,
    /// How long a planned failover waits for the final logs unless the request says.
    pub planned_wait: Duration,
    /// Azure storage for the disks (`[failover] target`), instead of files in `output`.
    pub target: Option<super::azure_target::AzureTarget>,
}

impl Failovers {
    pub fn new(
        vault: Vault,
        catalog: Catalog,
        replicas: Replicas,
        jobs: Jobs,
        settings: FailoverSettings,
        tasks: Tasks,
    ) -> Failovers {
        let FailoverSettings {
            networks,
            output,
            planned_wait,
            target,
        } = settings;
        Failovers {
            vault,
            catalog,
            replicas,
            jobs,
            networks: Arc::new(networks),
            output,
            planned_wait,
            tasks,
            target,
            blob_fetch: Default::default(),
            running: Default::default(),
            cancelled: Default::default(),
            target_hashes: Default::default(),
        }
    }

    /// The target networks and mappings failovers use (the console shows where NICs land).
    pub fn networks(&self) -> &NetworkConfig {
        &self.networks
    }

    fn record_key(&self, vm: &str) -> crate::store::Key {
        layout::record(Family::Failover, &self.catalog.vm_id(vm))
    }

    pub async fn current(&self, vm: &str) -> Result<Option<FailoverRecord>> {
        Ok(self
            .vault
            .records
            .load::<FailoverRecord>(&self.record_key(vm))
            .await?
            .map(|v| v.value))
    }

    pub(super) fn vault(&self) -> &Vault {
        &self.vault
    }

    pub(super) fn jobs(&self) -> &Jobs {
        &self.jobs
    }

    pub(super) fn chunks(&self) -> &crate::chunk::ChunkStore {
        &self.vault.chunks
    }

    pub(super) fn vault_cpu(&self) -> &crate::chunk::CpuPool {
        self.vault.chunks.cpu()
    }

    pub(super) async fn put_record(&self, rec: &FailoverRecord) -> Result<()> {
        let r = rec.clone();
        self.vault
            .records
            .update(&self.record_key(&rec.vm), |_: Option<&FailoverRecord>| {
                Ok(Some(r.clone()))
            })
            .await?;
        Ok(())
    }

    /// Checks and starts a failover; returns its record (state running) at once.
    pub async fn start(&self, vm: &str, req: FailoverRequest) -> Result<FailoverRecord> {
        // Changes the VM: it runs on the server holding the VM's lease.
        self.catalog.hold(vm).await?;
        let rec = self.catalog.vm_for(None, vm).await?;
        if rec.state == VmState::InitialReplication {
            return Err(Error::conflict(
                "vm_not_protected",
                format!("VM {vm} has not finished initial replication"),
            ));
        }
        if rec.state == VmState::FailedOver {
            return Err(Error::conflict(
                "failed_over",
                format!("VM {vm} is already failed over and committed"),
            ));
        }
        if rec.state == VmState::Disabled {
            return Err(Error::conflict(
                "vm_disabled",
                format!("protection of VM {vm} was disabled: its points can be exported, not failed over"),
            ));
        }
        self.refuse_in_progress(vm).await?;
        // Check the point and the mappings now, so an impossible request fails before a job.
        if req.kind != FailoverKind::Planned {
            self.requested_point(vm, &req).await?;
        }
        let test = req.kind == FailoverKind::Test;
        let opts = merged_nic_options(&rec, &req);
        for (i, n) in rec.spec.nics.iter().enumerate() {
            let o = opts.get(&(i as u32)).cloned().unwrap_or_default();
            if o.skip || (!test && o.target.is_some()) {
                continue;
            }
            if self.networks.target_for(&n.network, test).is_none() {
                return Err(Error::invalid(
                    "network_unmapped",
                    format!(
                        "NIC {i} of VM {vm} is on source network {:?}, which has no {}mapping",
                        n.network,
                        if test { "test " } else { "" }
                    ),
                ));
            }
        }
        {
            let mut running = self.running.lock().await;
            if !running.insert(vm.to_string()) {
                return Err(Error::conflict(
                    "failover_running",
                    format!("a failover of VM {vm} is already running"),
                ));
            }
        }
        let id = uuid::Uuid::new_v4().simple().to_string();
        let dir = match req.kind {
            FailoverKind::Test => self.output.join("drills").join(vm).join(&id),
            _ => self.output.join(vm).join(&id),
        };
        // A drill's blobs go under their own path, like its files.
        let blob_folder = self.target.as_ref().map(|t| match req.kind {
            FailoverKind::Test => t.blob_name(&["drills", vm, &id]),
            _ => t.blob_name(&[vm, &id]),
        });
        let kind = match req.kind {
            FailoverKind::Test => JobKind::TestFailover,
            FailoverKind::Planned => JobKind::PlannedFailover,
            FailoverKind::Unplanned => JobKind::UnplannedFailover,
        };
        let mut steps: Vec<String> = vec!["Choose recovery point".into()];
        steps.extend(
            rec.spec
                .disks
                .iter()
                .map(|d| format!("Materialize disk {}", d.id)),
        );
        steps.push("Assign addresses".into());
        steps.push("Write VM definition".into());
        let step_refs: Vec<&str> = steps.iter().map(String::as_str).collect();
        let job = match self
            .jobs
            .create(kind, Some(vm), &step_refs, JobState::Running)
            .await
        {
            Ok(j) => j,
            Err(e) => {
                self.running.lock().await.remove(vm);
                return Err(e);
            }
        };
        let record = FailoverRecord {
            id: id.clone(),
            vm: vm.to_string(),
            kind: req.kind,
            state: FailoverState::Running,
            job: job.id.clone(),
            point: None,
            output_dir: dir.display().to_string(),
            files: Vec::new(),
            created_unix: crate::util::unix_now(),
            ended_unix: None,
            error: None,
            drill_successful: None,
            target: self
                .target
                .as_ref()
                .zip(blob_folder.as_deref())
                .map(|(t, f)| t.blob_url(f)),
        };
        self.put_record(&record).await?;
        let me = self.clone();
        let vm_s = vm.to_string();
        let rec2 = record.clone();
        self.tasks.spawn("failover", async move {
            let result = me
                .run(&vm_s, &req, rec2.clone(), &dir, blob_folder.as_deref())
                .await;
            let mut fin = rec2;
            fin.ended_unix = Some(crate::util::unix_now());
            match result {
                Ok((point, files)) => {
                    fin.state = FailoverState::Succeeded;
                    fin.point = Some(point);
                    fin.files = files;
                    let _ = me.put_record(&fin).await;
                    let _ = me.jobs.succeed(&fin.job).await;
                    tracing::info!(vm = %vm_s, failover = %fin.id, "failover succeeded");
                }
                Err(e) => {
                    // Nothing half-created: remove what was written, release addresses.
                    let _ = tokio::fs::remove_dir_all(&dir).await;
                    let _ = me.release(&fin.id).await;
                    fin.state = FailoverState::Failed;
                    fin.error = Some(e.to_string());
                    if let Some(left) = me.delete_blobs(&fin).await {
                        // The storage is still failing: the partial blobs stay, named here.
                        fin.error = Some(format!("{e}; {left}"));
                    }
                    let _ = me.put_record(&fin).await;
                    let _ = me.jobs.fail(&fin.job, &e).await;
                    tracing::warn!(vm = %vm_s, failover = %fin.id, error = %e, "failover failed");
                }
            }
            me.running.lock().await.remove(&vm_s);
        });
        Ok(record)
    }

    /// Deletes the page blobs of a failover whose disks went to Azure storage. `None` when
    /// they are gone (or there were none); otherwise what is left and why, for its record.
    pub(super) async fn delete_blobs(&self, rec: &FailoverRecord) -> Option<String> {
        let (target, url) = (self.target.as_ref()?, rec.target.as_deref()?);
        let folder = target.blob_of_url(url)?;
        match target.delete_under(folder).await {
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(failover = %rec.id, folder = %url, error = %e, "cannot delete the failover's page blobs");
                Some(format!(
                    "partial page blobs left under {url}/ (deleting them failed: {e})"
                ))
            }
        }
    }

    /// The failover's steps, in order; the caller undoes what they wrote on error.
    async fn run(
        &self,
        vm: &str,
        req: &FailoverRequest,
        rec: FailoverRecord,
        dir: &Path,
        blob_folder: Option<&str>,
    ) -> Result<(String, Vec<String>)> {
        let chosen = self.choose_point(vm, req, &rec.job).await?;
        let disks = self
            .materialize_disks(&chosen.vm.spec, chosen.readers, &rec.job, dir, blob_folder)
            .await?;
        let info = FailoverInfo::new(req.kind, &rec.id, &chosen.point.id, chosen.point.time_unix);
        let nic_opts = merged_nic_options(&chosen.vm, req);
        let nics = self
            .assign_addresses(vm, &chosen.vm.spec, &info, &nic_opts)
            .await?;
        self.jobs
            .step(&rec.job, "Assign addresses", JobState::Succeeded)
            .await?;
        let def = definition::build_definition(vm, &chosen.vm.spec, disks.definitions, nics, info)?;
        let mut files = disks.files;
        files.extend(self.write_definition(&def, dir).await?);
        self.jobs
            .step(&rec.job, "Write VM definition", JobState::Succeeded)
            .await?;
        Ok((chosen.point.id, files))
    }

    /// Refuses while a failover of `vm` runs, waits for its commit, or a drill is still up
    /// (a new failover, or disabling protection, would pull the points from under it).
    pub async fn refuse_in_progress(&self, vm: &str) -> Result<()> {
        if let Some(cur) = self.current(vm).await? {
            match cur.state {
                FailoverState::Running => return Err(Error::conflict("failover_running", format!("a failover of VM {vm} is already running (job {})", cur.job))),
                FailoverState::Succeeded if cur.kind == FailoverKind::Test => {
                    return Err(Error::conflict("drill_not_cleaned_up", format!("the test failover of VM {vm} is still up: run `drvault failover cleanup --vm {vm}` first")))
                }
                FailoverState::Succeeded => return Err(Error::conflict("failover_not_committed", format!("VM {vm} has a failover waiting for commit")))
                ,
                _ => {}
            }
        }
        Ok(())
    }

    /// Stops a planned failover that waits for the final logs: it ends failed
    /// (`failover_cancelled`), having written nothing, and the VM stays protected.
    pub async fn cancel(&self, vm: &str) -> Result<FailoverRecord> {
        // Changes the VM: it runs on the server holding the VM's lease.
        self.catalog.hold(vm).await?;
        let cur = self.current(vm).await?.ok_or_else(|| {
            Error::not_found("failover_not_found", format!("VM {vm} has no failover"))
        })?;
        let waiting = self
            .jobs
            .get(&cur.job)
            .await
            .is_some_and(|j| j.state == JobState::WaitingForInput);
        if cur.state != FailoverState::Running || cur.kind != FailoverKind::Planned || !waiting {
            return Err(Error::conflict(
                "failover_not_waiting",
                format!("VM {vm} has no planned failover waiting for final logs (only that wait can be cancelled)"),
            ));
        }
        self.cancelled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(vm.to_string());
        Ok(cur)
    }

    /// Ends the failovers a previous server process left running (their task died with it) as
    /// a failed run ends: output removed, addresses released, state `failed`. Without this, the
    /// VM would refuse every new failover and cleanup with `failover_running`.
    pub async fn recover_interrupted(&self) -> Result<usize> {
        let mut n = 0;
        for id in self.vault.records.ids(Family::Failover).await? {
            let key = layout::record(Family::Failover, &id);
            let Some(v) = self.vault.records.load::<FailoverRecord>(&key).await? else {
                continue;
            };
            let mut rec = v.value;
            if rec.state != FailoverState::Running {
                continue;
            }
            // Another live server holds the VM: the failover may be running there.
            if !self.catalog.try_hold(&rec.vm).await {
                continue;
            }
            match tokio::fs::remove_dir_all(&rec.output_dir).await {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(dir = %rec.output_dir, error = %e, "cannot remove the output of an interrupted failover")
                }
            }
            self.release(&rec.id).await?;
            rec.state = FailoverState::Failed;
            rec.ended_unix = Some(crate::util::unix_now());
            rec.error = Some("interrupted: the server stopped while the failover ran".into());
            if let Some(left) = self.delete_blobs(&rec).await {
                rec.error = Some(format!(
                    "interrupted: the server stopped while the failover ran; {left}"
                ));
            }
            self.put_record(&rec).await?;
            tracing::warn!(vm = %rec.vm, failover = %rec.id, "failover interrupted by a restart marked failed");
            n += 1;
        }
        Ok(n)
    }

    /// Removes a drill's output and releases its addresses; the drill counts as successful only
    /// when this succeeds.
    pub async fn cleanup(&self, vm: &str) -> Result<FailoverRecord> {
        // Changes the VM: it runs on the server holding the VM's lease.
        self.catalog.hold(vm).await?;
        let mut cur = self.current(vm).await?.ok_or_else(|| {
            Error::not_found("failover_not_found", format!("VM {vm} has no failover"))
        })?;
        if cur.kind != FailoverKind::Test {
            return Err(Error::conflict(
                "not_a_drill",
                "only test failovers are cleaned up; commit a planned or unplanned failover",
            ));
        }
        if cur.state == FailoverState::Running {
            return Err(Error::conflict(
                "failover_running",
                "the test failover is still running",
            ));
        }
        if cur.state == FailoverState::CleanedUp {
            return Ok(cur);
        }
        let job = self
            .jobs
            .create(
                JobKind::FailoverCleanup,
                Some(vm),
                &["Delete drill output", "Release addresses"],
                JobState::Running,
            )
            .await?;
        let dir = PathBuf::from(&cur.output_dir);
        let result = async {
            match tokio::fs::remove_dir_all(&dir).await {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(Error::local_write(
                        &e,
                        format!("removing {}: {e}", dir.display()),
                        |m| Error::unavailable("cleanup_failed", m),
                    ))
                }
            }
            if let Some(left) = self.delete_blobs(&cur).await {
                return Err(Error::unavailable("cleanup_failed", left));
            }
            self.jobs
                .step(&job.id, "Delete drill output", JobState::Succeeded)
                .await?;
            self.release(&cur.id).await?;
            Ok(())
        }
        .await;
        match result {
            Ok(()) => {
                cur.drill_successful = Some(cur.state == FailoverState::Succeeded);
                cur.state = FailoverState::CleanedUp;
                self.put_record(&cur).await?;
                self.jobs.succeed(&job.id).await?;
                Ok(cur)
            }
            Err(e) => {
                let _ = self.jobs.fail(&job.id, &e).await;
                Err(e)
            }
        }
    }

    /// Ends a planned or unplanned failover: the source's later logs are refused.
    pub async fn commit(&self, vm: &str) -> Result<FailoverRecord> {
        // Changes the VM: it runs on the server holding the VM's lease.
        self.catalog.hold(vm).await?;
        let mut cur = self.current(vm).await?.ok_or_else(|| {
            Error::not_found("failover_not_found", format!("VM {vm} has no failover"))
        })?;
        if cur.kind == FailoverKind::Test {
            return Err(Error::conflict(
                "drill_not_committable",
                "a test failover is cleaned up, not committed",
            ));
        }
        match cur.state {
            FailoverState::Committed => return Ok(cur),
            FailoverState::Succeeded => {}
            _ => {
                return Err(Error::conflict(
                    "failover_not_succeeded",
                    format!("VM {vm}'s failover is {:?}, not succeeded", cur.state),
                ))
            }
        }
        let job = self
            .jobs
            .create(
                JobKind::FailoverCommit,
                Some(vm),
                &["Commit"],
                JobState::Running,
            )
            .await?;
        self.catalog.set_state(vm, VmState::FailedOver).await?;
        cur.state = FailoverState::Committed;
        self.put_record(&cur).await?;
        self.jobs.succeed(&job.id).await?;
        Ok(cur)
    }

    pub async fn show(&self, vm: &str) -> Result<FailoverView> {
        let rec = self.current(vm).await?.ok_or_else(|| {
            Error::not_found("failover_not_found", format!("VM {vm} has no failover"))
        })?;
        let def = std::fs::read(Path::new(&rec.output_dir).join("vm.json"))
            .ok()
            .and_then(|b| VmDefinition::from_json(&b).ok());
        let (qemu, qemu_unavailable) = match def
            .as_ref()
            .map(|d| super::qemu::qemu_command(d, &public_forwards(d)))
        {
            Some(Ok(cmd)) => (Some(cmd), None),
            Some(Err(e)) => (None, Some(e.to_string())),
            None => (None, None),
        };
        Ok(FailoverView {
            record: rec,
            definition: def,
            qemu_command: qemu,
            qemu_unavailable,
        })
    }
}

/// The VM's stored NIC overrides with the request's on top.
fn merged_nic_options(
    rec: &crate::catalog::VmRecord,
    req: &FailoverRequest,
) -> BTreeMap<u32, NicOptions> {
    let mut out = rec.nic_overrides.clone();
    for (i, o) in &req.nics {
        let base = out.get(i).cloned().unwrap_or_default();
        out.insert(*i, o.over(&base));
    }
    out
}
