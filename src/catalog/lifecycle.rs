//! Changing what is protected: the disks of a protected VM (added, removed, grown), disabling
//! protection of a VM, with or without its data, and the background expiry of a disabled VM's
//! records once its retention window has passed.
//!
//! Disks change when the agent declares the VM again (`agent protect`) with another disk list:
//! - a new disk gets its own initial replication; the VM's points include it from the cycle
//!   after the newest one when that completes (its `first_cycle`, which its initial
//!   replication stands for; its first log follows it). Earlier points do not include it.
//! - a disk left out is removed: no longer replicated (agents are refused), kept for the
//!   points up to its last cycle, which still read it.
//! - a larger size grows the disk: logs may write the new range from then on, each new log
//!   entry records the size, and a point reads at the size of its newest log (older points
//!   keep the old size). A smaller size is refused (`disk_shrink`).
//!
//! Disabling first marks the VM `disabled` (agents are refused from then on, see
//! [`Catalog::vm_for`]) and waits for every disk's journal writer in flight, so no log accepted
//! before the mark can write a disk record afterwards. Removing the data then deletes the VM
//! record first (the commit point: the VM is gone), then its disk records and the session
//! records keyed by its id. Nothing is deleted from the store here: the objects only the
//! removed records referenced are garbage for the next collection (`drvault gc`), which keeps
//! its grace period and write fence.

use std::collections::BTreeMap;

use super::{BasePoint, Catalog, DiskRecord, DiskState, DiskStats, VmRecord, VmSpec, VmState};
use crate::error::{Error, Result};
use crate::jobs::{JobKind, JobState};
use crate::vault::layout::{self, Family};
use crate::wire::DisableReport;

const STOP: &str = "Stop protection";
const DELETE: &str = "Delete the VM's records";

/// What an agent gets for a VM whose protection was disabled.
pub(super) fn disabled_error(vm: &str) -> Error {
    Error::conflict(
        "vm_disabled",
        format!(
            "protection of VM {vm} was disabled: uploads are refused; its points stay readable \
             until the retention window passes (`drvault vm disable --vm {vm} --delete-data` \
             removes them now, after which the VM can be protected again)"
        ),
    )
}

impl Catalog {
    /// Disables protection of `vm` (the "Disable protection" job). Without `delete_data` the
    /// points stay readable until the retention window passes; with it the VM's records go now.
    /// The caller checks what this layer cannot see (a failover in progress).
    pub async fn disable(&self, vm: &str, delete_data: bool) -> Result<DisableReport> {
        let rec = self.vm_for(None, vm).await?;
        let steps: &[&str] = if delete_data {
            &[STOP, DELETE]
        } else {
            &[STOP]
        };
        let job = self
            .jobs
            .create(
                JobKind::DisableProtection,
                Some(vm),
                steps,
                JobState::Running,
            )
            .await?;
        let result = async {
            let now = crate::util::unix_now();
            let updated = self
                .update_vm(vm, |r| {
                    if r.state == VmState::Disabled {
                        return Ok(false);
                    }
                    r.state = VmState::Disabled;
                    r.disabled_unix = Some(now);
                    Ok(true)
                })
                .await?;
            // A log accepted before the mark may still be writing its disk record: wait for
            // each disk's journal writer; later ones re-read the VM and are refused.
            for d in self.disks_of(&rec).await {
                let lock = self.journal_lock(&d).await;
                drop(lock.lock().await);
            }
            self.jobs.step(&job.id, STOP, JobState::Succeeded).await?;
            if delete_data {
                self.forget(vm).await?;
                self.jobs.step(&job.id, DELETE, JobState::Succeeded).await?;
            }
            Ok::<_, Error>(updated)
        }
        .await;
        match result {
            Ok(updated) => {
                self.jobs.succeed(&job.id).await?;
                tracing::info!(vm, delete_data, "protection disabled");
                let expires = (!delete_data)
                    .then(|| expiry(&updated))
                    .flatten()
                    .map(crate::util::rfc3339);
                Ok(DisableReport {
                    vm: vm.to_string(),
                    job: job.id,
                    deleted: delete_data,
                    expires,
                })
            }
            Err(e) => {
                let _ = self.jobs.fail(&job.id, &e).await;
                Err(e)
            }
        }
    }

