//! `drvault failover`: start, follow, show, clean up, commit and cancel failovers of a VM or
//! a recovery plan.

use std::time::Duration;

use anyhow::{bail, Result};
use clap::Subcommand;

use super::jobs::wait_job;
use super::operator::Conn;
use crate::wire::{FailoverKind, FailoverRequest, JobState, NicOptions, PlanFailoverRequest};

#[derive(clap::Args)]
pub(super) struct FailoverStart {
    #[arg(long)]
    vm: Option<String>,
    /// Fail over a recovery plan instead of one VM (--point latest-common: the latest cycle
    /// every VM of the plan has).
    #[arg(long, conflicts_with = "vm")]
    plan: Option<String>,
    /// test (drill on the test network, VM keeps replicating), planned (waits for every disk's
    /// --final log: no data loss), unplanned (latest point now, or --point).
    #[arg(long, value_parser = ["test", "planned", "unplanned"])]
    kind: Option<String>,
    /// latest, latest-app, c<cycle>, or an RFC 3339 time.
    #[arg(long)]
    point: Option<String>,
    /// Per-NIC override INDEX:ip=ADDR and/or INDEX:public (a public address: a host port forward).
    #[arg(long = "nic")]
    nics: Vec<String>,
    /// Planned failover: how long the server waits for the final logs (default: the config's
    /// failover.planned_wait_s, 1 h). The command shows which disks it still waits for; Ctrl-C
    /// only stops following (the failover keeps waiting): `drvault failover cancel --vm VM`
    /// stops the wait.
    #[arg(long, value_parser = humantime::parse_duration)]
    wait: Option<Duration>,
    /// Return once the job started instead of following it.
    #[arg(long)]
    no_wait: bool,
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
pub(super) enum FailoverCmd {
    /// Delete what a test failover created and release its addresses (marks the drill done).
    Cleanup {
        #[arg(long)]
        vm: String,
    },
    /// End a planned or unplanned failover: the source's later logs are refused.
    Commit {
        #[arg(long)]
        vm: String,
    },
    /// Stop a planned failover that waits for the final logs (nothing is written; the VM
    /// stays protected).
    Cancel {
        #[arg(long)]
        vm: String,
    },
    /// The VM definition, disk paths, files written and the qemu command line.
    Show {
        #[arg(long)]
        vm: String,
        #[arg(long)]
        json: bool,
    },
}

fn parse_nic_option(s: &str) -> Result<(u32, NicOptions)> {
    let (idx, rest) = s
        .split_once(':')
        .ok_or_else(|| anyhow::anyhow!("--nic {s:?}: expected INDEX:ip=ADDR or INDEX:public"))?;
    let idx: u32 = idx
        .parse()
        .map_err(|_| anyhow::anyhow!("--nic {s:?}: {idx:?} is not a NIC index"))?;
    let mut o = NicOptions::default();
    for part in rest.split(',') {
        match part.split_once('=') {
            Some(("ip", v)) => {
                o.static_ip =
                    Some(v.parse().map_err(|_| {
                        anyhow::anyhow!("--nic {s:?}: {v:?} is not an IPv4 address")
                    })?)
            }
            None if part == "public" => o.public_ip = true,
            _ => bail!("--nic {s:?}: expected INDEX:ip=ADDR and/or INDEX:public"),
        }
    }
    Ok((idx, o))
}

pub(super) async fn failover_cmd(
    cmd: Option<FailoverCmd>,
    start: FailoverStart,
    conn: Conn,
) -> Result<i32> {
    let c = conn.client()?;
    match cmd {
        Some(FailoverCmd::Cleanup { vm }) => {
            let r = c.cleanup_failover(&vm).await?;
            println!(
                "test failover {} of {vm} cleaned up; drill successful: {}",
                r.id,
                r.drill_successful.unwrap_or(false)
            );
            Ok(0)
        }
        Some(FailoverCmd::Commit { vm }) => {
            let r = c.commit_failover(&vm).await?;
            println!(
                "failover {} of {vm} committed at point {}",
                r.id,
                r.point.unwrap_or_default()
            );
            Ok(0)
        }
        Some(FailoverCmd::Cancel { vm }) => {
            let r = c.cancel_failover(&vm).await?;
            println!(
                "planned failover {} of {vm}: stops waiting for the final logs",
                r.id
            );
            Ok(0)
        }
        Some(FailoverCmd::Show { vm, json }) => {
            let v = c.failover(&vm).await?;
            if json {
                super::print_json(&v)?;
            } else {
                let r = &v.record;
                println!(
                    "failover {} of {}: {:?} {:?} at point {}",
                    r.id,
                    r.vm,
                    r.kind,
                    r.state,
                    r.point.as_deref().unwrap_or("-")
                );
                println!("  output     {}", r.output_dir);
                if let Some(d) = &v.definition {
                    println!(
                        "  firmware   {:?}, {} CPUs, {} MiB",
                        d.firmware, d.cpus, d.memory_mib
                    );
                    for disk in &d.disks {
                        println!(
                            "  disk       {} {} ({} bytes{})",
                            disk.id,
                            disk.path,
                            disk.virtual_size,
                            if disk.padded_to_mib {
                                ", padded to whole MiB"
                            } else {
                                ""
                            }
                        );
                    }
                    for n in &d.nics {
                        println!(
                            "  nic        {} on {}/{} ip {}/{} gw {} ({:?})",
                            n.mac, n.network, n.subnet, n.ip, n.prefix_len, n.gateway, n.rule
                        );
                    }
                }
                for f in &r.files {
                    println!("  file       {f}");
                }
                if v.qemu_command.is_some() {
                    println!(
                        "  boot with  sh {}/qemu.sh   (NICs on the bridges `drvault network up` makes; DRVAULT_NET=user: qemu's user-mode network)",
                        r.output_dir
                    );
                }
                if let Some(why) = &v.qemu_unavailable {
                    println!("  qemu.sh    not written: {why}");
                }
                if let Some(e) = &r.error {
                    println!("  error      {e}");
                }
            }
            Ok(0)
        }
        None if start.plan.is_some() => {
            let plan = start.plan.unwrap_or_default();
            let kind = start
                .kind
                .ok_or_else(|| anyhow::anyhow!("--kind test|planned|unplanned is required"))?;
            let req = PlanFailoverRequest {
                kind: failover_kind(&kind)?,
                point: start.point.clone(),
            };
            let s = c.start_plan(&plan, &req).await?;
            if start.no_wait {
                println!("plan {plan} {kind} failover started: job {}", s.job);
                return Ok(0);
            }
            let job = wait_job(&c, &s.job).await?;
            for st in &job.steps {
                println!("  {:<18} {}", st.state.as_str(), st.name);
            }
            if job.state != JobState::Succeeded {
                return Err(super::JobFailed::new(format!("plan {plan}"), &job).into());
            }
            println!("plan {plan}: {kind} failover succeeded");
            Ok(0)
        }
        None => {
            let vm = start.vm.ok_or_else(|| {
                anyhow::anyhow!(
                    "--vm or --plan is required (or a subcommand: cleanup, commit, show)"
                )
            })?;
            let kind = start
                .kind
                .ok_or_else(|| anyhow::anyhow!("--kind test|planned|unplanned is required"))?;
            let mut nics = std::collections::BTreeMap::new();
            for n in &start.nics {
                let (i, o) = parse_nic_option(n)?;
                nics.insert(i, o);
            }
            let req = FailoverRequest {
                kind: failover_kind(&kind)?,
                point: start.point.clone(),
                nics,
                wait_s: start.wait.map(|d| d.as_secs()),
            };
            let r = c.start_failover(&vm, &req).await?;
            if start.no_wait {
                println!("{kind} failover {} of {vm} started: job {}", r.id, r.job);
                return Ok(0);
            }
            let job = wait_job(&c, &r.job).await?;
            let v = c.failover(&vm).await?;
            if start.json {
                super::print_json(&v)?;
            } else if job.state == JobState::Succeeded {
                println!(
                    "{kind} failover of {vm} succeeded at point {} -> {}",
                    v.record.point.as_deref().unwrap_or("-"),
                    v.record.output_dir
                );
            }
            if job.state != JobState::Succeeded {
                let what = format!("{kind} failover of {vm}");
                return Err(super::JobFailed::new(what, &job).into());
            }
            Ok(0)
        }
    }
}

/// `--kind` (clap admits only these three words).
fn failover_kind(kind: &str) -> Result<FailoverKind> {
    Ok(match kind {
        "test" => FailoverKind::Test,
        "planned" => FailoverKind::Planned,
        "unplanned" => FailoverKind::Unplanned,
        other => bail!("--kind {other:?}: expected test, planned or unplanned"),
    })
}
