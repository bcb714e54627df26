//! Changing what is protected: disabling protection of a VM, with or without its data, and
//! the background expiry of a disabled VM's records once its retention window has passed.
//!
//! Disabling first marks the VM `disabled` (agents are refused from then on, see
//! [`Catalog::vm_for`]) and waits for every disk's journal writer in flight, so no log accepted
//! before the mark can write a disk record afterwards. Removing the data then deletes the VM
//! record first (the commit point: the VM is gone), then its disk records and the session
//! records keyed by its id. Nothing is deleted from the store here: the objects only the
//! removed records referenced are garbage for the next collection (`drvault gc`), which keeps
//! its grace period and write fence.

use super::{Catalog, VmState};
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
            .create(JobKind::DisableProtection, Some(vm), steps, JobState::Running)
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
        for vm in &due {
            self.forget(vm).await?;
            tracing::info!(vm, "disabled VM's retention passed: its records were removed");
        }
        Ok(due.len())
    }

    /// Deletes the records of `vm`: VM record first (the VM is gone from then on), then its
    /// disks and the session records keyed by its id.
    async fn forget(&self, vm: &str) -> Result<()> {
        let rec = self.vm_for(None, vm).await?;
        let disks = self.disks_of(&rec).await;
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

/// When a disabled VM's records go by themselves: its retention window after the disable.
fn expiry(r: &super::VmRecord) -> Option<u64> {
    let at = r.disabled_unix.filter(|_| r.state == VmState::Disabled)?;
    Some(at.saturating_add(r.spec.policy.clone().unwrap_or_default().retention_s))
}
