//! CLI for resynchronization and failback: the operator's `drvault resync` and
//! `drvault failback`, and the agent's `drvault agent resync` and `drvault agent failback`.

use std::path::PathBuf;

use anyhow::{Context, Result};

use super::operator::Conn;
use super::AgentConn;
use crate::agent::backoff::Backoff;
use crate::util::human_bytes;
use crate::wire::{FailbackCommitRequest, FailbackRecord, ResyncRequest, ResyncSession};

#[derive(clap::Args)]
pub struct ResyncArgs {
    #[arg(long)]
    vm: String,
    /// Start at once instead of in the off-hours window (config [resync] window).
    #[arg(long)]
    now: bool,
    /// Disk to resynchronize (repeat); default: the disks marked resync-required, else all.
    #[arg(long = "disk")]
    disks: Vec<String>,
    /// Show the VM's latest session instead of starting one.
    #[arg(long, conflicts_with_all = ["now", "disks", "cancel"])]
    status: bool,
    /// Cancel the open session (the replica stays as it was).
    #[arg(long, conflicts_with_all = ["now", "disks"])]
    cancel: bool,
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    conn: Conn,
}

#[derive(clap::Subcommand)]
pub enum FailbackCmd {
    /// End the failback: the target disks become the replica's newest point and the VM is
    /// protected again from the on-premises side (no second initial replication).
    Commit {
        #[arg(long)]
        vm: String,
        /// Commit even if a disk was not synchronized with `drvault agent failback`.
        #[arg(long)]
        force: bool,
    },
    /// Which disks were synchronized, and the commit.
    Show {
        #[arg(long)]
        vm: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args)]
