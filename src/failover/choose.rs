//! Step 1 of a failover: choosing the recovery point. A planned failover waits (job state
//! "waiting for input") until every disk's final log is in; the others resolve the requested
//! point. A point verify found damaged is refused. Every disk's reader is taken here, which
//! pins the point: from then on a merge cannot take it away.

use std::time::Duration;

use super::definition::FailoverKind;
use super::service::{FailoverRequest, Failovers};
use crate::catalog::VmRecord;
use crate::error::{Error, Result};
use crate::jobs::JobState;
use crate::replica::points::{PinnedReader, PointView};

/// The point a failover materializes, with the VM as it stands and every disk's reader (in
/// the spec's disk order).
pub(super) struct Chosen {
    pub point: PointView,
    pub vm: VmRecord,
    pub readers: Vec<PinnedReader>,
}

impl Failovers {
    /// The point a test or unplanned failover asks for, refused when verify found it damaged
    /// (checked when the failover starts, so an impossible request fails before a job).
    pub(super) async fn requested_point(
        &self,
        vm: &str,
        req: &FailoverRequest,
    ) -> Result<PointView> {
        let p = self
            .replicas
            .resolve_point(vm, req.point.as_deref().unwrap_or("latest"))
            .await?;
        self.replicas.refuse_damaged(vm, None, p.cycle).await?;
        Ok(p)
    }

    /// Step 1: the point, and every disk's reader at it.
    pub(super) async fn choose_point(
        &self,
        vm: &str,
        req: &FailoverRequest,
        job: &str,
    ) -> Result<Chosen> {
        let point = if req.kind == FailoverKind::Planned {
            self.jobs
                .modify(job, |j| j.state = JobState::WaitingForInput)
                .await?;
            let wait = req
                .wait_s
                .map(Duration::from_secs)
                .unwrap_or(self.planned_wait);
            self.cancelled
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(vm);
            let p = self.wait_final(vm, job, wait).await?;
            self.jobs
                .modify(job, |j| {
                    j.state = JobState::Running;
                    j.waiting_for = None;
                })
                .await?;
            p
        } else {
            self.replicas
                .resolve_point(vm, req.point.as_deref().unwrap_or("latest"))
                .await?
        };
        self.replicas.refuse_damaged(vm, None, point.cycle).await?;
        let mut vmrec = self.catalog.vm_for(None, vm).await?;
        // The disks of the point, which a disk added or removed since makes differ from the
        // VM's current list; each at its size at the point.
        let mut disks = Vec::new();
        let mut readers = Vec::new();
        for d in self.catalog.point_disks(&vmrec, point.cycle).await {
            let reader = self.replicas.point_reader(vm, &d.disk, point.cycle).await?;
            disks.push(crate::catalog::DiskSpec {
                id: d.disk.clone(),
                size: reader.size(),
            });
            readers.push(reader);
        }
        vmrec.spec.disks = disks;
        self.jobs
            .step(job, "Choose recovery point", JobState::Succeeded)
            .await?;
        Ok(Chosen {
            point,
            vm: vmrec,
            readers,
        })
    }

    /// Planned failover: every disk's newest log must be flagged final; wait for it, telling
    /// the job which disks are still missing theirs, until `wait` ends or an operator cancels.
    async fn wait_final(&self, vm: &str, job: &str, wait: Duration) -> Result<PointView> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut told: Option<String> = None;
        loop {
            let points = self.replicas.points(vm).await?;
            if let Some(p) = points.iter().rev().find(|p| p.final_point) {
                return Ok(p.clone());
            }
            let missing = self.disks_without_final_log(vm).await?;
            let text = format!(
                "the final log (sent with --final after the source VM shut down) of {} {}; waiting up to {} s",
                if missing.len() == 1 { "disk" } else { "disks" },
                missing.join(", "),
                wait.as_secs()
            );
            if told.as_deref() != Some(text.as_str()) {
                let total = self.catalog.vm_for(None, vm).await?.spec.disks.len().max(1);
                let done = total.saturating_sub(missing.len());
                let t = text.clone();
                self.jobs
                    .modify(job, move |j| {
                        j.waiting_for = Some(t.clone());
                        j.progress = 0.1 * done as f64 / total as f64;
                    })
                    .await?;
                told = Some(text);
            }
            let cancelled = self
                .cancelled
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(vm);
            if cancelled {
                return Err(Error::conflict(
                    "failover_cancelled",
                    format!("planned failover of VM {vm} cancelled while it waited for the final logs of {}", missing.join(", ")),
                ));
            }
            if self.tasks.is_cancelled() {
                return Err(stopping(vm));
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::Conflict {
                    code: "final_log_timeout",
                    message: format!("planned failover of VM {vm}: the final log (sent with --final after the VM shut down) of {} did not arrive within {} s", missing.join(", "), wait.as_secs()),
                    recoverable: true,
                });
            }
            tokio::select! {
                _ = self.tasks.cancelled() => return Err(stopping(vm)),
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    }

    /// The VM's disks whose newest log is not flagged final.
    async fn disks_without_final_log(&self, vm: &str) -> Result<Vec<String>> {
        let rec = self.catalog.vm_for(None, vm).await?;
        let mut out = Vec::new();
        for d in &rec.spec.disks {
            let (_, disk) = self.catalog.disk_for(None, vm, &d.id).await?;
            if !disk.journal.last().is_some_and(|e| e.final_log) {
                out.push(d.id.clone());
            }
        }
        Ok(out)
    }
}

/// A planned failover still waiting for the final logs when the server stops ends as a restart
/// would end it (nothing was written yet), rather than hold the shutdown for its whole wait.
fn stopping(vm: &str) -> Error {
    Error::conflict_recoverable(
        "interrupted",
        format!("the server stopped while the planned failover of VM {vm} waited for the final logs; run it again"),
    )
}
