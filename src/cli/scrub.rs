//! `drvault verify` and `drvault gc`: start the job, follow it, print its report. Exit status 0
//! when the run succeeded (and, for verify, found the scope clean), 2 when verify found damage,
//! 1 on any error.

use anyhow::{bail, Result};

use super::operator::Conn;
use crate::client::Client;
use crate::wire::{GcReport, GcRequest, JobState, VerifyReport, VerifyRequest};

#[derive(clap::Args)]
pub struct VerifyArgs {
    /// Only this VM's objects (default: every VM).
    #[arg(long)]
    vm: Option<String>,
    /// Read this share of chunks and log frames, chosen at random (maps and records are always
    /// read whole).
    #[arg(long, value_name = "PERCENT")]
    sample: Option<f64>,
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    conn: Conn,
}

#[derive(clap::Args)]
pub struct GcArgs {
    /// Report what would be freed; delete nothing.
    #[arg(long)]
    dry_run: bool,
    /// Delete unreferenced objects only when older than this many seconds (default: the
    /// server's [gc] grace_s, 24 h 5 min).
    #[arg(long, value_name = "SECONDS")]
    grace: Option<u64>,
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    conn: Conn,
}

/// Waits for a started job; an error unless it succeeded.
async fn finish_job(c: &Client, id: &str) -> Result<()> {
    let job = super::wait_job(c, id).await?;
    if job.state != JobState::Succeeded {
        let e = job
            .error
            .map(|e| format!("{} [{}]", e.message, e.code))
            .unwrap_or_default();
        bail!("job {} ({}) failed: {e}", job.id, job.title);
    }
    Ok(())
}

pub async fn verify(a: VerifyArgs) -> Result<i32> {
    let c = a.conn.client()?;
    let req = VerifyRequest {
        vm: a.vm.clone(),
        sample_percent: a.sample,
    };
    let s = c.start_verify(&req).await?;
    finish_job(&c, &s.job).await?;
    let r: VerifyReport = c.verify_report(&s.job).await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        let (objects, bytes) = r
            .checked
            .values()
            .fold((0, 0), |(o, b), c| (o + c.objects, b + c.bytes));
        println!(
            "verified {objects} objects ({}) in {:.1} s, {:.0} MB/s{}",
            crate::util::human_bytes(bytes),
            r.seconds,
            r.mb_per_s,
            if r.sample_percent < 100.0 {
                format!(", {}% sample", r.sample_percent)
            } else {
                String::new()
            }
        );
        for (f, c) in &r.checked {
            println!("  {:<8} {:>8} objects", f.word(), c.objects);
        }
        for o in &r.damaged {
            println!(
                "DAMAGED {} ({}, {}): {} [{}]",
                o.key,
                o.family.word(),
                o.problem,
                o.reason,
                o.action
            );
            for af in &o.affects {
                println!(
                    "  needed by VM {} disk {} {}",
                    af.vm,
                    if af.disk.is_empty() { "-" } else { &af.disk },
                    af.session
                        .clone()
                        .unwrap_or_else(|| format!("points {}", af.points.join(",")))
                );
            }
        }
        for p in &r.damaged_points {
            println!(
                "point {} of VM {} is damaged: failover and export refuse it",
                p.point, p.vm
            );
        }
        for d in &r.audit_damage {
            println!(
                "DAMAGED audit entry {} ({}, {}): {}",
                d.seq, d.kind, d.problem, d.reason
            );
        }
        for k in &r.healed {
            println!("healed {k}");
        }
        if r.clean {
            println!("clean: nothing damaged");
        }
    }
    Ok(if r.clean { 0 } else { 2 })
}

pub async fn gc(a: GcArgs) -> Result<i32> {
    let c = a.conn.client()?;
    let req = GcRequest {
        dry_run: a.dry_run,
        grace_s: a.grace,
    };
    let s = c.start_gc(&req).await?;
    finish_job(&c, &s.job).await?;
    let r: GcReport = c.gc_report(&s.job).await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(0);
    }
    println!(
        "{} {} objects, {} (grace {} s) in {:.1} s; scanned {}, kept {} young, {} in use by uploads",
        if r.dry_run { "would free" } else { "freed" },
        r.freed_total.objects,
        crate::util::human_bytes(r.freed_total.bytes),
        r.grace_s,
        r.seconds,
        r.scanned,
        r.kept_young.objects,
        r.kept_in_use.objects
    );
    for (f, n) in &r.freed {
        println!(
            "  {:<8} {:>8} objects {:>10}",
            f.word(),
            n.objects,
            crate::util::human_bytes(n.bytes)
        );
    }
    if r.staging_leftovers.objects > 0 {
        println!(
            "{} {} staging files of interrupted writes, {}",
            if r.dry_run { "would remove" } else { "removed" },
            r.staging_leftovers.objects,
            crate::util::human_bytes(r.staging_leftovers.bytes)
        );
    }
    Ok(0)
}
