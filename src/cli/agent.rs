//! `drvault agent`: the reference agent's commands (protect, replicate, resync, failback).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Subcommand;

use super::{console, resync, AgentConn, DiskFormatArg};
use crate::agent::backoff::Backoff;
use crate::wire::{NicSpec, Policy};

#[derive(Subcommand)]
pub(super) enum AgentCmd {
    /// Run the long-running host agent in the foreground: protect the VMs of the
    /// configuration (initial replication, resumed where it stopped), then ship change logs
    /// every policy interval, run app-consistent cycles between the pre-freeze and post-thaw
    /// hooks, run resync sessions the server opens, heartbeat, and retry with back-off.
    /// Structured logs on stderr (RUST_LOG sets levels). SIGTERM or SIGINT: stops starting
    /// new work, abandons the upload in flight (it is sent again by the next run), exits 0.
    /// config/agent.example.toml documents every field; config/drvault-agent.service runs it
    /// under systemd.
    Run {
        /// The agent configuration (TOML). Relative paths inside it are taken from its
        /// directory.
        #[arg(long)]
        config: PathBuf,
        /// Only check the configuration (disks exist and open, schedule parses), then exit.
        #[arg(long)]
        check: bool,
        /// Log as JSON lines (for collectors) instead of text.
        #[arg(long)]
        log_json: bool,
        /// Multiplies every back-off wait (1, 2, 4, 8, 10, then 30 minutes); for tests.
        #[arg(
            long,
            env = "DRVAULT_BACKOFF_SCALE",
            default_value_t = 1.0,
            hide = true
        )]
        backoff_scale: f64,
    },
    /// Resynchronize one disk of an open resync session: fetch the replica's checksums, compare
    /// with PATH, upload only differing 4 KiB pieces. Rerun to resume.
    Resync(resync::AgentResyncArgs),
    /// Bring an on-premises disk (PATH) up to date with the failed-over VM's disk, downloading
    /// only what differs (--full: everything). Rerun to resume.
    Failback(resync::AgentFailbackArgs),
    /// Send one disk's change log (MS-HRL) for a replication cycle.
    Replicate {
        #[command(flatten)]
        conn: AgentConn,
        #[arg(long)]
        vm: String,
        #[arg(long)]
        disk: String,
        #[arg(long)]
        hrl: PathBuf,
        /// Replication cycle (default: the disk's previous cycle + 1). Give every disk of a VM
        /// the same cycle so they form one VM recovery point.
        #[arg(long)]
        cycle: Option<u64>,
        /// The cycle was taken with an application-consistent snapshot.
        #[arg(long)]
        app_consistent: bool,
        /// The last log, sent after the source VM shut down (planned failover).
        #[arg(long = "final")]
        final_log: bool,
        #[arg(long)]
        json: bool,
    },
    /// Enable protection for a VM and replicate its disks in full (initial replication).
    /// Resumes where an interrupted run stopped.
    Protect {
        #[command(flatten)]
        conn: AgentConn,
        #[arg(long)]
        vm: String,
        /// A disk image (raw, VHD or VHDX, see --format), optionally with an id: PATH[:ID];
        /// the id defaults to the file name without extension. Repeat per disk.
        #[arg(long = "disk", required = true)]
        disks: Vec<String>,
        #[command(flatten)]
        format: DiskFormatArg,
        /// A NIC: network=NAME,mac=MAC[,ip=IP]. Repeat per NIC.
        #[arg(long = "nic")]
        nics: Vec<String>,
        /// VM generation: 1 (BIOS) or 2 (UEFI).
        #[arg(long, default_value_t = 2)]
        generation: u8,
        #[arg(long, default_value_t = 2)]
        cpus: u32,
        #[arg(long, default_value_t = 4096)]
        memory_mib: u64,
        /// Replication interval in seconds (1 to 86400; e.g. 30, 300 or 900).
        #[arg(long)]
        interval: Option<u64>,
        /// Recovery point retention (e.g. 24h, 7d).
        #[arg(long, value_parser = humantime::parse_duration)]
        retention: Option<Duration>,
        /// Block uploads in flight.
        #[arg(long, default_value_t = 4)]
        parallel: usize,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
}

