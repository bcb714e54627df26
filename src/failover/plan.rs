//! Recovery plans: fail over groups of VMs in order (the seed's "recovery plans to orchestrate
//! failover of multiple machines"). VMs of a group fail over in parallel; a group may run a
//! command before and after it (on the server host, as the server's user: operator-defined) and
//! may pause for a manual action until `drvault jobs resume ID`. A VM that fails fails its
//! group and stops the plan with a report naming it; later groups are not started.

use std::collections::BTreeSet;
use std::time::Duration;

use super::definition::FailoverKind;
use super::service::{FailoverRequest, FailoverState, Failovers};
use crate::catalog::Catalog;
use crate::error::{Error, Result};
use crate::jobs::{JobKind, JobState, Jobs};
use crate::replica::Replicas;
use crate::tasks::Tasks;
use crate::vault::layout::{self, Family};
use crate::vault::registry::valid_name;
use crate::vault::Vault;
pub use crate::wire::{Plan, PlanFailoverRequest, PlanGroup};

/// Most VMs in one plan.
pub const MAX_PLAN_VMS: usize = 100;

#[derive(Clone)]
pub struct Plans {
    vault: Vault,
    catalog: Catalog,
    replicas: Replicas,
    jobs: Jobs,
    failovers: Failovers,
    /// The server's background runner: plan runs are its tasks, so shutdown waits for them.
    tasks: Tasks,
}

impl Plans {
    pub fn new(
        vault: Vault,
        catalog: Catalog,
        replicas: Replicas,
        jobs: Jobs,
        failovers: Failovers,
        tasks: Tasks,
    ) -> Plans {
        Plans {
            vault,
            catalog,
            replicas,
            jobs,
            failovers,
            tasks,
        }
    }

    fn key(&self, name: &str) -> crate::store::Key {
        layout::record(
            Family::Plan,
            &self
                .vault
                .keys()
                .ident(crate::file_formats::IDENT_PLAN, name),
        )
    }

    pub async fn create(&self, plan: Plan) -> Result<Plan> {
        if !valid_name(&plan.name) {
            return Err(Error::invalid(
                "invalid_name",
                format!("plan name {:?} is not valid", plan.name),
            ));
        }
        if plan.groups.is_empty() {
            return Err(Error::invalid(
                "invalid_plan",
                "a plan needs at least one group",
            ));
        }
        let mut seen = BTreeSet::new();
        for (i, g) in plan.groups.iter().enumerate() {
            if g.vms.is_empty() {
                return Err(Error::invalid(
                    "invalid_plan",
                    format!("group {} has no VMs", i + 1),
                ));
            }
            for vm in &g.vms {
                self.catalog.vm_for(None, vm).await?;
                if !seen.insert(vm.clone()) {
                    return Err(Error::invalid(
                        "invalid_plan",
                        format!("VM {vm} appears twice in the plan"),
                    ));
                }
            }
        }
        if seen.len() > MAX_PLAN_VMS {
            return Err(Error::invalid(
                "invalid_plan",
                format!("{} VMs: a plan holds at most {MAX_PLAN_VMS}", seen.len()),
            ));
        }
        if !self
            .vault
            .records
            .create(&self.key(&plan.name), &plan)
            .await?
        {
            return Err(Error::conflict(
                "plan_exists",
                format!("plan {} already exists", plan.name),
            ));
        }
        let n = plan.name.clone();
        self.vault
            .records
            .update(
                &layout::record(Family::Plan, "index"),
                |cur: Option<&Vec<String>>| {
                    let mut v = cur.cloned().unwrap_or_default();
                    if v.contains(&n) {
                        return Ok(None);
                    }
                    v.push(n.clone());
                    Ok(Some(v))
                },
            )
            .await?;
        Ok(plan)
    }

    pub async fn get(&self, name: &str) -> Result<Plan> {
        self.vault
            .records
            .load::<Plan>(&self.key(name))
            .await?
            .map(|v| v.value)
            .ok_or_else(|| Error::not_found("plan_not_found", format!("no recovery plan {name}")))
    }

    pub async fn list(&self) -> Result<Vec<Plan>> {
        let names: Vec<String> = self
            .vault
            .records
            .load::<Vec<String>>(&layout::record(Family::Plan, "index"))
            .await?
            .map(|v| v.value)
            .unwrap_or_default();
        let mut out = Vec::new();
        for n in names {
            if let Ok(p) = self.get(&n).await {
                out.push(p);
            }
        }
        Ok(out)
    }

