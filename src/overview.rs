//! What the API shows of a VM: its records, with the progress of initial replication, the open
//! resync session, registered damage and a failover in progress, and the health that follows
//! from them. It reads every service and changes none; nothing below the API depends on it.

use crate::catalog::spec::unmapped_nic_warnings;
use crate::catalog::{
    disk_view, Catalog, DiskRecord, DiskState, DiskView, FailoverBrief, Health, ResyncBrief,
    VmRecord, VmState, VmView,
};
use crate::error::{Error, Result};
use crate::ingest::Ingest;
use crate::replica::resync::Resyncs;
use crate::replica::Replicas;

/// Composes the services' state into VM views. Cheap to clone.
#[derive(Clone)]
pub struct Overview {
    catalog: Catalog,
    ingest: Ingest,
    replicas: Replicas,
    resyncs: Resyncs,
}

impl Overview {
    pub fn new(catalog: Catalog, ingest: Ingest, replicas: Replicas, resyncs: Resyncs) -> Overview {
        Overview {
            catalog,
            ingest,
            replicas,
            resyncs,
        }
    }

    /// The view of a VM by name (operator: `host` None), checking the host may see it.
    pub async fn vm(&self, host: Option<&str>, vm: &str) -> Result<VmView> {
        let rec = self.catalog.vm_for(host, vm).await?;
        Ok(self.view(&rec).await)
    }

    /// One disk of a VM's view.
    pub async fn disk(&self, vm: &str, disk: &str) -> Result<DiskView> {
        let view = self.vm(None, vm).await?;
        view.disks
            .into_iter()
            .find(|x| x.id == disk)
            .ok_or_else(|| {
                Error::not_found("disk_not_found", format!("VM {vm} has no disk {disk}"))
            })
    }

    pub async fn list(&self) -> Vec<VmView> {
        let vms = self.catalog.vms().await;
        let mut out = Vec::with_capacity(vms.len());
        for v in &vms {
            out.push(self.view(v).await);
        }
        out
    }

    pub async fn view(&self, rec: &VmRecord) -> VmView {
        // A resync under way turns "resync required" from Critical (nothing is happening) into
        // Warning (it is scheduled or progressing). An unreadable session record reads as none.
        let open = self.resyncs.open_resync(&rec.id).await.ok().flatten();
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
        let mut dv = Vec::new();
        let (mut done, mut total) = (0u64, 0u64);
        let mut critical: Vec<String> = Vec::new();
        let mut earliest_latest = u64::MAX;
        let mut complete: Vec<DiskRecord> = Vec::new();
        for r in &self.catalog.disks_of(rec).await {
            if r.state == DiskState::Complete {
                complete.push(r.clone());
            }
            let (received, (stored_bytes, deduplicated_bytes)) = match r.state {
                DiskState::Complete => (
                    r.stats.blocks,
                    (r.stats.stored_bytes, r.stats.deduplicated_bytes),
                ),
                DiskState::Receiving => (
                    self.ingest.received_count(&r.vm_id, &r.disk_id).await,
                    self.ingest.written(&r.vm_id, &r.disk_id).await,
                ),
            };
            done += received.min(r.stats.blocks);
            total += r.stats.blocks;
            dv.push(disk_view(r, received, (stored_bytes, deduplicated_bytes)));
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
        let mut damage_warning = None;
        if complete.len() == rec.spec.disks.len() {
            match self.replicas.damage().health(&rec.name, &complete).await {
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
        reasons.extend(unmapped_nic_warnings(
            &rec.spec.nics,
            self.catalog.mapped_networks(),
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
        let key = crate::vault::layout::record(
            crate::vault::layout::Family::Failover,
            &self.catalog.vm_id(vm),
        );
        let rec = self
            .catalog
            .vault()
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