pub(super) async fn agent(cmd: AgentCmd) -> Result<i32> {
    match cmd {
        AgentCmd::Run {
            config,
            check,
            log_json,
            backoff_scale,
        } => {
            super::init_logging("info", log_json);
            let cfg = crate::agent::run::config::AgentConfig::load(&config)?;
            if check {
                for vm in &cfg.vms {
                    for d in &vm.disks {
                        crate::agent::protect::open_disk(&d.path, Some(d.id.clone()), d.format)?;
                    }
                }
                println!(
                    "{}: {} VMs, configuration valid",
                    config.display(),
                    cfg.vms.len()
                );
                return Ok(0);
            }
            crate::agent::run::run(cfg, crate::agent::run::RunOptions { backoff_scale })
                .await
                .context("agent run")?;
            Ok(0)
        }
        AgentCmd::Replicate {
            conn,
            vm,
            disk,
            hrl,
            cycle,
            app_consistent,
            final_log,
            json,
        } => {
            let client = conn.client()?;
            let opts = crate::agent::replicate::ReplicateOptions {
                vm,
                disk,
                cycle,
                app_consistent,
                final_log,
                backoff: Backoff {
                    scale: conn.backoff_scale,
                    give_up_after: conn.give_up_after,
                },
            };
            let ack = crate::agent::replicate::replicate(&client, &hrl, &opts)
                .await
                .context("replicate")?;
            if json {
                super::print_json(&ack)?;
            } else {
                println!(
                    "log {} {} as cycle {} ({} logs pending, {}){}",
                    ack.log_id,
                    ack.status.replace('_', " "),
                    ack.cycle,
                    ack.journal_length,
                    crate::util::human_bytes(ack.pending_log_bytes),
                    ack.resync_required
                        .as_deref()
                        .map(|r| format!("; RESYNC REQUIRED: {r}"))
                        .unwrap_or_default()
                );
            }
            Ok(0)
        }
        AgentCmd::Resync(a) => resync::agent_resync(a).await,
        AgentCmd::Failback(a) => resync::agent_failback(a).await,
        AgentCmd::Protect {
            conn,
            vm,
            disks,
            nics,
            generation,
            cpus,
            memory_mib,
            interval,
            retention,
            parallel,
            json,
            format,
        } => {
            let client = conn.client()?;
            let mut sources = Vec::new();
            for d in &disks {
                let (path, id) = match d.rsplit_once(':') {
                    Some((p, id)) if !id.contains('/') => (PathBuf::from(p), Some(id.to_string())),
                    _ => (PathBuf::from(d), None),
                };
                sources.push(crate::agent::protect::open_disk(&path, id, format.format)?);
            }
            let nics = nics
                .iter()
                .map(|n| parse_nic(n))
                .collect::<Result<Vec<_>>>()?;
            let policy = match (interval, retention) {
                (None, None) => None,
                (i, r) => {
                    let d = Policy::default();
                    Some(Policy {
                        interval_s: i.unwrap_or(d.interval_s),
                        retention_s: r.map(|r| r.as_secs()).unwrap_or(d.retention_s),
                        ..d
                    })
                }
            };
            let opts = crate::agent::protect::ProtectOptions {
                vm,
                generation,
                cpus,
                memory_mib,
                nics,
                policy,
                parallel,
                backoff: Backoff {
                    scale: conn.backoff_scale,
                    give_up_after: conn.give_up_after,
                },
                progress: console() && !json,
                upload_latencies: None,
                throttle: None,
            };
            let summary = crate::agent::protect::protect(&client, &sources, &opts)
                .await
                .context("protect")?;
            if json {
                super::print_json(&summary)?;
            } else {
                println!(
                    "VM {}: {} ({:.1} s)",
                    summary.vm, summary.state, summary.seconds
                );
                for d in &summary.disks {
                    println!(
                        "  disk {}: {} blocks, {} data, {} zero skipped, {} already on server, {} uploaded ({}), {} deduplicated, {:.1} s",
                        d.id,
                        d.blocks,
                        d.data_blocks,
                        d.zero_blocks,
                        d.already_on_server,
                        d.uploaded_blocks,
                        crate::util::human_bytes(d.uploaded_bytes),
                        d.deduplicated_blocks,
                        d.seconds
                    );
                }
            }
            Ok(0)
        }
    }
}

fn parse_nic(s: &str) -> Result<NicSpec> {
    let (mut network, mut mac, mut ip) = (None, None, None);
    for part in s.split(',') {
        match part.split_once('=') {
            Some(("network", v)) => network = Some(v.to_string()),
            Some(("mac", v)) => mac = Some(v.to_string()),
            Some(("ip", v)) => ip = Some(v.to_string()),
            _ => bail!("--nic {s:?}: expected network=NAME,mac=MAC[,ip=IP]"),
        }
    }
    match (network, mac) {
        (Some(network), Some(mac)) => Ok(NicSpec { network, mac, ip }),
        _ => bail!("--nic {s:?}: network= and mac= are required"),
    }
}