    /// Removes the records of every disabled VM whose retention window has passed since it was
    /// disabled (the background work); returns how many VMs went.
    pub async fn expire_disabled(&self) -> Result<usize> {
        let now = crate::util::unix_now();
        let due: Vec<String> = self
            .vms()
            .await
            .into_iter()
            .filter(|r| expiry(r).is_some_and(|t| t <= now))
            .map(|r| r.name)
            .collect();
        let mut mine = Vec::new();
        for vm in due {
            if self.try_hold(&vm).await {
                mine.push(vm);
            }
        }
        let due = mine;
        for vm in &due {
            match self.forget(vm).await {
                // Held by another live server: its own background work expires it.
                Err(Error::LeaseHeld { .. }) => continue,
                other => other?,
            }
            tracing::info!(
                vm,
                "disabled VM's retention passed: its records were removed"
            );
        }
        Ok(due.len())
    }

    /// Deletes the records of `vm`: VM record first (the VM is gone from then on), then its
    /// disks and the session records keyed by its id.
    async fn forget(&self, vm: &str) -> Result<()> {
        let rec = self.vm_for(None, vm).await?;
        self.hold(vm).await?;
        // Every disk record of the VM: its disks, removed ones, an added one never declared.
        let disks: Vec<DiskRecord> = self
            .disks
            .read()
            .await
            .iter()
            .filter(|((v, _), _)| v == vm)
            .map(|(_, d)| d.clone())
            .collect();
        // Held throughout: a merge or log waiting for a disk re-reads it afterwards, finds the
        // VM gone and writes nothing (it would otherwise store the disk record again).
        let mut locks = Vec::new();
        for d in &disks {
            locks.push(self.journal_lock(d).await);
        }
        let mut held = Vec::new();
        for l in &locks {
            held.push(l.lock().await);
        }
        let records = &self.vault.records;
        records.remove(&layout::record(Family::Vm, &rec.id)).await?;
        self.vms.write().await.remove(vm);
        for d in &disks {
            records
                .remove(&layout::record(
                    Family::Disk,
                    &layout::disk_record_id(&d.vm_id, &d.disk_id),
                ))
                .await?;
        }
        self.disks.write().await.retain(|(v, _), _| v != vm);
        for family in [Family::Resync, Family::Failback, Family::Failover] {
            records.remove(&layout::record(family, &rec.id)).await?;
        }
        self.journal_locks
            .lock()
            .await
            .retain(|(vm_id, _), _| *vm_id != rec.id);
        drop(held);
        Ok(())
    }
}

