//! Choosing the recovery point a failover materializes.

use std::time::Duration;

use super::service::Failovers;
use crate::error::{Error, Result};

impl Failovers {
    /// Planned failover: every disk's newest log must be flagged final; wait for it, telling
    /// the job which disks are still missing theirs, until `wait` ends or an operator cancels.
    pub(super) async fn wait_final(
        &self,
        vm: &str,
        job: &str,
        wait: Duration,
    ) -> Result<crate::protection::points::PointView> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut told: Option<String> = None;
        loop {
            let points = self.protection.points(vm).await?;
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
                let total = self
                    .protection
                    .vm_for(None, vm)
                    .await?
                    .spec
                    .disks
                    .len()
                    .max(1);
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
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::Conflict {
                    code: "final_log_timeout",
                    message: format!("planned failover of VM {vm}: the final log (sent with --final after the VM shut down) of {} did not arrive within {} s", missing.join(", "), wait.as_secs()),
                    recoverable: true,
                });
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// The VM's disks whose newest log is not flagged final.
    async fn disks_without_final_log(&self, vm: &str) -> Result<Vec<String>> {
        let rec = self.protection.vm_for(None, vm).await?;
        let mut out = Vec::new();
        for d in &rec.spec.disks {
            let (_, disk) = self.protection.disk_for(None, vm, &d.id).await?;
            if !disk.journal.last().is_some_and(|e| e.final_log) {
                out.push(d.id.clone());
            }
        }
        Ok(out)
    }
}
