//! `drvault plan`: create and list recovery plans.

use anyhow::{bail, Result};
use clap::Subcommand;

use super::operator::Conn;
use crate::wire::{Plan, PlanGroup};

#[derive(Subcommand)]
pub(super) enum PlanCmd {
    /// Create a plan: --group VM,VM --group VM … (groups fail over in this order).
    Create {
        name: String,
        #[arg(long = "group", required = true)]
        groups: Vec<String>,
        /// N:COMMAND run before group N (1-based); a failure stops the plan.
        #[arg(long = "pre")]
        pre: Vec<String>,
        /// N:COMMAND run after group N.
        #[arg(long = "post")]
        post: Vec<String>,
        /// Pause before group N for a manual action (`drvault jobs resume ID`).
        #[arg(long = "pause")]
        pause: Vec<usize>,
    },
    List {
        #[arg(long)]
        json: bool,
    },
}

pub(super) async fn plan_cmd(cmd: PlanCmd, conn: Conn) -> Result<i32> {
    let c = conn.client()?;
    match cmd {
        PlanCmd::Create {
            name,
            groups,
            pre,
            post,
            pause,
        } => {
            let mut gs: Vec<PlanGroup> = groups
                .iter()
                .map(|g| PlanGroup {
                    vms: g
                        .split(',')
                        .map(|v| v.trim().to_string())
                        .filter(|v| !v.is_empty())
                        .collect(),
                    pre: None,
                    post: None,
                    pause_before: false,
                })
                .collect();
            let slot = |spec: &str, gs: &mut Vec<PlanGroup>| -> Result<(usize, String)> {
                let (n, cmd) = spec
                    .split_once(':')
                    .ok_or_else(|| anyhow::anyhow!("{spec:?}: expected N:COMMAND"))?;
                let n: usize = n
                    .parse()
                    .map_err(|_| anyhow::anyhow!("{spec:?}: {n:?} is not a group number"))?;
                if n == 0 || n > gs.len() {
                    bail!("{spec:?}: the plan has groups 1 to {}", gs.len());
                }
                Ok((n - 1, cmd.to_string()))
            };
            for p in &pre {
                let (i, cmd) = slot(p, &mut gs)?;
                gs[i].pre = Some(cmd);
            }
            for p in &post {
                let (i, cmd) = slot(p, &mut gs)?;
                gs[i].post = Some(cmd);
            }
            for &n in &pause {
                if n == 0 || n > gs.len() {
                    bail!("--pause {n}: the plan has groups 1 to {}", gs.len());
                }
                gs[n - 1].pause_before = true;
            }
            let p = c.create_plan(&Plan { name, groups: gs }).await?;
            println!("plan {} created with {} groups", p.name, p.groups.len());
        }
        PlanCmd::List { json } => {
            let plans = c.plans().await?;
            if json {
                super::print_json(&plans)?;
            } else {
                for p in &plans {
                    let groups: Vec<String> = p
                        .groups
                        .iter()
                        .map(|g| format!("[{}]", g.vms.join(",")))
                        .collect();
                    println!("{:<20} {}", p.name, groups.join(" -> "));
                }
            }
        }
    }
    Ok(0)
}