impl Catalog {
    /// Applies a re-declared disk list to protected VM `existing` (see the module doc); all
    /// checks come before any change, so a refusal changes nothing.
    pub(super) async fn change_disks(
        &self,
        existing: &VmRecord,
        spec: &VmSpec,
    ) -> Result<(VmRecord, bool)> {
        let vm = existing.name.as_str();
        let old: BTreeMap<&str, u64> = existing
            .spec
            .disks
            .iter()
            .map(|d| (d.id.as_str(), d.size))
            .collect();
        let (mut added, mut grown) = (Vec::new(), Vec::new());
        for d in &spec.disks {
            match old.get(d.id.as_str()) {
                None if existing.removed_disks.iter().any(|r| r.id == d.id) => {
                    return Err(Error::conflict(
                        "disk_id_retained",
                        format!("disk {} was removed from VM {vm} and the points before its removal still read it: give the new disk another id", d.id),
                    ));
                }
                None => added.push(d.clone()),
                Some(&size) if d.size < size => {
                    return Err(Error::invalid(
                        "disk_shrink",
                        format!("disk {} of VM {vm} is {size} bytes; {} is smaller, and a protected disk cannot shrink (protect the smaller disk under another id, or disable protection first)", d.id, d.size),
                    ));
                }
                Some(&size) if d.size > size => grown.push(d.clone()),
                Some(_) => {}
            }
        }
        let removed: Vec<_> = existing
            .spec
            .disks
            .iter()
            .filter(|d| !spec.disks.iter().any(|s| s.id == d.id))
            .cloned()
            .collect();
        for g in &grown {
            let (_, d) = self.disk_for(None, vm, &g.id).await?;
            if d.state != DiskState::Complete {
                return Err(Error::conflict(
                    "replication_incomplete",
                    format!(
                        "disk {} of VM {vm} grows once its initial replication completed",
                        g.id
                    ),
                ));
            }
        }
        // New disk records first: invisible until the VM record lists them.
        for a in &added {
            let rec = self.new_disk_record(&existing.name, &existing.id, &a.id, a.size, true);
            self.store_disk(rec).await?;
        }
        for g in &grown {
            let (_, d0) = self.disk_for(None, vm, &g.id).await?;
            let lock = self.journal_lock(&d0).await;
            let _held = lock.lock().await;
            let (_, mut d) = self.disk_for(None, vm, &g.id).await?;
            d.size = g.size;
            d.stats.blocks = g.size.div_ceil(d.block_size as u64);
            self.store_disk(d).await?;
        }
        let new_disks = spec.disks.clone();
        let gone = removed.clone();
        let updated = self
            .update_vm(vm, |r| {
                r.spec.disks = new_disks.clone();
                for g in &gone {
                    if !r.removed_disks.iter().any(|x| x.id == g.id) {
                        r.removed_disks.push(g.clone());
                    }
                }
                Ok(true)
            })
            .await?;
        // Agents are refused for a removed disk from here on; a log already past that check
        // holds the journal lock: its cycle counts as the disk's last.
        for r in &removed {
            let (_, d0) = self.disk_for(None, vm, &r.id).await?;
            let lock = self.journal_lock(&d0).await;
            let _held = lock.lock().await;
            let (_, mut d) = self.disk_for(None, vm, &r.id).await?;
            d.last_cycle_in_vm = Some(d.last_cycle());
            self.store_disk(d).await?;
        }
        tracing::info!(
            vm,
            added = ?added.iter().map(|d| &d.id).collect::<Vec<_>>(),
            removed = ?removed.iter().map(|d| &d.id).collect::<Vec<_>>(),
            grown = ?grown.iter().map(|d| (&d.id, d.size)).collect::<Vec<_>>(),
            "disks of a protected VM changed"
        );
        Ok((updated, false))
    }

    /// A disk record about to receive its initial replication (`added`: to a protected VM).
    pub(super) fn new_disk_record(
        &self,
        vm: &str,
        vm_id: &str,
        disk: &str,
        size: u64,
        added: bool,
    ) -> DiskRecord {
        DiskRecord {
            vm: vm.to_string(),
            disk: disk.to_string(),
            vm_id: vm_id.to_string(),
            disk_id: self.disk_id(vm, disk),
            size,
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
            added,
            first_cycle: 0,
            last_cycle_in_vm: None,
            fence: 0,
            stats: DiskStats {
                // Every block is `block_size` bytes but the last (see `replica::blockmap`).
                blocks: size.div_ceil(self.block_size as u64),
                ..Default::default()
            },
            completed_unix: None,
        }
    }

    /// The cycle a disk added to `vm` joins the VM's points at, as its initial replication
    /// completes: the one after the newest cycle any other disk has.
    pub async fn joining_cycle(&self, vm: &str, disk: &str) -> Result<u64> {
        let rec = self.vm_for(None, vm).await?;
        Ok(self
            .member_disks(&rec)
            .await
            .iter()
            .filter(|d| d.disk != disk && d.state == DiskState::Complete)
            .map(|d| d.last_cycle())
            .max()
            .unwrap_or(0)
            + 1)
    }
}

/// When a disabled VM's records go by themselves: its retention window after the disable.
fn expiry(r: &super::VmRecord) -> Option<u64> {
    let at = r.disabled_unix.filter(|_| r.state == VmState::Disabled)?;
    Some(at.saturating_add(r.spec.policy.clone().unwrap_or_default().retention_s))
}
