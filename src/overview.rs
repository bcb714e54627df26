//! What the API shows of a VM: its records, with the progress of initial replication, the open
//! resync session, registered damage, a failover in progress and what its host's agent last
//! reported, and the health that follows from them. It reads every service and changes none;
//! nothing below the API depends on it.
//!
//! Health is the worst level among the VM's findings, each with a reason and a machine code.
//! The rules that depend on time are pure functions of their inputs and `now` ([`agent_findings`],
//! [`rpo_finding`], [`app_consistent_finding`]), so they are tested without a clock.

use crate::catalog::spec::unmapped_nic_warnings;
use crate::catalog::{
    disk_view, Catalog, DiskRecord, DiskState, DiskView, FailoverBrief, Health, ResyncBrief,
    VmRecord, VmState, VmView,
};
use crate::contact::{Contacts, HostContact};
use crate::error::{Error, Result};
use crate::ingest::Ingest;
use crate::replica::resync::{ResyncSession, Resyncs};
use crate::replica::Replicas;
use crate::wire::{AgentBrief, HealthFinding, Policy};

/// The health thresholds the server configuration sets (`[health]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthSettings {
    /// "Host not reporting" is Critical after 10 heartbeat intervals, but never sooner than this
    /// many seconds (the seed's 15 minutes; tests and labs lower it).
    pub not_reporting_critical_floor_s: u64,
}

impl Default for HealthSettings {
    fn default() -> HealthSettings {
        HealthSettings {
            not_reporting_critical_floor_s: 15 * 60,
        }
    }
}

/// Margin added to a policy's interval in its RPO limit: shipping a cycle's logs takes time
/// however short the interval.
pub const RPO_MARGIN_S: u64 = 30;

/// The policy's RPO limit: a point may be two intervals old when all is well (the cycle that
/// will replace it is being shipped), and at least the interval plus [`RPO_MARGIN_S`].
pub fn rpo_limit_s(policy: &Policy) -> u64 {
    (2 * policy.interval_s).max(policy.interval_s + RPO_MARGIN_S)
}

fn finding(level: Health, code: &str, reason: String) -> HealthFinding {
    HealthFinding {
        level,
        code: code.to_string(),
        reason,
    }
}

/// How long a host may stay silent before it is "not reporting" (Critical): 10 of its
/// intervals, at least the configured floor.
pub fn not_reporting_after_s(contact: &HostContact, settings: HealthSettings) -> u64 {
    (10 * contact.interval_s.max(1)).max(settings.not_reporting_critical_floor_s)
}

/// What the heartbeats of the VM's host say at `now`: a host silent for 2 intervals is
/// Warning, for 10 intervals (at least the configured floor) Critical; a VM whose replication
/// the agent stopped with a non-recoverable error is Critical with that error's code.
pub fn agent_findings(
    host: &str,
    contact: &HostContact,
    vm: &str,
    now: u64,
    settings: HealthSettings,
) -> Vec<HealthFinding> {
    let mut out = Vec::new();
    let interval = contact.interval_s.max(1);
    let silent = now.saturating_sub(contact.last_contact_unix);
    let critical_after = not_reporting_after_s(contact, settings);
    if silent > critical_after {
        out.push(finding(
            Health::Critical,
            "host_not_reporting",
            format!("host {host} not reporting: no heartbeat for {silent} s (Critical after {critical_after} s; its agent reports every {interval} s)"),
        ));
    } else if silent > 2 * interval {
        out.push(finding(
            Health::Warning,
            "host_late",
            format!("host {host} is late: no heartbeat for {silent} s (its agent reports every {interval} s)"),
        ));
    }
    if let Some(report) = contact.vms.get(vm) {
        match &report.last_error {
            Some(f) if !f.recoverable => out.push(finding(
                Health::Critical,
                &f.code,
                format!(
                    "replication stopped on host {host} by a non-recoverable error ({}): {}",
                    f.code, f.message
                ),
            )),
            _ if !report.replicating => out.push(finding(
                Health::Critical,
                "replication_stopped",
                format!("host {host} reports that replication of VM {vm} is stopped"),
            )),
            _ => {}
        }
    }
    out
}