pub struct AgentResyncArgs {
    #[command(flatten)]
    conn: AgentConn,
    #[arg(long)]
    vm: String,
    #[arg(long)]
    disk: String,
    /// The source disk (raw, VHD or VHDX, see --format).
    path: PathBuf,
    #[command(flatten)]
    format: super::DiskFormatArg,
    /// Patch uploads in flight.
    #[arg(long, default_value_t = 4)]
    parallel: usize,
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
pub struct AgentFailbackArgs {
    #[command(flatten)]
    conn: AgentConn,
    #[arg(long)]
    vm: String,
    #[arg(long)]
    disk: String,
    /// The on-premises disk to bring up to date (raw or fixed VHD): the original or an
    /// alternate location.
    path: PathBuf,
    #[command(flatten)]
    format: super::DiskFormatArg,
    /// Download everything (the on-premises disk is lost: PATH is created).
    #[arg(long)]
    full: bool,
    #[arg(long)]
    json: bool,
}

fn print_session(s: &ResyncSession, json: bool) -> Result<()> {
    if json {
        super::print_json(s)?;
        return Ok(());
    }
    let when = if s.not_before_unix > 0 && s.state.word() == "scheduled" {
        format!(
            " (window opens {})",
            crate::util::rfc3339(s.not_before_unix)
        )
    } else {
        String::new()
    };
    println!(
        "resync {} of VM {}: {}{when}; disks: {}; job {}",
        s.id,
        s.vm,
        s.state.word(),
        s.disks
            .iter()
            .map(|(d, x)| format!(
                "{d} ({})",
                if x.staged_root.is_some() {
                    format!(
                        "staged, {} blocks changed, {} received",
                        x.blocks_changed,
                        human_bytes(x.bytes_received)
                    )
                } else {
                    "waiting for the agent".into()
                }
            ))
            .collect::<Vec<_>>()
            .join(", "),
        s.job
    );
    if let Some(c) = s.commit_cycle {
        println!("replica switched at point c{c}");
    }
    Ok(())
}

pub async fn resync_cmd(a: ResyncArgs) -> Result<i32> {
    let c = a.conn.client()?;
    let vm = &a.vm;
    let s: ResyncSession = if a.status {
        c.resync(vm).await?
    } else if a.cancel {
        c.cancel_resync(vm).await?
    } else {
        let req = ResyncRequest {
            now: a.now,
            disks: a.disks.clone(),
        };
        c.start_resync(vm, &req).await?
    };
    print_session(&s, a.json)?;
    if !a.status && !a.cancel && !a.json {
        for d in s.disks.keys() {
            println!(
                "on the host: drvault agent resync --creds HOST.creds.json --vm {vm} --disk {d} PATH"
            );
        }
    }
    Ok(0)
}

pub async fn failback_cmd(cmd: FailbackCmd, conn: Conn) -> Result<i32> {
    let c = conn.client()?;
    let (r, verb): (FailbackRecord, &str) = match cmd {
        FailbackCmd::Commit { vm, force } => (
            c.commit_failback(&vm, &FailbackCommitRequest { force })
                .await?,
            "committed",
        ),
        FailbackCmd::Show { vm, json: true } => {
            super::print_json(&c.failback(&vm).await?)?;
            return Ok(0);
        }
        FailbackCmd::Show { vm, json: false } => (c.failback(&vm).await?, "show"),
    };
    println!(
        "failback of VM {} from failover {}: disks synchronized: {}{}",
        r.vm,
        r.failover,
        if r.synced.is_empty() {
            "none".to_string()
        } else {
            r.synced.keys().cloned().collect::<Vec<_>>().join(", ")
        },
        match r.cycle {
            Some(c) => format!("; committed: protected again, replica at point c{c}"),
            None if verb == "committed" => String::new(),
            None => "; not committed".into(),
        }
    );
    Ok(0)
}

fn backoff(conn: &AgentConn) -> Backoff {
    Backoff {
        scale: conn.backoff_scale,
        give_up_after: conn.give_up_after,
    }
}

pub async fn agent_resync(a: AgentResyncArgs) -> Result<i32> {
    let client = a.conn.client()?;
    let opts = crate::agent::resync::ResyncOptions {
        vm: a.vm.clone(),
        disk: a.disk.clone(),
        parallel: a.parallel,
        backoff: backoff(&a.conn),
        progress: super::console() && !a.json,
        format: a.format.format,
    };
    let s = crate::agent::resync::resync(&client, &a.path, &opts)
        .await
        .context("resync")?;
    if a.json {
        super::print_json(&s)?;
    } else if s.blocks_compared == 0 && s.state == "committed" {
        println!(
            "disk {} of {}: already resynchronized by session {}{}; nothing to send",
            s.disk,
            s.vm,
            s.session,
            s.cycle
                .map(|c| format!(" (replica switched at point c{c})"))
                .unwrap_or_default()
        );
    } else {
        println!(
            "disk {} of {}: {} blocks compared, {} differ; uploaded {} in {} patches ({} of hashes fetched) in {:.1} s; session {}{}",
            s.disk,
            s.vm,
            s.blocks_compared,
            s.blocks_differing,
            human_bytes(s.bytes_uploaded),
            s.blocks_uploaded,
            human_bytes(s.hash_bytes_downloaded),
            s.seconds,
            s.state,
            match (s.cycle, s.waiting_for.is_empty()) {
                (Some(c), _) => format!(": replica switched at point c{c}"),
                (None, false) => format!(": waiting for disks {}", s.waiting_for.join(", ")),
                (None, true) => String::new(),
            }
        );
    }
    Ok(0)
}

pub async fn agent_failback(a: AgentFailbackArgs) -> Result<i32> {
    let client = a.conn.client()?;
    let opts = crate::agent::failback::FailbackOptions {
        vm: a.vm.clone(),
        disk: a.disk.clone(),
        full: a.full,
        backoff: backoff(&a.conn),
        progress: super::console() && !a.json,
        format: a.format.format,
    };
    let s = crate::agent::failback::failback(&client, &a.path, &opts)
        .await
        .context("failback")?;
    if a.json {
        super::print_json(&s)?;
    } else {
        println!(
            "disk {} of {} is up to date with failover {}: {} blocks compared, {} differed, {} written; downloaded {} ({} of hashes) in {:.1} s{}",
            s.disk,
            s.vm,
            s.failover,
            s.blocks_compared,
            s.blocks_differing,
            s.blocks_written,
            human_bytes(s.bytes_downloaded),
            human_bytes(s.hash_bytes_downloaded),
            s.seconds,
            if s.created { "; the file was created" } else { "" }
        );
    }
    Ok(0)
}