    /// Starts a plan's failover as a job; returns the job id.
    pub async fn start(&self, name: &str, req: PlanFailoverRequest) -> Result<String> {
        let plan = self.get(name).await?;
        let point = match req.point.as_deref() {
            Some("latest-common") => Some(self.latest_common(&plan).await?),
            other => other.map(String::from),
        };
        let mut steps = Vec::new();
        for (i, g) in plan.groups.iter().enumerate() {
            if g.pause_before {
                steps.push(format!("Group {}: manual action", i + 1));
            }
            if g.pre.is_some() {
                steps.push(format!("Group {}: pre command", i + 1));
            }
            steps.push(format!("Group {}: fail over {}", i + 1, g.vms.join(", ")));
            if g.post.is_some() {
                steps.push(format!("Group {}: post command", i + 1));
            }
        }
        let refs: Vec<&str> = steps.iter().map(String::as_str).collect();
        let job = self
            .jobs
            .create(JobKind::RecoveryPlan, None, &refs, JobState::Running)
            .await?;
        let me = self.clone();
        let jid = job.id.clone();
        self.tasks.spawn("recovery plan", async move {
            match me.run(&plan, req.kind, point, &jid).await {
                Ok(()) => {
                    let _ = me.jobs.succeed(&jid).await;
                }
                Err(e) => {
                    let _ = me.jobs.fail(&jid, &e).await;
                }
            }
        });
        Ok(job.id)
    }

    async fn latest_common(&self, plan: &Plan) -> Result<String> {
        let mut common: Option<BTreeSet<u64>> = None;
        for g in &plan.groups {
            for vm in &g.vms {
                let cycles: BTreeSet<u64> = self
                    .replicas
                    .points(vm)
                    .await?
                    .iter()
                    .map(|p| p.cycle)
                    .collect();
                common = Some(match common {
                    None => cycles,
                    Some(c) => c.intersection(&cycles).copied().collect(),
                });
            }
        }
        common
            .and_then(|c| c.last().copied())
            .map(|c| format!("c{c}"))
            .ok_or_else(|| {
                Error::not_found(
                    "point_not_found",
                    format!("the VMs of plan {} share no recovery point", plan.name),
                )
            })
    }

    async fn run(
        &self,
        plan: &Plan,
        kind: FailoverKind,
        point: Option<String>,
        job: &str,
    ) -> Result<()> {
        let total = plan.groups.len() as f64;
        for (i, g) in plan.groups.iter().enumerate() {
            let n = i + 1;
            if g.pause_before {
                self.jobs
                    .modify(job, |j| j.state = JobState::WaitingForInput)
                    .await?;
                while !self.jobs.take_resume(job).await {
                    // A plan paused for a manual action ends as a restart would end it, rather
                    // than hold the shutdown until someone resumes it.
                    tokio::select! {
                        _ = self.tasks.cancelled() => {
                            return Err(Error::conflict_recoverable(
                                "interrupted",
                                format!("the server stopped while plan {} waited for a manual action before group {n}; run it again", plan.name),
                            ))
                        }
                        _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                    }
                }
                self.jobs
                    .modify(job, |j| j.state = JobState::Running)
                    .await?;
                self.jobs
                    .step(
                        job,
                        &format!("Group {n}: manual action"),
                        JobState::Succeeded,
                    )
                    .await?;
            }
            if let Some(cmd) = &g.pre {
                run_command(cmd, &format!("group {n} pre command")).await?;
                self.jobs
                    .step(job, &format!("Group {n}: pre command"), JobState::Succeeded)
                    .await?;
            }
            let mut started = Vec::new();
            let mut failures = Vec::new();
            for vm in &g.vms {
                let req = FailoverRequest {
                    kind,
                    point: point.clone(),
                    nics: Default::default(),
                    wait_s: None,
                };
                match self.failovers.start(vm, req).await {
                    Ok(r) => started.push((vm.clone(), r.id)),
                    Err(e) => failures.push(format!("{vm}: {e}")),
                }
            }
            for (vm, id) in started {
                loop {
                    let cur = self.failovers.current(&vm).await?;
                    match cur {
                        Some(r) if r.id == id && r.state == FailoverState::Running => {
                            tokio::time::sleep(Duration::from_millis(200)).await
                        }
                        Some(r) if r.id == id && r.state == FailoverState::Failed => {
                            failures.push(format!("{vm}: {}", r.error.unwrap_or_default()));
                            break;
                        }
                        _ => break,
                    }
                }
            }
            if !failures.is_empty() {
                self.jobs
                    .step(
                        job,
                        &format!("Group {n}: fail over {}", g.vms.join(", ")),
                        JobState::Failed,
                    )
                    .await?;
                return Err(Error::conflict(
                    "plan_group_failed",
                    format!(
                        "plan {} stopped at group {n}: {}",
                        plan.name,
                        failures.join("; ")
                    ),
                ));
            }
            self.jobs
                .step(
                    job,
                    &format!("Group {n}: fail over {}", g.vms.join(", ")),
                    JobState::Succeeded,
                )
                .await?;
            if let Some(cmd) = &g.post {
                run_command(cmd, &format!("group {n} post command")).await?;
                self.jobs
                    .step(
                        job,
                        &format!("Group {n}: post command"),
                        JobState::Succeeded,
                    )
                    .await?;
            }
            self.jobs.set_progress(job, n as f64 / total).await;
        }
        Ok(())
    }
}

async fn run_command(cmd: &str, what: &str) -> Result<()> {
    let out = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| {
            Error::conflict(
                "plan_command_failed",
                format!("{what} could not start: {e}"),
            )
        })?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(Error::conflict(
            "plan_command_failed",
            format!("{what} `{cmd}` exited with {}: {}", out.status, err.trim()),
        ));
    }
    Ok(())
}