/// RPO `rpo_s` against the policy: above its limit ([`rpo_limit_s`]) Warning, above 3x the
/// limit Critical.
pub fn rpo_finding(rpo_s: u64, policy: &Policy) -> Option<HealthFinding> {
    let limit = rpo_limit_s(policy);
    if rpo_s > 3 * limit {
        Some(finding(
            Health::Critical,
            "rpo_critical",
            format!(
                "RPO {rpo_s} s is more than 3 times the policy's limit of {limit} s (interval {} s)",
                policy.interval_s
            ),
        ))
    } else if rpo_s > limit {
        Some(finding(
            Health::Warning,
            "rpo_exceeded",
            format!(
                "RPO {rpo_s} s exceeds the policy's limit of {limit} s (interval {} s)",
                policy.interval_s
            ),
        ))
    } else {
        None
    }
}

/// `age_s`: seconds since the VM's newest app-consistent point (or since protection completed
/// when it has none). Warning past twice the policy's app-consistent frequency; no finding when
/// the policy asks for none.
pub fn app_consistent_finding(age_s: u64, policy: &Policy) -> Option<HealthFinding> {
    let every = policy.app_consistent_every_s;
    (every > 0 && age_s > 2 * every).then(|| {
        finding(
            Health::Warning,
            "app_consistent_overdue",
            format!(
                "no app-consistent point for {age_s} s (the policy asks for one every {every} s)"
            ),
        )
    })
}

/// The newest time every disk has an app-consistent point by (the oldest of the disks' newest
/// app-consistent points), if every disk has one.
fn latest_app_consistent(disks: &[DiskRecord]) -> Option<u64> {
    disks
        .iter()
        .map(|d| {
            d.journal
                .iter()
                .rev()
                .find(|e| e.app_consistent)
                .map(|e| e.accepted_unix)
                .or((d.base_point.app_consistent).then_some(d.base_point.time_unix))
        })
        .try_fold(u64::MAX, |acc, t| t.map(|t| acc.min(t)))
        .filter(|t| *t != u64::MAX)
}

/// What the VM view shows of an open resync session (and the heartbeat's directive).
pub fn resync_brief(s: &ResyncSession) -> ResyncBrief {
    ResyncBrief {
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
    }
}

/// What a host's last heartbeat says of one of its VMs.
pub fn agent_brief(host: &str, c: &HostContact, vm: &str, now: u64) -> AgentBrief {
    let report = c.vms.get(vm);
    let disks = report.map(|r| r.disks.clone()).unwrap_or_default();
    AgentBrief {
        host: host.to_string(),
        agent_version: c.agent_version.clone(),
        interval_s: c.interval_s,
        last_contact: crate::util::rfc3339(c.last_contact_unix),
        last_contact_age_s: now.saturating_sub(c.last_contact_unix),
        replicating: report.is_some_and(|r| r.replicating),
        backlog_bytes: disks.iter().map(|d| d.backlog_bytes).sum(),
        pending_logs: disks.iter().map(|d| d.pending_logs).sum(),
        disks,
        last_error: report.and_then(|r| r.last_error.clone()),
    }
}

/// Composes the services' state into VM views. Cheap to clone.
#[derive(Clone)]
pub struct Overview {
    catalog: Catalog,
    ingest: Ingest,
    replicas: Replicas,
    resyncs: Resyncs,
    contacts: Contacts,
    health: HealthSettings,
}

impl Overview {
    /// The health thresholds in force.
    pub fn health_settings(&self) -> HealthSettings {
        self.health
    }

