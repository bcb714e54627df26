//! `drvault vms` and `drvault vm`: protected VMs, their policy and NIC overrides.

use std::time::Duration;

use anyhow::Result;
use clap::Subcommand;

use super::operator::Conn;
use crate::wire::{MergeRequest, NicOptions, PolicyChange, VmView};

#[derive(Subcommand)]
pub(super) enum VmCmd {
    /// Set a NIC's failover override (kept with the VM): target subnet, static target IP, a
    /// public address (host port forward), or do-not-create. --clear removes it.
    Nic {
        name: String,
        index: u32,
        /// Target network/subnet instead of the mapping's.
        #[arg(long)]
        target: Option<String>,
        /// Static target IP.
        #[arg(long)]
        ip: Option<std::net::Ipv4Addr>,
        /// Give the NIC a public address (a host port forward in the qemu command).
        #[arg(long)]
        public: bool,
        /// Do not create this NIC at failover.
        #[arg(long)]
        skip: bool,
        #[arg(long)]
        clear: bool,
    },
    /// Stop protecting a VM: agents' uploads are refused from now on. Its points stay readable
    /// (export) until the retention window passes, then its records are removed; with
    /// --delete-data they go now and its objects are garbage for the next `drvault gc`.
    /// Refused while a failover of the VM runs or waits for its commit.
    Disable {
        #[arg(long)]
        vm: String,
        #[arg(long)]
        delete_data: bool,
    },
    /// Set the replication interval, retention window or app-consistent frequency.
    Set {
        name: String,
        /// Replication interval: 1s up to 24h (e.g. 1s, 30s, 5m, 15m).
        #[arg(long, value_parser = humantime::parse_duration)]
        interval: Option<Duration>,
        /// How long recovery points are kept (any length, e.g. 24h, 7d).
        #[arg(long, value_parser = humantime::parse_duration)]
        retention: Option<Duration>,
        /// App-consistent snapshot frequency (0s = none).
        #[arg(long, value_parser = humantime::parse_duration)]
        app_consistent_every: Option<Duration>,
    },
}

pub(super) async fn vms(name: Option<String>, json: bool, conn: Conn) -> Result<i32> {
    let c = conn.client()?;
    let list: Vec<VmView> = match &name {
        Some(n) => vec![c.vm(n).await?],
        None => c.vms().await?,
    };
    if json {
        let v = if name.is_some() {
            serde_json::to_value(&list[0])?
        } else {
            serde_json::to_value(&list)?
        };
        super::print_json(&v)?;
        return Ok(0);
    }
    // A failover in progress or not yet committed says so instead of `protected`.
    let states = list
        .iter()
        .map(|v| match &v.failover {
            Some(f) => f.summary.clone(),
            None => v.state.as_str().to_string(),
        })
        .collect::<Vec<String>>();
    let sw = states.iter().map(|s| s.len()).max().unwrap_or(0).max(20);
    println!(
        "{:<20} {:<sw$} {:<8} {:<12} {:>6} {:>9} {:>13} {:>10}  REASONS",
        "VM", "STATE", "HEALTH", "HOST", "DISKS", "PROGRESS", "LAST CONTACT", "BACKLOG"
    );
    for (v, state) in list.iter().zip(&states) {
        // Hosts driven by hand send no heartbeats: nothing to show.
        let (contact, backlog) = match &v.agent {
            Some(a) => (
                format!("{} s ago", a.last_contact_age_s),
                crate::util::human_bytes(a.backlog_bytes),
            ),
            None => ("-".to_string(), "-".to_string()),
        };
        println!(
            "{:<20} {:<sw$} {:<8} {:<12} {:>6} {:>8.1}% {:>13} {:>10}  {}",
            v.name,
            state,
            format!("{:?}", v.health),
            v.owner,
            v.disks.len(),
            v.progress * 100.0,
            contact,
            backlog,
            v.health_findings
                .iter()
                .map(|f| format!("[{}] {}", f.code, f.reason))
                .collect::<Vec<_>>()
                .join("; ")
        );
        if name.is_some() {
            if let Some(a) = &v.agent {
                println!(
                    "  agent {} on host {}: last contact {} ({} s ago, reports every {} s), {}, backlog {} in {} log(s)",
                    a.agent_version,
                    a.host,
                    a.last_contact,
                    a.last_contact_age_s,
                    a.interval_s,
                    if a.replicating { "replicating" } else { "not replicating" },
                    crate::util::human_bytes(a.backlog_bytes),
                    a.pending_logs
                );
                if let Some(f) = &a.last_error {
                    println!(
                        "  last error: {} ({}): {}",
                        f.code,
                        if f.recoverable {
                            "recoverable, retried"
                        } else {
                            "not recoverable"
                        },
                        f.message
                    );
                }
            }
            for d in &v.disks {
                println!(
                    "  disk {:<16} {:>10}  {:?}  blocks {}/{} received, {} data, {} zero (block {} )",
                    d.id,
                    crate::util::human_bytes(d.size),
                    d.state,
                    d.blocks_received,
                    d.blocks,
                    d.data_blocks,
                    d.zero_blocks,
                    crate::util::human_bytes(d.block_size as u64)
                );
            }
            for n in &v.nics {
                println!(
                    "  nic  {} on {} ip {}",
                    n.mac,
                    n.network,
                    n.ip.as_deref().unwrap_or("-")
                );
            }
        }
    }
    Ok(0)
}

