//! `drvault jobs`: list, show and resume jobs, and following a job until it ends.

use std::time::Duration;

use anyhow::Result;
use clap::Subcommand;

use super::console;
use super::operator::Conn;
use crate::client::Client;
use crate::wire::{Job, JobsQuery};

#[derive(Subcommand)]
pub(super) enum JobsCmd {
    /// Continue a job waiting for a manual action (a recovery plan pause).
    Resume { id: String },
}

pub(super) async fn jobs(
    id: Option<String>,
    vm: Option<String>,
    json: bool,
    conn: Conn,
) -> Result<i32> {
    let c = conn.client()?;
    if let Some(id) = id {
        let j = c.job(&id).await?;
        if json {
            super::print_json(&j)?;
        } else {
            println!(
                "{} {} [{}] {:.0}% vm={}",
                j.id,
                j.title,
                j.state.as_str(),
                j.progress * 100.0,
                j.vm.as_deref().unwrap_or("-")
            );
            for s in &j.steps {
                match &s.detail {
                    Some(d) => println!("  {:<18} {}: {d}", s.state.as_str(), s.name),
                    None => println!("  {:<18} {}", s.state.as_str(), s.name),
                }
            }
            for d in &j.disks {
                println!("  {}", disk_line(d));
            }
            if let Some(e) = &j.error {
                println!(
                    "  error: {} ({}, recoverable: {})",
                    e.message, e.code, e.recoverable
                );
            }
        }
        return Ok(0);
    }
    let list = c.jobs(&JobsQuery { vm }).await?;
    if json {
        super::print_json(&list)?;
        return Ok(0);
    }
    println!(
        "{:<36} {:<22} {:<16} {:<18} {:>5} {:>8}  ERROR",
        "ID", "JOB", "VM", "STATE", "PROG", "DURATION"
    );
    for j in &list {
        let dur = match (j.started_unix, j.ended_unix) {
            (Some(s), Some(e)) => format!("{}s", e.saturating_sub(s)),
            (Some(s), None) => format!("{}s", crate::util::unix_now().saturating_sub(s)),
            _ => "-".into(),
        };
        println!(
            "{:<36} {:<22} {:<16} {:<18} {:>4.0}% {:>8}  {}",
            j.id,
            j.title,
            j.vm.as_deref().unwrap_or("-"),
            j.state.as_str(),
            j.progress * 100.0,
            dur,
            j.error.as_ref().map(|e| e.message.as_str()).unwrap_or("")
        );
        if !j.state.is_final() {
            for d in &j.disks {
                println!("    {}", disk_line(d));
            }
        }
    }
    Ok(0)
}

/// One disk's progress: `disk os: 12.0 MiB of 40.0 MiB (30%), 85.3 MB/s, done`.
fn disk_line(d: &crate::wire::DiskProgress) -> String {
    let pct = if d.bytes_total == 0 {
        100.0
    } else {
        d.bytes_written as f64 * 100.0 / d.bytes_total as f64
    };
    format!(
        "disk {}: {} of {} ({pct:.0}%), {:.1} MB/s{}",
        d.disk,
        crate::util::human_bytes(d.bytes_written),
        crate::util::human_bytes(d.bytes_total),
        d.mb_s,
        if d.done { ", done" } else { "" }
    )
}

/// Follows a job until it ends, showing its progress.
pub(super) async fn wait_job(c: &Client, id: &str) -> Result<Job> {
    use crate::progress::FRACTION_STEPS;
    let bar = crate::progress::fraction_bar(console(), "job");
    let mut told: Option<String> = None;
    loop {
        let j = c.job(id).await?;
        if j.waiting_for != told {
            if let Some(w) = &j.waiting_for {
                let vm = j.vm.as_deref().unwrap_or("VM");
                bar.suspend(|| {
                    eprintln!("waiting for {w} (Ctrl-C stops following, not the wait: `drvault failover cancel --vm {vm}` does)")
                });
            }
            told = j.waiting_for.clone();
        }
        bar.set_position((j.progress.clamp(0.0, 1.0) * FRACTION_STEPS as f64) as u64);
        bar.set_message(j.state.as_str().to_string());
        if j.state.is_final() {
            bar.finish_and_clear();
            return Ok(j);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `drvault jobs resume`: continue a job waiting for a manual action.
pub(super) async fn resume(id: &str, conn: Conn) -> Result<i32> {
    let j = conn.client()?.resume_job(id).await?;
    println!("job {} ({}) resumed", j.id, j.title);
    Ok(0)
}
