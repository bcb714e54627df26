//! `drvault vms` and `drvault vm`: protected VMs, their policy and NIC overrides.

use std::time::Duration;

use anyhow::Result;
use clap::Subcommand;

use super::operator::Conn;
use crate::protection::VmView;

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
    /// Set the replication interval, retention window or app-consistent frequency.
    Set {
        name: String,
        /// Replication interval: 30s, 5m or 15m.
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
        Some(n) => vec![c.get_json(&format!("/v1/vms/{n}")).await?],
        None => c.get_json("/v1/vms").await?,
    };
    if json {
        let v = if name.is_some() {
            serde_json::to_value(&list[0])?
        } else {
            serde_json::to_value(&list)?
        };
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(0);
    }
    // A failover in progress or not yet committed says so instead of `protected`.
    let states = list
        .iter()
        .map(|v| match &v.failover {
            Some(f) => Ok(f.summary.clone()),
            None => Ok(serde_json::to_value(v.state)?
                .as_str()
                .unwrap_or("")
                .to_string()),
        })
        .collect::<Result<Vec<String>>>()?;
    let sw = states.iter().map(|s| s.len()).max().unwrap_or(0).max(20);
    println!(
        "{:<20} {:<sw$} {:<8} {:<12} {:>6} {:>9}  REASONS",
        "VM", "STATE", "HEALTH", "HOST", "DISKS", "PROGRESS"
    );
    for (v, state) in list.iter().zip(&states) {
        println!(
            "{:<20} {:<sw$} {:<8} {:<12} {:>6} {:>8.1}%  {}",
            v.name,
            state,
            format!("{:?}", v.health),
            v.owner,
            v.disks.len(),
            v.progress * 100.0,
            v.health_reasons.join("; ")
        );
        if name.is_some() {
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