/// `drvault points`: a VM's recovery points.
pub(super) async fn points(vm: &str, json: bool, conn: Conn) -> Result<i32> {
    let c = conn.client()?;
    let points = c.points(vm).await?;
    if json {
        super::print_json(&points)?;
    } else {
        // TIME is the logs' own (the host's clock), ACCEPTED the server's.
        println!(
            "{:<8} {:<22} {:<22} {:<18} {:<6} {:<8} DISKS",
            "POINT", "TIME", "ACCEPTED", "KIND", "FINAL", "DAMAGED"
        );
        for p in &points {
            if p.is_incomplete() {
                println!(
                    "{:<8} {:<22} incomplete: waiting for {}{}",
                    p.id,
                    p.time,
                    p.waiting_for.join(", "),
                    if p.disks.is_empty() {
                        String::new()
                    } else {
                        format!(" (received: {})", p.disks.join(", "))
                    }
                );
                continue;
            }
            println!(
                "{:<8} {:<22} {:<22} {:<18} {:<6} {:<8} {}",
                p.id,
                p.time,
                p.accepted,
                p.kind,
                if p.final_point { "yes" } else { "" },
                if p.damaged { "yes" } else { "" },
                p.disks.join(",")
            );
            if let Some(d) = &p.damage {
                println!("         {d}");
            }
        }
    }
    Ok(0)
}

/// `drvault merge`: merge logs into the replica now.
pub(super) async fn merge(vm: &str, all: bool, through: Option<String>, conn: Conn) -> Result<i32> {
    let c = conn.client()?;
    let r = c.merge(vm, &MergeRequest { all, through }).await?;
    println!(
        "merged {} logs on {} disks: {} blocks rewritten, {} of logs freed",
        r.logs_merged,
        r.disks,
        r.blocks_rewritten,
        crate::util::human_bytes(r.log_bytes_freed)
    );
    Ok(0)
}

/// `drvault vm nic`: set or clear a NIC's failover override.
pub(super) async fn nic(
    name: &str,
    index: u32,
    options: NicOptions,
    clear: bool,
    conn: Conn,
) -> Result<i32> {
    let c = conn.client()?;
    if clear {
        c.clear_nic(name, index).await?;
        println!("NIC {index} of {name}: override removed");
    } else {
        c.set_nic(name, index, &options).await?;
        println!("NIC {index} of {name}: override set");
    }
    Ok(0)
}

/// `drvault vm set`: change a VM's replication policy.
pub(super) async fn set_policy(name: &str, change: &PolicyChange, conn: Conn) -> Result<i32> {
    let c = conn.client()?;
    let v = c.set_policy(name, change).await?;
    println!(
        "VM {}: interval {} s, retention {} s, app-consistent every {} s",
        v.name, v.policy.interval_s, v.policy.retention_s, v.policy.app_consistent_every_s
    );
    Ok(0)
}

pub(super) async fn disable(vm: &str, delete_data: bool, conn: Conn) -> Result<i32> {
    let c = conn.client()?;
    let r = c.disable_vm(vm, delete_data).await?;
    match (&r.expires, r.deleted) {
        (_, true) => println!(
            "protection of {vm} disabled and its records removed (job {}): run `drvault gc` to free its objects",
            r.job
        ),
        (Some(t), false) => println!(
            "protection of {vm} disabled (job {}): its points stay readable until {t}",
            r.job
        ),
        (None, false) => println!("protection of {vm} disabled (job {})", r.job),
    }
    Ok(0)
}