    pub fn new(
        catalog: Catalog,
        ingest: Ingest,
        replicas: Replicas,
        resyncs: Resyncs,
        contacts: Contacts,
        health: HealthSettings,
    ) -> Overview {
        Overview {
            catalog,
            ingest,
            replicas,
            resyncs,
            contacts,
            health,
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
        let resync = open.as_ref().map(resync_brief);
        let now = crate::util::unix_now();
        let mut resyncing: Vec<HealthFinding> = Vec::new();
        let mut dv = Vec::new();
        let (mut done, mut total) = (0u64, 0u64);
        let mut critical: Vec<HealthFinding> = Vec::new();
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
                    Some(b) if b.disks.contains(&r.disk) => resyncing.push(finding(
                        Health::Warning,
                        "resync_under_way",
                        format!(
                            "disk {}: resynchronization {} ({reason})",
                            r.disk,
                            match (b.state.as_str(), &b.not_before) {
                                ("scheduled", Some(t)) => format!("scheduled for {t}"),
                                ("scheduled", None) => "scheduled".to_string(),
                                _ => "running".to_string(),
                            }
                        ),
                    )),
                    _ => critical.push(finding(
                        Health::Critical,
                        "resync_required",
                        format!("disk {}: resynchronization required: {reason}", r.disk),
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
                Some((Health::Critical, reason)) => {
                    critical.push(finding(Health::Critical, "no_restorable_point", reason))
                }
                Some((_, reason)) => {
                    damage_warning = Some(finding(Health::Warning, "points_damaged", reason))
                }
                None => {}
            }
        }
        let policy = rec.spec.policy.clone().unwrap_or_default();
        let protected = rec.state == VmState::Protected;
        // RPO: age of the newest point every disk has (the oldest of the disks' newest points).
        let rpo_s =
            (protected && earliest_latest != u64::MAX).then(|| now.saturating_sub(earliest_latest));
        let contact = self.contacts.host(&rec.owner);
        let mut findings = Vec::new();
        if let Some(c) = &contact {
            findings.extend(agent_findings(&rec.owner, c, &rec.name, now, self.health));
        }
        findings.extend(critical);
        findings.extend(resyncing);
        findings.extend(damage_warning);
        findings.extend(rpo_s.and_then(|r| rpo_finding(r, &policy)));
        if protected && complete.len() == rec.spec.disks.len() {
            let since = latest_app_consistent(&complete)
                .or(rec.protected_unix)
                .unwrap_or(rec.created_unix);
            findings.extend(app_consistent_finding(now.saturating_sub(since), &policy));
        }
        // From the configuration now, not the one at enable time: a mapping added since (and
        // a restart) clears the warning.
        findings.extend(
            unmapped_nic_warnings(&rec.spec.nics, self.catalog.mapped_networks())
                .into_iter()
                .map(|w| finding(Health::Warning, "network_unmapped", w)),
        );
        // Critical reasons first, each level in the order the rules ran.
        findings.sort_by_key(|f| std::cmp::Reverse(level_rank(f.level)));
        let health = findings
            .iter()
            .map(|f| f.level)
            .max_by_key(|l| level_rank(*l))
            .unwrap_or(Health::Normal);
        VmView {
            name: rec.name.clone(),
            owner: rec.owner.clone(),
            state: rec.state,
            health,
            health_reasons: findings.iter().map(|f| f.reason.clone()).collect(),
            health_findings: findings,
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
            agent: contact.map(|c| agent_brief(&rec.owner, &c, &rec.name, now)),
        }
    }

    /// The hosts' last heartbeats.
    pub fn contacts(&self) -> &Contacts {
        &self.contacts
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

fn level_rank(h: Health) -> u8 {
    match h {
        Health::Normal => 0,
        Health::Warning => 1,
        Health::Critical => 2,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::wire::{AgentFault, VmReport};

    fn contact(last: u64, interval_s: u64, report: Option<VmReport>) -> HostContact {
        HostContact {
            agent_version: "1".into(),
            interval_s,
            last_contact_unix: last,
            vms: report
                .into_iter()
                .map(|r| (r.vm.clone(), r))
                .collect::<BTreeMap<_, _>>(),
        }
    }

    fn report(replicating: bool, error: Option<(&str, bool)>) -> VmReport {
        VmReport {
            vm: "web".into(),
            replicating,
            disks: vec![],
            last_error: error.map(|(code, recoverable)| AgentFault {
                code: code.into(),
                message: "boom".into(),
                recoverable,
                at_unix: 1,
            }),
            last_cycle_unix: None,
        }
    }

    fn codes(f: &[HealthFinding]) -> Vec<(Health, String)> {
        f.iter().map(|f| (f.level, f.code.clone())).collect()
    }

    fn want(v: &[(Health, &str)]) -> Vec<(Health, String)> {
        v.iter().map(|(l, c)| (*l, c.to_string())).collect()
    }

    const FLOOR: HealthSettings = HealthSettings {
        not_reporting_critical_floor_s: 900,
    };

    #[test]
    fn a_silent_host_is_late_after_two_intervals_and_not_reporting_after_ten_or_the_floor() {
        let c = contact(1000, 60, None);
        let at = |now| codes(&agent_findings("hv", &c, "web", now, FLOOR));
        assert_eq!(at(1000), want(&[]));
        assert_eq!(
            at(1120),
            want(&[]),
            "exactly two intervals is still on time"
        );
        assert_eq!(at(1121), want(&[(Health::Warning, "host_late")]));
        // 10 intervals is 600 s, below the 900 s floor: Critical only past the floor.
        assert_eq!(at(1700), want(&[(Health::Warning, "host_late")]));
        assert_eq!(at(1901), want(&[(Health::Critical, "host_not_reporting")]));
        // Past the floor, 10 intervals rule: 300 s intervals → 3000 s.
        let slow = contact(1000, 300, None);
        let at = |now| codes(&agent_findings("hv", &slow, "web", now, FLOOR));
        assert_eq!(at(4000), want(&[(Health::Warning, "host_late")]));
        assert_eq!(at(4001), want(&[(Health::Critical, "host_not_reporting")]));
        // A lowered floor (tests, labs): 10 intervals of 1 s.
        let fast = contact(1000, 1, None);
        let low = HealthSettings {
            not_reporting_critical_floor_s: 5,
        };
        assert_eq!(
            codes(&agent_findings("hv", &fast, "web", 1003, low)),
            want(&[(Health::Warning, "host_late")])
        );
        assert_eq!(
            codes(&agent_findings("hv", &fast, "web", 1011, low)),
            want(&[(Health::Critical, "host_not_reporting")])
        );
    }

    #[test]
    fn a_non_recoverable_agent_error_is_critical_with_its_code() {
        let c = contact(1000, 5, Some(report(false, Some(("failed_over", false)))));
        let f = agent_findings("hv", &c, "web", 1001, FLOOR);
        assert_eq!(codes(&f), want(&[(Health::Critical, "failed_over")]));
        assert!(f[0].reason.contains("boom"), "{f:?}");
        // A recoverable one is being retried: no finding (it shows as the last error).
        let c = contact(1000, 5, Some(report(true, Some(("store_busy", true)))));
        assert_eq!(
            codes(&agent_findings("hv", &c, "web", 1001, FLOOR)),
            want(&[])
        );
        // Stopped without an error says so; another VM's report does not count.
        let c = contact(1000, 5, Some(report(false, None)));
        assert_eq!(
            codes(&agent_findings("hv", &c, "web", 1001, FLOOR)),
            want(&[(Health::Critical, "replication_stopped")])
        );
        assert_eq!(
            codes(&agent_findings("hv", &c, "db", 1001, FLOOR)),
            want(&[])
        );
    }

    #[test]
    fn rpo_is_measured_against_the_policys_limit() {
        let p = |interval_s| Policy {
            interval_s,
            retention_s: 86_400,
            app_consistent_every_s: 0,
        };
        assert_eq!(rpo_limit_s(&p(300)), 600);
        assert_eq!(rpo_limit_s(&p(1)), 31, "a margin for shipping the cycle");
        assert_eq!(rpo_finding(600, &p(300)), None);
        assert_eq!(rpo_finding(601, &p(300)).unwrap().code, "rpo_exceeded");
        assert_eq!(rpo_finding(1800, &p(300)).unwrap().level, Health::Warning);
        let c = rpo_finding(1801, &p(300)).unwrap();
        assert_eq!(
            (c.level, c.code.as_str()),
            (Health::Critical, "rpo_critical")
        );
    }

    #[test]
    fn an_overdue_app_consistent_point_is_a_warning() {
        let p = |every| Policy {
            interval_s: 30,
            retention_s: 86_400,
            app_consistent_every_s: every,
        };
        assert_eq!(app_consistent_finding(7200, &p(3600)), None);
        let w = app_consistent_finding(7201, &p(3600)).unwrap();
        assert_eq!(
            (w.level, w.code.as_str()),
            (Health::Warning, "app_consistent_overdue")
        );
        assert_eq!(
            app_consistent_finding(u64::MAX, &p(0)),
            None,
            "none asked for"
        );
    }
}
